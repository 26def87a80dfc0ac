//! The `OllamaFleet` manifest (interface.md §1): types, defaults and decoding.
//!
//! The types derive `Serialize` and `JsonSchema` (the schema is generated from them); they are
//! read only through [`decode_fleet`], which collects every error with its field path. Each
//! field's name, default and single-field rules live in the `decode` function next to its type;
//! rules that span fields live in [`crate::validate`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use schemars::JsonSchema;
use serde::Serialize;

use crate::decode::{Decode, Errors, FieldError, Fields, int_in, join};
use crate::refs::{ImageRef, ModelRef};
use crate::units::{Duration, IntOrPercent, Quantity};
use crate::yaml::{Node, Value};

/// The `apiVersion` of this manifest version.
pub const API_VERSION: &str = "ollama-fleet.io/v1alpha1";
/// The `kind` of the manifest.
pub const KIND: &str = "OllamaFleet";
/// The image used when `spec.image` is absent.
pub const DEFAULT_IMAGE: &str = "docker.io/ollama/ollama:0.4.0";
/// The model cache used when `spec.models.hostPath` is absent.
pub const DEFAULT_MODELS_PATH: &str = "/var/lib/ollama-fleet/models";
/// The smallest memory limit accepted (Ollama and its runner do not start below it).
pub const MIN_MEMORY: Quantity = Quantity::mebibytes(4);
/// The largest memory limit accepted (cgroups take a signed 64-bit count; 1 PiB is far above
/// any node).
pub const MAX_MEMORY: Quantity = Quantity::mebibytes(1024 * 1024 * 1024);
/// The first port of the Linux ephemeral range: instance ports must stay below it.
pub const EPHEMERAL_PORT_START: u32 = 32768;
/// The lowest instance port: ports below it are privileged and belong to system services.
pub const MIN_PORT: u16 = 1024;
/// The most cores `resources.cpus` may ask for (the agent also checks the node's own count).
pub const MAX_CPUS: f64 = 1024.0;

/// A fleet of identical Ollama instances, declared once and run on every matching node.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "OllamaFleet")]
pub struct OllamaFleet {
    /// Always `ollama-fleet.io/v1alpha1`.
    #[schemars(extend("const" = API_VERSION))]
    pub api_version: String,
    /// Always `OllamaFleet`.
    #[schemars(extend("const" = KIND))]
    pub kind: String,
    /// The fleet's name and labels.
    pub metadata: Metadata,
    /// What to run, where, and how.
    pub spec: FleetSpec,
}

/// Name and labels of a fleet.
#[derive(Clone, Debug, Default, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    /// The fleet's name: a DNS label of 1 to 40 characters (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`).
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Free-form labels, shown by `ollama-fleet get`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "scalar_map_schema")]
    pub labels: BTreeMap<String, String>,
}

/// Names to values; numbers and booleans are taken as their text (`OLLAMA_KEEP_ALIVE: -1`).
fn scalar_map_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "additionalProperties": {"type": ["string", "number", "boolean"]}
    })
}

/// The desired state of every instance of the fleet.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FleetSpec {
    /// The Ollama model every instance serves, e.g. `llama3.1:8b-instruct-q4_0`.
    pub model: String,
    /// The container image.
    #[serde(default = "default_image")]
    pub image: String,
    /// When to pull the image.
    #[serde(default)]
    pub image_pull_policy: PullPolicy,
    /// Replaces the image's entrypoint and command when not empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Environment, merged over the agent's defaults (`OLLAMA_HOST`, `OLLAMA_MODELS`,
    /// `OLLAMA_NUM_PARALLEL=1`, `OLLAMA_MAX_LOADED_MODELS=1`, `OLLAMA_KEEP_ALIVE=-1`,
    /// `OLLAMA_NOPRUNE=1`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "scalar_map_schema")]
    pub env: BTreeMap<String, String>,
    /// How many instances per node: exactly one of `perSocket` or `perNode`.
    pub replicas: Replicas,
    /// Node labels that must all match; empty selects every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "scalar_map_schema")]
    pub node_selector: BTreeMap<String, String>,
    /// cgroup limits of each instance.
    #[serde(default)]
    pub resources: Resources,
    /// Where instances listen.
    #[serde(default)]
    pub network: Network,
    /// The node's shared model cache.
    #[serde(default)]
    pub models: Models,
    /// Health checks.
    #[serde(default)]
    pub probes: Probes,
    /// Replacement of old or bloated instances.
    #[serde(default)]
    pub rotation: Rotation,
    /// How changes roll out on each node.
    #[serde(default)]
    pub rollout: Rollout,
    /// Per-slot restart backoff after exits: the first restart at once, then `initial`,
    /// doubling up to `max`; reset after 10 minutes of healthy running.
    #[serde(default)]
    pub restart_backoff: RestartBackoff,
    /// Time between SIGTERM and SIGKILL when an instance stops.
    #[serde(default = "default_grace")]
    pub termination_grace_period: Duration,
    /// The containerd runtime.
    #[serde(default)]
    pub runtime: RuntimeSpec,
    /// The user instances run as, and a read-only root filesystem, as in Kubernetes.
    #[serde(default, skip_serializing_if = "SecurityContext::is_default")]
    pub security_context: SecurityContext,
    /// When true, keep what runs and make no changes.
    #[serde(default)]
    pub paused: bool,
}

