//! The controller: one level-triggered loop per node.
//!
//! Every pass observes afresh (containerd's containers, the fleets last seen in etcd, the
//! probes), evaluates each fleet for this node, asks the pure planner what to do, hands the
//! actions to the executor, points the prober at the running instances, and writes status.
//! Watch events, containerd events, probe changes and finished actions only wake the loop; a
//! resync timer wakes it anyway.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use fleet_runtime::clock::{self, Instant};

use fleet_api::{
    Capacity, Context, FleetStatus, InstanceStatus, NodeInfo, OllamaFleet, Phase, Versions,
    spec_hash,
};
use fleet_runtime::{ImageInfo, Runtime, RuntimeEvent};
use fleet_store::{FleetDoc, FleetEvent, Store};
use futures::StreamExt;
use tokio::sync::Notify;

use crate::build::{self, NodeCtx};
use crate::executor::{Executor, Op};
use crate::models::{Gate, ModelCache, Need, WarmTarget, Warmer, Warmth};
use crate::ollama::{HttpOllama, Ollama};
use crate::planner::{self, Action, Desired, Instance, Target, Why};
use crate::policy::{self, Host, Policy, Refusal};
use crate::prober::{self, Probes};
use crate::publish::{PublishConfig, Publisher, Report};
use crate::status;
use crate::topology::Topology;

/// How long a starting agent waits at most to learn the readiness of the instances it adopts
/// before it publishes status.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(15);

/// The grace of an instance nothing says anything about (made before the grace label).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// How long a pass waits for the status write that announces instances leaving before it stops
/// them (only while the store answers).
pub const STOP_WAIT: Duration = Duration::from_secs(2);

/// An instance younger than this that has not answered yet may be walking its model cache
/// (Ollama's start): the agent starts no pull or create in that cache meanwhile.
pub const STARTUP_QUIET: Duration = Duration::from_secs(30);

/// How often the memory of instances with `rotation.maxMemory` is measured.
pub const MEMORY_PERIOD: Duration = Duration::from_secs(5);

/// `http://host:port` of an instance of `spec` (loopback when it binds every address).
pub fn base_url(spec: &fleet_api::FleetSpec, port: u16) -> String {
    base_url_at(spec.network.host_ip, port)
}

/// `http://ip:port` (loopback when `ip` is a wildcard).
pub fn base_url_at(ip: std::net::IpAddr, port: u16) -> String {
    match ip {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => format!("http://127.0.0.1:{port}"),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => format!("http://[::1]:{port}"),
        std::net::IpAddr::V6(ip) => format!("http://[{ip}]:{port}"),
        ip => format!("http://{ip}:{port}"),
    }
}

/// The key of a fleet's model gate for one model (in any spelling).
fn gate_key(fleet: &str, model: &str) -> String {
    format!("{fleet}\u{0}{}", fleet_api::ModelRef::key(model))
}

/// The agent's settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This node's name.
    pub node: String,
    /// This node's labels (matched by `nodeSelector`).
    pub labels: BTreeMap<String, String>,
    /// Sockets counted for `perSocket`.
    pub sockets: u32,
    /// CPU topology.
    pub topology: Topology,
    /// containerd namespace (for messages).
    pub namespace: String,
    /// cgroup parent of the instances.
    pub cgroup_parent: String,
    /// Actions at once.
    pub concurrency: usize,
    /// Plan at least this often.
    pub resync: Duration,
    /// Rewrite unchanged status this often.
    pub status_heartbeat: Duration,
    /// Rewrite the node record this often.
    pub node_heartbeat: Duration,
    /// TTL of the session lease.
    pub session_ttl: Duration,
    /// The agent's version.
    pub version: String,
    /// Passes woken by events start at most this often (bursts are coalesced).
    pub min_pass_interval: Duration,
    /// `imagePullPolicy: Always` tags are re-resolved this often.
    pub image_refresh: Duration,
    /// First retry after a failed image pull (doubling up to 5 minutes).
    pub pull_backoff: Duration,
    /// What fleets may ask of this node (allowlists, default limits, admission).
    pub policy: Policy,
    /// `RLIMIT_NOFILE` of instances: 65536, or the agent's own hard limit when lower (runc
    /// cannot raise it past the shim's hard limit, which normally matches the agent's).
    pub nofile: u64,
}

impl AgentConfig {
    /// Defaults for a node.
    pub fn new(node: &str, namespace: &str) -> AgentConfig {
        let topology = Topology::read(std::path::Path::new("/"));
        AgentConfig {
            node: node.into(),
            labels: BTreeMap::new(),
            sockets: topology.sockets.len().max(1) as u32,
            topology,
            namespace: namespace.into(),
            cgroup_parent: format!("/ollama-fleet/{namespace}"),
            concurrency: 16,
            resync: Duration::from_secs(10),
            status_heartbeat: Duration::from_secs(300),
            node_heartbeat: Duration::from_secs(60),
            session_ttl: Duration::from_secs(15),
            version: env!("CARGO_PKG_VERSION").into(),
            min_pass_interval: Duration::from_millis(100),
            image_refresh: Duration::from_secs(600),
            pull_backoff: Duration::from_secs(10),
            policy: Policy::default(),
            nofile: crate::topology::hard_nofile().map_or(65_536, |n| n.min(65_536)),
        }
    }
}

/// An instance as the HTTP endpoints show it.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Fleet.
    pub fleet: String,
    /// Container ID.
    pub id: String,
    /// Slot.
    pub slot: u32,
    /// `host:port` to send requests to.
    pub address: String,
    /// Phase.
    pub phase: Phase,
    /// Whether to route to it.
    pub ready: bool,
    /// Spec hash.
    pub spec_hash: String,
}

/// What the agent last saw and did, for `/instances`, `/metrics` and the health endpoints.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// The node.
    pub node: String,
    /// Every instance.
    pub endpoints: Vec<Endpoint>,
    /// Every fleet's status on this node.
    pub statuses: Vec<FleetStatus>,
    /// The fleet list is known (etcd or the manifests answered).
    pub fleets_known: bool,
    /// containerd answered the last pass.
    pub containerd_up: bool,
    /// The store accepted the last writes and confirms the session (so an outage shows even
    /// when nothing needs writing).
    pub store_up: bool,
    /// When the last pass ended.
    pub last_pass: Option<Instant>,
    /// Passes so far.
    pub passes: u64,
    /// Duration of the last pass.
    pub last_pass_seconds: f64,
    /// Actions (completed, failed).
    pub actions: (u64, u64),
    /// Status writes so far.
    pub status_writes: u64,
    /// Restarts by fleet.
    pub restarts: BTreeMap<String, u64>,
    /// Image pulls.
    pub pulls: crate::images::PullStats,
    /// Model pulls.
    pub models: crate::models::ModelStats,
    /// Rotations started, by (fleet, reason).
    pub rotations: BTreeMap<(String, String), u64>,
}

