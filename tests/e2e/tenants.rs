//! Tenants at the gateway with the real containerd, etcd and sim instances, spoken to by the
//! official clients (PyPI `ollama` and `openai`): every refusal (401, 403, 429 with
//! `Retry-After`) in the shape each client reads, counted by tenant in `/metrics`; and the keys
//! file rewritten again and again under load without a request lost. The fair order itself is
//! a table test on paused time (fleet-agent `gateway::pool`), and the share under a flood is
//! measured by `hack/bench-tenants.sh`.

use std::time::Duration;

use fleet_e2e::http::request;
use fleet_e2e::{World, all_ready, free_port, free_port_range, python};

/// Runs a Python script with the official clients; it must print `ok` last.
async fn run_python(script: String) -> String {
    let py = python();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(py)
            .args(["-c", &script])
            .output()
            .expect("python")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && stdout.trim().ends_with("ok"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A node with two single-slot sims of fleet `g` behind its gateway, its keys in `keys`.
async fn node(world: &World, keys: &str) -> (fleet_e2e::AgentProcess, String, std::path::PathBuf) {
    let base = free_port_range(2);
    world.apply(&world.sim_fleet("g", 2, base, ""));
    let file = world.dir.join("keys.yaml");
    std::fs::write(&file, keys).expect("keys");
    let serve = free_port();
    let agent = world.agent(
        "node-1",
        &[
            "--serve",
            &format!("127.0.0.1:{serve}"),
            "--serve-token-file",
            &file.display().to_string(),
        ],
    );
    world.wait_status("g", "2 ready", 120, all_ready(2)).await;
    (agent, format!("http://127.0.0.1:{serve}"), file)
}

const KEYS: &str = r#"# tenants of the refusal test
tenants:
  editors: {models: [g]}
  other-team: {models: [qwen2.5-coder]}
  one-at-a-time: {concurrency: 1}
  few-requests: {requestsPerMinute: 2}
  few-tokens: {tokensPerMinute: 30}
keys:
  - {name: alice, tenant: editors, token: alice-0123456789abcdef}
  - {name: bob, tenant: other-team, token: bob-0123456789abcdef}
  - {name: carol, tenant: one-at-a-time, token: carol-0123456789abcdef}
  - {name: dave, tenant: few-requests, token: dave-0123456789abcdef}
  - {name: erin, tenant: few-tokens, token: erin-0123456789abcdef}
"#;

/// Then `ollama-fleet usage` prints who used what, from the agent's `/metrics` and from a real
/// Prometheus that scraped it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_refusal_reaches_the_official_clients_in_their_shape() {
    let world = World::new("tenants-refusals");
    let (agent, url, _) = node(&world, KEYS).await;
    let prom_dir = world.dir.join("prometheus");
    std::fs::create_dir_all(&prom_dir).expect("mkdir");
    let prom_port = free_port();
    let scraped = agent.listen.to_string();
    let _prometheus = fleet_e2e::proxy::prometheus(&prom_dir, prom_port, &[&scraped]);
    let prom = format!("http://127.0.0.1:{prom_port}");
    // Prometheus has the tenants' series (at 0) before the traffic: increase() sees it all.
    let up = format!("{prom}/api/v1/query?query=ollama_fleet_tenant_refusals_total");
    fleet_e2e::wait_for(
        "Prometheus scrapes the agent",
        Duration::from_secs(60),
        || async {
            let body = request("GET", &up, None, Duration::from_secs(2))
                .await
                .ok()?
                .1;
            body.contains("few-tokens").then_some(())
        },
    )
    .await;
    let script = format!(
        r#"
import threading, httpx, ollama, openai, sys
url = {url:?}
M = "smollm2:135m"
def native(token):
    return ollama.Client(host=url, headers={{"Authorization": "Bearer " + token}})
def oai(token):
    return openai.OpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
def refused(call, status, words):
    try:
        call()
    except ollama.ResponseError as e:
        assert e.status_code == status and words in e.error, (status, e.status_code, e.error)
        return e
    sys.exit(f"not refused: {{status}} {{words}}")
def refused_v1(call, kind, status, code):
    try:
        call()
    except kind as e:
        assert e.status_code == status, (e.status_code, e.body)
        assert e.body["code"] == code and e.body["message"], e.body
        return e
    sys.exit(f"not refused on /v1: {{kind}}")
chat = lambda c, **kw: c.chat.completions.create(model=M, messages=[{{"role": "user", "content": "hi"}}], max_tokens=4, **kw)

# 401: no key, an unknown one.
refused(lambda: native("not-a-key-0123456789").generate(model=M, prompt="hi"), 401, "unauthorized")
refused(lambda: ollama.Client(host=url).list(), 401, "unauthorized")
refused_v1(lambda: chat(oai("not-a-key-0123456789")), openai.AuthenticationError, 401, "invalid_api_key")

# 403: a model the tenant may not use; it is not listed either.
alice, bob = native("alice-0123456789abcdef"), native("bob-0123456789abcdef")
assert alice.generate(model=M, prompt="hi", options={{"num_predict": 3}}).done
assert alice.generate(model="g", prompt="hi", options={{"num_predict": 3}}).done, "by the fleet's name"
refused(lambda: bob.generate(model=M, prompt="hi"), 403, "may not use model")
refused(lambda: bob.show(M), 403, "may not use model")
assert [m.model for m in alice.list().models] == [M]
assert bob.list().models == [], bob.list()
refused_v1(lambda: chat(oai("bob-0123456789abcdef")), openai.PermissionDeniedError, 403, "model_not_allowed")

# 429, requests at once: a stream in progress, then a second request.
carol = native("carol-0123456789abcdef")
stream = carol.generate(model=M, prompt="hi", stream=True, options={{"num_predict": 60}})
first = next(stream)
e = refused(lambda: carol.generate(model=M, prompt="again"), 429, "requests in progress")
e = refused_v1(lambda: chat(oai("carol-0123456789abcdef")), openai.RateLimitError, 429, "rate_limit_exceeded")
assert e.response.headers["retry-after"] == "1", e.response.headers
rest = list(stream)
assert rest[-1].done, rest[-1]
assert carol.generate(model=M, prompt="after", options={{"num_predict": 3}}).done, "its place is free again"

# 429, requests per minute: two go, the third waits about half a minute.
dave = native("dave-0123456789abcdef")
for _ in range(2):
    assert dave.generate(model=M, prompt="hi", options={{"num_predict": 3}}).done
refused(lambda: dave.generate(model=M, prompt="hi"), 429, "requests in the last minute")
r = httpx.post(url + "/api/generate", json={{"model": M, "prompt": "hi"}}, headers={{"Authorization": "Bearer dave-0123456789abcdef"}})
assert r.status_code == 429 and 25 <= int(r.headers["retry-after"]) <= 31, (r.status_code, r.headers)
assert r.json()["error"].startswith("rate limit"), r.text

# 429, tokens per minute: one answer of 40 tokens takes the minute's 30 and more.
erin = native("erin-0123456789abcdef")
assert erin.generate(model=M, prompt="hi", options={{"num_predict": 40}}).eval_count == 40
refused(lambda: erin.generate(model=M, prompt="hi"), 429, "tokens per minute")
e = refused_v1(lambda: chat(oai("erin-0123456789abcdef")), openai.RateLimitError, 429, "rate_limit_exceeded")
assert int(e.response.headers["retry-after"]) >= 20, e.response.headers
print("ok")
"#
    );
    run_python(script).await;
    let metrics = request(
        "GET",
        &format!("http://{}/metrics", agent.listen),
        None,
        Duration::from_secs(5),
    )
    .await
    .expect("metrics")
    .1;
    for (tenant, reason, n) in [
        ("", "unauthorized", 3),
        ("other-team", "model", 3),
        ("one-at-a-time", "concurrency", 2),
        ("few-requests", "requests", 2),
        ("few-tokens", "tokens", 2),
        ("editors", "busy", 0),
    ] {
        let series = format!(
            "ollama_fleet_tenant_refusals_total{{tenant=\"{tenant}\",reason=\"{reason}\"}} {n}"
        );
        assert!(metrics.contains(&series), "{series} in:\n{metrics}");
    }
    for series in [
        "ollama_fleet_tenant_requests_total{tenant=\"editors\",fleet=\"g\",code=\"200\"} 2",
        "ollama_fleet_tenant_generated_tokens_total{tenant=\"few-tokens\",fleet=\"g\"} 40",
        "ollama_fleet_tenant_time_to_first_token_seconds_count{tenant=\"editors\"} 2",
    ] {
        assert!(metrics.contains(series), "{series} in:\n{metrics}");
    }
    // The usage table, from the agent.
    let from_agent = format!("http://{}", agent.listen);
    let table = world.cli_ok(&["usage", "--agent", &from_agent], None);
    let row = |tenant: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(tenant))
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_else(|| panic!("no row for {tenant} in:\n{table}"))
    };
    assert!(table.starts_with("TENANT"), "{table}");
    // TENANT REQUESTS OK REFUSED PROMPT GENERATED TTFT-P50 TTFT-P99 QUEUE-P99
    assert_eq!(row("editors")[1..4], ["2", "2", "0"], "{table}");
    assert_eq!(row("few-tokens")[3], "tokens=2", "{table}");
    assert_eq!(row("few-tokens")[5], "40", "{table}");
    assert_eq!(row("(unknown)")[3], "unauthorized=3", "{table}");
    // From Prometheus, over a window.
    let asked = || {
        world.cli(
            &[
                "usage",
                "--prometheus",
                &prom,
                "--window",
                "5m",
                "-o",
                "json",
            ],
            None,
        )
    };
    let tokens_refused = fleet_e2e::wait_for(
        "the refusals in Prometheus",
        Duration::from_secs(30),
        || async {
            let out = asked();
            let usage: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let few = usage
                .as_array()?
                .iter()
                .find(|u| u["tenant"] == "few-tokens")?
                .clone();
            (few["refused"]["tokens"].as_f64()? >= 1.0).then_some(few)
        },
    )
    .await;
    // (A series that appears with its first request starts there: Prometheus' increase()
    // counts from its second sample; the refusal series start at 0 with the agent.)
    assert!(tokens_refused["requests"].is_number(), "{tokens_refused}");
}

