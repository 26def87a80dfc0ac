//! The OCI runtime spec of an instance: a pure function of a [`ContainerSpec`].
//!
//! Host network (no network namespace), its own pid/ipc/uts/mount namespaces, the standard
//! mounts, the host's `/etc/hosts` and `/etc/resolv.conf` read-only (those it has), the fleet's bind mounts,
//! the cgroup limits, and current container defaults: no-new-privileges, a reduced capability
//! set, a seccomp filter that denies what container runtimes deny by default, an
//! `oom_score_adj` that makes instances the host's first victims, a bounded `RLIMIT_NOFILE`,
//! masked kernel interfaces, and optionally another user and a read-only root.

use serde_json::{Value, json};

use crate::ContainerSpec;

/// Capabilities granted to instances (a uid-0 process; others get none in effect): containerd's
/// defaults without `NET_RAW`, `MKNOD`, `SETFCAP`, `SYS_CHROOT` and `AUDIT_WRITE`, none of which
/// an inference server needs.
pub const CAPABILITIES: [&str; 9] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_KILL",
];

/// `oom_score_adj` of instances: in a host-wide OOM the kernel kills an instance (replaced
/// within a second) before the agent, etcd or containerd (0 or below). The kubelet gives
/// burstable pods 2..999 and best-effort ones 1000.
pub const OOM_SCORE_ADJ: i32 = 900;

/// Size of each private tmpfs (`/tmp`, `HOME`) of a read-only instance; what is written there
/// counts against the instance's memory limit.
pub const TMPFS_SIZE: &str = "1g";

/// Syscalls denied (EPERM) to instances: what Docker's and containerd's default profiles keep
/// from containers (kernel modules, mounts, namespaces, keyrings, tracing other processes,
/// clocks, reboot, BPF, perf, io_uring, ...). Names the host's libseccomp does not know are
/// skipped by runc.
pub const DENIED_SYSCALLS: [&str; 56] = [
    "_sysctl",
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "syslog",
    "sysfs",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "vm86",
    "vm86old",
];

/// `clone` flags that create namespaces: a `clone` with any of them is denied too.
const NAMESPACE_FLAGS: [u64; 7] = [
    0x0002_0000, // CLONE_NEWNS
    0x0200_0000, // CLONE_NEWCGROUP
    0x0400_0000, // CLONE_NEWUTS
    0x0800_0000, // CLONE_NEWIPC
    0x1000_0000, // CLONE_NEWUSER
    0x2000_0000, // CLONE_NEWPID
    0x4000_0000, // CLONE_NEWNET
];

/// The seccomp filter of instances: allow by default, deny [`DENIED_SYSCALLS`] and namespace
/// creation, and answer `clone3` with ENOSYS (its flags are behind a pointer a filter cannot
/// read; the C library then falls back to `clone`, which the filter can check).
pub fn seccomp() -> Value {
    const EPERM: u32 = 1;
    const ENOSYS: u32 = 38;
    let mut syscalls = vec![
        json!({"names": DENIED_SYSCALLS.as_slice(), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}),
        json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS}),
    ];
    for flag in NAMESPACE_FLAGS {
        syscalls.push(json!({
            "names": ["clone"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": EPERM,
            "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
        }));
    }
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        "syscalls": syscalls,
    })
}