fn default_image() -> String {
    DEFAULT_IMAGE.to_string()
}

fn default_grace() -> Duration {
    Duration::secs(30)
}

/// When the agent pulls the image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, JsonSchema)]
pub enum PullPolicy {
    /// Re-resolve the tag on every change of the fleet and every `--image-refresh`.
    Always,
    /// Pull only when the image is absent.
    #[default]
    IfNotPresent,
    /// Never pull: the image must be in containerd already.
    Never,
}

/// How many instances a node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Replicas {
    /// This many instances per CPU socket of the node.
    PerSocket(u32),
    /// This many instances per node.
    PerNode(u32),
}

impl Default for Replicas {
    fn default() -> Self {
        Replicas::PerNode(0)
    }
}

impl Replicas {
    /// The number of instances on a node with `sockets` sockets.
    pub fn count(self, sockets: u32) -> u32 {
        match self {
            Replicas::PerSocket(n) => n.saturating_mul(sockets),
            Replicas::PerNode(n) => n,
        }
    }
}

/// cgroup limits of each instance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// CFS quota in cores; fractions allowed (`0.5`). Absent: no quota.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.01, max = 1024.0))]
    pub cpus: Option<f64>,
    /// Relative CPU weight (cgroup `cpu.shares`, 2 to 262144).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 262_144))]
    pub cpu_shares: Option<u64>,
    /// Hard memory limit, at least 4Mi. Absent: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Swap the instance may use beyond `memory`. Absent or `0`: none, so an instance at its
    /// limit is OOM-killed and replaced rather than swapping its model and KV cache (the
    /// kubelet's default too). Needs a memory limit (the fleet's or the agent's default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap: Option<Quantity>,
    /// Most processes and threads the instance may have.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub pids: Option<u64>,
    /// `socket` pins each instance to the cpus and NUMA memory of one socket.
    #[serde(default)]
    pub cpu_pinning: CpuPinning,
    /// Host RAM for the engine's prompt cache (llama-server's `--cache-ram`, which Ollama leaves
    /// at 8 GiB per runner): `auto` sizes it from `memory` (less the model, its context's KV
    /// cache and a margin), a quantity sets it (`0`: no prompt cache), `engine` leaves the
    /// engine's own default.
    #[serde(default, skip_serializing_if = "PromptCache::is_auto")]
    pub prompt_cache: PromptCache,
}

/// The engine's prompt cache per instance (`resources.promptCache`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PromptCache {
    /// Sized from `resources.memory`: what the model and its context leave, less a margin.
    #[default]
    Auto,
    /// The engine's own default (8 GiB per runner): the agent sets nothing.
    Engine,
    /// This much (`0`: no prompt cache).
    Bytes(Quantity),
}

impl PromptCache {
    /// The default.
    pub fn is_auto(&self) -> bool {
        *self == PromptCache::Auto
    }
}

impl Serialize for PromptCache {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PromptCache::Auto => s.serialize_str("auto"),
            PromptCache::Engine => s.serialize_str("engine"),
            PromptCache::Bytes(q) => q.serialize(s),
        }
    }
}

impl JsonSchema for PromptCache {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PromptCache".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let quantity = generator.subschema_for::<Quantity>();
        schemars::json_schema!({
            "description": "auto (from memory), engine (the engine's default, 8 GiB), or a quantity (0: none).",
            "anyOf": [{"type": "string", "enum": ["auto", "engine"]}, quantity]
        })
    }
}

