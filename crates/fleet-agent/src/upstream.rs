//! The instances as HTTP peers: the one client setup for everything that talks to them (the
//! Ollama API calls of [`crate::ollama`], the probes, the gateway), and the typed error of a
//! call. An instance is untrusted: every caller bounds what it reads and how long it waits.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// How long connecting to an instance may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long an idle pooled connection is kept: below the servers' own (llama.cpp's server
/// closes idle connections after 5 s), so the gateway seldom sends on a connection the instance
/// is closing (and when it does, it sends again on a fresh one).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// A client to the instances, sending bodies of type `B`.
pub type Client<B> = hyper_util::client::legacy::Client<HttpConnector, B>;

/// A client to the instances: no Nagle delay (answers stream a token at a time), a short
/// connect timeout, idle connections kept for [`IDLE_TIMEOUT`], at most `max_idle_per_host` of
/// them per instance.
pub fn client<B>(max_idle_per_host: usize) -> Client<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(max_idle_per_host)
        .build(connector)
}

/// Why a call to an instance failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The request did not get through (refused, reset, a bad URL).
    #[error("{url}: {reason}")]
    Unreachable {
        /// What was called.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// No complete answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// A stream that went silent.
    #[error("{what} stalled: nothing for {idle:?} (last: {last:?})")]
    Stalled {
        /// The stream (`the pull`).
        what: &'static str,
        /// How long it was silent.
        idle: Duration,
        /// The last thing it said.
        last: String,
    },
    /// An answer other than success, with the instance's own words (clipped).
    #[error("HTTP {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// Ollama's `error`, or the body's text.
        message: String,
    },
    /// An answer that breaks the protocol: too large, a line too long, not JSON, a stream that
    /// ends without its final word.
    #[error("{0}")]
    Invalid(String),
    /// Ollama refused in its own words (an `error` line of a stream), or did not do what it
    /// said (a model `/api/ps` does not list after a load).
    #[error("{0}")]
    Refused(String),
}

impl CallError {
    /// The error of a non-success answer: Ollama's `{"error": ...}`, else the body's text.
    pub fn status(status: u16, body: &[u8]) -> CallError {
        let text = String::from_utf8_lossy(body);
        let message = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| text.trim().to_string());
        CallError::Status {
            status,
            message: fleet_api::clip(&message, 512).into_owned(),
        }
    }

    /// An answer that is not the JSON expected.
    pub fn json(e: &serde_json::Error) -> CallError {
        CallError::Invalid(format!("not the JSON expected: {e}"))
    }
}

/// Whether a call failed on a connection that was there (taken from the pool) and closed before
/// the instance answered anything: the instance closed it while idle, so it never got the
/// request, which may go again on a fresh connection.
pub fn never_reached(e: &hyper_util::client::legacy::Error) -> bool {
    if e.is_connect() {
        return false;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            return h.is_canceled() || h.is_incomplete_message() || h.is_closed();
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
            );
        }
        source = s.source();
    }
    false
}

/// Sends the request `make` builds on `pooled`; when its pooled connection turned out closed
/// ([`never_reached`]), once more on `fresh` (a client that keeps no connection).
pub async fn send<B>(
    pooled: &Client<B>,
    fresh: &Client<B>,
    make: impl Fn() -> hyper::Request<B>,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match pooled.request(make()).await {
        Err(e) if never_reached(&e) => {
            tracing::debug!(error = %e, "a pooled connection was gone; sending again on a fresh one");
            fresh.request(make()).await
        }
        other => other,
    }
}
