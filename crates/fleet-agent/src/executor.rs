//! Runs the planner's actions against the runtime: at most `concurrency` at once, one at a time
//! per slot. Outcomes only wake the controller, which observes afresh (level-triggered); a
//! failed action is simply planned again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fleet_runtime::clock::Instant;

use fleet_runtime::{ContainerSpec, Runtime, RuntimeError};

use crate::planner::{InFlight, SlotKey};
use tokio::sync::{Notify, Semaphore};

/// A unit of work.
#[derive(Clone, Debug)]
pub enum Op {
    /// Create and start a container.
    Create(Box<ContainerSpec>),
    /// Stop and remove `old` (SIGTERM, SIGKILL after `grace`), then create and start `new`.
    Replace {
        /// The container replaced.
        old: String,
        /// Its grace period.
        grace: Duration,
        /// The new container.
        new: Box<ContainerSpec>,
    },
    /// Stop and remove a container.
    Remove {
        /// The container.
        id: String,
        /// Its grace period.
        grace: Duration,
    },
}

#[derive(Debug, Default)]
struct State {
    busy: HashMap<SlotKey, InFlight>,
    terminating: HashSet<String>,
    /// The error of each slot whose last action failed.
    errors: HashMap<SlotKey, String>,
    completed: u64,
    failed: u64,
}

/// What stops an instance's traffic before it is stopped (the gateway).
#[async_trait::async_trait]
pub trait Drain: Send + Sync + 'static {
    /// Sends no new requests to `id` from now on; returns once it has none in flight, or after
    /// `within`.
    async fn drain(&self, id: &str, within: Duration);
}

/// The executor.
pub struct Executor<R: Runtime> {
    runtime: Arc<R>,
    permits: Arc<Semaphore>,
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
    drain: Option<Arc<dyn Drain>>,
}

impl<R: Runtime> std::fmt::Debug for Executor<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor").finish_non_exhaustive()
    }
}

impl<R: Runtime> Clone for Executor<R> {
    fn clone(&self) -> Self {
        Executor {
            runtime: self.runtime.clone(),
            permits: self.permits.clone(),
            state: self.state.clone(),
            wake: self.wake.clone(),
            drain: self.drain.clone(),
        }
    }
}

impl<R: Runtime> Executor<R> {
    /// An executor running at most `concurrency` actions at once; `wake` is notified after each.
    pub fn new(runtime: Arc<R>, concurrency: usize, wake: Arc<Notify>) -> Executor<R> {
        Executor {
            runtime,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            state: Arc::new(Mutex::new(State::default())),
            wake,
            drain: None,
        }
    }

    /// Drains each instance through `drain` before stopping it: its grace covers both.
    pub fn with_drain(mut self, drain: Arc<dyn Drain>) -> Executor<R> {
        self.drain = Some(drain);
        self
    }

    /// Stops `id` within `grace`: drained first (when there is something to drain through),
    /// then SIGTERM with what is left of the grace, SIGKILL after; then removed.
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let started = Instant::now();
        if let Some(d) = &self.drain {
            d.drain(id, grace).await;
        }
        let left = grace.saturating_sub(started.elapsed());
        self.runtime.stop(id, left).await?;
        self.runtime.remove(id).await.map(drop)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Slot keys with work in flight, and the port each creates an instance on.
    pub fn busy(&self) -> HashMap<SlotKey, InFlight> {
        self.state().busy.clone()
    }

    /// Containers being stopped right now.
    pub fn terminating(&self) -> HashSet<String> {
        self.state().terminating.clone()
    }

    /// The last error of a slot, if its last action failed.
    pub fn last_error(&self, slot_key: &SlotKey) -> Option<String> {
        self.state().errors.get(slot_key).cloned()
    }

