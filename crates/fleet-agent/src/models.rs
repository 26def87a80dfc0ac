//! The model side of an instance's life: the node's model cache and each instance's warm-up.
//!
//! [`ModelCache`]: per node, per cache directory and model, one worker at a time makes sure the
//! model is there (pulled through one instance's `/api/pull` when `models.pull` is set; no other
//! instance pulls meanwhile, since instances only load models) and that each thread count its
//! instances run with has a derived model, [`derived_name`] (`llama3:8b-fleet-t4`: the same
//! blobs plus `num_thread`), so an instance keeps the model it loaded when another gets a new
//! CPU allowance, and fleets with different allowances share one cache. The model's own name
//! carries the current spec's thread count too, for clients that name it directly. Derived
//! models no instance needs any more are removed (the agent is the cache's only writer).
//! Failures back off 10 s doubling to 5 minutes, like image pulls. Its [`Gate`] says whether
//! instances may load the model, or why not yet.
//!
//! [`Warmer`]: per instance, once the gate is open, loads the model and pins it
//! (`keep_alive: -1`), confirmed through `/api/ps`; retried every few seconds until it works.
//! An instance is `Ready` only when its readiness probe passes and it is warm.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fleet_runtime::clock::{self, Instant};

use fleet_api::{CpuPinning, FleetSpec, ModelRef};
use tokio::sync::Notify;

use crate::ollama::{ModelFacts, Ollama, Progress};
use crate::reason::{Reason, Waiting};
use crate::tasks::PerTarget;
use crate::topology::Topology;
use crate::upstream::CallError;
use crate::{lock, mib};

/// The thread count an instance of `spec` should run its model with: its CPU allowance (the
/// CFS quota rounded down, at least 1), or the size of its cpuset when pinned to a socket
/// (the smaller of the two when both apply); `None` when nothing limits it (Ollama's own
/// choice from the host's cores is then right).
pub fn threads(spec: &FleetSpec, topology: &Topology) -> Option<u32> {
    let quota = spec.resources.cpus.map(|c| (c.floor() as u32).max(1));
    let cpuset = match spec.resources.cpu_pinning {
        CpuPinning::Socket => topology
            .sockets
            .iter()
            .map(|s| s.cpus.len() as u32)
            .filter(|n| *n > 0)
            .min(),
        CpuPinning::None => None,
    };
    match (quota, cpuset) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The model instances with `threads` threads load: `model` with a tag that says so
/// (`llama3:8b` -> `llama3:8b-fleet-t4`), made from it by the agent.
pub fn derived_name(model: &str, threads: u32) -> String {
    let Ok(r) = ModelRef::parse(model) else {
        return format!("{model}-fleet-t{threads}");
    };
    let tag = format!("{}-fleet-t{threads}", r.tag);
    if r.host == "registry.ollama.ai" && r.namespace == "library" {
        format!("{}:{tag}", r.model)
    } else if r.host == "registry.ollama.ai" {
        format!("{}/{}:{tag}", r.namespace, r.model)
    } else {
        format!("{}/{}/{}:{tag}", r.host, r.namespace, r.model)
    }
}

/// The thread count of `name` when it is a model derived from `model` (see [`derived_name`]).
pub fn derived_threads(model: &str, name: &str) -> Option<u32> {
    let (m, n) = (ModelRef::parse(model).ok()?, ModelRef::parse(name).ok()?);
    let same_base = m.host.eq_ignore_ascii_case(&n.host)
        && m.namespace.eq_ignore_ascii_case(&n.namespace)
        && m.model.eq_ignore_ascii_case(&n.model);
    let rest = n
        .tag
        .to_ascii_lowercase()
        .strip_prefix(&format!("{}-fleet-t", m.tag.to_ascii_lowercase()))?
        .to_string();
    same_base.then(|| rest.parse().ok()).flatten()
}

/// What the instances on one cache need of one model.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Need {
    /// The cache: `models.hostPath`, or an instance's ID when it has no shared cache.
    pub cache: String,
    /// The model, as the fleet names it.
    pub model: String,
    /// Pull it when absent (`models.pull`).
    pub pull: bool,
    /// The thread counts instances run it with: a derived model for each.
    pub threads: BTreeSet<u32>,
    /// The `num_thread` the model's own name carries (for clients that name it directly).
    pub base_threads: Option<u32>,
}

