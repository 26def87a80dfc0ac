//! The planner: `plan(fleets, instances, busy, now) -> Plan`. A pure function: no clock, no
//! socket, no file. Everything it needs is an argument, so it is tested with plain tables.
//!
//! Per fleet and slot it keeps exactly one instance of the current spec running:
//! - an empty slot gets a new instance (when the image is there);
//! - a dead instance (its task exited) stays, in `BackOff`, until its slot's backoff has passed,
//!   then it is replaced, carrying the slot's restart count and last exit; a container that never
//!   got a running task, an instance not ready within `startupTimeoutSeconds`, and one whose
//!   liveness probe fails count as crashes too;
//! - instances of an outdated spec, instances older than `rotation.maxAge` (staggered per slot)
//!   and instances whose memory passed `rotation.maxMemory` are replaced within the node's
//!   rollout budget: with `maxSurge` a new instance starts beside the old one (on a port after
//!   the fleet's range) and the old one is stopped once the new one is ready; otherwise at most
//!   `maxUnavailable` instances are down at once. Unready instances go first (they are down
//!   already). When the new spec's instances crash-loop, the rollout stalls instead of taking
//!   more healthy old instances down;
//! - slots beyond the desired count, duplicates, and instances of deleted fleets are removed.
//!
//! A fleet whose document is invalid, or that is paused, is left exactly as it is. Nothing is
//! removed for a missing fleet until the fleet list is known (after etcd answered once).

use std::collections::{BTreeMap, HashMap, HashSet};
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
    /// Ready: the readiness probe passes and (with `models.warm`) the model is loaded.
    pub ready: bool,
    /// Whether it was ever ready.
    pub was_ready: bool,
    /// Whether the kernel's OOM killer ended it.
    pub oom: bool,
    /// Since when its startup counts against `startupTimeoutSeconds`; `None` while it waits
    /// for work of the node (the model being pulled into the cache), which does not count.
    pub startup_since: Option<SystemTime>,
    /// Its liveness probe failed `failureThreshold` times in a row.
    pub unhealthy: bool,
    /// The gateway's watchdog saw it stall `failureThreshold` times in a row.
    pub stalled: bool,
    /// Anonymous plus swap memory, when measured (for `rotation.maxMemory`).
    pub memory: Option<u64>,
    /// It runs but waits for the node's model (being checked, pulled, or backing off): phase
    /// `Pending`, as image work is.
    pub model_pending: bool,
    /// Its probes have answered since the agent started: until then "not ready" means "not
    /// known yet" (an agent that just restarted must not take adopted instances for stuck ones).
    pub known: bool,
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
        Some(exit_record(code, reason, at))
    }
}

