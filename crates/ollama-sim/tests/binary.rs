//! The `ollama-sim` binary: where it listens, how it exits, signals, pruning at start.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use fleet_e2e::{free_port, get, post, request, temp_dir, wait_for};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_ollama-sim");

fn spawn(vars: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn ollama-sim")
}

/// Waits for the process to exit within `deadline`.
fn wait_exit(child: &mut Child, deadline: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            panic!("ollama-sim did not exit within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn wait_ready(url: &str) {
    wait_for("the sim to answer", Duration::from_secs(10), || async {
        request(
            "GET",
            &format!("{url}/api/version"),
            None,
            Duration::from_millis(500),
        )
        .await
        .ok()
        .filter(|(s, _)| *s == 200)
    })
    .await;
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} failed");
}

#[tokio::test]
async fn listens_where_ollama_host_says() {
    let port = free_port();
    let dir = temp_dir("host");
    let mut child = spawn(&[
        ("OLLAMA_HOST", &format!("127.0.0.1:{port}")),
        ("OLLAMA_MODELS", dir.to_str().expect("utf-8")),
    ]);
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&url).await;
    assert_eq!(
        get(&format!("{url}/")).await,
        (200, "Ollama is running".to_string())
    );
    signal(&child, "-TERM");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(10)).code(),
        Some(0),
        "SIGTERM is a clean exit"
    );
}

/// As Ollama (whose SIGTERM handler calls http.Server.Close): a request in flight is cut,
/// not finished; that is why the agent drains instances before it stops them.
#[tokio::test]
async fn sigterm_cuts_requests_in_flight() {
    let port = free_port();
    let dir = temp_dir("term-cut");
    let mut child = spawn(&[
        ("OLLAMA_HOST", &format!("127.0.0.1:{port}")),
        ("OLLAMA_MODELS", dir.to_str().expect("utf-8")),
        ("SIM_PULL_TIME", "10ms"),
        ("SIM_TOKENS_PER_SECOND", "10"),
    ]);
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&url).await;
    let (code, _) = post(
        &format!("{url}/api/pull"),
        json!({"model": "m:1", "stream": false}),
    )
    .await;
    assert_eq!(code, 200);
    let body = json!({"model": "m:1", "prompt": "long", "options": {"num_predict": 50}});
    let long = tokio::spawn({
        let url = url.clone();
        async move {
            request(
                "POST",
                &format!("{url}/api/generate"),
                Some(&body),
                Duration::from_secs(30),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    signal(&child, "-TERM");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(5)).code(),
        Some(0)
    );
    let cut = long.await.expect("join");
    assert!(
        cut.as_ref().is_err()
            || cut
                .as_ref()
                .is_ok_and(|(_, text)| !text.contains("\"done\":true")),
        "the request finished despite SIGTERM: {cut:?}"
    );
}

#[tokio::test]
async fn crash_at_start_exits_with_the_code_without_listening() {
    let port = free_port();
    let start = Instant::now();
    let mut child = spawn(&[
        ("OLLAMA_HOST", &format!("127.0.0.1:{port}")),
        ("SIM_CRASH_AFTER", "200ms"),
        ("SIM_EXIT_CODE", "7"),
    ]);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(7));
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "never listened"
    );
}

#[tokio::test]
async fn exit_after_serving_and_exit_on_request() {
    let port = free_port();
    let mut child = spawn(&[
        ("OLLAMA_HOST", &format!("127.0.0.1:{port}")),
        ("SIM_EXIT_AFTER", "1s"),
        ("SIM_EXIT_CODE", "42"),
    ]);
    wait_ready(&format!("http://127.0.0.1:{port}")).await;
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(10)).code(),
        Some(42)
    );

    let port = free_port();
    let mut child = spawn(&[("OLLAMA_HOST", &format!("127.0.0.1:{port}"))]);
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&url).await;
    assert_eq!(
        post(&format!("{url}/sim/exit"), json!({"code": 3})).await.0,
        200
    );
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(10)).code(),
        Some(3)
    );
}

#[tokio::test]
async fn ignore_sigterm_keeps_running_until_killed() {
    let port = free_port();
    let mut child = spawn(&[
        ("OLLAMA_HOST", &format!("127.0.0.1:{port}")),
        ("SIM_IGNORE_SIGTERM", "1"),
    ]);
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&url).await;
    signal(&child, "-TERM");
    // Still answering well after the signal was delivered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "exited despite SIM_IGNORE_SIGTERM"
    );
    assert_eq!(get(&format!("{url}/api/version")).await.0, 200);
    signal(&child, "-KILL");
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
}

#[tokio::test]
async fn start_prunes_unreferenced_blobs_unless_noprune() {
    let dir = temp_dir("prune");
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    let orphan =
        blobs.join("sha256-0000000000000000000000000000000000000000000000000000000000000000");

    for (noprune, survives) in [("1", true), ("", false)] {
        std::fs::write(&orphan, b"orphan").expect("write");
        let port = free_port();
        let mut child = spawn(&[
            ("OLLAMA_HOST", &format!("127.0.0.1:{port}")),
            ("OLLAMA_MODELS", dir.to_str().expect("utf-8")),
            ("OLLAMA_NOPRUNE", noprune),
        ]);
        wait_ready(&format!("http://127.0.0.1:{port}")).await;
        assert_eq!(orphan.exists(), survives, "OLLAMA_NOPRUNE={noprune:?}");
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let out = Command::new(BIN)
        .env("SIM_MODEL_SIZE", "12Qi")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SIM_MODEL_SIZE") && err.contains("12Qi"),
        "{err}"
    );
    let out = Command::new(BIN).arg("frobnicate").output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN).arg("--help").output().expect("run");
    assert!(String::from_utf8_lossy(&out.stdout).contains("SIM_CRASH_AFTER"));
}

/// As Ollama's start (fixBlobs), the sim's start walks blobs/ and gives up when a file vanishes
/// under the walk: the race the agent avoids by writing into no cache while an instance starts.
#[test]
fn a_blob_vanishing_during_the_start_walk_ends_the_start() {
    let dir = temp_dir("walk");
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    for i in 0..3 {
        std::fs::write(blobs.join(format!("sha256-{i:064}")), b"x").expect("write");
    }
    let port = free_port();
    let mut child = spawn(&[
        ("OLLAMA_HOST", &format!("127.0.0.1:{port}")),
        ("OLLAMA_MODELS", dir.to_str().expect("utf-8")),
        ("OLLAMA_NOPRUNE", "1"),
        ("SIM_BLOB_WALK_DELAY", "300ms"),
    ]);
    // The walk has listed all three and waits before the last: remove it.
    std::thread::sleep(Duration::from_millis(450));
    std::fs::remove_file(blobs.join(format!("sha256-{:064}", 2))).expect("remove");
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(1));
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read");
    assert!(
        err.contains("lstat") && err.contains("no such file"),
        "{err}"
    );
}
