//! Runs the planner's actions against the runtime: at most `concurrency` at once, one at a time
//! per slot. Outcomes only wake the controller, which observes afresh (level-triggered); a
//! failed action is simply planned again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fleet_runtime::clock::Instant;

use fleet_runtime::{ContainerSpec, Runtime};

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
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), fleet_runtime::RuntimeError> {
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
                    s.errors.insert(slot_key, e);
                }
            }
            drop(s);
            this.wake.notify_one();
        });
        true
    }

    async fn run(&self, op: &Op) -> Result<(), String> {
        let rt = &self.runtime;
        match op {
            Op::Create(spec) => {
                rt.create(spec).await.map_err(|e| e.to_string())?;
                rt.start(&spec.id).await.map_err(|e| e.to_string())?;
            }
            Op::Replace { old, grace, new } => {
                // Prepare the new container while the old one stops; start it once the old one
                // (and its port) is gone.
                let (stopped, created) = tokio::join!(self.stop(old, *grace), rt.create(new));
                stopped.map_err(|e| e.to_string())?;
                created.map_err(|e| e.to_string())?;
                rt.start(&new.id).await.map_err(|e| e.to_string())?;
            }
            Op::Remove { id, grace } => {
                self.stop(id, *grace).await.map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
}
