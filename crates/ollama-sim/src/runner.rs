//! Loaded models and the request scheduler.
//!
//! A loaded model holds its memory for real (allocated and every page written), so cgroup
//! limits bite exactly as they would on a real runner. Requests beyond `OLLAMA_NUM_PARALLEL`
//! wait; beyond `OLLAMA_MAX_QUEUE` waiting ones, they are refused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Config, KeepAlive, cgroup_cpu_allowance};
use crate::models::ModelInfo;

/// A model held in memory.
#[derive(Debug)]
struct Loaded {
    info: ModelInfo,
    _memory: Vec<u8>,
    num_thread: usize,
    /// Requests using it now.
    refs: usize,
    /// When it unloads if idle; `None`: never.
    expires: Option<Instant>,
    expires_at: Option<SystemTime>,
    last_used: Instant,
}

/// What `/api/ps` shows of a loaded model.
#[derive(Clone, Debug)]
pub struct Running {
    /// The model.
    pub info: ModelInfo,
    /// Threads the runner uses.
    pub num_thread: usize,
    /// When it unloads; `None`: never.
    pub expires_at: Option<SystemTime>,
}

/// Why a request could not be served.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The queue is full (HTTP 503).
    Busy,
    /// Loading failed (HTTP 500).
    LoadFailed(String),
}

/// The scheduler and the loaded models.
#[derive(Debug)]
pub struct Runner {
    cfg: Arc<Config>,
    loaded: Mutex<HashMap<String, Loaded>>,
    load_lock: tokio::sync::Mutex<()>,
    slots: Arc<Semaphore>,
    admitted: AtomicUsize,
    /// Runner starts and restarts so far (tests count reloads).
    loads: AtomicUsize,
}

/// A request's hold on a loaded model and a parallel slot; released on drop.
#[derive(Debug)]
pub struct Lease {
    runner: Arc<Runner>,
    key: String,
    keep_alive: KeepAlive,
    _permit: OwnedSemaphorePermit,
    /// Time spent loading (zero when it was loaded already).
    pub load_duration: Duration,
    /// Threads the runner uses.
    pub num_thread: usize,
    /// Tokens per second this request gets (lower when threads exceed the CPU allowance).
    pub tokens_per_second: f64,
}

impl Runner {
    /// A runner for `cfg`.
    pub fn new(cfg: Arc<Config>) -> Arc<Runner> {
        Arc::new(Runner {
            slots: Arc::new(Semaphore::new(cfg.num_parallel)),
            cfg,
            loaded: Mutex::new(HashMap::new()),
            load_lock: tokio::sync::Mutex::new(()),
            admitted: AtomicUsize::new(0),
            loads: AtomicUsize::new(0),
        })
    }

    fn loaded(&self) -> MutexGuard<'_, HashMap<String, Loaded>> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runner starts and restarts so far.
    pub fn loads(&self) -> usize {
        self.loads.load(Ordering::SeqCst)
    }

    /// The key a model is loaded under: like Ollama's scheduler, the weights file, so two names
    /// of the same weights with the same options share one runner (and differing options, such
    /// as the thread count, mean a reload).
    fn key_of(info: &ModelInfo) -> String {
        if info.model_blob.is_empty() {
            info.reference.to_string()
        } else {
            info.model_blob.clone()
        }
    }

    /// Requests admitted and not finished (running or waiting).
    pub fn in_flight(&self) -> usize {
        self.admitted.load(Ordering::SeqCst)
    }