/// CPU pinning of instances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CpuPinning {
    /// No cpuset: instances float over every cpu.
    #[default]
    None,
    /// cpuset and NUMA mems of the socket the instance's slot belongs to.
    Socket,
}

/// Where instances listen, in the host network namespace.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Network {
    /// The address instances bind to.
    #[serde(rename = "hostIP", default = "default_host_ip")]
    pub host_ip: IpAddr,
    /// Slot `i` listens on `basePort + i`; every port must stay below 32768.
    #[serde(default = "default_base_port")]
    #[schemars(range(min = 1024, max = 32767))]
    pub base_port: u16,
}

fn default_host_ip() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

fn default_base_port() -> u16 {
    11434
}

impl Default for Network {
    fn default() -> Self {
        Network {
            host_ip: default_host_ip(),
            base_port: default_base_port(),
        }
    }
}

/// The node's model cache, shared by its instances.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Models {
    /// Host directory mounted at `/models` in every instance; empty: no mount. An absolute,
    /// normalised path (no `.`, `..`, `//` or trailing `/`); the agent also requires it to be
    /// under one of its `--allow-host-path` prefixes (default `/var/lib/ollama-fleet/models`).
    #[serde(default = "default_models_path")]
    pub host_path: String,
    /// Ensure `spec.model` is present before instances are Ready.
    #[serde(default = "yes")]
    pub pull: bool,
    /// Each instance loads the model (keep_alive -1) before it is Ready.
    #[serde(default = "yes")]
    pub warm: bool,
}

fn default_models_path() -> String {
    DEFAULT_MODELS_PATH.to_string()
}

fn yes() -> bool {
    true
}

impl Default for Models {
    fn default() -> Self {
        Models {
            host_path: default_models_path(),
            pull: true,
            warm: true,
        }
    }
}

/// Health checks of each instance.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probes {
    /// Decides whether the instance receives traffic. Defaults: path `/api/version`, period 5,
    /// timeout 2, failure threshold 3.
    #[serde(default = "Probe::readiness")]
    pub readiness: Probe,
    /// Restarts the instance when failing. Defaults: path `/`, period 10, timeout 2,
    /// failure threshold 3.
    #[serde(default = "Probe::liveness")]
    pub liveness: Probe,
    /// How long an instance may take to become ready before it is restarted.
    #[serde(default = "default_startup_timeout")]
    #[schemars(range(min = 1))]
    pub startup_timeout_seconds: u32,
}

fn default_startup_timeout() -> u32 {
    600
}

impl Default for Probes {
    fn default() -> Self {
        Probes {
            readiness: Probe::readiness(),
            liveness: Probe::liveness(),
            startup_timeout_seconds: default_startup_timeout(),
        }
    }
}

/// An HTTP GET probe; any 2xx or 3xx answer within the timeout is a success.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = optional_without_defaults)]
pub struct Probe {
    /// The path to GET, starting with `/`.
    pub path: String,
    /// Seconds between probes.
    #[schemars(range(min = 1))]
    pub period_seconds: u32,
    /// Seconds before a probe counts as failed.
    #[schemars(range(min = 1))]
    pub timeout_seconds: u32,
    /// Consecutive failures that count as failing.
    #[schemars(range(min = 1))]
    pub failure_threshold: u32,
}

/// Every field of a probe is optional, with defaults that depend on the probe (documented on
/// the field that holds it).
fn optional_without_defaults(schema: &mut schemars::Schema) {
    schema.remove("required");
}

impl Probe {
    /// The readiness probe's defaults.
    pub fn readiness() -> Probe {
        Probe {
            path: "/api/version".into(),
            period_seconds: 5,
            timeout_seconds: 2,
            failure_threshold: 3,
        }
    }

    /// The liveness probe's defaults.
    pub fn liveness() -> Probe {
        Probe {
            path: "/".into(),
            period_seconds: 10,
            timeout_seconds: 2,
            failure_threshold: 3,
        }
    }
}

/// Replacement of instances by age or memory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rotation {
    /// Replace instances older than this; absent: never.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age: Option<Duration>,
    /// Also replace an instance whose anonymous plus swap memory exceeds this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<Quantity>,
}

/// The per-node rollout budget.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rollout {
    /// Instances that may be unavailable during a rollout (percent rounds down).
    #[serde(default = "default_max_unavailable")]
    pub max_unavailable: IntOrPercent,
    /// Extra instances allowed during replacement (percent rounds up); they use the ports after
    /// the last slot's.
    #[serde(default = "default_max_surge")]
    pub max_surge: IntOrPercent,
}

