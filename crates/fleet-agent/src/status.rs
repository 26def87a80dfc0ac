//! Status: per-instance phases and per-fleet status (pure), and the writer that writes a
//! fleet's status key only when it changed (plus a slow heartbeat), so an idle fleet costs etcd
//! almost nothing.

use std::collections::HashMap;
use std::time::Duration;

use fleet_runtime::clock::{self, Instant};

use fleet_api::{Condition, FleetStatus, InstanceStatus, Phase};
use fleet_store::Store;

use crate::planner::Instance;

pub mod report;

/// The phase of an instance.
pub fn phase(i: &Instance, terminating: bool, backing_off: bool) -> Phase {
    if terminating {
        Phase::Terminating
    } else if i.is_dead() || backing_off {
        Phase::BackOff
    } else if !i.is_running() || (i.model_pending && !i.ready) {
        Phase::Pending
    } else if i.ready {
        Phase::Ready
    } else if i.was_ready {
        Phase::Unready
    } else {
        Phase::Starting
    }
}

/// The longest message kept per instance (errors from containerd or a registry; a node's
/// status holds hundreds of instances).
pub const MAX_INSTANCE_MESSAGE_BYTES: usize = 512;

/// An instance's status entry.
pub fn instance_status(i: &Instance, phase: Phase, message: Option<String>) -> InstanceStatus {
    InstanceStatus {
        id: i.id.clone(),
        slot: i.labels.slot,
        port: i.labels.port,
        phase,
        ready: phase == Phase::Ready,
        started_at: Some(humantime::format_rfc3339_seconds(i.labels.created_at).to_string()),
        restarts: i.labels.carry.restarts,
        spec_hash: i.labels.spec_hash.clone(),
        last_exit: i.exit().or_else(|| i.labels.carry.last_exit.clone()),
        message: message.map(|m| fleet_api::clip(&m, MAX_INSTANCE_MESSAGE_BYTES).into_owned()),
    }
}

/// A slot with no container yet because its image is not ready: `Pending`, with the reason.
/// Its ID is empty (there is no container).
pub fn pending_slot(slot: u32, port: u16, why: &str) -> InstanceStatus {
    InstanceStatus {
        id: String::new(),
        slot,
        port,
        phase: Phase::Pending,
        ready: false,
        started_at: None,
        restarts: 0,
        spec_hash: String::new(),
        last_exit: None,
        message: Some(fleet_api::clip(why, MAX_INSTANCE_MESSAGE_BYTES).into_owned()),
    }
}

/// The longest condition message kept (a validation report of a hostile document can be
/// megabytes; status must stay far below etcd's request limit).
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// A condition; the message is cut to [`MAX_MESSAGE_BYTES`].
pub fn condition(kind: &str, ok: bool, reason: &str, message: impl Into<String>) -> Condition {
    let message: String = message.into();
    Condition {
        kind: kind.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: fleet_api::clip(&message, MAX_MESSAGE_BYTES).into_owned(),
        last_transition_time: String::new(),
    }
}

/// Sums up instances into a fleet status (without times; the writer sets them).
pub fn summarize(
    fleet: &str,
    node: &str,
    generation: i64,
    desired: u32,
    hash: Option<&str>,
    mut instances: Vec<InstanceStatus>,
    conditions: Vec<Condition>,
) -> FleetStatus {
    instances.sort_by(|a, b| (a.slot, &a.id).cmp(&(b.slot, &b.id)));
    let in_range = |i: &&InstanceStatus| i.slot < desired;
    // Per slot (during a surge a slot has two instances).
    let slots = |keep: &dyn Fn(&InstanceStatus) -> bool| {
        let mut s: Vec<u32> = instances
            .iter()
            .filter(in_range)
            .filter(|i| keep(i))
            .map(|i| i.slot)
            .collect();
        s.dedup();
        s.len() as u32
    };
    let ready_replicas = slots(&|i| i.ready);
    let updated_replicas = slots(&|i| {
        hash == Some(i.spec_hash.as_str())
            && i.phase != Phase::Terminating
            && i.phase != Phase::BackOff
    });
    FleetStatus {
        fleet: fleet.into(),
        node: node.into(),
        observed_generation: generation,
        desired_replicas: desired,
        replicas: instances
            .iter()
            .filter(|i| !i.id.is_empty() && i.phase != Phase::Terminating)
            .count() as u32,
        ready_replicas,
        updated_replicas,
        instances,
        conditions,
        updated_at: String::new(),
        prompt_cache: None,
    }
}

