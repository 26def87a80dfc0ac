//! From a fleet's spec to one instance's container: the process, environment, mounts, cgroup
//! limits and labels (interface.md §3). Pure functions.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use fleet_api::{
    CpuPinning, FleetSpec, LABEL_CREATED_AT, LABEL_FLEET, LABEL_PORT, LABEL_SLOT, LABEL_SPEC_HASH,
    LastExit, ModelRef, PromptCache, Replicas,
};
use fleet_runtime::{BindMount, ContainerSpec, ImageInfo, Limits};

use crate::ollama::ModelFacts;
use crate::topology::{Topology, format_cpulist};

/// Label: restarts of the slot before this instance (carried from instance to instance).
pub const LABEL_RESTARTS: &str = "ollama-fleet.io/restarts";
/// Label: consecutive quick crashes behind this instance (drives the backoff).
pub const LABEL_CRASHLOOP: &str = "ollama-fleet.io/crashloop";
/// Label: the model the instance serves (`spec.model` when it was created), so an instance of a
/// previous spec keeps using its own model while a new one is pulled.
pub const LABEL_MODEL: &str = "ollama-fleet.io/model";
/// Label: the thread count the instance runs its model with (it loads the model derived for
/// it, see [`crate::models::derived_name`]); absent when nothing limits it.
pub const LABEL_THREADS: &str = "ollama-fleet.io/threads";
/// Label: the address the instance listens on (`network.hostIP` when it was made), so that
/// probes and endpoints follow it, not a later spec's, while a new address rolls out.
pub const LABEL_HOST_IP: &str = "ollama-fleet.io/host-ip";
/// Label: the instance's `terminationGracePeriod` in milliseconds, so that it is stopped with
/// its own grace even when its fleet is deleted or its document is broken.
pub const LABEL_GRACE: &str = "ollama-fleet.io/grace-ms";
/// Label: the requests the instance takes at once (its `OLLAMA_NUM_PARALLEL`), so the gateway
/// gives it that many, not what a later spec says.
pub const LABEL_PARALLEL: &str = "ollama-fleet.io/parallel";
/// Label: the instance's prompt cache (`LLAMA_ARG_CACHE_RAM`): bytes, `engine` (the engine's
/// default) or `pending` (sized before its model was known: none, until it is replaced).
pub const LABEL_PROMPT_CACHE: &str = "ollama-fleet.io/prompt-cache";
/// Label: how the slot's previous instance ended, `code:reason:RFC3339`.
pub const LABEL_LAST_EXIT: &str = "ollama-fleet.io/last-exit";

/// What is known of the node an instance runs on.
#[derive(Clone, Debug)]
pub struct NodeCtx {
    /// Sockets counted for `perSocket`.
    pub sockets: u32,
    /// CPU topology, for `cpuPinning: socket`.
    pub topology: Topology,
    /// cgroup parent of every instance.
    pub cgroup_parent: String,
    /// `RLIMIT_NOFILE` of instances.
    pub nofile: Option<u64>,
    /// Whether the host's cgroups bound swap (v2, or v1 with swap accounting): then instances
    /// get `resources.swap` (none by default) beyond their memory limit.
    pub bounds_swap: bool,
    /// The host's files instances see read-only (`/etc/hosts`, `/etc/resolv.conf`), those
    /// the host has.
    pub host_files: Vec<String>,
    /// What the node's model cache knows of each model (by `ModelRef::key`).
    pub models: HashMap<String, ModelFacts>,
}

/// An instance's prompt cache (the engine's host-RAM cache of prompt states).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheRam {
    /// The engine's own default: `LLAMA_ARG_CACHE_RAM` is not set.
    Engine,
    /// Its model is not known on the node yet: none (`0`) until the instance is replaced.
    Pending,
    /// This many bytes (whole MiB).
    Bytes(u64),
}

impl CacheRam {
    fn label(self) -> String {
        match self {
            CacheRam::Engine => "engine".into(),
            CacheRam::Pending => "pending".into(),
            CacheRam::Bytes(b) => b.to_string(),
        }
    }

