//! A work request's way to an instance: its body read ([`super::body`]: bounded, pinned), the
//! caller's right to the model and its limits ([`super::limits`]), a slot from its model's pool
//! (or a place in the queue), one failover when nothing has reached the client yet, the
//! first-token and stall watchdog, and the answer relayed, measured and charged.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use fleet_runtime::clock::Instant;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::affinity;
use super::auth::Caller;
use super::body::{self, BodyError, Held};
use super::fair::Who;
use super::limits::{Reason, Ticket};
use super::metrics::Sample;
use super::{Gateway, Lease, PoolOf, Refused, error};
use crate::upstream;

/// A `load_duration` above this is a load: Ollama reports the time it took to get the runner
/// even when the model is loaded (microseconds), while a load takes tens of milliseconds at
/// least (seconds for real models).
pub const RELOAD_THRESHOLD: Duration = Duration::from_millis(10);

/// The instance's response headers a client gets.
const FORWARDED_HEADERS: [header::HeaderName; 2] = [header::CONTENT_TYPE, header::CACHE_CONTROL];

/// Whether the answer to a request of `route` streams: Ollama's generate and chat stream unless
/// told not to; OpenAI's completions only when told to; embeddings never.
pub fn streams(route: &str, asked: Option<bool>) -> bool {
    match route {
        "/api/generate" | "/api/chat" => asked.unwrap_or(true),
        "/v1/chat/completions" | "/v1/completions" => asked.unwrap_or(false),
        _ => false,
    }
}

/// The client's answer from an instance's: its status, `body`, and of its headers only those
/// that describe the body (an instance is untrusted: cookies, server names and whatever else it
/// says stay behind).
pub fn response(parts: &axum::http::response::Parts, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = parts.status;
    for name in FORWARDED_HEADERS {
        if let Some(v) = parts.headers.get(&name) {
            response.headers_mut().insert(name, v.clone());
        }
    }
    response
}

/// Forwards a request of a work `route` from `caller` to an instance of its model's pool.
pub async fn forward(
    gw: &Arc<Gateway>,
    route: &'static str,
    caller: Arc<Caller>,
    req: Request,
) -> Response {
    let who = Who {
        tenant: Arc::from(caller.tenant.as_str()),
        priority: caller.priority,
    };
    let mut call = Call {
        gw,
        route,
        started: Instant::now(),
        streaming: false,
        conversation: None,
        limit: 0,
        caller,
        who,
    };
    let (pool, body, held) = match call.read(req).await {
        Ok(read) => read,
        Err(refused) => return refused,
    };
    let ticket = match call.admit(&pool) {
        Ok(ticket) => ticket,
        Err(refused) => return *refused,
    };
    let answer = call.dispatch(&pool, body, ticket).await;
    // The body is sent (or given up): its bytes go back to the budget.
    drop(held);
    answer
}

/// One work request being answered.
struct Call<'a> {
    gw: &'a Arc<Gateway>,
    route: &'static str,
    started: Instant,
    /// The answer streams (its silence is the instance's); else it comes whole at the end.
    streaming: bool,
    /// The conversation it continues, if it names one (and affinity is on).
    conversation: Option<affinity::Key>,
    /// The most tokens it asks for (0: not said).
    limit: u64,
    /// Whose request it is.
    caller: Arc<Caller>,
    /// Its tenant and class, as the pool's queue sees them.
    who: Who,
}

