//! Table tests: every validation rule, valid and invalid, through the public API.

use fleet_api::{Context, FieldError, OllamaFleet, parse_fleet};

const HEADER: &str =
    "apiVersion: ollama-fleet.io/v1alpha1\nkind: OllamaFleet\nmetadata:\n  name: demo\n";

/// A document whose spec is `model: m, replicas: {perNode: 2}` plus `extra` (YAML lines of
/// the spec, two-space indented), so each case changes one thing.
fn doc(extra: &str) -> String {
    let mut s = format!("{HEADER}spec:\n  model: smollm2:135m\n");
    if !extra.contains("replicas:") {
        s.push_str("  replicas: {perNode: 2}\n");
    }
    for line in extra.lines() {
        s.push_str("  ");
        s.push_str(line);
        s.push('\n');
    }
    s
}

fn check(src: &str) -> Result<OllamaFleet, Vec<FieldError>> {
    parse_fleet(src, &Context { sockets: 2 })
}

/// Asserts that `src` fails with exactly one error at `path` whose message contains `needle`.
#[track_caller]
fn fails(src: &str, path: &str, needle: &str) {
    match check(src) {
        Ok(_) => panic!("expected an error at {path}, got a valid fleet from:\n{src}"),
        Err(errs) => {
            assert_eq!(
                errs.len(),
                1,
                "one error expected for {path}, got {errs:#?}"
            );
            assert_eq!(errs[0].path, path, "{errs:#?}");
            assert!(
                errs[0].message.contains(needle),
                "message {:?} should contain {needle:?}",
                errs[0].message
            );
            assert!(
                errs[0].pos.is_some(),
                "errors from a document carry a position"
            );
        }
    }
}

#[track_caller]
fn passes(src: &str) -> OllamaFleet {
    check(src).unwrap_or_else(|e| panic!("expected valid, got {e:#?} for:\n{src}"))
}

#[test]
fn defaults_match_the_interface() {
    let f = passes(&doc(""));
    let s = &f.spec;
    assert_eq!(s.image, "docker.io/ollama/ollama:0.4.0");
    assert_eq!(s.image_pull_policy, fleet_api::PullPolicy::IfNotPresent);
    assert_eq!(s.network.host_ip.to_string(), "127.0.0.1");
    assert_eq!(s.network.base_port, 11434);
    assert_eq!(s.models.host_path, "/var/lib/ollama-fleet/models");
    assert!(s.models.pull && s.models.warm);
    assert_eq!(s.probes.readiness.path, "/api/version");
    assert_eq!(s.probes.readiness.period_seconds, 5);
    assert_eq!(s.probes.readiness.timeout_seconds, 2);
    assert_eq!(s.probes.readiness.failure_threshold, 3);
    assert_eq!(s.probes.liveness.path, "/");
    assert_eq!(s.probes.liveness.period_seconds, 10);
    assert_eq!(s.probes.startup_timeout_seconds, 600);
    assert_eq!(
        s.rollout.max_unavailable,
        fleet_api::IntOrPercent::Percent(25)
    );
    assert_eq!(s.restart_backoff.initial, fleet_api::Duration::secs(1));
    assert_eq!(s.restart_backoff.max, fleet_api::Duration::secs(300));
    assert_eq!(s.termination_grace_period, fleet_api::Duration::secs(30));
    assert_eq!(s.runtime.name, "io.containerd.runc.v2");
    assert!(!s.paused);
    assert_eq!(s.rotation, fleet_api::Rotation::default());
    assert_eq!(s.resources, fleet_api::Resources::default());
}

#[test]
fn partial_probe_keeps_its_own_defaults() {
    let f = passes(&doc(
        "probes: {liveness: {periodSeconds: 4}, readiness: {path: /api/tags}}",
    ));
    assert_eq!(f.spec.probes.liveness.path, "/");
    assert_eq!(f.spec.probes.liveness.period_seconds, 4);
    assert_eq!(f.spec.probes.readiness.path, "/api/tags");
    assert_eq!(f.spec.probes.readiness.period_seconds, 5);
}

