//! What agents write back (interface.md §2–§3): per-node fleet status, node records, and the
//! containerd labels that let an agent adopt what runs after a restart.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::manifest::FleetSpec;

/// containerd label: the fleet an instance belongs to. Without it, a container is never touched.
pub const LABEL_FLEET: &str = "ollama-fleet.io/fleet";
/// containerd label: the instance's slot.
pub const LABEL_SLOT: &str = "ollama-fleet.io/slot";
/// containerd label: the instance's port.
pub const LABEL_PORT: &str = "ollama-fleet.io/port";
/// containerd label: the spec hash the instance was created from.
pub const LABEL_SPEC_HASH: &str = "ollama-fleet.io/spec-hash";
/// containerd label: when the instance was created (RFC 3339).
pub const LABEL_CREATED_AT: &str = "ollama-fleet.io/created-at";

/// The lifecycle phase of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub enum Phase {
    /// Image or model work before the task runs.
    Pending,
    /// The task runs but is not ready yet.
    Starting,
    /// Ready for traffic.
    Ready,
    /// Was ready, the readiness probe is failing.
    Unready,
    /// Waiting to restart after exits.
    BackOff,
    /// Being stopped.
    Terminating,
}

impl Phase {
    /// Every phase, in lifecycle order.
    pub const ALL: [Phase; 6] = [
        Phase::Pending,
        Phase::Starting,
        Phase::Ready,
        Phase::Unready,
        Phase::BackOff,
        Phase::Terminating,
    ];

    /// The phase as status shows it (`Ready`, `BackOff`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Starting => "Starting",
            Phase::Ready => "Ready",
            Phase::Unready => "Unready",
            Phase::BackOff => "BackOff",
            Phase::Terminating => "Terminating",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an instance last ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastExit {
    /// Exit code (137 for SIGKILL; -1 when the agent ended it or it never ran).
    pub code: i32,
    /// Why.
    pub reason: ExitReason,
    /// When (RFC 3339).
    pub at: String,
}

/// Why an instance ended, as status shows it (a string in JSON and in the slot's label).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ExitReason {
    /// The kernel's OOM killer ended it.
    OomKilled,
    /// It exited with code 0.
    Completed,
    /// It exited with another code.
    Error,
    /// Its container never got a running task.
    StartError,
    /// It was not ready within `startupTimeoutSeconds`.
    StartupTimeout,
    /// Its liveness probe failed `failureThreshold` times in a row.
    Unhealthy,
    /// The gateway's watchdog saw it stall `failureThreshold` times in a row.
    Stalled,
    /// A reason this agent does not know (written by another version).
    Other(String),
}

impl ExitReason {
    /// The reason as status shows it (`OOMKilled`, `Error`, ...).
    pub fn as_str(&self) -> &str {
        match self {
            ExitReason::OomKilled => "OOMKilled",
            ExitReason::Completed => "Completed",
            ExitReason::Error => "Error",
            ExitReason::StartError => "StartError",
            ExitReason::StartupTimeout => "StartupTimeout",
            ExitReason::Unhealthy => "Unhealthy",
            ExitReason::Stalled => "Stalled",
            ExitReason::Other(s) => s,
        }
    }

    /// The reason that `s` shows (an unknown one is kept as it is).
    pub fn parse(s: &str) -> ExitReason {
        [
            ExitReason::OomKilled,
            ExitReason::Completed,
            ExitReason::Error,
            ExitReason::StartError,
            ExitReason::StartupTimeout,
            ExitReason::Unhealthy,
            ExitReason::Stalled,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
        .unwrap_or_else(|| ExitReason::Other(s.to_string()))
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ExitReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ExitReason {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| ExitReason::parse(&s))
    }
}

/// One instance as its node's agent sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// Container ID, `<fleet>-<slot>-<6 hex>`.
    pub id: String,
    /// Slot number.
    pub slot: u32,
    /// Listening port.
    pub port: u16,
    /// Lifecycle phase.
    pub phase: Phase,
    /// Whether it receives traffic.
    pub ready: bool,
    /// When its task started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// Restarts of this slot.
    #[serde(default)]
    pub restarts: u32,
    /// The spec hash it runs.
    pub spec_hash: String,
    /// How the slot's previous instance ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<LastExit>,
    /// Why it is not progressing (e.g. `ErrImageNeverPull: ...`), when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A condition in the Kubernetes style.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `SpecValid`, `Available`, `Progressing`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase reason.
    pub reason: String,
    /// Details for people.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    #[serde(default)]
    pub last_transition_time: String,
}

