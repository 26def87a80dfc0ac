//! Ollama's protections against web pages, kept by the gateway (it stands where Ollama would):
//! a request from a browser page (it says its `Origin`) is served only for an allowed origin
//! (`OLLAMA_ORIGINS`' defaults and what `--serve-allowed-origins` adds, `*` a wildcard, browser
//! extensions allowed, as Ollama's CORS setup does), with CORS headers and preflights; a gateway
//! listening on loopback answers a browser only for a local `Host` (DNS rebinding); and bodies a
//! page can post without asking first (`text/plain`, forms) are not taken from pages.
//!
//! One difference from Ollama, on purpose: the `Host` check applies to requests from browsers
//! (they carry `Origin` or `Sec-Fetch-*`, which every current browser sends and no proxy adds).
//! Ollama checks every request, so a proxy on the same machine that forwards with its own
//! upstream name as `Host` (nginx does by default) is refused; the gateway's place is behind such
//! a proxy.

use std::net::IpAddr;

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The headers a page may send (Ollama's list, with the OpenAI clients').
const ALLOW_HEADERS: &str = "Authorization, Content-Type, User-Agent, Accept, X-Requested-With, \
OpenAI-Beta, x-stainless-arch, x-stainless-async, x-stainless-custom-poll-interval, \
x-stainless-helper-method, x-stainless-lang, x-stainless-os, x-stainless-package-version, \
x-stainless-poll-helper, x-stainless-retry-count, x-stainless-runtime, \
x-stainless-runtime-version, x-stainless-timeout";

const ALLOW_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS";

/// Origins of browser extensions, allowed as Ollama allows them.
const EXTENSIONS: [&str; 4] = [
    "chrome-extension://",
    "moz-extension://",
    "safari-web-extension://",
    "ms-browser-extension://",
];

/// Who may call from a browser page, and whether the gateway listens on loopback only.
#[derive(Clone, Debug)]
pub struct Browsers {
    origins: Vec<String>,
    loopback: bool,
}

/// What the checks decided.
#[derive(Debug)]
pub enum Verdict {
    /// Go on; add these headers to the answer (CORS for an allowed page).
    Pass(Vec<(header::HeaderName, HeaderValue)>),
    /// Answer this instead (a refusal, or a preflight's answer).
    Answer(Response),
}

impl Browsers {
    /// Ollama's default origins plus `extra`; `loopback`: the gateway listens on a loopback
    /// address (then the `Host` a request names must be local).
    pub fn new(extra: &[String], loopback: bool) -> Browsers {
        let mut origins: Vec<String> = extra.iter().map(|o| o.trim().to_string()).collect();
        for host in ["localhost", "127.0.0.1", "0.0.0.0"] {
            for scheme in ["http", "https"] {
                origins.push(format!("{scheme}://{host}"));
                origins.push(format!("{scheme}://{host}:*"));
            }
        }
        for scheme in ["app", "file", "tauri", "vscode-webview", "vscode-file"] {
            origins.push(format!("{scheme}://*"));
        }
        origins.retain(|o| !o.is_empty());
        Browsers { origins, loopback }
    }

    /// Whether a page of `origin` may call.
    pub fn allows(&self, origin: &str) -> bool {
        if EXTENSIONS.iter().any(|e| origin.starts_with(e)) {
            return true;
        }
        self.origins
            .iter()
            .any(|pattern| match pattern.split_once('*') {
                None => pattern == origin,
                Some((before, after)) => {
                    origin.len() >= before.len() + after.len()
                        && origin.starts_with(before)
                        && origin.ends_with(after)
                }
            })
    }

    /// The checks, in Ollama's order: the `Host` (on loopback), then the page's origin and its
    /// body's type.
    pub fn check(&self, method: &Method, headers: &HeaderMap) -> Verdict {
        let text = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
        let host = text(header::HOST).unwrap_or_default();
        let browser = headers.contains_key(header::ORIGIN)
            || headers.keys().any(|k| k.as_str().starts_with("sec-fetch-"));
        if self.loopback && browser && !local_host(host) {
            return Verdict::Answer(refuse(StatusCode::FORBIDDEN, "host not allowed"));
        }
        let Some(origin) = text(header::ORIGIN) else {
            return Verdict::Pass(Vec::new());
        };
        // A page of the gateway's own address is no foreign page.
        let same = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            == Some(host);
        if !same && !self.allows(origin) {
            return Verdict::Answer(refuse(StatusCode::FORBIDDEN, "origin not allowed"));
        }
        let media = text(header::CONTENT_TYPE)
            .and_then(|c| c.split(';').next())
            .map(|c| c.trim().to_ascii_lowercase())
            .unwrap_or_default();
        if matches!(
            media.as_str(),
            "text/plain" | "application/x-www-form-urlencoded" | "multipart/form-data"
        ) {
            return Verdict::Answer(refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send the body as application/json",
            ));
        }
        let Ok(origin) = HeaderValue::from_str(origin) else {
            return Verdict::Answer(refuse(StatusCode::FORBIDDEN, "origin not allowed"));
        };
        let cors = vec![
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, origin),
            (header::VARY, HeaderValue::from_static("Origin")),
        ];
        if method == Method::OPTIONS {
            let mut r = StatusCode::NO_CONTENT.into_response();
            let h = r.headers_mut();
            h.extend(cors);
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(ALLOW_METHODS),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(ALLOW_HEADERS),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("43200"),
            );
            return Verdict::Answer(r);
        }
        Verdict::Pass(cors)
    }
}

