//! Loaded models and the request scheduler.
//!
//! A loaded model holds its memory for real (allocated and every page written), so cgroup
//! limits bite exactly as they would on a real runner. Scheduling follows Ollama's
//! (server/sched.go): a request for a model that is loaded with the same options gets the
//! runner at once and waits for one of `OLLAMA_NUM_PARALLEL` slots without bound (never a 503);
//! only requests that must load (or reload) a model queue, at most `OLLAMA_MAX_QUEUE` of them,
//! beyond which they get the 503. A load without a prompt takes no slot. A request without
//! `keep_alive` keeps the runner's current one (the pin stays); a new runner starts with
//! `OLLAMA_KEEP_ALIVE`. Runners are keyed by the weights, as Ollama keys them by model path.

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
    /// With the real engine: the `llama-server` serving it.
    child: Option<Arc<crate::engine::Child>>,
    num_thread: usize,
    /// Requests using it now.
    refs: usize,
    /// When it unloads if idle; `None`: never.
    expires: Option<Instant>,
    expires_at: Option<SystemTime>,
    last_used: Instant,
    /// Its keep-alive (Ollama's `sessionDuration`): set by requests that say one.
    session: KeepAlive,
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
    /// Requests in the server (for `/sim/state`).
    admitted: AtomicUsize,
    /// Requests waiting to load a model (bounded by `OLLAMA_MAX_QUEUE`).
    pending: AtomicUsize,
    /// Runner starts and restarts so far (tests count reloads).
    loads: AtomicUsize,
    /// The prompt cache of the loaded model's slots (without the real engine).
    cache: Mutex<crate::cache::PromptCache>,
}

/// A request's hold on a loaded model and a parallel slot; released on drop.
#[derive(Debug)]
pub struct Lease {
    runner: Arc<Runner>,
    key: String,
    keep_alive: Option<KeepAlive>,
    _permit: OwnedSemaphorePermit,
    /// Time spent loading (zero when it was loaded already).
    pub load_duration: Duration,
    /// Threads the runner uses.
    pub num_thread: usize,
    /// Tokens per second this request gets (lower when threads exceed the CPU allowance).
    pub tokens_per_second: f64,
    /// With the real engine: the runner that serves the request.
    pub child: Option<Arc<crate::engine::Child>>,
}

impl Runner {
    /// A runner for `cfg`.
    pub fn new(cfg: Arc<Config>) -> Arc<Runner> {
        Arc::new(Runner {
            cache: Mutex::new(Runner::fresh_cache(&cfg)),
            slots: Arc::new(Semaphore::new(cfg.num_parallel)),
            cfg,
            loaded: Mutex::new(HashMap::new()),
            load_lock: tokio::sync::Mutex::new(()),
            admitted: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            loads: AtomicUsize::new(0),
        })
    }

    fn fresh_cache(cfg: &Config) -> crate::cache::PromptCache {
        crate::cache::PromptCache::new(cfg.num_parallel, cfg.cache_ram_mib, cfg.kv_bytes_per_token)
    }

    fn cache(&self) -> MutexGuard<'_, crate::cache::PromptCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for `prompt`, and how much of it the prompt cache holds.
    pub fn take_slot(&self, prompt: &[crate::cache::Token]) -> crate::cache::Taken {
        self.cache().take(prompt)
    }

    /// The request on `slot` is done; the slot holds `tokens`.
    pub fn give_back_slot(&self, slot: usize, tokens: Vec<crate::cache::Token>) {
        self.cache().give_back(slot, tokens);
    }