#[test]
fn the_issue_example_reports_four_errors() {
    let src = format!(
        "{HEADER}spec:\n  replicas: {{perNode: -3}}\n  surprise: true\n  resources:\n    memory: 12Qi\n"
    );
    let errs = check(&src).expect_err("invalid");
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "spec.model",
            "spec.replicas.perNode",
            "spec.surprise",
            "spec.resources.memory"
        ]
    );
    assert_eq!(
        errs[1].to_string(),
        "spec.replicas.perNode: must be >= 0, got -3"
    );
}

#[test]
fn top_level_fields() {
    fails(
        &doc("").replace("ollama-fleet.io/v1alpha1", "v1"),
        "apiVersion",
        "must be",
    );
    fails(
        &doc("").replace("kind: OllamaFleet", "kind: Pod"),
        "kind",
        "must be",
    );
    fails(
        &doc("").replace("kind: OllamaFleet\n", ""),
        "kind",
        "required",
    );
    fails(
        &format!("{HEADER}status: {{}}\nspec: {{model: m, replicas: {{perNode: 1}}}}\n"),
        "status",
        "unknown field",
    );
    let no_spec = HEADER.to_string();
    fails(&no_spec, "spec", "required");
    let errs = check("- a\n- b\n").expect_err("a list is not a fleet");
    assert!(errs[0].message.contains("must be a mapping"), "{errs:?}");
}

#[test]
fn fleet_names() {
    for good in ["a", "devassist", "dev-assist-2", "0abc", &"a".repeat(40)] {
        passes(&doc("").replace("name: demo", &format!("name: {good}")));
    }
    for bad in [
        "Dev",
        "dev_assist",
        "-dev",
        "dev-",
        "dev.assist",
        "\"\"",
        &"a".repeat(41),
    ] {
        fails(
            &doc("").replace("name: demo", &format!("name: {bad}")),
            "metadata.name",
            "invalid name",
        );
    }
}

#[test]
fn labels_and_node_selector() {
    passes(&doc(
        "nodeSelector: {pool: epyc, example.com/zone: a-1, empty: \"\"}",
    ));
    fails(
        &doc("nodeSelector: {\"bad key\": x}"),
        "spec.nodeSelector[bad key]",
        "invalid label key",
    );
    fails(
        &doc("nodeSelector: {pool: \"bad value\"}"),
        "spec.nodeSelector[pool]",
        "invalid label value",
    );
    fails(
        &doc("nodeSelector: {Bad_Prefix/x: y}"),
        "spec.nodeSelector[Bad_Prefix/x]",
        "prefix",
    );
    fails(
        &doc("nodeSelector: [a]"),
        "spec.nodeSelector",
        "must be a mapping",
    );
}

#[test]
fn model_references() {
    for good in [
        "llama3.1:8b-instruct-q4_0",
        "hf.co/user/Repo-GGUF:Q4_K_M",
        "me/model",
        "qwen2.5",
    ] {
        passes(&doc("").replace("smollm2:135m", good));
    }
    fails(
        &doc("").replace("smollm2:135m", "\"bad model\""),
        "spec.model",
        "invalid model reference",
    );
    fails(
        &doc("").replace("smollm2:135m", "a/b/c/d"),
        "spec.model",
        "invalid model reference",
    );
    fails(
        &doc("").replace("  model: smollm2:135m\n", ""),
        "spec.model",
        "required",
    );
    fails(
        &doc("").replace("smollm2:135m", "42"),
        "spec.model",
        "must be a string",
    );
}

#[test]
fn image_references_and_pull_policy() {
    for good in [
        "ollama/ollama",
        "localhost:5000/sim:dev",
        "ollama/ollama@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ] {
        passes(&doc(&format!("image: {good}")));
    }
    fails(
        &doc("image: Ollama/Ollama:latest"),
        "spec.image",
        "invalid image reference",
    );
    fails(
        &doc("image: \"ollama/ollama:\""),
        "spec.image",
        "invalid image reference",
    );
    for good in ["Always", "IfNotPresent", "Never"] {
        passes(&doc(&format!("imagePullPolicy: {good}")));
    }
    fails(
        &doc("imagePullPolicy: always"),
        "spec.imagePullPolicy",
        "use Always, IfNotPresent or Never",
    );
}

