//! The Ollama-aware lifecycle end to end (real etcd, containerd + runc, the ollama-sim image):
//! one model pull per node, Ready only once the model is loaded, the thread count every request
//! runs with, rotation by age within `maxUnavailable` (and with `maxSurge`), rolling updates and
//! a stalled one, a hung instance and a leaking one replaced.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fleet_agent::models::derived_name;
use fleet_e2e::http::request_with_headers;
use fleet_e2e::{AgentProcess, World, free_port_range, get, json, post, wait_for};
use serde_json::{Value, json};

const MODEL: &str = "smollm2:135m";

/// A sim fleet: `n` instances from `base`, the model pulled (3 s) and warmed, 1.5 CPUs each on
/// a sim that believes its host has 64 cores (as Ollama would on a big server), probes every
/// second.
fn fleet(world: &World, name: &str, n: u32, base: u16, env: &str, extra: &str) -> String {
    let models = world.dir.join("models");
    format!(
        "apiVersion: ollama-fleet.io/v1alpha1
kind: OllamaFleet
metadata:
  name: {name}
spec:
  model: {MODEL}
  image: {image}
  imagePullPolicy: Never
  env: {{SIM_MODEL_SIZE: 8Mi, SIM_LOAD_TIME: 300ms, SIM_PULL_TIME: 3s, SIM_HOST_CORES: \"64\"{env}}}
  replicas: {{perNode: {n}}}
  resources: {{cpus: 1.5, memory: 128Mi, pids: 256}}
  network: {{hostIP: 127.0.0.1, basePort: {base}}}
  models: {{hostPath: {models}, pull: true, warm: true}}
  probes:
    readiness: {{periodSeconds: 1, timeoutSeconds: 1}}
    liveness: {{periodSeconds: 2, timeoutSeconds: 1, failureThreshold: 3}}
    startupTimeoutSeconds: 60
  restartBackoff: {{initial: 200ms, max: 2s}}
  terminationGracePeriod: 2s
{extra}",
        image = world.ns.env.sim_image,
        models = models.display(),
    )
}

/// POSTs `body` to a sim at `url` (it must answer 200); the thread count the request ran with
/// (the sim's `X-Sim-Num-Thread`).
async fn threads_of(url: &str, body: &Value) -> Option<String> {
    let (status, headers, _) =
        request_with_headers("POST", url, Some(body), Duration::from_secs(30))
            .await
            .expect("request");
    assert_eq!(status, 200, "{url}");
    headers
        .into_iter()
        .find(|(k, _)| k == "x-sim-num-thread")
        .map(|(_, v)| v)
}

/// The fleet's instances in `/instances`.
async fn listed(agent: &AgentProcess, fleet: &str) -> Vec<Value> {
    agent.listed(Some(fleet)).await
}

/// Slots with a ready instance.
fn ready_slots(instances: &[Value]) -> usize {
    instances
        .iter()
        .filter(|i| i["ready"] == true)
        .filter_map(|i| i["slot"].as_u64())
        .collect::<BTreeSet<_>>()
        .len()
}

async fn wait_ready(agent: &AgentProcess, fleet: &str, n: usize, secs: u64) -> Vec<Value> {
    wait_for(&format!("{n} ready"), Duration::from_secs(secs), || async {
        let l = listed(agent, fleet).await;
        (ready_slots(&l) == n && l.len() == n).then_some(l)
    })
    .await
}

/// Waits until the fleet's `n` instances are ready and none of them is one of `old`.
async fn wait_all_new(
    agent: &AgentProcess,
    fleet: &str,
    n: usize,
    old: &BTreeSet<String>,
) -> Vec<Value> {
    wait_for(
        &format!("{n} new instances ready"),
        Duration::from_secs(120),
        || async {
            let l = listed(agent, fleet).await;
            (ready_slots(&l) == n && l.len() == n && id_set(&l).is_disjoint(old)).then_some(l)
        },
    )
    .await
}

fn id_set(instances: &[Value]) -> BTreeSet<String> {
    instances
        .iter()
        .filter_map(|i| i["id"].as_str().map(str::to_string))
        .collect()
}

/// Running tasks of the fleet, from `ctr tasks ls`.
fn running_tasks(world: &World, fleet: &str) -> usize {
    let out = world.ns.ctr(&["tasks", "ls"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&format!("{fleet}-")) && l.contains("RUNNING"))
        .count()
}

/// The fewest ready slots (from the agent) and running tasks (from containerd) seen while it ran,
/// polled every 200 ms.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, usize, u32)>,
}

impl Sampler {
    fn start(world: &World, agent: &AgentProcess, fleet: &str) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, fleet) = (stop.clone(), fleet.to_string());
        let url = format!("http://{}/instances", agent.listen);
        let (ctr_socket, ns) = (
            world.ns.env.containerd_socket.clone(),
            world.ns.name.clone(),
        );
        let task = tokio::spawn(async move {
            let (mut min_ready, mut min_running, mut samples) = (usize::MAX, usize::MAX, 0);
            while !s.load(Ordering::SeqCst) {
                let (socket, ns, f) = (ctr_socket.clone(), ns.clone(), fleet.clone());
                let running = tokio::task::spawn_blocking(move || {
                    let out = std::process::Command::new("ctr")
                        .args(["--address", &socket, "-n", &ns, "tasks", "ls"])
                        .output()
                        .expect("ctr");
                    String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .filter(|l| l.starts_with(&format!("{f}-")) && l.contains("RUNNING"))
                        .count()
                })
                .await
                .unwrap_or(0);
                if let Ok((200, body)) =
                    fleet_e2e::request("GET", &url, None, Duration::from_secs(2)).await
                {
                    let all = json(&body)["instances"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    let mine: Vec<Value> =
                        all.into_iter().filter(|i| i["fleet"] == fleet).collect();
                    min_ready = min_ready.min(ready_slots(&mine));
                }
                min_running = min_running.min(running);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (min_ready, min_running, samples)
        });
        Sampler { stop, task }
    }

    /// (fewest ready, fewest running, samples).
    async fn finish(self) -> (usize, usize, u32) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("sampler")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_is_pulled_once_and_loaded_before_ready() {
    let world = World::new("lc-model");
    let base = free_port_range(10);
    world.apply(&fleet(&world, "m", 10, base, "", ""));
    let agent = world.agent("node-1", &[]);
    let journal = world.dir.join("models/.sim-pulls.log");
    // The pull's progress shows in status.
    let s = world
        .wait_status("m", "the pull's progress in status", 30, |s| {
            s["instances"].as_array().is_some_and(|a| {
                a.iter().any(|i| {
                    i["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("pulling model smollm2:135m, "))
                })
            })
        })
        .await;
    assert_eq!(s["readyReplicas"], 0, "{s}");

    // Until all ten are ready: an instance listed as ready has the model loaded, and none is
    // ready while the pull runs.
    let checked: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::default();
    wait_for("10 ready, each checked", Duration::from_secs(120), || {
        let (agent, journal, checked) = (&agent, &journal, &checked);
        async move {
            let pulling = std::fs::read_to_string(journal).is_ok_and(|j| {
                j.lines().filter(|l| l.starts_with("start")).count()
                    > j.lines().filter(|l| l.starts_with("end")).count()
            });
            let l = listed(agent, "m").await;
            for i in l.iter().filter(|i| i["ready"] == true) {
                assert!(
                    !pulling,
                    "{} is ready while the model is being pulled",
                    i["id"]
                );
                let id = i["id"].as_str().unwrap_or("").to_string();
                let first_look = checked.lock().expect("lock").insert(id.clone());
                if first_look {
                    let (_, ps) = get(&format!(
                        "http://{}/api/ps",
                        i["address"].as_str().unwrap_or("")
                    ))
                    .await;
                    let ps = json(&ps);
                    assert_eq!(
                        ps["models"][0]["name"],
                        derived_name(MODEL, 1),
                        "{id} is ready without its model (derived for 1 thread) loaded: {ps}"
                    );
                    assert_eq!(ps["models"][0]["num_thread"], 1, "{id}: {ps}");
                }
            }
            (ready_slots(&l) == 10).then_some(())
        }
    })
    .await;
    assert_eq!(checked.lock().expect("lock").len(), 10);

    let journal = std::fs::read_to_string(&journal).expect("the sim's pull journal");
    let starts = journal.lines().filter(|l| l.starts_with("start")).count();
    assert_eq!(starts, 1, "exactly one pull on the node:\n{journal}");
    assert_eq!(agent.metric("ollama_fleet_model_pulls_total").await, 1.0);

    // Every request runs with the thread count of the CPU allowance (1.5 CPUs: 1 thread), though
    // the client says nothing about threads and the sim believes the host has 64 cores.
    for i in listed(&agent, "m").await {
        let addr = i["address"].as_str().expect("address").to_string();
        for (path, body) in [
            (
                "/api/generate",
                json!({"model": MODEL, "prompt": "hello", "stream": false}),
            ),
            (
                "/api/chat",
                json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
            ),
        ] {
            let threads = threads_of(&format!("http://{addr}{path}"), &body).await;
            assert_eq!(threads.as_deref(), Some("1"), "{addr}{path}");
        }
    }
    let s = world.statuses("m");
    assert_eq!(s[0]["readyReplicas"], 10);
}

/// Rotation by age of 10 instances; returns (fewest ready, fewest running, samples).
async fn rotate(tag: &str, rollout: &str) -> (usize, usize, u32) {
    let world = World::new(tag);
    let base = free_port_range(12);
    let extra = format!("  rotation: {{maxAge: 20s}}\n  rollout: {rollout}\n");
    world.apply(&fleet(&world, "r", 10, base, "", &extra));
    let agent = world.agent("node-1", &[]);
    let first = id_set(&wait_ready(&agent, "r", 10, 120).await);
    let sampler = Sampler::start(&world, &agent, "r");
    wait_for(
        "every instance rotated",
        Duration::from_secs(150),
        || async {
            let l = listed(&agent, "r").await;
            let now = id_set(&l);
            (ready_slots(&l) == 10 && now.is_disjoint(&first)).then_some(())
        },
    )
    .await;
    let seen = sampler.finish().await;
    assert!(agent.metric("ollama_fleet_rotations_total").await >= 10.0);
    let s = world.statuses("r");
    assert!(
        s[0]["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .all(|i| i["restarts"] == 0),
        "a rotation is not a restart: {}",
        s[0]
    );
    assert!(running_tasks(&world, "r") >= 10);
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_stays_within_max_unavailable() {
    let (ready, running, samples) = rotate("lc-rot", "{maxUnavailable: 2}").await;
    eprintln!(
        "rotation, maxUnavailable 2: fewest ready {ready}, fewest running {running}, {samples} samples"
    );
    assert!(samples > 20, "{samples}");
    assert!(ready >= 8, "more than 2 unavailable: {ready} ready");
    assert!(
        running >= 8,
        "more than 2 down in containerd: {running} running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_with_surge_keeps_every_instance_ready() {
    let (ready, running, samples) = rotate("lc-surge", "{maxUnavailable: 0, maxSurge: 1}").await;
    eprintln!(
        "rotation, maxSurge 1: fewest ready {ready}, fewest running {running}, {samples} samples"
    );
    assert!(samples > 20, "{samples}");
    assert_eq!(ready, 10, "fewer than 10 ready during a surge rotation");
    assert!(running >= 10);
}

/// Applies `manifest` to fleet `u` (10 instances) and waits until every instance is ready on a
/// spec hash other than `off`; returns the status and the fewest ready and running instances
/// seen meanwhile.
async fn roll_out(
    world: &World,
    agent: &AgentProcess,
    manifest: &str,
    off: &Value,
) -> (Value, usize, usize) {
    let sampler = Sampler::start(world, agent, "u");
    world.apply(manifest);
    let status = world
        .wait_status("u", "10 updated and ready", 120, |s| {
            s["updatedReplicas"] == 10
                && s["readyReplicas"] == 10
                && s["instances"]
                    .as_array()
                    .is_some_and(|a| a.len() == 10 && a.iter().all(|i| i["specHash"] != *off))
        })
        .await;
    let (ready, running, _) = sampler.finish().await;
    (status, ready, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_updates_and_a_stalled_one() {
    let world = World::new("lc-roll");
    let base = free_port_range(10);
    let rollout = "  rollout: {maxUnavailable: 1}\n";
    world.apply(&fleet(&world, "u", 10, base, "", rollout));
    let agent = world.agent("node-1", &[]);
    let before = world
        .wait_status("u", "10 ready", 120, |s| s["readyReplicas"] == 10)
        .await;
    let old_hash = before["instances"][0]["specHash"].clone();

    // Rotation, rollout and probe settings shape no container: the new generation is acted on
    // and nothing restarts.
    let unshaped = "  rollout: {maxUnavailable: 2}\n  rotation: {maxAge: 1h}\n";
    world.apply(&fleet(&world, "u", 10, base, "", unshaped));
    let generation = before["observedGeneration"].as_i64().unwrap_or(0);
    let same = world
        .wait_status("u", "the new generation observed", 30, |s| {
            s["observedGeneration"].as_i64().unwrap_or(0) > generation
        })
        .await;
    assert_eq!(
        id_set(&same["instances"].as_array().cloned().unwrap_or_default()),
        id_set(&before["instances"].as_array().cloned().unwrap_or_default())
    );
    world.apply(&fleet(&world, "u", 10, base, "", rollout));

    // An env change rolls out one at a time.
    let changed = fleet(&world, "u", 10, base, ", GREETING: hello", rollout);
    let (after, ready, running) = roll_out(&world, &agent, &changed, &old_hash).await;
    eprintln!("rolling update, maxUnavailable 1: fewest ready {ready}, fewest running {running}");
    assert!(
        ready >= 9 && running >= 9,
        "more than 1 unavailable: {ready} ready, {running} running"
    );
    let new_hash = after["instances"][0]["specHash"].clone();
    assert_ne!(new_hash, old_hash);
    assert!(
        after["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .all(|i| i["specHash"] == new_hash)
    );
    let env = world.ns.ctr_ok(&[
        "containers",
        "info",
        after["instances"][3]["id"].as_str().expect("id"),
    ]);
    assert!(env.contains("GREETING=hello"));

    // A new CPU allowance (1.5 -> 2 cores, all this node has) is a new thread count: the node's model is re-derived while the old
    // instances keep serving, and the new ones run with 2 threads.
    let bigger = fleet(&world, "u", 10, base, ", GREETING: hello", rollout)
        .replace("cpus: 1.5,", "cpus: 2,");
    let (done, ready, running) = roll_out(&world, &agent, &bigger, &new_hash).await;
    assert!(
        ready >= 9 && running >= 9,
        "more than 1 unavailable while the model was re-derived: {ready} ready, {running} running"
    );
    let port = done["instances"][0]["port"].as_u64().expect("port");
    let threads = threads_of(
        &format!("http://127.0.0.1:{port}/api/generate"),
        &json!({"model": MODEL, "prompt": "hi", "stream": false}),
    )
    .await;
    assert_eq!(threads.as_deref(), Some("2"));

    // A rollout to a command that exits at once: at most maxUnavailable old instances are lost,
    // and the condition says why it stopped.
    let sampler = Sampler::start(&world, &agent, "u");
    let broken = format!("{rollout}  command: [/bin/ollama, no-such-command]\n");
    world.apply(
        &fleet(&world, "u", 10, base, ", GREETING: hello", &broken)
            .replace("cpus: 1.5,", "cpus: 2,"),
    );
    let stalled = world
        .wait_status("u", "the stall reported", 60, |s| {
            s["conditions"].as_array().is_some_and(|c| {
                c.iter().any(|c| {
                    c["type"] == "Progressing"
                        && c["reason"] == "RolloutStalled"
                        && c["status"] == "False"
                })
            })
        })
        .await;
    // Give it time to do harm, if it would.
    fleet_e2e::holds_for(
        "at least 9 slots ready during the stalled rollout",
        Duration::from_secs(5),
        || async { ready_slots(&listed(&agent, "u").await) >= 9 },
    )
    .await;
    let (ready, _, _) = sampler.finish().await;
    assert!(
        ready >= 9,
        "the stalled rollout took more than 1 healthy instance: {ready} ready"
    );
    let l = listed(&agent, "u").await;
    assert!(ready_slots(&l) >= 9, "{l:?}");
    let message = stalled["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Progressing"))
        .map(|c| c["message"].to_string())
        .unwrap_or_default();
    assert!(message.contains("previous spec"), "{message}");
}

/// Waits until `slot` has a ready instance other than `old`; returns the status and that
/// instance.
async fn replaced(world: &World, fleet: &str, slot: u64, old: &str) -> (Value, Value) {
    let what = format!("slot {slot}'s {old} replaced by a ready instance");
    let s = world
        .wait_status(fleet, &what, 60, |s| {
            s["instances"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|i| i["slot"] == slot && i["id"] != old && i["ready"] == true)
            })
        })
        .await;
    let new = s["instances"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["slot"] == slot && i["id"] != old))
        .cloned()
        .expect("the new instance");
    (s, new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_and_leaking_instances_are_replaced() {
    let world = World::new("lc-sick");
    let base = free_port_range(3);
    let extra = "  rotation: {maxMemory: 48Mi}\n  rollout: {maxUnavailable: 1}\n";
    world.apply(&fleet(&world, "s", 3, base, "", extra));
    let agent = world.agent("node-1", &[]);
    let first = wait_ready(&agent, "s", 3, 120).await;
    let by_slot: BTreeMap<u64, String> = first
        .iter()
        .map(|i| {
            (
                i["slot"].as_u64().unwrap_or(0),
                i["id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();

    // Slot 0 hangs: Unready first, then replaced by its liveness probe.
    let (code, _) = post(&format!("http://127.0.0.1:{base}/sim/hang"), json!({})).await;
    assert_eq!(code, 200);
    wait_for(
        "the hung instance unready",
        Duration::from_secs(20),
        || async {
            listed(&agent, "s")
                .await
                .into_iter()
                .find(|i| i["id"] == by_slot[&0].as_str() && i["phase"] == "Unready")
        },
    )
    .await;
    let (_, slot0) = replaced(&world, "s", 0, &by_slot[&0]).await;
    assert_eq!(slot0["restarts"], 1);
    assert_eq!(slot0["lastExit"]["reason"], "Unhealthy");

    // Slot 1 leaks 8 MiB/s: rotated when it passes maxMemory (48 MiB), before its 128 MiB limit.
    let (code, _) = post(
        &format!("http://127.0.0.1:{}/sim/leak", base + 1),
        json!({"rate": "8Mi"}),
    )
    .await;
    assert_eq!(code, 200);
    let (s, slot1) = replaced(&world, "s", 1, &by_slot[&1]).await;
    assert_eq!(slot1["restarts"], 0, "rotated, not crashed: {slot1}");
    assert!(slot1["lastExit"].is_null(), "not OOM-killed: {slot1}");
    assert!(
        agent
            .metric("ollama_fleet_rotations_total{fleet=\"s\",reason=\"MaxMemory\"}")
            .await
            >= 1.0
    );
    // Slot 2 was left alone.
    assert!(
        s["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .any(|i| i["id"] == by_slot[&2].as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_keeps_what_is_ready() {
    let world = World::new("lc-adopt");
    let base = free_port_range(4);
    let manifest = fleet(&world, "a", 4, base, "", "")
        .replace("startupTimeoutSeconds: 60", "startupTimeoutSeconds: 3");
    world.apply(&manifest);
    let mut agent = world.agent("node-1", &[]);
    let first = id_set(&wait_ready(&agent, "a", 4, 120).await);
    // Older than their startup timeout, then the agent dies and comes back.
    tokio::time::sleep(Duration::from_secs(4)).await;
    agent.kill9();
    agent.resume();
    // Its status key says 4 ready throughout (the old one until the new agent knows better),
    // and nothing is restarted.
    let mut fewest = usize::MAX;
    let mut samples = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while std::time::Instant::now() < deadline {
        let s = world.statuses("a");
        if let Some(ready) = s.first().and_then(|s| s["readyReplicas"].as_u64()) {
            fewest = fewest.min(ready as usize);
            samples += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(samples > 10, "{samples}");
    assert_eq!(fewest, 4, "the restarted agent reported fewer than 4 ready");
    let now = id_set(&wait_ready(&agent, "a", 4, 30).await);
    assert_eq!(now, first, "adoption restarts nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_model_pull_is_reported_and_retried() {
    let world = World::new("lc-nopull");
    let base = free_port_range(2);
    let manifest = fleet(
        &world,
        "p",
        2,
        base,
        ", SIM_PULL_MISSING: \"smollm2:135m\"",
        "",
    )
    .replace("startupTimeoutSeconds: 60", "startupTimeoutSeconds: 2");
    world.apply(&manifest);
    let agent = world.agent("node-1", &[]);
    let s = world
        .wait_status("p", "ModelPullBackOff", 60, |s| {
            s["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Progressing" && c["reason"] == "ModelPullBackOff")
            })
        })
        .await;
    let message = s["instances"][0]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        message.contains("file does not exist") && message.contains("retrying in"),
        "{s}"
    );
    // Waiting for the node's model is model work (Pending), not a startup failure: past the
    // startup timeout (2 s), nothing restarts, nothing is ready.
    fleet_e2e::holds_for(
        "every instance Pending, none restarted, past the startup timeout",
        Duration::from_secs(3),
        || async {
            world.statuses("p").first().is_some_and(|s| {
                s["instances"].as_array().is_some_and(|a| {
                    a.iter()
                        .all(|i| i["restarts"] == 0 && i["phase"] == "Pending")
                })
            })
        },
    )
    .await;
    assert!(agent.metric("ollama_fleet_model_failures_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_model_rolls_out_while_the_old_one_serves() {
    let world = World::new("lc-model2");
    let base = free_port_range(4);
    let rollout = "  rollout: {maxUnavailable: 1}\n";
    world.apply(&fleet(&world, "n", 4, base, "", rollout));
    let agent = world.agent("node-1", &[]);
    wait_ready(&agent, "n", 4, 120).await;

    // A new model: pulled once (3 s) by the first new instance while the others keep serving
    // the old one; at most one instance down at any time.
    let sampler = Sampler::start(&world, &agent, "n");
    let new_model = fleet(&world, "n", 4, base, "", rollout)
        .replace(&format!("model: {MODEL}"), "model: smollm2:360m");
    world.apply(&new_model);
    let done = wait_for(
        "4 ready on the new model",
        Duration::from_secs(120),
        || async {
            let l = listed(&agent, "n").await;
            let mut all_new = ready_slots(&l) == 4 && l.len() == 4;
            for i in &l {
                let url = format!("http://{}/api/ps", i["address"].as_str().unwrap_or(""));
                let ps = fleet_e2e::request("GET", &url, None, Duration::from_secs(2)).await;
                all_new &= ps.is_ok_and(|(_, ps)| {
                    json(&ps)["models"][0]["name"] == derived_name("smollm2:360m", 1).as_str()
                });
            }
            all_new.then_some(l)
        },
    )
    .await;
    let (ready, running, samples) = sampler.finish().await;
    eprintln!("model rollout: fewest ready {ready}, fewest running {running}, {samples} samples");
    assert!(
        ready >= 3 && running >= 3,
        "{ready} ready, {running} running"
    );
    assert_eq!(done.len(), 4);
    let journal =
        std::fs::read_to_string(world.dir.join("models/.sim-pulls.log")).expect("journal");
    let pulls: Vec<&str> = journal.lines().filter(|l| l.starts_with("start")).collect();
    assert_eq!(pulls.len(), 2, "one pull per model on the node:\n{journal}");
}

/// An embedding-only model refuses /api/generate; the agent warms it with an embed instead, so
/// the fleet becomes Ready (issue 12: it never did).
#[tokio::test]
async fn an_embedding_model_becomes_ready() {
    let world = World::new("lc-embed");
    let base = free_port_range(2);
    let manifest = fleet(&world, "emb", 2, base, "", "")
        .replace(&format!("model: {MODEL}"), "model: all-minilm:22m");
    world.apply(&manifest);
    let agent = world.agent("node-1", &[]);
    let ready = wait_ready(&agent, "emb", 2, 90).await;
    for i in &ready {
        let address = i["address"].as_str().expect("address");
        let (_, ps) = get(&format!("http://{address}/api/ps")).await;
        assert_eq!(
            json(&ps)["models"][0]["name"],
            derived_name("all-minilm:22m", 1),
            "loaded before Ready"
        );
        let (status, body) = post(
            &format!("http://{address}/api/embed"),
            json!({"model": "all-minilm:22m", "input": "hello"}),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(
            json(&body)["embeddings"][0].as_array().map(Vec::len),
            Some(384)
        );
    }
}

/// The thread count per instance (issue 12): two fleets with different CPU allowances share one
/// cache (one pull, a derived model each); a CPU rollout of one of them under steady requests
/// (each instance asked for the model it loaded, as the gateway does) never makes an old
/// instance reload, the new ones run with the new count, and the derivation nobody uses any
/// more is removed.
#[tokio::test]
async fn thread_counts_change_without_reloads() {
    let world = World::new("lc-threads");
    let base = free_port_range(8);
    let rollout = "  rollout: {maxUnavailable: 1}\n";
    let one = fleet(&world, "a", 3, base, "", rollout).replace("cpus: 1.5,", "cpus: 1,");
    let two = fleet(&world, "b", 2, base + 4, "", "").replace("cpus: 1.5,", "cpus: 2,");
    world.apply(&one);
    world.apply(&two);
    let agent = world.agent("node-1", &[]);
    wait_ready(&agent, "a", 3, 120).await;
    wait_ready(&agent, "b", 2, 120).await;
    for (fleet, threads) in [("a", 1), ("b", 2)] {
        for i in listed(&agent, fleet).await {
            let (_, ps) = get(&format!(
                "http://{}/api/ps",
                i["address"].as_str().unwrap_or("")
            ))
            .await;
            assert_eq!(
                json(&ps)["models"][0]["name"],
                derived_name(MODEL, threads),
                "{fleet}"
            );
        }
    }

    // Steady requests at fleet a's instances, each naming the model it loaded; the highest
    // load count each instance ever reported.
    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("http://{}/instances", agent.listen);
    let (s, u) = (stop.clone(), url.clone());
    let load = tokio::spawn(async move {
        let mut loads: BTreeMap<String, u64> = BTreeMap::new();
        while !s.load(Ordering::SeqCst) {
            let Ok((200, body)) = fleet_e2e::request("GET", &u, None, Duration::from_secs(2)).await
            else {
                continue;
            };
            for i in json(&body)["instances"]
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                if i["fleet"] != "a" || i["ready"] != true {
                    continue;
                }
                let address = i["address"].as_str().unwrap_or("");
                let Ok((_, ps)) = fleet_e2e::request(
                    "GET",
                    &format!("http://{address}/api/ps"),
                    None,
                    Duration::from_secs(2),
                )
                .await
                else {
                    continue;
                };
                let Some(model) = json(&ps)["models"][0]["name"].as_str().map(str::to_string)
                else {
                    continue;
                };
                let body = json!({"model": model, "prompt": "hi", "stream": false, "options": {"num_predict": 2}});
                let _ = fleet_e2e::request(
                    "POST",
                    &format!("http://{address}/api/generate"),
                    Some(&body),
                    Duration::from_secs(5),
                )
                .await;
                if let Ok((_, state)) = fleet_e2e::request(
                    "GET",
                    &format!("http://{address}/sim/state"),
                    None,
                    Duration::from_secs(2),
                )
                .await
                {
                    let n = json(&state)["loads"].as_u64().unwrap_or(0);
                    let id = i["id"].as_str().unwrap_or("").to_string();
                    let e = loads.entry(id).or_default();
                    *e = (*e).max(n);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        loads
    });
    let old: BTreeSet<String> = id_set(&listed(&agent, "a").await);
    world.apply(&one.replace("cpus: 1,", "cpus: 2,"));
    let done = wait_for("fleet a on 2 threads", Duration::from_secs(120), || async {
        let l = listed(&agent, "a").await;
        (ready_slots(&l) == 3 && l.len() == 3 && id_set(&l).is_disjoint(&old)).then_some(l)
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let loads = load.await.expect("load");
    let seen_old: Vec<(&String, &u64)> = loads.iter().filter(|(id, _)| old.contains(*id)).collect();
    assert!(
        !seen_old.is_empty(),
        "the old instances were asked during the rollout"
    );
    for (id, n) in &seen_old {
        assert_eq!(
            **n, 1,
            "old instance {id} reloaded during the rollout: {loads:?}"
        );
    }
    for i in &done {
        let address = i["address"].as_str().expect("address");
        let threads = threads_of(
            &format!("http://{address}/api/generate"),
            &json!({"model": derived_name(MODEL, 2), "prompt": "hi", "stream": false}),
        )
        .await;
        assert_eq!(threads.as_deref(), Some("2"), "{address}");
    }
    // Nothing runs with 1 thread any more: its derivation leaves the cache.
    let address = done[0]["address"].as_str().expect("address").to_string();
    wait_for(
        "the 1-thread derivation removed",
        Duration::from_secs(60),
        || {
            let address = address.clone();
            async move {
                let (_, tags) = get(&format!("http://{address}/api/tags")).await;
                let names: Vec<String> = json(&tags)["models"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|m| m["name"].as_str().map(str::to_string))
                    .collect();
                (!names.iter().any(|n| {
                    fleet_api::ModelRef::key(n) == fleet_api::ModelRef::key(&derived_name(MODEL, 1))
                }) && names.iter().any(|n| {
                    fleet_api::ModelRef::key(n) == fleet_api::ModelRef::key(&derived_name(MODEL, 2))
                }))
                .then_some(())
            }
        },
    )
    .await;
    let journal =
        std::fs::read_to_string(world.dir.join("models/.sim-pulls.log")).expect("journal");
    assert_eq!(
        journal.lines().filter(|l| l.starts_with("start")).count(),
        1,
        "one pull:\n{journal}"
    );
}

/// A new network.hostIP rolls out within the budget (issue 13: it was not in the spec hash, so
/// probes and endpoints moved to the new address while every instance still listened on the old
/// one, and all of them went unready at once). Old instances are probed where they listen.
#[tokio::test]
async fn a_new_host_ip_rolls_out_within_the_budget() {
    let world = World::new("lc-hostip");
    let base = free_port_range(4);
    let rollout = "  rollout: {maxUnavailable: 1}\n";
    world.apply(&fleet(&world, "h", 4, base, "", rollout));
    let agent = world.agent("node-1", &[]);
    let before = wait_ready(&agent, "h", 4, 120).await;
    let old = id_set(&before);
    let sampler = Sampler::start(&world, &agent, "h");
    world.apply(
        &fleet(&world, "h", 4, base, "", rollout).replace("hostIP: 127.0.0.1", "hostIP: 0.0.0.0"),
    );
    let after = wait_all_new(&agent, "h", 4, &old).await;
    let (ready, running, samples) = sampler.finish().await;
    eprintln!("hostIP rollout: fewest ready {ready}, fewest running {running}, {samples} samples");
    assert!(ready >= 3, "more than 1 unavailable: {ready} ready");
    for i in &after {
        assert!(
            i["address"]
                .as_str()
                .is_some_and(|a| a.starts_with("0.0.0.0:")),
            "{i}"
        );
    }
}

/// The status of `GET /` at `address`.
async fn answers(address: &str) -> Result<u16, String> {
    let url = format!("http://{address}/");
    let answer = fleet_e2e::request("GET", &url, None, Duration::from_secs(5)).await;
    answer.map(|(status, _)| status).map_err(|e| e.to_string())
}

/// The ports the fleet's instances listen on, by slot (from `/instances`), once each of them
/// answers there.
async fn listening(instances: &[Value]) -> BTreeMap<u64, u16> {
    let mut ports = BTreeMap::new();
    for i in instances {
        let address = i["address"].as_str().expect("address");
        assert_eq!(answers(address).await, Ok(200), "{address}");
        let port = address.rsplit(':').next().and_then(|p| p.parse().ok());
        ports.insert(i["slot"].as_u64().expect("slot"), port.expect("port"));
    }
    ports
}

/// Issue 20: a new basePort rolled out with every replacement on its slot's old port. It must
/// end with every slot listening on `basePort + slot`, in place (maxUnavailable 1) and with a
/// surge onto a range that overlaps the old one (the rollout runs from the range's free end).
#[tokio::test]
async fn a_new_base_port_moves_every_instance_within_the_budget() {
    let world = World::new("lc-baseport");
    let base = free_port_range(12);
    let in_place = "  rollout: {maxUnavailable: 1, maxSurge: 0}\n";
    world.apply(&fleet(&world, "p", 4, base, "", in_place));
    let agent = world.agent("node-1", &[]);
    let mut old = id_set(&wait_ready(&agent, "p", 4, 120).await);
    let home =
        |first: u16| -> BTreeMap<u64, u16> { (0..4).map(|s| (s, first + s as u16)).collect() };
    for (first, rollout, least) in [
        (base + 6, in_place, 3),
        (base + 7, "  rollout: {maxUnavailable: 0, maxSurge: 1}\n", 4),
    ] {
        let sampler = Sampler::start(&world, &agent, "p");
        world.apply(&fleet(&world, "p", 4, first, "", rollout));
        let after = wait_all_new(&agent, "p", 4, &old).await;
        let (ready, running, samples) = sampler.finish().await;
        eprintln!(
            "basePort -> {first}: fewest ready {ready}, fewest running {running}, {samples} samples"
        );
        assert!(ready >= least, "{ready} ready, fewer than {least}");
        assert_eq!(listening(&after).await, home(first), "{after:?}");
        let want = home(first);
        world
            .wait_status("p", "the status shows the new ports", 30, |s| {
                let ports: Option<BTreeMap<u64, u16>> = s["instances"].as_array().map(|a| {
                    a.iter()
                        .filter_map(|i| Some((i["slot"].as_u64()?, i["port"].as_u64()? as u16)))
                        .collect()
                });
                ports.as_ref() == Some(&want)
            })
            .await;
        old = id_set(&after);
    }
    // Nothing listens on the first range any more.
    for port in base..base + 4 {
        let gone = answers(&format!("127.0.0.1:{port}")).await;
        assert!(gone.is_err(), "port {port} still answers");
    }
}
