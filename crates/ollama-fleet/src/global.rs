//! Options every subcommand accepts (before or after its name), each with an env fallback.

use anyhow::Context as _;
use fleet_store::etcd::{EtcdConfig, EtcdStore};

/// How to reach etcd, and logging.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Global options (etcd, logging)")]
pub struct Global {
    /// etcd client URLs, comma separated.
    #[arg(
        long,
        global = true,
        env = "OLLAMA_FLEET_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of everything ollama-fleet stores in etcd.
    #[arg(long, global = true, env = "OLLAMA_FLEET_ETCD_PREFIX", default_value = fleet_store::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// CA certificate (PEM) that signed etcd's certificate.
    #[arg(
        long,
        global = true,
        env = "OLLAMA_FLEET_ETCD_CACERT",
        value_name = "FILE"
    )]
    pub etcd_cacert: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for etcd's mutual TLS (with --etcd-key).
    #[arg(
        long,
        global = true,
        env = "OLLAMA_FLEET_ETCD_CERT",
        value_name = "FILE",
        requires = "etcd_key"
    )]
    pub etcd_cert: Option<std::path::PathBuf>,
    /// Client key (PEM) for etcd's mutual TLS (with --etcd-cert).
    #[arg(
        long,
        global = true,
        env = "OLLAMA_FLEET_ETCD_KEY",
        value_name = "FILE",
        requires = "etcd_cert"
    )]
    pub etcd_key: Option<std::path::PathBuf>,
    /// etcd user; the password comes from OLLAMA_FLEET_ETCD_PASSWORD.
    #[arg(long, global = true, env = "OLLAMA_FLEET_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// Log format: text or json (the level comes from RUST_LOG, default info).
    #[arg(long, global = true, env = "OLLAMA_FLEET_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl Global {
    /// The etcd connection settings.
    pub fn etcd_config(&self) -> anyhow::Result<EtcdConfig> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
        };
        let auth = match &self.etcd_user {
            Some(user) => {
                let password = std::env::var("OLLAMA_FLEET_ETCD_PASSWORD")
                    .context("--etcd-user needs the password in OLLAMA_FLEET_ETCD_PASSWORD")?;
                if let Some(plain) = self
                    .etcd_endpoints
                    .iter()
                    .find(|e| !e.starts_with("https://"))
                {
                    anyhow::bail!(
                        "refusing to send the etcd password in clear text to {plain}: use https:// endpoints (with --etcd-cacert), or client certificates (--etcd-cert, --etcd-key)"
                    );
                }
                Some((user.clone(), password))
            }
            None => None,
        };
        Ok(EtcdConfig {
            endpoints: self.etcd_endpoints.clone(),
            auth,
            ca_pem: self.etcd_cacert.as_deref().map(read).transpose()?,
            identity_pem: match (&self.etcd_cert, &self.etcd_key) {
                (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                _ => None,
            },
        })
    }

    /// Whether etcd is reached without authentication (no client certificate, no user): then,
    /// unless etcd itself refuses anonymous clients, anyone who can reach it can write fleets
    /// that agents run.
    pub fn etcd_is_open(&self) -> bool {
        self.etcd_user.is_none() && self.etcd_cert.is_none()
    }

    /// Connects to etcd once (for the CLI commands).
    pub async fn store(&self) -> anyhow::Result<EtcdStore> {
        Ok(EtcdStore::connect_to_live(&self.etcd_config()?, &self.etcd_prefix).await?)
    }

    /// An error for people: trouble reaching etcd becomes one line that names the endpoints,
    /// the cause and what to do.
    pub fn explain(&self, e: &anyhow::Error) -> String {
        match e.downcast_ref::<fleet_store::StoreError>() {
            Some(fleet_store::StoreError::Unavailable(cause)) => format!(
                "cannot reach etcd at {}: {cause}; check that etcd runs there and that --etcd-endpoints (OLLAMA_FLEET_ETCD_ENDPOINTS) and the TLS/user flags are right",
                self.etcd_endpoints.join(",")
            ),
            _ => format!("{e:#}"),
        }
    }

    /// Sets up logging to stderr.
    pub fn init_logging(&self) {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        if self.log_format == "json" {
            builder.json().init();
        } else {
            builder.init();
        }
    }
}

/// The agent's state directory on a node: the agent's `--state-dir`, and where `logs` reads.
#[derive(Debug, Clone, clap::Args)]
pub struct StateDir {
    /// The agent's state directory on this node (instance logs are in STATE_DIR/logs; `logs`
    /// must be given the agent's; the fleets the node last saw, for a start while etcd is
    /// away, in STATE_DIR/fleets.json).
    #[arg(
        long = "state-dir",
        env = "OLLAMA_FLEET_STATE_DIR",
        default_value = "/var/lib/ollama-fleet"
    )]
    pub path: std::path::PathBuf,
}

impl StateDir {
    /// STATE_DIR/logs: one log file per instance.
    pub fn logs(&self) -> std::path::PathBuf {
        self.path.join("logs")
    }

    /// STATE_DIR/fleets.json: the fleets this node last saw (a cache; see `fleet_agent::recall`).
    pub fn recall(&self) -> std::path::PathBuf {
        self.path.join("fleets.json")
    }
}
