//! Readiness and model gates, as pure functions over one pass's snapshot: what the probes,
//! the warm-ups and the node's model cache say about each running instance, and what the model
//! cache must do for the instances that run and are about to run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use fleet_api::{FleetSpec, OllamaFleet};
use fleet_runtime::{Observed, TaskState};

use crate::build::InstanceLabels;
use crate::models::{Gate, GateKey, Need, WarmTarget, Warmth};
use crate::planner::Instance;
use crate::prober::ProbeState;
use crate::topology::Topology;

/// An instance younger than this that has not answered yet may be walking its model cache
/// (Ollama's start): the agent starts no pull or create in that cache meanwhile.
pub const STARTUP_QUIET: Duration = Duration::from_secs(30);

/// `http://ip:port` (loopback when `ip` is a wildcard).
pub fn url_at(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(ip) if ip.is_unspecified() => format!("http://127.0.0.1:{port}"),
        IpAddr::V6(ip) if ip.is_unspecified() => format!("http://[::1]:{port}"),
        IpAddr::V6(ip) => format!("http://[{ip}]:{port}"),
        ip => format!("http://{ip}:{port}"),
    }
}

/// An instance's `http://ip:port`: the address it was made with (a new `hostIP` rolls out),
/// else its fleet's.
pub fn base_url(spec: &FleetSpec, made_at: Option<IpAddr>, port: u16) -> String {
    url_at(made_at.unwrap_or(spec.network.host_ip), port)
}

/// What one pass observed.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot<'a> {
    /// Our containers, with their labels.
    pub labelled: &'a [(&'a Observed, InstanceLabels)],
    /// Each fleet as last valid.
    pub fleets: &'a HashMap<String, OllamaFleet>,
    /// Probe states (absent: not probed).
    pub probes: &'a HashMap<String, ProbeState>,
    /// Warm-up states (absent: not warming).
    pub warmth: &'a HashMap<String, Warmth>,
    /// Instances the kernel OOM-killed.
    pub ooms: &'a HashSet<String>,
    /// Measured memory of instances of fleets with `rotation.maxMemory`.
    pub memory: &'a HashMap<String, u64>,
    /// Whether the agent knows the readiness of what it adopted.
    pub settled: bool,
    /// When the agent started (instances made before were adopted).
    pub started_at: SystemTime,
    /// Now.
    pub now: SystemTime,
}

impl Snapshot<'_> {
    fn probe(&self, id: &str) -> ProbeState {
        self.probes.get(id).cloned().unwrap_or_default()
    }

    fn spec(&self, fleet: &str) -> Option<&FleetSpec> {
        self.fleets.get(fleet).map(|f| &f.spec)
    }
}

/// The model an instance serves: its own (an instance of a previous spec keeps its model while
/// a new one is pulled), else its fleet's.
fn model_of(l: &InstanceLabels, spec: Option<&FleetSpec>) -> String {
    l.model
        .clone()
        .or_else(|| spec.map(|s| s.model.clone()))
        .unwrap_or_default()
}

/// Every instance's readiness, and what follows from it.
#[derive(Debug, Default)]
pub struct Readiness {
    /// The instances, for the planner.
    pub instances: Vec<Instance>,
    /// Why an instance waits (its model, its warm-up), by container ID.
    pub messages: HashMap<String, String>,
    /// The instances to warm.
    pub warm: Vec<WarmTarget>,
    /// Adopted instances whose readiness is not known yet.
    pub unsettled: usize,
}

