//! The controller on fakes: an in-memory store, a fake runtime and scripted probes. Fast, and
//! every test runs under a timeout.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use fleet_agent::controller::{Agent, AgentConfig, View};
use fleet_agent::gateway::{Gateway, GatewayConfig};
use fleet_agent::ollama::ScriptedOllama;
use fleet_agent::policy::ScriptedHost;
use fleet_agent::prober::ScriptedProbes;
use fleet_api::{FleetStatus, LABEL_FLEET, Phase};
use fleet_e2e::wait_for;
use fleet_runtime::fake::FakeRuntime;
use fleet_runtime::{Runtime, TaskState};
use fleet_store::memory::MemoryStore;
use fleet_store::{Expect, Store};
use tokio::sync::{Notify, oneshot};

const IMAGE: &str = "localhost/ollama-sim:dev";

fn manifest(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: ollama-fleet.io/v1alpha1\nkind: OllamaFleet\nmetadata: {{name: {name}}}\nspec:\n  model: m\n  image: {IMAGE}\n  imagePullPolicy: Never\n  restartBackoff: {{initial: 100ms, max: 1s}}\n  terminationGracePeriod: 1s\n{extra}"
    )
}

struct Running {
    view: Arc<RwLock<View>>,
    runtime: FakeRuntime,
    store: MemoryStore,
    probes: Arc<ScriptedProbes>,
    ollama: Arc<ScriptedOllama>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

fn config() -> AgentConfig {
    let mut cfg = AgentConfig::new("node-a", "test");
    cfg.sockets = 2;
    cfg.resync = Duration::from_millis(200);
    cfg.policy.host_paths.push("/node-cache".into());
    cfg
}

fn start(runtime: FakeRuntime, store: MemoryStore, cfg: AgentConfig) -> Running {
    start_with(runtime, store, cfg, None)
}

/// [`start`], routing through `gateway` when given.
fn start_with(
    runtime: FakeRuntime,
    store: MemoryStore,
    cfg: AgentConfig,
    gateway: Option<Arc<Gateway>>,
) -> Running {
    let wake = Arc::new(Notify::new());
    let probes = Arc::new(ScriptedProbes::new(Some(wake.clone())));
    let ollama = Arc::new(ScriptedOllama::default());
    ollama.share("/node-cache");
    let agent = Agent::with_probes(
        cfg,
        Arc::new(runtime.clone()),
        Arc::new(store.clone()),
        probes.clone(),
        wake,
    )
    .with_ollama(ollama.clone())
    .with_host(Arc::new(ScriptedHost::default()));
    let agent = match gateway {
        Some(gw) => agent.with_gateway(gw),
        None => agent,
    };
    let view = agent.view();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async {
        let _ = rx.await;
    }));
    Running {
        view,
        runtime,
        store,
        probes,
        ollama,
        stop: Some(tx),
        task,
    }
}

fn fresh() -> (FakeRuntime, MemoryStore) {
    let rt = FakeRuntime::new();
    rt.add_image(FakeRuntime::image_named(IMAGE));
    (rt, MemoryStore::default())
}

/// Writes a fleet document, panicking when the store refuses; returns the new revision.
async fn put(store: &MemoryStore, name: &str, doc: &str, expect: Expect) -> i64 {
    store
        .put_fleet(name, doc, expect)
        .await
        .unwrap_or_else(|e| panic!("put {name}: {e}"))
}

/// Fleet `f` with `extra` in a fresh store and runtime, and an agent on them.
async fn started(extra: &str) -> Running {
    let (rt, store) = fresh();
    put(&store, "f", &manifest("f", extra), Expect::Absent).await;
    start(rt, store, config())
}

/// [`started`], and the status once `ready` instances are ready.
async fn converged(extra: &str, ready: u32) -> (Running, FleetStatus) {
    let a = started(extra).await;
    let s = wait_status(&a.store, "f", &format!("{ready} ready"), |s| {
        s.ready_replicas == ready
    })
    .await;
    (a, s)
}

async fn status(store: &MemoryStore, fleet: &str) -> Option<FleetStatus> {
    let statuses = fleet_agent::status::read(store, Some(fleet)).await.ok()?;
    statuses.into_iter().next()
}

async fn wait_status(
    store: &MemoryStore,
    fleet: &str,
    what: &str,
    check: impl Fn(&FleetStatus) -> bool,
) -> FleetStatus {
    wait_for(what, Duration::from_secs(10), || async {
        status(store, fleet).await.filter(|s| check(s))
    })
    .await
}

async fn running(rt: &FakeRuntime) -> Vec<String> {
    let mut ids: Vec<String> = rt
        .list()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|o| o.state == TaskState::Running)
        .map(|o| o.id)
        .collect();
    ids.sort();
    ids
}

#[tokio::test(start_paused = true)]
async fn converges_reports_and_stays_idle() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (rt, store) = fresh();
        let generation = put(
            &store,
            "f",
            &manifest(
                "f",
                "  replicas: {perSocket: 2}\n  resources: {memory: 64Mi, cpus: 0.5}\n",
            ),
            Expect::Absent,
        )
        .await;
        let a = start(rt, store, config());
        let s = wait_status(&a.store, "f", "4 ready instances", |s| {
            s.ready_replicas == 4
        })
        .await;
        assert_eq!(
            (
                s.desired_replicas,
                s.replicas,
                s.updated_replicas,
                s.observed_generation
            ),
            (4, 4, 4, generation)
        );
        assert_eq!(
            s.condition("Available").map(|c| c.status.as_str()),
            Some("True")
        );
        assert_eq!(
            s.condition("Progressing").map(|c| c.reason.as_str()),
            Some("Converged")
        );
        assert!(
            s.instances
                .iter()
                .all(|i| i.phase == Phase::Ready && i.restarts == 0)
        );
        let ports: Vec<u16> = s.instances.iter().map(|i| i.port).collect();
        assert_eq!(ports, [11434, 11435, 11436, 11437]);
        // The limits reach the runtime.
        let spec = a.runtime.spec_of(&s.instances[0].id).expect("spec");
        assert_eq!(spec.limits.memory_bytes, Some(64 << 20));
        assert_eq!(spec.limits.cpu_quota_us, Some(50_000));
        assert_eq!(spec.cgroup_parent, "/ollama-fleet/test");
        // The node is registered.
        let nodes = a.store.list_nodes().await.expect("nodes");
        assert_eq!(nodes.len(), 1);
        assert!(nodes[0].value.contains("\"sockets\":2"));
        // Idle: several passes later, nothing more was written.
        let writes = a.store.revision();
        let calls = a.runtime.calls().len();
        fleet_e2e::holds_for(
            "an idle fleet writing nothing to the store",
            Duration::from_secs(1),
            || async { a.store.revision() == writes },
        )
        .await;
        let new_calls: Vec<String> = a.runtime.calls()[calls..]
            .iter()
            .filter(|c| !c.starts_with("list") && !c.starts_with("image"))
            .cloned()
            .collect();
        assert!(
            new_calls.is_empty(),
            "an idle fleet changes nothing: {new_calls:?}"
        );
        a.stop().await;
    })
    .await
    .expect("in time");
}

