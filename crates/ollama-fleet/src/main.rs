//! `ollama-fleet`: one binary for the CLI and the node agent.
//!
//! Subcommands live in their own modules; this file holds the clap definitions and the
//! mapping of outcomes to exit codes (0 success, 1 invalid input or failed operation,
//! 2 usage error).

mod input;
mod validate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Run fleets of identical Ollama servers on bare-metal containerd, declared once in an
/// `OllamaFleet` manifest.
#[derive(Debug, Parser)]
#[command(name = "ollama-fleet", version, propagate_version = true)]
#[command(after_help = "Examples:\n  \
    ollama-fleet validate -f fleets/          # check every manifest in a directory\n  \
    ollama-fleet schema > ollamafleet.schema.json")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check manifests offline and print every error with its file, line and field path.
    ///
    /// Prints nothing and exits 0 when every manifest is valid; otherwise prints one line per
    /// error (FILE:LINE:COLUMN: FIELD: MESSAGE) to stderr and exits 1.
    Validate(validate::Args),
    /// Print the JSON Schema of the OllamaFleet manifest (the same bytes as
    /// schemas/ollamafleet.schema.json).
    Schema,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Validate(args) => validate::run(&args),
        Command::Schema => {
            print!("{}", fleet_api::schema_json());
            Ok(ExitCode::SUCCESS)
        }
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
