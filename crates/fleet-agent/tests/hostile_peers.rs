//! The agent's HTTP with untrusted peers (issue 10): an instance that streams without end is
//! read only up to a bound, and the agent's own server cuts off slow and surplus connections.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use fleet_agent::controller::View;
use fleet_agent::http::{ServerLimits, router, serve};
use fleet_agent::ollama::{HttpOllama, Ollama};
use fleet_agent::prober::{Http, probe_once};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;

/// An endless body: 64 KiB chunks for as long as anyone reads.
fn endless(newlines: bool) -> Body {
    let chunk = if newlines {
        "{\"status\":\"pulling\"}\n".repeat(3000)
    } else {
        "x".repeat(64 * 1024)
    };
    let stream = futures::stream::repeat_with(move || {
        Ok::<_, std::io::Error>(bytes::Bytes::from(chunk.clone()))
    });
    Body::from_stream(stream)
}

async fn hostile_instance() -> String {
    let app = Router::new()
        .route("/", get(|| async { endless(false) }))
        .route("/api/show", post(|| async { endless(false) }))
        .route("/api/pull", post(|| async { endless(false) }));
    common::serve(app).await
}

#[tokio::test]
async fn endless_answers_are_read_only_up_to_a_bound() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let base = hostile_instance().await;
        // A probe: the status decides; the body is not read to its (missing) end.
        let client = Http::default();
        let started = Instant::now();
        assert!(probe_once(&client, &format!("{base}/"), Duration::from_secs(5)).await);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the probe did not wait for the body"
        );
        // /api/show: an error that says why, not gigabytes in memory.
        let ollama = HttpOllama::default();
        let err = ollama.show(&base, "m").await.expect_err("too large");
        assert!(err.to_string().contains("bytes"), "{err}");
        // A pull stream with no line end: refused once a line is longer than the bound.
        let progress = Default::default();
        let err = ollama
            .pull(&base, "m", &progress)
            .await
            .expect_err("no line end");
        assert!(err.to_string().contains("longer than"), "{err}");
    })
    .await
    .expect("bounded in time too");
}

#[tokio::test]
async fn the_agent_server_cuts_slow_and_surplus_connections() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = ServerLimits {
            max_connections: 2,
            header_read_timeout: Duration::from_millis(500),
            health_reserve: 1,
            ..ServerLimits::default()
        };
        let view = Arc::new(RwLock::new(View::default()));
        tokio::spawn(serve(listener, router(view, vec![]), limits));

        // Headers that never finish: the connection is closed after the timeout.
        let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        let started = Instant::now();
        let mut buf = Vec::new();
        let _ = slow.read_to_end(&mut buf).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a slow client was cut off ({:?})",
            started.elapsed()
        );

        // Two connections hold both slots; a third is closed at once, and served again once a
        // slot is free.
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("write");
            let mut first = [0u8; 9];
            c.read_exact(&mut first).await.expect("answered");
            assert_eq!(&first, b"HTTP/1.1 ", "answered");
            held.push(c);
        }
        // The third is served by the health reserve: one health check, then closed; anything
        // else is refused there.
        let ask = |path: &'static str| async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let _ = c
                .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await;
            let mut buf = Vec::new();
            let _ = c.read_to_end(&mut buf).await;
            String::from_utf8_lossy(&buf).into_owned()
        };
        let health = ask("/healthz").await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        let metrics = ask("/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 503"), "{metrics}");
        // With the reserve held too, a connection is closed unanswered.
        let mut reserve = tokio::net::TcpStream::connect(addr).await.expect("connect");
        reserve.write_all(b"GET /healthz").await.expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            ask("/healthz").await,
            "",
            "the surplus connection is closed unanswered"
        );
        drop(reserve);
        drop(held);
        fleet_e2e::wait_for("a slot free again", Duration::from_secs(5), || async {
            let mut c = tokio::net::TcpStream::connect(addr).await.ok()?;
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut buf = Vec::new();
            c.read_to_end(&mut buf).await.ok()?;
            buf.starts_with(b"HTTP/1.1").then_some(())
        })
        .await;
    })
    .await
    .expect("in time");
}

/// One client address holds at most `per_client` connections: beyond, it gets only the health
/// reserve, while another client is still served in full.
#[tokio::test]
async fn one_client_cannot_take_every_connection() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let limits = ServerLimits {
            max_connections: 8,
            per_client: 2,
            health_reserve: 4,
            ..ServerLimits::default()
        };
        let view = Arc::new(RwLock::new(View::default()));
        tokio::spawn(serve(listener, router(view, vec![]), limits));
        let from = |ip: &'static str| async move {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket
                .bind(format!("{ip}:0").parse().expect("addr"))
                .expect("bind");
            socket
                .connect(format!("127.0.0.1:{port}").parse().expect("addr"))
                .await
                .expect("connect")
        };
        let ask = |mut c: tokio::net::TcpStream, path: &'static str| async move {
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            c.write_all(req.as_bytes()).await.expect("write");
            let mut buf = Vec::new();
            let _ = c.read_to_end(&mut buf).await;
            String::from_utf8_lossy(&buf).into_owned()
        };
        let _held = [from("127.0.0.1").await, from("127.0.0.1").await];
        tokio::time::sleep(Duration::from_millis(50)).await;
        let third = ask(from("127.0.0.1").await, "/instances").await;
        assert!(third.starts_with("HTTP/1.1 503"), "{third}");
        let health = ask(from("127.0.0.1").await, "/healthz").await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        let other = ask(from("127.0.0.2").await, "/instances").await;
        assert!(other.starts_with("HTTP/1.1 200"), "another client: {other}");
        // Nor can one client fill the reserve: two reserve connections each at most.
        let _reserve = [from("127.0.0.1").await, from("127.0.0.1").await];
        tokio::time::sleep(Duration::from_millis(50)).await;
        let beyond = ask(from("127.0.0.1").await, "/healthz").await;
        assert_eq!(beyond, "", "closed unanswered");
        let health = ask(from("127.0.0.3").await, "/healthz").await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    })
    .await
    .expect("in time");
}
