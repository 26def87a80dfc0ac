//! `ollama-fleet agent`: the node agent.
//!
//! With etcd (the default) fleets come from `<prefix>/fleets/` and status goes back to etcd.
//! With `--manifests DIR` (one node, no etcd) the directory is mirrored into an in-memory store,
//! so the very same loop runs; status is served on the HTTP endpoints.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use fleet_agent::controller::{Agent, AgentConfig};
use fleet_agent::gateway::{Gateway, GatewayConfig};
use fleet_runtime::containerd::Containerd;
use fleet_store::Store;
use fleet_store::etcd::EtcdStore;
use fleet_store::memory::MemoryStore;

use crate::apply::{apply_one, same_content};
use crate::global::Global;

/// Arguments of `agent`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// This node's name (default: the host name).
    #[arg(long, env = "OLLAMA_FLEET_NODE_NAME")]
    pub node_name: Option<String>,
    /// A node label matched by fleets' nodeSelector, KEY=VALUE; may be repeated.
    #[arg(
        long = "label",
        value_name = "KEY=VALUE",
        env = "OLLAMA_FLEET_NODE_LABELS",
        value_delimiter = ','
    )]
    pub labels: Vec<String>,
    /// containerd's socket.
    #[arg(
        long,
        env = "OLLAMA_FLEET_CONTAINERD_SOCKET",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub containerd_socket: PathBuf,
    /// containerd namespace of the instances.
    #[arg(long, env = "OLLAMA_FLEET_NAMESPACE", default_value = "ollama-fleet")]
    pub namespace: String,
    /// Address of the HTTP endpoints (/healthz, /readyz, /metrics, /instances).
    #[arg(long, env = "OLLAMA_FLEET_LISTEN", default_value = "127.0.0.1:9477")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub state_dir: crate::global::StateDir,
    /// CPU sockets of this node (default: detected from sysfs).
    #[arg(long, env = "OLLAMA_FLEET_SOCKETS")]
    pub sockets: Option<u32>,
    /// Read fleets from the YAML/JSON files in this directory instead of etcd (single node,
    /// no etcd needed); re-read when they change.
    #[arg(long, env = "OLLAMA_FLEET_MANIFESTS", value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// Container operations at once.
    #[arg(long, env = "OLLAMA_FLEET_CONCURRENCY", default_value_t = 16)]
    pub concurrency: usize,
    /// cgroup parent of the instances (default /ollama-fleet/NAMESPACE).
    #[arg(long, env = "OLLAMA_FLEET_CGROUP_PARENT")]
    pub cgroup_parent: Option<String>,
    /// Docker-style credentials for registries (default: $DOCKER_CONFIG/config.json, else
    /// ~/.docker/config.json, when present).
    #[arg(long, env = "OLLAMA_FLEET_REGISTRY_CONFIG", value_name = "FILE")]
    pub registry_config: Option<PathBuf>,
    /// A registry spoken to over plain HTTP, HOST:PORT; may be repeated. No other registry is.
    #[arg(
        long = "insecure-registry",
        value_name = "HOST:PORT",
        env = "OLLAMA_FLEET_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,
    /// Pull REG's images from a mirror, REG=URL (e.g. docker.io=http://127.0.0.1:5000); may be
    /// repeated. An http:// mirror is spoken to over plain HTTP.
    #[arg(
        long = "registry-mirror",
        value_name = "REG=URL",
        env = "OLLAMA_FLEET_REGISTRY_MIRRORS",
        value_delimiter = ','
    )]
    pub registry_mirrors: Vec<String>,
    /// How often the tags of `imagePullPolicy: Always` images are re-resolved.
    #[arg(long, env = "OLLAMA_FLEET_IMAGE_REFRESH", value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub image_refresh: std::time::Duration,
    /// Instance logs (STATE_DIR/logs/ID.log) larger than this are rotated to ID.log.1; logs of
    /// instances gone for a day are deleted.
    #[arg(long, env = "OLLAMA_FLEET_LOG_MAX_SIZE", value_name = "QUANTITY", default_value = "10Mi", value_parser = parse_quantity)]
    pub log_max_size: u64,
    /// How often instance log sizes are checked.
    #[arg(long, env = "OLLAMA_FLEET_LOG_CHECK_INTERVAL", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub log_check_interval: std::time::Duration,
    /// A host directory under which fleets may put `models.hostPath` (mounted read-write into
    /// their instances); may be repeated. Default: /var/lib/ollama-fleet/models. A fleet that
    /// asks for another path starts nothing here (condition Admitted=False,
    /// HostPathNotAllowed). Symlinks are resolved before comparing.
    #[arg(
        long = "allow-host-path",
        value_name = "PREFIX",
        env = "OLLAMA_FLEET_ALLOW_HOST_PATHS",
        value_delimiter = ','
    )]
    pub allow_host_paths: Vec<String>,
    /// An OCI runtime fleets may choose with `runtime.binaryName` (for the runc shim), NAME or
    /// NAME=BINARY (e.g. crun=/usr/bin/crun), or another containerd shim by its full name
    /// (io.containerd.kata.v2); may be repeated. Default: runc only. The list replaces the
    /// default: name runc too (`--allow-runtime runc,crun=/usr/bin/crun`) to keep fleets on
    /// the default runtime (the agent warns at start when runc is missing). A fleet asking for
    /// another starts nothing here (RuntimeNotAllowed, logged once).
    #[arg(
        long = "allow-runtime",
        value_name = "NAME[=BINARY]",
        env = "OLLAMA_FLEET_ALLOW_RUNTIMES",
        value_delimiter = ','
    )]
    pub allow_runtimes: Vec<String>,
    /// Memory limit of instances whose fleet sets no `resources.memory` ("none": unlimited).
    /// Only fleets that set it are counted against the node's memory at admission.
    #[arg(long, env = "OLLAMA_FLEET_DEFAULT_MEMORY", value_name = "QUANTITY", default_value = "8Gi", value_parser = parse_optional_quantity)]
    pub default_memory: std::option::Option<u64>,
    /// CPU quota, in cores, of instances whose fleet sets no `resources.cpus` (default: none).
    #[arg(long, env = "OLLAMA_FLEET_DEFAULT_CPUS", value_name = "CORES")]
    pub default_cpus: Option<f64>,
    /// pids limit of instances whose fleet sets no `resources.pids` (instances are always
    /// limited).
    #[arg(long, env = "OLLAMA_FLEET_DEFAULT_PIDS", value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub default_pids: u64,
    /// Memory kept for the system (agent, containerd, shims, etcd): fleets that set
    /// `resources.memory` are admitted while their instances fit in the rest.
    #[arg(long, env = "OLLAMA_FLEET_RESERVED_MEMORY", value_name = "QUANTITY", default_value = "1Gi", value_parser = parse_quantity)]
    pub reserved_memory: u64,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// The node gateway (off unless `--serve`).
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Gateway (an Ollama-compatible API for the node's fleets)")]
pub struct ServeArgs {
    /// Serve an Ollama-compatible API on ADDR (e.g. 0.0.0.0:11400) for every fleet on this
    /// node: each request goes to a Ready instance with a free slot, waits in a queue
    /// otherwise; instances are drained before the agent stops them. When systemd passes a
    /// socket (ollama-fleet-agent.socket), the gateway serves on it instead, and the socket
    /// stays open across restarts.
    #[arg(long = "serve", env = "OLLAMA_FLEET_SERVE", value_name = "ADDR")]
    pub addr: Option<SocketAddr>,
    /// On SIGTERM the gateway stops accepting and lets the requests in flight finish (each
    /// streamed answer to its end) for at most this long before the agent exits; instances
    /// are not touched. Keep the unit's TimeoutStopSec above it. A second signal exits at once.
    #[arg(long = "drain-timeout", env = "OLLAMA_FLEET_DRAIN_TIMEOUT", value_name = "DURATION", default_value = "120s", value_parser = parse_duration)]
    pub drain_timeout: std::time::Duration,
    /// Requests waiting per fleet (model) at most; beyond: 503.
    #[arg(
        long = "serve-max-queue",
        env = "OLLAMA_FLEET_SERVE_MAX_QUEUE",
        value_name = "N",
        default_value_t = 512
    )]
    pub max_queue: usize,
    /// How long a request waits for a free instance at most; beyond: 503. Also how long one
    /// that arrives while the agent is starting (before it has probed the instances it adopts)
    /// waits for it.
    #[arg(long = "serve-queue-timeout", env = "OLLAMA_FLEET_SERVE_QUEUE_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub queue_timeout: std::time::Duration,
    /// A streamed answer with no first byte within this: the request is aborted (504, not
    /// sent elsewhere: the instance had it), and the instance counts a failure. Set it above
    /// the longest prompt evaluation you expect.
    #[arg(long = "serve-first-token-timeout", env = "OLLAMA_FLEET_SERVE_FIRST_TOKEN_TIMEOUT", value_name = "DURATION", default_value = "300s", value_parser = parse_duration)]
    pub first_token_timeout: std::time::Duration,
    /// An answer that comes whole (`stream: false`, the OpenAI default, embeddings) not there
    /// within this: the request is aborted (504). The instance is not blamed: it says nothing
    /// until it is done.
    #[arg(long = "serve-request-timeout", env = "OLLAMA_FLEET_SERVE_REQUEST_TIMEOUT", value_name = "DURATION", default_value = "30m", value_parser = parse_duration)]
    pub request_timeout: std::time::Duration,
    /// No response byte for this long: the request is aborted, and the instance counts a
    /// failure (probes.liveness.failureThreshold in a row replace it, reason Stalled).
    #[arg(long = "serve-stall-timeout", env = "OLLAMA_FLEET_SERVE_STALL_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub stall_timeout: std::time::Duration,
    /// The keys file: named keys of tenants with their models, priority and limits (YAML, see
    /// README "Tenants"), or bearer tokens one per line; re-read when it changes. Every route
    /// but GET / then needs `Authorization: Bearer TOKEN`. Under systemd's LoadCredential,
    /// point it at `${CREDENTIALS_DIRECTORY}/NAME`.
    #[arg(
        long = "serve-token-file",
        env = "OLLAMA_FLEET_SERVE_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub token_file: Option<PathBuf>,
    /// The largest request body taken (Ki/Mi/Gi); beyond: 413.
    #[arg(long = "serve-max-body", env = "OLLAMA_FLEET_SERVE_MAX_BODY", value_name = "BYTES", default_value = "64Mi", value_parser = parse_quantity)]
    pub max_body: u64,
    /// Request body bytes the gateway holds at once, node-wide (read, queued, being sent);
    /// beyond: 503 with Retry-After. Bounds the agent's memory whatever clients send.
    #[arg(long = "serve-body-budget", env = "OLLAMA_FLEET_SERVE_BODY_BUDGET", value_name = "BYTES", default_value = "256Mi", value_parser = parse_quantity)]
    pub body_budget: u64,
    /// How long a request body may take to arrive; beyond: 408.
    #[arg(long = "serve-body-timeout", env = "OLLAMA_FLEET_SERVE_BODY_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub body_timeout: std::time::Duration,
    /// Origins of browser pages allowed to call, beyond Ollama's defaults (localhost, 127.0.0.1,
    /// 0.0.0.0 on any port; app, file, tauri, vscode pages; browser extensions), comma
    /// separated, `*` a wildcard: e.g. https://chat.example.com,https://*.corp. Pages of other
    /// origins get 403, as from Ollama with OLLAMA_ORIGINS.
    #[arg(
        long = "serve-allowed-origins",
        env = "OLLAMA_FLEET_SERVE_ALLOWED_ORIGINS",
        value_name = "ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,
    /// Free slots per model's pool kept from batch tenants' requests while interactive ones
    /// come (one within 10s): an editor's next request then finds a slot at once instead of
    /// waiting for a batch answer to end. 0: batch requests take every free slot.
    #[arg(
        long = "serve-batch-headroom",
        env = "OLLAMA_FLEET_SERVE_BATCH_HEADROOM",
        value_name = "SLOTS",
        default_value_t = 1
    )]
    pub batch_headroom: u32,
    /// Connections one client address may hold at once (beyond: only the health check). A
    /// proxy in front is one client: raise it above the proxy's connection count.
    #[arg(
        long = "serve-max-connections-per-client",
        env = "OLLAMA_FLEET_SERVE_MAX_CONNECTIONS_PER_CLIENT",
        value_name = "N",
        default_value_t = 256
    )]
    pub per_client: usize,
    /// Send a conversation's next turn to the instance that served the last one (its prompt
    /// cache holds the conversation), when that is free or frees sooner than evaluating the
    /// conversation elsewhere would take. Conversations are named by an X-Session-Id header,
    /// else by their leading messages (chat) or returned context (generate).
    #[arg(
        long = "serve-affinity",
        env = "OLLAMA_FLEET_SERVE_AFFINITY",
        value_name = "BOOL",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub affinity: bool,
}

