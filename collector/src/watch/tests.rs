//! The hub over a real store, fed by the real writer: updates come after the commit and only
//! then, a lagging subscriber is resynchronised, filters keep what they name, and the figures
//! are a report's. Each body runs on SQLite and on PostgreSQL (skipped without a server unless
//! `GPUMETER_REQUIRE_ALL=1`).

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::grants::{GrantCard, Program};
use crate::store::pg_testdb::TestPg;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::store::writer::Writer;
use crate::store::*;

const K: &str = "GPU-000000b1-0000-4000-8000-000000000000";
const L: &str = "GPU-000000b2-0000-4000-8000-000000000000";
const MIN: i64 = 60_000;

/// A backend and a way to hold its write lock from outside (so a commit waits on it).
struct Backend {
    store: Arc<dyn Store>,
    /// Takes the write lock and returns a function that releases it.
    hold: Box<dyn Fn() -> Box<dyn FnOnce() + Send> + Send + Sync>,
    _keep: Box<dyn std::any::Any + Send>,
}

fn sqlite() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("watch.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    Backend {
        store,
        hold: Box::new(move || {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute_batch("BEGIN IMMEDIATE").unwrap();
            Box::new(move || c.execute_batch("COMMIT").unwrap())
        }),
        _keep: Box::new(dir),
    }
}

fn postgres(tag: &str) -> Option<Backend> {
    let db = TestPg::create(tag)?;
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(PgStore::open(&db.url, Some(&dir.path().join("collector-key"))).unwrap());
    let url = db.url.clone();
    Some(Backend {
        store,
        hold: Box::new(move || {
            // The lock is held on a thread of its own (the client must not run on the test's
            // runtime); releasing ends its transaction.
            let (locked_tx, locked) = std::sync::mpsc::channel();
            let (release, released) = std::sync::mpsc::channel::<()>();
            let url = url.clone();
            let t = std::thread::spawn(move || {
                let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
                let mut tx = c.transaction().unwrap();
                tx.batch_execute("LOCK TABLE windows IN EXCLUSIVE MODE")
                    .unwrap();
                locked_tx.send(()).unwrap();
                let _ = released.recv();
                tx.commit().unwrap();
            });
            locked.recv().unwrap();
            Box::new(move || {
                release.send(()).unwrap();
                t.join().unwrap();
            })
        }),
        _keep: Box::new((db, dir)),
    })
}

fn hello(agent: &str, host: &str, gpus: &[&str]) -> AgentHello {
    AgentHello {
        agent_id: agent.into(),
        host_id: host.into(),
        csp: "kt".into(),
        hostname: host.into(),
        agent_version: "t".into(),
        public_key: [agent.len() as u8; 32],
        driver_version: "t".into(),
        gpus: gpus
            .iter()
            .enumerate()
            .map(|(i, u)| GpuRow {
                uuid: u.to_string(),
                index: i as u32,
                name: "NVIDIA H100 80GB HBM3".into(),
                serial: format!("s-{u}"),
                pci_bus_id: format!("00:0{i}"),
                memory_total_bytes: Some(80 << 30),
                mig_mode: "disabled".into(),
                mig: None,
            })
            .collect(),
        epoch: 1,
        received_ms: crate::ingest::now_ms(),
    }
}

