//! `--serve N` (run by `hack/bench-serve.sh`): N single-slot sim instances behind three setups,
//! measured in one run on the same instances: nginx round robin straight to the instances (what
//! such deployments run today), HAProxy `balance leastconn` with `maxconn 1` per instance
//! (queueing in the proxy), and the agent's gateway. Open-loop Poisson arrivals at 50%, 80% and
//! 95% of the instances' capacity, output lengths skewed (90% 10 tokens, 10% 200 tokens, at
//! 200 tokens/s, streamed); TTFT and end-to-end latency p50/p99 and failed requests; the
//! gateway's added latency at low load against a direct request; then every instance replaced
//! (a rollout, as a rotation replaces them) under 80% load: failed requests per setup.
//!
//! The open-loop schedule (arrivals that do not wait for answers) and time to first byte of a
//! streamed answer are what off-the-shelf generators (oha: closed loop, whole responses) do not
//! measure; this small generator does only that.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fleet_e2e::proxy::{self, Proxy};
use fleet_e2e::{AgentProcess, World, free_port, free_port_range, request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

const MODEL: &str = "smollm2:135m";
const TOKENS_PER_SECOND: f64 = 200.0;

pub(crate) type Http = Client<HttpConnector, Full<Bytes>>;

/// A small deterministic PRNG (xorshift64*): the same schedule for every setup.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One request of the schedule: when it is sent (from the start), and how many tokens it asks.
#[derive(Clone, Copy)]
struct Arrival {
    at: Duration,
    tokens: u64,
}

/// Poisson arrivals at `rate` per second for `seconds` from a seeded generator: what `each`
/// makes of each arrival's time (and the same generator, for its other draws).
pub(crate) fn poisson<T>(
    rate: f64,
    seconds: f64,
    seed: u64,
    mut each: impl FnMut(Duration, &mut Rng) -> T,
) -> Vec<T> {
    let mut rng = Rng(seed | 1);
    let mut t = 0.0;
    let mut out = Vec::new();
    loop {
        t += -(1.0 - rng.next()).ln() / rate;
        if t >= seconds {
            return out;
        }
        out.push(each(Duration::from_secs_f64(t), &mut rng));
    }
}

/// Poisson arrivals at `rate` per second for `seconds`, 10% of them long.
fn schedule(rate: f64, seconds: f64, seed: u64) -> Vec<Arrival> {
    poisson(rate, seconds, seed, |at, rng| Arrival {
        at,
        tokens: if rng.next() < 0.1 { 200 } else { 10 },
    })
}

/// What one request saw.
#[derive(Clone, Copy, Default)]
struct Outcome {
    ok: bool,
    ttft: Duration,
    total: Duration,
}

/// POSTs `body` to `url` and reads the streamed answer: the time to its first byte, and its
/// NDJSON lines; else why not (no answer, a status other than 200 and its body, a broken
/// stream, or no answer within `within`).
pub(crate) async fn streamed(
    client: &Http,
    url: &str,
    body: &Value,
    within: Duration,
) -> Result<(Duration, Vec<Value>), String> {
    streamed_as(client, url, &[], body, within).await
}

/// [`streamed`], with extra request `headers`.
pub(crate) async fn streamed_as(
    client: &Http,
    url: &str,
    headers: &[(&str, &str)],
    body: &Value,
    within: Duration,
) -> Result<(Duration, Vec<Value>), String> {
    let started = Instant::now();
    let mut req = hyper::Request::post(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let run = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("no answer: {e}"))?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut ttft = None;
        let mut all = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame
                .map_err(|e| format!("cut: {e}"))?
                .into_data()
                .unwrap_or_default();
            if !data.is_empty() && ttft.is_none() {
                ttft = Some(started.elapsed());
            }
            all.extend_from_slice(&data);
        }
        let text = String::from_utf8_lossy(&all);
        if status != 200 {
            return Err(format!("{}: {}", status.as_u16(), text.trim()));
        }
        let lines: Option<Vec<Value>> =
            text.lines().map(|l| serde_json::from_str(l).ok()).collect();
        let lines = lines.ok_or_else(|| format!("not NDJSON: {text}"))?;
        Ok((ttft.ok_or("an empty answer")?, lines))
    };
    tokio::time::timeout(within, run)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {within:?}")))
}

