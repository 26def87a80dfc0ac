//! Ollama's API as the agent uses it, behind the [`Ollama`] trait: [`HttpOllama`] speaks HTTP
//! to an instance, [`ScriptedOllama`] answers as a test decides and records every call.
//!
//! - `show`: whether the model is in the instance's models directory, and its `num_thread`;
//! - `pull`: `/api/pull`, following the NDJSON progress stream to its `success` (or `error`);
//! - `set_threads`: `/api/create` of the model under its own name with `num_thread`, so every
//!   request that does not say otherwise runs with it (sent in both the `from`/`parameters`
//!   form of newer Ollama and the `modelfile` form of older ones);
//! - `load`: `/api/generate` without a prompt and `keep_alive: -1` loads and pins the model;
//!   `/api/ps` confirms it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use fleet_api::ModelRef;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use crate::upstream::{self, CallError};

/// Bytes done and total of a pull, as the stream reports them.
pub type Progress = Arc<Mutex<(u64, u64)>>;

/// What sizing an instance's memory needs to know of a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelFacts {
    /// Bytes the model takes (its weights file, which the runner maps).
    pub size: u64,
    /// Bytes of KV cache per token of context: f16 keys and values of every layer.
    pub kv_per_token: u64,
}

/// The KV cache per token of a model, from `/api/show`'s `model_info`: layers x KV heads x
/// (key + value dimensions) x 2 bytes (f16, llama.cpp's default).
pub fn kv_per_token(model_info: &Value) -> Option<u64> {
    let arch = model_info["general.architecture"].as_str()?;
    let n = |k: &str| model_info[format!("{arch}.{k}")].as_u64();
    let layers = n("block_count")?;
    let heads = n("attention.head_count")?.max(1);
    let kv_heads = n("attention.head_count_kv").unwrap_or(heads);
    let head_dim = n("embedding_length")? / heads;
    let key = n("attention.key_length").unwrap_or(head_dim);
    let value = n("attention.value_length").unwrap_or(head_dim);
    Some(layers * kv_heads * (key + value) * 2)
}

/// Ollama, as far as the agent needs it. `base` is an instance's `http://host:port`.
#[async_trait::async_trait]
pub trait Ollama: Send + Sync + 'static {
    /// `None` when the model is absent; else its `num_thread` parameter, if it has one.
    async fn show(&self, base: &str, model: &str) -> Result<Option<Option<u32>>, CallError>;
    /// Pulls the model into the instance's models directory.
    async fn pull(&self, base: &str, model: &str, progress: &Progress) -> Result<(), CallError>;
    /// Creates (or re-creates) model `name` from model `from` with `num_thread` = `threads`
    /// (the same blobs plus a parameters layer). `name == from` rewrites `from` itself.
    async fn derive(
        &self,
        base: &str,
        from: &str,
        name: &str,
        threads: u32,
    ) -> Result<(), CallError>;
    /// The names of the models present (`/api/tags`).
    async fn names(&self, base: &str) -> Result<Vec<String>, CallError>;
    /// Removes a model's name (Ollama keeps blobs other names still use).
    async fn delete(&self, base: &str, model: &str) -> Result<(), CallError>;
    /// Loads the model and pins it (`keep_alive: -1`); succeeds once `/api/ps` shows it.
    async fn load(&self, base: &str, model: &str) -> Result<(), CallError>;
    /// The model's size and KV cache per token (`None`: the server does not say).
    async fn facts(&self, base: &str, model: &str) -> Result<Option<ModelFacts>, CallError>;
}

/// Ollama over HTTP.
#[derive(Clone, Debug)]
pub struct HttpOllama {
    client: upstream::Client<Full<Bytes>>,
    fresh: upstream::Client<Full<Bytes>>,
    /// How long a pull may go without a line: (while downloading, while verifying).
    pull_idle: (Duration, Duration),
}

impl Default for HttpOllama {
    fn default() -> Self {
        HttpOllama {
            client: upstream::client(1),
            fresh: upstream::client(0),
            pull_idle: (PULL_IDLE, VERIFY_IDLE),
        }
    }
}

impl HttpOllama {
    /// How long a pull may go without a progress line, while downloading and while Ollama
    /// verifies the blobs (defaults 2 min and 30 min).
    pub fn with_pull_idle(mut self, downloading: Duration, verifying: Duration) -> HttpOllama {
        self.pull_idle = (downloading, verifying);
        self
    }
}

