//! The node gateway (`agent --serve ADDR`): an Ollama-compatible API for every fleet on the
//! node, routing each request to a Ready instance with a free slot ([`pool`]), waiting in a
//! bounded FIFO queue otherwise; option pinning, one failover, a watchdog for first token and
//! stalls, drain before stop, bearer tokens, and the figures Ollama lacks ([`metrics`]).

pub mod metrics;
pub mod pool;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleet_runtime::clock::Instant;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::lock;
pub use metrics::Metrics;
pub use pool::{Backend, Lease, Pools, Refused};

/// The gateway's settings (the agent's `--serve-*` flags).
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Requests waiting per pool at most.
    pub max_queue: usize,
    /// How long a request waits for an instance at most.
    pub queue_timeout: Duration,
    /// No first response byte within this: the request is aborted.
    pub first_token_timeout: Duration,
    /// No byte for this long: the request is aborted.
    pub stall_timeout: Duration,
    /// Bearer tokens, one per line (re-read when the file changes); `None`: no auth.
    pub token_file: Option<PathBuf>,
    /// Largest request body accepted.
    pub max_body: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_queue: 512,
            queue_timeout: Duration::from_secs(60),
            first_token_timeout: Duration::from_secs(300),
            stall_timeout: Duration::from_secs(60),
            token_file: None,
            max_body: 64 << 20,
        }
    }
}

/// A fleet as the gateway routes to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The fleet.
    pub fleet: String,
    /// Its `spec.model`.
    pub model: String,
    /// The pool its instances serve in: the first fleet (by name) serving the same model.
    pub pool: String,
    /// Watchdog failures in a row that replace an instance (`probes.liveness.failureThreshold`).
    pub failure_threshold: u32,
}

#[derive(Default)]
struct Tokens {
    checked: Option<Instant>,
    modified: Option<std::time::SystemTime>,
    tokens: Vec<String>,
}

/// The gateway.
pub struct Gateway {
    cfg: GatewayConfig,
    pools: Pools,
    routes: RwLock<Vec<Route>>,
    metrics: Metrics,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Body,
    >,
    tokens: Mutex<Tokens>,
    /// The controller has told what runs (until then, every request gets 503).
    known: AtomicBool,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl crate::executor::Drain for Gateway {
    async fn drain(&self, id: &str, within: Duration) {
        let waited = self.pools.drain(id, within).await;
        if waited > Duration::from_millis(1) {
            tracing::info!(
                instance = id,
                seconds = waited.as_secs_f64(),
                "drained before stopping"
            );
        }
    }
}

/// An `{"error": ...}` answer, in Ollama's shape.
fn error(code: StatusCode, message: impl Into<String>) -> Response {
    let body = json!({ "error": message.into() }).to_string();
    (
        code,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

/// The routes a client may send generation work to, and how the gateway names them in metrics.
fn work_route(path: &str) -> Option<&'static str> {
    Some(match path {
        "/api/generate" => "/api/generate",
        "/api/chat" => "/api/chat",
        "/api/embed" => "/api/embed",
        "/api/embeddings" => "/api/embeddings",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/embeddings" => "/v1/embeddings",
        _ => return None,
    })
}

/// What to do instead of a management call.
fn managed(path: &str) -> Option<&'static str> {
    Some(match path {
        "/api/pull" => {
            "the agent pulls spec.model into the node's cache; change the fleet's model to get another"
        }
        "/api/push" => "push from a machine of your own, not from the fleet",
        "/api/create" => "the agent creates the models its instances run; change the fleet's spec",
        "/api/copy" => "models are the fleet's: change the fleet's spec",
        "/api/delete" => "the agent removes what no fleet uses",
        p if p.starts_with("/api/blobs/") => {
            "the agent is the only writer of the node's model cache"
        }
        _ => return None,
    })
}

impl Gateway {
    /// A gateway with `cfg`.
    pub fn new(cfg: GatewayConfig) -> Arc<Gateway> {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.set_nodelay(true);
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector);
        Arc::new(Gateway {
            cfg,
            pools: Pools::default(),
            routes: RwLock::new(Vec::new()),
            metrics: Metrics::default(),
            client,
            tokens: Mutex::new(Tokens::default()),
            known: AtomicBool::new(false),
        })
    }

