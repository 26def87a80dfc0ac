//! Client load for the end-to-end tests: streaming generations from several clients at once,
//! each counted complete or failed, and one-off generations.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::http::request;

/// Streaming requests from several clients at once, counted: (done, failed).
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `clients` clients, each asking `url` to generate `tokens` tokens of `model`, one request
    /// after another; a request is done when it ends with 200, `done: true` and every token.
    pub fn start(url: &str, model: &str, clients: usize, tokens: u64) -> Load {
        let (stop, done, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let tasks = (0..clients)
            .map(|_| {
                let (url, stop, done, failed) =
                    (url.to_string(), stop.clone(), done.clone(), failed.clone());
                let body =
                    json!({"model": model, "prompt": "count", "options": {"num_predict": tokens}});
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let r = request(
                            "POST",
                            &format!("{url}/api/generate"),
                            Some(&body),
                            Duration::from_secs(60),
                        )
                        .await;
                        let complete = r.as_ref().is_ok_and(|(code, text)| {
                            let last: Value = text
                                .lines()
                                .last()
                                .and_then(|l| serde_json::from_str(l).ok())
                                .unwrap_or_default();
                            *code == 200 && last["done"] == true && last["eval_count"] == tokens
                        });
                        if complete {
                            done.fetch_add(1, Ordering::SeqCst);
                        } else {
                            eprintln!("failed request: {r:?}");
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            done,
            failed,
            tasks,
        }
    }

    /// (done, failed) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }

    /// Stops the clients once their requests end: (done, failed).
    pub async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.expect("client");
        }
        (
            self.done.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

/// `n` generations of `model` through `url`, one after another: how many came back complete.
pub async fn generations(url: &str, model: &str, n: usize) -> usize {
    let body =
        json!({"model": model, "prompt": "hi", "stream": false, "options": {"num_predict": 3}});
    let mut ok = 0;
    for _ in 0..n {
        if let Ok((200, text)) = request(
            "POST",
            &format!("{url}/api/generate"),
            Some(&body),
            Duration::from_secs(30),
        )
        .await
            && serde_json::from_str::<Value>(&text).is_ok_and(|v| v["done"] == true)
        {
            ok += 1;
        }
    }
    ok
}
