//! From the planner's actions to the executor's operations: the container a new instance gets
//! (from its fleet's evaluation) and the grace an instance that stops is given.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use crate::build::{self, Carry, NodeCtx};
use crate::evaluate::{Eval, Evals};
use crate::executor::Op;
use crate::planner::Action;

/// The grace of an instance nothing says anything about (made before the grace label).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// The operation for `action`, or `None` when it cannot be done now (its fleet has no image,
/// or is no longer run). New container IDs are unique with `salt`; `graces` are instances' own
/// (from their labels), for instances whose fleet cannot say (deleted, broken).
pub fn op_for(
    action: &Action,
    evals: &Evals,
    node: &NodeCtx,
    now: SystemTime,
    salt: &mut u64,
    graces: &HashMap<String, Duration>,
) -> Option<Op> {
    let grace = |fleet: &str, id: &str| match evals.get(fleet).and_then(|(_, e)| e.fleet()) {
        Some(fleet) => fleet.spec.termination_grace_period.std(),
        None => graces.get(id).copied().unwrap_or(DEFAULT_GRACE),
    };
    let mut new_spec = |fleet: &str, slot: u32, port: u16, carry: &Carry| {
        let (
            _,
            Eval::Run {
                fleet: f,
                hash,
                image: Some(image),
                ..
            },
        ) = evals.get(fleet)?
        else {
            return None;
        };
        *salt += 1;
        let id = build::new_id(fleet, slot, now, *salt);
        Some(Box::new(build::container_spec(
            fleet,
            &f.spec,
            hash,
            image,
            node,
            (slot, port),
            id,
            carry,
            now,
        )))
    };
    match action {
        Action::Create {
            fleet,
            slot,
            port,
            carry,
        }
        | Action::Surge {
            fleet,
            slot,
            port,
            carry,
            ..
        } => new_spec(fleet, *slot, *port, carry).map(Op::Create),
        Action::Replace {
            old,
            fleet,
            slot,
            port,
            carry,
            ..
        } => {
            let new = new_spec(fleet, *slot, *port, carry)?;
            Some(Op::Replace {
                old: old.clone(),
                grace: grace(fleet, old),
                new,
            })
        }
        Action::Remove { id, fleet, .. } => Some(Op::Remove {
            id: id.clone(),
            grace: grace(fleet, id),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::Why;
    use fleet_api::{Context, parse_fleet};

    fn evals(grace: &str, image: bool) -> Evals {
        let src = format!(
            "apiVersion: ollama-fleet.io/v1alpha1\nkind: OllamaFleet\nmetadata: {{name: f}}\nspec:\n  model: m\n  image: i\n  replicas: {{perNode: 1}}\n  terminationGracePeriod: {grace}\n"
        );
        let fleet = parse_fleet(&src, &Context::default()).expect("valid");
        let image = image.then(|| Box::new(fleet_runtime::fake::FakeRuntime::image_named("i")));
        Evals::from([(
            "f".to_string(),
            (
                1,
                Eval::Run {
                    fleet: Box::new(fleet),
                    replicas: 1,
                    hash: "h".into(),
                    image,
                    image_wait: None,
                    request: None,
                    cut: None,
                },
            ),
        )])
    }

    fn node() -> NodeCtx {
        NodeCtx {
            sockets: 1,
            topology: Default::default(),
            cgroup_parent: "/t".into(),
            nofile: None,
            bounds_swap: true,
            host_files: vec![],
            models: Default::default(),
        }
    }

    #[test]
    fn graces_come_from_the_fleet_else_from_the_instance() {
        let remove = |fleet: &str| Action::Remove {
            id: "x-0-1".into(),
            fleet: fleet.into(),
            slot: 0,
            why: Why::ScaledDown,
        };
        let graces = HashMap::from([("x-0-1".to_string(), Duration::from_secs(2))]);
        let grace_of = |op: Option<Op>| match op {
            Some(Op::Remove { grace, .. }) => grace,
            other => panic!("{other:?}"),
        };
        let (e, n, t) = (evals("7s", true), node(), SystemTime::UNIX_EPOCH);
        let mut salt = 0;
        assert_eq!(
            grace_of(op_for(&remove("f"), &e, &n, t, &mut salt, &graces)),
            Duration::from_secs(7),
            "the fleet says"
        );
        assert_eq!(
            grace_of(op_for(&remove("gone"), &e, &n, t, &mut salt, &graces)),
            Duration::from_secs(2),
            "deleted fleet: the instance's own"
        );
        assert_eq!(
            grace_of(op_for(
                &remove("gone"),
                &e,
                &n,
                t,
                &mut salt,
                &HashMap::new()
            )),
            DEFAULT_GRACE,
            "nothing says"
        );
    }

    #[test]
    fn new_instances_need_the_image_and_get_the_planned_port() {
        let create = Action::Create {
            fleet: "f".into(),
            slot: 0,
            port: 12345,
            carry: Carry::default(),
        };
        let (n, t) = (node(), SystemTime::UNIX_EPOCH);
        let mut salt = 0;
        let none = op_for(
            &create,
            &evals("1s", false),
            &n,
            t,
            &mut salt,
            &HashMap::new(),
        );
        assert!(none.is_none(), "no image yet: nothing to create");
        let Some(Op::Create(spec)) = op_for(
            &create,
            &evals("1s", true),
            &n,
            t,
            &mut salt,
            &HashMap::new(),
        ) else {
            panic!("a create");
        };
        assert_eq!(
            spec.labels.get(fleet_api::LABEL_PORT).map(String::as_str),
            Some("12345")
        );
        assert_eq!(salt, 1);
    }
}
