//! The `ollama-sim` binary: `ollama-sim [serve]`, configured by the environment.

use std::process::ExitCode;
use std::time::Duration;

use ollama_sim::{App, Config, faults, start_background};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

const HELP: &str = "\
ollama-sim: an Ollama-compatible test workload with realistic costs and fault injection.

Usage: ollama-sim [serve]        (also installed as /bin/ollama in the test image)
       ollama-sim --version

Routes, following Ollama's server/routes.go, sched.go and create.go (read at Ollama's main
branch, commit fb30760, December 2026), checked by tests/conformance/ollama_api.py with PyPI's
ollama 0.6.3, which runs against a real Ollama too (OLLAMA_URL=...):
  GET|HEAD /                \"Ollama is running\"
  GET  /api/version         {\"version\"} (SIM_VERSION)
  GET  /api/tags, /api/ps   models present / loaded (ps: the one expiring last first)
  POST /api/pull            NDJSON progress; \"verifying sha256 digest\" then \"success\"
  POST /api/generate, /api/chat   streamed or not; no prompt: load only (no slot taken);
                            embedding-only models, thinking, tools, images: 400 before loading
  POST /api/embed, /api/embeddings   deterministic 384-d vectors; no input: load only
  POST /api/create          from (pulled when absent), parameters, system, template;
                            modelfile ignored (400 without from)
  POST /api/show, /api/copy   DELETE /api/delete   HEAD|POST /api/blobs/:digest
  GET  /v1/models   POST /v1/chat/completions, /v1/completions (SSE streams), /v1/embeddings
Scheduling as Ollama's: a request for a loaded model waits for a slot without bound (no 503);
only requests that must load queue (one load plus OLLAMA_MAX_QUEUE); runners are keyed by the
weights, so another name with the same num_thread shares one, a different num_thread reloads;
a request without keep_alive keeps the runner's. Names compare case-insensitively; manifests are
written in place. Deliberate differences: speed and memory are modelled (tokens are canned
words, a loaded model holds SIM_MODEL_SIZE of real memory), embedding-only models are known by
name (all-minilm, *embed*, bge*), no GPU, no files/adapters/quantizing in create, no
registry auth or push.

Ollama's variables:
  OLLAMA_HOST               where to listen          (default 127.0.0.1:11434)
  OLLAMA_MODELS             model store              (default ~/.ollama/models)
  OLLAMA_NUM_PARALLEL       requests served at once  (default 1)
  OLLAMA_MAX_QUEUE          requests that must load a model and wait; more get 503 (default 512)
  OLLAMA_MAX_LOADED_MODELS  models held at once      (default 3)
  OLLAMA_KEEP_ALIVE         default keep-alive: 5m, 0, -1 (forever) (default 5m)
  OLLAMA_NOPRUNE            when unset, unreferenced blobs are deleted at start

Costs:
  SIM_MODEL_SIZE            memory a pulled model holds when loaded (default 64Mi)
  SIM_LOAD_TIME             time to load a model     (default 500ms)
  SIM_PULL_TIME             time a pull takes        (default 1s)
  SIM_PULL_MISSING          comma-separated models the registry does not have
  SIM_TOKENS_PER_SECOND     speed with enough CPU    (default 50; slower when num_thread
                            exceeds the cgroup's CPU quota)
  SIM_NUM_PREDICT           tokens per answer        (default 16)
  SIM_PREFILL_TOKENS_PER_SECOND  prompt evaluation speed for tokens the prompt
                            cache does not hold (default 1000)
  LLAMA_ARG_CACHE_RAM       the prompt cache's cap in MiB, as llama-server reads it
                            (default 8192; 0: none; -1: no cap)
  SIM_KV_BYTES_PER_TOKEN    memory a cached prompt state holds per token (default 0)
  SIM_ENGINE, SIM_ENGINE_MODEL  a llama-server binary and the GGUF it serves for every
                            model: real generation, as Ollama's runner (no prompt cache
                            modelling then: the engine has its own)
  SIM_START_DELAY           wait before listening
  SIM_VERSION               what /api/version says   (default 0.4.0)
  SIM_IDLE_TIMEOUT=1s       close keep-alive connections idle this long (llama.cpp's
                            server does after 5 s; Ollama's never does)
  SIM_KEEPALIVE_MAX=2       serve 2 requests per connection, then drop the next one
                            unanswered with its connection (a server closing an idle
                            connection just as a request arrives)

Faults:
  SIM_CRASH_AFTER=500ms     exit with SIM_EXIT_CODE before ever listening
  SIM_EXIT_AFTER=10s        serve, then exit with SIM_EXIT_CODE
  SIM_EXIT_CODE             (default 1)
  SIM_HANG_AFTER=10s        stop answering anything
  SIM_LEAK_RATE=10Mi        leak that many bytes per second
  SIM_IGNORE_SIGTERM=1      keep running on SIGTERM
  SIM_HOST_CORES=64         the host's cores as the sim sees them (its default thread count)
  SIM_ACCESS_LOG=0          no line per request on stderr (default: one, like Ollama's)
  SIM_BLOB_WALK_DELAY=100ms time per file of the start's walk of blobs/ (a vanishing file
                            ends the start, as in Ollama; the delay widens the window)
  POST /sim/exit {\"code\":3}   POST /sim/hang   POST /sim/leak {\"rate\":\"10Mi\"}   GET /sim/state
";

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None | Some("serve") => {}
        Some("-v" | "--version" | "version") => {
            let v = std::env::var("SIM_VERSION").unwrap_or_else(|_| "0.4.0".into());
            println!("ollama version is {v} (ollama-sim)");
            return ExitCode::SUCCESS;
        }
        Some("-h" | "--help" | "help") => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!(
                "Error: unknown command {other:?} for \"ollama\"; ollama-sim only serves (try --help)"
            );
            return ExitCode::from(2);
        }
    }
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(cfg))
}

