//! The node gateway against in-process fake instances (each an axum server that answers like
//! Ollama, or misbehaves on demand): routes, dispatch, queueing, pinning, failover, watchdog,
//! auth, metrics. The real sim and the official Python client are in tests/e2e/gateway.rs.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fleet_agent::gateway::{Backend, Gateway, GatewayConfig, routes};
use fleet_agent::prom::{Expose, Exposition};
use fleet_e2e::http::request_as;
use fleet_e2e::{get as http_get, post as http_post, wait_for};
use serde_json::{Value, json};

/// The gateway's share of `/metrics`, read back strictly.
fn exposed(gw: &Gateway) -> String {
    let mut e = Exposition::new();
    gw.expose(&mut e);
    let text = e.finish();
    if let Err(e) = fleet_agent::prom::check(&text) {
        panic!("{e}\n{text}");
    }
    text
}

/// How a fake instance behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Streams three lines over `delay`, then the final one.
    Ok,
    /// 500 at once.
    Fails,
    /// Accepts, never answers.
    Silent,
    /// One line, then nothing.
    Stalls,
}

#[derive(Default)]
struct Fake {
    mode: Mutex<Option<Mode>>,
    delay: Mutex<Duration>,
    bodies: Mutex<Vec<Value>>,
    in_flight: AtomicU32,
    most: AtomicU32,
    served: AtomicU32,
}

type Shared = Arc<Fake>;