fn refuse(code: StatusCode, message: &str) -> Response {
    super::error(code, message)
}

/// Whether `host` (a `Host` header, with or without a port) names this machine as Ollama
/// counts it: empty, `localhost` and names under `.localhost`, `.local`, `.internal`, the
/// machine's hostname, or a loopback, private or unspecified address.
pub fn local_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        // An IPv6 literal in brackets, with or without a port.
        _ if host.starts_with('[') => host[1..].split(']').next().unwrap_or_default(),
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.to_ascii_lowercase();
    if let Ok(ip) = name.parse::<IpAddr>() {
        return match ip {
            IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_unspecified(),
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xfe00) == 0xfc00
            }
        };
    }
    if name.is_empty() || name == "localhost" {
        return true;
    }
    if [".localhost", ".local", ".internal"]
        .iter()
        .any(|tld| name.ends_with(tld))
    {
        return true;
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .is_ok_and(|h| h.trim().eq_ignore_ascii_case(&name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn code(v: &Verdict) -> u16 {
        match v {
            Verdict::Pass(_) => 0,
            Verdict::Answer(r) => r.status().as_u16(),
        }
    }

    #[test]
    fn pages_of_foreign_origins_are_refused() {
        let b = Browsers::new(
            &["https://chat.example.com".into(), "https://*.corp".into()],
            false,
        );
        let post = |origin: &str, ct: &str| {
            code(&b.check(
                &Method::POST,
                &headers(&[
                    ("host", "10.0.0.5:11400"),
                    ("origin", origin),
                    ("content-type", ct),
                ]),
            ))
        };
        assert_eq!(post("https://evil.example", "application/json"), 403);
        assert_eq!(post("http://localhost:3000", "application/json"), 0);
        assert_eq!(post("https://chat.example.com", "application/json"), 0);
        assert_eq!(post("https://ui.corp", "application/json"), 0, "a wildcard");
        assert_eq!(post("chrome-extension://abc", "application/json"), 0);
        assert_eq!(
            post("http://10.0.0.5:11400", "application/json"),
            0,
            "same origin"
        );
        assert_eq!(post("http://localhost:3000", "text/plain"), 415);
        assert_eq!(
            post("http://localhost:3000", "application/x-www-form-urlencoded"),
            415
        );
        let curl = b.check(
            &Method::POST,
            &headers(&[
                ("host", "n:1"),
                ("content-type", "application/x-www-form-urlencoded"),
            ]),
        );
        assert_eq!(code(&curl), 0, "no page, no origin: curl -d");
        let preflight = b.check(
            &Method::OPTIONS,
            &headers(&[("host", "n:1"), ("origin", "http://localhost:5173")]),
        );
        let Verdict::Answer(r) = preflight else {
            panic!("a preflight is answered")
        };
        assert_eq!(r.status(), 204);
        assert_eq!(
            r.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "http://localhost:5173"
        );
    }

    #[test]
    fn on_loopback_browsers_are_served_only_for_local_hosts() {
        let b = Browsers::new(&[], true);
        let get = |host: &str| {
            code(&b.check(
                &Method::GET,
                &headers(&[("host", host), ("sec-fetch-mode", "cors")]),
            ))
        };
        for host in [
            "localhost:11400",
            "127.0.0.1:11400",
            "[::1]:11400",
            "box.local",
            "10.1.2.3",
            "app.localhost",
        ] {
            assert_eq!(get(host), 0, "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:11400",
            "8.8.8.8",
            "[2001:db8::1]:80",
        ] {
            assert_eq!(get(host), 403, "{host}");
        }
        let open = Browsers::new(&[], false);
        assert_eq!(
            code(&open.check(&Method::GET, &headers(&[("host", "evil.example")]))),
            0
        );
    }
}
