//! Conversation affinity. The engine keeps the KV state of past prompts (its slot, and a RAM
//! prompt cache), so the next turn of a conversation costs only its new tokens on the instance
//! that served the last one, and the whole conversation's prefill anywhere else: seconds on a
//! CPU. The gateway remembers which instance served a conversation and sends its next turn
//! there when that instance is free, or when waiting for it is expected to be shorter than
//! evaluating the conversation again elsewhere; otherwise to the least busy instance.
//!
//! A conversation is named by a session header (`X-Session-Id`) when the client sends one;
//! else by its leading messages (the system prompt and the first user message: chat routes),
//! or by the start of the `context` a generate answer returned (`/api/generate`). The waits are
//! estimated from what the gateway measures: the pool's generation and prefill rates, and how
//! far the busy instance's requests are. Load stays bounded: at most one request waits for an
//! instance in particular, so a hot conversation or system prompt cannot pin one instance while
//! others idle.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fleet_runtime::clock::Instant;
use serde_json::value::RawValue;

use super::body::Request;
use super::pool::{Busy, Progress};
use crate::lock;

/// The session header a client may name its conversation with.
pub const SESSION_HEADER: &str = "x-session-id";

/// Conversations remembered at most (the oldest are forgotten first).
const CAPACITY: usize = 65_536;

/// How many leading tokens of a generate `context` name its conversation.
const CONTEXT_KEY_TOKENS: usize = 64;

/// A conversation's name: a hash of what identifies it, within its pool.
pub type Key = u64;

fn hash(parts: &[&[u8]]) -> Key {
    // FNV-1a over the parts (with a separator): stable and cheap; not security-relevant (a
    // collision sends a turn to another conversation's instance, which still answers).
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for b in part.iter().chain(&[0xff]) {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The conversation a request continues, if it names one: its session header; its leading
/// messages (chat routes); or the start of its `context` (generate).
pub fn key_of(pool: &str, route: &str, session: Option<&str>, body: &Request<'_>) -> Option<Key> {
    if let Some(s) = session.filter(|s| !s.is_empty()) {
        return Some(hash(&[pool.as_bytes(), b"session", s.as_bytes()]));
    }
    match route {
        "/api/chat" | "/v1/chat/completions" => {
            let messages: Vec<&RawValue> =
                serde_json::from_str(body.raw("messages")?.get()).ok()?;
            let mut parts: Vec<&[u8]> = vec![pool.as_bytes(), b"chat"];
            for m in &messages {
                parts.push(m.get().as_bytes());
                let role = Request::parse(m.get().as_bytes())
                    .ok()
                    .and_then(|r| r.string("role"));
                if role.as_deref() == Some("user") {
                    return Some(hash(&parts));
                }
            }
            None
        }
        "/api/generate" => context_key(pool, body.raw("context")?.get()),
        _ => None,
    }
}

/// The key of a generate `context` (a JSON array of token numbers): its first tokens.
pub fn context_key(pool: &str, context: &str) -> Option<Key> {
    let inner = context.trim().strip_prefix('[')?;
    let head: Vec<&str> = inner
        .split(',')
        .take(CONTEXT_KEY_TOKENS)
        .map(|t| t.trim().trim_end_matches(']').trim())
        .filter(|t| !t.is_empty())
        .collect();
    if head.len() < CONTEXT_KEY_TOKENS.min(8) {
        return None;
    }
    let joined = head.join(",");
    Some(hash(&[pool.as_bytes(), b"context", joined.as_bytes()]))
}

/// What the gateway remembers of a conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// The instance that served its last turn.
    pub instance: String,
    /// The tokens it holds of it (the last turn's prompt and answer).
    pub tokens: u64,
    used: Instant,
}

/// Rates measured per pool (moving averages).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    /// Tokens generated per second.
    pub generate: f64,
    /// Prompt tokens per second of prompt evaluation, from answers that did not go to an
    /// instance holding their conversation: what a conversation costs where it is not held.
    /// (Ollama counts the cached prompt tokens and times only the evaluated ones, so this is
    /// the cost per prompt token as a miss sees it, a shared system prompt cached everywhere
    /// included; not the engine's own rate.)
    pub prefill: f64,
    /// Tokens an answer has (for requests that do not say their limit).
    pub answer: f64,
    /// Request body bytes per prompt token (to guess a prompt's tokens before it is sent).
    pub bytes_per_token: f64,
    /// Seconds an instance is busy with a request that is not a hit (what each request in the
    /// pool's queue will hold an instance for).
    pub service: f64,
    /// Seconds an instance is busy with a hit (what each request waiting for an instance in
    /// particular will hold it for).
    pub hit_service: f64,
}

