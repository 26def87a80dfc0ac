//! The containerd implementation of [`Runtime`], over containerd's gRPC API (works with
//! containerd 1.6, 1.7 and 2.x).
//!
//! The channel connects lazily and reconnects by itself, so the agent can start before
//! containerd and survive its restarts; shims keep tasks running meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::container::Runtime as ContainerRuntime;
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateRequest as CreateLeaseRequest, CreateTaskRequest,
    DeleteContainerRequest, DeleteRequest as DeleteLeaseRequest, DeleteTaskRequest,
    GetImageRequest, GetRequest, KillRequest, ListContainersRequest, ListTasksRequest,
    ReadContentRequest, StartRequest, SubscribeRequest, WaitRequest,
};
use containerd_client::types::v1::Status as ProcessStatus;
use futures::StreamExt;
use futures::stream::BoxStream;
use prost::Message;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::{
    ContainerSpec, ImageInfo, Observed, Result, Runtime, RuntimeError, RuntimeEvent, TaskState,
    image, spec,
};

const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

/// The largest list answer taken from containerd (gRPC's default is 4 MiB; containerd sends up
/// to 16 MiB): a task list of thousands, or a container list where `ListStream` is missing.
const MAX_LIST_BYTES: usize = 64 << 20;

/// The runc shim's options (containerd's `containerd.runc.v1.Options`); only the binary name
/// is set, to run e.g. `crun` under the runc shim.
#[derive(Clone, PartialEq, prost::Message)]
struct RuncOptions {
    #[prost(string, tag = "6")]
    binary_name: String,
}

/// containerd, scoped to one namespace.
#[derive(Clone, Debug)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
    snapshotter: String,
    log_dir: PathBuf,
    registry: crate::registry::RegistryOptions,
}

fn unavailable(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Unavailable(e.to_string())
}

/// Maps a gRPC status to the runtime's errors.
fn map_status(op: &'static str, id: &str, s: Status) -> RuntimeError {
    match s.code() {
        Code::NotFound => RuntimeError::NotFound(id.to_string()),
        Code::AlreadyExists => RuntimeError::AlreadyExists(id.to_string()),
        Code::Unavailable => RuntimeError::Unavailable(s.message().to_string()),
        _ => RuntimeError::Failed {
            op,
            id: id.to_string(),
            message: s.message().to_string(),
        },
    }
}

fn to_system_time(t: Option<prost_types::Timestamp>) -> Option<SystemTime> {
    let t = t?;
    let secs = u64::try_from(t.seconds).ok()?;
    if secs == 0 {
        return None;
    }
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, u32::try_from(t.nanos).unwrap_or(0)))
}

impl Containerd {
    /// A client for the containerd at `socket`, using `namespace` and the overlayfs
    /// snapshotter; task output goes to `log_dir/<id>.log`. Connects on first use.
    pub fn new(
        socket: impl AsRef<Path>,
        namespace: &str,
        log_dir: impl Into<PathBuf>,
    ) -> Result<Containerd> {
        let path = socket.as_ref().to_path_buf();
        let channel = Endpoint::try_from("http://[::]")
            .map_err(unavailable)?
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(UnixConnector(path));
        Ok(Containerd {
            channel,
            namespace: namespace.to_string(),
            snapshotter: "overlayfs".into(),
            log_dir: log_dir.into(),
            registry: crate::registry::RegistryOptions::default(),
        })
    }

