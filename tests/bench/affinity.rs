//! `--affinity N` (run by `hack/bench-affinity.sh`): conversations against N instances whose
//! prompt cache is bounded by the agent (the default, from `memory: 512Mi`), through three
//! setups on the same instances: HAProxy `balance leastconn` + `maxconn 1`, the agent's gateway
//! with `--serve-affinity false`, and the gateway (affinity on).
//!
//! The workload: C conversations at once (closed loop), each a shared system prompt of about
//! 1k tokens, a document of its own, then short questions with think time between turns;
//! answers streamed. Measured per setup: time to first token of turns 2 and later (p50, p90),
//! of first turns, turns per second over the run, failed turns, and the gateway's affinity
//! counters. Then a single-turn workload (every request a new document, nothing to reuse):
//! TTFT p50/p90 and throughput, so affinity costs nothing where it cannot help.
//!
//! `--engine 1` runs the real engine (llama-server with SmolLM2-135M, built by
//! `hack/llama-engine.sh`); otherwise sims that model the prompt cache (prefill time per
//! uncached token, an LRU of prompt states under the same bound), at a scale the engine cannot
//! reach here. Each setup gets conversations of its own (no setup reuses another's cache), and
//! a warm-up first (connections, the gateway's measured rates).

use std::time::{Duration, Instant};

use fleet_e2e::{AgentProcess, World, free_port, free_port_range, request};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::serve::{Http, Rng, haproxy, instance_ports, quantile, streamed};

const MODEL: &str = "smollm2:135m";

/// The benchmark's knobs.
pub struct Options {
    /// Instances.
    pub n: u32,
    /// The real engine instead of sims.
    pub engine: bool,
    /// Conversations at once.
    pub conversations: usize,
    /// Turns per conversation.
    pub turns: usize,
    /// Mean think time between turns.
    pub think: Duration,
    /// Tokens per answer.
    pub answer: u64,
    /// Words per conversation's document (the system prompt has 750: with documents shorter
    /// than that, llama-server does not consult its prompt cache when a conversation returns
    /// to a slot another one used meanwhile; see the sim's cache.rs).
    pub doc_words: usize,
    /// Also run the single-turn workload (`--single 0` skips it).
    pub single: bool,
}

/// Common English words, for text a real tokenizer reads as about 1.3 tokens per word.
const WORDS: [&str; 64] = [
    "the",
    "system",
    "answers",
    "questions",
    "about",
    "documents",
    "with",
    "care",
    "and",
    "short",
    "sentences",
    "when",
    "a",
    "user",
    "asks",
    "for",
    "details",
    "it",
    "quotes",
    "the",
    "text",
    "exactly",
    "never",
    "invents",
    "numbers",
    "dates",
    "or",
    "names",
    "that",
    "are",
    "not",
    "written",
    "in",
    "report",
    "river",
    "market",
    "village",
    "engine",
    "winter",
    "harvest",
    "council",
    "bridge",
    "teacher",
    "letter",
    "station",
    "garden",
    "price",
    "road",
    "storm",
    "library",
    "north",
    "south",
    "morning",
    "evening",
    "three",
    "seven",
    "twelve",
    "old",
    "new",
    "small",
    "large",
    "quiet",
    "busy",
    "green",
];

/// `words` words of text, the same for the same `seed`.
fn text(words: usize, seed: u64) -> String {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut out = Vec::with_capacity(words);
    for i in 0..words {
        let w = WORDS[(rng.next() * WORDS.len() as f64) as usize % WORDS.len()];
        out.push(if i % 12 == 11 {
            format!("{w}.")
        } else {
            w.to_string()
        });
    }
    out.join(" ")
}

/// What one turn saw.
#[derive(Clone, Debug, Default)]
struct Turn {
    index: usize,
    ok: bool,
    ttft: Duration,
    /// Why it failed.
    failure: Option<String>,
}

