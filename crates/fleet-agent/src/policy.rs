//! What fleets may ask of this node: the operator's allowlists (host paths, runtimes), default
//! limits for manifests that set none, and admission against the node (its cpus, addresses,
//! memory, and the ports of the other fleets).
//!
//! A manifest is untrusted input: anyone who can write a fleet key could otherwise mount any
//! host directory into a root container or have the shim execute any binary. The agent is the
//! enforcement point; `validate` only rejects what can never be valid. A refused fleet starts
//! nothing on this node and disturbs nothing that runs; its status says why (a typed
//! [`Refusal`], shown as the `Admitted` condition).
//!
//! Decisions are pure functions of the spec, the [`Policy`] and what a [`Host`] answers
//! (symlinks, local addresses), so tests use a scripted host.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use fleet_api::{FleetSpec, Quantity};

/// The containerd shim whose OCI runtime binary `runtime.binaryName` chooses.
pub const RUNC_SHIM: &str = "io.containerd.runc.v2";

/// The operator's rules for fleets on this node.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Directories (normalised, absolute) under which `models.hostPath` may lie.
    pub host_paths: Vec<String>,
    /// Allowed runtimes: an OCI runtime for the runc shim (`runc`, `crun`), or another
    /// containerd shim by its full name; each to the binary it runs (empty: the shim finds it
    /// by name).
    pub runtimes: BTreeMap<String, String>,
    /// Limits applied when a manifest sets none.
    pub defaults: Defaults,
    /// Memory kept for the system (the agent, containerd, shims, etcd) when admitting fleets.
    pub reserved_memory: u64,
}

/// Limits applied to instances whose manifest leaves them out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Defaults {
    /// Memory limit in bytes; `None`: unlimited.
    pub memory: Option<u64>,
    /// CFS quota in cores; `None`: no quota.
    pub cpus: Option<f64>,
    /// pids limit (always set).
    pub pids: u64,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            memory: Some(8 << 30),
            cpus: None,
            pids: 4096,
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            host_paths: vec![fleet_api::DEFAULT_MODELS_PATH.to_string()],
            runtimes: BTreeMap::from([("runc".to_string(), String::new())]),
            defaults: Defaults::default(),
            reserved_memory: 1 << 30,
        }
    }
}

/// Why a fleet does not run (or does not run fully) on this node.
#[derive(Clone, Debug, PartialEq)]
pub enum Refusal {
    /// `models.hostPath` is outside every allowed prefix.
    HostPathNotAllowed {
        /// The path asked for.
        path: String,
        /// Where it really leads, when a symlink took it elsewhere.
        resolved: Option<PathBuf>,
    },
    /// The runtime is not allowed on this node.
    RuntimeNotAllowed {
        /// The runtime asked for.
        runtime: String,
    },
    /// `resources.cpus` is more than the node has.
    InsufficientCpu {
        /// Asked for.
        cpus: f64,
        /// The node's cpus.
        node: usize,
    },
    /// `network.hostIP` is not an address of this node.
    HostIpNotLocal {
        /// The address.
        ip: IpAddr,
    },
    /// Another fleet, created earlier, uses some of the same ports on this node.
    PortConflict {
        /// The other fleet.
        with: String,
        /// The first port both use.
        port: u32,
    },
    /// Fewer instances than asked for fit the node's memory.
    InsufficientMemory {
        /// Instances that may run.
        fit: u32,
        /// Instances asked for.
        want: u32,
        /// Memory fleets may use on this node.
        allocatable: u64,
        /// Of which fleets created earlier use.
        used: u64,
    },
}

