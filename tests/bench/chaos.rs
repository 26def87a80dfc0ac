//! `--chaos` (run by `hack/chaos.sh`): faults under live traffic, counted. Two nodes (two
//! agents with their gateways, two single-slot sim instances each) behind the shipped HAProxy
//! config, a private etcd shared by both, and node 1 on a containerd of its own with its state
//! directory on a small tmpfs. Three clients stream generations through HAProxy without pause
//! (3/4 of the capacity); then one fault at a time on node 1 (or on etcd), each lifted after its
//! time, and the next only once node 1 is back at full capacity.
//!
//! Per fault: requests sent, failed (an error answer, or none), cut (an answer that started and
//! broke off), instances of node 1 replaced, lost (slots without a running instance at the end)
//! or duplicated (more running than slots), the lowest serving capacity of node 1 seen (ready
//! instances behind a gateway that answers), and the time from the fault to node 1 being back at
//! full capacity.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleet_e2e::containerd::PrivateContainerd;
use fleet_e2e::netfault::Partition;
use fleet_e2e::{
    AgentProcess, PrivateEtcd, World, free_port, free_port_range, post, proxy, request,
};
use serde_json::{Value, json};

use crate::serve::{Http, streamed};

const MODEL: &str = "smollm2:135m";
const SLOTS: u64 = 2;
const TOKENS: u64 = 20;

/// The faults, in the order they run.
pub const FAULTS: [&str; 8] = [
    "agent-sigterm",
    "agent-kill9",
    "containerd-restart",
    "etcd-stop",
    "etcd-partition",
    "instance-oom",
    "instance-hung",
    "disk-full",
];

/// Requests counted by outcome.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    cut: AtomicU64,
}

impl Tally {
    fn now(&self) -> [u64; 4] {
        [&self.sent, &self.ok, &self.failed, &self.cut].map(|c| c.load(Ordering::SeqCst))
    }
}

