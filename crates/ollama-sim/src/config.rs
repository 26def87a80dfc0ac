//! Configuration from the environment: Ollama's own variables and the sim's `SIM_*` knobs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fleet_api::{Duration as FleetDuration, Quantity};

/// How long a model stays loaded after a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepAlive {
    /// Unload after this long without requests (zero: at once).
    For(Duration),
    /// Never unload (a negative value).
    Forever,
}

impl KeepAlive {
    /// Parses Ollama's forms: a Go-style duration (`5m`, `-1m`, `0`) or a number of seconds
    /// (`300`, `-1`); negative means forever.
    pub fn parse(text: &str) -> Result<KeepAlive, String> {
        let t = text.trim();
        if let Some(rest) = t.strip_prefix('-') {
            return if rest.is_empty() {
                Err(format!("invalid keep_alive {text:?}"))
            } else {
                Ok(KeepAlive::Forever)
            };
        }
        if let Ok(secs) = t.parse::<f64>() {
            return Ok(KeepAlive::For(Duration::from_secs_f64(secs)));
        }
        FleetDuration::parse(t)
            .map(|d| KeepAlive::For(d.std()))
            .map_err(|_| format!("invalid keep_alive {text:?}: use e.g. 5m, 0 or -1"))
    }

    /// From a JSON request field: a number of seconds or a duration string.
    pub fn from_json(v: &serde_json::Value) -> Result<KeepAlive, String> {
        match v {
            serde_json::Value::Number(n) => {
                let secs = n.as_f64().unwrap_or(0.0);
                if secs < 0.0 {
                    Ok(KeepAlive::Forever)
                } else {
                    Ok(KeepAlive::For(Duration::from_secs_f64(secs)))
                }
            }
            serde_json::Value::String(s) => KeepAlive::parse(s),
            _ => Err("keep_alive must be a duration or a number of seconds".into()),
        }
    }
}

/// Everything the sim reads from its environment.
#[derive(Clone, Debug)]
pub struct Config {
    /// `OLLAMA_HOST`: where to listen (default 127.0.0.1:11434).
    pub listen: SocketAddr,
    /// `OLLAMA_MODELS`: the model store (default `~/.ollama/models`).
    pub models_dir: PathBuf,
    /// `OLLAMA_NUM_PARALLEL`: requests served at once (default 1).
    pub num_parallel: usize,
    /// `OLLAMA_MAX_QUEUE`: requests waiting beyond those (default 512); more get a 503.
    pub max_queue: usize,
    /// `OLLAMA_MAX_LOADED_MODELS`: models held at once (default 3).
    pub max_loaded_models: usize,
    /// `OLLAMA_KEEP_ALIVE`: default keep-alive (default 5m).
    pub keep_alive: KeepAlive,
    /// `OLLAMA_NOPRUNE`: when unset, unreferenced blobs are deleted at start, as Ollama does.
    pub no_prune: bool,
    /// `SIM_VERSION`: what `/api/version` reports (default 0.4.0).
    pub version: String,
    /// `SIM_MODEL_SIZE`: memory a pulled model holds when loaded (default 64Mi).
    pub model_size: u64,
    /// `SIM_LOAD_TIME`: time to load a model (default 500ms).
    pub load_time: Duration,
    /// `SIM_PULL_TIME`: time a pull takes (default 1s).
    pub pull_time: Duration,
    /// `SIM_PULL_MISSING`: comma-separated model names the registry does not have.
    pub pull_missing: Vec<String>,
    /// `SIM_TOKENS_PER_SECOND`: generation speed with enough CPU (default 50).
    pub tokens_per_second: f64,
    /// `SIM_PREFILL_TOKENS_PER_SECOND`: prompt evaluation speed, for the tokens the prompt
    /// cache does not hold (default 1000).
    pub prefill_per_second: f64,
    /// `LLAMA_ARG_CACHE_RAM`: the prompt cache's cap in MiB, as llama-server reads it (default
    /// 8192; 0: no cache; -1: no cap).
    pub cache_ram_mib: i64,
    /// `SIM_KV_BYTES_PER_TOKEN`: memory a cached prompt state holds per token (default 0: the
    /// cache costs time only; the real SmolLM2-135M holds about 22Ki).
    pub kv_bytes_per_token: u64,
    /// `SIM_NUM_PREDICT`: tokens generated when the request does not say (default 16).
    pub num_predict: usize,
    /// `SIM_START_DELAY`: wait before listening (slow start).
    pub start_delay: Duration,
    /// `SIM_CRASH_AFTER`: exit with `SIM_EXIT_CODE` this long after start, without ever listening.
    pub crash_after: Option<Duration>,
    /// `SIM_EXIT_AFTER`: serve, then exit with `SIM_EXIT_CODE` this long after start.
    pub exit_after: Option<Duration>,
    /// `SIM_EXIT_CODE`: the code for the two above (default 1).
    pub exit_code: i32,
    /// `SIM_IDLE_TIMEOUT`: close a keep-alive connection idle this long (llama.cpp's server
    /// closes them after 5 s; Ollama's never does).
    pub idle_timeout: Option<Duration>,
    /// `SIM_KEEPALIVE_MAX`: serve this many requests on a connection; the next one is dropped
    /// unanswered with the connection, as by a server whose keep-alive timer runs out just as
    /// the request arrives (the client may send it again on a fresh connection).
    pub keepalive_max: Option<usize>,
    /// `SIM_HANG_AFTER`: stop answering any request this long after start.
    pub hang_after: Option<Duration>,
    /// `SIM_LEAK_RATE`: bytes per second leaked (allocated, touched, never freed).
    pub leak_rate: u64,
    /// `SIM_IGNORE_SIGTERM`: keep running on SIGTERM (to exercise the grace period and SIGKILL).
    pub ignore_sigterm: bool,
    /// `SIM_ACCESS_LOG`: a line on stderr per request, like Ollama's access log (default on;
    /// `0` turns it off, e.g. for benchmarks).
    pub access_log: bool,
    /// Physical cores of the host, which Ollama sizes its threads from (not the cgroup);
    /// `SIM_HOST_CORES` overrides the count from `/proc/cpuinfo`, so a small test machine can
    /// look like a many-core server.
    pub host_cores: usize,
    /// `OLLAMA_CONTEXT_LENGTH`: tokens of context per parallel slot (default 4096).
    pub context_length: usize,
    /// `SIM_ENGINE` and `SIM_ENGINE_MODEL`: a `llama-server` binary and the GGUF it serves for
    /// every model: generation is real, as Ollama's runner does it (see [`crate::engine`]).
    pub engine: Option<crate::engine::Engine>,
}

