//! `ollama-fleet keys`: the gateway's keys file (`agent --serve-token-file`), checked offline,
//! and new keys made.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::validate::error_line;

/// What to do with keys.
#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// Check a keys file as the agent reads it: prints one line per mistake
    /// (FILE:LINE:COLUMN: FIELD: MESSAGE) and exits 1, or a summary and exits 0.
    Check {
        /// The keys file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Make a key: a random token, printed once, and the entry to add under `keys:` (with the
    /// token's SHA-256 digest only, so the file holds no secret).
    New {
        /// The key's name (shown in logs).
        #[arg(long)]
        name: String,
        /// Its tenant (declared under `tenants:`).
        #[arg(long)]
        tenant: String,
    },
}

/// Runs `keys`.
pub fn run(what: &What) -> anyhow::Result<ExitCode> {
    match what {
        What::Check { file } => check(file),
        What::New { name, tenant } => new(name, tenant),
    }
}

fn check(file: &PathBuf) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let source = file.display().to_string();
    match fleet_api::keys::parse_keys(&text) {
        Ok(keys) => {
            let plain = !fleet_api::keys::is_keys_document(&text);
            println!(
                "{source}: {} key{} of {} tenant{}{}",
                keys.keys.len(),
                if keys.keys.len() == 1 { "" } else { "s" },
                keys.tenants.len(),
                if keys.tenants.len() == 1 { "" } else { "s" },
                if plain {
                    " (a plain token list: every token is tenant default, without limits)"
                } else {
                    ""
                }
            );
            for tenant in keys.tenants.values() {
                let n = keys.keys.iter().filter(|k| k.tenant == tenant.name).count();
                let limits = &tenant.limits;
                let bound = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
                println!(
                    "  {}: {n} key{}, {}, models {}, at once {}, requests/min {}, tokens/min {}",
                    tenant.name,
                    if n == 1 { "" } else { "s" },
                    tenant.priority.as_str(),
                    tenant
                        .models
                        .as_ref()
                        .map_or("all".to_string(), |m| m.join(",")),
                    bound(limits.concurrency.map(u64::from)),
                    bound(limits.requests_per_minute.map(u64::from)),
                    bound(limits.tokens_per_minute),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{}", error_line(&source, e));
            }
            eprintln!(
                "error: {} mistake{} in {source}; the agent keeps the keys it read before until they are fixed",
                errors.len(),
                if errors.len() == 1 { "" } else { "s" }
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

fn new(name: &str, tenant: &str) -> anyhow::Result<ExitCode> {
    for (what, value) in [("--name", name), ("--tenant", tenant)] {
        anyhow::ensure!(
            fleet_api::is_dns_label(value, 63),
            "{what} {value:?}: use 1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit"
        );
    }
    let mut random = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .context("cannot read /dev/urandom")?;
    let token: String = format!(
        "olf_{}",
        random
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let digest = fleet_api::sha256_hex(token.as_bytes());
    eprintln!("the token (give it to the key's owner; it is not shown again):");
    eprintln!("{token}");
    eprintln!("add under keys: in the keys file:");
    println!("  - name: {name}\n    tenant: {tenant}\n    sha256: \"{digest}\"");
    Ok(ExitCode::SUCCESS)
}