    /// The same client, pulling with these registry settings.
    pub fn with_registry(mut self, registry: crate::registry::RegistryOptions) -> Containerd {
        self.registry = registry;
        self
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The gRPC channel (cheap to clone).
    pub(crate) fn channel(&self) -> Channel {
        self.channel.clone()
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        if let Ok(ns) = self.namespace.parse() {
            req.metadata_mut().insert("containerd-namespace", ns);
        }
        req
    }

    /// Our containers (those with a fleet label), one per message through `ListStream`: a
    /// single `List` answer holds every container's OCI spec (about 6 KB each), which passes
    /// gRPC's 4 MiB default near 700 containers and containerd's 16 MiB send limit near 2,700.
    /// Falls back to `List` where `ListStream` is not implemented.
    async fn list_containers(&self) -> Result<Vec<Container>> {
        let filter = ListContainersRequest {
            filters: vec![format!("labels.\"{}\"", fleet_api::LABEL_FLEET)],
        };
        let failed = |s: Status| map_status("list containers", &self.namespace, s);
        let mut client =
            ContainersClient::new(self.channel.clone()).max_decoding_message_size(MAX_LIST_BYTES);
        let mut stream = match client.list_stream(self.req(filter.clone())).await {
            Ok(stream) => stream.into_inner(),
            Err(s) if s.code() == Code::Unimplemented => {
                return Ok(client
                    .list(self.req(filter))
                    .await
                    .map_err(failed)?
                    .into_inner()
                    .containers);
            }
            Err(s) => return Err(failed(s)),
        };
        let mut list = Vec::new();
        while let Some(message) = stream.message().await.map_err(failed)? {
            list.extend(message.container);
        }
        Ok(list)
    }

    fn req_leased<T>(&self, msg: T, lease: &str) -> Request<T> {
        let mut req = self.req(msg);
        if let Ok(l) = lease.parse() {
            req.metadata_mut().insert("containerd-lease", l);
        }
        req
    }

    /// Reads a whole blob from the content store.
    async fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let mut client = ContentClient::new(self.channel.clone());
        let mut stream = client
            .read(self.req(ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(|s| map_status("read content", digest, s))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend(
                chunk
                    .map_err(|s| map_status("read content", digest, s))?
                    .data,
            );
        }
        Ok(out)
    }

    async fn read_json(&self, digest: &str) -> Result<serde_json::Value> {
        let bytes = self.read_blob(digest).await?;
        serde_json::from_slice(&bytes).map_err(|e| RuntimeError::Failed {
            op: "parse",
            id: digest.to_string(),
            message: e.to_string(),
        })
    }

    async fn delete_task(&self, id: &str) -> Result<Option<u32>> {
        let mut tasks = TasksClient::new(self.channel.clone());
        match tasks
            .delete(self.req(DeleteTaskRequest {
                container_id: id.to_string(),
            }))
            .await
        {
            Ok(resp) => Ok(Some(resp.into_inner().exit_status)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(map_status("delete task", id, s)),
        }
    }
}

/// Connects to containerd's unix socket (tonic wants a tower service).
#[derive(Clone)]
struct UnixConnector(PathBuf);

impl tower_service::Service<tonic::transport::Uri> for UnixConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::transport::Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move {
            Ok(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(path).await?,
            ))
        })
    }
}

#[async_trait::async_trait]
impl Runtime for Containerd {
    async fn version(&self) -> Result<String> {
        let mut client = VersionClient::new(self.channel.clone());
        let v = client
            .version(())
            .await
            .map_err(|s| map_status("version", "containerd", s))?
            .into_inner();
        Ok(format!("containerd {}", v.version))
    }