/// One fleet, evaluated for this node.
#[derive(Debug)]
enum Eval {
    Run {
        fleet: Box<OllamaFleet>,
        replicas: u32,
        hash: String,
        image: Option<Box<ImageInfo>>,
        image_error: Option<String>,
        /// The memory each instance asks for in the manifest (admission counts it).
        request: Option<u64>,
        /// Admitted with fewer instances than asked for (and why).
        cut: Option<Refusal>,
    },
    Paused(Box<OllamaFleet>),
    Invalid(String),
    /// Valid, but this node does not run it: what runs is kept, nothing starts.
    Refused {
        fleet: Box<OllamaFleet>,
        replicas: u32,
        refusal: Refusal,
    },
}

/// A fleet document parsed and validated for this node: (fleet, its replicas here), or why not.
type Parsed = Result<(OllamaFleet, u32), String>;

/// A fleet's conditions on this node, derived from its evaluation and its summed-up status.
fn conditions(
    eval: Option<&Eval>,
    s: &FleetStatus,
    stalled: Option<&str>,
    model_waiting: Option<&str>,
    policy: &Policy,
) -> Vec<fleet_api::Condition> {
    use crate::status::condition as c;
    match eval {
        None => vec![c(
            "Progressing",
            true,
            "FleetDeleted",
            "the fleet was deleted; removing its instances",
        )],
        Some(Eval::Invalid(e)) => vec![
            c("SpecValid", false, "Invalid", e.clone()),
            c(
                "Progressing",
                false,
                "SpecInvalid",
                "running instances are left as they are",
            ),
        ],
        Some(Eval::Paused(_)) => vec![
            c("SpecValid", true, "Parsed", ""),
            c(
                "Progressing",
                false,
                "Paused",
                "spec.paused is true: no changes are made",
            ),
        ],
        Some(Eval::Refused { refusal, .. }) => vec![
            c("SpecValid", true, "Parsed", ""),
            c("Admitted", false, refusal.reason(), refusal.message(policy)),
            c(
                "Progressing",
                false,
                refusal.reason(),
                "nothing is started on this node; running instances are left as they are",
            ),
        ],
        Some(Eval::Run {
            fleet,
            image_error,
            cut,
            ..
        }) => {
            let desired = s.desired_replicas;
            let (max_unavailable, _) = fleet.spec.rollout.budget(desired);
            let available = s.ready_replicas + max_unavailable >= desired;
            let converged = s.ready_replicas == desired
                && s.updated_replicas == desired
                && s.replicas == desired;
            let progressing = match image_error {
                // A pull under way is progress; a failed or impossible one is not.
                Some(e) if desired > 0 => {
                    let reason = e.split(':').next().unwrap_or("ErrImage");
                    c("Progressing", reason == "Pulling", reason, e.clone())
                }
                _ if converged => c("Progressing", false, "Converged", ""),
                _ if stalled.is_some() => c(
                    "Progressing",
                    false,
                    "RolloutStalled",
                    stalled.unwrap_or_default(),
                ),
                _ if model_waiting.is_some_and(|m| m.starts_with("ModelPullBackOff")) => c(
                    "Progressing",
                    false,
                    "ModelPullBackOff",
                    model_waiting.unwrap_or_default(),
                ),
                _ if model_waiting.is_some() => c(
                    "Progressing",
                    true,
                    "PreparingModel",
                    model_waiting.unwrap_or_default(),
                ),
                _ => c(
                    "Progressing",
                    true,
                    "Reconciling",
                    format!(
                        "{} of {desired} instances ready, {} on the current spec",
                        s.ready_replicas, s.updated_replicas
                    ),
                ),
            };
            let reason = if available {
                "MinimumReplicasAvailable"
            } else {
                "MinimumReplicasUnavailable"
            };
            let admitted = match cut {
                Some(r) => c("Admitted", false, r.reason(), r.message(policy)),
                None => c("Admitted", true, "Admitted", ""),
            };
            vec![
                c("SpecValid", true, "Parsed", ""),
                admitted,
                c(
                    "Available",
                    available,
                    reason,
                    format!("{} of {desired} instances ready", s.ready_replicas),
                ),
                progressing,
            ]
        }
    }
}

/// The agent.
pub struct Agent<R: Runtime, S: Store> {
    cfg: AgentConfig,
    runtime: Arc<R>,
    store: Arc<S>,
    exec: Executor<R>,
    prober: Arc<dyn Probes>,
    wake: Arc<Notify>,
    fleets: Arc<Mutex<Option<BTreeMap<String, FleetDoc>>>>,
    ooms: Arc<Mutex<HashSet<String>>>,
    images: crate::images::Images<R>,
    models: ModelCache,
    warmer: Warmer,
    /// Memory of instances of fleets with `rotation.maxMemory`, and when it was measured.
    memory: HashMap<String, (Instant, u64)>,
    rotations: BTreeMap<(String, String), u64>,
    /// When this agent started: instances created before were adopted.
    started: Instant,
    started_at: SystemTime,
    /// The readiness of adopted instances is known (status is published from then on).
    settled: bool,
    /// Each fleet's document as last parsed, by revision.
    parsed: HashMap<String, (i64, Parsed)>,
    last_valid: HashMap<String, OllamaFleet>,
    publisher: Publisher,
    view: Arc<RwLock<View>>,
    salt: u64,
    /// containerd's version, and when it was asked.
    containerd_version: Option<(Instant, String)>,
    /// Each instance's own grace (from its label), for instances whose fleet cannot say.
    graces: HashMap<String, Duration>,
    /// Each instance's address (from its label): probes and endpoints follow it.
    host_ips: HashMap<String, std::net::IpAddr>,
    /// What admission asks of the host (symlinks, addresses, cpus, memory).
    host: Arc<dyn Host + Send + Sync>,
}