async fn generate(State(f): State<Shared>, body: axum::Json<Value>) -> Response {
    f.bodies.lock().expect("bodies").push(body.0.clone());
    f.served.fetch_add(1, Ordering::SeqCst);
    let mode = f.mode.lock().expect("mode").unwrap_or(Mode::Ok);
    let delay = *f.delay.lock().expect("delay");
    match mode {
        Mode::Fails => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "{\"error\":\"boom\"}").into_response();
        }
        Mode::Silent => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return StatusCode::OK.into_response();
        }
        Mode::Ok | Mode::Stalls => {}
    }
    let now = f.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    f.most.fetch_max(now, Ordering::SeqCst);
    let model = body.0["model"].clone();
    if body.0["stream"] == false {
        // The whole answer at the end, as Ollama sends a non-streamed one.
        tokio::time::sleep(delay).await;
        f.in_flight.fetch_sub(1, Ordering::SeqCst);
        return axum::Json(
            json!({"model": model, "response": "abc", "done": true, "eval_count": 3}),
        )
        .into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(8);
    let fake = f.clone();
    tokio::spawn(async move {
        for word in ["a", "b", "c"] {
            let line = json!({"model": model, "response": word, "done": false}).to_string() + "\n";
            if tx.send(Ok(line)).await.is_err() {
                break;
            }
            if mode == Mode::Stalls {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            tokio::time::sleep(delay / 3).await;
        }
        let last = json!({"model": model, "response": "", "done": true, "eval_count": 3, "prompt_eval_count": 5, "load_duration": 0}).to_string() + "\n";
        let _ = tx.send(Ok(last)).await;
        fake.in_flight.fetch_sub(1, Ordering::SeqCst);
    });
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("response")
}

async fn fake(mode: Mode, delay: Duration) -> (String, Shared) {
    let f = Arc::new(Fake::default());
    *f.mode.lock().expect("mode") = Some(mode);
    *f.delay.lock().expect("delay") = delay;
    let app = Router::new()
        .route("/api/generate", post(generate))
        .route("/api/chat", post(generate))
        .route(
            "/api/version",
            get(|| async { axum::Json(json!({"version": "0.12.0"})) }),
        )
        .route(
            "/api/ps",
            get(|| async { axum::Json(json!({"models": [{"name": "m:1-fleet-t2"}]})) }),
        )
        .with_state(f.clone());
    (common::serve(app).await, f)
}

fn backend(id: &str, url: &str, ready: bool) -> Backend {
    Backend {
        id: id.into(),
        fleet: "f".into(),
        pool: "f".into(),
        url: url.into(),
        capacity: 1,
        ready,
        leaving: false,
    }
}

fn route_f() -> Vec<fleet_agent::gateway::Route> {
    routes(&[("f".into(), "m:1".into(), 2)], &[])
}

async fn gateway(cfg: GatewayConfig) -> (Arc<Gateway>, String) {
    let gw = Gateway::new(cfg);
    let url = common::serve(fleet_agent::gateway::routes::router(&gw).main).await;
    (gw, url)
}

fn fast() -> GatewayConfig {
    GatewayConfig {
        first_token_timeout: Duration::from_millis(500),
        stall_timeout: Duration::from_millis(500),
        queue_timeout: Duration::from_secs(5),
        start_wait: Duration::from_millis(300),
        ..GatewayConfig::default()
    }
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// A request that arrives while the agent is starting (a restart) waits for the controller's
/// first word on what runs, then is served: the restart costs it a delay, not an error.
#[tokio::test]
async fn a_request_during_the_agents_start_waits_and_is_served() {
    let (a, _) = fake(Mode::Ok, Duration::ZERO).await;
    let (gw, url) = gateway(GatewayConfig {
        start_wait: Duration::from_secs(10),
        ..fast()
    })
    .await;
    let early = tokio::spawn({
        let url = url.clone();
        async move {
            http_post(
                &format!("{url}/api/generate"),
                json!({"model": "m:1", "prompt": "hi"}),
            )
            .await
        }
    });
    // The health check does not wait: the proxy in front must learn at once.
    assert_eq!(http_get(&format!("{url}/")).await.0, 503);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !early.is_finished(),
        "answered before the agent knew what runs"
    );
    gw.update(route_f(), vec![backend("a", &a, true)]);
    let (code, body) = tokio::time::timeout(Duration::from_secs(5), early)
        .await
        .expect("answered once the agent knows")
        .expect("client");
    assert_eq!(code, 200, "{body}");
}

#[tokio::test]
async fn routes_health_and_refusals() {
    let (a, _) = fake(Mode::Ok, Duration::ZERO).await;
    let (gw, url) = gateway(fast()).await;
    // Before the controller has said what runs: a wait (bounded), then 503, not "not found".
    let asked = std::time::Instant::now();
    let (code, body) = http_post(&format!("{url}/api/generate"), json!({"model": "m:1"})).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("starting"), "{body}");
    assert!(asked.elapsed() >= Duration::from_millis(300), "no wait");
    // Nothing ready: the health check says so, and work gets Ollama's shapes.
    gw.update(route_f(), vec![backend("a", &a, false)]);
    assert_eq!(http_get(&format!("{url}/")).await.0, 503);
    let (code, body) = http_post(
        &format!("{url}/api/generate"),
        json!({"model": "m:1", "prompt": "hi"}),
    )
    .await;
    assert_eq!(
        (code, body.as_str()),
        (
            503,
            "{\"error\":\"no ready instance of fleet f on this node\"}"
        )
    );
    let (code, body) = http_post(
        &format!("{url}/api/generate"),
        json!({"model": "nope", "prompt": "hi"}),
    )
    .await;
    assert_eq!(
        (code, body.as_str()),
        (404, "{\"error\":\"model 'nope' not found\"}")
    );

    gw.update(route_f(), vec![backend("a", &a, true)]);
    assert_eq!(
        http_get(&format!("{url}/")).await,
        (200, "Ollama is running".to_string())
    );
    // Names compare as Ollama compares them, and the fleet's name matches too.
    for model in ["m:1", "M:1", "registry.ollama.ai/library/m:1", "f"] {
        let (code, _) = http_post(
            &format!("{url}/api/generate"),
            json!({"model": model, "prompt": "hi"}),
        )
        .await;
        assert_eq!(code, 200, "{model}");
    }
    let (_, tags) = http_get(&format!("{url}/api/tags")).await;
    assert_eq!(
        serde_json::from_str::<Value>(&tags).expect("json")["models"][0]["name"],
        "m:1"
    );
    let (_, models) = http_get(&format!("{url}/v1/models")).await;
    assert_eq!(
        serde_json::from_str::<Value>(&models).expect("json")["data"][0]["id"],
        "m:1"
    );
    let (_, version) = http_get(&format!("{url}/api/version")).await;
    assert_eq!(version, "{\"version\":\"0.12.0\"}");
    let (_, ps) = http_get(&format!("{url}/api/ps")).await;
    assert!(ps.contains("m:1-fleet-t2"), "{ps}");
    // The agent is the cache's only writer.
    for (method, path) in [
        ("POST", "/api/pull"),
        ("POST", "/api/create"),
        ("POST", "/api/copy"),
        ("DELETE", "/api/delete"),
        ("POST", "/api/push"),
        ("POST", "/api/blobs/sha256:00"),
    ] {
        let (code, _, body) = request_as(
            method,
            &format!("{url}{path}"),
            &[],
            Some(&json!({"model": "m:1"})),
            Duration::from_secs(5),
        )
        .await
        .expect(path);
        assert_eq!(code, 403, "{path}");
        assert!(
            body.starts_with("{\"error\":\"managed by ollama-fleet: "),
            "{body}"
        );
    }
}

