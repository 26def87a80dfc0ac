//! The gateway's routes: which requests it answers itself (`/`, tags, models, ps, version), which
//! it refuses (management calls: the agent is the model cache's only writer), and which go to an
//! instance (the work routes through [`super::proxy`], and `/api/show`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use super::auth::Caller;
use super::browser::Verdict;
use super::limits::Reason;
use super::metrics::Sample;
use super::{Gateway, body, error, proxy};
use crate::upstream::CallError;
use fleet_runtime::clock::Instant;

/// The most of a `/api/show` answer that is read (it carries the model's template and license).
const SHOW_LIMIT: usize = 16 << 20;

/// The largest `/api/show` request body (it names a model).
const SHOW_BODY_LIMIT: usize = 64 << 10;

/// The routes a client may send generation work to, and how the gateway names them in metrics.
pub fn work_route(path: &str) -> Option<&'static str> {
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
pub fn managed(path: &str) -> Option<&'static str> {
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

/// The routers of the gateway's API: every route, and the health check alone for connections
/// beyond the limits (so a crowd of clients never locks the proxy's health check out).
pub fn router(gw: &Arc<Gateway>) -> crate::http::Routers {
    crate::http::Routers {
        main: Router::new().fallback(handle).with_state(gw.clone()),
        health: Router::new()
            .route("/", axum::routing::get(reserve_health).head(reserve_health))
            .fallback(crate::http::too_many_connections)
            .with_state(gw.clone()),
    }
}

async fn reserve_health(State(gw): State<Arc<Gateway>>) -> Response {
    health(&gw)
}

/// How a path is named in the request metrics: the routes the gateway knows, else `other`
/// (a client cannot make new series).
pub fn route_label(path: &str) -> &'static str {
    if let Some(work) = work_route(path) {
        return work;
    }
    match path {
        "/" => "/",
        "/api/tags" => "/api/tags",
        "/v1/models" => "/v1/models",
        "/api/ps" => "/api/ps",
        "/api/version" => "/api/version",
        "/api/show" => "/api/show",
        "/api/pull" => "/api/pull",
        "/api/push" => "/api/push",
        "/api/create" => "/api/create",
        "/api/copy" => "/api/copy",
        "/api/delete" => "/api/delete",
        p if p.starts_with("/api/blobs/") => "/api/blobs",
        _ => "other",
    }
}

/// Every request: Ollama's browser checks first; the health check is open; the rest needs a
/// key (when there is a keys file) and the controller's first word on what runs. Every answer
/// is counted; the gateway's own errors take OpenAI's shape on `/v1/` routes.
pub async fn handle(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let started = Instant::now();
    let path = req.uri().path().to_string();
    let route = route_label(&path);
    let (response, counted_as) = match gw.browsers.check(req.method(), req.headers()) {
        Verdict::Answer(r) => (r, Some(String::new())),
        Verdict::Pass(cors) => {
            let (mut r, fleet) = answer(&gw, req, &path, route).await;
            r.headers_mut().extend(cors);
            (r, fleet)
        }
    };
    let response = if path.starts_with("/v1/") {
        super::openai_error(response)
    } else {
        response
    };
    if let Some(fleet) = counted_as {
        let sample = Sample {
            route,
            code: response.status().as_u16(),
            duration: started.elapsed(),
            ..Default::default()
        };
        gw.metrics.record(&fleet, &sample);
    }
    response
}

