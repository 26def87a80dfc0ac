//! `ollama-sim`: an Ollama-compatible test workload, the way Kubernetes' e2e tests use
//! `agnhost`.
//!
//! It serves Ollama's routes with Ollama's JSON shapes (`/`, `/api/version`, `/api/tags`,
//! `/api/ps`, `/api/pull`, `/api/generate`, `/api/chat`, `/api/embed`, `/api/embeddings`,
//! `/api/create`, `/api/show`, `/api/delete`; embedding-only models, named like Ollama's library
//! ones such as `all-minilm` or `nomic-embed-text`, refuse generate and chat), honours `OLLAMA_HOST`, `OLLAMA_MODELS`, `OLLAMA_NUM_PARALLEL`,
//! `OLLAMA_MAX_QUEUE`, `OLLAMA_MAX_LOADED_MODELS`, `OLLAMA_KEEP_ALIVE` and `OLLAMA_NOPRUNE`,
//! and has realistic costs: a loaded model really holds its memory, loading and generating take
//! time, and requests queue. Faults are injected by `SIM_*` variables or `/sim/*` endpoints:
//! see [`config::Config`] and the README of this crate's binary (`ollama-sim --help`). With
//! `SIM_ENGINE` a loaded model is a real `llama-server` child, as in Ollama ([`engine`]).

pub mod api;
pub mod cache;
pub mod config;
pub mod engine;
pub mod faults;
pub mod models;
pub mod openai;
pub mod runner;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use api::{App, router};
pub use config::Config;

/// Starts the background work of an app: keep-alive reaping, the memory leak, and timed
/// faults (`SIM_EXIT_AFTER`, `SIM_HANG_AFTER`).
pub fn start_background(app: &Arc<App>) {
    let a = app.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            a.runner.reap();
        }
    });
    let a = app.clone();
    a.faults.set_leak_rate(a.cfg.leak_rate);
    tokio::spawn(async move {
        let step = Duration::from_millis(100);
        let mut tick = tokio::time::interval(step);
        loop {
            tick.tick().await;
            if a.faults.leak_rate() == 0 {
                continue;
            }
            let faults = a.faults.clone();
            let _ = tokio::task::spawn_blocking(move || faults.leak_tick(step)).await;
        }
    });
    if let Some(after) = app.cfg.exit_after {
        let code = app.cfg.exit_code;
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            faults::exit_now(code, "SIM_EXIT_AFTER");
        });
    }
    if let Some(after) = app.cfg.hang_after {
        let a = app.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            a.faults.hang();
        });
    }
}

/// Serves `app` on `listener` until `shutdown` completes.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if app.cfg.idle_timeout.is_some() || app.cfg.keepalive_max.is_some() {
        return serve_closing(app, listener, shutdown).await;
    }
    // Go sets TCP_NODELAY on every connection, so Ollama's streamed tokens are not held back
    // by Nagle's algorithm; neither are the sim's.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown)
        .await
}

/// [`serve`], closing keep-alive connections as `SIM_IDLE_TIMEOUT` and `SIM_KEEPALIVE_MAX` say
/// (the wait for a request's head is bounded by the idle timeout, as llama.cpp's server bounds
/// it; past the keep-alive maximum a request is dropped with its connection).
async fn serve_closing(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper::service::Service as _;
    let (idle, max) = (app.cfg.idle_timeout, app.cfg.keepalive_max);
    let router = router(app);
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        let _ = stream.set_nodelay(true);
        let inner = hyper_util::service::TowerToHyperService::new(router.clone());
        let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let service = hyper::service::service_fn(move |req| {
            let n = served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let answer = inner.call(req);
            async move {
                if max.is_some_and(|max| n >= max) {
                    return Err(std::io::Error::other("keep-alive maximum: dropped"));
                }
                answer.await.map_err(std::io::Error::other)
            }
        });
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new());
            if let Some(idle) = idle {
                http.header_read_timeout(idle);
            }
            let _ = http
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
