//! One conformance suite for every [`Runtime`]: the in-memory fake and containerd (real
//! containerd + runc from the dev environment, with the ollama-sim image).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use fleet_e2e::{Namespace, free_port, temp_dir, wait_for};
use fleet_runtime::containerd::Containerd;
use fleet_runtime::fake::FakeRuntime;
use fleet_runtime::{
    ContainerSpec, ImageInfo, Limits, Runtime, RuntimeError, RuntimeEvent, SIGKILL, TaskState,
};
use futures::StreamExt;

/// No swap, where the host can bound it (as the agent sets it).
fn swap_limit() -> Option<u64> {
    let control =
        fleet_runtime::cgroup::swap_control(std::path::Path::new(fleet_runtime::cgroup::ROOT));
    (control != fleet_runtime::cgroup::SwapControl::None).then_some(64 << 20)
}

fn spec(image: &ImageInfo, id: &str, labelled: bool, port: u16) -> ContainerSpec {
    let mut labels = BTreeMap::new();
    if labelled {
        labels.insert(fleet_api::LABEL_FLEET.to_string(), "conf".to_string());
        labels.insert(fleet_api::LABEL_SLOT.to_string(), "0".to_string());
    }
    let mut args = image.config.entrypoint.clone();
    args.extend(image.config.cmd.clone());
    ContainerSpec {
        id: id.to_string(),
        image: image.clone(),
        labels,
        args,
        env: vec![
            format!("OLLAMA_HOST=127.0.0.1:{port}"),
            "OLLAMA_MODELS=/tmp/models".into(),
        ],
        cwd: "/".into(),
        mounts: vec![],
        host_files: vec!["/etc/hosts".into(), "/etc/resolv.conf".into()],
        limits: Limits {
            memory_bytes: Some(64 << 20),
            memory_swap_bytes: swap_limit(),
            cpu_quota_us: Some(50_000),
            cpu_period_us: 100_000,
            cpu_shares: Some(512),
            pids: Some(128),
            ..Limits::default()
        },
        cgroup_parent: "/ollama-fleet-test".into(),
        runtime: "io.containerd.runc.v2".into(),
        runtime_binary: String::new(),
        security: Default::default(),
    }
}

/// The behaviour every runtime must have. `image` names an image present in it.
async fn conformance(rt: &dyn Runtime, image: &str) {
    assert!(!rt.version().await.expect("version").is_empty());
    assert_eq!(rt.image("localhost/absent:1").await.expect("lookup"), None);
    let info = rt
        .image(image)
        .await
        .expect("lookup")
        .expect("image present");
    assert!(info.chain_id.starts_with("sha256:"), "{info:?}");
    assert!(!info.config.entrypoint.is_empty() || !info.config.cmd.is_empty());

    let mut events = rt.events();
    let first = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("event stream");
    assert_eq!(
        first,
        Some(RuntimeEvent::Resync),
        "a new stream starts with a resync"
    );

    let id = "conf-0-aaaaaa";
    let c = spec(&info, id, true, free_port());
    rt.create(&c).await.expect("create");
    assert!(matches!(
        rt.create(&c).await,
        Err(RuntimeError::AlreadyExists(_))
    ));
    let listed = rt.list().await.expect("list");
    let me = listed.iter().find(|o| o.id == id).expect("listed");
    assert_eq!(me.state, TaskState::NoTask);
    assert_eq!(
        me.labels.get(fleet_api::LABEL_SLOT).map(String::as_str),
        Some("0")
    );
    assert_eq!(rt.state(id).await.expect("state"), TaskState::NoTask);

    // An unlabelled container is never listed.
    let other = spec(&info, "unlabelled-x", false, free_port());
    rt.create(&other).await.expect("create unlabelled");
    assert!(
        rt.list()
            .await
            .expect("list")
            .iter()
            .all(|o| o.id != "unlabelled-x")
    );

    let pid = rt.start(id).await.expect("start");
    assert!(pid > 0);
    assert_eq!(rt.state(id).await.expect("state"), TaskState::Running);
    let me = rt
        .list()
        .await
        .expect("list")
        .into_iter()
        .find(|o| o.id == id)
        .expect("listed");
    assert_eq!((me.state, me.pid), (TaskState::Running, pid));

    // A kill is seen as an exit event and a stopped task with its status.
    rt.kill(id, SIGKILL).await.expect("kill");
    let exit = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = events.next().await {
            if let RuntimeEvent::Exit { id: eid, code, .. } = e
                && eid == id
            {
                return code;
            }
        }
        panic!("event stream ended");
    })
    .await
    .expect("exit event within 10s");
    assert_eq!(exit, 137);
    wait_for(
        "the task to be stopped",
        Duration::from_secs(10),
        || async { (rt.state(id).await.ok() == Some(TaskState::Stopped)).then_some(()) },
    )
    .await;
    let me = rt
        .list()
        .await
        .expect("list")
        .into_iter()
        .find(|o| o.id == id)
        .expect("listed");
    assert_eq!(me.exit_code, Some(137));

    // A stopped container can be started again (a new task).
    rt.start(id).await.expect("restart");
    assert_eq!(rt.state(id).await.expect("state"), TaskState::Running);
    rt.stop(id, Duration::from_secs(5)).await.expect("stop");
    assert_ne!(rt.state(id).await.expect("state"), TaskState::Running);

    assert!(matches!(rt.remove(id).await, Ok(Some(_))));
    assert!(rt.list().await.expect("list").iter().all(|o| o.id != id));
    assert!(
        matches!(rt.remove(id).await, Ok(None)),
        "removing what is gone succeeds"
    );
    assert!(matches!(rt.start(id).await, Err(RuntimeError::NotFound(_))));
    assert!(matches!(rt.state(id).await, Err(RuntimeError::NotFound(_))));
    rt.remove("unlabelled-x").await.expect("cleanup");
    // Removing a running container kills it first.
    let id2 = "conf-1-bbbbbb";
    rt.create(&spec(&info, id2, true, free_port()))
        .await
        .expect("create");
    rt.start(id2).await.expect("start");
    rt.remove(id2).await.expect("remove running");
    assert!(matches!(
        rt.state(id2).await,
        Err(RuntimeError::NotFound(_))
    ));
}

