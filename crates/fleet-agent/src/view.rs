//! What the agent last saw and did, shared with the HTTP endpoints (`/instances`, `/metrics`,
//! the health checks): the view, and the endpoint list derived from status.

use std::collections::{BTreeMap, HashMap};

use fleet_api::{FleetStatus, InstanceStatus, Phase};
use fleet_runtime::clock::Instant;

use crate::planner::{Instance, Why};

/// An instance as the HTTP endpoints show it.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Fleet.
    pub fleet: String,
    /// Container ID.
    pub id: String,
    /// Slot.
    pub slot: u32,
    /// `host:port` to send requests to.
    pub address: String,
    /// Phase.
    pub phase: Phase,
    /// Whether to route to it.
    pub ready: bool,
    /// Spec hash.
    pub spec_hash: String,
}

/// What the agent last saw and did, for `/instances`, `/metrics` and the health endpoints.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// The node.
    pub node: String,
    /// Every instance.
    pub endpoints: Vec<Endpoint>,
    /// Every fleet's status on this node.
    pub statuses: Vec<FleetStatus>,
    /// The fleet list is known (etcd or the manifests answered).
    pub fleets_known: bool,
    /// containerd answered the last pass.
    pub containerd_up: bool,
    /// The store accepted the last writes and confirms the session (so an outage shows even
    /// when nothing needs writing).
    pub store_up: bool,
    /// When the last pass ended.
    pub last_pass: Option<Instant>,
    /// Passes so far.
    pub passes: u64,
    /// Duration of the last pass.
    pub last_pass_seconds: f64,
    /// Actions (completed, failed).
    pub actions: (u64, u64),
    /// Status writes so far.
    pub status_writes: u64,
    /// Restarts by fleet.
    pub restarts: BTreeMap<String, u64>,
    /// Image pulls.
    pub pulls: crate::images::PullStats,
    /// Model pulls.
    pub models: crate::models::ModelStats,
    /// Rotations started, by fleet and reason (one of [`Why::ROTATIONS`]).
    pub rotations: BTreeMap<(String, Why), u64>,
}

/// `host:port` of an instance at `ip` (IPv6 in brackets).
pub fn address(ip: std::net::IpAddr, port: u16) -> String {
    match ip {
        std::net::IpAddr::V6(ip) => format!("[{ip}]:{port}"),
        ip => format!("{ip}:{port}"),
    }
}

/// The endpoints: every instance with a status (phase and readiness from there), at the
/// address `ip_of` says it listens on.
pub fn endpoints(
    instances: &[Instance],
    statuses: &[FleetStatus],
    ip_of: impl Fn(&Instance) -> Option<std::net::IpAddr>,
) -> Vec<Endpoint> {
    let phases: HashMap<&str, &InstanceStatus> = statuses
        .iter()
        .flat_map(|s| s.instances.iter())
        .map(|i| (i.id.as_str(), i))
        .collect();
    instances
        .iter()
        .filter_map(|i| {
            let s = phases.get(i.id.as_str())?;
            let ip = ip_of(i).unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
            Some(Endpoint {
                fleet: i.labels.fleet.clone(),
                id: i.id.clone(),
                slot: i.labels.slot,
                address: address(ip, i.labels.port),
                phase: s.phase,
                ready: s.ready,
                spec_hash: i.labels.spec_hash.clone(),
            })
        })
        .collect()
}