/// How long a pull may go without a progress line.
const PULL_IDLE: Duration = Duration::from_secs(120);
/// How long Ollama's final check may go silent: after "verifying sha256 digest" it hashes every
/// downloaded blob without a word (tens of GB at disk speed).
const VERIFY_IDLE: Duration = Duration::from_secs(1800);
/// How long loading a model may take.
const LOAD_TIMEOUT: Duration = Duration::from_secs(900);
/// Other calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of an answer that is read (an instance is untrusted: it could stream forever).
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// The longest line of a pull's progress stream.
pub const MAX_LINE: usize = 64 * 1024;

/// The `num_thread` line of `/api/show`'s `parameters` text.
fn num_thread_of(parameters: &str) -> Option<u32> {
    parameters.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("num_thread"))
            .then(|| words.next()?.parse().ok())
            .flatten()
    })
}

/// Whether two model names are the same model (`m` and `m:latest`, with or without the
/// default registry, in any case: Ollama compares names case-insensitively).
pub fn same_model(a: &str, b: &str) -> bool {
    match (ModelRef::parse(a), ModelRef::parse(b)) {
        (Ok(x), Ok(y)) => x.same_as(&y),
        _ => a.eq_ignore_ascii_case(b),
    }
}

/// Whether an answer of `/api/tags` or `/api/ps` lists the model.
fn lists(answer: &Value, model: &str) -> bool {
    answer["models"].as_array().is_some_and(|models| {
        models.iter().any(|m| {
            m["name"]
                .as_str()
                .or_else(|| m["model"].as_str())
                .is_some_and(|n| same_model(n, model))
        })
    })
}

/// Whether a 404 body is Ollama's "model not found" (JSON with an `error` naming it).
fn model_not_found(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_lowercase))
        .is_some_and(|e| e.contains("not found"))
}

impl HttpOllama {
    /// Whether `/api/tags` lists the model (`Some(None)`: present, thread count unknown); a
    /// server without `/api/tags` either cannot say, so the model counts as absent.
    async fn listed(&self, base: &str, model: &str) -> Result<Option<Option<u32>>, CallError> {
        let (status, body) = self
            .call("GET", format!("{base}/api/tags"), None, CALL_TIMEOUT)
            .await?;
        if status != 200 {
            return Ok(None);
        }
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        Ok(lists(&v, model).then_some(None))
    }

    async fn send(
        &self,
        method: &str,
        url: String,
        body: Option<Value>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, CallError> {
        let payload = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let unreachable = |reason: String| CallError::Unreachable {
            url: url.clone(),
            reason,
        };
        let method: hyper::Method = method
            .parse()
            .map_err(|_| unreachable(format!("bad method {method}")))?;
        let uri: hyper::Uri = url.parse().map_err(|e| unreachable(format!("{e}")))?;
        let make = || {
            let mut req = hyper::Request::new(Full::new(payload.clone()));
            *req.method_mut() = method.clone();
            *req.uri_mut() = uri.clone();
            req.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            req
        };
        upstream::send(&self.client, &self.fresh, make)
            .await
            .map_err(|e| unreachable(e.to_string()))
    }

    /// A call whose whole answer is read: (status, body).
    async fn call(
        &self,
        method: &str,
        url: String,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), CallError> {
        let fut = async {
            let resp = self.send(method, url.clone(), body).await?;
            let status = resp.status().as_u16();
            let bytes = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| {
                    CallError::Invalid(format!(
                        "{url}: {e} (answers are read up to {MAX_BODY} bytes)"
                    ))
                })?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| CallError::Timeout(timeout))?
    }
}

#[async_trait::async_trait]
impl Ollama for HttpOllama {
    async fn show(&self, base: &str, model: &str) -> Result<Option<Option<u32>>, CallError> {
        let (status, body) = self.post_show(base, model).await?;
        match status {
            200 => {
                let v: Value = serde_json::from_slice(&body).map_err(|e| CallError::json(&e))?;
                Ok(Some(num_thread_of(v["parameters"].as_str().unwrap_or(""))))
            }
            // Ollama's "model not found" (a JSON error). Any other 404 or 405 means the server
            // has no /api/show: ask /api/tags whether the model is there.
            404 if model_not_found(&body) => Ok(None),
            404 | 405 | 501 => self.listed(base, model).await,
            s => Err(CallError::status(s, &body)),
        }
    }