fn default_max_unavailable() -> IntOrPercent {
    IntOrPercent::Percent(25)
}

fn default_max_surge() -> IntOrPercent {
    IntOrPercent::Int(0)
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            max_unavailable: default_max_unavailable(),
            max_surge: default_max_surge(),
        }
    }
}

impl Rollout {
    /// (max unavailable, max surge) as counts for `replicas` instances; when both come out 0,
    /// one unavailable instance is allowed, as in Kubernetes.
    pub fn budget(&self, replicas: u32) -> (u32, u32) {
        let unavailable = self.max_unavailable.resolve(replicas, false);
        let surge = self.max_surge.resolve(replicas, true);
        if unavailable == 0 && surge == 0 {
            (1, 0)
        } else {
            (unavailable, surge)
        }
    }
}

/// Per-slot restart backoff.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestartBackoff {
    /// Delay before the second restart; doubles with every further one.
    #[serde(default = "default_backoff_initial")]
    pub initial: Duration,
    /// The longest delay.
    #[serde(default = "default_backoff_max")]
    pub max: Duration,
}

fn default_backoff_initial() -> Duration {
    Duration::secs(1)
}

fn default_backoff_max() -> Duration {
    Duration::secs(300)
}

impl Default for RestartBackoff {
    fn default() -> Self {
        RestartBackoff {
            initial: default_backoff_initial(),
            max: default_backoff_max(),
        }
    }
}

/// The containerd runtime that runs instances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuntimeSpec {
    /// The containerd runtime (shim) name.
    #[serde(default = "default_runtime")]
    pub name: String,
    /// The OCI runtime binary the shim runs, e.g. `crun`: a bare name, never a path (the
    /// agent maps allowed names to binaries with `--allow-runtime`); empty: the shim's default
    /// (runc).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub binary_name: String,
}

/// The identity and root filesystem of instances.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityContext {
    /// The uid instances run as; absent: the image's numeric `USER`, else 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_as_user: Option<u32>,
    /// The gid instances run as; absent: the image's `USER` group, else 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_as_group: Option<u32>,
    /// Mount the image read-only; `/tmp` and the instance's `HOME` become small private tmpfs
    /// mounts (Ollama writes its key pair under `HOME`), and models live in `/models`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only_root_filesystem: bool,
}

impl SecurityContext {
    /// True when nothing is set (the spec hash of fleets without it stays as it was).
    pub fn is_default(&self) -> bool {
        *self == SecurityContext::default()
    }
}

fn default_runtime() -> String {
    "io.containerd.runc.v2".into()
}

impl Default for RuntimeSpec {
    fn default() -> Self {
        RuntimeSpec {
            name: default_runtime(),
            binary_name: String::new(),
        }
    }
}

impl OllamaFleet {
    /// The fleet's name.
    pub fn name(&self) -> &str {
        &self.metadata.name
    }
}

impl FleetSpec {
    /// The parsed, normalised image reference.
    pub fn image_ref(&self) -> Result<ImageRef, String> {
        ImageRef::parse(&self.image)
    }

    /// The parsed model reference.
    pub fn model_ref(&self) -> Result<ModelRef, String> {
        ModelRef::parse(&self.model)
    }
}

// ---------------------------------------------------------------------------------------
// Decoding: names, defaults and single-field rules.

/// Decodes one document into a fleet, collecting every error (field rules only; see
/// [`crate::validate`] for rules across fields).
pub(crate) fn decode_fleet(node: &Node, errs: &mut Errors) -> OllamaFleet {
    let Some(mut f) = Fields::new(node, "", errs) else {
        return placeholder();
    };
    let api_version = f.req::<String>("apiVersion").unwrap_or_default();
    if !api_version.is_empty() && api_version != API_VERSION {
        let pos = f.pos_of("apiVersion");
        f.errs.add(
            "apiVersion",
            pos,
            format!("must be {API_VERSION:?}, got {api_version:?}"),
        );
    }
    let kind = f.req::<String>("kind").unwrap_or_default();
    if !kind.is_empty() && kind != KIND {
        let pos = f.pos_of("kind");
        f.errs
            .add("kind", pos, format!("must be {KIND:?}, got {kind:?}"));
    }
    if f.node("metadata").is_none() {
        f.req::<String>("metadata");
    }
    let metadata = f.object("metadata", decode_metadata);
    if f.node("spec").is_none() {
        f.req::<String>("spec");
    }
    let spec = f.object("spec", decode_spec);
    f.finish();
    OllamaFleet {
        api_version,
        kind,
        metadata,
        spec,
    }
}

