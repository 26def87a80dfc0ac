//! What the gateway measures of the traffic (Ollama measures none of it), exposed on the
//! agent's `/metrics` through [`crate::prom`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::lock;
use crate::prom::{Exposition, Histogram, Kind};

use super::limits::Reason;
use super::pool::InstanceLoad;

/// The series of `ollama_fleet_requests_total` within a fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RequestKey {
    /// The route (`/api/generate`, ...).
    pub route: &'static str,
    /// The status sent to the client.
    pub code: u16,
}

#[derive(Debug, Default)]
struct PerFleet {
    requests: BTreeMap<RequestKey, u64>,
    duration: Histogram,
    ttft: Histogram,
    queue_wait: Histogram,
    prompt_tokens: u64,
    generated_tokens: u64,
    reloads: u64,
    stalled: u64,
    affinity_hits: u64,
    affinity_misses: u64,
    cached_tokens: u64,
}

/// A tenant's figures (its name comes from the keys file, never from a request).
#[derive(Debug, Default)]
struct PerTenant {
    /// By fleet (`""`: matched none) and status.
    requests: BTreeMap<(String, u16), u64>,
    /// By fleet: prompt and generated tokens.
    tokens: BTreeMap<String, (u64, u64)>,
    ttft: Histogram,
    queue_wait: Histogram,
    refusals: BTreeMap<Reason, u64>,
}

/// The gateway's figures, by fleet (`""`: requests that matched no fleet), and by tenant.
#[derive(Debug, Default)]
pub struct Metrics {
    fleets: Mutex<BTreeMap<String, PerFleet>>,
    tenants: Mutex<BTreeMap<Arc<str>, PerTenant>>,
}

/// What the tenants' gauges show now.
#[derive(Debug, Default)]
pub struct TenantsNow {
    /// The tenants of the keys file (each has its series, used or not).
    pub known: Vec<String>,
    /// Requests in progress (waiting or answered), by tenant.
    pub in_flight: Vec<(String, u32)>,
    /// Requests waiting for an instance, by tenant.
    pub waiting: BTreeMap<Arc<str>, usize>,
    /// The nodes each limit is shared by.
    pub nodes: u32,
}

/// One finished request, as measured.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// The route (`/api/generate`, ...).
    pub route: &'static str,
    /// The status sent to the client.
    pub code: u16,
    /// From arrival to the last byte.
    pub duration: Duration,
    /// From arrival to the first response byte, when one came.
    pub ttft: Option<Duration>,
    /// Time waiting in the queue.
    pub queue_wait: Duration,
    /// `prompt_eval_count`.
    pub prompt_tokens: u64,
    /// `eval_count`.
    pub generated_tokens: u64,
    /// The instance loaded the model again (`load_duration` above zero on a warm instance).
    pub reload: bool,
    /// The watchdog aborted it.
    pub stalled: bool,
    /// When the gateway knew the conversation's instance: whether the request went there.
    pub affinity_hit: Option<bool>,
    /// Prompt tokens the instance held of the conversation (served from its cache).
    pub cached_tokens: u64,
    /// The caller's tenant, when it has one.
    pub tenant: Option<Arc<str>>,
}

/// A histogram's name, help, and where it is kept.
type HistogramOf = (&'static str, &'static str, fn(&PerFleet) -> &Histogram);

/// A tenant's token counter: name, help, and which of (prompt, generated).
type TokensOf = (&'static str, &'static str, fn(&(u64, u64)) -> u64);

/// A tenant's histogram: name, help, and where it is kept.
type TenantHistogramOf = (&'static str, &'static str, fn(&PerTenant) -> &Histogram);

/// A counter's name, help, and its value.
type CounterOf = (&'static str, &'static str, fn(&PerFleet) -> u64);

