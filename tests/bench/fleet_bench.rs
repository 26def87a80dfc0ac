//! `fleet-bench`: the agent against the floor (run by `hack/bench.sh`; not a test).
//!
//! 1. Converge N sim instances from empty to all ready, through the agent (`apply` to etcd,
//!    ready when the agent's /instances lists N ready), against a baseline that creates and
//!    starts the same N containers (the agent's own container specs) straight through
//!    containerd's API with the same concurrency, and polls each port every 20 ms.
//! 2. Crash replacement: SIGKILL a running task K times (backoff initial 0); time from the kill
//!    to the replacement's task running, and to it being listed ready.
//! 3. The agent's peak RSS, and its CPU use over 30 s of idling with N instances.
//!
//! `--serve N` (run by `hack/bench-serve.sh`): see `serve.rs`.
//! `--tenants N` (run by `hack/bench-tenants.sh`): see `tenants.rs`.
//! `--chaos 1 [--faults F,G]` (run by `hack/chaos.sh`): see `chaos.rs`.
//! `--bodies BUDGET_MIB` (run by `hack/bench-gateway-memory.sh`): see `bodies.rs`.
//! `--affinity N [--engine 1]` (run by `hack/bench-affinity.sh`): see `affinity.rs`.
//!
//! `--scale NODES` (run by `hack/bench-scale.sh`): hollow nodes against one etcd, see `scale.rs`.
//!
//! `--baseline 0` skips the floor (a density run at 833 instances, `hack/bench-density.sh`).
//!
//! `--lifecycle N` (run by `hack/bench-lifecycle.sh`): N instances with the model pulled and
//! warmed, `maxUnavailable: 10%`; a rolling update, then a rotation by age of all of them: time
//! and the fewest ready instances seen.

mod affinity;
mod bodies;
mod chaos;
mod scale;
mod serve;
mod tenants;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fleet_agent::build::{Carry, NodeCtx, container_spec, new_id};
use fleet_agent::topology::Topology;
use fleet_e2e::{AgentProcess, World, free_port_range, request};
use fleet_runtime::containerd::Containerd;
use fleet_runtime::{Runtime, SIGKILL, TaskState};
use serde_json::Value;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

async fn port_ready(port: u16) -> bool {
    matches!(
        request(
            "GET",
            &format!("http://127.0.0.1:{port}/api/version"),
            None,
            Duration::from_millis(500)
        )
        .await,
        Ok((200, _))
    )
}

/// A sim fleet without the sim's per-request access log: the converge benchmark compares the
/// agent with the floor, not the cost of logging 20 probes a second per starting instance.
/// Each instance may use 24 MiB (the idle sim uses a few), so that 833 fit a 24 GiB node: the
/// agent admits only as many instances as the node's memory holds.
fn quiet(manifest: String) -> String {
    manifest
        .replace(
            "SIM_LOAD_TIME: 50ms}",
            "SIM_LOAD_TIME: 50ms, SIM_ACCESS_LOG: \"0\"}",
        )
        .replace("memory: 128Mi", "memory: 24Mi")
}

