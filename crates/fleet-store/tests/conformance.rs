//! One conformance suite for every [`Store`]: in memory and etcd (the real one from the dev
//! environment, each test under its own prefix), plus etcd's own recovery cases.

use std::time::Duration;

use fleet_e2e::{DevEnv, PrivateEtcd, wait_for};
use fleet_store::etcd::{EtcdConfig, EtcdStore};
use fleet_store::memory::MemoryStore;
use fleet_store::{Expect, FleetEvent, MAX_TXN_OPS, StatusChange, Store, StoreError};
use futures::StreamExt;
use futures::stream::BoxStream;

async fn next(w: &mut BoxStream<'static, FleetEvent>) -> FleetEvent {
    tokio::time::timeout(Duration::from_secs(15), w.next())
        .await
        .expect("a watch event within 15s")
        .expect("watch stream open")
}

/// The behaviour every store must have. `other` sees the same data under another prefix.
async fn conformance(s: &dyn Store, other: &dyn Store) {
    assert_eq!(s.get_fleet("a").await.expect("get"), None);
    assert!(s.list_fleets().await.expect("list").is_empty());

    let r1 = s
        .put_fleet("a", "v1", Expect::Absent)
        .await
        .expect("create");
    assert!(r1 > 0);
    let doc = s.get_fleet("a").await.expect("get").expect("present");
    assert_eq!((doc.value.as_str(), doc.revision), ("v1", r1));
    // Compare-and-swap: create twice, or update from a stale revision, is a conflict.
    assert!(matches!(
        s.put_fleet("a", "v2", Expect::Absent).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.put_fleet("a", "v2", Expect::Revision(r1 - 1)).await,
        Err(StoreError::Conflict(_))
    ));
    let r2 = s
        .put_fleet("a", "v2", Expect::Revision(r1))
        .await
        .expect("update");
    assert!(r2 > r1, "the generation grows");
    let doc = s.get_fleet("a").await.expect("get").expect("present");
    assert_eq!(doc.created, r1, "an update keeps the creation revision");
    // A value over etcd's request limit is refused as invalid, not taken for an outage.
    let huge = "x".repeat(fleet_store::MAX_REQUEST_BYTES + 1);
    assert!(
        matches!(
            s.put_fleet("huge", &huge, Expect::Absent).await,
            Err(StoreError::Invalid(_))
        ),
        "a value over the request limit"
    );
    assert!(matches!(
        s.put_fleet("a", "v3", Expect::Revision(r1)).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.put_fleet("bad/name", "x", Expect::Absent).await,
        Err(StoreError::Invalid(_))
    ));

    // A watch starts with the complete set, then sees changes in order.
    let mut w = s.watch_fleets();
    match next(&mut w).await {
        FleetEvent::Resync(docs) => {
            assert_eq!(docs.len(), 1);
            assert_eq!(
                (
                    docs[0].name.as_str(),
                    docs[0].value.as_str(),
                    docs[0].revision
                ),
                ("a", "v2", r2)
            );
        }
        e => panic!("expected a resync first, got {e:?}"),
    }
    let rb = s
        .put_fleet("b", "b1", Expect::Absent)
        .await
        .expect("create b");
    assert_eq!(
        next(&mut w).await,
        FleetEvent::Put(fleet_store::FleetDoc {
            name: "b".into(),
            value: "b1".into(),
            revision: rb,
            created: rb,
        })
    );
    assert!(s.delete_fleet("a").await.expect("delete"));
    assert_eq!(next(&mut w).await, FleetEvent::Delete("a".into()));
    assert!(!s.delete_fleet("a").await.expect("delete again"));
    let names: Vec<String> = s
        .list_fleets()
        .await
        .expect("list")
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(names, ["b"]);

    // Prefixes isolate: the other store sees none of it.
    assert!(other.list_fleets().await.expect("list other").is_empty());

    // Node and status keys live on the session.
    assert!(
        matches!(
            s.put_node("n1", "{}").await,
            Err(StoreError::Unavailable(_))
        ),
        "no session yet"
    );
    assert!(!s.session_alive(), "no session, nothing alive");
    s.start_session(Duration::from_secs(15))
        .await
        .expect("session");
    assert!(s.session_alive(), "a fresh session is alive");
    let generation = s.session_generation();
    s.put_node("n1", "{\"name\":\"n1\"}").await.expect("node");
    s.put_status("b", "n1", "{\"ready\":1}")
        .await
        .expect("status");
    s.put_status("c", "n1", "{}").await.expect("status");
    let nodes = s.list_nodes().await.expect("nodes");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].node, "n1");
    let all = s.list_status(None).await.expect("status");
    assert_eq!(all.len(), 2);
    let b = s.list_status(Some("b")).await.expect("status b");
    assert_eq!(
        (b[0].fleet.as_str(), b[0].node.as_str(), b[0].value.as_str()),
        ("b", "n1", "{\"ready\":1}")
    );
    s.delete_status("c", "n1").await.expect("delete status");
    assert_eq!(s.list_status(None).await.expect("status").len(), 1);

    // A node's status is split: the summary, and one entry per instance, written in batches
    // within etcd's transaction limit.
    let many = StatusChange {
        summary: Some("{\"replicas\":200}".into()),
        put: (0..200)
            .map(|i| (format!("d-{i}-abc"), format!("{{\"slot\":{i}}}")))
            .collect(),
        delete: vec![],
    };
    assert!(many.put.len() > MAX_TXN_OPS);
    s.write_status("d", "n1", &many).await.expect("status");
    s.write_status(
        "d",
        "n10",
        &StatusChange {
            summary: Some("{}".into()),
            put: vec![("d-0-fff".into(), "{}".into())],
            delete: vec![],
        },
    )
    .await
    .expect("another node's status");
    let d = s.list_instances(Some("d")).await.expect("instances");
    assert_eq!(d.len(), 201);
    assert!(d.iter().any(|e| (
        e.fleet.as_str(),
        e.node.as_str(),
        e.key.as_str(),
        e.value.as_str()
    ) == ("d", "n1", "d-7-abc", "{\"slot\":7}")));
    assert!(
        s.list_instances(Some("b"))
            .await
            .expect("instances")
            .is_empty()
    );
    let fewer = StatusChange {
        summary: None,
        put: vec![("d-7-abc".into(), "{\"slot\":7,\"ready\":true}".into())],
        delete: (100..200).map(|i| format!("d-{i}-abc")).collect(),
    };
    s.write_status("d", "n1", &fewer).await.expect("delta");
    let d = s.list_instances(Some("d")).await.expect("instances");
    assert_eq!(
        d.len(),
        101,
        "deleted entries are gone, the other node's stays"
    );
    assert!(
        d.iter()
            .any(|e| e.key == "d-7-abc" && e.value.contains("ready"))
    );
    assert!(
        matches!(
            s.write_status(
                "d",
                "n1",
                &StatusChange {
                    put: vec![("a/b".into(), "{}".into())],
                    ..StatusChange::default()
                }
            )
            .await,
            Err(StoreError::Invalid(_))
        ),
        "an instance key is one segment"
    );
    s.delete_status("d", "n1").await.expect("delete status");
    let d = s.list_instances(None).await.expect("instances");
    assert_eq!(
        d.iter()
            .map(|e| (e.node.as_str(), e.key.as_str()))
            .collect::<Vec<_>>(),
        [("n10", "d-0-fff")],
        "deleting a node's status deletes its instances, not another node's"
    );
    let nodes_of_d: Vec<String> = s
        .list_status(Some("d"))
        .await
        .expect("status")
        .into_iter()
        .map(|e| e.node)
        .collect();
    assert_eq!(nodes_of_d, ["n10"]);
    s.delete_status("d", "n10").await.expect("delete status");
    let one = StatusChange {
        put: vec![("b-0-abc".into(), "{}".into())],
        ..StatusChange::default()
    };
    s.write_status("b", "n1", &one).await.expect("instance");
    assert_eq!(
        s.session_generation(),
        generation,
        "a healthy session keeps its lease"
    );

    // Ending the session removes its keys at once.
    s.end_session().await.expect("end");
    assert!(!s.session_alive(), "an ended session is not alive");
    assert!(s.list_nodes().await.expect("nodes").is_empty());
    assert!(s.list_status(None).await.expect("status").is_empty());
    assert!(s.list_instances(None).await.expect("instances").is_empty());
    assert_eq!(
        s.list_fleets().await.expect("fleets").len(),
        1,
        "fleets are not on the lease"
    );
}