    /// (completed, failed) actions so far.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.state();
        (s.completed, s.failed)
    }

    /// Starts `op` for `slot_key` (work that is `flight`, as the planner sees it) unless that
    /// slot is busy; returns whether it started.
    pub fn submit(&self, slot_key: SlotKey, flight: InFlight, op: Op) -> bool {
        {
            let mut s = self.state();
            if s.busy.contains_key(&slot_key) {
                return false;
            }
            s.busy.insert(slot_key.clone(), flight);
            match &op {
                Op::Replace { old, .. } => {
                    s.terminating.insert(old.clone());
                }
                Op::Remove { id, .. } => {
                    s.terminating.insert(id.clone());
                }
                Op::Create(_) => {}
            }
        }
        let this = self.clone();
        tokio::spawn(async move {
            let permit = this.permits.clone().acquire_owned().await;
            let started = Instant::now();
            let result = this.run(&op).await;
            drop(permit);
            let mut s = this.state();
            s.busy.remove(&slot_key);
            match &op {
                Op::Replace { old, .. } => {
                    s.terminating.remove(old);
                }
                Op::Remove { id, .. } => {
                    s.terminating.remove(id);
                }
                Op::Create(_) => {}
            }
            match result {
                Ok(()) => {
                    s.completed += 1;
                    s.errors.remove(&slot_key);
                    tracing::debug!(slot = %slot_key, elapsed_ms = started.elapsed().as_millis() as u64, "action done");
                }
                Err(e) => {
                    s.failed += 1;
                    tracing::warn!(slot = %slot_key, error = %e, "action failed; it will be planned again");
                    s.errors.insert(slot_key, e.to_string());
                }
            }
            drop(s);
            this.wake.notify_one();
        });
        true
    }

    async fn run(&self, op: &Op) -> Result<(), RuntimeError> {
        let rt = &self.runtime;
        match op {
            Op::Create(spec) => {
                rt.create(spec).await?;
                rt.start(&spec.id).await?;
            }
            Op::Replace { old, grace, new } => {
                // Prepare the new container while the old one stops; start it once the old one
                // (and its port) is gone.
                let (stopped, created) = tokio::join!(self.stop(old, *grace), rt.create(new));
                stopped?;
                created?;
                rt.start(&new.id).await?;
            }
            Op::Remove { id, grace } => self.stop(id, *grace).await?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_runtime::fake::FakeRuntime;
    use fleet_runtime::{SIGKILL, SIGTERM};

    const IMAGE: &str = "i";

    fn op_create(id: &str) -> Op {
        Op::Create(Box::new(FakeRuntime::container(id, IMAGE, &[])))
    }

    fn key(slot: u32) -> SlotKey {
        SlotKey::new("f", slot)
    }

    /// Waits (on the paused clock) until `n` actions have ended.
    async fn until_done(exec: &Executor<FakeRuntime>, n: u64) {
        while {
            let (ok, failed) = exec.counts();
            ok + failed < n
        } {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The calls whose text starts with `prefix`, with their time since `t0`.
    fn calls(rt: &FakeRuntime, t0: Instant, prefix: &str) -> Vec<(Duration, String)> {
        rt.timed_calls()
            .into_iter()
            .filter(|(_, c)| c.starts_with(prefix))
            .map(|(at, c)| (at.duration_since(t0), c))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_concurrency_actions_run_at_once() {
        let rt = FakeRuntime::new();
        rt.set_start_delay(Duration::from_secs(1));
        let exec = Executor::new(Arc::new(rt.clone()), 2, Arc::new(Notify::new()));
        let t0 = Instant::now();
        for slot in 0..5 {
            assert!(exec.submit(
                key(slot),
                InFlight::default(),
                op_create(&format!("f-{slot}"))
            ));
        }
        until_done(&exec, 5).await;
        let waves: Vec<u64> = calls(&rt, t0, "start ")
            .iter()
            .map(|(at, _)| at.as_secs())
            .collect();
        assert_eq!(waves, [0, 0, 1, 1, 2], "two at a time, each taking 1 s");
        assert_eq!(exec.counts(), (5, 0));
        assert!(exec.busy().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn one_action_per_slot_at_a_time() {
        let rt = FakeRuntime::new();
        rt.set_start_delay(Duration::from_secs(1));
        let exec = Executor::new(Arc::new(rt.clone()), 4, Arc::new(Notify::new()));
        let flight = InFlight { port: Some(11434) };
        assert!(exec.submit(key(0), flight, op_create("f-0-a")));
        assert!(
            !exec.submit(key(0), InFlight::default(), op_create("f-0-b")),
            "the slot is busy"
        );
        assert!(exec.submit(key(1), InFlight::default(), op_create("f-1-a")));
        assert_eq!(
            exec.busy().get(&key(0)),
            Some(&flight),
            "the planner sees its port"
        );
        until_done(&exec, 2).await;
        assert!(exec.busy().is_empty());
        assert!(exec.submit(key(0), InFlight::default(), op_create("f-0-b")));
        until_done(&exec, 3).await;
        let created: Vec<String> = rt
            .calls()
            .into_iter()
            .filter(|c| c.starts_with("create"))
            .collect();
        assert_eq!(created, ["create f-0-a", "create f-1-a", "create f-0-b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_action_is_kept_as_the_slots_error_until_one_succeeds() {
        let rt = FakeRuntime::new();
        let exec = Executor::new(Arc::new(rt.clone()), 1, Arc::new(Notify::new()));
        assert!(exec.submit(key(0), InFlight::default(), op_create("f-0-a")));
        until_done(&exec, 1).await;
        assert!(exec.submit(key(0), InFlight::default(), op_create("f-0-a")));
        until_done(&exec, 2).await;
        assert_eq!(exec.counts(), (1, 1));
        assert!(
            exec.last_error(&key(0))
                .is_some_and(|e| e.contains("f-0-a"))
        );
        assert!(exec.submit(key(0), InFlight::default(), op_create("f-0-b")));
        until_done(&exec, 3).await;
        assert_eq!(exec.last_error(&key(0)), None);
    }

    /// Records each drain and takes `takes` (at most what it is given) to finish.
    struct SlowDrain {
        rt: FakeRuntime,
        takes: Duration,
        log: Mutex<Vec<(Instant, String, Duration)>>,
    }

    #[async_trait::async_trait]
    impl Drain for SlowDrain {
        async fn drain(&self, id: &str, within: Duration) {
            self.log
                .lock()
                .expect("log")
                .push((Instant::now(), id.to_string(), within));
            assert!(
                !self.rt.calls().iter().any(|c| c.starts_with("kill")),
                "signalled before the drain"
            );
            tokio::time::sleep(self.takes.min(within)).await;
        }
    }

    /// The old instance is drained, then sent SIGTERM with what is left of its grace, then
    /// SIGKILL once the grace (which covers the drain too) is over; the new one is created
    /// meanwhile and started only once the old one is gone.
    #[tokio::test(start_paused = true)]
    async fn a_replacement_drains_then_stops_within_one_grace() {
        let rt = FakeRuntime::new();
        rt.set_ignore_sigterm(true);
        rt.add_running(FakeRuntime::container("f-0-old", IMAGE, &[]));
        let drain = Arc::new(SlowDrain {
            rt: rt.clone(),
            takes: Duration::from_secs(3),
            log: Mutex::new(Vec::new()),
        });
        let exec = Executor::new(Arc::new(rt.clone()), 1, Arc::new(Notify::new()))
            .with_drain(drain.clone());
        let t0 = Instant::now();
        let op = Op::Replace {
            old: "f-0-old".into(),
            grace: Duration::from_secs(5),
            new: Box::new(FakeRuntime::container("f-0-new", IMAGE, &[])),
        };
        assert!(exec.submit(key(0), InFlight { port: Some(1) }, op));
        assert!(exec.terminating().contains("f-0-old"));
        until_done(&exec, 1).await;
        assert_eq!(exec.counts(), (1, 0), "{:?}", exec.last_error(&key(0)));
        assert!(exec.terminating().is_empty());
        let drained = drain.log.lock().expect("log").clone();
        assert_eq!(drained.len(), 1);
        assert_eq!(
            (
                drained[0].0.duration_since(t0),
                drained[0].1.as_str(),
                drained[0].2
            ),
            (Duration::ZERO, "f-0-old", Duration::from_secs(5)),
            "drained first, within the whole grace"
        );
        let secs = |prefix: &str| -> Vec<u64> {
            calls(&rt, t0, prefix)
                .iter()
                .map(|(at, _)| at.as_secs())
                .collect()
        };
        assert_eq!(
            secs(&format!("kill f-0-old {SIGTERM}")),
            [3],
            "SIGTERM after the drain"
        );
        assert_eq!(
            secs(&format!("kill f-0-old {SIGKILL}")),
            [5],
            "SIGKILL when the grace is over"
        );
        assert_eq!(
            secs("create f-0-new"),
            [0],
            "prepared while the old one stops"
        );
        assert_eq!(secs("remove f-0-old"), [5]);
        assert_eq!(
            secs("start f-0-new"),
            [5],
            "started once the old one is gone"
        );
        let order: Vec<String> = rt
            .calls()
            .into_iter()
            .filter(|c| c.starts_with("remove") || c.starts_with("start"))
            .collect();
        assert_eq!(order, ["remove f-0-old", "start f-0-new"]);
    }
}
