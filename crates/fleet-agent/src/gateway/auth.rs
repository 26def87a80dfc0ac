//! Who is calling: the keys file (`--serve-token-file`, [`fleet_api::keys`]: named keys of
//! tenants, or the older plain token list), re-read when it changes (checked at most once a
//! second), each request's bearer token looked up by its SHA-256 digest (no token is kept in
//! memory, and no comparison depends on how much of a token is right).
//!
//! A file that cannot be read or holds a mistake keeps the keys read before (logged), so an
//! edit at 3 AM locks nobody out; an empty file too (a file rewritten in place is empty for a
//! moment; a comment line refuses every key). The file is read on a blocking thread by the one
//! request that finds a look due; the others go on with the keys as they are.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, header};
use fleet_api::ModelRef;
use fleet_api::keys::{DEFAULT_TENANT, KeysFile, Limits, Priority, token_digest};
use fleet_runtime::clock::Instant;

use crate::lock;

/// How often the keys file is checked for a change at most.
const RECHECK: Duration = Duration::from_secs(1);

/// A request's caller: its key and tenant, what they may use and how much.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    /// The key's name (`""`: no keys file).
    pub key: String,
    /// Its tenant.
    pub tenant: String,
    /// Its requests' class.
    pub priority: Priority,
    /// Lists of fleets or models that must each allow a model (the tenant's, the key's).
    pub(crate) models: Vec<Vec<String>>,
    /// The key's own bounds.
    pub key_limits: Limits,
    /// The tenant's bounds, for all its keys.
    pub tenant_limits: Limits,
}

impl Caller {
    /// The caller when the gateway has no keys file: everyone is tenant `default`.
    pub fn anyone() -> Caller {
        Caller {
            tenant: DEFAULT_TENANT.to_string(),
            ..Caller::default()
        }
    }

    /// Whether it may use a pool serving `model` (what the request named, or the model told to
    /// its instances) for `fleets`: every list allows one of the fleets or the model (by
    /// Ollama's name comparison).
    pub fn may_use(&self, asked: &str, model: &str, fleets: &[String]) -> bool {
        let keys = [ModelRef::key(asked), ModelRef::key(model)];
        self.models.iter().all(|list| {
            list.iter()
                .any(|m| fleets.contains(m) || keys.contains(&ModelRef::key(m)))
        })
    }
}

/// Why a request has no caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unknown {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A token no key has.
    Invalid,
}

/// The keys a request may carry; with no file, every request is let in as [`Caller::anyone`].
#[derive(Debug)]
pub struct Keys {
    file: Option<Arc<PathBuf>>,
    anyone: Arc<Caller>,
    read: Arc<Mutex<Read>>,
}

#[derive(Debug, Default)]
struct Read {
    checked: Option<Instant>,
    modified: Option<SystemTime>,
    len: u64,
    /// The file has been read once (later mistakes and empty files keep what it gave).
    loaded: bool,
    /// The callers by their token's digest.
    callers: HashMap<[u8; 32], Arc<Caller>>,
    /// Tenants by name, from the file (the metrics show each, used or not).
    tenants: Vec<String>,
}

impl Keys {
    /// The keys of `file` (`None`: no auth), read once now (the agent's start).
    pub fn new(file: Option<PathBuf>) -> Keys {
        let keys = Keys {
            file: file.map(Arc::new),
            anyone: Arc::new(Caller::anyone()),
            read: Arc::default(),
        };
        if let Some(file) = &keys.file {
            reload(file, &keys.read);
        }
        keys
    }

