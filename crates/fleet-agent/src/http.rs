//! The agent's HTTP endpoints: `/healthz`, `/readyz`, `/metrics` (Prometheus text format) and
//! `/instances` (every instance, for load balancers and people).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use fleet_api::{FleetStatus, Phase};
use serde_json::json;

use crate::planner::Why;
use crate::prom::{Expose, Exposition, Kind};
use crate::view::View;

/// What the endpoints read: the controller's view, and what else joins `/metrics`.
#[derive(Clone)]
struct Served {
    view: Arc<RwLock<View>>,
    more: Vec<Arc<dyn Expose>>,
}

type Shared = State<Served>;

/// Bounds of the agent's HTTP servers (`--listen` and the gateway): they listen on a node's
/// address, so anything that can reach the port must not be able to hold it.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections one client address may hold at once (a proxy in front is one client).
    pub per_client: usize,
    /// Connections kept for health checks once `max_connections` are taken: each is served
    /// one request by the health router, and cut after [`HEALTH_HEADER_TIMEOUT`].
    pub health_reserve: usize,
    /// Time for a request's head to arrive, and how long an idle connection is kept (slow
    /// clients are cut off).
    pub header_read_timeout: Duration,
    /// The most of a request head buffered.
    pub max_head_bytes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 256,
            per_client: 64,
            health_reserve: 16,
            header_read_timeout: Duration::from_secs(10),
            max_head_bytes: 64 << 10,
        }
    }
}

/// How long a connection of the health reserve may take to send its request.
pub const HEALTH_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections of the health reserve one client address may hold at once (so that one client
/// cannot fill the reserve either).
pub const RESERVE_PER_CLIENT: usize = 2;

/// What a server serves: every request of a regular connection goes to `main`; a connection
/// beyond the limits (the health reserve) gets one request, answered by `health`.
#[derive(Clone, Debug)]
pub struct Routers {
    /// The routes.
    pub main: Router,
    /// The health checks (and a 503 for anything else).
    pub health: Router,
}

/// Connections held, in all and by client address.
#[derive(Debug, Default)]
struct Held {
    all: usize,
    reserve: usize,
    by_client: HashMap<IpAddr, usize>,
    reserve_by_client: HashMap<IpAddr, usize>,
}

/// One less for `client` in `counts`.
fn release(counts: &mut HashMap<IpAddr, usize>, client: IpAddr) {
    if let Some(n) = counts.get_mut(&client) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&client);
        }
    }
}

/// A connection's place among those held; given back when it ends.
struct Place {
    held: Arc<Mutex<Held>>,
    client: IpAddr,
    reserve: bool,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut h = crate::lock(&self.held);
        if self.reserve {
            h.reserve -= 1;
            release(&mut h.reserve_by_client, self.client);
        } else {
            h.all -= 1;
            release(&mut h.by_client, self.client);
        }
    }
}

/// Where a new connection from `client` goes: a regular place, the health reserve, or none.
fn admit(held: &Arc<Mutex<Held>>, client: IpAddr, limits: &ServerLimits) -> Option<Place> {
    let mut h = crate::lock(held);
    let mine = h.by_client.get(&client).copied().unwrap_or(0);
    let reserve = if mine >= limits.per_client || h.all >= limits.max_connections {
        let in_reserve = h.reserve_by_client.get(&client).copied().unwrap_or(0);
        if h.reserve >= limits.health_reserve || in_reserve >= RESERVE_PER_CLIENT {
            return None;
        }
        h.reserve += 1;
        *h.reserve_by_client.entry(client).or_default() += 1;
        true
    } else {
        h.all += 1;
        *h.by_client.entry(client).or_default() += 1;
        false
    };
    Some(Place {
        held: held.clone(),
        client,
        reserve,
    })
}

/// Serves `routers` on `listener` (HTTP/1.1) within `limits`, for good.
pub async fn serve(
    listener: tokio::net::TcpListener,
    routers: Routers,
    limits: ServerLimits,
) -> std::io::Result<()> {
    serve_until(listener, routers, limits, std::future::pending()).await
}

