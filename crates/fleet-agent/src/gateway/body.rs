//! A request body as the gateway reads it. Bodies cost about their size, once: the bytes are
//! read into one buffer, taken from a node-wide [`Budget`] as they arrive, within a deadline;
//! only the top-level keys are looked at (every value stays the bytes it was), and what an
//! instance must not be told is taken out the way Ollama reads it (Go's `encoding/json`
//! matches keys without regard to case, see [`fleet_api::go_json_key_is`]): every spelling of
//! `keep_alive`, and `num_thread` in every spelling of `options`. The body sent on names one
//! model, the one the request was routed by.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use fleet_api::go_json_key_is;
use http_body_util::BodyExt;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The most top-level keys (and keys of `options`) a body may have: Ollama's requests have
/// about 15; a body of a million tiny keys would cost far more than its size to look at.
pub const MAX_KEYS: usize = 256;

/// The node-wide budget for request body bytes the gateway holds at once (read, waiting in the
/// queue, being sent). A request that would pass it is answered 503.
#[derive(Clone, Debug)]
pub struct Budget {
    bytes: Arc<Semaphore>,
}

/// Bytes taken from the [`Budget`], given back when dropped.
#[derive(Debug, Default)]
pub struct Held(Option<OwnedSemaphorePermit>);

impl Held {
    fn add(&mut self, more: Held) {
        match (&mut self.0, more.0) {
            (Some(mine), Some(more)) => mine.merge(more),
            (mine @ None, more) => *mine = more,
            (_, None) => {}
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, OwnedSemaphorePermit::num_permits)
    }
}

impl Budget {
    /// A budget of `bytes`.
    pub fn new(bytes: usize) -> Budget {
        Budget {
            bytes: Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))),
        }
    }

    /// Takes `n` bytes; `None` when that would pass the budget.
    pub fn take(&self, n: usize) -> Option<Held> {
        if n == 0 {
            return Some(Held::default());
        }
        let n = u32::try_from(n).ok()?;
        self.bytes
            .clone()
            .try_acquire_many_owned(n)
            .ok()
            .map(|p| Held(Some(p)))
    }

    /// Bytes left.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }
}

/// Why a body was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// More than the largest body accepted.
    #[error("request body too large (at most {0} bytes)")]
    TooLarge(usize),
    /// The node's budget for bodies in flight is spent.
    #[error("server busy, please try again.  maximum pending requests exceeded")]
    OverBudget,
    /// The body did not arrive in time.
    #[error("the request body did not arrive within {0:?}")]
    Timeout(Duration),
    /// The body broke off (a malformed chunk, the client went away).
    #[error("the request body broke off: {0}")]
    Broken(String),
    /// Not a JSON object (or too many keys to look at).
    #[error("invalid JSON body: {0}")]
    Invalid(String),
}

impl BodyError {
    /// The status it is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::OverBudget => StatusCode::SERVICE_UNAVAILABLE,
            BodyError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            BodyError::Broken(_) | BodyError::Invalid(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// Reads `body` whole into one buffer: at most `max` bytes (`declared` is its Content-Length,
/// if it said one), each byte of the buffer taken from `budget` before it is allocated, all
/// within `within`.
pub async fn read(
    body: Body,
    declared: Option<u64>,
    max: usize,
    budget: &Budget,
    within: Duration,
) -> Result<(Bytes, Held), BodyError> {
    if declared.is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLarge(max));
    }
    let fill = async {
        let first = declared.map_or(0, |n| n as usize);
        let mut held = budget.take(first).ok_or(BodyError::OverBudget)?;
        let mut buf: Vec<u8> = Vec::with_capacity(first);
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Broken(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let need = buf.len() + data.len();
            if need > max {
                return Err(BodyError::TooLarge(max));
            }
            if need > buf.capacity() {
                // Grow by doubling (bounded by `max`), paying for it first.
                let cap = need.max(buf.capacity() * 2).min(max);
                held.add(
                    budget
                        .take(cap - buf.capacity())
                        .ok_or(BodyError::OverBudget)?,
                );
                buf.reserve_exact(cap - buf.len());
            }
            buf.extend_from_slice(&data);
        }
        Ok((Bytes::from(buf), held))
    };
    tokio::time::timeout(within, fill)
        .await
        .map_err(|_| BodyError::Timeout(within))?
}

/// A JSON object key: borrowed from the body unless it had escapes.
#[derive(Debug)]
struct Key<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// The entries of a JSON object in their order (duplicates kept), values as written.
#[derive(Debug)]
struct Entries<'a>(Vec<(Key<'a>, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Entries<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a JSON object of at most {MAX_KEYS} keys")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<'de>, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    if out.len() == MAX_KEYS {
                        return Err(serde::de::Error::custom(format!(
                            "more than {MAX_KEYS} keys"
                        )));
                    }
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'a> Entries<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Entries<'a>, BodyError> {
        serde_json::from_slice(bytes).map_err(|e| BodyError::Invalid(e.to_string()))
    }

    /// The value Go would decode into the field tagged `field` (the last key that matches).
    fn last(&self, field: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| go_json_key_is(&k.0, field))
            .map(|(_, v)| *v)
    }
}

