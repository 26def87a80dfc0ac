//! The gateway's keys file (`agent --serve-token-file`): named keys, each of a tenant, and per
//! tenant or key what it may use (models, a priority class) and how much (requests at once,
//! requests and tokens per minute).
//!
//! ```yaml
//! tenants:
//!   editors:
//!     priority: interactive          # interactive (default) | batch
//!     models: [devassist]            # fleet names or models; absent: every model
//!     concurrency: 64                # requests at once (waiting or answered)
//!     requestsPerMinute: 1200
//!     tokensPerMinute: 2000000       # prompt + generated tokens
//!   etl:
//!     priority: batch
//! keys:
//!   - name: alice-laptop
//!     tenant: editors
//!     token: "a-long-random-secret"  # or sha256: <hex of the token>
//!   - name: nightly-summaries
//!     tenant: etl
//!     sha256: 3f1c...
//!     concurrency: 8                 # a key's own limits apply on top of its tenant's
//! ```
//!
//! A file without `keys:` or `tenants:` at the start of a line is the older token list: one
//! token per line (blank lines and `#` comments skipped), every token a key of tenant
//! `default` with no limits. Only digests of tokens are kept in memory.

use std::collections::{BTreeMap, HashMap};

use crate::decode::{Decode, Errors, Fields, join};
use crate::yaml::{Node, Value};
use crate::{FieldError, is_dns_label};

/// The tenant of every token of a plain token list.
pub const DEFAULT_TENANT: &str = "default";

/// The most keys one file may hold.
pub const MAX_KEYS: usize = 20_000;

/// The fewest characters of a token in a keys file (a short one can be guessed).
pub const MIN_TOKEN_CHARS: usize = 16;

/// Which requests are served first when a pool is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Served first (editors, chat): the default.
    #[default]
    Interactive,
    /// Served only on capacity no interactive request is waiting for.
    Batch,
}

impl Priority {
    /// Its name in the file and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Batch => "batch",
        }
    }
}

/// How much a tenant or a key may use; `None`: no bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Requests at once (waiting for an instance or being answered).
    pub concurrency: Option<u32>,
    /// Requests per minute.
    pub requests_per_minute: Option<u32>,
    /// Prompt and generated tokens per minute.
    pub tokens_per_minute: Option<u64>,
}

/// A tenant: the keys of one team or tool, counted and limited together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tenant {
    /// Its name (a label value in metrics).
    pub name: String,
    /// Its requests' class.
    pub priority: Priority,
    /// The fleets or models it may use (`None`: every one).
    pub models: Option<Vec<String>>,
    /// Its bounds, for all its keys together.
    pub limits: Limits,
}

/// A key: a bearer token with a name, of a tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    /// Its name (in logs; never a metrics label).
    pub name: String,
    /// Its tenant.
    pub tenant: String,
    /// The SHA-256 digest of its token.
    pub digest: [u8; 32],
    /// Its own class (else its tenant's).
    pub priority: Option<Priority>,
    /// The fleets or models it may use, within its tenant's (`None`: its tenant's).
    pub models: Option<Vec<String>>,
    /// Its own bounds, on top of its tenant's.
    pub limits: Limits,
}

/// A keys file, read and checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeysFile {
    /// The tenants by name.
    pub tenants: BTreeMap<String, Tenant>,
    /// The keys, in the file's order.
    pub keys: Vec<Key>,
}

