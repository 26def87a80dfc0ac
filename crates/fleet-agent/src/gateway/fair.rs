//! A pool's queue when it is full: interactive requests before batch ones, and inside a class
//! the tenants in turn by the instance time each has had, not first come first served.
//!
//! The share is instance time (how long a tenant's requests held slots, those still running
//! counted as far as they are): a slot is what the pool has to give, and time charges a long
//! answer, a long prompt and an uncached one for what they really take, where a count of
//! requests would not and a count of tokens would weigh a cached prompt as a fresh one. The next
//! slot goes to the waiting tenant of the first class that has had the least; a tenant that
//! comes back after a pause starts level with the least of those already there (as Linux's
//! CFS places a task that wakes), so a pause earns no burst; and what was had long ago fades
//! (halved every [`HALF_LIFE`]), so a tenant that used much an hour ago is not last in line
//! for the next hour: turns are fair over the last minute or so. Alone, a tenant gets every slot
//! (work-conserving). A full queue pushes out the newest request of the tenant with the most
//! waiting in the lowest class when the newcomer's class is higher or its tenant waits with
//! fewer: a flood fills the queue with its own requests only.
//!
//! No clock is read here: every call takes `now`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use fleet_api::keys::Priority;
use fleet_runtime::clock::Instant;

/// Instance time had fades by half in this long: fairness looks at about the last minute.
pub const HALF_LIFE: f64 = 30.0;

/// Whose a request is: its tenant and class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Who {
    /// The tenant (from the keys file).
    pub tenant: Arc<str>,
    /// Its class.
    pub priority: Priority,
}

impl Default for Who {
    fn default() -> Self {
        Who {
            tenant: Arc::from(fleet_api::keys::DEFAULT_TENANT),
            priority: Priority::Interactive,
        }
    }
}

/// Something waiting that may have given up.
pub trait Live {
    /// It still waits.
    fn live(&self) -> bool;
}

/// A tenant's instance time in one pool.
#[derive(Clone, Copy, Debug, Default)]
struct Service {
    /// Seconds of finished requests (and the level it was placed at when it came back).
    done: f64,
    /// Requests running now.
    running: u32,
    /// The sum of their start times (seconds since the queue's epoch).
    starts: f64,
}

impl Service {
    /// Its instance time at `now`: finished requests, and those running as far as they are.
    fn used(&self, now: f64) -> f64 {
        self.done + f64::from(self.running) * now - self.starts
    }
}

/// The requests of one class waiting, by tenant, each tenant's in arrival order (with their
/// sequence numbers).
type Class<W> = BTreeMap<Arc<str>, VecDeque<(u64, W)>>;

/// One pool's waiting requests and its tenants' instance time.
#[derive(Debug)]
pub struct FairQueue<W> {
    epoch: Instant,
    /// Waiting requests by class, then tenant, each tenant's in arrival order.
    classes: BTreeMap<Priority, Class<W>>,
    service: HashMap<Arc<str>, Service>,
    seq: u64,
    /// When finished instance time last faded (seconds since the epoch).
    faded_at: f64,
}

impl<W> Default for FairQueue<W> {
    fn default() -> Self {
        FairQueue {
            epoch: Instant::now(),
            classes: BTreeMap::new(),
            service: HashMap::new(),
            seq: 0,
            faded_at: 0.0,
        }
    }
}

impl<W: Live> FairQueue<W> {
    fn secs(&self, now: Instant) -> f64 {
        now.saturating_duration_since(self.epoch).as_secs_f64()
    }

    /// Fades every tenant's finished instance time to `now` (seconds since the epoch): the
    /// gaps between tenants halve every [`HALF_LIFE`], their order stays.
    fn fade(&mut self, now: f64) {
        let dt = now - self.faded_at;
        if dt <= 0.0 {
            return;
        }
        let keep = 0.5f64.powf(dt / HALF_LIFE);
        for s in self.service.values_mut() {
            s.done *= keep;
        }
        self.faded_at = now;
    }

