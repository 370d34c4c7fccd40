//! The store suite: what every backend must do the same, run once per backend (SQLite on a
//! temporary file, PostgreSQL on a database of its own; see [`super::pg_testdb`] for when the
//! PostgreSQL runs are skipped). Each body takes a `&dyn Store`; `both!` makes one test per
//! backend (`store::suite::sqlite::NAME`, `store::suite::postgres::NAME`). Tests of one
//! backend's own format (migrating an old SQLite file, say) stay beside that backend.

use super::Store;
use super::pg_testdb::TestPg;
use super::postgres::PgStore;
use super::sqlite::SqliteStore;

pub(super) fn on_sqlite(body: fn(&dyn Store)) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("suite.db")).unwrap();
    body(&store);
}

pub(super) fn on_postgres(name: &str, body: fn(&dyn Store)) {
    let Some(db) = TestPg::create(name) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = PgStore::open(&db.url, Some(&dir.path().join("collector-key"))).unwrap();
    body(&store);
    drop(store);
}

macro_rules! both {
    ($($module:ident :: $name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    super::on_sqlite(super::$module::$name);
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $name() {
                    super::on_postgres(stringify!($name), super::$module::$name);
                }
            )*
        }
    };
}

both!(
    grants::grants_amendment_is_stored_with_history_and_honoured_by_assignments,
    reconcile_reads::gap_and_epoch_records_raise_alarms,
    reconcile_reads::windows_events_and_invoices_read_back_for_reconciliation,
    reconcile_reads::window_bodies_are_those_of_the_windows_that_count,
    binding::a_failing_batch_is_rolled_back_alone_and_the_others_commit,
    binding::cards_stay_with_their_first_host_until_an_admin_moves_them,
    binding::a_card_granted_to_a_host_is_its_own_before_that_host_reports_it,
    binding::an_agent_id_is_bound_to_the_host_of_its_first_hello,
    binding::a_window_overlapping_counted_time_is_flagged_naming_the_earliest,
    dedup::a_resent_record_is_a_duplicate_or_an_equivocation,
    registry::providers_and_hosts_are_kept_with_who_and_when,
);

mod registry {
    use crate::registry::{Provider, RegisteredHost, parse_hosts_csv, parse_providers_csv};
    use crate::store::*;

    const HEAD: &str = "csp,name_ko,name_en,committed_hpc,committed_research,committed_advanced\n";

    pub(super) fn providers_and_hosts_are_kept_with_who_and_when(store: &dyn Store) {
        assert!(store.providers().unwrap().is_empty());
        let first = parse_providers_csv(&format!(
            "{HEAD}KT,케이티 클라우드,KT Cloud,1060,960,0\nnhn,엔에이치엔,NHN Cloud,0,0,8\n"
        ))
        .unwrap();
        store.import_providers(&first, "ops-kim", 10).unwrap();
        // The same file again changes nothing and adds no history; a changed commitment
        // replaces the row and says what it was.
        store.import_providers(&first, "ops-kim", 11).unwrap();
        let again = parse_providers_csv(&format!("{HEAD}kt,케이티 클라우드,KT Cloud,1100,960,0\n"))
            .unwrap();
        store.import_providers(&again, "ops-lee", 20).unwrap();
        let held = store.providers().unwrap();
        assert_eq!(
            held,
            vec![
                Provider {
                    csp: "kt".into(),
                    name_ko: "케이티 클라우드".into(),
                    name_en: "KT Cloud".into(),
                    committed_hpc: 1100,
                    committed_research: 960,
                    committed_advanced: 0,
                    updated_ms: 20,
                    updated_by: "ops-lee".into(),
                },
                Provider {
                    csp: "nhn".into(),
                    name_ko: "엔에이치엔".into(),
                    name_en: "NHN Cloud".into(),
                    committed_hpc: 0,
                    committed_research: 0,
                    committed_advanced: 8,
                    updated_ms: 10,
                    updated_by: "ops-kim".into(),
                },
            ]
        );
        let hosts = parse_hosts_csv("host_id,csp\nkt-gpu-01,KT\nkt-gpu-02,kt\n", &held).unwrap();
        store.register_hosts(&hosts, "ops-kim", 30).unwrap();
        let moved = parse_hosts_csv("host_id,csp\nkt-gpu-02,nhn\n", &held).unwrap();
        store.register_hosts(&moved, "ops-lee", 40).unwrap();
        assert_eq!(
            store.registered_hosts().unwrap(),
            vec![
                RegisteredHost {
                    host_id: "kt-gpu-01".into(),
                    csp: "kt".into(),
                    updated_ms: 30,
                    updated_by: "ops-kim".into(),
                },
                RegisteredHost {
                    host_id: "kt-gpu-02".into(),
                    csp: "nhn".into(),
                    updated_ms: 40,
                    updated_by: "ops-lee".into(),
                },
            ]
        );
        let history: Vec<(i64, String, String, String, String)> = store
            .registry_history()
            .unwrap()
            .into_iter()
            .map(|c| (c.at_ms, c.actor, c.kind, c.subject, c.action))
            .collect();
        let want: Vec<(i64, &str, &str, &str, &str)> = vec![
            (10, "ops-kim", "provider", "kt", "add"),
            (10, "ops-kim", "provider", "nhn", "add"),
            (20, "ops-lee", "provider", "kt", "change"),
            (30, "ops-kim", "host", "kt-gpu-01", "add"),
            (30, "ops-kim", "host", "kt-gpu-02", "add"),
            (40, "ops-lee", "host", "kt-gpu-02", "change"),
        ];
        let want: Vec<(i64, String, String, String, String)> = want
            .into_iter()
            .map(|(a, b, c, d, e)| (a, b.into(), c.into(), d.into(), e.into()))
            .collect();
        assert_eq!(history, want);
        let detail = &store.registry_history().unwrap()[2].detail;
        assert!(
            detail.contains("hpc=1100") && detail.contains("was"),
            "{detail}"
        );
    }
}

mod grants {
    use crate::grants::{AmendError, Amendment};
    use crate::store::sqlite::tests::grant;
    use crate::store::*;

    const C1: &str = "GPU-00000001-0000-4000-8000-000000000000";
    const C2: &str = "GPU-00000002-0000-4000-8000-000000000000";
    const DAY: i64 = 86_400_000;

