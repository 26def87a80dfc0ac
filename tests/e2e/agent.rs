//! The reconcile loop end to end: the real `ollama-fleet` binary, a real etcd, a real
//! containerd with runc, and the ollama-sim image. Everything is driven through the public
//! interface: the CLI, etcdctl, ctr, and the agent's HTTP endpoints.

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_e2e::containerd::cgroup_v1_dir;
use fleet_e2e::{World, free_port, free_port_range, get, json, post, wait_for};
use serde_json::{Value, json};

fn ids(status: &Value) -> BTreeMap<u64, String> {
    status["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    (
                        i["slot"].as_u64().unwrap_or(0),
                        i["id"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn ready(n: u64) -> impl Fn(&Value) -> bool {
    move |s: &Value| {
        s["readyReplicas"] == n
            && s["replicas"] == n
            && s["instances"]
                .as_array()
                .is_some_and(|a| a.len() as u64 == n)
    }
}

#[tokio::test]
async fn the_reconcile_loop_end_to_end() {
    let world = World::new("agent");
    let base = free_port_range(6);
    let manifest_path = world.dir.join("sim.yaml");
    std::fs::write(&manifest_path, world.sim_fleet("sim", 4, base, "")).expect("write manifest");

    // A container that is not ours, in the same namespace: it must survive everything.
    let stranger_port = free_port();
    world.ns.ctr_ok(&[
        "run",
        "-d",
        "--net-host",
        "--env",
        &format!("OLLAMA_HOST=127.0.0.1:{stranger_port}"),
        &world.ns.env.sim_image,
        "stranger",
    ]);

    // apply: created, then unchanged.
    let out = world.cli_ok(
        &["apply", "-f", manifest_path.to_str().expect("utf-8")],
        None,
    );
    assert_eq!(out, "ollamafleet/sim created\n");
    let out = world.cli_ok(
        &["apply", "-f", manifest_path.to_str().expect("utf-8")],
        None,
    );
    assert_eq!(out, "ollamafleet/sim unchanged\n");

    let mut agent = world.agent("node-1", &[]);
    let s = world
        .wait_status("sim", "4 instances ready", 60, ready(4))
        .await;
    assert!(
        s["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .all(|i| i["restarts"] == 0),
        "a clean start restarts nothing: {s}"
    );
    assert_eq!(s["desiredReplicas"], 4);
    assert_eq!(s["updatedReplicas"], 4);
    let table = world.cli_ok(&["get", "fleets"], None);
    assert!(table.starts_with("NAME   MODEL          NODES   DESIRED   READY   UP-TO-DATE   AGE\nsim    smollm2:135m   1       4         4       4"), "{table}");

    // Every task runs with the fleet's limits in its cgroups, on its port.
    for (slot, id) in ids(&s) {
        let (state, pid) = world.ns.task(&id).expect("task");
        assert_eq!(state, "RUNNING", "{id}");
        let mem = cgroup_v1_dir(pid, "memory").expect("memory cgroup");
        assert_eq!(
            std::fs::read_to_string(mem.join("memory.limit_in_bytes"))
                .expect("limit")
                .trim(),
            (128u64 << 20).to_string()
        );
        // No swap: memory + swap is the limit (this kernel accounts swap per cgroup).
        assert_eq!(
            std::fs::read_to_string(mem.join("memory.memsw.limit_in_bytes"))
                .expect("memsw limit (swap accounting)")
                .trim(),
            (128u64 << 20).to_string()
        );
        let cpu = cgroup_v1_dir(pid, "cpu").expect("cpu cgroup");
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu.cfs_quota_us"))
                .expect("quota")
                .trim(),
            "50000"
        );
        let port = base + slot as u16;
        let (code, body) = get(&format!("http://127.0.0.1:{port}/api/version")).await;
        assert_eq!(
            (code, json(&body)["version"].clone()),
            (200, json!("0.4.0"))
        );
    }
    // /instances lists every instance for load balancers.
    let listed = agent.instances().await.expect("/instances");
    assert_eq!(listed["node"], "node-1");
    let endpoints = listed["instances"].as_array().expect("instances");
    assert_eq!(endpoints.len(), 4);
    assert!(
        endpoints
            .iter()
            .all(|e| e["ready"] == true && e["fleet"] == "sim")
    );
    assert!(
        endpoints
            .iter()
            .any(|e| e["address"] == format!("127.0.0.1:{base}"))
    );

    // A killed task is replaced; its exit is in status.
    let before = ids(&s);
    let victim = before[&1].clone();
    world
        .ns
        .ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &victim]);
    let s = world
        .wait_status("sim", "slot 1 replaced after a kill", 30, |s| {
            ready(4)(s) && ids(s).get(&1).is_some_and(|id| *id != victim)
        })
        .await;
    let slot1 = s["instances"]
        .as_array()
        .expect("i")
        .iter()
        .find(|i| i["slot"] == 1)
        .cloned()
        .expect("slot 1");
    assert_eq!(slot1["restarts"], 1);
    assert_eq!(slot1["lastExit"]["code"], 137);
    assert!(
        world.ns.task(&victim).is_none(),
        "the old container is gone"
    );

    // An instance that outgrows its memory is OOM-killed, reported as such, and replaced.
    let victim = ids(&s)[&2].clone();
    let (code, _) = post(
        &format!("http://127.0.0.1:{}/sim/leak", base + 2),
        json!({"rate": "400Mi"}),
    )
    .await;
    assert_eq!(code, 200);
    let s = world
        .wait_status("sim", "slot 2 OOMKilled and replaced", 30, |s| {
            ready(4)(s)
                && s["instances"].as_array().is_some_and(|a| {
                    a.iter().any(|i| {
                        i["slot"] == 2
                            && i["id"] != victim.as_str()
                            && i["lastExit"]["reason"] == "OOMKilled"
                    })
                })
        })
        .await;

    // kill -9 the agent and start it again: the same containers keep running.
    let before = ids(&s);
    agent.kill9();
    agent.resume();
    wait_for(
        "the restarted agent to answer",
        Duration::from_secs(30),
        || async {
            agent.instances().await.filter(|v| {
                v["instances"]
                    .as_array()
                    .is_some_and(|a| a.len() == 4 && a.iter().all(|e| e["ready"] == true))
            })
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = world
        .wait_status("sim", "4 ready after the agent restart", 30, ready(4))
        .await;
    assert_eq!(ids(&s), before, "adoption: no instance was restarted");
    for id in before.values() {
        assert_eq!(world.ns.task(id).map(|t| t.0).as_deref(), Some("RUNNING"));
    }

    // etcdctl put of a changed count converges.
    world.etcdctl_put("sim", &world.sim_fleet("sim", 2, base, ""));
    let s = world
        .wait_status("sim", "2 instances after etcdctl put", 30, ready(2))
        .await;
    let kept = ids(&s);
    assert_eq!(kept.keys().copied().collect::<Vec<_>>(), [0, 1]);
    wait_for(
        "slots 2 and 3 to leave containerd",
        Duration::from_secs(30),
        || {
            let gone = world.ns.task(&before[&2]).is_none() && world.ns.task(&before[&3]).is_none();
            async move { gone.then_some(()) }
        },
    )
    .await;

    // A malformed document is reported, and nothing that runs is disturbed.
    world.etcdctl_put("sim", "spec: {replicas: [oops");
    let s = world
        .wait_status("sim", "SpecValid=False", 30, |s| {
            s["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "SpecValid" && c["status"] == "False")
            })
        })
        .await;
    assert_eq!(ids(&s), kept);
    fleet_e2e::holds_for(
        "the instances of the broken fleet running",
        Duration::from_secs(2),
        || async {
            kept.values()
                .all(|id| world.ns.task(id).map(|t| t.0).as_deref() == Some("RUNNING"))
        },
    )
    .await;

    // delete: every instance goes, and its status.
    world.etcdctl_put("sim", &world.sim_fleet("sim", 2, base, ""));
    world.wait_status("sim", "valid again", 30, ready(2)).await;
    assert_eq!(
        world.cli_ok(&["delete", "fleet", "sim"], None),
        "ollamafleet/sim deleted\n"
    );
    wait_for(
        "every instance of the fleet to be removed",
        Duration::from_secs(30),
        || {
            let left = world
                .ns
                .ctr_ok(&["containers", "ls", "-q"])
                .lines()
                .filter(|id| id.starts_with("sim-"))
                .count();
            async move { (left == 0).then_some(()) }
        },
    )
    .await;
    let status_keys = world.cli_ok(&["get", "instances", "-o", "json"], None);
    wait_for("the status keys to go", Duration::from_secs(15), || {
        let v: Value =
            serde_json::from_str(&world.cli_ok(&["get", "instances", "-o", "json"], None))
                .unwrap_or_default();
        async move {
            v["items"]
                .as_array()
                .is_some_and(|a| a.is_empty())
                .then_some(())
        }
    })
    .await;
    let _ = status_keys;
    let out = world.cli(&["delete", "fleet", "sim"], None);
    assert_eq!(
        out.status.code(),
        Some(1),
        "deleting what is gone is an error"
    );

    // The stranger was never touched.
    assert_eq!(
        world.ns.task("stranger").map(|t| t.0).as_deref(),
        Some("RUNNING")
    );
    assert!(
        !agent.log_text().contains("stranger"),
        "the agent never acted on the unlabelled container"
    );
    let nodes = world.cli_ok(&["get", "nodes"], None);
    assert!(nodes.contains("node-1"), "{nodes}");
}

#[tokio::test]
async fn standalone_mode_reads_a_manifests_directory() {
    let world = World::new("standalone");
    let base = free_port_range(4);
    let dir = world.dir.join("fleets");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("sim.yaml"), world.sim_fleet("solo", 2, base, "")).expect("write");
    // No etcd at all: point at a port nobody listens on.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let agent = world.agent(
        "solo-node",
        &[
            "--manifests",
            dir.to_str().expect("utf-8"),
            "--etcd-endpoints",
            &dead,
        ],
    );

    let ready_count = |v: &Value| {
        v["instances"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|e| e["ready"] == true).count())
    };
    wait_for(
        "2 ready instances from the directory",
        Duration::from_secs(60),
        || async { agent.instances().await.filter(|v| ready_count(v) == 2) },
    )
    .await;
    let (code, body) = agent.get("/healthz").await.expect("healthz");
    assert_eq!((code, body.trim()), (200, "ok"));
    let (code, body) = agent.get("/readyz").await.expect("readyz");
    assert_eq!((code, body.trim()), (200, "ok"), "ready once converged");

    // Edits are picked up.
    std::fs::write(dir.join("sim.yaml"), world.sim_fleet("solo", 3, base, "")).expect("rewrite");
    wait_for(
        "3 ready after the edit",
        Duration::from_secs(60),
        || async { agent.instances().await.filter(|v| ready_count(v) == 3) },
    )
    .await;

    // A broken file disturbs nothing.
    std::fs::write(dir.join("sim.yaml"), "spec: [broken").expect("break");
    fleet_e2e::holds_for(
        "3 ready while a file cannot be read",
        Duration::from_secs(3),
        || async {
            agent
                .instances()
                .await
                .is_some_and(|v| ready_count(&v) == 3)
        },
    )
    .await;

    // Removing the file removes the fleet.
    std::fs::remove_file(dir.join("sim.yaml")).expect("rm");
    wait_for(
        "no instances after the file is gone",
        Duration::from_secs(60),
        || async {
            agent
                .instances()
                .await
                .filter(|v| v["instances"].as_array().is_some_and(|a| a.is_empty()))
        },
    )
    .await;
    let (_, metrics) = agent.get("/metrics").await.expect("metrics");
    assert!(
        metrics.contains("ollama_fleet_reconcile_passes_total"),
        "{metrics}"
    );
}