/// An outage of an idle fleet's store (nothing to write) still shows in readiness, and stops
/// nothing.
#[tokio::test(start_paused = true)]
async fn a_store_outage_shows_while_idle_and_stops_nothing() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (a, _) = converged("  replicas: {perNode: 2}\n", 2).await;
        let store_up = |a: &Running| a.view.read().map(|v| v.store_up).unwrap_or(false);
        assert!(store_up(&a));
        let before = running(&a.runtime).await;

        a.store.set_down(true);
        wait_for("the outage to show", Duration::from_secs(10), || async {
            (!store_up(&a)).then_some(())
        })
        .await;
        assert_eq!(running(&a.runtime).await, before, "nothing stopped");

        a.store.set_down(false);
        wait_for(
            "the store to be up again",
            Duration::from_secs(10),
            || async { store_up(&a).then_some(()) },
        )
        .await;
        assert_eq!(running(&a.runtime).await, before);
        a.stop().await;
    })
    .await
    .expect("in time");
}

#[tokio::test(start_paused = true)]
async fn crashes_and_ooms_are_replaced_with_history() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (a, s) = converged("  replicas: {perNode: 2}\n", 2).await;
        let victim = s.instances[0].id.clone();

        a.runtime.exit(&victim, 3);
        let s = wait_status(&a.store, "f", "slot 0 replaced after a crash", |s| {
            s.ready_replicas == 2 && s.instances.iter().all(|i| i.id != victim)
        })
        .await;
        let slot0 = s.instances.iter().find(|i| i.slot == 0).expect("slot 0");
        assert_eq!(slot0.restarts, 1);
        let exit = slot0.last_exit.as_ref().expect("last exit");
        assert_eq!((exit.code, exit.reason.as_str()), (3, "Error"));

        let victim = slot0.id.clone();
        a.runtime.oom(&victim);
        let s = wait_status(&a.store, "f", "slot 0 replaced after an OOM kill", |s| {
            s.ready_replicas == 2 && s.instances.iter().all(|i| i.id != victim)
        })
        .await;
        let slot0 = s.instances.iter().find(|i| i.slot == 0).expect("slot 0");
        assert_eq!(slot0.restarts, 2);
        let exit = slot0.last_exit.as_ref().expect("last exit");
        assert_eq!((exit.code, exit.reason.as_str()), (137, "OOMKilled"));

        // An OOM kill whose event never came (the agent was away): the cgroup's count tells.
        let victim = slot0.id.clone();
        a.runtime.oom_unseen(&victim);
        let s = wait_status(
            &a.store,
            "f",
            "slot 0 replaced after an unseen OOM kill",
            |s| s.ready_replicas == 2 && s.instances.iter().all(|i| i.id != victim),
        )
        .await;
        let slot0 = s.instances.iter().find(|i| i.slot == 0).expect("slot 0");
        assert_eq!(slot0.restarts, 3);
        let exit = slot0.last_exit.as_ref().expect("last exit");
        assert_eq!((exit.code, exit.reason.as_str()), (137, "OOMKilled"));

        // A SIGKILL from elsewhere (kill -9) is not an OOM kill.
        let victim = slot0.id.clone();
        a.runtime.exit(&victim, 137);
        let s = wait_status(&a.store, "f", "slot 0 replaced after a kill -9", |s| {
            s.ready_replicas == 2 && s.instances.iter().all(|i| i.id != victim)
        })
        .await;
        let slot0 = s.instances.iter().find(|i| i.slot == 0).expect("slot 0");
        let exit = slot0.last_exit.as_ref().expect("last exit");
        assert_eq!(exit.code, 137);
        assert_ne!(exit.reason.as_str(), "OOMKilled");
        a.stop().await;
    })
    .await
    .expect("in time");
}

#[tokio::test(start_paused = true)]
async fn crash_loops_back_off() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (rt, store) = fresh();
        put(
            &store,
            "f",
            &manifest("f", "  replicas: {perNode: 1}\n")
                .replace("initial: 100ms, max: 1s", "initial: 2s, max: 10s"),
            Expect::Absent,
        )
        .await;
        let a = start(rt, store, config());
        let s = wait_status(&a.store, "f", "1 ready", |s| s.ready_replicas == 1).await;
        // The first crash is restarted at once, the second waits 2s in BackOff.
        a.runtime.exit(&s.instances[0].id, 1);
        let s = wait_status(&a.store, "f", "the first restart", |s| {
            s.instances
                .first()
                .is_some_and(|i| i.restarts == 1 && i.ready)
        })
        .await;
        let second_crash = fleet_runtime::clock::Instant::now();
        let crashed = s.instances[0].id.clone();
        a.runtime.exit(&crashed, 1);
        let s = wait_status(&a.store, "f", "BackOff after the second crash", |s| {
            s.instances
                .first()
                .is_some_and(|i| i.phase == Phase::BackOff)
        })
        .await;
        assert_eq!(s.ready_replicas, 0);
        // The replacement is not started before the 2s backoff has passed.
        let third_start = wait_for(
            "the replacement to start",
            Duration::from_secs(10),
            || async {
                a.runtime
                    .timed_calls()
                    .into_iter()
                    .find(|(at, c)| c.starts_with("start f-0-") && *at >= second_crash)
                    .map(|(at, _)| at)
            },
        )
        .await;
        let waited = third_start.duration_since(second_crash);
        assert!(
            waited >= Duration::from_millis(1950),
            "restarted {waited:?} after the second crash, before its 2s backoff"
        );
        wait_status(&a.store, "f", "the restart after the backoff", |s| {
            s.instances
                .first()
                .is_some_and(|i| i.restarts == 2 && i.ready)
        })
        .await;
        a.stop().await;
    })
    .await
    .expect("in time");
}

