//! `ollama-fleet get fleets|instances|nodes`: an aggregated view across nodes.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::SystemTime;

use fleet_api::{FleetStatus, NodeInfo, Quantity, emit};
use fleet_store::{FleetDoc, Store};
use serde_json::{Value, json};

use crate::global::Global;
use crate::table::{age, render, time};

/// What to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Fleets, summed over nodes.
    #[value(alias = "fleet", alias = "ollamafleets", alias = "ollamafleet")]
    Fleets,
    /// Every instance on every node.
    #[value(alias = "instance")]
    Instances,
    /// Registered nodes.
    #[value(alias = "node")]
    Nodes,
}

/// Arguments of `get`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to list.
    pub kind: Kind,
    /// Only this fleet (for fleets and instances) or node (for nodes).
    pub name: Option<String>,
    /// Output format.
    #[arg(short, long, default_value = "table", value_parser = ["table", "wide", "yaml", "json"])]
    pub output: String,
}

/// One fleet with its status on every node.
pub struct FleetView {
    /// The stored document.
    pub doc: FleetDoc,
    /// It, parsed (or why not).
    pub parsed: Result<fleet_api::OllamaFleet, String>,
    /// Every node's status of it.
    pub statuses: Vec<FleetStatus>,
}

impl FleetView {
    fn summary(&self) -> Value {
        let desired: u32 = self.statuses.iter().map(|s| s.desired_replicas).sum();
        let ready: u32 = self.statuses.iter().map(|s| s.ready_replicas).sum();
        let updated: u32 = self.statuses.iter().map(|s| s.updated_replicas).sum();
        let synced = self
            .statuses
            .iter()
            .filter(|s| s.observed_generation == self.doc.revision)
            .count();
        let oldest = self
            .statuses
            .iter()
            .flat_map(|s| s.instances.iter())
            .filter_map(|i| i.started_at.as_deref().and_then(time))
            .min();
        let (model, image, labels) = match &self.parsed {
            Ok(f) => (
                f.spec.model.clone(),
                f.spec.image.clone(),
                f.metadata
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            Err(_) => ("<invalid>".into(), "-".into(), String::new()),
        };
        json!({
            "name": self.doc.name,
            "generation": self.doc.revision,
            "model": model,
            "image": image,
            "labels": labels,
            "nodes": self.statuses.len(),
            "nodesObservedGeneration": synced,
            "desired": desired,
            "ready": ready,
            "upToDate": updated,
            "oldestInstanceStartedAt": oldest.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            "error": self.parsed.as_ref().err(),
        })
    }
}

/// The fleets (or just `only`) with every node's status.
pub async fn fleets(store: &impl Store, only: Option<&str>) -> anyhow::Result<Vec<FleetView>> {
    Ok(fleets_and_orphans(store, only).await?.0)
}

/// The fleets (or just `only`) with every node's status, and the status of fleets already
/// deleted (their instances are being removed).
async fn fleets_and_orphans(
    store: &impl Store,
    only: Option<&str>,
) -> anyhow::Result<(Vec<FleetView>, Vec<FleetStatus>)> {
    let docs = store.list_fleets().await?;
    let mut statuses: BTreeMap<String, Vec<FleetStatus>> = BTreeMap::new();
    for s in fleet_agent::status::read(store, only).await? {
        statuses.entry(s.fleet.clone()).or_default().push(s);
    }
    let views: Vec<FleetView> = docs
        .into_iter()
        .filter(|d| only.is_none_or(|n| n == d.name))
        .map(|doc| FleetView {
            parsed: fleet_api::parse_fleet(&doc.value, &fleet_api::Context::default()).map_err(
                |errs| {
                    errs.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                },
            ),
            statuses: statuses.remove(&doc.name).unwrap_or_default(),
            doc,
        })
        .collect();
    Ok((views, statuses.into_values().flatten().collect()))
}

fn print_structured(format: &str, items: Vec<Value>) {
    let list = json!({"apiVersion": "ollama-fleet.io/v1alpha1", "kind": "List", "items": items});
    if format == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&list).unwrap_or_default()
        );
    } else {
        print!("{}", emit::json_to_yaml(&list));
    }
}