    pub(super) fn grants_amendment_is_stored_with_history_and_honoured_by_assignments(
        store: &dyn Store,
    ) {
        store
            .insert_grants(&[grant("G", &[("h1", C1)])], "importer", 5)
            .unwrap();
        let (v0, _) = store.assignments("h1").unwrap();
        let at = 20 * DAY;
        let move_card = Amendment::MoveCard {
            from_gpu_uuid: C1.into(),
            to_host_id: "h2".into(),
            to_gpu_uuid: C2.into(),
            at_ms: at,
        };
        let r = store.amend_grant("G", &move_card, "alice", 99).unwrap();
        assert_eq!(r.grant.cards.len(), 2);
        let actions: Vec<_> = r
            .history
            .iter()
            .map(|h| (h.at_ms, h.actor.as_str(), h.action.as_str()))
            .collect();
        assert_eq!(
            actions,
            vec![(5, "importer", "import"), (99, "alice", "move_card")]
        );
        assert_eq!(store.grant("G").unwrap().unwrap(), r);
        let (v1, h1) = store.assignments("h1").unwrap();
        assert!(v1 > v0);
        assert_eq!(
            (h1.len(), h1[0].valid_from_ms, h1[0].valid_until_ms),
            (1, 10 * DAY, at)
        );
        let (_, h2) = store.assignments("h2").unwrap();
        assert_eq!(
            (
                h2.len(),
                h2[0].gpu_uuid.as_str(),
                h2[0].valid_from_ms,
                h2[0].valid_until_ms
            ),
            (1, C2, at, 40 * DAY)
        );

        // A refusal stores nothing.
        let e = store
            .amend_grant(
                "G",
                &Amendment::Extend {
                    valid_until_ms: DAY,
                },
                "alice",
                100,
            )
            .unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::Amend(AmendError::Invalid {
                    field: "valid_until",
                    ..
                })
            ),
            "{e}"
        );
        assert_eq!(store.grant("G").unwrap().unwrap(), r);
        assert_eq!(store.assignments("h1").unwrap().0, v1);
        assert!(matches!(
            store.amend_grant("NOPE", &move_card, "alice", 100),
            Err(StoreError::NotFound { .. })
        ));
        assert!(store.grant("NOPE").unwrap().is_none());

        // Moving a card away at the grant's start leaves it out of the assignments: it never
        // belonged.
        store
            .insert_grants(
                &[grant(
                    "H",
                    &[("h3", "GPU-00000003-0000-4000-8000-000000000000")],
                )],
                "importer",
                5,
            )
            .unwrap();
        store
            .amend_grant(
                "H",
                &Amendment::MoveCard {
                    from_gpu_uuid: "GPU-00000003-0000-4000-8000-000000000000".into(),
                    to_host_id: "h4".into(),
                    to_gpu_uuid: "GPU-00000004-0000-4000-8000-000000000000".into(),
                    at_ms: 10 * DAY,
                },
                "alice",
                101,
            )
            .unwrap();
        assert!(store.assignments("h3").unwrap().1.is_empty());
        assert_eq!(store.assignments("h4").unwrap().1.len(), 1);
    }
}

pub(super) mod reconcile_reads {
    use crate::store::*;
    use crate::store::{CheckpointRow, IngestRecord};

    fn hello(agent: &str, csp: &str) -> AgentHello {
        AgentHello {
            agent_id: agent.into(),
            host_id: format!("host-{agent}"),
            csp: csp.into(),
            hostname: agent.into(),
            agent_version: "t".into(),
            public_key: [7; 32],
            driver_version: "t".into(),
            gpus: vec![],
            epoch: 1,
            received_ms: 0,
        }
    }

    fn window(gpu: &str, start: i64, grantee: Option<u64>) -> WindowRow {
        WindowRow {
            gpu_uuid: gpu.into(),
            start_ms: start,
            end_ms: start + 60_000,
            interval_ms: 1_000,
            expected_samples: 60,
            good_samples: 58,
            util_avg_pct: Some(40.0),
            util_max_pct: None,
            mem_util_avg_pct: None,
            memory_used_max_bytes: Some(5),
            energy_mj: None,
            energy_estimated: false,
            power_avg_w: None,
            temperature_max_c: None,
            throttle_reasons: None,
            health: "lost",
            unavailable_ms: 2_000,
            assignment_status: "assigned",
            grant_id: "G".into(),
            principal: "user:alice".into(),
            active_ms: 9_000,
            occupied_ms: 30_000,
            foreign_ms: 10_000,
            grantee_occupied_ms: grantee,
            unattributed_ms: None,
            energy_estimated_mj: None,
            principals: vec![
                PrincipalRow {
                    principal: "user:alice".into(),
                    uid: Some(1001),
                    occupied_ms: 20_000,
                    active_ms: 8_000,
                    memory_max_bytes: 1,
                    process_count: 1,
                    matches_grant: true,
                },
                PrincipalRow {
                    principal: "user:bob".into(),
                    uid: None,
                    occupied_ms: 10_000,
                    active_ms: 1_000,
                    memory_max_bytes: 2,
                    process_count: 2,
                    matches_grant: false,
                },
            ],
        }
    }

    fn event(gpu: &str, at: i64, kind: &'static str) -> EventRow {
        EventRow {
            gpu_uuid: gpu.into(),
            at_ms: at,
            kind,
            code: 0,
            detail: "d".into(),
            pid: Some(9),
            principal: "user:bob".into(),
            grant_id: "G".into(),
            mode: "observe".into(),
            action: "none".into(),
            result: "recorded".into(),
        }
    }

    fn batch(agent: &str, contents: Vec<RecordContent>) -> IngestBatch {
        let records: Vec<IngestRecord> = contents
            .into_iter()
            .enumerate()
            .map(|(i, content)| IngestRecord {
                seq: i as u64 + 1,
                prev_hash: [0; 32],
                hash: [i as u8 + 1; 32],
                body: vec![i as u8],
                created_ms: 0,
                content,
            })
            .collect();
        IngestBatch {
            agent_id: agent.into(),
            checkpoint: CheckpointRow {
                epoch: 1,
                seq: records.len() as u64,
                chain_hash: [0; 32],
                signature: vec![],
            },
            records,
            received_ms: 0,
            alarms: vec![],
        }
    }

