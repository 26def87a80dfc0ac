//! Fleet evaluation: each fleet document, as this node sees it. Parsed and validated once per
//! revision, selected by `nodeSelector`, admitted by the node's policy, its image resolved, its
//! spec hash computed. What the planner, the model gates and status read about a fleet comes
//! from here.

use std::collections::{BTreeMap, HashMap};

use fleet_api::{Context, OllamaFleet, spec_hash};
use fleet_runtime::{ImageInfo, Runtime};
use fleet_store::FleetDoc;

use crate::build::InstanceLabels;
use crate::config::AgentConfig;
use crate::images::{Images, Resolution};
use crate::policy::{self, Host, Refusal};
use crate::reason::Waiting;

/// One fleet, evaluated for this node.
#[derive(Debug)]
pub enum Eval {
    /// This node runs it (`replicas` may be 0: not selected here).
    Run {
        /// The fleet, with the node's defaults applied.
        fleet: Box<OllamaFleet>,
        /// Instances on this node.
        replicas: u32,
        /// The spec hash of the manifest as written.
        hash: String,
        /// Its image, once present.
        image: Option<Box<ImageInfo>>,
        /// Why the image is not there yet.
        image_wait: Option<Waiting>,
        /// The memory each instance asks for in the manifest (admission counts it).
        request: Option<u64>,
        /// Admitted with fewer instances than asked for (and why).
        cut: Option<Refusal>,
    },
    /// `spec.paused`.
    Paused(Box<OllamaFleet>),
    /// The document does not parse or validate: why.
    Invalid(String),
    /// Valid, but this node does not run it: what runs is kept, nothing starts.
    Refused {
        /// The fleet, with the node's defaults applied.
        fleet: Box<OllamaFleet>,
        /// Instances it asked for on this node.
        replicas: u32,
        /// Why not.
        refusal: Refusal,
    },
}

impl Eval {
    /// The fleet, when its document is valid.
    pub fn fleet(&self) -> Option<&OllamaFleet> {
        match self {
            Eval::Run { fleet, .. } | Eval::Paused(fleet) | Eval::Refused { fleet, .. } => {
                Some(fleet)
            }
            Eval::Invalid(_) => None,
        }
    }
}

/// Every fleet evaluated: name -> (revision, evaluation).
pub type Evals = BTreeMap<String, (i64, Eval)>;

/// A fleet document parsed and validated for this node: (fleet, its replicas here), or why not.
type Parsed = Result<(OllamaFleet, u32), String>;

/// The fleets as this node last evaluated them.
#[derive(Debug, Default)]
pub struct Fleets {
    /// Each fleet's document as last parsed, by revision.
    parsed: HashMap<String, (i64, Parsed)>,
    /// Each fleet as last valid (a broken document keeps the last good spec for its instances).
    pub last_valid: HashMap<String, OllamaFleet>,
}

impl Fleets {
    /// Evaluates `docs` (`None`: the fleet list is not known yet, nothing is evaluated or
    /// forgotten). Returns the evaluations and each fleet's creation revision.
    pub async fn evaluate<R: Runtime>(
        &mut self,
        docs: Option<&BTreeMap<String, FleetDoc>>,
        cfg: &AgentConfig,
        host: &(dyn Host + Send + Sync),
        images: &Images<R>,
    ) -> (Evals, HashMap<String, i64>) {
        let mut evals = Evals::new();
        let mut created = HashMap::new();
        for doc in docs.iter().flat_map(|d| d.values()) {
            created.insert(doc.name.clone(), doc.created);
            let eval = match self.parsed(doc, cfg) {
                Err(e) => Eval::Invalid(e),
                Ok((fleet, _)) if fleet.spec.paused => Eval::Paused(Box::new(fleet)),
                Ok((mut fleet, replicas)) if replicas > 0 => {
                    match cfg.policy.admit(&fleet.spec, host) {
                        Err(refusal) => {
                            fleet.spec = cfg.policy.effective(&fleet.spec);
                            Eval::Refused {
                                fleet: Box::new(fleet),
                                replicas,
                                refusal,
                            }
                        }
                        Ok(()) => self.admitted(doc, fleet, replicas, cfg, images).await,
                    }
                }
                Ok((fleet, replicas)) => self.admitted(doc, fleet, replicas, cfg, images).await,
            };
            if let Some(fleet) = eval.fleet() {
                self.last_valid.insert(doc.name.clone(), fleet.clone());
            }
            evals.insert(doc.name.clone(), (doc.revision, eval));
        }
        if docs.is_some() {
            self.last_valid.retain(|name, _| evals.contains_key(name));
            self.parsed.retain(|name, _| evals.contains_key(name));
        }
        (evals, created)
    }

    /// Takes the fleets recalled from the last agent's file as the last valid ones, while the
    /// store has not answered (used to probe and serve what runs, never to plan).
    pub fn recall(&mut self, docs: &[FleetDoc], cfg: &AgentConfig) {
        if !self.last_valid.is_empty() {
            return;
        }
        for doc in docs {
            if let Ok((mut fleet, _)) = parse(doc, cfg) {
                fleet.spec = cfg.policy.effective(&fleet.spec);
                self.last_valid.insert(doc.name.clone(), fleet);
            }
        }
    }