fn placeholder() -> OllamaFleet {
    OllamaFleet {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        metadata: Metadata::default(),
        spec: FleetSpec::default(),
    }
}

impl Default for FleetSpec {
    fn default() -> Self {
        FleetSpec {
            model: String::new(),
            image: default_image(),
            image_pull_policy: PullPolicy::default(),
            command: Vec::new(),
            env: BTreeMap::new(),
            replicas: Replicas::default(),
            node_selector: BTreeMap::new(),
            resources: Resources::default(),
            network: Network::default(),
            models: Models::default(),
            probes: Probes::default(),
            rotation: Rotation::default(),
            rollout: Rollout::default(),
            restart_backoff: RestartBackoff::default(),
            termination_grace_period: default_grace(),
            runtime: RuntimeSpec::default(),
            security_context: SecurityContext::default(),
            paused: false,
        }
    }
}

fn decode_metadata(f: &mut Fields<'_>) -> Metadata {
    let name = f
        .req::<String>("name")
        .filter(|name| {
            let ok = is_dns_label(name, 40);
            if !ok {
                let pos = f.pos_of("name");
                f.errs.add(
                    "metadata.name",
                    pos,
                    format!(
                        "invalid name {name:?}: use 1 to 40 lowercase letters, digits or '-', starting and ending with a letter or digit"
                    ),
                );
            }
            ok
        })
        .unwrap_or_default();
    let labels = labels(f, "labels");
    Metadata { name, labels }
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most `max` characters.
pub fn is_dns_label(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= max
        && b.first().is_some_and(edge)
        && b.last().is_some_and(edge)
        && b.iter().all(|c| edge(c) || *c == b'-')
}

/// A map of Kubernetes-style labels: keys `[prefix/]name`, values of at most 63 characters.
fn labels(f: &mut Fields<'_>, name: &'static str) -> BTreeMap<String, String> {
    let path = f.path_of(name);
    let Some(node) = f.node(name) else {
        return BTreeMap::new();
    };
    let map: BTreeMap<String, String> = BTreeMap::decode(node, &path, f.errs).unwrap_or_default();
    if let Value::Map(entries) = &node.value {
        for (key, value) in entries {
            let entry = format!("{path}[{}]", key.name);
            if let Err(e) = check_label_key(&key.name) {
                f.errs.add(&entry, key.pos, e);
            }
            let v = map.get(&key.name).map(String::as_str).unwrap_or("");
            if !is_label_value(v) {
                f.errs.add(
                    &entry,
                    value.pos,
                    format!(
                        "invalid label value {v:?}: use at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
                    ),
                );
            }
        }
    }
    map
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_name(s)
}

fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty() && p.len() <= 253 && p.split('.').all(|part| is_dns_label(part, 63));
        if !ok {
            return Err(format!(
                "invalid label key {key:?}: the prefix before '/' must be a lowercase DNS name"
            ));
        }
    }
    if is_label_name(name) {
        Ok(())
    } else {
        Err(format!(
            "invalid label key {key:?}: use [prefix/]name with a name of at most 63 letters, digits, '-', '_' or '.'"
        ))
    }
}