    /// The pools (the executor drains through them).
    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    /// What the controller last saw: the fleets and their instances.
    pub fn update(&self, routes: Vec<Route>, backends: Vec<Backend>) {
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = routes;
        self.pools.update(backends);
        self.known.store(true, Ordering::SeqCst);
    }

    /// Learns what a pass saw: the fleets `(name, spec)` and the instances shown `(endpoint,
    /// its fleet's spec, its URL, whether it is leaving)`. Ready instances take requests,
    /// leaving ones (about to be stopped) none; an instance takes `OLLAMA_NUM_PARALLEL` at once.
    pub fn learn<'a>(
        &self,
        fleets: impl Iterator<Item = (&'a str, &'a fleet_api::FleetSpec)>,
        shown: impl Iterator<
            Item = (
                &'a crate::view::Endpoint,
                &'a fleet_api::FleetSpec,
                String,
                bool,
            ),
        >,
    ) {
        let fleets: Vec<(String, String, u32)> = fleets
            .map(|(name, spec)| {
                (
                    name.to_string(),
                    spec.model.clone(),
                    spec.probes.liveness.failure_threshold,
                )
            })
            .collect();
        let routes = routes(&fleets);
        let pool_of: HashMap<&str, &str> = routes
            .iter()
            .map(|r| (r.fleet.as_str(), r.pool.as_str()))
            .collect();
        let backends = shown
            .filter_map(|(e, spec, url, leaving)| {
                let capacity = spec
                    .env
                    .get("OLLAMA_NUM_PARALLEL")
                    .and_then(|v| v.parse::<u32>().ok())
                    .unwrap_or(1)
                    .max(1);
                Some(Backend {
                    id: e.id.clone(),
                    fleet: e.fleet.clone(),
                    pool: pool_of.get(e.fleet.as_str())?.to_string(),
                    url,
                    capacity,
                    ready: e.ready,
                    leaving,
                })
            })
            .collect();
        self.update(routes, backends);
    }

    /// Whether an instance's watchdog failures reached its fleet's threshold.
    pub fn stalled(&self, fleet: &str, id: &str) -> bool {
        let threshold = self
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|r| r.fleet == fleet)
            .map_or(u32::MAX, |r| r.failure_threshold.max(1));
        self.pools.stalls(id) >= threshold
    }

    /// Appends the gateway's metrics to a `/metrics` exposition.
    pub fn render_metrics(&self, out: &mut String) {
        // Every pool's queue, empty ones too.
        let mut queues: BTreeMap<String, usize> = self
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|r| (r.pool.clone(), 0))
            .collect();
        queues.extend(self.pools.queue_depths());
        let queues: Vec<(String, usize)> = queues.into_iter().collect();
        self.metrics.render(out, &queues, &self.pools.counts());
    }

    /// The router serving the API.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new().fallback(handle).with_state(self.clone())
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(file) = &self.cfg.token_file else {
            return true;
        };
        let mut t = lock(&self.tokens);
        // Re-read when it changed (checked at most once a second).
        if t.checked
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            t.checked = Some(Instant::now());
            let modified = std::fs::metadata(file).and_then(|m| m.modified()).ok();
            if modified != t.modified || modified.is_none() {
                t.modified = modified;
                t.tokens = std::fs::read_to_string(file)
                    .unwrap_or_default()
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_string)
                    .collect();
            }
        }
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        // Compared in full whatever the content (no early exit on the first difference).
        t.tokens.iter().fold(false, |found, token| {
            let same = token.len() == given.len()
                && token
                    .bytes()
                    .zip(given.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0;
            found | same
        })
    }

    /// The pool serving `model` (by Ollama's name comparison, or a fleet's name), and the
    /// fleets in it.
    fn pool_for(&self, model: &str) -> Option<(String, Vec<String>)> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let matched = routes.iter().find(|r| r.fleet == model).or_else(|| {
            routes
                .iter()
                .find(|r| fleet_api::ModelRef::key(&r.model) == fleet_api::ModelRef::key(model))
        })?;
        let fleets = routes
            .iter()
            .filter(|r| r.pool == matched.pool)
            .map(|r| r.fleet.clone())
            .collect();
        Some((matched.pool.clone(), fleets))
    }
}