/// A 60 s window of `gpu` from `start` at `util` %, the grantee alice on it when `busy`, and
/// bob (not the grantee) too when `foreign`.
fn window(gpu: &str, start: i64, util: f64, busy: bool, foreign: bool) -> WindowRow {
    let mut principals = Vec::new();
    if busy {
        principals.push(PrincipalRow {
            principal: "user:alice".into(),
            uid: Some(1001),
            occupied_ms: 60_000,
            active_ms: (600.0 * util) as u64,
            memory_max_bytes: 1 << 30,
            process_count: 1,
            matches_grant: true,
        });
    }
    if foreign {
        principals.push(PrincipalRow {
            principal: "user:bob".into(),
            uid: Some(1002),
            occupied_ms: 60_000,
            active_ms: 0,
            memory_max_bytes: 1 << 20,
            process_count: 1,
            matches_grant: false,
        });
    }
    WindowRow {
        gpu_uuid: gpu.into(),
        start_ms: start,
        end_ms: start + MIN,
        interval_ms: 1_000,
        expected_samples: 60,
        good_samples: 60,
        util_avg_pct: Some(util),
        util_max_pct: Some(util),
        mem_util_avg_pct: None,
        memory_used_max_bytes: Some(if busy { 1 << 30 } else { 0 }),
        energy_mj: Some(18_000_000),
        energy_estimated: false,
        power_avg_w: Some(300.0),
        temperature_max_c: Some(60),
        throttle_reasons: None,
        health: "ok",
        unavailable_ms: 0,
        assignment_status: "assigned",
        grant_id: "G".into(),
        principal: "user:alice".into(),
        active_ms: (600.0 * util) as u64,
        occupied_ms: if busy || foreign { 60_000 } else { 0 },
        foreign_ms: if foreign { 60_000 } else { 0 },
        grantee_occupied_ms: Some(if busy { 60_000 } else { 0 }),
        unattributed_ms: Some(0),
        energy_estimated_mj: None,
        principals,
    }
}

/// Batches of one agent with a running chain.
struct Chain {
    agent: String,
    seq: u64,
    prev: gpumeter_proto::chain::Hash,
}

impl Chain {
    fn new(agent: &str) -> Self {
        Self {
            agent: agent.into(),
            seq: 0,
            prev: gpumeter_proto::chain::GENESIS,
        }
    }

    fn batch(&mut self, windows: Vec<WindowRow>) -> IngestBatch {
        let records: Vec<IngestRecord> = windows
            .into_iter()
            .map(|w| {
                self.seq += 1;
                let body = format!("{}-{}", self.agent, self.seq).into_bytes();
                let hash = gpumeter_proto::chain::record_hash(&self.prev, self.seq, &body);
                let r = IngestRecord {
                    seq: self.seq,
                    prev_hash: self.prev,
                    hash,
                    body,
                    created_ms: w.end_ms,
                    content: RecordContent::Window(w),
                };
                self.prev = hash;
                r
            })
            .collect();
        IngestBatch {
            agent_id: self.agent.clone(),
            checkpoint: CheckpointRow {
                epoch: 1,
                seq: self.seq,
                chain_hash: self.prev,
                signature: vec![7; 64],
            },
            records,
            received_ms: crate::ingest::now_ms(),
            alarms: vec![],
        }
    }
}

/// Two cards on host h1 (K, L) and one grant G holding K from yesterday to tomorrow; the
/// start of a whole minute two minutes ago, inside today (KST) where the day allows.
fn fleet(store: &dyn Store) -> i64 {
    let now = crate::ingest::now_ms();
    store.hello(&hello("a1", "h1", &[K, L])).unwrap();
    store
        .insert_grants(
            &[Grant {
                grant_id: "G".into(),
                program: Program::Research,
                grantee: "Lab".into(),
                principal: "user:alice".parse().unwrap(),
                csp: "kt".into(),
                valid_from_ms: now - DAY_MS,
                valid_until_ms: now + DAY_MS,
                cards: vec![GrantCard::new("h1", K)],
                revoked_at_ms: None,
            }],
            "ops",
            now,
        )
        .unwrap();
    let (_, day_from, _) = kst_day(now);
    (now - 3 * MIN)
        .div_euclid(MIN)
        .max(day_from.div_euclid(MIN))
        * MIN
}

fn options() -> HubOptions {
    HubOptions {
        capacity: 2,
        min_gap: Duration::ZERO,
        refresh: Duration::from_secs(3600),
        ..HubOptions::default()
    }
}

async fn next(sub: &mut Subscription) -> Frame {
    tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .expect("a frame within 20 s")
        .expect("the hub is running")
}

