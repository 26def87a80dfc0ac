//! Images for the node: looked up in containerd, pulled when the policy says so, one pull per
//! image at a time however many instances need it, with backoff after failures.
//!
//! - `Never`: the image must be present.
//! - `IfNotPresent`: pulled when absent.
//! - `Always`: the tag is re-resolved whenever the fleet document changes and every
//!   `--image-refresh`; a new digest is pulled while the current image keeps serving, and once
//!   it is present the spec hash changes and the fleet rolls out within its budget.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_runtime::clock::Instant;

use fleet_api::PullPolicy;
use fleet_runtime::{ImageInfo, PullProgress, Runtime};
use tokio::sync::Notify;

use crate::reason::{Reason, Waiting};
use crate::{lock, mib};

/// What an image lookup says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Use this image.
    Ready(Box<ImageInfo>),
    /// Not usable yet: why (pulling, backing off, absent with `Never`).
    Waiting(Waiting),
}

#[derive(Debug, Default)]
struct Entry {
    /// The image as last found in containerd, and when.
    local: Option<(Option<ImageInfo>, Instant)>,
    pulling: Option<PullProgress>,
    failure: Option<Failure>,
    /// `Always`: when and for which generation the tag was last resolved.
    resolved: Option<(i64, Instant)>,
    resolving: bool,
}

#[derive(Debug, Clone)]
struct Failure {
    error: String,
    attempts: u32,
    retry_at: Instant,
}

/// Pull statistics, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PullStats {
    /// Pulls finished.
    pub succeeded: u64,
    /// Pulls failed.
    pub failed: u64,
    /// Bytes fetched by finished pulls.
    pub bytes: u64,
    /// Seconds spent in finished pulls.
    pub seconds: f64,
}

/// The node's images.
pub struct Images<R: Runtime> {
    runtime: Arc<R>,
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    stats: Arc<Mutex<PullStats>>,
    wake: Arc<Notify>,
    refresh: Duration,
    backoff: Duration,
}

impl<R: Runtime> std::fmt::Debug for Images<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Images")
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

/// Backoff between pull attempts: `initial` (10s by default, as Kubernetes' ImagePullBackOff)
/// doubling up to 5 minutes.
pub fn pull_backoff(initial: Duration, attempts: u32) -> Duration {
    crate::backoff::retry(attempts, initial, Duration::from_secs(300))
}

impl<R: Runtime> Images<R> {
    /// Images of `runtime`; `wake` is notified when a pull or resolve finishes; `Always` tags are
    /// re-resolved every `refresh`.
    pub fn new(runtime: Arc<R>, wake: Arc<Notify>, refresh: Duration) -> Images<R> {
        Images {
            runtime,
            entries: Arc::new(Mutex::new(HashMap::new())),
            stats: Arc::new(Mutex::new(PullStats::default())),
            wake,
            refresh,
            backoff: Duration::from_secs(10),
        }
    }

    /// The same, with the first retry after a failed pull after `initial`.
    pub fn with_backoff(mut self, initial: Duration) -> Images<R> {
        self.backoff = initial;
        self
    }

    /// Pull statistics so far.
    pub fn stats(&self) -> PullStats {
        *lock(&self.stats)
    }

    /// The image as containerd has it, looked up again when stale (present: 60s; absent: 2s)
    /// or when `fresh`.
    async fn local(&self, name: &str, fresh: bool) -> Result<Option<ImageInfo>, String> {
        if let Some((found, at)) = lock(&self.entries).get(name).and_then(|e| e.local.clone()) {
            let ttl = if found.is_some() {
                Duration::from_secs(60)
            } else {
                Duration::from_secs(2)
            };
            if !fresh && at.elapsed() < ttl {
                return Ok(found);
            }
        }
        let found = self.runtime.image(name).await.map_err(|e| e.to_string())?;
        lock(&self.entries).entry(name.into()).or_default().local =
            Some((found.clone(), Instant::now()));
        Ok(found)
    }