#[test]
fn command_and_env() {
    let f = passes(&doc(
        "command: [/bin/ollama, serve]\nenv: {OLLAMA_KEEP_ALIVE: -1, FLAG: true, _X: \"y\"}",
    ));
    assert_eq!(f.spec.command, ["/bin/ollama", "serve"]);
    assert_eq!(f.spec.env["OLLAMA_KEEP_ALIVE"], "-1");
    assert_eq!(f.spec.env["FLAG"], "true");
    fails(
        &doc("command: [\"\"]"),
        "spec.command[0]",
        "must not be empty",
    );
    fails(
        &doc("command: [a, [b]]"),
        "spec.command[1]",
        "must be a string",
    );
    fails(
        &doc("command: /bin/ollama"),
        "spec.command",
        "must be a list",
    );
    fails(
        &doc("env: {1X: a}"),
        "spec.env[1X]",
        "invalid variable name",
    );
    fails(
        &doc("env: {A-B: a}"),
        "spec.env[A-B]",
        "invalid variable name",
    );
    fails(&doc("env: {A: {b: c}}"), "spec.env[A]", "must be a string");
}

#[test]
fn replicas() {
    assert_eq!(
        passes(&doc("replicas: {perSocket: 58}"))
            .spec
            .replicas
            .count(2),
        116
    );
    assert_eq!(
        passes(&doc("replicas: {perNode: 0}"))
            .spec
            .replicas
            .count(2),
        0
    );
    fails(
        &doc("replicas: {perNode: -3}"),
        "spec.replicas.perNode",
        "must be >= 0, got -3",
    );
    fails(
        &doc("replicas: {perSocket: -1}"),
        "spec.replicas.perSocket",
        "must be >= 0, got -1",
    );
    fails(
        &doc("replicas: {perSocket: 2, perNode: 3}"),
        "spec.replicas",
        "not both",
    );
    fails(&doc("replicas: {}"), "spec.replicas", "exactly one");
    fails(&doc("replicas: 3"), "spec.replicas", "must be a mapping");
    fails(
        &doc("replicas: {perNode: two}"),
        "spec.replicas.perNode",
        "must be an integer",
    );
    fails(
        &doc("replicas: {perNode: 1.5}"),
        "spec.replicas.perNode",
        "must be an integer",
    );
    fails(
        &doc("replicas: {perPod: 1, perNode: 1}"),
        "spec.replicas.perPod",
        "unknown field",
    );
    fails(
        &doc("").replace("  replicas: {perNode: 2}\n", ""),
        "spec.replicas",
        "required",
    );
}

#[test]
fn resources() {
    let f = passes(&doc(
        "resources: {cpus: 0.5, cpuShares: 1024, memory: 8Gi, pids: 4096, cpuPinning: socket}",
    ));
    assert_eq!(f.spec.resources.cpus, Some(0.5));
    assert_eq!(
        f.spec.resources.memory,
        Some(fleet_api::Quantity::gibibytes(8))
    );
    assert_eq!(f.spec.resources.cpu_pinning, fleet_api::CpuPinning::Socket);
    assert_eq!(
        passes(&doc("resources: {cpus: 500m}")).spec.resources.cpus,
        Some(0.5)
    );
    assert_eq!(
        passes(&doc("resources: {cpus: 2}")).spec.resources.cpus,
        Some(2.0)
    );
    assert_eq!(
        passes(&doc("resources: {memory: 4194304}"))
            .spec
            .resources
            .memory,
        Some(fleet_api::MIN_MEMORY)
    );
    fails(
        &doc("resources: {cpus: 0}"),
        "spec.resources.cpus",
        "at least 0.01",
    );
    fails(
        &doc("resources: {cpus: -1}"),
        "spec.resources.cpus",
        "at least 0.01",
    );
    fails(
        &doc("resources: {cpus: lots}"),
        "spec.resources.cpus",
        "number of cores",
    );
    fails(
        &doc("resources: {memory: 12Qi}"),
        "spec.resources.memory",
        "unknown suffix \"Qi\"",
    );
    fails(
        &doc("resources: {memory: 3Mi}"),
        "spec.resources.memory",
        "at least 4Mi",
    );
    fails(
        &doc("resources: {memory: -1}"),
        "spec.resources.memory",
        "must be >= 0",
    );
    fails(
        &doc("resources: {memory: [8Gi]}"),
        "spec.resources.memory",
        "quantity",
    );
    fails(
        &doc("resources: {cpuShares: 1}"),
        "spec.resources.cpuShares",
        "must be >= 2",
    );
    fails(
        &doc("resources: {cpuShares: 300000}"),
        "spec.resources.cpuShares",
        "must be <= 262144",
    );
    fails(
        &doc("resources: {pids: 0}"),
        "spec.resources.pids",
        "must be >= 1",
    );
    fails(
        &doc("resources: {cpuPinning: numa}"),
        "spec.resources.cpuPinning",
        "none or socket",
    );
    fails(
        &doc("resources: {gpus: 1}"),
        "spec.resources.gpus",
        "unknown field",
    );
}

