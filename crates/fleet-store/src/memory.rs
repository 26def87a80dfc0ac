//! An in-memory [`Store`] with etcd's semantics (revisions, compare-and-swap, watches, a
//! session whose keys vanish when it ends), for controller tests.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::broadcast;

use crate::{
    Entry, Expect, FleetDoc, FleetEvent, InstanceEntry, Keys, MAX_REQUEST_BYTES, Result,
    StatusChange, StatusOp, Store, StoreError, check_segment, status_batches,
};

#[derive(Debug, Clone)]
struct Value {
    text: String,
    mod_revision: i64,
    create_revision: i64,
    leased: bool,
}

#[derive(Debug, Default)]
struct Data {
    kv: BTreeMap<String, Value>,
    revision: i64,
    down: bool,
}

/// The in-memory store; clones with the same prefix share the data (like two clients of one
/// etcd), and [`MemoryStore::with_prefix`] gives a view under another prefix.
#[derive(Clone, Debug)]
pub struct MemoryStore {
    data: Arc<Mutex<Data>>,
    events: broadcast::Sender<(String, Option<FleetDoc>)>,
    keys: Keys,
    session: Arc<AtomicU64>,
    active: Arc<AtomicBool>,
    /// Every call first waits this long (milliseconds): etcd behind a network that drops packets.
    stall_ms: Arc<AtomicU64>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(crate::DEFAULT_PREFIX)
    }
}

impl MemoryStore {
    /// An empty store under `prefix`.
    pub fn new(prefix: &str) -> MemoryStore {
        MemoryStore {
            data: Arc::new(Mutex::new(Data::default())),
            events: broadcast::channel(4096).0,
            keys: Keys::new(prefix),
            session: Arc::new(AtomicU64::new(0)),
            active: Arc::new(AtomicBool::new(false)),
            stall_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The same data seen under another prefix.
    pub fn with_prefix(&self, prefix: &str) -> MemoryStore {
        MemoryStore {
            keys: Keys::new(prefix),
            session: Arc::new(AtomicU64::new(0)),
            active: Arc::new(AtomicBool::new(false)),
            ..self.clone()
        }
    }

    fn data(&self) -> MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self) -> Result<MutexGuard<'_, Data>> {
        let d = self.data();
        if d.down {
            Err(StoreError::Unavailable("memory store is down".into()))
        } else {
            Ok(d)
        }
    }

    /// Makes every call fail as if etcd were unreachable (or reachable again).
    pub fn set_down(&self, down: bool) {
        self.data().down = down;
    }

    /// Makes every call wait `delay` before it is answered (zero: at once), as calls to an etcd
    /// behind a network that drops packets wait for their deadline.
    pub fn set_stall(&self, delay: Duration) {
        self.stall_ms.store(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }

    async fn stall(&self) {
        let ms = self.stall_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    /// Expires the session's lease, as etcd does when keep-alives stop: its keys vanish, and
    /// (like the etcd store's keep-alive) a new lease is granted at once.
    pub fn expire_session(&self) {
        let mut d = self.data();
        d.kv.retain(|_, v| !v.leased);
        if self.active.load(Ordering::SeqCst) {
            self.session.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The number of writes so far (puts and deletes), to assert that an idle fleet writes nothing.
    pub fn revision(&self) -> i64 {
        self.data().revision
    }

    fn put(&self, key: String, text: &str, leased: bool) -> Result<i64> {
        if text.len() > MAX_REQUEST_BYTES {
            return Err(StoreError::Invalid(format!(
                "request refused: {} bytes is more than etcd's request limit ({MAX_REQUEST_BYTES})",
                text.len()
            )));
        }
        if leased && !self.active.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "no session: call start_session first".into(),
            ));
        }
        let mut d = self.live()?;
        d.revision += 1;
        let rev = d.revision;
        let created = d.kv.get(&key).map_or(rev, |v| v.create_revision);
        d.kv.insert(
            key,
            Value {
                text: text.to_string(),
                mod_revision: rev,
                create_revision: created,
                leased,
            },
        );
        Ok(rev)
    }

    fn entries(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let d = self.live()?;
        Ok(d.kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.text.clone()))
            .collect())
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn get_fleet(&self, name: &str) -> Result<Option<FleetDoc>> {
        self.stall().await;
        let d = self.live()?;
        Ok(d.kv.get(&self.keys.fleet(name)).map(|v| FleetDoc {
            name: name.to_string(),
            value: v.text.clone(),
            revision: v.mod_revision,
            created: v.create_revision,
        }))
    }