const HISTOGRAMS: [HistogramOf; 3] = [
    (
        "ollama_fleet_request_duration_seconds",
        "From a request's arrival to its last response byte.",
        |f| &f.duration,
    ),
    (
        "ollama_fleet_time_to_first_token_seconds",
        "From a request's arrival to its first response byte.",
        |f| &f.ttft,
    ),
    (
        "ollama_fleet_queue_wait_seconds",
        "Time requests waited for a free instance.",
        |f| &f.queue_wait,
    ),
];

const COUNTERS: [CounterOf; 7] = [
    (
        "ollama_fleet_prompt_tokens_total",
        "Prompt tokens evaluated (prompt_eval_count).",
        |f| f.prompt_tokens,
    ),
    (
        "ollama_fleet_generated_tokens_total",
        "Tokens generated (eval_count).",
        |f| f.generated_tokens,
    ),
    (
        "ollama_fleet_model_reloads_total",
        "Responses of warm instances that loaded the model again.",
        |f| f.reloads,
    ),
    (
        "ollama_fleet_stalled_requests_total",
        "Requests the watchdog aborted.",
        |f| f.stalled,
    ),
    (
        "ollama_fleet_affinity_hits_total",
        "Turns of a known conversation sent to the instance that holds it.",
        |f| f.affinity_hits,
    ),
    (
        "ollama_fleet_affinity_misses_total",
        "Turns of a known conversation sent elsewhere (its instance was busy for longer than a prefill, or gone).",
        |f| f.affinity_misses,
    ),
    (
        "ollama_fleet_prompt_cached_tokens_total",
        "Prompt tokens the instance held of the conversation (not evaluated again).",
        |f| f.cached_tokens,
    ),
];

impl Metrics {
    /// Records a finished request of `fleet` (empty: matched no fleet).
    pub fn record(&self, fleet: &str, s: &Sample) {
        let mut fleets = lock(&self.fleets);
        let f = fleets.entry(fleet.to_string()).or_default();
        let key = RequestKey {
            route: s.route,
            code: s.code,
        };
        *f.requests.entry(key).or_default() += 1;
        f.duration.observe(s.duration.as_secs_f64());
        if let Some(t) = s.ttft {
            f.ttft.observe(t.as_secs_f64());
        }
        f.queue_wait.observe(s.queue_wait.as_secs_f64());
        f.prompt_tokens += s.prompt_tokens;
        f.generated_tokens += s.generated_tokens;
        f.reloads += u64::from(s.reload);
        f.stalled += u64::from(s.stalled);
        match s.affinity_hit {
            Some(true) => f.affinity_hits += 1,
            Some(false) => f.affinity_misses += 1,
            None => {}
        }
        f.cached_tokens += s.cached_tokens;
        drop(fleets);
        if let Some(tenant) = &s.tenant {
            let mut tenants = lock(&self.tenants);
            let t = tenants.entry(tenant.clone()).or_default();
            *t.requests.entry((fleet.to_string(), s.code)).or_default() += 1;
            if !fleet.is_empty() {
                let tokens = t.tokens.entry(fleet.to_string()).or_default();
                tokens.0 += s.prompt_tokens;
                tokens.1 += s.generated_tokens;
                if let Some(ttft) = s.ttft {
                    t.ttft.observe(ttft.as_secs_f64());
                }
                t.queue_wait.observe(s.queue_wait.as_secs_f64());
            }
        }
    }

    /// Counts a request of `tenant` (`""`: no known key) refused for `reason`.
    pub fn refused(&self, tenant: &str, reason: Reason) {
        let mut tenants = lock(&self.tenants);
        let t = tenants.entry(Arc::from(tenant)).or_default();
        *t.refusals.entry(reason).or_default() += 1;
    }

