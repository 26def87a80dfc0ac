//! The etcd layout of ollama-fleet (interface.md §2), behind a [`Store`] trait with an etcd
//! implementation ([`etcd::EtcdStore`]) and an in-memory one ([`memory::MemoryStore`]); one
//! conformance suite runs against both.
//!
//! ```text
//! <prefix>/fleets/<name>           manifests (YAML or JSON), written by `apply` or etcdctl
//! <prefix>/nodes/<node>            node records, on the node's lease
//! <prefix>/status/<fleet>/<node>   per-node fleet status (the summary), on the same lease
//! <prefix>/instances/<fleet>/<node>/<key>
//!                                  one instance of that status, on the same lease
//! ```
//!
//! A node's status is split so that one instance's change rewrites that instance's entry (a few
//! hundred bytes) and the small summary, not every instance of the node: a status key holding
//! 833 instances was 131 KB. Readers still accept a summary that lists its instances inline (the
//! layout of agents before the split).
//!
//! A fleet's generation is the `mod_revision` of its key. Writes of fleets are compare-and-swap;
//! a lost race is [`StoreError::Conflict`], not a failure.

pub mod etcd;
pub mod memory;

use std::time::Duration;

use futures::stream::BoxStream;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/ollama-fleet";

/// etcd's default request limit (`--max-request-bytes`, 1.5 MiB): larger values are refused
/// ([`StoreError::Invalid`]), by etcd and by the in-memory store alike.
pub const MAX_REQUEST_BYTES: usize = 1536 * 1024;

/// etcd's default limit of operations in one transaction (`--max-txn-ops`): larger writes are
/// split into several transactions.
pub const MAX_TXN_OPS: usize = 128;

/// A fleet document as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetDoc {
    /// The fleet's name (the last part of its key).
    pub name: String,
    /// The stored text.
    pub value: String,
    /// Its `mod_revision`: the fleet's generation.
    pub revision: i64,
    /// Its `create_revision`: which of two fleets came first (the earlier keeps contested
    /// ports and memory on a node).
    pub created: i64,
}

/// What a compare-and-swap write expects to find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must be at this `mod_revision`.
    Revision(i64),
}

/// A change to the fleets, as seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FleetEvent {
    /// The complete set of fleets: sent first, and again after any gap (reconnect, compaction),
    /// so a watcher never has to guess what it missed.
    Resync(Vec<FleetDoc>),
    /// A fleet was created or changed.
    Put(FleetDoc),
    /// A fleet was deleted.
    Delete(String),
}

/// A status or node entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The fleet (empty for node entries).
    pub fleet: String,
    /// The node.
    pub node: String,
    /// The stored JSON.
    pub value: String,
}

/// An instance entry of a node's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceEntry {
    /// The fleet.
    pub fleet: String,
    /// The node.
    pub node: String,
    /// The entry's key (the last part): the instance ID, or a name for a slot without one.
    pub key: String,
    /// The stored JSON.
    pub value: String,
}

/// One write of a fleet's status on a node: the summary when it changed, the instance entries
/// that changed, the instance entries that are gone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusChange {
    /// The summary's JSON, when it is to be written.
    pub summary: Option<String>,
    /// Instance entries to write: (key, JSON).
    pub put: Vec<(String, String)>,
    /// Instance entries to delete, by key.
    pub delete: Vec<String>,
}

impl StatusChange {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.summary.is_none() && self.put.is_empty() && self.delete.is_empty()
    }

    /// Checks the keys and sizes; every value must fit in one request.
    fn check(&self, fleet: &str, node: &str) -> Result<()> {
        check_segment("fleet", fleet)?;
        check_segment("node", node)?;
        for key in self.put.iter().map(|(k, _)| k).chain(&self.delete) {
            check_segment("instance", key)?;
        }
        let largest = self
            .summary
            .iter()
            .chain(self.put.iter().map(|(_, v)| v))
            .map(String::len)
            .max()
            .unwrap_or(0);
        if largest > MAX_REQUEST_BYTES {
            return Err(StoreError::Invalid(format!(
                "request refused: {largest} bytes is more than etcd's request limit ({MAX_REQUEST_BYTES})"
            )));
        }
        Ok(())
    }
}