/// A request's body, parsed as far as the gateway needs it.
#[derive(Debug)]
pub struct Request<'a> {
    bytes: &'a [u8],
    entries: Entries<'a>,
}

impl<'a> Request<'a> {
    /// Reads the top level of a JSON object.
    pub fn parse(bytes: &'a [u8]) -> Result<Request<'a>, BodyError> {
        Ok(Request {
            bytes,
            entries: Entries::parse(bytes)?,
        })
    }

    /// A top-level value as it was written (the last key Go would take for `field`).
    pub fn raw(&self, field: &str) -> Option<&'a RawValue> {
        self.entries.last(field)
    }

    /// A top-level string.
    pub fn string(&self, field: &str) -> Option<String> {
        serde_json::from_str(self.entries.last(field)?.get()).ok()
    }

    /// The most tokens it asks for: `options.num_predict` (Ollama) or `max_tokens`,
    /// `max_completion_tokens` (OpenAI).
    pub fn token_limit(&self) -> Option<u64> {
        let number = |v: &RawValue| serde_json::from_str::<i64>(v.get()).ok();
        let options = self
            .raw("options")
            .and_then(|o| Entries::parse(o.get().as_bytes()).ok())
            .and_then(|o| {
                o.0.iter()
                    .rev()
                    .find(|(k, _)| k.0 == "num_predict")
                    .map(|(_, v)| *v)
            })
            .and_then(number);
        options
            .or_else(|| self.raw("max_tokens").and_then(number))
            .or_else(|| self.raw("max_completion_tokens").and_then(number))
            .and_then(|n| u64::try_from(n).ok())
            .filter(|n| *n > 0)
    }

    /// The model it names (`model`, else the older `name`), as Ollama reads it.
    pub fn model(&self) -> Option<String> {
        self.string("model").or_else(|| self.string("name"))
    }

    /// Its `stream`, when it says one.
    pub fn stream(&self) -> Option<bool> {
        serde_json::from_str(self.entries.last("stream")?.get()).ok()
    }

    /// Its `verbose`, when it says one.
    pub fn verbose(&self) -> Option<bool> {
        serde_json::from_str(self.entries.last("verbose")?.get()).ok()
    }