    /// Adds the tenants' figures to `out`.
    pub fn expose_tenants(&self, out: &mut Exposition, now: &TenantsNow) {
        let mut tenants = lock(&self.tenants);
        for known in &now.known {
            tenants.entry(Arc::from(known.as_str())).or_default();
        }
        let name = "ollama_fleet_tenant_requests_total";
        out.family(
            name,
            Kind::Counter,
            "Requests answered, by tenant (keys file), fleet and status.",
        );
        for (tenant, t) in tenants.iter() {
            for ((fleet, code), n) in &t.requests {
                let code = code.to_string();
                let labels = [("tenant", &**tenant), ("fleet", fleet), ("code", &code)];
                out.sample(name, &labels, *n as f64);
            }
        }
        let token_families: [TokensOf; 2] = [
            (
                "ollama_fleet_tenant_prompt_tokens_total",
                "Prompt tokens, by tenant and fleet.",
                |t| t.0,
            ),
            (
                "ollama_fleet_tenant_generated_tokens_total",
                "Generated tokens, by tenant and fleet.",
                |t| t.1,
            ),
        ];
        for (name, help, get) in token_families {
            out.family(name, Kind::Counter, help);
            for (tenant, t) in tenants.iter() {
                for (fleet, tokens) in &t.tokens {
                    let labels = [("tenant", &**tenant), ("fleet", fleet.as_str())];
                    out.sample(name, &labels, get(tokens) as f64);
                }
            }
        }
        let histograms: [TenantHistogramOf; 2] = [
            (
                "ollama_fleet_tenant_time_to_first_token_seconds",
                "From a request's arrival to its first response byte, by tenant.",
                |t| &t.ttft,
            ),
            (
                "ollama_fleet_tenant_queue_wait_seconds",
                "Time requests waited for a free instance, by tenant.",
                |t| &t.queue_wait,
            ),
        ];
        for (name, help, get) in histograms {
            out.family(name, Kind::Histogram, help);
            for (tenant, t) in tenants.iter().filter(|(t, _)| !t.is_empty()) {
                out.histogram(name, &[("tenant", tenant)], get(t));
            }
        }
        let name = "ollama_fleet_tenant_refusals_total";
        out.family(name, Kind::Counter, "Requests refused, by tenant (\"\": no known key) and reason: unauthorized (401), model (403), concurrency, requests, tokens (429), busy (503).");
        for (tenant, t) in tenants.iter() {
            for reason in Reason::ALL {
                let n = t.refusals.get(&reason).copied().unwrap_or(0);
                if n > 0 || !tenant.is_empty() {
                    let labels = [("tenant", &**tenant), ("reason", reason.as_str())];
                    out.sample(name, &labels, n as f64);
                }
            }
        }
        drop(tenants);
        // Every tenant of the keys file has its gauges, at 0 when idle.
        let mut in_flight: BTreeMap<&str, f64> =
            now.known.iter().map(|t| (t.as_str(), 0.0)).collect();
        for (tenant, n) in &now.in_flight {
            *in_flight.entry(tenant.as_str()).or_default() += f64::from(*n);
        }
        let name = "ollama_fleet_tenant_inflight_requests";
        let help = "Requests in progress (waiting or answered), by tenant.";
        out.family(name, Kind::Gauge, help);
        for (tenant, n) in in_flight {
            out.sample(name, &[("tenant", tenant)], n);
        }
        let mut waiting: BTreeMap<&str, f64> =
            now.known.iter().map(|t| (t.as_str(), 0.0)).collect();
        for (tenant, n) in &now.waiting {
            *waiting.entry(&**tenant).or_default() += *n as f64;
        }
        let name = "ollama_fleet_tenant_queue_depth";
        let help = "Requests waiting for a free instance, by tenant.";
        out.family(name, Kind::Gauge, help);
        for (tenant, n) in waiting {
            out.sample(name, &[("tenant", tenant)], n);
        }
        let name = "ollama_fleet_gateway_nodes";
        out.family(
            name,
            Kind::Gauge,
            "Nodes serving the gateway that share each tenant limit (a node takes limit / nodes).",
        );
        out.sample(name, &[], f64::from(now.nodes));
    }

    /// Counts a request the watchdog aborted before any byte reached the client (it is
    /// retried elsewhere, and counted once by the answer it finally gets).
    pub fn stalled(&self, fleet: &str) {
        lock(&self.fleets)
            .entry(fleet.to_string())
            .or_default()
            .stalled += 1;
    }