async fn run(cfg: Config) -> ExitCode {
    if let Some(after) = cfg.crash_after {
        tokio::time::sleep(after).await;
        faults::exit_now(cfg.exit_code, "SIM_CRASH_AFTER");
    }
    tokio::time::sleep(cfg.start_delay).await;
    let app = App::new(cfg);
    // Ollama's start walks blobs/ (fixBlobs) and gives up when a file vanishes under the walk,
    // as one does when a pull or create finishes in a cache the instance shares.
    let walk_delay = std::env::var("SIM_BLOB_WALK_DELAY")
        .ok()
        .and_then(|d| fleet_api::Duration::parse(&d).ok())
        .map_or(Duration::ZERO, fleet_api::Duration::std);
    if let Err(e) = app.store.walk_blobs(walk_delay).await {
        eprintln!("Error: {e}");
        return ExitCode::FAILURE;
    }
    if !app.cfg.no_prune {
        let removed = app.store.prune();
        eprintln!("level=INFO source=images.go msg=\"total unused blobs removed: {removed}\"");
    }
    let listener = match TcpListener::bind(app.cfg.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("Error: listen tcp {}: bind: {e}", app.cfg.listen);
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "level=INFO source=routes.go msg=\"Listening on {} (version {})\" sim=true models={} parallel={} max_queue={}",
        app.cfg.listen,
        app.cfg.version,
        app.cfg.models_dir.display(),
        app.cfg.num_parallel,
        app.cfg.max_queue
    );
    start_background(&app);
    let ignore = app.cfg.ignore_sigterm;
    let shutdown = async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if ignore {
                eprintln!("level=WARN source=sim msg=\"ignoring SIGTERM (SIM_IGNORE_SIGTERM)\"");
                continue;
            }
            // As Ollama: its SIGTERM handler closes the HTTP server at once (http.Server.Close,
            // not Shutdown), so requests in flight are cut, then it unloads and exits 0.
            eprintln!("level=INFO source=sim msg=\"shutting down\"");
            std::process::exit(0);
        }
    };
    match ollama_sim::serve(app, listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}