/// Default Ollama port.
pub const DEFAULT_PORT: u16 = 11434;

impl Config {
    /// Reads the configuration from `vars`; the error names the variable and what is allowed.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Config, String> {
        let get = |k: &str| vars.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let duration = |k: &str| -> Result<Option<Duration>, String> {
            get(k)
                .map(|v| FleetDuration::parse(v).map(FleetDuration::std))
                .transpose()
                .map_err(|e| format!("{k}: {e}"))
        };
        let number = |k: &str, default: usize| -> Result<usize, String> {
            get(k).map_or(Ok(default), |v| {
                v.parse()
                    .map_err(|_| format!("{k}: {v:?} is not a non-negative integer"))
            })
        };
        let quantity = |k: &str, default: u64| -> Result<u64, String> {
            get(k).map_or(Ok(default), |v| {
                Quantity::parse(v)
                    .map(Quantity::bytes)
                    .map_err(|e| format!("{k}: {e}"))
            })
        };
        let flag =
            |k: &str| get(k).is_some_and(|v| !matches!(v, "0" | "false" | "FALSE" | "False"));
        let home = vars.get("HOME").cloned().unwrap_or_else(|| "/root".into());
        Ok(Config {
            listen: parse_host(get("OLLAMA_HOST").unwrap_or(""))
                .map_err(|e| format!("OLLAMA_HOST: {e}"))?,
            models_dir: get("OLLAMA_MODELS")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(home).join(".ollama/models")),
            num_parallel: number("OLLAMA_NUM_PARALLEL", 1)?.max(1),
            max_queue: number("OLLAMA_MAX_QUEUE", 512)?,
            max_loaded_models: number("OLLAMA_MAX_LOADED_MODELS", 3)?.max(1),
            keep_alive: get("OLLAMA_KEEP_ALIVE")
                .map(KeepAlive::parse)
                .transpose()
                .map_err(|e| format!("OLLAMA_KEEP_ALIVE: {e}"))?
                .unwrap_or(KeepAlive::For(Duration::from_secs(300))),
            no_prune: flag("OLLAMA_NOPRUNE"),
            version: get("SIM_VERSION").unwrap_or("0.4.0").to_string(),
            model_size: quantity("SIM_MODEL_SIZE", 64 << 20)?,
            load_time: duration("SIM_LOAD_TIME")?.unwrap_or(Duration::from_millis(500)),
            pull_time: duration("SIM_PULL_TIME")?.unwrap_or(Duration::from_secs(1)),
            pull_missing: get("SIM_PULL_MISSING")
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            prefill_per_second: get("SIM_PREFILL_TOKENS_PER_SECOND").map_or(Ok(1000.0), |v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|t| *t > 0.0 && t.is_finite())
                    .ok_or_else(|| {
                        format!("SIM_PREFILL_TOKENS_PER_SECOND: {v:?} is not a positive number")
                    })
            })?,
            cache_ram_mib: get("LLAMA_ARG_CACHE_RAM").map_or(Ok(8192), |v| {
                v.parse::<i64>()
                    .ok()
                    .filter(|n| *n >= -1)
                    .ok_or_else(|| format!("LLAMA_ARG_CACHE_RAM: {v:?} is not MiB (or -1)"))
            })?,
            kv_bytes_per_token: quantity("SIM_KV_BYTES_PER_TOKEN", 0)?,
            tokens_per_second: get("SIM_TOKENS_PER_SECOND").map_or(Ok(50.0), |v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|t| *t > 0.0 && t.is_finite())
                    .ok_or_else(|| format!("SIM_TOKENS_PER_SECOND: {v:?} is not a positive number"))
            })?,
            num_predict: number("SIM_NUM_PREDICT", 16)?,
            start_delay: duration("SIM_START_DELAY")?.unwrap_or_default(),
            crash_after: duration("SIM_CRASH_AFTER")?,
            exit_after: duration("SIM_EXIT_AFTER")?,
            exit_code: get("SIM_EXIT_CODE").map_or(Ok(1), |v| {
                v.parse()
                    .map_err(|_| format!("SIM_EXIT_CODE: {v:?} is not an integer"))
            })?,
            hang_after: duration("SIM_HANG_AFTER")?,
            idle_timeout: duration("SIM_IDLE_TIMEOUT")?,
            keepalive_max: get("SIM_KEEPALIVE_MAX")
                .map(|v| {
                    v.parse::<usize>()
                        .map_err(|_| format!("SIM_KEEPALIVE_MAX: {v:?} is not a count"))
                })
                .transpose()?,
            leak_rate: quantity("SIM_LEAK_RATE", 0)?,
            ignore_sigterm: flag("SIM_IGNORE_SIGTERM"),
            access_log: get("SIM_ACCESS_LOG").is_none() || flag("SIM_ACCESS_LOG"),
            host_cores: match get("SIM_HOST_CORES") {
                Some(v) => v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("SIM_HOST_CORES: {v:?} is not a positive integer"))?,
                None => host_physical_cores(),
            },
            context_length: number("OLLAMA_CONTEXT_LENGTH", 4096)?.max(256),
            engine: match (get("SIM_ENGINE"), get("SIM_ENGINE_MODEL")) {
                (None, None) => None,
                (Some(binary), Some(model)) => Some(crate::engine::Engine {
                    binary: binary.into(),
                    model: model.into(),
                }),
                _ => return Err("SIM_ENGINE and SIM_ENGINE_MODEL go together".into()),
            },
        })
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Config, String> {
        Config::from_vars(&std::env::vars().collect())
    }
}