async fn one(client: &Http, url: &str, tokens: u64) -> Outcome {
    let body = json!({"model": MODEL, "prompt": "bench", "options": {"num_predict": tokens}});
    let started = Instant::now();
    let url = format!("{url}/api/generate");
    let answer = streamed(client, &url, &body, Duration::from_secs(120)).await;
    match answer {
        Ok((ttft, lines))
            if lines
                .last()
                .is_some_and(|l| l["done"] == true && l["eval_count"] == tokens) =>
        {
            Outcome {
                ok: true,
                ttft,
                total: started.elapsed(),
            }
        }
        _ => Outcome {
            ok: false,
            ttft: Duration::ZERO,
            total: started.elapsed(),
        },
    }
}

/// Sends `arrivals` to `url` on schedule (open loop) and collects every outcome.
async fn run(client: &Http, url: &str, arrivals: &[Arrival]) -> Vec<Outcome> {
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(arrivals.len());
    for a in arrivals {
        tokio::time::sleep_until(start + a.at).await;
        let (client, url, tokens) = (client.clone(), url.to_string(), a.tokens);
        tasks.push(tokio::spawn(
            async move { one(&client, &url, tokens).await },
        ));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap_or_default());
    }
    out
}

pub(crate) fn quantile(mut v: Vec<Duration>, q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

/// (failed, ttft p50, ttft p99, total p50, total p99).
fn summary(out: &[Outcome]) -> (usize, Duration, Duration, Duration, Duration) {
    let ok: Vec<&Outcome> = out.iter().filter(|o| o.ok).collect();
    let ttft: Vec<Duration> = ok.iter().map(|o| o.ttft).collect();
    let total: Vec<Duration> = ok.iter().map(|o| o.total).collect();
    (
        out.len() - ok.len(),
        quantile(ttft.clone(), 0.5),
        quantile(ttft, 0.99),
        quantile(total.clone(), 0.5),
        quantile(total, 0.99),
    )
}

fn nginx(dir: &std::path::Path, listen: u16, ports: &[u16]) -> Proxy {
    let servers: String = ports
        .iter()
        .map(|p| format!("    server 127.0.0.1:{p};\n"))
        .collect();
    proxy::nginx(
        dir,
        &format!(
            "  upstream instances {{\n{servers}    keepalive 64;\n  }}\n\
             server {{\n    listen 127.0.0.1:{listen};\n    location / {{\n\
             proxy_pass http://instances;\n      proxy_http_version 1.1;\n\
             proxy_set_header Connection \"\";\n      proxy_buffering off;\n\
             proxy_read_timeout 600s;\n    }}\n  }}"
        ),
    )
}

pub(crate) fn haproxy(dir: &std::path::Path, listen: u16, ports: &[u16]) -> Proxy {
    let servers: String = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("    server s{i} 127.0.0.1:{p} maxconn 1\n"))
        .collect();
    proxy::haproxy(
        dir,
        &format!(
            "global\n    maxconn 8192\ndefaults\n    mode http\n    timeout connect 2s\n\
             timeout client 10m\n    timeout server 10m\n    timeout queue 60s\n\
             frontend f\n    bind 127.0.0.1:{listen}\n    default_backend instances\n\
             backend instances\n    balance leastconn\n    option http-no-delay\n{servers}"
        ),
    )
}