fn snapshot(f: Frame) -> View {
    match f {
        Frame::Snapshot(v) => v,
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

fn update(f: Frame) -> Update {
    match f {
        Frame::Update(u) => u,
        other => panic!("expected an update, got {other:?}"),
    }
}

fn after_commit_and_only_then(b: Backend) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = b.store.clone();
    let start = fleet(store.as_ref());
    rt.block_on(async move {
        let hub = Hub::start(store.clone(), options());
        let writer = Writer::spawn_observed(store.clone(), Some(hub.observer()));
        let mut sub = hub.subscribe(Filter::default());
        let mut on_l = hub.subscribe(Filter {
            host_id: "h1".into(),
            grant_id: String::new(),
            program: String::new(),
        });
        let mut on_g = hub.subscribe(Filter {
            grant_id: "G".into(),
            ..Filter::default()
        });
        let first = snapshot(next(&mut sub).await);
        assert_eq!(
            first
                .cards
                .iter()
                .map(|c| c.gpu_uuid.as_str())
                .collect::<Vec<_>>(),
            [K, L],
            "the inventory's cards, before any window"
        );
        let k = &first.cards[0];
        assert_eq!(
            (k.window_end_ms, k.reporting, k.grant_id.as_str()),
            (0, false, "G")
        );
        assert_eq!(first.grants.len(), 1);
        assert_eq!(first.grants[0].day.delivered_ms, 0);
        assert_eq!(snapshot(next(&mut on_l).await).cards.len(), 2);
        let g_view = snapshot(next(&mut on_g).await);
        assert_eq!(g_view.cards.len(), 1, "a grant's filter keeps its own card");

        // Nothing committed: nothing comes.
        assert!(
            tokio::time::timeout(Duration::from_millis(400), sub.next())
                .await
                .is_err(),
            "an update with nothing committed"
        );

        // A commit held up by another writer's lock: no update while it waits.
        let mut chain = Chain::new("a1");
        let release = (b.hold)();
        let outcome = writer
            .submit(chain.batch(vec![window(K, start, 80.0, true, false)]))
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(800), sub.next())
                .await
                .is_err(),
            "an update before the commit"
        );
        assert!(
            store
                .windows(start, start + MIN, Some(K))
                .unwrap()
                .is_empty(),
            "the window is not committed yet"
        );
        tokio::task::spawn_blocking(release).await.unwrap();
        outcome.await.unwrap().unwrap();
        let u = update(next(&mut sub).await);
        assert_eq!(u.version, first.version + 1);
        let k = u.cards.iter().find(|c| c.gpu_uuid == K).expect("K changed");
        assert_eq!((k.window_start_ms, k.window_end_ms), (start, start + MIN));
        assert_eq!(
            (k.util_pct, k.memory_used_bytes, k.power_w),
            (Some(80.0), Some(1 << 30), Some(300.0))
        );
        assert!(k.reporting && !k.idle && !k.violating, "{k:?}");
        assert_eq!(
            (
                k.window.delivered_ms,
                k.window.occupied_ms,
                k.window.active_ms
            ),
            (60_000, 60_000, 48_000)
        );
        assert!(
            u.cards.iter().all(|c| c.gpu_uuid != L),
            "only what changed is sent"
        );
        let g = u
            .grants
            .iter()
            .find(|g| g.grant_id == "G")
            .expect("G changed");
        // The day's figures are a report's for today.
        let (day, _, _) = kst_day(crate::ingest::now_ms());
        let (report, _, _) = crate::query::compute_report(
            store.as_ref(),
            &gpumeter_proto::v1::ReconcileRequest {
                period: day,
                ..Default::default()
            },
        )
        .unwrap();
        let r = &report.grants[0].figures;
        assert_eq!(
            (
                g.day.delivered_ms,
                g.day.occupied_ms,
                g.day.active_ms,
                g.day.violations
            ),
            (r.delivered_ms, r.occupied_ms, r.active_ms, r.violations)
        );
        assert_eq!(g.day.delivered_ms, 60_000);
        assert_eq!((g.cards, g.reporting_cards, g.idle_cards), (1, 1, 0));
        let on_g_update = update(next(&mut on_g).await);
        assert!(on_g_update.cards.iter().all(|c| c.grant_id == "G"));

        // Idle (the grantee gone) and violating (someone else on it), a window later.
        writer
            .commit(chain.batch(vec![window(K, start + MIN, 0.0, false, true)]))
            .await
            .unwrap();
        let u = update(next(&mut sub).await);
        let k = u.cards.iter().find(|c| c.gpu_uuid == K).expect("K changed");
        assert_eq!(k.window_start_ms, start + MIN);
        assert!(k.idle && k.violating, "{k:?}");
        let g = u.grants.iter().find(|g| g.grant_id == "G").unwrap();
        assert_eq!((g.idle_cards, g.violating_cards), (1, 1));
        // Use of the ungranted card is a violation too.
        writer
            .commit(chain.batch(vec![window(L, start + MIN, 50.0, true, false)]))
            .await
            .unwrap();
        let u = update(next(&mut sub).await);
        let l = u.cards.iter().find(|c| c.gpu_uuid == L).expect("L changed");
        assert_eq!(l.window_unassigned_ms, 60_000);
        assert!(l.violating && !l.idle, "{l:?}");
        // The grant's subscriber heard of K's changes, never of L (not in G).
        let mut seen = Vec::new();
        while let Ok(Some(f)) = tokio::time::timeout(Duration::from_millis(500), on_g.next()).await
        {
            let u = update(f);
            seen.extend(u.cards.into_iter().map(|c| c.gpu_uuid));
            seen.extend(u.removed_cards);
        }
        assert!(seen.iter().all(|c| c == K) && !seen.is_empty(), "{seen:?}");
        drop(writer);
    });
}