impl Refusal {
    /// The reason, as in a condition (`HostPathNotAllowed`).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::HostPathNotAllowed { .. } => "HostPathNotAllowed",
            Refusal::RuntimeNotAllowed { .. } => "RuntimeNotAllowed",
            Refusal::InsufficientCpu { .. } => "InsufficientCpu",
            Refusal::HostIpNotLocal { .. } => "HostIPNotLocal",
            Refusal::PortConflict { .. } => "PortConflict",
            Refusal::InsufficientMemory { .. } => "InsufficientMemory",
        }
    }

    /// Whether some instances still run (admission cut the count) rather than none.
    pub fn partial(&self) -> bool {
        matches!(self, Refusal::InsufficientMemory { fit, .. } if *fit > 0)
    }

    /// What is wrong and what to do, for the condition's message.
    pub fn message(&self, policy: &Policy) -> String {
        match self {
            Refusal::HostPathNotAllowed { path, resolved } => {
                let via = resolved
                    .as_ref()
                    .map(|r| format!(" (it leads to {})", r.display()))
                    .unwrap_or_default();
                format!(
                    "spec.models.hostPath {path:?}{via} is not under a directory this node allows ({}); use one of them, or have the node's operator add --allow-host-path",
                    policy.host_paths.join(", ")
                )
            }
            Refusal::RuntimeNotAllowed { runtime } => format!(
                "runtime {runtime:?} is not allowed on this node (allowed: {}); use one of them, or have the node's operator add --allow-runtime",
                policy
                    .runtimes
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Refusal::InsufficientCpu { cpus, node } => {
                format!("spec.resources.cpus {cpus} is more than this node's {node} cpus; lower it")
            }
            Refusal::HostIpNotLocal { ip } => format!(
                "spec.network.hostIP {ip} is not an address of this node; use one of its addresses, 127.0.0.1 or 0.0.0.0"
            ),
            Refusal::PortConflict { with, port } => format!(
                "port {port} is also used by fleet {with:?} (created earlier) on this node; move spec.network.basePort so the ranges do not overlap"
            ),
            Refusal::InsufficientMemory {
                fit,
                want,
                allocatable,
                used,
            } => format!(
                "only {fit} of {want} instances fit this node's memory ({} for fleets, {} used by fleets created earlier); lower spec.resources.memory or the replicas, or use a larger node",
                Quantity(*allocatable),
                Quantity(*used)
            ),
        }
    }
}

/// What admission asks of the host.
pub trait Host {
    /// `path` with every symlink resolved, as far as it exists (the rest appended as is).
    fn resolve(&self, path: &Path) -> PathBuf;
    /// Whether `ip` is an address of this node (or a wildcard).
    fn is_local(&self, ip: IpAddr) -> bool;
    /// The node's logical cpus.
    fn cpus(&self) -> usize;
    /// The node's memory in bytes.
    fn memory(&self) -> u64;
    /// The files of [`HOST_FILES`] this host has (instances see those, read-only).
    fn files(&self) -> Vec<String>;
    /// Whether the host's cgroups bound swap (v2, or v1 with swap accounting).
    fn bounds_swap(&self) -> bool;
}

/// The host's files every instance sees read-only, as containers do: name resolution.
pub const HOST_FILES: [&str; 2] = ["/etc/hosts", "/etc/resolv.conf"];

/// The real host.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealHost;

impl Host for RealHost {
    fn resolve(&self, path: &Path) -> PathBuf {
        // Canonicalise the longest existing ancestor; what does not exist yet cannot be a
        // symlink (the runtime creates it as a plain directory).
        let mut rest = Vec::new();
        let mut at = path.to_path_buf();
        loop {
            if let Ok(real) = std::fs::canonicalize(&at) {
                return rest.iter().rev().fold(real, |p, c| p.join(c));
            }
            match (at.file_name().map(ToOwned::to_owned), at.parent()) {
                (Some(name), Some(parent)) => {
                    rest.push(name);
                    at = parent.to_path_buf();
                }
                _ => return path.to_path_buf(),
            }
        }
    }

    fn is_local(&self, ip: IpAddr) -> bool {
        // Binding succeeds only for the node's own addresses (and wildcards).
        ip.is_unspecified() || std::net::UdpSocket::bind((ip, 0)).is_ok()
    }

    fn cpus(&self) -> usize {
        std::thread::available_parallelism().map_or(1, usize::from)
    }

    fn memory(&self) -> u64 {
        crate::topology::memory_bytes()
    }