fn parse_optional_quantity(s: &str) -> Result<Option<u64>, String> {
    if s == "none" {
        return Ok(None);
    }
    parse_quantity(s).map(Some)
}

/// The node's policy from the flags.
fn policy(args: &Args) -> anyhow::Result<fleet_agent::policy::Policy> {
    let mut policy = fleet_agent::policy::Policy::default();
    if !args.allow_host_paths.is_empty() {
        policy.host_paths.clear();
        for p in args.allow_host_paths.iter().map(|p| p.trim()) {
            anyhow::ensure!(
                fleet_api::is_normalised_path(p),
                "--allow-host-path {p:?} must be an absolute, normalised directory other than / (no '.', '..', '//' or trailing '/')"
            );
            policy.host_paths.push(p.to_string());
        }
    }
    if !args.allow_runtimes.is_empty() {
        policy.runtimes.clear();
        for r in args.allow_runtimes.iter().map(|r| r.trim()) {
            let (name, binary) = r.split_once('=').unwrap_or((r, ""));
            anyhow::ensure!(
                !name.is_empty() && !name.contains('/'),
                "--allow-runtime {r:?} must be NAME or NAME=BINARY, e.g. crun=/usr/bin/crun"
            );
            anyhow::ensure!(
                binary.is_empty() || binary.starts_with('/'),
                "--allow-runtime {r:?}: BINARY must be an absolute path"
            );
            policy.runtimes.insert(name.to_string(), binary.to_string());
        }
    }
    if let Some(c) = args.default_cpus {
        anyhow::ensure!(
            (0.01..=fleet_api::MAX_CPUS).contains(&c),
            "--default-cpus must be between 0.01 and {}",
            fleet_api::MAX_CPUS
        );
    }
    policy.defaults = fleet_agent::policy::Defaults {
        memory: args.default_memory,
        cpus: args.default_cpus,
        pids: args.default_pids,
    };
    policy.reserved_memory = args.reserved_memory;
    Ok(policy)
}

