//! HTTP probes, one task per running instance.
//!
//! Readiness: until an instance first answers it is probed every 50 ms (so a fresh instance
//! joins the endpoints as soon as it can); afterwards every `periodSeconds`. Ready after one
//! success; unready after `failureThreshold` consecutive failures.
//!
//! Liveness: from the first readiness success on, every `periodSeconds`; `failureThreshold`
//! consecutive failures mark the instance unhealthy (the planner restarts it). Before that,
//! `startupTimeoutSeconds` covers an instance that never answers.
//!
//! Any 2xx or 3xx answer within `timeoutSeconds` is a success. Changes wake the controller.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fleet_api::Probe;
use http_body_util::Empty;
use tokio::sync::Notify;

use crate::lock;
use crate::tasks::PerTarget;
use crate::upstream;

/// How often a not-yet-ready instance is probed.
pub const STARTUP_PERIOD: Duration = Duration::from_millis(50);

/// What the probes say of an instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeState {
    /// Ready now.
    pub ready: bool,
    /// Was ever ready.
    pub was_ready: bool,
    /// Consecutive failures.
    pub failures: u32,
    /// The liveness probe failed `failureThreshold` times in a row.
    pub unhealthy: bool,
    /// Probed at least once (an agent that just started knows nothing yet).
    pub probed: bool,
}

/// One instance to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Container ID.
    pub id: String,
    /// The URL to GET.
    pub url: String,
    /// The probe's settings.
    pub probe: Probe,
    /// The liveness probe: its URL and settings.
    pub liveness: Option<(String, Probe)>,
}

/// The HTTP clients probes use: one keeping a connection per instance, and one for a probe
/// whose pooled connection the instance had closed.
#[derive(Clone, Debug)]
pub struct Http {
    pooled: upstream::Client<Empty<Bytes>>,
    fresh: upstream::Client<Empty<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            pooled: upstream::client(1),
            fresh: upstream::client(0),
        }
    }
}

/// Where probe results come from: the HTTP [`Prober`], or [`ScriptedProbes`] in tests.
pub trait Probes: Send + Sync + 'static {
    /// The probe state of an instance (not ready when unknown).
    fn state(&self, id: &str) -> ProbeState;
    /// Probes exactly these targets.
    fn sync(&self, targets: Vec<Target>);
}

/// Probes whose answers a test decides: every target is ready unless marked failing, from the
/// moment it is probed.
#[derive(Debug, Default)]
pub struct ScriptedProbes {
    targets: Mutex<HashMap<String, Target>>,
    failing: Mutex<std::collections::HashSet<String>>,
    unhealthy: Mutex<std::collections::HashSet<String>>,
    wake: Option<Arc<Notify>>,
}

impl ScriptedProbes {
    /// Scripted probes that wake `wake` when a test changes an answer.
    pub fn new(wake: Option<Arc<Notify>>) -> ScriptedProbes {
        ScriptedProbes {
            wake,
            ..ScriptedProbes::default()
        }
    }

    /// Makes an instance's probe fail (or pass again).
    pub fn set_failing(&self, id: &str, failing: bool) {
        if failing {
            lock(&self.failing).insert(id.to_string());
        } else {
            lock(&self.failing).remove(id);
        }
        self.wake();
    }

    /// Makes an instance's liveness probe fail.
    pub fn set_unhealthy(&self, id: &str) {
        lock(&self.unhealthy).insert(id.to_string());
        self.wake();
    }

    fn wake(&self) {
        if let Some(w) = &self.wake {
            w.notify_one();
        }
    }
}

impl Probes for ScriptedProbes {
    fn state(&self, id: &str) -> ProbeState {
        let known = lock(&self.targets).contains_key(id);
        let ready = known && !lock(&self.failing).contains(id);
        ProbeState {
            ready,
            was_ready: known,
            failures: u32::from(!ready),
            unhealthy: known && lock(&self.unhealthy).contains(id),
            probed: known,
        }
    }

    fn sync(&self, targets: Vec<Target>) {
        let mut known = lock(&self.targets);
        let new = targets.iter().any(|t| !known.contains_key(&t.id));
        *known = targets.into_iter().map(|t| (t.id.clone(), t)).collect();
        drop(known);
        // A new target answers at once, and (like the prober's first success) wakes the loop.
        if new {
            self.wake();
        }
    }
}

/// The prober.
#[derive(Debug)]
pub struct Prober {
    states: Arc<Mutex<HashMap<String, ProbeState>>>,
    tasks: PerTarget<Target>,
    wake: Arc<Notify>,
    client: Http,
}

impl Prober {
    /// A prober that notifies `wake` when an instance's readiness changes.
    pub fn new(wake: Arc<Notify>) -> Prober {
        Prober {
            states: Arc::new(Mutex::new(HashMap::new())),
            tasks: PerTarget::default(),
            wake,
            client: Http::default(),
        }
    }
}

impl Probes for Prober {
    fn state(&self, id: &str) -> ProbeState {
        lock(&self.states).get(id).copied().unwrap_or_default()
    }