    async fn pull(&self, base: &str, model: &str, progress: &Progress) -> Result<(), CallError> {
        let url = format!("{base}/api/pull");
        let resp = tokio::time::timeout(
            CALL_TIMEOUT,
            self.send(
                "POST",
                url,
                Some(json!({"model": model, "name": model, "stream": true})),
            ),
        )
        .await
        .map_err(|_| CallError::Timeout(CALL_TIMEOUT))??;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        let mut layers: HashMap<String, (u64, u64)> = HashMap::new();
        let mut last = String::new();
        loop {
            let idle = if last.starts_with("verifying") {
                self.pull_idle.1
            } else {
                self.pull_idle.0
            };
            let frame = tokio::time::timeout(idle, body.frame())
                .await
                .map_err(|_| CallError::Stalled {
                    what: "the pull",
                    idle,
                    last: last.clone(),
                })?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| CallError::Invalid(format!("the pull's stream: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            if buf.len() > MAX_LINE && !buf.contains(&b'\n') {
                return Err(CallError::Invalid(format!(
                    "the pull's progress stream sent a line longer than {MAX_LINE} bytes"
                )));
            }
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                if let Some(e) = v["error"].as_str() {
                    return Err(CallError::Refused(fleet_api::clip(e, 512).into_owned()));
                }
                if let (Some(d), Some(t)) = (v["digest"].as_str(), v["total"].as_u64()) {
                    let done = v["completed"].as_u64().unwrap_or(0);
                    layers.insert(d.to_string(), (done, t));
                    let sum = layers
                        .values()
                        .fold((0, 0), |(a, b), (d, t)| (a + d, b + t));
                    *progress.lock().unwrap_or_else(|p| p.into_inner()) = sum;
                }
                last = v["status"].as_str().unwrap_or("").to_string();
            }
        }
        if status != 200 {
            return Err(CallError::status(status, &buf));
        }
        if last == "success" {
            Ok(())
        } else {
            Err(CallError::Invalid(format!(
                "the pull ended without success (last status {last:?})"
            )))
        }
    }

    async fn derive(
        &self,
        base: &str,
        from: &str,
        name: &str,
        threads: u32,
    ) -> Result<(), CallError> {
        // Current Ollama reads `from` and `parameters`; older ones read `modelfile`.
        let body = json!({
            "model": name,
            "name": name,
            "from": from,
            "parameters": {"num_thread": threads},
            "modelfile": format!("FROM {from}\nPARAMETER num_thread {threads}\n"),
            "stream": false,
        });
        let (status, body) = self
            .call(
                "POST",
                format!("{base}/api/create"),
                Some(body),
                CALL_TIMEOUT,
            )
            .await?;
        if status == 200 {
            Ok(())
        } else {
            Err(CallError::status(status, &body))
        }
    }

    async fn names(&self, base: &str) -> Result<Vec<String>, CallError> {
        let (status, body) = self
            .call("GET", format!("{base}/api/tags"), None, CALL_TIMEOUT)
            .await?;
        if status != 200 {
            return Err(CallError::status(status, &body));
        }
        let v: Value = serde_json::from_slice(&body).map_err(|e| CallError::json(&e))?;
        Ok(v["models"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["name"].as_str().or_else(|| m["model"].as_str()))
            .map(str::to_string)
            .collect())
    }

    async fn delete(&self, base: &str, model: &str) -> Result<(), CallError> {
        let (status, body) = self
            .call(
                "DELETE",
                format!("{base}/api/delete"),
                Some(json!({"model": model, "name": model})),
                CALL_TIMEOUT,
            )
            .await?;
        match status {
            200 | 404 => Ok(()),
            s => Err(CallError::status(s, &body)),
        }
    }

    async fn load(&self, base: &str, model: &str) -> Result<(), CallError> {
        // A generate without a prompt loads the model; an embedding-only model refuses it
        // ("does not support generate", 400) and is loaded by an embed without input instead.
        let pin = json!({"model": model, "keep_alive": -1, "stream": false});
        let (mut status, mut body) = self
            .call(
                "POST",
                format!("{base}/api/generate"),
                Some(pin.clone()),
                LOAD_TIMEOUT,
            )
            .await?;
        if status == 400
            && CallError::status(status, &body)
                .to_string()
                .contains("does not support generate")
        {
            (status, body) = self
                .call("POST", format!("{base}/api/embed"), Some(pin), LOAD_TIMEOUT)
                .await?;
        }
        if status != 200 {
            return Err(CallError::status(status, &body));
        }
        let (status, body) = self
            .call("GET", format!("{base}/api/ps"), None, CALL_TIMEOUT)
            .await?;
        if matches!(status, 404 | 405 | 501) {
            // No /api/ps: the successful load is all there is to go by.
            return Ok(());
        }
        if status != 200 {
            return Err(CallError::status(status, &body));
        }
        let ps: Value = serde_json::from_slice(&body).map_err(|e| CallError::json(&e))?;
        if lists(&ps, model) {
            Ok(())
        } else {
            Err(CallError::Refused(format!(
                "/api/ps does not list {model} after loading it"
            )))
        }
    }

