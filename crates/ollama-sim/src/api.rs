//! The HTTP API, with Ollama's routes and JSON shapes, plus `/sim/*` for fault injection.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use fleet_api::ModelRef;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::config::{Config, KeepAlive, cgroup_cpu_allowance};
use crate::faults::{Faults, exit_now};
use crate::models::{ModelInfo, Store, parameters_text};
use crate::runner::{Lease, Refusal, Runner};

/// Everything the handlers share.
#[derive(Debug)]
pub struct App {
    /// The configuration.
    pub cfg: Arc<Config>,
    /// The model store.
    pub store: Store,
    /// Loaded models and the scheduler.
    pub runner: Arc<Runner>,
    /// Faults in effect.
    pub faults: Arc<Faults>,
    /// When the process started.
    pub started: Instant,
}

impl App {
    /// A new app for `cfg`.
    pub fn new(cfg: Config) -> Arc<App> {
        let cfg = Arc::new(cfg);
        Arc::new(App {
            store: Store::new(cfg.models_dir.clone()),
            runner: Runner::new(cfg.clone()),
            faults: Arc::new(Faults::default()),
            started: Instant::now(),
            cfg,
        })
    }
}

type Shared = State<Arc<App>>;

/// The router with every route.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/api/version", get(version))
        .route("/api/tags", get(tags))
        .route("/api/ps", get(ps))
        .route("/api/pull", post(pull))
        .route("/api/generate", post(generate))
        .route("/api/chat", post(chat))
        .route("/api/embed", post(embed))
        .route("/api/embeddings", post(embeddings))
        .route("/api/create", post(create))
        .route("/api/show", post(show))
        .route("/api/delete", delete(delete_model))
        .route("/api/copy", post(copy_model))
        .route("/v1/models", get(crate::openai::models))
        .route(
            "/v1/chat/completions",
            post(crate::openai::chat_completions),
        )
        .route("/v1/completions", post(crate::openai::completions))
        .route("/v1/embeddings", post(crate::openai::embeddings))
        .route(
            "/api/blobs/{digest}",
            axum::routing::head(head_blob).post(post_blob),
        )
        .route("/sim/state", get(sim_state))
        .route("/sim/exit", post(sim_exit))
        .route("/sim/hang", post(sim_hang))
        .route("/sim/leak", post(sim_leak))
        // Ollama (gin) reads request bodies of any size.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(app.clone(), hang_guard))
        .layer(middleware::from_fn_with_state(app.clone(), access_log))
        .with_state(app)
}

/// Once hung, no request gets an answer.
/// One line per request on stderr, in the shape of Ollama's (gin's) access log.
async fn access_log(State(app): Shared, req: Request, next: Next) -> Response {
    if !app.cfg.access_log {
        return next.run(req).await;
    }
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let started = Instant::now();
    let resp = next.run(req).await;
    eprintln!(
        "[GIN] {} | {:>3} | {:>12?} | {:<7} {path:?}",
        humantime::format_rfc3339_seconds(SystemTime::now()),
        resp.status().as_u16(),
        started.elapsed(),
        method.as_str(),
    );
    resp
}

async fn hang_guard(State(app): Shared, req: Request, next: Next) -> Response {
    if app.faults.is_hung() {
        std::future::pending::<()>().await;
    }
    next.run(req).await
}

/// An error answer: a status and Ollama's `{"error": "..."}` body.
#[derive(Debug)]
pub struct ApiError(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({"error": self.1}))).into_response()
    }
}

pub(crate) type ApiResult = Result<Response, ApiError>;

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError(status, message.into())
}

/// Ollama's answer for a model that is not there: `model 'm' not found`.
fn not_found_pull(name: &str) -> ApiError {
    error(StatusCode::NOT_FOUND, format!("model '{name}' not found"))
}

fn now() -> String {
    timestamp(SystemTime::now())
}

fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, "missing request body"));
    }
    match serde_json::from_slice::<GoFields>(body) {
        Ok(GoFields(Some(fields))) => Ok(Value::Object(fields)),
        Ok(GoFields(None)) => Err(error(
            StatusCode::BAD_REQUEST,
            "request body must be a JSON object",
        )),
        Err(e) => Err(error(StatusCode::BAD_REQUEST, e.to_string())),
    }
}

/// The request fields Ollama's handlers decode (the sim reads these).
const FIELDS: [&str; 15] = [
    "model",
    "name",
    "prompt",
    "messages",
    "stream",
    "keep_alive",
    "options",
    "format",
    "think",
    "tools",
    "images",
    "input",
    "from",
    "parameters",
    "files",
];