/// containerd dies and comes back: instances keep serving meanwhile, the agent restarts nothing
/// when containerd returns, and still replaces a task killed afterwards (its event stream and
/// view are rebuilt).
#[tokio::test]
async fn containerd_restarts_disturb_nothing() {
    let mut cd = fleet_e2e::containerd::PrivateContainerd::start("restart");
    let world = World::with_containerd("cdrestart", &cd.socket());
    let base = free_port_range(3);
    world.cli_ok(
        &["apply", "-f", "-"],
        Some(&world.sim_fleet("sim", 2, base, "")),
    );
    let _agent = world.agent("node-r", &[]);
    let s = world.wait_status("sim", "2 ready", 60, ready(2)).await;
    let before = ids(&s);

    cd.kill9();
    for port in [base, base + 1] {
        let (code, _) = get(&format!("http://127.0.0.1:{port}/api/version")).await;
        assert_eq!(code, 200, "instances keep serving while containerd is down");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    cd.resume();

    let s = world
        .wait_status("sim", "2 ready after containerd came back", 60, |s| {
            ready(2)(s) && s["updatedAt"].as_str().is_some()
        })
        .await;
    assert_eq!(ids(&s), before, "nothing was restarted");
    let victim = before[&0].clone();
    world
        .ns
        .ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &victim]);
    let s = world
        .wait_status(
            "sim",
            "the killed task replaced after the containerd restart",
            60,
            |s| ready(2)(s) && ids(s).get(&0).is_some_and(|id| *id != victim),
        )
        .await;
    assert_eq!(ids(&s)[&1], before[&1]);
}

