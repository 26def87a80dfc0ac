//! Images from a real registry (docker-registry on loopback, images pushed with skopeo) into a
//! real containerd, through the agent: nothing is imported by hand.

use std::time::Duration;

use fleet_e2e::registry::sim_variant;
use fleet_e2e::{PrivateRegistry, World, free_port_range, get, json, request, wait_for};
use serde_json::Value;

fn fleet(world: &World, name: &str, image: &str, policy: &str, replicas: u32, base: u16) -> String {
    world
        .sim_fleet(name, replicas, base, "")
        .replace(
            &format!("image: {}", world.ns.env.sim_image),
            &format!("image: {image}"),
        )
        .replace(
            "imagePullPolicy: Never",
            &format!("imagePullPolicy: {policy}"),
        )
}

async fn version_at(port: u16) -> Option<String> {
    let (code, body) = request(
        "GET",
        &format!("http://127.0.0.1:{port}/api/version"),
        None,
        Duration::from_secs(1),
    )
    .await
    .ok()?;
    (code == 200).then(|| json(&body)["version"].as_str().unwrap_or("").to_string())
}

#[tokio::test]
async fn images_come_from_the_registry() {
    let mut registry = PrivateRegistry::start("images");
    let world = World::empty("images");
    registry.push(&world.ns.env.sim_image_tar, "ollama-sim:v1");
    let image = format!("{}/ollama-sim:v1", registry.host());
    let (a, b) = (free_port_range(3), free_port_range(2));
    world.cli_ok(
        &["apply", "-f", "-"],
        Some(&fleet(&world, "alpha", &image, "IfNotPresent", 2, a)),
    );
    world.cli_ok(
        &["apply", "-f", "-"],
        Some(&fleet(&world, "beta", &image, "IfNotPresent", 1, b)),
    );
    let agent = world.agent(
        "node-i",
        &[
            "--insecure-registry",
            &registry.host(),
            "--image-refresh",
            "2s",
        ],
    );

    // Both fleets converge from the registry, with one download.
    world
        .wait_status("alpha", "alpha ready from the registry", 90, |s| {
            s["readyReplicas"] == 2
        })
        .await;
    world
        .wait_status("beta", "beta ready", 90, |s| s["readyReplicas"] == 1)
        .await;
    assert_eq!(
        agent.metric("ollama_fleet_image_pulls_total").await,
        1.0,
        "one pull for both fleets"
    );
    assert!(agent.metric("ollama_fleet_image_pull_bytes_total").await > 1_000_000.0);
    assert_eq!(version_at(a).await.as_deref(), Some("0.4.0"));
    assert!(
        world.ns.ctr_ok(&["images", "ls", "-q"]).contains(&image),
        "ctr sees the pulled image"
    );

    // The same tag pushed with new content: Always rolls alpha to the new digest.
    world.cli_ok(
        &["apply", "-f", "-"],
        Some(&fleet(&world, "alpha", &image, "Always", 2, a)),
    );
    let before = world.statuses("alpha")[0]["instances"].clone();
    registry.push(&sim_variant("v2", "SIM_VERSION=0.4.1"), "ollama-sim:v1");
    wait_for(
        "alpha's instances to run the new digest",
        Duration::from_secs(90),
        || async {
            let (x, y) = (version_at(a).await, version_at(a + 1).await);
            (x.as_deref() == Some("0.4.1") && y.as_deref() == Some("0.4.1")).then_some(())
        },
    )
    .await;
    let s = world
        .wait_status("alpha", "alpha ready on the new digest", 90, |s| {
            s["readyReplicas"] == 2 && s["updatedReplicas"] == 2
        })
        .await;
    let ids = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["id"].as_str().map(str::to_string))
            .collect()
    };
    assert!(
        ids(&s["instances"])
            .iter()
            .all(|id| !ids(&before).contains(id)),
        "every alpha instance was replaced"
    );
    assert_eq!(
        version_at(b).await.as_deref(),
        Some("0.4.0"),
        "beta (IfNotPresent) keeps what it runs"
    );

    // A wrong tag: Pending with the registry's answer, and the agent stays healthy.
    let wrong = format!("{}/ollama-sim:nope", registry.host());
    let c = free_port_range(2);
    world.cli_ok(
        &["apply", "-f", "-"],
        Some(&fleet(&world, "gamma", &wrong, "IfNotPresent", 1, c)),
    );
    let s = world
        .wait_status("gamma", "gamma in ImagePullBackOff", 90, |s| {
            s["conditions"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["reason"] == "ImagePullBackOff"))
        })
        .await;
    let pending = &s["instances"][0];
    assert_eq!(pending["phase"], "Pending");
    let why = pending["message"].as_str().unwrap_or("");
    assert!(
        why.contains("registry") && why.contains("nope"),
        "the registry's answer is in status: {why}"
    );
    let (code, _) = agent.get("/healthz").await.expect("healthz");
    assert_eq!(code, 200);

    // The registry goes away: what runs keeps running.
    registry.stop();
    fleet_e2e::holds_for(
        "every instance serving with the registry down",
        Duration::from_secs(5),
        || async {
            for port in [a, a + 1, b] {
                if get(&format!("http://127.0.0.1:{port}/api/version")).await.0 != 200 {
                    return false;
                }
            }
            true
        },
    )
    .await;
    world
        .wait_status(
            "alpha",
            "alpha still ready with the registry down",
            90,
            |s| s["readyReplicas"] == 2,
        )
        .await;
    world
        .wait_status("beta", "beta still ready", 90, |s| s["readyReplicas"] == 1)
        .await;
}

