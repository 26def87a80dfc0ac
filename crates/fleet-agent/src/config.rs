//! The agent's settings.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::policy::Policy;
use crate::topology::Topology;

/// The agent's settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This node's name.
    pub node: String,
    /// This node's labels (matched by `nodeSelector`).
    pub labels: BTreeMap<String, String>,
    /// Sockets counted for `perSocket`.
    pub sockets: u32,
    /// CPU topology.
    pub topology: Topology,
    /// containerd namespace (for messages).
    pub namespace: String,
    /// cgroup parent of the instances.
    pub cgroup_parent: String,
    /// Actions at once.
    pub concurrency: usize,
    /// Plan at least this often.
    pub resync: Duration,
    /// Rewrite unchanged status this often.
    pub status_heartbeat: Duration,
    /// Rewrite the node record this often.
    pub node_heartbeat: Duration,
    /// TTL of the session lease.
    pub session_ttl: Duration,
    /// The agent's version.
    pub version: String,
    /// Passes woken by events start at most this often (bursts are coalesced).
    pub min_pass_interval: Duration,
    /// `imagePullPolicy: Always` tags are re-resolved this often.
    pub image_refresh: Duration,
    /// First retry after a failed image pull (doubling up to 5 minutes).
    pub pull_backoff: Duration,
    /// What fleets may ask of this node (allowlists, default limits, admission).
    pub policy: Policy,
    /// `RLIMIT_NOFILE` of instances: 65536, or the agent's own hard limit when lower (runc
    /// cannot raise it past the shim's hard limit, which normally matches the agent's).
    pub nofile: u64,
    /// Where the fleets this node last saw are kept ([`crate::recall`]); `None`: nowhere.
    pub recall: Option<std::path::PathBuf>,
}

impl AgentConfig {
    /// Defaults for a node.
    pub fn new(node: &str, namespace: &str) -> AgentConfig {
        let topology = Topology::read(std::path::Path::new("/"));
        AgentConfig {
            node: node.into(),
            labels: BTreeMap::new(),
            sockets: topology.sockets.len().max(1) as u32,
            topology,
            namespace: namespace.into(),
            cgroup_parent: format!("/ollama-fleet/{namespace}"),
            concurrency: 16,
            resync: Duration::from_secs(10),
            status_heartbeat: Duration::from_secs(300),
            node_heartbeat: Duration::from_secs(60),
            session_ttl: Duration::from_secs(15),
            version: env!("CARGO_PKG_VERSION").into(),
            min_pass_interval: Duration::from_millis(100),
            image_refresh: Duration::from_secs(600),
            pull_backoff: Duration::from_secs(10),
            policy: Policy::default(),
            nofile: crate::topology::hard_nofile().map_or(65_536, |n| n.min(65_536)),
            recall: None,
        }
    }
}