/// The entry key of an instance in the split status layout: its container ID, or
/// `pending-<slot>` for a slot with no container yet.
pub fn entry_key(i: &InstanceStatus) -> String {
    if i.id.is_empty() {
        format!("pending-{}", i.slot)
    } else {
        i.id.clone()
    }
}

/// What was last written of one fleet's status.
#[derive(Debug)]
struct Written {
    /// The status (instances included, `updated_at` empty).
    status: FleetStatus,
    /// Its summary's JSON without `updated_at`: a summary is rewritten when this changes.
    summary: String,
    /// When the summary was last written.
    at: Instant,
}

/// The summary's JSON (the status without instances), stamped with `updated_at`.
fn summary_json(status: &FleetStatus, updated_at: &str) -> String {
    // Every field named: a new field must be placed in the summary or the entries on purpose.
    let summary = FleetStatus {
        fleet: status.fleet.clone(),
        node: status.node.clone(),
        observed_generation: status.observed_generation,
        desired_replicas: status.desired_replicas,
        replicas: status.replicas,
        ready_replicas: status.ready_replicas,
        updated_replicas: status.updated_replicas,
        instances: Vec::new(),
        conditions: status.conditions.clone(),
        updated_at: updated_at.to_string(),
        prompt_cache: status.prompt_cache.clone(),
    };
    serde_json::to_string(&summary).unwrap_or_default()
}

/// Writes fleet statuses for one node, split (see `fleet_store`): a fleet's summary and one
/// entry per instance, each written only when it changed (the summary also on a slow heartbeat),
/// so an instance's change costs its own entry and the small summary, and an idle fleet costs
/// etcd almost nothing. Everything is written again after the session lease was replaced.
/// While a fleet churns (many changes in a row) it is written at most once per
/// `min_interval`; the last change is written when the interval has passed
/// ([`StatusWriter::pending_until`] says when).
#[derive(Debug)]
pub struct StatusWriter {
    node: String,
    heartbeat: Duration,
    min_interval: Duration,
    written: HashMap<String, Written>,
    pending: HashMap<String, Instant>,
    /// Fleets whose last write failed part way: written whole on the next round.
    dirty: std::collections::HashSet<String>,
    session: u64,
    writes: u64,
    bytes: u64,
}

impl StatusWriter {
    /// A writer for `node`, rewriting unchanged summaries every `heartbeat`.
    pub fn new(node: &str, heartbeat: Duration) -> StatusWriter {
        StatusWriter {
            node: node.into(),
            heartbeat,
            min_interval: Duration::from_secs(1),
            written: HashMap::new(),
            pending: HashMap::new(),
            dirty: Default::default(),
            session: 0,
            writes: 0,
            bytes: 0,
        }
    }

    /// Writes of one fleet's status are at least this far apart while it changes (default 1s).
    pub fn with_min_interval(mut self, min_interval: Duration) -> StatusWriter {
        self.min_interval = min_interval;
        self
    }

    /// How long until a held-back change is due to be written, if any.
    pub fn pending_until(&self) -> Option<Duration> {
        self.pending
            .values()
            .map(|due| due.saturating_duration_since(Instant::now()))
            .min()
    }