#[tokio::test]
async fn memory_store_conforms() {
    let s = MemoryStore::new("/t");
    let other = s.with_prefix("/other");
    tokio::time::timeout(Duration::from_secs(30), conformance(&s, &other))
        .await
        .expect("in time");
}

fn config(endpoint: &str) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![endpoint.to_string()],
        ..EtcdConfig::default()
    }
}

#[tokio::test]
async fn etcd_store_conforms() {
    let env = DevEnv::get();
    let prefix = format!("/test-conformance-{}", std::process::id());
    let s = EtcdStore::connect(&config(&env.etcd_endpoints), &prefix)
        .await
        .expect("connect");
    let other = EtcdStore::connect(&config(&env.etcd_endpoints), &format!("{prefix}-other"))
        .await
        .expect("connect");
    tokio::time::timeout(Duration::from_secs(60), conformance(&s, &other))
        .await
        .expect("in time");
    s.delete_fleet("b").await.expect("cleanup");
}

/// After a compaction past the watch's revision, and after etcd itself dies and comes back,
/// the watch re-lists and carries on.
#[tokio::test]
async fn etcd_watch_survives_compaction_and_restart() {
    let mut etcd = PrivateEtcd::start("watch");
    let s = EtcdStore::connect(&config(&etcd.endpoint()), "/w")
        .await
        .expect("connect");
    s.put_fleet("a", "1", Expect::Absent).await.expect("put");
    let mut w = s.watch_fleets();
    assert!(matches!(next(&mut w).await, FleetEvent::Resync(d) if d.len() == 1));

    let r = s.put_fleet("b", "1", Expect::Absent).await.expect("put");
    assert!(matches!(next(&mut w).await, FleetEvent::Put(d) if d.revision == r));
    s.compact_now().await.expect("compact");

    etcd.kill();
    etcd.resume();
    // While etcd was away nothing was watched; whatever happened, the watch re-lists.
    let writer = EtcdStore::connect(&config(&etcd.endpoint()), "/w")
        .await
        .expect("reconnect");
    wait_for(
        "etcd to answer after the restart",
        Duration::from_secs(30),
        || async { writer.put_fleet("c", "1", Expect::Absent).await.ok() },
    )
    .await;
    let seen_c = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match next(&mut w).await {
                FleetEvent::Resync(docs) if docs.iter().any(|d| d.name == "c") => return,
                FleetEvent::Put(d) if d.name == "c" => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(
        seen_c.is_ok(),
        "the watch saw the write made after etcd restarted"
    );
    s.put_fleet("d", "1", Expect::Absent)
        .await
        .expect("put after restart");
    let seen_d = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let FleetEvent::Put(d) = next(&mut w).await
                && d.name == "d"
            {
                return;
            }
        }
    })
    .await;
    assert!(seen_d.is_ok(), "and keeps watching");
}

