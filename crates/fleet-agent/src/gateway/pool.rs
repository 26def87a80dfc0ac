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
mod tests {
    use super::*;

    fn backend(id: &str, capacity: u32) -> Backend {
        Backend {
            id: id.into(),
            fleet: "f".into(),
            pool: "f".into(),
            url: format!("http://{id}"),
            capacity,
            ready: true,
            leaving: false,
        }
    }

    const WAIT: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn idle_instances_first_then_a_fifo_queue() {
        let pools = Pools::default();
        pools.update(vec![backend("a", 1), backend("b", 1)]);
        let first = pools
            .acquire("f", &Who::default(), None, 10, WAIT)
            .await
            .expect("a slot");
        let second = pools
            .acquire("f", &Who::default(), None, 10, WAIT)
            .await
            .expect("a slot");
        assert_ne!(
            first.backend.id, second.backend.id,
            "both idle instances are used"
        );
        // Both busy: three requests queue, and get slots in arrival order.
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiting = Vec::new();
        for n in 0..3 {
            let (p, order) = (pools.clone(), order.clone());
            waiting.push(tokio::spawn(async move {
                let lease = p
                    .acquire("f", &Who::default(), None, 10, WAIT)
                    .await
                    .expect("queued slot");
                lock(&order).push(n);
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(lease);
            }));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(pools.queue_depths(), [("f".to_string(), 3)]);
        drop(first);
        drop(second);
        for w in waiting {
            w.await.expect("waiter");
        }
        assert_eq!(*lock(&order), [0, 1, 2]);
    }

    /// Who waits for a full pool gets it in this order: interactive before batch, and inside a
    /// class the tenants in turn by instance time (a long answer counts for its length), not
    /// first come first served. Each row: the requests queued, in arrival order (name, tenant,
    /// class, seconds its answer takes), while one single-slot instance is busy; then the
    /// order they got the instance.
    #[tokio::test(start_paused = true)]
    async fn a_full_pool_serves_classes_first_then_tenants_in_turn() {
        use fleet_api::keys::Priority::{Batch, Interactive};
        type Row = (&'static str, &'static str, fleet_api::keys::Priority, u64);
        let table: [(&str, Vec<Row>, &[&str]); 4] = [
            (
                "a flood of one tenant does not go before another's request",
                vec![
                    ("a1", "a", Interactive, 1),
                    ("a2", "a", Interactive, 1),
                    ("a3", "a", Interactive, 1),
                    ("a4", "a", Interactive, 1),
                    ("b1", "b", Interactive, 1),
                    ("b2", "b", Interactive, 1),
                ],
                &["a1", "b1", "a2", "b2", "a3", "a4"],
            ),
            (
                "turns weigh instance time: a's answers take 3 s, b's 1 s",
                vec![
                    ("a1", "a", Interactive, 3),
                    ("a2", "a", Interactive, 3),
                    ("b1", "b", Interactive, 1),
                    ("b2", "b", Interactive, 1),
                    ("b3", "b", Interactive, 1),
                    ("b4", "b", Interactive, 1),
                ],
                &["a1", "b1", "b2", "b3", "a2", "b4"],
            ),
            (
                "batch only when no interactive request waits",
                vec![
                    ("c1", "c", Batch, 1),
                    ("c2", "c", Batch, 1),
                    ("a1", "a", Interactive, 1),
                    ("d1", "d", Batch, 1),
                    ("b1", "b", Interactive, 1),
                ],
                &["a1", "b1", "c1", "d1", "c2"],
            ),
            (
                "a tenant alone gets every slot",
                vec![
                    ("c1", "c", Batch, 1),
                    ("c2", "c", Batch, 1),
                    ("c3", "c", Batch, 1),
                ],
                &["c1", "c2", "c3"],
            ),
        ];
        for (case, rows, expect) in table {
            let pools = Pools::default();
            pools.update(vec![backend("a", 1)]);
            let busy = pools.try_on("f", "a", &Who::default()).expect("free");
            let order = Arc::new(Mutex::new(Vec::new()));
            let mut tasks = Vec::new();
            for (name, tenant, priority, secs) in rows {
                let who = Who {
                    tenant: Arc::from(tenant),
                    priority,
                };
                let (p, order) = (pools.clone(), order.clone());
                tasks.push(tokio::spawn(async move {
                    let lease = p.acquire("f", &who, None, 16, WAIT).await.expect("a slot");
                    lock(&order).push(name);
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                    drop(lease);
                }));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            drop(busy);
            for t in tasks {
                t.await.expect("join");
            }
            assert_eq!(*lock(&order), expect, "{case}");
        }
    }

    /// While interactive requests come, a batch flood leaves a pool's last free slot to them:
    /// the next editor is served at once. Once none has come for [`HEADROOM_WINDOW`], batch
    /// requests take every slot again (at the next slot freed).
    #[tokio::test(start_paused = true)]
    async fn a_batch_flood_leaves_the_headroom_to_interactive_requests() {
        use fleet_api::keys::Priority::{Batch, Interactive};
        let pools = Pools::default();
        pools.set_batch_headroom(1);
        pools.update(vec![backend("a", 1), backend("b", 1), backend("c", 1)]);
        let batch = Who {
            tenant: Arc::from("etl"),
            priority: Batch,
        };
        let editor = Who {
            tenant: Arc::from("ed"),
            priority: Interactive,
        };
        let first = pools
            .acquire("f", &editor, None, 8, WAIT)
            .await
            .expect("editor");
        drop(first);
        let one = pools
            .acquire("f", &batch, None, 8, WAIT)
            .await
            .expect("batch 1");
        let _two = pools
            .acquire("f", &batch, None, 8, WAIT)
            .await
            .expect("batch 2");
        let third = {
            let (p, w) = (pools.clone(), batch.clone());
            tokio::spawn(async move { p.acquire("f", &w, None, 8, WAIT).await })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!third.is_finished(), "the last free slot is kept");
        assert_eq!(pools.queue_depths(), [("f".to_string(), 1)]);
        let next = pools.acquire("f", &editor, None, 8, Duration::ZERO).await;
        assert!(next.is_ok(), "the editor is served at once");
        drop(next);
        // No editor for the window: the batch request takes the slot freed next.
        tokio::time::sleep(HEADROOM_WINDOW).await;
        drop(one);
        let got = third.await.expect("join").expect("a slot at last");
        assert_eq!(got.who.priority, Batch);
        let all = pools.acquire("f", &batch, None, 8, Duration::ZERO).await;
        assert!(all.is_ok(), "every slot goes to batch without editors");
    }

    /// A full queue takes a request of a higher class, or of a tenant with fewer waiting, in
    /// place of the flood's newest, which is refused as if the queue had been full for it.
    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_the_flood_not_the_others() {
        use fleet_api::keys::Priority::{Batch, Interactive};
        let pools = Pools::default();
        pools.update(vec![backend("a", 1)]);
        let _busy = pools.try_on("f", "a", &Who::default()).expect("free");
        let who = |tenant: &str, priority| Who {
            tenant: Arc::from(tenant),
            priority,
        };
        let queue = |w: Who| {
            let p = pools.clone();
            tokio::spawn(async move { p.acquire("f", &w, None, 2, WAIT).await.err() })
        };
        let flood: Vec<_> = (0..2).map(|_| queue(who("etl", Batch))).collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            pools
                .acquire("f", &who("etl", Batch), None, 2, WAIT)
                .await
                .err(),
            Some(Refused::QueueFull),
            "its own tenant's next request finds the queue full"
        );
        let editor = queue(who("ed", Interactive));
        tokio::time::sleep(Duration::from_millis(1)).await;
        let [first, second] = <[_; 2]>::try_from(flood).expect("two");
        assert_eq!(
            second.await.expect("join"),
            Some(Refused::QueueFull),
            "the flood's newest gave its place"
        );
        assert!(
            !first.is_finished() && !editor.is_finished(),
            "both wait on"
        );
        first.abort();
        editor.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_is_num_parallel() {
        let pools = Pools::default();
        pools.update(vec![backend("a", 2)]);
        let _one = pools
            .acquire("f", &Who::default(), None, 0, WAIT)
            .await
            .expect("1st");
        let _two = pools
            .acquire("f", &Who::default(), None, 0, WAIT)
            .await
            .expect("2nd");
        assert_eq!(
            pools
                .acquire("f", &Who::default(), None, 0, WAIT)
                .await
                .err(),
            Some(Refused::QueueFull),
            "a third waits, and the queue holds none"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_queue_and_wait() {
        let pools = Pools::default();
        pools.update(vec![backend("a", 1)]);
        let _busy = pools
            .acquire("f", &Who::default(), None, 1, WAIT)
            .await
            .expect("slot");
        let p = pools.clone();
        let queued =
            tokio::spawn(async move { p.acquire("f", &Who::default(), None, 1, WAIT).await.err() });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            pools
                .acquire("f", &Who::default(), None, 1, WAIT)
                .await
                .err(),
            Some(Refused::QueueFull)
        );
        assert_eq!(
            queued.await.expect("join"),
            Some(Refused::Timeout),
            "after the timeout"
        );
        assert_eq!(
            pools
                .acquire("other", &Who::default(), None, 1, WAIT)
                .await
                .err(),
            Some(Refused::NoneReady)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unready_leaving_and_excluded_instances_take_nothing() {
        let pools = Pools::default();
        let mut unready = backend("u", 1);
        unready.ready = false;
        let mut leaving = backend("l", 1);
        leaving.leaving = true;
        pools.update(vec![unready, leaving, backend("a", 1)]);
        for _ in 0..3 {
            let lease = pools
                .acquire("f", &Who::default(), None, 0, WAIT)
                .await
                .expect("a");
            assert_eq!(lease.backend.id, "a");
        }
        assert_eq!(
            pools
                .acquire("f", &Who::default(), Some("a"), 5, WAIT)
                .await
                .err(),
            Some(Refused::NoneReady),
            "a retry never goes back to the instance that failed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_waits_for_requests_in_flight_within_the_grace() {
        let pools = Pools::default();
        pools.update(vec![backend("a", 2), backend("b", 1)]);
        let on_a = pools
            .acquire("f", &Who::default(), Some("b"), 0, WAIT)
            .await
            .expect("a");
        let p = pools.clone();
        let drain = tokio::spawn(async move { p.drain("a", Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_millis(1)).await;
        // Draining: new requests go elsewhere although a has room.
        let other = pools
            .acquire("f", &Who::default(), None, 0, WAIT)
            .await
            .expect("b");
        assert_eq!(other.backend.id, "b");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!drain.is_finished(), "a request is still in flight on a");
        on_a.finish(false);
        let waited = drain.await.expect("drain");
        assert!(
            waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
            "{waited:?}"
        );
        // Within the grace: a stuck request does not hold the stop forever.
        drop(other);
        let stuck = pools
            .acquire("f", &Who::default(), None, 0, WAIT)
            .await
            .expect("b");
        let waited = pools.drain(&stuck.backend.id, Duration::from_secs(3)).await;
        assert_eq!(waited, Duration::from_secs(3));
    }

    /// Requests waiting for one instance (their conversation's) get that instance's free slots
    /// before the pool's queue, in order; at most [`AFFINE_WAITERS`] wait for one instance; a
    /// wait ends in time, and when the instance is drained.
    #[tokio::test(start_paused = true)]
    async fn requests_waiting_for_their_instance_get_it_first() {
        let pools = Pools::default();
        pools.update(vec![backend("a", 1), backend("b", 1)]);
        let on_a = pools.try_on("f", "a", &Who::default()).expect("a is free");
        assert!(
            pools.try_on("f", "a", &Who::default()).is_none(),
            "a is busy now"
        );
        let busy = pools.busy_on("f", "a").expect("a takes requests");
        assert_eq!(
            (busy.own.len(), busy.ahead, busy.idle_elsewhere),
            (1, 0, true)
        );
        let on_b = pools
            .acquire("f", &Who::default(), None, 8, WAIT)
            .await
            .expect("b");
        let fifo = {
            let p = pools.clone();
            tokio::spawn(async move { p.acquire("f", &Who::default(), None, 8, WAIT).await })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        let wait_for_a = |secs| {
            let p = pools.clone();
            tokio::spawn(async move {
                p.wait_on(
                    "a",
                    &Who::default(),
                    Instant::now() + Duration::from_secs(secs),
                )
                .await
            })
        };
        let first = wait_for_a(5);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let second = wait_for_a(5);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let busy = pools.busy_on("f", "a").expect("a takes requests");
        assert_eq!(
            (busy.ahead, busy.idle_elsewhere, busy.queued),
            (2, false, 1)
        );
        assert_eq!(busy.others.len(), 1);
        drop(on_a);
        let got = first.await.expect("join").expect("a slot");
        assert_eq!(got.backend.id, "a", "before the queue");
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(
            !fifo.is_finished() && !second.is_finished(),
            "the others wait on"
        );
        drop(got);
        let got = second.await.expect("join").expect("a slot");
        assert_eq!(got.backend.id, "a", "the second in order");
        drop(on_b);
        let queued = fifo.await.expect("fifo").expect("a slot");
        assert_eq!(queued.backend.id, "b");
        // A wait that runs out says so.
        let until = Instant::now() + Duration::from_millis(100);
        assert!(pools.wait_on("a", &Who::default(), until).await.is_none());
        // At most AFFINE_WAITERS wait for one instance.
        let waiting: Vec<_> = (0..AFFINE_WAITERS).map(|_| wait_for_a(60)).collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(
            pools.busy_on("f", "a").is_none(),
            "a is at its waiters' bound"
        );
        let until = Instant::now() + Duration::from_secs(60);
        assert!(
            pools.wait_on("a", &Who::default(), until).await.is_none(),
            "no wait past the bound"
        );
        // Draining the instance lets them go (to the pool) at once.
        drop(queued);
        pools.drain("a", Duration::from_secs(1)).await;
        for w in waiting {
            assert!(w.await.expect("join").is_none());
        }
        drop(got);
    }

    /// A request in the pool's queue lets conversations waiting for their instance go first
    /// for a quarter of its queue timeout, then takes the next slot that frees: a stream of
    /// busy conversations cannot starve a new one.
    #[tokio::test(start_paused = true)]
    async fn the_queue_yields_to_conversations_for_a_while_only() {
        let pools = Pools::default();
        pools.update(vec![backend("a", 1)]);
        let mut on_a = pools.try_on("f", "a", &Who::default()).expect("a is free");
        let fifo = {
            let p = pools.clone();
            tokio::spawn(async move { p.acquire("f", &Who::default(), None, 8, WAIT).await })
        };
        let wait_for_a = || {
            let p = pools.clone();
            tokio::spawn(
                async move { p.wait_on("a", &Who::default(), Instant::now() + WAIT).await },
            )
        };
        // Within 15 s (60 s / 4), every slot that frees goes to a conversation.
        for _ in 0..3 {
            let conversation = wait_for_a();
            tokio::time::sleep(Duration::from_secs(4)).await;
            drop(on_a);
            on_a = conversation.await.expect("join").expect("a slot");
            assert!(!fifo.is_finished(), "the queue yields");
        }
        // At 16 s the queue goes first; the conversation waits for the next slot.
        let conversation = wait_for_a();
        tokio::time::sleep(Duration::from_secs(4)).await;
        drop(on_a);
        let queued = fifo.await.expect("join").expect("a slot");
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!conversation.is_finished(), "after the queue's request");
        drop(queued);
        assert!(conversation.await.expect("join").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_whose_clients_left_are_not_counted() {
        let pools = Pools::default();
        pools.update(vec![backend("a", 1)]);
        let _busy = pools
            .acquire("f", &Who::default(), None, 8, WAIT)
            .await
            .expect("a slot");
        let gone = {
            let pools = pools.clone();
            tokio::spawn(async move { pools.acquire("f", &Who::default(), None, 8, WAIT).await })
        };
        let stays = {
            let pools = pools.clone();
            tokio::spawn(async move { pools.acquire("f", &Who::default(), None, 8, WAIT).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(pools.queue_depths(), [("f".to_string(), 2)]);
        gone.abort();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            pools.queue_depths(),
            [("f".to_string(), 1)],
            "the client left"
        );
        stays.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn stalls_count_in_a_row() {
        let pools = Pools::default();
        pools.update(vec![backend("a", 1)]);
        for n in 1..=2 {
            pools
                .acquire("f", &Who::default(), None, 0, WAIT)
                .await
                .expect("a")
                .finish(true);
            assert_eq!(pools.stalls("a"), n);
        }
        pools
            .acquire("f", &Who::default(), None, 0, WAIT)
            .await
            .expect("a")
            .finish(false);
        assert_eq!(pools.stalls("a"), 0, "a success starts the count again");
    }
}