impl Default for Rates {
    fn default() -> Self {
        // Until measured: what a small model on one CPU core does (SmolLM2-135M here).
        Rates {
            generate: 100.0,
            prefill: 140.0,
            answer: 64.0,
            bytes_per_token: 4.0,
            service: 2.0,
            hit_service: 0.5,
        }
    }
}

fn ewma(old: f64, new: f64) -> f64 {
    0.8 * old + 0.2 * new
}

/// The table of conversations and the pools' rates.
#[derive(Debug, Default)]
pub struct Affinity {
    conversations: std::sync::Mutex<HashMap<Key, Entry>>,
    rates: std::sync::Mutex<HashMap<String, Rates>>,
}

/// What an answer said it cost (Ollama's final counts).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    /// `prompt_eval_count` (cached tokens included, since Ollama 0.30).
    pub prompt: u64,
    /// `prompt_eval_duration` (only the tokens evaluated).
    pub prompt_time: Duration,
    /// `eval_count`.
    pub generated: u64,
    /// `eval_duration`.
    pub generate_time: Duration,
}

impl Affinity {
    /// The instance that served the conversation last, and what it holds of it.
    pub fn lookup(&self, key: Key) -> Option<Entry> {
        lock(&self.conversations).get(&key).cloned()
    }

    /// `instance` served a turn of conversation `key` and holds `tokens` of it.
    pub fn remember(&self, key: Key, instance: &str, tokens: u64) {
        let mut c = lock(&self.conversations);
        if c.len() >= CAPACITY && !c.contains_key(&key) {
            // Forget the oldest tenth at once (a sort now and then, not per insert).
            let mut ages: Vec<(Instant, Key)> = c.iter().map(|(k, e)| (e.used, *k)).collect();
            ages.sort_unstable();
            for (_, k) in ages.into_iter().take(CAPACITY / 10) {
                c.remove(&k);
            }
        }
        c.insert(
            key,
            Entry {
                instance: instance.to_string(),
                tokens,
                used: Instant::now(),
            },
        );
    }

    /// The pool's rates.
    pub fn rates(&self, pool: &str) -> Rates {
        lock(&self.rates).get(pool).copied().unwrap_or_default()
    }

    /// Learns from an answer of `pool` to a request of `bytes` that held its instance for
    /// `service`; `hit`: it went to an instance holding its conversation (its prompt evaluation
    /// says nothing of what a miss costs).
    pub fn observe(&self, pool: &str, bytes: usize, cost: &Cost, service: Duration, hit: bool) {
        let mut rates = lock(&self.rates);
        let r = rates.entry(pool.to_string()).or_default();
        if hit {
            r.hit_service = ewma(r.hit_service, service.as_secs_f64());
        } else {
            r.service = ewma(r.service, service.as_secs_f64());
        }
        if cost.prompt >= 32 && bytes > 0 {
            r.bytes_per_token = ewma(r.bytes_per_token, bytes as f64 / cost.prompt as f64);
        }
        if cost.generated > 0 && cost.generate_time > Duration::ZERO {
            r.generate = ewma(
                r.generate,
                cost.generated as f64 / cost.generate_time.as_secs_f64(),
            );
            r.answer = ewma(r.answer, cost.generated as f64);
        }
        if !hit && cost.prompt >= 32 && cost.prompt_time > Duration::ZERO {
            r.prefill = ewma(
                r.prefill,
                cost.prompt as f64 / cost.prompt_time.as_secs_f64(),
            );
        }
    }
}

