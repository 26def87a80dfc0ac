//! The node gateway (`agent --serve ADDR`): an Ollama-compatible API for every fleet on the
//! node, routing each request to a Ready instance with a free slot.
//!
//! - this module: the [`Gateway`] the controller teaches each pass (fleets become [`Route`]s,
//!   instances become pool [`Backend`]s), the drain the executor calls before a stop, and the
//!   gateway's share of `/metrics`;
//! - [`routes`]: the API's routes: what the gateway answers itself (health, tags, ps, version),
//!   what it refuses (management calls), what it forwards ([`proxy`], `/api/show`);
//! - [`proxy`]: a request's way to an instance: option pinning, a slot from the pool, one
//!   failover, the first-token and stall watchdog, relaying the answer and measuring it;
//! - [`body`]: request bodies: read once within a node-wide budget, pinned as Ollama reads keys;
//! - [`affinity`]: a conversation's next turn to the instance that holds its prefix;
//! - [`browser`]: Ollama's protections against web pages (origins, CORS, local hosts);
//! - [`auth`]: who calls: named keys of tenants from a file, re-read when it changes;
//! - [`limits`]: each key's and tenant's requests at once, requests and tokens per minute;
//! - [`pool`]: dispatch (idle-only, a bounded queue per pool, drain, stall counts);
//! - [`fair`]: a full pool's queue: interactive before batch, tenants in turn;
//! - [`metrics`]: the traffic figures Ollama lacks.

pub mod affinity;
pub mod auth;
pub mod body;
pub mod browser;
pub mod fair;
pub mod limits;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod routes;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleet_api::FleetSpec;
use serde_json::json;

use crate::prom::{Expose, Exposition};
use crate::upstream;
pub use metrics::Metrics;
pub use pool::{Backend, Lease, Pools, Refused};

/// The gateway's settings (the agent's `--serve-*` flags).
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Requests waiting per pool at most.
    pub max_queue: usize,
    /// How long a request waits for an instance at most.
    pub queue_timeout: Duration,
    /// How long a request that arrives before the controller has said what runs (the agent is
    /// starting) waits for it at most; then 503.
    pub start_wait: Duration,
    /// A streaming answer with no first byte within this: the request is aborted (504) and
    /// the instance counts a stall.
    pub first_token_timeout: Duration,
    /// An answer that comes whole (`stream: false`, embeddings) not there within this: the
    /// request is aborted (504); nobody is blamed (the instance says nothing until it is done).
    pub request_timeout: Duration,
    /// No byte for this long: the request is aborted.
    pub stall_timeout: Duration,
    /// The keys file (named keys of tenants, or bearer tokens one per line; re-read when it
    /// changes); `None`: no auth, every request is tenant `default`.
    pub token_file: Option<PathBuf>,
    /// Largest request body accepted.
    pub max_body: usize,
    /// Request body bytes held at once, node-wide; beyond: 503.
    pub body_budget: usize,
    /// How long a request body may take to arrive.
    pub body_timeout: Duration,
    /// Origins of browser pages allowed beyond Ollama's defaults (`OLLAMA_ORIGINS`' form).
    pub allowed_origins: Vec<String>,
    /// The gateway listens on a loopback address: requests must name a local `Host`.
    pub loopback: bool,
    /// A conversation's next turn goes to the instance that holds its prefix ([`affinity`]).
    pub affinity: bool,
    /// Free slots per pool kept from batch requests while interactive ones come
    /// ([`Pools::set_batch_headroom`]).
    pub batch_headroom: u32,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_queue: 512,
            queue_timeout: Duration::from_secs(60),
            start_wait: Duration::from_secs(60),
            first_token_timeout: Duration::from_secs(300),
            request_timeout: Duration::from_secs(1800),
            stall_timeout: Duration::from_secs(60),
            token_file: None,
            max_body: 64 << 20,
            body_budget: 256 << 20,
            body_timeout: Duration::from_secs(30),
            allowed_origins: Vec::new(),
            loopback: false,
            affinity: true,
            batch_headroom: 1,
        }
    }
}

/// A fleet's model as the gateway routes to it: its `spec.model`, or a model that instances of
/// a previous spec still serve while a new model rolls out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The fleet.
    pub fleet: String,
    /// The model.
    pub model: String,
    /// The pool of the model's instances (of every fleet serving it).
    pub pool: String,
    /// The pool's name in metrics: the first fleet (by name) whose spec serves the model.
    pub label: String,
    /// Watchdog failures in a row that replace an instance (`probes.liveness.failureThreshold`).
    pub failure_threshold: u32,
    /// The model is the fleet's `spec.model` (else only instances of a previous spec serve it).
    pub current: bool,
}