impl<R: Runtime, S: Store> std::fmt::Debug for Agent<R, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.cfg.node)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<R: Runtime, S: Store> Agent<R, S> {
    /// An agent for `cfg`, probing over HTTP.
    pub fn new(cfg: AgentConfig, runtime: Arc<R>, store: Arc<S>) -> Agent<R, S> {
        let wake = Arc::new(Notify::new());
        let prober = Arc::new(prober::Prober::new(wake.clone()));
        Agent::with_probes(cfg, runtime, store, prober, wake)
    }

    /// An agent with the given probes; `wake` must be the one the probes notify.
    pub fn with_probes(
        cfg: AgentConfig,
        runtime: Arc<R>,
        store: Arc<S>,
        probes: Arc<dyn Probes>,
        wake: Arc<Notify>,
    ) -> Agent<R, S> {
        let ollama: Arc<dyn Ollama> = Arc::new(HttpOllama::default());
        Agent {
            models: ModelCache::new(ollama.clone(), wake.clone(), cfg.pull_backoff),
            warmer: Warmer::new(ollama, wake.clone()),
            memory: HashMap::new(),
            rotations: BTreeMap::new(),
            started: Instant::now(),
            started_at: clock::now(),
            settled: false,
            exec: Executor::new(runtime.clone(), cfg.concurrency, wake.clone()),
            images: crate::images::Images::new(runtime.clone(), wake.clone(), cfg.image_refresh)
                .with_backoff(cfg.pull_backoff),
            prober: probes,
            publisher: Publisher::start(
                store.clone(),
                PublishConfig {
                    node: cfg.node.clone(),
                    session_ttl: cfg.session_ttl,
                    node_heartbeat: cfg.node_heartbeat,
                    status_heartbeat: cfg.status_heartbeat,
                    min_interval: Duration::from_secs(1),
                },
            ),
            view: Arc::new(RwLock::new(View {
                node: cfg.node.clone(),
                ..View::default()
            })),
            cfg,
            runtime,
            store,
            wake,
            fleets: Arc::new(Mutex::new(None)),
            ooms: Arc::new(Mutex::new(HashSet::new())),
            last_valid: HashMap::new(),
            parsed: HashMap::new(),
            salt: 0,
            containerd_version: None,
            graces: HashMap::new(),
            host_ips: HashMap::new(),
            host: Arc::new(policy::RealHost),
        }
    }

    /// Answers admission's questions about the host with `host` (tests script it).
    pub fn with_host(mut self, host: Arc<dyn Host + Send + Sync>) -> Agent<R, S> {
        self.host = host;
        self
    }

    /// Talks to the instances' Ollama API through `ollama` (tests script it).
    pub fn with_ollama(mut self, ollama: Arc<dyn Ollama>) -> Agent<R, S> {
        self.models = ModelCache::new(ollama.clone(), self.wake.clone(), self.cfg.pull_backoff);
        self.warmer = Warmer::new(ollama, self.wake.clone());
        self
    }

    /// The view shared with the HTTP endpoints.
    pub fn view(&self) -> Arc<RwLock<View>> {
        self.view.clone()
    }