    async fn image(&self, name: &str) -> Result<Option<ImageInfo>> {
        let mut images = ImagesClient::new(self.channel.clone());
        let image = match images
            .get(self.req(GetImageRequest {
                name: name.to_string(),
            }))
            .await
        {
            Ok(resp) => resp.into_inner().image,
            Err(s) if s.code() == Code::NotFound => return Ok(None),
            Err(s) => return Err(map_status("get image", name, s)),
        };
        let Some(target) = image.and_then(|i| i.target) else {
            return Ok(None);
        };
        let mut manifest_digest = target.digest.clone();
        let mut doc = self.read_json(&manifest_digest).await?;
        let media = doc["mediaType"]
            .as_str()
            .unwrap_or(&target.media_type)
            .to_string();
        if image::is_index(&media) || doc["manifests"].is_array() {
            manifest_digest =
                image::pick_manifest(&doc, "amd64").ok_or_else(|| RuntimeError::Failed {
                    op: "image",
                    id: name.to_string(),
                    message: "no linux/amd64 manifest in the image index".into(),
                })?;
            doc = self.read_json(&manifest_digest).await?;
        }
        let config_digest = image::config_digest(&doc).ok_or_else(|| RuntimeError::Failed {
            op: "image",
            id: name.to_string(),
            message: "manifest has no config".into(),
        })?;
        let (config, diff_ids) = image::parse_config(&self.read_json(&config_digest).await?);
        let chain_id = image::chain_id(&diff_ids).ok_or_else(|| RuntimeError::Failed {
            op: "image",
            id: name.to_string(),
            message: "image has no layers".into(),
        })?;
        let mut snapshots = SnapshotsClient::new(self.channel.clone());
        let stat = snapshots
            .stat(self.req(StatSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: chain_id.clone(),
            }))
            .await;
        if let Err(s) = stat {
            return Err(if s.code() == Code::NotFound {
                RuntimeError::Failed {
                    op: "image",
                    id: name.to_string(),
                    message: format!(
                        "image is not unpacked for the {} snapshotter",
                        self.snapshotter
                    ),
                }
            } else {
                map_status("stat snapshot", &chain_id, s)
            });
        }
        Ok(Some(ImageInfo {
            name: name.to_string(),
            digest: target.digest,
            chain_id,
            config,
        }))
    }

    async fn create(&self, c: &ContainerSpec) -> Result<()> {
        // A lease keeps the new snapshot from being garbage collected before the container
        // that references it exists.
        let mut leases = LeasesClient::new(self.channel.clone());
        let expire =
            humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600))
                .to_string();
        let lease = leases
            .create(self.req(CreateLeaseRequest {
                id: format!("ollama-fleet-create-{}", c.id),
                labels: HashMap::from([("containerd.io/gc.expire".to_string(), expire)]),
            }))
            .await
            .map_err(|s| map_status("create lease", &c.id, s))?
            .into_inner()
            .lease
            .map(|l| l.id)
            .unwrap_or_default();
        let result = self.create_leased(c, &lease).await;
        let _ = leases
            .delete(self.req(DeleteLeaseRequest {
                id: lease,
                sync: false,
            }))
            .await;
        result
    }

    async fn start(&self, id: &str) -> Result<u32> {
        let mut snapshots = SnapshotsClient::new(self.channel.clone());
        let mounts = snapshots
            .mounts(self.req(MountsRequest {
                snapshotter: self.snapshotter.clone(),
                key: id.to_string(),
            }))
            .await
            .map_err(|s| map_status("snapshot mounts", id, s))?
            .into_inner()
            .mounts;
        tokio::fs::create_dir_all(&self.log_dir)
            .await
            .map_err(|e| RuntimeError::Failed {
                op: "create log dir",
                id: id.to_string(),
                message: e.to_string(),
            })?;
        let log = format!("file://{}", self.log_path(id).display());
        let mut tasks = TasksClient::new(self.channel.clone());
        let request = CreateTaskRequest {
            container_id: id.to_string(),
            rootfs: mounts,
            stdout: log.clone(),
            stderr: log,
            ..Default::default()
        };
        match tasks.create(self.req(request.clone())).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {
                // A stopped task from an earlier run: delete it and create afresh.
                self.delete_task(id).await?;
                tasks
                    .create(self.req(request))
                    .await
                    .map_err(|s| map_status("create task", id, s))?;
            }
            Err(s) => return Err(map_status("create task", id, s)),
        }
        let pid = tasks
            .start(self.req(StartRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await
            .map_err(|s| map_status("start task", id, s))?
            .into_inner()
            .pid;
        Ok(pid)
    }

    async fn kill(&self, id: &str, signal: u32) -> Result<()> {
        let mut tasks = TasksClient::new(self.channel.clone());
        tasks
            .kill(self.req(KillRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
                signal,
                all: true,
            }))
            .await
            .map(|_| ())
            .map_err(|s| map_status("kill", id, s))
    }

    async fn remove(&self, id: &str) -> Result<Option<u32>> {
        let exit = match self.delete_task(id).await {
            Ok(exit) => exit,
            Err(RuntimeError::Failed { .. }) => {
                // Still running: kill it, then delete.
                let _ = self.kill(id, crate::SIGKILL).await;
                let mut exit = None;
                for _ in 0..100 {
                    match self.delete_task(id).await {
                        Ok(e) => {
                            exit = e;
                            break;
                        }
                        Err(RuntimeError::Failed { .. }) => {
                            tokio::time::sleep(Duration::from_millis(50)).await
                        }
                        Err(e) => return Err(e),
                    }
                }
                exit
            }
            Err(e) => return Err(e),
        };
        let mut containers = ContainersClient::new(self.channel.clone());
        match containers
            .delete(self.req(DeleteContainerRequest { id: id.to_string() }))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(map_status("delete container", id, s)),
        }
        let mut snapshots = SnapshotsClient::new(self.channel.clone());
        match snapshots
            .remove(self.req(RemoveSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: id.to_string(),
            }))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(map_status("remove snapshot", id, s)),
        }
        Ok(exit)
    }

    async fn list(&self) -> Result<Vec<Observed>> {
        let list = self.list_containers().await?;
        let mut tasks =
            TasksClient::new(self.channel.clone()).max_decoding_message_size(MAX_LIST_BYTES);
        let procs: HashMap<String, containerd_client::types::v1::Process> = tasks
            .list(self.req(ListTasksRequest {
                filter: String::new(),
            }))
            .await
            .map_err(|s| map_status("list tasks", &self.namespace, s))?
            .into_inner()
            .tasks
            .into_iter()
            // containerd 1.6 puts the container ID in `id` and leaves `container_id` empty.
            .map(|p| {
                let key = if p.container_id.is_empty() {
                    p.id.clone()
                } else {
                    p.container_id.clone()
                };
                (key, p)
            })
            .collect();
        Ok(list
            .into_iter()
            .filter(|c| c.labels.contains_key(fleet_api::LABEL_FLEET))
            .map(|c| {
                let proc = procs.get(&c.id);
                let state = proc.map_or(TaskState::NoTask, |p| task_state(p.status));
                Observed {
                    labels: c.labels.into_iter().collect::<BTreeMap<_, _>>(),
                    state,
                    pid: proc.map_or(0, |p| p.pid),
                    exit_code: proc
                        .filter(|_| state == TaskState::Stopped)
                        .map(|p| p.exit_status),
                    exited_at: proc
                        .filter(|_| state == TaskState::Stopped)
                        .and_then(|p| to_system_time(p.exited_at)),
                    id: c.id,
                }
            })
            .collect())
    }

    /// SIGTERM, then SIGKILL after `grace`: waits on containerd's `Wait` (which answers when the
    /// task exits) rather than polling its state.
    async fn stop(&self, id: &str, grace: Duration) -> Result<()> {
        match self.kill(id, crate::SIGTERM).await {
            Ok(()) => {}
            Err(RuntimeError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
        if self.wait_exit(id, grace).await? {
            return Ok(());
        }
        match self.kill(id, crate::SIGKILL).await {
            Ok(()) | Err(RuntimeError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        if self.wait_exit(id, Duration::from_secs(10)).await? {
            return Ok(());
        }
        Err(RuntimeError::Failed {
            op: "stop",
            id: id.to_string(),
            message: "still running 10s after SIGKILL".into(),
        })
    }

    async fn state(&self, id: &str) -> Result<TaskState> {
        let mut tasks = TasksClient::new(self.channel.clone());
        match tasks
            .get(self.req(GetRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await
        {
            Ok(resp) => Ok(resp
                .into_inner()
                .process
                .map_or(TaskState::Unknown, |p| task_state(p.status))),
            Err(s) if s.code() == Code::NotFound => {
                let mut containers = ContainersClient::new(self.channel.clone());
                match containers
                    .get(
                        self.req(containerd_client::services::v1::GetContainerRequest {
                            id: id.to_string(),
                        }),
                    )
                    .await
                {
                    Ok(_) => Ok(TaskState::NoTask),
                    Err(s) => Err(map_status("get container", id, s)),
                }
            }
            Err(s) => Err(map_status("get task", id, s)),
        }
    }

    fn events(&self) -> BoxStream<'static, RuntimeEvent> {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let this = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                match this.subscribe().await {
                    Ok(mut stream) => {
                        delay = Duration::from_millis(100);
                        // The stream is live (our own sync event came through): anything
                        // before this moment is found by the relist that Resync triggers.
                        if tx.send(RuntimeEvent::Resync).await.is_err() {
                            return;
                        }
                        while let Some(Ok(envelope)) = stream.next().await {
                            if let Some(event) = decode_event(&envelope.topic, envelope.event)
                                && tx.send(event).await.is_err()
                            {
                                return;
                            }
                        }
                        tracing::warn!(namespace = %this.namespace, "containerd event stream ended; reconnecting");
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "containerd events unavailable; retrying")
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        });
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
            .boxed()
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.log_dir.join(format!("{id}.log"))
    }

    async fn pull(&self, name: &str, progress: &crate::PullProgress) -> Result<ImageInfo> {
        self.pull_with(name, &self.registry, progress).await
    }

    async fn resolve(&self, name: &str) -> Result<String> {
        crate::pull::resolve(name, &self.registry).await
    }
}

/// Topic of the event the agent publishes to itself to confirm its subscription is live.
const SYNC_TOPIC: &str = "/ollama-fleet/sync";

impl Containerd {
    /// Whether the task exits (or is gone) within `timeout`.
    async fn wait_exit(&self, id: &str, timeout: Duration) -> Result<bool> {
        let mut tasks = TasksClient::new(self.channel.clone());
        let request = self.req(WaitRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        });
        match tokio::time::timeout(timeout, tasks.wait(request)).await {
            Err(_) => Ok(false),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(s)) if s.code() == Code::NotFound => Ok(true),
            Ok(Err(s)) => Err(map_status("wait", id, s)),
        }
    }

    /// Subscribes to this namespace's task exits and OOM kills. containerd sends no response
    /// headers before the first event, so we publish a sync event of our own until it comes
    /// back through the stream: then the subscription is known to be live.
    async fn subscribe(&self) -> Result<tonic::Streaming<containerd_client::types::Envelope>> {
        let ns = &self.namespace;
        let filters = vec![
            format!("namespace=={ns},topic==\"/tasks/exit\""),
            format!("namespace=={ns},topic==\"/tasks/oom\""),
            format!("namespace=={ns},topic==\"{SYNC_TOPIC}\""),
        ];
        let mut client = EventsClient::new(self.channel.clone());
        let subscribe = client.subscribe(SubscribeRequest { filters });
        tokio::pin!(subscribe);
        let mut publisher = EventsClient::new(self.channel.clone());
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            tokio::select! {
                resp = &mut subscribe => break resp.map_err(|s| map_status("subscribe", ns, s))?.into_inner(),
                _ = tick.tick() => {
                    if tokio::time::Instant::now() > deadline {
                        return Err(RuntimeError::Unavailable("event subscription did not start".into()));
                    }
                    let sync = containerd_client::services::v1::PublishRequest {
                        topic: SYNC_TOPIC.into(),
                        event: Some(prost_types::Any { type_url: "ollama-fleet.io/Sync".into(), value: vec![] }),
                    };
                    publisher.publish(self.req(sync)).await.map_err(|s| map_status("publish", ns, s))?;
                }
            }
        };
        // Skip to our sync event (the first message is the one that opened the stream).
        while let Some(msg) = stream.next().await {
            let envelope = msg.map_err(|s| map_status("events", ns, s))?;
            if envelope.topic == SYNC_TOPIC {
                return Ok(stream);
            }
        }
        Err(RuntimeError::Unavailable("event stream closed".into()))
    }

    async fn create_leased(&self, c: &ContainerSpec, lease: &str) -> Result<()> {
        if let Err(why) = &c.security.user {
            return Err(RuntimeError::Failed {
                op: "choose the user",
                id: c.id.clone(),
                message: why.clone(),
            });
        }
        // Bind-mount sources are created when missing (like a hostPath DirectoryOrCreate),
        // owned by the instance's user so that a non-root instance can write its models there
        // (an existing directory is left as the operator made it).
        let (uid, gid) = c.security.user.clone().unwrap_or((0, 0));
        for m in &c.mounts {
            let failed = |e: std::io::Error| RuntimeError::Failed {
                op: "create mount source",
                id: m.source.display().to_string(),
                message: e.to_string(),
            };
            if tokio::fs::metadata(&m.source).await.is_ok() {
                continue;
            }
            tokio::fs::create_dir_all(&m.source).await.map_err(failed)?;
            if uid != 0 || gid != 0 {
                std::os::unix::fs::chown(&m.source, Some(uid), Some(gid)).map_err(failed)?;
            }
        }
        let mut snapshots = SnapshotsClient::new(self.channel.clone());
        match snapshots
            .prepare(self.req_leased(
                PrepareSnapshotRequest {
                    snapshotter: self.snapshotter.clone(),
                    key: c.id.clone(),
                    parent: c.image.chain_id.clone(),
                    labels: HashMap::new(),
                },
                lease,
            ))
            .await
        {
            Ok(_) => {}
            // Left over from an earlier attempt at the same ID: reuse it.
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => return Err(map_status("prepare snapshot", &c.id, s)),
        }
        let spec_json = serde_json::to_vec(&spec::build(c)).map_err(|e| RuntimeError::Failed {
            op: "build spec",
            id: c.id.clone(),
            message: e.to_string(),
        })?;
        let options = (!c.runtime_binary.is_empty()).then(|| prost_types::Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: RuncOptions {
                binary_name: c.runtime_binary.clone(),
            }
            .encode_to_vec(),
        });
        let container = Container {
            id: c.id.clone(),
            labels: c.labels.clone().into_iter().collect(),
            image: c.image.name.clone(),
            runtime: Some(ContainerRuntime {
                name: c.runtime.clone(),
                options,
            }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE_URL.into(),
                value: spec_json,
            }),
            snapshotter: self.snapshotter.clone(),
            snapshot_key: c.id.clone(),
            ..Default::default()
        };
        let mut containers = ContainersClient::new(self.channel.clone());
        containers
            .create(self.req_leased(
                CreateContainerRequest {
                    container: Some(container),
                },
                lease,
            ))
            .await
            .map_err(|s| map_status("create container", &c.id, s))?;
        Ok(())
    }
}

