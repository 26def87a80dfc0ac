//! The real engine (issue 22): llama.cpp's llama-server, started by the sim for a loaded model
//! as Ollama starts its runner, running SmolLM2-135M as a fleet on the real containerd.

use std::time::Duration;

use fleet_e2e::{World, free_port_range, request};
use serde_json::{Value, json};

const MODEL: &str = "smollm2:135m";

/// A fleet of `n` real-engine instances, each with `memory` and one CPU.
fn engine_fleet(world: &World, image: &str, name: &str, n: u32, base: u16, memory: &str) -> String {
    world
        .sim_fleet(name, n, base, "")
        .replace(&world.ns.env.sim_image, image)
        .replace("cpus: 0.5, memory: 128Mi", &format!("cpus: 1, memory: {memory}"))
        .replace(
            "probes: {readiness: {periodSeconds: 1, timeoutSeconds: 1}}",
            "probes: {readiness: {periodSeconds: 1, timeoutSeconds: 2}, startupTimeoutSeconds: 300}",
        )
}

/// `POST /api/generate` to an instance, whole; the answer.
async fn generate(address: &str, prompt: &str, tokens: u32) -> Value {
    let body = json!({"model": MODEL, "prompt": prompt, "stream": false, "options": {"num_predict": tokens}});
    let (code, text) = request(
        "POST",
        &format!("http://{address}/api/generate"),
        Some(&body),
        Duration::from_secs(300),
    )
    .await
    .expect("generate");
    assert_eq!(code, 200, "{text}");
    serde_json::from_str(&text).expect("json")
}

/// A long prompt: a document of `words` words, and a question.
fn document(words: usize, seed: usize) -> String {
    let text: Vec<String> = (0..words)
        .map(|i| format!("item{} is {}", (i * 7 + seed) % 97, (i * 13 + seed) % 89))
        .collect();
    format!("Here is a list. {}. What is item5?", text.join(", "))
}

/// The real engine runs as a fleet: the instance gets ready with its model loaded (a
/// llama-server child), answers with real tokens, and its prompt cache makes a repeated long
/// prompt cheap (Ollama's counts: prompt_eval_count includes cached tokens,
/// prompt_eval_duration covers only the evaluated ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_engine_serves_a_fleet_and_caches_prompts() {
    let world = World::new("engine-one");
    let image = world.import_engine();
    let base = free_port_range(1);
    let manifest = engine_fleet(&world, &image, "e", 1, base, "1Gi");
    world.cli_ok(&["apply", "-f", "-"], Some(&manifest));
    let agent = world.agent("node-1", &[]);
    world
        .wait_status("e", "ready with the model loaded", 300, |s| {
            s["readyReplicas"] == 1
        })
        .await;
    let address = agent.listed(Some("e")).await[0]["address"]
        .as_str()
        .expect("address")
        .to_string();
    let short = generate(&address, "Say hello.", 8).await;
    assert!(
        short["response"]
            .as_str()
            .is_some_and(|r| !r.trim().is_empty()),
        "{short}"
    );
    assert!(
        short["eval_count"]
            .as_u64()
            .is_some_and(|n| (1..=8).contains(&n)),
        "{short}"
    );
    let prompt = document(120, 1);
    let first = generate(&address, &prompt, 4).await;
    let again = generate(&address, &prompt, 4).await;
    let count = |v: &Value| v["prompt_eval_count"].as_u64().unwrap_or(0);
    let took = |v: &Value| v["prompt_eval_duration"].as_u64().unwrap_or(0);
    eprintln!(
        "engine: {} prompt tokens in {} ms, again in {} ms",
        count(&first),
        took(&first) / 1_000_000,
        took(&again) / 1_000_000
    );
    assert!(count(&first) > 300, "{first}");
    assert_eq!(
        count(&again),
        count(&first),
        "the count includes cached tokens"
    );
    assert!(
        took(&again) * 5 < took(&first),
        "the repeated prompt was evaluated again: {} vs {} ns",
        took(&again),
        took(&first)
    );
}