    fn parse(text: &str) -> Option<CacheRam> {
        match text {
            "engine" => Some(CacheRam::Engine),
            "pending" => Some(CacheRam::Pending),
            b => b.parse().ok().map(CacheRam::Bytes),
        }
    }

    /// The bound it puts on the cache (`None`: the engine's, 8 GiB).
    pub fn bytes(self) -> Option<u64> {
        match self {
            CacheRam::Engine => None,
            CacheRam::Pending => Some(0),
            CacheRam::Bytes(b) => Some(b),
        }
    }
}

/// What is kept beyond the model, its KV cache and the prompt cache, for the server, the
/// runner's compute buffers and the rest: 128 MiB and a tenth of the memory.
pub fn memory_margin(memory: u64) -> u64 {
    (128 << 20) + memory / 10
}

/// The prompt cache an instance of `spec` gets, knowing `facts` of its model (if the node
/// knows them): `resources.promptCache` when it says a size or `engine`; with `auto`, what
/// `resources.memory` leaves after the model, the KV cache of its context (`OLLAMA_CONTEXT_LENGTH`,
/// default 4096, times `OLLAMA_NUM_PARALLEL`) and [`memory_margin`]; the engine's own without a
/// memory limit to size it from.
pub fn prompt_cache(spec: &FleetSpec, facts: Option<&ModelFacts>) -> CacheRam {
    let memory = match (spec.resources.prompt_cache, spec.resources.memory) {
        (PromptCache::Engine, _) | (PromptCache::Auto, None) => return CacheRam::Engine,
        (PromptCache::Bytes(q), _) => return CacheRam::Bytes(q.bytes() >> 20 << 20),
        (PromptCache::Auto, Some(m)) => m.bytes(),
    };
    let Some(facts) = facts else {
        return CacheRam::Pending;
    };
    let context = spec
        .env
        .get("OLLAMA_CONTEXT_LENGTH")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(4096);
    let kv = facts.kv_per_token * context * u64::from(parallel_of(&spec.env));
    let left = memory
        .saturating_sub(facts.size)
        .saturating_sub(kv)
        .saturating_sub(memory_margin(memory));
    CacheRam::Bytes(left >> 20 << 20)
}

/// What a new instance inherits from its slot's history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Carry {
    /// Restarts of the slot so far.
    pub restarts: u32,
    /// Consecutive quick crashes so far.
    pub crashloop: u32,
    /// How the previous instance ended.
    pub last_exit: Option<LastExit>,
}

/// The labels of an instance, parsed back (adoption needs nothing else).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceLabels {
    /// Fleet.
    pub fleet: String,
    /// Slot.
    pub slot: u32,
    /// Port.
    pub port: u16,
    /// Spec hash.
    pub spec_hash: String,
    /// Creation time.
    pub created_at: SystemTime,
    /// History carried from the slot's previous instances.
    pub carry: Carry,
    /// The model it serves (absent on containers made before the label existed).
    pub model: Option<String>,
    /// The thread count it runs the model with (absent: not limited, or made before the
    /// label existed; it then loads the model by its own name).
    pub threads: Option<u32>,
    /// Its `terminationGracePeriod` when it was made.
    pub grace: Option<std::time::Duration>,
    /// The address it listens on (absent on containers made before the label existed).
    pub host_ip: Option<std::net::IpAddr>,
    /// The requests it takes at once (absent on containers made before the label existed).
    pub parallel: Option<u32>,
    /// Its prompt cache (absent on containers made before the label existed).
    pub prompt_cache: Option<CacheRam>,
}

impl InstanceLabels {
    /// The labels of a fresh instance of `fleet`'s `slot` on `port`, of spec `hash`, made at
    /// `created_at`, with no history and nothing else said (tests start from it).
    pub fn new(
        fleet: &str,
        slot: u32,
        port: u16,
        spec_hash: &str,
        created_at: SystemTime,
    ) -> InstanceLabels {
        InstanceLabels {
            fleet: fleet.into(),
            slot,
            port,
            spec_hash: spec_hash.into(),
            created_at,
            carry: Carry::default(),
            model: None,
            threads: None,
            grace: None,
            host_ip: None,
            parallel: None,
            prompt_cache: None,
        }
    }
}