fn task_state(status: i32) -> TaskState {
    match ProcessStatus::try_from(status) {
        Ok(ProcessStatus::Created) => TaskState::Created,
        Ok(ProcessStatus::Running) => TaskState::Running,
        Ok(ProcessStatus::Stopped) => TaskState::Stopped,
        Ok(ProcessStatus::Paused | ProcessStatus::Pausing) => TaskState::Paused,
        _ => TaskState::Unknown,
    }
}

/// Decodes an exit (of a task's init process) or OOM event.
fn decode_event(topic: &str, any: Option<prost_types::Any>) -> Option<RuntimeEvent> {
    let any = any?;
    match topic {
        "/tasks/exit" => {
            let e = containerd_client::events::TaskExit::decode(any.value.as_slice()).ok()?;
            // Exits of exec'd processes carry their own ID; only the init process counts.
            (e.id == e.container_id || e.id.is_empty()).then(|| RuntimeEvent::Exit {
                id: e.container_id,
                code: e.exit_status,
                at: to_system_time(e.exited_at).unwrap_or_else(SystemTime::now),
            })
        }
        "/tasks/oom" => {
            let e = containerd_client::events::TaskOom::decode(any.value.as_slice()).ok()?;
            Some(RuntimeEvent::Oom { id: e.container_id })
        }
        _ => None,
    }
}