    /// Runs until `shutdown` completes. Running instances are left running.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        self.spawn_watchers();
        let mut next_wake: Option<SystemTime> = None;
        let mut last_start: Option<Instant> = None;
        loop {
            // Coalesce bursts of wake-ups (a wave of finished actions, probe changes) into one
            // pass; the first wake-up after a quiet spell runs at once.
            if let Some(at) = last_start {
                let since = at.elapsed();
                if since < self.cfg.min_pass_interval {
                    tokio::time::sleep(self.cfg.min_pass_interval - since).await;
                }
            }
            let started = Instant::now();
            last_start = Some(started);
            let span = tracing::info_span!("reconcile", node = %self.cfg.node);
            match tracing::Instrument::instrument(self.reconcile(), span).await {
                Ok(wake_at) => next_wake = wake_at,
                Err(e) => tracing::warn!(error = %e, "reconcile pass failed; retrying"),
            }
            let elapsed = started.elapsed();
            {
                let mut v = self.view.write().unwrap_or_else(|p| p.into_inner());
                v.passes += 1;
                v.last_pass_seconds = elapsed.as_secs_f64();
                v.last_pass = Some(Instant::now());
            }
            let mut sleep = self.cfg.resync;
            if let Some(at) = next_wake {
                sleep = sleep.min(planner::until(clock::now(), at) + Duration::from_millis(5));
            }
            if !self
                .view
                .read()
                .map(|v| v.containerd_up && v.store_up)
                .unwrap_or(false)
            {
                sleep = sleep.min(Duration::from_secs(1));
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
        tracing::info!(node = %self.cfg.node, "agent stopping; instances keep running");
    }

    fn spawn_watchers(&self) {
        let fleets = self.fleets.clone();
        let wake = self.wake.clone();
        let mut watch = self.store.watch_fleets();
        tokio::spawn(async move {
            while let Some(event) = watch.next().await {
                {
                    let mut f = lock(&fleets);
                    match event {
                        FleetEvent::Resync(docs) => {
                            *f = Some(docs.into_iter().map(|d| (d.name.clone(), d)).collect());
                        }
                        FleetEvent::Put(doc) => {
                            f.get_or_insert_with(BTreeMap::new)
                                .insert(doc.name.clone(), doc);
                        }
                        FleetEvent::Delete(name) => {
                            if let Some(m) = f.as_mut() {
                                m.remove(&name);
                            }
                        }
                    }
                }
                wake.notify_one();
            }
        });
        let ooms = self.ooms.clone();
        let wake = self.wake.clone();
        let mut events = self.runtime.events();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match &event {
                    RuntimeEvent::Oom { id } => {
                        lock(&ooms).insert(id.clone());
                    }
                    RuntimeEvent::Exit { id, code, .. } => {
                        tracing::info!(id = %id, code, "instance exited");
                    }
                    RuntimeEvent::Resync => {}
                }
                wake.notify_one();
            }
        });
    }

    /// A fleet document parsed and validated for this node: (fleet, replicas here), or the
    /// errors. Parsed once per revision, not once per pass.
    fn evaluate(&mut self, doc: &FleetDoc) -> Parsed {
        if let Some((revision, parsed)) = self.parsed.get(&doc.name)
            && *revision == doc.revision
        {
            return parsed.clone();
        }
        let parsed = self.parse(doc);
        self.parsed
            .insert(doc.name.clone(), (doc.revision, parsed.clone()));
        parsed
    }

    fn parse(&self, doc: &FleetDoc) -> Parsed {
        let ctx = Context {
            sockets: self.cfg.sockets,
        };
        let fleet = fleet_api::parse_fleet(&doc.value, &ctx).map_err(|errs| {
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        if fleet.name() != doc.name {
            return Err(format!(
                "metadata.name {:?} does not match the key's name {:?}",
                fleet.name(),
                doc.name
            ));
        }
        let selected = fleet
            .spec
            .node_selector
            .iter()
            .all(|(k, v)| self.cfg.labels.get(k) == Some(v));
        let replicas = if selected {
            fleet.spec.replicas.count(self.cfg.sockets)
        } else {
            0
        };
        Ok((fleet, replicas))
    }

    /// A fleet this node runs (or could run: `replicas` may be 0), with its image resolved.
    async fn admitted(&mut self, doc: &FleetDoc, mut fleet: OllamaFleet, replicas: u32) -> Eval {
        // The hash is of the manifest as written: a change of the agent's defaults rolls
        // nothing out (as a Kubernetes LimitRange applies when a pod is created).
        let written = fleet.spec.clone();
        fleet.spec = self.cfg.policy.effective(&fleet.spec);
        let name = fleet
            .spec
            .image_ref()
            .map(|r| r.to_string())
            .unwrap_or_default();
        let changed = self
            .last_valid
            .get(&doc.name)
            .is_none_or(|f| f.spec != fleet.spec);
        let (image, image_error) = if replicas == 0 {
            (None, None)
        } else {
            let policy = fleet.spec.image_pull_policy;
            match self
                .images
                .ensure(&name, policy, doc.revision, changed)
                .await
            {
                crate::images::Resolution::Ready(i) => (Some(i), None),
                crate::images::Resolution::Waiting(m) => (None, Some(m)),
            }
        };
        // Under `Always` a new digest of the tag is a change that rolls out; under
        // `IfNotPresent`/`Never` what runs keeps running when the tag moves locally (as in
        // Kubernetes), so the digest is not part of the hash.
        let digest = match fleet.spec.image_pull_policy {
            fleet_api::PullPolicy::Always => image.as_ref().map_or("", |i| i.digest.as_str()),
            _ => "",
        };
        let hash = spec_hash(&written, digest);
        Eval::Run {
            fleet: Box::new(fleet),
            replicas,
            hash,
            image,
            image_error,
            request: written.resources.memory.map(fleet_api::Quantity::bytes),
            cut: None,
        }
    }

    /// Admission across the fleets this node runs: later fleets whose ports overlap an
    /// earlier one's are refused; fleets that ask for memory run as many instances as fit.
    fn admit_across(
        &self,
        evals: &mut BTreeMap<String, (i64, Eval)>,
        created: &HashMap<String, i64>,
        labelled: &[(&fleet_runtime::Observed, build::InstanceLabels)],
    ) {
        let running = |name: &str| {
            labelled
                .iter()
                .filter(|(_, l)| l.fleet == name)
                .map(|(_, l)| l.slot + 1)
                .max()
                .unwrap_or(0)
        };
        let claims: Vec<policy::Claim<'_>> = evals
            .iter()
            .filter_map(|(name, (_, eval))| match eval {
                Eval::Run {
                    fleet,
                    replicas,
                    request,
                    ..
                } if *replicas > 0 => Some(policy::Claim {
                    name,
                    created: created.get(name).copied().unwrap_or(i64::MAX),
                    spec: &fleet.spec,
                    memory: *request,
                    replicas: *replicas,
                    running: running(name),
                }),
                _ => None,
            })
            .collect();
        let verdicts = policy::admit_all(&claims, &self.cfg.policy, self.host.memory());
        drop(claims);
        for (name, (admitted, refusal)) in verdicts {
            let (Some(refusal), Some((_, eval))) = (refusal, evals.get_mut(&name)) else {
                continue;
            };
            if refusal.partial() {
                if let Eval::Run { replicas, cut, .. } = eval {
                    *replicas = admitted;
                    *cut = Some(refusal);
                }
                continue;
            }
            let placeholder = Eval::Invalid(String::new());
            if let Eval::Run {
                fleet, replicas, ..
            } = std::mem::replace(eval, placeholder)
            {
                *eval = Eval::Refused {
                    fleet,
                    replicas,
                    refusal,
                };
            }
        }
    }

    async fn reconcile(&mut self) -> Result<Option<SystemTime>, String> {
        let now = clock::now();
        // Slots with work in flight are taken before observing: an action that finishes while
        // we list may have left a half-made container in the listing (created, not yet
        // started), which must not be mistaken for one that failed to start.
        let busy_before = self.exec.busy();
        let observed = match self.runtime.list().await {
            Ok(o) => o,
            Err(e) => {
                self.set_up(false, None);
                return Err(format!("cannot list containers: {e}"));
            }
        };
        let docs = lock(&self.fleets).clone();

        // Evaluate each fleet for this node.
        let mut evals: BTreeMap<String, (i64, Eval)> = BTreeMap::new();
        let mut created: HashMap<String, i64> = HashMap::new();
        for doc in docs.iter().flat_map(|d| d.values()) {
            created.insert(doc.name.clone(), doc.created);
            let eval = match self.evaluate(doc) {
                Err(e) => Eval::Invalid(e),
                Ok((fleet, _)) if fleet.spec.paused => Eval::Paused(Box::new(fleet)),
                Ok((mut fleet, replicas)) if replicas > 0 => {
                    match self.cfg.policy.admit(&fleet.spec, &*self.host) {
                        Err(refusal) => {
                            fleet.spec = self.cfg.policy.effective(&fleet.spec);
                            Eval::Refused {
                                fleet: Box::new(fleet),
                                replicas,
                                refusal,
                            }
                        }
                        Ok(()) => self.admitted(doc, fleet, replicas).await,
                    }
                }
                Ok((fleet, replicas)) => self.admitted(doc, fleet, replicas).await,
            };
            if let Eval::Run { fleet, .. } | Eval::Paused(fleet) | Eval::Refused { fleet, .. } =
                &eval
            {
                self.last_valid.insert(doc.name.clone(), (**fleet).clone());
            }
            evals.insert(doc.name.clone(), (doc.revision, eval));
        }
        if docs.is_some() {
            self.last_valid.retain(|name, _| evals.contains_key(name));
            self.parsed.retain(|name, _| evals.contains_key(name));
        }

        // What runs, and how ready it is: probes, the node's model cache, warm-ups.
        let live: HashSet<&str> = observed.iter().map(|o| o.id.as_str()).collect();
        lock(&self.ooms).retain(|id| live.contains(id.as_str()));
        let ooms = lock(&self.ooms).clone();
        let labelled: Vec<(&fleet_runtime::Observed, build::InstanceLabels)> = observed
            .iter()
            .filter_map(|o| Some((o, build::parse_labels(&o.labels)?)))
            .collect();
        self.admit_across(&mut evals, &created, &labelled);
        self.graces = labelled
            .iter()
            .filter_map(|(o, l)| Some((o.id.clone(), l.grace?)))
            .collect();
        self.host_ips = labelled
            .iter()
            .filter_map(|(o, l)| Some((o.id.clone(), l.host_ip?)))
            .collect();
        let gates = self.model_gates(&labelled);
        self.sample_memory(&labelled).await;
        let (instances, messages, warm_targets, unsettled) =
            self.readiness(labelled, &gates, &ooms);
        self.warmer.sync(warm_targets);
        if !self.settled && (unsettled == 0 || self.started.elapsed() >= SETTLE_LIMIT) {
            tracing::info!(
                unsettled,
                "the readiness of adopted instances is known; publishing status"
            );
            self.settled = true;
        }

        // Plan.
        let targets: Vec<Target<'_>> = evals
            .iter()
            .map(|(name, (_, eval))| Target {
                name,
                desired: match eval {
                    Eval::Run {
                        fleet,
                        replicas,
                        hash,
                        image,
                        ..
                    } => Desired::Run {
                        spec: &fleet.spec,
                        replicas: *replicas,
                        hash,
                        can_create: image.is_some(),
                    },
                    Eval::Paused(_) | Eval::Invalid(_) | Eval::Refused { .. } => Desired::Keep,
                },
            })
            .collect();
        let mut busy = self.exec.busy();
        for (k, f) in busy_before {
            busy.entry(k).or_insert(f);
        }
        let terminating = self.exec.terminating();
        let plan = planner::plan(&planner::Input {
            fleets: docs.as_ref().map(|_| targets.as_slice()),
            instances: &instances,
            busy: &busy,
            terminating: &terminating,
            now,
        });
        drop(targets);

        // Act: first what starts instances; then, once the instances about to stop are out of
        // the endpoints (the view and the status key), what stops them.
        let node = NodeCtx {
            sockets: self.cfg.sockets,
            topology: self.cfg.topology.clone(),
            cgroup_parent: self.cfg.cgroup_parent.clone(),
            nofile: Some(self.cfg.nofile),
        };
        let (stopping, starting): (Vec<&Action>, Vec<&Action>) =
            plan.actions.iter().partition(|a| a.stops().is_some());
        for action in starting {
            self.submit(action, &evals, &node, now);
        }

        // Probe what runs.
        let targets: Vec<prober::Target> = instances
            .iter()
            .filter(|i| i.is_running())
            .filter_map(|i| {
                let spec = &self.last_valid.get(&i.fleet)?.spec;
                let base = self.base_of(spec, &i.id, i.port);
                Some(prober::Target {
                    id: i.id.clone(),
                    url: format!("{base}{}", spec.probes.readiness.path),
                    probe: spec.probes.readiness.clone(),
                    liveness: Some((
                        format!("{base}{}", spec.probes.liveness.path),
                        spec.probes.liveness.clone(),
                    )),
                })
            })
            .collect();
        self.prober.sync(targets);

        // Report.
        let mut leaving = terminating;
        leaving.extend(
            stopping
                .iter()
                .filter_map(|a| a.stops())
                .map(str::to_string),
        );
        let statuses = self.statuses(&evals, &instances, &plan, &leaving, &messages, &gates);
        let endpoints = self.endpoints(&instances, &statuses);
        // Until the readiness of what runs is known, the last agent's status stays (it expires
        // with its lease) rather than being replaced by "not ready" out of ignorance.
        if self.settled {
            self.view
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .endpoints = endpoints;
        }
        let node_info = self.node_info().await;
        let seq = self.publisher.publish(Report {
            node: Some(node_info),
            statuses: self.settled.then(|| statuses.clone()),
        });
        // Load balancers watching the status keys learn that an instance leaves before it
        // stops: wait (briefly) for that write, unless the store is away. An instance that has
        // exited already (a crash) serves nothing: replacing it never waits.
        let serving: HashSet<&str> = instances
            .iter()
            .filter(|i| i.is_running() && (i.ready || i.was_ready))
            .map(|i| i.id.as_str())
            .collect();
        let stops_serving = stopping
            .iter()
            .any(|a| a.stops().is_some_and(|id| serving.contains(id)));
        if stops_serving
            && self.settled
            && self.publisher.store_up()
            && !self.publisher.written(seq, STOP_WAIT).await
        {
            tracing::debug!("status not written within {STOP_WAIT:?}; stopping anyway");
        }
        for action in stopping {
            self.submit(action, &evals, &node, now);
        }
        self.set_up(true, Some(self.publisher.store_up()));
        {
            let mut v = self.view.write().unwrap_or_else(|p| p.into_inner());
            v.statuses = statuses;
            v.fleets_known = docs.is_some();
            v.actions = self.exec.counts();
            v.status_writes = self.publisher.writes();
            v.pulls = self.images.stats();
            v.models = self.models.stats();
            v.rotations = self.rotations.clone();
            v.restarts = BTreeMap::new();
            for i in &instances {
                *v.restarts.entry(i.fleet.clone()).or_default() += u64::from(i.carry.restarts);
            }
        }
        let mut wake = plan.wake_at;
        let mut wake_at = |t: SystemTime| wake = Some(wake.map_or(t, |w: SystemTime| w.min(t)));
        if self
            .last_valid
            .values()
            .any(|f| f.spec.rotation.max_memory.is_some())
        {
            wake_at(clock::now() + MEMORY_PERIOD);
        }
        Ok(wake)
    }

    /// Each observed instance with what decides its readiness: the probes, the node's model
    /// gate and its warm-up. Also returns the status messages of instances that wait, the
    /// instances to warm, and how many adopted instances are not known yet.
    fn readiness(
        &self,
        labelled: Vec<(&fleet_runtime::Observed, build::InstanceLabels)>,
        gates: &HashMap<String, Gate>,
        ooms: &HashSet<String>,
    ) -> (
        Vec<Instance>,
        HashMap<String, String>,
        Vec<WarmTarget>,
        usize,
    ) {
        let mut messages: HashMap<String, String> = HashMap::new();
        let mut warm_targets = Vec::new();
        // Adopted instances whose readiness this agent does not know yet.
        let mut unsettled = 0usize;
        let instances: Vec<Instance> = labelled
            .into_iter()
            .map(|(o, l)| {
                let probe = self.prober.state(&o.id);
                let running = o.state == fleet_runtime::TaskState::Running;
                let spec = self.last_valid.get(&l.fleet).map(|f| &f.spec);
                // The model this instance serves: its own (an instance of a previous spec keeps
                // its model while a new one is pulled), else the spec's.
                let model = l
                    .model
                    .clone()
                    .or_else(|| spec.map(|s| s.model.clone()))
                    .unwrap_or_default();
                let gate = gates
                    .get(&format!("#{}", o.id))
                    .or_else(|| gates.get(&gate_key(&l.fleet, &model)))
                    .cloned()
                    .unwrap_or(Gate::Open(SystemTime::UNIX_EPOCH));
                let warm = match (&gate, spec) {
                    (Gate::Waiting(why), _) => {
                        messages.insert(o.id.clone(), why.clone());
                        false
                    }
                    (Gate::Open(_), Some(spec)) if spec.models.warm => {
                        // Kept while the probe fails for a while, so a warm instance that
                        // stops answering is Unready, not Starting again.
                        if running && probe.was_ready {
                            // The model made for its thread count, so that it keeps what it
                            // loaded when the model's own name gets another count.
                            let loads = l.threads.map_or_else(
                                || model.clone(),
                                |t| crate::models::derived_name(&model, t),
                            );
                            warm_targets.push(WarmTarget {
                                id: o.id.clone(),
                                base: self.base_of(spec, &o.id, l.port),
                                model: loads,
                            });
                        }
                        match self.warmer.state(&o.id) {
                            Some(Warmth::Warm) => true,
                            Some(Warmth::Failed(e)) => {
                                messages.insert(o.id.clone(), format!("loading the model: {e}"));
                                false
                            }
                            _ => {
                                if probe.ready {
                                    messages.insert(o.id.clone(), format!("loading model {model}"));
                                }
                                false
                            }
                        }
                    }
                    (Gate::Open(_), _) => true,
                };
                // (Creation times are whole seconds.)
                let adopted = l.created_at + Duration::from_secs(1) < self.started_at;
                let warming = spec.is_some_and(|s| s.models.warm)
                    && probe.ready
                    && !matches!(
                        self.warmer.state(&o.id),
                        Some(Warmth::Warm | Warmth::Failed(_))
                    );
                // An adopted instance not yet probed, or probed but not yet confirmed warm
                // again, is unknown (until the agent settles): not unready.
                let unknown = running && adopted && (!probe.probed || warming);
                if unknown {
                    unsettled += 1;
                }
                let startup_since = match gate {
                    _ if !probe.was_ready => Some(l.created_at),
                    Gate::Open(since) => Some(since.max(l.created_at)),
                    Gate::Waiting(_) => None,
                };
                Instance {
                    id: o.id.clone(),
                    fleet: l.fleet,
                    slot: l.slot,
                    port: l.port,
                    spec_hash: l.spec_hash,
                    created_at: l.created_at,
                    carry: l.carry,
                    state: o.state,
                    exit_code: o.exit_code,
                    exited_at: o.exited_at,
                    ready: probe.ready && running && warm,
                    was_ready: probe.was_ready && warm,
                    oom: ooms.contains(&o.id),
                    startup_since,
                    unhealthy: probe.unhealthy && running,
                    memory: self.memory.get(&o.id).map(|(_, m)| *m),
                    known: probe.probed && (self.settled || !unknown),
                    model_pending: matches!(gate, Gate::Waiting(_)),
                }
            })
            .collect();
        (instances, messages, warm_targets, unsettled)
    }

    fn submit(
        &mut self,
        action: &Action,
        evals: &BTreeMap<String, (i64, Eval)>,
        node: &NodeCtx,
        now: SystemTime,
    ) {
        // An instance starting now would walk a cache the agent is writing into (Ollama exits
        // when a blob vanishes under that walk): its start waits for the write to end (which
        // wakes the loop).
        let starts_on_cache = match action {
            Action::Create { fleet, .. }
            | Action::Surge { fleet, .. }
            | Action::Replace { fleet, .. } => self
                .last_valid
                .get(fleet)
                .map(|f| f.spec.models.host_path.clone())
                .filter(|c| !c.is_empty()),
            Action::Remove { .. } => None,
        };
        if let Some(cache) = starts_on_cache
            && self.models.writing(&cache)
        {
            tracing::debug!(slot = %action.slot_key(), cache = %cache, "start deferred: the model cache is being written");
            return;
        }
        let Some(op) = self.op_for(action, evals, node, now) else {
            return;
        };
        tracing::info!(slot = %action.slot_key(), action = ?action, "acting");
        if self.exec.submit(action.slot_key(), op)
            && let (
                Some(why @ (Why::MaxAge | Why::MaxMemory)),
                Action::Surge { fleet, .. } | Action::Replace { fleet, .. },
            ) = (action.why(), action)
        {
            *self
                .rotations
                .entry((fleet.clone(), why.as_str().to_string()))
                .or_default() += 1;
        }
    }

    /// The model gates: for each fleet and each model its instances serve (keyed by
    /// [`gate_key`]; instances of a previous spec may serve another model than `spec.model`), or
    /// for each instance (keyed by `#` and its container ID) of fleets without a shared cache.
    /// On a shared cache, every fleet and instance that uses a model adds to one need: the thread
    /// counts its instances run with (one derived model each), the first fleet's (by name)
    /// thread count on the model's own name, and a pull when any fleet asks for one.
    fn model_gates(
        &self,
        labelled: &[(&fleet_runtime::Observed, build::InstanceLabels)],
    ) -> HashMap<String, Gate> {
        let mut gates = HashMap::new();
        // Ollama walks blobs/ when it starts and exits when a file vanishes under it (as at the
        // end of a pull): nothing is written into a cache while one of its instances starts.
        let mut starting: HashSet<&str> = HashSet::new();
        for (o, l) in labelled {
            let Some(f) = self.last_valid.get(&l.fleet) else {
                continue;
            };
            let young = clock::now()
                .duration_since(l.created_at)
                .is_ok_and(|age| age < STARTUP_QUIET);
            if o.state == fleet_runtime::TaskState::Running
                && young
                && !self.prober.state(&o.id).was_ready
                && !f.spec.models.host_path.is_empty()
            {
                starting.insert(f.spec.models.host_path.as_str());
            }
        }
        // (cache, model key) -> the merged need, the instances to work through, and the fleets
        // (with the model as each names it) whose gate it is.
        #[derive(Default)]
        struct Shared {
            need: Option<Need>,
            via: Vec<(u32, String)>,
            users: Vec<(String, String)>,
        }
        let mut shared: BTreeMap<(String, String), Shared> = BTreeMap::new();
        let mut fleets: Vec<(&String, &OllamaFleet)> = self.last_valid.iter().collect();
        fleets.sort_by_key(|(name, _)| name.as_str());
        for (name, fleet) in fleets {
            let spec = &fleet.spec;
            let spec_threads = crate::models::threads(spec, &self.cfg.topology);
            let model_of =
                |l: &build::InstanceLabels| l.model.clone().unwrap_or(spec.model.clone());
            // Without pull and warm-up, readiness does not wait for the model (the thread count
            // is still set, in the background, once the model is there).
            let waits = |gate: Gate| {
                if spec.models.pull || spec.models.warm {
                    gate
                } else {
                    Gate::Open(SystemTime::UNIX_EPOCH)
                }
            };
            let mine: Vec<&(&fleet_runtime::Observed, build::InstanceLabels)> =
                labelled.iter().filter(|(_, l)| &l.fleet == name).collect();
            let answering = |o: &fleet_runtime::Observed| {
                o.state == fleet_runtime::TaskState::Running && self.prober.state(&o.id).ready
            };
            let cache = spec.models.host_path.clone();
            if cache.is_empty() {
                // Each instance has its own models directory: its own need.
                for (o, l) in &mine {
                    let via: Vec<String> = if answering(o) {
                        vec![self.base_of(spec, &o.id, l.port)]
                    } else {
                        Vec::new()
                    };
                    let need = Need::new(&o.id, &model_of(l), spec.models.pull, l.threads);
                    gates.insert(format!("#{}", o.id), waits(self.models.gate(&need, &via)));
                }
                continue;
            }
            let mut uses: Vec<(String, Option<u32>)> =
                mine.iter().map(|(_, l)| (model_of(l), l.threads)).collect();
            uses.push((spec.model.clone(), spec_threads));
            for (model, threads) in uses {
                let key = (cache.clone(), fleet_api::ModelRef::key(&model));
                let entry = shared.entry(key).or_default();
                let need = entry.need.get_or_insert_with(|| Need {
                    cache: cache.clone(),
                    model: model.clone(),
                    pull: false,
                    threads: Default::default(),
                    base_threads: None,
                });
                let users = &mut entry.users;
                need.pull |= spec.models.pull;
                need.threads.extend(threads);
                if need.base_threads.is_none() && crate::ollama::same_model(&model, &spec.model) {
                    need.base_threads = spec_threads;
                }
                if !users.iter().any(|(f, m)| f == name && m == &model) {
                    users.push((name.clone(), model));
                }
            }
            for (o, l) in &mine {
                if answering(o) {
                    let key = (cache.clone(), fleet_api::ModelRef::key(&model_of(l)));
                    if let Some(entry) = shared.get_mut(&key) {
                        entry.via.push((l.slot, self.base_of(spec, &o.id, l.port)));
                    }
                }
            }
        }
        for ((cache, _), entry) in shared {
            let Shared {
                need: Some(need),
                mut via,
                users,
            } = entry
            else {
                continue;
            };
            via.sort();
            let via: Vec<String> = if starting.contains(cache.as_str()) {
                // No new work on this cache now (work under way goes on).
                Vec::new()
            } else {
                via.into_iter().map(|(_, url)| url).collect()
            };
            let gate = self.models.gate(&need, &via);
            for (fleet, model) in users {
                let waits = self
                    .last_valid
                    .get(&fleet)
                    .is_some_and(|f| f.spec.models.pull || f.spec.models.warm);
                let gate = if waits {
                    gate.clone()
                } else {
                    Gate::Open(SystemTime::UNIX_EPOCH)
                };
                gates.insert(gate_key(&fleet, &model), gate);
            }
        }
        gates
    }

    /// Measures the memory of running instances of fleets with `rotation.maxMemory`, each at
    /// most every [`MEMORY_PERIOD`].
    async fn sample_memory(
        &mut self,
        labelled: &[(&fleet_runtime::Observed, build::InstanceLabels)],
    ) {
        let ids: HashSet<&str> = labelled.iter().map(|(o, _)| o.id.as_str()).collect();
        self.memory.retain(|id, _| ids.contains(id.as_str()));
        for (o, l) in labelled {
            let watched = self
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

    fn set_up(&self, containerd: bool, store: Option<bool>) {
        let mut v = self.view.write().unwrap_or_else(|p| p.into_inner());
        v.containerd_up = containerd;
        if let Some(s) = store {
            v.store_up = s;
        }
    }

    /// An instance's `http://ip:port`: the address it was made with, else the spec's.
    fn base_of(&self, spec: &fleet_api::FleetSpec, id: &str, port: u16) -> String {
        match self.host_ips.get(id) {
            Some(ip) => base_url_at(*ip, port),
            None => base_url(spec, port),
        }
    }

    /// This node's record (containerd's version asked for at most once a minute).
    async fn node_info(&mut self) -> NodeInfo {
        let stale = self
            .containerd_version
            .as_ref()
            .is_none_or(|(at, v)| v.is_empty() || at.elapsed() >= self.cfg.node_heartbeat);
        if stale {
            let v = self.runtime.version().await.unwrap_or_default();
            self.containerd_version = Some((Instant::now(), v));
        }
        NodeInfo {
            name: self.cfg.node.clone(),
            labels: self.cfg.labels.clone(),
            capacity: Capacity {
                sockets: self.cfg.sockets,
                cpus: self.cfg.topology.cpus(),
                memory_bytes: self.host.memory(),
            },
            versions: Versions {
                agent: self.cfg.version.clone(),
                containerd: self
                    .containerd_version
                    .as_ref()
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default(),
                runtime: "io.containerd.runc.v2".into(),
            },
            heartbeat: String::new(),
        }
    }

    fn op_for(
        &mut self,
        action: &Action,
        evals: &BTreeMap<String, (i64, Eval)>,
        node: &NodeCtx,
        now: SystemTime,
    ) -> Option<Op> {
        // The fleet's grace when it is there to say; else (deleted, broken) the instance's own.
        let graces = &self.graces;
        let grace = |fleet: &str, id: &str| match evals.get(fleet) {
            Some((
                _,
                Eval::Run { fleet, .. } | Eval::Paused(fleet) | Eval::Refused { fleet, .. },
            )) => fleet.spec.termination_grace_period.std(),
            _ => graces.get(id).copied().unwrap_or(DEFAULT_GRACE),
        };
        let mut new_spec = |fleet: &str, slot: u32, port: u16, carry: &build::Carry| {
            let (
                _,
                Eval::Run {
                    fleet: f,
                    hash,
                    image: Some(image),
                    ..
                },
            ) = evals.get(fleet)?
            else {
                return None;
            };
            self.salt += 1;
            let id = build::new_id(fleet, slot, now, self.salt);
            Some(Box::new(build::container_spec(
                fleet,
                &f.spec,
                hash,
                image,
                node,
                (slot, port),
                id,
                carry,
                now,
            )))
        };
        match action {
            Action::Create {
                fleet,
                slot,
                port,
                carry,
            } => new_spec(fleet, *slot, *port, carry).map(Op::Create),
            Action::Surge {
                fleet,
                slot,
                port,
                carry,
                ..
            } => new_spec(fleet, *slot, *port, carry).map(Op::Create),
            Action::Replace {
                old,
                fleet,
                slot,
                port,
                carry,
                ..
            } => {
                let new = new_spec(fleet, *slot, *port, carry)?;
                Some(Op::Replace {
                    old: old.clone(),
                    grace: grace(fleet, old),
                    new,
                })
            }
            Action::Remove { id, fleet, .. } => Some(Op::Remove {
                id: id.clone(),
                grace: grace(fleet, id),
            }),
        }
    }

    fn statuses(
        &self,
        evals: &BTreeMap<String, (i64, Eval)>,
        instances: &[Instance],
        plan: &planner::Plan,
        terminating: &HashSet<String>,
        messages: &HashMap<String, String>,
        gates: &HashMap<String, Gate>,
    ) -> Vec<FleetStatus> {
        let mut by_fleet: BTreeMap<&str, Vec<&Instance>> = BTreeMap::new();
        for i in instances {
            by_fleet.entry(&i.fleet).or_default().push(i);
        }
        let mut names: Vec<&str> = evals.keys().map(String::as_str).collect();
        names.extend(by_fleet.keys().copied());
        names.sort_unstable();
        names.dedup();
        let mut out = Vec::new();
        for name in names {
            let mine = by_fleet.get(name).cloned().unwrap_or_default();
            let mut inst: Vec<InstanceStatus> = mine
                .iter()
                .map(|i| {
                    let phase = status::phase(
                        i,
                        terminating.contains(&i.id),
                        plan.backing_off.contains(&i.id),
                    );
                    let message = self
                        .exec
                        .last_error(&planner::slot_key(&i.fleet, i.slot))
                        .or_else(|| {
                            (phase == Phase::Starting || phase == Phase::Pending)
                                .then(|| messages.get(&i.id).cloned())
                                .flatten()
                        });
                    status::instance_status(i, phase, message)
                })
                .collect();
            // Slots waiting for their image show as Pending, with the reason.
            if let Some((
                _,
                Eval::Run {
                    fleet,
                    replicas,
                    image: None,
                    image_error: Some(why),
                    ..
                },
            )) = evals.get(name)
            {
                for slot in 0..*replicas {
                    if !inst.iter().any(|i| i.slot == slot) {
                        inst.push(status::pending_slot(
                            slot,
                            crate::build::port(&fleet.spec, slot),
                            why,
                        ));
                    }
                }
            }
            let (generation, desired, hash) = match evals.get(name) {
                None => (0, 0, None),
                Some((generation, Eval::Invalid(_))) => (*generation, inst.len() as u32, None),
                Some((generation, Eval::Paused(f))) => {
                    (*generation, f.spec.replicas.count(self.cfg.sockets), None)
                }
                Some((generation, Eval::Refused { replicas, .. })) => {
                    (*generation, *replicas, None)
                }
                Some((generation, Eval::Run { replicas, hash, .. })) => {
                    (*generation, *replicas, Some(hash.as_str()))
                }
            };
            // A fleet this node does not run, with nothing left of it here, has no status here.
            if desired == 0
                && inst.is_empty()
                && matches!(evals.get(name), Some((_, Eval::Run { .. })) | None)
            {
                continue;
            }
            let mut summary = status::summarize(
                name,
                &self.cfg.node,
                generation,
                desired,
                hash,
                inst,
                Vec::new(),
            );
            let current = match evals.get(name) {
                Some((_, Eval::Run { fleet, .. })) => gate_key(name, &fleet.spec.model),
                _ => String::new(),
            };
            let waiting = match gates.get(&current) {
                Some(Gate::Waiting(why)) if desired > 0 => Some(why.as_str()),
                _ => None,
            };
            summary.conditions = conditions(
                evals.get(name).map(|(_, e)| e),
                &summary,
                plan.stalled.get(name).map(String::as_str),
                waiting,
                &self.cfg.policy,
            );
            out.push(summary);
        }
        out
    }

    fn endpoints(&self, instances: &[Instance], statuses: &[FleetStatus]) -> Vec<Endpoint> {
        let phases: HashMap<&str, &InstanceStatus> = statuses
            .iter()
            .flat_map(|s| s.instances.iter())
            .map(|i| (i.id.as_str(), i))
            .collect();
        instances
            .iter()
            .filter_map(|i| {
                let s = phases.get(i.id.as_str())?;
                // The address it was made with (a new hostIP rolls out), else the spec's.
                let host = match self.host_ips.get(&i.id) {
                    Some(ip) => ip.to_string(),
                    None => self.last_valid.get(&i.fleet).map_or_else(
                        || "127.0.0.1".to_string(),
                        |f| f.spec.network.host_ip.to_string(),
                    ),
                };
                let address = if host.contains(':') {
                    format!("[{host}]:{}", i.port)
                } else {
                    format!("{host}:{}", i.port)
                };
                Some(Endpoint {
                    fleet: i.fleet.clone(),
                    id: i.id.clone(),
                    slot: i.slot,
                    address,
                    phase: s.phase,
                    ready: s.ready,
                    spec_hash: i.spec_hash.clone(),
                })
            })
            .collect()
    }
}