/// Parses `OLLAMA_HOST` the way Ollama does: `[scheme://]host[:port]`, host may be empty
/// (`:8080`) or bracketed IPv6; default 127.0.0.1:11434.
pub fn parse_host(text: &str) -> Result<SocketAddr, String> {
    let s = text.trim();
    let s = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .unwrap_or(s);
    let s = s.trim_end_matches('/');
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, tail) = rest
            .split_once(']')
            .ok_or_else(|| format!("{text:?}: unclosed '['"))?;
        (h, tail.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            _ => (s, None),
        }
    };
    let host = if host.is_empty() { "127.0.0.1" } else { host };
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p
            .parse()
            .map_err(|_| format!("{text:?}: port {p:?} is not a number"))?,
    };
    let ip: std::net::IpAddr = host
        .parse()
        .map_err(|_| format!("{text:?}: {host:?} is not an IP address"))?;
    Ok(SocketAddr::new(ip, port))
}

/// Physical cores from /proc/cpuinfo (unique physical id and core id pairs), as Ollama counts
/// them; falls back to the number of logical cpus.
fn host_physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return logical;
    };
    let mut cores = std::collections::HashSet::new();
    let mut processors = 0;
    let mut physical = String::new();
    for line in info.lines() {
        let mut parts = line.splitn(2, ':');
        let key = parts.next().unwrap_or("").trim();
        let value = parts.next().unwrap_or("").trim();
        match key {
            "processor" => processors += 1,
            "physical id" => physical = value.to_string(),
            "core id" => {
                cores.insert((physical.clone(), value.to_string()));
            }
            _ => {}
        }
    }
    if !cores.is_empty() {
        cores.len()
    } else if processors > 0 {
        processors
    } else {
        logical
    }
}