impl Need {
    /// One fleet's need: its instances run with `threads` (its CPU allowance), which the
    /// model's own name carries too.
    pub fn new(cache: &str, model: &str, pull: bool, threads: Option<u32>) -> Need {
        Need {
            cache: cache.into(),
            model: model.into(),
            pull,
            threads: threads.into_iter().collect(),
            base_threads: threads,
        }
    }

    /// Whether anything must happen before instances may load the model.
    pub fn is_empty(&self) -> bool {
        !self.pull && self.threads.is_empty() && self.base_threads.is_none()
    }
}

/// Whose model gate: a fleet's for one model (in any spelling), or one instance's (of a fleet
/// without a shared cache).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GateKey {
    /// The instances of `fleet` that serve `model` (a [`fleet_api::ModelRef::key`]).
    Model {
        /// Fleet.
        fleet: String,
        /// The model's key.
        model: String,
    },
    /// One instance, by container ID.
    Instance(String),
}

impl GateKey {
    /// The gate of `fleet`'s instances that serve `model`.
    pub fn model(fleet: &str, model: &str) -> GateKey {
        GateKey::Model {
            fleet: fleet.to_string(),
            model: fleet_api::ModelRef::key(model),
        }
    }
}

/// Whether instances may load the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Yes, since this time (their startup time counts from here).
    Open(SystemTime),
    /// Not yet: why (pulling, with progress; backing off after a failure; no instance to ask).
    Waiting(Waiting),
}

#[derive(Debug)]
enum State {
    Working {
        step: &'static str,
        progress: Progress,
        /// The model was ready before (this is a re-preparation, say for a new thread count):
        /// instances may go on loading it meanwhile.
        open: Option<SystemTime>,
    },
    Ready {
        since: SystemTime,
        need: Need,
    },
    Failed {
        error: String,
        attempts: u32,
        retry_at: Instant,
        open: Option<SystemTime>,
    },
}

/// Why the model's preparation failed, and whether the model is there anyway (then only its
/// thread count is missing, and instances may use it).
#[derive(Debug)]
struct Unprepared {
    error: String,
    model_present: bool,
}

/// Model statistics, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelStats {
    /// Pulls finished.
    pub pulls: u64,
    /// Pulls or preparations failed.
    pub failures: u64,
}

/// The node's model cache.
#[derive(Clone)]
pub struct ModelCache {
    ollama: Arc<dyn Ollama>,
    entries: Arc<Mutex<HashMap<(String, String), State>>>,
    stats: Arc<Mutex<ModelStats>>,
    /// What the node knows of each model (by its key), once prepared: for sizing instances.
    facts: Arc<Mutex<HashMap<String, ModelFacts>>>,
    wake: Arc<Notify>,
    backoff: Duration,
}

impl std::fmt::Debug for ModelCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelCache").finish_non_exhaustive()
    }
}

const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How many instances a preparation tries in turn when the one it asks goes away.
const VIA_TRIES: usize = 3;

impl ModelCache {
    /// A cache manager talking to instances through `ollama`; failures retry after `backoff`,
    /// doubling up to 5 minutes.
    pub fn new(ollama: Arc<dyn Ollama>, wake: Arc<Notify>, backoff: Duration) -> ModelCache {
        ModelCache {
            ollama,
            entries: Arc::new(Mutex::new(HashMap::new())),
            stats: Arc::new(Mutex::new(ModelStats::default())),
            facts: Arc::default(),
            wake,
            backoff,
        }
    }

    /// What the node knows of each model (by [`ModelRef::key`]), once a preparation asked.
    pub fn facts(&self) -> HashMap<String, ModelFacts> {
        lock(&self.facts).clone()
    }

    /// Whether the agent is writing into `cache` now (a pull, or a create for the thread
    /// count): no instance on it should start meanwhile.
    pub fn writing(&self, cache: &str) -> bool {
        lock(&self.entries).iter().any(|((c, _), state)| {
            c == cache && matches!(state, State::Working { step, .. } if *step != "checking")
        })
    }

    /// Statistics so far.
    pub fn stats(&self) -> ModelStats {
        *lock(&self.stats)
    }

