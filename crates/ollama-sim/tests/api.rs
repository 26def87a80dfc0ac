//! The sim's HTTP API, served in-process on a loopback port.

use std::time::Duration;

use fleet_e2e::{get, json, post, post_lines, request, wait_for};
use serde_json::json;

mod common;
use common::start;

/// Waits until nothing is loaded.
async fn unloaded(url: &str, what: &str) {
    wait_for(what, Duration::from_secs(5), || async {
        let (_, ps) = get(&format!("{url}/api/ps")).await;
        (json(&ps)["models"] == json!([])).then_some(())
    })
    .await;
}

async fn pulled(tag: &str, vars: &[(&str, &str)]) -> String {
    let url = start(tag, vars).await;
    let (status, lines) =
        post_lines(&format!("{url}/api/pull"), json!({"model": "smollm2:135m"})).await;
    assert_eq!(status, 200);
    assert_eq!(lines.last(), Some(&json!({"status": "success"})));
    url
}

#[tokio::test]
async fn health_and_version() {
    let url = start("health", &[("SIM_VERSION", "0.5.7")]).await;
    assert_eq!(
        get(&format!("{url}/")).await,
        (200, "Ollama is running".into())
    );
    let (status, body) = request("HEAD", &format!("{url}/"), None, Duration::from_secs(5))
        .await
        .expect("HEAD");
    assert_eq!((status, body.as_str()), (200, ""));
    let (status, body) = get(&format!("{url}/api/version")).await;
    assert_eq!(status, 200);
    assert_eq!(json(&body), json!({"version": "0.5.7"}));
    assert_eq!(
        get(&format!("{url}/health")).await.0,
        404,
        "Ollama has no /health"
    );
}