    /// Admits a request for `info`, waits for a slot, loads the model if needed.
    /// `num_thread` is the request's `options.num_thread`, if any.
    pub async fn acquire(
        self: &Arc<Self>,
        info: &ModelInfo,
        keep_alive: KeepAlive,
        num_thread: Option<usize>,
    ) -> Result<Lease, Refusal> {
        let limit = self.cfg.num_parallel + self.cfg.max_queue;
        if self.admitted.fetch_add(1, Ordering::SeqCst) >= limit {
            self.admitted.fetch_sub(1, Ordering::SeqCst);
            return Err(Refusal::Busy);
        }
        let admitted = Admitted(self.clone());
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Refusal::LoadFailed("scheduler closed".into()))?;
        let key = Runner::key_of(info);
        let wanted_threads = num_thread
            .or_else(|| {
                info.parameters
                    .get("num_thread")
                    .and_then(|v| v.as_u64())
                    .map(|n| n as usize)
            })
            .unwrap_or(self.cfg.host_cores)
            .max(1);
        let started = Instant::now();
        let num_thread = self.ensure_loaded(info, &key, wanted_threads).await?;
        let load_duration = started.elapsed();
        std::mem::forget(admitted);
        Ok(Lease {
            runner: self.clone(),
            key,
            keep_alive,
            _permit: permit,
            load_duration,
            num_thread,
            tokens_per_second: effective_speed(
                self.cfg.tokens_per_second,
                num_thread,
                cgroup_cpu_allowance(),
            ),
        })
    }

    async fn ensure_loaded(
        &self,
        info: &ModelInfo,
        key: &str,
        threads: usize,
    ) -> Result<usize, Refusal> {
        if let Some(l) = self.loaded().get_mut(key)
            && l.num_thread == threads
        {
            l.refs += 1;
            l.last_used = Instant::now();
            return Ok(l.num_thread);
        }
        let _guard = self.load_lock.lock().await;
        let reload = match self.loaded().get_mut(key) {
            Some(l) if l.num_thread == threads => {
                l.refs += 1;
                return Ok(l.num_thread);
            }
            // Like Ollama, other runner options (here: the thread count) mean a reload.
            Some(l) => {
                l.refs += 1;
                true
            }
            None => false,
        };
        self.loads.fetch_add(1, Ordering::SeqCst);
        if reload {
            tokio::time::sleep(self.cfg.load_time).await;
            eprintln!(
                "level=INFO source=sim msg=\"llama runner restarted\" model={} num_thread={threads}",
                info.name
            );
            if let Some(l) = self.loaded().get_mut(key) {
                l.num_thread = threads;
                l.last_used = Instant::now();
                // The runner now serves the name that reloaded it.
                l.info = info.clone();
            }
            return Ok(threads);
        }
        self.evict_for_room();
        tokio::time::sleep(self.cfg.load_time).await;
        let bytes = usize::try_from(info.memory)
            .map_err(|_| Refusal::LoadFailed("model too large".into()))?;
        let memory = tokio::task::spawn_blocking(move || hold_memory(bytes))
            .await
            .map_err(|e| Refusal::LoadFailed(e.to_string()))?;
        eprintln!(
            "level=INFO source=sim msg=\"llama runner started\" model={} memory={} num_thread={threads}",
            info.name, info.memory
        );
        self.loaded().insert(
            key.to_string(),
            Loaded {
                info: info.clone(),
                _memory: memory,
                num_thread: threads,
                refs: 1,
                expires: None,
                expires_at: None,
                last_used: Instant::now(),
            },
        );
        Ok(threads)
    }

    /// Unloads the least recently used idle model while at `OLLAMA_MAX_LOADED_MODELS`.
    fn evict_for_room(&self) {
        let mut loaded = self.loaded();
        while loaded.len() >= self.cfg.max_loaded_models {
            let victim = loaded
                .iter()
                .filter(|(_, l)| l.refs == 0)
                .min_by_key(|(_, l)| l.last_used)
                .map(|(k, _)| k.clone());
            match victim {
                Some(k) => {
                    loaded.remove(&k);
                }
                None => break,
            }
        }
    }

    /// Loads a model without a request (an empty prompt), or unloads it when `keep_alive` is 0.
    /// Returns "load" or "unload".
    pub async fn load_only(
        self: &Arc<Self>,
        info: &ModelInfo,
        keep_alive: KeepAlive,
    ) -> Result<&'static str, Refusal> {
        if keep_alive == KeepAlive::For(Duration::ZERO) {
            let key = Runner::key_of(info);
            let mut loaded = self.loaded();
            if loaded.get(&key).is_some_and(|l| l.refs == 0) {
                loaded.remove(&key);
            }
            return Ok("unload");
        }
        let lease = self.acquire(info, keep_alive, None).await?;
        drop(lease);
        Ok("load")
    }

    /// The loaded models.
    pub fn running(&self) -> Vec<Running> {
        let mut out: Vec<Running> = self
            .loaded()
            .values()
            .map(|l| Running {
                info: l.info.clone(),
                num_thread: l.num_thread,
                expires_at: l.expires_at,
            })
            .collect();
        out.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        out
    }

    /// Unloads idle models whose keep-alive has passed; run periodically.
    pub fn reap(&self) {
        let now = Instant::now();
        self.loaded()
            .retain(|_, l| l.refs > 0 || l.expires.is_none_or(|e| e > now));
    }

    fn release(&self, key: &str, keep_alive: KeepAlive) {
        let mut loaded = self.loaded();
        if let Some(l) = loaded.get_mut(key) {
            l.refs = l.refs.saturating_sub(1);
            l.last_used = Instant::now();
            match keep_alive {
                KeepAlive::Forever => {
                    l.expires = None;
                    l.expires_at = None;
                }
                KeepAlive::For(d) => {
                    l.expires = Some(Instant::now() + d);
                    l.expires_at = Some(SystemTime::now() + d);
                }
            }
            if l.refs == 0 && keep_alive == KeepAlive::For(Duration::ZERO) {
                loaded.remove(key);
            }
        }
        self.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Undoes an admission if the request is dropped before it gets a lease.
struct Admitted(Arc<Runner>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.runner.release(&self.key, self.keep_alive);
    }
}