    /// Whether instances with `need` may load the model; starts the work when it is due, through
    /// the first of `via` (base URLs of instances that answer).
    pub fn gate(&self, need: &Need, via: &[String]) -> Gate {
        if need.is_empty() {
            return Gate::Open(SystemTime::UNIX_EPOCH);
        }
        // Every spelling of a model is one worker: two of them would race on the cache.
        let key = (need.cache.clone(), fleet_api::ModelRef::key(&need.model));
        let mut entries = lock(&self.entries);
        let now = Instant::now();
        let (attempts, open) = match entries.get(&key) {
            Some(State::Ready { since, need: done }) if done == need => return Gate::Open(*since),
            // The need changed (a new CPU allowance, say): prepare again (no pull when present);
            // the model is there, so instances may go on using it meanwhile.
            Some(State::Ready { since, .. }) => (0, Some(*since)),
            Some(State::Working {
                open: Some(since), ..
            }) => return Gate::Open(*since),
            Some(State::Working { step, progress, .. }) => {
                let (done, total) = *lock(progress);
                let bytes = if total > 0 {
                    format!(", {} of {}", mib(done), mib(total))
                } else {
                    String::new()
                };
                return Gate::Waiting(Waiting::new(
                    Reason::PreparingModel,
                    format!("{step} model {}{bytes}", need.model),
                ));
            }
            Some(State::Failed {
                error,
                attempts,
                retry_at,
                open,
            }) => {
                if now < *retry_at {
                    if let Some(since) = open {
                        return Gate::Open(*since);
                    }
                    let secs = retry_at.saturating_duration_since(now).as_secs();
                    return Gate::Waiting(Waiting::new(
                        Reason::ModelPullBackOff,
                        format!(
                            "ModelPullBackOff: model {}: {error} (retrying in {secs}s)",
                            need.model
                        ),
                    ));
                }
                (*attempts, *open)
            }
            None => (0, None),
        };
        if via.is_empty() {
            return open.map_or_else(
                || {
                    Gate::Waiting(Waiting::new(
                        Reason::PreparingModel,
                        format!(
                            "waiting for an instance to answer, to prepare model {}",
                            need.model
                        ),
                    ))
                },
                Gate::Open,
            );
        }
        let progress: Progress = Arc::default();
        entries.insert(
            key.clone(),
            State::Working {
                step: "checking",
                progress: progress.clone(),
                open,
            },
        );
        drop(entries);
        let this = self.clone();
        let model = need.model.clone();
        let need = need.clone();
        let via: Vec<String> = via.iter().take(VIA_TRIES).cloned().collect();
        tokio::spawn(async move {
            let result = this.prepare_via(&via, &need, &key, &progress).await;
            let state = match result {
                Ok(()) => State::Ready {
                    since: open.unwrap_or_else(clock::now),
                    need: need.clone(),
                },
                Err(Unprepared {
                    error,
                    model_present,
                }) => {
                    tracing::warn!(model = %need.model, cache = %need.cache, error = %error, model_present, "model not prepared; backing off");
                    let open = open.or(model_present.then(clock::now));
                    lock(&this.stats).failures += 1;
                    let delay = crate::backoff::retry(attempts + 1, this.backoff, MAX_BACKOFF);
                    State::Failed {
                        error,
                        attempts: attempts + 1,
                        retry_at: Instant::now() + delay,
                        open,
                    }
                }
            };
            lock(&this.entries).insert(key, state);
            this.wake.notify_one();
        });
        open.map_or_else(
            || {
                Gate::Waiting(Waiting::new(
                    Reason::PreparingModel,
                    format!("checking model {model}"),
                ))
            },
            Gate::Open,
        )
    }

    fn step(&self, key: &(String, String), step: &'static str, progress: &Progress) {
        let mut entries = lock(&self.entries);
        let open = match entries.get(key) {
            Some(State::Working { open, .. }) => *open,
            _ => None,
        };
        entries.insert(
            key.clone(),
            State::Working {
                step,
                progress: progress.clone(),
                open,
            },
        );
        drop(entries);
        self.wake.notify_one();
    }

