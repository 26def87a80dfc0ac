//! `ollama-fleet usage`: who used what, by tenant: from the agents' `/metrics` (counted since
//! each agent started, summed over the agents named), or from Prometheus over a window.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use axum::body::Body;
use serde_json::Value;

use crate::table;

/// Arguments of `usage`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// An agent's HTTP address (its --listen), whose /metrics are read; repeat it for every
    /// node (figures are summed). Counters start at the agent's start.
    #[arg(
        long = "agent",
        value_name = "URL",
        default_value = "http://127.0.0.1:9477",
        conflicts_with = "prometheus"
    )]
    pub agents: Vec<String>,
    /// Read from the Prometheus that scrapes the agents instead, over --window.
    #[arg(long, value_name = "URL", env = "OLLAMA_FLEET_PROMETHEUS")]
    pub prometheus: Option<String>,
    /// The window read from Prometheus (a Prometheus duration: 1h, 7d, 30d).
    #[arg(long, value_name = "DURATION", default_value = "24h")]
    pub window: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// How `usage` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A table.
    Table,
    /// JSON, one object per tenant.
    Json,
}

/// One tenant's usage.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    tenant: String,
    requests: f64,
    ok: f64,
    refused: BTreeMap<String, f64>,
    prompt_tokens: f64,
    generated_tokens: f64,
    ttft_p50_seconds: Option<f64>,
    ttft_p99_seconds: Option<f64>,
    queue_wait_p99_seconds: Option<f64>,
}

/// Runs `usage`.
pub async fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let usage = match &args.prometheus {
        Some(url) => from_prometheus(url, &args.window).await?,
        None => {
            let mut samples = Vec::new();
            for agent in &args.agents {
                samples.extend(scrape(agent).await?);
            }
            from_samples(&samples)
        }
    };
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&usage)?),
        Format::Table => print!("{}", render(&usage)),
    }
    Ok(ExitCode::SUCCESS)
}

async fn get(url: &str) -> anyhow::Result<String> {
    let client = fleet_agent::upstream::client::<Body>(0);
    let req = axum::http::Request::get(url)
        .body(Body::empty())
        .with_context(|| format!("{url}: not a URL"))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .with_context(|| format!("{url}: no answer within 10s"))?
        .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    let body = axum::body::to_bytes(Body::new(resp.into_body()), 64 << 20)
        .await
        .with_context(|| format!("{url}: the answer broke off"))?;
    let text = String::from_utf8_lossy(&body).to_string();
    anyhow::ensure!(
        status.is_success(),
        "{url} answered {status}: {}",
        text.trim()
    );
    Ok(text)
}

async fn scrape(agent: &str) -> anyhow::Result<Vec<fleet_agent::prom::Sample>> {
    let url = format!("{}/metrics", agent.trim_end_matches('/'));
    let text = get(&url).await?;
    fleet_agent::prom::check(&text).map_err(|e| anyhow::anyhow!("{url}: {e}"))
}

/// Sums the tenants' series of one or more expositions.
pub fn from_samples(samples: &[fleet_agent::prom::Sample]) -> Vec<Usage> {
    let mut by: BTreeMap<String, Usage> = BTreeMap::new();
    // Histogram buckets by tenant and family: le -> count.
    let mut buckets: BTreeMap<(String, &str), BTreeMap<String, f64>> = BTreeMap::new();
    for s in samples {
        let Some(tenant) = s.labels.get("tenant") else {
            continue;
        };
        if tenant.is_empty() && s.name != "ollama_fleet_tenant_refusals_total" {
            continue;
        }
        let u = by.entry(tenant.clone()).or_insert_with(|| Usage {
            tenant: tenant.clone(),
            ..Usage::default()
        });
        match s.name.as_str() {
            "ollama_fleet_tenant_requests_total" => {
                u.requests += s.value;
                if s.labels.get("code").is_some_and(|c| c == "200") {
                    u.ok += s.value;
                }
            }
            "ollama_fleet_tenant_refusals_total" => {
                let reason = s.labels.get("reason").cloned().unwrap_or_default();
                *u.refused.entry(reason).or_default() += s.value;
            }
            "ollama_fleet_tenant_prompt_tokens_total" => u.prompt_tokens += s.value,
            "ollama_fleet_tenant_generated_tokens_total" => u.generated_tokens += s.value,
            "ollama_fleet_tenant_time_to_first_token_seconds_bucket"
            | "ollama_fleet_tenant_queue_wait_seconds_bucket" => {
                let family = if s.name.contains("first_token") {
                    "ttft"
                } else {
                    "queue"
                };
                let le = s.labels.get("le").cloned().unwrap_or_default();
                *buckets
                    .entry((tenant.clone(), family))
                    .or_default()
                    .entry(le)
                    .or_default() += s.value;
            }
            _ => {}
        }
    }
    for ((tenant, family), counts) in buckets {
        let mut sorted: Vec<(f64, f64)> = counts
            .iter()
            .map(|(le, n)| (le.parse::<f64>().unwrap_or(f64::INFINITY), *n))
            .collect();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        if let Some(u) = by.get_mut(&tenant) {
            if family == "ttft" {
                u.ttft_p50_seconds = quantile(0.5, &sorted);
                u.ttft_p99_seconds = quantile(0.99, &sorted);
            } else {
                u.queue_wait_p99_seconds = quantile(0.99, &sorted);
            }
        }
    }
    by.into_values().collect()
}

/// A quantile from cumulative buckets `(upper bound, count)`, interpolated inside the bucket
/// as Prometheus' `histogram_quantile` does; `None` without observations.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(upper, count) in buckets {
        if count >= rank {
            if upper.is_infinite() {
                return Some(lower);
            }
            let inside = count - below;
            let share = if inside > 0.0 {
                (rank - below) / inside
            } else {
                0.0
            };
            return Some(lower + (upper - lower) * share);
        }
        lower = upper;
        below = count;
    }
    Some(lower)
}