/// etcd dies and comes back: every instance keeps running and serving meanwhile, the agent does
/// not restart anything, and converges to a change made once etcd is back.
#[tokio::test]
async fn etcd_outages_disturb_nothing() {
    let mut etcd = fleet_e2e::PrivateEtcd::start("outage");
    let world = World::with_etcd("etcdout", &etcd.endpoint());
    let base = free_port_range(4);
    world.cli_ok(
        &["apply", "-f", "-"],
        Some(&world.sim_fleet("sim", 2, base, "")),
    );
    let agent = world.agent("node-e", &[]);
    let s = world.wait_status("sim", "2 ready", 60, ready(2)).await;
    let before = ids(&s);

    let readyz = || async { agent.get("/readyz").await.unwrap_or_default() };
    assert_eq!(readyz().await.0, 200, "ready before the outage");

    etcd.kill();
    wait_for(
        "/readyz to report the outage",
        Duration::from_secs(60),
        || async {
            Some(readyz().await).filter(|(code, body)| *code == 503 && body.contains("etcd"))
        },
    )
    .await;
    for port in [base, base + 1] {
        let (code, _) = get(&format!("http://127.0.0.1:{port}/api/version")).await;
        assert_eq!(code, 200, "instances keep serving while etcd is down");
    }
    let listed = agent
        .instances()
        .await
        .expect("the agent keeps answering while etcd is down");
    assert_eq!(listed["instances"].as_array().map(Vec::len), Some(2));
    for id in before.values() {
        assert_eq!(world.ns.task(id).map(|t| t.0).as_deref(), Some("RUNNING"));
    }

    etcd.resume();
    wait_for(
        "the CLI to reach etcd again",
        Duration::from_secs(30),
        || {
            let ok = world.cli(&["get", "fleets"], None).status.success();
            async move { ok.then_some(()) }
        },
    )
    .await;
    world.cli_ok(
        &["apply", "-f", "-"],
        Some(&world.sim_fleet("sim", 3, base, "")),
    );
    let s = world
        .wait_status("sim", "3 ready after the outage", 60, ready(3))
        .await;
    let after = ids(&s);
    assert_eq!(
        (after[&0].clone(), after[&1].clone()),
        (before[&0].clone(), before[&1].clone()),
        "the first two were never restarted"
    );
    wait_for(
        "/readyz to be ok again",
        Duration::from_secs(30),
        || async { (readyz().await.0 == 200).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn describe_and_logs() {
    let world = World::new("describe");
    let base = free_port_range(2);
    world.cli_ok(
        &["apply", "-f", "-"],
        Some(&world.sim_fleet("desc", 2, base, "")),
    );
    let _agent = world.agent(
        "node-1",
        &["--log-max-size", "2Ki", "--log-check-interval", "1s"],
    );
    let s = world
        .wait_status("desc", "2 instances ready", 60, ready(2))
        .await;
    let out = world.cli_ok(&["describe", "fleet", "desc"], None);
    for want in [
        "Name:         desc",
        "Model:        smollm2:135m",
        "Rollout:      maxUnavailable 25%, maxSurge 0",
        "Node node-1 (current;",
        "Instances: 2 desired, 2 ready, 2 up to date (2 Ready)",
        "Available     True",
        "Recent exits: none",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    let missing = world.cli(&["describe", "fleet", "nope"], None);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("ollamafleet/nope not found"));

    // The instance's log, from the agent's state directory on this node.
    let id = s["instances"][0]["id"].as_str().expect("id").to_string();
    let state = world.dir.join("state-node-1");
    let state = state.to_str().expect("utf-8");
    let log = world.cli_ok(&["logs", &id, "--state-dir", state], None);
    assert!(log.contains("llama runner started"), "{log}");
    let tail = world.cli_ok(&["logs", &id, "--state-dir", state, "--tail", "1"], None);
    assert_eq!(tail.lines().count(), 1, "{tail}");
    let absent = world.cli(&["logs", "desc-9-000000", "--state-dir", state], None);
    assert_eq!(absent.status.code(), Some(1));

    // Logs are rotated by size (2Ki here; the sim logs every request, probes included), and
    // `logs` prints the rotated part before the current one.
    let logs = world.dir.join("state-node-1/logs");
    let rotated = logs.join(format!("{id}.log.1"));
    wait_for("the log rotated", Duration::from_secs(60), || async {
        rotated.exists().then_some(())
    })
    .await;
    let current = std::fs::metadata(logs.join(format!("{id}.log")))
        .expect("current log")
        .len();
    assert!(
        current < 2048 + 1024,
        "the current part was truncated: {current} bytes"
    );
    let all = world.cli_ok(&["logs", &id, "--state-dir", state], None);
    assert!(
        all.len() > 2048,
        "the rotated part (over 2Ki) and the current one: {} bytes",
        all.len()
    );
    assert!(all.contains("[GIN]"), "{all}");
}

/// An instance is stopped with its own terminationGracePeriod even when its fleet is gone
/// (issue 13: a deleted fleet's instances got the default 30 s). The sim ignores SIGTERM here,
/// so only the SIGKILL after the grace (2 s) ends it.
#[tokio::test]
async fn a_deleted_fleets_instances_keep_their_own_grace() {
    let world = World::new("grace");
    let base = free_port_range(2);
    let manifest = world.sim_fleet("g", 2, base, "").replace(
        "SIM_LOAD_TIME: 50ms}",
        "SIM_LOAD_TIME: 50ms, SIM_IGNORE_SIGTERM: \"1\"}",
    );
    world.cli_ok(&["apply", "-f", "-"], Some(&manifest));
    let _agent = world.agent("node-1", &[]);
    world
        .wait_status("g", "2 ready", 60, |s| s["readyReplicas"] == 2)
        .await;
    let started = std::time::Instant::now();
    world.cli_ok(&["delete", "fleet", "g"], None);
    wait_for("every instance gone", Duration::from_secs(20), || async {
        let left = world.ns.ctr_ok(&["containers", "ls", "-q"]);
        left.lines().all(|l| !l.starts_with("g-")).then_some(())
    })
    .await;
    eprintln!(
        "deleted fleet with a 2s grace: instances gone after {:?}",
        started.elapsed()
    );
}