/// The answer, and the fleet to count it for (`None`: counted already, by the proxy).
async fn answer(
    gw: &Arc<Gateway>,
    req: Request,
    path: &str,
    route: &'static str,
) -> (Response, Option<String>) {
    let method = req.method().clone();
    let none = || Some(String::new());
    if path == "/" && (method == Method::GET || method == Method::HEAD) {
        return (health(gw), none());
    }
    let caller = match gw.keys.identify(req.headers()).await {
        Ok(caller) => caller,
        Err(_) => {
            gw.metrics.refused("", Reason::Unauthorized);
            return (error(StatusCode::UNAUTHORIZED, "unauthorized"), none());
        }
    };
    if !gw.knows().await {
        let starting = "the agent is starting: it does not know its instances yet";
        return (error(StatusCode::SERVICE_UNAVAILABLE, starting), none());
    }
    if let Some(instead) = managed(path) {
        let message = format!("managed by ollama-fleet: {instead}");
        return (error(StatusCode::FORBIDDEN, message), none());
    }
    let not_found = || error(StatusCode::NOT_FOUND, "404 page not found");
    match (method, path) {
        (Method::GET, "/api/tags") => (tags(gw, &caller, false), none()),
        (Method::GET, "/v1/models") => (tags(gw, &caller, true), none()),
        (Method::GET, "/api/ps") => (ps(gw).await, none()),
        (Method::GET, "/api/version") => (version(gw).await, none()),
        (Method::POST, "/api/show") => {
            let (r, fleet) = show(gw, &caller, req).await;
            (r, Some(fleet))
        }
        (Method::POST, _) if route != "other" && work_route(path).is_some() => {
            (proxy::forward(gw, route, caller, req).await, None)
        }
        _ => (not_found(), none()),
    }
}

/// `GET /`: 200 while any pool has a ready instance (the proxy in front health-checks it).
fn health(gw: &Gateway) -> Response {
    if gw.routes().iter().any(|r| gw.pools.has_ready(&r.pool)) {
        (StatusCode::OK, "Ollama is running").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no ready instance on this node",
        )
            .into_response()
    }
}

/// The models served by at least one ready instance that the caller may use.
fn tags(gw: &Gateway, caller: &Caller, openai: bool) -> Response {
    let mut models: BTreeMap<String, String> = BTreeMap::new();
    let routes = gw.routes();
    let allowed = |r: &super::Route| {
        let fleets: Vec<String> = routes
            .iter()
            .filter(|x| x.pool == r.pool)
            .map(|x| x.fleet.clone())
            .collect();
        caller.may_use(&r.model, &r.model, &fleets)
    };
    for r in routes
        .iter()
        .filter(|r| gw.pools.has_ready(&r.pool) && allowed(r))
    {
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
async fn show(gw: &Gateway, caller: &Caller, req: Request) -> (Response, String) {
    let read = body::read(
        req.into_body(),
        None,
        SHOW_BODY_LIMIT,
        &gw.budget,
        gw.cfg.body_timeout,
    );
    let parsed = match read.await {
        Ok((bytes, _held)) => body::Request::parse(&bytes).map(|r| (r.model(), r.verbose())),
        Err(e) => Err(e),
    };
    let (model, verbose) = match parsed {
        Ok((model, verbose)) => (model.unwrap_or_default(), verbose),
        Err(e) => return (error(e.status(), e.to_string()), String::new()),
    };
    let Some(pool) = gw.pool_for(&model) else {
        let missing = error(StatusCode::NOT_FOUND, format!("model '{model}' not found"));
        return (missing, String::new());
    };
    if !caller.may_use(&model, &pool.model, &pool.fleets) {
        gw.metrics.refused(&caller.tenant, Reason::Model);
        return (pool.not_allowed(caller, &model), pool.label);
    }
    let Some(url) = gw.pools.any_ready(&pool.pool) else {
        return (pool.none_ready(), pool.label);
    };
    // Only what the question needs goes on, not what the client sent.
    let mut ask = json!({ "model": pool.model });
    if let Some(v) = verbose {
        ask["verbose"] = json!(v);
    }
    let bytes = Bytes::from(ask.to_string());
    let Ok(upstream) = axum::http::Request::post(format!("{url}/api/show"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(bytes))
    else {
        return (
            error(StatusCode::BAD_REQUEST, "invalid request"),
            pool.label,
        );
    };
    let answer = async {
        let resp = gw
            .client
            .request(upstream)
            .await
            .map_err(|e| CallError::Unreachable {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let (parts, body) = resp.into_parts();
        let body = http_body_util::Limited::new(body, SHOW_LIMIT)
            .collect()
            .await
            .map_err(|e| CallError::Invalid(format!("{url}: {e}")))?
            .to_bytes();
        Ok::<_, CallError>(proxy::response(&parts, Body::from(body)))
    };
    let r = match tokio::time::timeout(Duration::from_secs(10), answer).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => error(StatusCode::BAD_GATEWAY, e.to_string()),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "the instance did not answer in time",
        ),
    };
    (r, pool.label)
}