fn parse_quantity(s: &str) -> Result<u64, String> {
    fleet_api::Quantity::parse(s).map(fleet_api::Quantity::bytes)
}

/// Keeps the instance logs in bounds (see `fleet_runtime::logs::tend`), checking every `every`.
async fn tend_logs(
    runtime: Arc<Containerd>,
    dir: std::path::PathBuf,
    max_bytes: u64,
    every: Duration,
) {
    loop {
        tokio::time::sleep(every).await;
        let Ok(list) = fleet_runtime::Runtime::list(&*runtime).await else {
            continue;
        };
        let live: std::collections::HashSet<String> = list.into_iter().map(|o| o.id).collect();
        let dir = dir.clone();
        let tended = tokio::task::spawn_blocking(move || {
            fleet_runtime::logs::tend(&dir, max_bytes, &live, Duration::from_secs(86_400))
        })
        .await;
        match tended {
            Ok(Ok(t)) if t != fleet_runtime::logs::Tended::default() => {
                tracing::info!(
                    rotated = t.rotated,
                    deleted = t.deleted,
                    "instance logs tended"
                );
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot tend the instance logs"),
            _ => {}
        }
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    fleet_api::Duration::parse(s).map(fleet_api::Duration::std)
}

/// The registry settings from the flags.
fn registry_options(args: &Args) -> anyhow::Result<fleet_runtime::registry::RegistryOptions> {
    let mut opts = fleet_runtime::registry::RegistryOptions {
        insecure: args
            .insecure_registries
            .iter()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .collect(),
        ..Default::default()
    };
    for m in &args.registry_mirrors {
        let (reg, url) = m.split_once('=').with_context(|| {
            format!(
                "--registry-mirror {m:?} must be REGISTRY=URL, e.g. docker.io=http://127.0.0.1:5000"
            )
        })?;
        opts.mirrors
            .insert(reg.trim().to_string(), url.trim().to_string());
    }
    let explicit = args.registry_config.clone();
    let candidates: Vec<PathBuf> = match &explicit {
        Some(p) => vec![p.clone()],
        None => [
            std::env::var_os("DOCKER_CONFIG").map(|d| PathBuf::from(d).join("config.json")),
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json")),
        ]
        .into_iter()
        .flatten()
        .collect(),
    };
    for path in candidates {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                opts.auths = fleet_runtime::registry::parse_docker_config(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                tracing::info!(file = %path.display(), registries = opts.auths.len(), "registry credentials loaded");
                break;
            }
            Err(e) if explicit.is_some() => {
                anyhow::bail!("cannot read --registry-config {}: {e}", path.display())
            }
            Err(_) => {}
        }
    }
    Ok(opts)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The gateway's listening socket when systemd passed one (socket activation:
/// `ollama-fleet-agent.socket`), so that it stays open across the agent's restarts.
pub fn activated_socket() -> std::io::Result<Option<std::net::TcpListener>> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() > 1 {
        eprintln!(
            "warning: systemd passed {} sockets; the gateway serves on the first",
            fds.len()
        );
    }
    fds.take_tcp_listener(0)
}

/// Runs the agent until SIGTERM or SIGINT. `activated`: the gateway's socket from systemd.
pub async fn run(
    global: &Global,
    args: &Args,
    activated: std::io::Result<Option<std::net::TcpListener>>,
) -> anyhow::Result<ExitCode> {
    let activated = activated
        .context("the socket systemd passed (LISTEN_FDS) is not a TCP listening socket")?;
    let node = args.node_name.clone().unwrap_or_else(hostname);
    fleet_store::check_segment("node", &node)
        .map_err(|_| anyhow::anyhow!("--node-name {node:?} must not be empty or contain '/'"))?;
    let mut cfg = AgentConfig::new(&node, &args.namespace);
    for label in &args.labels {
        let (k, v) = label
            .split_once('=')
            .with_context(|| format!("--label {label:?} must be KEY=VALUE"))?;
        cfg.labels
            .insert(k.trim().to_string(), v.trim().to_string());
    }
    if let Some(s) = args.sockets {
        anyhow::ensure!(s > 0, "--sockets must be at least 1");
        cfg.sockets = s;
    }
    cfg.concurrency = args.concurrency.max(1);
    if let Some(p) = &args.cgroup_parent {
        cfg.cgroup_parent = p.clone();
    }
    cfg.image_refresh = args.image_refresh;
    cfg.policy = policy(args)?;
    let registry = registry_options(args)?;
    if !args.containerd_socket.exists() {
        tracing::warn!(socket = %args.containerd_socket.display(), "containerd socket not found yet; will keep trying (see --containerd-socket)");
    }
    let runtime = Arc::new(
        Containerd::new(
            &args.containerd_socket,
            &args.namespace,
            args.state_dir.logs(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_registry(registry),
    );
    tokio::spawn(tend_logs(
        runtime.clone(),
        args.state_dir.logs(),
        args.log_max_size,
        args.log_check_interval,
    ));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (see --listen)", args.listen))?;
    tracing::info!(node = %node, namespace = %args.namespace, sockets = cfg.sockets, listen = %args.listen,
        host_paths = ?cfg.policy.host_paths, runtimes = ?cfg.policy.runtimes.keys().collect::<Vec<_>>(), "agent starting");
    if !cfg.policy.runtimes.contains_key("runc") {
        tracing::warn!(runtimes = ?cfg.policy.runtimes.keys().collect::<Vec<_>>(),
            "--allow-runtime does not list runc: fleets on the default runtime (no spec.runtime.binaryName) will not start on this node; add --allow-runtime runc to keep them");
    }

    // SIGTERM or SIGINT: the loop ends, the gateway drains, the agent exits.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let gateway_socket = match activated {
        Some(socket) => {
            let addr = socket.local_addr()?;
            if args.serve.addr.is_some_and(|a| a != addr) {
                tracing::warn!(%addr, "--serve is ignored: the gateway serves on the socket systemd passed");
            }
            socket.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(socket)?;
            tracing::info!(%addr, "the gateway serves on the socket systemd passed: it stays open across restarts (connections wait instead of being refused)");
            Some((addr, listener))
        }
        None => match args.serve.addr {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot serve on {addr} (see --serve)"))?;
                Some((addr, listener))
            }
            None => None,
        },
    };
    let gateway = match gateway_socket {
        None => None,
        Some((addr, listener)) => {
            if let Some(f) = &args.serve.token_file {
                check_keys_file(f)?;
            }
            anyhow::ensure!(
                args.serve.body_budget >= args.serve.max_body,
                "--serve-body-budget ({}) must be at least --serve-max-body ({}): a body of the largest size could never be taken",
                args.serve.body_budget,
                args.serve.max_body
            );
            let gw = Gateway::new(GatewayConfig {
                max_queue: args.serve.max_queue,
                queue_timeout: args.serve.queue_timeout,
                start_wait: args.serve.queue_timeout,
                first_token_timeout: args.serve.first_token_timeout,
                request_timeout: args.serve.request_timeout,
                stall_timeout: args.serve.stall_timeout,
                token_file: args.serve.token_file.clone(),
                max_body: usize::try_from(args.serve.max_body).unwrap_or(usize::MAX),
                body_budget: usize::try_from(args.serve.body_budget).unwrap_or(usize::MAX),
                body_timeout: args.serve.body_timeout,
                allowed_origins: args.serve.allowed_origins.clone(),
                loopback: addr.ip().is_loopback(),
                affinity: args.serve.affinity,
                batch_headroom: args.serve.batch_headroom,
            });
            if args.serve.token_file.is_none() && !addr.ip().is_loopback() {
                tracing::warn!(%addr, "the gateway serves without tokens on a non-loopback address: anyone who reaches it can use the models (see --serve-token-file)");
            }
            tracing::info!(%addr, "serving the node's fleets");
            let router = fleet_agent::gateway::routes::router(&gw);
            // Every queued request holds a connection: room for the queue and more.
            let limits = fleet_agent::http::ServerLimits {
                max_connections: (args.serve.max_queue * 2).max(1024),
                per_client: args.serve.per_client.max(1),
                health_reserve: 32,
                ..Default::default()
            };
            let stop = stopping(&stop);
            let serving = tokio::spawn(async move {
                if let Err(e) = fleet_agent::http::serve_until(listener, router, limits, stop).await
                {
                    tracing::error!(error = %e, "gateway stopped");
                }
            });
            Some(Serving {
                gateway: gw,
                serving,
                drain_timeout: args.serve.drain_timeout,
            })
        }
    };

    match &args.manifests {
        Some(dir) => {
            anyhow::ensure!(
                dir.is_dir(),
                "--manifests {} is not a directory",
                dir.display()
            );
            let store = Arc::new(MemoryStore::new(&global.etcd_prefix));
            tokio::spawn(mirror_manifests(dir.clone(), store.clone()));
            serve(cfg, runtime, store, listener, gateway, stop).await
        }
        None => {
            cfg.recall = Some(args.state_dir.recall());
            let config = global.etcd_config()?;
            if global.etcd_is_open() {
                tracing::warn!(
                    endpoints = %global.etcd_endpoints.join(","),
                    "etcd is reached without TLS client certificates or a user: whoever can write to it can run containers on this node through a fleet; see SECURITY.md"
                );
            }
            let mut delay = Duration::from_millis(500);
            // A signal while etcd is not reached yet stops the agent (and the gateway) at once.
            let connect = async {
                loop {
                    match EtcdStore::connect(&config, &global.etcd_prefix).await {
                        Ok(s) => break s,
                        Err(e) => {
                            tracing::warn!(endpoints = %config.endpoints.join(","), error = %e, "cannot reach etcd yet; retrying (running instances are not touched)");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(10));
                        }
                    }
                }
            };
            let store = tokio::select! {
                store = connect => store,
                () = stopping(&stop) => {
                    if let Some(s) = gateway {
                        s.drain().await;
                    }
                    tracing::info!("agent stopped before etcd answered; its instances keep running");
                    return Ok(ExitCode::SUCCESS);
                }
            };
            serve(cfg, runtime, Arc::new(store), listener, gateway, stop).await
        }
    }
}

