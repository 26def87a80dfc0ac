//! An in-memory [`Runtime`] for controller tests: containers and tasks as plain state, with
//! hooks to make a task exit or be OOM-killed, and a record of every call.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use crate::clock::{self, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::broadcast;

use crate::{
    ContainerSpec, ImageInfo, Observed, Result, Runtime, RuntimeError, RuntimeEvent, TaskState,
};

#[derive(Debug, Clone)]
struct FakeContainer {
    spec: ContainerSpec,
    state: TaskState,
    pid: u32,
    exit_code: Option<u32>,
    exited_at: Option<SystemTime>,
}

#[derive(Debug, Default)]
struct State {
    images: BTreeMap<String, ImageInfo>,
    containers: BTreeMap<String, FakeContainer>,
    next_pid: u32,
    calls: Vec<(Instant, String)>,
    down: bool,
    start_delay: std::time::Duration,
    list_delay: std::time::Duration,
    remote: BTreeMap<String, ImageInfo>,
    pulls: Vec<String>,
    pull_error: Option<String>,
    pull_delay: std::time::Duration,
    memory: BTreeMap<String, u64>,
    ignore_sigterm: bool,
    oom_killed: std::collections::BTreeSet<String>,
}

/// Called with (container, signal) on every `kill`, before it takes effect.
type KillHook = Arc<dyn Fn(&str, u32) + Send + Sync>;

/// The fake runtime. Cloning shares the state.
#[derive(Clone)]
pub struct FakeRuntime {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<RuntimeEvent>,
    on_kill: Arc<Mutex<Option<KillHook>>>,
}

impl std::fmt::Debug for FakeRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeRuntime").finish_non_exhaustive()
    }
}

impl Default for FakeRuntime {
    fn default() -> Self {
        FakeRuntime {
            state: Arc::new(Mutex::new(State {
                next_pid: 1000,
                ..State::default()
            })),
            events: broadcast::channel(1024).0,
            on_kill: Arc::default(),
        }
    }
}

impl FakeRuntime {
    /// An empty runtime.
    pub fn new() -> FakeRuntime {
        FakeRuntime::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes an image present.
    pub fn add_image(&self, image: ImageInfo) {
        self.state().images.insert(image.name.clone(), image);
    }

    /// A typical image named `name`.
    pub fn image_named(name: &str) -> ImageInfo {
        ImageInfo {
            name: name.to_string(),
            digest: format!("sha256:{:0>64}", name.len()),
            chain_id: "sha256:chain".into(),
            config: crate::ImageConfig {
                entrypoint: vec!["/bin/ollama".into()],
                cmd: vec!["serve".into()],
                env: vec!["PATH=/usr/bin:/bin".into()],
                working_dir: String::new(),
                user: String::new(),
            },
        }
    }

    /// A container spec of the image `image` with `labels` and nothing else to it.
    pub fn container(id: &str, image: &str, labels: &[(&str, &str)]) -> ContainerSpec {
        ContainerSpec {
            id: id.into(),
            image: FakeRuntime::image_named(image),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            args: vec![],
            env: vec![],
            cwd: "/".into(),
            mounts: vec![],
            host_files: vec![],
            limits: crate::Limits::default(),
            cgroup_parent: "/".into(),
            runtime: "io.containerd.runc.v2".into(),
            runtime_binary: String::new(),
            security: Default::default(),
        }
    }

    /// Tasks ignore SIGTERM (as a hung process does): only SIGKILL stops them.
    pub fn set_ignore_sigterm(&self, ignore: bool) {
        self.state().ignore_sigterm = ignore;
    }

    /// Makes a running task exit with `code` (and emits the event).
    pub fn exit(&self, id: &str, code: u32) {
        let mut s = self.state();
        if let Some(c) = s.containers.get_mut(id) {
            c.state = TaskState::Stopped;
            c.exit_code = Some(code);
            c.exited_at = Some(clock::now());
        }
        drop(s);
        let _ = self.events.send(RuntimeEvent::Exit {
            id: id.to_string(),
            code,
            at: clock::now(),
        });
    }

    /// An OOM kill: the OOM event, then an exit with 137.
    pub fn oom(&self, id: &str) {
        self.state().oom_killed.insert(id.to_string());
        let _ = self.events.send(RuntimeEvent::Oom { id: id.to_string() });
        self.exit(id, 137);
    }

    /// An OOM kill whose event is lost (the agent was away): only the exit with 137, and the
    /// count in the cgroup that [`Runtime::oom_killed`] reads.
    pub fn oom_unseen(&self, id: &str) {
        self.state().oom_killed.insert(id.to_string());
        self.exit(id, 137);
    }

    /// Adds a container that the agent did not create (e.g. unlabelled, or left by a previous
    /// agent), running.
    pub fn add_running(&self, spec: ContainerSpec) {
        let mut s = self.state();
        s.next_pid += 1;
        let pid = s.next_pid;
        s.containers.insert(
            spec.id.clone(),
            FakeContainer {
                spec,
                state: TaskState::Running,
                pid,
                exit_code: None,
                exited_at: None,
            },
        );
    }

    /// Makes every start take this long (between creating the task and it running), to
    /// exercise observations made while an action is half done.
    pub fn set_start_delay(&self, delay: std::time::Duration) {
        self.state().start_delay = delay;
    }

    /// Makes `list` answer this long after it took its snapshot (a slow RPC), so the
    /// world can move on between the observation and its use.
    pub fn set_list_delay(&self, delay: std::time::Duration) {
        self.state().list_delay = delay;
    }

    /// Puts an image in the (simulated) registry; a pull copies it into the runtime.
    pub fn add_remote(&self, image: ImageInfo) {
        self.state().remote.insert(image.name.clone(), image);
    }

    /// Makes pulls fail with this registry answer (or succeed again with `None`).
    pub fn set_pull_error(&self, error: Option<&str>) {
        self.state().pull_error = error.map(str::to_string);
    }

    /// Makes pulls take this long.
    pub fn set_pull_delay(&self, delay: std::time::Duration) {
        self.state().pull_delay = delay;
    }

    /// Calls `hook(container, signal)` on every `kill`, before the signal takes effect (a test
    /// checks what the world looked like at that moment).
    pub fn on_kill(&self, hook: impl Fn(&str, u32) + Send + Sync + 'static) {
        *self.on_kill.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(hook));
    }