fn lagging_subscriber_is_resynced(b: Backend) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = b.store.clone();
    let start = fleet(store.as_ref());
    rt.block_on(async move {
        let hub = Hub::start(store.clone(), options());
        let writer = Writer::spawn_observed(store.clone(), Some(hub.observer()));
        let mut keeping_up = hub.subscribe(Filter::default());
        let mut lagging = hub.subscribe(Filter::default());
        let first = snapshot(next(&mut keeping_up).await);
        assert_eq!(snapshot(next(&mut lagging).await).version, first.version);
        let mut chain = Chain::new("a1");
        // Five updates, more than the channel holds (2), while `lagging` reads nothing.
        let mut version = first.version;
        for i in 0..5 {
            let util = 10.0 * f64::from(i + 1);
            writer
                .commit(chain.batch(vec![window(
                    K,
                    start + i64::from(i) * MIN,
                    util,
                    true,
                    false,
                )]))
                .await
                .unwrap();
            loop {
                let u = update(next(&mut keeping_up).await);
                assert_eq!(u.version, version + 1, "no version skipped");
                version = u.version;
                if u.cards
                    .iter()
                    .any(|c| c.gpu_uuid == K && c.util_pct == Some(util))
                {
                    break;
                }
            }
        }
        let resync = snapshot(next(&mut lagging).await);
        assert_eq!(
            resync.version, version,
            "resynchronised to the latest state"
        );
        let k = resync.cards.iter().find(|c| c.gpu_uuid == K).unwrap();
        assert_eq!(k.util_pct, Some(50.0));
        assert_eq!(resync.cards.len(), 2, "a snapshot holds every card");
        // And then updates again, as for anyone.
        writer
            .commit(chain.batch(vec![window(K, start + 5 * MIN, 70.0, true, false)]))
            .await
            .unwrap();
        let u = update(next(&mut lagging).await);
        assert_eq!(u.version, version + 1);
        assert_eq!(
            u.cards.iter().find(|c| c.gpu_uuid == K).unwrap().util_pct,
            Some(70.0)
        );
        drop(writer);
    });
}

#[test]
fn sqlite_updates_arrive_after_commit_and_only_then() {
    after_commit_and_only_then(sqlite());
}

#[test]
fn postgres_updates_arrive_after_commit_and_only_then() {
    if let Some(b) = postgres("watch_commit") {
        after_commit_and_only_then(b);
    }
}

#[test]
fn sqlite_a_lagging_subscriber_is_resynced() {
    lagging_subscriber_is_resynced(sqlite());
}

#[test]
fn postgres_a_lagging_subscriber_is_resynced() {
    if let Some(b) = postgres("watch_lag") {
        lagging_subscriber_is_resynced(b);
    }
}