fn decode_spec(f: &mut Fields<'_>) -> FleetSpec {
    let model = f
        .parsed::<String, _>("model", |m| ModelRef::parse(m).map(|_| m.clone()))
        .unwrap_or_default();
    if f.node("model").is_none() {
        f.req::<String>("model");
    }
    let image = f
        .parsed::<String, _>("image", |i| ImageRef::parse(i).map(|_| i.clone()))
        .unwrap_or_else(default_image);
    let image_pull_policy = f
        .parsed::<String, _>("imagePullPolicy", |p| match p.as_str() {
            "Always" => Ok(PullPolicy::Always),
            "IfNotPresent" => Ok(PullPolicy::IfNotPresent),
            "Never" => Ok(PullPolicy::Never),
            _ => Err(format!(
                "unsupported value {p:?}: use Always, IfNotPresent or Never"
            )),
        })
        .unwrap_or_default();
    let command: Vec<String> = f.or("command", Vec::new());
    if command.first().is_some_and(String::is_empty) {
        let pos = f.pos_of("command");
        f.errs.add(
            "spec.command[0]",
            pos,
            "the program to run must not be empty",
        );
    }
    let env = env(f);
    let replicas = decode_replicas(f);
    let node_selector = labels(f, "nodeSelector");
    let resources = f.object("resources", decode_resources);
    let network = f.object("network", decode_network);
    let models = f.object("models", decode_models);
    let probes = f.object("probes", decode_probes);
    let rotation = f.object("rotation", |f| Rotation {
        max_age: f.opt("maxAge"),
        max_memory: f.opt("maxMemory"),
    });
    let rollout = f.object("rollout", |f| Rollout {
        max_unavailable: f.or("maxUnavailable", default_max_unavailable()),
        max_surge: f.or("maxSurge", default_max_surge()),
    });
    let restart_backoff = f.object("restartBackoff", |f| RestartBackoff {
        initial: f.or("initial", default_backoff_initial()),
        max: f.or("max", default_backoff_max()),
    });
    let termination_grace_period = f.or("terminationGracePeriod", default_grace());
    let runtime = f.object("runtime", |f| RuntimeSpec {
        name: f
            .parsed::<String, _>("name", |n| {
                let ok = !n.is_empty()
                    && n.split('.').all(|p| {
                        !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    });
                if ok {
                    Ok(n.clone())
                } else {
                    Err(format!(
                        "invalid runtime name {n:?}: use a containerd runtime name such as io.containerd.runc.v2"
                    ))
                }
            })
            .unwrap_or_else(default_runtime),
        binary_name: f
            .parsed::<String, _>("binaryName", |b| {
                let bare = b.is_empty()
                    || (b.len() <= 64
                        && b != "."
                        && b != ".."
                        && b.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+')));
                if bare {
                    Ok(b.clone())
                } else {
                    Err(format!(
                        "invalid binary name {:?}: use a bare program name such as crun, never a path; the node's agent maps it to a binary (--allow-runtime)",
                        crate::clip(b, 64)
                    ))
                }
            })
            .unwrap_or_default(),
    });
    let security_context = f.object("securityContext", |f| {
        let id = |f: &mut Fields<'_>, name: &'static str| {
            let node = f.node(name)?;
            int_in(node, &f.path_of(name), f.errs, 0, i64::from(u32::MAX - 1)).map(|n| n as u32)
        };
        SecurityContext {
            run_as_user: id(f, "runAsUser"),
            run_as_group: id(f, "runAsGroup"),
            read_only_root_filesystem: f.or("readOnlyRootFilesystem", false),
        }
    });
    let paused = f.or("paused", false);
    FleetSpec {
        model,
        image,
        image_pull_policy,
        command,
        env,
        replicas,
        node_selector,
        resources,
        network,
        models,
        probes,
        rotation,
        rollout,
        restart_backoff,
        termination_grace_period,
        runtime,
        security_context,
        paused,
    }
}

fn env(f: &mut Fields<'_>) -> BTreeMap<String, String> {
    let path = f.path_of("env");
    let Some(node) = f.node("env") else {
        return BTreeMap::new();
    };
    let map: BTreeMap<String, String> = BTreeMap::decode(node, &path, f.errs).unwrap_or_default();
    if let Value::Map(entries) = &node.value {
        for (key, _) in entries {
            let k = &key.name;
            let ok = k
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                f.errs.add(
                    &format!("{path}[{k}]"),
                    key.pos,
                    format!(
                        "invalid variable name {k:?}: use letters, digits and '_', not starting with a digit"
                    ),
                );
            }
        }
    }
    map
}

fn decode_replicas(f: &mut Fields<'_>) -> Replicas {
    let Some(node) = f.node("replicas") else {
        f.req::<String>("replicas");
        return Replicas::default();
    };
    let path = f.path_of("replicas");
    let Some(mut r) = Fields::new(node, &path, f.errs) else {
        return Replicas::default();
    };
    let count = |r: &mut Fields<'_>, name: &'static str| {
        let node = r.node(name)?;
        int_in(node, &r.path_of(name), r.errs, 0, 100_000).map(|n| n as u32)
    };
    let present = |name: &str| matches!(&node.value, Value::Map(e) if e.iter().any(|(k, v)| k.name == name && v.value != Value::Null));
    let (has_socket, has_node) = (present("perSocket"), present("perNode"));
    let per_socket = count(&mut r, "perSocket");
    let per_node = count(&mut r, "perNode");
    let pos = node.pos;
    r.finish();
    match (has_socket, has_node) {
        (true, true) => {
            f.errs.add(
                &path,
                pos,
                "set exactly one of perSocket or perNode, not both",
            );
            Replicas::default()
        }
        (false, false) => {
            f.errs
                .add(&path, pos, "set exactly one of perSocket or perNode");
            Replicas::default()
        }
        (true, false) => per_socket.map_or_else(Replicas::default, Replicas::PerSocket),
        (false, true) => per_node.map_or_else(Replicas::default, Replicas::PerNode),
    }
}

