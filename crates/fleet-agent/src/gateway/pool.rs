//! Dispatch: which instance takes a request. An instance takes at most its capacity
//! (`OLLAMA_NUM_PARALLEL`) requests at once and only while Ready and not draining; when every
//! instance of a pool is busy, requests wait in a bounded queue per pool ([`super::fair`]:
//! interactive before batch, tenants in turn) and are handed a slot the moment one frees up
//! (no polling).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_runtime::clock::Instant;
use tokio::sync::{Notify, oneshot};

use super::fair::{FairQueue, Live, Who};
use crate::lock;
use fleet_api::keys::Priority;

/// An instance the gateway may send requests to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Container ID.
    pub id: String,
    /// Its fleet.
    pub fleet: String,
    /// The pool it serves (its model's key).
    pub pool: String,
    /// `http://ip:port`.
    pub url: String,
    /// Requests it takes at once.
    pub capacity: u32,
    /// Ready (probed, warm).
    pub ready: bool,
    /// About to be stopped: no new requests.
    pub leaving: bool,
}

#[derive(Debug)]
struct Slot {
    backend: Backend,
    in_flight: u32,
    /// How far each request in flight is.
    progress: Vec<Arc<Progress>>,
    /// Draining: no new requests, whatever the controller says next.
    drained: bool,
    /// Consecutive watchdog failures.
    stalls: u32,
    /// Requests sent so far (metrics).
    served: u64,
}

impl Slot {
    /// Ready, and neither leaving nor drained.
    fn takes_requests(&self) -> bool {
        self.backend.ready && !self.backend.leaving && !self.drained
    }

    /// It takes requests and has a free slot.
    fn open(&self) -> bool {
        self.takes_requests() && self.in_flight < self.backend.capacity
    }
}

#[derive(Debug)]
struct Waiter {
    exclude: Option<String>,
    tx: oneshot::Sender<Result<Lease, Refused>>,
    /// From then on it goes before the requests waiting for one instance in particular.
    first_from: Instant,
}

impl Live for Waiter {
    fn live(&self) -> bool {
        !self.tx.is_closed()
    }
}

/// A request waiting for one instance in particular.
#[derive(Debug)]
struct Affine {
    who: Who,
    tx: oneshot::Sender<Lease>,
}

/// A request in a pool's queue lets requests waiting for one instance in particular (their
/// conversation's, cheap to serve there) go first for at most this share of its queue timeout;
/// then it takes the next slot that frees, so new conversations are never starved by busy ones.
const YIELDS_FOR: u32 = 4;

/// The most requests that may wait for one instance in particular (the cost rule in
/// `affinity` bounds them first; this bounds what a flood of one session can hold).
pub const AFFINE_WAITERS: usize = 8;

/// What a request that would like instance `id` sees of the pool (see [`Pools::busy_on`]).
#[derive(Debug, Default)]
pub struct Busy {
    /// The requests in flight on the instance.
    pub own: Vec<Arc<Progress>>,
    /// Requests waiting for that instance already.
    pub ahead: usize,
    /// Another instance of the pool has a free slot.
    pub idle_elsewhere: bool,
    /// Each other instance of the pool that takes requests.
    pub others: Vec<Other>,
    /// Requests waiting in the pool's queue.
    pub queued: usize,
}

/// Another instance of the pool, as a request that would go there sees it.
#[derive(Clone, Debug, Default)]
pub struct Other {
    /// The requests in flight on it.
    pub own: Vec<Arc<Progress>>,
    /// Requests waiting for it in particular (served before the pool's queue).
    pub ahead: usize,
}

/// How far a request in flight is (the gateway's view of an instance's work, for estimating
/// how long a busy instance stays busy).
#[derive(Debug)]
pub struct Progress {
    /// When it was sent.
    pub started: Instant,
    /// Answer pieces (tokens) relayed so far.
    pub pieces: AtomicU64,
    /// Tokens it asks for at most (`num_predict`, `max_tokens`; 0: not said).
    pub limit: AtomicU64,
    /// How long its prompt is expected to take before the first piece, in microseconds.
    pub prefill_us: AtomicU64,
}

impl Progress {
    pub(crate) fn new() -> Progress {
        Progress {
            started: Instant::now(),
            pieces: AtomicU64::new(0),
            limit: AtomicU64::new(0),
            prefill_us: AtomicU64::new(0),
        }
    }
}

