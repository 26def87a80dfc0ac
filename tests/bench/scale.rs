//! `fleet-bench --scale` (run by `hack/bench-scale.sh`): the control plane at the target scale,
//! measured the way kubemark measures Kubernetes: a real etcd (started here, with the flags
//! ARCHITECTURE.md recommends), and hollow nodes: real agents (controller, planner, executor,
//! publisher, etcd client and watch, one connection each) on the in-memory runtime, whose
//! instances start after a realistic delay and can be made to crash, and scripted probes.
//!
//! Prints: converge (apply to every instance Ready in the status keys) and the watch's fan-out
//! (apply to each agent's first container create); a rolling update of every node with an etcd
//! restart in its middle (every agent resumes, nothing restarted); crash replacement; etcd
//! requests/s, raft proposals/s and WAL bytes/s per phase, and over an idle period; etcd's DB
//! size; `ollama-fleet get fleets` and `get instances -o json` latency; the memory and idle CPU
//! of the agents.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use fleet_agent::controller::{Agent, AgentConfig, View};
use fleet_agent::ollama::ScriptedOllama;
use fleet_agent::policy::ScriptedHost;
use fleet_agent::prober::ScriptedProbes;
use fleet_e2e::{PrivateEtcd, request};
use fleet_runtime::fake::FakeRuntime;
use fleet_store::etcd::{EtcdConfig, EtcdStore};
use fleet_store::{Expect, Store};
use tokio::sync::{Notify, oneshot};

use crate::{cpu_ticks, percentile, proc_field};

const IMAGE: &str = "localhost/ollama-sim:scale";

/// What the run is asked to do.
pub struct Scale {
    pub nodes: usize,
    pub per_node: u32,
    pub fleets: usize,
    pub idle: Duration,
    pub start_delay: Duration,
    pub crashes: usize,
}