async fn handle(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if path == "/" && (method == Method::GET || method == Method::HEAD) {
        return health(&gw);
    }
    if !gw.authorized(req.headers()) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    if !gw.known.load(Ordering::SeqCst) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is starting: it does not know its instances yet",
        );
    }
    if let Some(instead) = managed(&path) {
        return error(
            StatusCode::FORBIDDEN,
            format!("managed by ollama-fleet: {instead}"),
        );
    }
    match (method, path.as_str()) {
        (Method::GET, "/api/tags") => tags(&gw, false),
        (Method::GET, "/v1/models") => tags(&gw, true),
        (Method::GET, "/api/ps") => ps(&gw).await,
        (Method::GET, "/api/version") => version(&gw).await,
        (Method::POST, "/api/show") => show(&gw, req).await,
        (Method::POST, p) if work_route(p).is_some() => {
            let route = work_route(p).unwrap_or_default();
            work(&gw, route, req).await
        }
        _ => error(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

fn health(gw: &Gateway) -> Response {
    let pools: Vec<String> = gw
        .routes
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|r| r.pool.clone())
        .collect();
    if pools.iter().any(|p| gw.pools.has_ready(p)) {
        (StatusCode::OK, "Ollama is running").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no ready instance on this node",
        )
            .into_response()
    }
}

/// The models served by at least one ready instance.
fn tags(gw: &Gateway, openai: bool) -> Response {
    let routes = gw.routes.read().unwrap_or_else(|p| p.into_inner()).clone();
    let mut models: BTreeMap<String, String> = BTreeMap::new();
    for r in routes.iter().filter(|r| gw.pools.has_ready(&r.pool)) {
        models
            .entry(fleet_api::ModelRef::key(&r.model))
            .or_insert_with(|| r.model.clone());
    }
    let now = humantime::format_rfc3339_seconds(fleet_runtime::clock::now()).to_string();
    let body = if openai {
        let data: Vec<Value> = models
            .values()
            .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "library"}))
            .collect();
        json!({"object": "list", "data": data})
    } else {
        let list: Vec<Value> = models
            .values()
            .map(|m| json!({"name": m, "model": m, "modified_at": now, "size": 0, "digest": "", "details": {}}))
            .collect();
        json!({ "models": list })
    };
    axum::Json(body).into_response()
}

/// Asks `path` of up to `n` ready instances (GET, 2 s each).
async fn ask_ready(gw: &Gateway, path: &str, n: usize) -> Vec<Value> {
    let urls: Vec<String> = gw.pools.ready_urls().into_iter().take(n).collect();
    let mut out = Vec::new();
    for url in urls {
        let Ok(req) = axum::http::Request::get(format!("{url}{path}")).body(Body::empty()) else {
            continue;
        };
        let Ok(Ok(resp)) =
            tokio::time::timeout(Duration::from_secs(2), gw.client.request(req)).await
        else {
            continue;
        };
        if !resp.status().is_success() {
            continue;
        }
        let Ok(Ok(body)) = tokio::time::timeout(
            Duration::from_secs(2),
            http_body_util::Limited::new(resp.into_body(), 1 << 20).collect(),
        )
        .await
        else {
            continue;
        };
        if let Ok(v) = serde_json::from_slice::<Value>(&body.to_bytes()) {
            out.push(v);
        }
    }
    out
}

/// The models loaded across the node's ready instances.
async fn ps(gw: &Gateway) -> Response {
    let mut models: BTreeMap<String, Value> = BTreeMap::new();
    for v in ask_ready(gw, "/api/ps", usize::MAX).await {
        for m in v["models"].as_array().cloned().unwrap_or_default() {
            let name = m["name"].as_str().unwrap_or_default().to_string();
            models.entry(name).or_insert(m);
        }
    }
    axum::Json(json!({"models": models.into_values().collect::<Vec<_>>()})).into_response()
}

/// The version a ready instance reports.
async fn version(gw: &Gateway) -> Response {
    match ask_ready(gw, "/api/version", 1).await.into_iter().next() {
        Some(v) => axum::Json(v).into_response(),
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no ready instance on this node",
        ),
    }
}