    pub(super) fn gap_and_epoch_records_raise_alarms(store: &dyn Store) {
        store.hello(&hello("a", "kt")).unwrap();
        store
            .commit(&[batch(
                "a",
                vec![
                    RecordContent::EpochStart {
                        epoch: 2,
                        last_acked_seq: 0,
                    },
                    RecordContent::Gap {
                        from_ms: 60_000,
                        until_ms: 240_000,
                        reason: "spool full".into(),
                    },
                ],
            )])
            .unwrap();
        let alarms = store.alarms(Some("a")).unwrap();
        let kinds: Vec<(&str, Option<u64>)> =
            alarms.iter().map(|a| (a.kind.as_str(), a.seq)).collect();
        assert_eq!(
            kinds,
            vec![("epoch_start", Some(1)), ("agent_gap", Some(2))]
        );
        assert!(
            alarms[1].detail.contains("60000..240000") && alarms[1].detail.contains("spool full")
        );
    }

    pub(super) fn window_bodies_are_those_of_the_windows_that_count(store: &dyn Store) {
        store.hello(&hello("a", "kt")).unwrap();
        let day = 86_400_000;
        let mut impossible = window("GPU-1", 10 * day + 120_000, None);
        impossible.good_samples = 1_000;
        store
            .commit(&[batch(
                "a",
                vec![
                    RecordContent::Window(window("GPU-1", 10 * day, None)),
                    RecordContent::Window(window("GPU-2", 10 * day + 60_000, None)),
                    RecordContent::Window(impossible),
                    RecordContent::Event(event("GPU-1", 10 * day + 5, "xid")),
                    RecordContent::Window(window("GPU-1", 11 * day, None)),
                ],
            )])
            .unwrap();
        let got = store.window_bodies(10 * day, 11 * day, None).unwrap();
        let host = "host-a".to_string();
        assert_eq!(
            got,
            vec![
                ("a".to_string(), host.clone(), 1, vec![0u8]),
                ("a".to_string(), host, 2, vec![1u8]),
            ]
        );
        assert_eq!(
            store.window_bodies(11 * day, 12 * day, None).unwrap().len(),
            1
        );
        // Only the cards asked for, in the same order; a card named twice counts once.
        let gpu2 = [
            "GPU-2".to_string(),
            "GPU-9".to_string(),
            "GPU-2".to_string(),
        ];
        assert_eq!(
            store
                .window_bodies(10 * day, 11 * day, Some(&gpu2))
                .unwrap(),
            vec![("a".to_string(), "host-a".to_string(), 2, vec![1u8])]
        );
        let both = ["GPU-2".to_string(), "GPU-1".to_string()];
        assert_eq!(
            store
                .window_bodies(10 * day, 11 * day, Some(&both))
                .unwrap(),
            got
        );
        assert!(
            store
                .window_bodies(10 * day, 11 * day, Some(&[]))
                .unwrap()
                .is_empty()
        );
    }

    pub(super) fn windows_events_and_invoices_read_back_for_reconciliation(store: &dyn Store) {
        store.hello(&hello("a", "kt")).unwrap();
        store.hello(&hello("b", "nhn")).unwrap();
        let day = 86_400_000;
        store
            .commit(&[
                batch(
                    "a",
                    vec![
                        RecordContent::Window(window("GPU-2", 10 * day, Some(25_000))),
                        RecordContent::Window(window("GPU-1", 10 * day + 60_000, None)),
                        // Starts before the period but runs into it (windows are aligned to
                        // their length, so the period starts mid-window).
                        RecordContent::Window(window("GPU-1", 10 * day - 60_000, Some(1))),
                        RecordContent::Window(window("GPU-1", 9 * day, Some(1))),
                        RecordContent::Event(event("GPU-1", 10 * day + 5, "enforcement")),
                        RecordContent::Event(event("GPU-1", 10 * day + 6, "xid")),
                        RecordContent::Event(event("GPU-1", 10 * day + 7, "card_health")),
                    ],
                ),
                batch(
                    "b",
                    vec![RecordContent::Event(event(
                        "GPU-3",
                        10 * day + 1,
                        "enforcement",
                    ))],
                ),
            ])
            .unwrap();

        let w = store.windows(10 * day - 30_000, 11 * day, None).unwrap();
        let got: Vec<(&str, i64, u64, &str, &str)> = w
            .iter()
            .map(|m| {
                (
                    m.window.gpu_uuid.as_str(),
                    m.window.start_ms - 10 * day,
                    m.seq,
                    m.host_id.as_str(),
                    m.csp.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("GPU-1", -60_000, 3, "host-a", "kt"),
                ("GPU-1", 60_000, 2, "host-a", "kt"),
                ("GPU-2", 0, 1, "host-a", "kt"),
            ]
        );
        // Every column comes back as it went in.
        assert_eq!(w[2].window, window("GPU-2", 10 * day, Some(25_000)));
        assert_eq!(w[1].window, window("GPU-1", 10 * day + 60_000, None));
        assert_eq!(
            store
                .windows(10 * day, 11 * day, Some("GPU-2"))
                .unwrap()
                .len(),
            1
        );

        let e = store.events(10 * day, 11 * day, None, None).unwrap();
        let got: Vec<(&str, &str, &str)> = e
            .iter()
            .map(|s| (s.event.gpu_uuid.as_str(), s.event.kind, s.csp.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("GPU-3", "enforcement", "nhn"),
                ("GPU-1", "enforcement", "kt"),
                ("GPU-1", "xid", "kt"),
                ("GPU-1", "card_health", "kt"),
            ]
        );
        assert_eq!(e[1].event, event("GPU-1", 10 * day + 5, "enforcement"));
        // Every kind an agent sends reads back as itself, not as "unknown".
        assert_eq!(e[3].event, event("GPU-1", 10 * day + 7, "card_health"));
        let only = store
            .events(10 * day, 11 * day, Some("enforcement"), Some("GPU-1"))
            .unwrap();
        assert_eq!(only.len(), 1);

        let inv = |grant: &str, period: &str, hours: f64| Invoice {
            csp: "kt".into(),
            grant_id: grant.into(),
            period: period.into(),
            billed_gpu_hours: hours,
            line: 2,
        };
        store
            .insert_invoices(
                &[inv("G", "2026-04", 10.0), inv("G", "2026-05", 3.0)],
                "x",
                1,
            )
            .unwrap();
        store
            .insert_invoices(&[inv("G", "2026-04", 12.5)], "y", 2)
            .unwrap();
        let held = store.invoices().unwrap();
        let got: Vec<(&str, f64, &str, i64)> = held
            .iter()
            .map(|s| {
                (
                    s.invoice.period.as_str(),
                    s.invoice.billed_gpu_hours,
                    s.actor.as_str(),
                    s.imported_at_ms,
                )
            })
            .collect();
        assert_eq!(got, [("2026-04", 12.5, "y", 2), ("2026-05", 3.0, "x", 1)]);
    }
}

pub(super) mod binding {
    use crate::grants::{Grant, GrantCard, Program};
    use crate::store::*;
    use crate::store::{CheckpointRow, IngestRecord};

