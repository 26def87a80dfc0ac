//! The container runtime of ollama-fleet: a [`Runtime`] trait with a containerd implementation
//! ([`containerd::Containerd`], over containerd's gRPC API) and an in-memory fake
//! ([`fake::FakeRuntime`]) for fast controller tests. One conformance suite runs against both.
//!
//! Generated protobuf types stay inside this crate: callers see only the plain types below.
//! Only containers labelled `ollama-fleet.io/fleet` are ever listed, so nothing else in the
//! namespace can be touched by mistake.

pub mod cgroup;
pub mod clock;
pub mod containerd;
pub mod fake;
pub mod image;
pub mod logs;
pub mod pull;
pub mod registry;
pub mod spec;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use futures::stream::BoxStream;

/// What the runtime knows of an image that is present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// The name it is stored under (normalised, e.g. `docker.io/ollama/ollama:0.4.0`).
    pub name: String,
    /// Digest of the manifest (or index) the name points to.
    pub digest: String,
    /// Chain ID of the unpacked layers: the snapshot a container's rootfs is prepared from.
    pub chain_id: String,
    /// The image's configuration.
    pub config: ImageConfig,
}

/// The parts of an image configuration a container inherits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, as `KEY=VALUE`.
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: String,
    /// `User`: `uid`, `uid:gid`, a name, or empty (root).
    pub user: String,
}

/// A bind mount from the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindMount {
    /// Host path.
    pub source: PathBuf,
    /// Path in the container.
    pub destination: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// cgroup limits of a container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// Memory plus swap in bytes (OCI `memory.swap`): equal to `memory_bytes` for no swap
    /// (v2 `memory.swap.max` 0, v1 `memory.memsw.limit_in_bytes` = the limit). `None`: the
    /// runtime's default, which is unbounded swap; set only where the host accounts swap.
    pub memory_swap_bytes: Option<u64>,
    /// CFS quota in microseconds per `cpu_period_us`.
    pub cpu_quota_us: Option<i64>,
    /// CFS period (default 100000).
    pub cpu_period_us: u64,
    /// CPU shares.
    pub cpu_shares: Option<u64>,
    /// Pids limit.
    pub pids: Option<i64>,
    /// cpuset cpus, e.g. `0-31,64-95`.
    pub cpuset_cpus: Option<String>,
    /// cpuset mems (NUMA nodes), e.g. `0`.
    pub cpuset_mems: Option<String>,
    /// `RLIMIT_NOFILE` (soft and hard); `None`: inherited from the shim.
    pub nofile: Option<u64>,
}

/// Everything needed to create a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerSpec {
    /// Container ID.
    pub id: String,
    /// The image, as returned by [`Runtime::image`].
    pub image: ImageInfo,
    /// Labels (the `ollama-fleet.io/*` ones at least).
    pub labels: BTreeMap<String, String>,
    /// Process arguments.
    pub args: Vec<String>,
    /// Environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// Bind mounts.
    pub mounts: Vec<BindMount>,
    /// Files of the host bound read-only at the same path (`/etc/hosts`, `/etc/resolv.conf`),
    /// those the host has: a bind of a missing file fails the task's creation.
    pub host_files: Vec<String>,
    /// cgroup limits.
    pub limits: Limits,
    /// The cgroup parent (`/ollama-fleet/<namespace>`); the container's cgroup is `<parent>/<id>`.
    pub cgroup_parent: String,
    /// containerd runtime name (`io.containerd.runc.v2`).
    pub runtime: String,
    /// OCI runtime binary for the runc shim (`crun`), empty for the default.
    pub runtime_binary: String,
    /// Who the process runs as, and how much of the filesystem it may write.
    pub security: Security,
}

/// The identity and filesystem access of a container's process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Security {
    /// uid and gid, or why they cannot be known (an image `USER` given by name: this runtime
    /// does not read the image's `/etc/passwd`); creating the container then fails with it.
    pub user: Result<(u32, u32), String>,
    /// Mount the root filesystem read-only.
    pub read_only_root: bool,
    /// Directories that get a private, size-limited tmpfs (with a read-only root: `/tmp` and
    /// the process's `HOME`).
    pub tmpfs: Vec<String>,
}

impl Default for Security {
    /// root, writable root filesystem, no tmpfs.
    fn default() -> Self {
        Security {
            user: Ok((0, 0)),
            read_only_root: false,
            tmpfs: Vec::new(),
        }
    }
}

/// The state of a container's task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TaskState {
    /// The container exists without a task.
    NoTask,
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Exited (not yet deleted).
    Stopped,
    /// Paused or pausing.
    Paused,
    /// containerd does not know.
    Unknown,
}

/// A container as observed in the runtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Container ID.
    pub id: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its task's state.
    pub state: TaskState,
    /// The task's pid (0 without a running task).
    pub pid: u32,
    /// Exit status, once stopped.
    pub exit_code: Option<u32>,
    /// When it exited, once stopped.
    pub exited_at: Option<SystemTime>,
}

