//! A bounded, deterministic mutation fuzzer for the manifest parser and validator (nightly, and
//! so cargo-fuzz's sanitizers, is not available here). Every manifest is untrusted input: no
//! input may panic, a valid result must survive a round trip through its serialised form, and
//! errors stay bounded in number and size.
//!
//! The test suite runs 20,000 inputs; `hack/fuzz.sh` (or `FLEET_FUZZ_ITERATIONS=N
//! FLEET_FUZZ_SEED=S`) runs longer and reports the crash-free run length.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::Instant;

use fleet_api::{Context, parse_fleet, parse_fleets};

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// Fragments that reach YAML's and the decoder's corners: anchors and aliases, tags, flow and
/// block collections, documents, quoting, odd scalars, numbers at their limits, NUL, control
/// and wide characters, and the manifest's own field names and values.
const TOKENS: &[&str] = &[
    "&a ",
    "*a",
    "&b [*a, *a, *a]",
    "!!str ",
    "!!int ",
    "!!binary ",
    "!custom ",
    "{",
    "}",
    "[",
    "]",
    ", ",
    ": ",
    "- ",
    "\n",
    "\n  ",
    "\n    ",
    "---\n",
    "...\n",
    "'",
    "\"",
    "\\",
    "#",
    "|\n  ",
    ">\n  ",
    "? ",
    "~",
    "null",
    "true",
    "yes",
    "0x7fffffffffffffff",
    "-9223372036854775809",
    "1e309",
    ".nan",
    "-.inf",
    "0o777",
    "1.5",
    "-1",
    "0",
    "99999999999",
    "\u{0}",
    "\u{1b}[2J",
    "\u{feff}",
    "é",
    "😀",
    "\t",
    "\r\n",
    "%YAML 1.2\n",
    "<<: *a\n",
    "perNode",
    "perSocket",
    "replicas",
    "resources",
    "memory",
    "cpus",
    "8Gi",
    "16Ei",
    "500m",
    "hostPath",
    "/etc",
    "//",
    "/var/lib/ollama-fleet/models/../..",
    "binaryName",
    "../../bin/sh",
    "env",
    "OLLAMA_NOPRUNE",
    "command",
    "basePort",
    "65535",
    "32767",
    "maxUnavailable",
    "maxSurge",
    "100%",
    "0%",
    "restartBackoff",
    "initial",
    "0s",
    "7d",
    "securityContext",
    "runAsUser",
    "metadata",
    "name",
    "spec",
    "model",
    "image",
    "docker.io/library/x@sha256:",
    "probes",
    "readiness",
    "path",
    "rotation",
    "maxAge",
    "maxMemory",
    "network",
    "hostIP",
    "::1",
    "0.0.0.0",
    "paused",
];

fn seeds() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/examples");
    let mut out: Vec<String> = std::fs::read_dir(&dir)
        .expect("examples")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect();
    out.sort();
    out.push(
        "apiVersion: ollama-fleet.io/v1alpha1\nkind: OllamaFleet\nmetadata: {name: a}\nspec: {model: m, replicas: {perNode: 2}, env: &e {A: '1'}, nodeSelector: *e}\n"
            .into(),
    );
    out.push(
        r#"{"apiVersion":"ollama-fleet.io/v1alpha1","kind":"OllamaFleet","metadata":{"name":"j"},"spec":{"model":"m","replicas":{"perSocket":3},"resources":{"cpus":"500m","memory":"1Gi"}}}"#
            .into(),
    );
    out
}

/// One mutation of `doc`.
fn mutate(doc: &str, rng: &mut Rng, seeds: &[String]) -> String {
    let mut bytes = doc.as_bytes().to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(7) {
            0 => {
                let t = rng.pick(TOKENS).as_bytes();
                bytes.splice(at..at, t.iter().copied());
            }
            1 if !bytes.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(bytes.len());
                bytes.drain(at.min(end)..end);
            }
            2 if !bytes.is_empty() => {
                let i = rng.below(bytes.len());
                bytes[i] ^= 1 << rng.below(8);
            }
            3 => {
                // Splice in a piece of another seed.
                let other = seeds[rng.below(seeds.len())].as_bytes();
                let from = rng.below(other.len());
                let to = (from + rng.below(200)).min(other.len());
                bytes.splice(at..at, other[from..to].iter().copied());
            }
            4 => {
                // Repeat a line: duplicate keys, deep or long documents.
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let lines: Vec<&str> = text.lines().collect();
                if let Some(line) = lines.get(rng.below(lines.len())) {
                    let times = 1 + rng.below(50);
                    let piece = format!("{line}\n").repeat(times);
                    bytes.splice(at..at, piece.bytes());
                }
            }
            5 => {
                let long = "x".repeat(1 + rng.below(20_000));
                bytes.splice(at..at, long.bytes());
            }
            _ => {
                let t = rng.pick(TOKENS);
                let nest = t.repeat(1 + rng.below(80));
                bytes.splice(at..at, nest.bytes());
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The properties every input must have; a description of the violation otherwise.
fn check(input: &str) -> Result<bool, String> {
    let ctx = Context::default();
    let results = catch_unwind(AssertUnwindSafe(|| parse_fleets(input, &ctx)))
        .map_err(|_| "panicked".to_string())?;
    let mut valid = false;
    for r in results {
        match r {
            Ok(fleet) => {
                valid = true;
                // A valid fleet reads back the same from its serialised form.
                let json = serde_json::to_string(&fleet).map_err(|e| format!("serialise: {e}"))?;
                let again = catch_unwind(AssertUnwindSafe(|| parse_fleet(&json, &ctx)))
                    .map_err(|_| "panicked on its own serialised form".to_string())?
                    .map_err(|e| format!("its serialised form is invalid: {e:?}\n{json}"))?;
                if again != fleet {
                    return Err(format!("round trip changed the fleet:\n{json}"));
                }
            }
            Err(errors) => {
                if errors.is_empty() {
                    return Err("an error result without errors".into());
                }
                // Each error line is bounded (field paths and echoed values are clipped).
                if let Some(e) = errors.iter().find(|e| e.to_string().len() > 2_000) {
                    return Err(format!("an error of {} bytes", e.to_string().len()));
                }
            }
        }
    }
    Ok(valid)
}

#[test]
fn no_input_breaks_the_parser() {
    let iterations: u64 = std::env::var("FLEET_FUZZ_ITERATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let seed: u64 = std::env::var("FLEET_FUZZ_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0x5eed);
    let seeds = seeds();
    for s in &seeds {
        assert!(check(s).is_ok_and(|valid| valid), "seeds are valid: {s}");
    }
    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    let (mut valid, mut bytes) = (0u64, 0u64);
    // Mutations build on earlier ones now and then, to get further from the seeds.
    let mut current = seeds[0].clone();
    for i in 0..iterations {
        let base = if rng.below(4) == 0 {
            current.clone()
        } else {
            seeds[rng.below(seeds.len())].clone()
        };
        let input = mutate(&base, &mut rng, &seeds);
        bytes += input.len() as u64;
        match check(&input) {
            Ok(v) => valid += u64::from(v),
            Err(why) => panic!(
                "input {i} (seed {seed}) breaks a property: {why}\n--- input ---\n{}",
                fleet_api::clip(&input, 4000)
            ),
        }
        if input.len() < 200_000 {
            current = input;
        }
    }
    eprintln!(
        "fuzz: {iterations} inputs crash-free (seed {seed}), {valid} valid, {} MiB parsed in {:.1}s",
        bytes >> 20,
        started.elapsed().as_secs_f64()
    );
}