impl Call<'_> {
    /// The caller may use the pool's model, and is within its limits: a ticket that counts the
    /// request as in progress until the answer ends; else 403, or 429 with `Retry-After`.
    fn admit(&self, pool: &PoolOf) -> Result<Ticket, Box<Response>> {
        let gw = self.gw;
        let tenant = &self.caller.tenant;
        // (The request named a model of the pool, or the fleet: `pool.model` is the model.)
        if !self.caller.may_use(&pool.model, &pool.model, &pool.fleets) {
            gw.metrics.refused(tenant, Reason::Model);
            self.record(&pool.label, StatusCode::FORBIDDEN, Duration::ZERO);
            return Err(Box::new(pool.not_allowed(&self.caller, &pool.model)));
        }
        gw.ledger.admit(&self.caller, Instant::now()).map_err(|refusal| {
            gw.metrics.refused(tenant, refusal.reason);
            tracing::debug!(key = %self.caller.key, tenant = %tenant, reason = refusal.reason.as_str(), "over a limit");
            let code = StatusCode::TOO_MANY_REQUESTS;
            let mut r = self.refuse(&pool.label, code, Duration::ZERO, refusal.message());
            let secs = refusal.retry_after.as_secs().to_string();
            if let Ok(v) = HeaderValue::from_str(&secs) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            Box::new(r)
        })
    }

    /// Answers `code` with `message`, counted for `fleet` (`""`: matched none).
    fn refuse(
        &self,
        fleet: &str,
        code: StatusCode,
        queue_wait: Duration,
        message: impl Into<String>,
    ) -> Response {
        self.record(fleet, code, queue_wait);
        error(code, message)
    }

    fn record(&self, fleet: &str, code: StatusCode, queue_wait: Duration) {
        let sample = Sample {
            route: self.route,
            code: code.as_u16(),
            duration: self.started.elapsed(),
            queue_wait,
            tenant: Some(self.who.tenant.clone()),
            ..Default::default()
        };
        self.gw.metrics.record(fleet, &sample);
    }

    /// The body (within `max_body` and the node's budget for bodies, a JSON object naming a
    /// model some fleet serves), pinned; the pool it goes to; and its share of the budget.
    async fn read(&mut self, req: Request) -> Result<(PoolOf, Bytes, Held), Response> {
        let cfg = &self.gw.cfg;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let session = req
            .headers()
            .get(affinity::SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let read = body::read(
            req.into_body(),
            declared,
            cfg.max_body,
            &self.gw.budget,
            cfg.body_timeout,
        );
        let refuse = |e: BodyError| {
            let mut r = self.refuse("", e.status(), Duration::ZERO, e.to_string());
            if e == BodyError::OverBudget {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            r
        };
        let (bytes, held) = read.await.map_err(refuse)?;
        let parsed = body::Request::parse(&bytes).map_err(refuse)?;
        let model = parsed.model().unwrap_or_default();
        let streaming = streams(self.route, parsed.stream());
        let Some(pool) = self.gw.pool_for(&model) else {
            let message = format!("model '{model}' not found");
            return Err(self.refuse("", StatusCode::NOT_FOUND, Duration::ZERO, message));
        };
        let conversation = cfg
            .affinity
            .then(|| affinity::key_of(&pool.pool, self.route, session.as_deref(), &parsed))
            .flatten();
        let limit = parsed.token_limit().unwrap_or(0);
        let pinned = parsed.pinned(&pool.model).map_err(refuse)?;
        drop(parsed);
        self.streaming = streaming;
        self.conversation = conversation;
        self.limit = limit;
        let body = pinned.map_or(bytes, Bytes::from);
        Ok((pool, body, held))
    }

    /// A slot of an instance of `pool` other than `exclude`, waiting in the queue if need be
    /// (the wait is added to `queue_wait`).
    async fn lease(
        &self,
        pool: &PoolOf,
        exclude: Option<&str>,
        queue_wait: &mut Duration,
    ) -> Result<Lease, Response> {
        let waited = Instant::now();
        let (max, timeout) = (self.gw.cfg.max_queue, self.gw.cfg.queue_timeout);
        let lease = self
            .gw
            .pools
            .acquire(&pool.pool, &self.who, exclude, max, timeout)
            .await;
        match lease {
            Ok(lease) => {
                *queue_wait += waited.elapsed();
                Ok(lease)
            }
            Err(Refused::NoneReady) => {
                self.record(&pool.label, StatusCode::SERVICE_UNAVAILABLE, *queue_wait);
                Err(pool.none_ready())
            }
            Err(Refused::QueueFull | Refused::Timeout) => {
                self.gw.metrics.refused(&self.caller.tenant, Reason::Busy);
                let mut r = self.refuse(
                    &pool.label,
                    StatusCode::SERVICE_UNAVAILABLE,
                    waited.elapsed(),
                    "server busy, please try again.  maximum pending requests exceeded",
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                Err(r)
            }
        }
    }

    /// Sends `body` to an instance of `pool`; when it did not get there or the instance refused
    /// it (no connection, a 5xx), once more to another one. A request that timed out is not
    /// sent again: the instance was working on it.
    async fn dispatch(&self, pool: &PoolOf, body: Bytes, ticket: Ticket) -> Response {
        let mut exclude: Option<String> = None;
        let mut queue_wait = Duration::ZERO;
        let mut last = String::new();
        let mut known = false;
        for round in 0..2 {
            // The first try goes to the conversation's instance when that pays.
            let (affine, home) = match (round, self.conversation) {
                (0, Some(key)) => {
                    match self.conversation_instance(pool, key, &mut queue_wait).await {
                        Some((lease, entry)) => (lease, Some(entry)),
                        None => (None, None),
                    }
                }
                _ => (None, None),
            };
            known |= home.is_some();
            let lease = match affine {
                Some(lease) => lease,
                None => match self.lease(pool, exclude.as_deref(), &mut queue_wait).await {
                    Ok(lease) => lease,
                    Err(refused) => return refused,
                },
            };
            // A hit when it got the instance holding its conversation, waited for or not.
            let held = home
                .filter(|e| e.instance == lease.backend.id)
                .map(|e| e.tokens);
            self.expect(&lease, pool, body.len(), held);
            let fleet = lease.backend.fleet.clone();
            match self.attempt(&lease, &body).await {
                Attempt::Started(answer) => {
                    let relay = Relay {
                        gw: self.gw.clone(),
                        route: self.route,
                        lease,
                        started: self.started,
                        ttft: self.started.elapsed(),
                        queue_wait,
                        pool: pool.pool.clone(),
                        conversation: self.conversation,
                        affinity: known.then_some(held),
                        bytes: body.len(),
                        ticket,
                    };
                    return relay.respond(answer);
                }
                Attempt::TimedOut { why, stalled } => {
                    tracing::debug!(instance = %lease.backend.id, why = %why, stalled, "request timed out before any byte");
                    if stalled {
                        self.gw.metrics.stalled(&fleet);
                    }
                    lease.finish(stalled);
                    return self.refuse(&fleet, StatusCode::GATEWAY_TIMEOUT, queue_wait, why);
                }
                Attempt::Failed(why) => {
                    tracing::debug!(instance = %lease.backend.id, why = %why, "request failed before any byte; retrying elsewhere");
                    exclude = Some(lease.backend.id.clone());
                    lease.finish(false);
                    if round == 1 {
                        return self.refuse(&fleet, StatusCode::BAD_GATEWAY, queue_wait, why);
                    }
                    last = why;
                }
            }
        }
        error(StatusCode::BAD_GATEWAY, last)
    }

    /// Notes what the request on `lease` is expected to cost: its token limit, and its prompt's
    /// evaluation (its tokens guessed from its `bytes`, less those the instance holds of its
    /// conversation, at the pool's rate), for the estimates of later requests.
    fn expect(&self, lease: &Lease, pool: &PoolOf, bytes: usize, held: Option<u64>) {
        use std::sync::atomic::Ordering::Relaxed;
        let rates = self.gw.affinity.rates(&pool.pool);
        let tokens = (bytes as f64 / rates.bytes_per_token.max(0.1)) as u64;
        let prefill = affinity::prefill(tokens.saturating_sub(held.unwrap_or(0)), &rates);
        let progress = &lease.progress;
        progress.limit.store(self.limit, Relaxed);
        let micros = u64::try_from(prefill.as_micros()).unwrap_or(u64::MAX);
        progress.prefill_us.store(micros, Relaxed);
    }

    /// The instance that served the conversation last, if the gateway knows one in `pool`, and
    /// a slot on it: at once when it is free; after waiting for it when it is busy for less
    /// time than evaluating the conversation again elsewhere would take ([`affinity::worth_waiting`]);
    /// else none (the request goes to the pool's queue, and is a hit only if that gives it the
    /// same instance).
    async fn conversation_instance(
        &self,
        pool: &PoolOf,
        key: affinity::Key,
        queue_wait: &mut Duration,
    ) -> Option<(Option<Lease>, affinity::Entry)> {
        let gw = self.gw;
        let entry = gw.affinity.lookup(key)?;
        if let Some(lease) = gw.pools.try_on(&pool.pool, &entry.instance, &self.who) {
            return Some((Some(lease), entry));
        }
        // A batch request does not wait for its instance: it would go before interactive ones.
        if self.who.priority == fleet_api::keys::Priority::Batch {
            return Some((None, entry));
        }
        let Some(busy) = gw.pools.busy_on(&pool.pool, &entry.instance) else {
            return Some((None, entry));
        };
        let rates = gw.affinity.rates(&pool.pool);
        let Some(wait) = affinity::worth_waiting(&busy, entry.tokens, &rates) else {
            return Some((None, entry));
        };
        // Once waiting, it waits on (as long as a request may wait in the pool's queue): by
        // now going elsewhere would cost the prefill on top of the time spent. Waiting ends
        // early when the instance stops taking requests.
        tracing::trace!(instance = %entry.instance, expected = ?wait, "waiting for the conversation's instance");
        let waited = Instant::now();
        let until = waited + gw.cfg.queue_timeout;
        let lease = gw.pools.wait_on(&entry.instance, &self.who, until).await;
        *queue_wait += waited.elapsed();
        Some((lease, entry))
    }

    /// Sends `body` to the leased instance and waits for its headers and first bytes: within
    /// the first-token timeout when the answer streams, within the request timeout when it
    /// comes whole. A pooled connection the instance had closed (it never got the request) is
    /// replaced by a fresh one once ([`upstream::send`]).
    async fn attempt(&self, lease: &Lease, body: &Bytes) -> Attempt {
        let gw = self.gw;
        let id = &lease.backend.id;
        let url = format!("{}{}", lease.backend.url, self.route);
        let window = if self.streaming {
            gw.cfg.first_token_timeout
        } else {
            gw.cfg.request_timeout
        };
        let deadline = Instant::now() + window;
        let timed_out = || Attempt::TimedOut {
            why: if self.streaming {
                format!("no first token within {window:?}")
            } else {
                format!("no answer within {window:?}")
            },
            stalled: self.streaming,
        };
        let Ok(uri) = url.parse::<axum::http::Uri>() else {
            return Attempt::Failed(format!("cannot send to {url}"));
        };
        let make = || {
            let mut req = axum::http::Request::new(Body::from(body.clone()));
            *req.method_mut() = axum::http::Method::POST;
            *req.uri_mut() = uri.clone();
            req.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            req
        };
        let sent =
            tokio::time::timeout_at(deadline, upstream::send(&gw.client, &gw.fresh, make)).await;
        let resp = match sent {
            Err(_) => return timed_out(),
            Ok(Err(e)) => return Attempt::Failed(format!("instance {id}: {e}")),
            Ok(Ok(r)) => r,
        };
        if resp.status().is_server_error() {
            return Attempt::Failed(format!("instance {id} answered {}", resp.status()));
        }
        let (parts, mut body) = resp.into_parts();
        let first = loop {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => return timed_out(),
                Ok(None) => break None,
                Ok(Some(Err(e))) => return Attempt::Failed(format!("instance {id}: {e}")),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        break Some(data);
                    }
                }
            }
        };
        Attempt::Started(Answer { parts, first, body })
    }
}