    /// Makes `name` from `model` with `threads`, and checks it.
    async fn derive(
        &self,
        base: &str,
        model: &str,
        name: &str,
        threads: u32,
    ) -> Result<(), Unprepared> {
        let made = match self.ollama.derive(base, model, name, threads).await {
            Ok(()) => self.ollama.show(base, name).await,
            Err(e) => Err(e),
        };
        match made {
            Ok(Some(Some(t))) if t == threads => {
                tracing::info!(model, name, threads, "model carries the thread count");
                Ok(())
            }
            // The model is there; only its thread count could not be set (a server without
            // /api/create, say). Instances may still load it (running with Ollama's own thread
            // count beats not running); retried with backoff.
            other => Err(Unprepared {
                error: format!("cannot set num_thread to {threads} on {name}: {other:?}"),
                model_present: true,
            }),
        }
    }

    /// Prepares through the first of `via`, and through the next when the instance asked
    /// stopped answering meanwhile (a rollout stopping it, say): a failure the model causes is
    /// the answer; one the instance's going causes is not.
    async fn prepare_via(
        &self,
        via: &[String],
        need: &Need,
        key: &(String, String),
        progress: &Progress,
    ) -> Result<(), Unprepared> {
        let mut result = Ok(());
        for (i, base) in via.iter().enumerate() {
            result = self.prepare(base, need, key, progress).await;
            let Err(e) = &result else { break };
            if i + 1 == via.len() || self.ollama.names(base).await.is_ok() {
                break;
            }
            tracing::info!(model = %need.model, via = %base, error = %e.error, "the instance asked went away; preparing through the next");
        }
        result
    }

    async fn prepare(
        &self,
        base: &str,
        need: &Need,
        key: &(String, String),
        progress: &Progress,
    ) -> Result<(), Unprepared> {
        let model = need.model.as_str();
        let absent = |error: CallError| Unprepared {
            error: error.to_string(),
            model_present: false,
        };
        let mut present = self.ollama.show(base, model).await.map_err(absent)?;
        if present.is_none() {
            if !need.pull {
                return Err(Unprepared {
                    error: format!(
                        "not in the node's cache, and spec.models.pull is false (pull it: ollama pull {model})"
                    ),
                    model_present: false,
                });
            }
            self.step(key, "pulling", progress);
            tracing::info!(model, via = base, "pulling the model into the node's cache");
            let started = Instant::now();
            self.ollama
                .pull(base, model, progress)
                .await
                .map_err(absent)?;
            lock(&self.stats).pulls += 1;
            tracing::info!(
                model,
                seconds = started.elapsed().as_secs_f64(),
                "model pulled"
            );
            // A server that cannot say (no /api/show, no /api/tags) is taken at its word.
            present = self
                .ollama
                .show(base, model)
                .await
                .map_err(absent)?
                .or(Some(None));
        }
        for &threads in &need.threads {
            let name = derived_name(model, threads);
            if matches!(self.ollama.show(base, &name).await, Ok(Some(Some(t))) if t == threads) {
                continue;
            }
            self.step(key, "deriving num_thread for", progress);
            self.derive(base, model, &name, threads).await?;
        }
        if let Some(threads) = need.base_threads
            && present != Some(Some(threads))
        {
            self.step(key, "setting num_thread of", progress);
            self.derive(base, model, model, threads).await?;
        }
        // What sizing instances needs (their prompt cache): asked once per model.
        let known = lock(&self.facts).contains_key(&ModelRef::key(model));
        if !known {
            match self.ollama.facts(base, model).await {
                Ok(Some(facts)) => {
                    tracing::info!(
                        model,
                        size = facts.size,
                        kv_per_token = facts.kv_per_token,
                        "model facts known"
                    );
                    lock(&self.facts).insert(ModelRef::key(model), facts);
                    self.wake.notify_one();
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(model, error = %e, "cannot ask the model's facts"),
            }
        }
        // Derived models no instance runs with any more.
        if let Ok(names) = self.ollama.names(base).await {
            for name in names {
                let Some(threads) = derived_threads(model, &name) else {
                    continue;
                };
                if need.threads.contains(&threads) {
                    continue;
                }
                self.step(key, "removing unused derivations of", progress);
                match self.ollama.delete(base, &name).await {
                    Ok(()) => tracing::info!(model, name, "derived model no instance uses removed"),
                    Err(e) => {
                        tracing::warn!(model, name, error = %e, "cannot remove a derived model")
                    }
                }
            }
        }
        Ok(())
    }
}

/// An instance to warm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WarmTarget {
    /// Container ID.
    pub id: String,
    /// Its base URL.
    pub base: String,
    /// The model.
    pub model: String,
}

