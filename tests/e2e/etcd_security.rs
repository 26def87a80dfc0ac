//! etcd as a production cluster runs it (issue 10): TLS with client certificates
//! (`--client-cert-auth`), users and roles with a role per node, a password never sent in
//! clear text, and a warning when the agent reaches etcd unauthenticated.

use std::process::Command;

use fleet_e2e::{Certs, PrivateEtcd, World, free_port_range, temp_dir};

/// `etcdctl` against a TLS etcd as `user` (its client certificate).
fn etcdctl(etcd: &PrivateEtcd, certs: &Certs, user: &str, args: &[&str]) -> (bool, String) {
    let (cert, key) = certs.client(user);
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        // The dev environment's variables would clash with the flags (etcdctl refuses both).
        .env_remove("ETCDCTL_ENDPOINTS")
        .env_remove("ETCDCTL_CACERT")
        .env_remove("ETCDCTL_CERT")
        .env_remove("ETCDCTL_KEY")
        .arg("--endpoints")
        .arg(etcd.endpoint())
        .arg("--cacert")
        .arg(&certs.ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args(args)
        .output()
        .expect("etcdctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[track_caller]
fn ok(etcd: &PrivateEtcd, certs: &Certs, user: &str, args: &[&str]) -> String {
    let (success, text) = etcdctl(etcd, certs, user, args);
    assert!(success, "etcdctl {args:?} as {user}: {text}");
    text
}

/// The environment that makes the CLI and the agent use `user`'s client certificate.
fn tls_env(certs: &Certs, user: &str) -> Vec<(String, String)> {
    let (cert, key) = certs.client(user);
    vec![
        (
            "OLLAMA_FLEET_ETCD_CACERT".into(),
            certs.ca.display().to_string(),
        ),
        ("OLLAMA_FLEET_ETCD_CERT".into(), cert.display().to_string()),
        ("OLLAMA_FLEET_ETCD_KEY".into(), key.display().to_string()),
    ]
}

#[tokio::test]
async fn tls_client_certificates_and_a_role_per_node() {
    let certs = Certs::new(&temp_dir("etcd-certs").join("pki"));
    let etcd = PrivateEtcd::start_tls("tls", &certs);
    let mut world = World::with_etcd("etcd-tls", &etcd.endpoint());
    let prefix = world.prefix.clone();

    // Least privilege with today's key layout: a deployer writes fleets and reads what the
    // nodes report; node-1 reads fleets and writes its node key and the status keys
    // (status/<fleet>/<node> has no per-node prefix, see SECURITY.md).
    ok(
        &etcd,
        &certs,
        "root",
        &["user", "add", "root", "--no-password"],
    );
    ok(&etcd, &certs, "root", &["role", "add", "root"]);
    ok(
        &etcd,
        &certs,
        "root",
        &["user", "grant-role", "root", "root"],
    );
    for (user, role, grants) in [
        (
            "deployer",
            "deployer",
            vec![
                ("readwrite", format!("{prefix}/fleets/")),
                ("read", format!("{prefix}/status/")),
                ("read", format!("{prefix}/instances/")),
                ("read", format!("{prefix}/nodes/")),
            ],
        ),
        (
            "node-1",
            "node-1",
            vec![
                ("read", format!("{prefix}/fleets/")),
                ("readwrite", format!("{prefix}/nodes/node-1")),
                ("readwrite", format!("{prefix}/status/")),
                ("readwrite", format!("{prefix}/instances/")),
            ],
        ),
    ] {
        ok(
            &etcd,
            &certs,
            "root",
            &["user", "add", user, "--no-password"],
        );
        ok(&etcd, &certs, "root", &["role", "add", role]);
        for (perm, key) in grants {
            let mut args = vec!["role", "grant-permission", role, perm, key.as_str()];
            if key.ends_with('/') {
                args.push("--prefix=true");
            }
            ok(&etcd, &certs, "root", &args);
        }
        ok(&etcd, &certs, "root", &["user", "grant-role", user, role]);
    }
    ok(&etcd, &certs, "root", &["auth", "enable"]);

    // The deployer applies over TLS with its certificate.
    world.env = tls_env(&certs, "deployer");
    let base = free_port_range(4);
    let out = world.cli_ok(
        &["apply", "-f", "-"],
        Some(&world.sim_fleet("sec", 2, base, "")),
    );
    assert!(out.contains("created"), "{out}");

    // The node's agent converges with its own certificate, and writes its keys.
    world.env = tls_env(&certs, "node-1");
    let agent = world.agent("node-1", &[]);
    world.env = tls_env(&certs, "deployer");
    let status = world
        .wait_status("sec", "2 ready", 90, |s| s["readyReplicas"] == 2)
        .await;
    assert_eq!(status["node"], "node-1");
    assert!(
        !agent.log_text().contains("without TLS client certificates"),
        "no warning with a client certificate"
    );

    // The node's identity cannot change fleets; an unknown certificate cannot read at all.
    let (wrote, text) = etcdctl(
        &etcd,
        &certs,
        "node-1",
        &["put", &format!("{prefix}/fleets/evil"), "x"],
    );
    assert!(!wrote && text.contains("permission denied"), "{text}");
    let (read, text) = etcdctl(
        &etcd,
        &certs,
        "stranger",
        &["get", "--prefix", &format!("{prefix}/")],
    );
    assert!(!read, "{text}");
}

#[tokio::test]
async fn a_password_is_never_sent_in_clear_text_and_open_etcd_is_warned_about() {
    let world = World::new("etcd-plain");
    // A user and password over http:// is refused before anything is sent.
    let out = Command::new(fleet_e2e::fleet::binary())
        .args(["get", "fleets", "--etcd-user", "admin"])
        .env("OLLAMA_FLEET_ETCD_ENDPOINTS", &world.ns.env.etcd_endpoints)
        .env("OLLAMA_FLEET_ETCD_PASSWORD", "secret")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to send the etcd password in clear text"),
        "{err}"
    );
    // An agent on an open etcd says so once at start.
    let agent = world.agent("node-1", &[]);
    fleet_e2e::wait_for(
        "the warning",
        std::time::Duration::from_secs(20),
        || async {
            agent
                .log_text()
                .contains("without TLS client certificates or a user")
                .then_some(())
        },
    )
    .await;
}