    /// A fleet document parsed and validated for this node: (fleet, replicas here), or the
    /// errors. Parsed once per revision, not once per pass.
    fn parsed(&mut self, doc: &FleetDoc, cfg: &AgentConfig) -> Parsed {
        if let Some((revision, parsed)) = self.parsed.get(&doc.name)
            && *revision == doc.revision
        {
            return parsed.clone();
        }
        let parsed = parse(doc, cfg);
        self.parsed
            .insert(doc.name.clone(), (doc.revision, parsed.clone()));
        parsed
    }

    /// A fleet this node runs (or could run: `replicas` may be 0), with its image resolved.
    async fn admitted<R: Runtime>(
        &self,
        doc: &FleetDoc,
        mut fleet: OllamaFleet,
        replicas: u32,
        cfg: &AgentConfig,
        images: &Images<R>,
    ) -> Eval {
        // The hash is of the manifest as written: a change of the agent's defaults rolls
        // nothing out (as a Kubernetes LimitRange applies when a pod is created).
        let written = fleet.spec.clone();
        fleet.spec = cfg.policy.effective(&fleet.spec);
        let name = fleet
            .spec
            .image_ref()
            .map(|r| r.to_string())
            .unwrap_or_default();
        let changed = self
            .last_valid
            .get(&doc.name)
            .is_none_or(|f| f.spec != fleet.spec);
        let (image, image_wait) = if replicas == 0 {
            (None, None)
        } else {
            let policy = fleet.spec.image_pull_policy;
            match images.ensure(&name, policy, doc.revision, changed).await {
                Resolution::Ready(i) => (Some(i), None),
                Resolution::Waiting(w) => (None, Some(w)),
            }
        };
        // Under `Always` a new digest of the tag is a change that rolls out; under
        // `IfNotPresent`/`Never` what runs keeps running when the tag moves locally (as in
        // Kubernetes), so the digest is not part of the hash.
        let digest = match fleet.spec.image_pull_policy {
            fleet_api::PullPolicy::Always => image.as_ref().map_or("", |i| i.digest.as_str()),
            _ => "",
        };
        let hash = spec_hash(&written, digest);
        Eval::Run {
            fleet: Box::new(fleet),
            replicas,
            hash,
            image,
            image_wait,
            request: request_of(&written.resources),
            cut: None,
        }
    }
}

/// The memory each instance asks for, as admission counts it: `resources.memory`; without one,
/// a prompt cache the manifest sizes itself (it will hold that much).
fn request_of(r: &fleet_api::Resources) -> Option<u64> {
    match (r.memory, r.prompt_cache) {
        (Some(m), _) => Some(m.bytes()),
        (None, fleet_api::PromptCache::Bytes(c)) if c.bytes() > 0 => Some(c.bytes()),
        (None, _) => None,
    }
}

fn parse(doc: &FleetDoc, cfg: &AgentConfig) -> Parsed {
    let ctx = Context {
        sockets: cfg.sockets,
    };
    let fleet = fleet_api::parse_fleet(&doc.value, &ctx).map_err(|errs| {
        errs.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    if fleet.name() != doc.name {
        return Err(format!(
            "metadata.name {:?} does not match the key's name {:?}",
            fleet.name(),
            doc.name
        ));
    }
    let selected = fleet
        .spec
        .node_selector
        .iter()
        .all(|(k, v)| cfg.labels.get(k) == Some(v));
    let replicas = if selected {
        fleet.spec.replicas.count(cfg.sockets)
    } else {
        0
    };
    Ok((fleet, replicas))
}

/// Admission across the fleets this node runs: later fleets whose ports overlap an earlier
/// one's are refused; fleets that ask for memory run as many instances as fit (`memory`: the
/// node's).
pub fn admit_across(
    evals: &mut Evals,
    created: &HashMap<String, i64>,
    labelled: &[(&fleet_runtime::Observed, InstanceLabels)],
    policy: &policy::Policy,
    memory: u64,
) {
    let running = |name: &str| {
        labelled
            .iter()
            .filter(|(_, l)| l.fleet == name)
            .map(|(_, l)| l.slot + 1)
            .max()
            .unwrap_or(0)
    };
    let claims: Vec<policy::Claim<'_>> = evals
        .iter()
        .filter_map(|(name, (_, eval))| match eval {
            Eval::Run {
                fleet,
                replicas,
                request,
                ..
            } if *replicas > 0 => Some(policy::Claim {
                name,
                created: created.get(name).copied().unwrap_or(i64::MAX),
                spec: &fleet.spec,
                memory: *request,
                replicas: *replicas,
                running: running(name),
            }),
            _ => None,
        })
        .collect();
    let verdicts = policy::admit_all(&claims, policy, memory);
    drop(claims);
    for (name, (admitted, refusal)) in verdicts {
        let (Some(refusal), Some((_, eval))) = (refusal, evals.get_mut(&name)) else {
            continue;
        };
        if refusal.partial() {
            if let Eval::Run { replicas, cut, .. } = eval {
                *replicas = admitted;
                *cut = Some(refusal);
            }
            continue;
        }
        let placeholder = Eval::Invalid(String::new());
        if let Eval::Run {
            fleet, replicas, ..
        } = std::mem::replace(eval, placeholder)
        {
            *eval = Eval::Refused {
                fleet,
                replicas,
                refusal,
            };
        }
    }
}