#[tokio::test(start_paused = true)]
async fn a_restarted_agent_adopts_without_restarting() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (rt, store) = fresh();
        put(
            &store,
            "f",
            &manifest(
                "f",
                "  replicas: {perNode: 3}\n  probes: {startupTimeoutSeconds: 1}\n",
            ),
            Expect::Absent,
        )
        .await;
        let a = start(rt.clone(), store.clone(), config());
        wait_status(&a.store, "f", "3 ready", |s| s.ready_replicas == 3).await;
        let before = running(&rt).await;
        a.stop().await;

        // Older than their startup timeout (creation times are whole seconds).
        tokio::time::sleep(Duration::from_millis(2100)).await;
        store.delete_status("f", "node-a").await.expect("delete");

        let calls = rt.calls().len();
        let b = start(rt.clone(), store, config());
        // The new agent publishes status only once it knows what is ready: its first status
        // already says 3 ready (not "starting" out of ignorance).
        let first = wait_for(
            "the new agent's first status",
            Duration::from_secs(10),
            || async { status(&b.store, "f").await },
        )
        .await;
        assert_eq!(first.ready_replicas, 3, "{first:?}");
        fleet_e2e::holds_for(
            "the same containers running",
            Duration::from_millis(500),
            || async { running(&rt).await == before },
        )
        .await;
        let changes: Vec<String> = rt.calls()[calls..]
            .iter()
            .filter(|c| {
                c.starts_with("create")
                    || c.starts_with("remove")
                    || c.starts_with("kill")
                    || c.starts_with("start")
            })
            .cloned()
            .collect();
        assert!(changes.is_empty(), "adoption changes nothing: {changes:?}");
        b.stop().await;
    })
    .await
    .expect("in time");
}

#[tokio::test(start_paused = true)]
async fn scale_delete_and_unlabelled_containers() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (rt, store) = fresh();
        // A container that is not ours, in the same namespace.
        rt.add_running(FakeRuntime::container(
            "someone-else",
            IMAGE,
            &[("team", "x")],
        ));
        let r = put(
            &store,
            "f",
            &manifest("f", "  replicas: {perNode: 3}\n"),
            Expect::Absent,
        )
        .await;
        let a = start(rt, store, config());
        wait_status(&a.store, "f", "3 ready", |s| s.ready_replicas == 3).await;

        let r = put(
            &a.store,
            "f",
            &manifest("f", "  replicas: {perNode: 5}\n"),
            Expect::Revision(r),
        )
        .await;
        let s = wait_status(&a.store, "f", "5 ready", |s| s.ready_replicas == 5).await;
        assert_eq!(s.observed_generation, r);
        put(
            &a.store,
            "f",
            &manifest("f", "  replicas: {perNode: 2}\n"),
            Expect::Revision(r),
        )
        .await;
        let s = wait_status(&a.store, "f", "2 instances", |s| {
            s.replicas == 2 && s.instances.len() == 2
        })
        .await;
        let slots: Vec<u32> = s.instances.iter().map(|i| i.slot).collect();
        assert_eq!(slots, [0, 1], "the highest slots go first");

        a.store.delete_fleet("f").await.expect("delete");
        wait_for(
            "every instance and the status to be gone",
            Duration::from_secs(10),
            || async {
                let left = a.runtime.list().await.unwrap_or_default().len();
                let status = a
                    .store
                    .list_status(Some("f"))
                    .await
                    .unwrap_or_default()
                    .len();
                (left == 0 && status == 0).then_some(())
            },
        )
        .await;
        assert!(
            a.runtime.all_ids().contains(&"someone-else".to_string()),
            "an unlabelled container is never touched"
        );
        assert!(!a.runtime.calls().iter().any(|c| c.contains("someone-else")));
        a.stop().await;
    })
    .await
    .expect("in time");
}

#[tokio::test(start_paused = true)]
async fn invalid_documents_and_pauses_leave_instances_alone() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (rt, store) = fresh();
        let r = put(
            &store,
            "f",
            &manifest("f", "  replicas: {perNode: 2}\n"),
            Expect::Absent,
        )
        .await;
        let a = start(rt.clone(), store, config());
        wait_status(&a.store, "f", "2 ready", |s| s.ready_replicas == 2).await;
        let before = running(&rt).await;

        let r = put(
            &a.store,
            "f",
            "spec: [this is: not a fleet",
            Expect::Revision(r),
        )
        .await;
        let s = wait_status(&a.store, "f", "SpecValid=False", |s| {
            s.condition("SpecValid")
                .is_some_and(|c| c.status == "False")
        })
        .await;
        assert_eq!(s.observed_generation, r);
        assert!(
            !s.condition("SpecValid").expect("c").message.is_empty(),
            "the error is reported"
        );
        assert_eq!(running(&rt).await, before, "nothing that runs is disturbed");

        let r = put(
            &a.store,
            "f",
            &manifest("f", "  replicas: {perNode: -1}\n"),
            Expect::Revision(r),
        )
        .await;
        wait_status(&a.store, "f", "the validation error", |s| {
            s.observed_generation == r
                && s.condition("SpecValid")
                    .is_some_and(|c| c.message.contains("spec.replicas.perNode"))
        })
        .await;
        assert_eq!(running(&rt).await, before);

        let r = put(
            &a.store,
            "f",
            &manifest("f", "  replicas: {perNode: 4}\n  paused: true\n"),
            Expect::Revision(r),
        )
        .await;
        let s = wait_status(&a.store, "f", "Paused", |s| {
            s.observed_generation == r
                && s.condition("Progressing")
                    .is_some_and(|c| c.reason == "Paused")
        })
        .await;
        assert_eq!(s.replicas, 2);
        fleet_e2e::holds_for("paused: no changes", Duration::from_millis(500), || async {
            running(&rt).await == before
        })
        .await;

        put(
            &a.store,
            "f",
            &manifest("f", "  replicas: {perNode: 4}\n"),
            Expect::Revision(r),
        )
        .await;
        wait_status(&a.store, "f", "4 ready after unpausing", |s| {
            s.ready_replicas == 4
        })
        .await;
        a.stop().await;
    })
    .await
    .expect("in time");
}