#[derive(Default)]
struct State {
    slots: BTreeMap<String, Slot>,
    /// Each pool's waiting requests, and its tenants' instance time.
    queues: HashMap<String, FairQueue<Waiter>>,
    /// Requests waiting for one instance in particular (their conversation's), first come
    /// first served, at most [`AFFINE_WAITERS`] per instance.
    affine: HashMap<String, VecDeque<Affine>>,
    /// Round-robin position per pool, so that equally idle instances share the load.
    turn: HashMap<String, usize>,
    /// When an interactive request last asked each pool for a slot.
    interactive_at: HashMap<String, Instant>,
    /// Free slots a pool keeps for interactive requests while they come (see
    /// [`Pools::set_batch_headroom`]).
    headroom: u32,
}

/// How long after the last interactive request a pool still keeps its headroom from batch ones.
pub const HEADROOM_WINDOW: Duration = Duration::from_secs(10);

/// Why a request gets no instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The pool has no ready instance.
    NoneReady,
    /// The queue is full (or a request of a higher class, or of a tenant with fewer waiting,
    /// took its place).
    QueueFull,
    /// The wait timed out.
    Timeout,
}

/// An instance's requests: in flight now, and served so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceLoad {
    /// Its fleet.
    pub fleet: String,
    /// The instance.
    pub id: String,
    /// Requests it answers now.
    pub in_flight: u32,
    /// Requests sent to it so far.
    pub served: u64,
}

/// The node's pools.
#[derive(Clone, Default)]
pub struct Pools {
    state: Arc<Mutex<State>>,
    /// Notified when an instance has no request in flight any more (drains wait on it).
    idle: Arc<Notify>,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pools").finish_non_exhaustive()
    }
}

/// A slot on an instance, held while a request runs there; dropping it frees the slot (and
/// hands it to the first request waiting in its pool).
#[derive(Debug)]
pub struct Lease {
    /// The instance.
    pub backend: Backend,
    /// How far the request is (the relay counts its pieces).
    pub progress: Arc<Progress>,
    /// Whose request it is.
    pub who: Who,
    pools: Pools,
    released: bool,
}

impl Lease {
    /// Frees the slot, and counts a watchdog failure of the instance (`stalled`) or a success.
    pub fn finish(mut self, stalled: bool) {
        let pools = self.pools.clone();
        pools.release(&mut self, Some(stalled));
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.released {
            let pools = self.pools.clone();
            pools.release(self, None);
        }
    }
}

impl Pools {
    /// Replaces the instances (keeping the counts of those that stay); hands freed capacity to
    /// waiting requests.
    pub fn update(&self, backends: Vec<Backend>) {
        let mut s = lock(&self.state);
        let mut slots = BTreeMap::new();
        for b in backends {
            let slot = match s.slots.remove(&b.id) {
                Some(mut old) => {
                    old.backend = b;
                    old
                }
                None => Slot {
                    backend: b,
                    in_flight: 0,
                    progress: Vec::new(),
                    drained: false,
                    stalls: 0,
                    served: 0,
                },
            };
            slots.insert(slot.backend.id.clone(), slot);
        }
        // Instances gone with requests in flight keep their slot until those end.
        for (id, old) in std::mem::take(&mut s.slots) {
            if old.in_flight > 0 {
                slots.insert(id, old);
            }
        }
        s.slots = slots;
        Self::forget_affine(&mut s);
        let pools: Vec<String> = s.queues.keys().cloned().collect();
        for pool in pools {
            self.hand_out(&mut s, &pool);
        }
        drop(s);
        self.idle.notify_waiters();
    }

    /// Keeps `slots` free slots in each pool from batch requests while interactive requests
    /// come (one asked within [`HEADROOM_WINDOW`]): a batch request does not take one of a
    /// pool's last `slots` free ones then, so an editor's next request finds a slot at once
    /// instead of waiting for a batch answer to end. Not in a pool of `slots` slots or fewer.
    /// 0: batch requests take any free slot.
    pub fn set_batch_headroom(&self, slots: u32) {
        lock(&self.state).headroom = slots;
    }

    /// Whether the pool has a ready instance that takes requests.
    pub fn has_ready(&self, pool: &str) -> bool {
        lock(&self.state)
            .slots
            .values()
            .any(|s| s.backend.pool == pool && s.takes_requests())
    }