fn decode_resources(f: &mut Fields<'_>) -> Resources {
    let cpus = match f.node("cpus") {
        None => None,
        Some(node) => {
            let path = f.path_of("cpus");
            let value = match &node.value {
                // Kubernetes-style millicores: "500m".
                Value::Str(s) => s
                    .strip_suffix('m')
                    .and_then(|m| m.parse::<u32>().ok())
                    .map(|m| f64::from(m) / 1000.0)
                    .ok_or(()),
                _ => f64::decode(node, &path, f.errs).ok_or(()),
            };
            match value {
                Ok(c) if c > MAX_CPUS => {
                    f.errs.add(
                        &path,
                        node.pos,
                        format!("must be at most {MAX_CPUS} cores, got {c}"),
                    );
                    None
                }
                Ok(c) if c >= 0.01 => Some(c),
                Ok(c) => {
                    f.errs.add(
                        &path,
                        node.pos,
                        format!("must be at least 0.01 cores, got {c}"),
                    );
                    None
                }
                Err(()) => {
                    if matches!(node.value, Value::Str(_)) {
                        f.errs.add(
                            &path,
                            node.pos,
                            "must be a number of cores such as 2 or 0.5 (or millicores such as 500m)",
                        );
                    }
                    None
                }
            }
        }
    };
    let cpu_shares = f.node("cpuShares").and_then(|node| {
        int_in(node, &f.path_of("cpuShares"), f.errs, 2, 262_144).map(|n| n as u64)
    });
    let memory: Option<Quantity> = f.opt("memory");
    let memory_ok = |m: &Quantity| *m >= MIN_MEMORY && m.bytes() <= MAX_MEMORY.bytes();
    if let Some(m) = memory.filter(|m| !memory_ok(m)) {
        let pos = f.pos_of("memory");
        let message = if m < MIN_MEMORY {
            format!("must be at least {MIN_MEMORY}, got {m}")
        } else {
            format!("must be at most {MAX_MEMORY}, got {m}")
        };
        f.errs.add(&f.path_of("memory"), pos, message);
    }
    let swap: Option<Quantity> = f.opt("swap");
    if let Some(s) = swap.filter(|s| s.bytes() > MAX_MEMORY.bytes()) {
        let pos = f.pos_of("swap");
        f.errs.add(
            &f.path_of("swap"),
            pos,
            format!("must be at most {MAX_MEMORY}, got {s}"),
        );
    }
    let pids = f
        .node("pids")
        .and_then(|node| int_in(node, &f.path_of("pids"), f.errs, 1, i64::MAX).map(|n| n as u64));
    let prompt_cache = match f.node("promptCache") {
        None => PromptCache::Auto,
        Some(node) => match &node.value {
            Value::Str(s) if s == "auto" => PromptCache::Auto,
            Value::Str(s) if s == "engine" => PromptCache::Engine,
            Value::Str(s) if s.starts_with(|c: char| c.is_ascii_alphabetic()) => {
                f.errs.add(
                    &f.path_of("promptCache"),
                    node.pos,
                    format!("unsupported value {s:?}: use auto, engine, or a quantity such as 256Mi (0: no prompt cache)"),
                );
                PromptCache::Auto
            }
            _ => Quantity::decode(node, &f.path_of("promptCache"), f.errs)
                .map_or(PromptCache::Auto, PromptCache::Bytes),
        },
    };
    if let (PromptCache::Bytes(cache), Some(m)) = (prompt_cache, memory)
        && cache >= m
        && memory_ok(&m)
    {
        f.errs.add(
            &f.path_of("promptCache"),
            f.pos_of("promptCache"),
            format!(
                "must be below resources.memory ({m}) to leave room for the model, got {cache}"
            ),
        );
    }
    let cpu_pinning = f
        .parsed::<String, _>("cpuPinning", |p| match p.as_str() {
            "none" => Ok(CpuPinning::None),
            "socket" => Ok(CpuPinning::Socket),
            _ => Err(format!("unsupported value {p:?}: use none or socket")),
        })
        .unwrap_or_default();
    Resources {
        cpus,
        cpu_shares,
        memory: memory.filter(memory_ok),
        swap: swap.filter(|s| s.bytes() <= MAX_MEMORY.bytes()),
        pids,
        cpu_pinning,
        prompt_cache,
    }
}

