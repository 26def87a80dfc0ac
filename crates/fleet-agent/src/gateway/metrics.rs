//! What the gateway measures of the traffic (Ollama measures none of it), rendered in the
//! Prometheus text format on the agent's `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use crate::lock;

/// Bucket bounds (seconds) of the latency histograms: 5 ms to 10 min.
const BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

#[derive(Clone, Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{bound}\"}} {}",
                self.counts[i]
            );
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Debug, Default)]
struct PerFleet {
    requests: BTreeMap<(String, u16), u64>,
    duration: Histogram,
    ttft: Histogram,
    queue_wait: Histogram,
    prompt_tokens: u64,
    generated_tokens: u64,
    reloads: u64,
    stalled: u64,
}

/// The gateway's figures, by fleet.
#[derive(Debug, Default)]
pub struct Metrics {
    fleets: Mutex<BTreeMap<String, PerFleet>>,
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
}

/// A histogram's name, help, and where it is kept.
type HistogramOf = (&'static str, &'static str, fn(&PerFleet) -> &Histogram);

/// A counter's name, help, and its value.
type CounterOf = (&'static str, &'static str, fn(&PerFleet) -> u64);

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Records a finished request of `fleet` (empty: matched no fleet).
    pub fn record(&self, fleet: &str, s: &Sample) {
        let mut fleets = lock(&self.fleets);
        let f = fleets.entry(fleet.to_string()).or_default();
        *f.requests.entry((s.route.to_string(), s.code)).or_default() += 1;
        f.duration.observe(s.duration.as_secs_f64());
        if let Some(t) = s.ttft {
            f.ttft.observe(t.as_secs_f64());
        }
        f.queue_wait.observe(s.queue_wait.as_secs_f64());
        f.prompt_tokens += s.prompt_tokens;
        f.generated_tokens += s.generated_tokens;
        f.reloads += u64::from(s.reload);
        f.stalled += u64::from(s.stalled);
    }

    /// Counts a request the watchdog aborted before any byte reached the client (it is
    /// retried elsewhere, and counted once by the answer it finally gets).
    pub fn stalled(&self, fleet: &str) {
        lock(&self.fleets)
            .entry(fleet.to_string())
            .or_default()
            .stalled += 1;
    }

    /// Appends the exposition: these figures, plus the queue depths, requests in flight and
    /// per-instance counts given.
    pub fn render(
        &self,
        out: &mut String,
        queues: &[(String, usize)],
        instances: &[(String, String, u32, u64)],
    ) {
        let fleets = lock(&self.fleets);
        let help = |out: &mut String, name: &str, kind: &str, text: &str| {
            let _ = writeln!(out, "# HELP {name} {text}\n# TYPE {name} {kind}");
        };
        help(
            out,
            "ollama_fleet_requests_total",
            "counter",
            "Requests answered by the gateway.",
        );
        for (fleet, f) in fleets.iter() {
            for ((route, code), n) in &f.requests {
                let _ = writeln!(
                    out,
                    "ollama_fleet_requests_total{{fleet=\"{}\",route=\"{route}\",code=\"{code}\"}} {n}",
                    escape(fleet)
                );
            }
        }
        let histograms: [HistogramOf; 3] = [
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
        for (name, text, get) in histograms {
            help(out, name, "histogram", text);
            for (fleet, f) in fleets.iter().filter(|(f, _)| !f.is_empty()) {
                get(f).render(out, name, &format!("fleet=\"{}\"", escape(fleet)));
            }
        }
        let counters: [CounterOf; 4] = [
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
        ];
        for (name, text, get) in counters {
            help(out, name, "counter", text);
            for (fleet, f) in fleets.iter().filter(|(f, _)| !f.is_empty()) {
                let _ = writeln!(out, "{name}{{fleet=\"{}\"}} {}", escape(fleet), get(f));
            }
        }
        help(
            out,
            "ollama_fleet_queue_depth",
            "gauge",
            "Requests waiting for a free instance, by pool (model).",
        );
        for (pool, n) in queues {
            let _ = writeln!(
                out,
                "ollama_fleet_queue_depth{{fleet=\"{}\"}} {n}",
                escape(pool)
            );
        }
        let mut inflight: BTreeMap<&str, u32> = BTreeMap::new();
        for (fleet, _, n, _) in instances {
            *inflight.entry(fleet).or_default() += n;
        }
        help(
            out,
            "ollama_fleet_inflight_requests",
            "gauge",
            "Requests being answered by instances.",
        );
        for (fleet, n) in inflight {
            let _ = writeln!(
                out,
                "ollama_fleet_inflight_requests{{fleet=\"{}\"}} {n}",
                escape(fleet)
            );
        }
        help(
            out,
            "ollama_fleet_instance_requests_total",
            "counter",
            "Requests sent to each instance.",
        );
        for (fleet, id, _, served) in instances {
            let _ = writeln!(
                out,
                "ollama_fleet_instance_requests_total{{fleet=\"{}\",instance=\"{}\"}} {served}",
                escape(fleet),
                escape(id)
            );
        }
    }
}