    async fn list_fleets(&self) -> Result<Vec<FleetDoc>> {
        self.stall().await;
        let prefix = self.keys.fleets();
        let d = self.live()?;
        Ok(d.kv
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| FleetDoc {
                name: k[prefix.len()..].to_string(),
                value: v.text.clone(),
                revision: v.mod_revision,
                created: v.create_revision,
            })
            .collect())
    }

    async fn put_fleet(&self, name: &str, value: &str, expect: Expect) -> Result<i64> {
        self.stall().await;
        check_segment("fleet", name)?;
        if value.len() > MAX_REQUEST_BYTES {
            return Err(StoreError::Invalid(format!(
                "request refused: {} bytes is more than etcd's request limit ({MAX_REQUEST_BYTES})",
                value.len()
            )));
        }
        let key = self.keys.fleet(name);
        let mut d = self.live()?;
        let current = d.kv.get(&key).map(|v| v.mod_revision);
        let ok = match expect {
            Expect::Absent => current.is_none(),
            Expect::Revision(r) => current == Some(r),
        };
        if !ok {
            return Err(StoreError::Conflict(key));
        }
        d.revision += 1;
        let rev = d.revision;
        let created = d.kv.get(&key).map_or(rev, |v| v.create_revision);
        d.kv.insert(
            key.clone(),
            Value {
                text: value.to_string(),
                mod_revision: rev,
                create_revision: created,
                leased: false,
            },
        );
        drop(d);
        let doc = FleetDoc {
            name: name.to_string(),
            value: value.to_string(),
            revision: rev,
            created,
        };
        let _ = self.events.send((key, Some(doc)));
        Ok(rev)
    }

    async fn delete_fleet(&self, name: &str) -> Result<bool> {
        self.stall().await;
        let key = self.keys.fleet(name);
        let mut d = self.live()?;
        let existed = d.kv.remove(&key).is_some();
        if existed {
            d.revision += 1;
            drop(d);
            let _ = self.events.send((key, None));
        }
        Ok(existed)
    }

    fn watch_fleets(&self) -> BoxStream<'static, FleetEvent> {
        let rx = self.events.subscribe();
        let this = self.clone();
        let prefix = self.keys.fleets();
        futures::stream::unfold(
            (rx, this, prefix, true),
            |(mut rx, this, prefix, first)| async move {
                if first {
                    loop {
                        if let Ok(list) = this.list_fleets().await {
                            return Some((FleetEvent::Resync(list), (rx, this, prefix, false)));
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                loop {
                    match rx.recv().await {
                        Ok((key, doc)) => {
                            let Some(name) = key.strip_prefix(&prefix) else {
                                continue;
                            };
                            let event = match doc {
                                Some(d) => FleetEvent::Put(d),
                                None => FleetEvent::Delete(name.to_string()),
                            };
                            return Some((event, (rx, this, prefix, false)));
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            let list = this.list_fleets().await.unwrap_or_default();
                            return Some((FleetEvent::Resync(list), (rx, this, prefix, false)));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            },
        )
        .boxed()
    }

    async fn start_session(&self, _ttl: Duration) -> Result<()> {
        self.stall().await;
        let _d = self.live()?;
        self.session.fetch_add(1, Ordering::SeqCst);
        self.active.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn session_generation(&self) -> u64 {
        self.session.load(Ordering::SeqCst)
    }

    fn session_alive(&self) -> bool {
        self.active.load(Ordering::SeqCst) && !self.data().down
    }

    async fn put_node(&self, node: &str, value: &str) -> Result<()> {
        self.stall().await;
        check_segment("node", node)?;
        self.put(format!("{}{node}", self.keys.nodes()), value, true)
            .map(|_| ())
    }

    async fn write_status(&self, fleet: &str, node: &str, change: &StatusChange) -> Result<()> {
        self.stall().await;
        let batches = status_batches(&self.keys, fleet, node, change)?;
        if !self.active.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "no session: call start_session first".into(),
            ));
        }
        let mut d = self.live()?;
        // One revision per transaction, as etcd counts them.
        for batch in batches {
            d.revision += 1;
            let rev = d.revision;
            for op in batch {
                match op {
                    StatusOp::Put(key, text) => {
                        let created = d.kv.get(&key).map_or(rev, |v| v.create_revision);
                        let value = Value {
                            text: text.to_string(),
                            mod_revision: rev,
                            create_revision: created,
                            leased: true,
                        };
                        d.kv.insert(key, value);
                    }
                    StatusOp::Delete(key) => {
                        d.kv.remove(&key);
                    }
                }
            }
        }
        Ok(())
    }

    async fn delete_status(&self, fleet: &str, node: &str) -> Result<()> {
        self.stall().await;
        let key = format!("{}{node}", self.keys.status(Some(fleet)));
        let under = self.keys.instances_of(fleet, node);
        let mut d = self.live()?;
        let before = d.kv.len();
        d.kv.retain(|k, _| *k != key && !k.starts_with(&under));
        if d.kv.len() != before {
            d.revision += 1;
        }
        Ok(())
    }

    async fn list_status(&self, fleet: Option<&str>) -> Result<Vec<Entry>> {
        self.stall().await;
        Ok(self
            .entries(&self.keys.status(fleet))?
            .into_iter()
            .filter_map(|(k, value)| {
                let (fleet, node) = self.keys.parse_status(&k)?;
                Some(Entry { fleet, node, value })
            })
            .collect())
    }

    async fn list_instances(&self, fleet: Option<&str>) -> Result<Vec<InstanceEntry>> {
        self.stall().await;
        Ok(self
            .entries(&self.keys.instances(fleet))?
            .into_iter()
            .filter_map(|(k, value)| self.keys.parse_instance(&k, value))
            .collect())
    }

    async fn list_nodes(&self) -> Result<Vec<Entry>> {
        self.stall().await;
        let prefix = self.keys.nodes();
        Ok(self
            .entries(&prefix)?
            .into_iter()
            .map(|(k, value)| Entry {
                fleet: String::new(),
                node: k[prefix.len()..].to_string(),
                value,
            })
            .collect())
    }

    async fn end_session(&self) -> Result<()> {
        self.stall().await;
        self.active.store(false, Ordering::SeqCst);
        self.expire_session();
        Ok(())
    }
}
