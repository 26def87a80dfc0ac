//! Real proxies (Debian's nginx and HAProxy) run by tests and benchmarks in a directory of
//! their own, stopped with the value that runs them.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A proxy process that stops when dropped.
#[derive(Debug)]
pub struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        // SIGTERM, so that nginx's master takes its workers down with it (SIGKILL would leave
        // them running, holding the test's output open).
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nginx in the foreground, with `http` as the body of its `http` block.
pub fn nginx(dir: &Path, http: &str) -> Proxy {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\n\
             events {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n{http}\n}}\n",
            d = dir.display()
        ),
    )
    .expect("write nginx.conf");
    let child = Command::new("nginx")
        .args([
            "-c",
            &conf.display().to_string(),
            "-p",
            &dir.display().to_string(),
        ])
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    Proxy(child)
}

/// HAProxy in the foreground with `config`.
pub fn haproxy(dir: &Path, config: &str) -> Proxy {
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, config).expect("write haproxy.cfg");
    let child = Command::new("haproxy")
        .args(["-db", "-f", &cfg.display().to_string()])
        .stderr(Stdio::null())
        .spawn()
        .expect("start haproxy");
    Proxy(child)
}

/// The shipped example config at `path` (under the repository) with the two nodes' gateways
/// and the listen port put in.
fn shipped(path: &str, listen: u16, gateways: [u16; 2]) -> String {
    std::fs::read_to_string(crate::repo_root().join(path))
        .expect("example")
        .replace(
            "node-1.example:11400",
            &format!("127.0.0.1:{}", gateways[0]),
        )
        .replace(
            "node-2.example:11400",
            &format!("127.0.0.1:{}", gateways[1]),
        )
        .replace("11434", &listen.to_string())
}

/// nginx with the shipped `manifests/nginx/ollama-fleet.conf`, in front of two gateways.
pub fn shipped_nginx(dir: &Path, listen: u16, gateways: [u16; 2]) -> Proxy {
    let snippet = dir.join("ollama-fleet.conf");
    let example = shipped("manifests/nginx/ollama-fleet.conf", listen, gateways);
    std::fs::write(&snippet, example).expect("write");
    nginx(dir, &format!("  include {};", snippet.display()))
}

/// HAProxy with the shipped `manifests/haproxy/haproxy.cfg`, in front of two gateways.
pub fn shipped_haproxy(dir: &Path, listen: u16, gateways: [u16; 2]) -> Proxy {
    haproxy(
        dir,
        &shipped("manifests/haproxy/haproxy.cfg", listen, gateways),
    )
}

/// Debian's Prometheus scraping `targets` (host:port, their `/metrics`) every second, with its
/// data in `dir`; listening on `listen`. Stopped when dropped.
pub fn prometheus(dir: &Path, listen: u16, targets: &[&str]) -> Proxy {
    let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: ollama-fleet\n    static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        ),
    )
    .expect("write prometheus.yml");
    let child = Command::new("prometheus")
        .args([
            &format!("--config.file={}", cfg.display()),
            &format!("--storage.tsdb.path={}", dir.join("data").display()),
            &format!("--web.listen-address=127.0.0.1:{listen}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus (Debian package prometheus; hack/install-deps.sh installs it)");
    Proxy(child)
}