/// The keys file is replaced (as `install`, Ansible or a secret manager write it) twenty times
/// while four clients generate without pause: no request fails; a key added last works and a
/// key taken out is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_read_again_under_load_drop_no_request() {
    let world = World::new("tenants-reload");
    let first = "tenants:\n  editors: {concurrency: 64}\nkeys:\n  - {name: steady, tenant: editors, token: steady-0123456789abcdef}\n  - {name: leaving, tenant: editors, token: leaving-0123456789abcdef}\n";
    let (_agent, url, file) = node(&world, first).await;
    let script = format!(
        r#"
import json, os, threading, time, ollama
url, path = {url:?}, {path:?}
M = "smollm2:135m"
done = {{"ok": 0, "failed": []}}
lock = threading.Lock()
stop = time.time() + 10
def client():
    c = ollama.Client(host=url, headers={{"Authorization": "Bearer steady-0123456789abcdef"}})
    while time.time() < stop:
        try:
            r = c.generate(model=M, prompt="hello", options={{"num_predict": 4}})
            assert r.done
            with lock: done["ok"] += 1
        except Exception as e:
            with lock: done["failed"].append(repr(e))
threads = [threading.Thread(target=client) for _ in range(4)]
for t in threads: t.start()
for i in range(20):
    limit = 32 + i
    text = "tenants:\n  editors: {{concurrency: %d}}\n  others: {{priority: batch}}\nkeys:\n" % limit
    text += "  - {{name: steady, tenant: editors, token: steady-0123456789abcdef}}\n"
    text += "".join("  - {{name: k%d, tenant: others, token: k%d-0123456789abcdef}}\n" % (j, j) for j in range(i + 1))
    with open(path + ".new", "w") as f: f.write(text)
    os.replace(path + ".new", path)
    time.sleep(0.4)
for t in threads: t.join()
def status(token):
    c = ollama.Client(host=url, headers={{"Authorization": "Bearer " + token}})
    try:
        c.generate(model=M, prompt="hi", options={{"num_predict": 2}})
        return 200
    except ollama.ResponseError as e:
        return e.status_code
deadline = time.time() + 5
while status("k19-0123456789abcdef") != 200 and time.time() < deadline: time.sleep(0.2)
assert status("k19-0123456789abcdef") == 200, "the key added last"
assert status("leaving-0123456789abcdef") == 401, "the key taken out"
print(json.dumps({{"ok": done["ok"], "failed": done["failed"][:5], "failures": len(done["failed"])}}))
print("ok")
"#,
        path = file.display().to_string()
    );
    let out = run_python(script).await;
    let line = out.lines().find(|l| l.starts_with('{')).expect("counts");
    let counts: serde_json::Value = serde_json::from_str(line).expect("json");
    assert_eq!(counts["failures"], 0, "{counts}");
    assert!(counts["ok"].as_u64().unwrap_or(0) >= 40, "{counts}");
    eprintln!("keys replaced 20 times under load: {counts}");
}

