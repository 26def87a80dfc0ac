//! What the agent tells the node's operator in its log, once until it changes: the fleets this
//! node refuses (at warn level, with the fix), the host files instances go without, and a host
//! whose cgroups cannot bound swap.

use std::collections::{BTreeMap, BTreeSet};

use crate::evaluate::{Eval, Evals};
use crate::policy::{self, Host, Policy};

/// What has been said so far.
#[derive(Debug, Default)]
pub struct Said {
    refusals: BTreeMap<String, &'static str>,
    missing_files: BTreeSet<String>,
    swap: Option<bool>,
}

impl Said {
    /// Logs each fleet this node refuses (or cuts) once per reason, at warn level, with what to
    /// do; and when it is admitted again.
    pub fn refusals(&mut self, evals: &Evals, policy: &Policy) {
        let said = &mut self.refusals;
        said.retain(|name, _| evals.contains_key(name));
        for (name, (_, eval)) in evals {
            let refusal = match eval {
                Eval::Refused { refusal, .. }
                | Eval::Run {
                    cut: Some(refusal), ..
                } => refusal,
                _ => {
                    if said.remove(name).is_some() {
                        tracing::info!(fleet = %name, "fleet admitted on this node");
                    }
                    continue;
                }
            };
            if said.get(name) != Some(&refusal.reason()) {
                said.insert(name.clone(), refusal.reason());
                let what = if refusal.partial() {
                    "fleet admitted with fewer instances on this node"
                } else {
                    "fleet not admitted on this node: nothing of it starts here"
                };
                tracing::warn!(fleet = %name, reason = refusal.reason(),
                    why = %refusal.message(policy), "{what}");
            }
        }
    }

    /// What instances created now get from `host`: the files they see (said once when one is
    /// missing, and when it is back) and whether their swap is bounded (asked once, said when
    /// it cannot be).
    pub fn host(&mut self, host: &dyn Host) -> (Vec<String>, bool) {
        let files = host.files();
        for file in policy::HOST_FILES {
            let present = files.iter().any(|f| f == file);
            if !present && self.missing_files.insert(file.to_string()) {
                tracing::warn!(
                    file,
                    "this host has no {file}: instances created now go without it (create it, and replace the instances, to give it to them)"
                );
            } else if present && self.missing_files.remove(file) {
                tracing::info!(
                    file,
                    "this host has {file} again: instances created from now on see it"
                );
            }
        }
        let swap = *self.swap.get_or_insert_with(|| {
            let bounded = host.bounds_swap();
            if !bounded {
                tracing::warn!("this host's cgroups do not account swap (cgroup v1 without swapaccount=1): instances cannot be kept from swapping; boot the kernel with swapaccount=1 or turn swap off");
            }
            bounded
        });
        (files, swap)
    }
}
