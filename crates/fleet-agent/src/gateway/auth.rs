//! Bearer tokens (`--serve-token-file`): one per line (blank lines and `#` comments skipped),
//! re-read when the file changes (checked at most once a second), compared in constant time.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, header};
use fleet_runtime::clock::Instant;

use crate::lock;

/// How often the token file is checked for a change at most.
const RECHECK: Duration = Duration::from_secs(1);

/// The tokens a request may carry; with no file, every request is let in.
#[derive(Debug)]
pub struct Tokens {
    file: Option<PathBuf>,
    read: Mutex<Read>,
}

#[derive(Debug, Default)]
struct Read {
    checked: Option<Instant>,
    modified: Option<SystemTime>,
    tokens: Vec<String>,
}

impl Tokens {
    /// The tokens of `file` (`None`: no auth).
    pub fn new(file: Option<PathBuf>) -> Tokens {
        Tokens {
            file,
            read: Mutex::new(Read::default()),
        }
    }

    /// Whether the request's `Authorization: Bearer` token is one of them.
    pub fn admit(&self, headers: &HeaderMap) -> bool {
        let Some(file) = &self.file else {
            return true;
        };
        let mut r = lock(&self.read);
        if r.checked.is_none_or(|at| at.elapsed() >= RECHECK) {
            r.checked = Some(Instant::now());
            let modified = std::fs::metadata(file).and_then(|m| m.modified()).ok();
            if modified != r.modified || modified.is_none() {
                r.modified = modified;
                r.tokens = std::fs::read_to_string(file)
                    .unwrap_or_default()
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_string)
                    .collect();
            }
        }
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        r.tokens
            .iter()
            .fold(false, |found, t| found | same(t, given))
    }
}

/// `a == b`, compared in full whatever the content (no early exit on the first difference).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}