#[tokio::test]
async fn fake_runtime_conforms() {
    let rt = FakeRuntime::new();
    rt.add_image(FakeRuntime::image_named("localhost/ollama-sim:dev"));
    tokio::time::timeout(
        Duration::from_secs(60),
        conformance(&rt, "localhost/ollama-sim:dev"),
    )
    .await
    .expect("suite within 60s");
}

/// A client of the test containerd in a fresh namespace, with its own log directory.
fn on_containerd(tag: &str) -> (Namespace, PathBuf, Containerd) {
    let ns = Namespace::new(tag);
    let logs = temp_dir(&ns.name);
    let rt = Containerd::new(&ns.env.containerd_socket, &ns.name, &logs).expect("client");
    (ns, logs, rt)
}

/// The sim image, as containerd has it.
async fn sim_image(rt: &Containerd, ns: &Namespace) -> ImageInfo {
    rt.image(&ns.env.sim_image)
        .await
        .expect("lookup")
        .expect("the sim image is imported")
}

#[tokio::test]
async fn containerd_runtime_conforms() {
    let (ns, logs, rt) = on_containerd("runtime-conf");
    tokio::time::timeout(
        Duration::from_secs(120),
        conformance(&rt, &ns.env.sim_image),
    )
    .await
    .expect("suite within 120s");
    let _ = std::fs::remove_dir_all(logs);
}

