//! The node gateway (`agent --serve`) with the real containerd, etcd and sim instances: the
//! official Python client speaks to it as to Ollama, a rollout under load loses nothing
//! (instances are drained before they are stopped), and the shipped nginx and HAProxy configs
//! balance over two nodes' gateways. Restarts of the agent itself are in restarts.rs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fleet_e2e::http::request;
use fleet_e2e::proxy;
use fleet_e2e::{Load, World, all_ready, free_port, free_port_range, generations, python};
use serde_json::{Value, json};

const MODEL: &str = "smollm2:135m";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_client_speaks_to_the_gateway() {
    let world = World::new("gw-client");
    let base = free_port_range(2);
    world.apply(&world.sim_fleet("g", 2, base, ""));
    let serve = free_port();
    let tokens = world.dir.join("tokens");
    std::fs::write(&tokens, "t0ken-for-tests\n").expect("tokens");
    let _agent = world.agent(
        "node-1",
        &[
            "--serve",
            &format!("127.0.0.1:{serve}"),
            "--serve-token-file",
            &tokens.display().to_string(),
        ],
    );
    world.wait_status("g", "2 ready", 120, all_ready(2)).await;
    let url = format!("http://127.0.0.1:{serve}");
    // Without the token only the health check answers.
    assert_eq!(fleet_e2e::get(&format!("{url}/")).await.0, 200);
    let (code, body) = fleet_e2e::get(&format!("{url}/api/tags")).await;
    assert_eq!((code, body.as_str()), (401, "{\"error\":\"unauthorized\"}"));
    let script = format!(
        r#"
import ollama, sys
c = ollama.Client(host={url:?}, headers={{"Authorization": "Bearer t0ken-for-tests"}})
r = c.generate(model={MODEL:?}, prompt="hello there", options={{"num_predict": 5, "num_thread": 64}}, keep_alive=0)
assert r.done and r.response, r
parts = list(c.chat(model={MODEL:?}, messages=[{{"role": "user", "content": "hi"}}], stream=True, options={{"num_predict": 5}}))
assert parts[-1].done and parts[-1].eval_count == 5, parts[-1]
assert c.show({MODEL:?}).details is not None
names = [m.model for m in c.list().models]
assert names == [{MODEL:?}], names
loaded = [m.model for m in c.ps().models]
assert loaded and all(n.startswith("smollm2:135m") for n in loaded), loaded
for call in (lambda: c.pull({MODEL:?}), lambda: c.delete({MODEL:?})):
    try:
        call()
        sys.exit("a management call went through")
    except ollama.ResponseError as e:
        assert e.status_code == 403 and "managed by ollama-fleet" in e.error, (e.status_code, e.error)
try:
    c.generate(model="nope:1b", prompt="hi")
    sys.exit("an unknown model was served")
except ollama.ResponseError as e:
    assert e.status_code == 404, e.status_code
print("ok")
"#
    );
    let py = python();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(py)
            .args(["-c", &script])
            .output()
            .expect("python")
    })
    .await
    .expect("join");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The OpenAI-compatible routes go to the instances too.
    let auth = [("authorization", "Bearer t0ken-for-tests")];
    let chat =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let (code, _, body) = fleet_e2e::http::request_as(
        "POST",
        &format!("{url}/v1/chat/completions"),
        &auth,
        Some(&chat),
        Duration::from_secs(30),
    )
    .await
    .expect("chat completions");
    let answer: Value = serde_json::from_str(&body).unwrap_or_default();
    assert_eq!(code, 200, "{body}");
    assert_eq!(answer["object"], "chat.completion", "{body}");
    let (code, _, body) = fleet_e2e::http::request_as(
        "GET",
        &format!("{url}/v1/models"),
        &auth,
        None,
        Duration::from_secs(10),
    )
    .await
    .expect("models");
    assert_eq!(code, 200);
    assert!(body.contains(MODEL), "{body}");
    // The instances kept what the agent set: no reload from the client's keep_alive=0 or
    // num_thread.
    let metrics = request(
        "GET",
        &format!("http://{}/metrics", _agent.listen),
        None,
        Duration::from_secs(5),
    )
    .await
    .expect("metrics")
    .1;
    assert!(
        metrics.contains("ollama_fleet_model_reloads_total{fleet=\"g\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ollama_fleet_generated_tokens_total{fleet=\"g\"} 14"),
        "{metrics}"
    );
    metrics_are_well_formed_and_feed_the_dashboard(&metrics);
}