#[tokio::test]
async fn generate_needs_a_pulled_model() {
    let url = start("notpulled", &[]).await;
    let (status, body) = post(
        &format!("{url}/api/generate"),
        json!({"model": "smollm2:135m", "prompt": "hi"}),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(
        json(&body)["error"],
        "model 'smollm2:135m' not found",
        "current Ollama's words (GenerateHandler)"
    );
    let (status, body) = post(&format!("{url}/api/generate"), json!({"prompt": "hi"})).await;
    assert_eq!(
        (status, json(&body)["error"].clone()),
        (400, json!("model is required"))
    );
    let (status, _) = request(
        "POST",
        &format!("{url}/api/generate"),
        None,
        Duration::from_secs(5),
    )
    .await
    .expect("post");
    assert_eq!(status, 400);
}

#[tokio::test]
async fn pull_streams_progress_and_is_idempotent() {
    let url = start("pull", &[]).await;
    let (status, lines) =
        post_lines(&format!("{url}/api/pull"), json!({"model": "smollm2:135m"})).await;
    assert_eq!(status, 200);
    let statuses: Vec<&str> = lines.iter().filter_map(|l| l["status"].as_str()).collect();
    assert_eq!(statuses.first(), Some(&"pulling manifest"));
    assert!(
        statuses
            .iter()
            .any(|s| s.starts_with("pulling ") && *s != "pulling manifest")
    );
    assert_eq!(
        &statuses[statuses.len() - 3..],
        ["verifying sha256 digest", "writing manifest", "success"]
    );
    let progress: Vec<u64> = lines
        .iter()
        .filter_map(|l| l["completed"].as_u64())
        .collect();
    assert!(
        progress.windows(2).all(|w| w[0] <= w[1]),
        "progress only grows: {progress:?}"
    );
    assert_eq!(
        lines.iter().filter_map(|l| l["total"].as_u64()).next(),
        Some(2 << 20)
    );

    let (_, tags) = get(&format!("{url}/api/tags")).await;
    let tags = json(&tags);
    assert_eq!(tags["models"][0]["name"], "smollm2:135m");
    let digest = tags["models"][0]["digest"].clone();

    // Again, not streamed: same model, same digest.
    let (status, body) = post(
        &format!("{url}/api/pull"),
        json!({"model": "smollm2:135m", "stream": false}),
    )
    .await;
    assert_eq!((status, json(&body)), (200, json!({"status": "success"})));
    let (_, tags) = get(&format!("{url}/api/tags")).await;
    assert_eq!(json(&tags)["models"].as_array().map(Vec::len), Some(1));
    assert_eq!(json(&tags)["models"][0]["digest"], digest);
}

#[tokio::test]
async fn pull_of_a_missing_model_fails() {
    let url = start("missing", &[("SIM_PULL_MISSING", "nope:1b")]).await;
    let (status, lines) = post_lines(&format!("{url}/api/pull"), json!({"model": "nope:1b"})).await;
    assert_eq!(status, 200, "errors in a stream come as a line");
    assert!(
        lines
            .last()
            .and_then(|l| l["error"].as_str())
            .is_some_and(|e| e.contains("file does not exist"))
    );
    let (status, body) = post(
        &format!("{url}/api/pull"),
        json!({"model": "nope:1b", "stream": false}),
    )
    .await;
    assert_eq!(status, 500);
    assert!(
        json(&body)["error"]
            .as_str()
            .is_some_and(|e| e.contains("file does not exist"))
    );
    let (_, tags) = get(&format!("{url}/api/tags")).await;
    assert_eq!(json(&tags)["models"], json!([]));
}

#[tokio::test]
async fn empty_prompt_loads_and_keep_alive_zero_unloads() {
    let url = pulled("load", &[]).await;
    let (status, body) = post(
        &format!("{url}/api/generate"),
        json!({"model": "smollm2:135m", "keep_alive": -1}),
    )
    .await;
    assert_eq!(status, 200);
    let body = json(&body);
    assert_eq!(
        (body["done"].clone(), body["done_reason"].clone()),
        (json!(true), json!("load"))
    );
    let (_, ps) = get(&format!("{url}/api/ps")).await;
    let ps = json(&ps);
    assert_eq!(ps["models"][0]["name"], "smollm2:135m");
    assert_eq!(ps["models"][0]["size"], 2 << 20);
    assert!(
        ps["models"][0]["expires_at"]
            .as_str()
            .is_some_and(|e| e.starts_with("23")),
        "forever: {ps}"
    );

    let (_, body) = post(
        &format!("{url}/api/generate"),
        json!({"model": "smollm2:135m", "prompt": "", "keep_alive": 0}),
    )
    .await;
    assert_eq!(json(&body)["done_reason"], "unload");
    let (_, ps) = get(&format!("{url}/api/ps")).await;
    assert_eq!(json(&ps)["models"], json!([]));
}

#[tokio::test]
async fn keep_alive_expires() {
    let url = pulled("expire", &[("OLLAMA_KEEP_ALIVE", "300ms")]).await;
    post(
        &format!("{url}/api/generate"),
        json!({"model": "smollm2:135m", "prompt": "hi", "stream": false}),
    )
    .await;
    let (_, ps) = get(&format!("{url}/api/ps")).await;
    assert_eq!(
        json(&ps)["models"].as_array().map(Vec::len),
        Some(1),
        "loaded right after the request"
    );
    unloaded(&url, "the model to unload after its keep-alive").await;
}

#[tokio::test]
async fn generate_streams_tokens_then_stats() {
    let url = pulled("gen", &[]).await;
    let req = json!({"model": "smollm2:135m", "prompt": "why is the sky blue", "options": {"num_predict": 5}});
    let (status, lines) = post_lines(&format!("{url}/api/generate"), req.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(lines.len(), 6, "5 tokens and a final line: {lines:?}");
    assert!(
        lines[..5]
            .iter()
            .all(|l| l["done"] == false && l["response"].as_str().is_some_and(|r| !r.is_empty()))
    );
    let last = &lines[5];
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "length");
    assert_eq!(last["eval_count"], 5);
    assert_eq!(last["prompt_eval_count"], 5);
    for field in [
        "total_duration",
        "load_duration",
        "eval_duration",
        "created_at",
        "context",
    ] {
        assert!(!last[field].is_null(), "{field} missing in {last}");
    }

    let mut req = req;
    req["stream"] = json!(false);
    let (status, body) = post(&format!("{url}/api/generate"), req).await;
    let body = json(&body);
    assert_eq!(status, 200);
    assert_eq!(body["done"], true);
    assert_eq!(body["response"], " The quick brown fox jumps");
}

#[tokio::test]
async fn chat_answers_with_a_message() {
    let url = pulled("chat", &[]).await;
    let msgs = json!([{"role": "user", "content": "hello"}]);
    let (status, lines) = post_lines(
        &format!("{url}/api/chat"),
        json!({"model": "smollm2:135m", "messages": msgs}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(lines.len() > 1);
    assert_eq!(lines[0]["message"]["role"], "assistant");
    assert_eq!(lines.last().map(|l| l["done"].clone()), Some(json!(true)));
    let (_, body) = post(
        &format!("{url}/api/chat"),
        json!({"model": "smollm2:135m", "messages": msgs, "stream": false}),
    )
    .await;
    assert!(
        json(&body)["message"]["content"]
            .as_str()
            .is_some_and(|c| c.starts_with(" The"))
    );
    let (_, body) = post(
        &format!("{url}/api/chat"),
        json!({"model": "smollm2:135m", "messages": []}),
    )
    .await;
    assert_eq!(json(&body)["done_reason"], "load");
}

#[tokio::test]
async fn requests_to_a_loaded_model_wait_without_bound() {
    // As in Ollama (server/sched.go): a request for a loaded model gets the runner at once and
    // waits for a slot; OLLAMA_MAX_QUEUE does not apply to it.
    let url = pulled(
        "queue",
        &[
            ("OLLAMA_NUM_PARALLEL", "1"),
            ("OLLAMA_MAX_QUEUE", "1"),
            ("SIM_TOKENS_PER_SECOND", "50"),
        ],
    )
    .await;
    let (status, _) = post(
        &format!("{url}/api/generate"),
        json!({"model": "smollm2:135m", "keep_alive": -1}),
    )
    .await;
    assert_eq!(status, 200, "loaded");
    let slow = json!({"model": "smollm2:135m", "prompt": "long", "stream": false, "options": {"num_predict": 10}});
    let requests: Vec<_> = (0..4)
        .map(|_| {
            let (url, slow) = (url.clone(), slow.clone());
            tokio::spawn(async move { post(&format!("{url}/api/generate"), slow).await.0 })
        })
        .collect();
    wait_for(
        "four requests in flight",
        Duration::from_secs(5),
        || async {
            let (_, s) = get(&format!("{url}/sim/state")).await;
            (json(&s)["inFlight"].as_u64() >= Some(3)).then_some(())
        },
    )
    .await;
    for r in requests {
        assert_eq!(
            r.await.expect("request"),
            200,
            "queued behind a loaded model, never refused"
        );
    }
}

#[tokio::test]
async fn requests_that_must_load_beyond_the_queue_get_503() {
    // Only requests that must load a model queue: one load under way plus OLLAMA_MAX_QUEUE
    // waiting; more get Ollama's 503.
    let url = pulled(
        "loadq",
        &[
            ("OLLAMA_NUM_PARALLEL", "1"),
            ("OLLAMA_MAX_QUEUE", "1"),
            ("SIM_LOAD_TIME", "1s"),
        ],
    )
    .await;
    let load = json!({"model": "smollm2:135m", "prompt": "x", "stream": false, "options": {"num_predict": 1}});
    let first: Vec<_> = (0..2)
        .map(|_| {
            let (url, load) = (url.clone(), load.clone());
            tokio::spawn(async move { post(&format!("{url}/api/generate"), load).await.0 })
        })
        .collect();
    wait_for(
        "two requests waiting for the load",
        Duration::from_secs(5),
        || async {
            let (_, s) = get(&format!("{url}/sim/state")).await;
            (json(&s)["inFlight"] == 2).then_some(())
        },
    )
    .await;
    let (status, body) = post(&format!("{url}/api/generate"), load).await;
    assert_eq!(status, 503);
    assert_eq!(
        json(&body)["error"],
        "server busy, please try again.  maximum pending requests exceeded"
    );
    for r in first {
        assert_eq!(r.await.expect("request"), 200, "the queued load is served");
    }
}

#[tokio::test]
async fn create_derives_a_model_with_parameters() {
    let url = pulled("create", &[("SIM_PULL_MISSING", "gone:1")]).await;
    let (status, lines) = post_lines(
        &format!("{url}/api/create"),
        json!({"model": "smol-2t", "from": "smollm2:135m", "parameters": {"num_thread": 2}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(lines.last(), Some(&json!({"status": "success"})));
    // Current Ollama ignores the older modelfile form.
    let (status, body) = post(
        &format!("{url}/api/create"),
        json!({"name": "smol-3t", "modelfile": "FROM smollm2:135m\nPARAMETER num_thread 3", "stream": false}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        json(&body)["error"],
        "neither 'from' or 'files' was specified"
    );
    let (status, _) = post(
        &format!("{url}/api/create"),
        json!({"model": "smol-3t", "from": "smollm2:135m", "parameters": {"num_thread": 3}, "system": "Be brief.", "template": "{{ .System }} {{ .Prompt }}", "stream": false}),
    )
    .await;
    assert_eq!(status, 200);
    let (_, show3) = post(&format!("{url}/api/show"), json!({"model": "smol-3t"})).await;
    let show3 = json(&show3);
    assert_eq!(show3["system"], "Be brief.");
    assert_eq!(show3["template"], "{{ .System }} {{ .Prompt }}");

    let (status, show) = post(&format!("{url}/api/show"), json!({"model": "smol-2t"})).await;
    assert_eq!(status, 200);
    let show = json(&show);
    assert!(
        show["parameters"]
            .as_str()
            .is_some_and(|p| p.starts_with("num_thread") && p.ends_with(" 2")),
        "{show}"
    );
    assert!(
        show["modelfile"]
            .as_str()
            .is_some_and(|m| m.contains("PARAMETER num_thread 2"))
    );
    assert_eq!(
        post(&format!("{url}/api/show"), json!({"model": "absent"}))
            .await
            .0,
        404
    );

    post(
        &format!("{url}/api/generate"),
        json!({"model": "smol-3t", "keep_alive": -1}),
    )
    .await;
    let (_, ps) = get(&format!("{url}/api/ps")).await;
    assert_eq!(
        json(&ps)["models"][0]["num_thread"],
        3,
        "the runner uses the model's num_thread"
    );

    let (_, tags) = get(&format!("{url}/api/tags")).await;
    assert_eq!(json(&tags)["models"].as_array().map(Vec::len), Some(3));
    // A `from` that is not here is pulled first, its progress in the create's stream.
    let (status, lines) = post_lines(
        &format!("{url}/api/create"),
        json!({"model": "x", "from": "absent:1"}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        lines.iter().any(|l| l["status"] == "pulling manifest"),
        "{lines:?}"
    );
    assert_eq!(lines.last(), Some(&json!({"status": "success"})));
    let (_, tags) = get(&format!("{url}/api/tags")).await;
    assert_eq!(
        json(&tags)["models"].as_array().map(Vec::len),
        Some(5),
        "absent:1 and x"
    );
    let (status, _) = post(
        &format!("{url}/api/create"),
        json!({"model": "y", "from": "gone:1", "stream": false}),
    )
    .await;
    assert_ne!(status, 200, "a from that cannot be pulled fails the create");
}

#[tokio::test]
async fn loaded_models_are_capped() {
    let url = pulled("cap", &[("OLLAMA_MAX_LOADED_MODELS", "1")]).await;
    // Other weights: a second model.
    let (status, _) = post(
        &format!("{url}/api/pull"),
        json!({"model": "other:1b", "stream": false}),
    )
    .await;
    assert_eq!(status, 200);
    post(
        &format!("{url}/api/generate"),
        json!({"model": "smollm2:135m"}),
    )
    .await;
    post(&format!("{url}/api/generate"), json!({"model": "other:1b"})).await;
    let (_, ps) = get(&format!("{url}/api/ps")).await;
    let ps = json(&ps);
    assert_eq!(ps["models"].as_array().map(Vec::len), Some(1));
    assert_eq!(ps["models"][0]["name"], "other:1b");
}

/// Like Ollama's scheduler, runners are keyed by the weights: another name of the same weights
/// with the same options shares the loaded runner; different options (the thread count) reload.
#[tokio::test]
async fn names_of_the_same_weights_share_a_runner_unless_options_differ() {
    let url = pulled("share", &[]).await;
    for (name, threads) in [("same", 4), ("more", 6)] {
        let (status, _) = post(
            &format!("{url}/api/create"),
            json!({"model": name, "from": "smollm2:135m", "parameters": {"num_thread": threads}, "stream": false}),
        )
        .await;
        assert_eq!(status, 200);
    }
    let loads = |url: String| async move {
        let (_, state) = get(&format!("{url}/sim/state")).await;
        json(&state)["loads"].as_u64().expect("loads")
    };
    post(
        &format!("{url}/api/generate"),
        json!({"model": "same", "keep_alive": -1}),
    )
    .await;
    assert_eq!(loads(url.clone()).await, 1);
    // The same weights and thread count under another name: no reload.
    let (_, body) = post(
        &format!("{url}/api/generate"),
        json!({"model": "same", "prompt": "hi", "options": {"num_thread": 4}, "stream": false}),
    )
    .await;
    assert_eq!(json(&body)["done"], true);
    assert_eq!(loads(url.clone()).await, 1, "no reload for equal options");
    // Another thread count: a reload.
    post(
        &format!("{url}/api/generate"),
        json!({"model": "more", "prompt": "hi", "stream": false}),
    )
    .await;
    assert_eq!(
        loads(url.clone()).await,
        2,
        "a different num_thread reloads"
    );
    let (_, ps) = get(&format!("{url}/api/ps")).await;
    assert_eq!(json(&ps)["models"][0]["name"], "more:latest");
}

#[tokio::test]
async fn leak_grows_memory() {
    let url = start("leak", &[]).await;
    let (status, _) = post(&format!("{url}/sim/leak"), json!({"rate": "20Mi"})).await;
    assert_eq!(status, 200);
    wait_for(
        "leaked memory to grow past 2 MiB",
        Duration::from_secs(5),
        || async {
            let (_, s) = get(&format!("{url}/sim/state")).await;
            (json(&s)["leakedBytes"].as_u64().unwrap_or(0) > 2 << 20).then_some(())
        },
    )
    .await;
    assert_eq!(
        post(&format!("{url}/sim/leak"), json!({"rate": "lots"}))
            .await
            .0,
        400
    );
}

#[tokio::test]
async fn hang_stops_all_answers() {
    let url = start("hang", &[]).await;
    assert_eq!(post(&format!("{url}/sim/hang"), json!({})).await.0, 200);
    let after = request(
        "GET",
        &format!("{url}/api/version"),
        None,
        Duration::from_millis(500),
    )
    .await;
    assert!(after.is_err(), "a hung sim must not answer, got {after:?}");
}

#[tokio::test]
async fn delete_removes_a_model() {
    let url = pulled("delete", &[]).await;
    let (status, _) = request(
        "DELETE",
        &format!("{url}/api/delete"),
        Some(&json!({"model": "smollm2:135m"})),
        Duration::from_secs(5),
    )
    .await
    .expect("delete");
    assert_eq!(status, 200);
    let (_, tags) = get(&format!("{url}/api/tags")).await;
    assert_eq!(json(&tags)["models"], json!([]));
}

/// Embedding models (issue 12): they refuse generate and chat before loading anything, load on
/// an embed without input, embed strings and lists, and say so in /api/show.
#[tokio::test]
async fn embedding_models_embed_and_refuse_generation() {
    let url = start("embed", &[]).await;
    let (status, lines) = post_lines(
        &format!("{url}/api/pull"),
        json!({"model": "all-minilm:22m"}),
    )
    .await;
    assert_eq!(
        (status, lines.last()),
        (200, Some(&json!({"status": "success"})))
    );
    for (route, what) in [("generate", "generate"), ("chat", "chat")] {
        let (status, body) = post(
            &format!("{url}/api/{route}"),
            json!({"model": "all-minilm:22m", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(status, 400, "{route}");
        assert_eq!(
            json(&body)["error"],
            format!("\"all-minilm:22m\" does not support {what}")
        );
    }
    let (_, ps) = get(&format!("{url}/api/ps")).await;
    assert_eq!(
        json(&ps)["models"],
        json!([]),
        "nothing was loaded by a refusal"
    );
    // No input: loads and pins it.
    let (status, body) = post(
        &format!("{url}/api/embed"),
        json!({"model": "all-minilm:22m", "keep_alive": -1}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["embeddings"], json!([]));
    let (_, ps) = get(&format!("{url}/api/ps")).await;
    assert_eq!(json(&ps)["models"][0]["name"], "all-minilm:22m");
    // A string and a list; the same text embeds the same.
    let (status, one) = post(
        &format!("{url}/api/embed"),
        json!({"model": "all-minilm:22m", "input": "hello"}),
    )
    .await;
    assert_eq!(status, 200);
    let (_, two) = post(
        &format!("{url}/api/embed"),
        json!({"model": "all-minilm:22m", "input": ["hello", "world"]}),
    )
    .await;
    let (one, two) = (json(&one), json(&two));
    assert_eq!(one["embeddings"].as_array().map(Vec::len), Some(1));
    assert_eq!(one["embeddings"][0].as_array().map(Vec::len), Some(384));
    assert_eq!(two["embeddings"][0], one["embeddings"][0]);
    assert_ne!(two["embeddings"][1], one["embeddings"][0]);
    let (status, _) = post(
        &format!("{url}/api/embed"),
        json!({"model": "all-minilm:22m", "input": 42}),
    )
    .await;
    assert_eq!(status, 400);
    let (status, legacy) = post(
        &format!("{url}/api/embeddings"),
        json!({"model": "all-minilm:22m", "prompt": "hello"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(json(&legacy)["embedding"], one["embeddings"][0]);
    let (_, show) = post(
        &format!("{url}/api/show"),
        json!({"model": "all-minilm:22m"}),
    )
    .await;
    assert_eq!(json(&show)["capabilities"], json!(["embedding"]));
    let (status, _) = post(
        &format!("{url}/api/embed"),
        json!({"model": "nope", "input": "x"}),
    )
    .await;
    assert_eq!(status, 404);
}

/// As in Ollama, a request without `keep_alive` keeps the runner's current one: a model pinned
/// with -1 stays loaded past OLLAMA_KEEP_ALIVE.
#[tokio::test]
async fn a_request_without_keep_alive_keeps_the_pin() {
    let url = pulled("pin", &[("OLLAMA_KEEP_ALIVE", "300ms")]).await;
    let (status, _) = post(
        &format!("{url}/api/generate"),
        json!({"model": "smollm2:135m", "keep_alive": -1}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = post(
        &format!("{url}/api/generate"),
        json!({"model": "smollm2:135m", "prompt": "hi", "stream": false, "options": {"num_predict": 1}}),
    )
    .await;
    assert_eq!(status, 200);
    fleet_e2e::holds_for(
        "the pin past the default keep-alive",
        Duration::from_millis(1200),
        || async {
            let (_, ps) = get(&format!("{url}/api/ps")).await;
            json(&ps)["models"][0]["name"] == "smollm2:135m"
        },
    )
    .await;
    // Saying one changes it.
    post(
        &format!("{url}/api/generate"),
        json!({"model": "smollm2:135m", "prompt": "hi", "stream": false, "keep_alive": "200ms", "options": {"num_predict": 1}}),
    )
    .await;
    unloaded(&url, "unloaded after its new keep-alive").await;
}

/// The sim reads request keys as Ollama does (Go's encoding/json): in any case, the Kelvin sign
/// as a `k`; of several keys for one field the last wins; `options` objects merge.
#[tokio::test]
async fn keys_are_read_as_go_reads_them() {
    let url = pulled("gokeys", &[]).await;
    let (status, _) = post(
        &format!("{url}/api/generate"),
        json!({"model": "smollm2:135m", "keep_alive": -1}),
    )
    .await;
    assert_eq!(status, 200);
    let body = "{\"model\":\"nope\",\"MODEL\":\"smollm2:135m\",\"prompt\":\"hi\",\"\u{17F}tream\":false,\"Options\":{\"num_thread\":3},\"options\":{\"num_predict\":1}}";
    let (status, headers, answer) = fleet_e2e::http::send(
        "POST",
        &format!("{url}/api/generate"),
        &[],
        body.as_bytes().to_vec().into(),
        Duration::from_secs(30),
    )
    .await
    .expect("generate");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(json(&answer)["model"], "smollm2:135m", "the last model key");
    assert_eq!(json(&answer)["eval_count"], 1, "options merged: {answer}");
    let threads = headers.iter().find(|(k, _)| k == "x-sim-num-thread");
    assert_eq!(
        threads.map(|(_, v)| v.as_str()),
        Some("3"),
        "Options is options"
    );
    let (_, answer) = post(
        &format!("{url}/api/generate"),
        json!({"model": "smollm2:135m", "prompt": "", "\u{212A}EEP_ALIVE": 0}),
    )
    .await;
    assert_eq!(json(&answer)["done_reason"], "unload", "{answer}");
    unloaded(&url, "unloaded by a Kelvin-sign keep_alive").await;
}

/// The prompt cache as llama-server keeps it: the next turn of a conversation costs only its new
/// tokens (prompt_eval_count still counts them all); another conversation moves the slot and
/// the first comes back from RAM; with LLAMA_ARG_CACHE_RAM=0 it is evaluated again; cached
/// states hold memory.
#[tokio::test]
async fn conversations_hit_the_prompt_cache() {
    let doc = |name: &str| {
        (0..300)
            .map(|i| format!("{name}{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let turn = |url: String, convo: Vec<serde_json::Value>| async move {
        let (status, body) = post(
            &format!("{url}/api/chat"),
            json!({"model": "smollm2:135m", "messages": convo, "stream": false, "options": {"num_predict": 2}}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let v = json(&body);
        let ms = v["prompt_eval_duration"].as_u64().unwrap_or(0) / 1_000_000;
        (
            v["prompt_eval_count"].as_u64().unwrap_or(0),
            ms,
            v["message"].clone(),
        )
    };
    let vars = [
        ("SIM_PREFILL_TOKENS_PER_SECOND", "1000"),
        ("SIM_KV_BYTES_PER_TOKEN", "1Ki"),
    ];
    let url = pulled("cache", &vars).await;
    let a = vec![json!({"role": "user", "content": doc("a")})];
    let (count, first_ms, answer) = turn(url.clone(), a.clone()).await;
    assert!(
        count >= 300 && first_ms >= 250,
        "{count} tokens in {first_ms} ms"
    );
    let mut a2 = a.clone();
    a2.push(answer);
    a2.push(json!({"role": "user", "content": "and then?"}));
    let (count2, ms, _) = turn(url.clone(), a2.clone()).await;
    assert!(
        count2 > count && ms < 50,
        "the next turn: {count2} tokens in {ms} ms"
    );
    // Another conversation takes the slot; the first comes back from RAM.
    let (_, b_ms, _) = turn(
        url.clone(),
        vec![json!({"role": "user", "content": doc("b")})],
    )
    .await;
    assert!(b_ms >= 250, "{b_ms}");
    let (_, ms, _) = turn(url.clone(), a2.clone()).await;
    assert!(ms < 50, "restored from RAM: {ms} ms");
    let (_, state) = get(&format!("{url}/sim/state")).await;
    let bytes = json(&state)["promptCacheBytes"].as_u64().unwrap_or(0);
    assert!(bytes >= 300 << 10, "cached states hold memory: {state}");
    // No cache: every turn is evaluated in full.
    let off = pulled("nocache", &[("LLAMA_ARG_CACHE_RAM", "0")]).await;
    turn(off.clone(), a2.clone()).await;
    turn(
        off.clone(),
        vec![json!({"role": "user", "content": doc("b")})],
    )
    .await;
    let (_, ms, _) = turn(off, a2).await;
    assert!(ms >= 250, "without a RAM cache: {ms} ms");
}

/// Names compare case-insensitively, as in Ollama.
#[tokio::test]
async fn names_are_case_insensitive() {
    let url = pulled("case", &[]).await;
    let (status, body) = post(
        &format!("{url}/api/generate"),
        json!({"model": "SmolLM2:135M", "prompt": "hi", "stream": false, "options": {"num_predict": 1}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = post(&format!("{url}/api/show"), json!({"model": "SMOLLM2:135m"})).await;
    assert_eq!(status, 200);
}

/// Ollama's OpenAI-compatible routes, copy, blobs, and capability refusals.
#[tokio::test]
async fn openai_routes_copy_blobs_and_capabilities() {
    let url = pulled("openai", &[]).await;
    let (status, models) = get(&format!("{url}/v1/models")).await;
    assert_eq!(status, 200);
    assert_eq!(json(&models)["data"][0]["id"], "smollm2:135m");
    let (status, body) = post(
        &format!("{url}/v1/chat/completions"),
        json!({"model": "smollm2:135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let (status, body) = post(
        &format!("{url}/v1/completions"),
        json!({"model": "smollm2:135m", "prompt": "hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["object"], "text_completion");
    let (status, text) = request(
        "POST",
        &format!("{url}/v1/chat/completions"),
        Some(&json!({"model": "smollm2:135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": true})),
        Duration::from_secs(10),
    )
    .await
    .expect("stream");
    assert_eq!(status, 200);
    let events: Vec<&str> = text.lines().filter(|l| l.starts_with("data: ")).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{text}");
    assert!(events.len() >= 3, "{text}");
    let (status, body) = post(
        &format!("{url}/v1/embeddings"),
        json!({"model": "smollm2:135m", "input": ["a", "b"]}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["data"][1]["index"], 1);
    let (status, body) = post(
        &format!("{url}/v1/chat/completions"),
        json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 404);
    assert!(
        json(&body)["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not found"))
    );

    // Copy.
    let (status, _) = post(
        &format!("{url}/api/copy"),
        json!({"source": "smollm2:135m", "destination": "mine:copy"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        post(&format!("{url}/api/show"), json!({"model": "mine:copy"}))
            .await
            .0,
        200
    );
    assert_eq!(
        post(
            &format!("{url}/api/copy"),
            json!({"source": "nope", "destination": "x"})
        )
        .await
        .0,
        404
    );
    // Blobs: by digest, checked.
    let data = b"hello blob";
    let digest = format!("sha256:{}", fleet_api::sha256_hex(data));
    let blob = format!("{url}/api/blobs/{digest}");
    assert_eq!(
        request("HEAD", &blob, None, Duration::from_secs(5))
            .await
            .expect("head")
            .0,
        404
    );
    let (status, _) =
        fleet_e2e::http::request_bytes("POST", &blob, data.to_vec(), Duration::from_secs(5))
            .await
            .expect("post");
    assert_eq!(status, 201);
    assert_eq!(
        request("HEAD", &blob, None, Duration::from_secs(5))
            .await
            .expect("head")
            .0,
        200
    );
    let wrong = format!("{url}/api/blobs/sha256:{}", "0".repeat(64));
    let (status, _) =
        fleet_e2e::http::request_bytes("POST", &wrong, data.to_vec(), Duration::from_secs(5))
            .await
            .expect("post");
    assert_eq!(status, 400, "a digest mismatch is refused");
    // Capabilities the sim's models lack.
    for (extra, what) in [
        (json!({"think": true}), "thinking"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools",
        ),
    ] {
        let mut body =
            json!({"model": "smollm2:135m", "messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut()
            .expect("obj")
            .extend(extra.as_object().expect("obj").clone());
        let (status, resp) = post(&format!("{url}/api/chat"), body).await;
        assert_eq!(status, 400, "{what}");
        assert!(
            json(&resp)["error"]
                .as_str()
                .is_some_and(|e| e.ends_with(&format!("does not support {what}"))),
            "{resp}"
        );
    }
}
