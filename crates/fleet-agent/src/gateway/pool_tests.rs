//! Dispatch's table tests on paused time ([`super`]): idle-only picks, the queue's order
//! (classes, tenants in turn, the headroom, a full queue), affinity waiters, drains, stalls.

use super::*;

fn backend(id: &str, capacity: u32) -> Backend {
    Backend {
        id: id.into(),
        fleet: "f".into(),
        pool: "f".into(),
        url: format!("http://{id}"),
        capacity,
        ready: true,
        leaving: false,
    }
}

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(start_paused = true)]
async fn idle_instances_first_then_a_fifo_queue() {
    let pools = Pools::default();
    pools.update(vec![backend("a", 1), backend("b", 1)]);
    let first = pools
        .acquire("f", &Who::default(), None, 10, WAIT)
        .await
        .expect("a slot");
    let second = pools
        .acquire("f", &Who::default(), None, 10, WAIT)
        .await
        .expect("a slot");
    assert_ne!(
        first.backend.id, second.backend.id,
        "both idle instances are used"
    );
    // Both busy: three requests queue, and get slots in arrival order.
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiting = Vec::new();
    for n in 0..3 {
        let (p, order) = (pools.clone(), order.clone());
        waiting.push(tokio::spawn(async move {
            let lease = p
                .acquire("f", &Who::default(), None, 10, WAIT)
                .await
                .expect("queued slot");
            lock(&order).push(n);
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(lease);
        }));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(pools.queue_depths(), [("f".to_string(), 3)]);
    drop(first);
    drop(second);
    for w in waiting {
        w.await.expect("waiter");
    }
    assert_eq!(*lock(&order), [0, 1, 2]);
}

/// Who waits for a full pool gets it in this order: interactive before batch, and inside a
/// class the tenants in turn by instance time (a long answer counts for its length), not
/// first come first served. Each row: the requests queued, in arrival order (name, tenant,
/// class, seconds its answer takes), while one single-slot instance is busy; then the
/// order they got the instance.
#[tokio::test(start_paused = true)]
async fn a_full_pool_serves_classes_first_then_tenants_in_turn() {
    use fleet_api::keys::Priority::{Batch, Interactive};
    type Row = (&'static str, &'static str, fleet_api::keys::Priority, u64);
    let table: [(&str, Vec<Row>, &[&str]); 4] = [
        (
            "a flood of one tenant does not go before another's request",
            vec![
                ("a1", "a", Interactive, 1),
                ("a2", "a", Interactive, 1),
                ("a3", "a", Interactive, 1),
                ("a4", "a", Interactive, 1),
                ("b1", "b", Interactive, 1),
                ("b2", "b", Interactive, 1),
            ],
            &["a1", "b1", "a2", "b2", "a3", "a4"],
        ),
        (
            "turns weigh instance time: a's answers take 3 s, b's 1 s",
            vec![
                ("a1", "a", Interactive, 3),
                ("a2", "a", Interactive, 3),
                ("b1", "b", Interactive, 1),
                ("b2", "b", Interactive, 1),
                ("b3", "b", Interactive, 1),
                ("b4", "b", Interactive, 1),
            ],
            &["a1", "b1", "b2", "b3", "a2", "b4"],
        ),
        (
            "batch only when no interactive request waits",
            vec![
                ("c1", "c", Batch, 1),
                ("c2", "c", Batch, 1),
                ("a1", "a", Interactive, 1),
                ("d1", "d", Batch, 1),
                ("b1", "b", Interactive, 1),
            ],
            &["a1", "b1", "c1", "d1", "c2"],
        ),
        (
            "a tenant alone gets every slot",
            vec![
                ("c1", "c", Batch, 1),
                ("c2", "c", Batch, 1),
                ("c3", "c", Batch, 1),
            ],
            &["c1", "c2", "c3"],
        ),
    ];
    for (case, rows, expect) in table {
        let pools = Pools::default();
        pools.update(vec![backend("a", 1)]);
        let busy = pools.try_on("f", "a", &Who::default()).expect("free");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, tenant, priority, secs) in rows {
            let who = Who {
                tenant: Arc::from(tenant),
                priority,
            };
            let (p, order) = (pools.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let lease = p.acquire("f", &who, None, 16, WAIT).await.expect("a slot");
                lock(&order).push(name);
                tokio::time::sleep(Duration::from_secs(secs)).await;
                drop(lease);
            }));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(busy);
        for t in tasks {
            t.await.expect("join");
        }
        assert_eq!(*lock(&order), expect, "{case}");
    }
}

