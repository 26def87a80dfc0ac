//! The `ollama-fleet` binary's offline commands: `schema` and `validate`, with their exit codes.

use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_ollama-fleet");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(repo());
    fleet_e2e::run_with_stdin(cmd, stdin)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn schema_prints_the_checked_in_file() {
    let out = run(&["schema"], None);
    assert_eq!(out.status.code(), Some(0));
    let file = std::fs::read(repo().join("schemas/ollamafleet.schema.json")).expect("schema file");
    assert!(
        out.stdout == file,
        "`ollama-fleet schema` must print exactly schemas/ollamafleet.schema.json"
    );
}

#[test]
fn valid_examples_are_silent() {
    let out = run(&["validate", "-f", "manifests/examples/"], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    let out = run(
        &["validate", "-v", "-f", "manifests/examples/sim.yaml"],
        None,
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "manifests/examples/sim.yaml: ollamafleet/sim valid\n"
    );
}

const BAD: &str = "apiVersion: ollama-fleet.io/v1alpha1
kind: OllamaFleet
metadata:
  name: devassist
spec:
  replicas: {perNode: -3}
  surprise: true
  resources:
    memory: 12Qi
";

#[test]
fn every_error_at_once_with_field_paths() {
    let out = run(&["validate", "-f", "-"], Some(BAD));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 5, "four errors and a summary:\n{err}");
    assert_eq!(
        lines[0],
        "<stdin>:6:3: spec.model: required field is missing"
    );
    assert_eq!(
        lines[1],
        "<stdin>:6:23: spec.replicas.perNode: must be >= 0, got -3"
    );
    assert!(
        lines[2].starts_with("<stdin>:7:3: spec.surprise: unknown field"),
        "{}",
        lines[2]
    );
    assert!(
        lines[3].starts_with("<stdin>:9:13: spec.resources.memory: invalid quantity \"12Qi\""),
        "{}",
        lines[3]
    );
    assert!(
        lines[4].starts_with("error: 4 errors in 1 file"),
        "{}",
        lines[4]
    );
}

#[test]
fn directories_mix_of_valid_and_invalid_and_duplicate_names() {
    let dir = std::env::temp_dir().join(format!("cli-validate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
    let good =
        std::fs::read_to_string(repo().join("manifests/examples/minimal.yaml")).expect("read");
    std::fs::write(dir.join("a.yaml"), &good).expect("write");
    std::fs::write(dir.join("b.yml"), &good).expect("write");
    std::fs::write(dir.join("notes.txt"), "not a manifest").expect("write");
    std::fs::write(dir.join("sub/c.yaml"), BAD).expect("write");
    let d = dir.display().to_string();

    let out = run(&["validate", "-f", &d], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("fleet \"minimal\" is also defined in"),
        "{}",
        stderr(&out)
    );
    assert!(
        !stderr(&out).contains("sub/c.yaml"),
        "subdirectories need -R"
    );

    let out = run(&["validate", "-R", "-f", &d], None);
    assert!(
        stderr(&out).contains("sub/c.yaml:6:23: spec.replicas.perNode"),
        "{}",
        stderr(&out)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn exit_codes() {
    let out = run(&["validate"], None);
    assert_eq!(out.status.code(), Some(2), "usage error");
    let out = run(&["frobnicate"], None);
    assert_eq!(out.status.code(), Some(2), "usage error");
    let out = run(&["validate", "-f", "/nonexistent/fleet.yaml"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: cannot read /nonexistent/fleet.yaml"),
        "{}",
        stderr(&out)
    );
    let out = run(&["validate", "-f", "-"], Some("a: [unclosed\n"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("<stdin>:"),
        "syntax errors carry a position: {}",
        stderr(&out)
    );
    let out = run(&["--help"], None);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("validate"));
}

#[test]
fn hostile_inputs_fail_fast_and_paths_are_not_ids() {
    // An endless input is cut at the manifest size limit.
    let out = run(&["validate", "-f", "/dev/zero"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("larger than"), "{}", stderr(&out));
    let big = "#".repeat(fleet_api::yaml::MAX_INPUT_BYTES + 10);
    let out = run(&["validate", "-f", "-"], Some(&big));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("larger than"), "{}", stderr(&out));
    // `logs` takes instance IDs, not paths.
    for id in ["../../etc/shadow", "/etc/passwd", "a/b", "x\u{1b}[2J"] {
        let out = run(&["logs", id, "--state-dir", "/tmp"], None);
        assert_eq!(out.status.code(), Some(1), "{id}");
        assert!(
            stderr(&out).contains("not an instance ID"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn an_unreachable_etcd_is_one_line_that_says_what_to_do() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    for args in [
        vec!["get", "fleets"],
        vec!["describe", "fleet", "x"],
        vec!["delete", "fleet", "x"],
        vec!["apply", "-f", "manifests/examples/sim.yaml"],
    ] {
        let mut all = args.clone();
        all.extend(["--etcd-endpoints", &endpoint]);
        let out = run(&all, None);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with(&format!(
                "error: cannot reach etcd at {endpoint}: connection refused;"
            )),
            "{args:?}: {err}"
        );
        assert!(err.contains("--etcd-endpoints"), "{err}");
    }
}

/// `keys check` reads a keys file as the agent does: a summary, or every mistake with its
/// line; `keys new` prints an entry that reads back, and its token (once) on stderr.
#[test]
fn keys_check_and_new() {
    let out = run(&["keys", "check", "manifests/gateway/keys.yaml"], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("2 keys of 2 tenants"), "{summary}");
    assert!(summary.contains("nightly-etl: 1 key, batch"), "{summary}");
    let dir = fleet_e2e::temp_dir("cli-keys");
    let bad = dir.join("keys.yaml");
    std::fs::write(
        &bad,
        "tenants:\n  ed: {priority: soon}\nkeys:\n  - {name: a, tenant: nobody, token: short}\n",
    )
    .expect("write");
    let out = run(&["keys", "check", &bad.display().to_string()], None);
    assert_eq!(out.status.code(), Some(1));
    let errors = stderr(&out);
    for line in [
        ":2:18: tenants.ed.priority: must be interactive or batch, got \"soon\"",
        ":4:38: keys[0].token: must be at least 16",
        ":4:23: keys[0].tenant: tenant \"nobody\" is not declared",
    ] {
        assert!(errors.contains(line), "{line:?} in:\n{errors}");
    }
    let out = run(&["keys", "new", "--name", "ci-bot", "--tenant", "ed"], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let entry = String::from_utf8_lossy(&out.stdout).to_string();
    let token = stderr(&out)
        .lines()
        .find(|l| l.starts_with("olf_"))
        .expect("the token")
        .to_string();
    let file = format!("tenants:\n  ed: {{}}\nkeys:\n{entry}");
    let keys = fleet_api::keys::parse_keys(&file).expect("the entry reads back");
    assert_eq!(keys.keys[0].digest, fleet_api::keys::token_digest(&token));
    assert_eq!(
        run(
            &["keys", "new", "--name", "Bad Name", "--tenant", "ed"],
            None
        )
        .status
        .code(),
        Some(1)
    );
}