/// The floor: the same containers, created and started straight through containerd's API.
async fn baseline(world: &World, n: u32, concurrency: usize, base: u16) -> Duration {
    let rt = Arc::new(
        Containerd::new(
            &world.ns.env.containerd_socket,
            &world.ns.name,
            world.dir.join("base-logs"),
        )
        .expect("client"),
    );
    let image = rt
        .image(&world.ns.env.sim_image)
        .await
        .expect("image")
        .expect("present");
    let fleet = fleet_api::parse_fleet(
        &quiet(world.sim_fleet("base", n, base, "")),
        &fleet_api::Context { sockets: 1 },
    )
    .expect("valid");
    let node = NodeCtx {
        sockets: 1,
        topology: Topology::read(std::path::Path::new("/")),
        cgroup_parent: format!("/ollama-fleet/{}", world.ns.name),
        nofile: fleet_agent::topology::hard_nofile().map(|n| n.min(65_536)),
        bounds_swap: fleet_agent::policy::Host::bounds_swap(&fleet_agent::policy::RealHost),
        host_files: fleet_agent::policy::Host::files(&fleet_agent::policy::RealHost),
        models: Default::default(),
    };
    let hash = fleet_api::spec_hash(&fleet.spec, &image.digest);
    let now = SystemTime::now();
    let specs: Vec<_> = (0..n)
        .map(|slot| {
            container_spec(
                "base",
                &fleet.spec,
                &hash,
                &image,
                &node,
                (slot, fleet_agent::build::port(&fleet.spec, slot)),
                new_id("base", slot, now, u64::from(slot)),
                &Carry::default(),
                now,
            )
        })
        .collect();
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for spec in specs.clone() {
        let (rt, permits) = (rt.clone(), permits.clone());
        let port = base
            + spec.labels[fleet_api::LABEL_SLOT]
                .parse::<u16>()
                .expect("slot");
        tasks.push(tokio::spawn(async move {
            {
                let _p = permits.acquire().await.expect("permit");
                rt.create(&spec).await.expect("create");
                rt.start(&spec.id).await.expect("start");
            }
            while !port_ready(port).await {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let elapsed = started.elapsed();
    for spec in specs {
        let _ = rt.remove(&spec.id).await;
    }
    elapsed
}

fn ready_ids(v: &Value) -> BTreeMap<u64, String> {
    v["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["ready"] == true)
                .map(|e| {
                    (
                        e["slot"].as_u64().unwrap_or(0),
                        e["id"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn until_ready(agent: &AgentProcess, n: usize, deadline: Duration) -> Duration {
    let started = Instant::now();
    let mut said = Instant::now();
    loop {
        let ready = agent.instances().await.map_or(0, |v| ready_ids(&v).len());
        if ready == n {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < deadline,
            "not converged within {deadline:?}: {ready} of {n} ready (the fleet's conditions: ollama-fleet describe)"
        );
        if said.elapsed() >= Duration::from_secs(10) {
            eprintln!(
                "  ... {ready} of {n} ready, {:.0}s",
                started.elapsed().as_secs_f64()
            );
            said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn proc_field(pid: u32, file: &str, key: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    // After the ')' come fields 3 (the state, not a number) onwards: utime and stime (fields 14
    // and 15) are the 12th and 13th.
    let f: Vec<&str> = after.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    num(11) + num(12)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The pull benchmark: our client-side pull against `ctr images pull --plain-http` of the same
/// image from a local registry, each into a fresh namespace, alternating which goes first.
async fn pull_bench(archive: &str, rounds: usize) {
    let registry = fleet_e2e::PrivateRegistry::start("pullbench");
    registry.push_ref(std::path::Path::new(archive), "big", "big:v1");
    let name = format!("{}/big:v1", registry.host());
    let env = fleet_e2e::DevEnv::get();
    let opts = fleet_runtime::registry::RegistryOptions {
        insecure: vec![registry.host()],
        ..Default::default()
    };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let ns = |who: &str| format!("bench-pull-{who}-{}-{round}", std::process::id());
        let ctr = async {
            let started = Instant::now();
            let out = std::process::Command::new("ctr")
                .args([
                    "--address",
                    &env.containerd_socket,
                    "-n",
                    &ns("ctr"),
                    "images",
                    "pull",
                    "--plain-http",
                    &name,
                ])
                .output()
                .expect("ctr");
            assert!(
                out.status.success(),
                "ctr pull: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            started.elapsed()
        };
        let agent = async {
            let rt = Containerd::new(&env.containerd_socket, &ns("ours"), std::env::temp_dir())
                .expect("client");
            let started = Instant::now();
            rt.pull_with(&name, &opts, &fleet_runtime::PullProgress::default())
                .await
                .expect("pull");
            started.elapsed()
        };
        let (o, t) = if round % 2 == 0 {
            let t = ctr.await;
            (agent.await, t)
        } else {
            let o = agent.await;
            (o, ctr.await)
        };
        println!(
            "pull round {round}: ctr {:.2}s   agent {:.2}s",
            t.as_secs_f64(),
            o.as_secs_f64()
        );
        ours.push(o);
        theirs.push(t);
    }
    ours.sort();
    theirs.sort();
    let (o, t) = (percentile(&ours, 0.5), percentile(&theirs, 0.5));
    println!(
        "pull {name}: median ctr {:.2}s, agent {:.2}s, ratio {:.2}",
        t.as_secs_f64(),
        o.as_secs_f64(),
        o.as_secs_f64() / t.as_secs_f64()
    );
}

/// Waits until `done(instances)` holds, polling `/instances` every 200 ms; returns how long it
/// took and the fewest ready slots seen meanwhile.
async fn watch(
    agent: &AgentProcess,
    what: &str,
    deadline: Duration,
    done: impl Fn(&Value) -> bool,
) -> (Duration, usize) {
    let started = Instant::now();
    let mut fewest = usize::MAX;
    loop {
        if let Some(v) = agent.instances().await {
            fewest = fewest.min(ready_ids(&v).len());
            if done(&v) {
                return (started.elapsed(), fewest);
            }
        }
        assert!(
            started.elapsed() < deadline,
            "{what}: not within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn all_ids(v: &Value) -> std::collections::BTreeSet<String> {
    v["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The lifecycle benchmark: N instances with the model pulled and warmed, `maxUnavailable: 10%`,
/// `maxSurge: 0`; a rolling update of `env`, then a rotation by age of every instance: how long
/// each takes and the fewest ready instances seen (polled every 200 ms).
async fn lifecycle_bench(n: u32) {
    let world = World::new(&format!("bench-life-{n}"));
    let base = free_port_range(n as u16 + 2);
    let budget = n / 10;
    let fleet = |env: &str, extra: &str| {
        world
            .sim_fleet("life", n, base, extra)
            .replace(
                "SIM_LOAD_TIME: 50ms}",
                &format!("SIM_LOAD_TIME: 300ms{env}}}"),
            )
            .replace(
                "  probes: {readiness: {periodSeconds: 1, timeoutSeconds: 1}}\n",
                "",
            )
    };
    let rollout = "  rollout: {maxUnavailable: 10%, maxSurge: 0}\n";
    let agent = world.agent("bench-node", &[]);
    world.cli_ok(&["apply", "-f", "-"], Some(&fleet("", rollout)));
    let (t, _) = watch(&agent, "converge", Duration::from_secs(600), |v| {
        ready_ids(v).len() == n as usize
    })
    .await;
    println!(
        "lifecycle N={n}: converged with the model pulled once and warmed in {:.2}s (maxUnavailable 10% = {budget})",
        t.as_secs_f64()
    );

    // A rolling update of env.
    let before = all_ids(&agent.instances().await.expect("instances"));
    world.cli_ok(&["apply", "-f", "-"], Some(&fleet(", BENCH: v2", rollout)));
    let (t, fewest) = watch(&agent, "rolling update", Duration::from_secs(900), |v| {
        ready_ids(v).len() == n as usize && all_ids(v).is_disjoint(&before)
    })
    .await;
    println!(
        "rolling update N={n}: all replaced in {:.2}s; fewest ready {fewest} of {n} (floor allowed: {})",
        t.as_secs_f64(),
        n - budget
    );

    // Rotation by age: maxAge 30s (instances rotate from 22.5s to 30s of age, staggered by
    // slot), a change that restarts nothing by itself.
    let before = all_ids(&agent.instances().await.expect("instances"));
    let extra = format!("{rollout}  rotation: {{maxAge: 30s}}\n");
    world.cli_ok(&["apply", "-f", "-"], Some(&fleet(", BENCH: v2", &extra)));
    let (t0, _) = watch(&agent, "first rotation", Duration::from_secs(120), |v| {
        !before.is_subset(&all_ids(v))
    })
    .await;
    let (t1, fewest) = watch(&agent, "rotation", Duration::from_secs(900), |v| {
        ready_ids(v).len() == n as usize && all_ids(v).is_disjoint(&before)
    })
    .await;
    println!(
        "rotation N={n}: first after {:.2}s, all rotated {:.2}s later; fewest ready {fewest} of {n} (floor allowed: {})",
        t0.as_secs_f64(),
        t1.as_secs_f64(),
        n - budget
    );
    world.cli_ok(&["delete", "fleet", "life"], None);
    let _ = watch(&agent, "removal", Duration::from_secs(300), |v| {
        all_ids(v).is_empty()
    })
    .await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let budget: u64 = arg("--bodies", "0").parse().unwrap_or(0);
    if budget > 0 {
        bodies::bodies_bench(budget).await;
        return;
    }
    if arg("--chaos", "0") == "1" {
        let only: Vec<String> = arg("--faults", "")
            .split(',')
            .filter(|f| !f.is_empty())
            .map(String::from)
            .collect();
        chaos::chaos_bench(&only).await;
        return;
    }
    let conversations_on: u32 = arg("--affinity", "0").parse().unwrap_or(0);
    if conversations_on > 0 {
        affinity::affinity_bench(affinity::Options {
            n: conversations_on,
            engine: arg("--engine", "0") == "1",
            conversations: arg("--conversations", "12").parse().unwrap_or(12),
            turns: arg("--turns", "6").parse().unwrap_or(6),
            think: Duration::from_secs_f64(arg("--think", "2").parse().unwrap_or(2.0)),
            answer: arg("--answer", "16").parse().unwrap_or(16),
            doc_words: arg("--doc-words", "400").parse().unwrap_or(400),
            single: arg("--single", "1") != "0",
        })
        .await;
        return;
    }
    let tenants: u32 = arg("--tenants", "0").parse().unwrap_or(0);
    if tenants > 0 {
        let seconds = arg("--seconds", "30").parse().unwrap_or(30.0);
        let headroom = arg("--headroom", "1").parse().unwrap_or(1);
        tenants::tenants_bench(tenants, seconds, headroom).await;
        return;
    }
    let serve: u32 = arg("--serve", "0").parse().unwrap_or(0);
    if serve > 0 {
        let loads: Vec<f64> = arg("--loads", "0.5,0.8,0.95")
            .split(',')
            .filter_map(|s| s.parse().ok())
            .collect();
        let seconds = arg("--seconds", "20").parse().unwrap_or(20.0);
        serve::serve_bench(serve, seconds, &loads, arg("--rollouts", "1") == "1").await;
        return;
    }
    let nodes: usize = arg("--scale", "0").parse().unwrap_or(0);
    if nodes > 0 {
        scale::scale_bench(scale::Scale {
            nodes,
            per_node: arg("--per-node", "58").parse().unwrap_or(58),
            fleets: arg("--fleets", "1").parse().unwrap_or(1),
            idle: Duration::from_secs(arg("--idle", "300").parse().unwrap_or(300)),
            start_delay: Duration::from_millis(
                arg("--start-delay-ms", "300").parse().unwrap_or(300),
            ),
            crashes: arg("--crashes", "20").parse().unwrap_or(20),
        })
        .await;
        return;
    }
    let lifecycle: u32 = arg("--lifecycle", "0").parse().unwrap_or(0);
    if lifecycle > 0 {
        lifecycle_bench(lifecycle).await;
        return;
    }
    let archive = arg("--pull-archive", "");
    if !archive.is_empty() {
        pull_bench(&archive, arg("--rounds", "3").parse().unwrap_or(3)).await;
        return;
    }
    let sizes: Vec<u32> = arg("--n", "58,116")
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    let kills: usize = arg("--kills", "20").parse().unwrap_or(20);
    let concurrency: usize = arg("--concurrency", "16").parse().unwrap_or(16);
    let idle_secs: u64 = arg("--idle", "30").parse().unwrap_or(30);
    let with_baseline = arg("--baseline", "1") != "0";
    println!(
        "fleet-bench: sizes {sizes:?}, concurrency {concurrency}, {kills} kills, {idle_secs}s idle"
    );

    for (round, &n) in sizes.iter().enumerate() {
        let last = round + 1 == sizes.len();
        // The floor.
        let floor = if with_baseline {
            let world = World::new(&format!("bench-base-{n}"));
            let base = free_port_range(n as u16 + 2);
            let floor = baseline(&world, n, concurrency, base).await;
            drop(world);
            Some(floor)
        } else {
            None
        };

        // The agent.
        let world = World::new(&format!("bench-agent-{n}"));
        let base = free_port_range(n as u16 + 2);
        // The shortest backoff for the crash run (a slot's first restart is at once anyway).
        let manifest = quiet(world.sim_fleet("bench", n, base, ""))
            .replace("initial: 200ms, max: 2s", "initial: 100ms, max: 5m")
            // No warm-up, so Ready is close to serving HTTP, like the floor (the model is in
            // the node's cache by then, see below).
            .replace("models: {hostPath: ", "models: {warm: false, hostPath: ")
            // Default probes (readiness every 5s), as a production fleet has them.
            .replace(
                "  probes: {readiness: {periodSeconds: 1, timeoutSeconds: 1}}\n",
                "",
            );
        let mut agent = world.agent("bench-node", &["--concurrency", &concurrency.to_string()]);
        // Let the agent start and register before timing, as it would be on a node.
        let started = Instant::now();
        while agent.instances().await.is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "agent did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The model in the node's cache first, as on any node that ran the fleet before (the
        // floor loads no model): a fleet of one pulls it, and goes. A fresh node's first
        // converge also waits for its instances to finish starting before the pull (Ollama
        // must not see the cache change under it at startup).
        let seeding = Instant::now();
        let seed = manifest
            .replace("name: bench", "name: seed")
            .replace(&format!("perNode: {n}}}"), "perNode: 1}");
        assert!(seed.contains("name: seed") && seed.contains("perNode: 1}"));
        world.cli_ok(&["apply", "-f", "-"], Some(&seed));
        until_ready(&agent, 1, Duration::from_secs(120)).await;
        world.cli_ok(&["delete", "fleet", "seed"], None);
        until_gone(&agent).await;
        eprintln!(
            "  ... the model pulled into the node's cache by a fleet of one in {:.1}s",
            seeding.elapsed().as_secs_f64()
        );
        world.cli_ok(&["apply", "-f", "-"], Some(&manifest));
        let converge = until_ready(&agent, n as usize, Duration::from_secs(600)).await;
        match floor {
            Some(floor) => println!(
                "converge N={n:<4} baseline {:>7.2}s   agent {:>7.2}s   ratio {:.2}",
                floor.as_secs_f64(),
                converge.as_secs_f64(),
                converge.as_secs_f64() / floor.as_secs_f64()
            ),
            None => println!(
                "converge N={n:<4} agent {:>7.2}s (empty to all ready, the model in the node's cache, real containerd + runc)",
                converge.as_secs_f64()
            ),
        }

        if last {
            let pid = agent_pid(&agent);
            // Idle CPU and memory with N instances.
            let ticks = cpu_ticks(pid);
            let t0 = Instant::now();
            tokio::time::sleep(Duration::from_secs(idle_secs)).await;
            let after = cpu_ticks(pid);
            let used = (after - ticks) as f64 / 100.0;
            println!(
                "agent idle with N={n}: {:.2}% of a core over {:.0}s ({} CPU ticks of 10ms, {ticks} -> {after}); RSS {} MiB now, peak {} MiB",
                100.0 * used / t0.elapsed().as_secs_f64(),
                t0.elapsed().as_secs_f64(),
                after - ticks,
                proc_field(pid, "status", "VmRSS:").unwrap_or(0) / 1024,
                proc_field(pid, "status", "VmHWM:").unwrap_or(0) / 1024,
            );

            // Crash replacement.
            let rt = Containerd::new(
                &world.ns.env.containerd_socket,
                &world.ns.name,
                world.dir.join("x"),
            )
            .expect("client");
            let (mut to_running, mut to_ready) = (Vec::new(), Vec::new());
            for k in 0..kills {
                let v = agent.instances().await.expect("instances");
                let slot = (k as u64 * 7) % u64::from(n);
                let old = ready_ids(&v)[&slot].clone();
                let killed = Instant::now();
                rt.kill(&old, SIGKILL).await.expect("kill");
                // The replacement's task running (as containerd sees it).
                let running = loop {
                    let list = rt.list().await.expect("list");
                    if list.iter().any(|o| {
                        o.id != old
                            && o.labels.get(fleet_api::LABEL_SLOT).map(String::as_str)
                                == Some(&slot.to_string())
                            && o.state == TaskState::Running
                    }) {
                        break killed.elapsed();
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                };
                let ready = loop {
                    if let Some(v) = agent.instances().await
                        && ready_ids(&v).get(&slot).is_some_and(|id| *id != old)
                    {
                        break killed.elapsed();
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                };
                to_running.push(running);
                to_ready.push(ready);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            to_running.sort();
            to_ready.sort();
            println!(
                "crash replacement ({kills} kills): to running p50 {:.0}ms p99 {:.0}ms; to ready p50 {:.0}ms p99 {:.0}ms",
                percentile(&to_running, 0.5).as_secs_f64() * 1000.0,
                percentile(&to_running, 0.99).as_secs_f64() * 1000.0,
                percentile(&to_ready, 0.5).as_secs_f64() * 1000.0,
                percentile(&to_ready, 0.99).as_secs_f64() * 1000.0,
            );
            println!(
                "agent peak RSS after the crash run: {} MiB",
                proc_field(pid, "status", "VmHWM:").unwrap_or(0) / 1024
            );
        }

        // Clean up through the agent, as a user would.
        world.cli_ok(&["delete", "fleet", "bench"], None);
        println!(
            "removed N={n} in {:.2}s",
            until_gone(&agent).await.as_secs_f64()
        );
        agent.kill9();
    }
}

/// Waits (up to 300 s) until the agent runs no instance; returns how long it took.
async fn until_gone(agent: &AgentProcess) -> Duration {
    let started = Instant::now();
    while agent
        .instances()
        .await
        .is_some_and(|v| v["instances"].as_array().is_some_and(|a| !a.is_empty()))
    {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "instances left after 300s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

fn agent_pid(agent: &AgentProcess) -> u32 {
    agent.pid().expect("agent running")
}