/// Each observed instance with what decides its readiness: its probes, its model gate and its
/// warm-up.
pub fn readiness(s: &Snapshot<'_>, gates: &HashMap<GateKey, Gate>) -> Readiness {
    let mut out = Readiness::default();
    for (o, l) in s.labelled {
        let probe = s.probe(&o.id);
        let running = o.state == TaskState::Running;
        let spec = s.spec(&l.fleet);
        let model = model_of(l, spec);
        let gate = gates
            .get(&GateKey::Instance(o.id.clone()))
            .or_else(|| gates.get(&GateKey::model(&l.fleet, &model)))
            .cloned()
            .unwrap_or(Gate::Open(SystemTime::UNIX_EPOCH));
        let warmth = s.warmth.get(&o.id);
        let warm = match (&gate, spec) {
            (Gate::Waiting(why), _) => {
                out.messages.insert(o.id.clone(), why.message.clone());
                false
            }
            (Gate::Open(_), Some(spec)) if spec.models.warm => {
                // Kept while the probe fails for a while, so a warm instance that stops
                // answering is Unready, not Starting again.
                if running && probe.was_ready {
                    // The model made for its thread count, so that it keeps what it loaded
                    // when the model's own name gets another count.
                    let loads = l
                        .threads
                        .map_or_else(|| model.clone(), |t| crate::models::derived_name(&model, t));
                    out.warm.push(WarmTarget {
                        id: o.id.clone(),
                        base: base_url(spec, l.host_ip, l.port),
                        model: loads,
                    });
                }
                match warmth {
                    Some(Warmth::Warm) => true,
                    Some(Warmth::Failed(e)) => {
                        out.messages
                            .insert(o.id.clone(), format!("loading the model: {e}"));
                        false
                    }
                    _ => {
                        if probe.ready {
                            out.messages
                                .insert(o.id.clone(), format!("loading model {model}"));
                        }
                        false
                    }
                }
            }
            (Gate::Open(_), _) => true,
        };
        // (Creation times are whole seconds.)
        let adopted = l.created_at + Duration::from_secs(1) < s.started_at;
        let warming = spec.is_some_and(|s| s.models.warm)
            && probe.ready
            && !matches!(warmth, Some(Warmth::Warm | Warmth::Failed(_)));
        // An adopted instance not yet probed, or probed but not yet confirmed warm again, is
        // unknown (until the agent settles): not unready.
        let unknown = running && adopted && (!probe.probed || warming);
        if unknown {
            out.unsettled += 1;
        }
        let startup_since = match gate {
            _ if !probe.was_ready => Some(l.created_at),
            Gate::Open(since) => Some(since.max(l.created_at)),
            Gate::Waiting(_) => None,
        };
        out.instances.push(Instance {
            id: o.id.clone(),
            fleet: l.fleet.clone(),
            slot: l.slot,
            port: l.port,
            spec_hash: l.spec_hash.clone(),
            created_at: l.created_at,
            carry: l.carry.clone(),
            state: o.state,
            exit_code: o.exit_code,
            exited_at: o.exited_at,
            ready: probe.ready && running && warm,
            was_ready: probe.was_ready && warm,
            oom: s.ooms.contains(&o.id),
            startup_since,
            unhealthy: probe.unhealthy && running,
            memory: s.memory.get(&o.id).copied(),
            known: probe.probed && (s.settled || !unknown),
            model_pending: matches!(gate, Gate::Waiting(_)),
        });
    }
    out
}

/// Work for the node's model cache: a need, the instances to do it through (base URLs, first
/// first), and whose gate it is (with whether that gate waits for it: without pull and warm-up,
/// readiness does not wait for the model, and the thread count is set in the background).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// What the cache must hold.
    pub need: Need,
    /// Through which instances.
    pub via: Vec<String>,
    /// The gates it decides.
    pub gates: Vec<(GateKey, bool)>,
}

/// One model on one shared cache: the merged need, the instances to work through (by slot),
/// and its gates.
type Merged = (Option<Need>, Vec<(u32, String)>, Vec<(GateKey, bool)>);