#[tokio::test(start_paused = true)]
async fn missing_image_and_node_selector() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let rt = FakeRuntime::new();
        let store = MemoryStore::default();
        put(
            &store,
            "f",
            &manifest("f", "  replicas: {perNode: 2}\n"),
            Expect::Absent,
        )
        .await;
        put(
            &store,
            "g",
            &manifest(
                "g",
                "  replicas: {perNode: 2}\n  nodeSelector: {pool: gpu}\n",
            ),
            Expect::Absent,
        )
        .await;
        let mut cfg = config();
        cfg.labels.insert("pool".into(), "cpu".into());
        let a = start(rt, store, cfg);
        let s = wait_status(&a.store, "f", "ErrImageNeverPull", |s| {
            s.condition("Progressing")
                .is_some_and(|c| c.reason == "ErrImageNeverPull")
        })
        .await;
        assert!(
            s.condition("Progressing")
                .expect("c")
                .message
                .contains(IMAGE)
        );
        assert!(
            a.runtime.list().await.expect("list").is_empty(),
            "nothing is started without the image"
        );
        assert!(
            status(&a.store, "g").await.is_none(),
            "a fleet that does not select this node has no status here"
        );

        a.runtime.add_image(FakeRuntime::image_named(IMAGE));
        wait_status(&a.store, "f", "2 ready once the image is there", |s| {
            s.ready_replicas == 2
        })
        .await;
        assert!(
            a.runtime
                .list()
                .await
                .expect("list")
                .iter()
                .all(|o| o.labels[LABEL_FLEET] == "f")
        );
        a.stop().await;
    })
    .await
    .expect("in time");
}

#[tokio::test(start_paused = true)]
async fn unready_instances_are_reported() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (a, s) = converged("  replicas: {perNode: 2}\n", 2).await;
        a.probes.set_failing(&s.instances[1].id, true);
        let s = wait_status(&a.store, "f", "one unready", |s| s.ready_replicas == 1).await;
        assert_eq!(s.instances[1].phase, Phase::Unready);
        // And it stays Unready (it does not fall back to Starting, nor time out as one).
        let passes = a.view.read().expect("view").passes;
        wait_for("five more passes", Duration::from_secs(10), || async {
            (a.view.read().expect("view").passes >= passes + 5).then_some(())
        })
        .await;
        let s = status(&a.store, "f").await.expect("status");
        assert_eq!(s.instances[1].phase, Phase::Unready, "{s:?}");
        assert_eq!(
            s.condition("Available").map(|c| c.status.as_str()),
            Some("True"),
            "25% of 2 rounds to 1 allowed"
        );
        a.stop().await;
    })
    .await
    .expect("in time");
}

/// Regression: a pass that lists while a create is half done (created, not yet started) and
/// reads the busy slots after the action finished must not take the new container for one that
/// failed to start (it would replace, i.e. kill, a healthy new instance).
#[tokio::test(start_paused = true)]
async fn half_done_actions_are_not_mistaken_for_failed_starts() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (rt, store) = fresh();
        // A listing outlasts a start: whatever was starting when it looked has finished by the
        // time it answers.
        rt.set_start_delay(Duration::from_millis(100));
        rt.set_list_delay(Duration::from_millis(200));
        let mut cfg = config();
        cfg.concurrency = 4;
        cfg.min_pass_interval = Duration::from_millis(10);
        put(
            &store,
            "f",
            &manifest("f", "  replicas: {perNode: 8}\n"),
            Expect::Absent,
        )
        .await;
        let a = start(rt, store, cfg);
        let s = wait_status(&a.store, "f", "8 ready", |s| s.ready_replicas == 8).await;
        assert!(
            s.instances.iter().all(|i| i.restarts == 0),
            "{:?}",
            s.instances
        );
        // The first instance (the model is pulled through it, before its prompt cache can be
        // sized) is made again once the model is known; nothing else is replaced.
        let calls = a.runtime.calls();
        let first = calls
            .iter()
            .find_map(|c| c.strip_prefix("create "))
            .expect("a create")
            .to_string();
        let replaced: Vec<&String> = calls
            .iter()
            .filter(|c| c.starts_with("remove") || c.starts_with("kill"))
            .filter(|c| !c.contains(&first))
            .collect();
        assert!(
            replaced.is_empty(),
            "nothing is replaced during a clean convergence: {replaced:?}"
        );
        a.stop().await;
    })
    .await
    .expect("in time");
}

fn pulled_manifest(name: &str, policy: &str, extra: &str) -> String {
    manifest(name, extra).replace(
        "imagePullPolicy: Never",
        &format!("imagePullPolicy: {policy}"),
    )
}