    const CARD: &str = "GPU-000000c1-0000-4000-8000-000000000000";

    fn hello(agent: &str, host: &str, gpus: &[&str]) -> AgentHello {
        AgentHello {
            agent_id: agent.into(),
            host_id: host.into(),
            csp: "kt".into(),
            hostname: agent.into(),
            agent_version: "t".into(),
            public_key: [7; 32],
            driver_version: "t".into(),
            gpus: gpus
                .iter()
                .map(|u| GpuRow {
                    uuid: u.to_string(),
                    ..Default::default()
                })
                .collect(),
            epoch: 1,
            received_ms: 5,
        }
    }

    fn window(gpu: &str, start: i64, principals: &[&str]) -> WindowRow {
        WindowRow {
            gpu_uuid: gpu.into(),
            start_ms: start,
            end_ms: start + 60_000,
            interval_ms: 1_000,
            expected_samples: 60,
            good_samples: 60,
            util_avg_pct: Some(50.0),
            util_max_pct: None,
            mem_util_avg_pct: None,
            memory_used_max_bytes: None,
            energy_mj: None,
            energy_estimated: false,
            power_avg_w: None,
            temperature_max_c: None,
            throttle_reasons: None,
            health: "ok",
            unavailable_ms: 0,
            assignment_status: "unassigned",
            grant_id: String::new(),
            principal: String::new(),
            active_ms: 0,
            occupied_ms: 0,
            foreign_ms: 0,
            grantee_occupied_ms: None,
            unattributed_ms: None,
            energy_estimated_mj: None,
            principals: principals
                .iter()
                .map(|p| PrincipalRow {
                    principal: p.to_string(),
                    uid: None,
                    occupied_ms: 1,
                    active_ms: 1,
                    memory_max_bytes: 1,
                    process_count: 1,
                    matches_grant: false,
                })
                .collect(),
        }
    }

    fn batch(agent: &str, first_seq: u64, windows: Vec<WindowRow>) -> IngestBatch {
        let records: Vec<IngestRecord> = windows
            .into_iter()
            .enumerate()
            .map(|(i, w)| IngestRecord {
                seq: first_seq + i as u64,
                prev_hash: [0; 32],
                hash: [first_seq as u8 + i as u8; 32],
                body: vec![i as u8],
                created_ms: 0,
                content: RecordContent::Window(w),
            })
            .collect();
        IngestBatch {
            agent_id: agent.into(),
            checkpoint: CheckpointRow {
                epoch: 1,
                seq: records.last().map_or(0, |r| r.seq),
                chain_hash: [0; 32],
                signature: vec![],
            },
            records,
            received_ms: 9,
            alarms: vec![],
        }
    }

    fn kinds(store: &dyn Store, agent: &str) -> Vec<String> {
        store
            .alarms(Some(agent))
            .unwrap()
            .into_iter()
            .map(|a| a.kind)
            .collect()
    }

    pub(super) fn a_failing_batch_is_rolled_back_alone_and_the_others_commit(store: &dyn Store) {
        for a in ["a", "p", "b"] {
            store.hello(&hello(a, a, &[])).unwrap();
        }
        let out = store
            .commit_each(&[
                batch("a", 1, vec![window("GPU-a", 0, &["user:a"])]),
                // The same principal twice in one window: the insert fails.
                batch("p", 1, vec![window("GPU-p", 0, &["user:x", "user:x"])]),
                batch("p", 2, vec![window("GPU-p", 60_000, &["user:x"])]),
                batch("b", 1, vec![window("GPU-b", 0, &["user:b"])]),
            ])
            .unwrap();
        assert_eq!(out[0].as_ref().unwrap().durable_seq, 1);
        assert!(
            matches!(&out[1], Err(StoreError::BatchRefused { agent_id, seq: 1, reason }) if agent_id == "p" && reason.contains("UNIQUE")),
            "{:?}",
            out[1]
        );
        assert!(
            matches!(&out[2], Err(StoreError::BatchRefused { seq: 2, .. })),
            "a later batch of the same agent would leave a hole: {:?}",
            out[2]
        );
        assert_eq!(out[3].as_ref().unwrap().durable_seq, 1);
        let held = |agent: &str| {
            let mut n = 0i64;
            store
                .ledger()
                .unwrap()
                .scan_records(agent, &mut |_| n += 1)
                .unwrap();
            n
        };
        assert_eq!((held("a"), held("p"), held("b")), (1, 0, 1));
        assert_eq!(kinds(store, "p"), ["batch_failed"]);
        // All or nothing through `commit`, as before.
        assert!(
            store
                .commit(&[batch(
                    "p",
                    1,
                    vec![window("GPU-p", 0, &["user:x", "user:x"])]
                )])
                .is_err()
        );
    }

    pub(super) fn a_window_overlapping_counted_time_is_flagged_naming_the_earliest(
        store: &dyn Store,
    ) {
        store.hello(&hello("k", "host-k", &[CARD])).unwrap();
        let span = |start: i64, end: i64| {
            let mut w = window(CARD, start, &[]);
            w.end_ms = end;
            w.expected_samples = ((end - start) / 1_000) as u32;
            w.good_samples = w.expected_samples;
            w
        };
        let m = 60_000;
        let windows = vec![
            // seq 1..=3: three counted minutes.
            span(0, m),
            span(m, 2 * m),
            span(2 * m, 3 * m),
            // seq 4 covers parts of all three: flagged, naming seq 1, the earliest.
            span(m / 2, 5 * m / 2),
            // seq 5 starts where seq 3 ends: counted (seq 4, flagged, overlaps it but does
            // not count).
            span(3 * m, 4 * m),
            // seq 6 lies inside seq 2.
            span(m + 1_000, m + 2_000),
            // seq 7 ends where seq 1 starts, sent late: counted.
            span(-m, 0),
            // seq 8 begins inside seq 5 and runs past every counted window.
            span(4 * m - 1_000, 6 * m),
        ];
        for (i, w) in windows.into_iter().enumerate() {
            let out = store
                .commit_each(&[batch("k", i as u64 + 1, vec![w])])
                .unwrap();
            assert!(out[0].is_ok(), "{:?}", out[0]);
        }
        let counted: Vec<u64> = store
            .windows(-10 * m, 10 * m, Some(CARD))
            .unwrap()
            .into_iter()
            .map(|w| w.seq)
            .collect();
        assert_eq!(counted, [7, 1, 2, 3, 5]);
        let overlaps: Vec<(Option<u64>, String)> = store
            .alarms(Some("k"))
            .unwrap()
            .into_iter()
            .filter(|a| a.kind == "card_time_overlap")
            .map(|a| (a.seq, a.detail))
            .collect();
        let named: Vec<(Option<u64>, bool)> = overlaps
            .iter()
            .map(|(seq, d)| {
                let expect = match seq {
                    Some(4) => "covered by k seq 1 (0..60000)",
                    Some(6) => "covered by k seq 2 (60000..120000)",
                    Some(8) => "covered by k seq 5 (180000..240000)",
                    _ => "?",
                };
                (*seq, d.contains(expect))
            })
            .collect();
        assert_eq!(
            named,
            [(Some(4), true), (Some(6), true), (Some(8), true)],
            "{overlaps:?}"
        );
    }