async fn from_prometheus(url: &str, window: &str) -> anyhow::Result<Vec<Usage>> {
    anyhow::ensure!(
        !window.is_empty() && window.chars().all(|c| c.is_ascii_alphanumeric()),
        "--window {window:?}: use a Prometheus duration such as 1h, 7d or 30d"
    );
    let base = url.trim_end_matches('/');
    let ask = |query: String| async move {
        let url = format!("{base}/api/v1/query?query={}", encode(&query));
        let text = get(&url).await?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("{url}: not Prometheus JSON"))?;
        anyhow::ensure!(v["status"] == "success", "{url}: {}", v["error"]);
        let rows: Vec<(BTreeMap<String, String>, f64)> = v["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|r| {
                let labels = r["metric"]
                    .as_object()?
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                let value = r["value"][1].as_str()?.parse::<f64>().ok()?;
                Some((labels, if value.is_finite() { value } else { 0.0 }))
            })
            .collect();
        Ok::<_, anyhow::Error>(rows)
    };
    let increase = |m: &str, by: &str| format!("sum by ({by}) (increase({m}[{window}]))");
    let quantile = |q: f64, m: &str| {
        format!("histogram_quantile({q}, sum by (tenant, le) (rate({m}_bucket[{window}])))")
    };
    let requests = ask(increase(
        "ollama_fleet_tenant_requests_total",
        "tenant, code",
    ))
    .await?;
    let refusals = ask(increase(
        "ollama_fleet_tenant_refusals_total",
        "tenant, reason",
    ))
    .await?;
    let prompt = ask(increase(
        "ollama_fleet_tenant_prompt_tokens_total",
        "tenant",
    ))
    .await?;
    let generated = ask(increase(
        "ollama_fleet_tenant_generated_tokens_total",
        "tenant",
    ))
    .await?;
    let ttft = "ollama_fleet_tenant_time_to_first_token_seconds";
    let p50 = ask(quantile(0.5, ttft)).await?;
    let p99 = ask(quantile(0.99, ttft)).await?;
    let queue = ask(quantile(0.99, "ollama_fleet_tenant_queue_wait_seconds")).await?;
    let mut out: BTreeMap<String, Usage> = BTreeMap::new();
    fn at<'a>(
        out: &'a mut BTreeMap<String, Usage>,
        labels: &BTreeMap<String, String>,
    ) -> Option<&'a mut Usage> {
        let tenant = labels.get("tenant").cloned()?;
        Some(out.entry(tenant.clone()).or_insert_with(|| Usage {
            tenant,
            ..Usage::default()
        }))
    }
    for (labels, v) in &requests {
        if let Some(u) = at(&mut out, labels) {
            u.requests += v;
            if labels.get("code").is_some_and(|c| c == "200") {
                u.ok += v;
            }
        }
    }
    for (labels, v) in &refusals {
        if let Some(u) = at(&mut out, labels) {
            let reason = labels.get("reason").cloned().unwrap_or_default();
            *u.refused.entry(reason).or_default() += v;
        }
    }
    for (rows, set) in [
        (
            &prompt,
            (|u: &mut Usage, v| u.prompt_tokens = v) as fn(&mut Usage, f64),
        ),
        (&generated, |u, v| u.generated_tokens = v),
        (&p50, |u, v| u.ttft_p50_seconds = Some(v)),
        (&p99, |u, v| u.ttft_p99_seconds = Some(v)),
        (&queue, |u, v| u.queue_wait_p99_seconds = Some(v)),
    ] {
        for (labels, v) in rows {
            if let Some(u) = at(&mut out, labels) {
                set(u, *v);
            }
        }
    }
    Ok(out.into_values().collect())
}

/// A query string's value, percent-encoded.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The usage table.
pub fn render(usage: &[Usage]) -> String {
    let secs = |v: Option<f64>| v.map_or(String::new(), |s| format!("{:.3}s", s));
    let rows: Vec<Vec<String>> = usage
        .iter()
        .map(|u| {
            let refused: Vec<String> = u
                .refused
                .iter()
                .filter(|(_, n)| **n > 0.0)
                .map(|(r, n)| format!("{r}={n:.0}"))
                .collect();
            vec![
                if u.tenant.is_empty() {
                    "(unknown)".to_string()
                } else {
                    u.tenant.clone()
                },
                format!("{:.0}", u.requests),
                format!("{:.0}", u.ok),
                if refused.is_empty() {
                    "0".to_string()
                } else {
                    refused.join(",")
                },
                format!("{:.0}", u.prompt_tokens),
                format!("{:.0}", u.generated_tokens),
                secs(u.ttft_p50_seconds),
                secs(u.ttft_p99_seconds),
                secs(u.queue_wait_p99_seconds),
            ]
        })
        .collect();
    table::render(
        &[
            "TENANT",
            "REQUESTS",
            "OK",
            "REFUSED",
            "PROMPT-TOKENS",
            "GENERATED-TOKENS",
            "TTFT-P50",
            "TTFT-P99",
            "QUEUE-P99",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let b = [
            (0.1, 0.0),
            (0.5, 50.0),
            (1.0, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert_eq!(quantile(0.5, &b), Some(0.5));
        assert!((quantile(0.25, &b).expect("q") - 0.3).abs() < 1e-9);
        assert_eq!(quantile(0.5, &[(f64::INFINITY, 0.0)]), None);
        assert_eq!(encode("a b{c}"), "a%20b%7Bc%7D");
    }
}
