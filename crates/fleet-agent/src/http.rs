//! The agent's HTTP endpoints: `/healthz`, `/readyz`, `/metrics` (Prometheus text format) and
//! `/instances` (every instance, for load balancers and people).

use std::fmt::Write as _;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use fleet_api::Phase;
use serde_json::json;

use crate::controller::View;

type Shared = State<Arc<RwLock<View>>>;

/// Bounds of the agent's HTTP server: it listens on a node's address, so anything that can
/// reach the port must not be able to hold it.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Connections served at once; more are closed as they arrive.
    pub max_connections: usize,
    /// Time for a request's headers to arrive (slow clients are cut off).
    pub header_read_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 256,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves `router` on `listener` (HTTP/1.1) within `limits`, until the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ServerLimits,
) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            // Out of file descriptors and the like: wait a little rather than spin.
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Answers are streamed in small writes (a token at a time): no Nagle delay between them.
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many connections; closing this one");
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
            drop(slot);
        });
    }
}

/// The router.
pub fn router(view: Arc<RwLock<View>>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/instances", get(instances))
        .with_state(view)
}

fn read(view: &RwLock<View>) -> View {
    view.read().map(|v| v.clone()).unwrap_or_default()
}

/// Alive while the loop makes passes (one at least every resync, 10 s by default).
async fn healthz(State(view): Shared) -> Response {
    let v = read(&view);
    match v.last_pass {
        Some(at) if at.elapsed() > Duration::from_secs(120) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the reconcile loop has not run for {}s\n",
                at.elapsed().as_secs()
            ),
        )
            .into_response(),
        _ => "ok\n".into_response(),
    }
}

/// Ready once the fleets are known and containerd and the store answer.
async fn readyz(State(view): Shared) -> Response {
    let v = read(&view);
    let mut problems = Vec::new();
    if !v.fleets_known {
        problems.push("the fleets are not known yet (waiting for etcd or the manifests)");
    }
    if !v.containerd_up {
        problems.push("containerd does not answer");
    }
    if !v.store_up {
        problems.push("the store (etcd) does not answer; status is not written");
    }
    if problems.is_empty() {
        "ok\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n").into_response()
    }
}

async fn instances(State(view): Shared) -> Response {
    let v = read(&view);
    axum::Json(json!({"node": v.node, "instances": v.endpoints})).into_response()
}

/// Escapes a label value for the Prometheus text format.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn metrics(State(view): Shared) -> Response {
    let v = read(&view);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP ollama_fleet_instances Instances on this node by fleet and phase.\n# TYPE ollama_fleet_instances gauge"
    );
    let phases = [
        Phase::Pending,
        Phase::Starting,
        Phase::Ready,
        Phase::Unready,
        Phase::BackOff,
        Phase::Terminating,
    ];
    for s in &v.statuses {
        for p in phases {
            let n = s.instances.iter().filter(|i| i.phase == p).count();
            let _ = writeln!(
                out,
                "ollama_fleet_instances{{fleet=\"{}\",phase=\"{p}\"}} {n}",
                esc(&s.fleet)
            );
        }
    }
    type Gauge = (
        &'static str,
        &'static str,
        fn(&fleet_api::FleetStatus) -> u32,
    );
    let gauges: [Gauge; 3] = [
        (
            "ollama_fleet_desired_replicas",
            "Instances this node should run.",
            |s| s.desired_replicas,
        ),
        (
            "ollama_fleet_ready_replicas",
            "Instances that are ready.",
            |s| s.ready_replicas,
        ),
        (
            "ollama_fleet_updated_replicas",
            "Instances on the current spec.",
            |s| s.updated_replicas,
        ),
    ];
    for (name, help, f) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for s in &v.statuses {
            let _ = writeln!(out, "{name}{{fleet=\"{}\"}} {}", esc(&s.fleet), f(s));
        }
    }
    let _ = writeln!(
        out,
        "# HELP ollama_fleet_restarts Restarts of the instances now on this node.\n# TYPE ollama_fleet_restarts gauge"
    );
    for (fleet, n) in &v.restarts {
        let _ = writeln!(out, "ollama_fleet_restarts{{fleet=\"{}\"}} {n}", esc(fleet));
    }
    let _ = writeln!(
        out,
        "# HELP ollama_fleet_rotations_total Instances replaced by rotation (maxAge, maxMemory).\n# TYPE ollama_fleet_rotations_total counter"
    );
    // Every fleet's series start at 0 (a query over them works before the first rotation).
    let mut rotations = v.rotations.clone();
    for s in &v.statuses {
        for reason in ["MaxAge", "MaxMemory"] {
            rotations
                .entry((s.fleet.clone(), reason.into()))
                .or_default();
        }
    }
    for ((fleet, reason), n) in &rotations {
        let _ = writeln!(
            out,
            "ollama_fleet_rotations_total{{fleet=\"{}\",reason=\"{reason}\"}} {n}",
            esc(fleet)
        );
    }
    let scalars = [
        (
            "ollama_fleet_reconcile_passes_total",
            "counter",
            "Reconcile passes.",
            v.passes as f64,
        ),
        (
            "ollama_fleet_reconcile_last_seconds",
            "gauge",
            "Duration of the last reconcile pass.",
            v.last_pass_seconds,
        ),
        (
            "ollama_fleet_actions_completed_total",
            "counter",
            "Actions completed.",
            v.actions.0 as f64,
        ),
        (
            "ollama_fleet_actions_failed_total",
            "counter",
            "Actions that failed (and were planned again).",
            v.actions.1 as f64,
        ),
        (
            "ollama_fleet_status_writes_total",
            "counter",
            "Status keys written to the store.",
            v.status_writes as f64,
        ),
        (
            "ollama_fleet_containerd_up",
            "gauge",
            "containerd answered the last pass.",
            f64::from(u8::from(v.containerd_up)),
        ),
        (
            "ollama_fleet_store_up",
            "gauge",
            "The store accepted the last writes.",
            f64::from(u8::from(v.store_up)),
        ),
        (
            "ollama_fleet_image_pulls_total",
            "counter",
            "Image pulls that finished.",
            v.pulls.succeeded as f64,
        ),
        (
            "ollama_fleet_image_pull_failures_total",
            "counter",
            "Image pulls that failed.",
            v.pulls.failed as f64,
        ),
        (
            "ollama_fleet_image_pull_bytes_total",
            "counter",
            "Bytes fetched by finished image pulls.",
            v.pulls.bytes as f64,
        ),
        (
            "ollama_fleet_image_pull_seconds_total",
            "counter",
            "Seconds spent in finished image pulls.",
            v.pulls.seconds,
        ),
        (
            "ollama_fleet_model_pulls_total",
            "counter",
            "Model pulls into the node's cache that finished.",
            v.models.pulls as f64,
        ),
        (
            "ollama_fleet_model_failures_total",
            "counter",
            "Model pulls or preparations (num_thread) that failed.",
            v.models.failures as f64,
        ),
    ];
    for (name, kind, help, value) in scalars {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    if let Some(gw) = &v.gateway {
        gw.render_metrics(&mut out);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