#[tokio::test]
async fn options_are_pinned_and_streams_pass_through_with_metrics() {
    let (a, fa) = fake(Mode::Ok, Duration::from_millis(30)).await;
    let (gw, url) = gateway(fast()).await;
    gw.update(route_f(), vec![backend("a", &a, true)]);
    let (code, text) = http_post(
        &format!("{url}/api/generate"),
        json!({"model": "m:1", "prompt": "hi", "keep_alive": 0, "options": {"num_thread": 64, "temperature": 0.5}}),
    )
    .await;
    assert_eq!(code, 200);
    let got = lines(&text);
    assert_eq!(got.len(), 4, "{text}");
    assert_eq!(got[3]["done"], true);
    let sent = fa.bodies.lock().expect("bodies")[0].clone();
    assert!(sent.get("keep_alive").is_none(), "{sent}");
    assert!(sent["options"].get("num_thread").is_none(), "{sent}");
    assert_eq!(sent["options"]["temperature"], 0.5, "other options stay");

    let out = exposed(&gw);
    for want in [
        "ollama_fleet_requests_total{fleet=\"f\",route=\"/api/generate\",code=\"200\"} 1",
        "ollama_fleet_generated_tokens_total{fleet=\"f\"} 3",
        "ollama_fleet_prompt_tokens_total{fleet=\"f\"} 5",
        "ollama_fleet_time_to_first_token_seconds_count{fleet=\"f\"} 1",
        "ollama_fleet_instance_requests_total{fleet=\"f\",instance=\"a\"} 1",
    ] {
        assert!(out.contains(want), "{want} missing in\n{out}");
    }
}

#[tokio::test]
async fn busy_instances_take_nothing_more_and_the_queue_is_bounded() {
    let (a, fa) = fake(Mode::Ok, Duration::from_millis(300)).await;
    let (b, fb) = fake(Mode::Ok, Duration::from_millis(300)).await;
    let cfg = GatewayConfig {
        max_queue: 2,
        ..fast()
    };
    let (gw, url) = gateway(cfg).await;
    gw.update(
        route_f(),
        vec![backend("a", &a, true), backend("b", &b, true)],
    );
    // Two at work, two queued, the fifth refused at once.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            http_post(
                &format!("{url}/api/generate"),
                json!({"model": "m:1", "prompt": "hi"}),
            )
            .await
            .0
        }));
    }
    wait_for("two queued", Duration::from_secs(5), || async {
        let out = exposed(&gw);
        out.contains("ollama_fleet_queue_depth{fleet=\"f\"} 2")
            .then_some(())
    })
    .await;
    let (code, headers, body) = request_as(
        "POST",
        &format!("{url}/api/chat"),
        &[],
        Some(&json!({"model": "m:1", "messages": []})),
        Duration::from_secs(5),
    )
    .await
    .expect("post");
    assert_eq!(code, 503);
    assert_eq!(
        body,
        "{\"error\":\"server busy, please try again.  maximum pending requests exceeded\"}"
    );
    assert!(
        headers.iter().any(|(k, _)| k == "retry-after"),
        "{headers:?}"
    );
    for t in tasks {
        assert_eq!(t.await.expect("join"), 200);
    }
    assert_eq!(
        fa.most.load(Ordering::SeqCst),
        1,
        "one request at a time on a single-slot instance"
    );
    assert_eq!(fb.most.load(Ordering::SeqCst), 1);
    assert_eq!(
        fa.served.load(Ordering::SeqCst) + fb.served.load(Ordering::SeqCst),
        4
    );
}