    fn files(&self) -> Vec<String> {
        // A dangling symlink (a resolver's stub file not there yet) counts as missing.
        HOST_FILES
            .iter()
            .filter(|f| Path::new(f).exists())
            .map(|f| f.to_string())
            .collect()
    }

    fn bounds_swap(&self) -> bool {
        use fleet_runtime::cgroup::{self, SwapControl};
        cgroup::swap_control(Path::new(cgroup::ROOT)) != SwapControl::None
    }
}

/// A scripted host for tests: symlinks, addresses, cpus, memory, files and swap as told.
#[derive(Clone, Debug)]
pub struct ScriptedHost {
    /// (link, target): paths under `link` resolve under `target`.
    pub links: Vec<(PathBuf, PathBuf)>,
    /// Local addresses besides loopback and wildcards.
    pub local: Vec<IpAddr>,
    /// Logical cpus.
    pub cpus: usize,
    /// Memory in bytes.
    pub memory: u64,
    /// The host files present.
    pub files: Vec<String>,
    /// Whether swap is bounded.
    pub bounds_swap: bool,
}

impl Default for ScriptedHost {
    /// A roomy node: 64 cpus, 1 TiB, no symlinks, loopback only.
    fn default() -> Self {
        ScriptedHost {
            links: Vec::new(),
            local: Vec::new(),
            cpus: 64,
            memory: 1 << 40,
            files: HOST_FILES.iter().map(|f| f.to_string()).collect(),
            bounds_swap: true,
        }
    }
}

impl Host for ScriptedHost {
    fn resolve(&self, path: &Path) -> PathBuf {
        for (link, target) in &self.links {
            if let Ok(rest) = path.strip_prefix(link) {
                return target.join(rest);
            }
        }
        path.to_path_buf()
    }

    fn is_local(&self, ip: IpAddr) -> bool {
        ip.is_unspecified() || ip.is_loopback() || self.local.contains(&ip)
    }

    fn cpus(&self) -> usize {
        self.cpus
    }

    fn memory(&self) -> u64 {
        self.memory
    }

    fn files(&self) -> Vec<String> {
        self.files.clone()
    }

    fn bounds_swap(&self) -> bool {
        self.bounds_swap
    }
}

impl Policy {
    /// Whether `path` (normalised, as validation ensures) lies under an allowed prefix, both
    /// as written and once symlinks are resolved.
    fn path_allowed(&self, path: &str, host: &dyn Host) -> Result<(), Refusal> {
        let under = |p: &Path, prefix: &Path| p.starts_with(prefix);
        let lexical = fleet_api::is_normalised_path(path)
            && self
                .host_paths
                .iter()
                .any(|prefix| under(Path::new(path), Path::new(prefix)));
        let resolved = host.resolve(Path::new(path));
        let real = self
            .host_paths
            .iter()
            .any(|prefix| under(&resolved, &host.resolve(Path::new(prefix))));
        if lexical && real {
            Ok(())
        } else {
            Err(Refusal::HostPathNotAllowed {
                path: path.to_string(),
                resolved: (lexical && resolved != Path::new(path)).then_some(resolved),
            })
        }
    }

    /// The runtime a spec asks for, as the allowlist names it.
    fn runtime_key(spec: &FleetSpec) -> String {
        let r = &spec.runtime;
        if r.name == RUNC_SHIM {
            if r.binary_name.is_empty() {
                "runc".into()
            } else {
                r.binary_name.clone()
            }
        } else {
            r.name.clone()
        }
    }

    /// The OCI runtime binary to give the runc shim for `spec` (empty: its default), once
    /// admitted.
    pub fn runtime_binary(&self, spec: &FleetSpec) -> String {
        if spec.runtime.name != RUNC_SHIM || spec.runtime.binary_name.is_empty() {
            return spec.runtime.binary_name.clone();
        }
        match self.runtimes.get(&spec.runtime.binary_name) {
            Some(binary) if !binary.is_empty() => binary.clone(),
            _ => spec.runtime.binary_name.clone(),
        }
    }

