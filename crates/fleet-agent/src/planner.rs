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
//!   rollout budget: with `maxSurge` a new instance starts beside the old one and the old one
//!   is stopped once the new one is ready; otherwise at most `maxUnavailable` instances are down
//!   at once. Unready instances go first (they are down already). When the new spec's
//!   instances crash-loop, the rollout stalls instead of taking more healthy old instances down;
//! - every new instance listens where the *current* spec puts its slot: `hostIP`, port
//!   `basePort + slot` when that address is free (a surge beside an instance on the same address
//!   takes a surge port after the range; a slot whose new home an instance about to move still
//!   holds waits for it). An instance on an address the spec no longer gives (another `hostIP`,
//!   a port outside the fleet's pool) is outdated like one of an older spec;
//! - slots beyond the desired count, duplicates, and instances of deleted fleets are removed.
//!
//! A fleet whose document is invalid, or that is paused, is left exactly as it is. Nothing is
//! removed for a missing fleet until the fleet list is known (after etcd answered once).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use fleet_api::{ExitReason, FleetSpec, LastExit};
use fleet_runtime::TaskState;

use crate::build::{Carry, InstanceLabels};
use crate::{backoff, build};

/// An instance as observed: its labels, its task, and what the probes say.
#[derive(Clone, Debug, PartialEq)]
pub struct Instance {
    /// Container ID.
    pub id: String,
    /// What its labels say: fleet, slot, address, spec hash, creation time, the slot's history.
    pub labels: InstanceLabels,
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
            ExitReason::OomKilled
        } else if code == 0 {
            ExitReason::Completed
        } else {
            ExitReason::Error
        };
        let at = self.exited_at.unwrap_or(self.labels.created_at);
        Some(exit_record(code, reason, at))
    }
}

