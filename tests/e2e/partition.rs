//! A node that loses etcd silently (issue 11): packets between the agent and etcd are dropped
//! for longer than the session's lease (iptables DROP on the private etcd's port), then the path
//! comes back. Facts are asserted (instances keep running, a crash is replaced during the
//! partition, the node and status keys come back by themselves, an edit converges, the CLI fails
//! in bounded time with one line); timings are printed (hack/bench-partition.sh collects them).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use fleet_e2e::netfault::Partition;
use fleet_e2e::{AgentProcess, PrivateEtcd, World, free_port_range, wait_for};
use serde_json::Value;

/// How long the partition lasts: twice the 15 s lease TTL.
const PARTITION: Duration = Duration::from_secs(30);

/// slot -> (id, ready) from the agent's own /instances.
async fn slots(agent: &AgentProcess) -> BTreeMap<u64, (String, bool)> {
    agent
        .listed(None)
        .await
        .into_iter()
        .filter_map(|i| {
            Some((
                i["slot"].as_u64()?,
                (i["id"].as_str()?.to_string(), i["ready"] == true),
            ))
        })
        .collect()
}

/// Kills slot `slot`'s instance and waits until the agent lists a ready replacement; returns
/// how long that took.
async fn kill_and_replace(world: &World, agent: &AgentProcess, slot: u64) -> Duration {
    let before = slots(agent).await;
    let (old, _) = before.get(&slot).cloned().expect("the slot runs");
    let started = Instant::now();
    world.ns.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &old]);
    wait_for(
        &format!("slot {slot} replaced"),
        Duration::from_secs(20),
        || async {
            let now = slots(agent).await;
            now.get(&slot)
                .is_some_and(|(id, ready)| *id != old && *ready)
                .then_some(())
        },
    )
    .await;
    started.elapsed()
}

/// The keys of node-1 in etcd: (node key present, status key of `fleet` with its readyReplicas).
fn keys(etcd: &PrivateEtcd, prefix: &str, fleet: &str) -> (bool, Option<i64>) {
    let get = |key: String| {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .env_remove("ETCDCTL_ENDPOINTS")
            .args(["--endpoints", &etcd.endpoint(), "--command-timeout=2s"])
            .args(["get", &key, "--print-value-only"])
            .output()
            .expect("etcdctl");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let node = !get(format!("{prefix}/nodes/node-1")).is_empty();
    let status: Value =
        serde_json::from_str(&get(format!("{prefix}/status/{fleet}/node-1"))).unwrap_or_default();
    (node, status["readyReplicas"].as_i64())
}

#[tokio::test]
async fn a_silent_partition_from_etcd_heals_by_itself() {
    let etcd = PrivateEtcd::start("partition");
    let world = World::with_etcd("partition", &etcd.endpoint());
    let base = free_port_range(6);
    world.cli_ok(
        &["apply", "-f", "-"],
        Some(&world.sim_fleet("p", 3, base, "")),
    );
    let agent = world.agent("node-1", &[]);
    world
        .wait_status("p", "3 ready", 60, |s| s["readyReplicas"] == 3)
        .await;
    let baseline = kill_and_replace(&world, &agent, 0).await;
    let before = slots(&agent).await;

    let mut cut = Partition::drop_port(etcd.client_port());
    let cut_at = Instant::now();
    // The CLI fails in bounded time, in one line.
    let started = Instant::now();
    let out = world.cli(&["get", "fleets"], None);
    let cli_time = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: cannot reach etcd at"), "{err}");
    assert!(
        cli_time < Duration::from_secs(30),
        "the CLI gave up after {cli_time:?}"
    );
    // A crash during the partition is replaced without etcd.
    let during = kill_and_replace(&world, &agent, 1).await;
    // Hold the partition past the lease's TTL: etcd drops the node's keys.
    if let Some(rest) = PARTITION.checked_sub(cut_at.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let (node_key, status_key) = keys(&etcd, &world.prefix, "p");
    cut.heal();
    let healed = Instant::now();
    assert!(
        !node_key && status_key.is_none(),
        "the keys expired with the lease during the partition (read via etcd, which was reachable)"
    );
    wait_for(
        "the node and status keys back",
        Duration::from_secs(60),
        || async {
            let (node, ready) = keys(&etcd, &world.prefix, "p");
            (node && ready == Some(3)).then_some(())
        },
    )
    .await;
    let back = healed.elapsed();

    // Nothing restarted besides the instance killed during the partition.
    let after = slots(&agent).await;
    for (slot, (id, _)) in &before {
        if *slot != 1 {
            assert_eq!(
                after.get(slot).map(|(i, _)| i),
                Some(id),
                "slot {slot} restarted"
            );
        }
    }
    // An edit after the heal converges.
    world.apply_sim("p", 4, base).await;
    eprintln!(
        "partition: crash replacement {} ms before, {} ms during the partition; CLI failed after {} ms; keys back {} ms after the heal (lease TTL 15 s, partition {} s)",
        baseline.as_millis(),
        during.as_millis(),
        cli_time.as_millis(),
        back.as_millis(),
        PARTITION.as_secs()
    );
}