/// Parses an instance's labels; `None` when they are not ours or are broken.
pub fn parse_labels(labels: &BTreeMap<String, String>) -> Option<InstanceLabels> {
    let get = |k: &str| labels.get(k).map(String::as_str);
    let last_exit = get(LABEL_LAST_EXIT).and_then(|v| {
        let mut parts = v.splitn(3, ':');
        Some(LastExit {
            code: parts.next()?.parse().ok()?,
            reason: fleet_api::ExitReason::parse(parts.next()?),
            at: parts.next()?.to_string(),
        })
    });
    Some(InstanceLabels {
        fleet: get(LABEL_FLEET)?.to_string(),
        slot: get(LABEL_SLOT)?.parse().ok()?,
        port: get(LABEL_PORT)?.parse().ok()?,
        spec_hash: get(LABEL_SPEC_HASH).unwrap_or("").to_string(),
        created_at: get(LABEL_CREATED_AT)
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH),
        model: get(LABEL_MODEL).map(str::to_string),
        threads: get(LABEL_THREADS).and_then(|t| t.parse().ok()),
        host_ip: get(LABEL_HOST_IP).and_then(|ip| ip.parse().ok()),
        parallel: get(LABEL_PARALLEL).and_then(|p| p.parse().ok()),
        prompt_cache: get(LABEL_PROMPT_CACHE).and_then(CacheRam::parse),
        grace: get(LABEL_GRACE)
            .and_then(|g| g.parse().ok())
            .map(std::time::Duration::from_millis),
        carry: Carry {
            restarts: get(LABEL_RESTARTS)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            crashloop: get(LABEL_CRASHLOOP)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            last_exit,
        },
    })
}

/// A new container ID, `<fleet>-<slot>-<6 hex>`, different for every incarnation.
pub fn new_id(fleet: &str, slot: u32, now: SystemTime, salt: u64) -> String {
    let nanos = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let hash = fleet_api::sha256_hex(
        format!("{fleet}/{slot}/{nanos}/{salt}/{}", std::process::id()).as_bytes(),
    );
    format!("{fleet}-{slot}-{}", &hash[..6])
}

/// The port of a slot: its home, `basePort + slot`.
pub fn port(spec: &FleetSpec, slot: u32) -> u16 {
    u16::try_from(u32::from(spec.network.base_port) + slot).unwrap_or(u16::MAX)
}

/// The ports a fleet's instances may take on a node with `replicas` of them: its slots' and its
/// surge ports after them (at least one port). Admission reserves them across fleets; an
/// instance outside them (made for an earlier `basePort`) is replaced.
pub fn port_pool(spec: &FleetSpec, replicas: u32) -> std::ops::RangeInclusive<u32> {
    let (_, surge) = spec.rollout.budget(replicas);
    let first = u32::from(spec.network.base_port);
    first..=first + (replicas + surge).max(1) - 1
}

/// Whether two listeners on one port collide: the same address, or either is a wildcard.
pub fn addresses_collide(a: std::net::IpAddr, b: std::net::IpAddr) -> bool {
    a == b || a.is_unspecified() || b.is_unspecified()
}

/// The requests an instance with environment `env` takes at once: its `OLLAMA_NUM_PARALLEL`
/// (the agent's default is 1; at least 1).
pub fn parallel_of(env: &BTreeMap<String, String>) -> u32 {
    env.get("OLLAMA_NUM_PARALLEL")
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(1)
        .max(1)
}

