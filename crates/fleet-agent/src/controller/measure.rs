//! What the controller measures of its instances beyond containerd's listing: the memory of
//! those whose fleet rotates by memory, and OOM kills whose event was lost (read from the exited
//! instance's cgroup).

use std::collections::HashSet;

use fleet_runtime::Runtime;
use fleet_runtime::clock::Instant;
use fleet_store::Store;

use super::{Agent, Labelled, MEMORY_PERIOD};
use crate::lock;

impl<R: Runtime, S: Store> Agent<R, S> {
    /// Adds to `ooms` the instances that exited by SIGKILL while the OOM killer ran in their
    /// cgroup: an OOM kill whose event was lost (the agent or containerd away). Each exit is
    /// read once.
    pub(super) async fn find_unseen_ooms(&mut self, labelled: &Labelled<'_>) {
        let ids: HashSet<&str> = labelled.iter().map(|(o, _)| o.id.as_str()).collect();
        self.oom_checked.retain(|id| ids.contains(id.as_str()));
        for (o, _) in labelled {
            if o.state != fleet_runtime::TaskState::Stopped
                || o.exit_code != Some(137)
                || lock(&self.ooms).contains(&o.id)
                || !self.oom_checked.insert(o.id.clone())
            {
                continue;
            }
            match self
                .runtime
                .oom_killed(&o.id, &self.cfg.cgroup_parent)
                .await
            {
                Ok(true) => {
                    tracing::info!(id = %o.id, "the instance was OOM-killed (counted in its cgroup; the event was missed)");
                    lock(&self.ooms).insert(o.id.clone());
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(id = %o.id, error = %e, "cannot read the instance's OOM count")
                }
            }
        }
    }

    /// Measures the memory of running instances of fleets with `rotation.maxMemory`, each at
    /// most every [`MEMORY_PERIOD`].
    pub(super) async fn sample_memory(&mut self, labelled: &Labelled<'_>) {
        let ids: HashSet<&str> = labelled.iter().map(|(o, _)| o.id.as_str()).collect();
        self.memory.retain(|id, _| ids.contains(id.as_str()));
        for (o, l) in labelled {
            let watched = self
                .fleets
                .last_valid
                .get(&l.fleet)
                .is_some_and(|f| f.spec.rotation.max_memory.is_some());
            if !watched || o.state != fleet_runtime::TaskState::Running || o.pid == 0 {
                continue;
            }
            if self
                .memory
                .get(&o.id)
                .is_some_and(|(at, _)| at.elapsed() < MEMORY_PERIOD)
            {
                continue;
            }
            match self.runtime.memory(&o.id, o.pid).await {
                Ok(bytes) => {
                    self.memory.insert(o.id.clone(), (Instant::now(), bytes));
                }
                Err(e) => {
                    tracing::debug!(id = %o.id, error = %e, "cannot read the instance's memory")
                }
            }
        }
    }
}