    /// Sets the memory a container reports (for `rotation.maxMemory`).
    pub fn set_memory(&self, id: &str, bytes: u64) {
        self.state().memory.insert(id.to_string(), bytes);
    }

    /// The images pulled so far, in order.
    pub fn pulls(&self) -> Vec<String> {
        self.state().pulls.clone()
    }

    /// Makes every call fail as if containerd were down (or back up).
    pub fn set_down(&self, down: bool) {
        self.state().down = down;
        if !down {
            let _ = self.events.send(RuntimeEvent::Resync);
        }
    }

    /// The calls made so far (`create sim-0-abc`, `start ...`, ...).
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.iter().map(|(_, c)| c.clone()).collect()
    }

    /// The calls made so far, with when they were made.
    pub fn timed_calls(&self) -> Vec<(Instant, String)> {
        self.state().calls.clone()
    }

    /// IDs of every container, labelled or not.
    pub fn all_ids(&self) -> Vec<String> {
        self.state().containers.keys().cloned().collect()
    }

    /// The spec a container was created with.
    pub fn spec_of(&self, id: &str) -> Option<ContainerSpec> {
        self.state().containers.get(id).map(|c| c.spec.clone())
    }

    fn call(&self, what: String) -> Result<MutexGuard<'_, State>> {
        let mut s = self.state();
        if s.down {
            return Err(RuntimeError::Unavailable("fake runtime is down".into()));
        }
        s.calls.push((Instant::now(), what));
        Ok(s)
    }
}

#[async_trait::async_trait]
impl Runtime for FakeRuntime {
    async fn version(&self) -> Result<String> {
        let _state = self.call("version".into())?;
        Ok("fake 1.0".into())
    }