fn exit_record(code: i32, reason: ExitReason, at: SystemTime) -> LastExit {
    LastExit {
        code,
        reason,
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
        /// Whether new instances get a sized prompt cache (their model is known on the node):
        /// instances made before, with none, are then outdated.
        cache_known: bool,
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
    /// It runs an outdated spec, or on an address the spec no longer gives its fleet.
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
    /// The reasons that are rotations (counted in `ollama_fleet_rotations_total`).
    pub const ROTATIONS: [Why; 2] = [Why::MaxAge, Why::MaxMemory];

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
        by_fleet.entry(i.labels.fleet.as_str()).or_default().push(i);
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
            if !busy(fleet, i.labels.slot) {
                out.actions.push(Action::Remove {
                    id: i.id.clone(),
                    fleet: i.labels.fleet.clone(),
                    slot: i.labels.slot,
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
            cache_known,
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
            cache_known: *cache_known,
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
    cache_known: bool,
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
            slot: i.labels.slot,
            why,
        });
    }

    /// Whether (and how) an instance must be restarted: it died, never started, did not get
    /// ready in time, or fails its liveness probe. Sets the wake-up for a startup deadline.
    fn restart(&self, i: &Instance, out: &mut Plan) -> Option<Restart> {
        let now = self.input.now;
        let ran = |until: SystemTime| {
            until
                .duration_since(i.labels.created_at)
                .unwrap_or_default()
        };
        if i.is_dead() {
            let exited = i.exited_at.unwrap_or(now);
            return Some((
                exited,
                backoff::next_count(i.labels.carry.crashloop, ran(exited)),
                i.exit(),
                Why::Crashed,
            ));
        }
        if matches!(i.state, TaskState::NoTask | TaskState::Created) {
            return Some((
                i.labels.created_at,
                i.labels.carry.crashloop.saturating_add(1),
                Some(exit_record(-1, ExitReason::StartError, i.labels.created_at)),
                Why::NeverStarted,
            ));
        }
        if i.unhealthy || i.stalled {
            // The liveness probe (or the gateway's watchdog) took failureThreshold failures to
            // decide: restart at once.
            let (why, reason) = if i.stalled {
                (Why::Stalled, ExitReason::Stalled)
            } else {
                (Why::Unhealthy, ExitReason::Unhealthy)
            };
            return Some((
                SystemTime::UNIX_EPOCH,
                backoff::next_count(i.labels.carry.crashloop, ran(now)),
                Some(exit_record(-1, reason, now)),
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
                    backoff::next_count(i.labels.carry.crashloop, ran(deadline)),
                    Some(exit_record(-1, ExitReason::StartupTimeout, deadline)),
                    Why::StartupTimeout,
                ));
            }
            out.wake(deadline);
        }
        None
    }

    /// Replaces `i` when its backoff has passed, else marks it as backing off.
    fn restart_or_wait(&self, i: &Instance, r: Restart, ports: &mut Ports<'_>, out: &mut Plan) {
        let (since, k, last_exit, why) = r;
        let b = &self.spec.restart_backoff;
        let due = since + backoff::delay(k, b.initial.std(), b.max.std());
        let port = || self.port_for(i.labels.slot, Some(i), false, false, ports);
        if self.input.now >= due
            && self.can_create
            && let Some(port) = port()
        {
            ports.take(self.spec.network.host_ip, port);
            out.actions.push(Action::Replace {
                old: i.id.clone(),
                fleet: self.fleet.into(),
                slot: i.labels.slot,
                port,
                carry: Carry {
                    restarts: i.labels.carry.restarts + 1,
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
        // Made before its model was known (no prompt cache), and not serving yet: made again
        // with one, when the model is in the node's shared cache (its own cache would be pulled
        // again). Once it served, it keeps its way until it is replaced anyway.
        let cache_pending = i.labels.prompt_cache == Some(build::CacheRam::Pending)
            && !self.spec.models.host_path.is_empty();
        if i.labels.spec_hash != self.hash
            || !self.in_place(i)
            || (cache_pending && self.cache_known && !i.was_ready)
        {
            return Some(Why::Outdated);
        }
        let rotation = &self.spec.rotation;
        // A prompt cache that is full but bounded is no leak: its bound does not count.
        let cache = i
            .labels
            .prompt_cache
            .and_then(build::CacheRam::bytes)
            .unwrap_or(0);
        if let (Some(max), Some(used)) = (rotation.max_memory, i.memory)
            && used.saturating_sub(cache) > max.bytes()
        {
            return Some(Why::MaxMemory);
        }
        if let Some(max_age) = rotation.max_age {
            let due = rotation_due(i.labels.created_at, max_age.std(), i.labels.slot);
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
            by_slot.entry(i.labels.slot).or_default().push(i);
        }
        let before = out.actions.len();
        let mut ports = self.ports_taken(instances);
        self.scale_down(&by_slot, out);
        let mut tally = Tally::default();
        for slot in 0..self.replicas {
            let list = by_slot.get(&slot).cloned().unwrap_or_default();
            self.settle_slot(slot, &list, &mut ports, &mut tally, out);
        }
        tally.acted = out.actions.len() - before;
        self.report_stall(&tally, out);
        let candidates = std::mem::take(&mut tally.candidates);
        self.replace_within_budget(candidates, &tally, &mut ports, out);
    }

    /// The addresses taken: every instance's, and those of instances being created (on the
    /// spec's `hostIP`). An instance whose slot will get a new one elsewhere (it runs an
    /// outdated spec or address, its slot goes, or it is being stopped) is marked as moving.
    fn ports_taken<'i>(&self, instances: &[&'i Instance]) -> Ports<'i> {
        let mut ports = Ports::default();
        for i in instances {
            let stays = i.labels.slot < self.replicas
                && i.labels.spec_hash == self.hash
                && self.in_place(i)
                && !self.input.terminating.contains(&i.id);
            ports.held.push(Held {
                ip: i.labels.host_ip,
                port: i.labels.port,
                id: Some(&i.id),
                moves: !stays,
            });
        }
        let flights = self
            .input
            .busy
            .iter()
            .filter(|(k, _)| k.fleet == self.fleet);
        for port in flights.filter_map(|(_, f)| f.port) {
            ports.take(self.spec.network.host_ip, port);
        }
        ports
    }

    /// Whether the instance listens where the spec puts the fleet: on its `hostIP` (when the
    /// instance says which), on a port of its pool (see [`build::port_pool`]).
    fn in_place(&self, i: &Instance) -> bool {
        let net = &self.spec.network;
        i.labels.host_ip.is_none_or(|ip| ip == net.host_ip)
            && build::port_pool(self.spec, self.replicas).contains(&u32::from(i.labels.port))
    }

    /// Where a new instance of `slot` listens: its home port (`basePort + slot`) when that is
    /// free; `None` when another instance that is about to move holds it and `may_wait` (it goes
    /// home once that one has moved: a shifted range rolls from its free end); else `old`'s own
    /// port when `old` is replaced in place and that port is still in the pool; else a free port
    /// of the pool (after the range first, for a surge). A surge never takes `old`'s address.
    fn port_for(
        &self,
        slot: u32,
        old: Option<&Instance>,
        surge: bool,
        may_wait: bool,
        ports: &Ports<'_>,
    ) -> Option<u16> {
        let ip = self.spec.network.host_ip;
        let home = build::port(self.spec, slot);
        let own = old.map(|o| o.id.as_str());
        let frees = if surge { None } else { own };
        if ports.free(ip, home, frees) {
            return Some(home);
        }
        let others: Vec<&Held<'_>> = ports
            .holders(ip, home)
            .filter(|h| own.is_none() || h.id != own)
            .collect();
        if may_wait && !others.is_empty() && others.iter().all(|h| h.moves) {
            return None;
        }
        if let Some(old) = old.filter(|o| !surge && self.in_place(o))
            && ports.free(ip, old.labels.port, own)
        {
            return Some(old.labels.port);
        }
        let (_, max_surge) = self.spec.rollout.budget(self.replicas);
        let start = if surge { self.replicas } else { 0 };
        (start..self.replicas + max_surge)
            .chain(0..start)
            .map(|offset| build::port(self.spec, offset))
            .find(|p| ports.free(ip, *p, frees))
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
        ports: &mut Ports<'i>,
        tally: &mut Tally<'i>,
        out: &mut Plan,
    ) {
        tally.count_rollout(list, self.hash);
        if let Some(flight) = self.busy(slot) {
            tally.count_in_flight(list, flight, self.input.terminating);
            return;
        }
        let Some(i) = self.one_instance(list, ports, tally, out) else {
            if list.is_empty() {
                self.create(slot, ports, out);
            }
            return;
        };
        if let Some(r) = self.restart(i, out) {
            self.restart_or_wait(i, r, ports, out);
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
        ports: &mut Ports<'i>,
        tally: &mut Tally<'i>,
        out: &mut Plan,
    ) -> Option<&'i Instance> {
        let keep = list.iter().copied().max_by_key(|i| {
            (
                i.is_running(),
                i.labels.spec_hash == self.hash,
                i.ready,
                i.labels.created_at,
            )
        });
        if list.len() <= 1 {
            return keep;
        }
        let newest = list
            .iter()
            .copied()
            .max_by_key(|i| (i.labels.created_at, &i.id))
            .expect("non-empty");
        let serving = list
            .iter()
            .copied()
            .filter(|i| i.id != newest.id && i.is_running())
            .max_by_key(|i| (i.ready, i.labels.created_at));
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
                self.restart_or_wait(newest, r, ports, out);
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

    /// A new instance for an empty slot, on its own port (or a free one of the pool). While
    /// the fleet's model is not known on the node (its prompt cache cannot be sized), only one
    /// instance is made: the model is pulled through it, and the others follow once it is known.
    fn create(&self, slot: u32, ports: &mut Ports<'_>, out: &mut Plan) {
        if !self.can_create || (!self.cache_known && !ports.held.is_empty()) {
            return;
        }
        if let Some(port) = self.port_for(slot, None, false, false, ports) {
            ports.take(self.spec.network.host_ip, port);
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
    /// surge) while surge room lasts, else in place while `maxUnavailable` allows. One whose home
    /// port another moving instance holds waits for it, unless nothing of the fleet moves at all
    /// (instances holding each other's home ports in a ring): then the first takes another port.
    fn replace_within_budget(
        &self,
        mut candidates: Vec<(&Instance, Why)>,
        tally: &Tally<'_>,
        ports: &mut Ports<'_>,
        out: &mut Plan,
    ) {
        if !self.can_create || candidates.is_empty() {
            return;
        }
        let replicas = self.replicas;
        let (max_unavailable, max_surge) = self.spec.rollout.budget(replicas);
        let mut room = Room {
            unavailable: max_unavailable.saturating_sub(replicas - tally.ready_slots),
            surge: max_surge.saturating_sub(tally.surging),
        };
        candidates.sort_by_key(|(i, why)| (i.ready, *why, i.labels.created_at, i.labels.slot));
        let before = out.actions.len();
        let mut waiting = Vec::new();
        for (i, why) in candidates {
            if self.replace_one(i, why, true, &mut room, ports, out) == Placed::Waits {
                waiting.push((i, why));
            }
        }
        let still = out.actions.len() == before
            && tally.acted == 0
            && !self.input.busy.keys().any(|k| k.fleet == self.fleet);
        if still {
            for (i, why) in waiting {
                if self.replace_one(i, why, false, &mut room, ports, out) == Placed::Yes {
                    break;
                }
            }
        }
    }

    /// Replaces `i` (beside itself while surge room lasts, else in place while there is room
    /// to be unavailable), on the port [`FleetPlan::port_for`] gives.
    fn replace_one(
        &self,
        i: &Instance,
        why: Why,
        may_wait: bool,
        room: &mut Room,
        ports: &mut Ports<'_>,
        out: &mut Plan,
    ) -> Placed {
        let (fleet, slot) = (self.fleet.to_string(), i.labels.slot);
        // A rotation or rollout is not a restart: the slot's restarts and last exit stay.
        let carry = i.labels.carry.clone();
        let surge = i.ready && room.surge > 0;
        if !surge && i.ready && room.unavailable == 0 {
            return Placed::No;
        }
        let Some(port) = self.port_for(slot, Some(i), surge, may_wait, ports) else {
            return if may_wait { Placed::Waits } else { Placed::No };
        };
        ports.take(self.spec.network.host_ip, port);
        if surge {
            room.surge -= 1;
            out.actions.push(Action::Surge {
                fleet,
                slot,
                port,
                carry,
                why,
            });
        } else {
            if i.ready {
                room.unavailable -= 1;
            }
            out.actions.push(Action::Replace {
                old: i.id.clone(),
                fleet,
                slot,
                port,
                carry,
                why,
            });
        }
        Placed::Yes
    }
}

/// What the rollout budget still allows in a pass.
struct Room {
    /// Ready instances that may still go down.
    unavailable: u32,
    /// Instances that may still start beside their slot's.
    surge: u32,
}

/// Whether a replacement was planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placed {
    /// It was.
    Yes,
    /// Not now: no room in the budget, or no free port.
    No,
    /// Its home port is held by an instance about to move: it waits for it.
    Waits,
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
    /// Actions planned for the fleet before the budget's turn.
    acted: usize,
}

impl Tally<'_> {
    /// Counts how the rollout goes in a slot.
    fn count_rollout(&mut self, list: &[&Instance], hash: &str) {
        self.outdated += list.iter().filter(|i| i.labels.spec_hash != hash).count() as u32;
        for i in list.iter().filter(|i| i.labels.spec_hash == hash) {
            if i.labels.carry.crashloop > 0 && !i.ready {
                self.crashing_new += 1;
                self.last_crash = i.exit().or_else(|| i.labels.carry.last_exit.clone());
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

/// An address held on the node: by one of the fleet's instances, or by work in flight.
#[derive(Clone, Debug)]
struct Held<'a> {
    /// Its IP (`None`: an instance made before the address label; it may be any).
    ip: Option<IpAddr>,
    /// Its port.
    port: u16,
    /// The instance (`None`: an instance being created).
    id: Option<&'a str>,
    /// Its slot gets a new instance elsewhere, or it is going.
    moves: bool,
}

/// The addresses held by a fleet's instances and the work in flight.
#[derive(Clone, Debug, Default)]
struct Ports<'a> {
    held: Vec<Held<'a>>,
}

impl Ports<'_> {
    /// What holds `port` on an address that collides with `ip`.
    fn holders(&self, ip: IpAddr, port: u16) -> impl Iterator<Item = &Held<'_>> {
        self.held
            .iter()
            .filter(move |h| h.port == port && h.ip.is_none_or(|h| build::addresses_collide(h, ip)))
    }

    /// Whether `ip:port` is free, once the instance `frees` (if any) is gone.
    fn free(&self, ip: IpAddr, port: u16, frees: Option<&str>) -> bool {
        self.holders(ip, port)
            .all(|h| frees.is_some() && h.id == frees)
    }

    /// `ip:port` is taken by an instance being created.
    fn take(&mut self, ip: IpAddr, port: u16) {
        self.held.push(Held {
            ip: Some(ip),
            port,
            id: None,
            moves: false,
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
            labels: InstanceLabels::new("f", slot, 11434 + slot as u16, hash, t(0)),
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
                cache_known: true,
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
                cache_known: true,
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
        other.labels.fleet = "gone".into();
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
        dead.labels.carry.crashloop = 3; // the 4th consecutive crash: wait 4s after the exit
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
        dead.labels.carry.crashloop = 9;
        dead.labels.carry.restarts = 9;
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
        half.labels.carry.crashloop = 2;
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
        newer.labels.created_at = t(50);
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
        all[2].labels.spec_hash = "h1".into();
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
        new.labels.port = 11437;
        new.labels.created_at = t(200);
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
        broken.labels.carry.crashloop = 3;
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

    /// Plans and carries out the plan (every new instance starts ready at once, every stop is
    /// done) until nothing is left to do; returns the instances and the rounds it took.
    fn roll_out(s: &FleetSpec, replicas: u32, mut all: Vec<Instance>) -> (Vec<Instance>, u32) {
        for round in 1..=40 {
            let p = plan_of(Some(&run(s, replicas)), &all, &[], t(u64::from(round)));
            if p.actions.is_empty() {
                return (all, round);
            }
            for a in &p.actions {
                if let Some(id) = a.stops() {
                    all.retain(|i| i.id != id);
                }
                if let Action::Create { slot, port, .. }
                | Action::Surge { slot, port, .. }
                | Action::Replace { slot, port, .. } = a
                {
                    let mut new = inst(*slot, "h1", TaskState::Running, true);
                    new.id = format!("f-{slot}-r{round}");
                    new.labels.port = *port;
                    new.labels.host_ip = Some(s.network.host_ip);
                    new.labels.created_at = t(u64::from(round));
                    assert!(
                        !all.iter().any(|i| i.labels.port == *port
                            && i.labels.host_ip.is_none_or(|ip| ip == s.network.host_ip)),
                        "round {round}: {a:?} takes a port that is in use: {all:?}"
                    );
                    all.push(new);
                }
            }
        }
        panic!("no end to the rollout: {all:?}");
    }

    fn ports_of(all: &[Instance]) -> Vec<(u32, u16)> {
        let mut ports: Vec<(u32, u16)> =
            all.iter().map(|i| (i.labels.slot, i.labels.port)).collect();
        ports.sort_unstable();
        ports
    }

    /// Issue 20: a `basePort` change rolled out with every replacement on its slot's old port.
    #[test]
    fn a_base_port_change_moves_every_slot_to_its_new_port() {
        let old: Vec<Instance> = (0..4)
            .map(|i| inst(i, "h0", TaskState::Running, true))
            .collect();
        // In place, one at a time.
        let s = spec("  network: {basePort: 11500}\n  rollout: {maxUnavailable: 1, maxSurge: 0}\n");
        let p = plan_of(Some(&run(&s, 4)), &old, &[], t(10));
        let [Action::Replace { port, why, .. }] = p.actions.as_slice() else {
            panic!("{p:?}")
        };
        assert_eq!(
            (*port, *why),
            (11500, Why::Outdated),
            "the new home, not 11434"
        );
        let (done, _) = roll_out(&s, 4, old.clone());
        assert_eq!(
            ports_of(&done),
            [(0, 11500), (1, 11501), (2, 11502), (3, 11503)]
        );
        // Beside the old one: the new home is free, so no surge port is needed.
        let s = spec("  network: {basePort: 11500}\n  rollout: {maxUnavailable: 0, maxSurge: 1}\n");
        let p = plan_of(Some(&run(&s, 4)), &old, &[], t(10));
        assert_eq!(kinds(&p), ["surge 0 :11500 Outdated"]);
        let (done, _) = roll_out(&s, 4, old);
        assert_eq!(
            ports_of(&done),
            [(0, 11500), (1, 11501), (2, 11502), (3, 11503)]
        );
    }

    /// A range shifted onto itself: a slot whose new home another old instance still holds
    /// waits for it to move, so the rollout runs from the free end and every slot ends at home
    /// (taking whatever port was free would leave the slots permuted).
    #[test]
    fn a_shifted_range_rolls_from_its_free_end() {
        let old: Vec<Instance> = (0..4)
            .map(|i| inst(i, "h0", TaskState::Running, true))
            .collect();
        for (shift, budget) in [
            (1, "maxUnavailable: 4, maxSurge: 0"),
            (1, "maxUnavailable: 1, maxSurge: 0"),
            (2, "maxUnavailable: 0, maxSurge: 1"),
        ] {
            let s = spec(&format!(
                "  network: {{basePort: {}}}\n  rollout: {{{budget}}}\n",
                11434 + shift
            ));
            let p = plan_of(Some(&run(&s, 4)), &old, &[], t(10));
            let first = p
                .actions
                .iter()
                .map(|a| a.slot_key().slot)
                .collect::<Vec<_>>();
            assert!(
                first.iter().all(|slot| *slot >= 4 - shift),
                "shift {shift}, {budget}: only slots whose new home is free go first: {p:?}"
            );
            let (done, _) = roll_out(&s, 4, old.clone());
            let home: Vec<(u32, u16)> = (0..4)
                .map(|i| (i, 11434 + shift as u16 + i as u16))
                .collect();
            assert_eq!(ports_of(&done), home, "shift {shift}, {budget}");
        }
    }

    /// Instances holding each other's new homes in a ring (one lives on a surge port that is
    /// another slot's new home) do not wait on each other forever: one takes another port.
    #[test]
    fn a_ring_of_waiting_slots_is_broken() {
        let mut old: Vec<Instance> = (0..4)
            .map(|i| inst(i, "h0", TaskState::Running, true))
            .collect();
        old[0].labels.port = 11438; // slot 0 lives on the old surge port
        let s = spec("  network: {basePort: 11435}\n  rollout: {maxUnavailable: 1, maxSurge: 0}\n");
        let (done, _) = roll_out(&s, 4, old);
        assert_eq!(done.len(), 4);
        let pool = 11435..=11438;
        assert!(
            done.iter()
                .all(|i| pool.contains(&i.labels.port) && i.labels.spec_hash == "h1"),
            "{done:?}"
        );
    }

    /// A `hostIP` change: the new address does not collide with the old one's, so a surge
    /// starts on the slot's home port at once; a wildcard collides with every address.
    #[test]
    fn a_host_ip_change_rolls_out_to_the_new_address() {
        let on = |ip: &str| -> Vec<Instance> {
            (0..2)
                .map(|i| {
                    let mut x = inst(i, "h0", TaskState::Running, true);
                    x.labels.host_ip = Some(ip.parse().expect("ip"));
                    x
                })
                .collect()
        };
        let s =
            spec("  network: {hostIP: 127.0.0.2}\n  rollout: {maxUnavailable: 0, maxSurge: 1}\n");
        let p = plan_of(Some(&run(&s, 2)), &on("127.0.0.1"), &[], t(10));
        assert_eq!(kinds(&p), ["surge 0 :11434 Outdated"]);
        let (done, _) = roll_out(&s, 2, on("127.0.0.1"));
        assert_eq!(ports_of(&done), [(0, 11434), (1, 11435)]);
        let p = plan_of(Some(&run(&s, 2)), &on("0.0.0.0"), &[], t(10));
        assert_eq!(
            kinds(&p),
            ["surge 0 :11436 Outdated"],
            "the wildcard holds 11434"
        );
        // In place, the old one's address is free once it is gone.
        let s = spec("  network: {hostIP: 0.0.0.0}\n  rollout: {maxUnavailable: 1, maxSurge: 0}\n");
        let (done, _) = roll_out(&s, 2, on("127.0.0.1"));
        assert_eq!(ports_of(&done), [(0, 11434), (1, 11435)]);
        assert!(
            done.iter()
                .all(|i| i.labels.host_ip == Some(s.network.host_ip))
        );
    }

    /// An instance of the current spec hash on a port or address the spec no longer gives
    /// (made by an agent with the issue-20 bug) is outdated; one on a surge port is not.
    #[test]
    fn an_instance_off_its_fleets_addresses_is_outdated() {
        let s = spec("  network: {basePort: 11500}\n  rollout: {maxUnavailable: 1, maxSurge: 1}\n");
        let mut all: Vec<Instance> = (0..3)
            .map(|i| {
                let mut x = inst(i, "h1", TaskState::Running, true);
                x.labels.port = 11500 + i as u16;
                x
            })
            .collect();
        all[1].labels.port = 11503; // the surge port: fine
        assert!(
            plan_of(Some(&run(&s, 3)), &all, &[], t(10))
                .actions
                .is_empty()
        );
        all[2].labels.port = 11436;
        let p = plan_of(Some(&run(&s, 3)), &all, &[], t(10));
        assert_eq!(kinds(&p), ["surge 2 :11502 Outdated"]);
        all[2].labels.port = 11502;
        all[2].labels.host_ip = Some("127.0.0.9".parse().expect("ip"));
        let p = plan_of(Some(&run(&s, 3)), &all, &[], t(10));
        assert_eq!(kinds(&p), ["surge 2 :11502 Outdated"]);
    }

    /// A crashed instance's replacement, and a new instance in an empty slot, go home.
    #[test]
    fn restarts_and_creates_go_to_the_home_port() {
        let s = spec("  network: {basePort: 11500}\n");
        let dead = inst(0, "h0", TaskState::Stopped, false);
        let p = plan_of(Some(&run(&s, 2)), &[dead], &[], t(10));
        let ports: Vec<u16> = p
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Replace { port, .. } | Action::Create { port, .. } => Some(*port),
                _ => None,
            })
            .collect();
        assert_eq!(ports, [11500, 11501]);
    }

    /// While a fleet's model is not known on the node, only one instance is made (the model is
    /// pulled through it; the others follow with a sized prompt cache). Once it is known, that
    /// instance, made without a prompt cache, is made again if it has not served yet.
    #[test]
    fn the_prompt_cache_waits_for_the_model() {
        let s = spec("  models: {hostPath: /var/lib/ollama-fleet/models}\n");
        let targets = |cache_known| {
            vec![Target {
                name: "f",
                desired: Desired::Run {
                    spec: &s,
                    replicas: 3,
                    hash: "h1",
                    can_create: true,
                    cache_known,
                },
            }]
        };
        let p = plan_of(Some(&targets(false)), &[], &[], t(0));
        assert_eq!(kinds(&p), ["create 0"], "one to pull through");
        let mut puller = inst(0, "h1", TaskState::Running, false);
        puller.labels.prompt_cache = Some(build::CacheRam::Pending);
        puller.was_ready = false;
        let p = plan_of(
            Some(&targets(false)),
            std::slice::from_ref(&puller),
            &[],
            t(1),
        );
        assert!(p.actions.is_empty(), "the others wait: {p:?}");
        let p = plan_of(
            Some(&targets(true)),
            std::slice::from_ref(&puller),
            &[],
            t(2),
        );
        assert_eq!(
            kinds(&p),
            ["create 1", "create 2", "replace f-0-h1 Outdated"],
            "the model is known: the others, and the puller again"
        );
        puller.ready = true;
        puller.was_ready = true;
        let p = plan_of(
            Some(&targets(true)),
            std::slice::from_ref(&puller),
            &[],
            t(2),
        );
        assert_eq!(kinds(&p), ["create 1", "create 2"], "it served: it stays");
    }

    /// A prompt cache that is full but bounded is not a leak: `rotation.maxMemory` counts the
    /// instance's memory beyond its cache's bound.
    #[test]
    fn max_memory_is_not_fooled_by_a_bounded_prompt_cache() {
        let s = spec("  rotation: {maxMemory: 512Mi}\n");
        let mut i = inst(0, "h1", TaskState::Running, true);
        i.memory = Some(700 << 20);
        i.labels.prompt_cache = Some(build::CacheRam::Bytes(300 << 20));
        let p = plan_of(Some(&run(&s, 1)), std::slice::from_ref(&i), &[], t(10));
        assert!(
            p.actions.is_empty(),
            "400 MiB beyond its 300 MiB cache: {p:?}"
        );
        i.memory = Some(900 << 20);
        let p = plan_of(Some(&run(&s, 1)), &[i], &[], t(10));
        assert_eq!(kinds(&p), ["replace f-0-h1 MaxMemory"]);
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
                reason: ExitReason::OomKilled,
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
            i.labels.carry = history.clone();
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