#[tokio::test]
async fn failures_before_any_byte_go_elsewhere_once() {
    let (bad, fbad) = fake(Mode::Fails, Duration::ZERO).await;
    let (silent, _) = fake(Mode::Silent, Duration::ZERO).await;
    let (good, fgood) = fake(Mode::Ok, Duration::ZERO).await;
    let (gw, url) = gateway(fast()).await;
    let ask = json!({"model": "m:1", "prompt": "hi"});
    // A 5xx, then an instance that answers.
    gw.update(
        route_f(),
        vec![backend("bad", &bad, true), backend("good", &good, true)],
    );
    for _ in 0..4 {
        assert_eq!(
            http_post(&format!("{url}/api/generate"), ask.clone())
                .await
                .0,
            200
        );
    }
    assert_eq!(fgood.served.load(Ordering::SeqCst), 4);
    assert!(
        fbad.served.load(Ordering::SeqCst) >= 1,
        "the failing one was tried"
    );
    // A streamed answer with no first byte in time: 504, and not sent elsewhere (the instance
    // got it, and may be working on it); the silent instance counts a stall each time, and at
    // the threshold (2) it is to be replaced.
    gw.update(
        route_f(),
        vec![
            backend("silent", &silent, true),
            backend("good", &good, true),
        ],
    );
    let (mut n, mut timeouts) = (0, 0);
    let served_before = fgood.served.load(Ordering::SeqCst);
    while !gw.stalled("f", "silent") {
        let code = http_post(&format!("{url}/api/generate"), ask.clone())
            .await
            .0;
        assert!(code == 200 || code == 504, "{code}");
        timeouts += u32::from(code == 504);
        n += 1;
        assert!(n < 20, "the silent instance was never counted");
    }
    assert_eq!(timeouts, 2, "each timeout answered 504");
    assert_eq!(
        fgood.served.load(Ordering::SeqCst) - served_before,
        n - 2,
        "a request that timed out was not sent again"
    );
    let out = exposed(&gw);
    assert!(
        out.contains("ollama_fleet_stalled_requests_total{fleet=\"f\"} 2"),
        "each watchdog abort counted once: {out}"
    );
    assert!(
        out.contains(
            "ollama_fleet_requests_total{fleet=\"f\",route=\"/api/generate\",code=\"504\"} 2"
        ),
        "{out}"
    );
    assert!(!out.contains("code=\"0\""), "{out}");
    // Both failing: the client gets the error, not a hang.
    gw.update(
        route_f(),
        vec![backend("bad", &bad, true), backend("silent", &silent, true)],
    );
    let (code, body) = http_post(&format!("{url}/api/generate"), ask.clone()).await;
    assert!(code == 502 || code == 504, "{code} {body}");
    assert!(body.starts_with("{\"error\":"), "{body}");
}