/// Two nodes behind the shipped HAProxy share one etcd: each counts the nodes that serve the
/// gateway (their node records say so) and takes half of every tenant limit, so a tenant's
/// 20 requests a minute hold for the cluster, not 20 per node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_for_the_cluster() {
    let one = World::new("tenants-cluster-1");
    let mut two = World::new("tenants-cluster-2");
    // Two machines: their own containerd (namespaces here), one etcd prefix.
    two.prefix = one.prefix.clone();
    let keys = one.dir.join("keys.yaml");
    std::fs::write(
        &keys,
        "tenants:\n  shared: {requestsPerMinute: 20}\nkeys:\n  - {name: ci, tenant: shared, token: ci-0123456789abcdef}\n",
    )
    .expect("keys");
    let gateways = [free_port(), free_port()];
    let mut agents = Vec::new();
    for (i, (world, fleet)) in [(&one, "a"), (&two, "b")].into_iter().enumerate() {
        let selector = format!("  nodeSelector: {{n: \"{}\"}}\n", i + 1);
        one.apply(&world.sim_fleet(fleet, 1, free_port_range(1), &selector));
        let serve = format!("127.0.0.1:{}", gateways[i]);
        let label = format!("n={}", i + 1);
        let args = [
            "--serve",
            serve.as_str(),
            "--serve-token-file",
            &keys.display().to_string(),
            "--label",
            &label,
        ];
        agents.push(world.agent(&format!("node-{}", i + 1), &args));
    }
    for fleet in ["a", "b"] {
        one.wait_status(fleet, "1 ready", 120, all_ready(1)).await;
    }
    for agent in &agents {
        let metrics = format!("http://{}/metrics", agent.listen);
        fleet_e2e::wait_for("both nodes counted", Duration::from_secs(30), || async {
            let text = request("GET", &metrics, None, Duration::from_secs(5))
                .await
                .ok()?
                .1;
            text.contains("ollama_fleet_gateway_nodes 2").then_some(())
        })
        .await;
    }
    let dir = one.dir.join("proxy");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let port = free_port();
    let _haproxy = fleet_e2e::proxy::shipped_haproxy(&dir, port, gateways);
    fleet_e2e::answers(&format!("http://127.0.0.1:{port}")).await;
    let url = format!("http://127.0.0.1:{port}/api/generate");
    let ask = serde_json::json!({"model": "smollm2:135m", "prompt": "hi", "stream": false, "options": {"num_predict": 2}});
    let auth = [("authorization", "Bearer ci-0123456789abcdef")];
    let (mut ok, mut limited, mut other) = (0, 0, Vec::new());
    for _ in 0..40 {
        let answer =
            fleet_e2e::http::request_as("POST", &url, &auth, Some(&ask), Duration::from_secs(10))
                .await;
        match answer.map(|a| a.0) {
            Ok(200) => ok += 1,
            Ok(429) => limited += 1,
            got => other.push(format!("{got:?}")),
        }
    }
    eprintln!(
        "40 requests of a tenant limited to 20 a minute, over 2 nodes: {ok} served, {limited} refused (429), other {other:?}"
    );
    assert!(other.is_empty(), "{other:?}");
    assert!(
        (18..=22).contains(&ok),
        "the cluster let {ok} of 40 in; the limit is 20 a minute"
    );
}