    /// The checks of one fleet on its own: host path, runtime, cpus, host address.
    pub fn admit(&self, spec: &FleetSpec, host: &dyn Host) -> Result<(), Refusal> {
        if !spec.models.host_path.is_empty() {
            self.path_allowed(&spec.models.host_path, host)?;
        }
        let runtime = Policy::runtime_key(spec);
        if !self.runtimes.contains_key(&runtime) {
            return Err(Refusal::RuntimeNotAllowed { runtime });
        }
        if let Some(cpus) = spec.resources.cpus
            && cpus > host.cpus() as f64
        {
            return Err(Refusal::InsufficientCpu {
                cpus,
                node: host.cpus(),
            });
        }
        if !host.is_local(spec.network.host_ip) {
            return Err(Refusal::HostIpNotLocal {
                ip: spec.network.host_ip,
            });
        }
        Ok(())
    }

    /// The spec this node runs: the default limits filled in where the manifest has none, and
    /// the runtime binary the allowlist maps `runtime.binaryName` to.
    pub fn effective(&self, spec: &FleetSpec) -> FleetSpec {
        let mut spec = spec.clone();
        spec.runtime.binary_name = self.runtime_binary(&spec);
        let r = &mut spec.resources;
        if r.memory.is_none() {
            r.memory = self.defaults.memory.map(Quantity);
        }
        if r.cpus.is_none() {
            r.cpus = self.defaults.cpus;
        }
        if r.pids.is_none() {
            r.pids = Some(self.defaults.pids);
        }
        spec
    }
}

/// One fleet that runs on this node, for the checks across fleets.
#[derive(Clone, Debug)]
pub struct Claim<'a> {
    /// The fleet's name.
    pub name: &'a str,
    /// Its key's creation revision: earlier fleets keep what they claim.
    pub created: i64,
    /// Its spec.
    pub spec: &'a FleetSpec,
    /// The memory each instance asks for in the manifest (a default limit is not a request).
    pub memory: Option<u64>,
    /// Instances asked for on this node.
    pub replicas: u32,
    /// One more than the highest slot that runs now (never cut below it: admission does not
    /// stop what runs).
    pub running: u32,
}