/// One streamed `/api/chat` turn: (TTFT, the answer's text), or why it failed.
async fn chat(
    client: &Http,
    url: &str,
    messages: &[Value],
    tokens: u64,
) -> Result<(Duration, String), String> {
    let body = json!({"model": MODEL, "messages": messages, "stream": true,
        "options": {"num_predict": tokens}});
    let url = format!("{url}/api/chat");
    let (ttft, lines) = streamed(client, &url, &body, Duration::from_secs(600)).await?;
    if let Some(error) = lines.iter().find_map(|v| v.get("error")) {
        return Err(format!("an error in the stream: {error}"));
    }
    if lines.last().is_none_or(|l| l["done"] != true) {
        return Err("the stream ended before done".into());
    }
    let answer = lines
        .iter()
        .filter_map(|v| v["message"]["content"].as_str())
        .collect();
    Ok((ttft, answer))
}

/// The shape of a workload: turns per conversation, think time, answer tokens, document
/// words; `single`: every turn is a new conversation (a new document, nothing to reuse).
#[derive(Clone, Copy)]
struct Shape {
    turns: usize,
    think: Duration,
    answer: u64,
    doc_words: usize,
    single: bool,
}

/// One conversation: `turns` turns with think time between them; a failed turn ends it.
async fn conversation(client: Http, url: String, system: String, seed: u64, o: Shape) -> Vec<Turn> {
    let Shape {
        turns,
        think,
        answer,
        doc_words,
        single,
    } = o;
    let mut rng = Rng(seed | 1);
    // Start spread over one think time, as users arrive.
    tokio::time::sleep(think.mul_f64(rng.next())).await;
    let opening = |seed: u64| {
        vec![
            json!({"role": "system", "content": system}),
            json!({"role": "user", "content": format!("Document {seed}: {}\nSummarise it.", text(doc_words, seed))}),
        ]
    };
    let mut messages = opening(seed);
    let mut out = Vec::new();
    for index in 0..turns {
        if index > 0 && single {
            tokio::time::sleep(think.mul_f64(0.5 + rng.next())).await;
            messages = opening(seed * 1000 + index as u64);
        } else if index > 0 {
            tokio::time::sleep(think.mul_f64(0.5 + rng.next())).await;
            let q = format!(
                "Question {index}: what does it say about the {}?",
                WORDS[(seed as usize + index * 5) % WORDS.len()]
            );
            messages.push(json!({"role": "user", "content": q}));
        }
        match chat(&client, &url, &messages, answer).await {
            Ok((ttft, text)) => {
                out.push(Turn {
                    index,
                    ok: true,
                    ttft,
                    failure: None,
                });
                messages.push(json!({"role": "assistant", "content": text}));
            }
            Err(why) => {
                out.push(Turn {
                    index,
                    ok: false,
                    ttft: Duration::ZERO,
                    failure: Some(why),
                });
                break;
            }
        }
    }
    out
}

/// A workload's figures.
struct Figures {
    later: (Duration, Duration),
    first: (Duration, Duration),
    all: (Duration, Duration),
    per_second: f64,
    turns: usize,
    failed: usize,
    /// Why turns failed.
    failures: Vec<String>,
}

/// Runs `conversations` conversations (seeds from `seed`) against `url`.
async fn workload(
    client: &Http,
    url: &str,
    system: &str,
    seed: u64,
    conversations: usize,
    o: Shape,
) -> Figures {
    let started = Instant::now();
    let tasks: Vec<_> = (0..conversations as u64)
        .map(|c| {
            tokio::spawn(conversation(
                client.clone(),
                url.to_string(),
                system.to_string(),
                seed + c,
                o,
            ))
        })
        .collect();
    let mut turns = Vec::new();
    for t in tasks {
        turns.extend(t.await.unwrap_or_default());
    }
    let took = started.elapsed();
    let ok: Vec<&Turn> = turns.iter().filter(|t| t.ok).collect();
    let later: Vec<Duration> = ok.iter().filter(|t| t.index > 0).map(|t| t.ttft).collect();
    let first: Vec<Duration> = ok.iter().filter(|t| t.index == 0).map(|t| t.ttft).collect();
    let all: Vec<Duration> = ok.iter().map(|t| t.ttft).collect();
    Figures {
        later: (quantile(later.clone(), 0.5), quantile(later, 0.9)),
        first: (quantile(first.clone(), 0.5), quantile(first, 0.9)),
        all: (quantile(all.clone(), 0.5), quantile(all, 0.9)),
        per_second: ok.len() as f64 / took.as_secs_f64(),
        turns: ok.len(),
        failed: turns.len() - ok.len(),
        failures: turns.iter().filter_map(|t| t.failure.clone()).collect(),
    }
}

