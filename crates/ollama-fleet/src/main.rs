//! `ollama-fleet`: one binary for the CLI and the node agent.
//!
//! Subcommands live in their own modules; this file holds the clap definitions and the
//! mapping of outcomes to exit codes (0 success, 1 invalid input or failed operation,
//! 2 usage error).

mod agent;
mod apply;
mod delete;
mod describe;
mod get;
mod global;
mod input;
mod keys;
mod logs;
mod table;
mod usage;
mod validate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Run fleets of identical Ollama servers on bare-metal containerd, declared once in an
/// `OllamaFleet` manifest stored in etcd and converged by an agent on every node.
#[derive(Debug, Parser)]
#[command(name = "ollama-fleet", version, propagate_version = true)]
#[command(after_help = "Examples:\n  \
    ollama-fleet validate -f fleets/               # check manifests offline (CI)\n  \
    ollama-fleet apply -f fleets/devassist.yaml    # store a fleet in etcd\n  \
    ollama-fleet agent --node-name epyc-07         # run the node agent\n  \
    ollama-fleet get fleets                        # the fleets, summed over nodes\n  \
    ollama-fleet get instances devassist -o wide   # every instance of a fleet\n  \
    ollama-fleet describe fleet devassist          # per-node status, conditions, exits\n  \
    ollama-fleet logs devassist-3-7f2a91 -f        # an instance's log (on its node)\n  \
    ollama-fleet delete fleet devassist            # agents remove its instances")]
struct Cli {
    #[command(flatten)]
    global: global::Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent: converge this node's containerd to the fleets in etcd (or in a
    /// directory, with --manifests).
    Agent(Box<agent::Args>),
    /// Validate manifests, then store each in etcd (created, configured or unchanged).
    Apply(apply::Args),
    /// Check manifests offline and print every error with its file, line and field path.
    ///
    /// Prints nothing and exits 0 when every manifest is valid; otherwise prints one line per
    /// error (FILE:LINE:COLUMN: FIELD: MESSAGE) to stderr and exits 1.
    Validate(validate::Args),
    /// List fleets, instances or nodes, aggregated over every node's status.
    Get(get::Args),
    /// Show a fleet in detail: its spec in short, each node's status and conditions, and the
    /// instances' recent exits.
    Describe {
        #[command(subcommand)]
        what: describe::What,
    },
    /// Print an instance's log (run it on the node that runs the instance).
    Logs(logs::Args),
    /// Delete a fleet: agents stop and remove its instances.
    Delete {
        #[command(subcommand)]
        what: delete::What,
    },
    /// The gateway's keys file: check one, or make a new key.
    Keys {
        #[command(subcommand)]
        what: keys::What,
    },
    /// Who used what: requests, refusals, tokens and time to first token by tenant, from the
    /// agents' /metrics (--agent, since each agent started) or from Prometheus (over --window).
    Usage(usage::Args),
    /// Print the JSON Schema of the OllamaFleet manifest (the same bytes as
    /// schemas/ollamafleet.schema.json).
    Schema,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Validate(args) => validate::run(&args),
        Command::Logs(args) => logs::run(&args),
        Command::Keys { what } => keys::run(&what),
        Command::Schema => {
            print!("{}", fleet_api::schema_json());
            Ok(ExitCode::SUCCESS)
        }
        command => {
            // Sockets passed by systemd are taken before any thread runs (their variables are
            // removed from the environment).
            let activated = matches!(command, Command::Agent(_)).then(agent::activated_socket);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(async {
                match command {
                    Command::Agent(args) => {
                        cli.global.init_logging();
                        agent::run(&cli.global, &args, activated.unwrap_or(Ok(None))).await
                    }
                    Command::Apply(args) => apply::run(&cli.global, &args).await,
                    Command::Get(args) => get::run(&cli.global, &args).await,
                    Command::Describe { what } => describe::run(&cli.global, &what).await,
                    Command::Delete { what } => delete::run(&cli.global, &what).await,
                    Command::Usage(args) => usage::run(&args).await,
                    Command::Validate(_)
                    | Command::Logs(_)
                    | Command::Schema
                    | Command::Keys { .. } => {
                        unreachable!("handled above")
                    }
                }
            })
        }
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", cli.global.explain(&e));
            ExitCode::FAILURE
        }
    }
}