/// An instance's answer, before anything went to the client.
struct Answer {
    parts: axum::http::response::Parts,
    /// The first body bytes (`None`: the body was empty).
    first: Option<Bytes>,
    body: hyper::body::Incoming,
}

/// What came of sending a request to an instance.
enum Attempt {
    /// Headers and the first body bytes came.
    Started(Answer),
    /// It did not get there, or the instance refused it (a 5xx): another instance may take it.
    Failed(String),
    /// Nothing came in time; `stalled` when the instance was asked to stream (its silence
    /// counts against it). It is not sent again.
    TimedOut {
        /// What did not come.
        why: String,
        /// It counts as a stall of the instance.
        stalled: bool,
    },
}

/// How a streamed answer that stalls ends for the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// An Ollama NDJSON stream: an `{"error": ...}` line.
    ErrorLine,
    /// An OpenAI server-sent event stream: a `data: {"error": ...}` event.
    ErrorEvent,
    /// Anything else: the body is cut (the client sees a broken answer).
    Cut,
}

impl Ending {
    fn of(parts: &axum::http::response::Parts) -> Ending {
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if content_type.contains("event-stream") {
            Ending::ErrorEvent
        } else if content_type.contains("ndjson") {
            Ending::ErrorLine
        } else {
            Ending::Cut
        }
    }

