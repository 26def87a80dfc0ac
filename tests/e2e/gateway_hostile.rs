//! The gateway against hostile and careless clients (issue 21), with real sim instances: each
//! finding of the review, as a client makes it happen.

use std::collections::BTreeSet;
use std::time::Duration;

use fleet_e2e::http::{request_as, send};
use fleet_e2e::{AgentProcess, World, free_port, free_port_range};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MODEL: &str = "smollm2:135m";
const TOKEN: &str = "t0ken-for-tests";

/// A node serving fleet `name` of `n` sims (their env extended by `env`) through its gateway
/// (with a token, and `flags`); returns the world, the agent and the gateway's URL.
async fn serving(
    tag: &str,
    name: &str,
    n: u32,
    env: &str,
    flags: &[&str],
) -> (World, AgentProcess, String) {
    let world = World::new(tag);
    let base = free_port_range(n as u16);
    let manifest = world
        .sim_fleet(name, n, base, "")
        .replace("SIM_LOAD_TIME: 50ms", &format!("SIM_LOAD_TIME: 50ms{env}"));
    world.cli_ok(&["apply", "-f", "-"], Some(&manifest));
    let serve = free_port();
    let tokens = world.dir.join("tokens");
    std::fs::write(&tokens, format!("{TOKEN}\n")).expect("tokens");
    let (serve_at, tokens) = (format!("127.0.0.1:{serve}"), tokens.display().to_string());
    let mut args = vec!["--serve", &serve_at, "--serve-token-file", &tokens];
    args.extend_from_slice(flags);
    let agent = world.agent("node-1", &args);
    world
        .wait_status(name, "all ready", 120, |s| {
            s["readyReplicas"] == n && s["replicas"] == n
        })
        .await;
    (world, agent, format!("http://{serve_at}"))
}

const AUTH: [(&str, &str); 1] = [("authorization", "Bearer t0ken-for-tests")];

/// POSTs a raw body (JSON that `json!` cannot write: duplicate keys) with the token.
async fn post_raw(url: &str, body: &str) -> (u16, Vec<(String, String)>, String) {
    send(
        "POST",
        url,
        &AUTH,
        body.as_bytes().to_vec().into(),
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("{url}: {e}"))
}

async fn post(url: &str, body: &Value) -> (u16, String) {
    let (code, _, text) = request_as("POST", url, &AUTH, Some(body), Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    (code, text)
}

/// Finding 3 (and two of finding 8): Ollama reads `KEEP_ALIVE`, the Kelvin-sign `keep_alive`
/// and `"Options": {"num_thread": ..}` as the pinned keys; none of them reaches the instance,
/// so nothing is unloaded or reloaded. The fleet's name works as the model; the instance's own
/// response headers stay behind; every answer (401, 403, /api/show) is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinning_holds_against_every_spelling_ollama_reads() {
    let (_world, agent, url) = serving("gh-pin", "p", 1, "", &[]).await;
    let generate = format!("{url}/api/generate");
    let normal =
        json!({"model": MODEL, "prompt": "hi", "stream": false, "options": {"num_predict": 2}});
    assert_eq!(post(&generate, &normal).await.0, 200);
    let attempts = [
        "{\"model\":\"smollm2:135m\",\"prompt\":\"hi\",\"stream\":false,\"\\u212Aeep_alive\":0}",
        "{\"model\":\"smollm2:135m\",\"prompt\":\"hi\",\"stream\":false,\"KEEP_ALIVE\":0}",
        "{\"model\":\"smollm2:135m\",\"prompt\":\"hi\",\"stream\":false,\"Keep_Alive\":\"1ms\"}",
        "{\"model\":\"smollm2:135m\",\"prompt\":\"hi\",\"stream\":false,\"Options\":{\"num_thread\":64}}",
        "{\"model\":\"smollm2:135m\",\"prompt\":\"hi\",\"stream\":false,\"option\\u017F\":{\"num_thread\":3}}",
        "{\"model\":\"nope\",\"MODEL\":\"smollm2:135m\",\"prompt\":\"hi\",\"stream\":false,\"keep_alive\":0}",
    ];
    for body in attempts {
        let (code, headers, text) = post_raw(&generate, body).await;
        assert_eq!(code, 200, "{body}: {text}");
        assert!(
            !headers.iter().any(|(k, _)| k == "x-sim-num-thread"),
            "an instance's own headers reached the client: {headers:?}"
        );
        let (code, text) = post(&generate, &normal).await;
        assert_eq!(code, 200, "{text}");
    }
    assert_eq!(
        agent.metric("ollama_fleet_model_reloads_total").await,
        0.0,
        "a spelling went through: the instance unloaded or reloaded its model"
    );
    // The fleet's name as the model: the instance is told the fleet's model.
    let by_name =
        json!({"model": "p", "prompt": "hi", "stream": false, "options": {"num_predict": 1}});
    let (code, text) = post(&generate, &by_name).await;
    assert_eq!(code, 200, "{text}");
    // Every answer is counted: refusals and /api/show too.
    let no_token = fleet_e2e::get(&format!("{url}/api/tags")).await;
    assert_eq!(no_token.0, 401);
    assert_eq!(
        post(&format!("{url}/api/pull"), &json!({"model": MODEL}))
            .await
            .0,
        403
    );
    assert_eq!(
        post(&format!("{url}/api/show"), &json!({"model": MODEL}))
            .await
            .0,
        200
    );
    let (_, metrics) = agent.get("/metrics").await.expect("metrics");
    for want in [
        "ollama_fleet_requests_total{fleet=\"\",route=\"/api/tags\",code=\"401\"} 1",
        "ollama_fleet_requests_total{fleet=\"\",route=\"/api/pull\",code=\"403\"} 1",
        "ollama_fleet_requests_total{fleet=\"p\",route=\"/api/show\",code=\"200\"} 1",
    ] {
        assert!(metrics.contains(want), "{want} missing:\n{metrics}");
    }
}