fn decode_network(f: &mut Fields<'_>) -> Network {
    let host_ip = f
        .parsed::<String, _>("hostIP", |ip| {
            ip.parse::<IpAddr>()
                .map_err(|_| format!("invalid IP address {ip:?}: use e.g. 127.0.0.1 or 0.0.0.0"))
        })
        .unwrap_or_else(default_host_ip);
    let base_port = f
        .node("basePort")
        .and_then(|node| {
            int_in(
                node,
                &f.path_of("basePort"),
                f.errs,
                i64::from(MIN_PORT),
                65535,
            )
            .map(|p| p as u16)
        })
        .unwrap_or_else(default_base_port);
    Network { host_ip, base_port }
}

fn decode_models(f: &mut Fields<'_>) -> Models {
    let host_path = f
        .parsed::<String, _>("hostPath", |p| {
            if p.is_empty() {
                return Ok(String::new());
            }
            if !p.starts_with('/') {
                return Err(format!(
                    "{:?} must be an absolute path (or empty for no cache)",
                    crate::clip(p, 256)
                ));
            }
            if !is_normalised_path(p) {
                return Err(format!(
                    "{:?} must be a normalised directory below / (no '.', '..', '//' or trailing '/')",
                    crate::clip(p, 256)
                ));
            }
            Ok(p.clone())
        })
        .unwrap_or_else(default_models_path);
    Models {
        host_path,
        pull: f.or("pull", true),
        warm: f.or("warm", true),
    }
}

/// An absolute path other than `/` whose components are all plain names: no empty ones (`//`,
/// a trailing `/`), no `.` and no `..`: no lexical tricks get past a prefix comparison (the
/// agent also resolves symlinks on the host before it compares).
pub fn is_normalised_path(p: &str) -> bool {
    p.strip_prefix('/').is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'))
    })
}

fn decode_probes(f: &mut Fields<'_>) -> Probes {
    let readiness = f.object("readiness", |f| decode_probe(f, Probe::readiness()));
    let liveness = f.object("liveness", |f| decode_probe(f, Probe::liveness()));
    let startup_timeout_seconds = f
        .node("startupTimeoutSeconds")
        .and_then(|node| {
            int_in(node, &f.path_of("startupTimeoutSeconds"), f.errs, 1, 86_400).map(|n| n as u32)
        })
        .unwrap_or_else(default_startup_timeout);
    Probes {
        readiness: readiness.unwrap_or_else(Probe::readiness),
        liveness: liveness.unwrap_or_else(Probe::liveness),
        startup_timeout_seconds,
    }
}

fn decode_probe(f: &mut Fields<'_>, defaults: Probe) -> Option<Probe> {
    let path = f
        .parsed::<String, _>("path", |p| {
            if p.starts_with('/') && !p.chars().any(|c| c.is_whitespace() || c.is_control()) {
                Ok(p.clone())
            } else {
                Err(format!(
                    "invalid path {p:?}: must start with '/' and contain no spaces"
                ))
            }
        })
        .unwrap_or(defaults.path);
    let mut seconds = |name: &'static str, default: u32| {
        f.node(name)
            .and_then(|node| int_in(node, &f.path_of(name), f.errs, 1, 3600).map(|n| n as u32))
            .unwrap_or(default)
    };
    Some(Probe {
        path,
        period_seconds: seconds("periodSeconds", defaults.period_seconds),
        timeout_seconds: seconds("timeoutSeconds", defaults.timeout_seconds),
        failure_threshold: seconds("failureThreshold", defaults.failure_threshold),
    })
}

/// Decodes without cross-field validation; used by [`crate::load`].
pub(crate) fn decode(node: &Node) -> (OllamaFleet, Vec<FieldError>) {
    let mut errs = Errors::default();
    let fleet = decode_fleet(node, &mut errs);
    (fleet, errs.0)
}

/// The path of a field of `spec`, for validation messages.
pub(crate) fn spec_path(field: &str) -> String {
    join("spec", field)
}