    /// The caller whose key the request's `Authorization: Bearer` header carries (the file
    /// read again first, off the async threads, when it is due).
    pub async fn identify(&self, headers: &HeaderMap) -> Result<Arc<Caller>, Unknown> {
        let Some(file) = &self.file else {
            return Ok(self.anyone.clone());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(Unknown::Missing)?;
        let digest = token_digest(given);
        if self.due() {
            let (file, read) = (file.clone(), self.read.clone());
            let _ = tokio::task::spawn_blocking(move || reload(&file, &read)).await;
        }
        let r = lock(&self.read);
        r.callers.get(&digest).cloned().ok_or(Unknown::Invalid)
    }

    /// The tenants of the file as last read (`default` without one).
    pub fn tenants(&self) -> Vec<String> {
        if self.file.is_none() {
            return vec![DEFAULT_TENANT.to_string()];
        }
        lock(&self.read).tenants.clone()
    }

    /// Whether the file is to be looked at again (at most once per [`RECHECK`]); the request
    /// that finds it due looks, the others go on with the keys as they are.
    fn due(&self) -> bool {
        let mut r = lock(&self.read);
        let due = r.checked.is_none_or(|at| at.elapsed() >= RECHECK);
        if due {
            r.checked = Some(Instant::now());
        }
        due
    }
}

/// Reads `file` again when it changed (blocking: file I/O and parsing), and keeps what it gives,
/// unless it cannot be read, is empty after a first read, or has a mistake (logged).
fn reload(file: &Path, read: &Mutex<Read>) {
    let meta = std::fs::metadata(file).ok();
    let modified = meta.as_ref().and_then(|m| m.modified().ok());
    let len = meta.as_ref().map_or(0, std::fs::Metadata::len);
    let first = {
        let mut r = lock(read);
        if r.loaded && modified.is_some() && modified == r.modified && len == r.len {
            return;
        }
        r.modified = modified;
        r.len = len;
        !r.loaded
    };
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) => {
            tracing::error!(file = %file.display(), error = %e, "cannot read the keys file; the keys read before stay");
            return;
        }
    };
    if text.is_empty() && !first {
        tracing::warn!(file = %file.display(), "the keys file is empty; the keys read before stay (write a comment line to refuse every key)");
        return;
    }
    match fleet_api::keys::parse_keys(&text) {
        Ok(keys) => {
            let (callers, tenants) = callers(&keys);
            if !first {
                tracing::info!(file = %file.display(), keys = callers.len(), tenants = tenants.len(), "keys read again");
            }
            let mut r = lock(read);
            r.callers = callers;
            r.tenants = tenants;
            r.loaded = true;
        }
        Err(errors) => {
            for e in errors {
                let at = e.pos.map(|p| p.to_string()).unwrap_or_default();
                tracing::error!(file = %file.display(), at, error = %e, "the keys file has a mistake; the keys read before stay");
            }
        }
    }
}

/// Each key's caller, by its token's digest; and the tenants' names.
fn callers(file: &KeysFile) -> (HashMap<[u8; 32], Arc<Caller>>, Vec<String>) {
    let callers = file
        .keys
        .iter()
        .filter_map(|k| {
            let tenant = file.tenants.get(&k.tenant)?;
            let models = [tenant.models.clone(), k.models.clone()]
                .into_iter()
                .flatten()
                .collect();
            let caller = Caller {
                key: k.name.clone(),
                tenant: k.tenant.clone(),
                priority: k.priority.unwrap_or(tenant.priority),
                models,
                key_limits: k.limits,
                tenant_limits: tenant.limits,
            };
            Some((k.digest, Arc::new(caller)))
        })
        .collect();
    (callers, file.tenants.keys().cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let value = format!("Bearer {token}").parse().expect("header");
        h.insert(header::AUTHORIZATION, value);
        h
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_read_again_when_the_file_changes_and_mistakes_keep_the_old_ones() {
        let dir = std::env::temp_dir().join(format!("fleet-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("keys");
        let write = |text: &str| {
            let tmp = dir.join("keys.new");
            std::fs::write(&tmp, text).expect("write");
            std::fs::rename(&tmp, &path).expect("rename");
        };
        write("old-token\n");
        let keys = Keys::new(Some(path.clone()));
        let old = keys.identify(&bearer("old-token")).await.expect("a key");
        assert_eq!(
            (old.tenant.as_str(), old.key.as_str()),
            ("default", "line-1")
        );
        assert_eq!(
            keys.identify(&HeaderMap::new()).await,
            Err(Unknown::Missing)
        );
        assert_eq!(keys.identify(&bearer("nope")).await, Err(Unknown::Invalid));
        let named = "tenants:\n  etl: {priority: batch, models: [summaries]}\nkeys:\n  - {name: nightly, tenant: etl, token: nightly-0123456789abcdef, models: [smollm2]}\n";
        write(named);
        tokio::time::advance(RECHECK).await;
        assert_eq!(
            keys.identify(&bearer("old-token")).await,
            Err(Unknown::Invalid)
        );
        let nightly = keys
            .identify(&bearer("nightly-0123456789abcdef"))
            .await
            .expect("key");
        assert_eq!(nightly.priority, Priority::Batch);
        assert_eq!(keys.tenants(), ["etl"]);
        // The tenant's list and the key's must both allow the pool.
        let fleets = ["summaries".to_string()];
        assert!(nightly.may_use("summaries", "smollm2:latest", &fleets));
        assert!(nightly.may_use("SmolLM2", "smollm2", &fleets));
        assert!(!nightly.may_use("smollm2", "smollm2", &["other".to_string()]));
        assert!(!nightly.may_use("qwen", "qwen", &fleets));
        // A mistake, then an empty file: the keys read before stay.
        write("keys:\n  - {name: x}\n");
        tokio::time::advance(RECHECK).await;
        assert!(
            keys.identify(&bearer("nightly-0123456789abcdef"))
                .await
                .is_ok()
        );
        write("");
        tokio::time::advance(RECHECK).await;
        assert!(
            keys.identify(&bearer("nightly-0123456789abcdef"))
                .await
                .is_ok()
        );
        write("# nobody\n");
        tokio::time::advance(RECHECK).await;
        assert_eq!(
            keys.identify(&bearer("nightly-0123456789abcdef")).await,
            Err(Unknown::Invalid)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