#[tokio::test(start_paused = true)]
async fn images_are_pulled_once_per_node_before_any_instance() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let rt = FakeRuntime::new();
        rt.add_remote(FakeRuntime::image_named(IMAGE));
        rt.set_pull_delay(Duration::from_millis(500));
        let store = MemoryStore::default();
        // Two fleets of the same image (on different ports).
        put(
            &store,
            "f",
            &pulled_manifest("f", "IfNotPresent", "  replicas: {perNode: 3}\n"),
            Expect::Absent,
        )
        .await;
        put(
            &store,
            "g",
            &pulled_manifest(
                "g",
                "IfNotPresent",
                "  replicas: {perNode: 3}\n  network: {basePort: 20000}\n",
            ),
            Expect::Absent,
        )
        .await;
        let a = start(rt, store, config());
        let s = wait_status(&a.store, "f", "Pending while pulling", |s| {
            s.instances.len() == 3
                && s.instances
                    .iter()
                    .all(|i| i.phase == Phase::Pending && i.id.is_empty())
        })
        .await;
        assert!(
            s.instances[0]
                .message
                .as_deref()
                .is_some_and(|m| m.starts_with("Pulling:")),
            "{:?}",
            s.instances[0]
        );
        assert_eq!(s.replicas, 0, "placeholders are not instances");
        let progressing = s.condition("Progressing").expect("Progressing");
        assert_eq!(
            (progressing.status.as_str(), progressing.reason.as_str()),
            ("True", "Pulling"),
            "a pull under way is progress (issue 13)"
        );
        assert!(
            a.runtime.list().await.expect("list").is_empty(),
            "nothing is created before the image is there"
        );
        wait_status(&a.store, "f", "3 ready after the pull", |s| {
            s.ready_replicas == 3
        })
        .await;
        wait_status(&a.store, "g", "3 ready after the pull", |s| {
            s.ready_replicas == 3
        })
        .await;
        assert_eq!(
            a.runtime.pulls(),
            [IMAGE],
            "one pull for two fleets and six instances"
        );
        a.stop().await;
    })
    .await
    .expect("in time");
}

#[tokio::test(start_paused = true)]
async fn failed_pulls_back_off_and_recover() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let rt = FakeRuntime::new();
        rt.add_remote(FakeRuntime::image_named(IMAGE));
        rt.set_pull_error(Some("manifest unknown: tag not found"));
        let store = MemoryStore::default();
        put(
            &store,
            "f",
            &pulled_manifest("f", "IfNotPresent", "  replicas: {perNode: 2}\n"),
            Expect::Absent,
        )
        .await;
        let mut cfg = config();
        cfg.pull_backoff = Duration::from_millis(300);
        let a = start(rt, store, cfg);
        let s = wait_status(&a.store, "f", "ImagePullBackOff", |s| {
            s.condition("Progressing")
                .is_some_and(|c| c.reason == "ImagePullBackOff")
        })
        .await;
        let why = s.instances[0].message.clone().unwrap_or_default();
        assert!(
            why.contains("manifest unknown: tag not found"),
            "the registry's answer is in status: {why}"
        );
        wait_for("a retry", Duration::from_secs(10), || async {
            (a.runtime.pulls().len() >= 2).then_some(())
        })
        .await;
        a.runtime.set_pull_error(None);
        wait_status(&a.store, "f", "2 ready once the registry answers", |s| {
            s.ready_replicas == 2
        })
        .await;
        a.stop().await;
    })
    .await
    .expect("in time");
}

#[tokio::test(start_paused = true)]
async fn always_rolls_out_a_new_digest_of_the_same_tag() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let rt = FakeRuntime::new();
        let v1 = FakeRuntime::image_named(IMAGE);
        rt.add_remote(v1.clone());
        let store = MemoryStore::default();
        put(
            &store,
            "f",
            &pulled_manifest(
                "f",
                "Always",
                "  replicas: {perNode: 3}\n  rollout: {maxUnavailable: 1}\n",
            ),
            Expect::Absent,
        )
        .await;
        let mut cfg = config();
        cfg.image_refresh = Duration::from_millis(300);
        let a = start(rt, store, cfg);
        let s = wait_status(&a.store, "f", "3 ready on v1", |s| s.ready_replicas == 3).await;
        let old_hash = s.instances[0].spec_hash.clone();
        let old_ids: Vec<String> = s.instances.iter().map(|i| i.id.clone()).collect();

        let mut v2 = v1.clone();
        v2.digest = format!("sha256:{:0>64}", "2");
        a.runtime.add_remote(v2);
        let s = wait_status(&a.store, "f", "all on the new digest", |s| {
            s.ready_replicas == 3 && s.instances.iter().all(|i| i.spec_hash != old_hash)
        })
        .await;
        assert!(
            s.instances.iter().all(|i| !old_ids.contains(&i.id)),
            "every instance was replaced"
        );
        assert_eq!(a.runtime.pulls().len(), 2, "v1 once, v2 once");
        a.stop().await;
    })
    .await
    .expect("in time");
}

#[tokio::test(start_paused = true)]
async fn the_model_is_pulled_once_per_node_and_loaded_before_ready() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let a = started(
            "  replicas: {perNode: 4}\n  resources: {cpus: 2.5}\n  models: {hostPath: /node-cache}\n",
        )
        .await;
        // Loading fails at first: running and answering, but not Ready.
        a.ollama.set_failing("load", true);
        let s = wait_status(&a.store, "f", "4 starting, model loads failing", |s| {
            s.instances.len() == 4
                && s.instances.iter().all(|i| {
                    i.phase == Phase::Starting
                        && i.message.as_deref().is_some_and(|m| m.contains("loading the model"))
                })
        })
        .await;
        assert_eq!(s.ready_replicas, 0, "not Ready before the model is loaded");
        a.ollama.set_failing("load", false);
        wait_status(&a.store, "f", "4 ready", |s| s.ready_replicas == 4).await;
        let calls = a.ollama.calls();
        let kinds = |k: &str| calls.iter().filter(|c| c.starts_with(k)).count();
        assert_eq!(kinds("pull "), 1, "one pull per node: {calls:?}");
        assert_eq!(kinds("derive "), 2, "a derived model, and the model's own name: {calls:?}");
        let first_load = calls.iter().position(|c| c.starts_with("load ")).expect("loads");
        let threads = calls.iter().position(|c| c.starts_with("derive ")).expect("threads");
        assert!(
            calls.iter().filter(|c| c.starts_with("load ")).all(|c| c.ends_with(" m:latest-fleet-t2")),
            "instances load the model derived for their thread count: {calls:?}"
        );
        assert!(threads < first_load, "the thread count is set before any load: {calls:?}");
        assert_eq!(
            a.ollama.show_threads("m"),
            Some(Some(2)),
            "num_thread = the quota rounded down"
        );
        a.stop().await;
    })
    .await
    .expect("in time");
}

