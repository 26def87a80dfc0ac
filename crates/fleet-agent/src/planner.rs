//! The planner: `plan(fleets, instances, busy, now) -> Plan`. A pure function: no clock, no
//! socket, no file. Everything it needs is an argument, so it is tested with plain tables.
//!
//! Per fleet and slot it keeps exactly one instance of the current spec running:
//! - an empty slot gets a new instance (when the image is there);
//! - a dead instance (its task exited) stays, in `BackOff`, until its slot's backoff has passed,
//!   then it is replaced, carrying the slot's restart count and last exit;
//! - a container that never got a running task (an interrupted create) is replaced at once;
//! - instances of an outdated spec are replaced within `rollout.maxUnavailable`;
//! - slots beyond the desired count, duplicates, and instances of deleted fleets are removed.
//!
//! A fleet whose document is invalid, or that is paused, is left exactly as it is. Nothing is
//! removed for a missing fleet until the fleet list is known (after etcd answered once).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use fleet_api::{FleetSpec, LastExit};
use fleet_runtime::TaskState;

use crate::backoff;
use crate::build::Carry;

/// An instance as observed: its labels, its task, and what the probes say.
#[derive(Clone, Debug, PartialEq)]
pub struct Instance {
    /// Container ID.
    pub id: String,
    /// Fleet.
    pub fleet: String,
    /// Slot.
    pub slot: u32,
    /// Port.
    pub port: u16,
    /// Spec hash it was created with.
    pub spec_hash: String,
    /// When it was created.
    pub created_at: SystemTime,
    /// Its slot's history.
    pub carry: Carry,
    /// Task state.
    pub state: TaskState,
    /// Exit status once stopped.
    pub exit_code: Option<u32>,
    /// Exit time once stopped.
    pub exited_at: Option<SystemTime>,
    /// Whether its readiness probe passes.
    pub ready: bool,
    /// Whether it was ever ready.
    pub was_ready: bool,
    /// Whether the kernel's OOM killer ended it.
    pub oom: bool,
}

impl Instance {
    /// The task exited (or containerd lost track of it).
    pub fn is_dead(&self) -> bool {
        matches!(self.state, TaskState::Stopped | TaskState::Unknown)
    }

    /// The task runs.
    pub fn is_running(&self) -> bool {
        matches!(self.state, TaskState::Running | TaskState::Paused)
    }

    /// How its task ended, for status and for the next instance of the slot.
    pub fn exit(&self) -> Option<LastExit> {
        if !self.is_dead() {
            return None;
        }
        let code = self
            .exit_code
            .map_or(-1, |c| i32::try_from(c).unwrap_or(-1));
        let reason = if self.oom {
            "OOMKilled"
        } else if code == 0 {
            "Completed"
        } else {
            "Error"
        };
        let at = self.exited_at.unwrap_or(self.created_at);
        Some(LastExit {
            code,
            reason: reason.into(),
            at: humantime::format_rfc3339_seconds(at).to_string(),
        })
    }
}

/// What should happen to a fleet on this node.
#[derive(Clone, Debug)]
pub enum Desired<'a> {
    /// Run `replicas` instances of `spec` (hash `hash`); new ones only when `can_create`
    /// (the image is present).
    Run {
        /// The spec.
        spec: &'a FleetSpec,
        /// Instances on this node (0 when the node is not selected).
        replicas: u32,
        /// The current spec hash.
        hash: &'a str,
        /// Whether new instances can be created now.
        can_create: bool,
    },
    /// Touch nothing: the document is invalid, or the fleet is paused.
    Keep,
}

/// A fleet to plan for.
#[derive(Clone, Debug)]
pub struct Target<'a> {
    /// Fleet name.
    pub name: &'a str,
    /// What to do.
    pub desired: Desired<'a>,
}

/// Why an instance is removed or replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Why {
    /// Its task exited.
    Crashed,
    /// It never got a running task.
    NeverStarted,
    /// It runs an outdated spec.
    Outdated,
    /// Its slot is beyond the desired count.
    ScaledDown,
    /// Its fleet is gone.
    FleetDeleted,
    /// Another instance holds its slot.
    Duplicate,
}

/// One step for the executor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create and start a new instance in an empty slot.
    Create {
        /// Fleet.
        fleet: String,
        /// Slot.
        slot: u32,
        /// History it inherits.
        carry: Carry,
    },
    /// Stop and remove `old`, then create and start a new instance in its slot.
    Replace {
        /// The instance replaced.
        old: String,
        /// Fleet.
        fleet: String,
        /// Slot.
        slot: u32,
        /// History the new instance inherits.
        carry: Carry,
        /// Why.
        why: Why,
    },
    /// Stop and remove an instance.
    Remove {
        /// The instance.
        id: String,
        /// Fleet.
        fleet: String,
        /// Slot.
        slot: u32,
        /// Why.
        why: Why,
    },
}

