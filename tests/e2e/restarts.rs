//! Restarts of the agent itself, with the real containerd, etcd and sim instances: SIGTERM
//! drains the gateway and touches no instance; a restart while etcd is down still serves what
//! runs; a rolling restart of two nodes' agents behind the shipped HAProxy and nginx configs
//! fails no request at the client, and a `kill -9` fails only the requests in flight there.

use std::time::Duration;

use fleet_e2e::http::request;
use fleet_e2e::{
    AgentProcess, Load, World, all_ready, free_port, free_port_range, generations, proxy,
};
use serde_json::{Value, json};

const MODEL: &str = "smollm2:135m";

/// SIGTERM (systemctl stop or restart, a package upgrade) drains the gateway: it stops
/// accepting at once, every request already in flight streams to its end, then the agent exits
/// without touching an instance, and its successor adopts them and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_gateway_and_touches_no_instance() {
    let world = World::new("gw-sigterm");
    let base = free_port_range(3);
    // 40 tokens at 10 tokens/s: every request streams for about 4 seconds.
    let manifest = world.sim_fleet("d", 3, base, "").replace(
        "SIM_LOAD_TIME: 50ms",
        "SIM_LOAD_TIME: 50ms, SIM_TOKENS_PER_SECOND: \"10\"",
    );
    world.apply(&manifest);
    let serve = free_port();
    let url = format!("http://127.0.0.1:{serve}");
    let mut agent = world.agent("node-1", &["--serve", &format!("127.0.0.1:{serve}")]);
    let before = world.wait_status("d", "3 ready", 120, all_ready(3)).await;
    let ids: Vec<String> = ids_of(&before);

    let requests: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let body =
                    json!({"model": MODEL, "prompt": "count", "options": {"num_predict": 40}});
                request(
                    "POST",
                    &format!("{url}/api/generate"),
                    Some(&body),
                    Duration::from_secs(60),
                )
                .await
            })
        })
        .collect();
    let in_flight = tokio::time::timeout(Duration::from_secs(20), async {
        while agent.metric("ollama_fleet_inflight_requests").await < 3.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(in_flight.is_ok(), "3 requests in flight before the signal");

    agent.sigterm();
    let signalled = std::time::Instant::now();
    // New connections are refused at once (a proxy in front retries them elsewhere) while the
    // requests in flight go on.
    let refused = tokio::time::timeout(Duration::from_secs(3), async {
        while tokio::net::TcpStream::connect(("127.0.0.1", serve))
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(refused.is_ok(), "the gateway still accepts after SIGTERM");
    for r in requests {
        let (code, text) = r.await.expect("client").expect("the request is answered");
        let last: Value = text
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_default();
        assert_eq!(code, 200, "{text}");
        assert!(
            last["done"] == true && last["eval_count"] == 40,
            "every token of a request started before the signal: {text}"
        );
    }
    let status = agent
        .exited(Duration::from_secs(30))
        .await
        .expect("the agent exits once drained");
    assert!(status.success(), "{status}");
    eprintln!(
        "drained and exited {:.1}s after SIGTERM",
        signalled.elapsed().as_secs_f64()
    );
    assert!(agent.log_text().contains("gateway drained"));
    for id in &ids {
        let (state, _) = world.ns.task(id).expect("task");
        assert_eq!(state, "RUNNING", "{id} untouched by the agent's stop");
    }

    // The next agent adopts them and serves once it has probed them.
    agent.resume();
    let resumed = std::time::Instant::now();
    let serving = tokio::time::timeout(Duration::from_secs(60), async {
        while !matches!(
            request("GET", &format!("{url}/"), None, Duration::from_secs(2)).await,
            Ok((200, _))
        ) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(serving.is_ok(), "the next agent serves");
    eprintln!(
        "the next agent served {:.2}s after it was started",
        resumed.elapsed().as_secs_f64()
    );
    let listed = agent.listed(Some("d")).await;
    let mut again: Vec<String> = listed
        .iter()
        .filter_map(|i| i["id"].as_str().map(String::from))
        .collect();
    let mut first = ids.clone();
    again.sort();
    first.sort();
    assert_eq!(again, first, "the same instances, adopted");
    assert_eq!(generations(&url, MODEL, 2).await, 2);
}

/// An agent restarted while etcd is down (a package upgrade during an etcd outage) still serves
/// what runs: it recalls the fleets its node last saw, probes the instances it adopts and routes
/// to them, and changes nothing until etcd answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_while_etcd_is_down_serves_what_runs() {
    let mut etcd = fleet_e2e::PrivateEtcd::start("gw-recall");
    let world = World::with_etcd("gw-recall", &etcd.endpoint());
    let base = free_port_range(2);
    world.apply(&world.sim_fleet("r", 2, base, ""));
    let serve = free_port();
    let url = format!("http://127.0.0.1:{serve}");
    let mut agent = world.agent("node-1", &["--serve", &format!("127.0.0.1:{serve}")]);
    let before = world.wait_status("r", "2 ready", 120, all_ready(2)).await;
    agent.sigterm();
    agent
        .exited(Duration::from_secs(30))
        .await
        .expect("the agent exits");
    etcd.kill();

    agent.resume();
    let started = std::time::Instant::now();
    fleet_e2e::answers(&url).await;
    eprintln!(
        "with etcd down, the next agent served {:.2}s after it was started",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        generations(&url, MODEL, 3).await,
        3,
        "served with etcd down"
    );
    let (code, tags) = request(
        "GET",
        &format!("{url}/api/tags"),
        None,
        Duration::from_secs(5),
    )
    .await
    .expect("tags");
    assert_eq!(code, 200);
    assert!(tags.contains(MODEL), "{tags}");
    let mut listed: Vec<String> = agent
        .listed(Some("r"))
        .await
        .iter()
        .filter_map(|i| i["id"].as_str().map(String::from))
        .collect();
    let mut ids = ids_of(&before);
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids, "the same instances, nothing made or stopped");
    assert!(agent.log_text().contains("recalled"));

    // etcd back: the agent takes its fleets from it again and publishes.
    etcd.resume();
    world
        .wait_status("r", "status again", 60, all_ready(2))
        .await;
}

/// The container ids of a fleet's status.
fn ids_of(status: &Value) -> Vec<String> {
    status["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["id"].as_str().map(String::from))
        .collect()
}

/// Waits until a (restarted) agent's gateway has completed two generations (of 20 tokens): the
/// proxy in front sends it traffic again and has seen it answer (nginx only counts a node back
/// once a request to it has ended well).
async fn takes_traffic(agent: &AgentProcess, what: &str) {
    fleet_e2e::wait_for(what, Duration::from_secs(60), || async {
        (agent.metric("ollama_fleet_generated_tokens_total").await >= 40.0).then_some(())
    })
    .await;
}

/// Waits until `load` has completed `n` requests.
async fn completes(load: &Load, n: u64) {
    fleet_e2e::wait_for(
        &format!("{n} requests done"),
        Duration::from_secs(60),
        || async { (load.counts().0 >= n).then_some(()) },
    )
    .await;
}

/// The operator's rolling restart (a package upgrade, say: `systemctl restart` on one node,
/// then the next once the first takes traffic again), under steady streaming load through the
/// shipped HAProxy, then nginx: no request fails at the client. Then a `kill -9` of one agent:
/// only the requests in flight on that node fail (its instances keep running; the next agent
/// adopts them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restarts_behind_the_shipped_proxies_fail_no_request() {
    let worlds = [World::new("restart-front-1"), World::new("restart-front-2")];
    let gateways = [free_port(), free_port()];
    let mut agents = Vec::new();
    for (i, world) in worlds.iter().enumerate() {
        // 20 tokens at 20 tokens/s: every request streams for a second or two.
        let manifest = world.sim_fleet("a", 2, free_port_range(2), "").replace(
            "SIM_LOAD_TIME: 50ms",
            "SIM_LOAD_TIME: 50ms, SIM_TOKENS_PER_SECOND: \"20\"",
        );
        world.apply(&manifest);
        let serve = format!("127.0.0.1:{}", gateways[i]);
        agents.push(world.agent(&format!("node-{}", i + 1), &["--serve", &serve]));
    }
    for world in &worlds {
        world.wait_status("a", "2 ready", 120, all_ready(2)).await;
    }
    let dir = worlds[0].dir.join("proxies");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let (haproxy_port, nginx_port) = (free_port(), free_port());
    let _haproxy = proxy::shipped_haproxy(&dir, haproxy_port, gateways);
    let _nginx = proxy::shipped_nginx(&dir, nginx_port, gateways);
    let proxies = [
        ("HAProxy", format!("http://127.0.0.1:{haproxy_port}")),
        ("nginx", format!("http://127.0.0.1:{nginx_port}")),
    ];
    for (_, url) in &proxies {
        fleet_e2e::answers(url).await;
    }

    for (name, url) in &proxies {
        let load = Load::start(url, MODEL, 4, 20);
        completes(&load, 4).await;
        for (i, agent) in agents.iter_mut().enumerate() {
            let signalled = std::time::Instant::now();
            agent.sigterm();
            let status = agent
                .exited(Duration::from_secs(60))
                .await
                .expect("the agent drains and exits");
            assert!(status.success(), "{status}");
            let drained = signalled.elapsed();
            agent.resume();
            takes_traffic(
                agent,
                &format!("node {} to take traffic through {name} again", i + 1),
            )
            .await;
            eprintln!(
                "{name}: node {} drained in {:.1}s, took traffic again {:.1}s after SIGTERM",
                i + 1,
                drained.as_secs_f64(),
                signalled.elapsed().as_secs_f64()
            );
        }
        let (done, failed) = load.finish().await;
        eprintln!("rolling restart behind {name}: {done} requests done, {failed} failed");
        if failed > 0 {
            let errors = std::fs::read_to_string(dir.join("nginx.err")).unwrap_or_default();
            eprintln!("nginx's error log:\n{errors}");
        }
        assert_eq!(
            failed, 0,
            "requests failed at the client during a rolling restart behind {name}"
        );
        assert!(done >= 10, "too little load to tell: {done}");
    }

    // kill -9: the requests in flight on that node are cut (HAProxy cannot retry an answer that
    // has started); those not yet answered are retried on the other node.
    let url = &proxies[0].1;
    let load = Load::start(url, MODEL, 4, 20);
    completes(&load, 4).await;
    fleet_e2e::wait_for(
        "a request in flight on node 1",
        Duration::from_secs(30),
        || async {
            (agents[0].metric("ollama_fleet_inflight_requests").await >= 1.0).then_some(())
        },
    )
    .await;
    let in_flight = agents[0].metric("ollama_fleet_inflight_requests").await;
    agents[0].kill9();
    eprintln!("kill -9 with {in_flight} requests in flight on node 1");
    agents[0].resume();
    takes_traffic(&agents[0], "node 1 to take traffic again after kill -9").await;
    let (done, failed) = load.finish().await;
    eprintln!("kill -9 of node 1's agent behind HAProxy: {done} requests done, {failed} failed");
    assert!(
        failed <= 2,
        "only the requests in flight on node 1 (2 single-slot instances) may fail: {failed}"
    );
}

/// What clients saw through two restarts of a lone node's agent.
#[derive(Debug)]
struct Seen {
    /// New connections (each asking the gateway for its models) answered, and refused or
    /// failed; the slowest answer.
    answered: u32,
    refused: u32,
    slowest: Duration,
    /// Streaming generations done and failed.
    done: u64,
    failed: u64,
}

/// Two restarts (SIGTERM, exit, start) of `agent` while two clients stream generations through
/// `url` and four clients each open a new connection every 20 ms.
async fn two_restarts(agent: &mut AgentProcess, url: &str) -> Seen {
    let load = Load::start(url, MODEL, 2, 20);
    completes(&load, 2).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let knocks: Vec<_> = (0..4)
        .map(|_| {
            let (url, stop) = (url.to_string(), stop.clone());
            tokio::spawn(async move {
                let (mut answered, mut refused, mut slowest) = (0u32, 0u32, Duration::ZERO);
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let sent = std::time::Instant::now();
                    match request(
                        "GET",
                        &format!("{url}/api/tags"),
                        None,
                        Duration::from_secs(60),
                    )
                    .await
                    {
                        Ok((200, _)) => answered += 1,
                        _ => refused += 1,
                    }
                    slowest = slowest.max(sent.elapsed());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (answered, refused, slowest)
            })
        })
        .collect();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        agent.sigterm();
        assert!(
            agent
                .exited(Duration::from_secs(60))
                .await
                .is_some_and(|s| s.success())
        );
        agent.resume();
        fleet_e2e::answers(url).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut answered, mut refused, mut slowest) = (0, 0, Duration::ZERO);
    for k in knocks {
        let (a, r, s) = k.await.expect("knocks");
        (answered, refused, slowest) = (answered + a, refused + r, slowest.max(s));
    }
    let (done, failed) = load.finish().await;
    Seen {
        answered,
        refused,
        slowest,
        done,
        failed,
    }
}

/// With the gateway's socket kept open across restarts (systemd's socket activation, the shipped
/// `ollama-fleet-agent.socket`; here the test holds the socket and hands it to every start), a
/// lone node's restart refuses no connection: connections made while the old agent drains or
/// the new one starts wait in the socket's backlog, and the next agent serves them. Without it
/// (the agent binds `--serve` itself), the same restarts refuse connections (measured here
/// first, side by side).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_kept_across_restarts_refuses_no_connection() {
    let world = World::new("restart-socket");
    let manifest = world.sim_fleet("k", 2, free_port_range(2), "").replace(
        "SIM_LOAD_TIME: 50ms",
        "SIM_LOAD_TIME: 50ms, SIM_TOKENS_PER_SECOND: \"20\"",
    );
    world.apply(&manifest);
    let serve = format!("127.0.0.1:{}", free_port());
    let mut agent = world.agent("node-1", &["--serve", &serve]);
    world.wait_status("k", "2 ready", 120, all_ready(2)).await;
    let bound = format!("http://{serve}");
    fleet_e2e::answers(&bound).await;
    let without = two_restarts(&mut agent, &bound).await;
    eprintln!("two restarts, the agent binding --serve: {without:?}");

    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let kept = format!("http://{}", socket.local_addr().expect("addr"));
    agent.hand_socket(socket);
    fleet_e2e::answers(&kept).await;
    assert!(
        agent
            .log_text()
            .contains("the gateway serves on the socket systemd passed")
    );
    let with = two_restarts(&mut agent, &kept).await;
    eprintln!("two restarts on a kept socket: {with:?}");
    assert_eq!(
        with.refused, 0,
        "connections refused across restarts on a kept socket"
    );
    assert_eq!(
        with.failed, 0,
        "generations failed across restarts on a kept socket"
    );
    assert!(with.answered >= 10, "too few connections to tell: {with:?}");
    eprintln!(
        "on a kept socket the slowest connection waited {:.2}s (a drain and a start); {} generations done",
        with.slowest.as_secs_f64(),
        with.done
    );
}