    /// Forgets the requests that gave up.
    pub fn prune(&mut self) {
        for tenants in self.classes.values_mut() {
            for waiting in tenants.values_mut() {
                waiting.retain(|(_, w)| w.live());
            }
            tenants.retain(|_, w| !w.is_empty());
        }
        self.classes.retain(|_, t| !t.is_empty());
    }

    /// Requests waiting (those that gave up included until the next [`FairQueue::prune`]).
    pub fn len(&self) -> usize {
        self.classes
            .values()
            .flat_map(BTreeMap::values)
            .map(VecDeque::len)
            .sum()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    /// Requests waiting, by tenant and class.
    pub fn depths(&self) -> Vec<(Arc<str>, Priority, usize)> {
        let mut out = Vec::new();
        for (class, tenants) in &self.classes {
            for (tenant, waiting) in tenants {
                out.push((tenant.clone(), *class, waiting.len()));
            }
        }
        out
    }

    /// Whether a tenant waits or runs here.
    fn active(&self, tenant: &Arc<str>) -> bool {
        self.service.get(tenant).is_some_and(|s| s.running > 0)
            || self.classes.values().any(|t| t.contains_key(tenant))
    }

    /// Queues `item` of `who`, at most `max` waiting: `Ok(pushed out)` (the newest request of
    /// a tenant with more waiting in a class no higher, which now gets no slot), or `Err(item)`
    /// when the queue is full of requests that go before it.
    pub fn push(&mut self, who: &Who, item: W, max: usize, now: Instant) -> Result<Option<W>, W> {
        self.prune();
        let mut out = None;
        if self.len() >= max {
            match self.victim(who) {
                Some((class, tenant)) => out = self.pop_newest(class, &tenant),
                None => return Err(item),
            }
            if out.is_none() {
                return Err(item);
            }
        }
        if !self.active(&who.tenant) {
            self.place(&who.tenant, now);
        }
        self.seq += 1;
        let seq = self.seq;
        self.classes
            .entry(who.priority)
            .or_default()
            .entry(who.tenant.clone())
            .or_default()
            .push_back((seq, item));
        Ok(out)
    }

    /// A tenant coming back starts level with the least instance time of those already here.
    fn place(&mut self, tenant: &Arc<str>, now: Instant) {
        let now = self.secs(now);
        self.fade(now);
        let mut others: Vec<&Arc<str>> = self.classes.values().flat_map(BTreeMap::keys).collect();
        others.extend(
            self.service
                .iter()
                .filter(|(_, s)| s.running > 0)
                .map(|(t, _)| t),
        );
        let floor = others
            .into_iter()
            .filter(|t| *t != tenant)
            .filter_map(|t| self.service.get(t))
            .map(|s| s.used(now))
            .reduce(f64::min);
        if let Some(floor) = floor {
            let s = self.service.entry(tenant.clone()).or_default();
            s.done = s.done.max(floor);
        }
    }

    /// Whose newest request a full queue pushes out for one of `who`: the tenant with the most
    /// waiting in the lowest class, when that class is lower than `who`'s, or the same with
    /// more waiting than `who`'s tenant would have.
    fn victim(&self, who: &Who) -> Option<(Priority, Arc<str>)> {
        let (class, tenants) = self.classes.iter().next_back()?;
        let (tenant, waiting) = tenants.iter().max_by_key(|(_, w)| w.len())?;
        let mine = self
            .classes
            .get(&who.priority)
            .and_then(|t| t.get(&who.tenant))
            .map_or(0, VecDeque::len);
        let lower = *class > who.priority;
        let same_but_more = *class == who.priority && waiting.len() > mine + 1;
        (lower || same_but_more).then(|| (*class, tenant.clone()))
    }

    fn pop_newest(&mut self, class: Priority, tenant: &Arc<str>) -> Option<W> {
        let tenants = self.classes.get_mut(&class)?;
        let waiting = tenants.get_mut(tenant)?;
        let (_, item) = waiting.pop_back()?;
        if waiting.is_empty() {
            tenants.remove(tenant);
            if tenants.is_empty() {
                self.classes.remove(&class);
            }
        }
        Some(item)
    }

    /// The request that goes next: the first class with one waiting, and in it the tenant
    /// that has had the least instance time (the earlier request on a tie); requests that gave
    /// up are skipped.
    pub fn pop(&mut self, now: Instant) -> Option<(Who, W)> {
        self.prune();
        let now = self.secs(now);
        self.fade(now);
        let (class, tenants) = self.classes.iter_mut().next()?;
        let service = &self.service;
        // Instance time in milliseconds: within one, the earlier request goes first.
        let used = |t: &Arc<str>| {
            service
                .get(t)
                .map_or(0, |s| (s.used(now) * 1e3).round() as i64)
        };
        let tenant = tenants
            .iter()
            .map(|(t, w)| (used(t), w.front().map_or(u64::MAX, |(seq, _)| *seq), t))
            .min_by_key(|(used, seq, _)| (*used, *seq))
            .map(|(_, _, t)| t.clone())?;
        let class = *class;
        let waiting = tenants.get_mut(&tenant)?;
        let (_, item) = waiting.pop_front()?;
        if waiting.is_empty() {
            tenants.remove(&tenant);
            if tenants.is_empty() {
                self.classes.remove(&class);
            }
        }
        let who = Who {
            tenant,
            priority: class,
        };
        Some((who, item))
    }

    /// Puts a request taken by [`FairQueue::pop`] back first in its tenant's line.
    pub fn unpop(&mut self, who: &Who, item: W) {
        self.classes
            .entry(who.priority)
            .or_default()
            .entry(who.tenant.clone())
            .or_default()
            .push_front((0, item));
    }

    /// Whether any request waiting first in its tenant's line satisfies `test`.
    pub fn any_first(&self, test: impl Fn(&W) -> bool) -> bool {
        self.classes
            .values()
            .flat_map(BTreeMap::values)
            .filter_map(|w| w.iter().find(|(_, w)| w.live()))
            .any(|(_, w)| test(w))
    }

    /// A request of `tenant` got a slot at `at`.
    pub fn started(&mut self, tenant: &Arc<str>, at: Instant) {
        let at = self.secs(at);
        let s = self.service.entry(tenant.clone()).or_default();
        s.running += 1;
        s.starts += at;
    }

    /// A request of `tenant` that got its slot at `at` gave it back at `now`.
    pub fn finished(&mut self, tenant: &Arc<str>, at: Instant, now: Instant) {
        let (at, now) = (self.secs(at), self.secs(now));
        self.fade(now);
        if let Some(s) = self.service.get_mut(tenant)
            && s.running > 0
        {
            s.running -= 1;
            s.starts -= at;
            s.done += (now - at).max(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[derive(Debug, PartialEq)]
    struct W(&'static str);

    impl Live for W {
        fn live(&self) -> bool {
            true
        }
    }

    fn who(tenant: &str, priority: Priority) -> Who {
        Who {
            tenant: Arc::from(tenant),
            priority,
        }
    }

    const I: Priority = Priority::Interactive;
    const B: Priority = Priority::Batch;

    /// Interactive before batch; inside a class, the tenant with the least instance time.
    #[test]
    fn classes_first_then_the_least_served_tenant() {
        let t0 = Instant::now();
        let mut q = FairQueue::default();
        // `a` has had 10 s of instance time, `b` 2 s; each has a request running now.
        let now = t0 + Duration::from_secs(10);
        for (tenant, secs) in [("a", 10), ("b", 2)] {
            q.started(&Arc::from(tenant), t0);
            q.finished(&Arc::from(tenant), t0, t0 + Duration::from_secs(secs));
            q.started(&Arc::from(tenant), now);
        }
        for (name, tenant, class) in [
            ("batch-1", "c", B),
            ("a-1", "a", I),
            ("a-2", "a", I),
            ("b-1", "b", I),
        ] {
            assert!(q.push(&who(tenant, class), W(name), 10, now).is_ok());
        }
        let order: Vec<&str> = std::iter::from_fn(|| q.pop(now).map(|(_, w)| w.0)).collect();
        assert_eq!(order, ["b-1", "a-1", "a-2", "batch-1"]);
    }

    /// A full queue pushes out the flood's newest request for a request of a higher class or
    /// of a tenant with fewer waiting; not for one of the flood's own tenant.
    #[test]
    fn a_full_queue_pushes_out_the_flood() {
        let now = Instant::now();
        let mut q = FairQueue::default();
        for name in ["f1", "f2", "f3"] {
            assert!(q.push(&who("flood", B), W(name), 3, now).is_ok());
        }
        assert_eq!(
            q.push(&who("flood", B), W("f4"), 3, now).err(),
            Some(W("f4")),
            "its own tenant's request is refused"
        );
        assert_eq!(q.push(&who("ed", I), W("e1"), 3, now), Ok(Some(W("f3"))));
        assert_eq!(
            q.push(&who("etl", B), W("x1"), 3, now),
            Ok(Some(W("f2"))),
            "a batch tenant with fewer waiting"
        );
        assert_eq!(
            q.push(&who("etl", B), W("x2"), 3, now).err(),
            Some(W("x2")),
            "now even: 1 and 1"
        );
        assert_eq!(q.len(), 3);
    }

    /// What a tenant had long ago fades: after twenty half-lives a 100 s lead is gone, and turns
    /// alternate again.
    #[test]
    fn old_instance_time_fades() {
        let t0 = Instant::now();
        let mut q = FairQueue::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        q.started(&a, t0);
        q.finished(&a, t0, t0 + Duration::from_secs(100));
        let soon = t0 + Duration::from_secs(100);
        let later = soon + Duration::from_secs_f64(20.0 * HALF_LIFE);
        for at in [soon, later] {
            // Both keep a request running, so neither is placed anew.
            q.started(&a, at);
            q.started(&b, at);
            for (name, tenant) in [("a", "a"), ("b", "b")] {
                assert!(q.push(&who(tenant, I), W(name), 10, at).is_ok());
            }
            let first = q.pop(at).map(|(_, w)| w.0);
            let _ = q.pop(at);
            let expect = if at == soon { "b" } else { "a" };
            assert_eq!(first, Some(expect), "at {:?}", at - t0);
            q.finished(&a, at, at);
            q.finished(&b, at, at);
        }
    }

    /// A tenant back after a pause starts level with the least served one there: it does not
    /// get every slot until it has caught up with what the others had meanwhile.
    #[test]
    fn a_tenant_coming_back_earns_no_burst() {
        let t0 = Instant::now();
        let mut q = FairQueue::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        q.started(&a, t0);
        let now = t0 + Duration::from_secs(100);
        q.finished(&a, t0, now);
        q.started(&a, now);
        // a has had 100 s; b comes now with nothing before.
        for (name, tenant) in [("b-1", "b"), ("a-1", "a"), ("b-2", "b"), ("a-2", "a")] {
            assert!(q.push(&who(tenant, I), W(name), 10, now).is_ok());
        }
        let mut order = Vec::new();
        let mut t = now;
        while let Some((w, item)) = q.pop(t) {
            order.push(item.0);
            q.started(&w.tenant, t);
            t += Duration::from_secs(1);
            q.finished(&w.tenant, t - Duration::from_secs(1), t);
        }
        assert_eq!(
            order,
            ["b-1", "a-1", "b-2", "a-2"],
            "in turn, not b twice first"
        );
        let _ = b;
    }
}