fn manifest(world: &World, n: u32, base: u16, greeting: &str) -> String {
    world
        .sim_fleet("serve", n, base, "")
        .replace(
            "SIM_LOAD_TIME: 50ms}",
            &format!(
                "SIM_LOAD_TIME: 50ms, SIM_ACCESS_LOG: \"0\", SIM_TOKENS_PER_SECOND: \"{TOKENS_PER_SECOND}\", GREETING: {greeting}}}"
            ),
        )
        .replace("terminationGracePeriod: 2s", "terminationGracePeriod: 30s")
        .replace("resources: {cpus: 0.5,", "resources: {")
}

async fn wait_all(world: &World, n: u64, what: &str, old_hash: Option<&Value>) -> Value {
    world
        .wait_status("serve", what, 600, |s| {
            s["readyReplicas"] == n
                && s["updatedReplicas"] == n
                && s["replicas"] == n
                && old_hash.is_none_or(|old| {
                    s["instances"]
                        .as_array()
                        .is_some_and(|a| a.iter().all(|i| i["specHash"] != *old))
                })
        })
        .await
}

/// The benchmark: `loads` (fractions of capacity) for `seconds` each, then (with `rollouts`)
/// a rollout under 80% load per setup.
pub async fn serve_bench(n: u32, seconds: f64, loads: &[f64], rollouts: bool) {
    let world = World::new("bench-serve");
    let base = free_port_range(n as u16 + 2);
    world.cli_ok(
        &["apply", "-f", "-"],
        Some(&manifest(&world, n, base, "one")),
    );
    let gateway_port = free_port();
    let _agent: AgentProcess = world.agent(
        "bench-node",
        &["--serve", &format!("127.0.0.1:{gateway_port}")],
    );
    let status = wait_all(&world, u64::from(n), "every instance ready", None).await;
    let ports = instance_ports(&status);
    let dir = world.dir.join("proxies");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let (nginx_port, haproxy_port) = (free_port(), free_port());
    let _nginx = nginx(&dir, nginx_port, &ports);
    let _haproxy = haproxy(&dir, haproxy_port, &ports);
    let setups = [
        (
            "nginx round robin",
            format!("http://127.0.0.1:{nginx_port}"),
        ),
        (
            "HAProxy leastconn maxconn 1",
            format!("http://127.0.0.1:{haproxy_port}"),
        ),
        ("gateway", format!("http://127.0.0.1:{gateway_port}")),
    ];
    for (_, url) in &setups {
        fleet_e2e::wait_for(url, Duration::from_secs(30), || async {
            request(
                "GET",
                &format!("{url}/api/version"),
                None,
                Duration::from_secs(2),
            )
            .await
            .ok()
            .filter(|(c, _)| *c == 200)
        })
        .await;
    }
    let client: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build_http();

    // Capacity: each single-slot instance serves one request at a time, for its fixed cost
    // per request (measured: 1-token requests straight to an instance) plus the tokens.
    let direct = format!("http://127.0.0.1:{}", ports[0]);
    let mut fixed = Vec::new();
    for _ in 0..30 {
        let o = one(&client, &direct, 1).await;
        if o.ok {
            fixed.push(o.total);
        }
    }
    let fixed = quantile(fixed, 0.5).as_secs_f64() - 1.0 / TOKENS_PER_SECOND;
    let mean_tokens = 0.9 * 10.0 + 0.1 * 200.0;
    let capacity = f64::from(n) / (fixed + mean_tokens / TOKENS_PER_SECOND);
    println!(
        "serve-bench: {n} single-slot instances, {TOKENS_PER_SECOND} tokens/s each, {:.0} ms per request besides tokens; outputs 90% 10 / 10% 200 tokens (streamed); capacity {capacity:.1} req/s; {seconds}s per point",
        fixed * 1e3
    );
    // Warm every path (connections, the instances' runners).
    for (_, url) in &setups {
        let _ = run(&client, url, &schedule(capacity * 0.2, 2.0, 7)).await;
    }
    println!(
        "{:<28} {:>5} {:>7} {:>6} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "setup", "load", "req/s", "sent", "failed", "ttft p50", "ttft p99", "e2e p50", "e2e p99"
    );
    let mut at80 = Vec::new();
    for &load in loads {
        let arrivals = schedule(capacity * load, seconds, 42 + (load * 100.0) as u64);
        for (name, url) in &setups {
            let out = run(&client, url, &arrivals).await;
            let (failed, t50, t99, e50, e99) = summary(&out);
            println!(
                "{name:<28} {:>4.0}% {:>7.1} {:>6} {failed:>7} {:>7}ms {:>7}ms {:>7}ms {:>7}ms",
                load * 100.0,
                capacity * load,
                out.len(),
                ms(t50),
                ms(t99),
                ms(e50),
                ms(e99)
            );
            if load == 0.8 {
                at80.push((name.to_string(), t99));
            }
            // Let queues empty between runs.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    if let [(_, nginx99), (_, haproxy99), (_, gw99)] = at80.as_slice() {
        println!(
            "at 80%: gateway TTFT p99 / nginx round robin = {:.3} (target <= 0.333); / HAProxy maxconn 1 = {:.2} (target <= 1.1)",
            gw99.as_secs_f64() / nginx99.as_secs_f64().max(1e-9),
            gw99.as_secs_f64() / haproxy99.as_secs_f64().max(1e-9)
        );
    }

    // Added latency at low load: one request at a time, 1 token, direct vs through the gateway.
    let mut lat = Vec::new();
    for url in [&direct, &setups[2].1] {
        let mut ttft = Vec::new();
        for _ in 0..300 {
            let o = one(&client, url, 1).await;
            if o.ok {
                ttft.push(o.total);
            }
        }
        lat.push((quantile(ttft.clone(), 0.5), quantile(ttft, 0.99)));
    }
    println!(
        "added latency at low load (1-token requests, one at a time, 300 each): direct p50 {:.2}ms p99 {:.2}ms; gateway p50 {:.2}ms p99 {:.2}ms; added p50 {:.2}ms p99 {:.2}ms (target p99 <= 1 ms)",
        lat[0].0.as_secs_f64() * 1e3,
        lat[0].1.as_secs_f64() * 1e3,
        lat[1].0.as_secs_f64() * 1e3,
        lat[1].1.as_secs_f64() * 1e3,
        (lat[1].0.as_secs_f64() - lat[0].0.as_secs_f64()) * 1e3,
        (lat[1].1.as_secs_f64() - lat[0].1.as_secs_f64()) * 1e3,
    );

    // Every instance replaced under 80% load, once per setup.
    let mut greeting = 1;
    for (name, url) in setups.iter().filter(|_| rollouts) {
        greeting += 1;
        let before = wait_all(&world, u64::from(n), "ready before the rollout", None).await;
        let old = before["instances"][0]["specHash"].clone();
        let (client2, url2) = (client.clone(), url.clone());
        let arrivals = schedule(capacity * 0.8, 600.0, 99);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let load = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut tasks = Vec::new();
            for a in arrivals {
                if stop2.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                tokio::time::sleep_until(start + a.at).await;
                let (c, u) = (client2.clone(), url2.clone());
                tasks.push(tokio::spawn(async move { one(&c, &u, a.tokens).await }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap_or_default());
            }
            out
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        let started = Instant::now();
        world.cli_ok(
            &["apply", "-f", "-"],
            Some(&manifest(&world, n, base, &format!("g{greeting}"))),
        );
        wait_all(&world, u64::from(n), "every instance replaced", Some(&old)).await;
        let took = started.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let out = load.await.expect("load");
        let failed = out.iter().filter(|o| !o.ok).count();
        println!(
            "rollout of all {n} instances under 80% load, {name}: {failed} of {} requests failed ({:.0}s)",
            out.len(),
            took.as_secs_f64()
        );
    }
}

/// The ports of the instances a fleet status lists.
pub fn instance_ports(status: &serde_json::Value) -> Vec<u16> {
    status["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|i| i["port"].as_u64().and_then(|p| u16::try_from(p).ok()))
        .collect()
}