/// An air-gapped site: `ollama-sim:v1` means `docker.io/library/ollama-sim:v1`, served by a
/// mirror on loopback.
#[tokio::test]
async fn mirrors_serve_docker_hub_names() {
    let mirror = PrivateRegistry::start("mirror");
    let world = World::empty("mirror");
    mirror.push(&world.ns.env.sim_image_tar, "library/ollama-sim:v1");
    let base = free_port_range(2);
    world.cli_ok(
        &["apply", "-f", "-"],
        Some(&fleet(
            &world,
            "hub",
            "ollama-sim:v1",
            "IfNotPresent",
            1,
            base,
        )),
    );
    let _agent = world.agent(
        "node-m",
        &[
            "--registry-mirror",
            &format!("docker.io=http://{}", mirror.host()),
        ],
    );
    world
        .wait_status("hub", "ready from the mirror", 90, |s| {
            s["readyReplicas"] == 1
        })
        .await;
    assert!(
        world
            .ns
            .ctr_ok(&["images", "ls", "-q"])
            .lines()
            .any(|l| l == "docker.io/library/ollama-sim:v1"),
        "containerd has the image under its Docker Hub name"
    );
}

/// Credentials come from a Docker-style config.json; wrong ones are reported, not retried hot.
#[tokio::test]
async fn registry_credentials() {
    let registry = PrivateRegistry::start_with_auth("auth", "fleet", "s3cret");
    let world = World::empty("auth");
    registry.push(&world.ns.env.sim_image_tar, "ollama-sim:v1");
    let image = format!("{}/ollama-sim:v1", registry.host());
    let config = |password: &str| {
        let path = world.dir.join(format!("docker-{password}.json"));
        let json = format!(
            "{{\"auths\": {{\"{}\": {{\"username\": \"fleet\", \"password\": \"{password}\"}}}}}}",
            registry.host()
        );
        std::fs::write(&path, json).expect("config");
        path
    };

    // Wrong password: Pending with the registry's refusal.
    let (a, b) = (free_port_range(2), free_port_range(2));
    world.cli_ok(
        &["apply", "-f", "-"],
        Some(&fleet(&world, "denied", &image, "IfNotPresent", 1, a)),
    );
    let wrong = config("wrong");
    let mut agent = world.agent(
        "node-a",
        &[
            "--insecure-registry",
            &registry.host(),
            "--registry-config",
            wrong.to_str().expect("utf-8"),
        ],
    );
    let s = world
        .wait_status("denied", "the refusal in status", 90, |s| {
            s["instances"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("ImagePullBackOff"))
        })
        .await;
    let why = s["instances"][0]["message"].as_str().unwrap_or("");
    let lower = why.to_lowercase();
    assert!(
        lower.contains("not authorized") || lower.contains("unauthorized") || why.contains("401"),
        "{why}"
    );

    // The right password: it pulls.
    agent.kill9();
    drop(agent);
    let right = config("s3cret");
    world.cli_ok(
        &["apply", "-f", "-"],
        Some(&fleet(&world, "allowed", &image, "IfNotPresent", 1, b)),
    );
    let _agent = world.agent(
        "node-b",
        &[
            "--insecure-registry",
            &registry.host(),
            "--registry-config",
            right.to_str().expect("utf-8"),
        ],
    );
    world
        .wait_status("allowed", "ready with credentials", 90, |s| {
            s["readyReplicas"] == 1
        })
        .await;
}
