//! `ollama-fleet delete fleet NAME`.

use std::process::ExitCode;

use fleet_store::Store;

use crate::global::Global;

/// What to delete.
#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// Delete a fleet: every agent stops and removes its instances.
    Fleet {
        /// The fleet's name.
        name: String,
    },
}

/// Deletes; a fleet that does not exist is an error (exit 1).
pub async fn run(global: &Global, what: &What) -> anyhow::Result<ExitCode> {
    let What::Fleet { name } = what;
    let store = global.store().await?;
    if store.delete_fleet(name).await? {
        println!("ollamafleet/{name} deleted");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("error: ollamafleet/{name} not found; `ollama-fleet get fleets` lists them");
        Ok(ExitCode::FAILURE)
    }
}
