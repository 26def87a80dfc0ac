//! The etcd implementation of [`Store`].
//!
//! Unary calls have a deadline; the watch re-lists after every gap (a reconnect, or a compaction
//! that removed the revision it was at) and sends the full set as [`FleetEvent::Resync`]. The
//! session's lease is kept alive by a background task that replaces it when it was lost.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::{
    Entry, Expect, FleetDoc, FleetEvent, InstanceEntry, Keys, Result, StatusChange, StatusOp,
    Store, StoreError, check_segment, status_batches,
};

/// Deadline of unary requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach etcd.
#[derive(Clone, Debug, Default)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// User and password for etcd auth.
    pub auth: Option<(String, String)>,
    /// CA certificate (PEM) to verify etcd's TLS certificate.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
}

/// The etcd store.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    keys: Keys,
    lease: Arc<AtomicI64>,
    generation: Arc<AtomicU64>,
    /// Whether the lease's grant or last keep-alive was answered.
    alive: Arc<AtomicBool>,
    keeper: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// The session's TTL in seconds (to grant a replacement lease).
    ttl: Arc<AtomicU64>,
    /// One lease replacement at a time.
    regrant: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// etcd's error, classified: a request etcd refuses for what it is (too large, invalid) is
/// [`StoreError::Invalid`] and says nothing about etcd's health; anything else means etcd is
/// unreachable or unwell.
fn unavailable(e: etcd_client::Error) -> StoreError {
    match &e {
        etcd_client::Error::GRpcStatus(s)
            if matches!(
                s.code(),
                tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
            ) =>
        {
            StoreError::Invalid(format!("request refused by etcd: {}", s.message()))
        }
        _ => StoreError::Unavailable(cause(&e)),
    }
}

/// What went wrong talking to etcd, in a few words (not a transport dump): the underlying
/// socket error when there is one, else what etcd's answer means.
pub fn cause(e: &etcd_client::Error) -> String {
    use std::error::Error as _;
    let status = match e {
        etcd_client::Error::GRpcStatus(s) => Some(s),
        _ => None,
    };
    // The deepest socket error, if any (refused, reset, timed out, no route...).
    let mut source: Option<&(dyn std::error::Error + 'static)> = match status {
        Some(s) => s.source(),
        None => e.source(),
    };
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
                std::io::ErrorKind::TimedOut => "the connection timed out".into(),
                std::io::ErrorKind::ConnectionReset => "the connection was reset".into(),
                _ => io.to_string().to_lowercase(),
            };
        }
        source = err.source();
    }
    let Some(s) = status else {
        return e.to_string();
    };
    let message = s.message();
    match s.code() {
        tonic::Code::Unauthenticated => format!("authentication failed ({message})"),
        tonic::Code::PermissionDenied => format!("permission denied ({message})"),
        tonic::Code::Unimplemented => {
            format!("the endpoint does not speak etcd's API ({message})")
        }
        tonic::Code::DeadlineExceeded => "no answer in time".into(),
        tonic::Code::Unavailable if message.contains("tcp connect error") => {
            "cannot connect".into()
        }
        _ if message.is_empty() => format!("{:?}", s.code()),
        _ => message.to_string(),
    }
}

async fn deadline<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(r) => r.map_err(unavailable),
        Err(_) => Err(StoreError::Unavailable(format!(
            "no answer to {what} within {REQUEST_TIMEOUT:?} (packets dropped, or etcd overloaded)"
        ))),
    }
}