/// Something that happened in the runtime; these only wake the controller, which then
/// observes afresh (events are not replayed after a reconnect).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuntimeEvent {
    /// A task exited.
    Exit {
        /// Container ID.
        id: String,
        /// Exit status.
        code: u32,
        /// When.
        at: SystemTime,
    },
    /// A task hit its memory limit (the kernel's OOM killer ran).
    Oom {
        /// Container ID.
        id: String,
    },
    /// The event stream was (re)connected: anything may have been missed, list again.
    Resync,
}

/// Progress of a pull: bytes fetched of the bytes to fetch (blobs already present are not
/// counted). Cloning shares the counters.
#[derive(Clone, Debug, Default)]
pub struct PullProgress {
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    total: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl PullProgress {
    /// (done, total) bytes.
    pub fn get(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.done.load(Relaxed), self.total.load(Relaxed))
    }

    /// Adds fetched bytes.
    pub fn add_done(&self, n: u64) {
        self.done.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets the bytes to fetch.
    pub fn set_total(&self, n: u64) {
        self.total.store(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runtime errors. `NotFound` and `AlreadyExists` are outcomes callers handle, not failures.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The object does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The object exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The runtime cannot be reached.
    #[error("containerd unavailable: {0}")]
    Unavailable(String),
    /// An operation failed.
    #[error("{op} {id}: {message}")]
    Failed {
        /// The operation.
        op: &'static str,
        /// The object.
        id: String,
        /// What went wrong.
        message: String,
    },
}

/// Result of runtime operations.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// A container runtime, scoped to one namespace.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// The runtime's version, e.g. `containerd 1.6.20`.
    async fn version(&self) -> Result<String>;

    /// The image stored under `name` (normalised), if present and unpacked.
    async fn image(&self, name: &str) -> Result<Option<ImageInfo>>;

    /// Creates a container (and its rootfs snapshot) without starting it.
    async fn create(&self, spec: &ContainerSpec) -> Result<()>;

    /// Creates and starts the container's task; returns its pid.
    async fn start(&self, id: &str) -> Result<u32>;

    /// Sends a signal to every process of the container's task.
    async fn kill(&self, id: &str, signal: u32) -> Result<()>;

    /// Deletes the container's task (killing it if it runs), the container and its snapshot.
    /// Returns the task's exit status if it had one. Removing what is gone is not an error.
    async fn remove(&self, id: &str) -> Result<Option<u32>>;

    /// Every container labelled `ollama-fleet.io/fleet`, with its task state.
    async fn list(&self) -> Result<Vec<Observed>>;

    /// The state of one container's task (`NotFound` when the container does not exist).
    async fn state(&self, id: &str) -> Result<TaskState>;

    /// Stops a task gracefully: SIGTERM, then SIGKILL after `grace`; returns once it is no
    /// longer running (or does not exist).
    async fn stop(&self, id: &str, grace: Duration) -> Result<()> {
        match self.kill(id, SIGTERM).await {
            Ok(()) => {}
            Err(RuntimeError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
        let running =
            |s: &Result<TaskState>| matches!(s, Ok(TaskState::Running | TaskState::Paused));
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            if !running(&self.state(id).await) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match self.kill(id, SIGKILL).await {
            Ok(()) | Err(RuntimeError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while running(&self.state(id).await) {
            if tokio::time::Instant::now() > deadline {
                return Err(RuntimeError::Failed {
                    op: "stop",
                    id: id.to_string(),
                    message: "still running 10s after SIGKILL".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The anonymous plus swap memory of a running container whose task has `pid`
    /// (for `rotation.maxMemory`), read from its cgroup.
    async fn memory(&self, _id: &str, pid: u32) -> Result<u64> {
        cgroup::memory_of_pid(pid)
            .await
            .map_err(|e| RuntimeError::Failed {
                op: "memory",
                id: pid.to_string(),
                message: e.to_string(),
            })
    }

    /// Whether the kernel's OOM killer ran in the cgroup of a container whose task has exited
    /// (and was not deleted yet): the count in its `memory.events` (v2) or
    /// `memory.oom_control` (v1). For an OOM kill whose event the agent missed.
    async fn oom_killed(&self, id: &str, cgroup_parent: &str) -> Result<bool> {
        let dir = format!("{}/{id}", cgroup_parent.trim_end_matches('/'));
        cgroup::oom_kills(std::path::Path::new(cgroup::ROOT), &dir)
            .await
            .map(|n| n > 0)
            .map_err(|e| RuntimeError::Failed {
                op: "oom_killed",
                id: id.to_string(),
                message: e.to_string(),
            })
    }

    /// The log file of a container.
    fn log_path(&self, id: &str) -> PathBuf;

    /// Pulls an image from its registry and unpacks it; `progress` follows the download.
    async fn pull(&self, name: &str, progress: &PullProgress) -> Result<ImageInfo>;

    /// The digest the registry serves for the image's tag now (for `imagePullPolicy: Always`).
    async fn resolve(&self, name: &str) -> Result<String>;

    /// Task exits and OOM kills of this namespace; reconnects by itself and yields
    /// [`RuntimeEvent::Resync`] after every (re)connection.
    fn events(&self) -> BoxStream<'static, RuntimeEvent>;
}

/// SIGTERM.
pub const SIGTERM: u32 = 15;
/// SIGKILL.
pub const SIGKILL: u32 = 9;