    /// Adds these figures to `out`, with the queue depths by pool and each instance's load.
    pub fn expose(&self, out: &mut Exposition, queues: &[(String, usize)], loads: &[InstanceLoad]) {
        let fleets = lock(&self.fleets);
        let name = "ollama_fleet_requests_total";
        out.family(name, Kind::Counter, "Requests answered by the gateway.");
        for (fleet, f) in fleets.iter() {
            for (key, n) in &f.requests {
                let code = key.code.to_string();
                let labels = [
                    ("fleet", fleet.as_str()),
                    ("route", key.route),
                    ("code", &code),
                ];
                out.sample(name, &labels, *n as f64);
            }
        }
        // Requests that matched no fleet count in requests_total only.
        let matched = || fleets.iter().filter(|(f, _)| !f.is_empty());
        for (name, help, get) in HISTOGRAMS {
            out.family(name, Kind::Histogram, help);
            for (fleet, f) in matched() {
                out.histogram(name, &[("fleet", fleet)], get(f));
            }
        }
        for (name, help, get) in COUNTERS {
            out.family(name, Kind::Counter, help);
            for (fleet, f) in matched() {
                out.sample(name, &[("fleet", fleet)], get(f) as f64);
            }
        }
        let name = "ollama_fleet_queue_depth";
        let help = "Requests waiting for a free instance, by pool (model).";
        out.family(name, Kind::Gauge, help);
        for (pool, n) in queues {
            out.sample(name, &[("fleet", pool)], *n as f64);
        }
        let mut inflight: BTreeMap<&str, u32> = BTreeMap::new();
        for l in loads {
            *inflight.entry(&l.fleet).or_default() += l.in_flight;
        }
        let name = "ollama_fleet_inflight_requests";
        out.family(name, Kind::Gauge, "Requests being answered by instances.");
        for (fleet, n) in inflight {
            out.sample(name, &[("fleet", fleet)], f64::from(n));
        }
        let name = "ollama_fleet_instance_requests_total";
        out.family(name, Kind::Counter, "Requests sent to each instance.");
        for l in loads {
            let labels = [("fleet", l.fleet.as_str()), ("instance", &l.id)];
            out.sample(name, &labels, l.served as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family the gateway exposes renders, and reads back as Prometheus would read it.
    #[test]
    fn the_gateways_metrics_render_and_parse() {
        let m = Metrics::default();
        let sample = |route, code, ttft| Sample {
            route,
            code,
            duration: Duration::from_millis(1500),
            ttft,
            queue_wait: Duration::from_millis(20),
            prompt_tokens: 3,
            generated_tokens: 7,
            reload: code == 200,
            stalled: code == 504,
            affinity_hit: (code == 200).then_some(ttft.is_some()),
            cached_tokens: 5,
            tenant: Some(Arc::from("editors")),
        };
        m.record(
            "a",
            &sample("/api/generate", 200, Some(Duration::from_millis(80))),
        );
        m.record("a", &sample("/api/generate", 200, None));
        m.record("a", &sample("/v1/chat/completions", 504, None));
        m.record("", &sample("/api/chat", 404, None));
        m.stalled("b");
        let loads = [InstanceLoad {
            fleet: "a".into(),
            id: "a-0-abc123".into(),
            in_flight: 1,
            served: 3,
        }];
        m.refused("", Reason::Unauthorized);
        m.refused("etl", Reason::Tokens);
        let mut out = Exposition::new();
        m.expose(&mut out, &[("a".into(), 2)], &loads);
        let now = TenantsNow {
            known: vec!["editors".into(), "etl".into(), "idle".into()],
            in_flight: vec![("editors".into(), 4)],
            waiting: BTreeMap::from([(Arc::from("etl"), 7)]),
            nodes: 3,
        };
        m.expose_tenants(&mut out, &now);
        let text = out.finish();
        let samples = crate::prom::check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let value = |name: &str, labels: &[(&str, &str)]| {
            samples
                .iter()
                .filter(|s| s.name == name)
                .find(|s| {
                    labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
                })
                .map(|s| s.value)
        };
        let generate = [("fleet", "a"), ("route", "/api/generate"), ("code", "200")];
        assert_eq!(value("ollama_fleet_requests_total", &generate), Some(2.0));
        let unmatched = [("fleet", ""), ("code", "404")];
        assert_eq!(value("ollama_fleet_requests_total", &unmatched), Some(1.0));
        let a = [("fleet", "a")];
        assert_eq!(
            value("ollama_fleet_time_to_first_token_seconds_count", &a),
            Some(1.0)
        );
        assert_eq!(
            value("ollama_fleet_request_duration_seconds_count", &a),
            Some(3.0)
        );
        assert_eq!(value("ollama_fleet_generated_tokens_total", &a), Some(21.0));
        assert_eq!(value("ollama_fleet_model_reloads_total", &a), Some(2.0));
        assert_eq!(
            value("ollama_fleet_stalled_requests_total", &[("fleet", "b")]),
            Some(1.0)
        );
        assert_eq!(value("ollama_fleet_queue_depth", &a), Some(2.0));
        assert_eq!(value("ollama_fleet_inflight_requests", &a), Some(1.0));
        let instance = [("instance", "a-0-abc123")];
        assert_eq!(
            value("ollama_fleet_instance_requests_total", &instance),
            Some(3.0)
        );
        assert_eq!(
            value(
                "ollama_fleet_request_duration_seconds_count",
                &[("fleet", "")]
            ),
            None,
            "requests that matched no fleet count in requests_total only"
        );
        let editors = [("tenant", "editors")];
        let ok = [("tenant", "editors"), ("fleet", "a"), ("code", "200")];
        assert_eq!(value("ollama_fleet_tenant_requests_total", &ok), Some(2.0));
        let nowhere = [("tenant", "editors"), ("fleet", ""), ("code", "404")];
        assert_eq!(
            value("ollama_fleet_tenant_requests_total", &nowhere),
            Some(1.0)
        );
        let tokens = [("tenant", "editors"), ("fleet", "a")];
        assert_eq!(
            value("ollama_fleet_tenant_generated_tokens_total", &tokens),
            Some(21.0)
        );
        assert_eq!(
            value("ollama_fleet_tenant_prompt_tokens_total", &tokens),
            Some(9.0)
        );
        assert_eq!(
            value(
                "ollama_fleet_tenant_time_to_first_token_seconds_count",
                &editors
            ),
            Some(1.0)
        );
        assert_eq!(
            value("ollama_fleet_tenant_queue_wait_seconds_count", &editors),
            Some(3.0)
        );
        let refusals = |tenant, reason| {
            value(
                "ollama_fleet_tenant_refusals_total",
                &[("tenant", tenant), ("reason", reason)],
            )
        };
        assert_eq!(refusals("", "unauthorized"), Some(1.0));
        assert_eq!(refusals("etl", "tokens"), Some(1.0));
        assert_eq!(
            refusals("idle", "busy"),
            Some(0.0),
            "a known tenant's series start at 0"
        );
        assert_eq!(
            refusals("", "busy"),
            None,
            "no zero series for unknown callers"
        );
        assert_eq!(
            value("ollama_fleet_tenant_inflight_requests", &editors),
            Some(4.0)
        );
        let etl = [("tenant", "etl")];
        assert_eq!(value("ollama_fleet_tenant_queue_depth", &etl), Some(7.0));
        let idle = [("tenant", "idle")];
        assert_eq!(value("ollama_fleet_tenant_queue_depth", &idle), Some(0.0));
        assert_eq!(
            value("ollama_fleet_tenant_inflight_requests", &idle),
            Some(0.0)
        );
        assert_eq!(value("ollama_fleet_gateway_nodes", &[]), Some(3.0));
    }
}
