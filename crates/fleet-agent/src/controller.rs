//! The controller: one level-triggered loop per node, which only orchestrates.
//!
//! Every pass observes afresh (containerd's containers, the fleets last seen in etcd, the
//! probes), evaluates each fleet for this node ([`crate::evaluate`]), works out readiness and
//! the model cache's work ([`crate::readiness`]), asks the pure planner what to do
//! ([`crate::planner`]), hands the actions to the executor, points the prober and the warmer at
//! the running instances, and publishes status ([`crate::status::report`], [`crate::publish`]).
//! Watch events, containerd events, probe changes and finished actions only wake the loop; a
//! resync timer wakes it anyway.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use fleet_api::{Capacity, FleetSpec, NodeInfo, Versions};
use fleet_runtime::clock::{self, Instant};
use fleet_runtime::{Observed, Runtime, RuntimeEvent};
use fleet_store::{FleetDoc, FleetEvent, Store};
use futures::StreamExt;
use tokio::sync::Notify;

use crate::build::{self, InstanceLabels, NodeCtx};
use crate::evaluate::{Eval, Evals, Fleets};
use crate::executor::Executor;
use crate::gateway::{Gateway, Seen};
use crate::lock;
use crate::models::{Gate, GateKey, ModelCache, Warmer};
use crate::ollama::{HttpOllama, Ollama};
use crate::planner::{self, Action, Desired, Target, Why};
use crate::policy::{self, Host};
use crate::prober::{self, Probes};
use crate::publish::{PublishConfig, Publisher, Report};
use crate::readiness::{self, Snapshot};
use crate::said::Said;

mod measure;
use crate::status::report::{Pass, fleet_statuses};

pub use crate::act::DEFAULT_GRACE;
pub use crate::config::AgentConfig;
pub use crate::view::{Endpoint, View};

/// How long a starting agent waits at most to learn the readiness of the instances it adopts
/// before it publishes status.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(15);

/// How long a pass waits for the status write that announces instances leaving before it stops
/// them (only while the store answers).
pub const STOP_WAIT: Duration = Duration::from_secs(2);

/// How often the memory of instances with `rotation.maxMemory` is measured.
pub const MEMORY_PERIOD: Duration = Duration::from_secs(5);

/// Our containers, with their parsed labels.
type Labelled<'a> = [(&'a Observed, InstanceLabels)];

/// The agent.
pub struct Agent<R: Runtime, S: Store> {
    cfg: AgentConfig,
    runtime: Arc<R>,
    store: Arc<S>,
    exec: Executor<R>,
    prober: Arc<dyn Probes>,
    wake: Arc<Notify>,
    /// The fleet documents as the watch last delivered them (`None` until the first list).
    docs: Arc<Mutex<Option<BTreeMap<String, FleetDoc>>>>,
    ooms: Arc<Mutex<HashSet<String>>>,
    images: crate::images::Images<R>,
    models: ModelCache,
    warmer: Warmer,
    /// Memory of instances of fleets with `rotation.maxMemory`, and when it was measured.
    memory: HashMap<String, (Instant, u64)>,
    rotations: BTreeMap<(String, Why), u64>,
    /// When this agent started: instances created before were adopted.
    started: Instant,
    started_at: SystemTime,
    /// The readiness of adopted instances is known (status is published from then on).
    settled: bool,
    /// The fleets as last evaluated.
    fleets: Fleets,
    publisher: Publisher,
    view: Arc<RwLock<View>>,
    salt: u64,
    /// containerd's version, and when it was asked.
    containerd_version: Option<(Instant, String)>,
    /// Each instance's own grace (from its label), for instances whose fleet cannot say.
    graces: HashMap<String, Duration>,
    /// What admission asks of the host (symlinks, addresses, cpus, memory).
    host: Arc<dyn Host + Send + Sync>,
    /// The node gateway, when the agent serves (`--serve`).
    gateway: Option<Arc<Gateway>>,
    /// Said once, until it changes: each fleet's refusal reason (warned), the host files
    /// missing, and whether the host bounds swap.
    said: Said,
    /// Exited instances whose cgroup was read for an OOM kill the events did not tell.
    oom_checked: HashSet<String>,
    /// The fleets this node last saw, kept for a start while the store is away.
    recall: Option<crate::recall::Recall>,
}