/// While interactive requests come, a batch flood leaves a pool's last free slot to them:
/// the next editor is served at once. Once none has come for [`HEADROOM_WINDOW`], batch
/// requests take every slot again (at the next slot freed).
#[tokio::test(start_paused = true)]
async fn a_batch_flood_leaves_the_headroom_to_interactive_requests() {
    use fleet_api::keys::Priority::{Batch, Interactive};
    let pools = Pools::default();
    pools.set_batch_headroom(1);
    pools.update(vec![backend("a", 1), backend("b", 1), backend("c", 1)]);
    let batch = Who {
        tenant: Arc::from("etl"),
        priority: Batch,
    };
    let editor = Who {
        tenant: Arc::from("ed"),
        priority: Interactive,
    };
    let first = pools
        .acquire("f", &editor, None, 8, WAIT)
        .await
        .expect("editor");
    drop(first);
    let one = pools
        .acquire("f", &batch, None, 8, WAIT)
        .await
        .expect("batch 1");
    let _two = pools
        .acquire("f", &batch, None, 8, WAIT)
        .await
        .expect("batch 2");
    let third = {
        let (p, w) = (pools.clone(), batch.clone());
        tokio::spawn(async move { p.acquire("f", &w, None, 8, WAIT).await })
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(!third.is_finished(), "the last free slot is kept");
    assert_eq!(pools.queue_depths(), [("f".to_string(), 1)]);
    let next = pools.acquire("f", &editor, None, 8, Duration::ZERO).await;
    assert!(next.is_ok(), "the editor is served at once");
    drop(next);
    // No editor for the window: the batch request takes the slot freed next.
    tokio::time::sleep(HEADROOM_WINDOW).await;
    drop(one);
    let got = third.await.expect("join").expect("a slot at last");
    assert_eq!(got.who.priority, Batch);
    let all = pools.acquire("f", &batch, None, 8, Duration::ZERO).await;
    assert!(all.is_ok(), "every slot goes to batch without editors");
}

/// A full queue takes a request of a higher class, or of a tenant with fewer waiting, in
/// place of the flood's newest, which is refused as if the queue had been full for it.
#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_the_flood_not_the_others() {
    use fleet_api::keys::Priority::{Batch, Interactive};
    let pools = Pools::default();
    pools.update(vec![backend("a", 1)]);
    let _busy = pools.try_on("f", "a", &Who::default()).expect("free");
    let who = |tenant: &str, priority| Who {
        tenant: Arc::from(tenant),
        priority,
    };
    let queue = |w: Who| {
        let p = pools.clone();
        tokio::spawn(async move { p.acquire("f", &w, None, 2, WAIT).await.err() })
    };
    let flood: Vec<_> = (0..2).map(|_| queue(who("etl", Batch))).collect();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        pools
            .acquire("f", &who("etl", Batch), None, 2, WAIT)
            .await
            .err(),
        Some(Refused::QueueFull),
        "its own tenant's next request finds the queue full"
    );
    let editor = queue(who("ed", Interactive));
    tokio::time::sleep(Duration::from_millis(1)).await;
    let [first, second] = <[_; 2]>::try_from(flood).expect("two");
    assert_eq!(
        second.await.expect("join"),
        Some(Refused::QueueFull),
        "the flood's newest gave its place"
    );
    assert!(
        !first.is_finished() && !editor.is_finished(),
        "both wait on"
    );
    first.abort();
    editor.abort();
}

#[tokio::test(start_paused = true)]
async fn capacity_is_num_parallel() {
    let pools = Pools::default();
    pools.update(vec![backend("a", 2)]);
    let _one = pools
        .acquire("f", &Who::default(), None, 0, WAIT)
        .await
        .expect("1st");
    let _two = pools
        .acquire("f", &Who::default(), None, 0, WAIT)
        .await
        .expect("2nd");
    assert_eq!(
        pools
            .acquire("f", &Who::default(), None, 0, WAIT)
            .await
            .err(),
        Some(Refused::QueueFull),
        "a third waits, and the queue holds none"
    );
}