/// The SHA-256 digest of a token.
pub fn token_digest(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// Whether `src` is a keys file (YAML or JSON) rather than a plain token list.
pub fn is_keys_document(src: &str) -> bool {
    src.trim_start().starts_with('{')
        || src
            .lines()
            .any(|l| l.starts_with("keys:") || l.starts_with("tenants:"))
}

/// Reads a keys file, or a plain token list; every error at once, each with its position.
pub fn parse_keys(src: &str) -> Result<KeysFile, Vec<FieldError>> {
    if !is_keys_document(src) {
        return Ok(token_list(src));
    }
    let docs = crate::yaml::parse_stream(src)
        .map_err(|e| vec![FieldError::new("", e.message).at(e.pos)])?;
    let [doc] = docs.as_slice() else {
        let n = docs.len();
        return Err(vec![FieldError::new(
            "",
            format!("expected one document, found {n}"),
        )]);
    };
    let mut errs = Errors::default();
    let file = decode(doc, &mut errs);
    if errs.0.is_empty() {
        Ok(file)
    } else {
        errs.0.sort_by_key(|e| e.pos);
        Err(errs.0)
    }
}

/// The older form: one token per line, every one a key of tenant [`DEFAULT_TENANT`].
fn token_list(src: &str) -> KeysFile {
    let keys = src
        .lines()
        .enumerate()
        .map(|(n, l)| (n + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .map(|(line, token)| Key {
            name: format!("line-{line}"),
            tenant: DEFAULT_TENANT.to_string(),
            digest: token_digest(token),
            priority: None,
            models: None,
            limits: Limits::default(),
        })
        .collect();
    let tenant = Tenant {
        name: DEFAULT_TENANT.to_string(),
        ..Tenant::default()
    };
    KeysFile {
        tenants: BTreeMap::from([(DEFAULT_TENANT.to_string(), tenant)]),
        keys,
    }
}

impl Decode for Priority {
    fn decode(node: &Node, path: &str, errs: &mut Errors) -> Option<Self> {
        match &node.value {
            Value::Str(s) if s == "interactive" => Some(Priority::Interactive),
            Value::Str(s) if s == "batch" => Some(Priority::Batch),
            _ => {
                let got = match &node.value {
                    Value::Str(s) => format!("{:?}", crate::clip(s, 64)),
                    _ => node.kind().to_string(),
                };
                errs.add(
                    path,
                    node.pos,
                    format!("must be interactive or batch, got {got}"),
                );
                None
            }
        }
    }
}

fn decode(doc: &Node, errs: &mut Errors) -> KeysFile {
    let Some(mut f) = Fields::new(doc, "", errs) else {
        return KeysFile::default();
    };
    let mut file = KeysFile::default();
    if let Some(node) = f.node("tenants") {
        file.tenants = tenants(node, f.errs);
    }
    if let Some(node) = f.node("keys") {
        file.keys = keys(node, &file.tenants, f.errs);
    }
    f.finish();
    file
}

/// A name that may be a metrics label and a log field: a DNS label of at most 63 characters.
fn name_ok(name: &str, node: &Node, path: &str, errs: &mut Errors) -> bool {
    let ok = is_dns_label(name, 63);
    if !ok {
        errs.add(
            path,
            node.pos,
            format!(
                "invalid name {:?}: use 1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit",
                crate::clip(name, 64)
            ),
        );
    }
    ok
}

fn tenants(node: &Node, errs: &mut Errors) -> BTreeMap<String, Tenant> {
    let Value::Map(entries) = &node.value else {
        errs.add(
            "tenants",
            node.pos,
            "must be a mapping of tenant names to their settings",
        );
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for (key, value) in entries {
        let path = join("tenants", &crate::clip(&key.name, 64));
        if !name_ok(&key.name, value, &path, errs) {
            continue;
        }
        let Some(mut f) = Fields::new(value, &path, errs) else {
            continue;
        };
        let tenant = Tenant {
            name: key.name.clone(),
            priority: f.or("priority", Priority::Interactive),
            models: models(&mut f),
            limits: limits(&mut f),
        };
        f.finish();
        out.insert(key.name.clone(), tenant);
    }
    out
}

/// The `models` field: fleet names or model references, at least one.
fn models(f: &mut Fields<'_>) -> Option<Vec<String>> {
    let list: Vec<String> = f.opt("models")?;
    if list.is_empty() {
        let (path, pos) = (f.path_of("models"), f.pos_of("models"));
        f.errs.add(
            &path,
            pos,
            "must name at least one fleet or model (leave it out to allow every model)",
        );
    }
    Some(list)
}

fn limits(f: &mut Fields<'_>) -> Limits {
    let positive = |f: &mut Fields<'_>, name: &'static str| -> Option<u64> {
        let n: u64 = f.opt(name)?;
        if n == 0 {
            let (path, pos) = (f.path_of(name), f.pos_of(name));
            f.errs.add(
                &path,
                pos,
                "must be >= 1 (leave it out for no bound; remove the key to refuse it)",
            );
        }
        Some(n)
    };
    Limits {
        concurrency: positive(f, "concurrency").map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        requests_per_minute: positive(f, "requestsPerMinute")
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        tokens_per_minute: positive(f, "tokensPerMinute"),
    }
}

fn keys(node: &Node, tenants: &BTreeMap<String, Tenant>, errs: &mut Errors) -> Vec<Key> {
    let Value::Seq(items) = &node.value else {
        errs.add("keys", node.pos, "must be a list of keys");
        return Vec::new();
    };
    if items.len() > MAX_KEYS {
        let n = items.len();
        errs.add(
            "keys",
            node.pos,
            format!("has {n} keys; the limit is {MAX_KEYS}"),
        );
        return Vec::new();
    }
    let mut out: Vec<Key> = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut digests: HashMap<[u8; 32], usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("keys[{i}]");
        let Some(mut f) = Fields::new(item, &path, errs) else {
            continue;
        };
        let name: Option<String> = f.req("name");
        let tenant: Option<String> = f.req("tenant");
        let digest = secret(&mut f);
        let key_priority = f.opt("priority");
        let key_models = models(&mut f);
        let key_limits = limits(&mut f);
        let name_pos = f.pos_of("name");
        let tenant_pos = f.pos_of("tenant");
        f.finish();
        let name = name.filter(|n| name_ok(n, item, &join(&path, "name"), errs));
        if let Some(n) = &name
            && let Some(first) = names.insert(n.clone(), i)
        {
            let message = format!("duplicate key name {n:?} (also keys[{first}])");
            errs.add(&join(&path, "name"), name_pos, message);
        }
        if let Some(t) = &tenant
            && !tenants.contains_key(t)
        {
            let known: Vec<&str> = tenants.keys().map(String::as_str).collect();
            let message = format!(
                "tenant {:?} is not declared under tenants (declared: {})",
                crate::clip(t, 64),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            );
            errs.add(&join(&path, "tenant"), tenant_pos, message);
        }
        if let Some(d) = digest
            && let Some(first) = digests.insert(d, i)
        {
            let message = format!("the same token as keys[{first}]: every key needs its own");
            errs.add(&path, item.pos, message);
        }
        if let (Some(name), Some(tenant), Some(digest)) = (name, tenant, digest) {
            out.push(Key {
                name,
                tenant,
                digest,
                priority: key_priority,
                models: key_models,
                limits: key_limits,
            });
        }
    }
    out
}

/// A key's secret: `token` (kept only as its digest) or `sha256` (the digest in hex), one of
/// them.
fn secret(f: &mut Fields<'_>) -> Option<[u8; 32]> {
    let given = (f.node("token").is_some(), f.node("sha256").is_some());
    let token: Option<String> = f.opt("token");
    let hex: Option<String> = f.opt("sha256");
    let path = f.path().to_string();
    let pos = f.pos_of("token");
    match (token, hex) {
        _ if given.0 && given.1 => {
            f.errs.add(&path, pos, "set token or sha256, not both");
            None
        }
        (None, None) if given.0 || given.1 => None,
        (None, None) => {
            let message = "required: token (the secret) or sha256 (its SHA-256 digest in hex)";
            f.errs.add(&join(&path, "token"), pos, message);
            None
        }
        (Some(token), None) => {
            let bad = token.chars().count() < MIN_TOKEN_CHARS
                || !token.bytes().all(|b| b.is_ascii_graphic());
            if bad {
                let message = format!(
                    "must be at least {MIN_TOKEN_CHARS} printable characters without spaces (ollama-fleet keys new makes one)"
                );
                f.errs.add(&join(&path, "token"), pos, message);
                return None;
            }
            Some(token_digest(&token))
        }
        (_, Some(hex)) => {
            let pos = f.pos_of("sha256");
            let digest = parse_hex(&hex);
            if digest.is_none() {
                let message = "must be 64 hexadecimal digits (sha256sum of the token)";
                f.errs.add(&join(&path, "sha256"), pos, message);
            }
            digest
        }
    }
}

fn parse_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
tenants:
  editors:
    models: [devassist, "qwen2.5-coder:7b"]
    concurrency: 64
    requestsPerMinute: 1200
    tokensPerMinute: 2000000
  etl:
    priority: batch
keys:
  - name: alice
    tenant: editors
    token: alice-0123456789abcdef
  - name: nightly
    tenant: etl
    sha256: "0000000000000000000000000000000000000000000000000000000000000001"
    concurrency: 8
    priority: interactive
"#;

    #[test]
    fn a_keys_file_reads_whole() {
        let file = parse_keys(FILE).expect("valid");
        let editors = &file.tenants["editors"];
        assert_eq!(editors.priority, Priority::Interactive);
        assert_eq!(
            editors.models.as_deref(),
            Some(&["devassist".to_string(), "qwen2.5-coder:7b".to_string()][..])
        );
        assert_eq!(
            editors.limits,
            Limits {
                concurrency: Some(64),
                requests_per_minute: Some(1200),
                tokens_per_minute: Some(2_000_000)
            }
        );
        assert_eq!(file.tenants["etl"].priority, Priority::Batch);
        assert_eq!(file.keys.len(), 2);
        assert_eq!(file.keys[0].digest, token_digest("alice-0123456789abcdef"));
        let nightly = &file.keys[1];
        assert_eq!(nightly.digest[31], 1);
        assert_eq!(nightly.limits.concurrency, Some(8));
        assert_eq!(nightly.priority, Some(Priority::Interactive));
    }

    #[test]
    fn a_plain_token_list_is_the_default_tenant() {
        let file = parse_keys("# tokens\n\nfirst-token\n  second \n").expect("a list");
        assert_eq!(file.keys.len(), 2);
        assert_eq!(file.keys[1].digest, token_digest("second"));
        assert_eq!(file.keys[1].name, "line-4");
        assert!(file.keys.iter().all(|k| k.tenant == DEFAULT_TENANT));
        assert_eq!(file.tenants[DEFAULT_TENANT].limits, Limits::default());
        assert_eq!(parse_keys("").expect("empty").keys.len(), 0);
    }

    /// Every mistake is reported at once, with its path and line.
    #[test]
    fn every_mistake_is_named() {
        let src = r#"
tenants:
  Editors: {}
  etl: {priority: urgent, concurrency: 0, models: [], rpm: 3}
keys:
  - {name: a, tenant: etl, token: short}
  - {name: a, tenant: nobody, token: "0123456789abcdefg"}
  - {name: c, tenant: etl, token: "0123456789abcdefg"}
  - {name: d, tenant: etl}
  - {name: e, tenant: etl, token: "0123456789abcdefX", sha256: "00"}
  - {name: f, tenant: etl, sha256: "zz"}
"#;
        let errs = parse_keys(src).expect_err("invalid");
        let text: Vec<String> = errs
            .iter()
            .map(|e| format!("{}: {e}", e.pos.map(|p| p.line).unwrap_or(0)))
            .collect();
        let expect = [
            "3: tenants.Editors: invalid name",
            "4: tenants.etl.priority: must be interactive or batch",
            "4: tenants.etl.concurrency: must be >= 1",
            "4: tenants.etl.models: must name at least one",
            "4: tenants.etl.rpm: unknown field",
            "6: keys[0].token: must be at least 16",
            "7: keys[1].name: duplicate key name \"a\"",
            "7: keys[1].tenant: tenant \"nobody\" is not declared under tenants (declared: etl)",
            "8: keys[2]: the same token as keys[1]",
            "9: keys[3].token: required",
            "10: keys[4]: set token or sha256, not both",
            "11: keys[5].sha256: must be 64 hexadecimal digits",
        ];
        for e in expect {
            assert!(
                text.iter().any(|t| t.starts_with(e)),
                "{e:?} missing in {text:#?}"
            );
        }
        assert_eq!(text.len(), expect.len(), "{text:#?}");
    }
}
