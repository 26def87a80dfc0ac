//! The test kit shared by the end-to-end tests (and the sim's own tests): a small HTTP client,
//! waits on conditions with deadlines, and access to the dev environment's real containerd and
//! etcd (started by `hack/dev-env.sh`, which `hack/test.sh` runs first).

pub mod containerd;
pub mod etcd;
pub mod fleet;
pub mod http;
pub mod load;
pub mod netfault;
pub mod proxy;
pub mod registry;

use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

pub use containerd::Namespace;
pub use etcd::{Certs, PrivateEtcd};
pub use fleet::{AgentProcess, World, all_ready, free_port_range};
pub use http::{get, json, post, post_lines, request};
pub use load::{Load, generations};
pub use registry::PrivateRegistry;

/// The root of the repository.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Waits (up to a minute) until `url` answers `GET /` with 200: a gateway with a ready
/// instance, or a proxy with such a gateway behind it.
pub async fn answers(url: &str) {
    wait_for(
        &format!("{url} to answer"),
        Duration::from_secs(60),
        || async {
            request("GET", &format!("{url}/"), None, Duration::from_secs(2))
                .await
                .ok()
                .filter(|(c, _)| *c == 200)
        },
    )
    .await;
}

/// Polls `check` until it returns `Some`, or panics naming `what` after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks that `check` stays true for all of `window` (polled every 50 ms), or panics naming
/// `what`: the one way tests say "nothing happens for a while".
pub async fn holds_for<F, Fut>(what: &str, window: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < window {
        assert!(
            check().await,
            "{what} stopped holding after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        check().await,
        "{what} stopped holding at the end of {window:?}"
    );
}

/// Stops the test binary with one line saying what to run: a test that needs the dev
/// environment cannot run without it, and a panic in every such test would bury that line.
pub(crate) fn stop(why: &str) -> ! {
    use std::io::Write;
    // One test says it and exits; the others (in parallel) wait here for the exit.
    static ONCE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _held = ONCE.lock();
    // Straight to the file descriptor: the test harness captures eprintln!, and would drop it.
    let _ = writeln!(std::io::stderr(), "\n{why}\n");
    std::process::exit(2)
}

/// The python of a venv with the official `ollama` client: `$OLLAMA_FLEET_PYTHON`
/// (hack/test.sh sets it), else what hack/python-client.sh makes.
pub fn python() -> String {
    if let Ok(p) = std::env::var("OLLAMA_FLEET_PYTHON") {
        return p;
    }
    let out = std::process::Command::new(repo_root().join("hack/python-client.sh"))
        .output()
        .expect("hack/python-client.sh");
    assert!(
        out.status.success(),
        "hack/python-client.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A fresh, empty temporary directory named after `tag` and this process.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fleet-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Runs `cmd` with `stdin` fed to it (or none) and collects its output.
pub fn run_with_stdin(mut cmd: std::process::Command, stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("wait")
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The dev environment: where the real containerd and etcd listen.
#[derive(Clone, Debug)]
pub struct DevEnv {
    /// containerd's socket.
    pub containerd_socket: String,
    /// etcd client URLs.
    pub etcd_endpoints: String,
    /// The sim image archive made by `hack/sim-image.sh`.
    pub sim_image_tar: PathBuf,
    /// The sim image's name.
    pub sim_image: String,
    /// The real engine's image archive (`hack/sim-image.sh --engine`), and its name.
    pub engine_image_tar: PathBuf,
    /// The real engine's image name.
    pub engine_image: String,
}

impl DevEnv {
    /// Reads the environment printed by `hack/dev-env.sh` (from the process environment, or
    /// from the env file of `$OLLAMA_FLEET_DEV_DIR`); without one, the test binary stops with
    /// one line that says what to run.
    pub fn get() -> DevEnv {
        let dir = std::env::var("OLLAMA_FLEET_DEV_DIR")
            .unwrap_or_else(|_| "/tmp/ollama-fleet-dev".into());
        let file = std::fs::read_to_string(format!("{dir}/env")).unwrap_or_default();
        let var = |name: &str| -> Option<String> {
            std::env::var(name).ok().or_else(|| {
                file.lines()
                    .filter_map(|l| l.strip_prefix("export "))
                    .find_map(|l| l.strip_prefix(&format!("{name}=")).map(str::to_string))
            })
        };
        let Some((containerd_socket, etcd_endpoints)) =
            var("OLLAMA_FLEET_CONTAINERD_SOCKET").zip(var("OLLAMA_FLEET_ETCD_ENDPOINTS"))
        else {
            stop(
                "this test needs etcd and containerd: run the tests with hack/test.sh (or start them \
                 with `eval \"$(hack/dev-env.sh up)\" && hack/sim-image.sh`)",
            )
        };
        let sim_image_tar = var("OLLAMA_FLEET_SIM_IMAGE_TAR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/images/ollama-sim.oci.tar"));
        if !sim_image_tar.exists() {
            stop(&format!(
                "this test needs the sim image {}: run the tests with hack/test.sh (or build it \
                 with hack/sim-image.sh)",
                sim_image_tar.display()
            ));
        }
        DevEnv {
            containerd_socket,
            etcd_endpoints,
            sim_image_tar,
            sim_image: var("OLLAMA_FLEET_SIM_IMAGE")
                .unwrap_or_else(|| "localhost/ollama-sim:dev".into()),
            engine_image_tar: var("OLLAMA_FLEET_ENGINE_IMAGE_TAR")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo_root().join("target/images/ollama-engine.oci.tar")),
            engine_image: var("OLLAMA_FLEET_ENGINE_IMAGE")
                .unwrap_or_else(|| "localhost/ollama-engine:dev".into()),
        }
    }
}