#[tokio::test(start_paused = true)]
async fn bounded_queue_and_wait() {
    let pools = Pools::default();
    pools.update(vec![backend("a", 1)]);
    let _busy = pools
        .acquire("f", &Who::default(), None, 1, WAIT)
        .await
        .expect("slot");
    let p = pools.clone();
    let queued =
        tokio::spawn(async move { p.acquire("f", &Who::default(), None, 1, WAIT).await.err() });
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        pools
            .acquire("f", &Who::default(), None, 1, WAIT)
            .await
            .err(),
        Some(Refused::QueueFull)
    );
    assert_eq!(
        queued.await.expect("join"),
        Some(Refused::Timeout),
        "after the timeout"
    );
    assert_eq!(
        pools
            .acquire("other", &Who::default(), None, 1, WAIT)
            .await
            .err(),
        Some(Refused::NoneReady)
    );
}

#[tokio::test(start_paused = true)]
async fn unready_leaving_and_excluded_instances_take_nothing() {
    let pools = Pools::default();
    let mut unready = backend("u", 1);
    unready.ready = false;
    let mut leaving = backend("l", 1);
    leaving.leaving = true;
    pools.update(vec![unready, leaving, backend("a", 1)]);
    for _ in 0..3 {
        let lease = pools
            .acquire("f", &Who::default(), None, 0, WAIT)
            .await
            .expect("a");
        assert_eq!(lease.backend.id, "a");
    }
    assert_eq!(
        pools
            .acquire("f", &Who::default(), Some("a"), 5, WAIT)
            .await
            .err(),
        Some(Refused::NoneReady),
        "a retry never goes back to the instance that failed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_drain_waits_for_requests_in_flight_within_the_grace() {
    let pools = Pools::default();
    pools.update(vec![backend("a", 2), backend("b", 1)]);
    let on_a = pools
        .acquire("f", &Who::default(), Some("b"), 0, WAIT)
        .await
        .expect("a");
    let p = pools.clone();
    let drain = tokio::spawn(async move { p.drain("a", Duration::from_secs(30)).await });
    tokio::time::sleep(Duration::from_millis(1)).await;
    // Draining: new requests go elsewhere although a has room.
    let other = pools
        .acquire("f", &Who::default(), None, 0, WAIT)
        .await
        .expect("b");
    assert_eq!(other.backend.id, "b");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!drain.is_finished(), "a request is still in flight on a");
    on_a.finish(false);
    let waited = drain.await.expect("drain");
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    // Within the grace: a stuck request does not hold the stop forever.
    drop(other);
    let stuck = pools
        .acquire("f", &Who::default(), None, 0, WAIT)
        .await
        .expect("b");
    let waited = pools.drain(&stuck.backend.id, Duration::from_secs(3)).await;
    assert_eq!(waited, Duration::from_secs(3));
}