/// The CPU allowance of this process's cgroup in cores (CFS quota / period, v1 or v2), if any.
pub fn cgroup_cpu_allowance() -> Option<f64> {
    if let Ok(max) = std::fs::read_to_string("/sys/fs/cgroup/cpu.max") {
        let mut parts = max.split_whitespace();
        let quota = parts.next()?;
        let period: f64 = parts.next()?.parse().ok()?;
        return quota.parse::<f64>().ok().map(|q| q / period);
    }
    let read = |f: &str| -> Option<f64> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/cpu/{f}"))
            .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/cpu,cpuacct/{f}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let quota = read("cpu.cfs_quota_us")?;
    let period = read("cpu.cfs_period_us")?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ollama_host_forms() {
        let cases = [
            ("", "127.0.0.1:11434"),
            ("0.0.0.0", "0.0.0.0:11434"),
            (":8080", "127.0.0.1:8080"),
            ("127.0.0.1:21434", "127.0.0.1:21434"),
            ("http://127.0.0.1:9", "127.0.0.1:9"),
            ("localhost:7", "127.0.0.1:7"),
            ("[::1]:5", "[::1]:5"),
            ("::1", "[::1]:11434"),
        ];
        for (text, want) in cases {
            assert_eq!(
                parse_host(text).map(|a| a.to_string()),
                Ok(want.to_string()),
                "{text}"
            );
        }
        assert!(parse_host("example.com:1").is_err());
        assert!(parse_host("1.2.3.4:x").is_err());
    }

    #[test]
    fn keep_alive_forms() {
        assert_eq!(KeepAlive::parse("-1"), Ok(KeepAlive::Forever));
        assert_eq!(KeepAlive::parse("-1m"), Ok(KeepAlive::Forever));
        assert_eq!(KeepAlive::parse("0"), Ok(KeepAlive::For(Duration::ZERO)));
        assert_eq!(
            KeepAlive::parse("300"),
            Ok(KeepAlive::For(Duration::from_secs(300)))
        );
        assert_eq!(
            KeepAlive::parse("5m"),
            Ok(KeepAlive::For(Duration::from_secs(300)))
        );
        assert!(KeepAlive::parse("soon").is_err());
        assert_eq!(
            KeepAlive::from_json(&serde_json::json!(-1)),
            Ok(KeepAlive::Forever)
        );
        assert_eq!(
            KeepAlive::from_json(&serde_json::json!("10s")),
            Ok(KeepAlive::For(Duration::from_secs(10)))
        );
    }

    #[test]
    fn config_defaults_and_errors() {
        let vars: HashMap<String, String> = [("HOME".to_string(), "/home/x".to_string())].into();
        let c = Config::from_vars(&vars).expect("defaults");
        assert_eq!(c.listen.to_string(), "127.0.0.1:11434");
        assert_eq!(c.models_dir, PathBuf::from("/home/x/.ollama/models"));
        assert_eq!(c.num_parallel, 1);
        assert_eq!(c.max_queue, 512);
        assert!(!c.no_prune);
        assert_eq!(c.model_size, 64 << 20);
        let bad: HashMap<String, String> =
            [("SIM_MODEL_SIZE".to_string(), "12Qi".to_string())].into();
        assert!(
            Config::from_vars(&bad)
                .expect_err("bad")
                .starts_with("SIM_MODEL_SIZE")
        );
        let bad: HashMap<String, String> =
            [("OLLAMA_NUM_PARALLEL".to_string(), "x".to_string())].into();
        assert!(Config::from_vars(&bad).is_err());
    }
}
