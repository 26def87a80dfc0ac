//! A private containerd namespace per test, driven with `ctr` (until the project's own runtime
//! crate exists, `ctr` is the independent reference client).

use std::io::{BufRead, BufReader};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::DevEnv;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A containerd namespace of its own, with the sim image imported; everything in it is removed
/// on drop.
#[derive(Debug)]
pub struct Namespace {
    /// The namespace's name.
    pub name: String,
    /// The dev environment.
    pub env: DevEnv,
}

impl Namespace {
    /// Creates `e2e-<tag>-<pid>-<n>` in the dev environment's containerd and imports the sim
    /// image into it.
    pub fn new(tag: &str) -> Namespace {
        Namespace::in_env(tag, DevEnv::get())
    }

    /// A namespace with no image in it.
    pub fn empty(tag: &str) -> Namespace {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        Namespace {
            name: format!("e2e-{tag}-{}-{n}", std::process::id()),
            env: DevEnv::get(),
        }
    }

    /// The same, in the containerd of `env`.
    pub fn in_env(tag: &str, env: DevEnv) -> Namespace {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let ns = Namespace {
            name: format!("e2e-{tag}-{}-{n}", std::process::id()),
            env,
        };
        assert!(
            ns.env.sim_image_tar.exists(),
            "{} is missing: build it with hack/sim-image.sh",
            ns.env.sim_image_tar.display()
        );
        let tar = ns.env.sim_image_tar.display().to_string();
        ns.ctr_ok(&["images", "import", &tar]);
        ns
    }

    /// Runs `ctr -n <ns> ARGS`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.env.containerd_socket)
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("run ctr (is containerd installed? see hack/install-deps.sh)")
    }

    /// Runs `ctr`, panicking with its stderr on failure; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The status (RUNNING, STOPPED, ...) and pid of a task, if it exists.
    pub fn task(&self, id: &str) -> Option<(String, u32)> {
        self.ctr_ok(&["tasks", "ls"])
            .lines()
            .skip(1)
            .find_map(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                (cols.first() == Some(&id)).then(|| {
                    (
                        cols.get(2).copied().unwrap_or("").to_string(),
                        cols.get(1).and_then(|p| p.parse().ok()).unwrap_or(0),
                    )
                })
            })
    }

    /// Starts collecting containerd's events (`ctr events`) for this namespace.
    pub fn events(&self) -> EventLog {
        let mut child = Command::new("ctr")
            .arg("--address")
            .arg(&self.env.containerd_socket)
            .arg("events")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("ctr events");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (sink, ns) = (lines.clone(), format!(" {} ", self.name));
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains(&ns) {
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            }
        });
        EventLog { child, lines }
    }
}

/// containerd events of one namespace, as `ctr events` prints them
/// (`TIME NAMESPACE TOPIC {json}`), collected in the background.
#[derive(Debug)]
pub struct EventLog {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl EventLog {
    /// The first event line with `topic` (e.g. `/tasks/oom`) that mentions `container`.
    pub fn find(&self, topic: &str, container: &str) -> Option<String> {
        let needle = format!("\"container_id\":\"{container}\"");
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|l| l.contains(&format!(" {topic} ")) && l.contains(&needle))
            .cloned()
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let ids = |what: &str| -> Vec<String> {
            String::from_utf8_lossy(&self.ctr(&[what, "ls", "-q"]).stdout)
                .lines()
                .map(str::to_string)
                .collect()
        };
        for t in ids("tasks") {
            self.ctr(&["tasks", "kill", "-s", "SIGKILL", &t]);
        }
        for t in ids("tasks") {
            for _ in 0..50 {
                if self.ctr(&["tasks", "rm", "-f", &t]).status.success() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        for c in ids("containers") {
            self.ctr(&["containers", "rm", &c]);
        }
        for i in ids("images") {
            self.ctr(&["images", "rm", &i]);
        }
        let _ = Command::new("ctr")
            .arg("--address")
            .arg(&self.env.containerd_socket)
            .args(["namespaces", "rm", &self.name])
            .output();
    }
}

/// The path of a process's cgroup for a v1 controller (e.g. `memory`), from /proc/PID/cgroup.
pub fn cgroup_v1_dir(pid: u32, controller: &str) -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == controller)
            .then(|| std::path::PathBuf::from(format!("/sys/fs/cgroup/{controller}{path}")))
    })
}

/// A containerd of a test's own (own config, root, state and socket), for tests that kill and
/// restart it; the shared one must stay up for the other tests.
#[derive(Debug)]
pub struct PrivateContainerd {
    child: Option<std::process::Child>,
    dir: std::path::PathBuf,
}

impl PrivateContainerd {
    /// Starts one and waits until it answers.
    pub fn start(tag: &str) -> PrivateContainerd {
        let dir = std::path::PathBuf::from(format!("/tmp/pcd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{d}/c.sock\"\n[ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n[debug]\n  address = \"{d}/debug.sock\"\n[plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n",
            d = dir.display()
        );
        std::fs::write(dir.join("config.toml"), config).expect("config");
        let mut c = PrivateContainerd { child: None, dir };
        c.resume();
        c
    }

    /// Its socket.
    pub fn socket(&self) -> String {
        self.dir.join("c.sock").display().to_string()
    }

    /// Starts it again (same root and state) and waits until it answers.
    pub fn resume(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))
            .expect("log");
        let _ = std::fs::remove_file(self.dir.join("c.sock"));
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        self.child = Some(child);
        let start = std::time::Instant::now();
        while !Command::new("ctr")
            .args(["--address", &self.socket(), "version"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "private containerd did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// SIGKILL (the shims and their tasks keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        let sock = self.socket();
        let ctr = |args: &[&str]| {
            Command::new("ctr")
                .arg("--address")
                .arg(&sock)
                .args(args)
                .output()
                .ok()
        };
        let list = |args: &[&str]| -> Vec<String> {
            ctr(args)
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        for ns in list(&["namespaces", "ls", "-q"]) {
            for t in list(&["-n", &ns, "tasks", "ls", "-q"]) {
                ctr(&["-n", &ns, "tasks", "kill", "-s", "SIGKILL", &t]);
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
            for t in list(&["-n", &ns, "tasks", "ls", "-q"]) {
                ctr(&["-n", &ns, "tasks", "rm", "-f", &t]);
            }
            for c in list(&["-n", &ns, "containers", "ls", "-q"]) {
                ctr(&["-n", &ns, "containers", "rm", &c]);
            }
        }
        self.kill9();
        let _ = Command::new("pkill")
            .args(["-9", "-f", "--", &format!("-address {sock}")])
            .status();
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&self.dir.display().to_string()))
            .collect();
        ours.sort_by(|a, b| b.cmp(a));
        for m in ours {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
