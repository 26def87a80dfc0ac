//! The sim driven by a client nobody here wrote: the official Python client (PyPI `ollama`,
//! pinned by hack/python-client.sh) runs tests/conformance/ollama_api.py, the conformance
//! runner that also runs against a real Ollama (`OLLAMA_URL=...`).

use std::process::Command;

use fleet_e2e::{python, repo_root};

mod common;
use common::start;

#[tokio::test]
async fn the_official_python_client_conforms() {
    let url = start(
        "pyclient",
        &[
            ("SIM_PULL_TIME", "100ms"),
            ("SIM_TOKENS_PER_SECOND", "500"),
            ("SIM_ACCESS_LOG", "0"),
        ],
    )
    .await;
    let python = python();
    let script = repo_root().join("tests/conformance/ollama_api.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .env("OLLAMA_URL", &url)
            .output()
            .expect("run the conformance runner")
    })
    .await
    .expect("join");
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the official client found differences:\n{report}"
    );
    // Nothing skipped: every check the runner has ran and passed.
    let summary = report
        .lines()
        .find(|l| l.contains(" checks passed against "))
        .expect("a summary line");
    let words: Vec<&str> = summary.split_whitespace().collect();
    assert_eq!(words[0], words[2], "{summary}");
    assert!(words[0].parse::<u32>().is_ok_and(|n| n >= 19), "{summary}");
}