#[tokio::test(start_paused = true)]
async fn liveness_failures_and_leaks_replace_instances() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (a, s) = converged(
            "  replicas: {perNode: 3}\n  resources: {memory: 1Gi, promptCache: 0}\n  rotation: {maxMemory: 512Mi}\n  rollout: {maxUnavailable: 1}\n",
            3,
        )
        .await;
        let (hung, leaky) = (s.instances[0].id.clone(), s.instances[1].id.clone());
        a.probes.set_unhealthy(&hung);
        a.runtime.set_memory(&leaky, 600 << 20);
        let s = wait_status(&a.store, "f", "both replaced, 3 ready", |s| {
            s.ready_replicas == 3 && s.instances.iter().all(|i| i.id != hung && i.id != leaky)
        })
        .await;
        assert_eq!(s.instances[0].restarts, 1, "a liveness failure counts as a restart");
        assert_eq!(
            s.instances[0].last_exit.as_ref().map(|e| e.reason.as_str()),
            Some("Unhealthy")
        );
        assert_eq!(s.instances[1].restarts, 0, "a rotation is not a restart");
        let rotations = a.view.read().expect("view").rotations.clone();
        assert_eq!(rotations.get(&("f".to_string(), fleet_agent::planner::Why::MaxMemory)), Some(&1));
        a.stop().await;
    })
    .await
    .expect("in time");
}

#[tokio::test(start_paused = true)]
async fn a_crash_looping_update_stalls_and_says_so() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let extra = "  replicas: {perNode: 4}\n  rollout: {maxUnavailable: 1}\n";
        let (a, s) = converged(extra, 4).await;
        let rev = a.store.revision();
        let doc = manifest("f", &format!("{extra}  env: {{BROKEN: \"1\"}}\n"));
        put(&a.store, "f", &doc, Expect::Revision(s.observed_generation)).await;
        // Every instance of the new spec exits as soon as it starts.
        let s = wait_for("the stall", Duration::from_secs(15), || async {
            for o in a.runtime.list().await.unwrap_or_default() {
                let new = a
                    .runtime
                    .spec_of(&o.id)
                    .is_some_and(|c| c.env.iter().any(|e| e == "BROKEN=1"));
                if new && o.state == TaskState::Running {
                    a.runtime.exit(&o.id, 1);
                }
            }
            status(&a.store, "f").await.filter(|s| {
                s.condition("Progressing")
                    .is_some_and(|c| c.reason == "RolloutStalled")
            })
        })
        .await;
        assert!(rev < a.store.revision());
        assert_eq!(
            s.ready_replicas, 3,
            "at most maxUnavailable old instances lost: {s:?}"
        );
        let c = s.condition("Progressing").expect("condition");
        assert_eq!(c.status, "False");
        assert!(
            c.message.contains("3 instance(s) of the previous spec"),
            "{}",
            c.message
        );
        a.stop().await;
    })
    .await
    .expect("in time");
}

#[tokio::test(start_paused = true)]
async fn instances_leave_the_endpoints_before_they_are_stopped() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let extra = "  replicas: {perNode: 4}\n  rollout: {maxUnavailable: 1}\n";
        let (a, s) = converged(extra, 4).await;
        // At every SIGTERM, the instance must no longer be a ready endpoint, neither in
        // /instances (the view) nor in the status key.
        let seen: Arc<std::sync::Mutex<Vec<(String, bool)>>> = Arc::default();
        let (view, log, store) = (a.view.clone(), seen.clone(), a.store.clone());
        a.runtime.on_kill(move |id, signal| {
            if signal == fleet_runtime::SIGTERM {
                let v = view.read().expect("view");
                let in_view = v.endpoints.iter().any(|e| e.id == id && e.ready);
                let stored = futures::executor::block_on(status(&store, "f"));
                let in_status =
                    stored.is_some_and(|s| s.instances.iter().any(|i| i.id == id && i.ready));
                log.lock()
                    .expect("log")
                    .push((id.to_string(), in_view || in_status));
            }
        });
        // A rolling update (replacements), then a scale-down (removals).
        let doc = manifest("f", &format!("{extra}  env: {{NEW: \"1\"}}\n"));
        let rev = put(&a.store, "f", &doc, Expect::Revision(s.observed_generation)).await;
        let s = wait_status(&a.store, "f", "rolled out", |s| {
            s.observed_generation == rev && s.updated_replicas == 4 && s.ready_replicas == 4
        })
        .await;
        let doc = manifest("f", "  replicas: {perNode: 2}\n  env: {NEW: \"1\"}\n");
        put(&a.store, "f", &doc, Expect::Revision(s.observed_generation)).await;
        wait_status(&a.store, "f", "scaled down", |s| s.instances.len() == 2).await;
        let seen = seen.lock().expect("log").clone();
        assert_eq!(seen.len(), 6, "4 replaced, 2 removed: {seen:?}");
        assert!(
            seen.iter().all(|(_, ready)| !ready),
            "an instance got SIGTERM while listed as a ready endpoint: {seen:?}"
        );
        a.stop().await;
    })
    .await
    .expect("in time");
}

