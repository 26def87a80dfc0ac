//! Conversation affinity (issue 22) with the real containerd, etcd and sim instances that model
//! the engine's prompt cache: a conversation's next turn goes back to the instance that holds
//! its prefix (native chat, OpenAI chat, generate with `context`), and a hot conversation does
//! not pin one instance while others idle.

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_e2e::http::request_as;
use fleet_e2e::{World, free_port, free_port_range};
use serde_json::{Value, json};

const MODEL: &str = "smollm2:135m";

/// Prompt tokens per second the sims evaluate (a 2,300-word conversation: 4.6 s anywhere it
/// is not cached).
const PREFILL: u32 = 500;

/// A long text of `words` words, different for each `seed`.
fn document(words: usize, seed: usize) -> String {
    let text: Vec<String> = (0..words)
        .map(|i| format!("w{}x{}", (i * 7 + seed * 31) % 997, i % 13))
        .collect();
    text.join(" ")
}

/// `POST route` through the gateway; the answer (status 200 asserted).
async fn post(url: &str, route: &str, body: &Value, headers: &[(&str, &str)]) -> Value {
    let (code, _, text) = request_as(
        "POST",
        &format!("{url}{route}"),
        headers,
        Some(body),
        Duration::from_secs(120),
    )
    .await
    .expect(route);
    assert_eq!(code, 200, "{route}: {text}");
    serde_json::from_str(&text).expect("json")
}

fn prompt_ms(answer: &Value) -> u64 {
    answer["prompt_eval_duration"].as_u64().unwrap_or(u64::MAX) / 1_000_000
}

/// A conversation of `turns` turns on `route`; the prompt evaluation times of its turns in ms
/// (none for the OpenAI route, whose answer does not say).
async fn converse(url: String, route: &'static str, seed: usize, turns: usize) -> Vec<u64> {
    let system = document(300, 0);
    let doc = format!("Document {seed}: {}", document(2000, seed));
    let mut times = Vec::new();
    match route {
        "/api/generate" => {
            let mut context = Value::Null;
            for turn in 0..turns {
                let prompt = if turn == 0 {
                    doc.clone()
                } else {
                    format!("question {turn} about it")
                };
                let body = json!({"model": MODEL, "system": system, "prompt": prompt, "context": context,
                    "stream": false, "options": {"num_predict": 4}});
                let answer = post(&url, route, &body, &[]).await;
                context = answer["context"].clone();
                times.push(prompt_ms(&answer));
            }
        }
        _ => {
            let mut messages = vec![
                json!({"role": "system", "content": system}),
                json!({"role": "user", "content": doc}),
            ];
            for turn in 0..turns {
                if turn > 0 {
                    messages.push(
                        json!({"role": "user", "content": format!("question {turn} about it")}),
                    );
                }
                let body = if route == "/api/chat" {
                    json!({"model": MODEL, "messages": messages, "stream": false, "options": {"num_predict": 4}})
                } else {
                    json!({"model": MODEL, "messages": messages, "max_tokens": 4})
                };
                let answer = post(&url, route, &body, &[]).await;
                let content = if route == "/api/chat" {
                    times.push(prompt_ms(&answer));
                    answer["message"]["content"].clone()
                } else {
                    answer["choices"][0]["message"]["content"].clone()
                };
                messages.push(json!({"role": "assistant", "content": content}));
            }
        }
    }
    times
}

/// Requests each instance has been sent, from the gateway's metrics.
async fn served(agent: &fleet_e2e::AgentProcess) -> BTreeMap<String, u64> {
    let (_, text) = agent.get("/metrics").await.expect("metrics");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("ollama_fleet_instance_requests_total{")?;
            let id = rest.split("instance=\"").nth(1)?.split('"').next()?;
            let n = l.rsplit(' ').next()?.parse::<f64>().ok()?;
            Some((id.to_string(), n as u64))
        })
        .collect()
}

/// Four conversations at once on four instances, one per route kind: every later turn goes
/// back to its conversation's instance (a hit, counted), where only its new words are
/// evaluated; then eight requests of one hot session at once: one of them may wait for the
/// session's instance, the rest are served by the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_go_back_to_the_instance_that_holds_them() {
    let world = World::new("affinity");
    let base = free_port_range(4);
    let manifest = world.sim_fleet("a", 4, base, "").replace(
        "SIM_LOAD_TIME: 50ms}",
        &format!("SIM_LOAD_TIME: 50ms, SIM_PREFILL_TOKENS_PER_SECOND: \"{PREFILL}\", SIM_TOKENS_PER_SECOND: \"40\"}}"),
    );
    world.cli_ok(&["apply", "-f", "-"], Some(&manifest));
    let serve = free_port();
    let agent = world.agent("node-1", &["--serve", &format!("127.0.0.1:{serve}")]);
    world
        .wait_status("a", "4 ready", 120, |s| s["readyReplicas"] == 4)
        .await;
    let url = format!("http://127.0.0.1:{serve}");
    let turns = 4;
    let routes = [
        "/api/chat",
        "/api/chat",
        "/v1/chat/completions",
        "/api/generate",
    ];
    let conversations: Vec<_> = routes
        .iter()
        .enumerate()
        .map(|(seed, route)| tokio::spawn(converse(url.clone(), route, seed + 1, turns)))
        .collect();
    for (route, c) in routes.iter().zip(conversations) {
        let times = c.await.expect("conversation");
        eprintln!("{route}: prompt evaluation per turn (ms): {times:?}");
        if let Some((first, later)) = times.split_first() {
            assert!(
                *first >= 1000,
                "{route}: the first turn is evaluated whole: {times:?}"
            );
            for t in later {
                assert!(
                    t * 10 < *first,
                    "{route}: a later turn was evaluated again: {times:?}"
                );
            }
        }
    }
    let later_turns = (routes.len() * (turns - 1)) as f64;
    assert_eq!(
        agent.metric("ollama_fleet_affinity_hits_total").await,
        later_turns
    );
    assert_eq!(
        agent.metric("ollama_fleet_affinity_misses_total").await,
        0.0
    );
    let cached = agent
        .metric("ollama_fleet_prompt_cached_tokens_total")
        .await;
    assert!(
        cached > later_turns * 2000.0,
        "cached prompt tokens: {cached}"
    );

    // A hot session: its instance takes one request and at most one waits for it; the others
    // go to the idle instances.
    let session = [("x-session-id", "hot-1")];
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": document(2000, 9)}],
        "stream": false, "options": {"num_predict": 20}});
    post(&url, "/api/chat", &body, &session).await;
    let before = served(&agent).await;
    let burst: Vec<_> = (0..8)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            tokio::spawn(async move {
                post(&url, "/api/chat", &body, &[("x-session-id", "hot-1")]).await
            })
        })
        .collect();
    for b in burst {
        b.await.expect("burst");
    }
    let after = served(&agent).await;
    let sent: Vec<u64> = after
        .iter()
        .map(|(id, n)| n - before.get(id).copied().unwrap_or(0))
        .collect();
    eprintln!("the hot session's 8 requests per instance: {sent:?}");
    assert_eq!(sent.iter().sum::<u64>(), 8);
    assert!(
        sent.iter().filter(|n| **n > 0).count() >= 3,
        "a hot session pinned its instance: {sent:?}"
    );
}