    async fn image(&self, name: &str) -> Result<Option<ImageInfo>> {
        let s = self.call(format!("image {name}"))?;
        Ok(s.images.get(name).cloned())
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<()> {
        let mut s = self.call(format!("create {}", spec.id))?;
        if s.containers.contains_key(&spec.id) {
            return Err(RuntimeError::AlreadyExists(spec.id.clone()));
        }
        if let Err(why) = &spec.security.user {
            return Err(RuntimeError::Failed {
                op: "choose the user",
                id: spec.id.clone(),
                message: why.clone(),
            });
        }
        s.containers.insert(
            spec.id.clone(),
            FakeContainer {
                spec: spec.clone(),
                state: TaskState::NoTask,
                pid: 0,
                exit_code: None,
                exited_at: None,
            },
        );
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<u32> {
        let delay = self.call(format!("start {id}"))?.start_delay;
        tokio::time::sleep(delay).await;
        let mut s = self.state();
        s.next_pid += 1;
        let pid = s.next_pid;
        let c = s
            .containers
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        c.state = TaskState::Running;
        c.pid = pid;
        c.exit_code = None;
        c.exited_at = None;
        Ok(pid)
    }

    async fn kill(&self, id: &str, signal: u32) -> Result<()> {
        let hook = self
            .on_kill
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(hook) = hook {
            hook(id, signal);
        }
        let mut s = self.call(format!("kill {id} {signal}"))?;
        let c = s
            .containers
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        if c.state != TaskState::Running {
            return Err(RuntimeError::NotFound(format!("task {id}")));
        }
        if signal == crate::SIGTERM && s.ignore_sigterm {
            return Ok(());
        }
        let c = s
            .containers
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        c.state = TaskState::Stopped;
        c.exit_code = Some(128 + signal);
        c.exited_at = Some(clock::now());
        drop(s);
        let _ = self.events.send(RuntimeEvent::Exit {
            id: id.to_string(),
            code: 128 + signal,
            at: clock::now(),
        });
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<Option<u32>> {
        let mut s = self.call(format!("remove {id}"))?;
        Ok(s.containers.remove(id).and_then(|c| c.exit_code))
    }

    async fn list(&self) -> Result<Vec<Observed>> {
        let (delay, snapshot) = {
            let s = self.call("list".into())?;
            (s.list_delay, s.containers.clone())
        };
        tokio::time::sleep(delay).await;
        Ok(snapshot
            .values()
            .filter(|c| c.spec.labels.contains_key(fleet_api::LABEL_FLEET))
            .map(|c| Observed {
                id: c.spec.id.clone(),
                labels: c.spec.labels.clone(),
                state: c.state,
                pid: c.pid,
                exit_code: c.exit_code,
                exited_at: c.exited_at,
            })
            .collect())
    }

    async fn state(&self, id: &str) -> Result<TaskState> {
        let s = self.call(format!("state {id}"))?;
        s.containers
            .get(id)
            .map(|c| c.state)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))
    }

    fn events(&self) -> BoxStream<'static, RuntimeEvent> {
        let rx = self.events.subscribe();
        let first = futures::stream::once(async { RuntimeEvent::Resync });
        let rest = futures::stream::unfold(rx, |mut rx| async move {
            match rx.recv().await {
                Ok(e) => Some((e, rx)),
                Err(broadcast::error::RecvError::Lagged(_)) => Some((RuntimeEvent::Resync, rx)),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        });
        first.chain(rest).boxed()
    }

    async fn memory(&self, id: &str, _pid: u32) -> Result<u64> {
        Ok(self.state().memory.get(id).copied().unwrap_or(0))
    }

    async fn oom_killed(&self, id: &str, _cgroup_parent: &str) -> Result<bool> {
        Ok(self.state().oom_killed.contains(id))
    }

    fn log_path(&self, id: &str) -> PathBuf {
        PathBuf::from(format!("/fake/logs/{id}.log"))
    }

    async fn pull(&self, name: &str, progress: &crate::PullProgress) -> Result<ImageInfo> {
        let delay = self.call(format!("pull {name}"))?.pull_delay;
        progress.set_total(100);
        tokio::time::sleep(delay / 2).await;
        progress.add_done(50);
        tokio::time::sleep(delay / 2).await;
        let mut s = self.state();
        s.pulls.push(name.to_string());
        if let Some(e) = s.pull_error.clone() {
            return Err(RuntimeError::Failed {
                op: "pull",
                id: name.to_string(),
                message: format!("registry: {e}"),
            });
        }
        let image = s
            .remote
            .get(name)
            .cloned()
            .ok_or_else(|| RuntimeError::Failed {
                op: "pull",
                id: name.to_string(),
                message: "registry: manifest unknown".into(),
            })?;
        s.images.insert(name.to_string(), image.clone());
        progress.add_done(50);
        Ok(image)
    }

    async fn resolve(&self, name: &str) -> Result<String> {
        let s = self.call(format!("resolve {name}"))?;
        if let Some(e) = s.pull_error.clone() {
            return Err(RuntimeError::Failed {
                op: "resolve",
                id: name.to_string(),
                message: format!("registry: {e}"),
            });
        }
        s.remote
            .get(name)
            .map(|i| i.digest.clone())
            .ok_or_else(|| RuntimeError::Failed {
                op: "resolve",
                id: name.to_string(),
                message: "registry: manifest unknown".into(),
            })
    }
}