    /// Requests waiting, per pool (not those whose clients left).
    pub fn queue_depths(&self) -> Vec<(String, usize)> {
        let mut s = lock(&self.state);
        s.queues
            .iter_mut()
            .map(|(p, q)| {
                q.prune();
                (p.clone(), q.len())
            })
            .collect()
    }

    /// Requests waiting, per tenant, over every pool.
    pub fn tenant_depths(&self) -> BTreeMap<Arc<str>, usize> {
        let mut s = lock(&self.state);
        let mut out = BTreeMap::new();
        for q in s.queues.values_mut() {
            q.prune();
            for (tenant, _, n) in q.depths() {
                *out.entry(tenant).or_default() += n;
            }
        }
        out
    }

    /// Requests in flight and served so far, per instance.
    pub fn counts(&self) -> Vec<InstanceLoad> {
        lock(&self.state)
            .slots
            .values()
            .map(|s| InstanceLoad {
                fleet: s.backend.fleet.clone(),
                id: s.backend.id.clone(),
                in_flight: s.in_flight,
                served: s.served,
            })
            .collect()
    }

    /// The URL of a ready instance of `pool` (for questions that need no slot).
    pub fn any_ready(&self, pool: &str) -> Option<String> {
        lock(&self.state)
            .slots
            .values()
            .filter(|s| s.backend.pool == pool && s.takes_requests())
            .min_by_key(|s| s.in_flight)
            .map(|s| s.backend.url.clone())
    }

    /// URLs of ready instances that take requests.
    pub fn ready_urls(&self) -> Vec<String> {
        lock(&self.state)
            .slots
            .values()
            .filter(|s| s.takes_requests())
            .map(|s| s.backend.url.clone())
            .collect()
    }

    /// Consecutive watchdog failures of an instance.
    pub fn stalls(&self, id: &str) -> u32 {
        lock(&self.state).slots.get(id).map_or(0, |s| s.stalls)
    }

    /// A slot in `pool` (not on `exclude`): at once when an instance has room, else after
    /// waiting in the pool's queue (at most `max_queue` waiting, at most `timeout`).
    pub async fn acquire(
        &self,
        pool: &str,
        who: &Who,
        exclude: Option<&str>,
        max_queue: usize,
        timeout: Duration,
    ) -> Result<Lease, Refused> {
        let rx = {
            let mut s = lock(&self.state);
            if who.priority == Priority::Interactive {
                s.interactive_at.insert(pool.to_string(), Instant::now());
            }
            if let Some(lease) = self.pick(&mut s, pool, who, exclude) {
                return Ok(lease);
            }
            let ready = s.slots.values().any(|x| {
                x.backend.pool == pool
                    && x.takes_requests()
                    && Some(x.backend.id.as_str()) != exclude
            });
            if !ready {
                return Err(Refused::NoneReady);
            }
            let queue = s.queues.entry(pool.to_string()).or_default();
            let (tx, rx) = oneshot::channel();
            let now = Instant::now();
            let waiter = Waiter {
                exclude: exclude.map(str::to_string),
                tx,
                first_from: now + timeout / YIELDS_FOR,
            };
            match queue.push(who, waiter, max_queue, now) {
                Err(_) => return Err(Refused::QueueFull),
                Ok(Some(out)) => {
                    let _ = out.tx.send(Err(Refused::QueueFull));
                }
                Ok(None) => {}
            }
            rx
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            // (The sender is only dropped with the pools.)
            Ok(Err(_)) => Err(Refused::NoneReady),
            Err(_) => Err(Refused::Timeout),
        }
    }