/// The checks across the fleets of this node, in creation order: a fleet whose ports overlap
/// an earlier fleet's is refused; fleets that set `resources.memory` are admitted while their
/// instances fit the node's memory (as the kubelet admits pods by their requests), and cut to
/// what fits otherwise. Returns, per fleet, the instances it may run and the refusal, if any.
pub fn admit_all(
    claims: &[Claim<'_>],
    policy: &Policy,
    node_memory: u64,
) -> BTreeMap<String, (u32, Option<Refusal>)> {
    let mut order: Vec<&Claim<'_>> = claims.iter().collect();
    order.sort_by_key(|c| (c.created, c.name));
    let allocatable = node_memory.saturating_sub(policy.reserved_memory);
    let mut used = 0u64;
    let mut ports: Vec<(&str, IpAddr, u32, u32)> = Vec::new();
    let mut out = BTreeMap::new();
    for c in order {
        let (first, last) = crate::build::port_pool(c.spec, c.replicas).into_inner();
        let ip = c.spec.network.host_ip;
        let clash = ports.iter().find(|(_, other_ip, a, b)| {
            crate::build::addresses_collide(ip, *other_ip) && first <= *b && *a <= last
        });
        if let Some((with, _, a, _)) = clash {
            let refusal = Refusal::PortConflict {
                with: (*with).to_string(),
                port: first.max(*a),
            };
            out.insert(c.name.to_string(), (0, Some(refusal)));
            continue;
        }
        if c.replicas > 0 {
            ports.push((c.name, ip, first, last));
        }
        let Some(each) = c.memory.filter(|m| *m > 0) else {
            out.insert(c.name.to_string(), (c.replicas, None));
            continue;
        };
        let fit = u32::try_from(allocatable.saturating_sub(used) / each).unwrap_or(u32::MAX);
        let admitted = c.replicas.min(fit.max(c.running));
        used = used.saturating_add(each.saturating_mul(u64::from(admitted)));
        let refusal = (admitted < c.replicas).then_some(Refusal::InsufficientMemory {
            fit: admitted,
            want: c.replicas,
            allocatable,
            used: used - each * u64::from(admitted),
        });
        out.insert(c.name.to_string(), (admitted, refusal));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_api::{Context, parse_fleet};

    fn host() -> ScriptedHost {
        ScriptedHost {
            links: vec![("/var/lib/ollama-fleet/models/evil".into(), "/etc".into())],
            local: vec!["10.0.0.7".parse().expect("ip")],
            cpus: 8,
            memory: 32 << 30,
            ..ScriptedHost::default()
        }
    }

    fn spec(extra: &str) -> FleetSpec {
        let replicas = if extra.contains("replicas:") {
            ""
        } else {
            "  replicas: {perNode: 2}\n"
        };
        let src = format!(
            "apiVersion: ollama-fleet.io/v1alpha1\nkind: OllamaFleet\nmetadata: {{name: a}}\nspec:\n  model: m\n{replicas}{extra}"
        );
        parse_fleet(&src, &Context::default()).expect("valid").spec
    }

    fn reason(extra: &str, policy: &Policy) -> Option<&'static str> {
        policy
            .admit(&spec(extra), &host())
            .err()
            .map(|r| r.reason())
    }

    #[test]
    fn host_paths_must_be_under_an_allowed_prefix_as_written_and_resolved() {
        let p = Policy::default();
        let cases = [
            ("", None),
            ("  models: {hostPath: /var/lib/ollama-fleet/models}", None),
            (
                "  models: {hostPath: /var/lib/ollama-fleet/models/team-a}",
                None,
            ),
            ("  models: {hostPath: \"\"}", None),
            ("  models: {hostPath: /etc}", Some("HostPathNotAllowed")),
            (
                "  models: {hostPath: /var/lib/ollama-fleet}",
                Some("HostPathNotAllowed"),
            ),
            (
                "  models: {hostPath: /var/lib/ollama-fleet/models2}",
                Some("HostPathNotAllowed"),
            ),
            (
                "  models: {hostPath: /run/containerd}",
                Some("HostPathNotAllowed"),
            ),
            (
                "  models: {hostPath: /var/lib/ollama-fleet/models/evil}",
                Some("HostPathNotAllowed"),
            ),
            (
                "  models: {hostPath: /var/lib/ollama-fleet/models/evil/x}",
                Some("HostPathNotAllowed"),
            ),
        ];
        for (extra, want) in cases {
            assert_eq!(reason(extra, &p), want, "{extra}");
        }
        let mut wider = Policy::default();
        wider.host_paths.push("/srv/models".into());
        assert_eq!(reason("  models: {hostPath: /srv/models/x}", &wider), None);
        let refusal = p
            .admit(
                &spec("  models: {hostPath: /var/lib/ollama-fleet/models/evil}"),
                &host(),
            )
            .expect_err("symlink");
        assert!(
            refusal.message(&p).contains("leads to /etc"),
            "{}",
            refusal.message(&p)
        );
    }

    #[test]
    fn runtimes_must_be_allowed_and_map_to_their_binary() {
        let mut p = Policy::default();
        assert_eq!(reason("", &p), None);
        assert_eq!(
            reason("  runtime: {binaryName: crun}", &p),
            Some("RuntimeNotAllowed")
        );
        assert_eq!(
            reason("  runtime: {name: io.containerd.kata.v2}", &p),
            Some("RuntimeNotAllowed")
        );
        p.runtimes
            .insert("crun".into(), "/usr/local/bin/crun".into());
        let s = spec("  runtime: {binaryName: crun}");
        assert_eq!(p.admit(&s, &host()), Ok(()));
        assert_eq!(p.runtime_binary(&s), "/usr/local/bin/crun");
        assert_eq!(p.runtime_binary(&spec("")), "");
    }

    #[test]
    fn cpus_and_host_ip_are_checked_against_the_node() {
        let p = Policy::default();
        assert_eq!(reason("  resources: {cpus: 8}", &p), None);
        assert_eq!(
            reason("  resources: {cpus: 9}", &p),
            Some("InsufficientCpu")
        );
        assert_eq!(reason("  network: {hostIP: 10.0.0.7}", &p), None);
        assert_eq!(reason("  network: {hostIP: 0.0.0.0}", &p), None);
        assert_eq!(
            reason("  network: {hostIP: 10.9.9.9}", &p),
            Some("HostIPNotLocal")
        );
    }

    #[test]
    fn defaults_fill_only_what_is_missing_and_runtimes_map_to_binaries() {
        let p = Policy::default();
        let s = p.effective(&spec("  resources: {memory: 1Gi}"));
        assert_eq!(s.resources.memory, Some(Quantity(1 << 30)));
        assert_eq!(s.resources.pids, Some(4096));
        assert_eq!(s.resources.cpus, None);
        let s = p.effective(&spec(""));
        assert_eq!(s.resources.memory, Some(Quantity(8 << 30)));
    }

    fn claim<'a>(name: &'a str, created: i64, spec: &'a FleetSpec, running: u32) -> Claim<'a> {
        Claim {
            name,
            created,
            spec,
            memory: spec.resources.memory.map(Quantity::bytes),
            replicas: spec.replicas.count(1),
            running,
        }
    }

    #[test]
    fn later_fleets_lose_port_conflicts() {
        let a = spec("  network: {basePort: 20000}");
        let b = spec("  network: {basePort: 20001}");
        let c = spec("  network: {basePort: 20002}");
        let d = spec("  network: {basePort: 20001, hostIP: 10.0.0.7}");
        let p = Policy::default();
        let out = admit_all(
            &[
                claim("b", 2, &b, 0),
                claim("a", 1, &a, 0),
                claim("c", 3, &c, 0),
                claim("d", 4, &d, 0),
            ],
            &p,
            64 << 30,
        );
        assert_eq!(out["a"], (2, None));
        assert_eq!(
            out["b"].1,
            Some(Refusal::PortConflict {
                with: "a".into(),
                port: 20001
            })
        );
        assert_eq!(out["b"].0, 0);
        // a holds 20000-20001 (no surge by default); c starts at 20002.
        assert_eq!(out["c"], (2, None));
        // Another address, but a uses 127.0.0.1 and d 10.0.0.7: no clash.
        assert_eq!(out["d"], (2, None));
    }

    #[test]
    fn memory_admits_what_fits_in_creation_order_and_never_cuts_what_runs() {
        let p = Policy::default(); // 1 GiB reserved
        let big = spec(
            "  replicas: {perNode: 4}\n  resources: {memory: 4Gi}\n  network: {basePort: 20000}",
        );
        let more = spec(
            "  replicas: {perNode: 4}\n  resources: {memory: 4Gi}\n  network: {basePort: 21000}",
        );
        let free = spec("  replicas: {perNode: 40}\n  network: {basePort: 22000}");
        // 25 GiB node: 24 GiB allocatable = 6 instances of 4 GiB.
        let out = admit_all(
            &[
                claim("big", 1, &big, 0),
                claim("more", 2, &more, 0),
                claim("free", 3, &free, 0),
            ],
            &p,
            25 << 30,
        );
        assert_eq!(out["big"], (4, None));
        let (n, refusal) = &out["more"];
        assert_eq!(*n, 2);
        assert_eq!(
            refusal.as_ref().map(Refusal::reason),
            Some("InsufficientMemory")
        );
        assert!(refusal.as_ref().is_some_and(Refusal::partial));
        // Without a memory request, a fleet is not counted (its default limit only caps it).
        assert_eq!(out["free"], (40, None));
        // What runs stays: `more` already runs slots 0..=3.
        let out = admit_all(
            &[claim("big", 1, &big, 0), claim("more", 2, &more, 4)],
            &p,
            25 << 30,
        );
        assert_eq!(out["more"], (4, None));
    }
}
