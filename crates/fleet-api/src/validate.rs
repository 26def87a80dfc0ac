//! Rules that span several fields of a decoded fleet (single-field rules live in the decoder).

use crate::decode::FieldError;
use crate::manifest::{EPHEMERAL_PORT_START, OllamaFleet, spec_path};
use crate::units::Duration;
use crate::yaml::{Node, Pos, Value};

/// What validation needs to know about the node the fleet would run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    /// CPU sockets of the node; `perSocket` counts are multiplied by it.
    pub sockets: u32,
}

impl Default for Context {
    /// Offline validation assumes the common two-socket node.
    fn default() -> Self {
        Context { sockets: 2 }
    }
}

/// Checks the rules across fields; `root` is the document, used for error positions.
pub fn validate(fleet: &OllamaFleet, ctx: &Context, root: Option<&Node>) -> Vec<FieldError> {
    validate_except(fleet, ctx, root, &[])
}

/// Like [`validate`], but skips every rule that reads a field with an error in `known`
/// (their values are placeholders, so the rule would only add noise).
pub(crate) fn validate_except(
    fleet: &OllamaFleet,
    ctx: &Context,
    root: Option<&Node>,
    known: &[FieldError],
) -> Vec<FieldError> {
    let spec = &fleet.spec;
    let mut errs = Vec::new();
    let broken = |field: &str| {
        let field = spec_path(field);
        known.iter().any(|e| {
            e.path.is_empty()
                || e.path == "spec"
                || e.path.starts_with(&field)
                || field.starts_with(&e.path)
        })
    };
    let mut add = |path: &str, reads: &[&str], message: String| {
        if reads.iter().any(|r| broken(r)) {
            return;
        }
        let pos = root.and_then(|r| position(r, path));
        errs.push(FieldError::new(path, message).at(pos));
    };

    // Ports: slot i listens on basePort + i, surge instances after the last slot.
    let replicas = spec.replicas.count(ctx.sockets);
    let (_, surge) = spec.rollout.budget(replicas);
    let first = u32::from(spec.network.base_port);
    let count = replicas + surge;
    if count > 0 {
        let last = first + count - 1;
        let per = match spec.replicas {
            crate::Replicas::PerSocket(_) => format!(" on a {}-socket node", ctx.sockets),
            crate::Replicas::PerNode(_) => String::new(),
        };
        if last > 65535 {
            add(
                &spec_path("network.basePort"),
                PORT_FIELDS,
                format!(
                    "{count} instances{per} need ports {first}..{last}, beyond 65535; lower basePort or replicas"
                ),
            );
        } else if last >= EPHEMERAL_PORT_START {
            add(
                &spec_path("network.basePort"),
                PORT_FIELDS,
                format!(
                    "{count} instances{per} need ports {first}..{last}, which reach the ephemeral range (32768 and up) that Ollama's runners use; keep the last port below 32768"
                ),
            );
        }
    }

    if spec.rollout.max_unavailable.is_zero() && spec.rollout.max_surge.is_zero() {
        add(
            &spec_path("rollout"),
            &["rollout"],
            "maxUnavailable and maxSurge cannot both be 0: a rollout could never make progress"
                .into(),
        );
    }

    let backoff = &spec.restart_backoff;
    if backoff.initial < MIN_BACKOFF {
        add(
            &spec_path("restartBackoff.initial"),
            &["restartBackoff"],
            format!(
                "must be at least {MIN_BACKOFF}, got {}: a crashing instance would be restarted in a tight loop",
                backoff.initial
            ),
        );
    } else if backoff.max < backoff.initial {
        add(
            &spec_path("restartBackoff.max"),
            &["restartBackoff"],
            format!(
                "must be at least initial ({}), got {}",
                backoff.initial, backoff.max
            ),
        );
    }

    if !spec.models.host_path.is_empty()
        && let Some(v) = spec.env.get("OLLAMA_NOPRUNE")
        && v != "1"
    {
        add(
            &spec_path("env[OLLAMA_NOPRUNE]"),
            &["env", "models"],
            format!(
                "must be \"1\" (or absent) while models.hostPath is shared, got {:?}: an instance that prunes at start deletes blobs the node's other instances are pulling or using",
                crate::clip(v, 32)
            ),
        );
    }

    if let Some(age) = spec.rotation.max_age
        && age < Duration::secs(1)
    {
        add(
            &spec_path("rotation.maxAge"),
            &["rotation.maxAge"],
            format!("must be at least 1s, got {age}"),
        );
    }
    if let (Some(max), Some(limit)) = (spec.rotation.max_memory, spec.resources.memory)
        && max >= limit
    {
        add(
            &spec_path("rotation.maxMemory"),
            &["rotation.maxMemory", "resources.memory"],
            format!(
                "must be below spec.resources.memory ({limit}), got {max}: the instance would be OOM-killed before it is rotated"
            ),
        );
    }
    errs
}

/// The shortest restart backoff accepted.
const MIN_BACKOFF: Duration = Duration::millis(100);

const PORT_FIELDS: &[&str] = &["replicas", "network", "rollout"];

/// The position of the value at a dotted path (`spec.network.basePort`), or of the deepest
/// parent present.
fn position(root: &Node, path: &str) -> Option<Pos> {
    let mut node = root;
    // `spec.env[KEY]` walks spec, env, KEY.
    let parts = path.split('.').flat_map(|part| match part.split_once('[') {
        Some((name, key)) => vec![name, key.trim_end_matches(']')],
        None => vec![part],
    });
    for part in parts {
        let Value::Map(entries) = &node.value else {
            break;
        };
        match entries.iter().find(|(k, _)| k.name == part) {
            Some((_, v)) => node = v,
            None => break,
        }
    }
    Some(node.pos)
}