impl EtcdStore {
    /// Connects for one short task (a CLI command): through the members that answer now, so a
    /// member that is down is not picked for the one request there is (the client's balancer
    /// does not retry elsewhere). Falls back to every endpoint when none answers (the error
    /// then says why).
    pub async fn connect_to_live(config: &EtcdConfig, prefix: &str) -> Result<EtcdStore> {
        if config.endpoints.len() > 1 {
            let probes = config.endpoints.iter().map(|ep| async move {
                let one = EtcdConfig {
                    endpoints: vec![ep.clone()],
                    ..config.clone()
                };
                let probe = async {
                    let s = EtcdStore::connect(&one, prefix).await.ok()?;
                    let mut c = s.client.clone();
                    c.status().await.ok().map(|_| ep.clone())
                };
                tokio::time::timeout(Duration::from_secs(2), probe)
                    .await
                    .ok()
                    .flatten()
            });
            let live: Vec<String> = futures::future::join_all(probes)
                .await
                .into_iter()
                .flatten()
                .collect();
            if !live.is_empty() {
                let config = EtcdConfig {
                    endpoints: live,
                    ..config.clone()
                };
                return EtcdStore::connect(&config, prefix).await;
            }
        }
        EtcdStore::connect(config, prefix).await
    }

    /// Connects to etcd; keys go under `prefix`.
    pub async fn connect(config: &EtcdConfig, prefix: &str) -> Result<EtcdStore> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some((user, password)) = &config.auth {
            options = options.with_user(user.clone(), password.clone());
        }
        if config.ca_pem.is_some() || config.identity_pem.is_some() {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &config.ca_pem {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &config.identity_pem {
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
        }
        let client = tokio::time::timeout(
            REQUEST_TIMEOUT,
            Client::connect(&config.endpoints, Some(options)),
        )
        .await
        .map_err(|_| {
            StoreError::Unavailable(format!(
                "no answer to connect within {REQUEST_TIMEOUT:?} (packets dropped?)"
            ))
        })?
        .map_err(|e| StoreError::Unavailable(cause(&e)))?;
        Ok(EtcdStore {
            client,
            keys: Keys::new(prefix),
            lease: Arc::new(AtomicI64::new(0)),
            generation: Arc::new(AtomicU64::new(0)),
            alive: Arc::new(AtomicBool::new(false)),
            keeper: Arc::new(Mutex::new(None)),
            ttl: Arc::new(AtomicU64::new(15)),
            regrant: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The current session lease's ID (0 without a session).
    pub fn lease_id(&self) -> i64 {
        self.lease.load(Ordering::SeqCst)
    }

    /// Compacts etcd's history up to the current revision (for tests of watch recovery).
    pub async fn compact_now(&self) -> Result<i64> {
        let mut c = self.client.clone();
        let rev = deadline("get", c.get(self.keys.fleets(), None))
            .await?
            .header()
            .map_or(0, |h| h.revision());
        deadline("compact", c.compact(rev, None)).await?;
        Ok(rev)
    }

    /// The keys under `prefix`: (key, value, mod_revision, create_revision), and the store's
    /// revision.
    #[allow(clippy::type_complexity)]
    async fn prefixed(&self, prefix: &str) -> Result<(Vec<(String, String, i64, i64)>, i64)> {
        let mut c = self.client.clone();
        let resp = deadline("get", c.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let kvs = resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                    kv.mod_revision(),
                    kv.create_revision(),
                )
            })
            .collect();
        Ok((kvs, revision))
    }

    async fn list_with_revision(&self) -> Result<(Vec<FleetDoc>, i64)> {
        let prefix = self.keys.fleets();
        let (kvs, rev) = self.prefixed(&prefix).await?;
        let docs = kvs
            .into_iter()
            .filter_map(|(k, value, revision, created)| {
                let name = k.strip_prefix(&prefix)?;
                (!name.is_empty() && !name.contains('/')).then(|| FleetDoc {
                    name: name.to_string(),
                    value,
                    revision,
                    created,
                })
            })
            .collect();
        Ok((docs, rev))
    }

    async fn put_leased(&self, key: String, value: &str) -> Result<()> {
        let lease = self.session_lease()?;
        let mut c = self.client.clone();
        let put = tokio::time::timeout(
            REQUEST_TIMEOUT,
            c.put(key, value, Some(PutOptions::new().with_lease(lease))),
        )
        .await;
        self.leased_outcome(lease, "put", put.map(|r| r.map(|_| ())))
            .await
    }

    /// The session's lease, or an error without a session.
    fn session_lease(&self) -> Result<i64> {
        match self.lease.load(Ordering::SeqCst) {
            0 => Err(StoreError::Unavailable(
                "no session: call start_session first".into(),
            )),
            lease => Ok(lease),
        }
    }

    /// The outcome of a write on `lease` (`Err(_)`: no answer in time).
    async fn leased_outcome(
        &self,
        lease: i64,
        what: &str,
        answer: Result<Result<(), etcd_client::Error>, tokio::time::error::Elapsed>,
    ) -> Result<()> {
        match answer {
            Ok(Ok(())) => Ok(()),
            // etcd no longer knows the lease (it expired while we could not reach etcd): replace
            // it now; the owner sees a new session generation and writes its keys again.
            Ok(Err(e)) if lease_gone(&e) => {
                tracing::warn!(
                    lease,
                    "etcd refused a write: the session's lease is gone; replacing it"
                );
                self.replace_lease(lease).await;
                Err(StoreError::Unavailable(format!("{what}: {e}")))
            }
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "{what}: no answer within {REQUEST_TIMEOUT:?}"
            ))),
        }
    }

    async fn grant(&self, ttl: Duration) -> Result<i64> {
        let mut c = self.client.clone();
        let secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(15);
        let id = deadline("lease grant", c.lease_grant(secs, None))
            .await?
            .id();
        self.lease.store(id, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.alive.store(true, Ordering::SeqCst);
        Ok(id)
    }

    /// Grants a new lease in place of `lost`, unless another caller already did. Returns once
    /// a lease is granted or etcd did not answer.
    async fn replace_lease(&self, lost: i64) {
        let _one_at_a_time = self.regrant.lock().await;
        if self.lease.load(Ordering::SeqCst) != lost {
            return;
        }
        let ttl = Duration::from_secs(self.ttl.load(Ordering::SeqCst).max(2));
        match self.grant(ttl).await {
            Ok(id) => tracing::info!(lost, lease = id, "new etcd lease granted"),
            Err(e) => tracing::warn!(error = %e, "cannot grant a new etcd lease yet"),
        }
    }

    /// Keeps the lease alive. However the news that etcd no longer knows it arrives (a
    /// keep-alive answered with TTL 0, a keep-alive stream ending in "lease not found", a write
    /// refused for it, or simply no confirmation for longer than the TTL, after which it cannot
    /// exist any more), a new one is granted as soon as etcd answers.
    async fn keep_alive(self, ttl: Duration) {
        let interval = ttl / 3;
        let mut confirmed = tokio::time::Instant::now();
        loop {
            let id = self.lease.load(Ordering::SeqCst);
            if confirmed.elapsed() > ttl {
                // Unconfirmed for a whole TTL: the lease has expired on etcd's side.
                self.replace_lease(id).await;
                if self.lease.load(Ordering::SeqCst) != id {
                    confirmed = tokio::time::Instant::now();
                    continue;
                }
            }
            let mut c = self.client.clone();
            match deadline("lease keep-alive", c.lease_keep_alive(id)).await {
                Ok((mut keeper, mut stream)) => loop {
                    if self.lease.load(Ordering::SeqCst) != id {
                        break; // replaced by a writer that was refused
                    }
                    if keeper.keep_alive().await.is_err() {
                        break;
                    }
                    match tokio::time::timeout(REQUEST_TIMEOUT.min(interval * 2), stream.message())
                        .await
                    {
                        Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                            self.alive.store(true, Ordering::SeqCst);
                            confirmed = tokio::time::Instant::now();
                        }
                        Ok(Ok(Some(_))) => {
                            tracing::warn!(lease = id, "etcd lease expired; granting a new one");
                            self.replace_lease(id).await;
                            break;
                        }
                        Ok(Err(e)) if lease_gone(&e) => {
                            tracing::warn!(
                                lease = id,
                                "etcd no longer knows the lease; granting a new one"
                            );
                            self.replace_lease(id).await;
                            break;
                        }
                        _ => break,
                    }
                    tokio::time::sleep(interval).await;
                },
                Err(e) => tracing::debug!(error = %e, "lease keep-alive not started"),
            }
            // Unanswered: the store is away until a keep-alive gets through again.
            if confirmed.elapsed() > interval * 2 {
                self.alive.store(false, Ordering::SeqCst);
            }
            tokio::time::sleep(Duration::from_millis(500).min(interval)).await;
        }
    }
}