    /// Status writes so far (one per fleet and round that wrote something).
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Bytes of status values written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Writes what changed; deletes the status of fleets no longer in `statuses`.
    pub async fn write<S: Store>(
        &mut self,
        store: &S,
        statuses: Vec<FleetStatus>,
    ) -> fleet_store::Result<()> {
        let session = store.session_generation();
        let fresh_session = session != self.session;
        let now = clock::now();
        let stamp = humantime::format_rfc3339_seconds(now).to_string();
        let mut seen = Vec::new();
        for mut status in statuses {
            let fleet = status.fleet.clone();
            seen.push(fleet.clone());
            let whole = fresh_session || self.dirty.contains(&fleet);
            let previous = self.written.get(&fleet);
            // Conditions keep their transition time while their status stays the same.
            for c in &mut status.conditions {
                let before = previous.and_then(|p| p.status.condition(&c.kind));
                c.last_transition_time = match before {
                    Some(b) if b.status == c.status => b.last_transition_time.clone(),
                    _ => stamp.clone(),
                };
            }
            status.updated_at = String::new();
            let heartbeat_due = previous.is_none_or(|p| p.at.elapsed() >= self.heartbeat);
            if !whole && !heartbeat_due && previous.is_some_and(|p| p.status == status) {
                self.pending.remove(&fleet);
                continue;
            }
            // An instance leaving the endpoints is written at once (load balancers watching
            // the keys stop sending to it before it stops); other churn is held back until the
            // interval since the last write passed.
            let leaving = previous.is_some_and(|p| {
                p.status.instances.iter().any(|was| {
                    was.ready
                        && !status
                            .instances
                            .iter()
                            .any(|now| now.id == was.id && now.ready)
                })
            });
            if let Some(p) = previous
                && !whole
                && !leaving
                && p.at.elapsed() < self.min_interval
            {
                self.pending.insert(fleet.clone(), p.at + self.min_interval);
                // Remember the conditions' transition times for when it is written.
                if let Some(w) = self.written.get_mut(&fleet) {
                    w.status.conditions.clone_from(&status.conditions);
                }
                continue;
            }
            self.pending.remove(&fleet);
            let summary = summary_json(&status, "");
            let change = delta(previous.filter(|_| !whole), &status, |i| {
                serde_json::to_string(i).unwrap_or_default()
            });
            let change = fleet_store::StatusChange {
                summary: (whole || heartbeat_due || previous.is_none_or(|p| p.summary != summary))
                    .then(|| summary_json(&status, &stamp)),
                ..change
            };
            let at = match (&change.summary, previous) {
                (None, Some(p)) => p.at,
                _ => Instant::now(),
            };
            if !change.is_empty() {
                match store.write_status(&fleet, &self.node, &change).await {
                    Ok(()) => self.dirty.remove(&fleet),
                    // etcd refuses this one value (too large, say): the other fleets' status is
                    // still written, and this one is tried again on the next change.
                    Err(fleet_store::StoreError::Invalid(e)) => {
                        tracing::warn!(fleet = %fleet, error = %e, "cannot write this fleet's status");
                        self.dirty.insert(fleet);
                        continue;
                    }
                    Err(e) => {
                        self.dirty.insert(fleet);
                        return Err(e);
                    }
                };
                self.writes += 1;
                self.bytes += change_bytes(&change);
            }
            self.written.insert(
                fleet,
                Written {
                    status,
                    summary,
                    at,
                },
            );
        }
        let gone: Vec<String> = self
            .written
            .keys()
            .filter(|f| !seen.contains(f))
            .cloned()
            .collect();
        for fleet in gone {
            store.delete_status(&fleet, &self.node).await?;
            self.written.remove(&fleet);
            self.pending.remove(&fleet);
            self.dirty.remove(&fleet);
        }
        self.session = session;
        Ok(())
    }
}

/// The instance entries to write and to delete to go from `previous` (nothing known: every
/// entry) to `status`.
fn delta(
    previous: Option<&Written>,
    status: &FleetStatus,
    json: impl Fn(&InstanceStatus) -> String,
) -> fleet_store::StatusChange {
    let before: HashMap<String, &InstanceStatus> = previous
        .map(|p| {
            p.status
                .instances
                .iter()
                .map(|i| (entry_key(i), i))
                .collect()
        })
        .unwrap_or_default();
    let now: HashMap<String, &InstanceStatus> =
        status.instances.iter().map(|i| (entry_key(i), i)).collect();
    let mut put: Vec<(String, String)> = now
        .iter()
        .filter(|(k, i)| before.get(*k) != Some(*i))
        .map(|(k, i)| (k.clone(), json(i)))
        .collect();
    put.sort();
    let mut delete: Vec<String> = before
        .keys()
        .filter(|k| !now.contains_key(*k))
        .cloned()
        .collect();
    delete.sort();
    fleet_store::StatusChange {
        summary: None,
        put,
        delete,
    }
}

