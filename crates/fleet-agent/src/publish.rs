//! The publisher: the node's record and its fleets' status go to the store beside the
//! reconcile loop, never in it.
//!
//! The loop hands over its latest [`Report`] and goes on: a crashed instance is replaced as fast
//! while etcd is unreachable, or dropping packets, as when it answers. The publisher owns the
//! store session (its lease), writes the node record (on a new session, a change, or the
//! heartbeat) and the status keys through the [`StatusWriter`] (only what changed; everything
//! again on a new session), as soon as the store answers; a report that arrives meanwhile
//! replaces the one waiting (latest value wins). It never touches containers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use fleet_runtime::clock::{self, Instant};

use fleet_api::{FleetStatus, NodeInfo};
use fleet_store::Store;
use tokio::sync::watch;

use crate::status::StatusWriter;

/// What the loop last saw, to be written.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The node record (its heartbeat time is set when it is written).
    pub node: Option<NodeInfo>,
    /// Every fleet's status on this node; `None` until the loop knows enough to publish (an
    /// agent that just started, before it has probed what it adopted).
    pub statuses: Option<Vec<FleetStatus>>,
}

/// How the publisher writes.
#[derive(Clone, Debug)]
pub struct PublishConfig {
    /// This node.
    pub node: String,
    /// TTL of the session lease.
    pub session_ttl: Duration,
    /// Rewrite the node record this often.
    pub node_heartbeat: Duration,
    /// Rewrite unchanged status this often.
    pub status_heartbeat: Duration,
    /// Writes of one fleet's key at least this far apart while it churns.
    pub min_interval: Duration,
}

/// What the publisher has done, shared with the loop.
#[derive(Debug, Default)]
struct Shared {
    /// The store confirms the session and took the last writes.
    up: AtomicBool,
    /// Status writes so far.
    writes: AtomicU64,
    /// Nodes whose record says they serve the gateway (0: not counted yet).
    gateways: AtomicU32,
}

/// The handle the loop holds.
#[derive(Debug)]
pub struct Publisher {
    tx: watch::Sender<(u64, Arc<Report>)>,
    written: watch::Receiver<u64>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How often the publisher looks at the session when nothing else wakes it: a replaced lease
/// is noticed (and every key written again) within this.
const SESSION_CHECK: Duration = Duration::from_millis(500);
/// A round (heartbeats) at least this often while nothing changes; an idle round compares and
/// writes nothing unless a heartbeat is due.
const IDLE_ROUND: Duration = Duration::from_secs(5);
/// First retry after a failed write; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(2);
/// How often the nodes that serve the gateway are counted (tenants' limits are shared by them).
const GATEWAYS_CHECK: Duration = Duration::from_secs(10);

impl Publisher {
    /// Starts publishing to `store`.
    pub fn start<S: Store>(store: Arc<S>, cfg: PublishConfig) -> Publisher {
        let (tx, rx) = watch::channel((0u64, Arc::new(Report::default())));
        let (written_tx, written) = watch::channel(0u64);
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(run(store, cfg, rx, written_tx, shared.clone()));
        Publisher {
            tx,
            written,
            shared,
            task,
        }
    }

    /// Hands over the latest report; returns its number.
    pub fn publish(&self, report: Report) -> u64 {
        let mut seq = 0;
        self.tx.send_modify(|(n, r)| {
            *n += 1;
            seq = *n;
            *r = Arc::new(report);
        });
        seq
    }

    /// Waits until report `seq` (or a later one) is written, at most `within`; false when it
    /// was not (the store is away or slow).
    pub async fn written(&self, seq: u64, within: Duration) -> bool {
        let mut rx = self.written.clone();
        tokio::time::timeout(within, rx.wait_for(|w| *w >= seq))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Whether the store confirms the session and took the last writes.
    pub fn store_up(&self) -> bool {
        self.shared.up.load(Ordering::SeqCst)
    }

    /// Status writes so far.
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::SeqCst)
    }

    /// The live nodes whose record says they serve the gateway, as last counted (`None`
    /// before the first count).
    pub fn gateways(&self) -> Option<u32> {
        Some(self.shared.gateways.load(Ordering::SeqCst)).filter(|n| *n > 0)
    }
}