impl<R: Runtime, S: Store> std::fmt::Debug for Agent<R, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.cfg.node)
            .finish_non_exhaustive()
    }
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
        let recall = cfg.recall.clone().map(crate::recall::Recall::new);
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
            docs: Arc::new(Mutex::new(None)),
            ooms: Arc::new(Mutex::new(HashSet::new())),
            fleets: Fleets::default(),
            salt: 0,
            containerd_version: None,
            graces: HashMap::new(),
            host: Arc::new(policy::RealHost),
            gateway: None,
            said: Said::default(),
            oom_checked: HashSet::new(),
            recall,
        }
    }

    /// Routes requests through `gateway` (`--serve`): it learns the instances each pass, and
    /// every instance that stops is drained through it first.
    pub fn with_gateway(mut self, gateway: Arc<Gateway>) -> Agent<R, S> {
        self.exec = self.exec.with_drain(gateway.clone());
        self.gateway = Some(gateway);
        self
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
        if let Some(recall) = &mut self.recall {
            let docs = recall.load().await;
            self.fleets.recall(&docs, &self.cfg);
            if !docs.is_empty() {
                tracing::info!(
                    fleets = docs.len(),
                    "the fleets this node last saw are recalled: what runs is probed and served before the store answers"
                );
            }
        }
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
        let fleets = self.docs.clone();
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

    /// One pass: observe, evaluate, plan, act, publish. Returns when to plan again at the
    /// latest.
    async fn reconcile(&mut self) -> Result<Option<SystemTime>, String> {
        let now = clock::now();
        // Observe. Slots with work in flight are taken before listing: an action that finishes
        // while we list may have left a half-made container in the listing (created, not yet
        // started), which must not be mistaken for one that failed to start.
        let busy_before = self.exec.busy();
        let observed = match self.runtime.list().await {
            Ok(o) => o,
            Err(e) => {
                self.set_up(false, None);
                return Err(format!("cannot list containers: {e}"));
            }
        };
        let docs = lock(&self.docs).clone();
        if let (Some(recall), Some(docs)) = (&mut self.recall, &docs) {
            recall.keep(docs);
        }
        let labelled: Vec<(&Observed, InstanceLabels)> = observed
            .iter()
            .filter_map(|o| Some((o, build::parse_labels(&o.labels)?)))
            .collect();

        // Evaluate each fleet for this node, then what runs and how ready it is.
        let evals = self.evaluate(docs.as_ref(), &labelled).await;
        self.sample_memory(&labelled).await;
        self.find_unseen_ooms(&labelled).await;
        let (gates, ready) = self.readiness(&labelled, now);

        // Plan.
        let facts = self.models.facts();
        let (plan, terminating) = self.plan(
            &evals,
            docs.is_some(),
            &ready.instances,
            busy_before,
            now,
            &facts,
        );

        // Act: first what starts instances; then, once the instances about to stop are out of
        // the endpoints (the gateway, the view and the status key), what stops them.
        let (host_files, bounds_swap) = self.said.host(&*self.host);
        let node = NodeCtx {
            sockets: self.cfg.sockets,
            topology: self.cfg.topology.clone(),
            cgroup_parent: self.cfg.cgroup_parent.clone(),
            nofile: Some(self.cfg.nofile),
            bounds_swap,
            host_files,
            models: self.models.facts(),
        };
        let (stopping, starting): (Vec<&Action>, Vec<&Action>) =
            plan.actions.iter().partition(|a| a.stops().is_some());
        for action in starting {
            self.submit(action, &evals, &node, now);
        }
        self.probe(&ready.instances);
        let mut leaving = terminating;
        leaving.extend(
            stopping
                .iter()
                .filter_map(|a| a.stops())
                .map(str::to_string),
        );
        let exec = self.exec.clone();
        let statuses = fleet_statuses(&Pass {
            node: &self.cfg.node,
            sockets: self.cfg.sockets,
            policy: &self.cfg.policy,
            evals: &evals,
            instances: &ready.instances,
            plan: &plan,
            leaving: &leaving,
            messages: &ready.messages,
            gates: &gates,
            last_error: &|slot| exec.last_error(slot),
            models: &facts,
        });
        self.show(
            &evals,
            docs.is_some(),
            &ready.instances,
            &statuses,
            &leaving,
        );
        self.announce(&statuses, &ready.instances, &stopping).await;
        for action in stopping {
            self.submit(action, &evals, &node, now);
        }

        // Publish what this pass saw.
        self.set_up(true, Some(self.publisher.store_up()));
        self.record(statuses, docs.is_some(), &ready.instances);
        let mut wake = plan.wake_at;
        if self
            .fleets
            .last_valid
            .values()
            .any(|f| f.spec.rotation.max_memory.is_some())
        {
            let at = clock::now() + MEMORY_PERIOD;
            wake = Some(wake.map_or(at, |w| w.min(at)));
        }
        Ok(wake)
    }

    /// Every fleet evaluated for this node, admitted across fleets; the instances' own graces
    /// noted (for instances whose fleet cannot say).
    async fn evaluate(
        &mut self,
        docs: Option<&BTreeMap<String, FleetDoc>>,
        labelled: &Labelled<'_>,
    ) -> Evals {
        let (mut evals, created) = self
            .fleets
            .evaluate(docs, &self.cfg, &*self.host, &self.images)
            .await;
        crate::evaluate::admit_across(
            &mut evals,
            &created,
            labelled,
            &self.cfg.policy,
            self.host.memory(),
        );
        self.said.refusals(&evals, &self.cfg.policy);
        self.graces = labelled
            .iter()
            .filter_map(|(o, l)| Some((o.id.clone(), l.grace?)))
            .collect();
        evals
    }

    /// What runs and how ready it is (probes, the node's model cache, warm-ups, the gateway's
    /// watchdog); starts the model work and warm-ups due; settles the agent once it knows.
    fn readiness(
        &mut self,
        labelled: &Labelled<'_>,
        now: SystemTime,
    ) -> (HashMap<GateKey, Gate>, readiness::Readiness) {
        let live: HashSet<&str> = labelled.iter().map(|(o, _)| o.id.as_str()).collect();
        lock(&self.ooms).retain(|id| live.contains(id.as_str()));
        let ooms = lock(&self.ooms).clone();
        let ids = || labelled.iter().map(|(o, _)| o.id.clone());
        let probes = ids()
            .map(|id| (id.clone(), self.prober.state(&id)))
            .collect();
        let warmth = ids()
            .filter_map(|id| Some((id.clone(), self.warmer.state(&id)?)))
            .collect();
        let memory = self
            .memory
            .iter()
            .map(|(id, (_, m))| (id.clone(), *m))
            .collect();
        let stalled = match &self.gateway {
            Some(gw) => labelled
                .iter()
                .filter(|(o, l)| gw.stalled(&l.fleet, &o.id))
                .map(|(o, _)| o.id.clone())
                .collect(),
            None => HashSet::new(),
        };
        let snapshot = Snapshot {
            labelled,
            fleets: &self.fleets.last_valid,
            probes: &probes,
            warmth: &warmth,
            ooms: &ooms,
            memory: &memory,
            stalled: &stalled,
            settled: self.settled,
            started_at: self.started_at,
            now,
        };
        let gates = self.model_gates(&snapshot);
        let mut ready = readiness::readiness(&snapshot, &gates);
        self.warmer.sync(std::mem::take(&mut ready.warm));
        if !self.settled && (ready.unsettled == 0 || self.started.elapsed() >= SETTLE_LIMIT) {
            tracing::info!(
                unsettled = ready.unsettled,
                "the readiness of adopted instances is known; publishing status"
            );
            self.settled = true;
        }
        (gates, ready)
    }

    /// The planner's answer for this pass, and the instances being stopped right now.
    fn plan(
        &self,
        evals: &Evals,
        fleets_known: bool,
        instances: &[planner::Instance],
        busy_before: HashMap<planner::SlotKey, planner::InFlight>,
        now: SystemTime,
        facts: &HashMap<String, crate::ollama::ModelFacts>,
    ) -> (planner::Plan, HashSet<String>) {
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
                        cache_known: build::prompt_cache(
                            &fleet.spec,
                            facts.get(&fleet_api::ModelRef::key(&fleet.spec.model)),
                        ) != build::CacheRam::Pending,
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
            fleets: fleets_known.then_some(targets.as_slice()),
            instances,
            busy: &busy,
            terminating: &terminating,
            now,
        });
        (plan, terminating)
    }

    /// Points the prober at what runs.
    fn probe(&self, instances: &[planner::Instance]) {
        let targets: Vec<prober::Target> = instances
            .iter()
            .filter(|i| i.is_running())
            .filter_map(|i| {
                let spec = &self.fleets.last_valid.get(&i.labels.fleet)?.spec;
                let base = readiness::base_url(spec, i.labels.host_ip, i.labels.port);
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
    }

    /// The endpoints, in the view and the gateway (once the agent knows what is ready: until
    /// then, the last agent's status stays, and expires with its lease, rather than being
    /// replaced by "not ready" out of ignorance).
    fn show(
        &self,
        evals: &Evals,
        fleets_known: bool,
        instances: &[planner::Instance],
        statuses: &[fleet_api::FleetStatus],
        leaving: &HashSet<String>,
    ) {
        if !self.settled {
            return;
        }
        let endpoints = crate::view::endpoints(instances, statuses, |i| {
            i.labels.host_ip.or_else(|| {
                let f = self.fleets.last_valid.get(&i.labels.fleet)?;
                Some(f.spec.network.host_ip)
            })
        });
        if let Some(gw) = &self.gateway {
            let by_id: HashMap<&str, &planner::Instance> =
                instances.iter().map(|i| (i.id.as_str(), i)).collect();
            // Until the store answers, the fleets recalled (the instances they describe are
            // served; nothing is planned from them).
            let fleets: Vec<(&str, &FleetSpec)> = if fleets_known {
                evals
                    .iter()
                    .filter_map(|(name, (_, e))| Some((name.as_str(), &e.fleet()?.spec)))
                    .collect()
            } else {
                self.fleets
                    .last_valid
                    .iter()
                    .map(|(name, f)| (name.as_str(), &f.spec))
                    .collect()
            };
            let seen = endpoints.iter().filter_map(|e| {
                let spec = &self.fleets.last_valid.get(&e.fleet)?.spec;
                let l = &by_id.get(e.id.as_str())?.labels;
                Some(Seen {
                    id: &e.id,
                    fleet: &e.fleet,
                    model: l.model.as_deref().unwrap_or(&spec.model),
                    capacity: l.parallel.unwrap_or_else(|| build::parallel_of(&spec.env)),
                    url: readiness::base_url(spec, l.host_ip, l.port),
                    ready: e.ready,
                    leaving: leaving.contains(&e.id),
                })
            });
            gw.learn(fleets.into_iter(), seen);
        }
        self.view
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .endpoints = endpoints;
    }

    /// Hands the node record and the statuses to the publisher. Load balancers watching the
    /// status keys learn that an instance leaves before it stops: when a serving instance is
    /// about to stop, waits (briefly) for that write, unless the store is away. An instance that
    /// has exited already (a crash) serves nothing: replacing it never waits.
    async fn announce(
        &mut self,
        statuses: &[fleet_api::FleetStatus],
        instances: &[planner::Instance],
        stopping: &[&Action],
    ) {
        let node_info = self.node_info().await;
        if let (Some(gw), Some(n)) = (&self.gateway, self.publisher.gateways()) {
            gw.set_nodes(n);
        }
        let seq = self.publisher.publish(Report {
            node: Some(node_info),
            statuses: self.settled.then(|| statuses.to_vec()),
        });
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
    }

    /// What the HTTP endpoints show of this pass.
    fn record(
        &self,
        statuses: Vec<fleet_api::FleetStatus>,
        fleets_known: bool,
        instances: &[planner::Instance],
    ) {
        let mut v = self.view.write().unwrap_or_else(|p| p.into_inner());
        v.statuses = statuses;
        v.fleets_known = fleets_known;
        v.actions = self.exec.counts();
        v.status_writes = self.publisher.writes();
        v.pulls = self.images.stats();
        v.models = self.models.stats();
        v.rotations = self.rotations.clone();
        v.restarts = BTreeMap::new();
        for i in instances {
            *v.restarts.entry(i.labels.fleet.clone()).or_default() +=
                u64::from(i.labels.carry.restarts);
        }
    }

    /// The model gates: the model cache's answer for each piece of work
    /// ([`readiness::model_work`]), which starts the work when it is due.
    fn model_gates(&self, snapshot: &Snapshot<'_>) -> HashMap<GateKey, Gate> {
        let mut gates = HashMap::new();
        for wanted in readiness::model_work(snapshot, &self.cfg.topology) {
            let gate = self.models.gate(&wanted.need, &wanted.via);
            for (key, waits) in wanted.gates {
                let gate = if waits {
                    gate.clone()
                } else {
                    Gate::Open(SystemTime::UNIX_EPOCH)
                };
                gates.insert(key, gate);
            }
        }
        gates
    }

    fn submit(&mut self, action: &Action, evals: &Evals, node: &NodeCtx, now: SystemTime) {
        // An instance starting now would walk a cache the agent is writing into (Ollama exits
        // when a blob vanishes under that walk): its start waits for the write to end (which
        // wakes the loop).
        let starts_on_cache = match action {
            Action::Create { fleet, .. }
            | Action::Surge { fleet, .. }
            | Action::Replace { fleet, .. } => self
                .fleets
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
        let Some(op) = crate::act::op_for(action, evals, node, now, &mut self.salt, &self.graces)
        else {
            return;
        };
        tracing::info!(slot = %action.slot_key(), action = ?action, "acting");
        if self.exec.submit(action.slot_key(), action.flight(), op)
            && let (Some(why), Action::Surge { fleet, .. } | Action::Replace { fleet, .. }) =
                (action.why(), action)
            && Why::ROTATIONS.contains(&why)
        {
            *self.rotations.entry((fleet.clone(), why)).or_default() += 1;
        }
    }

    fn set_up(&self, containerd: bool, store: Option<bool>) {
        let mut v = self.view.write().unwrap_or_else(|p| p.into_inner());
        v.containerd_up = containerd;
        if let Some(s) = store {
            v.store_up = s;
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
            gateway: self.gateway.is_some(),
        }
    }
}