/// Revokes `lease` with etcdctl, as an operator (or an expiry) would.
fn revoke(etcd: &PrivateEtcd, lease: i64) {
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .env("ETCDCTL_ENDPOINTS", etcd.endpoint())
        .args(["lease", "revoke", &format!("{lease:x}")])
        .output()
        .expect("etcdctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// When the lease is lost (etcd was away longer than its TTL, or someone revoked it), its keys
/// are gone; the session grants a new lease and says so, so the owner writes its keys again.
#[tokio::test]
async fn etcd_session_replaces_a_lost_lease() {
    let etcd = PrivateEtcd::start("lease");
    let s = EtcdStore::connect(&config(&etcd.endpoint()), "/l")
        .await
        .expect("connect");
    s.start_session(Duration::from_secs(3))
        .await
        .expect("session");
    let first = s.session_generation();
    s.put_node("n1", "{}").await.expect("node");
    revoke(&etcd, s.lease_id());
    assert!(
        s.list_nodes().await.expect("nodes").is_empty(),
        "the lease's keys went with it"
    );
    wait_for(
        "the session to replace the lost lease",
        Duration::from_secs(20),
        || async { (s.session_generation() > first).then_some(()) },
    )
    .await;
    s.put_node("n1", "{}")
        .await
        .expect("writes work on the new lease");
    assert_eq!(s.list_nodes().await.expect("nodes").len(), 1);
}

/// The session says when etcd stops answering its keep-alives, and when it answers again,
/// without any write to fail.
#[tokio::test]
async fn etcd_session_reports_an_outage() {
    let mut etcd = PrivateEtcd::start("alive");
    let s = EtcdStore::connect(&config(&etcd.endpoint()), "/a")
        .await
        .expect("connect");
    assert!(!s.session_alive(), "no session yet");
    s.start_session(Duration::from_secs(3))
        .await
        .expect("session");
    assert!(s.session_alive());

    etcd.kill();
    wait_for("the outage to show", Duration::from_secs(30), || async {
        (!s.session_alive()).then_some(())
    })
    .await;
    etcd.resume();
    wait_for(
        "the session to be alive again",
        Duration::from_secs(30),
        || async { s.session_alive().then_some(()) },
    )
    .await;
    s.put_node("n1", "{}")
        .await
        .expect("writes work after the outage");
}

/// A write refused because etcd no longer knows the lease replaces the lease at once, without
/// waiting for the keep-alive to find out (issue 11: after a partition longer than the TTL,
/// every write failed with "requested lease not found" until the agent was restarted).
#[tokio::test]
async fn etcd_a_write_refused_for_a_lost_lease_replaces_it() {
    let etcd = PrivateEtcd::start("lease-write");
    let s = EtcdStore::connect(&config(&etcd.endpoint()), "/lw")
        .await
        .expect("connect");
    // A long TTL: the keep-alive (every 20 s) is not what notices.
    s.start_session(Duration::from_secs(60))
        .await
        .expect("session");
    let first = s.session_generation();
    revoke(&etcd, s.lease_id());
    assert!(
        s.put_node("n1", "{}").await.is_err(),
        "the write on the lost lease is refused"
    );
    assert!(
        s.session_generation() > first,
        "the refused write replaced the lease"
    );
    s.put_node("n1", "{}")
        .await
        .expect("the next write goes through");
    assert_eq!(s.list_nodes().await.expect("nodes").len(), 1);
}