/// A model's details, from a ready instance of its pool (no slot needed: Ollama answers
/// without its runner). Clients ask before they generate (`ollama run` does).
async fn show(gw: &Gateway, req: Request) -> Response {
    let Ok(bytes) = http_body_util::Limited::new(req.into_body(), 1 << 20)
        .collect()
        .await
    else {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    };
    let bytes = bytes.to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let model = body["model"]
        .as_str()
        .or(body["name"].as_str())
        .unwrap_or_default();
    let Some((pool, fleets)) = gw.pool_for(model) else {
        return error(StatusCode::NOT_FOUND, format!("model '{model}' not found"));
    };
    let Some(url) = gw.pools.any_ready(&pool) else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no ready instance of fleet {} on this node",
                fleets.join(", ")
            ),
        );
    };
    let Ok(upstream) = axum::http::Request::post(format!("{url}/api/show"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(bytes))
    else {
        return error(StatusCode::BAD_REQUEST, "invalid request");
    };
    let answer = async {
        let resp = gw
            .client
            .request(upstream)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = http_body_util::Limited::new(body, 16 << 20)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>(Response::from_parts(parts, Body::from(body)))
    };
    match tokio::time::timeout(Duration::from_secs(10), answer).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => error(StatusCode::BAD_GATEWAY, e),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "the instance did not answer in time",
        ),
    }
}

/// Removes what instances must not be told: `keep_alive` and `options.num_thread` (the agent
/// keeps the model loaded with the thread count it set).
pub fn pin_options(body: &mut Value) {
    if let Some(o) = body.as_object_mut() {
        o.remove("keep_alive");
        if let Some(options) = o.get_mut("options").and_then(Value::as_object_mut) {
            options.remove("num_thread");
        }
    }
}

/// A `load_duration` above this is a load: Ollama reports the time it took to get the runner
/// even when the model is loaded (microseconds), while a load takes tens of milliseconds at
/// least (seconds for real models).
pub const RELOAD_THRESHOLD: Duration = Duration::from_millis(10);

/// Counts from a response's last JSON object (Ollama's final chunk, or an OpenAI usage block):
/// (prompt tokens, generated tokens, whether the instance loaded the model for it).
fn counts_of(v: &Value) -> (u64, u64, bool) {
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let usage = &v["usage"];
    let prompt = n("prompt_eval_count").max(usage["prompt_tokens"].as_u64().unwrap_or(0));
    let generated = n("eval_count").max(usage["completion_tokens"].as_u64().unwrap_or(0));
    let reload = u128::from(n("load_duration")) > RELOAD_THRESHOLD.as_nanos();
    (prompt, generated, reload)
}

/// The last complete JSON object in `tail` (NDJSON lines or SSE `data:` lines).
fn last_object(tail: &[u8]) -> Option<Value> {
    let text = String::from_utf8_lossy(tail);
    text.lines()
        .rev()
        .map(|l| l.trim().trim_start_matches("data:").trim())
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str(l).ok())
}

/// What came back from an instance, before anything went to the client.
enum Attempt {
    /// Headers and the first body bytes (or the whole body).
    Started {
        parts: axum::http::response::Parts,
        first: Option<Bytes>,
        body: hyper::body::Incoming,
        ttft: Duration,
    },
    /// Try another instance (connection error, 5xx, no first byte in time).
    Retry(String, bool),
}

async fn attempt(
    gw: &Gateway,
    lease: &Lease,
    path: &str,
    body: &Bytes,
    started: Instant,
) -> Attempt {
    let req = axum::http::Request::post(format!("{}{path}", lease.backend.url))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.clone()));
    let Ok(req) = req else {
        return Attempt::Retry("cannot build the request".into(), false);
    };
    // Each attempt has its own window (a retry is not cut short by the first one's).
    let deadline = Instant::now() + gw.cfg.first_token_timeout;
    let resp = match tokio::time::timeout_at(deadline, gw.client.request(req)).await {
        Err(_) => {
            return Attempt::Retry(
                format!("no response within {:?}", gw.cfg.first_token_timeout),
                true,
            );
        }
        Ok(Err(e)) => return Attempt::Retry(format!("instance {}: {e}", lease.backend.id), false),
        Ok(Ok(r)) => r,
    };
    if resp.status().is_server_error() {
        return Attempt::Retry(
            format!("instance {} answered {}", lease.backend.id, resp.status()),
            false,
        );
    }
    let (parts, mut body) = resp.into_parts();
    // The first bytes, within the first-token timeout (nothing has gone to the client yet).
    let first = loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Attempt::Retry(
                    format!("no first token within {:?}", gw.cfg.first_token_timeout),
                    true,
                );
            }
            Ok(None) => break None,
            Ok(Some(Err(e))) => {
                return Attempt::Retry(format!("instance {}: {e}", lease.backend.id), false);
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    break Some(data);
                }
            }
        }
    };
    Attempt::Started {
        parts,
        first,
        body,
        ttft: started.elapsed(),
    }
}