    /// Takes no new requests to `id` from now on, and returns once it has none in flight, or
    /// after `within`; returns how long it waited.
    pub async fn drain(&self, id: &str, within: Duration) -> Duration {
        let started = Instant::now();
        {
            let mut s = lock(&self.state);
            if let Some(slot) = s.slots.get_mut(id) {
                slot.drained = true;
            }
            Self::forget_affine(&mut s);
        }
        let deadline = started + within;
        loop {
            let notified = self.idle.notified();
            let busy = lock(&self.state)
                .slots
                .get(id)
                .is_some_and(|s| s.in_flight > 0);
            if !busy || Instant::now() >= deadline {
                break;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
        started.elapsed()
    }

    /// The least busy open instance of `pool` (round robin among equals), counted as in use.
    fn pick(&self, s: &mut State, pool: &str, who: &Who, exclude: Option<&str>) -> Option<Lease> {
        if who.priority == Priority::Batch && Self::kept_for_interactive(s, pool) {
            return None;
        }
        let open: Vec<(&String, u32)> = s
            .slots
            .iter()
            .filter(|(id, x)| x.backend.pool == pool && x.open() && Some(id.as_str()) != exclude)
            .map(|(id, x)| (id, x.in_flight))
            .collect();
        let least = open.iter().map(|(_, n)| *n).min()?;
        let idle: Vec<&String> = open
            .iter()
            .filter(|(_, n)| *n == least)
            .map(|(id, _)| *id)
            .collect();
        let turn = s.turn.entry(pool.to_string()).or_default();
        *turn = turn.wrapping_add(1);
        let id = idle[*turn % idle.len()].clone();
        self.take(s, &id, who)
    }

    /// Whether the pool's free slots are its headroom, kept from batch requests while
    /// interactive ones come.
    fn kept_for_interactive(s: &State, pool: &str) -> bool {
        let recent = s
            .interactive_at
            .get(pool)
            .is_some_and(|at| at.elapsed() < HEADROOM_WINDOW);
        if s.headroom == 0 || !recent {
            return false;
        }
        let (mut capacity, mut free) = (0u32, 0u32);
        for slot in s.slots.values() {
            if slot.backend.pool == pool && slot.takes_requests() {
                capacity += slot.backend.capacity;
                free += slot.backend.capacity.saturating_sub(slot.in_flight);
            }
        }
        capacity > s.headroom && free <= s.headroom
    }

    /// A slot on instance `id` (it must be open) for `who`, counted as in use.
    fn take(&self, s: &mut State, id: &str, who: &Who) -> Option<Lease> {
        let slot = s.slots.get_mut(id)?;
        slot.in_flight += 1;
        slot.served += 1;
        let progress = Arc::new(Progress::new());
        slot.progress.push(progress.clone());
        let backend = slot.backend.clone();
        s.queues
            .entry(backend.pool.clone())
            .or_default()
            .started(&who.tenant, progress.started);
        Some(Lease {
            backend,
            progress,
            who: who.clone(),
            pools: self.clone(),
            released: false,
        })
    }

    /// A slot on instance `id` of `pool`, at once, if it has room.
    pub fn try_on(&self, pool: &str, id: &str, who: &Who) -> Option<Lease> {
        let mut s = lock(&self.state);
        let open = s
            .slots
            .get(id)
            .is_some_and(|x| x.backend.pool == pool && x.open());
        let kept = who.priority == Priority::Batch && Self::kept_for_interactive(&s, pool);
        if open && !kept {
            self.take(&mut s, id, who)
        } else {
            None
        }
    }

    /// What a request that would like instance `id` of `pool` sees: the instance's requests
    /// in flight and those waiting for it, and the rest of the pool. `None` when the instance
    /// takes no requests, or [`AFFINE_WAITERS`] wait for it already.
    pub fn busy_on(&self, pool: &str, id: &str) -> Option<Busy> {
        let mut s = lock(&self.state);
        let State {
            slots,
            queues,
            affine,
            ..
        } = &mut *s;
        let slot = slots
            .get(id)
            .filter(|x| x.backend.pool == pool && x.takes_requests())?;
        let mut ahead = |id: &str| {
            affine.get_mut(id).map_or(0, |w| {
                w.retain(|a| !a.tx.is_closed());
                w.len()
            })
        };
        let mut busy = Busy {
            own: slot.progress.clone(),
            ahead: ahead(id),
            ..Busy::default()
        };
        if busy.ahead >= AFFINE_WAITERS {
            return None;
        }
        for (other, x) in slots.iter() {
            if other != id && x.backend.pool == pool && x.takes_requests() {
                busy.idle_elsewhere |= x.open();
                busy.others.push(Other {
                    own: x.progress.clone(),
                    ahead: ahead(other),
                });
            }
        }
        busy.queued = queues.get_mut(pool).map_or(0, |q| {
            q.prune();
            q.len()
        });
        Some(busy)
    }

    /// Waits (until `until` at most) for a slot on instance `id`: the slots it frees go to the
    /// requests waiting for it, in order, before the pool's queue (unless a request there has
    /// waited [`YIELDS_FOR`]th of its timeout). `None` when the time
    /// passed, the instance stopped taking requests, or [`AFFINE_WAITERS`] wait for it already.
    pub async fn wait_on(&self, id: &str, who: &Who, until: Instant) -> Option<Lease> {
        let rx = {
            let mut s = lock(&self.state);
            let waiting = s.affine.entry(id.to_string()).or_default();
            waiting.retain(|a| !a.tx.is_closed());
            if waiting.len() >= AFFINE_WAITERS {
                return None;
            }
            let (tx, rx) = oneshot::channel();
            waiting.push_back(Affine {
                who: who.clone(),
                tx,
            });
            rx
        };
        let got = tokio::time::timeout_at(until, rx).await;
        let mut s = lock(&self.state);
        if let Some(waiting) = s.affine.get_mut(id) {
            waiting.retain(|a| !a.tx.is_closed());
            if waiting.is_empty() {
                s.affine.remove(id);
            }
        }
        got.ok()?.ok()
    }

    /// Gives the slots freed on `id` to the requests waiting for that instance, if any do.
    fn hand_to_affine(&self, s: &mut State, id: &str) {
        while s.slots.get(id).is_some_and(Slot::open) {
            let Some(waiter) = s.affine.get_mut(id).and_then(VecDeque::pop_front) else {
                s.affine.remove(id);
                return;
            };
            let Some(lease) = self.take(s, id, &waiter.who) else {
                return;
            };
            if let Err(lease) = waiter.tx.send(lease) {
                // It gave up meanwhile: the slot goes back.
                Self::give_back(s, lease, None);
            }
        }
    }

    /// Lets go of the requests waiting for instances that no longer take requests (they go to
    /// the pool instead).
    fn forget_affine(s: &mut State) {
        let slots = &s.slots;
        s.affine
            .retain(|id, _| slots.get(id).is_some_and(Slot::takes_requests));
    }

    /// Gives freed capacity in `pool` to its waiting requests, in the queue's order.
    fn hand_out(&self, s: &mut State, pool: &str) {
        loop {
            let Some(queue) = s.queues.get_mut(pool) else {
                return;
            };
            let Some((who, waiter)) = queue.pop(Instant::now()) else {
                return;
            };
            let Some(lease) = self.pick(s, pool, &who, waiter.exclude.as_deref()) else {
                // Nothing free: it stays first in line.
                if let Some(q) = s.queues.get_mut(pool) {
                    q.unpop(&who, waiter);
                }
                return;
            };
            if let Err(Ok(lease)) = waiter.tx.send(Ok(lease)) {
                // It gave up meanwhile: the slot goes back.
                Self::give_back(s, lease, None);
            }
        }
    }

    /// Frees `lease`'s slot (counting a watchdog failure or a success of the instance when
    /// `stalled` says), and its tenant's instance time; returns the pool.
    fn give_back(s: &mut State, mut lease: Lease, stalled: Option<bool>) -> Option<String> {
        Self::free(s, &mut lease, stalled)
    }

    fn free(s: &mut State, lease: &mut Lease, stalled: Option<bool>) -> Option<String> {
        lease.released = true;
        let pool = lease.backend.pool.clone();
        if let Some(q) = s.queues.get_mut(&pool) {
            q.finished(&lease.who.tenant, lease.progress.started, Instant::now());
        }
        let slot = s.slots.get_mut(&lease.backend.id)?;
        slot.in_flight = slot.in_flight.saturating_sub(1);
        slot.progress.retain(|p| !Arc::ptr_eq(p, &lease.progress));
        match stalled {
            Some(true) => slot.stalls += 1,
            Some(false) => slot.stalls = 0,
            None => {}
        }
        Some(pool)
    }

    fn release(&self, lease: &mut Lease, stalled: Option<bool>) {
        let mut s = lock(&self.state);
        let id = lease.backend.id.clone();
        if let Some(pool) = Self::free(&mut s, lease, stalled) {
            let now = Instant::now();
            let overdue = s
                .queues
                .get(&pool)
                .is_some_and(|q| q.any_first(|w| w.first_from <= now));
            if overdue {
                self.hand_out(&mut s, &pool);
            }
            self.hand_to_affine(&mut s, &id);
            self.hand_out(&mut s, &pool);
        }
        drop(s);
        self.idle.notify_waiters();
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