#[test]
fn network_and_ports() {
    let f = passes(&doc("network: {hostIP: \"::1\", basePort: 20000}"));
    assert_eq!(f.spec.network.host_ip.to_string(), "::1");
    fails(
        &doc("network: {hostIP: localhost}"),
        "spec.network.hostIP",
        "invalid IP address",
    );
    fails(
        &doc("network: {basePort: 0}"),
        "spec.network.basePort",
        "must be >= 1",
    );
    fails(
        &doc("network: {basePort: 70000}"),
        "spec.network.basePort",
        "must be <= 65535",
    );
    // The last port is basePort + replicas + surge - 1 and must stay below 32768.
    passes(&doc("replicas: {perNode: 2}\nnetwork: {basePort: 32766}"));
    fails(
        &doc("replicas: {perNode: 3}\nnetwork: {basePort: 32766}"),
        "spec.network.basePort",
        "ephemeral range",
    );
    fails(
        &doc("replicas: {perNode: 2}\nnetwork: {basePort: 32766}\nrollout: {maxSurge: 1}"),
        "spec.network.basePort",
        "32766..32768",
    );
    // perSocket is multiplied by the sockets of the context (2 here).
    passes(&doc(
        "replicas: {perSocket: 58}\nnetwork: {basePort: 32652}",
    ));
    fails(
        &doc("replicas: {perSocket: 58}\nnetwork: {basePort: 32653}"),
        "spec.network.basePort",
        "2-socket node",
    );
    fails(
        &doc("replicas: {perNode: 100000}\nnetwork: {basePort: 60000}"),
        "spec.network.basePort",
        "beyond 65535",
    );
    assert!(
        parse_fleet(
            &doc("replicas: {perSocket: 58}\nnetwork: {basePort: 32653}"),
            &Context { sockets: 1 }
        )
        .is_ok(),
        "fits on one socket"
    );
}

#[test]
fn models() {
    assert_eq!(
        passes(&doc("models: {hostPath: \"\"}"))
            .spec
            .models
            .host_path,
        ""
    );
    let f = passes(&doc(
        "models: {hostPath: /srv/models, pull: false, warm: false}",
    ));
    assert!(!f.spec.models.pull && !f.spec.models.warm);
    fails(
        &doc("models: {hostPath: models}"),
        "spec.models.hostPath",
        "absolute path",
    );
    fails(
        &doc("models: {hostPath: /}"),
        "spec.models.hostPath",
        "below /",
    );
    fails(
        &doc("models: {hostPath: /srv/../etc}"),
        "spec.models.hostPath",
        "'..'",
    );
    fails(
        &doc("models: {pull: yes}"),
        "spec.models.pull",
        "true or false",
    );
}

#[test]
fn probes() {
    fails(
        &doc("probes: {readiness: {path: health}}"),
        "spec.probes.readiness.path",
        "start with '/'",
    );
    fails(
        &doc("probes: {liveness: {periodSeconds: 0}}"),
        "spec.probes.liveness.periodSeconds",
        ">= 1",
    );
    fails(
        &doc("probes: {liveness: {timeoutSeconds: 0}}"),
        "spec.probes.liveness.timeoutSeconds",
        ">= 1",
    );
    fails(
        &doc("probes: {readiness: {failureThreshold: -1}}"),
        "spec.probes.readiness.failureThreshold",
        ">= 1",
    );
    fails(
        &doc("probes: {startupTimeoutSeconds: 0}"),
        "spec.probes.startupTimeoutSeconds",
        ">= 1",
    );
    fails(
        &doc("probes: {readiness: {exec: [true]}}"),
        "spec.probes.readiness.exec",
        "unknown field",
    );
}

