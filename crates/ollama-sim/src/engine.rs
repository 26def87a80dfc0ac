//! The real engine behind the sim's API (`SIM_ENGINE`, `SIM_ENGINE_MODEL`). Since v0.30 Ollama
//! serves a loaded GGUF model through llama.cpp's `llama-server`, started as a child with
//! `-c num_ctx*N -np N` (and `-t` only when `num_thread` is set), no `--cache-ram` (so its
//! host-RAM prompt cache keeps its default cap unless `LLAMA_ARG_CACHE_RAM`, which the child
//! inherits with the rest of the environment, says otherwise), and sends it every request with
//! `cache_prompt: true`. The sim does the same: its model store, pulls and scheduling stay
//! simulated; a loaded model is a `llama-server` child serving the one GGUF the image carries,
//! whatever the model's name; prompts are rendered with the model's chat template
//! (`/apply-template`) and completed by `/completion`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// How long a child may take to answer `/health` after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the engine is.
#[derive(Clone, Debug)]
pub struct Engine {
    /// The `llama-server` binary.
    pub binary: PathBuf,
    /// The GGUF every model name loads.
    pub model: PathBuf,
}

/// A running `llama-server` (killed when dropped).
#[derive(Debug)]
pub struct Child {
    process: std::sync::Mutex<tokio::process::Child>,
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// What a completion cost, as llama-server reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Done {
    /// The text generated.
    pub text: String,
    /// Prompt tokens evaluated now (not from the cache).
    pub prompt_n: u64,
    /// Prompt tokens restored from the cache.
    pub cache_n: u64,
    /// Time evaluating the prompt (only the tokens evaluated).
    pub prompt: Duration,
    /// Tokens generated.
    pub predicted_n: u64,
    /// Time generating.
    pub predicted: Duration,
    /// It stopped at the token limit (`length`), else at an end token (`stop`).
    pub at_limit: bool,
}

impl Engine {
    /// Starts a child for `parallel` slots of `num_ctx` tokens each, with `threads` when set.
    pub async fn start(
        &self,
        num_ctx: usize,
        parallel: usize,
        threads: Option<usize>,
    ) -> Result<Child, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port for the runner: {e}"))?
            .port();
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.arg("--model")
            .arg(&self.model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-c", &(num_ctx * parallel.max(1)).to_string()])
            .args(["-np", &parallel.max(1).to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(t) = threads {
            cmd.args(["-t", &t.to_string()]);
        }
        let mut process = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.binary.display()))?;
        let child_pid = process.id().unwrap_or(0);
        let base = format!("http://127.0.0.1:{port}");
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = process.try_wait() {
                return Err(format!("llama-server exited at its start: {status}"));
            }
            let health = async {
                let uri: hyper::Uri = format!("{base}/health").parse().ok()?;
                let req = hyper::Request::get(uri)
                    .body(Full::new(Bytes::new()))
                    .ok()?;
                let resp = client.request(req).await.ok()?;
                (resp.status() == 200).then_some(())
            };
            if tokio::time::timeout(Duration::from_secs(2), health)
                .await
                .ok()
                .flatten()
                .is_some()
            {
                eprintln!(
                    "level=INFO source=sim msg=\"llama-server started\" pid={child_pid} port={port} seconds={:.1}",
                    started.elapsed().as_secs_f64()
                );
                return Ok(Child {
                    process: std::sync::Mutex::new(process),
                    base,
                    client,
                });
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(format!(
                    "llama-server did not answer within {START_TIMEOUT:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Child {
    /// Whether it still runs (the kernel's OOM killer may have ended it; Ollama then starts a
    /// new runner for the next request, and so does the sim).
    pub fn alive(&self) -> bool {
        let mut p = self.process.lock().unwrap_or_else(|p| p.into_inner());
        matches!(p.try_wait(), Ok(None))
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, hyper::body::Incoming), String> {
        let payload = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(payload))
            .map_err(|e| e.to_string())?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| format!("llama-server: {e}"))?;
        Ok((resp.status().as_u16(), resp.into_body()))
    }

    /// The prompt the model's chat template makes of `messages`.
    pub async fn template(&self, messages: &Value) -> Result<String, String> {
        let (status, body) = self
            .call(
                "POST",
                "/apply-template",
                Some(&json!({"messages": messages})),
            )
            .await?;
        let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        match (status, v["prompt"].as_str()) {
            (200, Some(p)) => Ok(p.to_string()),
            _ => Err(format!("apply-template: HTTP {status}: {v}")),
        }
    }

    /// Completes `prompt` with at most `n_predict` tokens (from the prompt cache as far as it
    /// holds it), sending each piece of text to `pieces` as it comes (it stops when nobody
    /// listens any more).
    pub async fn complete(
        &self,
        prompt: &str,
        n_predict: usize,
        pieces: tokio::sync::mpsc::Sender<String>,
    ) -> Result<Done, String> {
        let ask = json!({
            "prompt": prompt,
            "n_predict": n_predict,
            "stream": true,
            "cache_prompt": true,
        });
        let (status, mut body) = self.call("POST", "/completion", Some(&ask)).await?;
        let mut buf: Vec<u8> = Vec::new();
        let mut done = Done::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("llama-server: {e}"))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let Some(event) = line.trim().strip_prefix("data:") else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<Value>(event.trim()) else {
                    continue;
                };
                if status != 200 {
                    return Err(format!("llama-server: HTTP {status}: {v}"));
                }
                if let Some(text) = v["content"].as_str()
                    && !text.is_empty()
                {
                    done.text.push_str(text);
                    if pieces.send(text.to_string()).await.is_err() {
                        return Ok(done);
                    }
                }
                if v["stop"] == true {
                    let t = &v["timings"];
                    let ms =
                        |k: &str| Duration::from_secs_f64(t[k].as_f64().unwrap_or(0.0) / 1000.0);
                    done.prompt_n = t["prompt_n"].as_u64().unwrap_or(0);
                    done.cache_n = t["cache_n"].as_u64().unwrap_or(0);
                    done.prompt = ms("prompt_ms");
                    done.predicted_n = t["predicted_n"].as_u64().unwrap_or(0);
                    done.predicted = ms("predicted_ms");
                    done.at_limit = v["stop_type"] == "limit";
                    return Ok(done);
                }
            }
        }
        if status != 200 {
            return Err(format!(
                "llama-server: HTTP {status}: {}",
                String::from_utf8_lossy(&buf)
            ));
        }
        Ok(done)
    }
}