async fn work(gw: &Arc<Gateway>, route: &'static str, req: Request) -> Response {
    let started = Instant::now();
    let record = |fleet: &str, code: StatusCode, queue_wait: Duration| {
        gw.metrics.record(
            fleet,
            &metrics::Sample {
                route,
                code: code.as_u16(),
                duration: started.elapsed(),
                queue_wait,
                ..Default::default()
            },
        );
    };
    let bytes = match http_body_util::Limited::new(req.into_body(), gw.cfg.max_body)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            record("", StatusCode::PAYLOAD_TOO_LARGE, Duration::ZERO);
            return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
        }
    };
    let mut body: Value = match serde_json::from_slice(&bytes) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            record("", StatusCode::BAD_REQUEST, Duration::ZERO);
            return error(StatusCode::BAD_REQUEST, "invalid JSON body");
        }
    };
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let Some((pool, fleets)) = gw.pool_for(&model) else {
        record("", StatusCode::NOT_FOUND, Duration::ZERO);
        return error(StatusCode::NOT_FOUND, format!("model '{model}' not found"));
    };
    pin_options(&mut body);
    let body = Bytes::from(body.to_string());
    let mut exclude: Option<String> = None;
    let mut queue_wait = Duration::ZERO;
    for round in 0..2 {
        let waited = Instant::now();
        let lease = match gw
            .pools
            .acquire(
                &pool,
                exclude.as_deref(),
                gw.cfg.max_queue,
                gw.cfg.queue_timeout,
            )
            .await
        {
            Ok(l) => l,
            Err(Refused::NoneReady) => {
                record(&pool, StatusCode::SERVICE_UNAVAILABLE, queue_wait);
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "no ready instance of fleet {} on this node",
                        fleets.join(", ")
                    ),
                );
            }
            Err(Refused::QueueFull | Refused::Timeout) => {
                record(&pool, StatusCode::SERVICE_UNAVAILABLE, waited.elapsed());
                let mut r = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server busy, please try again.  maximum pending requests exceeded",
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return r;
            }
        };
        queue_wait += waited.elapsed();
        let fleet = lease.backend.fleet.clone();
        match attempt(gw, &lease, route, &body, started).await {
            Attempt::Retry(why, stalled) => {
                tracing::debug!(instance = %lease.backend.id, why = %why, "request failed before any byte; retrying elsewhere");
                exclude = Some(lease.backend.id.clone());
                if stalled {
                    gw.metrics.stalled(&fleet);
                }
                lease.finish(stalled);
                if round == 1 {
                    let code = if stalled {
                        StatusCode::GATEWAY_TIMEOUT
                    } else {
                        StatusCode::BAD_GATEWAY
                    };
                    record(&fleet, code, queue_wait);
                    return error(code, why);
                }
            }
            Attempt::Started {
                parts,
                first,
                body,
                ttft,
            } => {
                return stream(
                    gw.clone(),
                    route,
                    lease,
                    parts,
                    first,
                    body,
                    started,
                    ttft,
                    queue_wait,
                );
            }
        }
    }
    error(StatusCode::BAD_GATEWAY, "no instance answered")
}