/// The node gateway, serving until the agent stops.
struct Serving {
    gateway: Arc<Gateway>,
    serving: tokio::task::JoinHandle<()>,
    drain_timeout: Duration,
}

impl Serving {
    /// Waits for the requests in flight to finish (the gateway has stopped accepting), at most
    /// the drain timeout or until a second signal.
    async fn drain(self) {
        tracing::info!(timeout = ?self.drain_timeout, "draining the gateway: the requests in flight finish, new connections are refused; instances are not touched");
        let started = std::time::Instant::now();
        let mut serving = self.serving;
        tokio::select! {
            _ = &mut serving => {
                tracing::info!(seconds = started.elapsed().as_secs_f64(), "gateway drained");
            }
            () = tokio::time::sleep(self.drain_timeout) => {
                serving.abort();
                tracing::warn!(timeout = ?self.drain_timeout, "the drain timed out: the requests still in flight are cut (see --drain-timeout)");
            }
            () = shutdown_signal() => {
                serving.abort();
                tracing::warn!("a second signal: exiting without waiting for the requests in flight");
            }
        }
    }
}

/// Completes once `stop` says so.
fn stopping(
    stop: &tokio::sync::watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut stop = stop.clone();
    async move {
        let _ = stop.wait_for(|s| *s).await;
    }
}