    async fn facts(&self, base: &str, model: &str) -> Result<Option<ModelFacts>, CallError> {
        let (status, body) = self.post_show(base, model).await?;
        if status != 200 {
            return Ok(None);
        }
        let v: Value = serde_json::from_slice(&body).map_err(|e| CallError::json(&e))?;
        let Some(kv) = kv_per_token(&v["model_info"]) else {
            return Ok(None);
        };
        Ok(self.size_of(base, model).await?.map(|size| ModelFacts {
            size,
            kv_per_token: kv,
        }))
    }
}

impl HttpOllama {
    /// `POST /api/show` for `model`: (status, body).
    async fn post_show(&self, base: &str, model: &str) -> Result<(u16, Bytes), CallError> {
        let body = json!({"model": model, "name": model});
        let url = format!("{base}/api/show");
        self.call("POST", url, Some(body), CALL_TIMEOUT).await
    }

    /// The size `/api/tags` gives the model.
    async fn size_of(&self, base: &str, model: &str) -> Result<Option<u64>, CallError> {
        let (status, body) = self
            .call("GET", format!("{base}/api/tags"), None, CALL_TIMEOUT)
            .await?;
        if status != 200 {
            return Err(CallError::status(status, &body));
        }
        let v: Value = serde_json::from_slice(&body).map_err(|e| CallError::json(&e))?;
        Ok(v["models"].as_array().and_then(|models| {
            models
                .iter()
                .find(|m| {
                    m["name"]
                        .as_str()
                        .or_else(|| m["model"].as_str())
                        .is_some_and(|n| same_model(n, model))
                })
                .and_then(|m| m["size"].as_u64())
        }))
    }
}

/// Ollama as a test scripts it: a models directory per base URL (or shared, see
/// [`ScriptedOllama::share`]), loads that succeed, failures on demand, and a log of calls.
#[derive(Debug, Default)]
pub struct ScriptedOllama {
    state: Mutex<Scripted>,
}

#[derive(Debug, Default)]
struct Scripted {
    /// Models present: (models directory, model) → num_thread.
    models: HashMap<(String, String), Option<u32>>,
    /// Base URL → models directory (default: the base URL itself).
    dirs: HashMap<String, String>,
    failing: HashSet<String>,
    /// Base URLs that no longer answer.
    down: HashSet<String>,
    calls: Vec<String>,
    pull_time: Duration,
    /// What `facts` says of every model present (`None`: [`SCRIPTED_FACTS`]).
    facts: Option<ModelFacts>,
}

/// What scripted Ollama says of a model unless told otherwise: SmolLM2-135M's KV cache per
/// token, 64 MiB of weights.
pub const SCRIPTED_FACTS: ModelFacts = ModelFacts {
    size: 64 << 20,
    kv_per_token: 23_040,
};

impl ScriptedOllama {
    fn lock(&self) -> MutexGuard<'_, Scripted> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every base URL uses the same models directory (a node's shared cache).
    pub fn share(&self, dir: &str) {
        self.lock().dirs.insert("*".into(), dir.into());
    }

    /// What `facts` says of every model present (default: 64 MiB, 22.5 KiB per token).
    pub fn set_facts(&self, facts: ModelFacts) {
        self.lock().facts = Some(facts);
    }

    /// Pulls take this long.
    pub fn set_pull_time(&self, time: Duration) {
        self.lock().pull_time = time;
    }

    /// Every base URL has its own models directory again (the default).
    pub fn unshare(&self) {
        self.lock().dirs.remove("*");
    }

    /// Makes calls of a kind (`show`, `pull`, `derive`, `names`, `delete`, `load`) fail, or
    /// succeed again.
    pub fn set_failing(&self, call: &str, failing: bool) {
        let mut s = self.lock();
        if failing {
            s.failing.insert(call.into());
        } else {
            s.failing.remove(call);
        }
    }

    /// Makes every call to `base` fail as if the instance were gone, or answer again.
    pub fn set_down(&self, base: &str, down: bool) {
        let mut s = self.lock();
        if down {
            s.down.insert(base.into());
        } else {
            s.down.remove(base);
        }
    }

    /// What `show` answers for a model in the shared directory (see [`ScriptedOllama::share`]).
    pub fn show_threads(&self, model: &str) -> Option<Option<u32>> {
        let s = self.lock();
        let dir = s.dirs.get("*")?;
        s.models.get(&(dir.clone(), model.to_string())).copied()
    }

    /// The calls so far, as `kind base model`.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    fn record(&self, kind: &str, base: &str, model: &str) -> Result<(String, String), CallError> {
        let mut s = self.lock();
        s.calls.push(format!("{kind} {base} {model}"));
        if s.down.contains(base) {
            return Err(CallError::Unreachable {
                url: base.to_string(),
                reason: "connection refused (scripted)".into(),
            });
        }
        if s.failing.contains(kind) {
            return Err(CallError::Refused(format!("{kind} failed (scripted)")));
        }
        let dir = s
            .dirs
            .get("*")
            .or_else(|| s.dirs.get(base))
            .cloned()
            .unwrap_or_else(|| base.to_string());
        Ok((dir, model.to_string()))
    }
}