/// Sends the instance's answer on, watching for stalls; records the request when it ends.
#[allow(clippy::too_many_arguments)]
fn stream(
    gw: Arc<Gateway>,
    route: &'static str,
    lease: Lease,
    parts: axum::http::response::Parts,
    first: Option<Bytes>,
    mut body: hyper::body::Incoming,
    started: Instant,
    ttft: Duration,
    queue_wait: Duration,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let code = parts.status;
    // How a stream that stalls ends: Ollama's error line, or an OpenAI server-sent event.
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let (streaming, sse) = (
        content_type.contains("ndjson") || content_type.contains("event-stream"),
        content_type.contains("event-stream"),
    );
    tokio::spawn(async move {
        let mut tail: Vec<u8> = Vec::new();
        let keep = |tail: &mut Vec<u8>, data: &[u8]| {
            tail.extend_from_slice(data);
            if tail.len() > 16 << 10 {
                tail.drain(..tail.len() - (8 << 10));
            }
        };
        let mut stalled = false;
        let mut client_gone = false;
        if let Some(data) = first {
            keep(&mut tail, &data);
            client_gone = tx.send(Ok(data)).await.is_err();
        }
        while !client_gone {
            match tokio::time::timeout(gw.cfg.stall_timeout, body.frame()).await {
                Err(_) => {
                    stalled = true;
                    let why = format!("no bytes from the instance for {:?}", gw.cfg.stall_timeout);
                    tracing::warn!(instance = %lease.backend.id, "{why}; request aborted");
                    if streaming {
                        let error = json!({ "error": why });
                        let line = if sse {
                            format!("data: {error}\n\n")
                        } else {
                            format!("{error}\n")
                        };
                        let _ = tx.send(Ok(Bytes::from(line))).await;
                    } else {
                        let _ = tx.send(Err(std::io::Error::other(why))).await;
                    }
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    break;
                }
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        keep(&mut tail, &data);
                        client_gone = tx.send(Ok(data)).await.is_err();
                    }
                }
            }
        }
        let (prompt, generated, reload) =
            last_object(&tail).as_ref().map_or((0, 0, false), counts_of);
        gw.metrics.record(
            &lease.backend.fleet,
            &metrics::Sample {
                route,
                code: code.as_u16(),
                duration: started.elapsed(),
                ttft: Some(ttft),
                queue_wait,
                prompt_tokens: prompt,
                generated_tokens: generated,
                reload,
                stalled,
            },
        );
        lease.finish(stalled);
    });
    let mut response = Response::from_parts(parts, Body::from_stream(tokio_stream(rx)));
    response.headers_mut().remove(header::CONTENT_LENGTH);
    response.headers_mut().remove(header::TRANSFER_ENCODING);
    response
}

/// A stream of an mpsc receiver.
fn tokio_stream(
    mut rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The routes of the node's fleets, `(fleet, model, failure threshold)`: fleets serving the
/// same model (as Ollama compares names) share one pool, named after the first of them.
pub fn routes(fleets: &[(String, String, u32)]) -> Vec<Route> {
    let mut sorted: Vec<&(String, String, u32)> = fleets.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut pools: HashMap<String, String> = HashMap::new();
    sorted
        .into_iter()
        .map(|(fleet, model, threshold)| {
            let pool = pools
                .entry(fleet_api::ModelRef::key(model))
                .or_insert_with(|| fleet.clone())
                .clone();
            Route {
                fleet: fleet.clone(),
                model: model.clone(),
                pool,
                failure_threshold: *threshold,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_options_and_counts() {
        let mut body =
            json!({"model": "m", "keep_alive": "5m", "options": {"num_thread": 8, "seed": 1}});
        pin_options(&mut body);
        assert_eq!(body, json!({"model": "m", "options": {"seed": 1}}));

        let ndjson = b"{\"response\":\"a\",\"done\":false}\n{\"done\":true,\"eval_count\":7,\"prompt_eval_count\":3,\"load_duration\":45000}\n";
        let last = last_object(ndjson).expect("last");
        assert_eq!(
            counts_of(&last),
            (3, 7, false),
            "45 us to get a loaded runner: no reload"
        );
        let loaded = json!({"done": true, "eval_count": 1, "load_duration": 2_000_000_000u64});
        assert_eq!(counts_of(&loaded), (0, 1, true), "2 s: a load");
        let sse = b"data: {\"choices\":[]}\n\ndata: {\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":9}}\n\ndata: [DONE]\n\n";
        assert_eq!(counts_of(&last_object(sse).expect("usage")), (4, 9, false));
    }

    #[test]
    fn fleets_serving_one_model_share_a_pool() {
        let r = routes(&[
            ("b".into(), "llama3".into(), 3),
            ("a".into(), "Llama3:latest".into(), 3),
            ("c".into(), "qwen".into(), 3),
        ]);
        let pool = |f: &str| r.iter().find(|x| x.fleet == f).map(|x| x.pool.clone());
        assert_eq!(pool("a"), Some("a".into()));
        assert_eq!(
            pool("b"),
            Some("a".into()),
            "same model: the first fleet's pool"
        );
        assert_eq!(pool("c"), Some("c".into()));
    }
}
