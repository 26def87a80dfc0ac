//! Each fleet's status on this node, from one pass's evaluations, instances and plan: the
//! per-instance entries (phase, message), the summary, and the conditions. Pure.

use std::collections::{BTreeMap, HashMap, HashSet};

use fleet_api::{Condition, FleetStatus, InstanceStatus, Phase};

use super::{condition as c, instance_status, pending_slot, phase, summarize};
use crate::evaluate::{Eval, Evals};
use crate::models::{Gate, GateKey};
use crate::planner::{Instance, Plan, SlotKey};
use crate::policy::Policy;
use crate::reason::Waiting;

/// What one pass knows, for status.
pub struct Pass<'a> {
    /// This node.
    pub node: &'a str,
    /// Its sockets (a paused fleet's desired count).
    pub sockets: u32,
    /// The node's policy (refusal messages).
    pub policy: &'a Policy,
    /// Every fleet, evaluated.
    pub evals: &'a Evals,
    /// Every instance.
    pub instances: &'a [Instance],
    /// The plan.
    pub plan: &'a Plan,
    /// Instances being stopped or about to be.
    pub leaving: &'a HashSet<String>,
    /// Why an instance waits (its model, its warm-up), by container ID.
    pub messages: &'a HashMap<String, String>,
    /// The model gates.
    pub gates: &'a HashMap<GateKey, Gate>,
    /// The last error of a slot's last action, if it failed.
    pub last_error: &'a dyn Fn(&SlotKey) -> Option<String>,
    /// What the node's model cache knows of models (the prompt cache new instances get).
    pub models: &'a HashMap<String, crate::ollama::ModelFacts>,
}

impl std::fmt::Debug for Pass<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pass")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// Every fleet's status on this node: the fleets evaluated, and fleets with instances left.
pub fn fleet_statuses(pass: &Pass<'_>) -> Vec<FleetStatus> {
    let mut by_fleet: BTreeMap<&str, Vec<&Instance>> = BTreeMap::new();
    for i in pass.instances {
        by_fleet.entry(&i.labels.fleet).or_default().push(i);
    }
    let mut names: Vec<&str> = pass.evals.keys().map(String::as_str).collect();
    names.extend(by_fleet.keys().copied());
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .filter_map(|name| {
            let mine = by_fleet.get(name).map(Vec::as_slice).unwrap_or_default();
            fleet_status(pass, name, mine)
        })
        .collect()
}

fn fleet_status(pass: &Pass<'_>, name: &str, mine: &[&Instance]) -> Option<FleetStatus> {
    let eval = pass.evals.get(name);
    let mut inst: Vec<InstanceStatus> = mine
        .iter()
        .map(|i| {
            let phase = phase(
                i,
                pass.leaving.contains(&i.id),
                pass.plan.backing_off.contains(&i.id),
            );
            let message =
                (pass.last_error)(&SlotKey::new(&i.labels.fleet, i.labels.slot)).or_else(|| {
                    matches!(phase, Phase::Starting | Phase::Pending)
                        .then(|| pass.messages.get(&i.id).cloned())
                        .flatten()
                });
            instance_status(i, phase, message)
        })
        .collect();
    // Slots waiting for their image show as Pending, with the reason.
    if let Some((
        _,
        Eval::Run {
            fleet,
            replicas,
            image: None,
            image_wait: Some(why),
            ..
        },
    )) = eval
    {
        for slot in 0..*replicas {
            if !inst.iter().any(|i| i.slot == slot) {
                inst.push(pending_slot(
                    slot,
                    crate::build::port(&fleet.spec, slot),
                    &why.message,
                ));
            }
        }
    }
    let (generation, desired, hash) = match eval {
        None => (0, 0, None),
        Some((generation, Eval::Invalid(_))) => (*generation, inst.len() as u32, None),
        Some((generation, Eval::Paused(f))) => {
            (*generation, f.spec.replicas.count(pass.sockets), None)
        }
        Some((generation, Eval::Refused { replicas, .. })) => (*generation, *replicas, None),
        Some((generation, Eval::Run { replicas, hash, .. })) => {
            (*generation, *replicas, Some(hash.as_str()))
        }
    };
    // A fleet this node does not run, with nothing left of it here, has no status here.
    if desired == 0 && inst.is_empty() && matches!(eval, Some((_, Eval::Run { .. })) | None) {
        return None;
    }
    let mut summary = summarize(name, pass.node, generation, desired, hash, inst, Vec::new());
    let model_wait = match eval {
        Some((_, Eval::Run { fleet, .. })) if desired > 0 => {
            match pass.gates.get(&GateKey::model(name, &fleet.spec.model)) {
                Some(Gate::Waiting(why)) => Some(why),
                _ => None,
            }
        }
        _ => None,
    };
    if let Some((_, Eval::Run { fleet, .. })) = eval {
        let facts = pass
            .models
            .get(&fleet_api::ModelRef::key(&fleet.spec.model));
        summary.prompt_cache = Some(match crate::build::prompt_cache(&fleet.spec, facts) {
            crate::build::CacheRam::Engine => "engine".into(),
            crate::build::CacheRam::Pending => "pending".into(),
            crate::build::CacheRam::Bytes(b) => fleet_api::Quantity(b).to_string(),
        });
    }
    summary.conditions = conditions(
        eval.map(|(_, e)| e),
        &summary,
        pass.plan.stalled.get(name).map(String::as_str),
        model_wait,
        pass.policy,
    );
    Some(summary)
}

