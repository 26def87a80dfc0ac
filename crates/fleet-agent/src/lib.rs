//! The ollama-fleet node agent.
//!
//! - [`controller`]: the level-triggered loop; it only orchestrates the modules below;
//! - [`config`]: the agent's settings;
//! - [`evaluate`]: each fleet document as this node sees it (parsed, admitted, image, hash);
//! - [`readiness`]: readiness and the model cache's work, pure over a pass snapshot;
//! - [`planner`]: pure decisions, `plan(fleets, instances, busy, now) -> Plan`;
//! - [`act`]: the planner's actions as the executor's operations;
//! - [`build`]: pure construction of an instance's container, and its labels read back;
//! - [`policy`]: what fleets may ask of this node (allowlists, default limits, admission);
//! - [`reason`]: typed reasons for waiting (image pulls, model preparation);
//! - [`backoff`], [`topology`]: small pure pieces;
//! - [`images`]: images present, pulled per policy, once per node, with backoff;
//! - [`executor`]: runs operations with bounded concurrency, one at a time per slot;
//! - [`tasks`]: one background task per target (probes, warm-ups), started and stopped to match;
//! - [`upstream`]: the one HTTP client setup for talking to instances, and its typed error;
//! - [`prober`]: HTTP readiness and liveness probes;
//! - [`ollama`]: Ollama's API (show, pull, create with `num_thread`, load), HTTP and scripted;
//! - [`models`]: the node's model cache (one pull per node) and each instance's warm-up;
//! - [`status`]: status computation (pure; [`status::report`] per fleet, with conditions) and
//!   the writer that writes only changes;
//! - [`publish`]: the etcd session, node record and status writes, beside the loop (never in it);
//! - [`said`]: what the agent logs once for the operator (refused fleets, missing host files, swap);
//! - [`gateway`]: the node gateway (`agent --serve`): routes, dispatch, proxying, auth, metrics;
//! - [`view`], [`http`]: what the agent shows: `/healthz`, `/readyz`, `/metrics`, `/instances`;
//! - [`prom`]: the Prometheus text format, written in one place (and read back in tests).
//!
//! Time is read through [`fleet_runtime::clock`], so tests can pause it.

pub mod act;
pub mod backoff;
pub mod build;
pub mod config;
pub mod controller;
pub mod evaluate;
pub mod executor;
pub mod gateway;
pub mod http;
pub mod images;
pub mod models;
pub mod ollama;
pub mod planner;
pub mod policy;
pub mod prober;
pub mod prom;
pub mod publish;
pub mod readiness;
pub mod reason;
pub mod recall;
pub mod said;
pub mod status;
pub mod tasks;
pub mod topology;
pub mod upstream;
pub mod view;

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking over from a holder that panicked (what the agent keeps behind a mutex is
/// plain state, never left half-written: a panic elsewhere must not take the agent down too).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `bytes` in MiB, for progress messages.
pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}