#[test]
fn rotation() {
    let f = passes(&doc(
        "resources: {memory: 8Gi}\nrotation: {maxAge: 7d, maxMemory: 7Gi}",
    ));
    assert_eq!(
        f.spec.rotation.max_age,
        Some(fleet_api::Duration::secs(7 * 86400))
    );
    fails(
        &doc("rotation: {maxAge: 7w}"),
        "spec.rotation.maxAge",
        "unknown unit \"w\"",
    );
    fails(
        &doc("rotation: {maxAge: 500ms}"),
        "spec.rotation.maxAge",
        "at least 1s",
    );
    fails(
        &doc("rotation: {maxMemory: lots}"),
        "spec.rotation.maxMemory",
        "invalid quantity",
    );
    fails(
        &doc("resources: {memory: 8Gi}\nrotation: {maxMemory: 8Gi}"),
        "spec.rotation.maxMemory",
        "below spec.resources.memory",
    );
}

#[test]
fn rollout() {
    let f = passes(&doc("rollout: {maxUnavailable: 10%, maxSurge: 1}"));
    assert_eq!(f.spec.rollout.budget(58), (5, 1));
    assert_eq!(
        passes(&doc("rollout: {maxUnavailable: \"5\"}"))
            .spec
            .rollout
            .max_unavailable,
        fleet_api::IntOrPercent::Int(5)
    );
    // Both rounding to 0 on a node is allowed and means one at a time.
    assert_eq!(
        passes(&doc("rollout: {maxUnavailable: 10%}"))
            .spec
            .rollout
            .budget(5),
        (1, 0)
    );
    fails(
        &doc("rollout: {maxUnavailable: 0, maxSurge: 0}"),
        "spec.rollout",
        "cannot both be 0",
    );
    fails(
        &doc("rollout: {maxUnavailable: 0%}"),
        "spec.rollout",
        "cannot both be 0",
    );
    fails(
        &doc("rollout: {maxUnavailable: 150%}"),
        "spec.rollout.maxUnavailable",
        "0% to 100%",
    );
    fails(
        &doc("rollout: {maxSurge: -1}"),
        "spec.rollout.maxSurge",
        "must be >= 0",
    );
    fails(
        &doc("rollout: {maxSurge: lots}"),
        "spec.rollout.maxSurge",
        "invalid value",
    );
}

#[test]
fn backoff_grace_runtime_paused() {
    let f = passes(&doc(
        "restartBackoff: {initial: 100ms, max: 30s}\nterminationGracePeriod: 500ms\nruntime: {binaryName: crun}\npaused: true",
    ));
    assert_eq!(
        f.spec.restart_backoff.initial,
        fleet_api::Duration::millis(100)
    );
    assert_eq!(
        f.spec.termination_grace_period,
        fleet_api::Duration::millis(500)
    );
    assert_eq!(f.spec.runtime.binary_name, "crun");
    assert!(f.spec.paused);
    fails(
        &doc("restartBackoff: {initial: 10s, max: 1s}"),
        "spec.restartBackoff.max",
        "at least initial",
    );
    fails(
        &doc("restartBackoff: {initial: soon}"),
        "spec.restartBackoff.initial",
        "invalid duration",
    );
    fails(
        &doc("terminationGracePeriod: 30"),
        "spec.terminationGracePeriod",
        "missing unit",
    );
    fails(
        &doc("runtime: {name: \"\"}"),
        "spec.runtime.name",
        "invalid runtime name",
    );
    fails(
        &doc("runtime: {binaryName: \"my crun\"}"),
        "spec.runtime.binaryName",
        "bare program name",
    );
    fails(&doc("paused: yes"), "spec.paused", "true or false");
}

