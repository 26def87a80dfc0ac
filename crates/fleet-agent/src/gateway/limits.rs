//! How much each key and tenant uses, against its limits (the keys file): requests at once,
//! requests per minute, tokens per minute.
//!
//! Rates are token buckets holding a minute's worth, refilled evenly: a burst of a minute's
//! requests is let in, then one as each refills. Tokens are counted when an answer ends (its
//! prompt and generated tokens); a request is let in while the bucket is above zero, so one
//! large answer may take it below, and the tenant waits until it is refilled. Limits hold for
//! the cluster: each node takes its share, the limit divided by the nodes serving the gateway
//! ([`Ledger::set_nodes`]), rates exactly, requests at once rounded up (at most `nodes - 1`
//! more across the cluster when a tenant's requests all land on some nodes).
//!
//! No clock is read here: every call takes `now`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_runtime::clock::Instant;

use super::auth::Caller;
use crate::lock;

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// No key, or an unknown one (401).
    Unauthorized,
    /// A model the key may not use (403).
    Model,
    /// Too many requests at once (429).
    Concurrency,
    /// Too many requests per minute (429).
    Requests,
    /// Too many tokens per minute (429).
    Tokens,
    /// The pool's queue was full or the wait ran out (503).
    Busy,
}

impl Reason {
    /// Its name in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unauthorized => "unauthorized",
            Reason::Model => "model",
            Reason::Concurrency => "concurrency",
            Reason::Requests => "requests",
            Reason::Tokens => "tokens",
            Reason::Busy => "busy",
        }
    }

    /// Every reason, in order.
    pub const ALL: [Reason; 6] = [
        Reason::Unauthorized,
        Reason::Model,
        Reason::Concurrency,
        Reason::Requests,
        Reason::Tokens,
        Reason::Busy,
    ];
}

/// A request over a limit: which, whose, and when to try again.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    /// The limit.
    pub reason: Reason,
    /// Whose limit: `key NAME` or `tenant NAME`.
    pub whose: String,
    /// The limit's value on this node.
    pub limit: f64,
    /// When a request may come in again (at least a second).
    pub retry_after: Duration,
}

impl Refusal {
    /// What the client is told.
    pub fn message(&self) -> String {
        let secs = self.retry_after.as_secs();
        let limit = self.limit;
        match self.reason {
            Reason::Concurrency => format!(
                "rate limit: {} has {limit:.0} requests in progress on this node, its limit; try again in {secs}s",
                self.whose
            ),
            Reason::Requests => format!(
                "rate limit: {} sent {limit:.0} requests in the last minute on this node, its limit; try again in {secs}s",
                self.whose
            ),
            _ => format!(
                "rate limit: {} used its {limit:.0} tokens per minute on this node; try again in {secs}s",
                self.whose
            ),
        }
    }
}

/// A rate as a bucket holding a minute's worth.
#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// The level when last seen (may be below zero after a large answer).
    level: f64,
    at: Option<Instant>,
}

impl Bucket {
    /// The level at `now`, for a rate of `per_minute`.
    fn level(&mut self, per_minute: f64, now: Instant) -> f64 {
        self.level = match self.at {
            None => per_minute,
            Some(at) => {
                let refill = now.saturating_duration_since(at).as_secs_f64() * per_minute / 60.0;
                (self.level + refill).min(per_minute)
            }
        };
        self.at = Some(now);
        self.level
    }

    /// How long until the level reaches `want` at `per_minute`.
    fn wait_for(&self, want: f64, per_minute: f64) -> Duration {
        let missing = (want - self.level).max(0.0);
        Duration::from_secs_f64(missing * 60.0 / per_minute.max(f64::MIN_POSITIVE))
    }
}

/// A key's limits, or its tenant's.
#[derive(Clone, Copy, Debug)]
enum Scope {
    Key,
    Tenant,
}

/// What one key or tenant uses.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    in_flight: u32,
    requests: Bucket,
    tokens: Bucket,
}

#[derive(Debug, Default)]
struct State {
    keys: HashMap<String, Usage>,
    tenants: HashMap<String, Usage>,
}

/// The node's usage of every key and tenant.
#[derive(Clone, Debug)]
pub struct Ledger {
    state: Arc<Mutex<State>>,
    /// The nodes that share each limit (this one included).
    nodes: Arc<AtomicU32>,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            state: Arc::default(),
            nodes: Arc::new(AtomicU32::new(1)),
        }
    }
}

