//! `ollama-fleet validate`: offline validation of manifests.

use std::collections::BTreeMap;
use std::process::ExitCode;

use fleet_api::{Context, FieldError};

use crate::input::{ManifestArgs, Source};

/// Arguments of `validate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub manifests: ManifestArgs,
    /// Also print a line for every valid fleet.
    #[arg(short, long)]
    pub verbose: bool,
}

/// One line of output for an error: `FILE:LINE:COL: FIELD: MESSAGE`.
pub fn error_line(source: &str, e: &FieldError) -> String {
    match e.pos {
        Some(pos) => format!("{source}:{}:{}: {e}", pos.line, pos.col),
        None => format!("{source}: {e}"),
    }
}

/// Validates every manifest named by `args`; exit 1 when any is invalid.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let sources = args.manifests.read()?;
    let ctx = args.manifests.context();
    let (valid, errors) = check(&sources, &ctx);
    if args.verbose {
        for (source, name) in &valid {
            println!("{source}: ollamafleet/{name} valid");
        }
    }
    for line in &errors {
        eprintln!("{line}");
    }
    if errors.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        let files = sources.len();
        eprintln!(
            "error: {} error{} in {files} file{}; fix them and run validate again",
            errors.len(),
            if errors.len() == 1 { "" } else { "s" },
            if files == 1 { "" } else { "s" },
        );
        Ok(ExitCode::FAILURE)
    }
}

/// Returns the valid fleets (source, name) and one line per error, including a fleet name
/// defined twice.
fn check(sources: &[Source], ctx: &Context) -> (Vec<(String, String)>, Vec<String>) {
    let mut valid = Vec::new();
    let mut errors = Vec::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for source in sources {
        for result in fleet_api::parse_fleets(&source.text, ctx) {
            match result {
                Ok(fleet) => {
                    let name = fleet.name().to_string();
                    if let Some(first) = seen.get(&name) {
                        errors.push(format!(
                            "{}: metadata.name: fleet {name:?} is also defined in {first}; names must be unique",
                            source.name
                        ));
                    } else {
                        seen.insert(name.clone(), source.name.clone());
                        valid.push((source.name.clone(), name));
                    }
                }
                Err(errs) => errors.extend(errs.iter().map(|e| error_line(&source.name, e))),
            }
        }
    }
    (valid, errors)
}