/// Clients streaming through `url` until `stop`.
fn clients(
    url: &str,
    n: usize,
    tally: &Arc<Tally>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let (url, tally, stop) = (format!("{url}/api/generate"), tally.clone(), stop.clone());
            tokio::spawn(async move {
                let client: Http = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build_http();
                let body =
                    json!({"model": MODEL, "prompt": "chaos", "options": {"num_predict": TOKENS}});
                while !stop.load(Ordering::SeqCst) {
                    tally.sent.fetch_add(1, Ordering::SeqCst);
                    let outcome = streamed(&client, &url, &body, Duration::from_secs(180)).await;
                    let counter = match &outcome {
                        Ok((_, lines))
                            if lines.last().is_some_and(|l| {
                                l["done"] == true && l["eval_count"] == TOKENS
                            }) =>
                        {
                            &tally.ok
                        }
                        // An answer that started: a broken stream, or one ended by an error line.
                        Ok(_) => &tally.cut,
                        Err(e) if e.starts_with("cut") => &tally.cut,
                        Err(_) => &tally.failed,
                    };
                    if !std::ptr::eq(counter, &tally.ok) {
                        eprintln!("chaos: request not served: {outcome:?}");
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect()
}

/// Node 1's running instances of the fleet (from containerd).
fn running(world: &World) -> Vec<String> {
    let out = world.ns.ctr(&["tasks", "ls"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(2) == Some("RUNNING"))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|id| id.starts_with("a-"))
        .map(String::from)
        .collect()
}

/// What one fault cost.
struct Row {
    fault: &'static str,
    counts: [u64; 4],
    replaced: usize,
    lost: u64,
    duplicated: u64,
    lowest: u64,
    lasted: Duration,
    back: Option<Duration>,
}

struct Rig {
    etcd: PrivateEtcd,
    containerd: PrivateContainerd,
    node1: World,
    agent1: AgentProcess,
    gateway1: String,
    base1: u16,
    state1: std::path::PathBuf,
}

impl Rig {
    /// Injects `fault`, lifts it after its time.
    async fn inject(&mut self, fault: &str) {
        match fault {
            "agent-sigterm" => {
                self.agent1.sigterm();
                let _ = self.agent1.exited(Duration::from_secs(150)).await;
                self.agent1.resume();
            }
            "agent-kill9" => {
                self.agent1.kill9();
                self.agent1.resume();
            }
            "containerd-restart" => {
                self.containerd.kill9();
                self.containerd.resume();
            }
            "etcd-stop" => {
                self.etcd.kill();
                tokio::time::sleep(Duration::from_secs(60)).await;
                self.etcd.resume();
            }
            "etcd-partition" => {
                let mut partition = Partition::drop_port(self.etcd.client_port());
                tokio::time::sleep(Duration::from_secs(60)).await;
                partition.heal();
            }
            "instance-oom" => {
                let url = format!("http://127.0.0.1:{}/sim/leak", self.base1);
                let _ = post(&url, json!({"rate": "256Mi"})).await;
            }
            "instance-hung" => {
                let _ = post(
                    &format!("http://127.0.0.1:{}/sim/hang", self.base1),
                    json!({}),
                )
                .await;
            }
            "disk-full" => {
                let filler = self.state1.join("filler");
                let _ = std::process::Command::new("dd")
                    .args(["if=/dev/zero", &format!("of={}", filler.display()), "bs=1M"])
                    .stderr(std::process::Stdio::null())
                    .status();
                let df = std::process::Command::new("df")
                    .args(["--output=pcent,avail"])
                    .arg(&self.state1)
                    .output()
                    .map(|o| {
                        String::from_utf8_lossy(&o.stdout)
                            .split_whitespace()
                            .skip(2)
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                let logs = std::fs::read_dir(self.state1.join("logs")).map_or(0, |d| d.count());
                println!(
                    "chaos: disk-full: node 1's state file system at {df} (used, free); {logs} instance log files on it"
                );
                tokio::time::sleep(Duration::from_secs(30)).await;
                let _ = std::fs::remove_file(&filler);
            }
            other => panic!("unknown fault {other}"),
        }
    }
}

/// Runs the faults named in `only` (all when empty) and prints the table.
pub async fn chaos_bench(only: &[String]) {
    let etcd = PrivateEtcd::start("chaos");
    let containerd = PrivateContainerd::start("chaos");
    let node1 = World::with_both("chaos-1", &containerd.socket(), &etcd.endpoint());
    let node2 = World::with_etcd("chaos-2", &etcd.endpoint());
    let (base1, base2) = (free_port_range(SLOTS as u16), free_port_range(SLOTS as u16));
    let fleet = |w: &World, base| {
        w.sim_fleet("a", SLOTS as u32, base, "")
            .replace("SIM_LOAD_TIME: 50ms", "SIM_LOAD_TIME: 50ms, SIM_TOKENS_PER_SECOND: \"20\"")
            .replace(
                "probes: {readiness: {periodSeconds: 1, timeoutSeconds: 1}}",
                "probes: {readiness: {periodSeconds: 1, timeoutSeconds: 1}, liveness: {periodSeconds: 2, timeoutSeconds: 1, failureThreshold: 3}}",
            )
    };
    node1.cli_ok(&["apply", "-f", "-"], Some(&fleet(&node1, base1)));
    node2.cli_ok(&["apply", "-f", "-"], Some(&fleet(&node2, base2)));
    // Node 1's state directory (instance logs) on a small file system of its own.
    let state1 = node1.dir.join("state-node-1");
    std::fs::create_dir_all(&state1).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "chaos-state"])
        .arg(&state1)
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "mount a tmpfs for node 1's state (needs root)");
    let gateways = [free_port(), free_port()];
    let serve = |i: usize| format!("127.0.0.1:{}", gateways[i]);
    let agent1 = node1.agent("node-1", &["--serve", &serve(0)]);
    let _agent2 = node2.agent("node-2", &["--serve", &serve(1)]);
    let all = |s: &Value| s["readyReplicas"] == SLOTS && s["replicas"] == SLOTS;
    node1.wait_status("a", "node 1 ready", 180, all).await;
    node2.wait_status("a", "node 2 ready", 180, all).await;
    let dir = node1.dir.join("proxy");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let front = free_port();
    let _haproxy = proxy::shipped_haproxy(&dir, front, gateways);
    let url = format!("http://127.0.0.1:{front}");
    fleet_e2e::wait_for("HAProxy to answer", Duration::from_secs(30), || async {
        request("GET", &format!("{url}/"), None, Duration::from_secs(2))
            .await
            .ok()
            .filter(|(c, _)| *c == 200)
    })
    .await;

    let mut rig = Rig {
        etcd,
        containerd,
        gateway1: format!("http://{}", serve(0)),
        node1,
        agent1,
        base1,
        state1: state1.clone(),
    };
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let load = clients(&url, 3, &tally, &stop);
    tokio::time::sleep(Duration::from_secs(5)).await;
    println!(
        "chaos: 2 nodes x {SLOTS} single-slot sims behind the shipped HAProxy; 3 clients streaming {TOKENS}-token generations at 20 tokens/s without pause"
    );

    let mut rows = Vec::new();
    for fault in FAULTS
        .iter()
        .filter(|f| only.is_empty() || only.iter().any(|o| o == *f))
    {
        let before = tally.now();
        let ids_before = running(&rig.node1);
        // Node 1's capacity, sampled while the fault runs and until it is back.
        let watching = Arc::new(AtomicBool::new(true));
        let lowest = Arc::new(AtomicU64::new(SLOTS));
        let sampler = {
            let (agent_listen, gateway, watching, lowest) = (
                rig.agent1.listen,
                rig.gateway1.clone(),
                watching.clone(),
                lowest.clone(),
            );
            tokio::spawn(async move {
                while watching.load(Ordering::SeqCst) {
                    let c = capacity(agent_listen, &gateway).await;
                    lowest.fetch_min(c, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        };
        // The instance an instance fault hits (slot 0's): back means replaced, too.
        let target = ids_before.iter().find(|id| id.starts_with("a-0-")).cloned();
        let hits_instance = fault.starts_with("instance-");
        let injected = Instant::now();
        rig.inject(fault).await;
        let lasted = injected.elapsed();
        // Back: full capacity, held for 3 s.
        let mut back = None;
        let mut full_since: Option<Instant> = None;
        while injected.elapsed() < Duration::from_secs(300) {
            let replaced = !hits_instance
                || target
                    .as_ref()
                    .is_none_or(|t| !running(&rig.node1).contains(t));
            if replaced && capacity(rig.agent1.listen, &rig.gateway1).await == SLOTS {
                let since = *full_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_secs(3) {
                    back = Some(since - injected);
                    break;
                }
            } else {
                full_since = None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        watching.store(false, Ordering::SeqCst);
        let _ = sampler.await;
        // A few more seconds of load: requests the fault delayed are counted with it.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = tally.now();
        let ids_after = running(&rig.node1);
        let n = ids_after.len() as u64;
        let row = Row {
            fault,
            counts: [0, 1, 2, 3].map(|i| after[i] - before[i]),
            replaced: ids_before
                .iter()
                .filter(|id| !ids_after.contains(id))
                .count(),
            lost: SLOTS.saturating_sub(n),
            duplicated: n.saturating_sub(SLOTS),
            lowest: lowest.load(Ordering::SeqCst),
            lasted,
            back,
        };
        println!("chaos: {}", line(&row));
        rows.push(row);
    }
    stop.store(true, Ordering::SeqCst);
    for t in load {
        let _ = t.await;
    }
    println!();
    println!(
        "| fault (node 1) | lasted | sent | failed | cut | replaced | lost | duplicated | lowest capacity | back to full |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{}", line(r));
    }
    drop(rig.agent1);
    // The logs stay for a look: the agents', and node 1's instances'.
    let keep = fleet_e2e::repo_root().join("target/chaos");
    let _ = std::fs::remove_dir_all(&keep);
    let _ = std::fs::create_dir_all(keep.join("instances"));
    for (world, node) in [(&rig.node1, "node-1"), (&node2, "node-2")] {
        let log = format!("agent-{node}.log");
        let _ = std::fs::copy(world.dir.join(&log), keep.join(&log));
    }
    let logs = std::fs::read_dir(state1.join("logs"));
    for entry in logs.into_iter().flatten().flatten() {
        let _ = std::fs::copy(entry.path(), keep.join("instances").join(entry.file_name()));
    }
    println!("chaos: logs kept in {}", keep.display());
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(&state1)
        .status();
}

fn line(r: &Row) -> String {
    let [sent, _, failed, cut] = r.counts;
    let back = match r.back {
        _ if r.lowest == SLOTS => "never lost".to_string(),
        Some(d) => format!("{:.1} s", d.as_secs_f64()),
        None => "not within 300 s".to_string(),
    };
    format!(
        "| {} | {:.1} s | {sent} | {failed} | {cut} | {} | {} | {} | {}/{SLOTS} | {back} |",
        r.fault,
        r.lasted.as_secs_f64(),
        r.replaced,
        r.lost,
        r.duplicated,
        r.lowest
    )
}

/// Node 1's serving capacity: its ready instances (from the agent at `listen`), when its
/// gateway answers.
async fn capacity(listen: std::net::SocketAddr, gateway: &str) -> u64 {
    let health = request("GET", &format!("{gateway}/"), None, Duration::from_secs(1)).await;
    if !matches!(health, Ok((200, _))) {
        return 0;
    }
    match request(
        "GET",
        &format!("http://{listen}/instances"),
        None,
        Duration::from_secs(1),
    )
    .await
    {
        Ok((200, body)) => serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| {
                v["instances"].as_array().map(|a| {
                    a.iter()
                        .filter(|i| i["fleet"] == "a" && i["ready"] == true)
                        .count() as u64
                })
            })
            .unwrap_or(0),
        _ => 0,
    }
}