fn exit_record(code: i32, reason: &str, at: SystemTime) -> LastExit {
    LastExit {
        code,
        reason: reason.into(),
        at: humantime::format_rfc3339_seconds(at).to_string(),
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Why {
    /// Its task exited.
    Crashed,
    /// It never got a running task.
    NeverStarted,
    /// It was not ready within `startupTimeoutSeconds`.
    StartupTimeout,
    /// Its liveness probe failed.
    Unhealthy,
    /// The gateway's watchdog saw it stall `failureThreshold` times in a row.
    Stalled,
    /// Its memory passed `rotation.maxMemory`.
    MaxMemory,
    /// It runs an outdated spec.
    Outdated,
    /// It is older than `rotation.maxAge`.
    MaxAge,
    /// A new instance of its slot is ready (the end of a surge).
    Superseded,
    /// Its slot is beyond the desired count.
    ScaledDown,
    /// Its fleet is gone.
    FleetDeleted,
    /// Another instance holds its slot.
    Duplicate,
}

impl Why {
    /// The reason as status and metrics show it (`StartupTimeout`, `MaxAge`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Crashed => "Crashed",
            Why::NeverStarted => "StartError",
            Why::StartupTimeout => "StartupTimeout",
            Why::Unhealthy => "Unhealthy",
            Why::Stalled => "Stalled",
            Why::MaxMemory => "MaxMemory",
            Why::Outdated => "Outdated",
            Why::MaxAge => "MaxAge",
            Why::Superseded => "Superseded",
            Why::ScaledDown => "ScaledDown",
            Why::FleetDeleted => "FleetDeleted",
            Why::Duplicate => "Duplicate",
        }
    }
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
        /// Its port.
        port: u16,
        /// History it inherits.
        carry: Carry,
    },
    /// Create and start a new instance beside the slot's serving one (which is removed once
    /// the new one is ready).
    Surge {
        /// Fleet.
        fleet: String,
        /// Slot.
        slot: u32,
        /// Its port (after the fleet's range).
        port: u16,
        /// The slot's history (a rotation or rollout is not a restart: it carries on as is).
        carry: Carry,
        /// Why the serving instance goes.
        why: Why,
    },
    /// Stop and remove `old`, then create and start a new instance in its slot.
    Replace {
        /// The instance replaced.
        old: String,
        /// Fleet.
        fleet: String,
        /// Slot.
        slot: u32,
        /// The new instance's port (the old one's).
        port: u16,
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
    /// The key that serialises work on one slot.
    pub fn slot_key(&self) -> SlotKey {
        let (Action::Create { fleet, slot, .. }
        | Action::Surge { fleet, slot, .. }
        | Action::Replace { fleet, slot, .. }
        | Action::Remove { fleet, slot, .. }) = self;
        SlotKey::new(fleet, *slot)
    }

    /// The work in flight this action is: the port of the instance it creates, if any.
    pub fn flight(&self) -> InFlight {
        let port = match self {
            Action::Create { port, .. }
            | Action::Surge { port, .. }
            | Action::Replace { port, .. } => Some(*port),
            Action::Remove { .. } => None,
        };
        InFlight { port }
    }

    /// The instance this action stops, if any.
    pub fn stops(&self) -> Option<&str> {
        match self {
            Action::Replace { old, .. } => Some(old),
            Action::Remove { id, .. } => Some(id),
            Action::Create { .. } | Action::Surge { .. } => None,
        }
    }

    /// Why an instance is replaced or removed (`None` for a plain create).
    pub fn why(&self) -> Option<Why> {
        match self {
            Action::Surge { why, .. }
            | Action::Replace { why, .. }
            | Action::Remove { why, .. } => Some(*why),
            Action::Create { .. } => None,
        }
    }
}

/// One slot of one fleet: the unit work is serialised on (shown as `fleet/slot`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    /// Fleet.
    pub fleet: String,
    /// Slot.
    pub slot: u32,
}

impl SlotKey {
    /// The key of `fleet`'s `slot`.
    pub fn new(fleet: &str, slot: u32) -> SlotKey {
        SlotKey {
            fleet: fleet.to_string(),
            slot,
        }
    }
}

impl std::fmt::Display for SlotKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.fleet, self.slot)
    }
}

/// Work in flight on a slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    /// The port of the instance the work creates, if it creates one.
    pub port: Option<u16>,
}

/// The planner's output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Steps to take now.
    pub actions: Vec<Action>,
    /// Dead (or failing) instances waiting for their slot's backoff.
    pub backing_off: HashSet<String>,
    /// When to plan again at the latest (a backoff, a startup deadline, a rotation).
    pub wake_at: Option<SystemTime>,
    /// Fleets whose rollout stalled, with why.
    pub stalled: BTreeMap<String, String>,
}

impl Plan {
    fn wake(&mut self, at: SystemTime) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }
}

/// Everything the planner looks at.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    /// The fleets, when known; `None` before etcd (or the manifests directory) answered once.
    pub fleets: Option<&'a [Target<'a>]>,
    /// Every instance on the node.
    pub instances: &'a [Instance],
    /// Slot keys (`fleet/slot`) with work in flight: left alone.
    pub busy: &'a HashMap<SlotKey, InFlight>,
    /// Instances being stopped now.
    pub terminating: &'a HashSet<String>,
    /// Now.
    pub now: SystemTime,
}