fn manifest(world: &World, o: &Options, base: u16, engine_image: Option<&str>) -> String {
    let fleet = world.sim_fleet("chat", o.n, base, "");
    let fleet = match engine_image {
        Some(image) => fleet
            .replace(&world.ns.env.sim_image, image)
            .replace("cpus: 0.5, memory: 128Mi", "cpus: 1, memory: 512Mi")
            .replace(
                "SIM_LOAD_TIME: 50ms}",
                "SIM_LOAD_TIME: 50ms, SIM_ACCESS_LOG: \"0\"}",
            ),
        // SmolLM2-135M's KV bytes per token, its prefill and generation speeds on one core
        // here (the real engine's, measured), as a sim models them.
        None => fleet.replace("memory: 128Mi", "memory: 512Mi").replace(
            "SIM_LOAD_TIME: 50ms}",
            "SIM_LOAD_TIME: 50ms, SIM_ACCESS_LOG: \"0\", SIM_KV_BYTES_PER_TOKEN: \"23040\", \
             SIM_PREFILL_TOKENS_PER_SECOND: \"140\", SIM_TOKENS_PER_SECOND: \"60\"}",
        ),
    };
    fleet.replace(
        "probes: {readiness: {periodSeconds: 1, timeoutSeconds: 1}}",
        "probes: {readiness: {periodSeconds: 1, timeoutSeconds: 5}, startupTimeoutSeconds: 300}",
    )
}

/// The agent (again) with its gateway on `port`, affinity on or off; waits until the gateway
/// answers through every instance.
async fn gateway(
    world: &World,
    old: Option<AgentProcess>,
    port: u16,
    affinity: bool,
    n: usize,
) -> AgentProcess {
    if let Some(mut old) = old {
        old.kill9();
    }
    let flag = affinity.to_string();
    let agent = world.agent(
        "bench-node",
        &[
            "--serve",
            &format!("127.0.0.1:{port}"),
            "--serve-affinity",
            &flag,
        ],
    );
    fleet_e2e::wait_for(
        "the gateway to list every instance",
        Duration::from_secs(300),
        || async {
            let (code, text) = request(
                "GET",
                &format!("http://127.0.0.1:{port}/api/ps"),
                None,
                Duration::from_secs(5),
            )
            .await
            .ok()?;
            let listed = agent.listed(None).await;
            let ready = listed.iter().filter(|i| i["ready"] == true).count();
            (code == 200 && ready == n && !text.is_empty()).then_some(())
        },
    )
    .await;
    agent
}