const MASKED: [&str; 11] = [
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
    "/sys/devices/virtual/powercap",
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
    ];
    for file in &c.host_files {
        mounts.push(mount(file, "bind", file, &["rbind", "ro"]));
    }
    for m in &c.mounts {
        let source = m.source.display().to_string();
        let mode = if m.read_only { "ro" } else { "rw" };
        mounts.push(mount(&m.destination, "bind", &source, &["rbind", mode]));
    }
    let (uid, gid) = c.security.user.clone().unwrap_or((0, 0));
    for dir in &c.security.tmpfs {
        let size = format!("size={TMPFS_SIZE}");
        let (owner, group) = (format!("uid={uid}"), format!("gid={gid}"));
        let mode = if dir == "/tmp" {
            "mode=1777"
        } else {
            "mode=0700"
        };
        mounts.push(mount(
            dir,
            "tmpfs",
            "tmpfs",
            &["nosuid", "nodev", mode, &size, &owner, &group],
        ));
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
        let mut memory = json!({"limit": limit});
        if let Some(swap) = l.memory_swap_bytes {
            memory["swap"] = json!(swap.max(limit));
        }
        resources.insert("memory".into(), memory);
    }
    if !cpu.is_empty() {
        resources.insert("cpu".into(), Value::Object(cpu));
    }
    if let Some(pids) = l.pids {
        resources.insert("pids".into(), json!({"limit": pids}));
    }

    let caps: Vec<&str> = CAPABILITIES.to_vec();
    let rlimits: Vec<Value> = l
        .nofile
        .map(|n| json!({"type": "RLIMIT_NOFILE", "hard": n, "soft": n}))
        .into_iter()
        .collect();
    json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": c.args,
            "env": c.env,
            "cwd": if c.cwd.is_empty() { "/" } else { c.cwd.as_str() },
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": true,
            "oomScoreAdj": OOM_SCORE_ADJ,
            "rlimits": rlimits,
        },
        "root": {"path": "rootfs", "readonly": c.security.read_only_root},
        "hostname": c.id,
        "mounts": mounts,
        "linux": {
            "resources": resources,
            "cgroupsPath": format!("{}/{}", c.cgroup_parent.trim_end_matches('/'), c.id),
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": MASKED.as_slice(),
            "readonlyPaths": READONLY,
            "seccomp": seccomp(),
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
            host_files: vec!["/etc/hosts".into(), "/etc/resolv.conf".into()],
            limits: Limits {
                memory_bytes: Some(8 << 30),
                memory_swap_bytes: Some(8 << 30),
                cpu_quota_us: Some(200_000),
                cpu_period_us: 100_000,
                cpu_shares: Some(2048),
                pids: Some(4096),
                cpuset_cpus: Some("0-31".into()),
                cpuset_mems: Some("0".into()),
                nofile: Some(65_536),
            },
            cgroup_parent: "/ollama-fleet/prod".into(),
            runtime: "io.containerd.runc.v2".into(),
            runtime_binary: String::new(),
            security: Default::default(),
        }
    }

    #[test]
    fn limits_namespaces_and_mounts() {
        let s = build(&spec());
        let r = &s["linux"]["resources"];
        assert_eq!(r["memory"]["limit"], 8u64 << 30);
        assert_eq!(
            r["memory"]["swap"],
            8u64 << 30,
            "no swap: memory + swap = memory"
        );
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
    fn current_container_defaults() {
        let s = build(&spec());
        let p = &s["process"];
        assert_eq!(p["user"], json!({"uid": 0, "gid": 0}));
        assert_eq!(p["oomScoreAdj"], OOM_SCORE_ADJ);
        assert_eq!(p["rlimits"][0]["type"], "RLIMIT_NOFILE");
        for cap in [
            "CAP_SETFCAP",
            "CAP_SYS_CHROOT",
            "CAP_AUDIT_WRITE",
            "CAP_NET_RAW",
            "CAP_MKNOD",
        ] {
            assert!(
                !p["capabilities"]["bounding"]
                    .as_array()
                    .expect("caps")
                    .iter()
                    .any(|c| c == cap),
                "{cap}"
            );
        }
        let masked = s["linux"]["maskedPaths"].as_array().expect("masked");
        assert!(masked.iter().any(|m| m == "/sys/devices/virtual/powercap"));
        let seccomp = &s["linux"]["seccomp"];
        assert_eq!(seccomp["defaultAction"], "SCMP_ACT_ALLOW");
        let denied: Vec<&str> = seccomp["syscalls"][0]["names"]
            .as_array()
            .expect("names")
            .iter()
            .filter_map(|n| n.as_str())
            .collect();
        for call in [
            "mount",
            "unshare",
            "setns",
            "ptrace",
            "bpf",
            "kexec_load",
            "init_module",
        ] {
            assert!(denied.contains(&call), "{call}");
        }
        assert_eq!(s["root"]["readonly"], false);
    }

    #[test]
    fn another_user_and_a_read_only_root() {
        let mut c = spec();
        c.security = crate::Security {
            user: Ok((1000, 1000)),
            read_only_root: true,
            tmpfs: vec!["/tmp".into(), "/home/ollama".into()],
        };
        let s = build(&c);
        assert_eq!(s["process"]["user"], json!({"uid": 1000, "gid": 1000}));
        assert_eq!(s["root"]["readonly"], true);
        let tmpfs: Vec<&Value> = s["mounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .filter(|m| {
                m["type"] == "tmpfs"
                    && (m["destination"] == "/tmp" || m["destination"] == "/home/ollama")
            })
            .collect();
        assert_eq!(tmpfs.len(), 2);
        assert!(
            tmpfs[1]["options"]
                .as_array()
                .expect("opts")
                .iter()
                .any(|o| o == "uid=1000")
        );
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

    #[test]
    fn swap_is_bounded_only_with_a_memory_limit_and_never_below_it() {
        let mut c = spec();
        c.limits.memory_swap_bytes = Some((8 << 30) + (64 << 20));
        assert_eq!(
            build(&c)["linux"]["resources"]["memory"],
            json!({"limit": 8u64 << 30, "swap": (8u64 << 30) + (64 << 20)})
        );
        c.limits.memory_swap_bytes = Some(1);
        assert_eq!(
            build(&c)["linux"]["resources"]["memory"]["swap"],
            8u64 << 30
        );
        c.limits.memory_swap_bytes = None;
        assert!(build(&c)["linux"]["resources"]["memory"]["swap"].is_null());
        c.limits.memory_bytes = None;
        c.limits.memory_swap_bytes = Some(1 << 30);
        assert!(build(&c)["linux"]["resources"]["memory"].is_null());
    }

    #[test]
    fn only_the_host_files_the_host_has_are_bound() {
        let destinations = |c: &ContainerSpec| -> Vec<String> {
            build(c)["mounts"]
                .as_array()
                .expect("mounts")
                .iter()
                .filter_map(|m| m["destination"].as_str())
                .filter(|d| d.starts_with("/etc/"))
                .map(String::from)
                .collect()
        };
        let mut c = spec();
        assert_eq!(destinations(&c), ["/etc/hosts", "/etc/resolv.conf"]);
        c.host_files = vec!["/etc/resolv.conf".into()];
        assert_eq!(destinations(&c), ["/etc/resolv.conf"]);
        c.host_files.clear();
        assert!(destinations(&c).is_empty());
    }
}