    /// Bytes and states of the prompt cache.
    pub fn cache_held(&self) -> (u64, usize) {
        let c = self.cache();
        (c.bytes(), c.states())
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

    /// The thread count a request runs with: its own `num_thread`, the model's parameter, or
    /// the host's cores.
    fn threads_for(&self, info: &ModelInfo, num_thread: Option<usize>) -> usize {
        Runner::set_threads(info, num_thread)
            .unwrap_or(self.cfg.host_cores)
            .max(1)
    }

    /// The thread count the request or the model sets, if any (the engine gets `-t` only then,
    /// as Ollama passes it).
    fn set_threads(info: &ModelInfo, num_thread: Option<usize>) -> Option<usize> {
        num_thread.or_else(|| {
            info.parameters
                .get("num_thread")
                .and_then(|v| v.as_u64())
                .map(|n| n as usize)
        })
    }

    /// The real engine's runner of `key`, if the engine is on and it runs.
    fn child_of(&self, key: &str) -> Option<Arc<crate::engine::Child>> {
        self.loaded().get(key).and_then(|l| l.child.clone())
    }

    /// Starts the engine's runner for `info` (none without the engine).
    async fn start_child(
        &self,
        info: &ModelInfo,
        threads: usize,
    ) -> Result<Option<Arc<crate::engine::Child>>, Refusal> {
        let Some(engine) = &self.cfg.engine else {
            return Ok(None);
        };
        let set = Runner::set_threads(info, None).map(|_| threads);
        engine
            .start(self.cfg.context_length, self.cfg.num_parallel, set)
            .await
            .map(|c| Some(Arc::new(c)))
            .map_err(Refusal::LoadFailed)
    }

    /// Gets the runner for `info` (loading it when needed; only then is the request counted
    /// against `OLLAMA_MAX_QUEUE`), counted as in use. Returns the thread count.
    async fn runner_for(
        &self,
        info: &ModelInfo,
        key: &str,
        threads: usize,
        keep_alive: Option<KeepAlive>,
    ) -> Result<usize, Refusal> {
        // A runner the kernel killed (its cgroup ran out of memory) is started again.
        {
            let mut loaded = self.loaded();
            if loaded
                .get(key)
                .is_some_and(|l| l.refs == 0 && l.child.as_ref().is_some_and(|c| !c.alive()))
            {
                eprintln!("level=WARN source=sim msg=\"llama runner terminated\" key={key}");
                loaded.remove(key);
            }
        }
        let ready = self
            .loaded()
            .get(key)
            .is_some_and(|l| l.num_thread == threads);
        let _pending = if ready {
            None
        } else {
            // One load under way plus OLLAMA_MAX_QUEUE waiting (Ollama's pending channel).
            if self.pending.fetch_add(1, Ordering::SeqCst) > self.cfg.max_queue {
                self.pending.fetch_sub(1, Ordering::SeqCst);
                return Err(Refusal::Busy);
            }
            Some(Pending(&self.pending))
        };
        self.ensure_loaded(info, key, threads, keep_alive).await
    }

    /// Admits a request for `info`: the runner (loaded if needed), then a parallel slot.
    /// `num_thread` is the request's `options.num_thread`, if any.
    pub async fn acquire(
        self: &Arc<Self>,
        info: &ModelInfo,
        keep_alive: Option<KeepAlive>,
        num_thread: Option<usize>,
    ) -> Result<Lease, Refusal> {
        self.admitted.fetch_add(1, Ordering::SeqCst);
        let admitted = Admitted(self.clone());
        let key = Runner::key_of(info);
        let wanted_threads = self.threads_for(info, num_thread);
        let started = Instant::now();
        let num_thread = self
            .runner_for(info, &key, wanted_threads, keep_alive)
            .await?;
        let load_duration = started.elapsed();
        // The runner is ours (its refs count us); now wait for a slot, without bound.
        let permit = match self.slots.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => {
                self.release_runner(&key, keep_alive);
                return Err(Refusal::LoadFailed("scheduler closed".into()));
            }
        };
        std::mem::forget(admitted);
        let child = self.child_of(&key);
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
            child,
        })
    }

    async fn ensure_loaded(
        &self,
        info: &ModelInfo,
        key: &str,
        threads: usize,
        keep_alive: Option<KeepAlive>,
    ) -> Result<usize, Refusal> {
        if let Some(l) = self.loaded().get_mut(key)
            && l.num_thread == threads
        {
            l.refs += 1;
            l.last_used = Instant::now();
            if let Some(k) = keep_alive {
                l.session = k;
            }
            return Ok(l.num_thread);
        }
        let _guard = self.load_lock.lock().await;
        let reload = match self.loaded().get_mut(key) {
            Some(l) if l.num_thread == threads => {
                l.refs += 1;
                if let Some(k) = keep_alive {
                    l.session = k;
                }
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
            let child = self.start_child(info, threads).await?;
            if child.is_none() {
                tokio::time::sleep(self.cfg.load_time).await;
            }
            eprintln!(
                "level=INFO source=sim msg=\"llama runner restarted\" model={} num_thread={threads}",
                info.name
            );
            if let Some(l) = self.loaded().get_mut(key) {
                l.num_thread = threads;
                if child.is_some() {
                    l.child = child;
                }
                l.last_used = Instant::now();
                // The runner now serves the name that reloaded it.
                l.info = info.clone();
                l.session = keep_alive.unwrap_or(self.cfg.keep_alive);
            }
            return Ok(threads);
        }
        self.evict_for_room();
        // A new runner starts with empty slots and an empty cache.
        *self.cache() = Runner::fresh_cache(&self.cfg);
        let child = self.start_child(info, threads).await?;
        let memory = if child.is_some() {
            // The engine holds the model's memory itself.
            Vec::new()
        } else {
            tokio::time::sleep(self.cfg.load_time).await;
            let bytes = usize::try_from(info.memory)
                .map_err(|_| Refusal::LoadFailed("model too large".into()))?;
            tokio::task::spawn_blocking(move || hold_memory(bytes))
                .await
                .map_err(|e| Refusal::LoadFailed(e.to_string()))?
        };
        eprintln!(
            "level=INFO source=sim msg=\"llama runner started\" model={} memory={} num_thread={threads}",
            info.name, info.memory
        );
        self.loaded().insert(
            key.to_string(),
            Loaded {
                info: info.clone(),
                _memory: memory,
                child,
                num_thread: threads,
                refs: 1,
                expires: None,
                expires_at: None,
                last_used: Instant::now(),
                session: keep_alive.unwrap_or(self.cfg.keep_alive),
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
    /// Takes no parallel slot (Ollama answers as soon as the runner is there). Returns "load"
    /// or "unload".
    pub async fn load_only(
        self: &Arc<Self>,
        info: &ModelInfo,
        keep_alive: Option<KeepAlive>,
    ) -> Result<&'static str, Refusal> {
        let key = Runner::key_of(info);
        if keep_alive == Some(KeepAlive::For(Duration::ZERO)) {
            let mut loaded = self.loaded();
            if loaded.get(&key).is_some_and(|l| l.refs == 0) {
                loaded.remove(&key);
            }
            return Ok("unload");
        }
        let threads = self.threads_for(info, None);
        self.runner_for(info, &key, threads, keep_alive).await?;
        self.release_runner(&key, keep_alive);
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

    /// A request is done with its runner: idle, the runner expires after its keep-alive (the
    /// request's, when it said one; else the one it had).
    fn release_runner(&self, key: &str, keep_alive: Option<KeepAlive>) {
        let mut loaded = self.loaded();
        if let Some(l) = loaded.get_mut(key) {
            l.refs = l.refs.saturating_sub(1);
            l.last_used = Instant::now();
            if let Some(k) = keep_alive {
                l.session = k;
            }
            match l.session {
                KeepAlive::Forever => {
                    l.expires = None;
                    l.expires_at = None;
                }
                KeepAlive::For(d) => {
                    l.expires = Some(Instant::now() + d);
                    l.expires_at = Some(SystemTime::now() + d);
                }
            }
            if l.refs == 0 && l.session == KeepAlive::For(Duration::ZERO) {
                loaded.remove(key);
            }
        }
    }

    fn release(&self, key: &str, keep_alive: Option<KeepAlive>) {
        self.release_runner(key, keep_alive);
        self.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request waiting for a model to load, counted against `OLLAMA_MAX_QUEUE`.
struct Pending<'a>(&'a AtomicUsize);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Undoes an admission if the request is dropped before it gets a lease.
struct Admitted(Arc<Runner>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Lease {
    /// The runner the lease is of.
    pub fn runner(&self) -> &Runner {
        &self.runner
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
