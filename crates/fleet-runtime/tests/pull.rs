//! Client-side pulls from a real registry (docker-registry on loopback) into a real containerd.

use std::time::Duration;

use fleet_e2e::{Namespace, PrivateRegistry, free_port, temp_dir};
use fleet_runtime::PullProgress;
use fleet_runtime::containerd::Containerd;
use fleet_runtime::pull::resolve;
use fleet_runtime::registry::RegistryOptions;
use fleet_runtime::{Runtime, TaskState};

#[tokio::test]
async fn pulls_unpacks_and_runs_from_a_registry() {
    let registry = PrivateRegistry::start("pull");
    let ns = Namespace::empty("pull");
    registry.push(&ns.env.sim_image_tar, "ollama-sim:v1");
    let logs = temp_dir(&ns.name);
    let rt = Containerd::new(&ns.env.containerd_socket, &ns.name, &logs).expect("client");
    let name = format!("{}/ollama-sim:v1", registry.host());
    let opts = RegistryOptions {
        insecure: vec![registry.host()],
        ..RegistryOptions::default()
    };
    assert_eq!(
        rt.image(&name).await.expect("lookup"),
        None,
        "nothing imported by hand"
    );

    let progress = PullProgress::default();
    let pulled = tokio::time::timeout(
        Duration::from_secs(120),
        rt.pull_with(&name, &opts, &progress),
    )
    .await
    .expect("in time")
    .expect("pull");
    let (done, total) = progress.get();
    assert!(
        total > 1_000_000 && done == total,
        "progress {done}/{total}"
    );
    // containerd sees the image, unpacked, as `ctr` would.
    let found = rt.image(&name).await.expect("lookup").expect("present");
    assert_eq!(found.chain_id, pulled.chain_id);
    assert_eq!(found.digest, pulled.digest);
    assert!(ns.ctr_ok(&["images", "ls", "-q"]).contains(&name));
    assert!(ns.ctr_ok(&["snapshots", "ls"]).contains(&pulled.chain_id));
    assert_eq!(resolve(&name, &opts).await.expect("resolve"), pulled.digest);

    // A second pull downloads nothing.
    let again = PullProgress::default();
    rt.pull_with(&name, &opts, &again)
        .await
        .expect("pull again");
    assert_eq!(again.get(), (0, 0));

    // And it runs.
    let port = free_port();
    let mut args = found.config.entrypoint.clone();
    args.extend(found.config.cmd.clone());
    let spec = fleet_runtime::ContainerSpec {
        id: "pulled-0-aaaaaa".into(),
        image: found,
        labels: [(fleet_api::LABEL_FLEET.to_string(), "p".to_string())].into(),
        args,
        env: vec![format!("OLLAMA_HOST=127.0.0.1:{port}")],
        cwd: "/".into(),
        mounts: vec![],
        host_files: vec![],
        limits: Default::default(),
        cgroup_parent: "/ollama-fleet-test".into(),
        runtime: "io.containerd.runc.v2".into(),
        runtime_binary: String::new(),
        security: Default::default(),
    };
    rt.create(&spec).await.expect("create");
    rt.start(&spec.id).await.expect("start");
    assert_eq!(rt.state(&spec.id).await.expect("state"), TaskState::Running);
    fleet_e2e::wait_for(
        "the pulled sim to answer",
        Duration::from_secs(20),
        || async {
            fleet_e2e::request(
                "GET",
                &format!("http://127.0.0.1:{port}/api/version"),
                None,
                Duration::from_secs(1),
            )
            .await
            .ok()
            .filter(|(s, _)| *s == 200)
        },
    )
    .await;
    rt.remove(&spec.id).await.expect("remove");
    let _ = std::fs::remove_dir_all(logs);
}

#[tokio::test]
async fn registry_failures_are_clear() {
    let mut registry = PrivateRegistry::start("pullfail");
    let ns = Namespace::empty("pullfail");
    let rt =
        Containerd::new(&ns.env.containerd_socket, &ns.name, temp_dir(&ns.name)).expect("client");
    let opts = RegistryOptions {
        insecure: vec![registry.host()],
        ..RegistryOptions::default()
    };
    let missing = format!("{}/ollama-sim:nope", registry.host());
    let err = rt
        .pull_with(&missing, &opts, &PullProgress::default())
        .await
        .expect_err("unknown tag")
        .to_string();
    assert!(
        err.contains("registry")
            && (err.contains("unknown") || err.contains("not found") || err.contains("404")),
        "{err}"
    );
    // Plain HTTP is used only for registries listed as insecure.
    let err = rt
        .pull_with(
            &missing,
            &RegistryOptions::default(),
            &PullProgress::default(),
        )
        .await
        .expect_err("https")
        .to_string();
    assert!(err.contains("registry"), "{err}");
    registry.stop();
    let err = rt
        .pull_with(&missing, &opts, &PullProgress::default())
        .await
        .expect_err("down")
        .to_string();
    assert!(err.contains("registry"), "{err}");
}

/// A registry that serves bytes that do not match the digest: the pull fails and says so, and
/// nothing is left half made (the image is not there).
#[tokio::test]
async fn digest_mismatches_are_refused() {
    let registry = PrivateRegistry::start("corrupt");
    let ns = Namespace::empty("corrupt");
    registry.push(&ns.env.sim_image_tar, "ollama-sim:v1");
    let bad = registry.corrupt_largest_blob();
    let rt =
        Containerd::new(&ns.env.containerd_socket, &ns.name, temp_dir(&ns.name)).expect("client");
    let opts = RegistryOptions {
        insecure: vec![registry.host()],
        ..RegistryOptions::default()
    };
    let name = format!("{}/ollama-sim:v1", registry.host());
    let err = rt
        .pull_with(&name, &opts, &PullProgress::default())
        .await
        .expect_err("corrupt blob")
        .to_string();
    assert!(
        err.contains("digest") && err.contains(bad.trim_start_matches("sha256:")),
        "{err}"
    );
    assert_eq!(
        rt.image(&name).await.expect("lookup"),
        None,
        "no image record for a failed pull"
    );
}