/// The agent's default environment for an instance on `port` (the manifest's `env` overrides
/// it).
pub fn default_env(spec: &FleetSpec, port: u16) -> BTreeMap<String, String> {
    let host = match spec.network.host_ip {
        std::net::IpAddr::V6(ip) => format!("[{ip}]:{port}"),
        ip => format!("{ip}:{port}"),
    };
    let mut env = BTreeMap::from([
        ("OLLAMA_HOST".to_string(), host),
        ("OLLAMA_NUM_PARALLEL".to_string(), "1".to_string()),
        ("OLLAMA_MAX_LOADED_MODELS".to_string(), "1".to_string()),
        ("OLLAMA_KEEP_ALIVE".to_string(), "-1".to_string()),
        ("OLLAMA_NOPRUNE".to_string(), "1".to_string()),
    ]);
    if !spec.models.host_path.is_empty() {
        env.insert("OLLAMA_MODELS".into(), "/models".into());
    }
    env
}

/// The socket an instance of `slot` is pinned to.
pub fn socket_of(spec: &FleetSpec, slot: u32, sockets: u32) -> u32 {
    let sockets = sockets.max(1);
    match spec.replicas {
        Replicas::PerSocket(n) if n > 0 => (slot / n).min(sockets - 1),
        _ => slot % sockets,
    }
}

/// The container of one instance of `slot`, listening on `port` (the slot's own,
/// `basePort + slot`, unless it surged onto another).
#[allow(clippy::too_many_arguments)]
pub fn container_spec(
    fleet: &str,
    spec: &FleetSpec,
    hash: &str,
    image: &ImageInfo,
    node: &NodeCtx,
    (slot, port): (u32, u16),
    id: String,
    carry: &Carry,
    now: SystemTime,
) -> ContainerSpec {
    let mut env: BTreeMap<String, String> = image
        .config
        .env
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    env.extend(default_env(spec, port));
    let cache = prompt_cache(spec, node.models.get(&ModelRef::key(&spec.model)));
    if let Some(bytes) = cache.bytes() {
        env.insert("LLAMA_ARG_CACHE_RAM".into(), (bytes >> 20).to_string());
    }
    env.extend(spec.env.clone());
    let security = security(spec, &image.config.user, &mut env);
    let args = if spec.command.is_empty() {
        image
            .config
            .entrypoint
            .iter()
            .chain(&image.config.cmd)
            .cloned()
            .collect()
    } else {
        spec.command.clone()
    };
    let mut mounts = Vec::new();
    if !spec.models.host_path.is_empty() {
        mounts.push(BindMount {
            source: spec.models.host_path.clone().into(),
            destination: "/models".into(),
            read_only: false,
        });
    }
    let r = &spec.resources;
    let (cpuset_cpus, cpuset_mems) = match r.cpu_pinning {
        CpuPinning::Socket => node
            .topology
            .sockets
            .get(socket_of(spec, slot, node.sockets) as usize)
            .map_or((None, None), |s| {
                (
                    Some(format_cpulist(&s.cpus)),
                    (!s.mems.is_empty()).then(|| format_cpulist(&s.mems)),
                )
            }),
        CpuPinning::None => (None, None),
    };
    let limits = Limits {
        memory_bytes: r.memory.map(|m| m.bytes()),
        memory_swap_bytes: r
            .memory
            .filter(|_| node.bounds_swap)
            .map(|m| m.bytes().saturating_add(r.swap.map_or(0, |s| s.bytes()))),
        cpu_quota_us: r.cpus.map(|c| (c * 100_000.0).round() as i64),
        cpu_period_us: 100_000,
        cpu_shares: r.cpu_shares,
        pids: r.pids.map(|p| i64::try_from(p).unwrap_or(i64::MAX)),
        cpuset_cpus,
        cpuset_mems,
        nofile: node.nofile,
    };
    let mut labels = BTreeMap::from([
        (LABEL_FLEET.to_string(), fleet.to_string()),
        (LABEL_SLOT.to_string(), slot.to_string()),
        (LABEL_PORT.to_string(), port.to_string()),
        (LABEL_SPEC_HASH.to_string(), hash.to_string()),
        (
            LABEL_CREATED_AT.to_string(),
            humantime::format_rfc3339_seconds(now).to_string(),
        ),
        (LABEL_RESTARTS.to_string(), carry.restarts.to_string()),
        (LABEL_CRASHLOOP.to_string(), carry.crashloop.to_string()),
        (LABEL_MODEL.to_string(), spec.model.clone()),
    ]);
    labels.insert(LABEL_HOST_IP.to_string(), spec.network.host_ip.to_string());
    labels.insert(LABEL_PARALLEL.to_string(), parallel_of(&env).to_string());
    // What the instance really got (the manifest's env may set the variable itself).
    let cache = match env
        .get("LLAMA_ARG_CACHE_RAM")
        .map(|v| v.trim().parse::<i64>())
    {
        None => CacheRam::Engine,
        Some(Ok(mib)) if mib >= 0 => {
            if cache == CacheRam::Pending && mib == 0 {
                CacheRam::Pending
            } else {
                CacheRam::Bytes((mib as u64) << 20)
            }
        }
        Some(_) => CacheRam::Engine,
    };
    labels.insert(LABEL_PROMPT_CACHE.to_string(), cache.label());
    labels.insert(
        LABEL_GRACE.to_string(),
        spec.termination_grace_period.std().as_millis().to_string(),
    );
    if let Some(t) = crate::models::threads(spec, &node.topology) {
        labels.insert(LABEL_THREADS.to_string(), t.to_string());
    }
    if let Some(e) = &carry.last_exit {
        labels.insert(
            LABEL_LAST_EXIT.to_string(),
            format!("{}:{}:{}", e.code, e.reason, e.at),
        );
    }
    ContainerSpec {
        id,
        image: image.clone(),
        labels,
        args,
        env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
        cwd: if image.config.working_dir.is_empty() {
            "/".into()
        } else {
            image.config.working_dir.clone()
        },
        mounts,
        host_files: node.host_files.clone(),
        limits,
        cgroup_parent: node.cgroup_parent.clone(),
        runtime: spec.runtime.name.clone(),
        runtime_binary: spec.runtime.binary_name.clone(),
        security,
    }
}