/// Two collectors on one PostgreSQL database: a window committed through one reaches the
/// other's watchers at its next refresh.
#[test]
fn postgres_another_collectors_commit_reaches_watchers_at_the_next_refresh() {
    let Some(db) = TestPg::create("watch_shared") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("collector-key");
    let a: Arc<dyn Store> = Arc::new(PgStore::open(&db.url, Some(&key)).unwrap());
    let b: Arc<dyn Store> = Arc::new(PgStore::open(&db.url, Some(&key)).unwrap());
    let start = fleet(a.as_ref());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let writer = Writer::spawn(a.clone());
        let hub = Hub::start(
            b.clone(),
            HubOptions {
                refresh: Duration::from_millis(1000),
                ..options()
            },
        );
        let mut sub = hub.subscribe(Filter::default());
        let first = snapshot(next(&mut sub).await);
        assert_eq!(
            first
                .cards
                .iter()
                .find(|c| c.gpu_uuid == K)
                .unwrap()
                .window_end_ms,
            0
        );
        let mut chain = Chain::new("a1");
        // Committed as windows are, just after they end.
        // (on whole seconds, as the agent samples).
        let recent = ((crate::ingest::now_ms() - MIN - 100).div_euclid(1000) * 1000).max(start);
        writer
            .commit(chain.batch(vec![window(K, recent, 40.0, true, false)]))
            .await
            .unwrap();
        let u = update(next(&mut sub).await);
        let k = u.cards.iter().find(|c| c.gpu_uuid == K).expect("K changed");
        assert_eq!((k.window_end_ms, k.util_pct), (recent + MIN, Some(40.0)));
        // With nothing committed, refreshes send nothing: no figure grows with the clock.
        assert!(
            tokio::time::timeout(Duration::from_millis(1500), sub.next())
                .await
                .is_err(),
            "an update with nothing committed"
        );
        drop(writer);
    });
    drop(db);
}

#[test]
fn filters_keep_what_they_name() {
    let card = |uuid: &str, host: &str, grant: &str, program: &str| CardLive {
        gpu_uuid: uuid.into(),
        host_id: host.into(),
        grant_id: grant.into(),
        program: program.into(),
        ..CardLive::default()
    };
    let f = Filter {
        program: "hpc".into(),
        grant_id: String::new(),
        host_id: "h2".into(),
    };
    assert!(f.card(&card("a", "h2", "G", "hpc")));
    assert!(!f.card(&card("a", "h1", "G", "hpc")));
    assert!(!f.card(&card("a", "h2", "G", "research")));
    assert!(Filter::default().card(&card("a", "h1", "", "")));
}

/// A subscriber dropped while it waits for its first state (a client gone before its first
/// frame) stops counting as a watcher, so the worker does not keep computing for nobody.
#[test]
fn a_subscriber_dropped_mid_wait_stops_counting() {
    let b = sqlite();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // Polled once, a subscriber counts itself, wakes the worker and waits for the first
        // state, which a just-started hub has rarely computed yet: the wait is cut there. The
        // worker sometimes wins that race; a fresh hub is tried then.
        let mut cut = None;
        for _ in 0..50 {
            let hub = Hub::start(b.store.clone(), options());
            let mut sub = hub.subscribe(Filter::default());
            let mut waiting = Box::pin(sub.next());
            let first = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(std::future::Future::poll(waiting.as_mut(), cx))
            })
            .await;
            if first.is_ready() {
                drop(waiting);
                hub.close();
                continue;
            }
            assert_eq!(hub.shared.waiting.load(Ordering::SeqCst), 1);
            drop(waiting);
            assert_eq!(hub.shared.waiting.load(Ordering::SeqCst), 0);
            cut = Some((hub, sub));
            break;
        }
        let (hub, mut sub) = cut.expect("a first wait cut before the first state in 50 hubs");
        // A subscriber that waits to the end is uncounted too, and gets its snapshot.
        snapshot(next(&mut sub).await);
        assert_eq!(hub.shared.waiting.load(Ordering::SeqCst), 0);
        hub.close();
    });
}