/// Requests waiting for one instance (their conversation's) get that instance's free slots
/// before the pool's queue, in order; at most [`AFFINE_WAITERS`] wait for one instance; a
/// wait ends in time, and when the instance is drained.
#[tokio::test(start_paused = true)]
async fn requests_waiting_for_their_instance_get_it_first() {
    let pools = Pools::default();
    pools.update(vec![backend("a", 1), backend("b", 1)]);
    let on_a = pools.try_on("f", "a", &Who::default()).expect("a is free");
    assert!(
        pools.try_on("f", "a", &Who::default()).is_none(),
        "a is busy now"
    );
    let busy = pools.busy_on("f", "a").expect("a takes requests");
    assert_eq!(
        (busy.own.len(), busy.ahead, busy.idle_elsewhere),
        (1, 0, true)
    );
    let on_b = pools
        .acquire("f", &Who::default(), None, 8, WAIT)
        .await
        .expect("b");
    let fifo = {
        let p = pools.clone();
        tokio::spawn(async move { p.acquire("f", &Who::default(), None, 8, WAIT).await })
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    let wait_for_a = |secs| {
        let p = pools.clone();
        tokio::spawn(async move {
            p.wait_on(
                "a",
                &Who::default(),
                Instant::now() + Duration::from_secs(secs),
            )
            .await
        })
    };
    let first = wait_for_a(5);
    tokio::time::sleep(Duration::from_millis(1)).await;
    let second = wait_for_a(5);
    tokio::time::sleep(Duration::from_millis(1)).await;
    let busy = pools.busy_on("f", "a").expect("a takes requests");
    assert_eq!(
        (busy.ahead, busy.idle_elsewhere, busy.queued),
        (2, false, 1)
    );
    assert_eq!(busy.others.len(), 1);
    drop(on_a);
    let got = first.await.expect("join").expect("a slot");
    assert_eq!(got.backend.id, "a", "before the queue");
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(
        !fifo.is_finished() && !second.is_finished(),
        "the others wait on"
    );
    drop(got);
    let got = second.await.expect("join").expect("a slot");
    assert_eq!(got.backend.id, "a", "the second in order");
    drop(on_b);
    let queued = fifo.await.expect("fifo").expect("a slot");
    assert_eq!(queued.backend.id, "b");
    // A wait that runs out says so.
    let until = Instant::now() + Duration::from_millis(100);
    assert!(pools.wait_on("a", &Who::default(), until).await.is_none());
    // At most AFFINE_WAITERS wait for one instance.
    let waiting: Vec<_> = (0..AFFINE_WAITERS).map(|_| wait_for_a(60)).collect();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(
        pools.busy_on("f", "a").is_none(),
        "a is at its waiters' bound"
    );
    let until = Instant::now() + Duration::from_secs(60);
    assert!(
        pools.wait_on("a", &Who::default(), until).await.is_none(),
        "no wait past the bound"
    );
    // Draining the instance lets them go (to the pool) at once.
    drop(queued);
    pools.drain("a", Duration::from_secs(1)).await;
    for w in waiting {
        assert!(w.await.expect("join").is_none());
    }
    drop(got);
}

/// A request in the pool's queue lets conversations waiting for their instance go first
/// for a quarter of its queue timeout, then takes the next slot that frees: a stream of
/// busy conversations cannot starve a new one.
#[tokio::test(start_paused = true)]
async fn the_queue_yields_to_conversations_for_a_while_only() {
    let pools = Pools::default();
    pools.update(vec![backend("a", 1)]);
    let mut on_a = pools.try_on("f", "a", &Who::default()).expect("a is free");
    let fifo = {
        let p = pools.clone();
        tokio::spawn(async move { p.acquire("f", &Who::default(), None, 8, WAIT).await })
    };
    let wait_for_a = || {
        let p = pools.clone();
        tokio::spawn(async move { p.wait_on("a", &Who::default(), Instant::now() + WAIT).await })
    };
    // Within 15 s (60 s / 4), every slot that frees goes to a conversation.
    for _ in 0..3 {
        let conversation = wait_for_a();
        tokio::time::sleep(Duration::from_secs(4)).await;
        drop(on_a);
        on_a = conversation.await.expect("join").expect("a slot");
        assert!(!fifo.is_finished(), "the queue yields");
    }
    // At 16 s the queue goes first; the conversation waits for the next slot.
    let conversation = wait_for_a();
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(on_a);
    let queued = fifo.await.expect("join").expect("a slot");
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(!conversation.is_finished(), "after the queue's request");
    drop(queued);
    assert!(conversation.await.expect("join").is_some());
}

#[tokio::test(start_paused = true)]
async fn waiters_whose_clients_left_are_not_counted() {
    let pools = Pools::default();
    pools.update(vec![backend("a", 1)]);
    let _busy = pools
        .acquire("f", &Who::default(), None, 8, WAIT)
        .await
        .expect("a slot");
    let gone = {
        let pools = pools.clone();
        tokio::spawn(async move { pools.acquire("f", &Who::default(), None, 8, WAIT).await })
    };
    let stays = {
        let pools = pools.clone();
        tokio::spawn(async move { pools.acquire("f", &Who::default(), None, 8, WAIT).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(pools.queue_depths(), [("f".to_string(), 2)]);
    gone.abort();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        pools.queue_depths(),
        [("f".to_string(), 1)],
        "the client left"
    );
    stays.abort();
}

#[tokio::test(start_paused = true)]
async fn stalls_count_in_a_row() {
    let pools = Pools::default();
    pools.update(vec![backend("a", 1)]);
    for n in 1..=2 {
        pools
            .acquire("f", &Who::default(), None, 0, WAIT)
            .await
            .expect("a")
            .finish(true);
        assert_eq!(pools.stalls("a"), n);
    }
    pools
        .acquire("f", &Who::default(), None, 0, WAIT)
        .await
        .expect("a")
        .finish(false);
    assert_eq!(pools.stalls("a"), 0, "a success starts the count again");
}