/// Whether etcd's answer says the lease does not exist (any more).
fn lease_gone(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::NotFound || s.message().contains("lease not found")
        }
        other => other.to_string().contains("lease not found"),
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get_fleet(&self, name: &str) -> Result<Option<FleetDoc>> {
        let mut c = self.client.clone();
        let resp = deadline("get", c.get(self.keys.fleet(name), None)).await?;
        Ok(resp.kvs().first().map(|kv| FleetDoc {
            name: name.to_string(),
            value: String::from_utf8_lossy(kv.value()).into_owned(),
            revision: kv.mod_revision(),
            created: kv.create_revision(),
        }))
    }

    async fn list_fleets(&self) -> Result<Vec<FleetDoc>> {
        Ok(self.list_with_revision().await?.0)
    }

    async fn put_fleet(&self, name: &str, value: &str, expect: Expect) -> Result<i64> {
        check_segment("fleet", name)?;
        let key = self.keys.fleet(name);
        let compare = match expect {
            Expect::Absent => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            Expect::Revision(r) => Compare::mod_revision(key.clone(), CompareOp::Equal, r),
        };
        let txn =
            Txn::new()
                .when(vec![compare])
                .and_then(vec![TxnOp::put(key.clone(), value, None)]);
        let mut c = self.client.clone();
        let resp = deadline("txn", c.txn(txn)).await?;
        if !resp.succeeded() {
            return Err(StoreError::Conflict(key));
        }
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    async fn delete_fleet(&self, name: &str) -> Result<bool> {
        let mut c = self.client.clone();
        let resp = deadline("delete", c.delete(self.keys.fleet(name), None)).await?;
        Ok(resp.deleted() > 0)
    }

    fn watch_fleets(&self) -> BoxStream<'static, FleetEvent> {
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let this = self.clone();
        tokio::spawn(async move {
            let prefix = this.keys.fleets();
            let mut delay = Duration::from_millis(100);
            loop {
                let (docs, rev) = match this.list_with_revision().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(error = %e, "etcd list failed; retrying");
                        if tx.is_closed() {
                            return;
                        }
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                        continue;
                    }
                };
                if tx.send(FleetEvent::Resync(docs)).await.is_err() {
                    return;
                }
                let mut c = this.client.clone();
                let options = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1);
                let mut stream =
                    match deadline("watch", c.watch(prefix.clone(), Some(options))).await {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::debug!(error = %e, "etcd watch failed; retrying");
                            tokio::time::sleep(delay).await;
                            continue;
                        }
                    };
                delay = Duration::from_millis(100);
                loop {
                    let msg = match stream.message().await {
                        Ok(Some(m)) => m,
                        Ok(None) | Err(_) => break,
                    };
                    if msg.canceled() || msg.compact_revision() > 0 {
                        tracing::info!(
                            compact_revision = msg.compact_revision(),
                            "etcd watch canceled; re-listing"
                        );
                        break;
                    }
                    for event in msg.events() {
                        let Some(kv) = event.kv() else { continue };
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        let Some(name) = key
                            .strip_prefix(&prefix)
                            .filter(|n| !n.is_empty() && !n.contains('/'))
                        else {
                            continue;
                        };
                        let out = match event.event_type() {
                            EventType::Put => FleetEvent::Put(FleetDoc {
                                name: name.to_string(),
                                value: String::from_utf8_lossy(kv.value()).into_owned(),
                                revision: kv.mod_revision(),
                                created: kv.create_revision(),
                            }),
                            EventType::Delete => FleetEvent::Delete(name.to_string()),
                        };
                        if tx.send(out).await.is_err() {
                            return;
                        }
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tracing::warn!("etcd watch ended; re-listing");
                tokio::time::sleep(delay).await;
            }
        });
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
            .boxed()
    }

    async fn start_session(&self, ttl: Duration) -> Result<()> {
        self.ttl.store(ttl.as_secs().max(2), Ordering::SeqCst);
        self.grant(ttl).await?;
        let task = tokio::spawn(self.clone().keep_alive(ttl));
        let mut keeper = self.keeper.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = keeper.replace(task) {
            old.abort();
        }
        Ok(())
    }

    fn session_generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn session_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    async fn put_node(&self, node: &str, value: &str) -> Result<()> {
        check_segment("node", node)?;
        self.put_leased(format!("{}{node}", self.keys.nodes()), value)
            .await
    }

    async fn write_status(&self, fleet: &str, node: &str, change: &StatusChange) -> Result<()> {
        let batches = status_batches(&self.keys, fleet, node, change)?;
        let lease = self.session_lease()?;
        for batch in batches {
            let ops: Vec<TxnOp> = batch
                .into_iter()
                .map(|op| match op {
                    StatusOp::Put(k, v) => {
                        TxnOp::put(k, v, Some(PutOptions::new().with_lease(lease)))
                    }
                    StatusOp::Delete(k) => TxnOp::delete(k, None),
                })
                .collect();
            let mut c = self.client.clone();
            let answer = tokio::time::timeout(REQUEST_TIMEOUT, c.txn(Txn::new().and_then(ops)))
                .await
                .map(|r| r.map(|_| ()));
            self.leased_outcome(lease, "status txn", answer).await?;
        }
        Ok(())
    }

    async fn delete_status(&self, fleet: &str, node: &str) -> Result<()> {
        check_segment("fleet", fleet)?;
        check_segment("node", node)?;
        let mut c = self.client.clone();
        let txn = Txn::new().and_then(vec![
            TxnOp::delete(format!("{}{node}", self.keys.status(Some(fleet))), None),
            TxnOp::delete(
                self.keys.instances_of(fleet, node),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ),
        ]);
        deadline("delete", c.txn(txn)).await?;
        Ok(())
    }

    async fn list_status(&self, fleet: Option<&str>) -> Result<Vec<Entry>> {
        let (kvs, _) = self.prefixed(&self.keys.status(fleet)).await?;
        Ok(kvs
            .into_iter()
            .filter_map(|(k, value, _, _)| {
                let (fleet, node) = self.keys.parse_status(&k)?;
                Some(Entry { fleet, node, value })
            })
            .collect())
    }

    async fn list_instances(&self, fleet: Option<&str>) -> Result<Vec<InstanceEntry>> {
        let (kvs, _) = self.prefixed(&self.keys.instances(fleet)).await?;
        Ok(kvs
            .into_iter()
            .filter_map(|(k, value, _, _)| self.keys.parse_instance(&k, value))
            .collect())
    }

    async fn list_nodes(&self) -> Result<Vec<Entry>> {
        let prefix = self.keys.nodes();
        let (kvs, _) = self.prefixed(&prefix).await?;
        Ok(kvs
            .into_iter()
            .map(|(k, value, _, _)| Entry {
                fleet: String::new(),
                node: k[prefix.len()..].to_string(),
                value,
            })
            .collect())
    }

    async fn end_session(&self) -> Result<()> {
        if let Some(task) = self.keeper.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
        self.alive.store(false, Ordering::SeqCst);
        let lease = self.lease.swap(0, Ordering::SeqCst);
        if lease != 0 {
            let mut c = self.client.clone();
            deadline("lease revoke", c.lease_revoke(lease)).await?;
        }
        Ok(())
    }
}