    /// What ends the stream after `why`.
    fn end(self, why: String) -> Result<Bytes, std::io::Error> {
        let error = json!({ "error": why });
        match self {
            Ending::ErrorLine => Ok(Bytes::from(format!("{error}\n"))),
            Ending::ErrorEvent => Ok(Bytes::from(format!("data: {error}\n\n"))),
            Ending::Cut => Err(std::io::Error::other(why)),
        }
    }
}

/// An answer on its way from an instance to the client: relayed as it comes, watched for
/// stalls, measured when it ends (which frees the instance's slot).
struct Relay {
    gw: Arc<Gateway>,
    route: &'static str,
    lease: Lease,
    started: Instant,
    ttft: Duration,
    queue_wait: Duration,
    /// The pool it was sent in.
    pool: String,
    /// The conversation it continues, if it names one.
    conversation: Option<affinity::Key>,
    /// When the gateway knew the conversation's instance: `Some(tokens it held)` when the
    /// request went there (a hit), `None` when it went elsewhere (a miss).
    affinity: Option<Option<u64>>,
    /// The request body's size.
    bytes: usize,
    /// The caller's place within its limits, held until the answer ends; charged its tokens.
    ticket: Ticket,
}

type Chunk = Result<Bytes, std::io::Error>;

impl Relay {
    /// The client's response: the instance's headers, and its body as it comes.
    fn respond(self, answer: Answer) -> Response {
        let (tx, rx) = mpsc::channel::<Chunk>(16);
        let code = answer.parts.status;
        let ending = Ending::of(&answer.parts);
        let Answer { parts, first, body } = answer;
        tokio::spawn(self.pump(code, ending, first, body, tx));
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        });
        response(&parts, Body::from_stream(stream))
    }

    /// Relays the body until it ends, the client goes, or the instance stalls.
    async fn pump(
        self,
        code: StatusCode,
        ending: Ending,
        first: Option<Bytes>,
        mut body: hyper::body::Incoming,
        tx: mpsc::Sender<Chunk>,
    ) {
        let mut tail = Tail::default();
        let mut stalled = false;
        let idle = self.gw.cfg.stall_timeout;
        // A client that stops reading is gone once a chunk waits on it for the stall timeout:
        // it must not keep the instance's slot.
        let pass = |chunk: Chunk| {
            let tx = tx.clone();
            async move { matches!(tokio::time::timeout(idle, tx.send(chunk)).await, Ok(Ok(()))) }
        };
        let mut client_here = true;
        let pieces = &self.lease.progress.pieces;
        let count = |data: &[u8]| {
            let n = data.iter().filter(|b| **b == b'\n').count() as u64;
            pieces.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        };
        if let Some(data) = first {
            tail.keep(&data);
            count(&data);
            client_here = pass(Ok(data)).await;
        }
        while client_here {
            match tokio::time::timeout(idle, body.frame()).await {
                Err(_) => {
                    stalled = true;
                    let why = format!("no bytes from the instance for {idle:?}");
                    tracing::warn!(instance = %self.lease.backend.id, "{why}; request aborted");
                    pass(ending.end(why)).await;
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    pass(Err(std::io::Error::other(e.to_string()))).await;
                    break;
                }
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        tail.keep(&data);
                        count(&data);
                        client_here = pass(Ok(data)).await;
                    }
                }
            }
        }
        if !client_here {
            tracing::debug!(instance = %self.lease.backend.id, "the client went away or stopped reading; the instance's slot is free");
        }
        let last = tail.last_object();
        let counts = last.as_ref().map(Counts::of).unwrap_or_default();
        let cached = self.learn(last.as_ref(), &counts, code, stalled);
        let sample = Sample {
            route: self.route,
            code: code.as_u16(),
            duration: self.started.elapsed(),
            ttft: Some(self.ttft),
            queue_wait: self.queue_wait,
            prompt_tokens: counts.cost.prompt,
            generated_tokens: counts.cost.generated,
            reload: counts.reload,
            stalled,
            affinity_hit: self.affinity.map(|held| held.is_some()),
            cached_tokens: cached,
            tenant: Some(self.lease.who.tenant.clone()),
        };
        self.gw.metrics.record(&self.lease.backend.fleet, &sample);
        let tokens = counts.cost.prompt + counts.cost.generated;
        self.ticket.charge(tokens, Instant::now());
        self.lease.finish(stalled);
    }
}