#[async_trait::async_trait]
impl Ollama for ScriptedOllama {
    async fn show(&self, base: &str, model: &str) -> Result<Option<Option<u32>>, CallError> {
        let key = self.record("show", base, model)?;
        Ok(self.lock().models.get(&key).copied())
    }

    async fn pull(&self, base: &str, model: &str, progress: &Progress) -> Result<(), CallError> {
        let key = self.record("pull", base, model)?;
        let time = self.lock().pull_time;
        tokio::time::sleep(time).await;
        *progress.lock().unwrap_or_else(|p| p.into_inner()) = (100, 100);
        self.lock().models.insert(key, None);
        Ok(())
    }

    async fn derive(
        &self,
        base: &str,
        from: &str,
        name: &str,
        threads: u32,
    ) -> Result<(), CallError> {
        let (dir, _) = self.record("derive", base, name)?;
        let mut s = self.lock();
        if !s.models.contains_key(&(dir.clone(), from.to_string())) {
            return Err(CallError::Refused(format!("model {from:?} not found")));
        }
        s.models.insert((dir, name.to_string()), Some(threads));
        Ok(())
    }

    async fn names(&self, base: &str) -> Result<Vec<String>, CallError> {
        let (dir, _) = self.record("names", base, "")?;
        let s = self.lock();
        Ok(s.models
            .keys()
            .filter(|(d, _)| *d == dir)
            .map(|(_, m)| m.clone())
            .collect())
    }

    async fn delete(&self, base: &str, model: &str) -> Result<(), CallError> {
        let key = self.record("delete", base, model)?;
        self.lock().models.remove(&key);
        Ok(())
    }

    async fn load(&self, base: &str, model: &str) -> Result<(), CallError> {
        let key = self.record("load", base, model)?;
        if self.lock().models.contains_key(&key) {
            Ok(())
        } else {
            Err(CallError::Refused(format!(
                "model {model:?} not found, try pulling it first"
            )))
        }
    }

    async fn facts(&self, base: &str, model: &str) -> Result<Option<ModelFacts>, CallError> {
        let key = self.record("facts", base, model)?;
        let s = self.lock();
        Ok(s.models
            .contains_key(&key)
            .then(|| s.facts.unwrap_or(SCRIPTED_FACTS)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn num_thread_from_show_parameters() {
        assert_eq!(
            num_thread_of("num_ctx                        2048\nnum_thread                     3"),
            Some(3)
        );
        assert_eq!(num_thread_of("stop \"<|end|>\""), None);
        assert_eq!(num_thread_of(""), None);
    }

    #[test]
    fn kv_cache_per_token_from_the_model_info() {
        let smollm2 = serde_json::json!({
            "general.architecture": "llama",
            "llama.block_count": 30,
            "llama.embedding_length": 576,
            "llama.attention.head_count": 9,
            "llama.attention.head_count_kv": 3,
        });
        assert_eq!(
            kv_per_token(&smollm2),
            Some(23_040),
            "30 x 3 x (64 + 64) x 2"
        );
        let llama3_8b = serde_json::json!({
            "general.architecture": "llama",
            "llama.block_count": 32,
            "llama.embedding_length": 4096,
            "llama.attention.head_count": 32,
            "llama.attention.head_count_kv": 8,
        });
        assert_eq!(kv_per_token(&llama3_8b), Some(131_072));
        assert_eq!(
            kv_per_token(&serde_json::json!({"general.architecture": "bert"})),
            None
        );
    }

    #[test]
    fn model_names_compare_normalised() {
        assert!(same_model(
            "smollm2:135m",
            "registry.ollama.ai/library/smollm2:135m"
        ));
        assert!(same_model("llama3", "llama3:latest"));
        assert!(same_model("Llama3", "llama3:LATEST"));
        assert!(!same_model("llama3:8b", "llama3:70b"));
    }
}