/// The agent's resident memory (kB).
fn rss_kb(agent: &AgentProcess) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid().expect("pid")))
        .expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Finding 1 (and body errors of finding 8): bodies are held within the node's budget: while
/// the instance is busy, queued bodies take their bytes from it, and one that would pass it is
/// answered 503 with Retry-After; too large is 413, a body that never arrives 408, a malformed
/// chunk 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_held_within_a_node_wide_budget() {
    let flags = [
        "--serve-max-body",
        "4Mi",
        "--serve-body-budget",
        "6Mi",
        "--serve-body-timeout",
        "2s",
    ];
    let slow = ", SIM_TOKENS_PER_SECOND: \"5\"";
    let (_world, agent, url) = serving("gh-body", "b", 1, slow, &flags).await;
    let generate = format!("{url}/api/generate");
    let before = rss_kb(&agent);
    // The instance is busy for about 8 s.
    let busy = {
        let generate = generate.clone();
        tokio::spawn(async move {
            post(&generate, &json!({"model": MODEL, "prompt": "hi", "stream": false, "options": {"num_predict": 40}})).await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // 2.5 MB of messages each: two wait in the queue (5 MB held), the third would pass 6 MiB.
    let big = |i: usize| {
        let text = "x".repeat(2_500_000);
        json!({"model": MODEL, "stream": false, "messages": [{"role": "user", "content": text}], "options": {"num_predict": 1}, "i": i})
    };
    let chat = format!("{url}/api/chat");
    let queued: Vec<_> = (0..2)
        .map(|i| {
            let (chat, body) = (chat.clone(), big(i));
            tokio::spawn(async move { post(&chat, &body).await })
        })
        .collect();
    fleet_e2e::wait_for("two bodies queued", Duration::from_secs(10), || async {
        (agent.metric("ollama_fleet_queue_depth").await == 2.0).then_some(())
    })
    .await;
    let (code, headers, text) =
        request_as("POST", &chat, &AUTH, Some(&big(3)), Duration::from_secs(30))
            .await
            .expect("third");
    assert_eq!(code, 503, "{text}");
    assert!(
        headers.iter().any(|(k, _)| k == "retry-after"),
        "{headers:?}"
    );
    let during = rss_kb(&agent);
    for q in queued {
        assert_eq!(q.await.expect("queued").0, 200);
    }
    assert_eq!(busy.await.expect("busy").0, 200);
    eprintln!("agent RSS: {before} kB before, {during} kB with 5 MB of bodies queued");
    // Too large (said up front: answered before any of it is read; a client still uploading
    // may see the close before the answer, so the raw socket waits for it), never arriving,
    // broken.
    let addr = url.trim_start_matches("http://").to_string();
    let raw = |bytes: Vec<u8>| {
        let addr = addr.clone();
        async move {
            let mut c = tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect");
            c.write_all(&bytes).await.expect("write");
            let mut answer = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut answer)).await;
            assert!(read.is_ok(), "no answer within 10 s");
            String::from_utf8_lossy(&answer).into_owned()
        }
    };
    let head = |extra: &str| {
        format!(
            "POST /api/generate HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n{extra}\r\n"
        )
    };
    let huge = raw(head(&format!("Content-Length: {}\r\n", 5 << 20)).into_bytes()).await;
    assert!(huge.starts_with("HTTP/1.1 413"), "{huge}");
    let slow_body =
        raw(format!("{}{{\"model\":", head("Content-Length: 100\r\n")).into_bytes()).await;
    assert!(slow_body.starts_with("HTTP/1.1 408"), "{slow_body}");
    let broken = raw(format!(
        "{}5\r\n{{\"mod\r\nzz\r\n",
        head("Transfer-Encoding: chunked\r\nConnection: close\r\n")
    )
    .into_bytes())
    .await;
    assert!(broken.starts_with("HTTP/1.1 400"), "{broken}");
}