/// A fleet's status on one node: the value of `/ollama-fleet/status/<fleet>/<node>`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetStatus {
    /// The fleet.
    pub fleet: String,
    /// The node.
    pub node: String,
    /// The fleet generation (etcd mod_revision) this status acted on.
    pub observed_generation: i64,
    /// Instances the node should run.
    pub desired_replicas: u32,
    /// Instances that exist.
    pub replicas: u32,
    /// Instances that are ready.
    pub ready_replicas: u32,
    /// Instances running the current spec.
    pub updated_replicas: u32,
    /// Every instance. Empty in the stored summary: each instance is its own entry under
    /// `<prefix>/instances/<fleet>/<node>/` (readers put them back).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceStatus>,
    /// Conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// When this status was written (RFC 3339).
    #[serde(default)]
    pub updated_at: String,
    /// The prompt cache a new instance gets on this node (`resources.promptCache`): a quantity,
    /// `engine` (the engine's own, 8 GiB), or `pending` (none until the model is on the node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_cache: Option<String>,
}

impl FleetStatus {
    /// The condition of a type, if present.
    pub fn condition(&self, kind: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.kind == kind)
    }
}

/// A node's capacity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// CPU sockets.
    pub sockets: u32,
    /// Logical cpus.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

/// Versions of what runs a node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Versions {
    /// The agent's version.
    pub agent: String,
    /// containerd's version.
    pub containerd: String,
    /// The default runtime.
    pub runtime: String,
}

/// The value of `/ollama-fleet/nodes/<node>`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Node labels (matched by `nodeSelector`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Capacity.
    pub capacity: Capacity,
    /// Versions.
    pub versions: Versions,
    /// Last heartbeat (RFC 3339).
    pub heartbeat: String,
    /// The node serves the gateway (`agent --serve`): tenants' limits are shared by these nodes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gateway: bool,
}

/// The parts of a spec that shape a container: a change to any of them rolls out.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ContainerShape<'a> {
    image: &'a str,
    image_digest: &'a str,
    command: &'a [String],
    env: &'a BTreeMap<String, String>,
    resources: &'a crate::Resources,
    runtime: &'a crate::RuntimeSpec,
    model: &'a str,
    models: &'a crate::Models,
    /// Absent when unset, so fleets without it keep the hash they had before it existed.
    #[serde(skip_serializing_if = "unset")]
    security_context: &'a crate::SecurityContext,
    /// Where instances listen: a change must roll out (probes and endpoints follow the spec).
    /// Absent at its default, for the same reason.
    #[serde(skip_serializing_if = "default_network")]
    network: &'a crate::Network,
}

fn default_network(n: &&crate::Network) -> bool {
    **n == crate::Network::default()
}

fn unset(s: &&crate::SecurityContext) -> bool {
    s.is_default()
}

/// The hash (16 hex digits) of everything in `spec` that affects containers, plus an image
/// digest (the agent passes the resolved digest under `imagePullPolicy: Always`, else empty).
/// Replicas, the node selector, probes, rotation, rollout, backoff, `terminationGracePeriod`
/// (read when an instance stops) and `paused` are not part of it: changing them restarts
/// nothing. Every field is named below, so a new one cannot be added without deciding.
pub fn spec_hash(spec: &FleetSpec, image_digest: &str) -> String {
    let FleetSpec {
        model,
        image,
        image_pull_policy: _,
        command,
        env,
        replicas: _,
        node_selector: _,
        resources,
        network,
        models,
        probes: _,
        rotation: _,
        rollout: _,
        restart_backoff: _,
        termination_grace_period: _,
        runtime,
        security_context,
        paused: _,
    } = spec;
    let image = spec
        .image_ref()
        .map_or_else(|_| image.clone(), |r| r.to_string());
    let shape = ContainerShape {
        image: &image,
        image_digest,
        command,
        env,
        resources,
        runtime,
        model,
        models,
        security_context,
        network,
    };
    let bytes = serde_json::to_vec(&shape).unwrap_or_default();
    let mut hex = sha256_hex(&bytes);
    hex.truncate(16);
    hex
}