/// One operation of a status write, in the order written.
#[derive(Debug)]
enum StatusOp<'a> {
    Put(String, &'a str),
    Delete(String),
}

impl StatusOp<'_> {
    fn bytes(&self) -> usize {
        match self {
            StatusOp::Put(k, v) => k.len() + v.len(),
            StatusOp::Delete(k) => k.len(),
        }
    }
}

/// A status write as batches of operations, each within etcd's limits on operations
/// ([`MAX_TXN_OPS`]) and request size: the summary first, then the instance entries.
fn status_batches<'a>(
    keys: &Keys,
    fleet: &str,
    node: &str,
    change: &'a StatusChange,
) -> Result<Vec<Vec<StatusOp<'a>>>> {
    change.check(fleet, node)?;
    let under = keys.instances_of(fleet, node);
    let ops = change
        .summary
        .iter()
        .map(|s| StatusOp::Put(format!("{}{node}", keys.status(Some(fleet))), s.as_str()))
        .chain(
            change
                .put
                .iter()
                .map(|(k, v)| StatusOp::Put(format!("{under}{k}"), v.as_str())),
        )
        .chain(
            change
                .delete
                .iter()
                .map(|k| StatusOp::Delete(format!("{under}{k}"))),
        );
    // Room for the request's own framing.
    let budget = MAX_REQUEST_BYTES - 64 * 1024;
    let mut batches: Vec<Vec<StatusOp<'a>>> = Vec::new();
    let mut bytes = 0;
    for op in ops {
        let size = op.bytes();
        match batches.last_mut() {
            Some(b) if b.len() < MAX_TXN_OPS && bytes + size <= budget => {
                bytes += size;
                b.push(op);
            }
            _ => {
                bytes = size;
                batches.push(vec![op]);
            }
        }
    }
    Ok(batches)
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A compare-and-swap lost: the key changed since it was read. Re-read and try again.
    #[error("conflict: {0} changed since it was read")]
    Conflict(String),
    /// etcd cannot be reached or answered with an error.
    #[error("etcd: {0}")]
    Unavailable(String),
    /// A key or value is not valid.
    #[error("invalid {0}")]
    Invalid(String),
}

