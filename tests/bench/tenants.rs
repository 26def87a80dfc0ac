//! `--tenants N` (run by `hack/bench-tenants.sh`): N single-slot sim instances behind the
//! agent's gateway with a keys file of four tenants: three interactive ones (editors) at a
//! steady open-loop load, 20% of the pool's capacity each, and one batch tenant. Three runs on
//! the same instances and the same schedule:
//!
//! 1. no flood: the editors alone (the baseline);
//! 2. the flood, with tenants: the batch tenant sends at 3x its share (a quarter of the pool:
//!    75% of capacity) on top, in class `batch`, with the default headroom (one free slot per
//!    pool kept from batch requests while interactive ones come);
//! 3. the same with no headroom (`--serve-batch-headroom 0`: batch requests take every free
//!    slot);
//! 4. the flood, today's single FIFO: the same four keys in one tenant of one class;
//! 5. the batch tenant alone, sending at 150% of capacity: what the pool serves of its work
//!    when nobody else is there.
//!
//! The capacity left to the batch tenant is run 5's throughput times the share of the pool's
//! instance time the editors did not use in run 1 (their requests' fixed cost and tokens at the
//! instances' rate).
//!
//! Each run has an agent of its own (adopting the same instances), so no run inherits the
//! tenants' instance time of the one before.
//!
//! Prints per run and tenant: requests sent, served, refused, TTFT p50/p99; the editors' TTFT
//! p99 against the baseline's (target: within 1.2x with tenants); and the batch tenant's
//! throughput (tokens per second served within the run) against the capacity the editors left.

use std::time::{Duration, Instant};

use fleet_e2e::{World, free_port, free_port_range};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

use crate::serve::{Http, Rng, poisson, quantile, streamed_as};

const MODEL: &str = "smollm2:135m";
const TOKENS_PER_SECOND: f64 = 200.0;
/// Tokens a batch request asks for (a summary, say).
const BATCH_TOKENS: u64 = 100;

const EDITORS: [&str; 3] = ["ed-1", "ed-2", "ed-3"];

/// The tenants' names by index: the editors, then the batch tenant.
const NAMES: [&str; 4] = ["ed-1", "ed-2", "ed-3", "etl"];

fn token(tenant: &str) -> String {
    format!("{tenant}-bench-0123456789abcdef")
}

/// The keys file: four tenants, or (`fifo`) the same keys in one tenant of one class.
fn keys(fifo: bool) -> String {
    let mut text = String::from("tenants:\n");
    if fifo {
        text.push_str("  everyone: {}\n");
    } else {
        for t in EDITORS {
            text.push_str(&format!("  {t}: {{priority: interactive}}\n"));
        }
        text.push_str("  etl: {priority: batch}\n");
    }
    text.push_str("keys:\n");
    for t in EDITORS.iter().chain(&["etl"]) {
        let tenant = if fifo { "everyone" } else { t };
        text.push_str(&format!(
            "  - {{name: {t}, tenant: {tenant}, token: {}}}\n",
            token(t)
        ));
    }
    text
}

/// One request of the schedule.
#[derive(Clone, Copy)]
struct Arrival {
    at: Duration,
    tokens: u64,
    /// Index into the tenants (0-2 editors, 3 the batch tenant).
    tenant: usize,
}

/// Poisson arrivals of `tenant` at `rate` per second for `seconds`; `tokens` picks each size.
fn arrivals(
    tenant: usize,
    rate: f64,
    seconds: f64,
    seed: u64,
    tokens: impl Fn(&mut Rng) -> u64,
) -> Vec<Arrival> {
    poisson(rate, seconds, seed, |at, rng| Arrival {
        at,
        tokens: tokens(rng),
        tenant,
    })
}

/// What one request saw.
#[derive(Clone, Debug, Default)]
struct Outcome {
    tenant: usize,
    ok: bool,
    /// Its status when refused (0: no answer).
    code: u16,
    ttft: Duration,
    /// When it ended, from the run's start.
    ended: Duration,
    tokens: u64,
}

async fn one(client: &Http, url: &str, a: Arrival, start: Instant) -> Outcome {
    let name = if a.tenant < 3 {
        EDITORS[a.tenant]
    } else {
        "etl"
    };
    let body = json!({"model": MODEL, "prompt": "bench", "options": {"num_predict": a.tokens}});
    let auth = format!("Bearer {}", token(name));
    let url = format!("{url}/api/generate");
    let headers = [("authorization", auth.as_str())];
    let answer = streamed_as(client, &url, &headers, &body, Duration::from_secs(180)).await;
    let mut out = Outcome {
        tenant: a.tenant,
        ended: start.elapsed(),
        ..Outcome::default()
    };
    match answer {
        Ok((ttft, lines)) if lines.last().is_some_and(|l| l["done"] == true) => {
            out.ok = true;
            out.code = 200;
            out.ttft = ttft;
            out.tokens = a.tokens;
        }
        Ok(_) => {}
        Err(e) => {
            out.code = e
                .split(':')
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0)
        }
    }
    out
}