#[test]
fn json_documents_parse_with_positions() {
    let src = r#"{"apiVersion": "ollama-fleet.io/v1alpha1", "kind": "OllamaFleet",
 "metadata": {"name": "demo"},
 "spec": {"model": "m", "replicas": {"perNode": -1}}}"#;
    let errs = check(src).expect_err("invalid");
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].path, "spec.replicas.perNode");
    assert_eq!(errs[0].pos.map(|p| p.line), Some(3));
    let ok = src.replace("-1", "1");
    assert_eq!(passes(&ok).spec.replicas, fleet_api::Replicas::PerNode(1));
}

#[test]
fn syntax_errors_have_line_and_column() {
    let errs = check(&format!("{HEADER}spec:\n  model: [unclosed\n")).expect_err("bad yaml");
    assert_eq!(errs.len(), 1);
    let pos = errs[0].pos.expect("position");
    assert!(pos.line >= 6, "{errs:?}");
}

#[test]
fn errors_come_in_document_order_and_do_not_cascade() {
    // A broken replicas count must not also produce a port-range error.
    let errs = check(&doc("replicas: {perNode: x}\nnetwork: {basePort: 32767}")).expect_err("bad");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    let lines: Vec<u32> = check(&doc("paused: 1\nresources: {pids: 0}\nimage: BAD"))
        .expect_err("bad")
        .iter()
        .filter_map(|e| e.pos.map(|p| p.line))
        .collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted);
}

#[test]
fn several_documents_in_one_stream() {
    let src = format!(
        "{}---\n{}",
        doc(""),
        doc("").replace("name: demo", "name: other")
    );
    let all = fleet_api::parse_fleets(&src, &Context::default());
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(Result::is_ok));
    assert!(
        parse_fleet(&src, &Context::default()).is_err(),
        "parse_fleet wants exactly one"
    );
}

/// What a manifest written by an attacker tries first (issue 10): every case is an error that
/// names its field.
#[test]
fn hostile_values_are_refused() {
    // Paths that only look like a directory below the models root.
    for path in [
        "//",
        "/.",
        "/etc/",
        "/var//lib",
        "/var/lib/./x",
        "/var/lib/ollama-fleet/models/../../..",
    ] {
        fails(
            &doc(&format!("models: {{hostPath: \"{path}\"}}")),
            "spec.models.hostPath",
            "normalised",
        );
    }
    fails(
        &doc("models: {hostPath: /}"),
        "spec.models.hostPath",
        "normalised",
    );
    passes(&doc("models: {hostPath: /var/lib/ollama-fleet/models/a}"));
    // A runtime binary is a bare name, never a path.
    for name in [
        "/tmp/evil",
        "../../bin/sh",
        "bin/sh",
        "..",
        "crun;id",
        "a b",
    ] {
        fails(
            &doc(&format!("runtime: {{binaryName: \"{name}\"}}")),
            "spec.runtime.binaryName",
            "never a path",
        );
    }
    passes(&doc("runtime: {binaryName: crun}"));
    // NUL bytes.
    fails(&doc("env: {A: \"x\\0y\"}"), "spec.env[A]", "NUL");
    fails(
        &doc("command: [\"/bin/ollama\\0\", serve]"),
        "spec.command[0]",
        "NUL",
    );
    // Upper bounds.
    fails(
        &doc("resources: {cpus: 100000}"),
        "spec.resources.cpus",
        "at most 1024",
    );
    fails(
        &doc("resources: {memory: 2Ei}"),
        "spec.resources.memory",
        "at most",
    );
    fails(
        &doc("restartBackoff: {initial: 0s}"),
        "spec.restartBackoff.initial",
        "at least 100ms",
    );
    fails(
        &doc("restartBackoff: {initial: 10ms}"),
        "spec.restartBackoff.initial",
        "at least 100ms",
    );
    fails(
        &doc("network: {basePort: 80}"),
        "spec.network.basePort",
        ">= 1024",
    );
    fails(
        &doc(&format!("env: {{A: \"{}\"}}", "x".repeat(20_000))),
        "spec.env[A]",
        "limit is 16384",
    );
    let many: String = (0..1100).map(|i| format!("\"a{i}\",")).collect();
    fails(
        &doc(&format!("command: [{many}]")),
        "spec.command",
        "limit is 1024",
    );
    // The shared cache must not be pruned by an instance.
    fails(
        &doc("env: {OLLAMA_NOPRUNE: \"0\"}"),
        "spec.env[OLLAMA_NOPRUNE]",
        "must be \"1\"",
    );
    passes(&doc("env: {OLLAMA_NOPRUNE: \"1\"}"));
    passes(&doc(
        "env: {OLLAMA_NOPRUNE: \"0\"}\nmodels: {hostPath: \"\"}",
    ));
}