/// The SHA-256 of `data` as 64 lowercase hex digits.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Context, parse_fleet};

    fn spec(extra: &str) -> FleetSpec {
        let src = format!(
            "apiVersion: ollama-fleet.io/v1alpha1\nkind: OllamaFleet\nmetadata: {{name: a}}\nspec:\n  model: m\n  replicas: {{perNode: 2}}\n{extra}"
        );
        parse_fleet(&src, &Context::default()).expect("valid").spec
    }

    #[test]
    fn hash_changes_only_with_container_fields() {
        let base = spec_hash(&spec(""), "");
        assert_eq!(base.len(), 16);
        assert_eq!(base, spec_hash(&spec(""), ""), "stable");
        for same in [
            "  probes: {readiness: {periodSeconds: 1}}\n",
            "  rotation: {maxAge: 1d}\n",
            "  rollout: {maxUnavailable: 1}\n",
            "  paused: true\n",
            "  terminationGracePeriod: 5s\n",
            "  nodeSelector: {a: b}\n",
            "  image: ollama/ollama:0.4.0\n",
        ] {
            assert_eq!(
                spec_hash(&spec(same), ""),
                base,
                "{same} must not change the hash"
            );
        }
        for differs in [
            "  image: ollama/ollama:0.5.0\n",
            "  env: {A: b}\n",
            "  command: [x]\n",
            "  resources: {memory: 1Gi}\n",
            "  runtime: {binaryName: crun}\n",
            "  models: {warm: false}\n",
            "  network: {hostIP: 0.0.0.0}\n",
            "  network: {basePort: 20000}\n",
            "  securityContext: {runAsUser: 1000}\n",
        ] {
            assert_ne!(
                spec_hash(&spec(differs), ""),
                base,
                "{differs} must change the hash"
            );
        }
        assert_ne!(
            spec_hash(&spec(""), "sha256:abc"),
            base,
            "a new digest rolls out"
        );
    }

    /// Fields added to the hash later are left out while they are at their defaults, so an
    /// agent upgrade does not roll out every instance of fleets that do not use them.
    #[test]
    fn the_hash_of_a_default_spec_does_not_move() {
        // The hash before network (issue 13) and securityContext joined it.
        assert_eq!(spec_hash(&spec(""), ""), "3c6ffb49cd848831");
    }

    #[test]
    fn sha256_of_a_known_vector() {
        // `echo -n abc | sha256sum`
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn status_json_shape() {
        let s = FleetStatus {
            fleet: "devassist".into(),
            node: "epyc-07".into(),
            observed_generation: 4711,
            instances: vec![InstanceStatus {
                id: "devassist-3-7f2a91".into(),
                slot: 3,
                port: 11437,
                phase: Phase::Ready,
                ready: true,
                started_at: Some("2026-11-28T10:00:00Z".into()),
                restarts: 2,
                spec_hash: "9c1e".into(),
                last_exit: Some(LastExit {
                    code: 137,
                    reason: ExitReason::OomKilled,
                    at: "2026-11-28T09:59:58Z".into(),
                }),
                message: None,
            }],
            conditions: vec![Condition {
                kind: "SpecValid".into(),
                status: "True".into(),
                reason: "Parsed".into(),
                message: String::new(),
                last_transition_time: "t".into(),
            }],
            ..FleetStatus::default()
        };
        let v = serde_json::to_value(&s).expect("json");
        assert_eq!(v["observedGeneration"], 4711);
        assert_eq!(v["instances"][0]["lastExit"]["reason"], "OOMKilled");
        assert_eq!(v["instances"][0]["phase"], "Ready");
        assert_eq!(v["conditions"][0]["type"], "SpecValid");
        assert_eq!(v["readyReplicas"], 0);
        let back: FleetStatus = serde_json::from_value(v).expect("round trip");
        assert_eq!(back, s);
    }
}