impl Relay {
    /// What the gateway learns from a finished answer: the pool's rates, and where the
    /// conversation now lives (a chat's by its leading messages; a generate's by the `context`
    /// its answer returned). Returns the prompt tokens served from the instance's cache (on a
    /// hit: what it held of the conversation, at most the prompt).
    fn learn(&self, last: Option<&Value>, counts: &Counts, code: StatusCode, stalled: bool) -> u64 {
        if code != StatusCode::OK || stalled {
            return 0;
        }
        let affinity = &self.gw.affinity;
        let held = self.affinity.flatten();
        let service = self.lease.progress.started.elapsed();
        affinity.observe(
            &self.pool,
            self.bytes,
            &counts.cost,
            service,
            held.is_some(),
        );
        let id = &self.lease.backend.id;
        let total = counts.cost.prompt + counts.cost.generated;
        if let Some(key) = self.conversation {
            affinity.remember(key, id, total);
        }
        if let Some(context) = last.and_then(|v| v["context"].as_array()) {
            let text = serde_json::to_string(context).unwrap_or_default();
            if let Some(key) = affinity::context_key(&self.pool, &text) {
                affinity.remember(key, id, context.len() as u64);
            }
        }
        held.map_or(0, |h| h.min(counts.cost.prompt))
    }
}