/// Counts the live nodes that serve the gateway (from their records); `None` when the store
/// does not answer.
async fn count_gateways<S: Store>(store: &S) -> Option<u32> {
    let nodes = store.list_nodes().await.ok()?;
    let serving = nodes
        .iter()
        .filter_map(|e| serde_json::from_str::<NodeInfo>(&e.value).ok())
        .filter(|n| n.gateway)
        .count();
    Some(u32::try_from(serving).unwrap_or(u32::MAX))
}

async fn run<S: Store>(
    store: Arc<S>,
    cfg: PublishConfig,
    mut rx: watch::Receiver<(u64, Arc<Report>)>,
    written: watch::Sender<u64>,
    shared: Arc<Shared>,
) {
    let mut writer =
        StatusWriter::new(&cfg.node, cfg.status_heartbeat).with_min_interval(cfg.min_interval);
    // The node record last written: (content, session generation, when).
    let mut node_written: Option<(NodeInfo, u64, Instant)> = None;
    let mut retry = FIRST_RETRY;
    // A round is due: a new report, a failed round, a new session, or the idle timer.
    let mut due = true;
    let mut last_round = Instant::now();
    let mut generation = store.session_generation();
    let mut counted: Option<Instant> = None;
    loop {
        let now_generation = store.session_generation();
        if due || now_generation != generation || last_round.elapsed() >= IDLE_ROUND {
            let (seq, report) = rx.borrow_and_update().clone();
            let outcome =
                publish_once(&*store, &cfg, &report, &mut writer, &mut node_written).await;
            last_round = Instant::now();
            generation = store.session_generation();
            shared.writes.store(writer.writes(), Ordering::SeqCst);
            shared
                .up
                .store(outcome.is_ok() && store.session_alive(), Ordering::SeqCst);
            match outcome {
                Ok(()) => {
                    let _ = written.send(seq);
                    retry = FIRST_RETRY;
                    due = false;
                    let serving = report.node.as_ref().is_some_and(|n| n.gateway);
                    if serving && counted.is_none_or(|at| at.elapsed() >= GATEWAYS_CHECK) {
                        counted = Some(Instant::now());
                        if let Some(n) = count_gateways(&*store).await {
                            // (This node's own record is written: at least 1.)
                            shared.gateways.store(n.max(1), Ordering::SeqCst);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?retry, "cannot write to the store; running instances are not affected");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(MAX_RETRY);
                    continue;
                }
            }
        }
        // Held-back churn is written when its interval has passed.
        let wait = writer
            .pending_until()
            .map_or(SESSION_CHECK, |d| d.min(SESSION_CHECK));
        if writer.pending_until().is_some_and(|d| d.is_zero()) {
            due = true;
        }
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return; // the loop is gone
                }
                due = true;
            }
            _ = tokio::time::sleep(wait) => {
                due |= writer.pending_until().is_some_and(|d| d.is_zero());
            }
        }
    }
}

/// One round: the session, the node record when due, the status keys that changed.
async fn publish_once<S: Store>(
    store: &S,
    cfg: &PublishConfig,
    report: &Report,
    writer: &mut StatusWriter,
    node_written: &mut Option<(NodeInfo, u64, Instant)>,
) -> Result<(), String> {
    if store.session_generation() == 0 {
        store
            .start_session(cfg.session_ttl)
            .await
            .map_err(|e| format!("cannot start the session: {e}"))?;
    }
    let generation = store.session_generation();
    if let Some(node) = &report.node {
        let due = node_written.as_ref().is_none_or(|(was, g, at)| {
            was != node || *g != generation || at.elapsed() >= cfg.node_heartbeat
        });
        if due {
            let mut record = node.clone();
            record.heartbeat = humantime::format_rfc3339_seconds(clock::now()).to_string();
            let json = serde_json::to_string(&record).unwrap_or_default();
            store
                .put_node(&cfg.node, &json)
                .await
                .map_err(|e| format!("cannot write the node record: {e}"))?;
            *node_written = Some((node.clone(), generation, Instant::now()));
        }
    }
    if let Some(statuses) = &report.statuses {
        writer
            .write(store, statuses.clone())
            .await
            .map_err(|e| format!("cannot write status: {e}"))?;
    }
    Ok(())
}
