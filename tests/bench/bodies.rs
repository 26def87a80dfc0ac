//! `--bodies` (run by `hack/bench-gateway-memory.sh`): the agent's peak resident memory while
//! its gateway takes the large request bodies of issue 21's review, against the bound the issue
//! sets: below 2 x (body budget + the agent's resident memory before). Each case resets the
//! agent's high-water mark (`/proc/PID/clear_refs`, 5) and reads `VmHWM` afterwards.
//!
//! The cases: one 60 MB JSON array in a request; three at once; twenty 3 MB requests queued
//! behind busy instances; a 31 MB `messages` array. (Before the budget, the review measured
//! 983 MB, 2.1 GB, 1.07 GB and 746 MB left in use after the last.)

use std::time::{Duration, Instant};

use bytes::Bytes;
use fleet_e2e::{AgentProcess, World, free_port, free_port_range};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

const MODEL: &str = "smollm2:135m";

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// `VmHWM` or `VmRSS` of the agent, in MiB.
fn mem(agent: &AgentProcess, field: &str) -> f64 {
    let pid = agent.pid().expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn reset_peak(agent: &AgentProcess) {
    let pid = agent.pid().expect("pid");
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("clear_refs");
}

/// A generate request for `model` whose body is about `mb` MB: a JSON array of numbers (what
/// cost the old gateway 16 times its size), or of one long string (what an instance can take
/// without running out of memory itself).
fn array_body(mb: usize, model: &str, numbers: bool) -> Bytes {
    let array = if numbers {
        format!("{}0", "0,".repeat(mb * 1_000_000 / 2))
    } else {
        format!("\"{}\"", "x".repeat(mb * 1_000_000))
    };
    Bytes::from(format!(
        "{{\"model\":\"{model}\",\"prompt\":\"hi\",\"stream\":false,\"options\":{{\"num_predict\":1}},\"pad\":[{array}]}}"
    ))
}

/// A chat request of about `mb` MB of messages.
fn messages_body(mb: usize) -> Bytes {
    let one = json!({"role": "user", "content": "x".repeat(1000)}).to_string();
    let n = mb * 1_000_000 / (one.len() + 1);
    let messages = vec![one.as_str(); n].join(",");
    Bytes::from(format!(
        "{{\"model\":\"{MODEL}\",\"stream\":false,\"options\":{{\"num_predict\":1}},\"messages\":[{messages}]}}"
    ))
}

async fn post(client: &Http, url: &str, body: Bytes) -> u16 {
    let Ok(req) = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(body))
    else {
        return 0;
    };
    match tokio::time::timeout(Duration::from_secs(300), client.request(req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            status
        }
        _ => 0,
    }
}