/// The most of an answer's last line kept (a generate answer's `context` is in it).
const LAST_LINE: usize = 1 << 20;

/// The end of an answer: its last complete JSON line (NDJSON, or SSE `data:`), and the line
/// being received (a whole answer that does not end in a newline), each at most [`LAST_LINE`].
#[derive(Default)]
struct Tail {
    line: Vec<u8>,
    /// The line is longer than kept: dropped until its end.
    overflow: bool,
    last: Vec<u8>,
}

impl Tail {
    fn keep(&mut self, data: &[u8]) {
        let mut rest = data;
        while !rest.is_empty() {
            let (part, ended) = match rest.iter().position(|b| *b == b'\n') {
                Some(at) => (&rest[..at], Some(at)),
                None => (rest, None),
            };
            if !self.overflow {
                if self.line.len() + part.len() > LAST_LINE {
                    self.overflow = true;
                    self.line.clear();
                } else {
                    self.line.extend_from_slice(part);
                }
            }
            match ended {
                Some(at) => {
                    if !self.overflow && json_line(&self.line).is_some() {
                        self.last = std::mem::take(&mut self.line);
                    }
                    self.line.clear();
                    self.overflow = false;
                    rest = &rest[at + 1..];
                }
                None => rest = &[],
            }
        }
    }

