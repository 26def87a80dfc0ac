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

/// The memory cgroup's figures of an instance (cgroup v1): (resident anonymous memory, OOM
/// kills so far).
fn memory_of(world: &World, id: &str) -> (u64, u64) {
    let (_, pid) = world.ns.task(id).expect("task");
    let dir = fleet_e2e::containerd::cgroup_v1_dir(pid, "memory").expect("memory cgroup");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let field = |text: &str, key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (
        field(&read("memory.stat"), "total_rss "),
        field(&read("memory.oom_control"), "oom_kill "),
    )
}

/// Distinct long prompts to one instance (until `prompts`, or an OOM kill when `until_oom`);
/// returns how many were answered and its resident memory after each.
async fn flood(
    world: &World,
    address: &str,
    id: &str,
    prompts: usize,
    until_oom: bool,
) -> (usize, Vec<u64>) {
    let mut answered = 0;
    let mut rss = Vec::new();
    for i in 0..prompts {
        let body = json!({"model": MODEL, "prompt": document(120, 1000 + i), "stream": false, "options": {"num_predict": 2}});
        if let Ok((200, text)) = request(
            "POST",
            &format!("http://{address}/api/generate"),
            Some(&body),
            Duration::from_secs(300),
        )
        .await
            && serde_json::from_str::<Value>(&text).is_ok_and(|v| v["done"] == true)
        {
            answered += 1;
        }
        let (bytes, oom_kills) = memory_of(world, id);
        rss.push(bytes >> 20);
        if until_oom && oom_kills > 0 {
            break;
        }
    }
    (answered, rss)
}

/// Issue 22: an instance of 512Mi sent distinct long prompts. Its prompt cache is sized from
/// its memory (the model, its context's KV cache and a margin taken off), so nothing is
/// OOM-killed, every request is answered, and its memory levels off. With the engine's own cap
/// (8 GiB, Ollama's default) the same flood OOM-kills the runner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_prompt_cache_keeps_an_instance_within_its_memory() {
    let world = World::new("engine-memory");
    let image = world.import_engine();
    let base = free_port_range(2);
    let bounded = engine_fleet(&world, &image, "m", 1, base, "512Mi");
    world.cli_ok(&["apply", "-f", "-"], Some(&bounded));
    let agent = world.agent("node-1", &[]);
    let s = world
        .wait_status("m", "ready with a sized prompt cache", 300, |s| {
            s["readyReplicas"] == 1 && s["promptCache"].as_str().is_some_and(|c| c.ends_with("Mi"))
        })
        .await;
    let cache = s["promptCache"].as_str().unwrap_or_default().to_string();
    let listed = agent.listed(Some("m")).await;
    let (id, address) = (
        listed[0]["id"].as_str().expect("id").to_string(),
        listed[0]["address"].as_str().expect("address").to_string(),
    );
    let env = world.ns.ctr_ok(&["containers", "info", &id]);
    assert!(
        env.contains("LLAMA_ARG_CACHE_RAM="),
        "the instance's environment: {env}"
    );
    let (answered, rss) = flood(&world, &address, &id, 12, false).await;
    let (_, oom_kills) = memory_of(&world, &id);
    eprintln!(
        "bounded ({cache}): {answered}/12 answered, {oom_kills} OOM kills, RSS MiB after each: {rss:?}"
    );
    assert_eq!(answered, 12);
    assert_eq!(oom_kills, 0);
    let s = &world.statuses("m")[0];
    assert!(
        s["instances"]
            .as_array()
            .is_some_and(|a| a.iter().all(|i| i["restarts"] == 0)),
        "{s}"
    );
    let (last, before) = (rss[11], rss[7]);
    assert!(
        last < before + 24 && last < 480,
        "memory does not level off: {rss:?}"
    );
    assert!(
        world
            .cli_ok(&["describe", "fleet", "m"], None)
            .contains("Prompt cache:"),
        "describe shows it"
    );

    // The engine's own cap, as Ollama leaves it: the runner is OOM-killed.
    world.cli_ok(&["delete", "fleet", "m"], None);
    let unbounded = engine_fleet(&world, &image, "u", 1, base + 1, "512Mi")
        .replace("memory: 512Mi", "memory: 512Mi, promptCache: engine");
    world.cli_ok(&["apply", "-f", "-"], Some(&unbounded));
    world
        .wait_status("u", "ready", 300, |s| s["readyReplicas"] == 1)
        .await;
    let listed = agent.listed(Some("u")).await;
    let (id, address) = (
        listed[0]["id"].as_str().expect("id").to_string(),
        listed[0]["address"].as_str().expect("address").to_string(),
    );
    let (answered, rss) = flood(&world, &address, &id, 24, true).await;
    let (_, oom_kills) = memory_of(&world, &id);
    eprintln!(
        "the engine's own cap: {answered}/{} answered, {oom_kills} OOM kills, RSS MiB after each: {rss:?}",
        rss.len()
    );
    assert!(
        oom_kills > 0,
        "the unbounded cache did not fill the memory: {rss:?}"
    );
}