/// When an instance created at `created` is due for rotation: `maxAge`, less a stagger of up to
/// a quarter of it that is fixed per slot (a golden-ratio sequence, so any number of slots
/// spreads evenly), so instances started together do not all rotate together.
pub fn rotation_due(created: SystemTime, max_age: Duration, slot: u32) -> SystemTime {
    let spread = ((f64::from(slot) + 1.0) * 0.618_033_988_749_895).fract();
    created + max_age - max_age.mul_f64(0.25 * spread)
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
    let busy = |fleet: &str, slot: u32| input.busy.contains_key(&SlotKey::new(fleet, slot));

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
        FleetPlan {
            fleet: target.name,
            spec,
            replicas: *replicas,
            hash,
            can_create: *can_create,
            input,
        }
        .plan(&instances, &mut out);
    }
    out
}

/// A restart the slot's lifecycle calls for: (since when the backoff counts, the crash count,
/// the exit to carry, why).
type Restart = (SystemTime, u32, Option<LastExit>, Why);

struct FleetPlan<'a> {
    fleet: &'a str,
    spec: &'a FleetSpec,
    replicas: u32,
    hash: &'a str,
    can_create: bool,
    input: &'a Input<'a>,
}

impl FleetPlan<'_> {
    fn busy(&self, slot: u32) -> Option<&InFlight> {
        self.input.busy.get(&SlotKey::new(self.fleet, slot))
    }

    fn remove(&self, i: &Instance, why: Why, out: &mut Plan) {
        out.actions.push(Action::Remove {
            id: i.id.clone(),
            fleet: self.fleet.into(),
            slot: i.slot,
            why,
        });
    }

    /// Whether (and how) an instance must be restarted: it died, never started, did not get
    /// ready in time, or fails its liveness probe. Sets the wake-up for a startup deadline.
    fn restart(&self, i: &Instance, out: &mut Plan) -> Option<Restart> {
        let now = self.input.now;
        let ran = |until: SystemTime| until.duration_since(i.created_at).unwrap_or_default();
        if i.is_dead() {
            let exited = i.exited_at.unwrap_or(now);
            return Some((
                exited,
                backoff::next_count(i.carry.crashloop, ran(exited)),
                i.exit(),
                Why::Crashed,
            ));
        }
        if matches!(i.state, TaskState::NoTask | TaskState::Created) {
            return Some((
                i.created_at,
                i.carry.crashloop.saturating_add(1),
                Some(exit_record(-1, "StartError", i.created_at)),
                Why::NeverStarted,
            ));
        }
        if i.unhealthy || i.stalled {
            // The liveness probe (or the gateway's watchdog) took failureThreshold failures to
            // decide: restart at once.
            let why = if i.stalled {
                Why::Stalled
            } else {
                Why::Unhealthy
            };
            return Some((
                SystemTime::UNIX_EPOCH,
                backoff::next_count(i.carry.crashloop, ran(now)),
                Some(exit_record(-1, why.as_str(), now)),
                why,
            ));
        }
        if !i.ready
            && !i.was_ready
            && i.known
            && let Some(since) = i.startup_since
        {
            let timeout = Duration::from_secs(u64::from(self.spec.probes.startup_timeout_seconds));
            let deadline = since + timeout;
            if now >= deadline {
                return Some((
                    deadline,
                    backoff::next_count(i.carry.crashloop, ran(deadline)),
                    Some(exit_record(-1, "StartupTimeout", deadline)),
                    Why::StartupTimeout,
                ));
            }
            out.wake(deadline);
        }
        None
    }

    /// Replaces `i` when its backoff has passed, else marks it as backing off.
    fn restart_or_wait(&self, i: &Instance, r: Restart, out: &mut Plan) {
        let (since, k, last_exit, why) = r;
        let b = &self.spec.restart_backoff;
        let due = since + backoff::delay(k, b.initial.std(), b.max.std());
        if self.input.now >= due && self.can_create {
            out.actions.push(Action::Replace {
                old: i.id.clone(),
                fleet: self.fleet.into(),
                slot: i.slot,
                port: i.port,
                carry: Carry {
                    restarts: i.carry.restarts + 1,
                    crashloop: k,
                    last_exit,
                },
                why,
            });
        } else {
            out.backing_off.insert(i.id.clone());
            if self.input.now < due {
                out.wake(due);
            }
        }
    }

    /// Why a healthy running instance should be replaced now, if it should; sets the wake-up
    /// for its rotation.
    fn replaceable(&self, i: &Instance, out: &mut Plan) -> Option<Why> {
        if i.spec_hash != self.hash {
            return Some(Why::Outdated);
        }
        let rotation = &self.spec.rotation;
        if let (Some(max), Some(used)) = (rotation.max_memory, i.memory)
            && used > max.bytes()
        {
            return Some(Why::MaxMemory);
        }
        if let Some(max_age) = rotation.max_age {
            let due = rotation_due(i.created_at, max_age.std(), i.slot);
            if self.input.now >= due {
                return Some(Why::MaxAge);
            }
            out.wake(due);
        }
        None
    }

    /// The fleet's plan, in steps: remove what is beyond the desired count; settle each slot
    /// (work in flight, surges, duplicates, an empty slot, a restart, or a healthy instance
    /// that may be due for replacement); say when a rollout stalls; replace within the budget.
    fn plan(&self, instances: &[&Instance], out: &mut Plan) {
        let mut by_slot: BTreeMap<u32, Vec<&Instance>> = BTreeMap::new();
        for i in instances {
            by_slot.entry(i.slot).or_default().push(i);
        }
        let mut ports = self.ports_taken(instances);
        self.scale_down(&by_slot, out);
        let mut tally = Tally::default();
        for slot in 0..self.replicas {
            let list = by_slot.get(&slot).cloned().unwrap_or_default();
            self.settle_slot(slot, &list, &mut ports, &mut tally, out);
        }
        self.report_stall(&tally, out);
        self.replace_within_budget(
            tally.candidates,
            tally.ready_slots,
            tally.surging,
            &mut ports,
            out,
        );
    }

    /// Ports taken: every instance's, and those of instances being created.
    fn ports_taken(&self, instances: &[&Instance]) -> HashSet<u16> {
        let mut ports: HashSet<u16> = instances.iter().map(|i| i.port).collect();
        ports.extend(
            self.input
                .busy
                .iter()
                .filter(|(k, _)| k.fleet == self.fleet)
                .filter_map(|(_, f)| f.port),
        );
        ports
    }

    /// Slots beyond the desired count go (unless work on them is in flight).
    fn scale_down(&self, by_slot: &BTreeMap<u32, Vec<&Instance>>, out: &mut Plan) {
        for (&slot, list) in by_slot.range(self.replicas..) {
            if self.busy(slot).is_none() {
                for i in list {
                    self.remove(i, Why::ScaledDown, out);
                }
            }
        }
    }

    /// One slot within the desired count.
    fn settle_slot<'i>(
        &self,
        slot: u32,
        list: &[&'i Instance],
        ports: &mut HashSet<u16>,
        tally: &mut Tally<'i>,
        out: &mut Plan,
    ) {
        tally.count_rollout(list, self.hash);
        if let Some(flight) = self.busy(slot) {
            tally.count_in_flight(list, flight, self.input.terminating);
            return;
        }
        let Some(i) = self.one_instance(list, tally, out) else {
            if list.is_empty() {
                self.create(slot, ports, out);
            }
            return;
        };
        if let Some(r) = self.restart(i, out) {
            self.restart_or_wait(i, r, out);
            return;
        }
        tally.ready_slots += u32::from(i.ready);
        if !i.ready && !i.known {
            // Unknown yet, not unready: decided once probed.
            return;
        }
        if let Some(why) = self.replaceable(i, out) {
            tally.candidates.push((i, why));
        }
    }

    /// The slot's one instance to go on with; with several (a surge, or duplicates), settles
    /// them: the end of a surge (the new instance serves, the others go), a surge in progress
    /// (the old one serves while the new one starts, or restarts with backoff; leftovers go),
    /// or duplicates (the best is kept). `None` when the slot is empty or settled here.
    fn one_instance<'i>(
        &self,
        list: &[&'i Instance],
        tally: &mut Tally<'i>,
        out: &mut Plan,
    ) -> Option<&'i Instance> {
        let keep = list.iter().copied().max_by_key(|i| {
            (
                i.is_running(),
                i.spec_hash == self.hash,
                i.ready,
                i.created_at,
            )
        });
        if list.len() <= 1 {
            return keep;
        }
        let newest = list
            .iter()
            .copied()
            .max_by_key(|i| (i.created_at, &i.id))
            .expect("non-empty");
        let serving = list
            .iter()
            .copied()
            .filter(|i| i.id != newest.id && i.is_running())
            .max_by_key(|i| (i.ready, i.created_at));
        if newest.is_running() && newest.ready {
            for i in list.iter().filter(|i| i.id != newest.id) {
                self.remove(i, Why::Superseded, out);
            }
            tally.ready_slots += 1;
            tally.surging += 1;
            return None;
        }
        if let Some(old) = serving {
            for i in list {
                if i.id != old.id && i.id != newest.id {
                    self.remove(i, Why::Duplicate, out);
                }
            }
            tally.ready_slots += u32::from(old.ready);
            tally.surging += 1;
            if let Some(r) = self.restart(newest, out) {
                self.restart_or_wait(newest, r, out);
            }
            return None;
        }
        for i in list {
            if Some(i.id.as_str()) != keep.map(|k| k.id.as_str()) {
                self.remove(i, Why::Duplicate, out);
            }
        }
        keep
    }

    /// A new instance for an empty slot, on its own port (or a free one of the pool).
    fn create(&self, slot: u32, ports: &mut HashSet<u16>, out: &mut Plan) {
        if !self.can_create {
            return;
        }
        let (_, max_surge) = self.spec.rollout.budget(self.replicas);
        let home = build_port(self.spec, slot);
        let port = if ports.contains(&home) {
            free_port(self.spec, self.replicas, max_surge, ports, false)
        } else {
            Some(home)
        };
        if let Some(port) = port {
            ports.insert(port);
            out.actions.push(Action::Create {
                fleet: self.fleet.into(),
                slot,
                port,
                carry: Carry::default(),
            });
        }
    }

    /// A rollout whose new instances keep failing while old ones run says so.
    fn report_stall(&self, tally: &Tally, out: &mut Plan) {
        if tally.crashing_new == 0 || tally.outdated == 0 {
            return;
        }
        let last = tally.last_crash.as_ref().map_or(String::new(), |e| {
            format!(" (last: {} {})", e.reason, e.code)
        });
        out.stalled.insert(
            self.fleet.into(),
            format!(
                "rollout stalled: {} instance(s) of the new spec keep failing{last}; \
                 {} instance(s) of the previous spec are kept running",
                tally.crashing_new, tally.outdated
            ),
        );
    }

    /// Replaces within the budget: unready instances first (they are down already), then by
    /// urgency (leaking memory, outdated, old), oldest first; a ready one beside itself (a
    /// surge) while surge room lasts, else in place while `maxUnavailable` allows.
    fn replace_within_budget(
        &self,
        mut candidates: Vec<(&Instance, Why)>,
        ready_slots: u32,
        surging: u32,
        ports: &mut HashSet<u16>,
        out: &mut Plan,
    ) {
        if !self.can_create || candidates.is_empty() {
            return;
        }
        let replicas = self.replicas;
        let (max_unavailable, max_surge) = self.spec.rollout.budget(replicas);
        let mut unavailable_room = max_unavailable.saturating_sub(replicas - ready_slots);
        let mut surge_room = max_surge.saturating_sub(surging);
        candidates.sort_by_key(|(i, why)| (i.ready, *why, i.created_at, i.slot));
        for (i, why) in candidates {
            if i.ready && surge_room > 0 {
                let Some(port) = free_port(self.spec, replicas, max_surge, ports, true) else {
                    continue;
                };
                ports.insert(port);
                surge_room -= 1;
                out.actions.push(Action::Surge {
                    fleet: self.fleet.into(),
                    slot: i.slot,
                    port,
                    carry: i.carry.clone(),
                    why,
                });
                continue;
            }
            if i.ready {
                if unavailable_room == 0 {
                    continue;
                }
                unavailable_room -= 1;
            }
            // A rotation or rollout is not a restart: the slot's restarts and last exit stay.
            out.actions.push(Action::Replace {
                old: i.id.clone(),
                fleet: self.fleet.into(),
                slot: i.slot,
                port: i.port,
                carry: i.carry.clone(),
                why,
            });
        }
    }
}