async fn run(client: &Http, url: &str, schedule: &[Arrival]) -> Vec<Outcome> {
    let start = Instant::now();
    let tick = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(schedule.len());
    for a in schedule {
        tokio::time::sleep_until(tick + a.at).await;
        let (client, url, a) = (client.clone(), url.to_string(), *a);
        tasks.push(tokio::spawn(
            async move { one(&client, &url, a, start).await },
        ));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap_or_default());
    }
    out
}

fn ms(d: Duration) -> String {
    format!("{:.0}ms", d.as_secs_f64() * 1000.0)
}

/// The benchmark.
pub async fn tenants_bench(n: u32, seconds: f64, headroom: u32) {
    let world = World::new("bench-tenants");
    let base = free_port_range(n as u16 + 2);
    let manifest = world
        .sim_fleet("pool", n, base, "")
        .replace(
            "SIM_LOAD_TIME: 50ms}",
            &format!(
                "SIM_LOAD_TIME: 50ms, SIM_ACCESS_LOG: \"0\", SIM_TOKENS_PER_SECOND: \"{TOKENS_PER_SECOND}\"}}"
            ),
        )
        .replace("resources: {cpus: 0.5,", "resources: {");
    world.cli_ok(&["apply", "-f", "-"], Some(&manifest));
    let file = world.dir.join("keys.yaml");
    std::fs::write(&file, keys(false)).expect("keys");
    let port = free_port();
    let agent = |headroom: u32| {
        world.agent(
            "bench-node",
            &[
                "--serve",
                &format!("127.0.0.1:{port}"),
                "--serve-token-file",
                &file.display().to_string(),
                "--serve-max-queue",
                "4096",
                "--serve-queue-timeout",
                "120s",
                // Every request comes from this one address (as a proxy in front would).
                "--serve-max-connections-per-client",
                "8192",
                "--serve-batch-headroom",
                &headroom.to_string(),
            ],
        )
    };
    let mut running = agent(1);
    world
        .wait_status("pool", "every instance ready", 600, |s| {
            s["readyReplicas"] == u64::from(n)
        })
        .await;
    let url = format!("http://127.0.0.1:{port}");
    fleet_e2e::answers(&url).await;
    let client: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(4096)
        .build_http();

    // An instance's time per request besides its tokens (1-token requests, one at a time).
    let mut fixed = Vec::new();
    for _ in 0..30 {
        let a = Arrival {
            at: Duration::ZERO,
            tokens: 1,
            tenant: 0,
        };
        let started = Instant::now();
        if one(&client, &url, a, started).await.ok {
            fixed.push(started.elapsed());
        }
    }
    let fixed = quantile(fixed, 0.5).as_secs_f64() - 1.0 / TOKENS_PER_SECOND;
    let editor_mean = fixed + (0.9 * 10.0 + 0.1 * 200.0) / TOKENS_PER_SECOND;
    let batch_mean = fixed + BATCH_TOKENS as f64 / TOKENS_PER_SECOND;
    let editor_rate = 0.2 * f64::from(n) / editor_mean;
    let batch_rate = 0.75 * f64::from(n) / batch_mean;
    println!(
        "tenants-bench: {n} single-slot instances at {TOKENS_PER_SECOND} tokens/s ({:.0} ms per request besides tokens); \
         3 editors (interactive) at 20% of capacity each ({editor_rate:.1} req/s, 90% 10 / 10% 200 tokens), \
         a batch tenant flooding at 75% = 3x its share ({batch_rate:.1} req/s of {BATCH_TOKENS} tokens); {seconds}s per run",
        fixed * 1e3
    );
    let editor_size = |rng: &mut Rng| if rng.next() < 0.1 { 200 } else { 10 };
    let mut quiet: Vec<Arrival> = Vec::new();
    for (i, _) in EDITORS.iter().enumerate() {
        quiet.extend(arrivals(
            i,
            editor_rate,
            seconds,
            11 + i as u64,
            editor_size,
        ));
    }
    let mut flood = quiet.clone();
    flood.extend(arrivals(3, batch_rate, seconds, 97, |_| BATCH_TOKENS));
    let alone = arrivals(3, batch_rate * 2.0, seconds, 98, |_| BATCH_TOKENS);
    quiet.sort_by_key(|a| a.at);
    flood.sort_by_key(|a| a.at);
    // Warm the connections and the instances.
    let _ = run(&client, &url, &quiet[..quiet.len().min(40)]).await;

    println!(
        "{:<26} {:<7} {:>6} {:>6} {:>8} {:>9} {:>9} {:>13}",
        "run", "tenant", "sent", "served", "refused", "ttft p50", "ttft p99", "tokens/s"
    );
    let mut p99s = Vec::new();
    let mut editors_share = 0.6;
    let mut batch = Vec::new();
    for (name, fifo, headroom, schedule) in [
        ("no flood (tenants)", false, 1, &quiet),
        ("flood, tenants", false, headroom, &flood),
        ("flood, tenants, headroom 0", false, 0, &flood),
        ("flood, single FIFO", true, 1, &flood),
        ("batch alone (150%)", false, 1, &alone),
    ] {
        running.kill9();
        std::fs::write(&file, keys(fifo)).expect("keys");
        running = agent(headroom);
        fleet_e2e::answers(&url).await;
        let out = run(&client, &url, schedule).await;
        let mut editors_ttft = Vec::new();
        let mut each_p99 = Vec::new();
        for (tenant, tenant_name) in NAMES.iter().enumerate() {
            let mine: Vec<&Outcome> = out.iter().filter(|o| o.tenant == tenant).collect();
            if mine.is_empty() {
                continue;
            }
            let ok: Vec<&&Outcome> = mine.iter().filter(|o| o.ok).collect();
            let ttft: Vec<Duration> = ok.iter().map(|o| o.ttft).collect();
            if tenant < 3 {
                editors_ttft.extend(ttft.iter().copied());
                each_p99.push(quantile(ttft.clone(), 0.99));
            }
            let in_run: u64 = ok
                .iter()
                .filter(|o| o.ended.as_secs_f64() <= seconds)
                .map(|o| o.tokens)
                .sum();
            let tokens_per_second = in_run as f64 / seconds;
            if tenant == 3 {
                batch.push((name, tokens_per_second, ok.len(), mine.len()));
            }
            let mut codes = std::collections::BTreeMap::<u16, usize>::new();
            for o in mine.iter().filter(|o| !o.ok) {
                *codes.entry(o.code).or_default() += 1;
            }
            let refused: Vec<String> = codes.iter().map(|(c, n)| format!("{n}x{c}")).collect();
            let refused = if refused.is_empty() {
                "0".to_string()
            } else {
                refused.join(",")
            };
            println!(
                "{name:<26} {:<7} {:>6} {:>6} {:>8} {:>9} {:>9} {:>13.0}",
                tenant_name,
                mine.len(),
                ok.len(),
                refused,
                ms(quantile(ttft.clone(), 0.5)),
                ms(quantile(ttft, 0.99)),
                tokens_per_second
            );
        }
        if !editors_ttft.is_empty() {
            p99s.push((name, quantile(editors_ttft, 0.99), each_p99));
        }
        if name.starts_with("no flood") {
            // The share of the pool's instance time the editors used.
            let used: f64 = out
                .iter()
                .filter(|o| o.ok && o.ended.as_secs_f64() <= seconds)
                .map(|o| fixed + o.tokens as f64 / TOKENS_PER_SECOND)
                .sum();
            editors_share = used / (f64::from(n) * seconds);
        }
        // Let the backlog drain before the next run.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    drop(running);
    let base = p99s[0].1.as_secs_f64().max(1e-9);
    for (name, p99, each) in &p99s[1..] {
        let per: Vec<String> = each
            .iter()
            .zip(&p99s[0].2)
            .zip(EDITORS)
            .map(|((flood, quiet), ed)| {
                format!(
                    "{ed} {:.2}x",
                    flood.as_secs_f64() / quiet.as_secs_f64().max(1e-9)
                )
            })
            .collect();
        println!(
            "editors' TTFT p99, {name}{}: {} = {:.2}x the run without the flood ({}) (target with tenants: <= 1.2x); each editor: {}",
            if *name == "flood, tenants" {
                format!(" (headroom {headroom})")
            } else {
                String::new()
            },
            ms(*p99),
            p99.as_secs_f64() / base,
            ms(p99s[0].1),
            per.join(", ")
        );
    }
    let full = batch
        .iter()
        .find(|b| b.0.starts_with("batch alone"))
        .map_or(0.0, |b| b.1);
    let left = full * (1.0 - editors_share);
    println!(
        "the pool serves {full:.0} tokens/s of batch work alone; the editors use {:.0}% of its instance time, leaving {left:.0} tokens/s",
        editors_share * 100.0
    );
    for (name, tokens_per_second, ok, sent) in
        batch.iter().filter(|b| !b.0.starts_with("batch alone"))
    {
        println!(
            "batch tenant, {name}: {tokens_per_second:.0} tokens/s served within the run ({ok} of {sent} requests answered in the end) = {:.0}% of the capacity left",
            100.0 * tokens_per_second / left.max(1e-9)
        );
    }
}