/// One hollow node: a real agent on the in-memory runtime.
struct Hollow {
    runtime: FakeRuntime,
    view: Arc<RwLock<View>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

fn manifest(name: &str, per_node: u32, base_port: u32, roll: u32) -> String {
    format!(
        "apiVersion: ollama-fleet.io/v1alpha1
kind: OllamaFleet
metadata: {{name: {name}}}
spec:
  model: m
  image: {IMAGE}
  imagePullPolicy: Never
  env: {{ROLL: \"{roll}\"}}
  replicas: {{perNode: {per_node}}}
  resources: {{cpus: 0.1, memory: 64Mi}}
  network: {{basePort: {base_port}}}
  rollout: {{maxUnavailable: 25%}}
  restartBackoff: {{initial: 1s, max: 5m}}
  terminationGracePeriod: 1s
"
    )
}

/// etcd's counters that tell its load.
#[derive(Clone, Copy, Debug, Default)]
struct EtcdLoad {
    /// gRPC messages received (every unary request and every stream message).
    requests: f64,
    /// Of which lease keep-alives.
    keepalives: f64,
    /// Raft proposals committed: the writes.
    proposals: f64,
    /// Bytes written to the WAL.
    wal_bytes: f64,
    /// The backend DB file.
    db_bytes: f64,
    at: Option<Instant>,
}

async fn etcd_load(endpoint: &str) -> EtcdLoad {
    let text = match request(
        "GET",
        &format!("{endpoint}/metrics"),
        None,
        Duration::from_secs(10),
    )
    .await
    {
        Ok((200, body)) => body,
        other => panic!("etcd metrics: {other:?}"),
    };
    let mut load = EtcdLoad {
        at: Some(Instant::now()),
        ..EtcdLoad::default()
    };
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value: f64 = value.parse().unwrap_or(0.0);
        if name.starts_with("grpc_server_msg_received_total") {
            load.requests += value;
            if name.contains("LeaseKeepAlive") {
                load.keepalives += value;
            }
        }
        match name {
            "etcd_server_proposals_committed_total" => load.proposals = value,
            "etcd_disk_wal_write_bytes_total" => load.wal_bytes = value,
            "etcd_mvcc_db_total_size_in_bytes" => load.db_bytes = value,
            _ => {}
        }
    }
    load
}

/// Prints etcd's load between two readings.
fn print_load(phase: &str, a: &EtcdLoad, b: &EtcdLoad, nodes: usize) {
    let secs = match (a.at, b.at) {
        (Some(x), Some(y)) => y.duration_since(x).as_secs_f64().max(0.001),
        _ => 1.0,
    };
    let rate = |x: f64, y: f64| (y - x).max(0.0) / secs;
    let writes = rate(a.proposals, b.proposals);
    println!(
        "etcd during {phase} ({secs:.0}s): {:.0} requests/s ({:.0} lease keep-alives/s), {writes:.1} writes/s ({:.3} per node), {:.1} KiB/s written to the WAL",
        rate(a.requests, b.requests),
        rate(a.keepalives, b.keepalives),
        writes / nodes as f64,
        rate(a.wal_bytes, b.wal_bytes) / 1024.0,
    );
}

fn rss_kib() -> u64 {
    proc_field(std::process::id(), "status", "VmRSS:").unwrap_or(0)
}

/// A client of the one etcd, as each agent has its own.
async fn connect(endpoint: &str, prefix: &str) -> EtcdStore {
    let config = EtcdConfig {
        endpoints: vec![endpoint.to_string()],
        ..EtcdConfig::default()
    };
    EtcdStore::connect(&config, prefix)
        .await
        .expect("connect to etcd")
}

/// Starts a hollow node.
async fn hollow(endpoint: &str, prefix: &str, node: &str, start_delay: Duration) -> Hollow {
    let runtime = FakeRuntime::new();
    runtime.add_image(FakeRuntime::image_named(IMAGE));
    runtime.set_start_delay(start_delay);
    let store = connect(endpoint, prefix).await;
    let mut cfg = AgentConfig::new(node, "scale");
    cfg.sockets = 2;
    let wake = Arc::new(Notify::new());
    let probes = Arc::new(ScriptedProbes::new(Some(wake.clone())));
    let ollama = Arc::new(ScriptedOllama::default());
    ollama.share("/models");
    let agent = Agent::with_probes(
        cfg,
        Arc::new(runtime.clone()),
        Arc::new(store),
        probes,
        wake,
    )
    .with_ollama(ollama)
    .with_host(Arc::new(ScriptedHost::default()));
    let view = agent.view();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async {
        let _ = rx.await;
    }));
    Hollow {
        runtime,
        view,
        stop: Some(tx),
        task,
    }
}

/// Every node's summary of every fleet: (fleet, node) → (generation, desired, ready, updated).
async fn summaries(store: &EtcdStore) -> BTreeMap<(String, String), (i64, u32, u32, u32)> {
    let Ok(entries) = store.list_status(None).await else {
        return BTreeMap::new();
    };
    entries
        .into_iter()
        .filter_map(|e| {
            let s: fleet_api::FleetStatus = serde_json::from_str(&e.value).ok()?;
            Some((
                (e.fleet, e.node),
                (
                    s.observed_generation,
                    s.desired_replicas,
                    s.ready_replicas,
                    s.updated_replicas,
                ),
            ))
        })
        .collect()
}

/// Applies (creates, or updates at its current revision) every fleet with `roll` as its env
/// value; returns each fleet's generation.
async fn apply_fleets(
    store: &EtcdStore,
    names: &[String],
    per_fleet: u32,
    roll: u32,
) -> BTreeMap<String, i64> {
    let mut generations = BTreeMap::new();
    for (f, name) in names.iter().enumerate() {
        let base = 10_000 + (f as u32) * (per_fleet + 10);
        let expect = match store.get_fleet(name).await.expect("get") {
            Some(doc) => Expect::Revision(doc.revision),
            None => Expect::Absent,
        };
        let rev = store
            .put_fleet(name, &manifest(name, per_fleet, base, roll), expect)
            .await
            .expect("apply");
        generations.insert(name.clone(), rev);
    }
    generations
}

/// How far [`converge`] waits.
#[derive(Clone, Copy, PartialEq)]
enum Until {
    /// Half of the instances up to date.
    HalfUpdated,
    /// Every node reports every fleet at its generation, all ready and up to date.
    Done,
}

