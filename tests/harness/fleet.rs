//! Running the real `ollama-fleet` binary (CLI and agent) in a test's own containerd namespace,
//! etcd prefix, state directory and port range.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::{Namespace, free_port, repo_root, request, temp_dir};

/// The `ollama-fleet` binary: `$OLLAMA_FLEET_BINARY`, else the one `cargo build` made
/// (hack/test.sh builds it first).
pub fn binary() -> PathBuf {
    let path = std::env::var_os("OLLAMA_FLEET_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug/ollama-fleet"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p ollama-fleet` (hack/test.sh does)",
        path.display()
    );
    path
}

static NEXT_RANGE: AtomicU32 = AtomicU32::new(0);

/// `count` consecutive free loopback ports below the ephemeral range.
pub fn free_port_range(count: u16) -> u16 {
    loop {
        let n = NEXT_RANGE.fetch_add(1, Ordering::SeqCst);
        let base = 20000 + ((std::process::id() * 131 + n * 97) % 12000) as u16;
        let all_free =
            (base..base + count).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free && base + count < 32768 {
            return base;
        }
    }
}

/// One test's world: a containerd namespace (with the sim image), an etcd prefix, a models
/// directory and a state directory.
#[derive(Debug)]
pub struct World {
    /// The containerd namespace.
    pub ns: Namespace,
    /// The etcd prefix.
    pub prefix: String,
    /// Scratch space (models, state, manifests).
    pub dir: PathBuf,
    /// Extra environment of every CLI call and agent (etcd credentials, say).
    pub env: Vec<(String, String)>,
}

impl World {
    /// A new world named after `tag`.
    pub fn new(tag: &str) -> World {
        World::in_namespace(Namespace::new(tag))
    }

    /// A world whose namespace starts empty: no image imported (images come from a registry).
    pub fn empty(tag: &str) -> World {
        World::in_namespace(Namespace::empty(tag))
    }

    /// A world on the containerd at `socket` (a [`crate::containerd::PrivateContainerd`]).
    pub fn with_containerd(tag: &str, socket: &str) -> World {
        let mut env = crate::DevEnv::get();
        env.containerd_socket = socket.to_string();
        World::in_namespace(Namespace::in_env(tag, env))
    }

    /// A world whose fleets live in the etcd at `endpoint` (a [`crate::PrivateEtcd`]).
    pub fn with_etcd(tag: &str, endpoint: &str) -> World {
        let mut env = crate::DevEnv::get();
        env.etcd_endpoints = endpoint.to_string();
        World::in_namespace(Namespace::in_env(tag, env))
    }

    /// A world on the containerd at `socket` whose fleets live in the etcd at `endpoint`.
    pub fn with_both(tag: &str, socket: &str, endpoint: &str) -> World {
        let mut env = crate::DevEnv::get();
        env.containerd_socket = socket.to_string();
        env.etcd_endpoints = endpoint.to_string();
        World::in_namespace(Namespace::in_env(tag, env))
    }

    fn in_namespace(ns: Namespace) -> World {
        let dir = temp_dir(&ns.name);
        World {
            prefix: format!("/e2e/{}", ns.name),
            ns,
            dir,
            env: Vec::new(),
        }
    }

    /// Runs the CLI against this world's etcd prefix.
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(binary());
        cmd.args(args)
            .env("OLLAMA_FLEET_ETCD_ENDPOINTS", &self.ns.env.etcd_endpoints)
            .env("OLLAMA_FLEET_ETCD_PREFIX", &self.prefix)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        crate::run_with_stdin(cmd, stdin)
    }

    /// Runs the CLI and returns its stdout, panicking with stderr on failure.
    pub fn cli_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.cli(args, stdin);
        assert!(
            out.status.success(),
            "ollama-fleet {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `etcdctl put` of a fleet document under this world's prefix (as an SRE would).
    pub fn etcdctl_put(&self, fleet: &str, value: &str) {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .env("ETCDCTL_ENDPOINTS", &self.ns.env.etcd_endpoints)
            .args(["put", &format!("{}/fleets/{fleet}", self.prefix), value])
            .output()
            .expect("etcdctl");
        assert!(
            out.status.success(),
            "etcdctl put: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `etcdctl put` of a fleet document read from standard input (values over the 128 KiB
    /// an argument may hold).
    pub fn etcdctl_put_stdin(&self, fleet: &str, value: &str) {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .env("ETCDCTL_ENDPOINTS", &self.ns.env.etcd_endpoints)
            .args(["put", &format!("{}/fleets/{fleet}", self.prefix)]);
        let out = crate::run_with_stdin(cmd, Some(value));
        assert!(
            out.status.success(),
            "etcdctl put: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A sim fleet manifest: `replicas` per node from `base_port`, Never pulling the test image.
    pub fn sim_fleet(&self, name: &str, replicas: u32, base_port: u16, extra: &str) -> String {
        let models = self.dir.join("models");
        format!(
            "apiVersion: ollama-fleet.io/v1alpha1\nkind: OllamaFleet\nmetadata:\n  name: {name}\nspec:\n  model: smollm2:135m\n  image: {image}\n  imagePullPolicy: Never\n  env: {{SIM_MODEL_SIZE: 8Mi, SIM_LOAD_TIME: 50ms}}\n  replicas: {{perNode: {replicas}}}\n  resources: {{cpus: 0.5, memory: 128Mi, pids: 256}}\n  network: {{hostIP: 127.0.0.1, basePort: {base_port}}}\n  models: {{hostPath: {models}}}\n  probes: {{readiness: {{periodSeconds: 1, timeoutSeconds: 1}}}}\n  restartBackoff: {{initial: 200ms, max: 2s}}\n  terminationGracePeriod: 2s\n{extra}",
            image = self.ns.env.sim_image,
            models = models.display(),
        )
    }

    /// Imports the real engine's image (llama-server behind the sim's API, see
    /// `hack/llama-engine.sh`) into this world's namespace; returns its name. Stops the test
    /// binary with what to run when the image was not built.
    pub fn import_engine(&self) -> String {
        let tar = &self.ns.env.engine_image_tar;
        if !tar.exists() {
            crate::stop(&format!(
                "this test needs the real engine's image {}: run the tests with hack/test.sh (or \
                 build it: eval \"$(hack/llama-engine.sh)\" && hack/sim-image.sh --engine \
                 \"$LLAMA_SERVER:$LLAMA_GGUF\")",
                tar.display()
            ));
        }
        self.ns
            .ctr_ok(&["images", "import", &tar.display().to_string()]);
        self.ns.env.engine_image.clone()
    }

    /// A fleet's per-node statuses, from `ollama-fleet get fleets NAME -o json` (empty when the
    /// CLI fails, e.g. while etcd is down).
    pub fn statuses(&self, fleet: &str) -> Vec<Value> {
        let out = self.cli(&["get", "fleets", fleet, "-o", "json"], None);
        if !out.status.success() {
            return Vec::new();
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["items"][0]["status"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits up to `secs` until a node's status of `fleet` satisfies `check`; returns it.
    pub async fn wait_status(
        &self,
        fleet: &str,
        what: &str,
        secs: u64,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        crate::wait_for(what, Duration::from_secs(secs), || {
            let found = self.statuses(fleet).into_iter().find(|s| check(s));
            async move { found }
        })
        .await
    }

    /// Applies the sim fleet `name` with `replicas` instances from `base_port` and waits (up
    /// to a minute) until a node reports them all ready; returns that status.
    pub async fn apply_sim(&self, name: &str, replicas: u32, base_port: u16) -> Value {
        self.cli_ok(
            &["apply", "-f", "-"],
            Some(&self.sim_fleet(name, replicas, base_port, "")),
        );
        self.wait_status(name, &format!("{replicas} ready"), 60, |s| {
            s["readyReplicas"] == replicas
        })
        .await
    }

    /// `ollama-fleet apply -f -` of `manifest` into this world's etcd prefix.
    pub fn apply(&self, manifest: &str) {
        self.cli_ok(&["apply", "-f", "-"], Some(manifest));
    }

    /// Starts an agent for node `node` with extra arguments.
    pub fn agent(&self, node: &str, extra: &[&str]) -> AgentProcess {
        AgentProcess::start(self, node, extra)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .env("ETCDCTL_ENDPOINTS", &self.ns.env.etcd_endpoints)
            .args(["del", "--prefix", &format!("{}/", self.prefix)])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `ollama-fleet agent`.
#[derive(Debug)]
pub struct AgentProcess {
    child: Option<Child>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Where its HTTP endpoints listen.
    pub listen: SocketAddr,
    /// Its log file.
    pub log: PathBuf,
    /// A listening socket handed to every start, as systemd's socket activation does.
    socket: Option<std::net::TcpListener>,
}

impl AgentProcess {
    fn start(world: &World, node: &str, extra: &[&str]) -> AgentProcess {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--node-name".into(),
            node.into(),
            "--namespace".into(),
            world.ns.name.clone(),
            "--containerd-socket".into(),
            world.ns.env.containerd_socket.clone(),
            "--listen".into(),
            listen.to_string(),
            "--state-dir".into(),
            world
                .dir
                .join(format!("state-{node}"))
                .display()
                .to_string(),
            "--sockets".into(),
            "1".into(),
            // The world's model caches live under its own directory.
            "--allow-host-path".into(),
            world.dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let env: Vec<(String, String)> = vec![
            (
                "OLLAMA_FLEET_ETCD_ENDPOINTS".to_string(),
                world.ns.env.etcd_endpoints.clone(),
            ),
            ("OLLAMA_FLEET_ETCD_PREFIX".to_string(), world.prefix.clone()),
            (
                "RUST_LOG".to_string(),
                "info,fleet_agent::gateway=debug".to_string(),
            ),
        ]
        .into_iter()
        .chain(world.env.iter().cloned())
        .collect();
        let mut agent = AgentProcess {
            child: None,
            args,
            env,
            listen,
            log: world.dir.join(format!("agent-{node}.log")),
            socket: None,
        };
        agent.resume();
        agent
    }

    /// Stops it (SIGKILL) and starts it again with `socket` handed over at every start, as
    /// systemd's socket activation does (`LISTEN_FDS=1`, the socket as fd 3).
    pub fn hand_socket(&mut self, socket: std::net::TcpListener) {
        self.kill9();
        self.socket = Some(socket);
        self.resume();
    }

    /// Starts it again with the same arguments (after [`AgentProcess::kill9`]).
    pub fn resume(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut cmd = match &self.socket {
            None => Command::new(binary()),
            Some(socket) => {
                // The socket comes in as stdin; the shell makes it fd 3 and execs the agent.
                let mut cmd = Command::new("sh");
                cmd.args(["-c", "exec 3<&0 </dev/null; exec \"$0\" \"$@\""])
                    .arg(binary())
                    .env("LISTEN_FDS", "1")
                    .stdin(std::os::fd::OwnedFd::from(
                        socket.try_clone().expect("clone the socket"),
                    ));
                cmd
            }
        };
        let child = cmd
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start ollama-fleet agent");
        self.child = Some(child);
    }

    /// The agent's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, as systemd stops it; [`AgentProcess::exited`] tells when it is gone.
    pub fn sigterm(&self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }

    /// Waits up to `within` for the agent to exit: its exit status, or `None` if it still
    /// runs.
    pub async fn exited(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET path` from the agent's HTTP endpoint: (status, body), if it answers.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let url = format!("http://{}{path}", self.listen);
        request("GET", &url, None, Duration::from_secs(2))
            .await
            .ok()
    }

    /// The sum of every sample of metric `name` (any labels) in `/metrics`; -1 when there is
    /// none (or the agent does not answer).
    pub async fn metric(&self, name: &str) -> f64 {
        let Some((_, text)) = self.get("/metrics").await else {
            return -1.0;
        };
        let samples: Vec<f64> = text
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        if samples.is_empty() {
            -1.0
        } else {
            samples.iter().sum()
        }
    }

    /// The instances `/instances` lists (of `fleet`, or all); empty when the agent does not
    /// answer.
    pub async fn listed(&self, fleet: Option<&str>) -> Vec<Value> {
        self.instances()
            .await
            .and_then(|v| v["instances"].as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter(|i| fleet.is_none_or(|f| i["fleet"] == f))
            .collect()
    }

    /// `GET /instances`, if the agent answers.
    pub async fn instances(&self) -> Option<Value> {
        let (status, body) = self.get("/instances").await?;
        (status == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- last lines of the agent log {} ---", self.log.display());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A status condition for [`World::wait_status`]: `n` instances, all ready and on the current
/// spec.
pub fn all_ready(n: u64) -> impl Fn(&Value) -> bool {
    move |s: &Value| s["readyReplicas"] == n && s["updatedReplicas"] == n && s["replicas"] == n
}