/// How long a request in flight has left: what remains of its expected prefill, then its
/// remaining tokens at the generation rate (its limit when it said one, else a usual answer's
/// length).
fn left(p: &Progress, rates: &Rates) -> Duration {
    let pieces = p.pieces.load(Ordering::Relaxed);
    let prefill = if pieces == 0 {
        Duration::from_micros(p.prefill_us.load(Ordering::Relaxed))
            .saturating_sub(p.started.elapsed())
    } else {
        Duration::ZERO
    };
    let limit = p.limit.load(Ordering::Relaxed);
    let expected = if limit > 0 {
        limit as f64
    } else {
        rates.answer.max(1.0)
    };
    let tokens = (expected - pieces as f64).max(1.0);
    prefill + Duration::from_secs_f64(tokens / rates.generate.max(0.1))
}

/// How long an instance with these requests in flight stays busy (until its first request
/// ends).
pub fn busy_for(requests: &[Arc<Progress>], rates: &Rates) -> Duration {
    requests
        .iter()
        .map(|p| left(p, rates))
        .min()
        .unwrap_or_default()
}

/// How long evaluating `tokens` prompt tokens takes where they are not cached.
pub fn prefill(tokens: u64, rates: &Rates) -> Duration {
    Duration::from_secs_f64(tokens as f64 / rates.prefill.max(0.1))
}

/// Whether to wait for the conversation's instance, and for how long it is expected to take:
/// when its slot frees (after the hits already waiting for it) sooner than the `tokens` it
/// holds would take elsewhere, counting what waiting elsewhere takes (nothing when another
/// instance is free; else until the first frees, after the hits waiting for it in particular,
/// then the pool's queue ahead shared by the other instances). While another instance is free, only one request may wait.
pub fn worth_waiting(busy: &Busy, tokens: u64, rates: &Rates) -> Option<Duration> {
    // Bounded load: while another instance idles, one request at most waits for this one.
    if busy.idle_elsewhere && busy.ahead > 0 {
        return None;
    }
    let secs = |s: f64| Duration::from_secs_f64(s.max(0.0));
    let own = busy_for(&busy.own, rates) + secs(rates.hit_service * busy.ahead as f64);
    let elsewhere = if busy.idle_elsewhere || busy.others.is_empty() {
        Duration::ZERO
    } else {
        // The first other instance to free, after the hits waiting for it in particular.
        let first = busy
            .others
            .iter()
            .map(|o| busy_for(&o.own, rates) + secs(rates.hit_service * o.ahead as f64))
            .min()
            .unwrap_or_default();
        first + secs(rates.service * busy.queued as f64 / busy.others.len() as f64)
    };
    (own < elsewhere + prefill(tokens, rates)).then_some(own)
}

#[cfg(test)]
mod tests {
    use super::super::pool::Other;
    use super::*;

    fn key(route: &str, body: &str, session: Option<&str>) -> Option<Key> {
        let r = Request::parse(body.as_bytes()).expect("parse");
        key_of("p", route, session, &r)
    }