    /// What to use for `name` (normalised) under `policy`, starting a pull or a resolve when
    /// needed. `generation` is the fleet's, so a changed document re-resolves an `Always` tag.
    pub async fn ensure(
        &self,
        name: &str,
        policy: PullPolicy,
        generation: i64,
        fresh: bool,
    ) -> Resolution {
        let local = match self.local(name, fresh).await {
            Ok(l) => l,
            Err(e) => {
                return Resolution::Waiting(Waiting::new(
                    Reason::ErrImageInspect,
                    format!("ErrImageInspect: {e}"),
                ));
            }
        };
        let mut entries = lock(&self.entries);
        let entry = entries.entry(name.to_string()).or_default();
        let waiting = |entry: &Entry| -> Waiting {
            if let Some(p) = &entry.pulling {
                let (done, total) = p.get();
                return Waiting::new(
                    Reason::Pulling,
                    format!("Pulling: image {name:?}, {} of {}", mib(done), mib(total)),
                );
            }
            match &entry.failure {
                Some(f) => {
                    let wait = f
                        .retry_at
                        .saturating_duration_since(Instant::now())
                        .as_secs();
                    Waiting::new(
                        Reason::ImagePullBackOff,
                        format!(
                            "ImagePullBackOff: pulling {name:?} failed ({} attempt(s)): {}; retrying in {wait}s",
                            f.attempts, f.error
                        ),
                    )
                }
                None => Waiting::new(Reason::Pulling, format!("Pulling: resolving {name:?}")),
            }
        };
        match (policy, local) {
            (PullPolicy::Never, Some(image)) | (PullPolicy::IfNotPresent, Some(image)) => {
                Resolution::Ready(Box::new(image))
            }
            (PullPolicy::Never, None) => Resolution::Waiting(Waiting::new(
                Reason::ErrImageNeverPull,
                format!(
                    "ErrImageNeverPull: image {name:?} is not present and imagePullPolicy is Never; import it into containerd or change the policy"
                ),
            )),
            (PullPolicy::IfNotPresent, None) => {
                if entry.pulling.is_none()
                    && entry
                        .failure
                        .as_ref()
                        .is_none_or(|f| Instant::now() >= f.retry_at)
                {
                    self.start_pull(name, entry);
                }
                Resolution::Waiting(waiting(entry))
            }
            (PullPolicy::Always, local) => {
                let due = entry
                    .resolved
                    .is_none_or(|(g, at)| g != generation || at.elapsed() >= self.refresh);
                let may_retry = entry
                    .failure
                    .as_ref()
                    .is_none_or(|f| Instant::now() >= f.retry_at);
                if due && may_retry && entry.pulling.is_none() && !entry.resolving {
                    entry.resolving = true;
                    self.start_resolve(name, generation, local.as_ref().map(|i| i.digest.clone()));
                }
                match local {
                    // The current image keeps serving while a newer one is fetched.
                    Some(image) => Resolution::Ready(Box::new(image)),
                    None => {
                        if entry.pulling.is_none() && !entry.resolving && may_retry {
                            self.start_pull(name, entry);
                        }
                        Resolution::Waiting(waiting(entry))
                    }
                }
            }
        }
    }

    /// Records a failed pull or resolve: the next attempt waits for the backoff, and the
    /// controller is woken when it is due.
    fn fail(&self, entry: &mut Entry, error: String) -> (u32, Duration) {
        let attempts = entry.failure.as_ref().map_or(1, |f| f.attempts + 1);
        let retry = pull_backoff(self.backoff, attempts);
        entry.failure = Some(Failure {
            error,
            attempts,
            retry_at: Instant::now() + retry,
        });
        let wake = self.wake.clone();
        tokio::spawn(async move {
            tokio::time::sleep(retry).await;
            wake.notify_one();
        });
        (attempts, retry)
    }

    fn start_pull(&self, name: &str, entry: &mut Entry) {
        let progress = PullProgress::default();
        entry.pulling = Some(progress.clone());
        let (this, name) = (self.clone(), name.to_string());
        tokio::spawn(async move {
            let started = Instant::now();
            tracing::info!(image = %name, "pulling image");
            let reporter = {
                let (progress, name) = (progress.clone(), name.clone());
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(5));
                    tick.tick().await;
                    loop {
                        tick.tick().await;
                        let (done, total) = progress.get();
                        tracing::info!(image = %name, done = %mib(done), total = %mib(total), "pulling image");
                    }
                })
            };
            let result = this.runtime.pull(&name, &progress).await;
            reporter.abort();
            let (done, _) = progress.get();
            let mut entries = lock(&this.entries);
            let entry = entries.entry(name.clone()).or_default();
            entry.pulling = None;
            match result {
                Ok(image) => {
                    let seconds = started.elapsed().as_secs_f64();
                    tracing::info!(image = %name, digest = %image.digest, bytes = done, seconds, "image pulled");
                    entry.local = Some((Some(image), Instant::now()));
                    entry.failure = None;
                    let mut s = lock(&this.stats);
                    s.succeeded += 1;
                    s.bytes += done;
                    s.seconds += seconds;
                }
                Err(e) => {
                    let (attempts, retry) = this.fail(entry, e.to_string());
                    tracing::warn!(image = %name, error = %e, attempts, retry_in_s = retry.as_secs(), "image pull failed");
                    lock(&this.stats).failed += 1;
                }
            }
            drop(entries);
            this.wake.notify_one();
        });
    }

    /// `Always`: resolves the tag; a digest other than the local one is pulled.
    fn start_resolve(&self, name: &str, generation: i64, local_digest: Option<String>) {
        let (this, name) = (self.clone(), name.to_string());
        tokio::spawn(async move {
            let remote = this.runtime.resolve(&name).await;
            let mut entries = lock(&this.entries);
            let entry = entries.entry(name.clone()).or_default();
            entry.resolving = false;
            entry.resolved = Some((generation, Instant::now()));
            match remote {
                Ok(digest) if Some(&digest) != local_digest.as_ref() => {
                    tracing::info!(image = %name, digest = %digest, "the tag points to a new digest; pulling it");
                    if entry.pulling.is_none() {
                        this.start_pull(&name, entry);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(image = %name, error = %e, "cannot resolve the image's tag; keeping what is present");
                    // Without an image to keep serving, this is a pull failure like any other.
                    if local_digest.is_none() {
                        this.fail(entry, e.to_string());
                    }
                }
            }
            drop(entries);
            this.wake.notify_one();
        });
    }
}

impl<R: Runtime> Clone for Images<R> {
    fn clone(&self) -> Self {
        Images {
            runtime: self.runtime.clone(),
            entries: self.entries.clone(),
            stats: self.stats.clone(),
            wake: self.wake.clone(),
            refresh: self.refresh,
            backoff: self.backoff,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_five_minutes() {
        let secs: Vec<u64> = (1..=8)
            .map(|a| pull_backoff(Duration::from_secs(10), a).as_secs())
            .collect();
        assert_eq!(secs, [10, 20, 40, 80, 160, 300, 300, 300]);
    }
}