/// Where an instance's warm-up stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Warmth {
    /// Loading the model.
    Loading,
    /// The model is loaded and pinned.
    Warm,
    /// The last attempt failed (retried).
    Failed(CallError),
}

/// Loads the model into each instance once.
pub struct Warmer {
    ollama: Arc<dyn Ollama>,
    states: Arc<Mutex<HashMap<String, Warmth>>>,
    tasks: PerTarget<WarmTarget>,
    wake: Arc<Notify>,
    retry: Duration,
}

impl std::fmt::Debug for Warmer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warmer").finish_non_exhaustive()
    }
}

impl Warmer {
    /// A warmer that notifies `wake` when an instance's warmth changes.
    pub fn new(ollama: Arc<dyn Ollama>, wake: Arc<Notify>) -> Warmer {
        Warmer {
            ollama,
            states: Arc::default(),
            tasks: PerTarget::default(),
            wake,
            retry: Duration::from_secs(2),
        }
    }

    /// Where an instance's warm-up stands (`None`: not started).
    pub fn state(&self, id: &str) -> Option<Warmth> {
        lock(&self.states).get(id).cloned()
    }

    /// Warms exactly these targets (those that are warm stay warm); forgets the others.
    pub fn sync(&self, targets: Vec<WarmTarget>) {
        let wanted: HashMap<String, WarmTarget> =
            targets.into_iter().map(|t| (t.id.clone(), t)).collect();
        lock(&self.states).retain(|id, _| wanted.contains_key(id));
        self.tasks.sync(wanted, |target| {
            let ollama = self.ollama.clone();
            let states = self.states.clone();
            let wake = self.wake.clone();
            let retry = self.retry;
            let t = target.clone();
            tokio::spawn(async move {
                lock(&states).insert(t.id.clone(), Warmth::Loading);
                loop {
                    match ollama.load(&t.base, &t.model).await {
                        Ok(()) => {
                            lock(&states).insert(t.id.clone(), Warmth::Warm);
                            wake.notify_one();
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(id = %t.id, error = %e, "warm-up failed; retrying");
                            lock(&states).insert(t.id.clone(), Warmth::Failed(e));
                            wake.notify_one();
                            tokio::time::sleep(retry).await;
                        }
                    }
                }
            })
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ollama::ScriptedOllama;
    use crate::topology::Socket;
    use fleet_api::{Context, parse_fleet};

    fn spec(resources: &str) -> FleetSpec {
        let src = format!(
            "apiVersion: ollama-fleet.io/v1alpha1\nkind: OllamaFleet\nmetadata: {{name: f}}\nspec:\n  model: m\n  replicas: {{perNode: 1}}\n  resources: {resources}\n"
        );
        parse_fleet(&src, &Context::default()).expect("valid").spec
    }

    #[test]
    fn threads_follow_the_cpu_allowance() {
        let topo = Topology {
            sockets: vec![
                Socket {
                    cpus: (0..8).collect(),
                    mems: vec![0],
                },
                Socket {
                    cpus: (8..14).collect(),
                    mems: vec![1],
                },
            ],
        };
        assert_eq!(threads(&spec("{cpus: 2}"), &topo), Some(2));
        assert_eq!(
            threads(&spec("{cpus: 2.7}"), &topo),
            Some(2),
            "rounded down"
        );
        assert_eq!(threads(&spec("{cpus: 0.5}"), &topo), Some(1), "at least 1");
        assert_eq!(
            threads(&spec("{cpuPinning: socket}"), &topo),
            Some(6),
            "the cpuset"
        );
        assert_eq!(
            threads(&spec("{cpus: 4, cpuPinning: socket}"), &topo),
            Some(4),
            "the smaller"
        );
        assert_eq!(
            threads(&spec("{}"), &topo),
            None,
            "unlimited: Ollama's choice"
        );
    }

    fn cache_on(ollama: &Arc<ScriptedOllama>, backoff: Duration) -> ModelCache {
        ModelCache::new(ollama.clone(), Arc::new(Notify::new()), backoff)
    }

    fn need(model: &str, pull: bool, threads: Option<u32>) -> Need {
        Need::new("/cache", model, pull, threads)
    }

    async fn open(cache: &ModelCache, need: &Need, via: &[String]) -> Gate {
        fleet_e2e::wait_for("the gate", Duration::from_secs(5), || {
            let g = cache.gate(need, via);
            async move { matches!(g, Gate::Open(_)).then_some(g) }
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn one_pull_then_threads_then_open() {
        let ollama = Arc::new(ScriptedOllama::default());
        ollama.share("/cache");
        let cache = cache_on(&ollama, Duration::from_millis(50));
        let need = need("m:1", true, Some(2));
        assert!(
            matches!(cache.gate(&need, &[]), Gate::Waiting(m) if m.message.contains("waiting for an instance"))
        );
        let via = vec!["http://a".to_string(), "http://b".to_string()];
        open(&cache, &need, &via).await;
        // Asked again (by other instances), nothing more happens.
        for _ in 0..3 {
            assert!(matches!(cache.gate(&need, &via), Gate::Open(_)));
        }
        assert_eq!(
            cache.facts().get(&ModelRef::key("m:1")),
            Some(&crate::ollama::SCRIPTED_FACTS),
            "the model's facts, for sizing instances"
        );
        assert_eq!(
            ollama.calls(),
            [
                "show http://a m:1",
                "pull http://a m:1",
                "show http://a m:1",
                "show http://a m:1-fleet-t2",
                "derive http://a m:1-fleet-t2",
                "show http://a m:1-fleet-t2",
                "derive http://a m:1",
                "show http://a m:1",
                "facts http://a m:1",
                "names http://a ",
            ]
        );
        assert_eq!(cache.stats().pulls, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_thread_count_keeps_the_gate_open() {
        let ollama = Arc::new(ScriptedOllama::default());
        ollama.share("/cache");
        let cache = cache_on(&ollama, Duration::from_millis(50));
        let mut need = need("m", true, Some(2));
        let via = vec!["http://a".to_string()];
        let Gate::Open(since) = open(&cache, &need, &via).await else {
            unreachable!()
        };
        // A new CPU allowance: the model is re-derived while instances go on using it.
        need = Need::new("/cache", "m", true, Some(3));
        ollama.set_failing("derive", true);
        for _ in 0..20 {
            assert_eq!(cache.gate(&need, &via), Gate::Open(since));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ollama.set_failing("derive", false);
        fleet_e2e::wait_for("num_thread 3", Duration::from_secs(5), || {
            let done = cache.gate(&need, &via) == Gate::Open(since)
                && ollama.show_threads("m") == Some(Some(3));
            async move { done.then_some(()) }
        })
        .await;
    }

    #[test]
    fn derived_names_say_what_they_derive() {
        assert_eq!(
            derived_name("llama3.1:8b-instruct-q4_0", 4),
            "llama3.1:8b-instruct-q4_0-fleet-t4"
        );
        assert_eq!(derived_name("llama3", 2), "llama3:latest-fleet-t2");
        assert_eq!(derived_name("team/m:1", 2), "team/m:1-fleet-t2");
        assert_eq!(
            derived_name("reg.example:5000/team/m:1", 8),
            "reg.example:5000/team/m:1-fleet-t8"
        );
        assert_eq!(derived_threads("llama3", "llama3:latest-fleet-t2"), Some(2));
        assert_eq!(
            derived_threads("Llama3:8B", "llama3:8b-fleet-t16"),
            Some(16)
        );
        assert_eq!(derived_threads("llama3:8b", "llama3:8b"), None);
        assert_eq!(derived_threads("llama3:8b", "llama3:70b-fleet-t2"), None);
        assert_eq!(derived_threads("llama3:8b", "other:8b-fleet-t2"), None);
    }

    /// Instances with two thread counts share one cache: one derived model each, no rewrite of
    /// what the other loaded; a derivation no instance needs any more is removed.
    #[tokio::test(start_paused = true)]
    async fn each_thread_count_gets_its_own_model_and_unused_ones_go() {
        let ollama = Arc::new(ScriptedOllama::default());
        ollama.share("/cache");
        let cache = cache_on(&ollama, Duration::from_millis(50));
        let via = vec!["http://a".to_string()];
        let mut both = need("m", true, Some(2));
        both.threads.insert(4);
        open(&cache, &both, &via).await;
        assert_eq!(ollama.show_threads("m:latest-fleet-t2"), Some(Some(2)));
        assert_eq!(ollama.show_threads("m:latest-fleet-t4"), Some(Some(4)));
        assert_eq!(
            ollama.show_threads("m"),
            Some(Some(2)),
            "the own name: the first fleet's"
        );
        // The instances with 2 threads are gone.
        let only4 = need("m", true, Some(4));
        fleet_e2e::wait_for("t2 removed", Duration::from_secs(5), || {
            let done = matches!(cache.gate(&only4, &via), Gate::Open(_))
                && ollama.show_threads("m:latest-fleet-t2").is_none();
            async move { done.then_some(()) }
        })
        .await;
        assert_eq!(
            ollama.show_threads("m:latest-fleet-t4"),
            Some(Some(4)),
            "t4 kept"
        );
        assert_eq!(ollama.show_threads("m"), Some(Some(4)));
        assert_eq!(cache.stats().pulls, 1, "one pull for all of it");
    }

    /// A rollout stops the instance a re-preparation asks (the lowest slot goes first): the
    /// work goes on through the next instance, not after a backoff, so the model's own name
    /// carries the new thread count when the new instances are ready.
    #[tokio::test(start_paused = true)]
    async fn an_instance_going_away_hands_the_work_to_the_next() {
        let ollama = Arc::new(ScriptedOllama::default());
        ollama.share("/cache");
        let cache = cache_on(&ollama, Duration::from_secs(600));
        let via = vec!["http://a".to_string(), "http://b".to_string()];
        open(&cache, &need("m", true, Some(1)), &via).await;
        ollama.set_down("http://a", true);
        let mut both = need("m", true, Some(2));
        both.threads.insert(1);
        fleet_e2e::wait_for("prepared through b", Duration::from_secs(5), || {
            let done = matches!(cache.gate(&both, &via), Gate::Open(_))
                && ollama.show_threads("m") == Some(Some(2));
            async move { done.then_some(()) }
        })
        .await;
        assert_eq!(ollama.show_threads("m:latest-fleet-t2"), Some(Some(2)));
        assert_eq!(cache.stats().failures, 0);
        assert!(ollama.calls().contains(&"derive http://b m".to_string()));

        // A failure the model causes is the answer: not tried again elsewhere.
        ollama.set_down("http://a", false);
        ollama.set_failing("pull", true);
        let other = need("n", true, None);
        fleet_e2e::wait_for("backing off", Duration::from_secs(5), || {
            let g = cache.gate(&other, &via);
            async move {
                matches!(g, Gate::Waiting(m) if m.reason == Reason::ModelPullBackOff).then_some(())
            }
        })
        .await;
        assert!(!ollama.calls().contains(&"pull http://b n".to_string()));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_recover() {
        let ollama = Arc::new(ScriptedOllama::default());
        let cache = cache_on(&ollama, Duration::from_millis(200));
        let need = need("m", true, None);
        ollama.set_failing("pull", true);
        let via = vec!["http://a".to_string()];
        let waiting = fleet_e2e::wait_for("a failure", Duration::from_secs(5), || {
            let g = cache.gate(&need, &via);
            async move {
                match g {
                    Gate::Waiting(m) if m.reason == Reason::ModelPullBackOff => Some(m.message),
                    _ => None,
                }
            }
        })
        .await;
        assert!(waiting.contains("pull failed (scripted)"), "{waiting}");
        ollama.set_failing("pull", false);
        open(&cache, &need, &via).await;
        assert_eq!(
            cache.stats(),
            ModelStats {
                pulls: 1,
                failures: 1
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_pull_an_absent_model_is_reported() {
        let ollama = Arc::new(ScriptedOllama::default());
        let cache = cache_on(&ollama, Duration::from_secs(10));
        let need = need("m", false, Some(1));
        let via = vec!["http://a".to_string()];
        let m = fleet_e2e::wait_for("the error", Duration::from_secs(5), || {
            let g = cache.gate(&need, &via);
            async move {
                match g {
                    Gate::Waiting(m) if m.message.contains("models.pull is false") => {
                        Some(m.message)
                    }
                    _ => None,
                }
            }
        })
        .await;
        assert!(m.contains("ollama pull m"), "{m}");
        assert!(!ollama.calls().iter().any(|c| c.starts_with("pull")));
    }
}