    /// The answer's last complete JSON object.
    fn last_object(&self) -> Option<Value> {
        [&self.line, &self.last]
            .into_iter()
            .filter_map(|l| json_line(l))
            .find_map(|l| serde_json::from_str(l).ok())
    }
}

/// A line's JSON object, if it holds one (`data:` of a server-sent event stripped).
fn json_line(line: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(line).ok()?.trim();
    let text = text.strip_prefix("data:").unwrap_or(text).trim();
    text.starts_with('{').then_some(text)
}

/// What an answer says it cost.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Counts {
    /// Tokens and times.
    cost: affinity::Cost,
    /// The instance loaded the model for it.
    reload: bool,
}

impl Counts {
    /// From a response's last JSON object (Ollama's final chunk, or an OpenAI usage block).
    fn of(v: &Value) -> Counts {
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        let usage = &v["usage"];
        Counts {
            cost: affinity::Cost {
                prompt: n("prompt_eval_count").max(usage["prompt_tokens"].as_u64().unwrap_or(0)),
                prompt_time: Duration::from_nanos(n("prompt_eval_duration")),
                generated: n("eval_count").max(usage["completion_tokens"].as_u64().unwrap_or(0)),
                generate_time: Duration::from_nanos(n("eval_duration")),
            },
            reload: u128::from(n("load_duration")) > RELOAD_THRESHOLD.as_nanos(),
        }
    }
}

/// The last complete JSON object of an answer (NDJSON lines or SSE `data:` lines).
#[cfg(test)]
fn last_object(answer: &[u8]) -> Option<Value> {
    let mut tail = Tail::default();
    tail.keep(answer);
    tail.last_object()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_the_last_object() {
        let ndjson = b"{\"response\":\"a\",\"done\":false}\n{\"done\":true,\"eval_count\":7,\"prompt_eval_count\":3,\"load_duration\":45000}\n";
        let last = last_object(ndjson).expect("last");
        let counts = |prompt, generated, reload| {
            let c = Counts::of(&json!({"prompt_eval_count": prompt, "eval_count": generated}));
            Counts { reload, ..c }
        };
        assert_eq!(
            Counts::of(&last),
            counts(3, 7, false),
            "45 us to get a loaded runner: no reload"
        );
        let loaded = json!({"done": true, "eval_count": 1, "load_duration": 2_000_000_000u64});
        assert_eq!(Counts::of(&loaded), counts(0, 1, true), "2 s: a load");
        let sse = b"data: {\"choices\":[]}\n\ndata: {\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":9}}\n\ndata: [DONE]\n\n";
        assert_eq!(
            Counts::of(&last_object(sse).expect("usage")),
            counts(4, 9, false)
        );
    }

    #[test]
    fn a_stalled_stream_ends_in_its_own_format() {
        let line = Ending::ErrorLine.end("quiet".into()).expect("a line");
        assert_eq!(&line[..], b"{\"error\":\"quiet\"}\n");
        let event = Ending::ErrorEvent.end("quiet".into()).expect("an event");
        assert_eq!(&event[..], b"data: {\"error\":\"quiet\"}\n\n");
        assert!(Ending::Cut.end("quiet".into()).is_err());
    }

    /// The last line of an answer is kept whole (a generate answer's `context` makes it long),
    /// and a whole answer without a final newline is read too.
    #[test]
    fn the_last_line_is_kept_whole() {
        let context: Vec<u64> = (0..20_000).collect();
        let last = json!({"done": true, "eval_count": 2, "context": context}).to_string();
        let mut tail = Tail::default();
        tail.keep(b"{\"response\":\"a\"}\n");
        for piece in last.as_bytes().chunks(1000) {
            tail.keep(piece);
        }
        tail.keep(b"\n");
        let v = tail.last_object().expect("the last object");
        assert_eq!(v["context"].as_array().map(Vec::len), Some(20_000));
        let mut whole = Tail::default();
        whole.keep(br#"{"done":true,"eval_count":3}"#);
        assert_eq!(whole.last_object().expect("whole")["eval_count"], 3);
    }
}
