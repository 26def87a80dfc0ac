//! Trust boundaries end to end (issue 10), on the real etcd and containerd + runc: instances
//! run with current container defaults (read back from /proc of the running process), a
//! read-only root and another user work with the sim, and hostile fleets written straight into
//! etcd neither take the agent down nor reach the host.

use fleet_e2e::containerd::cgroup_v1_dir;
use fleet_e2e::{AgentProcess, World, free_port_range};
use serde_json::Value;

/// The pid of the fleet's first running instance, from containerd.
fn first_pid(world: &World, status: &Value) -> (String, u32) {
    let id = status["instances"][0]["id"]
        .as_str()
        .expect("an instance")
        .to_string();
    let (state, pid) = world.ns.task(&id).expect("its task");
    assert_eq!(state, "RUNNING");
    (id, pid)
}

/// A `Key:\tvalue` line of /proc/PID/status.
fn proc_status(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Whether bit `cap` is set in a capability mask of /proc/PID/status.
fn has_cap(mask: &str, cap: u32) -> bool {
    u64::from_str_radix(mask, 16).expect("hex mask") & (1 << cap) != 0
}

fn read(path: String) -> String {
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[tokio::test]
async fn instances_run_with_current_container_defaults() {
    let world = World::new("hard-defaults");
    let base = free_port_range(4);
    // No memory and no pids in the manifest: the agent's defaults apply.
    let manifest = world.sim_fleet("d", 1, base, "").replace(
        "resources: {cpus: 0.5, memory: 128Mi, pids: 256}",
        "resources: {cpus: 0.5}",
    );
    world.apply(&manifest);
    let _agent = world.agent("node-1", &[]);
    let s = world
        .wait_status("d", "1 ready", 60, |s| s["readyReplicas"] == 1)
        .await;
    let (_, pid) = first_pid(&world, &s);

    // Capabilities: containerd's defaults without NET_RAW, MKNOD, SETFCAP, SYS_CHROOT and
    // AUDIT_WRITE; CHOWN stays (Ollama writes its model cache as root).
    let caps = proc_status(pid, "CapBnd");
    for (name, bit) in [
        ("NET_RAW", 13),
        ("SYS_CHROOT", 18),
        ("MKNOD", 27),
        ("AUDIT_WRITE", 29),
        ("SETFCAP", 31),
        ("SYS_ADMIN", 21),
    ] {
        assert!(
            !has_cap(&caps, bit),
            "CAP_{name} in the bounding set {caps}"
        );
    }
    assert!(has_cap(&proc_status(pid, "CapEff"), 0), "CAP_CHOWN");
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
    assert_eq!(proc_status(pid, "Seccomp"), "2", "a seccomp filter");
    assert_eq!(read(format!("/proc/{pid}/oom_score_adj")).trim(), "900");
    let limits = read(format!("/proc/{pid}/limits"));
    let nofile: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("nofile")
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    assert_eq!(nofile[0], nofile[1], "soft = hard: {nofile:?}");
    assert!(
        nofile[0].parse::<u64>().expect("a number") <= 65_536,
        "{nofile:?}"
    );
    if std::path::Path::new("/sys/devices/virtual/powercap").exists() {
        let mounts = read(format!("/proc/{pid}/mountinfo"));
        assert!(
            mounts.contains(" /sys/devices/virtual/powercap "),
            "powercap is masked: {mounts}"
        );
    }
    // Default limits: 8Gi of memory, 4096 pids.
    let mem = cgroup_v1_dir(pid, "memory").expect("memory cgroup");
    assert_eq!(
        read(format!("{}/memory.limit_in_bytes", mem.display())).trim(),
        (8u64 << 30).to_string()
    );
    let pids = cgroup_v1_dir(pid, "pids").expect("pids cgroup");
    assert_eq!(read(format!("{}/pids.max", pids.display())).trim(), "4096");
}

#[tokio::test]
async fn a_read_only_root_and_another_user_work_with_the_sim() {
    let world = World::new("hard-ro");
    let base = free_port_range(4);
    // Its own, new model cache: created by the agent and owned by the instance's user.
    let cache = world.dir.join("models-1000");
    let manifest = world
        .sim_fleet(
            "ro",
            1,
            base,
            "  securityContext: {runAsUser: 1000, runAsGroup: 1000, readOnlyRootFilesystem: true}\n",
        )
        .replace(&world.dir.join("models").display().to_string(), &cache.display().to_string());
    world.apply(&manifest);
    let _agent = world.agent("node-1", &[]);
    // Ready means the model was pulled into /models and loaded: the instance wrote its cache.
    let s = world
        .wait_status("ro", "1 ready", 60, |s| s["readyReplicas"] == 1)
        .await;
    let (_, pid) = first_pid(&world, &s);
    assert!(
        proc_status(pid, "Uid").starts_with("1000\t"),
        "{}",
        proc_status(pid, "Uid")
    );
    assert!(proc_status(pid, "Gid").starts_with("1000\t"));
    assert_eq!(
        proc_status(pid, "CapEff"),
        "0000000000000000",
        "a non-root user has no capabilities"
    );
    let mounts = read(format!("/proc/{pid}/mountinfo"));
    let root = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("root mount");
    assert!(
        root.split_whitespace()
            .nth(5)
            .is_some_and(|o| o.split(',').any(|o| o == "ro")),
        "{root}"
    );
    assert!(
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(4) == Some("/tmp") && l.contains("tmpfs")),
        "{mounts}"
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&cache).expect("cache");
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    assert!(
        cache.join("manifests").exists() || cache.join("blobs").exists(),
        "the model is in the cache"
    );
}

/// The agent's peak memory (VmHWM) in MiB.
fn peak_mib(agent: &AgentProcess) -> u64 {
    let pid = agent.pid().expect("running");
    proc_status(pid, "VmHWM")
        .trim_end_matches(" kB")
        .trim()
        .parse::<u64>()
        .expect("kB")
        / 1024
}

#[tokio::test]
async fn hostile_fleets_in_etcd_neither_crash_the_agent_nor_reach_the_host() {
    let world = World::new("hard-etcd");
    let base = free_port_range(4);
    world.apply(&world.sim_fleet("good", 2, base, ""));
    let agent = world.agent("node-1", &[]);
    let before = world
        .wait_status("good", "2 ready", 60, |s| s["readyReplicas"] == 2)
        .await;

    // An alias bomb under 1 MiB (800 KiB used 1000 times: 800 MB once expanded), put with
    // etcdctl as anyone with write access could.
    let mut bomb = format!(
        "apiVersion: ollama-fleet.io/v1alpha1\nkind: OllamaFleet\nmetadata: {{name: bomb}}\nspec:\n  model: &a \"{}\"\n  env:\n",
        "x".repeat(800 * 1024)
    );
    for i in 0..1000 {
        bomb.push_str(&format!("    A{i}: *a\n"));
    }
    world.etcdctl_put_stdin("bomb", &bomb);
    let s = world
        .wait_status("bomb", "the bomb reported invalid", 30, |s| {
            s["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "SpecValid" && c["status"] == "False")
            })
        })
        .await;
    let message = s["conditions"][0]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(message.contains("bytes of text"), "{message}");
    assert!(message.len() <= 4096, "the condition message is bounded");

    // A fleet asking for the host's /etc, and one asking for a runtime binary by path.
    let etc = world
        .sim_fleet("etc", 1, base + 2, "")
        .replace(&world.dir.join("models").display().to_string(), "/etc");
    world.etcdctl_put_stdin("etc", &etc);
    world
        .wait_status("etc", "HostPathNotAllowed", 30, |s| {
            s["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Admitted" && c["reason"] == "HostPathNotAllowed")
            })
        })
        .await;
    let ctr = world.ns.ctr_ok(&["containers", "ls", "-q"]);
    assert!(
        !ctr.lines().any(|l| l.starts_with("etc-")),
        "nothing of etc was created: {ctr}"
    );

    // The agent is up, within a small memory budget, and the good fleet untouched.
    assert!(agent.pid().is_some());
    let (code, _) = agent.get("/healthz").await.expect("healthz answers");
    assert_eq!(code, 200);
    let peak = peak_mib(&agent);
    assert!(
        peak < 128,
        "the agent's peak memory stays small: {peak} MiB"
    );
    let after = world
        .wait_status("good", "2 ready", 10, |s| s["readyReplicas"] == 2)
        .await;
    assert_eq!(
        before["instances"],
        after["instances"]
            .clone()
            .as_array()
            .map(|a| { Value::Array(a.clone()) })
            .unwrap_or_default(),
        "the good fleet's instances are the same"
    );
    // Refusals are said at warn level, once per fleet and reason, with the fix, however many
    // passes ran since.
    let log = agent.log_text();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("fleet not admitted") && l.contains("HostPathNotAllowed"))
        .collect();
    assert_eq!(said.len(), 1, "said once: {said:?}");
    assert!(
        said[0].contains("WARN") && said[0].contains("--allow-host-path"),
        "{}",
        said[0]
    );
    eprintln!("agent peak memory with the bomb in etcd: {peak} MiB");
}