/// A request body as Go's `encoding/json` decodes it into Ollama's request structs: a key names
/// a field when it matches without regard to case (folded as Go folds, so the Kelvin sign is a
/// `k`); of several keys for one field the last wins, except that `options` (a map) merges
/// them. Other keys are kept as they are. `None`: not an object.
struct GoFields(Option<serde_json::Map<String, Value>>);

impl<'de> serde::Deserialize<'de> for GoFields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = GoFields;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<GoFields, A::Error> {
                let mut out = serde_json::Map::new();
                while let Some((key, value)) = map.next_entry::<String, Value>()? {
                    let field = FIELDS
                        .iter()
                        .find(|f| fleet_api::go_json_key_is(&key, f))
                        .map_or(key, |f| f.to_string());
                    match (out.get_mut(&field), value) {
                        (Some(Value::Object(have)), Value::Object(more)) if field == "options" => {
                            have.extend(more);
                        }
                        (_, value) => {
                            out.insert(field, value);
                        }
                    }
                }
                Ok(GoFields(Some(out)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<GoFields, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(GoFields(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<GoFields, E> {
                Ok(GoFields(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<GoFields, E> {
                Ok(GoFields(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<GoFields, E> {
                Ok(GoFields(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<GoFields, E> {
                Ok(GoFields(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<GoFields, E> {
                Ok(GoFields(None))
            }
            fn visit_unit<E>(self) -> Result<GoFields, E> {
                Ok(GoFields(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// The model named by `model` (or the older `name`) field.
fn model_field(body: &Value) -> Result<(String, ModelRef), ApiError> {
    let name = body["model"]
        .as_str()
        .or_else(|| body["name"].as_str())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| error(StatusCode::BAD_REQUEST, "model is required"))?;
    let r =
        ModelRef::parse(name).map_err(|_| error(StatusCode::BAD_REQUEST, "invalid model name"))?;
    Ok((name.to_string(), r))
}

fn streaming(body: &Value) -> bool {
    body["stream"].as_bool().unwrap_or(true)
}

/// The request's `keep_alive`, if it says one (else the runner keeps its own).
fn keep_alive(_app: &App, body: &Value) -> Result<Option<KeepAlive>, ApiError> {
    match &body["keep_alive"] {
        Value::Null => Ok(None),
        v => KeepAlive::from_json(v)
            .map(Some)
            .map_err(|e| error(StatusCode::BAD_REQUEST, e)),
    }
}

fn ndjson(rx: mpsc::Receiver<Value>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|v| {
            let mut line = v.to_string();
            line.push('\n');
            (Ok::<_, Infallible>(Bytes::from(line)), rx)
        })
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

fn details() -> Value {
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "135M",
        "quantization_level": "Q4_0",
    })
}

fn short_digest(d: &str) -> &str {
    d.strip_prefix("sha256:").unwrap_or(d)
}

async fn root() -> &'static str {
    "Ollama is running"
}

async fn version(State(app): Shared) -> Response {
    axum::Json(json!({"version": app.cfg.version})).into_response()
}

/// The size of a model as its runner holds it: the real engine's GGUF, else the model's blobs.
fn model_bytes(app: &App, blobs: u64) -> u64 {
    app.cfg
        .engine
        .as_ref()
        .and_then(|e| std::fs::metadata(&e.model).ok())
        .map_or(blobs, |m| m.len())
}

async fn tags(State(app): Shared) -> Response {
    let models: Vec<Value> = app
        .store
        .list()
        .iter()
        .map(|m| {
            json!({
                "name": m.name,
                "model": m.name,
                "modified_at": timestamp(m.modified),
                "size": model_bytes(&app, m.size),
                "digest": short_digest(&m.digest),
                "details": details(),
            })
        })
        .collect();
    axum::Json(json!({"models": models})).into_response()
}

async fn ps(State(app): Shared) -> Response {
    let forever = SystemTime::UNIX_EPOCH + Duration::from_secs(10_999_999_999);
    let models: Vec<Value> = app
        .runner
        .running()
        .iter()
        .map(|r| {
            json!({
                "name": r.info.name,
                "model": r.info.name,
                "size": r.info.memory,
                "digest": short_digest(&r.info.digest),
                "details": details(),
                "expires_at": timestamp(r.expires_at.unwrap_or(forever)),
                "size_vram": 0,
                "context_length": 4096,
                "num_thread": r.num_thread,
            })
        })
        .collect();
    // Ollama lists the model that expires last first.
    let mut models = models;
    models.sort_by(|a, b| b["expires_at"].as_str().cmp(&a["expires_at"].as_str()));
    axum::Json(json!({"models": models})).into_response()
}

async fn pull(State(app): Shared, body: Bytes) -> ApiResult {
    let body = parse_body(&body)?;
    let (name, r) = model_field(&body)?;
    let (tx, rx) = mpsc::channel(64);
    let missing = registry_lacks(&app, &name, &r);
    let task = tokio::spawn(run_pull(app.clone(), r, missing, tx));
    progress_answer(streaming(&body), rx, task).await
}

/// Whether the (simulated) registry lacks a model (`SIM_PULL_MISSING`).
fn registry_lacks(app: &App, name: &str, r: &ModelRef) -> bool {
    app.cfg
        .pull_missing
        .iter()
        .any(|m| *m == name || ModelRef::parse(m).is_ok_and(|mr| mr == *r))
}

/// A progress stream's answer: the stream itself, or its outcome (`{"status": "success"}`, or
/// the error: 404 when something was not found, else 500).
async fn progress_answer(
    stream: bool,
    mut rx: mpsc::Receiver<Value>,
    task: tokio::task::JoinHandle<()>,
) -> ApiResult {
    if stream {
        return Ok(ndjson(rx));
    }
    let mut last = json!({"status": "success"});
    while let Some(v) = rx.recv().await {
        last = v;
    }
    let _ = task.await;
    match last.get("error").and_then(Value::as_str) {
        Some(e) if e.contains("not found") => Err(error(StatusCode::NOT_FOUND, e)),
        Some(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e)),
        None => Ok(axum::Json(json!({"status": "success"})).into_response()),
    }
}

/// Pulls `r`: progress as Ollama reports it, blobs first and the manifest last.
async fn run_pull(app: Arc<App>, r: ModelRef, missing: bool, tx: mpsc::Sender<Value>) {
    let send = |v: Value| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(v).await;
        }
    };
    let journal = PullJournal::begin(&app, &r);
    send(json!({"status": "pulling manifest"})).await;
    if missing {
        tokio::time::sleep(app.cfg.pull_time / 10).await;
        send(json!({"error": "pull model manifest: file does not exist"})).await;
        return;
    }
    let (weights, config) = Store::pulled_blobs(&r, app.cfg.model_size);
    let store = app.store.clone();
    let staged = tokio::task::spawn_blocking(move || {
        store
            .stage_blob(&weights)
            .map(|s| (s, weights.len() as u64))
    })
    .await;
    let ((digest, partial), weights_size) = match staged {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return send(json!({"error": format!("write blob: {e}")})).await,
        Err(e) => return send(json!({"error": e.to_string()})).await,
    };
    let total = app.cfg.model_size;
    let steps = 10u64;
    let label = format!("pulling {}", &short_digest(&digest)[..12]);
    for step in 0..=steps {
        send(json!({"status": label, "digest": digest, "total": total, "completed": total * step / steps})).await;
        if step < steps {
            tokio::time::sleep(app.cfg.pull_time / steps as u32).await;
        }
    }
    if let Err(e) = app.store.commit_blob(&digest, &partial) {
        return send(json!({"error": format!("rename blob: {e}")})).await;
    }
    send(json!({"status": "verifying sha256 digest"})).await;
    send(json!({"status": "writing manifest"})).await;
    if let Err(e) = app.store.finish_pull(&r, &digest, weights_size, &config) {
        return send(json!({"error": format!("write manifest: {e}")})).await;
    }
    drop(journal);
    send(json!({"status": "success"})).await;
}

/// Every pull is journalled in `<OLLAMA_MODELS>/.sim-pulls.log` (`start|end <model> <pid>
/// <unix ms>`, a line each, appended), so a test can count the pulls a node's instances made
/// into their shared cache and see whether two ever overlapped.
struct PullJournal {
    path: std::path::PathBuf,
    model: String,
}

impl PullJournal {
    fn begin(app: &App, r: &ModelRef) -> PullJournal {
        let j = PullJournal {
            path: app.cfg.models_dir.join(".sim-pulls.log"),
            model: r.to_string(),
        };
        j.write("start");
        j
    }

    fn write(&self, what: &str) {
        use std::io::Write;
        let ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let line = format!("{what} {} {} {ms}\n", self.model, std::process::id());
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }
}

impl Drop for PullJournal {
    fn drop(&mut self) {
        self.write("end");
    }
}

/// Looks up the model of a request: 404 with Ollama's hint when absent.
fn find_model(app: &App, name: &str, r: &ModelRef) -> Result<ModelInfo, ApiError> {
    app.store.get(r).ok_or_else(|| not_found_pull(name))
}

fn refusal(r: Refusal) -> ApiError {
    match r {
        Refusal::Busy => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server busy, please try again.  maximum pending requests exceeded",
        ),
        Refusal::LoadFailed(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// How a generation answers: `generate` (response text) or `chat` (a message).
#[derive(Clone, Copy)]
pub(crate) enum Shape {
    Generate,
    Chat,
}

impl Shape {
    fn chunk(self, model: &str, text: &str) -> Value {
        match self {
            Shape::Generate => {
                json!({"model": model, "created_at": now(), "response": text, "done": false})
            }
            Shape::Chat => {
                json!({"model": model, "created_at": now(), "message": {"role": "assistant", "content": text}, "done": false})
            }
        }
    }

    fn done(self, model: &str, text: &str, reason: &str) -> Value {
        match self {
            Shape::Generate => {
                json!({"model": model, "created_at": now(), "response": text, "done": true, "done_reason": reason})
            }
            Shape::Chat => {
                json!({"model": model, "created_at": now(), "message": {"role": "assistant", "content": text}, "done": true, "done_reason": reason})
            }
        }
    }
}

const WORDS: [&str; 12] = [
    " The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".", " It",
    " runs",
];

async fn generate(State(app): Shared, body: Bytes) -> ApiResult {
    let body = parse_body(&body)?;
    let prompt = body["prompt"].as_str().unwrap_or("").to_string();
    infer(app, body, prompt, Shape::Generate).await
}

async fn chat(State(app): Shared, body: Bytes) -> ApiResult {
    let body = parse_body(&body)?;
    let prompt = body["messages"]
        .as_array()
        .map(|msgs| {
            msgs.iter()
                .filter_map(|m| m["content"].as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default();
    infer(app, body, prompt, Shape::Chat).await
}

pub(crate) async fn infer(app: Arc<App>, body: Value, prompt: String, shape: Shape) -> ApiResult {
    let (name, r) = model_field(&body)?;
    let info = find_model(&app, &name, &r)?;
    // Capabilities the request needs that the model lacks (the sim's models have none of
    // thinking, tools or vision), refused before loading, as Ollama does.
    let lacks = |what: &str| {
        error(
            StatusCode::BAD_REQUEST,
            format!("{name:?} does not support {what}"),
        )
    };
    if body["think"].as_bool() == Some(true) || body["think"].is_string() {
        return Err(lacks("thinking"));
    }
    if body["tools"].as_array().is_some_and(|t| !t.is_empty()) {
        return Err(lacks("tools"));
    }
    if body["images"].as_array().is_some_and(|i| !i.is_empty()) {
        return Err(lacks("vision"));
    }
    match &body["format"] {
        Value::Null | Value::Object(_) => {}
        Value::String(f) if f.is_empty() || f == "json" => {}
        other => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("invalid format: {other}; use \"json\" or a JSON schema"),
            ));
        }
    }
    if info.embedding_only() {
        // Ollama refuses before it loads anything.
        let what = match shape {
            Shape::Generate => "generate",
            Shape::Chat => "chat",
        };
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("{name:?} does not support {what}"),
        ));
    }
    let keep = keep_alive(&app, &body)?;
    if prompt.is_empty() {
        let reason = app.runner.load_only(&info, keep).await.map_err(refusal)?;
        return Ok(axum::Json(shape.done(&name, "", reason)).into_response());
    }
    let options = &body["options"];
    let num_thread = options["num_thread"].as_u64().map(|n| n as usize);
    let requested = options["num_predict"].as_i64().filter(|n| *n > 0);
    let tokens = requested.map_or(app.cfg.num_predict, |n| n as usize);
    let reason = if requested.is_some() {
        "length"
    } else {
        "stop"
    };
    let started = Instant::now();
    let lease = app
        .runner
        .acquire(&info, keep, num_thread)
        .await
        .map_err(refusal)?;
    let mut prompt_tokens: Vec<crate::cache::Token> = body["context"]
        .as_array()
        .map(|c| c.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    prompt_tokens.extend(crate::cache::tokens(&prompt));
    let messages = match shape {
        Shape::Chat => body["messages"].clone(),
        Shape::Generate => {
            let mut m = Vec::new();
            if let Some(system) = body["system"].as_str() {
                m.push(json!({"role": "system", "content": system}));
            }
            m.push(json!({"role": "user", "content": prompt}));
            Value::Array(m)
        }
    };
    let job = Generation {
        model: name,
        shape,
        tokens,
        reason,
        prompt: prompt_tokens,
        prefill_per_second: app.cfg.prefill_per_second,
        started,
        messages,
        raw: (body["raw"] == true).then(|| prompt.clone()),
    };
    // The thread count the request ran with, for tests (Ollama itself does not say).
    let threads = (
        header::HeaderName::from_static("x-sim-num-thread"),
        lease.num_thread.to_string(),
    );
    if streaming(&body) {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move { job.run(lease, Some(tx)).await });
        Ok(([threads], ndjson(rx)).into_response())
    } else {
        Ok(([threads], axum::Json(job.run(lease, None).await)).into_response())
    }
}

struct Generation {
    model: String,
    shape: Shape,
    tokens: usize,
    reason: &'static str,
    /// The prompt's tokens (a generate request's `context` first).
    prompt: Vec<crate::cache::Token>,
    prefill_per_second: f64,
    started: Instant,
    /// The conversation, for the real engine's chat template.
    messages: Value,
    /// A raw prompt (`raw: true`): no template.
    raw: Option<String>,
}

impl Generation {
    /// Generates with the real engine: the prompt rendered by the model's template, completed
    /// by the runner (its prompt cache as far as it holds the prefix); Ollama's counts from the
    /// runner's (`prompt_eval_count` includes cached tokens, `prompt_eval_duration` covers only
    /// the ones evaluated, as in Ollama since 0.30).
    async fn run_engine(
        self,
        lease: Lease,
        child: &crate::engine::Child,
        tx: Option<mpsc::Sender<Value>>,
    ) -> Value {
        let prompt = match &self.raw {
            Some(p) => Ok(p.clone()),
            None => child.template(&self.messages).await,
        };
        let (ptx, mut prx) = mpsc::channel::<String>(16);
        let (shape, model) = (self.shape, self.model.clone());
        let forward = async {
            while let Some(piece) = prx.recv().await {
                if let Some(tx) = &tx
                    && tx.send(shape.chunk(&model, &piece)).await.is_err()
                {
                    return;
                }
            }
        };
        let complete = async {
            match prompt {
                Ok(p) => child.complete(&p, self.tokens, ptx).await,
                Err(e) => Err(e),
            }
        };
        let (done, ()) = tokio::join!(complete, forward);
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                let error = json!({ "error": e });
                if let Some(tx) = &tx {
                    let _ = tx.send(error.clone()).await;
                }
                return error;
            }
        };
        let text = if tx.is_some() { "" } else { done.text.as_str() };
        let reason = if done.at_limit { "length" } else { "stop" };
        let mut out = self.shape.done(&self.model, text, reason);
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        out["total_duration"] = json!(ns(self.started.elapsed()));
        out["load_duration"] = json!(ns(lease.load_duration));
        out["prompt_eval_count"] = json!(done.prompt_n + done.cache_n);
        out["prompt_eval_duration"] = json!(ns(done.prompt));
        out["eval_count"] = json!(done.predicted_n);
        out["eval_duration"] = json!(ns(done.predicted));
        drop(lease);
        if let Some(tx) = tx {
            let _ = tx.send(out.clone()).await;
        }
        out
    }

    /// Produces the tokens at the lease's speed; streams them when `tx` is given. Returns the
    /// final object (with the whole text when not streaming).
    async fn run(self, lease: Lease, tx: Option<mpsc::Sender<Value>>) -> Value {
        if let Some(child) = lease.child.clone() {
            return self.run_engine(lease, &child, tx).await;
        }
        // Prompt evaluation: only what the prompt cache does not hold.
        let taken = lease.runner().take_slot(&self.prompt);
        let uncached = self.prompt.len().saturating_sub(taken.cached).max(1);
        let prefill = Duration::from_secs_f64(uncached as f64 / self.prefill_per_second);
        tokio::time::sleep(prefill).await;
        let mut held = self.prompt.clone();
        let per_token = Duration::from_secs_f64(1.0 / lease.tokens_per_second);
        let eval_started = Instant::now();
        let mut text = String::new();
        let paced = tokio::time::Instant::now();
        for i in 0..self.tokens {
            // Paced against the start (a sleep per token would round each up to the timer's
            // millisecond, capping any speed at 1000 tokens/s).
            tokio::time::sleep_until(paced + per_token.mul_f64((i + 1) as f64)).await;
            let word = WORDS[i % WORDS.len()];
            held.extend(crate::cache::tokens(word));
            match &tx {
                Some(tx) => {
                    if tx.send(self.shape.chunk(&self.model, word)).await.is_err() {
                        lease.runner().give_back_slot(taken.slot, held);
                        return Value::Null; // the client left
                    }
                }
                None => text.push_str(word),
            }
        }
        let eval = eval_started.elapsed();
        let mut done = self.shape.done(&self.model, &text, self.reason);
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        done["total_duration"] = json!(ns(self.started.elapsed()));
        done["load_duration"] = json!(ns(lease.load_duration));
        // As Ollama since 0.30: the count includes cached tokens, the duration only the
        // evaluated ones.
        done["prompt_eval_count"] = json!(self.prompt.len().max(1));
        done["prompt_eval_duration"] = json!(ns(prefill));
        done["eval_count"] = json!(self.tokens);
        done["eval_duration"] = json!(ns(eval));
        if let Shape::Generate = self.shape {
            done["context"] = json!(held);
        }
        lease.runner().give_back_slot(taken.slot, held);
        drop(lease);
        if let Some(tx) = tx {
            let _ = tx.send(done.clone()).await;
        }
        done
    }
}

/// `POST /api/create` as current Ollama takes it: `from` (pulled first when absent),
/// `parameters`, `system`, `template`; `modelfile` is ignored. (`files`, `adapters`, quantizing
/// and remote models are beyond the sim.)
async fn create(State(app): Shared, body: Bytes) -> ApiResult {
    let body = parse_body(&body)?;
    let (_, new) = model_field(&body)?;
    let from = match body["from"].as_str().filter(|f| !f.is_empty()) {
        Some(f) => f.to_string(),
        None if body["files"].is_object() => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "ollama-sim cannot create a model from files; use from",
            ));
        }
        None => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "neither 'from' or 'files' was specified",
            ));
        }
    };
    let base_ref =
        ModelRef::parse(&from).map_err(|_| error(StatusCode::BAD_REQUEST, "invalid model name"))?;
    let mut params = BTreeMap::new();
    if let Some(p) = body["parameters"].as_object() {
        params.extend(p.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let text = |k: &str| body[k].as_str().map(str::to_string);
    let (system, template) = (text("system"), text("template"));
    let stream = streaming(&body);
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        if app.store.get(&base_ref).is_none() {
            // Like Ollama: a `from` that is not here is pulled, its progress in this stream.
            let missing = registry_lacks(&app, &from, &base_ref);
            let (ptx, mut prx) = mpsc::channel(64);
            let pull = tokio::spawn(run_pull(app.clone(), base_ref.clone(), missing, ptx));
            while let Some(v) = prx.recv().await {
                let failed = v.get("error").is_some();
                let _ = tx.send(v).await;
                if failed {
                    return;
                }
            }
            let _ = pull.await;
        }
        let Some(base) = app.store.get(&base_ref) else {
            let _ = tx
                .send(json!({"error": format!("model '{from}' not found")}))
                .await;
            return;
        };
        let texts = (system.as_deref(), template.as_deref());
        if let Err(e) = app.store.create(&new, &base, &params, texts) {
            let _ = tx.send(json!({"error": e.to_string()})).await;
            return;
        }
        for status in [
            format!("using existing layer {}", base.model_blob),
            "creating new layer".into(),
            "writing manifest".into(),
            "success".into(),
        ] {
            let _ = tx.send(json!({"status": status})).await;
        }
    });
    progress_answer(stream, rx, task).await
}

async fn show(State(app): Shared, body: Bytes) -> ApiResult {
    let body = parse_body(&body)?;
    let (name, r) = model_field(&body)?;
    let Some(info) = app.store.get(&r) else {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("model '{name}' not found"),
        ));
    };
    let mut modelfile = format!(
        "# Modelfile generated by \"ollama show\"\n# To build a new Modelfile based on this, replace FROM with:\n# FROM {}\n\nFROM {}\nTEMPLATE {{{{ .Prompt }}}}\n",
        info.name,
        app.store.blob_path(&info.model_blob).display()
    );
    for (k, v) in &info.parameters {
        modelfile.push_str(&format!(
            "PARAMETER {k} {}\n",
            v.as_str().map_or_else(|| v.to_string(), str::to_string)
        ));
    }
    Ok(axum::Json(json!({
        "license": "",
        "modelfile": modelfile,
        "parameters": parameters_text(&info.parameters),
        "template": info.template.clone().unwrap_or_else(|| "{{ .Prompt }}".into()),
        "system": info.system.clone().unwrap_or_default(),
        "details": details(),
        // SmolLM2-135M's shape (what the real engine's image serves): 30 layers of 3 KV heads
        // of 64 dimensions, 22.5 KiB of KV cache per token in f16.
        "model_info": {
            "general.architecture": "llama",
            "general.parameter_count": 134_515_008u64,
            "llama.context_length": 8192,
            "llama.block_count": 30,
            "llama.embedding_length": 576,
            "llama.attention.head_count": 9,
            "llama.attention.head_count_kv": 3,
        },
        "modified_at": timestamp(info.modified),
        "capabilities": info.capabilities(),
    }))
    .into_response())
}

/// The dimensions of the sim's embeddings.
const EMBEDDING_DIMS: usize = 384;

/// A deterministic unit vector for `text` (the same text always embeds the same).
pub(crate) fn embedding(text: &str) -> Vec<f32> {
    let mut x: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        x = (x ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut v: Vec<f32> = (0..EMBEDDING_DIMS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    let norm = v
        .iter()
        .map(|a| a * a)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    v.iter_mut().for_each(|a| *a /= norm);
    v
}

/// `POST /api/embed`: `input` is a string or a list of strings; without input the model is
/// only loaded (and pinned by `keep_alive`), as Ollama does. Any model embeds.
async fn embed(State(app): Shared, body: Bytes) -> ApiResult {
    let body = parse_body(&body)?;
    let (name, r) = model_field(&body)?;
    let invalid = || error(StatusCode::BAD_REQUEST, "invalid input type");
    let inputs: Vec<String> = match &body["input"] {
        Value::Null => Vec::new(),
        Value::String(s) if s.is_empty() => Vec::new(),
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(invalid))
            .collect::<Result<_, _>>()?,
        _ => return Err(invalid()),
    };
    let info = app
        .store
        .get(&r)
        .ok_or_else(|| error(StatusCode::NOT_FOUND, format!("model '{name}' not found")))?;
    let keep = keep_alive(&app, &body)?;
    let started = Instant::now();
    if inputs.is_empty() {
        app.runner.load_only(&info, keep).await.map_err(refusal)?;
        return Ok(axum::Json(json!({"model": name, "embeddings": []})).into_response());
    }
    let lease = app
        .runner
        .acquire(&info, keep, None)
        .await
        .map_err(refusal)?;
    let load = lease.load_duration;
    let embeddings: Vec<Vec<f32>> = inputs.iter().map(|t| embedding(t)).collect();
    drop(lease);
    let tokens: usize = inputs
        .iter()
        .map(|t| t.split_whitespace().count().max(1))
        .sum();
    Ok(axum::Json(json!({
        "model": name,
        "embeddings": embeddings,
        "total_duration": started.elapsed().as_nanos() as u64,
        "load_duration": load.as_nanos() as u64,
        "prompt_eval_count": tokens,
    }))
    .into_response())
}

/// `POST /api/embeddings` (Ollama's older route): `prompt` in, `embedding` out; an empty prompt
/// only loads the model.
async fn embeddings(State(app): Shared, body: Bytes) -> ApiResult {
    let body = parse_body(&body)?;
    let (name, r) = model_field(&body)?;
    let info = app
        .store
        .get(&r)
        .ok_or_else(|| error(StatusCode::NOT_FOUND, format!("model '{name}' not found")))?;
    let keep = keep_alive(&app, &body)?;
    let prompt = body["prompt"].as_str().unwrap_or("");
    if prompt.is_empty() {
        app.runner.load_only(&info, keep).await.map_err(refusal)?;
        return Ok(axum::Json(json!({"embedding": []})).into_response());
    }
    let lease = app
        .runner
        .acquire(&info, keep, None)
        .await
        .map_err(refusal)?;
    let v = embedding(prompt);
    drop(lease);
    Ok(axum::Json(json!({"embedding": v})).into_response())
}

/// `POST /api/copy {source, destination}`.
async fn copy_model(State(app): Shared, body: Bytes) -> ApiResult {
    let body = parse_body(&body)?;
    let field = |k: &str| {
        body[k]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let (Some(source), Some(destination)) = (field("source"), field("destination")) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "source and destination are required",
        ));
    };
    let src = ModelRef::parse(&source).map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            format!("source {source:?} is invalid"),
        )
    })?;
    let dst = ModelRef::parse(&destination).map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            format!("destination {destination:?} is invalid"),
        )
    })?;
    if app.store.get(&src).is_none() {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("model {source:?} not found"),
        ));
    }
    app.store
        .copy(&src, &dst)
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(StatusCode::OK.into_response())
}