/// Finding 2: an answer that comes whole (`stream: false`) takes longer than the first-token
/// timeout: it is served, nothing counts as a stall, and no instance is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_whole_answer_blames_no_instance() {
    let flags = ["--serve-first-token-timeout", "2s"];
    let slow = ", SIM_TOKENS_PER_SECOND: \"4\"";
    let (world, agent, url) = serving("gh-long", "l", 2, slow, &flags).await;
    let ids = |s: &Value| -> BTreeSet<String> {
        s["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["id"].as_str().map(str::to_string))
            .collect()
    };
    let before = ids(&world.statuses("l")[0]);
    let long =
        json!({"model": MODEL, "prompt": "hi", "stream": false, "options": {"num_predict": 16}});
    let openai =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16});
    for _ in 0..2 {
        let (code, text) = post(&format!("{url}/api/generate"), &long).await;
        assert_eq!(code, 200, "{text}");
        let (code, text) = post(&format!("{url}/v1/chat/completions"), &openai).await;
        assert_eq!(code, 200, "{text}");
    }
    assert_eq!(
        agent.metric("ollama_fleet_stalled_requests_total").await,
        0.0
    );
    let after = world.statuses("l");
    assert_eq!(ids(&after[0]), before, "an instance was replaced");
}

/// Finding 4: a client that stops reading a long stream frees its instance's slot within the
/// stall timeout: the next request is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_frees_the_slot() {
    let flags = [
        "--serve-stall-timeout",
        "2s",
        "--serve-queue-timeout",
        "30s",
    ];
    let fast = ", SIM_TOKENS_PER_SECOND: \"20000\"";
    let (_world, _agent, url) = serving("gh-reader", "r", 1, fast, &flags).await;
    let addr = url.trim_start_matches("http://").to_string();
    let body =
        json!({"model": MODEL, "prompt": "hi", "options": {"num_predict": 10_000_000}}).to_string();
    // A small receive window, as a client that stops reading soon has.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut reader = socket
        .connect(addr.parse().expect("addr"))
        .await
        .expect("connect");
    let req = format!(
        "POST /api/generate HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    reader.write_all(req.as_bytes()).await.expect("write");
    let mut first = [0u8; 12];
    reader
        .read_exact(&mut first)
        .await
        .expect("the answer starts");
    assert_eq!(&first, b"HTTP/1.1 200");
    // ... and then it reads no more.
    let started = std::time::Instant::now();
    let (code, text) = post(
        &format!("{url}/api/generate"),
        &json!({"model": MODEL, "prompt": "hi", "stream": false, "options": {"num_predict": 2}}),
    )
    .await;
    assert_eq!(code, 200, "{text}");
    eprintln!(
        "served {:?} after a client stopped reading",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    drop(reader);
}

/// Finding 7: instances that close idle connections after 1 s (llama.cpp's server closes them
/// after 5 s): no request fails for a pooled connection the gateway kept too long. Two clients
/// pause about the instances' idle timeout between requests, so that some requests go out just
/// as an instance closes the connection they would reuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_an_instance_closed_fail_no_request() {
    let idle = ", SIM_IDLE_TIMEOUT: 1s";
    let (_world, agent, url) = serving("gh-idle", "i", 2, idle, &[]).await;
    let ask =
        json!({"model": MODEL, "prompt": "hi", "stream": false, "options": {"num_predict": 1}});
    let clients: Vec<_> = (0..2u64)
        .map(|c| {
            let (url, ask) = (url.clone(), ask.clone());
            tokio::spawn(async move {
                let mut failed = Vec::new();
                for i in 0..20u64 {
                    let (code, text) = post(&format!("{url}/api/generate"), &ask).await;
                    if code != 200 {
                        failed.push((code, text));
                    }
                    tokio::time::sleep(Duration::from_millis(985 + (i * 7 + c * 3) % 30)).await;
                }
                failed
            })
        })
        .collect();
    let mut failed = Vec::new();
    for c in clients {
        failed.extend(c.await.expect("client"));
    }
    assert!(
        failed.is_empty(),
        "{} of 40 failed: {failed:?}",
        failed.len()
    );
    assert!(agent.metric("ollama_fleet_instance_requests_total").await >= 40.0);
    let (_, metrics) = agent.get("/metrics").await.expect("metrics");
    assert!(
        metrics.contains("ollama_fleet_instances{fleet=\"i\",phase=\"Ready\"} 2"),
        "probes through closed connections made an instance unready:\n{metrics}"
    );
}

