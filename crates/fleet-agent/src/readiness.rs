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
    /// Instances the gateway's watchdog saw stall `failureThreshold` times in a row.
    pub stalled: &'a HashSet<String>,
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
            labels: l.clone(),
            state: o.state,
            exit_code: o.exit_code,
            exited_at: o.exited_at,
            ready: probe.ready && running && warm,
            was_ready: probe.was_ready && warm,
            oom: s.ooms.contains(&o.id),
            startup_since,
            unhealthy: probe.unhealthy && running,
            stalled: s.stalled.contains(&o.id) && running,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reason::{Reason, Waiting};
    use fleet_api::{Context, parse_fleet};

    const T0: Duration = Duration::from_secs(1_000_000);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
    }

    fn fleet(name: &str, extra: &str) -> OllamaFleet {
        let src = format!(
            "apiVersion: ollama-fleet.io/v1alpha1\nkind: OllamaFleet\nmetadata: {{name: {name}}}\nspec:\n  model: m:1\n  replicas: {{perNode: 2}}\n{extra}"
        );
        parse_fleet(&src, &Context::default()).expect("valid")
    }

    fn observed(id: &str, state: TaskState) -> Observed {
        Observed {
            id: id.into(),
            labels: Default::default(),
            state,
            pid: 1,
            exit_code: None,
            exited_at: None,
        }
    }

    fn labels(fleet: &str, slot: u32, created: u64) -> InstanceLabels {
        InstanceLabels {
            model: Some("m:1".into()),
            threads: Some(2),
            ..InstanceLabels::new(fleet, slot, 11434 + slot as u16, "h", at(created))
        }
    }

    fn probe(ready: bool, was_ready: bool) -> ProbeState {
        ProbeState {
            ready,
            was_ready,
            probed: true,
            ..ProbeState::default()
        }
    }

    struct World {
        observed: Vec<Observed>,
        labels: Vec<InstanceLabels>,
        fleets: HashMap<String, OllamaFleet>,
        probes: HashMap<String, ProbeState>,
        warmth: HashMap<String, Warmth>,
        settled: bool,
        now: u64,
    }

    impl World {
        fn new(fleets: &[(&str, &str)]) -> World {
            World {
                observed: Vec::new(),
                labels: Vec::new(),
                fleets: fleets
                    .iter()
                    .map(|(n, e)| (n.to_string(), fleet(n, e)))
                    .collect(),
                probes: HashMap::new(),
                warmth: HashMap::new(),
                settled: true,
                now: 100,
            }
        }

        fn with(mut self, id: &str, l: InstanceLabels, p: ProbeState) -> World {
            self.observed.push(observed(id, TaskState::Running));
            self.labels.push(l);
            self.probes.insert(id.into(), p);
            self
        }

        fn run<T>(&self, f: impl FnOnce(&Snapshot<'_>) -> T) -> T {
            let labelled: Vec<(&Observed, InstanceLabels)> = self
                .observed
                .iter()
                .zip(self.labels.iter().cloned())
                .collect();
            let (ooms, memory, stalled) = (HashSet::new(), HashMap::new(), HashSet::new());
            f(&Snapshot {
                labelled: &labelled,
                fleets: &self.fleets,
                probes: &self.probes,
                warmth: &self.warmth,
                ooms: &ooms,
                memory: &memory,
                stalled: &stalled,
                settled: self.settled,
                started_at: at(50),
                now: at(self.now),
            })
        }
    }

    fn waiting(message: &str) -> Gate {
        Gate::Waiting(Waiting::new(Reason::PreparingModel, message))
    }

    /// Readiness: probe, model gate and warm-up, one row per case.
    #[test]
    fn readiness_table() {
        let warm = "  models: {warm: true}\n";
        let cold = "  models: {warm: false}\n";
        let open = Gate::Open(at(60));
        // (what, fleet extra, probe, gate, warmth, adopted?, settled?) ->
        // (ready, was_ready, model_pending, known, message, warm target?)
        type Row<'a> = (
            &'a str,
            &'a str,
            ProbeState,
            Option<Gate>,
            Option<Warmth>,
            bool,
            bool,
        );
        type Want<'a> = (bool, bool, bool, bool, Option<&'a str>, bool);
        let rows: Vec<(Row<'_>, Want<'_>)> = vec![
            (
                (
                    "probe ready, no warm-up",
                    cold,
                    probe(true, true),
                    None,
                    None,
                    false,
                    true,
                ),
                (true, true, false, true, None, false),
            ),
            (
                (
                    "probe not ready yet",
                    cold,
                    probe(false, false),
                    None,
                    None,
                    false,
                    true,
                ),
                (false, false, false, true, None, false),
            ),
            (
                (
                    "model gate waits",
                    warm,
                    probe(true, true),
                    Some(waiting("pulling model m:1")),
                    None,
                    false,
                    true,
                ),
                (false, false, true, true, Some("pulling model m:1"), false),
            ),
            (
                (
                    "gate open, warming",
                    warm,
                    probe(true, true),
                    Some(open.clone()),
                    Some(Warmth::Loading),
                    false,
                    true,
                ),
                (false, false, false, true, Some("loading model m:1"), true),
            ),
            (
                (
                    "warm",
                    warm,
                    probe(true, true),
                    Some(open.clone()),
                    Some(Warmth::Warm),
                    false,
                    true,
                ),
                (true, true, false, true, None, true),
            ),
            (
                (
                    "warm-up failed",
                    warm,
                    probe(true, true),
                    Some(open.clone()),
                    Some(Warmth::Failed(crate::upstream::CallError::Refused(
                        "boom".into(),
                    ))),
                    false,
                    true,
                ),
                (
                    false,
                    false,
                    false,
                    true,
                    Some("loading the model: boom"),
                    true,
                ),
            ),
            (
                (
                    "adopted, not probed, agent not settled",
                    cold,
                    ProbeState::default(),
                    None,
                    None,
                    true,
                    false,
                ),
                (false, false, false, false, None, false),
            ),
            (
                (
                    "adopted, warming again, agent not settled",
                    warm,
                    probe(true, true),
                    Some(open.clone()),
                    Some(Warmth::Loading),
                    true,
                    false,
                ),
                (false, false, false, false, Some("loading model m:1"), true),
            ),
        ];
        for ((what, extra, p, gate, warmth, adopted, settled), want) in rows {
            let created = if adopted { 10 } else { 90 };
            let mut w = World::new(&[("f", extra)]).with("f-0", labels("f", 0, created), p);
            w.settled = settled;
            if let Some(warmth) = warmth {
                w.warmth.insert("f-0".into(), warmth);
            }
            let gates: HashMap<GateKey, Gate> = gate
                .into_iter()
                .map(|g| (GateKey::model("f", "m:1"), g))
                .collect();
            let r = w.run(|s| readiness(s, &gates));
            let i = &r.instances[0];
            let got = (
                i.ready,
                i.was_ready,
                i.model_pending,
                i.known,
                r.messages.get("f-0").map(String::as_str),
                !r.warm.is_empty(),
            );
            assert_eq!(got, want, "{what}");
            assert_eq!(
                r.unsettled,
                usize::from(adopted && !got.3 && !settled),
                "{what}: unsettled"
            );
            if let Some(t) = r.warm.first() {
                assert_eq!(t.model, "m:1-fleet-t2", "{what}: warms the derived model");
                assert_eq!(t.base, "http://127.0.0.1:11434");
            }
        }
    }

    /// The gate of an instance that waits counts its startup from when the gate opened.
    #[test]
    fn startup_counts_from_the_gate() {
        let w = World::new(&[("f", "")]).with("f-0", labels("f", 0, 90), probe(false, false));
        let gates = HashMap::from([(GateKey::model("f", "M:1"), Gate::Open(at(95)))]);
        let r = w.run(|s| readiness(s, &gates));
        assert_eq!(
            r.instances[0].startup_since,
            Some(at(90)),
            "never ready: its creation"
        );
        let w = World::new(&[("f", "")]).with("f-0", labels("f", 0, 90), probe(false, true));
        let r = w.run(|s| readiness(s, &gates));
        assert_eq!(
            r.instances[0].startup_since,
            Some(at(95)),
            "the gate opened later"
        );
        let gates = HashMap::from([(GateKey::model("f", "m:1"), waiting("x"))]);
        let r = w.run(|s| readiness(s, &gates));
        assert_eq!(
            r.instances[0].startup_since, None,
            "waiting: no startup clock"
        );
    }

    /// The model cache's work, one case per row.
    #[test]
    fn model_work_table() {
        let topo = Topology::default();
        let cache = "  models: {hostPath: /c, pull: true}\n";
        // Two fleets on one cache, with different CPU allowances: one need with both thread
        // counts, the model's own name gets the first fleet's (by name), one pull.
        let w = World::new(&[
            ("a", &format!("{cache}  resources: {{cpus: 2}}\n")),
            ("b", &format!("{cache}  resources: {{cpus: 4}}\n")),
        ])
        .with("a-0", labels("a", 0, 10), probe(true, true))
        .with("b-1", labels("b", 1, 10), probe(true, true));
        let work = w.run(|s| model_work(s, &topo));
        assert_eq!(work.len(), 1, "{work:?}");
        let need = &work[0].need;
        assert!(need.pull);
        assert_eq!(need.threads, [2, 4].into_iter().collect());
        assert_eq!(need.base_threads, Some(2));
        assert_eq!(
            work[0].via,
            ["http://127.0.0.1:11434", "http://127.0.0.1:11435"],
            "through answering instances, by slot"
        );
        assert_eq!(
            work[0].gates,
            [
                (GateKey::model("a", "m:1"), true),
                (GateKey::model("b", "m:1"), true)
            ]
        );

        // An instance of the cache starting (young, never answered): no new work through it.
        let w = World::new(&[("a", cache)])
            .with("a-0", labels("a", 0, 10), probe(true, true))
            .with("a-1", labels("a", 1, 95), probe(false, false));
        let work = w.run(|s| model_work(s, &topo));
        assert!(work[0].via.is_empty(), "{work:?}");
        // Once older than STARTUP_QUIET it no longer holds the cache.
        let mut w = w;
        w.now = 95 + STARTUP_QUIET.as_secs();
        let work = w.run(|s| model_work(s, &topo));
        assert_eq!(work[0].via, ["http://127.0.0.1:11434"]);

        // Without a shared cache: one need per instance, through itself when it answers;
        // without pull or warm-up, readiness does not wait.
        let w = World::new(&[(
            "c",
            "  models: {hostPath: \"\", pull: false, warm: false}\n",
        )])
        .with("c-0", labels("c", 0, 10), probe(true, true))
        .with("c-1", labels("c", 1, 10), probe(false, false));
        let work = w.run(|s| model_work(s, &topo));
        assert_eq!(work.len(), 2);
        assert_eq!(work[0].gates, [(GateKey::Instance("c-0".into()), false)]);
        assert_eq!(work[0].via, ["http://127.0.0.1:11434"]);
        assert!(work[1].via.is_empty());
        assert_eq!(work[0].need.cache, "c-0");

        // An instance made at another address is reached there.
        let mut l = labels("a", 0, 10);
        l.host_ip = Some("127.0.0.9".parse().expect("ip"));
        let w = World::new(&[("a", cache)]).with("a-0", l, probe(true, true));
        let work = w.run(|s| model_work(s, &topo));
        assert_eq!(work[0].via, ["http://127.0.0.9:11434"]);
    }
}