async fn serve<S: Store>(
    cfg: AgentConfig,
    runtime: Arc<Containerd>,
    store: Arc<S>,
    listener: tokio::net::TcpListener,
    gateway: Option<Serving>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<ExitCode> {
    let mut agent = Agent::new(cfg, runtime, store);
    let mut more: Vec<Arc<dyn fleet_agent::prom::Expose>> = Vec::new();
    if let Some(s) = &gateway {
        more.push(s.gateway.clone());
        agent = agent.with_gateway(s.gateway.clone());
    }
    let router = fleet_agent::http::router(agent.view(), more);
    tokio::spawn(async move {
        let limits = fleet_agent::http::ServerLimits::default();
        if let Err(e) = fleet_agent::http::serve(listener, router, limits).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    agent.run(stopping(&stop)).await;
    if let Some(s) = gateway {
        s.drain().await;
    }
    tracing::info!("agent stopped; its instances keep running");
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Mirrors the fleets in `dir` into `store`, re-reading every second. A file that cannot be
/// read leaves its fleets as they were; a fleet whose file is gone is deleted.
async fn mirror_manifests(dir: PathBuf, store: Arc<MemoryStore>) {
    let mut by_file: HashMap<PathBuf, Vec<String>> = HashMap::new();
    let mut reported: HashMap<PathBuf, String> = HashMap::new();
    loop {
        let mut wanted: BTreeMap<String, String> = BTreeMap::new();
        let scan_dir = dir.clone();
        let files = tokio::task::spawn_blocking(move || read_manifest_dir(&scan_dir))
            .await
            .unwrap_or_default();
        let present: Vec<PathBuf> = files.iter().map(|(f, _)| f.clone()).collect();
        for (file, read) in files {
            match read {
                Ok(fleets) => {
                    reported.remove(&file);
                    by_file.insert(
                        file.clone(),
                        fleets.iter().map(|(n, _)| n.clone()).collect(),
                    );
                    wanted.extend(fleets);
                }
                Err(e) => {
                    if reported.get(&file) != Some(&e) {
                        tracing::error!(file = %file.display(), error = %e, "cannot read manifest; its fleets are left as they were");
                        reported.insert(file.clone(), e);
                    }
                    // Keep what this file defined before.
                    for name in by_file.get(&file).cloned().unwrap_or_default() {
                        if let Ok(Some(doc)) = store.get_fleet(&name).await {
                            wanted.insert(name, doc.value);
                        }
                    }
                }
            }
        }
        by_file.retain(|f, _| present.contains(f));
        for (name, text) in &wanted {
            let unchanged = matches!(store.get_fleet(name).await, Ok(Some(doc)) if same_content(&doc.value, text));
            if !unchanged && let Err(e) = apply_one(&*store, name, text).await {
                tracing::error!(fleet = %name, error = %e, "cannot load fleet");
            }
        }
        for doc in store.list_fleets().await.unwrap_or_default() {
            if !wanted.contains_key(&doc.name) {
                let _ = store.delete_fleet(&doc.name).await;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Every manifest file of `dir` (`.yaml`, `.yml`, `.json`) in name order, with its fleets or
/// the reason it cannot be read. Blocking: file I/O.
fn read_manifest_dir(dir: &Path) -> Vec<(PathBuf, Result<FileFleets, String>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| {
        matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        )
    });
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let read = read_fleets(&f);
            (f, read)
        })
        .collect()
}

/// Fleets read from one file: (name, document text).
type FileFleets = Vec<(String, String)>;

/// The fleets of one file, as (name, document text). Documents are stored even when invalid
/// (the agent reports them), as long as they name a fleet.
fn read_fleets(path: &Path) -> Result<FileFleets, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let text = crate::input::read_bounded(file, &path.display().to_string())
        .map_err(|e| format!("{e:#}"))?;
    let docs = fleet_api::yaml::parse_stream(&text).map_err(|e| match e.pos {
        Some(p) => format!("{}:{}: {}", p.line, p.col, e.message),
        None => e.message,
    })?;
    docs.iter()
        .map(|doc| {
            let name = doc.to_json()["metadata"]["name"]
                .as_str()
                .map(str::to_string)
                .filter(|n| fleet_store::check_segment("fleet", n).is_ok())
                .ok_or_else(|| "a document without metadata.name".to_string())?;
            Ok((name, fleet_api::emit::to_yaml(doc)))
        })
        .collect()
}

/// Reads the keys file once at start: a mistake stops the agent with every error and where it
/// is (later mistakes keep the keys read before, and are logged).
fn check_keys_file(file: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("--serve-token-file {}: cannot read it", file.display()))?;
    if let Err(errors) = fleet_api::keys::parse_keys(&text) {
        let lines: Vec<String> = errors
            .iter()
            .map(|e| match e.pos {
                Some(p) => format!("{}:{p}: {e}", file.display()),
                None => format!("{}: {e}", file.display()),
            })
            .collect();
        anyhow::bail!("the keys file has mistakes:\n{}", lines.join("\n"));
    }
    Ok(())
}