/// Sends `bodies` at once; returns their statuses.
async fn all(client: &Http, url: &str, bodies: Vec<Bytes>) -> Vec<u16> {
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|b| {
            let (client, url) = (client.clone(), url.to_string());
            tokio::spawn(async move { post(&client, &url, b).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or(0));
    }
    out
}

/// Runs the cases with a body budget of `budget_mib`.
pub async fn bodies_bench(budget_mib: u64) {
    let world = World::new("bench-bodies");
    let base = free_port_range(2);
    // Slow tokens: a request of 40 tokens keeps an instance busy for 4 s.
    // Room for a sim to read a 60 MB body (the instances' memory is not what is measured).
    let manifest = world
        .sim_fleet("b", 2, base, "")
        .replace(
            "SIM_LOAD_TIME: 50ms",
            "SIM_LOAD_TIME: 50ms, SIM_TOKENS_PER_SECOND: \"10\"",
        )
        .replace("memory: 128Mi", "memory: 1Gi");
    world.cli_ok(&["apply", "-f", "-"], Some(&manifest));
    let serve = format!("127.0.0.1:{}", free_port());
    let budget = format!("{budget_mib}Mi");
    let agent = world.agent(
        "node-1",
        &["--serve", &serve, "--serve-body-budget", &budget],
    );
    world
        .wait_status("b", "2 ready", 120, |s| s["readyReplicas"] == 2)
        .await;
    let client: Http = Client::builder(TokioExecutor::new()).build_http();
    let generate = format!("http://{serve}/api/generate");
    let chat = format!("http://{serve}/api/chat");
    // Warm the paths once, then take the baseline.
    post(&client, &generate, array_body(1, MODEL, false)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = mem(&agent, "VmRSS:");
    let bound = 2.0 * (budget_mib as f64 + baseline);
    println!(
        "bodies: budget {budget_mib} MiB, agent RSS before {baseline:.1} MiB, bound 2 x (budget + before) = {bound:.0} MiB"
    );
    println!(
        "{:<46} {:>9} {:>10} {:>8}  statuses",
        "case", "peak MiB", "after MiB", "of bound"
    );
    let report = |case: &str, statuses: &[u16], started: Instant, agent: &AgentProcess| {
        let peak = mem(agent, "VmHWM:");
        let after = mem(agent, "VmRSS:");
        let mut counts = std::collections::BTreeMap::new();
        for s in statuses {
            *counts.entry(*s).or_insert(0) += 1;
        }
        println!(
            "{case:<46} {peak:>9.1} {after:>10.1} {:>7.0}%  {counts:?} in {:.1}s",
            100.0 * peak / bound,
            started.elapsed().as_secs_f64()
        );
        peak
    };
    let mut worst: f64 = 0.0;

    // Read and parsed, then refused (no fleet serves the model): the gateway's own cost.
    reset_peak(&agent);
    let t = Instant::now();
    let s = all(&client, &generate, vec![array_body(60, "none:1b", true)]).await;
    worst = worst.max(report("one 60 MB array of numbers (404)", &s, t, &agent));

    reset_peak(&agent);
    let t = Instant::now();
    let three = (0..3).map(|_| array_body(60, "none:1b", true)).collect();
    let s = all(&client, &generate, three).await;
    worst = worst.max(report(
        "three 60 MB arrays of numbers at once (404)",
        &s,
        t,
        &agent,
    ));

    // Sent on to the instances.
    reset_peak(&agent);
    let t = Instant::now();
    let s = all(&client, &generate, vec![array_body(60, MODEL, false)]).await;
    worst = worst.max(report("one 60 MB array, sent on", &s, t, &agent));

    reset_peak(&agent);
    let t = Instant::now();
    let three = (0..3).map(|_| array_body(60, MODEL, false)).collect();
    let s = all(&client, &generate, three).await;
    worst = worst.max(report("three 60 MB arrays at once, sent on", &s, t, &agent));

    // Both instances busy (40 tokens at 10/s), then twenty 3 MB requests wait in the queue.
    reset_peak(&agent);
    let t = Instant::now();
    let busy_body = Bytes::from(format!(
        "{{\"model\":\"{MODEL}\",\"prompt\":\"hi\",\"stream\":false,\"options\":{{\"num_predict\":40}}}}"
    ));
    let busy = {
        let (client, generate) = (client.clone(), generate.clone());
        tokio::spawn(
            async move { all(&client, &generate, vec![busy_body.clone(), busy_body]).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut s = all(&client, &chat, (0..20).map(|_| messages_body(3)).collect()).await;
    s.extend(busy.await.unwrap_or_default());
    worst = worst.max(report("twenty 3 MB requests queued", &s, t, &agent));

    reset_peak(&agent);
    let t = Instant::now();
    let s = all(&client, &chat, vec![messages_body(31)]).await;
    worst = worst.max(report("a 31 MB messages array", &s, t, &agent));
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "bodies: worst peak {worst:.1} MiB = {:.0}% of the bound ({bound:.0} MiB); RSS at rest afterwards {:.1} MiB",
        100.0 * worst / bound,
        mem(&agent, "VmRSS:")
    );
}
