//! The sim image as a real container in a real containerd (with runc): it listens where
//! `OLLAMA_HOST` says, serves a streamed generation within its memory limit, and is OOM-killed
//! when its loaded model does not fit.

use std::io::Read;
use std::process::Command;
use std::time::Duration;

use fleet_e2e::containerd::cgroup_v1_dir;
use fleet_e2e::{
    Namespace, free_port, get, json, post, post_lines, repo_root, request, temp_dir, wait_for,
};
use serde_json::json;

/// Runs the sim detached with host networking, a memory limit and half a core.
fn run_sim(ns: &Namespace, id: &str, port: u16, memory: u64, models: &std::path::Path) {
    let mount = format!(
        "type=bind,src={},dst=/models,options=rbind:rw",
        models.display()
    );
    let host = format!("OLLAMA_HOST=127.0.0.1:{port}");
    let limit = memory.to_string();
    ns.ctr_ok(&[
        "run",
        "-d",
        "--net-host",
        "--memory-limit",
        &limit,
        "--cpus",
        "0.5",
        "--env",
        &host,
        "--env",
        "OLLAMA_MODELS=/models",
        "--env",
        "OLLAMA_NOPRUNE=1",
        "--env",
        "SIM_MODEL_SIZE=100Mi",
        "--env",
        "SIM_PULL_TIME=100ms",
        "--env",
        "SIM_LOAD_TIME=100ms",
        "--mount",
        &mount,
        &ns.env.sim_image,
        id,
    ]);
}

async fn wait_ready(port: u16) {
    let url = format!("http://127.0.0.1:{port}/api/version");
    wait_for(
        "the sim container to answer /api/version",
        Duration::from_secs(30),
        || async {
            request("GET", &url, None, Duration::from_secs(1))
                .await
                .ok()
                .filter(|(s, _)| *s == 200)
        },
    )
    .await;
}

#[tokio::test]
async fn sim_serves_on_its_ollama_host_port_within_its_limits() {
    let ns = Namespace::new("serve");
    let models = temp_dir(&ns.name);
    let port = free_port();
    run_sim(&ns, "sim-serve", port, 256 << 20, &models);
    wait_ready(port).await;
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(
        json(&get(&format!("{base}/api/version")).await.1)["version"],
        "0.4.0"
    );

    // The limits really are the task's cgroup limits.
    let (status, pid) = ns.task("sim-serve").expect("task exists");
    assert_eq!(status, "RUNNING");
    let mem = cgroup_v1_dir(pid, "memory").expect("memory cgroup");
    let limit = std::fs::read_to_string(mem.join("memory.limit_in_bytes")).expect("limit");
    assert_eq!(limit.trim(), (256u64 << 20).to_string());
    let cpu = cgroup_v1_dir(pid, "cpu").expect("cpu cgroup");
    let quota = std::fs::read_to_string(cpu.join("cpu.cfs_quota_us")).expect("quota");
    assert_eq!(quota.trim(), "50000");

    // A 100 MiB model fits in 256 MiB: pulled into the bind-mounted store, then a streamed answer.
    let (status, body) = post(
        &format!("{base}/api/pull"),
        json!({"model": "smollm2:135m", "stream": false}),
    )
    .await;
    assert_eq!((status, json(&body)), (200, json!({"status": "success"})));
    assert!(
        models
            .join("manifests/registry.ollama.ai/library/smollm2/135m")
            .exists(),
        "the pull wrote into OLLAMA_MODELS"
    );
    let (status, lines) = post_lines(
        &format!("{base}/api/generate"),
        json!({"model": "smollm2:135m", "prompt": "hello", "options": {"num_predict": 4}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(lines.len(), 5, "4 tokens and the final line: {lines:?}");
    assert_eq!(lines[4]["done"], true);
    let (_, ps) = get(&format!("{base}/api/ps")).await;
    assert_eq!(json(&ps)["models"][0]["size"], 100 << 20);
    assert_eq!(
        ns.task("sim-serve").map(|t| t.0).as_deref(),
        Some("RUNNING")
    );
    let _ = std::fs::remove_dir_all(models);
}

#[tokio::test]
async fn sim_is_oom_killed_when_its_model_exceeds_the_memory_limit() {
    let ns = Namespace::new("oom");
    let events = ns.events();
    let models = temp_dir(&ns.name);
    let port = free_port();
    run_sim(&ns, "sim-oom", port, 64 << 20, &models);
    wait_ready(port).await;
    let base = format!("http://127.0.0.1:{port}");
    let (status, _) = post(
        &format!("{base}/api/pull"),
        json!({"model": "smollm2:135m", "stream": false}),
    )
    .await;
    assert_eq!(status, 200, "pulling needs little memory");

    // Loading the 100 MiB model in 64 MiB: the kernel kills the task mid-request.
    let load = request(
        "POST",
        &format!("{base}/api/generate"),
        Some(&json!({"model": "smollm2:135m"})),
        Duration::from_secs(30),
    )
    .await;
    assert!(
        !matches!(load, Ok((200, _))),
        "the load must not succeed, got {load:?}"
    );
    wait_for("the task to stop", Duration::from_secs(30), || async {
        (ns.task("sim-oom").map(|t| t.0).as_deref() == Some("STOPPED")).then_some(())
    })
    .await;

    // containerd saw an OOM event and an exit with status 137 (SIGKILL) for this container.
    let exit = wait_for(
        "the /tasks/oom and /tasks/exit events",
        Duration::from_secs(10),
        || {
            let found = events
                .find("/tasks/oom", "sim-oom")
                .and(events.find("/tasks/exit", "sim-oom"));
            async move { found }
        },
    )
    .await;
    assert!(exit.contains("\"exit_status\":137"), "{exit}");
    let _ = std::fs::remove_dir_all(models);
}

#[test]
fn sim_image_build_is_deterministic() {
    let binary = repo_root().join("target/debug/ollama-sim");
    assert!(
        binary.exists(),
        "build the sim first: cargo build -p ollama-sim"
    );
    let digest = |out: &std::path::Path| -> String {
        let result = Command::new(repo_root().join("hack/sim-image.sh"))
            .arg("--binary")
            .arg(&binary)
            .arg("--out")
            .arg(out)
            .output()
            .expect("run hack/sim-image.sh");
        assert!(
            result.status.success(),
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
        String::from_utf8_lossy(&result.stdout).trim().to_string()
    };
    let dir = temp_dir("image");
    let (a, b) = (digest(&dir.join("a")), digest(&dir.join("b")));
    assert!(a.starts_with("sha256:") && a.len() == 71, "{a}");
    assert_eq!(a, b, "same binary, same digest");
    let archive = |sub: &str| {
        let mut bytes = Vec::new();
        std::fs::File::open(dir.join(sub).join("ollama-sim.oci.tar"))
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .expect("read archive");
        bytes
    };
    assert!(archive("a") == archive("b"), "byte-identical archives");
    let _ = std::fs::remove_dir_all(dir);
}