/// `promtool check metrics` accepts the exposition, and every metric the Grafana dashboard
/// queries is in it.
fn metrics_are_well_formed_and_feed_the_dashboard(metrics: &str) {
    let mut promtool = std::process::Command::new("promtool");
    promtool.args(["check", "metrics"]);
    let out = fleet_e2e::run_with_stdin(promtool, Some(metrics));
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let path = fleet_e2e::repo_root().join("manifests/grafana/ollama-fleet.json");
    let text = std::fs::read_to_string(&path).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("json");
    let mut queried = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        // (A row holds no query.)
        for target in panel["targets"].as_array().into_iter().flatten() {
            let mut rest = target["expr"].as_str().expect("expr");
            while let Some(at) = rest.find("ollama_fleet_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                queried.insert(name);
            }
        }
    }
    assert!(queried.len() >= 12, "{queried:?}");
    let exposed: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = queried
        .iter()
        .filter(|m| !exposed.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics /metrics lacks: {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_under_load_loses_no_request() {
    let world = World::new("gw-drain");
    let base = free_port_range(3);
    // 20 tokens at 20 tokens/s: every request runs for about a second.
    let manifest = |greeting: &str| {
        world
            .sim_fleet("d", 3, base, "  rollout: {maxUnavailable: 1}\n")
            .replace(
                "SIM_LOAD_TIME: 50ms",
                &format!(
                    "SIM_LOAD_TIME: 50ms, SIM_TOKENS_PER_SECOND: \"20\", GREETING: {greeting}"
                ),
            )
            .replace("terminationGracePeriod: 2s", "terminationGracePeriod: 10s")
    };
    world.apply(&manifest("one"));
    let serve = free_port();
    let agent = world.agent("node-1", &["--serve", &format!("127.0.0.1:{serve}")]);
    let before = world.wait_status("d", "3 ready", 120, all_ready(3)).await;
    let load = Load::start(&format!("http://127.0.0.1:{serve}"), MODEL, 4, 20);
    tokio::time::sleep(Duration::from_secs(2)).await;
    world.apply(&manifest("two"));
    let old = before["instances"][0]["specHash"].clone();
    world
        .wait_status("d", "every instance replaced", 120, |s| {
            all_ready(3)(s)
                && s["instances"]
                    .as_array()
                    .is_some_and(|a| a.iter().all(|i| i["specHash"] != old))
        })
        .await;
    let (done, failed) = load.finish().await;
    eprintln!("rollout under load: {done} requests done, {failed} failed");
    assert_eq!(failed, 0, "requests were lost during the rollout");
    assert!(done >= 12, "too little load to tell: {done}");
    assert!(
        agent.log_text().contains("drained before stopping"),
        "no instance had requests to drain"
    );
}

/// The shipped nginx and HAProxy examples, in front of two nodes' gateways: requests are
/// spread over both, and a node with no ready instance (its gateway's `GET /` says 503) is
/// skipped without a failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_and_haproxy_balance_over_two_gateways() {
    // Two nodes: two agents, each with its own containerd namespace and etcd prefix (as two
    // machines would have their own containerd), each running a fleet of the same model.
    let (world, other) = (World::new("gw-proxies-1"), World::new("gw-proxies-2"));
    let (base_one, base_two) = (free_port_range(2), free_port_range(2));
    world.apply(&world.sim_fleet("a", 2, base_one, ""));
    other.apply(&other.sim_fleet("a", 2, base_two, ""));
    let gateways = [free_port(), free_port()];
    let serve = |i: usize| format!("127.0.0.1:{}", gateways[i]);
    let one = world.agent("node-1", &["--serve", &serve(0)]);
    let two = other.agent("node-2", &["--serve", &serve(1)]);
    world
        .wait_status("a", "2 ready on node 1", 120, all_ready(2))
        .await;
    other
        .wait_status("a", "2 ready on node 2", 120, all_ready(2))
        .await;

    let dir = world.dir.join("proxies");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let (nginx_port, haproxy_port) = (free_port(), free_port());
    let _nginx = proxy::shipped_nginx(&dir, nginx_port, gateways);
    let _haproxy = proxy::shipped_haproxy(&dir, haproxy_port, gateways);
    let proxies = [
        format!("http://127.0.0.1:{nginx_port}"),
        format!("http://127.0.0.1:{haproxy_port}"),
    ];
    for url in &proxies {
        fleet_e2e::answers(url).await;
    }
    for url in &proxies {
        assert_eq!(generations(url, MODEL, 8).await, 8, "through {url}");
    }
    assert!(
        one.metric("ollama_fleet_instance_requests_total").await >= 1.0,
        "node 1 served nothing"
    );
    assert!(
        two.metric("ollama_fleet_instance_requests_total").await >= 1.0,
        "node 2 served nothing"
    );

    // Node 2 loses its instances: its gateway says 503 (on GET /, and to requests), and the
    // proxies go to node 1.
    other.apply(&other.sim_fleet("a", 0, base_two, ""));
    fleet_e2e::wait_for(
        "node 2's gateway to report no ready instance",
        Duration::from_secs(60),
        || async {
            request(
                "GET",
                &format!("http://{}/", serve(1)),
                None,
                Duration::from_secs(2),
            )
            .await
            .ok()
            .filter(|(c, _)| *c == 503)
        },
    )
    .await;
    for url in &proxies {
        assert_eq!(
            generations(url, MODEL, 8).await,
            8,
            "through {url} with node 2 empty"
        );
    }
}

/// A new model rolls out behind the gateway: each instance serves in the pool of the model it
/// runs, so a request for the new model never goes to an instance still serving the old one
/// (which would load it: a reload, and its own model unloaded), and the old model keeps being
/// served while instances of it remain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_model_rolls_out_behind_the_gateway() {
    const NEW: &str = "smollm2:360m";
    let world = World::new("gw-model");
    let base = free_port_range(2);
    let rollout = "  rollout: {maxUnavailable: 1}\n";
    world.apply(&world.sim_fleet("m", 2, base, rollout));
    let serve = free_port();
    let agent = world.agent("node-1", &["--serve", &format!("127.0.0.1:{serve}")]);
    let before = world.wait_status("m", "2 ready", 120, all_ready(2)).await;
    let url = format!("http://127.0.0.1:{serve}/api/generate");
    let (stop, applied) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let asker = {
        let (url, stop, applied) = (url.clone(), stop.clone(), applied.clone());
        tokio::spawn(async move {
            let mut seen: Vec<(&str, u16, String)> = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                // The new model only once a fleet names it.
                let model = if i % 2 == 0 || !applied.load(Ordering::SeqCst) {
                    MODEL
                } else {
                    NEW
                };
                i += 1;
                let ask = json!({"model": model, "prompt": "hi", "stream": false, "options": {"num_predict": 1}});
                let (code, text) = request("POST", &url, Some(&ask), Duration::from_secs(30))
                    .await
                    .unwrap_or((0, String::new()));
                let answered = serde_json::from_str::<Value>(&text).unwrap_or_default()["model"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                seen.push((model, code, answered));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    world.apply(
        &world
            .sim_fleet("m", 2, base, rollout)
            .replace(&format!("model: {MODEL}"), &format!("model: {NEW}")),
    );
    applied.store(true, Ordering::SeqCst);
    let old = before["instances"][0]["specHash"].clone();
    world
        .wait_status("m", "both instances on the new model", 120, |s| {
            all_ready(2)(s)
                && s["instances"]
                    .as_array()
                    .is_some_and(|a| a.iter().all(|i| i["specHash"] != old))
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = asker.await.expect("asker");
    let served_new = seen
        .iter()
        .filter(|(m, c, _)| *m == NEW && *c == 200)
        .count();
    let served_old = seen
        .iter()
        .filter(|(m, c, _)| *m == MODEL && *c == 200)
        .count();
    eprintln!(
        "model rollout behind the gateway: {} requests, {served_old} of the old model and {served_new} of the new served",
        seen.len()
    );
    for (model, code, answered) in &seen {
        if *code == 200 {
            assert_eq!(answered, model, "answered by another model");
        }
    }
    // Each model's answers go through phases, never back: the new one is unknown (until the
    // agent has seen the new spec), then waits for its first instance, then is served; the old
    // one is served until its last instance leaves (503, retryable, while it drains) and is gone.
    let phases = |model: &str, order: &[u16]| {
        let codes: Vec<u16> = seen.iter().filter(|s| s.0 == model).map(|s| s.1).collect();
        let rank = |c: &u16| order.iter().position(|o| o == c);
        assert!(
            codes.iter().all(|c| rank(c).is_some())
                && codes.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])),
            "{model}: {codes:?} (expected the phases {order:?})"
        );
    };
    phases(NEW, &[404, 503, 200]);
    phases(MODEL, &[200, 503, 404]);
    assert!(served_new >= 2 && served_old >= 2, "{seen:?}");
    assert_eq!(
        agent.metric("ollama_fleet_model_reloads_total").await,
        0.0,
        "a request made an instance load another model"
    );
}