/// The gateway's affinity counters: (hits, misses, cached tokens).
async fn counters(agent: &AgentProcess) -> (f64, f64, f64) {
    (
        agent
            .metric("ollama_fleet_affinity_hits_total")
            .await
            .max(0.0),
        agent
            .metric("ollama_fleet_affinity_misses_total")
            .await
            .max(0.0),
        agent
            .metric("ollama_fleet_prompt_cached_tokens_total")
            .await
            .max(0.0),
    )
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

/// The benchmark.
pub async fn affinity_bench(o: Options) {
    let world = World::new("bench-affinity");
    let engine_image = o.engine.then(|| world.import_engine());
    let base = free_port_range(o.n as u16 + 2);
    world.cli_ok(
        &["apply", "-f", "-"],
        Some(&manifest(&world, &o, base, engine_image.as_deref())),
    );
    let port = free_port();
    let n = o.n as usize;
    let mut agent = Some(gateway(&world, None, port, true, n).await);
    let status = world
        .wait_status("chat", "every instance ready", 600, |s| {
            s["readyReplicas"] == u64::from(o.n)
        })
        .await;
    let ports = instance_ports(&status);
    let dir = world.dir.join("proxies");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let haproxy_port = free_port();
    let _haproxy = haproxy(&dir, haproxy_port, &ports);
    let client: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build_http();
    let system = format!("You are a careful assistant. {}", text(750, 0));
    let doc_words = o.doc_words;
    let shape = Shape {
        turns: o.turns,
        think: o.think,
        answer: o.answer,
        doc_words,
        single: false,
    };
    println!(
        "affinity-bench: {} {} instances (memory 512Mi, prompt cache {}), {} conversations at once, {} turns each, think {:.1}s, {}-token answers; system prompt 750 words, documents {doc_words} words",
        o.n,
        if o.engine {
            "real-engine (llama-server, SmolLM2-135M)"
        } else {
            "sim"
        },
        status["promptCache"].as_str().unwrap_or("?"),
        o.conversations,
        o.turns,
        o.think.as_secs_f64(),
        o.answer,
    );
    println!(
        "{:<30} {:>10} {:>10} {:>11} {:>8} {:>7} {:>7} {:>17}",
        "setup",
        "turn2+ p50",
        "turn2+ p90",
        "turn1 p50",
        "turns/s",
        "turns",
        "failed",
        "hits/miss/cached"
    );
    let haproxy_url = format!("http://127.0.0.1:{haproxy_port}");
    let gateway_url = format!("http://127.0.0.1:{port}");
    let mut results = Vec::new();
    let mut singles = Vec::new();
    for (i, (name, affinity)) in [
        ("HAProxy leastconn maxconn 1", None),
        ("gateway, affinity off", Some(false)),
        ("gateway", Some(true)),
    ]
    .into_iter()
    .enumerate()
    {
        if let Some(on) = affinity {
            agent = Some(gateway(&world, agent.take(), port, on, n).await);
        }
        let url = if affinity.is_some() {
            &gateway_url
        } else {
            &haproxy_url
        };
        let seed = 1000 * (i as u64 + 1);
        // Warm-up: connections, runners, the gateway's rates.
        let warm = Shape {
            turns: 2,
            think: Duration::from_millis(100),
            ..shape
        };
        workload(
            &client,
            url,
            &system,
            seed + 500,
            n.min(o.conversations),
            warm,
        )
        .await;
        let before = match &agent {
            Some(a) if affinity.is_some() => counters(a).await,
            _ => (0.0, 0.0, 0.0),
        };
        let f = workload(&client, url, &system, seed, o.conversations, shape).await;
        let after = match &agent {
            Some(a) if affinity.is_some() => counters(a).await,
            _ => (0.0, 0.0, 0.0),
        };
        let counted = if affinity.is_some() {
            format!(
                "{:.0}/{:.0}/{:.0}",
                after.0 - before.0,
                after.1 - before.1,
                after.2 - before.2
            )
        } else {
            "-".to_string()
        };
        println!(
            "{name:<30} {:>8}ms {:>8}ms {:>9}ms {:>8.2} {:>7} {:>7} {counted:>17}",
            ms(f.later.0),
            ms(f.later.1),
            ms(f.first.0),
            f.per_second,
            f.turns,
            f.failed
        );
        for why in &f.failures {
            let why: String = why.chars().take(160).collect();
            println!("  {name}: a turn failed: {why}");
        }
        results.push(f);
        if !o.single {
            continue;
        }
        // Single turns: every request a new document.
        let single = workload(
            &client,
            url,
            &system,
            seed + 700,
            o.conversations,
            Shape {
                single: true,
                ..shape
            },
        )
        .await;
        for why in &single.failures {
            let why: String = why.chars().take(160).collect();
            println!("  {name}: a single turn failed: {why}");
        }
        singles.push((name, single));
    }
    if o.single {
        println!(
            "single-turn workload ({} clients, {} requests each, every one a new document: nothing to reuse):",
            o.conversations, o.turns
        );
    }
    for (name, f) in &singles {
        println!(
            "{name:<30} ttft p50 {:>7}ms p90 {:>7}ms {:>6.2} turns/s, {} failed",
            ms(f.all.0),
            ms(f.all.1),
            f.per_second,
            f.failed
        );
    }
    if let [h, off, on] = results.as_slice() {
        let r = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
        println!(
            "turns 2+: gateway p50 / HAProxy = {:.3} (target <= 0.333); p90 / HAProxy = {:.2} (target <= 1.0); turns/s / HAProxy = {:.2} (target >= 1.0); gateway p50 / affinity off = {:.3}",
            r(on.later.0, h.later.0),
            r(on.later.1, h.later.1),
            on.per_second / h.per_second.max(1e-9),
            r(on.later.0, off.later.0),
        );
    }
}