/// An instance as a pass of the controller saw it.
#[derive(Clone, Debug)]
pub struct Seen<'a> {
    /// Container ID.
    pub id: &'a str,
    /// Its fleet.
    pub fleet: &'a str,
    /// The model it serves (its own: one of a previous spec keeps its model while a new one
    /// rolls out).
    pub model: &'a str,
    /// Requests it takes at once (its `OLLAMA_NUM_PARALLEL`).
    pub capacity: u32,
    /// `http://ip:port`, where it listens.
    pub url: String,
    /// Ready (probed, warm).
    pub ready: bool,
    /// About to be stopped.
    pub leaving: bool,
}

/// The pool a model (or a fleet's name) is served by, and the fleets in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolOf {
    /// The pool.
    pub pool: String,
    /// Its name in metrics (a fleet's).
    pub label: String,
    /// Its fleets.
    pub fleets: Vec<String>,
    /// The model to tell its instances: the one asked for, or the fleet's `spec.model` when
    /// the request named the fleet.
    pub model: String,
}

impl PoolOf {
    /// The answer when the caller's key may not use the pool's model.
    pub fn not_allowed(&self, caller: &auth::Caller, model: &str) -> Response {
        error(
            StatusCode::FORBIDDEN,
            format!(
                "key {} (tenant {}) may not use model '{model}'",
                caller.key, caller.tenant
            ),
        )
    }

    /// The answer when none of the pool's instances is ready on this node.
    pub fn none_ready(&self) -> Response {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no ready instance of fleet {} on this node",
                self.fleets.join(", ")
            ),
        )
    }
}

/// The gateway.
pub struct Gateway {
    cfg: GatewayConfig,
    pools: Pools,
    routes: RwLock<Vec<Route>>,
    metrics: Metrics,
    client: upstream::Client<Body>,
    /// A client that keeps no connection: a request whose pooled connection the instance had
    /// closed goes again on a fresh one.
    fresh: upstream::Client<Body>,
    keys: auth::Keys,
    ledger: limits::Ledger,
    budget: body::Budget,
    browsers: browser::Browsers,
    affinity: affinity::Affinity,
    /// The controller has told what runs (until then, requests wait, at most `start_wait`).
    known: tokio::sync::watch::Sender<bool>,
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

impl Expose for Gateway {
    fn expose(&self, out: &mut Exposition) {
        // Every pool's queue, empty ones too, under its name.
        let routes = self.routes();
        let label_of: HashMap<&str, &str> = routes
            .iter()
            .map(|r| (r.pool.as_str(), r.label.as_str()))
            .collect();
        let mut queues: BTreeMap<String, usize> =
            routes.iter().map(|r| (r.label.clone(), 0)).collect();
        for (pool, n) in self.pools.queue_depths() {
            if let Some(label) = label_of.get(pool.as_str()) {
                *queues.entry((*label).to_string()).or_default() += n;
            }
        }
        drop(routes);
        let queues: Vec<(String, usize)> = queues.into_iter().collect();
        self.metrics.expose(out, &queues, &self.pools.counts());
        let tenants = metrics::TenantsNow {
            known: self.keys.tenants(),
            in_flight: self.ledger.in_flight(),
            waiting: self.pools.tenant_depths(),
            nodes: self.ledger.nodes(),
        };
        self.metrics.expose_tenants(out, &tenants);
    }
}

/// An `{"error": ...}` answer, in Ollama's shape (on `/v1/` routes [`routes::handle`] gives it
/// OpenAI's, see [`openai_error`]).
pub fn error(code: StatusCode, message: impl Into<String>) -> Response {
    let message = message.into();
    let body = json!({ "error": message }).to_string();
    let mut r = (
        code,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response();
    r.extensions_mut().insert(Said(message));
    r
}

/// The message of an error the gateway answered itself (not an instance's).
#[derive(Clone, Debug)]
struct Said(String);

/// The gateway's own error answer in OpenAI's shape (`{"error": {"message", "type", "param",
/// "code"}}`, as OpenAI's clients read it), for `/v1/` routes; other answers are left as they are.
pub fn openai_error(mut r: Response) -> Response {
    let Some(Said(message)) = r.extensions_mut().remove::<Said>() else {
        return r;
    };
    let (kind, code) = match r.status().as_u16() {
        401 => ("invalid_request_error", Some("invalid_api_key")),
        403 => ("permission_error", Some("model_not_allowed")),
        404 => ("not_found_error", Some("model_not_found")),
        429 => ("rate_limit_error", Some("rate_limit_exceeded")),
        400..=499 => ("invalid_request_error", None),
        _ => ("api_error", None),
    };
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    let (mut parts, _) = r.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body.to_string()))
}

