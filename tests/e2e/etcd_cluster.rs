//! etcd as users run it in production (issue 11): a three-member cluster on loopback, the agent
//! given every endpoint. The leader killed, a member restarted, a member cut off from the others
//! and from clients: nothing running is touched, the node's keys stay current, edits converge.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use fleet_e2e::netfault::Partition;
use fleet_e2e::{AgentProcess, PrivateEtcd, World, free_port_range, wait_for};
use serde_json::Value;

/// `etcdctl` against the members still up; its stdout, if it succeeded.
fn etcdctl(endpoints: &str, args: &[&str]) -> Option<String> {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .env_remove("ETCDCTL_ENDPOINTS")
        .args(["--endpoints", endpoints, "--command-timeout=3s"])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The index of the member that leads, asked of the members in `up`.
fn leader(members: &[PrivateEtcd], up: &[usize]) -> Option<usize> {
    let endpoints: Vec<String> = up.iter().map(|i| members[*i].endpoint()).collect();
    let out = etcdctl(&endpoints.join(","), &["endpoint", "status", "-w", "json"])?;
    let statuses: Vec<Value> = serde_json::from_str(&out).ok()?;
    statuses.iter().find_map(|s| {
        let st = &s["Status"];
        let me = st["header"]["member_id"].as_u64()?;
        (st["leader"].as_u64()? == me).then(|| {
            let ep = s["Endpoint"].as_str().unwrap_or("");
            members.iter().position(|m| m.endpoint() == ep)
        })?
    })
}

async fn ids(agent: &AgentProcess) -> BTreeMap<u64, String> {
    agent
        .listed(None)
        .await
        .into_iter()
        .filter_map(|i| Some((i["slot"].as_u64()?, i["id"].as_str()?.to_string())))
        .collect()
}

/// Waits until the node key and the fleet's status on node-1 (with `ready` ready) are in etcd,
/// read from the members in `up`.
async fn keys_current(world: &World, members: &[PrivateEtcd], up: &[usize], ready: i64) {
    let endpoints: Vec<String> = up.iter().map(|i| members[*i].endpoint()).collect();
    let endpoints = endpoints.join(",");
    wait_for("the node's keys current", Duration::from_secs(45), || {
        let node = etcdctl(
            &endpoints,
            &[
                "get",
                &format!("{}/nodes/node-1", world.prefix),
                "--print-value-only",
            ],
        );
        let status = etcdctl(
            &endpoints,
            &[
                "get",
                &format!("{}/status/c/node-1", world.prefix),
                "--print-value-only",
            ],
        );
        let ok = node.is_some_and(|n| !n.trim().is_empty())
            && status
                .and_then(|s| serde_json::from_str::<Value>(s.trim()).ok())
                .is_some_and(|s| s["readyReplicas"] == ready);
        async move { ok.then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn a_three_member_cluster_loses_its_leader_a_member_and_a_link() {
    let mut members = PrivateEtcd::cluster("cluster", 3);
    let all: Vec<String> = members.iter().map(PrivateEtcd::endpoint).collect();
    let world = World::with_etcd("etcd-cluster", &all.join(","));
    let base = free_port_range(8);
    wait_for("a leader", Duration::from_secs(30), || {
        let l = leader(&members, &[0, 1, 2]);
        async move { l }
    })
    .await;
    world.cli_ok(
        &["apply", "-f", "-"],
        Some(&world.sim_fleet("c", 3, base, "")),
    );
    let agent = world.agent("node-1", &[]);
    world
        .wait_status("c", "3 ready", 60, |s| s["readyReplicas"] == 3)
        .await;
    let before = ids(&agent).await;

    // The leader dies: another is elected; the agent's lease, keys and watch carry on.
    let first = leader(&members, &[0, 1, 2]).expect("a leader");
    members[first].kill();
    let up: Vec<usize> = (0..3).filter(|i| *i != first).collect();
    wait_for("a new leader", Duration::from_secs(30), || {
        let l = leader(&members, &up);
        async move { l.filter(|l| *l != first) }
    })
    .await;
    world.apply_sim("c", 4, base).await;
    keys_current(&world, &members, &up, 4).await;

    // It comes back and rejoins.
    members[first].resume();
    wait_for("three members again", Duration::from_secs(30), || {
        let healthy = etcdctl(&all.join(","), &["endpoint", "health"]).is_some();
        async move { healthy.then_some(()) }
    })
    .await;

    // A member is cut off from clients and peers: the others keep a quorum.
    let victim = leader(&members, &[0, 1, 2]).map_or(0, |l| (l + 1) % 3);
    let mut cut = (
        Partition::drop_port(members[victim].client_port()),
        Partition::drop_port(members[victim].peer_port()),
    );
    let up: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    world.cli_ok(
        &["apply", "-f", "-"],
        Some(&world.sim_fleet("c", 3, base, "")),
    );
    world
        .wait_status("c", "3 ready with a member cut off", 60, |s| {
            s["readyReplicas"] == 3 && s["replicas"] == 3
        })
        .await;
    keys_current(&world, &members, &up, 3).await;
    cut.0.heal();
    cut.1.heal();

    // Through it all, slots 0..=2 kept their instances.
    let after = ids(&agent).await;
    for slot in 0..3 {
        assert_eq!(
            after.get(&slot),
            before.get(&slot),
            "slot {slot} was restarted"
        );
    }
    keys_current(&world, &members, &[0, 1, 2], 3).await;
}