#[tokio::test(start_paused = true)]
async fn without_a_shared_cache_each_instance_gets_its_own_model() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let a = started("  replicas: {perNode: 3}\n  models: {hostPath: \"\"}\n").await;
        // Each instance is its own cache here (nothing shared); pulls take a while.
        a.ollama.unshare();
        a.ollama.set_pull_time(Duration::from_millis(300));
        wait_status(&a.store, "f", "3 ready", |s| s.ready_replicas == 3).await;
        let calls = a.ollama.calls();
        let pulls: std::collections::BTreeSet<&str> = calls
            .iter()
            .filter_map(|c| c.strip_prefix("pull "))
            .collect();
        assert_eq!(pulls.len(), 3, "one pull per instance: {calls:?}");
        let loads = calls.iter().filter(|c| c.starts_with("load ")).count();
        assert_eq!(
            loads, 3,
            "each instance loads once, after its own pull: {calls:?}"
        );
        a.stop().await;
    })
    .await
    .expect("in time");
}

/// Regression: an agent restarted during a rollout took the adopted instances of the previous
/// spec, probed but not yet confirmed warm again, for unready ones and replaced them all at once.
#[tokio::test(start_paused = true)]
async fn a_restart_during_a_rollout_keeps_the_budget() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let extra = "  replicas: {perNode: 3}\n  rollout: {maxUnavailable: 1}\n";
        let (a, s) = converged(extra, 3).await;
        let (rt, store) = (a.runtime.clone(), a.store.clone());
        a.stop().await;
        // Older than a second (creation times are whole seconds), then a new spec.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let doc = manifest("f", &format!("{extra}  env: {{NEW: \"1\"}}\n"));
        let rev = put(&store, "f", &doc, Expect::Revision(s.observed_generation)).await;

        let b = start(rt, store, config());
        // At every SIGTERM, the other two instances are ready endpoints.
        let seen: Arc<std::sync::Mutex<Vec<usize>>> = Arc::default();
        let (view, log) = (b.view.clone(), seen.clone());
        b.runtime.on_kill(move |_, signal| {
            if signal == fleet_runtime::SIGTERM {
                let v = view.read().expect("view");
                let ready = v.endpoints.iter().filter(|e| e.ready).count();
                log.lock().expect("log").push(ready);
            }
        });
        wait_status(&b.store, "f", "rolled out", |s| {
            s.observed_generation == rev && s.updated_replicas == 3 && s.ready_replicas == 3
        })
        .await;
        let seen = seen.lock().expect("log").clone();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(
            seen.iter().all(|ready| *ready >= 2),
            "more than maxUnavailable down at a SIGTERM: {seen:?}"
        );
        b.stop().await;
    })
    .await
    .expect("in time");
}

/// Issue 10: what a manifest may ask of the node is the operator's decision. A fleet asking for
/// a host path or runtime outside the allowlists, ports another fleet holds, or more memory
/// than the node has, starts nothing (or only what fits) and says why; nothing else is
/// disturbed, and what already runs keeps running.
#[tokio::test(start_paused = true)]
async fn fleets_asking_for_more_than_the_node_allows_start_nothing() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (rt, store) = fresh();
        let r = put(
            &store,
            "ok",
            &manifest("ok", "  replicas: {perNode: 2}\n"),
            Expect::Absent,
        )
        .await;
        let a = start(rt.clone(), store, config());
        wait_status(&a.store, "ok", "2 ready", |s| s.ready_replicas == 2).await;
        let before = running(&rt).await;
        let refused = |fleet: &'static str, extra: &'static str, reason: &'static str| {
            let store = a.store.clone();
            let rt = rt.clone();
            async move {
                let doc = manifest(fleet, &format!("  replicas: {{perNode: 2}}\n{extra}"));
                put(&store, fleet, &doc, Expect::Absent).await;
                let s = wait_status(&store, fleet, reason, |s| {
                    s.condition("Admitted")
                        .is_some_and(|c| c.status == "False" && c.reason == reason)
                })
                .await;
                let mine = running(&rt)
                    .await
                    .into_iter()
                    .filter(|id| id.starts_with(&format!("{fleet}-")))
                    .count();
                (s, mine)
            }
        };
        let (s, n) = refused(
            "evil",
            "  models: {hostPath: /etc}\n  network: {basePort: 12000}\n",
            "HostPathNotAllowed",
        )
        .await;
        assert_eq!(n, 0, "nothing started");
        assert!(
            s.condition("Admitted")
                .is_some_and(|c| c.message.contains("--allow-host-path"))
        );
        let (_, n) = refused(
            "crun",
            "  runtime: {binaryName: crun}\n  network: {basePort: 12100}\n",
            "RuntimeNotAllowed",
        )
        .await;
        assert_eq!(n, 0);
        let (s, n) = refused("clash", "  network: {basePort: 11435}\n", "PortConflict").await;
        assert_eq!(n, 0);
        assert!(
            s.condition("Admitted")
                .is_some_and(|c| c.message.contains("\"ok\""))
        );
        // 1 TiB node, 1 GiB reserved: one 600 GiB instance fits, not two.
        let (s, n) = refused(
            "big",
            "  resources: {memory: 600Gi}\n  network: {basePort: 12200}\n",
            "InsufficientMemory",
        )
        .await;
        wait_for(
            "one instance of big running",
            Duration::from_secs(10),
            || async {
                let n = running(&a.runtime)
                    .await
                    .iter()
                    .filter(|id| id.starts_with("big-"))
                    .count();
                (n == 1).then_some(())
            },
        )
        .await;
        assert!(n <= 1, "never more than fits");
        assert!(
            s.condition("Admitted")
                .is_some_and(|c| c.message.contains("only 1 of 2"))
        );
        let ok_now: Vec<String> = running(&rt)
            .await
            .into_iter()
            .filter(|id| id.starts_with("ok-"))
            .collect();
        assert_eq!(ok_now, before, "the admitted fleet is not disturbed");

        // A running fleet edited to ask for a forbidden path: what runs stays.
        put(
            &a.store,
            "ok",
            &manifest(
                "ok",
                "  replicas: {perNode: 3}\n  models: {hostPath: /run/containerd}\n",
            ),
            Expect::Revision(r),
        )
        .await;
        wait_status(&a.store, "ok", "ok refused", |s| {
            s.condition("Admitted")
                .is_some_and(|c| c.reason == "HostPathNotAllowed")
        })
        .await;
        let ok_now: Vec<String> = running(&rt)
            .await
            .into_iter()
            .filter(|id| id.starts_with("ok-"))
            .collect();
        assert_eq!(ok_now, before, "running instances are left as they are");
        a.stop().await;
    })
    .await
    .expect("in time");
}