/// What settling the slots found, for the stall report and the budget.
#[derive(Default)]
struct Tally<'a> {
    /// Slots with a ready instance.
    ready_slots: u32,
    /// Slots with two instances (a surge).
    surging: u32,
    /// Healthy instances due for replacement, and why.
    candidates: Vec<(&'a Instance, Why)>,
    /// Instances of the new spec that keep failing.
    crashing_new: u32,
    /// Instances of a previous spec.
    outdated: u32,
    /// The last failure of the new spec.
    last_crash: Option<LastExit>,
}

impl Tally<'_> {
    /// Counts how the rollout goes in a slot.
    fn count_rollout(&mut self, list: &[&Instance], hash: &str) {
        self.outdated += list.iter().filter(|i| i.spec_hash != hash).count() as u32;
        for i in list.iter().filter(|i| i.spec_hash == hash) {
            if i.carry.crashloop > 0 && !i.ready {
                self.crashing_new += 1;
                self.last_crash = i.exit().or_else(|| i.carry.last_exit.clone());
            }
        }
    }

    /// A slot with work in flight: counted as it stands (ready, surging), left alone.
    fn count_in_flight(
        &mut self,
        list: &[&Instance],
        flight: &InFlight,
        terminating: &HashSet<String>,
    ) {
        let live: Vec<&&Instance> = list
            .iter()
            .filter(|i| i.is_running() && !terminating.contains(&i.id))
            .collect();
        if live.iter().any(|i| i.ready) {
            self.ready_slots += 1;
        }
        if live.len() + usize::from(flight.port.is_some()) > 1 {
            self.surging += 1;
        }
    }
}

