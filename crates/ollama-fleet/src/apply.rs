//! `ollama-fleet apply`: validate every manifest, then store each with compare-and-swap.

use std::process::ExitCode;

use fleet_api::yaml;
use fleet_store::{Expect, Store, StoreError};

use crate::global::Global;
use crate::input::ManifestArgs;
use crate::validate::error_line;

/// Arguments of `apply`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub manifests: ManifestArgs,
}

/// Whether two stored documents say the same thing (formatting aside).
pub fn same_content(a: &str, b: &str) -> bool {
    match (yaml::parse_stream(a), yaml::parse_stream(b)) {
        (Ok(x), Ok(y)) => {
            x.iter().map(yaml::Node::to_json).collect::<Vec<_>>()
                == y.iter().map(yaml::Node::to_json).collect::<Vec<_>>()
        }
        _ => a == b,
    }
}

/// Validates everything first (nothing is written if anything is invalid), then stores each
/// fleet and says `created`, `configured` or `unchanged`.
pub async fn run(global: &Global, args: &Args) -> anyhow::Result<ExitCode> {
    let sources = args.manifests.read()?;
    let ctx = args.manifests.context();
    let mut fleets: Vec<(String, String)> = Vec::new();
    let mut errors = Vec::new();
    for source in &sources {
        let docs = match yaml::parse_stream(&source.text) {
            Ok(d) => d,
            Err(e) => {
                errors.push(error_line(
                    &source.name,
                    &fleet_api::FieldError::new("", e.message).at(e.pos),
                ));
                continue;
            }
        };
        for doc in docs {
            match fleet_api::decode_document(&doc, &ctx) {
                Ok(fleet) => {
                    if fleets.iter().any(|(n, _)| n == fleet.name()) {
                        errors.push(format!(
                            "{}: metadata.name: fleet {:?} is given twice",
                            source.name,
                            fleet.name()
                        ));
                    }
                    fleets.push((fleet.name().to_string(), fleet_api::emit::to_yaml(&doc)));
                }
                Err(errs) => errors.extend(errs.iter().map(|e| error_line(&source.name, e))),
            }
        }
    }
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("{e}");
        }
        eprintln!(
            "error: {} error(s); nothing was applied; fix them and run apply again",
            errors.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    if fleets.is_empty() {
        anyhow::bail!("no fleets in the given files");
    }
    let store = global.store().await?;
    for (name, text) in fleets {
        let outcome = apply_one(&store, &name, &text).await?;
        println!("ollamafleet/{name} {outcome}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Stores one fleet; retries a lost compare-and-swap by reading again.
pub async fn apply_one(store: &impl Store, name: &str, text: &str) -> anyhow::Result<&'static str> {
    for _ in 0..5 {
        let current = store.get_fleet(name).await?;
        let result = match &current {
            None => store
                .put_fleet(name, text, Expect::Absent)
                .await
                .map(|_| "created"),
            Some(doc) if same_content(&doc.value, text) => return Ok("unchanged"),
            Some(doc) => store
                .put_fleet(name, text, Expect::Revision(doc.revision))
                .await
                .map(|_| "configured"),
        };
        match result {
            Ok(outcome) => return Ok(outcome),
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("ollamafleet/{name} kept changing while it was applied; try again")
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_store::memory::MemoryStore;

    #[tokio::test]
    async fn created_configured_unchanged() {
        let s = MemoryStore::default();
        assert_eq!(
            apply_one(&s, "a", "x: 1\n").await.expect("apply"),
            "created"
        );
        assert_eq!(
            apply_one(&s, "a", "x: 1\n").await.expect("apply"),
            "unchanged"
        );
        assert_eq!(
            apply_one(&s, "a", "{\"x\": 1}").await.expect("apply"),
            "unchanged",
            "formatting is not a change"
        );
        assert_eq!(
            apply_one(&s, "a", "x: 2\n").await.expect("apply"),
            "configured"
        );
    }
}
