//! An etcd of a test's own, for tests that stop and restart it (the shared one from
//! `hack/dev-env.sh` must stay up for the other tests).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, temp_dir};

/// A private etcd process on free loopback ports, with its data in a temporary directory.
#[derive(Debug)]
pub struct PrivateEtcd {
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    tls: Option<Certs>,
    /// Its member name and the cluster it belongs to (`name=peerURL,...`).
    name: String,
    cluster: String,
}

/// A test CA and certificates signed by it (ECDSA P-256, PEM files), made with openssl.
#[derive(Clone, Debug)]
pub struct Certs {
    /// The CA certificate.
    pub ca: PathBuf,
    /// etcd's server certificate and key (for 127.0.0.1 and localhost).
    pub server: (PathBuf, PathBuf),
    dir: PathBuf,
}

/// Runs openssl in `dir`, panicking with its error output when it fails.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (see hack/install-deps.sh)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An ECDSA P-256 key, as openssl's `-newkey` arguments.
const EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

impl Certs {
    /// A new CA in `dir`, with a server certificate for loopback.
    pub fn new(dir: &std::path::Path) -> Certs {
        std::fs::create_dir_all(dir).expect("certs dir");
        let mut args = vec!["req", "-x509"];
        args.extend(EC_KEY);
        args.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
        ]);
        openssl(dir, &args);
        let certs = Certs {
            ca: dir.join("ca.crt"),
            server: (dir.join("server.crt"), dir.join("server.key")),
            dir: dir.to_path_buf(),
        };
        certs.sign(
            "server",
            "etcd",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth",
        );
        certs
    }

    /// A client certificate whose common name is `cn` (etcd takes it as the user name when
    /// authentication is on): (certificate, key).
    pub fn client(&self, cn: &str) -> (PathBuf, PathBuf) {
        self.sign(cn, cn, "extendedKeyUsage=clientAuth");
        (
            self.dir.join(format!("{cn}.crt")),
            self.dir.join(format!("{cn}.key")),
        )
    }

    /// A key and a certificate `name.key`, `name.crt` for `cn`, signed by the CA.
    fn sign(&self, name: &str, cn: &str, extensions: &str) {
        let ext = format!("{name}.ext");
        std::fs::write(self.dir.join(&ext), extensions).expect("ext file");
        let (key, csr, crt, subj) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("/CN={cn}"),
        );
        let mut args = vec!["req"];
        args.extend(EC_KEY);
        args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(&self.dir, &args);
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

/// The etcd settings ARCHITECTURE.md ("etcd sizing") recommends, as tests and the dev
/// environment (hack/dev-env.sh) run etcd: history compacted every 5 minutes, an 8 GiB quota,
/// a snapshot every 10,000 writes.
pub const RECOMMENDED_FLAGS: [&str; 8] = [
    "--auto-compaction-mode",
    "periodic",
    "--auto-compaction-retention",
    "5m",
    "--quota-backend-bytes",
    "8589934592",
    "--snapshot-count",
    "10000",
];

impl PrivateEtcd {
    /// Starts one and waits until it answers.
    pub fn start(tag: &str) -> PrivateEtcd {
        PrivateEtcd::start_with(tag, None)
    }

    /// One that serves TLS only and requires client certificates signed by `certs`' CA
    /// (etcd's `--client-cert-auth`).
    pub fn start_tls(tag: &str, certs: &Certs) -> PrivateEtcd {
        PrivateEtcd::start_with(tag, Some(certs.clone()))
    }

    fn start_with(tag: &str, tls: Option<Certs>) -> PrivateEtcd {
        let peer_port = free_port();
        let mut etcd = PrivateEtcd {
            child: None,
            dir: temp_dir(&format!("etcd-{tag}")),
            client_port: free_port(),
            peer_port,
            tls,
            name: "test".into(),
            cluster: format!("test=http://127.0.0.1:{peer_port}"),
        };
        etcd.resume();
        etcd
    }

    /// A cluster of `members` etcd processes on loopback, as production runs etcd (three or
    /// five members); every member answers clients.
    pub fn cluster(tag: &str, members: usize) -> Vec<PrivateEtcd> {
        let ports: Vec<(u16, u16)> = (0..members).map(|_| (free_port(), free_port())).collect();
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut all: Vec<PrivateEtcd> = ports
            .into_iter()
            .enumerate()
            .map(|(i, (client_port, peer_port))| PrivateEtcd {
                child: None,
                dir: temp_dir(&format!("etcd-{tag}-m{i}")),
                client_port,
                peer_port,
                tls: None,
                name: format!("m{i}"),
                cluster: cluster.clone(),
            })
            .collect();
        // Every member must be up before any can elect a leader.
        for m in &mut all {
            m.spawn();
        }
        for m in &all {
            m.wait_listening();
        }
        all
    }

    /// This member's name (`m0`, ...; `test` alone).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The peer port (to cut a member off from the others).
    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    /// The client port (to cut it off with [`crate::netfault::Partition`]).
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Starts it again (same data, same ports) and waits until it listens.
    pub fn resume(&mut self) {
        self.spawn();
        self.wait_listening();
    }

    fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new("etcd");
        if let Some(c) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&c.server.0)
                .arg("--key-file")
                .arg(&c.server.1)
                .arg("--trusted-ca-file")
                .arg(&c.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", &self.name, "--data-dir"])
            .arg(self.dir.join("data"))
            .args([
                "--listen-client-urls",
                &self.endpoint(),
                "--advertise-client-urls",
                &self.endpoint(),
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(RECOMMENDED_FLAGS)
            .args([
                "--initial-cluster",
                &self.cluster,
                "--initial-cluster-token",
                "ollama-fleet-test",
                "--logger",
                "zap",
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd (is etcd-server installed? see hack/install-deps.sh)");
        self.child = Some(child);
    }

    fn wait_listening(&self) {
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "private etcd did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills it (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateEtcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