    /// Starts new targets, stops those gone, restarts changed ones.
    fn sync(&self, targets: Vec<Target>) {
        let wanted: HashMap<String, Target> =
            targets.into_iter().map(|t| (t.id.clone(), t)).collect();
        lock(&self.states).retain(|id, _| wanted.contains_key(id));
        self.tasks.sync(wanted, |target| {
            let readiness = probe_loop(
                target.clone(),
                self.client.clone(),
                self.states.clone(),
                self.wake.clone(),
            );
            let liveness = liveness_loop(
                target.clone(),
                self.client.clone(),
                self.states.clone(),
                self.wake.clone(),
            );
            tokio::spawn(async move {
                tokio::join!(readiness, liveness);
            })
        });
    }
}

/// The most of a probe answer's body that is read.
pub const PROBE_BODY_LIMIT: usize = 64 * 1024;

/// One GET: true for 2xx/3xx within the timeout.
pub async fn probe_once(client: &Http, url: &str, timeout: Duration) -> bool {
    let Ok(uri) = url.parse::<hyper::Uri>() else {
        return false;
    };
    let get = || {
        let mut req = hyper::Request::new(Empty::new());
        *req.uri_mut() = uri.clone();
        req
    };
    let sent = upstream::send(&client.pooled, &client.fresh, get);
    match tokio::time::timeout(timeout, sent).await {
        Ok(Ok(resp)) => {
            let ok = resp.status().is_success() || resp.status().is_redirection();
            // Drain a small body so the connection can be reused; a larger one is not read (the
            // connection is dropped), whatever the instance sends.
            let body = http_body_util::Limited::new(resp.into_body(), PROBE_BODY_LIMIT);
            let _ = tokio::time::timeout(timeout, http_body_util::BodyExt::collect(body)).await;
            ok
        }
        _ => false,
    }
}

async fn probe_loop(
    target: Target,
    client: Http,
    states: Arc<Mutex<HashMap<String, ProbeState>>>,
    wake: Arc<Notify>,
) {
    let timeout = Duration::from_secs(u64::from(target.probe.timeout_seconds.max(1)));
    let period = Duration::from_secs(u64::from(target.probe.period_seconds.max(1)));
    let threshold = target.probe.failure_threshold.max(1);
    let mut state = lock(&states).get(&target.id).copied().unwrap_or_default();
    loop {
        let ok = probe_once(&client, &target.url, timeout).await;
        let before = state;
        state.probed = true;
        if ok {
            state.failures = 0;
            state.ready = true;
            state.was_ready = true;
        } else {
            state.failures = state.failures.saturating_add(1);
            if state.failures >= threshold {
                state.ready = false;
            }
        }
        {
            let mut all = lock(&states);
            state.unhealthy = all.get(&target.id).is_some_and(|s| s.unhealthy);
            all.insert(target.id.clone(), state);
        }
        if state.ready != before.ready {
            tracing::debug!(id = %target.id, ready = state.ready, "readiness changed");
            wake.notify_one();
        }
        tokio::time::sleep(if state.was_ready {
            period
        } else {
            STARTUP_PERIOD
        })
        .await;
    }
}

async fn liveness_loop(
    target: Target,
    client: Http,
    states: Arc<Mutex<HashMap<String, ProbeState>>>,
    wake: Arc<Notify>,
) {
    let Some((url, probe)) = target.liveness else {
        return;
    };
    let timeout = Duration::from_secs(u64::from(probe.timeout_seconds.max(1)));
    let period = Duration::from_secs(u64::from(probe.period_seconds.max(1)));
    let threshold = probe.failure_threshold.max(1);
    let mut failures = 0u32;
    loop {
        tokio::time::sleep(period).await;
        let started = lock(&states).get(&target.id).is_some_and(|s| s.was_ready);
        if !started {
            continue;
        }
        if probe_once(&client, &url, timeout).await {
            failures = 0;
            continue;
        }
        failures += 1;
        tracing::debug!(id = %target.id, failures, "liveness probe failed");
        if failures >= threshold {
            if let Some(s) = lock(&states).get_mut(&target.id) {
                s.unhealthy = true;
            }
            tracing::warn!(id = %target.id, failures, "liveness probe failing; the instance will be restarted");
            wake.notify_one();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(id: &str) -> Target {
        Target {
            id: id.into(),
            url: format!("http://127.0.0.1:1/{id}"),
            probe: Probe::readiness(),
            liveness: None,
        }
    }

    /// Woken within 50 ms.
    async fn woken(wake: &Notify) -> bool {
        tokio::time::timeout(Duration::from_millis(50), wake.notified())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn scripted_probes_wake_the_loop_for_a_new_target_only() {
        let wake = Arc::new(Notify::new());
        let probes = ScriptedProbes::new(Some(wake.clone()));
        probes.sync(vec![target("a")]);
        assert!(woken(&wake).await, "a new target wakes the loop");
        assert!(probes.state("a").ready);
        probes.sync(vec![target("a")]);
        assert!(!woken(&wake).await, "the same targets do not");
        probes.sync(vec![]);
        assert!(!woken(&wake).await, "a target gone does not");
        assert!(!probes.state("a").ready);
    }
}