#[test]
fn security_context() {
    let f = passes(&doc(
        "securityContext: {runAsUser: 1000, runAsGroup: 1000, readOnlyRootFilesystem: true}",
    ));
    let sc = &f.spec.security_context;
    assert_eq!((sc.run_as_user, sc.run_as_group), (Some(1000), Some(1000)));
    assert!(sc.read_only_root_filesystem);
    assert!(passes(&doc("")).spec.security_context.is_default());
    fails(
        &doc("securityContext: {runAsUser: -1}"),
        "spec.securityContext.runAsUser",
        ">= 0",
    );
    fails(
        &doc("securityContext: {privileged: true}"),
        "spec.securityContext.privileged",
        "unknown field",
    );
}

/// A document of a megabyte that would expand to gigabytes, and one with tens of thousands of
/// keys, fail fast with one error each.
#[test]
fn bombs_fail_with_one_error() {
    let mut bomb = format!(
        "{HEADER}spec:\n  model: &a \"{}\"\n  env:\n",
        "x".repeat(800 * 1024)
    );
    for i in 0..1000 {
        bomb.push_str(&format!("    A{i}: *a\n"));
    }
    assert!(bomb.len() < fleet_api::yaml::MAX_INPUT_BYTES);
    let errs = check(&bomb).expect_err("bomb");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].message.contains("bytes of text"), "{errs:?}");
}

#[test]
fn swap_is_none_unless_a_bounded_amount_is_asked() {
    use fleet_api::Quantity;
    assert_eq!(passes(&doc("")).spec.resources.swap, None);
    let swap = |v: &str| {
        passes(&doc(&format!("resources: {{memory: 1Gi, swap: {v}}}")))
            .spec
            .resources
            .swap
    };
    assert_eq!(swap("0"), Some(Quantity::mebibytes(0)));
    assert_eq!(swap("512Mi"), Some(Quantity::mebibytes(512)));
    fails(
        &doc("resources: {swap: lots}"),
        "spec.resources.swap",
        "quantity",
    );
    fails(
        &doc("resources: {swap: 2Pi}"),
        "spec.resources.swap",
        "at most",
    );
}

#[test]
fn prompt_cache_is_auto_engine_or_a_size_below_memory() {
    use fleet_api::{PromptCache, Quantity};
    assert_eq!(
        passes(&doc("")).spec.resources.prompt_cache,
        PromptCache::Auto
    );
    let of = |v: &str| {
        passes(&doc(&format!(
            "resources: {{memory: 1Gi, promptCache: {v}}}"
        )))
        .spec
        .resources
        .prompt_cache
    };
    assert_eq!(of("auto"), PromptCache::Auto);
    assert_eq!(of("engine"), PromptCache::Engine);
    assert_eq!(of("256Mi"), PromptCache::Bytes(Quantity::mebibytes(256)));
    assert_eq!(
        of("0"),
        PromptCache::Bytes(Quantity::mebibytes(0)),
        "no prompt cache"
    );
    fails(
        &doc("resources: {promptCache: lots}"),
        "spec.resources.promptCache",
        "use auto, engine, or a quantity",
    );
    fails(
        &doc("resources: {memory: 512Mi, promptCache: 512Mi}"),
        "spec.resources.promptCache",
        "must be below resources.memory",
    );
    fails(
        &doc("resources: {promptCache: -1}"),
        "spec.resources.promptCache",
        ">= 0",
    );
    // The normalised form keeps what was said, and `auto` is the default left out.
    let f = passes(&doc("resources: {memory: 1Gi, promptCache: 256Mi}"));
    let json = serde_json::to_value(&f).expect("json");
    assert_eq!(json["spec"]["resources"]["promptCache"], "256Mi");
    let auto = serde_json::to_value(passes(&doc(""))).expect("json");
    assert!(
        auto["spec"]["resources"].get("promptCache").is_none(),
        "{auto}"
    );
}