impl Gateway {
    /// A gateway with `cfg`.
    pub fn new(cfg: GatewayConfig) -> Arc<Gateway> {
        let pools = Pools::default();
        pools.set_batch_headroom(cfg.batch_headroom);
        Arc::new(Gateway {
            keys: auth::Keys::new(cfg.token_file.clone()),
            ledger: limits::Ledger::default(),
            budget: body::Budget::new(cfg.body_budget),
            browsers: browser::Browsers::new(&cfg.allowed_origins, cfg.loopback),
            affinity: affinity::Affinity::default(),
            cfg,
            pools,
            routes: RwLock::new(Vec::new()),
            metrics: Metrics::default(),
            client: upstream::client(usize::MAX),
            fresh: upstream::client(0),
            known: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Sets how many nodes serve the gateway: each takes that share of every tenant's limits.
    pub fn set_nodes(&self, nodes: u32) {
        if nodes != self.ledger.nodes() {
            tracing::info!(
                nodes,
                "tenant limits are shared by the nodes serving the gateway"
            );
        }
        self.ledger.set_nodes(nodes);
    }

    /// The pools (the executor drains through them).
    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    /// The gateway's figures (its share of `/metrics` is [`Expose::expose`]).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn routes(&self) -> std::sync::RwLockReadGuard<'_, Vec<Route>> {
        self.routes.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the controller has said what runs, waiting for it at most `start_wait`.
    async fn knows(&self) -> bool {
        if *self.known.borrow() {
            return true;
        }
        let mut known = self.known.subscribe();
        let waited = tokio::time::timeout(self.cfg.start_wait, known.wait_for(|k| *k)).await;
        matches!(waited, Ok(Ok(_)))
    }

    /// What the controller last saw: the fleets and their instances.
    pub fn update(&self, routes: Vec<Route>, backends: Vec<Backend>) {
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = routes;
        self.pools.update(backends);
        self.known.send_replace(true);
    }

    /// Learns what a pass saw: the fleets `(name, spec)` and the instances shown. An instance
    /// serves in the pool of its own model; ready instances take requests, leaving ones (about
    /// to be stopped) none, each at most its capacity at once.
    pub fn learn<'a>(
        &self,
        fleets: impl Iterator<Item = (&'a str, &'a FleetSpec)>,
        seen: impl Iterator<Item = Seen<'a>>,
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
        let seen: Vec<Seen<'a>> = seen.collect();
        let serving: Vec<(&str, &str)> = seen.iter().map(|s| (s.fleet, s.model)).collect();
        let routes = routes(&fleets, &serving);
        let pool_of: HashMap<String, &str> = routes
            .iter()
            .map(|r| (fleet_api::ModelRef::key(&r.model), r.pool.as_str()))
            .collect();
        let backends = seen
            .into_iter()
            .filter_map(|s| {
                Some(Backend {
                    id: s.id.to_string(),
                    fleet: s.fleet.to_string(),
                    pool: pool_of.get(&fleet_api::ModelRef::key(s.model))?.to_string(),
                    url: s.url,
                    capacity: s.capacity.max(1),
                    ready: s.ready,
                    leaving: s.leaving,
                })
            })
            .collect();
        self.update(routes, backends);
    }

    /// Whether an instance's watchdog failures reached its fleet's threshold.
    pub fn stalled(&self, fleet: &str, id: &str) -> bool {
        let threshold = self
            .routes()
            .iter()
            .find(|r| r.fleet == fleet)
            .map_or(u32::MAX, |r| r.failure_threshold.max(1));
        self.pools.stalls(id) >= threshold
    }

    /// The pool serving `model` (by Ollama's name comparison, or a fleet's name: its
    /// `spec.model`).
    fn pool_for(&self, model: &str) -> Option<PoolOf> {
        let routes = self.routes();
        let by_name = routes.iter().find(|r| r.fleet == model && r.current);
        let key = fleet_api::ModelRef::key(model);
        let matched = by_name.or_else(|| {
            routes
                .iter()
                .find(|r| fleet_api::ModelRef::key(&r.model) == key)
        })?;
        let mut fleets: Vec<String> = routes
            .iter()
            .filter(|r| r.pool == matched.pool)
            .map(|r| r.fleet.clone())
            .collect();
        fleets.dedup();
        Some(PoolOf {
            pool: matched.pool.clone(),
            label: matched.label.clone(),
            fleets,
            model: by_name.map_or_else(|| model.to_string(), |r| r.model.clone()),
        })
    }
}

/// The routes: each fleet's `spec.model`, `fleets` being `(fleet, model, failure threshold)`;
/// then each model that instances still serve (`serving`, `(fleet, model)`) though no fleet's
/// spec names it any more (a new model rolls out). One pool per model (as Ollama compares
/// names), shared by every fleet serving it, named after the first of them (by name).
pub fn routes(fleets: &[(String, String, u32)], serving: &[(&str, &str)]) -> Vec<Route> {
    let mut sorted: Vec<&(String, String, u32)> = fleets.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let threshold: HashMap<&str, u32> = fleets.iter().map(|(f, _, t)| (f.as_str(), *t)).collect();
    let mut pools: HashMap<String, String> = HashMap::new();
    let mut out: Vec<Route> = sorted
        .into_iter()
        .map(|(fleet, model, threshold)| {
            let pool = pools
                .entry(fleet_api::ModelRef::key(model))
                .or_insert_with(|| fleet.clone())
                .clone();
            Route {
                fleet: fleet.clone(),
                model: model.clone(),
                label: pool.clone(),
                pool,
                failure_threshold: *threshold,
                current: true,
            }
        })
        .collect();
    let mut stale: Vec<(&str, &str)> = serving
        .iter()
        .copied()
        .filter(|(fleet, _)| threshold.contains_key(fleet))
        .collect();
    stale.sort_unstable();
    stale.dedup();
    for (fleet, model) in stale {
        let key = fleet_api::ModelRef::key(model);
        let known = out
            .iter()
            .any(|r| r.fleet == fleet && fleet_api::ModelRef::key(&r.model) == key);
        if known {
            continue;
        }
        let label = out
            .iter()
            .find(|r| fleet_api::ModelRef::key(&r.model) == key)
            .map_or_else(|| fleet.to_string(), |r| r.label.clone());
        // (`@` is in no fleet name: the pool cannot be taken for a fleet's.)
        let pool = pools
            .entry(key.clone())
            .or_insert_with(|| format!("{fleet}@{key}"))
            .clone();
        out.push(Route {
            fleet: fleet.to_string(),
            model: model.to_string(),
            label,
            pool,
            failure_threshold: threshold.get(fleet).copied().unwrap_or(3),
            current: false,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleets_serving_one_model_share_a_pool() {
        let r = routes(
            &[
                ("b".into(), "llama3".into(), 3),
                ("a".into(), "Llama3:latest".into(), 3),
                ("c".into(), "qwen".into(), 3),
            ],
            &[],
        );
        let pool = |f: &str| r.iter().find(|x| x.fleet == f).map(|x| x.pool.clone());
        assert_eq!(pool("a"), Some("a".into()));
        assert_eq!(
            pool("b"),
            Some("a".into()),
            "same model: the first fleet's pool"
        );
        assert_eq!(pool("c"), Some("c".into()));
    }

    /// While fleet `c` rolls out from qwen to mistral, its old instances still serve qwen: qwen
    /// keeps a pool (its own, as no fleet's spec names it), mistral gets c's, and a model that
    /// another fleet's spec names stays that fleet's pool.
    #[test]
    fn a_model_only_old_instances_serve_keeps_its_pool() {
        let fleets = [
            ("a".into(), "llama3".into(), 3),
            ("c".into(), "mistral".into(), 2),
        ];
        let r = routes(
            &fleets,
            &[("c", "qwen"), ("c", "mistral"), ("c", "llama3:latest")],
        );
        let of = |model: &str| {
            r.iter()
                .find(|x| fleet_api::ModelRef::key(&x.model) == fleet_api::ModelRef::key(model))
                .map(|x| {
                    (
                        x.pool.clone(),
                        x.label.clone(),
                        x.current,
                        x.failure_threshold,
                    )
                })
        };
        assert_eq!(of("mistral"), Some(("c".into(), "c".into(), true, 2)));
        let qwen = fleet_api::ModelRef::key("qwen");
        assert_eq!(
            of("qwen"),
            Some((format!("c@{qwen}"), "c".into(), false, 2))
        );
        assert_eq!(of("llama3").map(|x| x.0), Some("a".into()), "a's pool");
        assert_eq!(r.len(), 4);
    }
}
