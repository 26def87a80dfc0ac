//! The OCI runtime spec of an instance: a pure function of a [`ContainerSpec`].
//!
//! Host network (no network namespace), its own pid/ipc/uts/mount namespaces, the standard
//! mounts, the host's `/etc/hosts` and `/etc/resolv.conf` read-only, the fleet's bind mounts,
//! no-new-privileges, a reduced capability set, and the cgroup limits.

use serde_json::{Value, json};

use crate::ContainerSpec;

/// Capabilities granted to instances: containerd's defaults without `NET_RAW` and `MKNOD`,
/// which an inference server never needs.
pub const CAPABILITIES: [&str; 12] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

const MASKED: [&str; 10] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];

const READONLY: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

fn mount(destination: &str, kind: &str, source: &str, options: &[&str]) -> Value {
    json!({"destination": destination, "type": kind, "source": source, "options": options})
}

/// The character devices every container may use (null, zero, full, random, urandom, tty,
/// ptmx and ptys).
fn devices() -> Value {
    let allow = |major: i64, minor: Option<i64>| json!({"allow": true, "type": "c", "major": major, "minor": minor, "access": "rwm"});
    json!([
        {"allow": false, "access": "rwm"},
        allow(1, Some(3)),
        allow(1, Some(5)),
        allow(1, Some(7)),
        allow(1, Some(8)),
        allow(1, Some(9)),
        allow(5, Some(0)),
        allow(5, Some(2)),
        allow(136, None),
    ])
}

/// Builds the runtime spec for `c`.
pub fn build(c: &ContainerSpec) -> Value {
    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        ),
        mount(
            "/run",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount("/etc/hosts", "bind", "/etc/hosts", &["rbind", "ro"]),
        mount(
            "/etc/resolv.conf",
            "bind",
            "/etc/resolv.conf",
            &["rbind", "ro"],
        ),
    ];
    for m in &c.mounts {
        let source = m.source.display().to_string();
        let mode = if m.read_only { "ro" } else { "rw" };
        mounts.push(mount(&m.destination, "bind", &source, &["rbind", mode]));
    }

    let l = &c.limits;
    let mut cpu = serde_json::Map::new();
    if let Some(shares) = l.cpu_shares {
        cpu.insert("shares".into(), json!(shares));
    }
    if let Some(quota) = l.cpu_quota_us {
        cpu.insert("quota".into(), json!(quota));
        cpu.insert(
            "period".into(),
            json!(if l.cpu_period_us == 0 {
                100_000
            } else {
                l.cpu_period_us
            }),
        );
    }
    if let Some(cpus) = &l.cpuset_cpus {
        cpu.insert("cpus".into(), json!(cpus));
    }
    if let Some(mems) = &l.cpuset_mems {
        cpu.insert("mems".into(), json!(mems));
    }
    let mut resources = serde_json::Map::new();
    resources.insert("devices".into(), devices());
    if let Some(limit) = l.memory_bytes {
        resources.insert("memory".into(), json!({"limit": limit}));
    }
    if !cpu.is_empty() {
        resources.insert("cpu".into(), Value::Object(cpu));
    }
    if let Some(pids) = l.pids {
        resources.insert("pids".into(), json!({"limit": pids}));
    }

    let caps: Vec<&str> = CAPABILITIES.to_vec();
    json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": c.args,
            "env": c.env,
            "cwd": if c.cwd.is_empty() { "/" } else { c.cwd.as_str() },
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": true,
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": c.id,
        "mounts": mounts,
        "linux": {
            "resources": resources,
            "cgroupsPath": format!("{}/{}", c.cgroup_parent.trim_end_matches('/'), c.id),
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": MASKED,
            "readonlyPaths": READONLY,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BindMount, ImageInfo, Limits};

    fn spec() -> ContainerSpec {
        ContainerSpec {
            id: "sim-0-abc123".into(),
            image: ImageInfo {
                name: "localhost/ollama-sim:dev".into(),
                digest: "sha256:d".into(),
                chain_id: "sha256:c".into(),
                config: Default::default(),
            },
            labels: Default::default(),
            args: vec!["/bin/ollama".into(), "serve".into()],
            env: vec!["OLLAMA_HOST=127.0.0.1:11434".into()],
            cwd: String::new(),
            mounts: vec![BindMount {
                source: "/var/lib/ollama-fleet/models".into(),
                destination: "/models".into(),
                read_only: false,
            }],
            limits: Limits {
                memory_bytes: Some(8 << 30),
                cpu_quota_us: Some(200_000),
                cpu_period_us: 100_000,
                cpu_shares: Some(2048),
                pids: Some(4096),
                cpuset_cpus: Some("0-31".into()),
                cpuset_mems: Some("0".into()),
            },
            cgroup_parent: "/ollama-fleet/prod".into(),
            runtime: "io.containerd.runc.v2".into(),
            runtime_binary: String::new(),
        }
    }

    #[test]
    fn limits_namespaces_and_mounts() {
        let s = build(&spec());
        let r = &s["linux"]["resources"];
        assert_eq!(r["memory"]["limit"], 8u64 << 30);
        assert_eq!(r["cpu"]["quota"], 200_000);
        assert_eq!(r["cpu"]["period"], 100_000);
        assert_eq!(r["cpu"]["shares"], 2048);
        assert_eq!(r["cpu"]["cpus"], "0-31");
        assert_eq!(r["cpu"]["mems"], "0");
        assert_eq!(r["pids"]["limit"], 4096);
        assert_eq!(s["linux"]["cgroupsPath"], "/ollama-fleet/prod/sim-0-abc123");
        let ns: Vec<&str> = s["linux"]["namespaces"]
            .as_array()
            .expect("namespaces")
            .iter()
            .filter_map(|n| n["type"].as_str())
            .collect();
        assert!(
            !ns.contains(&"network"),
            "host network: no network namespace"
        );
        assert!(ns.contains(&"pid") && ns.contains(&"mount"));
        assert_eq!(s["process"]["noNewPrivileges"], true);
        assert_eq!(s["process"]["cwd"], "/");
        let caps = s["process"]["capabilities"]["bounding"]
            .as_array()
            .expect("caps");
        assert!(
            !caps
                .iter()
                .any(|c| c == "CAP_NET_RAW" || c == "CAP_SYS_ADMIN")
        );
        let models = s["mounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| m["destination"] == "/models")
            .expect("models mount");
        assert_eq!(models["options"], json!(["rbind", "rw"]));
    }

    #[test]
    fn no_limits_means_no_resource_entries() {
        let mut c = spec();
        c.limits = Limits::default();
        let s = build(&c);
        let r = &s["linux"]["resources"];
        assert!(r["memory"].is_null() && r["cpu"].is_null() && r["pids"].is_null());
        assert!(r["devices"].is_array());
    }
}
