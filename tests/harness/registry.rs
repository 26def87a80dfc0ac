//! A real OCI registry of a test's own (Debian's `docker-registry`) on a loopback port, and
//! pushing images to it with `skopeo`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, temp_dir};

/// A running registry.
#[derive(Debug)]
pub struct PrivateRegistry {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
    creds: Option<(String, String)>,
}

impl PrivateRegistry {
    /// Starts one and waits until it answers.
    pub fn start(tag: &str) -> PrivateRegistry {
        PrivateRegistry::start_with(tag, None)
    }

    /// Starts one that requires these credentials (htpasswd with a bcrypt hash).
    pub fn start_with_auth(tag: &str, user: &str, password: &str) -> PrivateRegistry {
        PrivateRegistry::start_with(tag, Some((user.to_string(), password.to_string())))
    }

    fn start_with(tag: &str, creds: Option<(String, String)>) -> PrivateRegistry {
        let dir = temp_dir(&format!("registry-{tag}"));
        if let Some((user, password)) = &creds {
            let script = "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))";
            let hash = Command::new("python3")
                .args(["-c", script, password])
                .output()
                .expect("python3 (for a bcrypt hash)");
            let hash = String::from_utf8_lossy(&hash.stdout).trim().to_string();
            std::fs::write(dir.join("htpasswd"), format!("{user}:{hash}\n")).expect("htpasswd");
        }
        let mut r = PrivateRegistry {
            child: None,
            dir,
            port: 0,
            creds,
        };
        // A free port can be taken by another process before the registry binds it: then the
        // registry exits, and another port is tried.
        for _ in 0..5 {
            r.port = free_port();
            r.write_config();
            if r.launch() {
                return r;
            }
        }
        panic!("docker-registry did not start on any of 5 ports");
    }

    fn write_config(&self) {
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{}\n",
            self.dir.join("data").display(),
            self.port
        );
        if self.creds.is_some() {
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                self.dir.join("htpasswd").display()
            ));
        }
        std::fs::write(self.dir.join("config.yml"), config).expect("registry config");
    }

    /// Corrupts the largest blob in the registry's storage (same size, different bytes), so the
    /// registry serves content that does not match its digest. Returns the blob's digest.
    pub fn corrupt_largest_blob(&self) -> String {
        let mut largest: Option<(u64, PathBuf)> = None;
        let mut stack = vec![self.dir.join("data")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.file_name().is_some_and(|n| n == "data")
                    && path.to_string_lossy().contains("/blobs/")
                {
                    let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                    if largest.as_ref().is_none_or(|(s, _)| size > *s) {
                        largest = Some((size, path));
                    }
                }
            }
        }
        let (_, path) = largest.expect("a blob in the registry");
        let mut bytes = std::fs::read(&path).expect("read blob");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&path, bytes).expect("write blob");
        let digest_dir = path
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("sha256:{digest_dir}")
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts it again (same storage, same port) and waits until it answers.
    pub fn resume(&mut self) {
        assert!(
            self.launch(),
            "docker-registry exited at start (is port {} taken?)",
            self.port
        );
    }

    /// Starts the registry and waits until it answers HTTP on its port: true, or false when it
    /// exited first (its port taken).
    fn launch(&mut self) -> bool {
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "start docker-registry (Debian package docker-registry; see hack/install-deps.sh)",
            );
        let start = Instant::now();
        loop {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return false;
            }
            if self.answers_http() {
                // Ours, not another process that holds the port: still running a moment later.
                std::thread::sleep(Duration::from_millis(100));
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return false;
                }
                self.child = Some(child);
                return true;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "registry did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether an HTTP server answers `GET /v2/` on the port.
    fn answers_http(&self) -> bool {
        use std::io::{Read as _, Write as _};
        let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let mut head = [0u8; 8];
        conn.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n").is_ok()
            && conn.read_exact(&mut head).is_ok()
            && head.starts_with(b"HTTP/1.")
    }

    /// Stops it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Pushes an OCI archive made by `hack/sim-image.sh` as `<host>/<repo_tag>`.
    pub fn push(&self, archive: &Path, repo_tag: &str) {
        self.push_ref(archive, "dev", repo_tag);
    }

    /// Pushes the image named `reference` in an OCI archive as `<host>/<repo_tag>`.
    pub fn push_ref(&self, archive: &Path, reference: &str, repo_tag: &str) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if let Some((u, p)) = &self.creds {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        let out = cmd
            .arg(format!("oci-archive:{}:{reference}", archive.display()))
            .arg(format!("docker://{}/{repo_tag}", self.host()))
            .output()
            .expect("skopeo (Debian package skopeo; see hack/install-deps.sh)");
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivateRegistry {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Builds a variant of the sim image with `env` baked in (a different digest), returning the
/// archive's path.
pub fn sim_variant(tag: &str, env: &str) -> PathBuf {
    let out = temp_dir(&format!("variant-{tag}"));
    let binary = crate::repo_root().join("target/debug/ollama-sim");
    let result = Command::new(crate::repo_root().join("hack/sim-image.sh"))
        .arg("--binary")
        .arg(&binary)
        .arg("--out")
        .arg(&out)
        .args(["--env", env])
        .output()
        .expect("hack/sim-image.sh");
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    out.join("ollama-sim.oci.tar")
}