fn change_bytes(change: &fleet_store::StatusChange) -> u64 {
    let summary = change.summary.as_ref().map_or(0, String::len);
    let put: usize = change.put.iter().map(|(k, v)| k.len() + v.len()).sum();
    (summary + put) as u64
}

/// Every fleet's status on every node (or `fleet`'s), as the agents wrote it: each summary
/// with its instance entries (an agent from before the split lists them in the summary
/// itself, and those are kept). Entries that do not parse are skipped.
pub async fn read<S: Store + ?Sized>(
    store: &S,
    fleet: Option<&str>,
) -> fleet_store::Result<Vec<FleetStatus>> {
    let summaries = store.list_status(fleet).await?;
    let mut entries: HashMap<(String, String), Vec<InstanceStatus>> = HashMap::new();
    for e in store.list_instances(fleet).await? {
        if let Ok(i) = serde_json::from_str::<InstanceStatus>(&e.value) {
            entries.entry((e.fleet, e.node)).or_default().push(i);
        }
    }
    Ok(summaries
        .into_iter()
        .filter_map(|e| {
            let mut status: FleetStatus = serde_json::from_str(&e.value).ok()?;
            if let Some(mut listed) = entries.remove(&(e.fleet, e.node))
                && status.instances.is_empty()
            {
                listed.sort_by(|a, b| (a.slot, &a.id).cmp(&(b.slot, &b.id)));
                status.instances = listed;
            }
            Some(status)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::InstanceLabels;
    use fleet_runtime::TaskState;
    use fleet_store::memory::MemoryStore;
    use std::time::SystemTime;

    fn inst(state: TaskState, ready: bool, was_ready: bool) -> Instance {
        Instance {
            id: "f-0-abc".into(),
            labels: InstanceLabels::new("f", 0, 1, "h", SystemTime::UNIX_EPOCH),
            state,
            exit_code: Some(1),
            exited_at: None,
            ready,
            was_ready,
            oom: false,
            startup_since: None,
            unhealthy: false,
            stalled: false,
            memory: None,
            known: true,
            model_pending: false,
        }
    }

    #[test]
    fn phases() {
        assert_eq!(
            phase(&inst(TaskState::Running, true, true), false, false),
            Phase::Ready
        );
        assert_eq!(
            phase(&inst(TaskState::Running, false, true), false, false),
            Phase::Unready
        );
        assert_eq!(
            phase(&inst(TaskState::Running, false, false), false, false),
            Phase::Starting
        );
        assert_eq!(
            phase(&inst(TaskState::Stopped, false, false), false, true),
            Phase::BackOff
        );
        assert_eq!(
            phase(&inst(TaskState::NoTask, false, false), false, false),
            Phase::Pending
        );
        let mut waiting = inst(TaskState::Running, false, false);
        waiting.model_pending = true;
        assert_eq!(
            phase(&waiting, false, false),
            Phase::Pending,
            "waiting for the node's model is model work"
        );
        assert_eq!(
            phase(&inst(TaskState::Running, true, true), true, false),
            Phase::Terminating
        );
    }

    #[tokio::test(start_paused = true)]
    async fn writes_only_changes() {
        let (store, mut w) = session_and_writer().await;
        let i = instance_status(&inst(TaskState::Running, true, true), Phase::Ready, None);
        let s = summarize(
            "f",
            "n1",
            7,
            1,
            Some("h"),
            vec![i.clone()],
            vec![condition("Available", true, "MinimumReplicasAvailable", "")],
        );
        assert_eq!(
            (s.ready_replicas, s.updated_replicas, s.replicas),
            (1, 1, 1)
        );
        w.write(&store, vec![s.clone()]).await.expect("write");
        let first = store.revision();
        w.write(&store, vec![s.clone()]).await.expect("write");
        assert_eq!(
            store.revision(),
            first,
            "an unchanged status is not written"
        );
        let mut changed = s.clone();
        changed.instances[0].phase = Phase::Unready;
        changed.instances[0].ready = false;
        w.write(&store, vec![changed]).await.expect("write");
        assert_eq!(store.revision(), first + 1);
        let stored: FleetStatus =
            serde_json::from_str(&store.list_status(Some("f")).await.expect("list")[0].value)
                .expect("json");
        assert_eq!(stored.observed_generation, 7);
        assert!(!stored.updated_at.is_empty());
        assert!(!stored.conditions[0].last_transition_time.is_empty());
        // A lost lease means every key is written again.
        store.expire_session();
        w.write(&store, vec![s.clone()]).await.expect("write");
        assert_eq!(store.list_status(Some("f")).await.expect("list").len(), 1);
        // A fleet no longer reported loses its key.
        w.write(&store, vec![]).await.expect("write");
        assert!(store.list_status(None).await.expect("list").is_empty());
    }

    /// A store with a session, and a writer that writes every change at once.
    async fn session_and_writer() -> (MemoryStore, StatusWriter) {
        let store = MemoryStore::default();
        store
            .start_session(Duration::from_secs(15))
            .await
            .expect("session");
        let w = StatusWriter::new("n1", Duration::from_secs(300)).with_min_interval(Duration::ZERO);
        (store, w)
    }

    #[tokio::test(start_paused = true)]
    async fn a_status_etcd_refuses_does_not_hold_back_the_others() {
        let (store, mut w) = session_and_writer().await;
        let i = instance_status(&inst(TaskState::Running, true, true), Phase::Ready, None);
        let mut huge = summarize("a", "n1", 1, 1, Some("h"), vec![i.clone()], vec![]);
        // Built by hand: `condition` would cut the message.
        huge.conditions.push(Condition {
            kind: "SpecValid".into(),
            status: "False".into(),
            reason: "Invalid".into(),
            message: "x".repeat(2 << 20),
            last_transition_time: String::new(),
        });
        let fine = summarize("b", "n1", 1, 1, Some("h"), vec![i], vec![]);
        w.write(&store, vec![huge, fine])
            .await
            .expect("a refused value is not a store outage");
        let written: Vec<String> = store
            .list_status(None)
            .await
            .expect("list")
            .into_iter()
            .map(|e| e.fleet)
            .collect();
        assert_eq!(written, ["b"], "the other fleet's status is written");
        let long = condition("SpecValid", false, "Invalid", "y".repeat(1 << 20));
        assert!(long.message.len() <= MAX_MESSAGE_BYTES);
    }

    #[tokio::test(start_paused = true)]
    async fn churn_is_written_at_most_once_per_interval() {
        let store = MemoryStore::default();
        store
            .start_session(Duration::from_secs(15))
            .await
            .expect("session");
        let mut w = StatusWriter::new("n1", Duration::from_secs(300))
            .with_min_interval(Duration::from_millis(300));
        let i = instance_status(
            &inst(TaskState::Running, false, false),
            Phase::Starting,
            None,
        );
        let s = summarize("f", "n1", 1, 1, Some("h"), vec![i], vec![]);
        w.write(&store, vec![s.clone()]).await.expect("write");
        let after_first = store.revision();
        let mut ready = s.clone();
        ready.instances[0].phase = Phase::Ready;
        ready.instances[0].ready = true;
        w.write(&store, vec![ready.clone()]).await.expect("write");
        assert_eq!(
            store.revision(),
            after_first,
            "held back within the interval"
        );
        let due = w.pending_until().expect("a pending write");
        assert!(due <= Duration::from_millis(300));
        tokio::time::sleep(due).await;
        w.write(&store, vec![ready]).await.expect("write");
        assert_eq!(
            store.revision(),
            after_first + 1,
            "written once the interval passed"
        );
        assert!(w.pending_until().is_none());
        let stored = read(&store, Some("f")).await.expect("read");
        assert_eq!(stored[0].instances[0].phase, Phase::Ready);
    }

    /// A node's status with `n` ready instances.
    fn node_of(n: u32) -> FleetStatus {
        let instances = (0..n)
            .map(|slot| {
                let mut i = inst(TaskState::Running, true, true);
                i.labels.slot = slot;
                i.labels.port = 11434 + slot as u16;
                i.id = format!("f-{slot}-abcdef");
                i.labels.spec_hash = "9c1e2f3a4b5c6d7e".into();
                instance_status(&i, Phase::Ready, None)
            })
            .collect();
        let conditions = vec![
            condition("SpecValid", true, "Parsed", ""),
            condition("Available", true, "MinimumReplicasAvailable", ""),
        ];
        summarize(
            "f",
            "n1",
            7,
            n,
            Some("9c1e2f3a4b5c6d7e"),
            instances,
            conditions,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn one_instance_of_833_rewrites_its_entry_and_the_summary_only() {
        let (store, mut w) = session_and_writer().await;
        let s = node_of(833);
        let whole = serde_json::to_string(&s).expect("json").len() as u64;
        w.write(&store, vec![s.clone()]).await.expect("write");
        let first = w.bytes();
        assert!(first >= whole * 9 / 10, "the first write holds everything");
        let mut one = s.clone();
        one.instances[400].phase = Phase::Unready;
        one.instances[400].ready = false;
        one.ready_replicas -= 1;
        w.write(&store, vec![one.clone()]).await.expect("write");
        let delta = w.bytes() - first;
        assert!(
            delta < 2048,
            "one instance's change wrote {delta} bytes (the whole status is {whole})"
        );
        let back = read(&store, Some("f")).await.expect("read");
        assert_eq!(back.len(), 1);
        let mut back = back.into_iter().next().expect("one");
        assert!(!back.updated_at.is_empty());
        back.updated_at = String::new();
        let mut want = one;
        for c in &mut want.conditions {
            c.last_transition_time
                .clone_from(&back.conditions[0].last_transition_time);
        }
        assert_eq!(back, want, "readers see the whole status");
        // The instance leaves, another comes: its entry goes, the new one is written.
        let mut fewer = node_of(833);
        fewer.instances.remove(400);
        w.write(&store, vec![fewer]).await.expect("write");
        let keys = store.list_instances(Some("f")).await.expect("list");
        assert_eq!(keys.len(), 832);
        assert!(!keys.iter().any(|e| e.key == "f-400-abcdef"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_heartbeat_rewrites_the_summary_alone() {
        let store = MemoryStore::default();
        store
            .start_session(Duration::from_secs(15))
            .await
            .expect("session");
        let mut w =
            StatusWriter::new("n1", Duration::from_secs(60)).with_min_interval(Duration::ZERO);
        let s = node_of(100);
        w.write(&store, vec![s.clone()]).await.expect("write");
        let (rev, bytes) = (store.revision(), w.bytes());
        tokio::time::sleep(Duration::from_secs(61)).await;
        w.write(&store, vec![s]).await.expect("write");
        assert_eq!(store.revision(), rev + 1, "one write");
        assert!(
            w.bytes() - bytes < 1024,
            "the summary alone: {} bytes",
            w.bytes() - bytes
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_status_written_by_an_older_agent_is_read_with_its_instances() {
        let (store, _) = session_and_writer().await;
        let old = node_of(3);
        store
            .put_status("f", "n1", &serde_json::to_string(&old).expect("json"))
            .await
            .expect("put");
        let back = read(&store, None).await.expect("read");
        assert_eq!(
            back,
            vec![old],
            "the instances listed in the summary are kept"
        );
        // Then the upgraded agent writes the split layout over it.
        let mut w =
            StatusWriter::new("n1", Duration::from_secs(300)).with_min_interval(Duration::ZERO);
        let new = node_of(4);
        w.write(&store, vec![new]).await.expect("write");
        let back = read(&store, None).await.expect("read");
        assert_eq!(back[0].instances.len(), 4);
        let summary = &store.list_status(None).await.expect("list")[0].value;
        assert!(!summary.contains("\"instances\""), "{summary}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_writes_the_fleet_whole_next_time() {
        let (store, mut w) = session_and_writer().await;
        w.write(&store, vec![node_of(3)]).await.expect("write");
        store.set_down(true);
        let mut changed = node_of(3);
        changed.instances[1].restarts = 1;
        assert!(w.write(&store, vec![changed.clone()]).await.is_err());
        store.set_down(false);
        // Someone (an operator, a stale lease) removed an entry meanwhile.
        store.delete_status("f", "n1").await.expect("delete");
        w.write(&store, vec![changed]).await.expect("write");
        let back = read(&store, None).await.expect("read");
        assert_eq!(back[0].instances.len(), 3, "every entry written again");
        assert_eq!(back[0].instances[1].restarts, 1);
    }
}