/// The model work of the pass: for each fleet and each model its instances serve (instances of
/// a previous spec may serve another model than `spec.model`), or for each instance of a fleet
/// without a shared cache. On a shared cache, every fleet and instance that uses a model adds to
/// one need: the thread counts its instances run with (one derived model each), the first
/// fleet's (by name) thread count on the model's own name, and a pull when any fleet asks for
/// one. Nothing is written into a cache while one of its instances starts (Ollama walks
/// `blobs/` when it starts and exits when a file vanishes under it): such work has no `via`.
pub fn model_work(s: &Snapshot<'_>, topology: &Topology) -> Vec<Wanted> {
    let starting: HashSet<&str> = s
        .labelled
        .iter()
        .filter_map(|(o, l)| {
            let spec = s.spec(&l.fleet)?;
            let young = s
                .now
                .duration_since(l.created_at)
                .is_ok_and(|age| age < STARTUP_QUIET);
            (o.state == TaskState::Running
                && young
                && !s.probe(&o.id).was_ready
                && !spec.models.host_path.is_empty())
            .then_some(spec.models.host_path.as_str())
        })
        .collect();
    let answering = |o: &Observed| o.state == TaskState::Running && s.probe(&o.id).ready;
    // (cache, model key) -> the merged need, the instances to work through, its gates.
    let mut shared: BTreeMap<(String, String), Merged> = BTreeMap::new();
    let mut out = Vec::new();
    let mut fleets: Vec<(&String, &OllamaFleet)> = s.fleets.iter().collect();
    fleets.sort_by_key(|(name, _)| name.as_str());
    for (name, fleet) in fleets {
        let spec = &fleet.spec;
        let spec_threads = crate::models::threads(spec, topology);
        let waits = spec.models.pull || spec.models.warm;
        let mine: Vec<&(&Observed, InstanceLabels)> = s
            .labelled
            .iter()
            .filter(|(_, l)| &l.fleet == name)
            .collect();
        let cache = spec.models.host_path.clone();
        if cache.is_empty() {
            // Each instance has its own models directory: its own need.
            for (o, l) in mine {
                let via = if answering(o) {
                    vec![base_url(spec, l.host_ip, l.port)]
                } else {
                    Vec::new()
                };
                out.push(Wanted {
                    need: Need::new(&o.id, &model_of(l, Some(spec)), spec.models.pull, l.threads),
                    via,
                    gates: vec![(GateKey::Instance(o.id.clone()), waits)],
                });
            }
            continue;
        }
        let mut uses: Vec<(String, Option<u32>)> = mine
            .iter()
            .map(|(_, l)| (model_of(l, Some(spec)), l.threads))
            .collect();
        uses.push((spec.model.clone(), spec_threads));
        for (model, threads) in uses {
            let key = (cache.clone(), fleet_api::ModelRef::key(&model));
            let (need, _, gates) = shared.entry(key).or_default();
            let need = need.get_or_insert_with(|| Need {
                cache: cache.clone(),
                model: model.clone(),
                pull: false,
                threads: Default::default(),
                base_threads: None,
            });
            need.pull |= spec.models.pull;
            need.threads.extend(threads);
            if need.base_threads.is_none() && crate::ollama::same_model(&model, &spec.model) {
                need.base_threads = spec_threads;
            }
            let gate = (GateKey::model(name, &model), waits);
            if !gates.contains(&gate) {
                gates.push(gate);
            }
        }
        for (o, l) in mine {
            if answering(o) {
                let key = (
                    cache.clone(),
                    fleet_api::ModelRef::key(&model_of(l, Some(spec))),
                );
                if let Some((_, via, _)) = shared.get_mut(&key) {
                    via.push((l.slot, base_url(spec, l.host_ip, l.port)));
                }
            }
        }
    }
    for ((cache, _), (need, mut via, gates)) in shared {
        let Some(need) = need else { continue };
        via.sort();
        let via = if starting.contains(cache.as_str()) {
            // No new work on this cache now (work under way goes on).
            Vec::new()
        } else {
            via.into_iter().map(|(_, url)| url).collect()
        };
        out.push(Wanted { need, via, gates });
    }
    out
}