/// containerd specifics: the limits land in the task's cgroups, output goes to the log file,
/// and an OOM kill is reported as such.
#[tokio::test]
async fn containerd_limits_logs_and_oom() {
    let (ns, logs, rt) = on_containerd("runtime-oom");
    let info = sim_image(&rt, &ns).await;
    let mut events = rt.events();
    let port = free_port();
    let mut c = spec(&info, "oom-0-cccccc", true, port);
    c.env.push("SIM_LEAK_RATE=64Mi".into());
    rt.create(&c).await.expect("create");
    let pid = rt.start(&c.id).await.expect("start");

    let mem = fleet_e2e::containerd::cgroup_v1_dir(pid, "memory").expect("memory cgroup");
    assert!(
        mem.ends_with(format!("ollama-fleet-test/{}", c.id)),
        "{}",
        mem.display()
    );
    let read = |p: std::path::PathBuf| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    assert_eq!(
        read(mem.join("memory.limit_in_bytes")),
        (64u64 << 20).to_string()
    );
    if swap_limit().is_some() {
        assert_eq!(
            read(mem.join("memory.memsw.limit_in_bytes")),
            (64u64 << 20).to_string(),
            "no swap: memory + swap = the memory limit"
        );
    }
    let cpu = fleet_e2e::containerd::cgroup_v1_dir(pid, "cpu").expect("cpu cgroup");
    assert_eq!(read(cpu.join("cpu.cfs_quota_us")), "50000");
    assert_eq!(read(cpu.join("cpu.shares")), "512");
    let pids = fleet_e2e::containerd::cgroup_v1_dir(pid, "pids").expect("pids cgroup");
    assert_eq!(read(pids.join("pids.max")), "128");

    // The sim leaks 64 MiB/s into a 64 MiB limit: the kernel kills it.
    let (oom, exit) = tokio::time::timeout(Duration::from_secs(30), async {
        let (mut oom, mut exit) = (false, None);
        while let Some(e) = events.next().await {
            match e {
                RuntimeEvent::Oom { id } if id == c.id => oom = true,
                RuntimeEvent::Exit { id, code, .. } if id == c.id => exit = Some(code),
                _ => {}
            }
            if oom && exit.is_some() {
                break;
            }
        }
        (oom, exit)
    })
    .await
    .expect("OOM within 30s");
    assert!(oom, "an OOM event");
    assert_eq!(exit, Some(137));
    assert!(
        rt.oom_killed(&c.id, &c.cgroup_parent)
            .await
            .expect("read the OOM count"),
        "the exited task's cgroup counts the OOM kill (for an event the agent missed)"
    );
    let log = std::fs::read_to_string(rt.log_path(&c.id)).expect("log file");
    assert!(
        log.contains("Listening on"),
        "the task's output is in its log file: {log}"
    );
    rt.remove(&c.id).await.expect("remove");
    let _ = std::fs::remove_dir_all(logs);
}

/// A graceful stop on containerd: a task that honours SIGTERM exits by it (status 0); one that
/// ignores it is SIGKILLed once the grace period has passed (status 137), not before.
#[tokio::test]
async fn containerd_stop_is_sigterm_then_sigkill_after_the_grace_period() {
    let (ns, logs, rt) = on_containerd("runtime-stop");
    let info = sim_image(&rt, &ns).await;
    for (id, ignore_term) in [("polite-0-aaaaaa", false), ("stubborn-0-bbbbbb", true)] {
        let port = free_port();
        let mut c = spec(&info, id, true, port);
        if ignore_term {
            c.env.push("SIM_IGNORE_SIGTERM=1".into());
        }
        rt.create(&c).await.expect("create");
        rt.start(id).await.expect("start");
        // The signal handler is in place once the sim answers.
        let url = format!("http://127.0.0.1:{port}/api/version");
        wait_for("the sim to answer", Duration::from_secs(20), || async {
            fleet_e2e::request("GET", &url, None, Duration::from_secs(1))
                .await
                .ok()
                .filter(|(s, _)| *s == 200)
        })
        .await;
        let grace = Duration::from_millis(1500);
        let started = std::time::Instant::now();
        rt.stop(id, grace).await.expect("stop");
        let took = started.elapsed();
        assert_ne!(rt.state(id).await.expect("state"), TaskState::Running);
        let exit = rt
            .list()
            .await
            .expect("list")
            .into_iter()
            .find(|o| o.id == id)
            .and_then(|o| o.exit_code);
        if ignore_term {
            assert!(
                took >= grace,
                "SIGKILL only after the grace period, took {took:?}"
            );
            assert_eq!(exit, Some(137), "killed");
        } else {
            assert_eq!(exit, Some(0), "exited by SIGTERM");
        }
        rt.remove(id).await.expect("remove");
    }
    let _ = std::fs::remove_dir_all(logs);
}

/// A node's containers do not fit one gRPC message: 833 instances' OCI specs are about 5 MB,
/// past gRPC's 4 MiB default. Twelve containers with 400 KB of environment each stand in for
/// them; every one is listed.
#[tokio::test]
async fn containerd_lists_more_containers_than_one_grpc_message_holds() {
    let (ns, logs, rt) = on_containerd("runtime-many");
    let info = sim_image(&rt, &ns).await;
    let ids: Vec<String> = (0..12).map(|i| format!("many-{i}-{i:06x}")).collect();
    for id in &ids {
        let mut c = spec(&info, id, true, 1);
        c.env.push(format!("PADDING={}", "x".repeat(400_000)));
        rt.create(&c).await.expect("create");
    }
    let listed = rt.list().await.expect("a list over 4 MiB");
    for id in &ids {
        assert!(listed.iter().any(|o| o.id == *id), "{id} is listed");
    }
    for id in &ids {
        rt.remove(id).await.expect("remove");
    }
    let _ = std::fs::remove_dir_all(logs);
}