/// A request let in: it counts as in progress until dropped, and is charged its tokens.
#[derive(Debug)]
pub struct Ticket {
    ledger: Ledger,
    caller: Arc<Caller>,
}

impl Ticket {
    /// Charges the answer's tokens at `now`.
    pub fn charge(&self, tokens: u64, now: Instant) {
        if tokens == 0 {
            return;
        }
        let share = self.ledger.share();
        let mut s = lock(&self.ledger.state);
        let State { keys, tenants } = &mut *s;
        let c = &self.caller;
        let scopes = [
            (keys.entry(c.key.clone()).or_default(), c.key_limits),
            (
                tenants.entry(c.tenant.clone()).or_default(),
                c.tenant_limits,
            ),
        ];
        for (usage, limits) in scopes {
            if let Some(per_minute) = limits.tokens_per_minute {
                let per_minute = per_minute as f64 / share;
                usage.tokens.level(per_minute, now);
                usage.tokens.level -= tokens as f64;
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = lock(&self.ledger.state);
        let c = &self.caller;
        if let Some(u) = s.keys.get_mut(&c.key) {
            u.in_flight = u.in_flight.saturating_sub(1);
        }
        if let Some(u) = s.tenants.get_mut(&c.tenant) {
            u.in_flight = u.in_flight.saturating_sub(1);
        }
    }
}

impl Ledger {
    /// Sets how many nodes share each limit (at least 1).
    pub fn set_nodes(&self, nodes: u32) {
        self.nodes.store(nodes.max(1), Ordering::Relaxed);
    }

    /// The nodes sharing each limit.
    pub fn nodes(&self) -> u32 {
        self.nodes.load(Ordering::Relaxed)
    }

    fn share(&self) -> f64 {
        f64::from(self.nodes())
    }

    /// Requests in progress, by tenant.
    pub fn in_flight(&self) -> Vec<(String, u32)> {
        let s = lock(&self.state);
        s.tenants
            .iter()
            .map(|(t, u)| (t.clone(), u.in_flight))
            .collect()
    }

    /// Lets a request of `caller` in at `now`, or says which limit it is over.
    pub fn admit(&self, caller: &Arc<Caller>, now: Instant) -> Result<Ticket, Refusal> {
        let nodes = self.nodes();
        let share = self.share();
        let mut s = lock(&self.state);
        let State { keys, tenants } = &mut *s;
        let key = keys.entry(caller.key.clone()).or_default();
        let tenant = tenants.entry(caller.tenant.clone()).or_default();
        let mut scopes = [
            (Scope::Key, caller.key_limits, key),
            (Scope::Tenant, caller.tenant_limits, tenant),
        ];
        for (scope, limits, usage) in &mut scopes {
            let whose = || match scope {
                Scope::Key => format!("key {}", caller.key),
                Scope::Tenant => format!("tenant {}", caller.tenant),
            };
            if let Some(limit) = limits.concurrency {
                let limit = limit.div_ceil(nodes).max(1);
                if usage.in_flight >= limit {
                    return Err(Refusal {
                        reason: Reason::Concurrency,
                        whose: whose(),
                        limit: f64::from(limit),
                        retry_after: Duration::from_secs(1),
                    });
                }
            }
            if let Some(per_minute) = limits.requests_per_minute {
                let per_minute = f64::from(per_minute) / share;
                if usage.requests.level(per_minute, now) < 1.0 {
                    return Err(Refusal {
                        reason: Reason::Requests,
                        whose: whose(),
                        limit: per_minute,
                        retry_after: seconds(usage.requests.wait_for(1.0, per_minute)),
                    });
                }
            }
            if let Some(per_minute) = limits.tokens_per_minute {
                let per_minute = per_minute as f64 / share;
                if usage.tokens.level(per_minute, now) <= 0.0 {
                    return Err(Refusal {
                        reason: Reason::Tokens,
                        whose: whose(),
                        limit: per_minute,
                        retry_after: seconds(usage.tokens.wait_for(1.0, per_minute)),
                    });
                }
            }
        }
        for (_, limits, usage) in &mut scopes {
            usage.in_flight += 1;
            if limits.requests_per_minute.is_some() {
                usage.requests.level -= 1.0;
            }
        }
        Ok(Ticket {
            ledger: self.clone(),
            caller: caller.clone(),
        })
    }
}

/// A wait as `Retry-After` gives it: whole seconds, at least one.
fn seconds(wait: Duration) -> Duration {
    Duration::from_secs(wait.as_secs_f64().ceil().max(1.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_api::keys::Limits;

    fn caller(key: Limits, tenant: Limits) -> Arc<Caller> {
        Arc::new(Caller {
            key: "k".into(),
            tenant: "t".into(),
            key_limits: key,
            tenant_limits: tenant,
            ..Caller::default()
        })
    }

    #[test]
    fn requests_at_once_count_until_the_ticket_is_dropped() {
        let ledger = Ledger::default();
        let now = Instant::now();
        let limits = Limits {
            concurrency: Some(2),
            ..Limits::default()
        };
        let c = caller(Limits::default(), limits);
        let one = ledger.admit(&c, now).expect("1st");
        let _two = ledger.admit(&c, now).expect("2nd");
        let refused = ledger.admit(&c, now).expect_err("3rd");
        assert_eq!(
            (refused.reason, refused.whose.as_str(), refused.limit),
            (Reason::Concurrency, "tenant t", 2.0)
        );
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        drop(one);
        assert!(ledger.admit(&c, now).is_ok(), "a place freed");
    }

    /// A minute's requests at once, then one per refill; the key's own limit counts first.
    #[test]
    fn requests_per_minute_refill_evenly() {
        let ledger = Ledger::default();
        let t0 = Instant::now();
        let key = Limits {
            requests_per_minute: Some(6),
            ..Limits::default()
        };
        let c = caller(key, Limits::default());
        for _ in 0..6 {
            drop(ledger.admit(&c, t0).expect("within the minute's burst"));
        }
        let refused = ledger.admit(&c, t0).expect_err("7th");
        assert_eq!(
            (refused.reason, refused.whose.as_str()),
            (Reason::Requests, "key k")
        );
        assert_eq!(refused.retry_after, Duration::from_secs(10), "one per 10 s");
        assert!(ledger.admit(&c, t0 + Duration::from_secs(9)).is_err());
        assert!(ledger.admit(&c, t0 + Duration::from_secs(10)).is_ok());
    }

    /// Tokens are charged when the answer ends; the bucket may go below zero, and the tenant
    /// waits until it is above again.
    #[test]
    fn tokens_are_charged_after_the_answer() {
        let ledger = Ledger::default();
        let t0 = Instant::now();
        let tenant = Limits {
            tokens_per_minute: Some(600),
            ..Limits::default()
        };
        let c = caller(Limits::default(), tenant);
        let ticket = ledger.admit(&c, t0).expect("first");
        ticket.charge(1200, t0);
        drop(ticket);
        let refused = ledger.admit(&c, t0).expect_err("600 below zero");
        assert_eq!(refused.reason, Reason::Tokens);
        assert_eq!(
            refused.retry_after,
            Duration::from_secs(61),
            "600 tokens at 10/s, and one more"
        );
        assert!(ledger.admit(&c, t0 + Duration::from_secs(60)).is_err());
        assert!(ledger.admit(&c, t0 + Duration::from_secs(61)).is_ok());
    }

    /// Two nodes: each takes half of a rate, and half of the requests at once rounded up.
    #[test]
    fn each_node_takes_its_share() {
        let ledger = Ledger::default();
        ledger.set_nodes(2);
        let t0 = Instant::now();
        let tenant = Limits {
            concurrency: Some(3),
            requests_per_minute: Some(10),
            ..Limits::default()
        };
        let c = caller(Limits::default(), tenant);
        let held: Vec<Ticket> = (0..2)
            .map(|_| ledger.admit(&c, t0).expect("2 of 3"))
            .collect();
        let refused = ledger.admit(&c, t0).expect_err("3 / 2 rounded up");
        assert_eq!((refused.reason, refused.limit), (Reason::Concurrency, 2.0));
        drop(held);
        for _ in 0..3 {
            drop(ledger.admit(&c, t0).expect("5 a minute here"));
        }
        let refused = ledger.admit(&c, t0).expect_err("the sixth");
        assert_eq!((refused.reason, refused.limit), (Reason::Requests, 5.0));
    }
}
