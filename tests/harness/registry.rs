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
}

impl PrivateRegistry {
    /// Starts one and waits until it answers.
    pub fn start(tag: &str) -> PrivateRegistry {
        let dir = temp_dir(&format!("registry-{tag}"));
        let port = free_port();
        let config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        );
        std::fs::write(dir.join("config.yml"), config).expect("registry config");
        let mut r = PrivateRegistry {
            child: None,
            dir,
            port,
        };
        r.resume();
        r
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts it again (same storage) and waits until it answers.
    pub fn resume(&mut self) {
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "start docker-registry (Debian package docker-registry; see hack/install-deps.sh)",
            );
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "registry did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
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
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
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