/// Waits until `until` holds for the fleets at `generations`; returns how long it took.
async fn converge(
    store: &EtcdStore,
    generations: &BTreeMap<String, i64>,
    nodes: usize,
    total: u64,
    deadline: Duration,
    until: Until,
) -> Duration {
    let t0 = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let s = summaries(store).await;
        let current = |f: &String, g: &i64| generations.get(f) == Some(g);
        let done: u64 = s
            .iter()
            .filter(|((f, _), (g, ..))| current(f, g))
            .map(|(_, (_, desired, ready, updated))| {
                u64::from((*ready).min(*updated).min(*desired))
            })
            .sum();
        let updated: u64 = s
            .iter()
            .filter(|((f, _), (g, ..))| current(f, g))
            .map(|(_, (_, _, _, u))| u64::from(*u))
            .sum();
        let complete = s.len() == nodes * generations.len()
            && s.iter()
                .all(|((f, _), (g, d, r, u))| current(f, g) && r == d && u == d);
        let reached = match until {
            Until::HalfUpdated => updated * 2 >= total,
            Until::Done => complete && done == total,
        };
        if reached {
            return t0.elapsed();
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "  ... {done} of {total} ready and up to date, {} statuses, {:.0}s",
                s.len(),
                t0.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        assert!(
            t0.elapsed() < deadline,
            "not converged within {deadline:?}: {done} of {total}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `ollama-fleet ARGS` `rounds` times: (median, max) wall time and the output's size.
fn cli_latency(
    endpoint: &str,
    prefix: &str,
    args: &[&str],
    rounds: usize,
) -> (Duration, Duration, usize) {
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..rounds {
        let t = Instant::now();
        let out = std::process::Command::new(fleet_e2e::fleet::binary())
            .args(["--etcd-endpoints", endpoint, "--etcd-prefix", prefix])
            .args(args)
            .output()
            .expect("run ollama-fleet");
        times.push(t.elapsed());
        assert!(
            out.status.success(),
            "ollama-fleet {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        size = out.stdout.len();
    }
    times.sort();
    (percentile(&times, 0.5), times[times.len() - 1], size)
}

fn creates(h: &Hollow) -> Vec<(tokio::time::Instant, String)> {
    h.runtime
        .timed_calls()
        .into_iter()
        .filter(|(_, c)| c.starts_with("create "))
        .collect()
}

pub async fn scale_bench(cfg: Scale) {
    let Scale {
        nodes,
        per_node,
        fleets,
        idle,
        start_delay,
        crashes,
    } = cfg;
    let per_fleet = per_node / fleets as u32;
    let total = (nodes as u64) * u64::from(per_fleet) * fleets as u64;
    println!(
        "scale: {nodes} hollow nodes x {fleets} fleet(s) x {per_fleet} = {total} instances; start delay {start_delay:?}; one etcd; {} cpus",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let etcd = PrivateEtcd::start("scale");
    let endpoint = etcd.endpoint();
    let prefix = "/scale";
    let admin = connect(&endpoint, prefix).await;
    let db_empty = etcd_load(&endpoint).await.db_bytes;

    // The hollow nodes, started and registered before the clock starts.
    let rss_before = rss_kib();
    let t = Instant::now();
    let mut hollows = Vec::with_capacity(nodes);
    for i in 0..nodes {
        hollows.push(hollow(&endpoint, prefix, &format!("node-{i:03}"), start_delay).await);
    }
    loop {
        let registered = admin.list_nodes().await.map_or(0, |n| n.len());
        if registered == nodes {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{registered} of {nodes} nodes registered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss_idle_agents = rss_kib();
    println!(
        "{nodes} agents started and registered in {:.1}s; process RSS {} MiB -> {} MiB",
        t.elapsed().as_secs_f64(),
        rss_before / 1024,
        rss_idle_agents / 1024
    );

    // Converge.
    let names: Vec<String> = (0..fleets).map(|f| format!("scale{f}")).collect();
    let load0 = etcd_load(&endpoint).await;
    let applied = tokio::time::Instant::now();
    let generations = apply_fleets(&admin, &names, per_fleet, 1).await;
    let took = converge(
        &admin,
        &generations,
        nodes,
        total,
        Duration::from_secs(900),
        Until::Done,
    )
    .await;
    let load1 = etcd_load(&endpoint).await;
    let mut fanout: Vec<Duration> = hollows
        .iter()
        .filter_map(|h| creates(h).first().map(|(at, _)| at.duration_since(applied)))
        .collect();
    fanout.sort();
    println!(
        "converge: {total} instances Ready in the status keys {:.1}s after apply ({:.0} instances/s)",
        took.as_secs_f64(),
        total as f64 / took.as_secs_f64()
    );
    println!(
        "watch fan-out (apply -> an agent's first create, {} agents): p50 {:.0}ms p99 {:.0}ms max {:.0}ms",
        fanout.len(),
        percentile(&fanout, 0.5).as_secs_f64() * 1000.0,
        percentile(&fanout, 0.99).as_secs_f64() * 1000.0,
        fanout.last().copied().unwrap_or_default().as_secs_f64() * 1000.0
    );
    print_load("converge", &load0, &load1, nodes);
    let rss_converged = rss_kib();
    println!(
        "agent memory: {:.1} MiB per agent with {per_node} instances ((RSS converged {} MiB - before agents {} MiB) / {nodes}); {:.1} MiB per agent before any fleet",
        (rss_converged.saturating_sub(rss_before)) as f64 / 1024.0 / nodes as f64,
        rss_converged / 1024,
        rss_before / 1024,
        (rss_idle_agents.saturating_sub(rss_before)) as f64 / 1024.0 / nodes as f64,
    );

    // The status layout's size.
    let entries = admin.list_instances(None).await.expect("instances");
    let summaries_bytes: usize = admin
        .list_status(None)
        .await
        .expect("status")
        .iter()
        .map(|e| e.value.len())
        .sum();
    let entry_bytes: usize = entries.iter().map(|e| e.value.len()).sum();
    println!(
        "status in etcd: {} summaries {} KiB, {} instance entries {} KiB ({} B each; one node's status whole would be {} KiB)",
        nodes * fleets,
        summaries_bytes / 1024,
        entries.len(),
        entry_bytes / 1024,
        entry_bytes / entries.len().max(1),
        (entry_bytes / (nodes * fleets).max(1) + summaries_bytes / (nodes * fleets).max(1)) / 1024,
    );

    // The CLI over every status key.
    for args in [
        &["get", "fleets"][..],
        &["get", "instances", "-o", "json"][..],
    ] {
        let (p50, max, size) = cli_latency(&endpoint, prefix, args, 5);
        println!(
            "ollama-fleet {}: median {:.0}ms, max {:.0}ms of 5 ({} KiB of output)",
            args.join(" "),
            p50.as_secs_f64() * 1000.0,
            max.as_secs_f64() * 1000.0,
            size / 1024
        );
    }

    // Idle.
    let ticks0 = cpu_ticks(std::process::id());
    let idle0 = etcd_load(&endpoint).await;
    eprintln!("  ... idle for {idle:?}");
    tokio::time::sleep(idle).await;
    let idle1 = etcd_load(&endpoint).await;
    let ticks1 = cpu_ticks(std::process::id());
    print_load("idle", &idle0, &idle1, nodes);
    println!(
        "agents idle: {:.1}% of a core for all {nodes} ({:.3}% per agent)",
        (ticks1 - ticks0) as f64 / idle.as_secs_f64(),
        (ticks1 - ticks0) as f64 / idle.as_secs_f64() / nodes as f64
    );

    // Crashes: one instance on each of `crashes` nodes.
    if crashes > 0 {
        let mut victims = Vec::new();
        for h in hollows.iter().take(crashes) {
            let v = h.view.read().expect("view").clone();
            let ready = v.endpoints.iter().find(|e| e.ready).map(|e| e.id.clone());
            if let Some(id) = ready {
                victims.push(id);
            }
        }
        let t = Instant::now();
        for (h, id) in hollows.iter().zip(&victims) {
            h.runtime.exit(id, 1);
        }
        let mut replaced = Vec::new();
        for (h, id) in hollows.iter().zip(&victims) {
            loop {
                let v = h.view.read().expect("view").clone();
                let gone = !v.endpoints.iter().any(|e| e.id == *id);
                let ready = v.endpoints.iter().filter(|e| e.ready).count();
                if gone && ready == (per_fleet as usize) * fleets {
                    replaced.push(t.elapsed());
                    break;
                }
                assert!(t.elapsed() < Duration::from_secs(60), "{id} not replaced");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        replaced.sort();
        println!(
            "crash replacement ({} crashes at once on {} nodes, start delay {start_delay:?}): all ready again p50 {:.0}ms max {:.0}ms",
            victims.len(),
            victims.len(),
            percentile(&replaced, 0.5).as_secs_f64() * 1000.0,
            replaced.last().copied().unwrap_or_default().as_secs_f64() * 1000.0
        );
        converge(
            &admin,
            &generations,
            nodes,
            total,
            Duration::from_secs(120),
            Until::Done,
        )
        .await;
    }

    // A rolling update of every node, with an etcd restart in its middle.
    let creates_before: usize = hollows.iter().map(|h| creates(h).len()).sum();
    let restarts_before = slot_restarts(&admin).await;
    let load2 = etcd_load(&endpoint).await;
    let rolled = Instant::now();
    let generations = apply_fleets(&admin, &names, per_fleet, 2).await;
    let deadline = Duration::from_secs(900);
    converge(
        &admin,
        &generations,
        nodes,
        total,
        deadline,
        Until::HalfUpdated,
    )
    .await;
    // etcd's counters start from zero again after the restart.
    let before_kill = etcd_load(&endpoint).await;
    let (etcd, away) = tokio::task::spawn_blocking(move || {
        let mut etcd = etcd;
        let t = Instant::now();
        etcd.kill();
        std::thread::sleep(Duration::from_secs(2));
        etcd.resume();
        (etcd, t.elapsed())
    })
    .await
    .expect("etcd restart");
    eprintln!(
        "  ... etcd ({endpoint}) killed and started again mid-rollout, away {:.1}s",
        away.as_secs_f64()
    );
    converge(&admin, &generations, nodes, total, deadline, Until::Done).await;
    let took = rolled.elapsed();
    let load3 = etcd_load(&endpoint).await;
    // The rollout's load: up to the kill, plus everything since the restart.
    let rollout_load = EtcdLoad {
        requests: before_kill.requests + load3.requests,
        keepalives: before_kill.keepalives + load3.keepalives,
        proposals: before_kill.proposals + load3.proposals,
        wal_bytes: before_kill.wal_bytes + load3.wal_bytes,
        ..load3
    };
    let creates_after: usize = hollows.iter().map(|h| creates(h).len()).sum();
    let restarts_after = slot_restarts(&admin).await;
    println!(
        "rolling update of every node (etcd killed and restarted when half were updated): all {total} up to date and Ready in {:.1}s; {} creates for {total} instances, {} slot restarts during the rollout",
        took.as_secs_f64(),
        creates_after - creates_before,
        restarts_after.saturating_sub(restarts_before),
    );
    print_load(
        "rollout (including the restart)",
        &load2,
        &rollout_load,
        nodes,
    );
    println!(
        "etcd DB size: {:.1} MiB empty, {:.1} MiB after converge, {:.1} MiB after the rollout",
        db_empty / 1048576.0,
        load1.db_bytes / 1048576.0,
        load3.db_bytes / 1048576.0,
    );
    println!(
        "agent memory after the rollout: {:.1} MiB per agent",
        (rss_kib().saturating_sub(rss_before)) as f64 / 1024.0 / nodes as f64
    );

    for mut h in hollows {
        if let Some(s) = h.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), h.task).await;
    }
    drop(etcd);
}

/// The restarts recorded over every slot (a slot's count is carried from instance to instance,
/// so a slot listed twice mid-rollout counts once, at its highest).
async fn slot_restarts(store: &EtcdStore) -> u64 {
    let statuses = fleet_agent::status::read(store, None).await.expect("read");
    let mut slots = BTreeMap::new();
    for s in &statuses {
        for i in &s.instances {
            let n = slots.entry((&s.fleet, &s.node, i.slot)).or_insert(0u32);
            *n = (*n).max(i.restarts);
        }
    }
    slots.values().map(|&n| u64::from(n)).sum()
}