/// Runs `get`.
pub async fn run(global: &Global, args: &Args) -> anyhow::Result<ExitCode> {
    let store = global.store().await?;
    let now = SystemTime::now();
    let structured = matches!(args.output.as_str(), "json" | "yaml");
    let wide = args.output == "wide";
    match args.kind {
        Kind::Fleets => {
            let views = fleets(&store, args.name.as_deref()).await?;
            if let Some(name) = &args.name
                && views.is_empty()
            {
                eprintln!("error: ollamafleet/{name} not found");
                return Ok(ExitCode::FAILURE);
            }
            if structured {
                let items = views
                    .iter()
                    .map(|v| {
                        let manifest = fleet_api::yaml::parse_stream(&v.doc.value)
                            .ok()
                            .and_then(|d| d.first().map(fleet_api::yaml::Node::to_json));
                        json!({"summary": v.summary(), "manifest": manifest, "status": v.statuses})
                    })
                    .collect();
                print_structured(&args.output, items);
                return Ok(ExitCode::SUCCESS);
            }
            let mut header = vec![
                "NAME",
                "MODEL",
                "NODES",
                "DESIRED",
                "READY",
                "UP-TO-DATE",
                "AGE",
            ];
            if wide {
                header.extend(["GENERATION", "SYNCED", "IMAGE", "LABELS"]);
            }
            let rows: Vec<Vec<String>> = views
                .iter()
                .map(|v| {
                    let s = v.summary();
                    let text = |k: &str| {
                        s[k].as_str()
                            .map_or_else(|| s[k].to_string(), str::to_string)
                    };
                    let mut row = vec![
                        text("name"),
                        text("model"),
                        text("nodes"),
                        text("desired"),
                        text("ready"),
                        text("upToDate"),
                        age(s["oldestInstanceStartedAt"].as_str().and_then(time), now),
                    ];
                    if wide {
                        row.extend([
                            text("generation"),
                            format!("{}/{}", s["nodesObservedGeneration"], s["nodes"]),
                            text("image"),
                            text("labels"),
                        ]);
                    }
                    row
                })
                .collect();
            if rows.is_empty() {
                eprintln!("No fleets found.");
            } else {
                print!("{}", render(&header, &rows));
            }
            for v in &views {
                if let Err(e) = &v.parsed {
                    eprintln!("warning: ollamafleet/{} is invalid: {e}", v.doc.name);
                }
                let stale: Vec<&str> = v
                    .statuses
                    .iter()
                    .filter(|s| s.observed_generation != v.doc.revision)
                    .map(|s| s.node.as_str())
                    .collect();
                if !stale.is_empty() {
                    eprintln!(
                        "note: ollamafleet/{}: node(s) {} have not yet acted on generation {}",
                        v.doc.name,
                        stale.join(", "),
                        v.doc.revision
                    );
                }
            }
        }
        Kind::Instances => {
            let (views, orphans) = fleets_and_orphans(&store, args.name.as_deref()).await?;
            let mut statuses: Vec<&FleetStatus> =
                views.iter().flat_map(|v| v.statuses.iter()).collect();
            statuses.extend(orphans.iter());
            statuses.sort_by(|a, b| (&a.node, &a.fleet).cmp(&(&b.node, &b.fleet)));
            if structured {
                let items = statuses
                    .iter()
                    .flat_map(|s| {
                        s.instances.iter().map(|i| {
                            let mut v = serde_json::to_value(i).unwrap_or_default();
                            v["node"] = json!(s.node);
                            v["fleet"] = json!(s.fleet);
                            v
                        })
                    })
                    .collect();
                print_structured(&args.output, items);
                return Ok(ExitCode::SUCCESS);
            }
            let mut header = vec![
                "NODE", "FLEET", "ID", "SLOT", "PORT", "PHASE", "READY", "RESTARTS", "AGE",
            ];
            if wide {
                header.extend(["SPEC-HASH", "LAST-EXIT", "MESSAGE"]);
            }
            let mut rows = Vec::new();
            for s in statuses {
                for i in &s.instances {
                    let mut row = vec![
                        s.node.clone(),
                        s.fleet.clone(),
                        i.id.clone(),
                        i.slot.to_string(),
                        i.port.to_string(),
                        i.phase.to_string(),
                        i.ready.to_string(),
                        i.restarts.to_string(),
                        age(i.started_at.as_deref().and_then(time), now),
                    ];
                    if wide {
                        row.extend([
                            i.spec_hash.clone(),
                            i.last_exit.as_ref().map_or("-".into(), |e| {
                                format!("{} ({}) {}", e.reason, e.code, e.at)
                            }),
                            i.message.clone().unwrap_or_default(),
                        ]);
                    }
                    rows.push(row);
                }
            }
            if rows.is_empty() {
                eprintln!("No instances found.");
            } else {
                print!("{}", render(&header, &rows));
            }
        }
        Kind::Nodes => {
            let nodes: Vec<NodeInfo> = store
                .list_nodes()
                .await?
                .into_iter()
                .filter(|e| args.name.as_ref().is_none_or(|n| *n == e.node))
                .filter_map(|e| serde_json::from_str(&e.value).ok())
                .collect();
            if structured {
                print_structured(
                    &args.output,
                    nodes
                        .iter()
                        .map(|n| serde_json::to_value(n).unwrap_or_default())
                        .collect(),
                );
                return Ok(ExitCode::SUCCESS);
            }
            let header = [
                "NAME",
                "SOCKETS",
                "CPUS",
                "MEMORY",
                "AGENT",
                "CONTAINERD",
                "HEARTBEAT",
                "LABELS",
            ];
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| {
                    vec![
                        n.name.clone(),
                        n.capacity.sockets.to_string(),
                        n.capacity.cpus.to_string(),
                        Quantity(n.capacity.memory_bytes / (1 << 20) * (1 << 20)).to_string(),
                        n.versions.agent.clone(),
                        n.versions.containerd.clone(),
                        age(time(&n.heartbeat), now) + " ago",
                        n.labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(","),
                    ]
                })
                .collect();
            if rows.is_empty() {
                eprintln!("No nodes found.");
            } else {
                print!("{}", render(&header, &rows));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