/// Finding 7, made certain: instances that drop a connection's third request unanswered (as a
/// server closing an idle connection just as a request arrives): the gateway sends it again on a
/// fresh connection to the same instance, so no request fails, though a single instance leaves
/// nowhere else to go; and the probes (through the same kind of pooled connection) keep it
/// ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_an_instance_dropped_unanswered_goes_again() {
    let (_world, agent, url) = serving("gh-drop", "k", 1, ", SIM_KEEPALIVE_MAX: \"2\"", &[]).await;
    let ask =
        json!({"model": MODEL, "prompt": "hi", "stream": false, "options": {"num_predict": 1}});
    let mut failed = Vec::new();
    for _ in 0..12 {
        let (code, text) = post(&format!("{url}/api/generate"), &ask).await;
        if code != 200 {
            failed.push((code, text));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 12 failed: {failed:?}",
        failed.len()
    );
    let (_, metrics) = agent.get("/metrics").await.expect("metrics");
    assert!(
        metrics.contains("ollama_fleet_instances{fleet=\"k\",phase=\"Ready\"} 1"),
        "{metrics}"
    );
}

/// Findings 5, 6 and the head buffer of 8: connections per client are bounded and the health
/// check still answers; a head that never ends is cut early; browser pages of foreign origins,
/// and requests naming a foreign Host (DNS rebinding) on a loopback gateway, are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_and_browsers_are_held_to_limits() {
    let flags = [
        "--serve-max-connections-per-client",
        "8",
        "--serve-allowed-origins",
        "https://chat.example.com",
    ];
    let (_world, _agent, url) = serving("gh-conn", "c", 1, "", &flags).await;
    let addr = url.trim_start_matches("http://").to_string();
    let raw = |bytes: String| {
        let addr = addr.clone();
        async move {
            let mut c = tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect");
            let _ = c.write_all(bytes.as_bytes()).await;
            let mut answer = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut answer)).await;
            (read.is_ok(), String::from_utf8_lossy(&answer).into_owned())
        }
    };
    // Eight idle connections take this client's share ...
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect"),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let get = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
        )
    };
    let (_, tags) = raw(get("/api/tags")).await;
    assert!(tags.starts_with("HTTP/1.1 503"), "beyond the share: {tags}");
    let (_, health) = raw(get("/")).await;
    assert!(
        health.starts_with("HTTP/1.1 200"),
        "the health check answers: {health}"
    );
    drop(idle);
    // A head that never ends is cut at the buffer's bound, not after megabytes.
    let endless = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nX-Pad: {}",
        "a".repeat(200_000)
    );
    let (answered, cut) = raw(endless).await;
    assert!(answered, "not cut within 5 s");
    assert!(!cut.contains(" 200 "), "{cut}");
    // Pages of foreign origins, a foreign Host, a form body from a page.
    let with = |headers: &[(&'static str, &'static str)]| {
        let mut all = AUTH.to_vec();
        all.extend_from_slice(headers);
        all
    };
    let tags_url = format!("{url}/api/tags");
    let ask = |headers: Vec<(&'static str, &'static str)>| {
        let tags_url = tags_url.clone();
        async move {
            request_as("GET", &tags_url, &headers, None, Duration::from_secs(10))
                .await
                .expect("request")
        }
    };
    let (code, _, _) = ask(with(&[("origin", "https://evil.example")])).await;
    assert_eq!(code, 403, "a foreign page");
    let (code, headers, _) = ask(with(&[("origin", "https://chat.example.com")])).await;
    assert_eq!(code, 200, "an allowed page");
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "access-control-allow-origin" && v == "https://chat.example.com")
    );
    let (code, _, _) = ask(with(&[("origin", "http://localhost:5173")])).await;
    assert_eq!(code, 200, "Ollama's default origins");
    let (code, _, _) = ask(with(&[("host", "evil.example")])).await;
    assert_eq!(code, 200, "a proxy (no browser headers) names its own Host");
    let rebound = [("host", "evil.example"), ("sec-fetch-mode", "cors")];
    let (code, _, _) = ask(with(&rebound)).await;
    assert_eq!(
        code, 403,
        "DNS rebinding: a browser naming a foreign Host on a loopback gateway"
    );
    let form = send(
        "POST",
        &format!("{url}/api/generate"),
        &with(&[
            ("origin", "http://localhost:5173"),
            ("content-type", "text/plain"),
        ]),
        json!({"model": MODEL, "prompt": "hi"})
            .to_string()
            .into_bytes()
            .into(),
        Duration::from_secs(10),
    )
    .await
    .expect("post");
    assert_eq!(form.0, 415, "a page's text/plain body: {}", form.2);
}