/// A fleet's conditions on this node, from its evaluation and its summed-up status: whether
/// its spec is valid, whether this node admitted it, whether enough instances are available,
/// and whether it is progressing (and if not, why).
pub fn conditions(
    eval: Option<&Eval>,
    s: &FleetStatus,
    stalled: Option<&str>,
    model_wait: Option<&Waiting>,
    policy: &Policy,
) -> Vec<Condition> {
    match eval {
        None => vec![c(
            "Progressing",
            true,
            "FleetDeleted",
            "the fleet was deleted; removing its instances",
        )],
        Some(Eval::Invalid(e)) => vec![
            c("SpecValid", false, "Invalid", e.clone()),
            c(
                "Progressing",
                false,
                "SpecInvalid",
                "running instances are left as they are",
            ),
        ],
        Some(Eval::Paused(_)) => vec![
            c("SpecValid", true, "Parsed", ""),
            c(
                "Progressing",
                false,
                "Paused",
                "spec.paused is true: no changes are made",
            ),
        ],
        Some(Eval::Refused { refusal, .. }) => vec![
            c("SpecValid", true, "Parsed", ""),
            c("Admitted", false, refusal.reason(), refusal.message(policy)),
            c(
                "Progressing",
                false,
                refusal.reason(),
                "nothing is started on this node; running instances are left as they are",
            ),
        ],
        Some(Eval::Run {
            fleet,
            image_wait,
            cut,
            ..
        }) => {
            let desired = s.desired_replicas;
            let (max_unavailable, _) = fleet.spec.rollout.budget(desired);
            let available = s.ready_replicas + max_unavailable >= desired;
            let converged = s.ready_replicas == desired
                && s.updated_replicas == desired
                && s.replicas == desired;
            let waiting = |w: &Waiting| {
                // A pull under way is progress; a failed or impossible one is not.
                c(
                    "Progressing",
                    w.reason.is_progress(),
                    w.reason.as_str(),
                    w.message.clone(),
                )
            };
            let progressing = match (image_wait, stalled, model_wait) {
                (Some(w), _, _) if desired > 0 => waiting(w),
                _ if converged => c("Progressing", false, "Converged", ""),
                (_, Some(why), _) => c("Progressing", false, "RolloutStalled", why),
                (_, _, Some(w)) => waiting(w),
                _ => c(
                    "Progressing",
                    true,
                    "Reconciling",
                    format!(
                        "{} of {desired} instances ready, {} on the current spec",
                        s.ready_replicas, s.updated_replicas
                    ),
                ),
            };
            let reason = if available {
                "MinimumReplicasAvailable"
            } else {
                "MinimumReplicasUnavailable"
            };
            let admitted = match cut {
                Some(r) => c("Admitted", false, r.reason(), r.message(policy)),
                None => c("Admitted", true, "Admitted", ""),
            };
            vec![
                c("SpecValid", true, "Parsed", ""),
                admitted,
                c(
                    "Available",
                    available,
                    reason,
                    format!("{} of {desired} instances ready", s.ready_replicas),
                ),
                progressing,
            ]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reason::Reason;
    use fleet_api::{Context, parse_fleet};

    fn run(image_wait: Option<Waiting>) -> Eval {
        let src = "apiVersion: ollama-fleet.io/v1alpha1\nkind: OllamaFleet\nmetadata: {name: f}\nspec:\n  model: m\n  replicas: {perNode: 2}\n";
        Eval::Run {
            fleet: Box::new(parse_fleet(src, &Context::default()).expect("valid")),
            replicas: 2,
            hash: "h".into(),
            image: None,
            image_wait,
            request: None,
            cut: None,
        }
    }

    /// Two desired, `ready` of them ready and updated.
    fn status(ready: u32) -> FleetStatus {
        let mut s = summarize("f", "n", 1, 2, Some("h"), Vec::new(), Vec::new());
        (s.ready_replicas, s.updated_replicas, s.replicas) = (ready, ready, ready);
        s
    }

    /// `Progressing` from what the fleet waits for, one row per case: (image wait, stalled,
    /// model wait, ready) -> (status, reason).
    #[test]
    fn progressing_table() {
        let w = |r: Reason| Some(Waiting::new(r, format!("{r}: ...")));
        let rows = [
            (w(Reason::Pulling), None, None, 0, ("True", "Pulling")),
            (
                w(Reason::ImagePullBackOff),
                None,
                None,
                0,
                ("False", "ImagePullBackOff"),
            ),
            (
                w(Reason::ErrImageNeverPull),
                None,
                None,
                0,
                ("False", "ErrImageNeverPull"),
            ),
            (None, None, None, 2, ("False", "Converged")),
            (
                None,
                Some("slot 0 crash-loops"),
                w(Reason::PreparingModel),
                1,
                ("False", "RolloutStalled"),
            ),
            (
                None,
                None,
                w(Reason::PreparingModel),
                1,
                ("True", "PreparingModel"),
            ),
            (
                None,
                None,
                w(Reason::ModelPullBackOff),
                1,
                ("False", "ModelPullBackOff"),
            ),
            (None, None, None, 1, ("True", "Reconciling")),
        ];
        for (image, stalled, model, ready, (want_status, want_reason)) in rows {
            let eval = run(image);
            let conds = conditions(
                Some(&eval),
                &status(ready),
                stalled,
                model.as_ref(),
                &Policy::default(),
            );
            let p = conds
                .iter()
                .find(|c| c.kind == "Progressing")
                .expect("Progressing");
            assert_eq!(
                (p.status.as_str(), p.reason.as_str()),
                (want_status, want_reason),
                "{conds:?}"
            );
        }
    }
}