    pub(super) fn cards_stay_with_their_first_host_until_an_admin_moves_them(store: &dyn Store) {
        store.hello(&hello("k", "host-k", &[CARD])).unwrap();
        store
            .commit_each(&[batch("k", 1, vec![window(CARD, 0, &["user:k"])])])
            .unwrap();
        // Another host lists the card and meters it.
        store.hello(&hello("h", "host-h", &[CARD])).unwrap();
        assert_eq!(kinds(store, "h"), ["card_claimed"]);
        let out = store
            .commit_each(&[batch("h", 1, vec![window(CARD, 60_000, &["user:h"])])])
            .unwrap();
        assert!(out[0].is_ok());
        assert_eq!(kinds(store, "h"), ["card_claimed", "card_not_owned"]);
        let counted = |store: &dyn Store| {
            store
                .windows(0, 600_000, Some(CARD))
                .unwrap()
                .into_iter()
                .map(|w| w.agent_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(counted(store), ["k"]);
        let usage = store.usage(0, 600_000).unwrap();
        assert_eq!(usage.cards.len(), 1);
        assert_eq!(usage.tenants.len(), 1, "{:?}", usage.tenants);
        let hosts = store.hosts().unwrap();
        let of = |agent: &str| {
            hosts
                .iter()
                .find(|h| h.agent_id == agent)
                .map(|h| h.gpus.len())
        };
        assert_eq!((of("h"), of("k")), (Some(0), Some(1)));
        // Last seen: the Hello's time, and the receipt of the latest durable record apart.
        let k = hosts.iter().find(|h| h.agent_id == "k").unwrap();
        assert_eq!(
            (k.durable_seq, k.last_seen_ms, k.last_record_ms),
            (1, 5, Some(9))
        );
        store.hello(&hello("fresh", "host-f", &[])).unwrap();
        let hosts = store.hosts().unwrap();
        let f = hosts.iter().find(|h| h.agent_id == "fresh").unwrap();
        assert_eq!((f.durable_seq, f.last_record_ms), (0, None));

        let moved = store
            .move_host_card(CARD, "host-h", "ops", "rack swap", 77)
            .unwrap();
        assert_eq!(moved.from_host_id, "host-k");
        assert_eq!(counted(store), ["k", "h"]);
        assert_eq!(store.card_moves(Some(CARD)).unwrap(), [moved]);
        assert!(matches!(
            store.move_host_card(CARD, "host-h", "ops", "", 78),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            store.move_host_card("GPU-none", "host-h", "ops", "", 78),
            Err(StoreError::NotFound { what: "card", .. })
        ));
        // Now host K is the one without the card.
        store.hello(&hello("k", "host-k", &[CARD])).unwrap();
        assert_eq!(kinds(store, "k"), ["card_claimed"]);
    }

    pub(super) fn a_card_granted_to_a_host_is_its_own_before_that_host_reports_it(
        store: &dyn Store,
    ) {
        let g = Grant {
            grant_id: "G1".into(),
            program: Program::Research,
            grantee: "Lab".into(),
            principal: "user:alice".parse().unwrap(),
            csp: "kt".into(),
            valid_from_ms: 0,
            valid_until_ms: 86_400_000,
            cards: vec![GrantCard::new("host-k", CARD)],
            revoked_at_ms: None,
        };
        store.insert_grants(&[g], "ops", 1).unwrap();
        store.hello(&hello("h", "host-h", &[CARD])).unwrap();
        assert_eq!(kinds(store, "h"), ["card_claimed"]);
        store
            .commit_each(&[batch("h", 1, vec![window(CARD, 0, &["user:h"])])])
            .unwrap();
        assert!(store.windows(0, 600_000, Some(CARD)).unwrap().is_empty());
        // The granted host reports it: listed under its agent, no alarm.
        store.hello(&hello("k", "host-k", &[CARD])).unwrap();
        assert!(kinds(store, "k").is_empty());
        let hosts = store.hosts().unwrap();
        let k = hosts.iter().find(|h| h.agent_id == "k").unwrap();
        assert_eq!(k.gpus.len(), 1);
    }

    pub(super) fn an_agent_id_is_bound_to_the_host_of_its_first_hello(store: &dyn Store) {
        // An admin registration binds no host yet.
        store.register_agent("a", &[7; 32], "ops", "", 1).unwrap();
        assert_eq!(store.agent_registered_ms("a").unwrap(), Some(1));
        store.hello(&hello("a", "host-1", &[])).unwrap();
        assert_eq!(
            store.agent_registered_ms("a").unwrap(),
            Some(1),
            "the first registration counts"
        );
        assert!(matches!(
            store.hello(&hello("a", "host-2", &[])),
            Err(StoreError::HostMismatch { bound, claimed, .. }) if bound == "host-1" && claimed == "host-2"
        ));
        store.hello(&hello("a", "host-1", &[])).unwrap();
        assert_eq!(store.agent_registered_ms("nobody").unwrap(), None);
    }
}

/// Dedup on (agent_id, seq) is exact on every backend: the same bytes again are duplicates,
/// other bytes are equivocations (alarmed, the first copy kept, the other history's
/// checkpoint not stored).
pub(super) mod dedup {
    use crate::store::*;

    fn batch(agent: &str, seqs: std::ops::RangeInclusive<u64>, salt: u8) -> IngestBatch {
        let records: Vec<IngestRecord> = seqs
            .clone()
            .map(|seq| IngestRecord {
                seq,
                prev_hash: [0; 32],
                hash: [seq as u8 ^ salt; 32],
                body: vec![seq as u8, salt],
                created_ms: 0,
                content: RecordContent::Unknown,
            })
            .collect();
        IngestBatch {
            agent_id: agent.into(),
            checkpoint: CheckpointRow {
                epoch: 1,
                seq: *seqs.end(),
                chain_hash: [*seqs.end() as u8 ^ salt; 32],
                signature: vec![salt; 64],
            },
            records,
            received_ms: 3,
            alarms: vec![],
        }
    }

    pub(super) fn a_resent_record_is_a_duplicate_or_an_equivocation(store: &dyn Store) {
        let first = store.commit_each(&[batch("a", 1..=3, 0)]).unwrap();
        let first = first[0].as_ref().unwrap();
        assert_eq!((first.durable_seq, first.duplicates), (3, 0));
        // The same bytes again, in one commit with more: duplicates, nothing else.
        let out = store
            .commit_each(&[batch("a", 1..=3, 0), batch("a", 4..=5, 0)])
            .unwrap();
        let again = out[0].as_ref().unwrap();
        assert_eq!(
            (again.duplicates, again.equivocations.as_slice()),
            (3, &[][..])
        );
        assert_eq!(out[1].as_ref().unwrap().durable_seq, 5);
        assert!(store.alarms(Some("a")).unwrap().is_empty());
        // Other bytes for held seqs: the first copies stay, each is alarmed once.
        let out = store.commit_each(&[batch("a", 4..=6, 0x80)]).unwrap();
        let other = out[0].as_ref().unwrap();
        assert_eq!(other.equivocations, [4, 5]);
        assert_eq!((other.duplicates, other.durable_seq), (0, 6));
        assert_eq!(store.record_hash("a", 4).unwrap(), Some([4; 32]));
        assert_eq!(store.record_hash("a", 6).unwrap(), Some([6 ^ 0x80; 32]));
        let alarms = store.alarms(Some("a")).unwrap();
        let got: Vec<(&str, Option<u64>)> =
            alarms.iter().map(|a| (a.kind.as_str(), a.seq)).collect();
        assert_eq!(got, [("equivocation", Some(4)), ("equivocation", Some(5))]);
        assert!(
            alarms[0].detail.contains(&hex::encode([4u8; 32]))
                && alarms[0].detail.contains(&hex::encode([4u8 ^ 0x80; 32])),
            "{}",
            alarms[0].detail
        );
        let ledger = store.ledger().unwrap();
        let seqs: Vec<u64> = ledger
            .checkpoints("a")
            .unwrap()
            .iter()
            .map(|c| c.seq)
            .collect();
        // Seq 6 is new, so the checkpoint over it vouches for the chain held.
        assert_eq!(seqs, [3, 5, 6]);
        // A checkpoint over a re-sent seq with other bytes is the other history's: kept out
        // (the held one at 5 stays as it was signed).
        let out = store.commit_each(&[batch("a", 4..=5, 0x40)]).unwrap();
        assert_eq!(out[0].as_ref().unwrap().equivocations, [4, 5]);
        let cps = store.ledger().unwrap().checkpoints("a").unwrap();
        assert_eq!(cps.len(), 3);
        assert_eq!(
            (cps[1].seq, cps[1].signature.as_slice()),
            (5, &[0u8; 64][..])
        );
        let mut held = 0;
        ledger.scan_records("a", &mut |_| held += 1).unwrap();
        assert_eq!(held, 6);
    }
}

/// The same script on both backends gives the same answers to every read, down to alarm
/// texts, verification findings and the signed head's bytes.
mod backends_agree {
    use crate::grants::{Amendment, CardModel, Grant, GrantCard, Program};
    use crate::store::*;

    const K: &str = "GPU-000000a1-0000-4000-8000-000000000000";
    const H: &str = "GPU-000000a2-0000-4000-8000-000000000000";
    const SECRET: [u8; 32] = [42; 32];

    fn hello(agent: &str, host: &str, gpus: &[(&str, &str)], at: i64) -> AgentHello {
        AgentHello {
            agent_id: agent.into(),
            host_id: host.into(),
            csp: "kt".into(),
            hostname: agent.into(),
            agent_version: "t".into(),
            public_key: [agent.len() as u8; 32],
            driver_version: "t".into(),
            gpus: gpus
                .iter()
                .enumerate()
                .map(|(i, (u, name))| GpuRow {
                    uuid: u.to_string(),
                    index: i as u32,
                    name: name.to_string(),
                    serial: format!("s-{u}"),
                    pci_bus_id: "00:01".into(),
                    memory_total_bytes: Some(80 << 30),
                    mig_mode: "disabled".into(),
                    mig: None,
                })
                .collect(),
            epoch: 1,
            received_ms: at,
        }
    }

    fn window(gpu: &str, start: i64, util: f64, who: &[&str]) -> WindowRow {
        WindowRow {
            gpu_uuid: gpu.into(),
            start_ms: start,
            end_ms: start + 60_000,
            interval_ms: 1_000,
            expected_samples: 60,
            good_samples: 59,
            util_avg_pct: Some(util),
            util_max_pct: Some(util),
            mem_util_avg_pct: None,
            memory_used_max_bytes: Some(1 << 30),
            energy_mj: Some(12_345),
            energy_estimated: false,
            power_avg_w: Some(300.5),
            temperature_max_c: Some(61),
            throttle_reasons: None,
            health: "ok",
            unavailable_ms: 1_000,
            assignment_status: "assigned",
            grant_id: "G".into(),
            principal: "user:alice".into(),
            active_ms: 20_000,
            occupied_ms: 59_000,
            foreign_ms: 0,
            grantee_occupied_ms: Some(59_000),
            unattributed_ms: Some(0),
            energy_estimated_mj: None,
            principals: who
                .iter()
                .map(|p| PrincipalRow {
                    principal: p.to_string(),
                    uid: Some(1001),
                    occupied_ms: 59_000,
                    active_ms: 20_000,
                    memory_max_bytes: 1 << 30,
                    process_count: 1,
                    matches_grant: *p == "user:alice",
                })
                .collect(),
        }
    }

    fn batch(agent: &str, first: u64, contents: Vec<RecordContent>, at: i64) -> IngestBatch {
        let mut prev = gpumeter_proto::chain::GENESIS;
        let records: Vec<IngestRecord> = contents
            .into_iter()
            .enumerate()
            .map(|(i, content)| {
                let seq = first + i as u64;
                let body = format!("{agent}-{seq}").into_bytes();
                let hash = gpumeter_proto::chain::record_hash(&prev, seq, &body);
                let r = IngestRecord {
                    seq,
                    prev_hash: prev,
                    hash,
                    body,
                    created_ms: at,
                    content,
                };
                prev = hash;
                r
            })
            .collect();
        IngestBatch {
            agent_id: agent.into(),
            checkpoint: CheckpointRow {
                epoch: 1,
                seq: records.last().map_or(0, |r| r.seq),
                chain_hash: prev,
                signature: vec![7; 64],
            },
            records,
            received_ms: at,
            alarms: vec![Alarm {
                agent_id: agent.into(),
                at_ms: at,
                kind: "clock_skew".into(),
                seq: None,
                detail: format!("{agent} is {at} ms off"),
            }],
        }
    }

    /// Everything the store answers, after the script.
    #[derive(Debug, PartialEq)]
    struct Answers {
        commits: Vec<Vec<Result<CommitOutcome, String>>>,
        alarms: Vec<Alarm>,
        windows: Vec<MeteredWindow>,
        card: Vec<MeteredWindow>,
        usage: Usage,
        events: Vec<StoredEvent>,
        hosts: Vec<HostRow>,
        grants: Vec<Grant>,
        grant: Option<GrantRecord>,
        assignments: Vec<(u64, Vec<AssignmentRow>)>,
        moves: Vec<CardMoveRow>,
        invoices: Vec<StoredInvoice>,
        tokens: Vec<TokenRow>,
        verify: crate::verify::VerifyReport,
        head: crate::heads::SignedHead,
        heads: Vec<crate::heads::SignedHead>,
    }

    fn script(store: &dyn Store) -> Answers {
        let day = 86_400_000;
        let t = 10 * day;
        let grant = Grant {
            grant_id: "G".into(),
            program: Program::Research,
            grantee: "Lab".into(),
            principal: "user:alice".parse().unwrap(),
            csp: "kt".into(),
            valid_from_ms: 0,
            valid_until_ms: 40 * day,
            cards: vec![GrantCard::new("host-k", K), GrantCard::new("host-k", H)],
            revoked_at_ms: None,
        };
        store.insert_grants(&[grant], "ops", 1).unwrap();
        store
            .set_card_models(
                &[CardModel {
                    grant_id: "G".into(),
                    gpu_uuid: H.into(),
                    gpu_model: "H100".into(),
                }],
                2,
            )
            .unwrap();
        store
            .register_agent("k", &[1; 32], "ops", "install", 3)
            .unwrap();
        store
            .hello(&hello(
                "k",
                "host-k",
                &[(K, "NVIDIA A100"), (H, "NVIDIA A100")],
                4,
            ))
            .unwrap();
        store
            .hello(&hello("hh", "host-h", &[(K, "NVIDIA A100")], 5))
            .unwrap();
        let mut commits = Vec::new();
        let mut commit = |bs: Vec<IngestBatch>| {
            commits.push(
                store
                    .commit_each(&bs)
                    .unwrap()
                    .into_iter()
                    // Which batch failed, not the database's own words for why.
                    .map(|r| {
                        r.map_err(|e| match e {
                            StoreError::BatchRefused { agent_id, seq, .. } => {
                                format!("{agent_id} {seq}")
                            }
                            e => e.to_string(),
                        })
                    })
                    .collect::<Vec<_>>(),
            );
        };
        let w = |g: &str, s: i64, u: f64| RecordContent::Window(window(g, s, u, &["user:alice"]));
        commit(vec![
            batch(
                "k",
                1,
                vec![
                    w(K, t, 40.0),
                    w(K, t + 60_000, 50.0),
                    // Impossible: over 100 %.
                    w(H, t, 150.0),
                    // The same card time as seq 1.
                    w(K, t, 10.0),
                    RecordContent::Event(EventRow {
                        gpu_uuid: K.into(),
                        at_ms: t + 5,
                        kind: "xid",
                        code: 79,
                        detail: "fell off the bus".into(),
                        pid: None,
                        principal: String::new(),
                        grant_id: "G".into(),
                        mode: String::new(),
                        action: String::new(),
                        result: String::new(),
                    }),
                    RecordContent::Gap {
                        from_ms: t,
                        until_ms: t + 1,
                        reason: "spool full".into(),
                    },
                ],
                100,
            ),
            // A card host K holds, metered by host H: stored, disputed.
            batch("hh", 1, vec![w(K, t + 120_000, 30.0)], 101),
            // Two principals of one name: this batch fails alone.
            batch(
                "hh",
                2,
                vec![RecordContent::Window(window(
                    K,
                    t + 180_000,
                    1.0,
                    &["user:x", "user:x"],
                ))],
                102,
            ),
        ]);
        // A resend with other bytes, and one with the same.
        let mut other = batch("k", 1, vec![w(K, t, 40.0)], 103);
        other.records[0].hash = [9; 32];
        other.checkpoint.chain_hash = [9; 32];
        let same = batch("k", 1, vec![w(K, t, 40.0)], 104);
        commit(vec![other, same]);
        store
            .amend_grant(
                "G",
                &Amendment::Extend {
                    valid_until_ms: 50 * day,
                },
                "ops",
                6,
            )
            .unwrap();
        store
            .move_host_card(K, "host-h", "ops", "rack swap", 7)
            .unwrap();
        store
            .insert_invoices(
                &[Invoice {
                    csp: "kt".into(),
                    grant_id: "G".into(),
                    period: "2026-04".into(),
                    billed_gpu_hours: 1.5,
                    line: 2,
                }],
                "csp",
                8,
            )
            .unwrap();
        store
            .create_token(&TokenRow {
                name: "aud".into(),
                role: "auditor".into(),
                hash: "ab".repeat(32),
                created_ms: 9,
                revoked_ms: None,
            })
            .unwrap();
        store.revoke_token("aud", 10).unwrap();
        store
            .alarm(&Alarm {
                agent_id: "k".into(),
                at_ms: 11,
                kind: "seq_gap".into(),
                seq: Some(3),
                detail: "gap".into(),
            })
            .unwrap();
        let head = store.sign_head(12).unwrap();
        assert_eq!(
            store.sign_head(13).unwrap(),
            head,
            "nothing changed: reused"
        );
        let ledger = store.ledger().unwrap();
        Answers {
            commits,
            alarms: store
                .alarms(None)
                .unwrap()
                .into_iter()
                .map(|mut a| {
                    // The database's own words for why a batch failed differ by backend.
                    if let Some(i) = a.detail.find("rolled back alone") {
                        a.detail.truncate(i);
                    }
                    a
                })
                .collect(),
            windows: store.windows(t - day, t + day, None).unwrap(),
            card: store.windows(t, t + 120_000, Some(K)).unwrap(),
            usage: store.usage(t - day, t + day).unwrap(),
            events: store.events(t - day, t + day, None, None).unwrap(),
            hosts: store.hosts().unwrap(),
            grants: store.grants().unwrap(),
            grant: store.grant("G").unwrap(),
            assignments: ["host-k", "host-h"]
                .iter()
                .map(|h| store.assignments(h).unwrap())
                .collect(),
            moves: store.card_moves(None).unwrap(),
            invoices: store.invoices().unwrap(),
            tokens: store.tokens().unwrap(),
            verify: crate::verify::verify(ledger.as_ref()).unwrap(),
            heads: store.heads(0).unwrap(),
            head,
        }
    }

    fn write_key(path: &std::path::Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, SECRET).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn both_backends_store_and_answer_alike() {
        let Some(db) = super::TestPg::create("backends_agree") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agree.db");
        write_key(&crate::heads::key_path(&file));
        let sqlite = script(&super::SqliteStore::open(&file).unwrap());
        let key = dir.path().join("pg-key");
        write_key(&key);
        let postgres = script(&super::PgStore::open(&db.url, Some(&key)).unwrap());
        // The script did what it meant to (so agreeing is not agreeing on nothing).
        // Two of host K's, and host H's disputed one, which counts once the card moved to H.
        assert_eq!(sqlite.windows.len(), 3, "{:?}", sqlite.windows);
        let kinds: Vec<&str> = sqlite.alarms.iter().map(|a| a.kind.as_str()).collect();
        for k in [
            "impossible_window",
            "card_time_overlap",
            "equivocation",
            "card_not_owned",
            "batch_failed",
            "card_claimed",
            "card_model_mismatch",
            "agent_gap",
            "card_moved",
        ] {
            assert!(kinds.contains(&k), "{k} in {kinds:?}");
        }
        assert!(!sqlite.verify.ok, "the test bodies are not real records");
        // Field by field first, for a readable failure.
        assert_eq!(sqlite.commits, postgres.commits);
        assert_eq!(sqlite.alarms, postgres.alarms);
        assert_eq!(sqlite.windows, postgres.windows);
        assert_eq!(sqlite.card, postgres.card);
        assert_eq!(sqlite.usage, postgres.usage);
        assert_eq!(sqlite.events, postgres.events);
        assert_eq!(sqlite.hosts, postgres.hosts);
        assert_eq!(sqlite.grant, postgres.grant);
        assert_eq!(sqlite.assignments, postgres.assignments);
        assert_eq!(sqlite.verify, postgres.verify);
        assert_eq!(sqlite.head, postgres.head);
        assert_eq!(sqlite, postgres);
    }
}

/// The writer thread group-commits sessions' batches on every backend (the PostgreSQL client
/// driven from the writer's own thread): each is answered after its commit, a resend is
/// answered again and stored once.
mod writer_on_both {
    use std::sync::Arc;

    use crate::store::writer::Writer;
    use crate::store::*;

    fn batch(agent: &str, seqs: std::ops::RangeInclusive<u64>) -> IngestBatch {
        let records = seqs
            .clone()
            .map(|seq| IngestRecord {
                seq,
                prev_hash: [0; 32],
                hash: [seq as u8; 32],
                body: vec![seq as u8],
                created_ms: 0,
                content: RecordContent::Event(EventRow {
                    gpu_uuid: format!("GPU-{agent}"),
                    at_ms: seq as i64,
                    kind: "xid",
                    code: 13,
                    detail: String::new(),
                    pid: None,
                    principal: String::new(),
                    grant_id: String::new(),
                    mode: String::new(),
                    action: String::new(),
                    result: String::new(),
                }),
            })
            .collect();
        IngestBatch {
            agent_id: agent.into(),
            records,
            checkpoint: CheckpointRow {
                epoch: 1,
                seq: *seqs.end(),
                chain_hash: [*seqs.end() as u8; 32],
                signature: vec![],
            },
            received_ms: 0,
            alarms: vec![],
        }
    }

    fn group_commit(store: Arc<dyn Store>) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        for agent in ["w1", "w2", "w3"] {
            store
                .hello(&AgentHello {
                    agent_id: agent.into(),
                    host_id: agent.into(),
                    csp: "kt".into(),
                    hostname: agent.into(),
                    agent_version: "t".into(),
                    public_key: [3; 32],
                    driver_version: "t".into(),
                    gpus: vec![],
                    epoch: 1,
                    received_ms: 0,
                })
                .unwrap();
        }
        rt.block_on(async move {
            let writer = Writer::spawn(store.clone());
            let mut pending = Vec::new();
            for agent in ["w1", "w2", "w3"] {
                for first in [1u64, 4, 7] {
                    pending.push(
                        writer
                            .submit(batch(agent, first..=first + 2))
                            .await
                            .unwrap(),
                    );
                }
            }
            for p in pending {
                let out = p.await.unwrap().unwrap();
                assert_eq!(out.duplicates, 0);
            }
            for agent in ["w1", "w2", "w3"] {
                assert_eq!(
                    store.record_hash(agent, 9).unwrap(),
                    Some([9; 32]),
                    "{agent}"
                );
            }
            assert_eq!(store.events(0, 100, Some("xid"), None).unwrap().len(), 27);
            // Resent after a reconnect: acknowledged again, stored once.
            let again = writer.commit(batch("w1", 7..=9)).await.unwrap();
            assert_eq!((again.durable_seq, again.duplicates), (9, 3));
            assert_eq!(
                writer
                    .stats
                    .records
                    .load(std::sync::atomic::Ordering::Relaxed),
                30
            );
        });
    }

    #[test]
    fn sqlite() {
        let dir = tempfile::tempdir().unwrap();
        group_commit(Arc::new(
            super::SqliteStore::open(&dir.path().join("w.db")).unwrap(),
        ));
    }

    #[test]
    fn postgres() {
        let Some(db) = super::TestPg::create("writer") else {
            return;
        };
        group_commit(Arc::new(super::PgStore::open(&db.url, None).unwrap()));
    }
}
