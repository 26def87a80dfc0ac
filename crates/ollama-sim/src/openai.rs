//! Ollama's OpenAI-compatible routes (`/v1/models`, `/v1/chat/completions`, `/v1/completions`,
//! `/v1/embeddings`), as Ollama implements them: each request is turned into the native one,
//! and the native answer (or stream) into OpenAI's shapes; streams are server-sent events ending
//! with `data: [DONE]`; errors are `{"error": {"message", "type", ...}}`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::api::{ApiError, App, Shape, embedding, infer};

type Shared = State<Arc<App>>;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An error in OpenAI's shape.
fn openai_error(e: ApiError) -> Response {
    let kind = if e.0.is_client_error() {
        "invalid_request_error"
    } else {
        "api_error"
    };
    (
        e.0,
        axum::Json(json!({"error": {"message": e.1, "type": kind, "param": null, "code": null}})),
    )
        .into_response()
}

fn bad_request(message: &str) -> Response {
    openai_error(ApiError(StatusCode::BAD_REQUEST, message.to_string()))
}

fn parse(body: &Bytes) -> Result<Value, ApiError> {
    let invalid = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(invalid("request body must be a JSON object".into())),
        Err(e) => Err(invalid(e.to_string())),
    }
}

/// `GET /v1/models`: the models present.
pub async fn models(State(app): Shared) -> Response {
    let data: Vec<Value> = app
        .store
        .list()
        .iter()
        .map(|m| {
            let created = m
                .modified
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            json!({"id": m.name, "object": "model", "created": created, "owned_by": m.reference.namespace})
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// The native request's options from OpenAI's sampling fields.
fn options(body: &Value) -> Value {
    let mut o = serde_json::Map::new();
    for (from, to) in [
        ("max_tokens", "num_predict"),
        ("max_completion_tokens", "num_predict"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("seed", "seed"),
        ("stop", "stop"),
    ] {
        if !body[from].is_null() {
            o.insert(to.into(), body[from].clone());
        }
    }
    Value::Object(o)
}

/// Runs the native request and answers in OpenAI's shape: one object, or a stream of chunks.
async fn answer(
    app: Arc<App>,
    body: &Value,
    native: Value,
    prompt: String,
    shape: Shape,
) -> Response {
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let mut native = native;
    native["stream"] = json!(stream);
    let resp = match infer(app, native, prompt, shape).await {
        Ok(r) => r,
        Err(e) => return openai_error(e),
    };
    let id = format!(
        "{}-{}",
        match shape {
            Shape::Chat => "chatcmpl",
            Shape::Generate => "cmpl",
        },
        unix_now() % 1000
    );
    let created = unix_now();
    if !stream {
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap_or_default();
        let done: Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let usage = json!({
            "prompt_tokens": done["prompt_eval_count"],
            "completion_tokens": done["eval_count"],
            "total_tokens": done["prompt_eval_count"].as_u64().unwrap_or(0) + done["eval_count"].as_u64().unwrap_or(0),
        });
        let finish = done["done_reason"].as_str().unwrap_or("stop");
        let out = match shape {
            Shape::Chat => json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": "fp_ollama",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done["message"]["content"]}, "finish_reason": finish}],
                "usage": usage,
            }),
            Shape::Generate => json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": "fp_ollama",
                "choices": [{"index": 0, "text": done["response"], "finish_reason": finish}],
                "usage": usage,
            }),
        };
        return axum::Json(out).into_response();
    }
    // NDJSON in, server-sent events out.
    let lines = resp.into_body().into_data_stream();
    let mut pending = Vec::new();
    let events = lines
        .map(move |chunk| {
            let mut out = String::new();
            if let Ok(bytes) = chunk {
                pending.extend_from_slice(&bytes);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                        continue;
                    };
                    let finish = if v["done"] == true {
                        json!(v["done_reason"].as_str().unwrap_or("stop"))
                    } else {
                        Value::Null
                    };
                    let event = match shape {
                        Shape::Chat => json!({
                            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                            "system_fingerprint": "fp_ollama",
                            "choices": [{"index": 0, "delta": {"role": "assistant", "content": v["message"]["content"]}, "finish_reason": finish}],
                        }),
                        Shape::Generate => json!({
                            "id": id, "object": "text_completion", "created": created, "model": model,
                            "system_fingerprint": "fp_ollama",
                            "choices": [{"index": 0, "text": v["response"], "finish_reason": finish}],
                        }),
                    };
                    out.push_str(&format!("data: {event}\n\n"));
                }
            }
            Ok::<_, std::convert::Infallible>(Bytes::from(out))
        })
        .chain(futures::stream::once(async {
            Ok(Bytes::from_static(b"data: [DONE]\n\n"))
        }));
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(events),
    )
        .into_response()
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(app): Shared, body: Bytes) -> Response {
    let body = match parse(&body) {
        Ok(b) => b,
        Err(e) => return openai_error(e),
    };
    let Some(messages) = body["messages"].as_array().filter(|m| !m.is_empty()) else {
        return bad_request("[] is too short - 'messages'");
    };
    let prompt = messages
        .iter()
        .filter_map(|m| m["content"].as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let native = json!({"model": body["model"], "messages": messages, "options": options(&body), "tools": body["tools"]});
    answer(app, &body, native, prompt, Shape::Chat).await
}

/// `POST /v1/completions`.
pub async fn completions(State(app): Shared, body: Bytes) -> Response {
    let body = match parse(&body) {
        Ok(b) => b,
        Err(e) => return openai_error(e),
    };
    let prompt = body["prompt"].as_str().unwrap_or_default().to_string();
    let native = json!({"model": body["model"], "prompt": prompt, "options": options(&body)});
    answer(app, &body, native, prompt, Shape::Generate).await
}

/// `POST /v1/embeddings`: `input` a string or a list of strings.
pub async fn embeddings(State(app): Shared, body: Bytes) -> Response {
    let body = match parse(&body) {
        Ok(b) => b,
        Err(e) => return openai_error(e),
    };
    let inputs: Vec<String> = match &body["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) if a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => return bad_request("invalid input type"),
    };
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let Some(info) = fleet_api::ModelRef::parse(&model)
        .ok()
        .and_then(|r| app.store.get(&r))
    else {
        return openai_error(ApiError(
            StatusCode::NOT_FOUND,
            format!("model '{model}' not found"),
        ));
    };
    let lease = match app.runner.acquire(&info, None, None).await {
        Ok(l) => l,
        Err(_) => {
            return openai_error(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "server busy, please try again.  maximum pending requests exceeded".into(),
            ));
        }
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"object": "embedding", "embedding": embedding(t), "index": i}))
        .collect();
    drop(lease);
    let tokens: usize = inputs
        .iter()
        .map(|t| t.split_whitespace().count().max(1))
        .sum();
    axum::Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}