/// Allocates `bytes` and writes every page, so the memory is resident and charged to the
/// cgroup (an OOM kill happens here when the limit is too small).
pub fn hold_memory(bytes: usize) -> Vec<u8> {
    // `vec![byte; n]` with a non-zero byte is a memset: every page is written.
    let v = vec![0xA5u8; bytes];
    std::hint::black_box(&v);
    v
}

/// Generation speed with `threads` threads under a CPU allowance: full speed when the threads
/// fit, and much slower when they oversubscribe the quota (spinning threads get throttled), as
/// llama.cpp does when Ollama sizes threads from the host instead of the cgroup; one thread on
/// part of a core is slower in proportion.
pub fn effective_speed(base: f64, threads: usize, allowance: Option<f64>) -> f64 {
    match allowance {
        // One thread on part of a core: slower in proportion, no convoy.
        Some(cpus) if threads <= 1 && cpus < 1.0 => base * cpus.max(0.02),
        Some(cpus) if (threads as f64) > cpus => {
            let ratio = cpus / threads as f64;
            base * (ratio * ratio).max(0.02)
        }
        _ => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversubscribed_threads_are_slower() {
        assert_eq!(effective_speed(50.0, 2, Some(2.0)), 50.0);
        assert_eq!(effective_speed(50.0, 64, None), 50.0);
        assert!(effective_speed(50.0, 4, Some(2.0)) < 50.0 / 3.0);
        assert_eq!(effective_speed(50.0, 64, Some(2.0)), 1.0);
        assert_eq!(
            effective_speed(40.0, 1, Some(0.25)),
            10.0,
            "one thread: in proportion"
        );
    }

    #[test]
    fn memory_is_really_held() {
        let v = hold_memory(1 << 20);
        assert_eq!(v.len(), 1 << 20);
        assert!(v.iter().step_by(4096).all(|b| *b == 0xA5));
    }
}