/// Who an instance runs as (the manifest's `securityContext`, else the image's numeric `USER`,
/// else root), its `HOME` (set when the image has none: `/root` for root, `/tmp` for others),
/// and with `readOnlyRootFilesystem` the private tmpfs mounts Ollama needs (`/tmp`, `HOME`).
fn security(
    spec: &FleetSpec,
    image_user: &str,
    env: &mut BTreeMap<String, String>,
) -> fleet_runtime::Security {
    let sc = &spec.security_context;
    let (user, group) = match image_user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (image_user, None),
    };
    let id = |part: &str, field: &str, set: Option<u32>| -> Result<u32, String> {
        match set {
            Some(n) => Ok(n),
            None if part.is_empty() => Ok(0),
            None => part.parse().map_err(|_| {
                format!(
                    "the image's USER {image_user:?} names a {field} that the agent cannot look up; set spec.securityContext.runAs{} to its number",
                    if field == "user" { "User" } else { "Group" }
                )
            }),
        }
    };
    let ids = id(user, "user", sc.run_as_user)
        .and_then(|uid| Ok((uid, id(group.unwrap_or(""), "group", sc.run_as_group)?)));
    let uid = ids.as_ref().map_or(0, |(u, _)| *u);
    let home = env
        .entry("HOME".into())
        .or_insert_with(|| if uid == 0 { "/root" } else { "/tmp" }.into())
        .clone();
    let mut tmpfs = Vec::new();
    if sc.read_only_root_filesystem {
        tmpfs.push("/tmp".to_string());
        if home != "/" && !home.starts_with("/tmp") && fleet_api::is_normalised_path(&home) {
            tmpfs.push(home);
        }
    }
    fleet_runtime::Security {
        user: ids,
        read_only_root: sc.read_only_root_filesystem,
        tmpfs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_homes_and_read_only_roots() {
        let spec = |sc: &str| {
            let src = format!(
                "apiVersion: ollama-fleet.io/v1alpha1\nkind: OllamaFleet\nmetadata: {{name: a}}\nspec:\n  model: m\n  replicas: {{perNode: 1}}\n  securityContext: {sc}\n"
            );
            fleet_api::parse_fleet(&src, &fleet_api::Context::default())
                .expect("valid")
                .spec
        };
        let run = |sc: &str, image_user: &str| {
            let mut env = BTreeMap::new();
            let s = security(&spec(sc), image_user, &mut env);
            (s, env.get("HOME").cloned().unwrap_or_default())
        };
        let (s, home) = run("{}", "");
        assert_eq!(
            (s.user, s.read_only_root, home.as_str()),
            (Ok((0, 0)), false, "/root")
        );
        let (s, _) = run("{}", "1000:100");
        assert_eq!(s.user, Ok((1000, 100)));
        let (s, home) = run("{runAsUser: 2000}", "ollama");
        assert_eq!((s.user, home.as_str()), (Ok((2000, 0)), "/tmp"));
        let (s, _) = run("{}", "ollama");
        assert!(s.user.is_err_and(|e| e.contains("runAsUser")));
        let (s, _) = run(
            "{runAsUser: 1, runAsGroup: 2, readOnlyRootFilesystem: true}",
            "",
        );
        assert_eq!(s.user, Ok((1, 2)));
        assert_eq!(s.tmpfs, ["/tmp"]);
        let (s, _) = run("{readOnlyRootFilesystem: true}", "");
        assert_eq!(s.tmpfs, ["/tmp", "/root"]);
    }
    use crate::topology::Socket;
    use fleet_api::{Context, parse_fleet};

    fn fleet(extra: &str) -> FleetSpec {
        let src = format!(
            "apiVersion: ollama-fleet.io/v1alpha1\nkind: OllamaFleet\nmetadata: {{name: f}}\nspec:\n  model: m\n  replicas: {{perSocket: 2}}\n{extra}"
        );
        parse_fleet(&src, &Context::default()).expect("valid").spec
    }

    fn node() -> NodeCtx {
        NodeCtx {
            sockets: 2,
            topology: Topology {
                sockets: vec![
                    Socket {
                        cpus: vec![0, 1],
                        mems: vec![0],
                    },
                    Socket {
                        cpus: vec![2, 3],
                        mems: vec![1],
                    },
                ],
            },
            cgroup_parent: "/ollama-fleet/ns".into(),
            nofile: Some(4096),
            bounds_swap: true,
            host_files: vec!["/etc/hosts".into()],
            models: Default::default(),
        }
    }

    fn image() -> ImageInfo {
        let mut i = fleet_runtime::fake::FakeRuntime::image_named("docker.io/ollama/ollama:0.4.0");
        i.config.env = vec!["PATH=/bin".into(), "OLLAMA_HOST=0.0.0.0:11434".into()];
        i
    }

    /// The prompt cache an instance gets: what its memory leaves once the model, its context's
    /// KV cache and the margin are taken; a size or the engine's own when the manifest says.
    #[test]
    fn swap_is_the_fleets_allowance_beyond_memory_where_the_host_bounds_it() {
        let swap_of = |extra: &str, bounds_swap: bool| {
            let node = NodeCtx {
                bounds_swap,
                ..node()
            };
            let c = container_spec(
                "f",
                &fleet(extra),
                "h",
                &image(),
                &node,
                (0, 11434),
                "f-0-abcdef".into(),
                &Carry::default(),
                SystemTime::UNIX_EPOCH,
            );
            (c.limits.memory_bytes, c.limits.memory_swap_bytes)
        };
        let gib = 1u64 << 30;
        let limits = "  resources: {memory: 1Gi}\n";
        assert_eq!(
            swap_of(limits, true),
            (Some(gib), Some(gib)),
            "none by default"
        );
        assert_eq!(
            swap_of("  resources: {memory: 1Gi, swap: 256Mi}\n", true),
            (Some(gib), Some(gib + (256 << 20)))
        );
        assert_eq!(
            swap_of(limits, false),
            (Some(gib), None),
            "a host without swap accounting takes no swap setting (runc would fail)"
        );
        assert_eq!(
            swap_of("", true),
            (None, None),
            "no limit, nothing to add to"
        );
    }

    #[test]
    fn the_prompt_cache_is_sized_from_memory() {
        let facts = ModelFacts {
            size: 98 << 20,
            kv_per_token: 23_040,
        };
        let mib = |c: CacheRam| c.bytes().map(|b| b >> 20);
        // 512 - 98 - 90 (4096 tokens of 22.5 KiB) - (128 + 51.2) = 144 MiB.
        let small = fleet("  resources: {memory: 512Mi}\n");
        assert_eq!(mib(prompt_cache(&small, Some(&facts))), Some(144));
        assert_eq!(
            prompt_cache(&small, None),
            CacheRam::Pending,
            "the model not known yet"
        );
        // Two slots of 8192 tokens each: 720 MiB of KV cache leave nothing.
        let wide = fleet(
            "  resources: {memory: 512Mi}\n  env: {OLLAMA_NUM_PARALLEL: \"2\", OLLAMA_CONTEXT_LENGTH: \"8192\"}\n",
        );
        assert_eq!(mib(prompt_cache(&wide, Some(&facts))), Some(0));
        let big = fleet("  resources: {memory: 8Gi}\n");
        let llama3 = ModelFacts {
            size: 4_700_000_000,
            kv_per_token: 131_072,
        };
        // 8192 - 4482 - 512 - 947.2 = 2250 MiB.
        assert_eq!(mib(prompt_cache(&big, Some(&llama3))), Some(2250));
        let set = fleet("  resources: {memory: 1Gi, promptCache: 300Mi}\n");
        assert_eq!(mib(prompt_cache(&set, None)), Some(300), "no model needed");
        let engine = fleet("  resources: {memory: 1Gi, promptCache: engine}\n");
        assert_eq!(prompt_cache(&engine, Some(&facts)), CacheRam::Engine);
        assert_eq!(
            prompt_cache(&fleet(""), Some(&facts)),
            CacheRam::Engine,
            "no memory to size from"
        );
        // In the container: the variable in MiB, and the label says what the instance got.
        let mut n = node();
        n.models.insert(ModelRef::key("m"), facts);
        let made = |spec: &FleetSpec, n: &NodeCtx| {
            let c = container_spec(
                "f",
                spec,
                "h",
                &image(),
                n,
                (0, 11434),
                "f-0-a".into(),
                &Carry::default(),
                SystemTime::UNIX_EPOCH,
            );
            let env = c
                .env
                .iter()
                .find_map(|kv| kv.strip_prefix("LLAMA_ARG_CACHE_RAM=").map(str::to_string));
            (
                env,
                c.labels.get(LABEL_PROMPT_CACHE).cloned(),
                parse_labels(&c.labels).and_then(|l| l.prompt_cache),
            )
        };
        assert_eq!(
            made(&small, &n),
            (
                Some("144".into()),
                Some((144u64 << 20).to_string()),
                Some(CacheRam::Bytes(144 << 20))
            )
        );
        assert_eq!(
            made(&small, &node()),
            (
                Some("0".into()),
                Some("pending".into()),
                Some(CacheRam::Pending)
            )
        );
        assert_eq!(
            made(&engine, &n),
            (None, Some("engine".into()), Some(CacheRam::Engine))
        );
        let own = fleet("  resources: {memory: 512Mi}\n  env: {LLAMA_ARG_CACHE_RAM: \"64\"}\n");
        assert_eq!(
            made(&own, &n).2,
            Some(CacheRam::Bytes(64 << 20)),
            "the manifest's own variable wins"
        );
    }

    #[test]
    fn environment_layers_image_then_agent_then_manifest() {
        let spec = fleet("  env: {OLLAMA_KEEP_ALIVE: 10m, EXTRA: x}\n");
        let c = container_spec(
            "f",
            &spec,
            "h",
            &image(),
            &node(),
            (3, 11437),
            "f-3-abcdef".into(),
            &Carry::default(),
            SystemTime::UNIX_EPOCH,
        );
        let env: BTreeMap<&str, &str> = c.env.iter().filter_map(|kv| kv.split_once('=')).collect();
        assert_eq!(
            env["OLLAMA_HOST"], "127.0.0.1:11437",
            "the agent's OLLAMA_HOST beats the image's"
        );
        assert_eq!(
            env["OLLAMA_KEEP_ALIVE"], "10m",
            "the manifest beats the agent"
        );
        assert_eq!(env["OLLAMA_NOPRUNE"], "1");
        assert_eq!(env["OLLAMA_MODELS"], "/models");
        assert_eq!(env["PATH"], "/bin");
        assert_eq!(env["EXTRA"], "x");
        assert_eq!(c.args, ["/bin/ollama", "serve"]);
        assert_eq!(c.mounts[0].destination, "/models");
        assert_eq!(c.labels[LABEL_PORT], "11437");
        assert_eq!(c.labels[LABEL_SLOT], "3");
    }

    #[test]
    fn command_limits_and_pinning() {
        let spec = fleet(
            "  command: [/bin/ollama, serve, --x]\n  resources: {cpus: 1.5, memory: 1Gi, pids: 64, cpuShares: 100, cpuPinning: socket}\n  models: {hostPath: \"\"}\n",
        );
        let c = container_spec(
            "f",
            &spec,
            "h",
            &image(),
            &node(),
            (2, 11436),
            "f-2-abcdef".into(),
            &Carry::default(),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(c.args, ["/bin/ollama", "serve", "--x"]);
        assert_eq!(c.limits.cpu_quota_us, Some(150_000));
        assert_eq!(c.limits.memory_bytes, Some(1 << 30));
        assert_eq!(c.limits.memory_swap_bytes, Some(1 << 30), "no swap");
        assert_eq!(c.host_files, ["/etc/hosts"], "what the host has");
        assert_eq!(c.limits.pids, Some(64));
        // perSocket 2: slots 0-1 on socket 0, slots 2-3 on socket 1.
        assert_eq!(c.limits.cpuset_cpus.as_deref(), Some("2-3"));
        assert_eq!(c.limits.cpuset_mems.as_deref(), Some("1"));
        assert!(c.mounts.is_empty(), "no cache, no mount");
        assert!(!c.env.iter().any(|e| e.starts_with("OLLAMA_MODELS=")));
    }

    #[test]
    fn labels_round_trip() {
        let spec = fleet("");
        let carry = Carry {
            restarts: 3,
            crashloop: 2,
            last_exit: Some(LastExit {
                code: 137,
                reason: fleet_api::ExitReason::OomKilled,
                at: "2026-11-28T10:00:00Z".into(),
            }),
        };
        let now = humantime::parse_rfc3339("2026-11-28T11:00:00Z").expect("time");
        let c = container_spec(
            "f",
            &spec,
            "abc",
            &image(),
            &node(),
            (1, 11435),
            new_id("f", 1, now, 0),
            &carry,
            now,
        );
        assert!(
            c.id.starts_with("f-1-") && c.id.len() == "f-1-".len() + 6,
            "{}",
            c.id
        );
        let parsed = parse_labels(&c.labels).expect("ours");
        assert_eq!(parsed.fleet, "f");
        assert_eq!((parsed.slot, parsed.port), (1, 11435));
        assert_eq!(parsed.spec_hash, "abc");
        assert_eq!(parsed.created_at, now);
        assert_eq!(parsed.carry, carry);
        assert_eq!(parsed.model.as_deref(), Some("m"));
        assert!(parse_labels(&BTreeMap::new()).is_none());
        assert_ne!(new_id("f", 1, now, 0), new_id("f", 1, now, 1));
    }
}