/// `HEAD /api/blobs/:digest`: 200 when the blob is here.
async fn head_blob(
    State(app): Shared,
    axum::extract::Path(digest): axum::extract::Path<String>,
) -> ApiResult {
    if app.store.has_blob(&digest) {
        Ok(StatusCode::OK.into_response())
    } else {
        Err(error(
            StatusCode::NOT_FOUND,
            format!("blob {digest:?} not found"),
        ))
    }
}

/// `POST /api/blobs/:digest`: stores the body as that blob when it hashes to it (201).
async fn post_blob(
    State(app): Shared,
    axum::extract::Path(digest): axum::extract::Path<String>,
    body: Bytes,
) -> ApiResult {
    if app.store.has_blob(&digest) {
        return Ok(StatusCode::OK.into_response());
    }
    app.store
        .put_blob(&digest, &body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
    Ok(StatusCode::CREATED.into_response())
}

async fn delete_model(State(app): Shared, body: Bytes) -> ApiResult {
    let body = parse_body(&body)?;
    let (name, r) = model_field(&body)?;
    match app.store.delete(&r) {
        Ok(()) => Ok(StatusCode::OK.into_response()),
        Err(_) => Err(error(
            StatusCode::NOT_FOUND,
            format!("model '{name}' not found"),
        )),
    }
}

async fn sim_state(State(app): Shared) -> Response {
    let (cache_bytes, cache_states) = app.runner.cache_held();
    axum::Json(json!({
        "promptCacheBytes": cache_bytes,
        "promptCacheStates": cache_states,
        "pid": std::process::id(),
        "uptimeSeconds": app.started.elapsed().as_secs_f64(),
        "inFlight": app.runner.in_flight(),
        "loads": app.runner.loads(),
        "loaded": app.runner.running().iter().map(|r| r.info.name.clone()).collect::<Vec<_>>(),
        "leakedBytes": app.faults.leaked_bytes(),
        "leakRate": app.faults.leak_rate(),
        "numParallel": app.cfg.num_parallel,
        "maxQueue": app.cfg.max_queue,
        "hostCores": app.cfg.host_cores,
        "cpuAllowance": cgroup_cpu_allowance(),
        "modelsDir": app.cfg.models_dir,
    }))
    .into_response()
}

/// `POST /sim/exit {"code": 3}`: answer, then exit with the code (default 1).
async fn sim_exit(body: Bytes) -> Response {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let code = v["code"]
        .as_i64()
        .and_then(|c| i32::try_from(c).ok())
        .unwrap_or(1);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        exit_now(code, "POST /sim/exit");
    });
    axum::Json(json!({"exiting": code})).into_response()
}

/// `POST /sim/hang`: answer this request, then answer nothing ever again.
async fn sim_hang(State(app): Shared) -> Response {
    app.faults.hang();
    axum::Json(json!({"hung": true})).into_response()
}

/// `POST /sim/leak {"rate": "10Mi"}`: leak that many bytes per second (0 stops).
async fn sim_leak(State(app): Shared, body: Bytes) -> ApiResult {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let rate = match &v["rate"] {
        Value::Number(n) => n.as_u64().ok_or_else(|| "rate must be >= 0".to_string()),
        Value::String(s) => fleet_api::Quantity::parse(s).map(fleet_api::Quantity::bytes),
        _ => Err("give {\"rate\": BYTES_PER_SECOND} (a number or a quantity like 10Mi)".into()),
    };
    match rate {
        Ok(r) => {
            app.faults.set_leak_rate(r);
            Ok(axum::Json(json!({"leakRate": r})).into_response())
        }
        Err(e) => Err(error(StatusCode::BAD_REQUEST, e)),
    }
}
