//! A tiny HTTP/1 client for tests.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Sends a request; `Err` on connection failure or when no full answer comes within `timeout`.
pub async fn request(
    method: &str,
    url: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    request_with_headers(method, url, body, timeout)
        .await
        .map(|(status, _, body)| (status, body))
}

/// [`request`], also returning the answer's headers (names in lower case).
pub async fn request_with_headers(
    method: &str,
    url: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<(u16, Vec<(String, String)>, String), String> {
    let payload = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    send(method, url, &[], payload, timeout).await
}

/// [`request_with_headers`] with request headers too (`Authorization`, say).
pub async fn request_as(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
    timeout: Duration,
) -> Result<(u16, Vec<(String, String)>, String), String> {
    let payload = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    send(method, url, headers, payload, timeout).await
}

/// A request with a raw body (a blob, say): (status, body).
pub async fn request_bytes(
    method: &str,
    url: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    send(method, url, &[], Bytes::from(body), timeout)
        .await
        .map(|(status, _, body)| (status, body))
}

/// A request with request headers and a raw body (JSON with duplicate keys, say): (status,
/// answer headers, answer body).
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    payload: Bytes,
    timeout: Duration,
) -> Result<(u16, Vec<(String, String)>, String), String> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = hyper::Request::builder().method(method).uri(url);
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(payload)).map_err(|e| e.to_string())?;
    let fut = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("no answer from {url} within {timeout:?}"))?
}

/// GET, panicking on connection failure.
pub async fn get(url: &str) -> (u16, String) {
    request("GET", url, None, Duration::from_secs(10))
        .await
        .expect("GET")
}

/// POST a JSON body, panicking on connection failure.
pub async fn post(url: &str, body: Value) -> (u16, String) {
    request("POST", url, Some(&body), Duration::from_secs(30))
        .await
        .expect("POST")
}

/// A POST whose answer is NDJSON: every line parsed.
pub async fn post_lines(url: &str, body: Value) -> (u16, Vec<Value>) {
    let (status, text) = post(url, body).await;
    let lines = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad NDJSON line {l:?}: {e}")))
        .collect();
    (status, lines)
}

/// Parses JSON, panicking with the text when it is not.
pub fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}