    /// The body to send on: `model` as its one model key; no `keep_alive` in any spelling; no
    /// `num_thread` in any `options`. `None` when the body says exactly that already (it is
    /// sent as it came).
    pub fn pinned(&self, model: &str) -> Result<Option<Vec<u8>>, BodyError> {
        let quoted = serde_json::to_string(model).unwrap_or_default();
        let models: Vec<&(Key<'_>, &RawValue)> = (self.entries.0.iter())
            .filter(|(k, _)| go_json_key_is(&k.0, "model"))
            .collect();
        let model_as_is =
            matches!(models.as_slice(), [(k, v)] if k.0 == "model" && v.get() == quoted);
        let mut options = Vec::new();
        for (k, v) in &self.entries.0 {
            if go_json_key_is(&k.0, "options") && v.get().starts_with('{') {
                options.push(Entries::parse(v.get().as_bytes())?);
            }
        }
        let threads_set = options
            .iter()
            .any(|o| o.0.iter().any(|(k, _)| k.0 == "num_thread"));
        let keep_alive = self
            .entries
            .0
            .iter()
            .any(|(k, _)| go_json_key_is(&k.0, "keep_alive"));
        if model_as_is && !threads_set && !keep_alive {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(self.bytes.len() + quoted.len() + 10);
        out.extend_from_slice(b"{\"model\":");
        out.extend_from_slice(quoted.as_bytes());
        let mut options = options.into_iter();
        for (k, v) in &self.entries.0 {
            if go_json_key_is(&k.0, "model") || go_json_key_is(&k.0, "keep_alive") {
                continue;
            }
            out.push(b',');
            write_key(&mut out, &k.0);
            if go_json_key_is(&k.0, "options") && v.get().starts_with('{') {
                let kept = options.next().map(|o| o.0).unwrap_or_default();
                out.push(b'{');
                let kept = kept.iter().filter(|(k, _)| k.0 != "num_thread");
                for (i, (k, v)) in kept.enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_key(&mut out, &k.0);
                    out.extend_from_slice(v.get().as_bytes());
                }
                out.push(b'}');
            } else {
                out.extend_from_slice(v.get().as_bytes());
            }
        }
        out.push(b'}');
        Ok(Some(out))
    }
}

fn write_key(out: &mut Vec<u8>, key: &str) {
    out.extend_from_slice(serde_json::to_string(key).unwrap_or_default().as_bytes());
    out.push(b':');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn pinned(body: &str, model: &str) -> Option<Value> {
        let r = Request::parse(body.as_bytes()).expect("parse");
        r.pinned(model)
            .expect("pinned")
            .map(|b| serde_json::from_slice(&b).expect("json out"))
    }

    #[test]
    fn every_spelling_go_would_read_is_pinned() {
        for body in [
            r#"{"model":"m","keep_alive":0}"#,
            r#"{"model":"m","KEEP_ALIVE":0}"#,
            r#"{"model":"m","Keep_Alive":"5m"}"#,
            "{\"model\":\"m\",\"\u{212A}eep_alive\":0}",
            r#"{"model":"m","\u212Aeep_alive":0}"#,
            r#"{"model":"m","keep_al\u0131ve":0}"#,
        ] {
            assert_eq!(pinned(body, "m"), Some(json!({"model": "m"})), "{body}");
        }
        assert_eq!(
            pinned(
                r#"{"model":"m","Options":{"num_thread":64,"seed":1},"option\u017F":{"num_thread":2}}"#,
                "m"
            ),
            Some(json!({"model": "m", "Options": {"seed": 1}, "option\u{17F}": {}})),
            "every options Go merges into one map"
        );
        // Inside options Ollama matches keys exactly (Options.FromMap): other spellings are
        // ignored by Ollama and left alone here.
        assert_eq!(
            pinned(r#"{"model":"m","options":{"NUM_THREAD":64}}"#, "m"),
            None
        );
    }

    #[test]
    fn the_model_routed_by_is_the_one_sent() {
        let r = Request::parse(br#"{"model":"a","MODEL":"b","prompt":"hi"}"#).expect("parse");
        assert_eq!(r.model().as_deref(), Some("b"), "Go takes the last");
        assert_eq!(
            r.pinned("b")
                .expect("pinned")
                .map(|b| String::from_utf8(b).expect("utf8")),
            Some(r#"{"model":"b","prompt":"hi"}"#.to_string())
        );
        // A fleet's name used as the model: the instance is told the fleet's model.
        assert_eq!(
            pinned(r#"{"model":"devassist","stream":false}"#, "llama3:8b"),
            Some(json!({"model": "llama3:8b", "stream": false}))
        );
        assert_eq!(
            pinned(r#"{"model":"m","messages":[1,2]}"#, "m"),
            None,
            "as it came"
        );
    }

    #[test]
    fn values_stay_as_written() {
        let body = r#"{"model":"m","keep_alive":1,"messages":[{"role":"user","content":"a\u0041 \"q\""}],"n":1.50}"#;
        let out = Request::parse(body.as_bytes())
            .expect("parse")
            .pinned("m")
            .expect("pinned")
            .expect("changed");
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            r#"{"model":"m","messages":[{"role":"user","content":"a\u0041 \"q\""}],"n":1.50}"#
        );
    }

    #[test]
    fn stream_and_bad_bodies() {
        let r = Request::parse(br#"{"model":"m","Stream":false}"#).expect("parse");
        assert_eq!(r.stream(), Some(false));
        assert!(Request::parse(b"[1,2]").is_err());
        assert!(Request::parse(br#"{"model":"m"} x"#).is_err());
        let many = format!(
            "{{{}}}",
            (0..=MAX_KEYS)
                .map(|i| format!("\"k{i}\":0"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(matches!(
            Request::parse(many.as_bytes()),
            Err(BodyError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn reading_takes_from_the_budget_and_gives_back() {
        let budget = Budget::new(1000);
        let (bytes, held) = read(
            Body::from("x".repeat(300)),
            Some(300),
            500,
            &budget,
            Duration::from_secs(1),
        )
        .await
        .expect("read");
        assert_eq!((bytes.len(), held.bytes()), (300, 300));
        assert_eq!(budget.available(), 700);
        let over = read(
            Body::from("y".repeat(400)),
            None,
            500,
            &budget,
            Duration::from_secs(1),
        )
        .await;
        assert!(over.is_ok(), "grows within the budget: {over:?}");
        let spent = read(
            Body::from("z".repeat(400)),
            Some(400),
            500,
            &budget,
            Duration::from_secs(1),
        )
        .await;
        assert_eq!(spent.map(|_| ()), Err(BodyError::OverBudget));
        drop(held);
        assert!(budget.available() >= 300);
        let big = read(
            Body::from("w".repeat(600)),
            None,
            500,
            &budget,
            Duration::from_secs(1),
        )
        .await;
        assert_eq!(big.map(|_| ()), Err(BodyError::TooLarge(500)));
        let claimed = read(
            Body::empty(),
            Some(10_000),
            500,
            &budget,
            Duration::from_secs(1),
        )
        .await;
        assert_eq!(claimed.map(|_| ()), Err(BodyError::TooLarge(500)));
    }
}