impl Action {
    /// The key that serialises work on one slot: `fleet/slot`.
    pub fn slot_key(&self) -> String {
        match self {
            Action::Create { fleet, slot, .. }
            | Action::Replace { fleet, slot, .. }
            | Action::Remove { fleet, slot, .. } => slot_key(fleet, *slot),
        }
    }
}

/// `fleet/slot`.
pub fn slot_key(fleet: &str, slot: u32) -> String {
    format!("{fleet}/{slot}")
}

/// The planner's output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Steps to take now.
    pub actions: Vec<Action>,
    /// Dead instances waiting for their slot's backoff.
    pub backing_off: HashSet<String>,
    /// When to plan again at the latest (the earliest backoff to expire).
    pub wake_at: Option<SystemTime>,
}

/// Everything the planner looks at.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    /// The fleets, when known; `None` before etcd (or the manifests directory) answered once.
    pub fleets: Option<&'a [Target<'a>]>,
    /// Every instance on the node.
    pub instances: &'a [Instance],
    /// Slot keys (`fleet/slot`) with work in flight: left alone.
    pub busy: &'a HashSet<String>,
    /// Now.
    pub now: SystemTime,
}

/// Plans the next steps.
pub fn plan(input: &Input<'_>) -> Plan {
    let mut out = Plan::default();
    let mut by_fleet: BTreeMap<&str, Vec<&Instance>> = BTreeMap::new();
    for i in input.instances {
        by_fleet.entry(i.fleet.as_str()).or_default().push(i);
    }
    let Some(fleets) = input.fleets else {
        return out;
    };
    let busy = |fleet: &str, slot: u32| input.busy.contains(&slot_key(fleet, slot));

    // Instances of fleets that no longer exist.
    let known: HashSet<&str> = fleets.iter().map(|t| t.name).collect();
    for (fleet, instances) in &by_fleet {
        if known.contains(fleet) {
            continue;
        }
        for i in instances {
            if !busy(fleet, i.slot) {
                out.actions.push(Action::Remove {
                    id: i.id.clone(),
                    fleet: i.fleet.clone(),
                    slot: i.slot,
                    why: Why::FleetDeleted,
                });
            }
        }
    }

    for target in fleets {
        let Desired::Run {
            spec,
            replicas,
            hash,
            can_create,
        } = &target.desired
        else {
            continue;
        };
        let instances = by_fleet.get(target.name).cloned().unwrap_or_default();
        plan_fleet(
            target.name,
            spec,
            *replicas,
            hash,
            *can_create,
            &instances,
            &busy,
            input.now,
            &mut out,
        );
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn plan_fleet(
    fleet: &str,
    spec: &FleetSpec,
    replicas: u32,
    hash: &str,
    can_create: bool,
    instances: &[&Instance],
    busy: &dyn Fn(&str, u32) -> bool,
    now: SystemTime,
    out: &mut Plan,
) {
    let mut by_slot: BTreeMap<u32, Vec<&Instance>> = BTreeMap::new();
    for i in instances {
        by_slot.entry(i.slot).or_default().push(i);
    }

    // Slots beyond the desired count.
    for (&slot, list) in by_slot.range(replicas..) {
        if busy(fleet, slot) {
            continue;
        }
        for i in list {
            out.actions.push(Action::Remove {
                id: i.id.clone(),
                fleet: fleet.into(),
                slot,
                why: Why::ScaledDown,
            });
        }
    }

    let backoff = &spec.restart_backoff;
    let mut outdated: Vec<&Instance> = Vec::new();
    let mut ready = 0u32;
    let mut in_flight = 0u32;
    for slot in 0..replicas {
        if busy(fleet, slot) {
            in_flight += 1;
            continue;
        }
        let list = by_slot.get(&slot).cloned().unwrap_or_default();
        // Keep the best instance of the slot; remove the others.
        let keep = list
            .iter()
            .copied()
            .max_by_key(|i| (i.is_running(), i.spec_hash == hash, i.ready, i.created_at));
        for i in &list {
            if Some(i.id.as_str()) != keep.map(|k| k.id.as_str()) {
                out.actions.push(Action::Remove {
                    id: i.id.clone(),
                    fleet: fleet.into(),
                    slot,
                    why: Why::Duplicate,
                });
            }
        }
        let Some(i) = keep else {
            if can_create {
                out.actions.push(Action::Create {
                    fleet: fleet.into(),
                    slot,
                    carry: Carry::default(),
                });
            }
            continue;
        };
        // A dead instance, or a container whose task never started (a start error, or a create
        // cut short): both count as a crash for the slot's backoff, so nothing that cannot run
        // is retried in a tight loop.
        let restart = if i.is_dead() {
            let exited = i.exited_at.unwrap_or(now);
            let ran = exited.duration_since(i.created_at).unwrap_or_default();
            Some((
                exited,
                backoff::next_count(i.carry.crashloop, ran),
                i.exit(),
                Why::Crashed,
            ))
        } else if matches!(i.state, TaskState::NoTask | TaskState::Created) {
            let start_error = LastExit {
                code: -1,
                reason: "StartError".into(),
                at: humantime::format_rfc3339_seconds(i.created_at).to_string(),
            };
            Some((
                i.created_at,
                i.carry.crashloop.saturating_add(1),
                Some(start_error),
                Why::NeverStarted,
            ))
        } else {
            None
        };
        if let Some((since, k, last_exit, why)) = restart {
            let due = since + backoff::delay(k, backoff.initial.std(), backoff.max.std());
            if now >= due && can_create {
                out.actions.push(Action::Replace {
                    old: i.id.clone(),
                    fleet: fleet.into(),
                    slot,
                    carry: Carry {
                        restarts: i.carry.restarts + 1,
                        crashloop: k,
                        last_exit,
                    },
                    why,
                });
            } else {
                out.backing_off.insert(i.id.clone());
                if now < due {
                    out.wake_at = Some(out.wake_at.map_or(due, |w| w.min(due)));
                }
            }
            continue;
        }
        if i.ready {
            ready += 1;
        }
        if i.spec_hash != hash {
            outdated.push(i);
        }
    }

    // Replace outdated instances within the unavailability budget: unready ones first (they
    // are unavailable already), then ready ones while enough stay available.
    if !can_create || outdated.is_empty() {
        return;
    }
    let (max_unavailable, _) = spec.rollout.budget(replicas);
    let unavailable = replicas.saturating_sub(ready);
    let mut allowed = max_unavailable.saturating_sub(unavailable.max(in_flight));
    outdated.sort_by_key(|i| (i.ready, i.slot));
    for i in outdated {
        if i.ready {
            if allowed == 0 {
                break;
            }
            allowed -= 1;
        }
        out.actions.push(Action::Replace {
            old: i.id.clone(),
            fleet: fleet.into(),
            slot: i.slot,
            carry: Carry::default(),
            why: Why::Outdated,
        });
    }
}

/// How long until `t`, zero if past.
pub fn until(now: SystemTime, t: SystemTime) -> Duration {
    t.duration_since(now).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_api::{Context, parse_fleet};

    fn spec(extra: &str) -> FleetSpec {
        let src = format!(
            "apiVersion: ollama-fleet.io/v1alpha1\nkind: OllamaFleet\nmetadata: {{name: f}}\nspec:\n  model: m\n  replicas: {{perNode: 3}}\n{extra}"
        );
        parse_fleet(&src, &Context::default()).expect("valid").spec
    }

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn inst(slot: u32, hash: &str, state: TaskState, ready: bool) -> Instance {
        Instance {
            id: format!("f-{slot}-{hash}"),
            fleet: "f".into(),
            slot,
            port: 11434 + slot as u16,
            spec_hash: hash.into(),
            created_at: t(0),
            carry: Carry::default(),
            state,
            exit_code: (state == TaskState::Stopped).then_some(1),
            exited_at: (state == TaskState::Stopped).then_some(t(5)),
            ready,
            was_ready: ready,
            oom: false,
        }
    }

    fn run<'a>(spec: &'a FleetSpec, replicas: u32) -> Vec<Target<'a>> {
        vec![Target {
            name: "f",
            desired: Desired::Run {
                spec,
                replicas,
                hash: "h1",
                can_create: true,
            },
        }]
    }

    fn plan_of(
        targets: Option<&[Target<'_>]>,
        instances: &[Instance],
        busy: &[&str],
        now: SystemTime,
    ) -> Plan {
        let busy: HashSet<String> = busy.iter().map(|s| s.to_string()).collect();
        plan(&Input {
            fleets: targets,
            instances,
            busy: &busy,
            now,
        })
    }

    fn kinds(p: &Plan) -> Vec<String> {
        p.actions
            .iter()
            .map(|a| match a {
                Action::Create { slot, .. } => format!("create {slot}"),
                Action::Replace { old, why, .. } => format!("replace {old} {why:?}"),
                Action::Remove { id, why, .. } => format!("remove {id} {why:?}"),
            })
            .collect()
    }

    #[test]
    fn empty_node_creates_every_slot() {
        let s = spec("");
        let p = plan_of(Some(&run(&s, 3)), &[], &[], t(0));
        assert_eq!(kinds(&p), ["create 0", "create 1", "create 2"]);
    }

    #[test]
    fn converged_node_does_nothing() {
        let s = spec("");
        let all: Vec<Instance> = (0..3)
            .map(|i| inst(i, "h1", TaskState::Running, true))
            .collect();
        assert_eq!(
            plan_of(Some(&run(&s, 3)), &all, &[], t(10)),
            Plan::default()
        );
    }

    #[test]
    fn nothing_happens_before_the_fleets_are_known() {
        let orphan = inst(0, "h1", TaskState::Stopped, false);
        assert_eq!(plan_of(None, &[orphan], &[], t(10)), Plan::default());
    }

    #[test]
    fn busy_slots_are_left_alone() {
        let s = spec("");
        let p = plan_of(Some(&run(&s, 3)), &[], &["f/1"], t(0));
        assert_eq!(kinds(&p), ["create 0", "create 2"]);
    }

    #[test]
    fn no_image_no_creates() {
        let s = spec("");
        let targets = vec![Target {
            name: "f",
            desired: Desired::Run {
                spec: &s,
                replicas: 2,
                hash: "h1",
                can_create: false,
            },
        }];
        assert!(plan_of(Some(&targets), &[], &[], t(0)).actions.is_empty());
    }

    #[test]
    fn scale_down_removes_the_highest_slots() {
        let s = spec("");
        let all: Vec<Instance> = (0..5)
            .map(|i| inst(i, "h1", TaskState::Running, true))
            .collect();
        assert_eq!(
            kinds(&plan_of(Some(&run(&s, 3)), &all, &[], t(10))),
            ["remove f-3-h1 ScaledDown", "remove f-4-h1 ScaledDown"]
        );
        let none = plan_of(Some(&run(&s, 0)), &all, &[], t(10));
        assert_eq!(
            none.actions.len(),
            5,
            "a node no longer selected removes everything"
        );
    }

    #[test]
    fn deleted_fleets_are_removed_and_invalid_or_paused_ones_kept() {
        let mut other = inst(0, "x", TaskState::Running, true);
        other.fleet = "gone".into();
        other.id = "gone-0-x".into();
        let mine = inst(0, "h1", TaskState::Stopped, false);
        let targets = vec![Target {
            name: "f",
            desired: Desired::Keep,
        }];
        let p = plan_of(Some(&targets), &[other.clone(), mine], &[], t(100));
        assert_eq!(
            kinds(&p),
            ["remove gone-0-x FleetDeleted"],
            "a kept fleet's dead instance stays too"
        );
    }

    #[test]
    fn first_crash_is_replaced_at_once_carrying_history() {
        let s = spec("");
        let mut dead = inst(1, "h1", TaskState::Stopped, false);
        dead.exit_code = Some(137);
        dead.oom = true;
        let all = vec![
            inst(0, "h1", TaskState::Running, true),
            dead,
            inst(2, "h1", TaskState::Running, true),
        ];
        let p = plan_of(Some(&run(&s, 3)), &all, &[], t(5));
        assert_eq!(p.actions.len(), 1);
        let Action::Replace {
            old, carry, why, ..
        } = &p.actions[0]
        else {
            panic!("{p:?}")
        };
        assert_eq!((old.as_str(), *why), ("f-1-h1", Why::Crashed));
        assert_eq!((carry.restarts, carry.crashloop), (1, 1));
        let exit = carry.last_exit.as_ref().expect("last exit");
        assert_eq!((exit.code, exit.reason.as_str()), (137, "OOMKilled"));
    }

    #[test]
    fn repeated_crashes_back_off_exponentially() {
        let s = spec("  restartBackoff: {initial: 1s, max: 5m}\n");
        let mut dead = inst(0, "h1", TaskState::Stopped, false);
        dead.carry.crashloop = 3; // the 4th consecutive crash: wait 4s after the exit
        dead.exited_at = Some(t(5));
        let p = plan_of(Some(&run(&s, 1)), std::slice::from_ref(&dead), &[], t(7));
        assert!(p.actions.is_empty());
        assert!(p.backing_off.contains(&dead.id));
        assert_eq!(p.wake_at, Some(t(9)));
        let p = plan_of(Some(&run(&s, 1)), std::slice::from_ref(&dead), &[], t(9));
        assert_eq!(kinds(&p), ["replace f-0-h1 Crashed"]);
        let Action::Replace { carry, .. } = &p.actions[0] else {
            panic!()
        };
        assert_eq!(carry.crashloop, 4);
    }

    #[test]
    fn a_long_run_resets_the_backoff() {
        let s = spec("");
        let mut dead = inst(0, "h1", TaskState::Stopped, false);
        dead.carry.crashloop = 9;
        dead.carry.restarts = 9;
        dead.exited_at = Some(t(700));
        let p = plan_of(Some(&run(&s, 1)), &[dead], &[], t(700));
        let Action::Replace { carry, .. } = &p.actions[0] else {
            panic!("{p:?}")
        };
        assert_eq!(
            (carry.crashloop, carry.restarts),
            (1, 10),
            "restarts keep counting, the backoff starts over"
        );
    }

    #[test]
    fn containers_that_cannot_start_back_off_too() {
        let s = spec("  restartBackoff: {initial: 1s, max: 5m}\n");
        let mut half = inst(0, "h1", TaskState::NoTask, false);
        let p = plan_of(Some(&run(&s, 1)), std::slice::from_ref(&half), &[], t(1));
        assert_eq!(
            kinds(&p),
            ["replace f-0-h1 NeverStarted"],
            "the first is retried at once"
        );
        let Action::Replace { carry, .. } = &p.actions[0] else {
            panic!()
        };
        assert_eq!((carry.restarts, carry.crashloop), (1, 1));
        assert_eq!(
            carry.last_exit.as_ref().map(|e| e.reason.as_str()),
            Some("StartError")
        );
        // The third failure in a row waits 2s after its creation.
        half.carry.crashloop = 2;
        let p = plan_of(Some(&run(&s, 1)), std::slice::from_ref(&half), &[], t(1));
        assert!(p.actions.is_empty());
        assert_eq!(p.wake_at, Some(t(2)));
        assert_eq!(
            kinds(&plan_of(Some(&run(&s, 1)), &[half], &[], t(2))),
            ["replace f-0-h1 NeverStarted"]
        );
    }

    #[test]
    fn duplicates_keep_the_best_instance() {
        let s = spec("");
        let mut newer = inst(0, "h1", TaskState::Running, true);
        newer.id = "f-0-new".into();
        newer.created_at = t(50);
        let old_dead = inst(0, "h1", TaskState::Stopped, false);
        let p = plan_of(Some(&run(&s, 1)), &[old_dead, newer], &[], t(60));
        assert_eq!(kinds(&p), ["remove f-0-h1 Duplicate"]);
    }

    #[test]
    fn outdated_instances_roll_within_max_unavailable() {
        // 4 ready instances of an old spec, maxUnavailable 1: one at a time.
        let s = spec("  rollout: {maxUnavailable: 1}\n");
        let old: Vec<Instance> = (0..4)
            .map(|i| inst(i, "h0", TaskState::Running, true))
            .collect();
        let p = plan_of(Some(&run(&s, 4)), &old, &[], t(10));
        assert_eq!(kinds(&p), ["replace f-0-h0 Outdated"]);
        // While slot 0 is being replaced, nothing else goes.
        let p = plan_of(Some(&run(&s, 4)), &old[1..], &["f/0"], t(11));
        assert!(p.actions.is_empty(), "{p:?}");
        // An unready outdated instance is replaced regardless (it is unavailable already), but
        // then no ready one goes.
        let mut mixed = old.clone();
        mixed[2].ready = false;
        let p = plan_of(Some(&run(&s, 4)), &mixed, &[], t(12));
        assert_eq!(kinds(&p), ["replace f-2-h0 Outdated"]);
    }

    #[test]
    fn percent_budgets_round_down_but_allow_one() {
        let s = spec("  rollout: {maxUnavailable: 50%}\n");
        let old: Vec<Instance> = (0..3)
            .map(|i| inst(i, "h0", TaskState::Running, true))
            .collect();
        assert_eq!(
            plan_of(Some(&run(&s, 3)), &old, &[], t(10)).actions.len(),
            1,
            "50% of 3 rounds down to 1"
        );
        let s = spec("  rollout: {maxUnavailable: 10%}\n");
        assert_eq!(
            plan_of(Some(&run(&s, 3)), &old, &[], t(10)).actions.len(),
            1,
            "0 rounds up to 1 when surge is 0"
        );
    }
}