/// An answer that comes whole says nothing until it is done: however long that takes beyond
/// the first-token timeout, it is not a stall, and the instance is not blamed.
#[tokio::test]
async fn a_whole_answer_may_take_longer_than_the_first_token_timeout() {
    let (slow, _) = fake(Mode::Ok, Duration::from_millis(1500)).await;
    let (gw, url) = gateway(fast()).await;
    gw.update(route_f(), vec![backend("slow", &slow, true)]);
    for _ in 0..3 {
        let (code, body) = http_post(
            &format!("{url}/api/generate"),
            json!({"model": "m:1", "prompt": "hi", "stream": false}),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            serde_json::from_str::<Value>(&body).expect("json")["response"],
            "abc"
        );
    }
    assert!(!gw.stalled("f", "slow"));
    let out = exposed(&gw);
    assert!(
        out.contains("ollama_fleet_stalled_requests_total{fleet=\"f\"} 0"),
        "nothing counted as a stall: {out}"
    );
    // Past the request timeout it is cut (504), still without blame.
    let (gw, url) = gateway(GatewayConfig {
        request_timeout: Duration::from_millis(700),
        ..fast()
    })
    .await;
    gw.update(route_f(), vec![backend("slow", &slow, true)]);
    let (code, _) = http_post(
        &format!("{url}/api/generate"),
        json!({"model": "m:1", "prompt": "hi", "stream": false}),
    )
    .await;
    assert_eq!(code, 504);
    assert!(!gw.stalled("f", "slow"));
}

#[tokio::test]
async fn a_stream_that_stalls_ends_with_an_error_line() {
    let (a, _) = fake(Mode::Stalls, Duration::ZERO).await;
    let (gw, url) = gateway(fast()).await;
    gw.update(route_f(), vec![backend("a", &a, true)]);
    let (code, text) = http_post(
        &format!("{url}/api/generate"),
        json!({"model": "m:1", "prompt": "hi"}),
    )
    .await;
    assert_eq!(code, 200);
    let got = lines(&text);
    assert_eq!(got[0]["response"], "a");
    assert!(
        got.last().expect("lines")["error"]
            .as_str()
            .is_some_and(|e| e.contains("no bytes")),
        "{text}"
    );
    let out = exposed(&gw);
    assert!(
        out.contains("ollama_fleet_stalled_requests_total{fleet=\"f\"} 1"),
        "{out}"
    );
}

#[tokio::test]
async fn tokens_guard_every_route_but_the_health_check() {
    let dir = fleet_e2e::temp_dir("gw-tokens");
    let file = dir.join("tokens");
    std::fs::write(&file, "# operators\nsecret-1\n").expect("write");
    let (a, _) = fake(Mode::Ok, Duration::ZERO).await;
    let cfg = GatewayConfig {
        token_file: Some(file.clone()),
        ..fast()
    };
    let (gw, url) = gateway(cfg).await;
    gw.update(route_f(), vec![backend("a", &a, true)]);
    assert_eq!(
        http_get(&format!("{url}/")).await.0,
        200,
        "the health check is open"
    );
    let ask = json!({"model": "m:1", "prompt": "hi"});
    let post = |token: Option<&'static str>| {
        let (url, ask) = (url.clone(), ask.clone());
        async move {
            let auth = token.map(|t| format!("Bearer {t}"));
            let headers: Vec<(&str, &str)> =
                auth.iter().map(|a| ("authorization", a.as_str())).collect();
            request_as(
                "POST",
                &format!("{url}/api/generate"),
                &headers,
                Some(&ask),
                Duration::from_secs(5),
            )
            .await
            .expect("post")
        }
    };
    let (code, _, body) = post(None).await;
    assert_eq!((code, body.as_str()), (401, "{\"error\":\"unauthorized\"}"));
    assert_eq!(post(Some("wrong")).await.0, 401);
    assert_eq!(post(Some("secret-1")).await.0, 200);
    assert_eq!(
        request_as(
            "GET",
            &format!("{url}/api/tags"),
            &[],
            None,
            Duration::from_secs(5)
        )
        .await
        .expect("tags")
        .0,
        401
    );
    // A new token works once the file changes; the old one no longer does.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(&file, "secret-2\n").expect("rewrite");
    wait_for("the new token", Duration::from_secs(5), || async {
        (post(Some("secret-2")).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(post(Some("secret-1")).await.0, 401);
}