fn build_port(spec: &FleetSpec, slot: u32) -> u16 {
    crate::build::port(spec, slot)
}

/// A free port of the fleet's pool: `basePort` up to the last slot's port plus the surge
/// ports. `surge`: prefer the ports after the range.
fn free_port(
    spec: &FleetSpec,
    replicas: u32,
    max_surge: u32,
    taken: &HashSet<u16>,
    surge: bool,
) -> Option<u16> {
    let start = if surge { replicas } else { 0 };
    (start..replicas + max_surge)
        .chain(0..start)
        .map(|offset| build_port(spec, offset))
        .find(|p| !taken.contains(p))
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
            startup_since: Some(t(0)),
            unhealthy: false,
            stalled: false,
            memory: None,
            known: true,
            model_pending: false,
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
        let busy: HashMap<SlotKey, InFlight> = busy
            .iter()
            .map(|s| {
                let (fleet, slot) = s.split_once('/').expect("fleet/slot");
                (
                    SlotKey::new(fleet, slot.parse().expect("slot")),
                    InFlight::default(),
                )
            })
            .collect();
        plan(&Input {
            fleets: targets,
            instances,
            busy: &busy,
            terminating: &HashSet::new(),
            now,
        })
    }

    fn kinds(p: &Plan) -> Vec<String> {
        p.actions
            .iter()
            .map(|a| match a {
                Action::Create { slot, .. } => format!("create {slot}"),
                Action::Surge {
                    slot, port, why, ..
                } => format!("surge {slot} :{port} {why:?}"),
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
        assert_eq!(kinds(&p), ["remove f-0-h1 Superseded"]);
    }

    fn ready_all(n: u32, hash: &str) -> Vec<Instance> {
        (0..n)
            .map(|i| inst(i, hash, TaskState::Running, true))
            .collect()
    }

    #[test]
    fn rotation_is_staggered_per_slot() {
        let age = Duration::from_secs(100);
        let dues: Vec<u64> = (0..8)
            .map(|slot| {
                rotation_due(t(0), age, slot)
                    .duration_since(t(0))
                    .expect("after")
                    .as_millis() as u64
            })
            .collect();
        let mut sorted = dues.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 8, "no two slots rotate together: {dues:?}");
        assert!(
            dues.iter().all(|d| (75_000..=100_000).contains(d)),
            "{dues:?}"
        );
    }

    #[test]
    fn rotation_by_age_stays_within_max_unavailable() {
        let s = spec("  rotation: {maxAge: 100s}\n  rollout: {maxUnavailable: 2}\n");
        let all = ready_all(6, "h1");
        let young = plan_of(Some(&run(&s, 6)), &all, &[], t(50));
        assert!(young.actions.is_empty());
        let first = (0..6)
            .map(|slot| rotation_due(t(0), Duration::from_secs(100), slot))
            .min();
        assert_eq!(young.wake_at, first, "wakes for the first one due");
        let old = plan_of(Some(&run(&s, 6)), &all, &[], t(200));
        assert_eq!(
            kinds(&old),
            ["replace f-0-h1 MaxAge", "replace f-1-h1 MaxAge"],
            "two at a time"
        );
        // One of them is still being replaced: one more may go.
        let p = plan_of(Some(&run(&s, 6)), &all[1..], &["f/0"], t(200));
        assert_eq!(kinds(&p), ["replace f-1-h1 MaxAge"]);
    }

    #[test]
    fn max_memory_rotates_first() {
        let s = spec(
            "  resources: {memory: 1Gi}\n  rotation: {maxMemory: 512Mi}\n  rollout: {maxUnavailable: 1}\n",
        );
        let mut all = ready_all(3, "h0");
        all[2].spec_hash = "h1".into();
        all[2].memory = Some(600 << 20);
        all[1].memory = Some(100 << 20);
        let p = plan_of(Some(&run(&s, 3)), &all, &[], t(10));
        assert_eq!(
            kinds(&p),
            ["replace f-2-h0 MaxMemory"],
            "the leak before the update"
        );
    }

    #[test]
    fn surge_starts_beside_then_supersedes() {
        let s = spec("  rotation: {maxAge: 100s}\n  rollout: {maxUnavailable: 0, maxSurge: 1}\n");
        let all = ready_all(3, "h1");
        let p = plan_of(Some(&run(&s, 3)), &all, &[], t(200));
        assert_eq!(
            kinds(&p),
            ["surge 0 :11437 MaxAge"],
            "one surge port after the range"
        );
        // The surge instance starts: nothing else happens meanwhile.
        let mut surged = all.clone();
        let mut new = inst(0, "h1", TaskState::Running, false);
        new.id = "f-0-new".into();
        new.port = 11437;
        new.created_at = t(200);
        surged.push(new.clone());
        let p = plan_of(Some(&run(&s, 3)), &surged, &[], t(201));
        assert!(p.actions.is_empty(), "{p:?}");
        // Ready: the old one goes (and only then).
        surged[3].ready = true;
        surged[3].was_ready = true;
        let p = plan_of(Some(&run(&s, 3)), &surged, &[], t(202));
        assert_eq!(kinds(&p), ["remove f-0-h1 Superseded"]);
        // Its slot lives on the surge port now; the next surge takes the free home port.
        let mut after = surged.clone();
        after.remove(0);
        let p = plan_of(Some(&run(&s, 3)), &after, &[], t(203));
        assert_eq!(kinds(&p), ["surge 1 :11434 MaxAge"]);
    }

    #[test]
    fn startup_timeout_and_liveness_restart() {
        let s = spec("  probes: {startupTimeoutSeconds: 30}\n");
        let mut slow = inst(0, "h1", TaskState::Running, false);
        slow.was_ready = false;
        let p = plan_of(Some(&run(&s, 1)), std::slice::from_ref(&slow), &[], t(10));
        assert!(p.actions.is_empty());
        assert_eq!(p.wake_at, Some(t(30)));
        let p = plan_of(Some(&run(&s, 1)), std::slice::from_ref(&slow), &[], t(31));
        assert_eq!(kinds(&p), ["replace f-0-h1 StartupTimeout"]);
        // Waiting for the node's model does not count.
        slow.startup_since = None;
        assert!(
            plan_of(Some(&run(&s, 1)), std::slice::from_ref(&slow), &[], t(99))
                .actions
                .is_empty()
        );
        let mut hung = inst(0, "h1", TaskState::Running, false);
        hung.unhealthy = true;
        let p = plan_of(Some(&run(&s, 1)), &[hung], &[], t(40));
        assert_eq!(kinds(&p), ["replace f-0-h1 Unhealthy"]);
        let Action::Replace { carry, .. } = &p.actions[0] else {
            panic!()
        };
        assert_eq!(
            carry.last_exit.as_ref().map(|e| e.reason.as_str()),
            Some("Unhealthy")
        );
    }

    #[test]
    fn unprobed_instances_are_not_taken_for_stuck_ones() {
        // An agent that just restarted: old instances of an outdated spec, not probed yet.
        let s = spec("  probes: {startupTimeoutSeconds: 30}\n  rollout: {maxUnavailable: 1}\n");
        let mut all = ready_all(3, "h0");
        for i in &mut all {
            (i.ready, i.was_ready, i.known) = (false, false, false);
        }
        let p = plan_of(Some(&run(&s, 3)), &all, &[], t(1000));
        assert!(
            p.actions.is_empty(),
            "no startup timeout and no free replacement of unknown instances: {p:?}"
        );
    }

    #[test]
    fn a_crash_looping_rollout_stalls() {
        let s = spec("  rollout: {maxUnavailable: 1}\n");
        let mut all = ready_all(4, "h0");
        let mut broken = inst(0, "h1", TaskState::Stopped, false);
        broken.carry.crashloop = 3;
        broken.exited_at = Some(t(100));
        all[0] = broken;
        let p = plan_of(Some(&run(&s, 4)), &all, &[], t(100));
        assert!(
            p.actions.is_empty(),
            "no healthy old instance goes while the new one crash-loops: {p:?}"
        );
        let why = p.stalled.get("f").expect("stalled");
        assert!(
            why.contains("rollout stalled") && why.contains("3 instance(s) of the previous spec"),
            "{why}"
        );
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

    /// A rotation or rollout is not a restart: the new instance carries the slot's restarts and
    /// last exit unchanged (issue 13: they were reset).
    #[test]
    fn rotations_and_rollouts_keep_the_slot_history() {
        let history = Carry {
            restarts: 2,
            crashloop: 0,
            last_exit: Some(fleet_api::LastExit {
                code: 137,
                reason: "OOMKilled".into(),
                at: "2026-11-28T09:59:58Z".into(),
            }),
        };
        let carried = |p: &Plan| -> Vec<Carry> {
            p.actions
                .iter()
                .filter_map(|a| match a {
                    Action::Replace { carry, .. } | Action::Surge { carry, .. } => {
                        Some(carry.clone())
                    }
                    _ => None,
                })
                .collect()
        };
        for (extra, hash, at) in [
            ("  rotation: {maxAge: 100s}\n", "h1", t(200)),
            ("  rollout: {maxUnavailable: 1}\n", "h0", t(10)),
            ("  rollout: {maxUnavailable: 0, maxSurge: 1}\n", "h0", t(10)),
        ] {
            let s = spec(extra);
            let mut i = inst(0, hash, TaskState::Running, true);
            i.carry = history.clone();
            let p = plan_of(Some(&run(&s, 1)), &[i], &[], at);
            assert_eq!(
                carried(&p),
                std::slice::from_ref(&history),
                "{extra}: {p:?}"
            );
        }
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