/// Serves `routers` on `listener` (HTTP/1.1) within `limits` until `stop` completes; then
/// drains: the listening socket is closed (new connections are refused, so a proxy in front
/// retries them elsewhere), each connection finishes the request it is serving (a streamed
/// answer to its end) and is closed after it, and this returns once no connection is left.
/// The caller bounds the drain.
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    routers: Routers,
    limits: ServerLimits,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let held = Arc::new(Mutex::new(Held::default()));
    let (draining, drain) = tokio::sync::watch::channel(false);
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            () = &mut stop => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
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
        let Some(place) = admit(&held, peer.ip(), &limits) else {
            tracing::debug!(%peer, "too many connections; closing this one");
            drop(stream);
            continue;
        };
        let router = if place.reserve {
            routers.health.clone()
        } else {
            routers.main.clone()
        };
        // Whether the connection has begun a request (one accepted just before a drain has not).
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let begun = started.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                begun.store(true, std::sync::atomic::Ordering::Relaxed);
                let mut router = router.clone();
                async move { tower_service::Service::call(&mut router, req).await }
            });
        let mut drain = drain.clone();
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .max_buf_size(limits.max_head_bytes.max(8192));
            if place.reserve {
                http.keep_alive(false)
                    .header_read_timeout(HEALTH_HEADER_TIMEOUT);
            } else {
                http.header_read_timeout(limits.header_read_timeout);
            }
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                () = async { let _ = drain.wait_for(|d| *d).await; } => {
                    // A connection accepted just before the drain may have its request on the
                    // way (or in the socket, unread): it gets a moment to begin it, as closing
                    // it now would lose that request.
                    let deadline = tokio::time::Instant::now() + FIRST_REQUEST_GRACE;
                    let mut early = None;
                    while !started.load(std::sync::atomic::Ordering::Relaxed)
                        && tokio::time::Instant::now() < deadline
                    {
                        let step = Duration::from_millis(10);
                        if let Ok(ended) = tokio::time::timeout(step, conn.as_mut()).await {
                            early = Some(ended);
                            break;
                        }
                    }
                    match early {
                        Some(ended) => ended,
                        None => {
                            // The request in progress goes on to its end; an idle connection
                            // closes.
                            conn.as_mut().graceful_shutdown();
                            conn.as_mut().await
                        }
                    }
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
            drop(place);
        });
    }
    drop(listener);
    let _ = draining.send(true);
    loop {
        let left = {
            let h = crate::lock(&held);
            h.all + h.reserve
        };
        if left == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long a connection accepted just before a drain may take to begin its first request.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// The answer of the health reserve to anything but a health check.
pub async fn too_many_connections() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CONNECTION, "close")],
        "too many connections; try again\n",
    )
        .into_response()
}

/// The routers: the endpoints over `view` (`more`, the gateway, adds to `/metrics`), and the
/// health checks alone for the connections beyond the limits.
pub fn router(view: Arc<RwLock<View>>, more: Vec<Arc<dyn Expose>>) -> Routers {
    let state = Served { view, more };
    Routers {
        main: Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .route("/instances", get(instances))
            .with_state(state.clone()),
        health: Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .fallback(too_many_connections)
            .with_state(state),
    }
}

fn read(view: &RwLock<View>) -> View {
    view.read().map(|v| v.clone()).unwrap_or_default()
}