/// Result of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The shared state of ollama-fleet, scoped to one key prefix.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// One fleet document.
    async fn get_fleet(&self, name: &str) -> Result<Option<FleetDoc>>;

    /// Every fleet document, sorted by name.
    async fn list_fleets(&self) -> Result<Vec<FleetDoc>>;

    /// Writes a fleet document if `expect` holds; returns the new revision.
    async fn put_fleet(&self, name: &str, value: &str, expect: Expect) -> Result<i64>;

    /// Deletes a fleet document; false when there was none.
    async fn delete_fleet(&self, name: &str) -> Result<bool>;

    /// Changes to the fleets, starting with a [`FleetEvent::Resync`]; reconnects by itself.
    fn watch_fleets(&self) -> BoxStream<'static, FleetEvent>;

    /// Starts (or restarts) this process's session: a lease of `ttl` kept alive in the
    /// background. Node and status keys written afterwards are attached to it and vanish
    /// when the process dies.
    async fn start_session(&self, ttl: Duration) -> Result<()>;

    /// Counts the leases this store has had: it changes when the lease was lost and replaced
    /// (etcd was away longer than the TTL), and then every key on it must be written again.
    fn session_generation(&self) -> u64;

    /// Whether the store confirmed the session's lease lately (its grant or last keep-alive
    /// was answered). False without a session and while the store is away, even when nothing
    /// was written: an idle owner learns of an outage from this.
    fn session_alive(&self) -> bool;

    /// Writes this node's record on the session lease.
    async fn put_node(&self, node: &str, value: &str) -> Result<()>;

    /// Writes a fleet's status for a node on the session lease: the summary and instance
    /// entries of `change`, and deletes the instance entries it names; in as few transactions as
    /// etcd's limits allow (one for a change of up to [`MAX_TXN_OPS`] entries), the summary first.
    async fn write_status(&self, fleet: &str, node: &str, change: &StatusChange) -> Result<()>;

    /// Writes a fleet's status summary for a node on the session lease.
    async fn put_status(&self, fleet: &str, node: &str, value: &str) -> Result<()> {
        let change = StatusChange {
            summary: Some(value.to_string()),
            ..StatusChange::default()
        };
        self.write_status(fleet, node, &change).await
    }

    /// Deletes a fleet's status for a node: the summary and every instance entry.
    async fn delete_status(&self, fleet: &str, node: &str) -> Result<()>;

    /// Status summaries, of one fleet or of all.
    async fn list_status(&self, fleet: Option<&str>) -> Result<Vec<Entry>>;

    /// Instance entries, of one fleet or of all.
    async fn list_instances(&self, fleet: Option<&str>) -> Result<Vec<InstanceEntry>>;

    /// Node entries.
    async fn list_nodes(&self) -> Result<Vec<Entry>>;

    /// Ends the session: revokes the lease, so node and status keys disappear at once.
    async fn end_session(&self) -> Result<()>;
}

/// The keys under a prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (a trailing `/` is ignored).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// `<prefix>/fleets/`
    pub fn fleets(&self) -> String {
        format!("{}/fleets/", self.prefix)
    }

    /// `<prefix>/fleets/<name>`
    pub fn fleet(&self, name: &str) -> String {
        format!("{}{name}", self.fleets())
    }

    /// `<prefix>/nodes/`
    pub fn nodes(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    /// `<prefix>/status/` or `<prefix>/status/<fleet>/`
    pub fn status(&self, fleet: Option<&str>) -> String {
        match fleet {
            Some(f) => format!("{}/status/{f}/", self.prefix),
            None => format!("{}/status/", self.prefix),
        }
    }

    /// Splits a status key into (fleet, node).
    pub fn parse_status(&self, key: &str) -> Option<(String, String)> {
        let rest = key.strip_prefix(&self.status(None))?;
        let (fleet, node) = rest.split_once('/')?;
        (!node.contains('/')).then(|| (fleet.to_string(), node.to_string()))
    }

    /// `<prefix>/instances/` or `<prefix>/instances/<fleet>/`
    pub fn instances(&self, fleet: Option<&str>) -> String {
        match fleet {
            Some(f) => format!("{}/instances/{f}/", self.prefix),
            None => format!("{}/instances/", self.prefix),
        }
    }

    /// `<prefix>/instances/<fleet>/<node>/`
    pub fn instances_of(&self, fleet: &str, node: &str) -> String {
        format!("{}{node}/", self.instances(Some(fleet)))
    }

    /// Splits an instance key into its entry.
    pub fn parse_instance(&self, key: &str, value: String) -> Option<InstanceEntry> {
        let rest = key.strip_prefix(&self.instances(None))?;
        let mut parts = rest.split('/');
        let (fleet, node, key) = (parts.next()?, parts.next()?, parts.next()?);
        (parts.next().is_none() && !key.is_empty()).then(|| InstanceEntry {
            fleet: fleet.to_string(),
            node: node.to_string(),
            key: key.to_string(),
            value,
        })
    }
}

/// Checks a name used as a key segment (fleet or node): non-empty, no `/`.
pub fn check_segment(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name.chars().any(char::is_control) {
        Err(StoreError::Invalid(format!("{what} name {name:?}")))
    } else {
        Ok(())
    }
}
