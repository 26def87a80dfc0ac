//! `ollama-fleet describe fleet NAME`: the spec in short, each node's status and conditions,
//! and the instances' recent exits.

use std::fmt::Write;
use std::process::ExitCode;
use std::time::SystemTime;

use fleet_api::{FleetSpec, Phase, Replicas};

use crate::get::{FleetView, fleets};
use crate::global::Global;
use crate::table::{age, render, time};

/// What to describe.
#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// A fleet: its spec in short, per-node status and conditions, recent exits.
    Fleet {
        /// The fleet's name.
        name: String,
    },
}

fn spec_lines(spec: &FleetSpec, out: &mut String) {
    let r = &spec.resources;
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let replicas = match spec.replicas {
        Replicas::PerSocket(n) => format!("{n} per socket"),
        Replicas::PerNode(n) => format!("{n} per node"),
    };
    let rows = [
        ("Model", spec.model.clone()),
        (
            "Image",
            format!("{} ({:?})", spec.image, spec.image_pull_policy),
        ),
        ("Replicas", replicas),
        (
            "Resources",
            format!(
                "cpus {}, memory {}, pids {}, cpu pinning {}, prompt cache {}",
                opt(r.cpus.map(|c| c.to_string())),
                opt(r.memory.map(|m| m.to_string())),
                opt(r.pids.map(|p| p.to_string())),
                match r.cpu_pinning {
                    fleet_api::CpuPinning::None => "none",
                    fleet_api::CpuPinning::Socket => "socket",
                },
                match r.prompt_cache {
                    fleet_api::PromptCache::Auto => "auto".to_string(),
                    fleet_api::PromptCache::Engine => "engine".to_string(),
                    fleet_api::PromptCache::Bytes(q) => q.to_string(),
                }
            ),
        ),
        (
            "Network",
            format!(
                "{}, ports from {}",
                spec.network.host_ip, spec.network.base_port
            ),
        ),
        (
            "Models",
            format!(
                "{} (pull {}, warm {})",
                if spec.models.host_path.is_empty() {
                    "no shared cache"
                } else {
                    &spec.models.host_path
                },
                spec.models.pull,
                spec.models.warm
            ),
        ),
        (
            "Rotation",
            format!(
                "maxAge {}, maxMemory {}",
                opt(spec.rotation.max_age.map(|d| d.to_string())),
                opt(spec.rotation.max_memory.map(|m| m.to_string()))
            ),
        ),
        (
            "Rollout",
            format!(
                "maxUnavailable {}, maxSurge {}",
                spec.rollout.max_unavailable, spec.rollout.max_surge
            ),
        ),
        ("Paused", spec.paused.to_string()),
    ];
    for (k, v) in rows {
        let _ = writeln!(out, "{:<14}{v}", format!("{k}:"));
    }
}