    #[test]
    fn a_conversation_keeps_its_key_from_turn_to_turn() {
        let t1 = r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"doc A: ..."}]}"#;
        let t2 = r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"doc A: ..."},{"role":"assistant","content":"ok"},{"role":"user","content":"and?"}]}"#;
        let other = r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"doc B: ..."}]}"#;
        assert_eq!(key("/api/chat", t1, None), key("/api/chat", t2, None));
        assert!(key("/api/chat", t1, None).is_some());
        assert_ne!(
            key("/api/chat", t1, None),
            key("/api/chat", other, None),
            "one system prompt, two conversations"
        );
        assert_eq!(
            key("/v1/chat/completions", t1, None),
            key("/v1/chat/completions", t2, None)
        );
        assert_eq!(
            key("/api/chat", t1, Some("s1")),
            key("/api/chat", other, Some("s1")),
            "the session header names it"
        );
        assert_eq!(
            key("/api/chat", r#"{"model":"m","messages":[]}"#, None),
            None
        );
        assert_eq!(key("/api/embed", t1, None), None);
    }

    #[test]
    fn a_generate_conversation_is_named_by_its_context() {
        let ctx: Vec<String> = (1..=200).map(|t| t.to_string()).collect();
        let longer: Vec<String> = (1..=300).map(|t| t.to_string()).collect();
        let body = |c: &[String]| {
            format!(
                r#"{{"model":"m","prompt":"next","context":[{}]}}"#,
                c.join(",")
            )
        };
        assert_eq!(
            key("/api/generate", &body(&ctx), None),
            key("/api/generate", &body(&longer), None)
        );
        assert_eq!(
            key("/api/generate", &body(&ctx), None),
            context_key("p", &format!("[{}]", ctx.join(", ")))
        );
        assert_eq!(
            key("/api/generate", r#"{"model":"m","prompt":"hi"}"#, None),
            None
        );
    }

    fn progress(pieces: u64, limit: u64, prefill: Duration) -> Arc<Progress> {
        let p = Progress::new();
        p.pieces.store(pieces, Ordering::Relaxed);
        p.limit.store(limit, Ordering::Relaxed);
        p.prefill_us
            .store(prefill.as_micros() as u64, Ordering::Relaxed);
        Arc::new(p)
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_pays_when_the_instance_frees_before_a_prefill_elsewhere() {
        let rates = Rates {
            generate: 20.0,
            prefill: 100.0,
            answer: 40.0,
            bytes_per_token: 4.0,
            service: 2.0,
            hit_service: 2.0,
        };
        let p = progress(30, 40, Duration::ZERO);
        assert_eq!(
            busy_for(std::slice::from_ref(&p), &rates),
            Duration::from_millis(500),
            "10 tokens left at 20/s"
        );
        let mut busy = Busy {
            own: vec![p.clone()],
            idle_elsewhere: true,
            ..Busy::default()
        };
        assert_eq!(
            worth_waiting(&busy, 1000, &rates),
            Some(Duration::from_millis(500)),
            "1000 tokens: 10 s elsewhere"
        );
        assert_eq!(
            worth_waiting(&busy, 20, &rates),
            None,
            "20 tokens: 0.2 s elsewhere"
        );
        // A request still evaluating its prompt: what is left of its prefill, then its answer.
        let prefilling = progress(0, 40, Duration::from_secs(3));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(busy_for(&[prefilling], &rates), Duration::from_secs(4));
        // Bounded load: while another instance idles, one request at most waits for this one.
        busy.ahead = 1;
        assert_eq!(worth_waiting(&busy, 1000, &rates), None, "another idles");
        // When every instance is busy, elsewhere means waiting too: until the first frees,
        // and the pool's queue ahead (2 s a request, as measured); and hits waiting for this
        // instance already take 2 s each, as measured.
        busy.idle_elsewhere = false;
        busy.others = vec![Other {
            own: vec![progress(0, 40, Duration::ZERO)],
            ahead: 0,
        }];
        busy.ahead = 2;
        busy.queued = 1;
        assert_eq!(
            worth_waiting(&busy, 400, &rates),
            Some(Duration::from_millis(4500)),
            "0.5 s + 2 x 2 s here; 2 s + 2 s + 4 s elsewhere"
        );
        busy.queued = 0;
        assert_eq!(
            worth_waiting(&busy, 200, &rates),
            None,
            "2 s + 2 s elsewhere"
        );
        // The other instance serves the hits waiting for it first (2 s each): 6 s elsewhere.
        busy.others[0].ahead = 2;
        assert_eq!(
            worth_waiting(&busy, 200, &rates),
            Some(Duration::from_millis(4500)),
            "2 s + 2 x 2 s + 2 s elsewhere"
        );
        busy.others[0].ahead = 0;
        // A hot conversation does not queue without end for its instance.
        busy.ahead = 20;
        assert_eq!(worth_waiting(&busy, 1000, &rates), None);
    }

    #[test]
    fn rates_follow_what_answers_say() {
        let a = Affinity::default();
        let cost = Cost {
            prompt: 1000,
            prompt_time: Duration::from_secs(5),
            generated: 50,
            generate_time: Duration::from_secs(1),
        };
        a.observe("p", 4000, &cost, Duration::from_secs(6), false);
        let r = a.rates("p");
        assert!(
            r.prefill > 140.0 && r.prefill < 200.0,
            "moved toward 200/s: {r:?}"
        );
        let hit = Cost {
            prompt_time: Duration::from_millis(10),
            ..cost
        };
        a.observe("p", 4000, &hit, Duration::from_secs(1), true);
        assert_eq!(
            a.rates("p").prefill,
            r.prefill,
            "a hit says nothing of a miss's cost"
        );
    }
}