/// Alive while the loop makes passes (one at least every resync, 10 s by default).
async fn healthz(State(s): Shared) -> Response {
    let v = read(&s.view);
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
async fn readyz(State(s): Shared) -> Response {
    let v = read(&s.view);
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

async fn instances(State(s): Shared) -> Response {
    let v = read(&s.view);
    axum::Json(json!({"node": v.node, "instances": v.endpoints})).into_response()
}

async fn metrics(State(s): Shared) -> Response {
    let mut out = Exposition::new();
    expose_view(&read(&s.view), &mut out);
    for more in &s.more {
        more.expose(&mut out);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out.finish(),
    )
        .into_response()
}

/// A per-fleet gauge's name, help, and its value.
type FleetGauge = (&'static str, &'static str, fn(&FleetStatus) -> u32);

const FLEET_GAUGES: [FleetGauge; 3] = [
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

/// The agent's own figures: instances by phase, replicas, restarts, rotations, the loop, the
/// stores, pulls.
fn expose_view(v: &View, out: &mut Exposition) {
    let name = "ollama_fleet_instances";
    out.family(
        name,
        Kind::Gauge,
        "Instances on this node by fleet and phase.",
    );
    for s in &v.statuses {
        for p in Phase::ALL {
            let n = s.instances.iter().filter(|i| i.phase == p).count();
            out.sample(
                name,
                &[("fleet", &s.fleet), ("phase", p.as_str())],
                n as f64,
            );
        }
    }
    for (name, help, f) in FLEET_GAUGES {
        out.family(name, Kind::Gauge, help);
        for s in &v.statuses {
            out.sample(name, &[("fleet", &s.fleet)], f64::from(f(s)));
        }
    }
    let name = "ollama_fleet_restarts";
    out.family(
        name,
        Kind::Gauge,
        "Restarts of the instances now on this node.",
    );
    for (fleet, n) in &v.restarts {
        out.sample(name, &[("fleet", fleet)], *n as f64);
    }
    let name = "ollama_fleet_rotations_total";
    let help = "Instances replaced by rotation (maxAge, maxMemory).";
    out.family(name, Kind::Counter, help);
    // Every fleet's series start at 0 (a query over them works before the first rotation).
    let mut rotations = v.rotations.clone();
    for s in &v.statuses {
        for why in Why::ROTATIONS {
            rotations.entry((s.fleet.clone(), why)).or_default();
        }
    }
    for ((fleet, why), n) in &rotations {
        out.sample(
            name,
            &[("fleet", fleet), ("reason", why.as_str())],
            *n as f64,
        );
    }
    let up = |b: bool| f64::from(u8::from(b));
    let scalars = [
        (
            "ollama_fleet_reconcile_passes_total",
            Kind::Counter,
            "Reconcile passes.",
            v.passes as f64,
        ),
        (
            "ollama_fleet_reconcile_last_seconds",
            Kind::Gauge,
            "Duration of the last reconcile pass.",
            v.last_pass_seconds,
        ),
        (
            "ollama_fleet_actions_completed_total",
            Kind::Counter,
            "Actions completed.",
            v.actions.0 as f64,
        ),
        (
            "ollama_fleet_actions_failed_total",
            Kind::Counter,
            "Actions that failed (and were planned again).",
            v.actions.1 as f64,
        ),
        (
            "ollama_fleet_status_writes_total",
            Kind::Counter,
            "Status keys written to the store.",
            v.status_writes as f64,
        ),
        (
            "ollama_fleet_containerd_up",
            Kind::Gauge,
            "containerd answered the last pass.",
            up(v.containerd_up),
        ),
        (
            "ollama_fleet_store_up",
            Kind::Gauge,
            "The store accepted the last writes.",
            up(v.store_up),
        ),
        (
            "ollama_fleet_image_pulls_total",
            Kind::Counter,
            "Image pulls that finished.",
            v.pulls.succeeded as f64,
        ),
        (
            "ollama_fleet_image_pull_failures_total",
            Kind::Counter,
            "Image pulls that failed.",
            v.pulls.failed as f64,
        ),
        (
            "ollama_fleet_image_pull_bytes_total",
            Kind::Counter,
            "Bytes fetched by finished image pulls.",
            v.pulls.bytes as f64,
        ),
        (
            "ollama_fleet_image_pull_seconds_total",
            Kind::Counter,
            "Seconds spent in finished image pulls.",
            v.pulls.seconds,
        ),
        (
            "ollama_fleet_model_pulls_total",
            Kind::Counter,
            "Model pulls into the node's cache that finished.",
            v.models.pulls as f64,
        ),
        (
            "ollama_fleet_model_failures_total",
            Kind::Counter,
            "Model pulls or preparations (num_thread) that failed.",
            v.models.failures as f64,
        ),
    ];
    for (name, kind, help, value) in scalars {
        out.single(name, kind, help, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connection accepted just before a drain whose request comes a moment later is served,
    /// not closed with it unread (a restart behind a kept socket would lose that request).
    #[tokio::test]
    async fn a_connection_accepted_just_before_a_drain_is_served() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = Router::new().route("/", get(|| async { "hi" }));
        let routers = Routers {
            main: router.clone(),
            health: router,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_until(
            listener,
            routers,
            ServerLimits::default(),
            async move {
                let _ = stopped.await;
            },
        ));
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // Accepted (the server takes it within this), then the drain, then the request.
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.send(()).expect("stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
        conn.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = String::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut answer)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        let drained = tokio::time::timeout(Duration::from_secs(5), server).await;
        assert!(matches!(drained, Ok(Ok(Ok(())))), "the drain ends");
    }
}