fn describe(v: &FleetView, now: SystemTime) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:<14}{}", "Name:", v.doc.name);
    let _ = writeln!(out, "{:<14}{}", "Generation:", v.doc.revision);
    match &v.parsed {
        Ok(f) => {
            let labels: Vec<String> = f
                .metadata
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let labels = if labels.is_empty() {
                "-".to_string()
            } else {
                labels.join(",")
            };
            let _ = writeln!(out, "{:<14}{labels}", "Labels:");
            spec_lines(&f.spec, &mut out);
        }
        Err(e) => {
            let _ = writeln!(out, "{:<14}the stored manifest is invalid: {e}", "Spec:");
        }
    }
    let sum = |f: fn(&fleet_api::FleetStatus) -> u32| -> u32 { v.statuses.iter().map(f).sum() };
    let _ = writeln!(
        out,
        "{:<14}{} desired, {} ready, {} up to date, on {} node(s)",
        "Instances:",
        sum(|s| s.desired_replicas),
        sum(|s| s.ready_replicas),
        sum(|s| s.updated_replicas),
        v.statuses.len()
    );
    if v.statuses.is_empty() {
        let _ = writeln!(
            out,
            "\nNo node reports this fleet yet (is an agent running?)."
        );
    }
    for s in &v.statuses {
        let synced = if s.observed_generation == v.doc.revision {
            "current".to_string()
        } else {
            format!("still on generation {}", s.observed_generation)
        };
        let _ = writeln!(
            out,
            "\nNode {} ({synced}; updated {} ago):",
            s.node,
            age(time(&s.updated_at), now)
        );
        let phases = [
            Phase::Ready,
            Phase::Starting,
            Phase::Pending,
            Phase::Unready,
            Phase::BackOff,
            Phase::Terminating,
        ];
        let counts: Vec<String> = phases
            .iter()
            .filter_map(|p| {
                let n = s.instances.iter().filter(|i| i.phase == *p).count();
                (n > 0).then(|| format!("{n} {p}"))
            })
            .collect();
        let _ = writeln!(
            out,
            "  Instances: {} desired, {} ready, {} up to date ({})",
            s.desired_replicas,
            s.ready_replicas,
            s.updated_replicas,
            if counts.is_empty() {
                "none".to_string()
            } else {
                counts.join(", ")
            }
        );
        if let Some(cache) = &s.prompt_cache {
            let said = match cache.as_str() {
                "engine" => "the engine's own (8 GiB)".to_string(),
                "pending" => "none yet: sized once the model is on this node".to_string(),
                size => format!("{size} per new instance (LLAMA_ARG_CACHE_RAM)"),
            };
            let _ = writeln!(out, "  Prompt cache: {said}");
        }
        let rows: Vec<Vec<String>> = s
            .conditions
            .iter()
            .map(|c| {
                vec![
                    c.kind.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    age(time(&c.last_transition_time), now),
                    c.message.clone(),
                ]
            })
            .collect();
        if !rows.is_empty() {
            let table = render(&["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"], &rows);
            for line in table.lines() {
                let _ = writeln!(out, "  {}", line.trim_end());
            }
        }
        let waiting: Vec<String> = s
            .instances
            .iter()
            .filter(|i| i.phase != Phase::Ready)
            .filter_map(|i| {
                let m = i.message.as_deref()?;
                Some(format!("  slot {} ({}): {m}", i.slot, i.phase))
            })
            .collect();
        for w in waiting.iter().take(10) {
            let _ = writeln!(out, "{w}");
        }
    }
    let mut exits: Vec<Vec<String>> = v
        .statuses
        .iter()
        .flat_map(|s| {
            s.instances.iter().filter_map(|i| {
                let e = i.last_exit.as_ref()?;
                Some(vec![
                    e.at.clone(),
                    s.node.clone(),
                    i.slot.to_string(),
                    if i.id.is_empty() {
                        "-".into()
                    } else {
                        i.id.clone()
                    },
                    format!("{} ({})", e.reason, e.code),
                    i.restarts.to_string(),
                ])
            })
        })
        .collect();
    exits.sort_by(|a, b| b[0].cmp(&a[0]));
    exits.truncate(10);
    if exits.is_empty() {
        let _ = writeln!(out, "\nRecent exits: none");
    } else {
        let _ = writeln!(out, "\nRecent exits:");
        let table = render(
            &["AT", "NODE", "SLOT", "INSTANCE", "EXIT", "RESTARTS"],
            &exits,
        );
        for line in table.lines() {
            let _ = writeln!(out, "  {}", line.trim_end());
        }
    }
    out
}

/// Runs `describe`.
pub async fn run(global: &Global, what: &What) -> anyhow::Result<ExitCode> {
    let What::Fleet { name } = what;
    let store = global.store().await?;
    let views = fleets(&store, Some(name)).await?;
    let Some(view) = views.first() else {
        eprintln!("error: ollamafleet/{name} not found; `ollama-fleet get fleets` lists them");
        return Ok(ExitCode::FAILURE);
    };
    // Messages and exits come from containers and registries: escape control characters.
    for line in describe(view, SystemTime::now()).lines() {
        println!("{}", fleet_api::printable(line));
    }
    Ok(ExitCode::SUCCESS)
}
