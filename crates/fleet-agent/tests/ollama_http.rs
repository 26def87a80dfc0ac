//! The HTTP Ollama client against a server that has only part of Ollama's API (pull and
//! generate, no show, tags, create or ps), as a minimal Ollama-compatible workload might: the
//! model is still pulled once and loaded, and readiness is not held back forever.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use fleet_agent::models::{Gate, ModelCache, Need, WarmTarget, Warmer, Warmth};
use fleet_agent::ollama::{HttpOllama, Ollama};
use fleet_e2e::wait_for;
use futures::StreamExt;
use tokio::sync::Notify;

mod common;

async fn minimal_server(pulls: Arc<AtomicUsize>) -> String {
    let app = Router::new()
        .route(
            "/api/pull",
            post(move || {
                pulls.fetch_add(1, Ordering::SeqCst);
                async {
                    "{\"status\":\"pulling manifest\"}\n{\"status\":\"pulling abc\",\"digest\":\"sha256:abc\",\"total\":100,\"completed\":100}\n{\"status\":\"success\"}\n"
                }
            }),
        )
        .route(
            "/api/generate",
            post(|| async { "{\"model\":\"m\",\"done\":true,\"response\":\"\"}" }),
        );
    common::serve(app).await
}

#[tokio::test]
async fn a_partial_ollama_api_still_gets_its_model_and_warms() {
    tokio::time::timeout(Duration::from_secs(20), async {
        let pulls = Arc::new(AtomicUsize::new(0));
        let base = minimal_server(pulls.clone()).await;
        let ollama = Arc::new(HttpOllama::default());
        let cache = ModelCache::new(
            ollama.clone(),
            Arc::new(Notify::new()),
            Duration::from_millis(100),
        );
        let need = Need::new("/cache", "m", true, Some(2));
        let via = vec![base.clone()];
        wait_for("the gate open", Duration::from_secs(10), || {
            let g = cache.gate(&need, &via);
            async move { matches!(g, Gate::Open(_)).then_some(()) }
        })
        .await;
        assert_eq!(pulls.load(Ordering::SeqCst), 1, "pulled once");
        let stats = cache.stats();
        assert_eq!(stats.pulls, 1);
        assert!(
            stats.failures >= 1,
            "the thread count could not be set, and that is counted"
        );
        let warmer = Warmer::new(ollama, Arc::new(Notify::new()));
        warmer.sync(vec![WarmTarget {
            id: "i".into(),
            base,
            model: "m".into(),
        }]);
        wait_for("warm", Duration::from_secs(10), || {
            let w = warmer.state("i");
            async move { (w == Some(Warmth::Warm)).then_some(()) }
        })
        .await;
    })
    .await
    .expect("in time");
}

/// Ollama's pull goes silent while it verifies the blobs' digests (no progress lines for as long
/// as hashing tens of GB takes); the agent waits for it, but not for a download that stalls.
#[tokio::test]
async fn the_silent_digest_check_is_waited_for() {
    use axum::body::Body;
    tokio::time::timeout(Duration::from_secs(20), async {
        let stream = |silent_before_verify: bool| {
            let lines = async_stream_lines(silent_before_verify);
            Body::from_stream(lines)
        };
        let app = Router::new()
            .route("/ok/api/pull", post(move || async move { stream(false) }))
            .route(
                "/stalls/api/pull",
                post(move || async move { stream(true) }),
            );
        let base = common::serve(app).await;
        let ollama = HttpOllama::default()
            .with_pull_idle(Duration::from_millis(300), Duration::from_secs(5));
        let progress = Default::default();
        ollama
            .pull(&format!("{base}/ok"), "m", &progress)
            .await
            .expect("a second of silent verification is waited for");
        let err = ollama
            .pull(&format!("{base}/stalls"), "m", &progress)
            .await
            .expect_err("a silent download is not");
        assert!(
            matches!(err, fleet_agent::upstream::CallError::Stalled { idle, .. } if idle == Duration::from_millis(300)),
            "{err}"
        );
    })
    .await
    .expect("in time");
}

/// A pull's progress: a layer, then "verifying sha256 digest", a second of silence, success.
/// With `silent_before_verify` the second of silence comes while downloading instead.
fn async_stream_lines(
    silent_before_verify: bool,
) -> impl futures::Stream<Item = Result<String, std::io::Error>> {
    let steps: Vec<(u64, &'static str)> = if silent_before_verify {
        vec![
            (
                0,
                "{\"status\":\"pulling abc\",\"digest\":\"sha256:abc\",\"total\":10,\"completed\":5}\n",
            ),
            (1000, "{\"status\":\"verifying sha256 digest\"}\n"),
            (0, "{\"status\":\"success\"}\n"),
        ]
    } else {
        vec![
            (
                0,
                "{\"status\":\"pulling abc\",\"digest\":\"sha256:abc\",\"total\":10,\"completed\":10}\n",
            ),
            (0, "{\"status\":\"verifying sha256 digest\"}\n"),
            (1000, "{\"status\":\"writing manifest\"}\n"),
            (0, "{\"status\":\"success\"}\n"),
        ]
    };
    futures::stream::iter(steps).then(|(wait, line)| async move {
        tokio::time::sleep(Duration::from_millis(wait)).await;
        Ok(line.to_string())
    })
}