/// Issue 11: local work never waits on etcd. With every store call stalled for 20 s (etcd
/// behind a network that drops packets), a crashed instance is still replaced and the new one
/// shows in the agent's own endpoints at once; when the store answers again, its status
/// catches up.
#[tokio::test(start_paused = true)]
async fn a_stalled_store_does_not_slow_crash_replacement() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let (a, s) = converged("  replicas: {perNode: 2}\n", 2).await;
        let victim = s.instances[0].id.clone();
        a.store.set_stall(Duration::from_secs(20));
        // Let the publisher get stuck in a call first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.runtime.exit(&victim, 3);
        let endpoints = |a: &Running| {
            a.view
                .read()
                .map(|v| v.endpoints.clone())
                .unwrap_or_default()
        };
        wait_for(
            "the replacement ready in /instances",
            Duration::from_secs(5),
            || async {
                let e = endpoints(&a);
                (e.len() == 2 && e.iter().all(|e| e.id != victim && e.ready)).then_some(())
            },
        )
        .await;
        a.store.set_stall(Duration::ZERO);
        // The call under way still takes its 20 s (as an etcd call runs into its deadline).
        wait_for("the status catches up", Duration::from_secs(30), || async {
            status(&a.store, "f")
                .await
                .filter(|s| s.ready_replicas == 2 && s.instances.iter().all(|i| i.id != victim))
        })
        .await;
        a.stop().await;
    })
    .await
    .expect("in time");
}

/// Issue 12: Ollama walks blobs/ when it starts and exits when a file vanishes under it, which
/// happens at the end of a pull. No instance on a cache starts while the agent pulls into it:
/// a crash during the pull is replaced once the pull is over.
#[tokio::test(start_paused = true)]
async fn no_instance_starts_while_the_cache_is_written() {
    tokio::time::timeout(Duration::from_secs(40), async {
        let (rt, store) = fresh();
        put(
            &store,
            "f",
            &manifest(
                "f",
                // (All three start before the pull: no prompt cache to size.)
                "  replicas: {perNode: 3}\n  models: {hostPath: /node-cache}\n  resources: {promptCache: engine}\n",
            ),
            Expect::Absent,
        )
        .await;
        let a = start(rt.clone(), store, config());
        a.ollama.set_pull_time(Duration::from_secs(3));
        let pulling = wait_status(&a.store, "f", "the pull under way", |s| {
            s.instances.len() == 3
                && s.instances
                    .iter()
                    .any(|i| i.message.as_deref().is_some_and(|m| m.contains("pulling")))
        })
        .await;
        let victim = pulling.instances[2].id.clone();
        let creates_before = rt
            .calls()
            .iter()
            .filter(|c| c.starts_with("create "))
            .count();
        a.runtime.exit(&victim, 1);
        // While the pull runs (3 s), the crashed instance is not replaced.
        fleet_e2e::holds_for(
            "no start during the pull",
            Duration::from_millis(800),
            || async {
                rt.calls()
                    .iter()
                    .filter(|c| c.starts_with("create "))
                    .count()
                    == creates_before
            },
        )
        .await;
        assert!(
            status(&a.store, "f").await.is_some_and(|s| s
                .instances
                .iter()
                .any(|i| i.message.as_deref().is_some_and(|m| m.contains("pulling")))),
            "the pull was under way all along"
        );
        wait_status(&a.store, "f", "3 ready after the pull", |s| {
            s.ready_replicas == 3 && s.instances.iter().all(|i| i.id != victim)
        })
        .await;
        a.stop().await;
    })
    .await
    .expect("in time");
}

/// The gateway's watchdog (no first token in time, or a stalled stream) counts against the
/// instance: `probes.liveness.failureThreshold` in a row replace it, with reason `Stalled`.
#[tokio::test(start_paused = true)]
async fn instances_the_gateway_sees_stall_are_replaced() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (rt, store) = fresh();
        let extra = "  replicas: {perNode: 2}\n  probes: {liveness: {failureThreshold: 2}}\n";
        put(&store, "f", &manifest("f", extra), Expect::Absent).await;
        let gw = Gateway::new(GatewayConfig::default());
        let a = start_with(rt, store, config(), Some(gw.clone()));
        let s = wait_status(&a.store, "f", "2 ready", |s| s.ready_replicas == 2).await;
        let (victim, other) = (s.instances[0].id.clone(), s.instances[1].id.clone());
        let slot = || async {
            gw.pools()
                .acquire(
                    "f",
                    &fleet_agent::gateway::fair::Who::default(),
                    Some(&other),
                    0,
                    Duration::from_secs(1),
                )
                .await
                .ok()
        };
        let lease = wait_for(
            "the gateway to route to the instances",
            Duration::from_secs(10),
            slot,
        )
        .await;
        assert_eq!(lease.backend.id, victim);
        lease.finish(true);
        assert!(
            !gw.stalled("f", &victim),
            "one stall is below the threshold"
        );
        slot().await.expect("a slot").finish(true);
        let s = wait_status(&a.store, "f", "the stalled instance replaced", |s| {
            s.ready_replicas == 2 && s.instances.iter().all(|i| i.id != victim)
        })
        .await;
        let replaced = s
            .instances
            .iter()
            .find(|i| i.id != other)
            .expect("replacement");
        assert_eq!(replaced.restarts, 1);
        assert_eq!(
            replaced.last_exit.as_ref().map(|e| e.reason.as_str()),
            Some("Stalled")
        );
        a.stop().await;
    })
    .await
    .expect("in time");
}
