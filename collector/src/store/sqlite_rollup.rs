//! Rollups in SQLite (see [`crate::rollup`]): the tables `card_hours` and `card_days`, their
//! upkeep as each window commits, the rows reports read, and their re-derivation from the
//! `windows` table for `verify`.
//!
//! The commit path adds each batch's windows to their rows in Rust ([`add_windows`]); migration 9 and
//! `verify` derive the same rows in SQL from the windows ([`super::rollup_sql`], shared with
//! PostgreSQL). The two must agree to the row: verify compares them, and the store tests
//! check every kind of window.

use rusqlite::{Connection, params};

pub use super::rollup_sql::table;
use super::rollup_sql::{COLUMNS, Dialect, Source, derive, mismatch_sql, problem, source_select};
use super::{StoreError, WindowRow};
use crate::rollup::{Buckets, Level, RollupMismatch as Mismatch, RollupRow};

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

/// Migration 9: the rollup tables (filled from the windows already stored by [`backfill`]).
pub const MIGRATION: &str = r#"
CREATE TABLE card_hours (
    start_ms INTEGER NOT NULL,
    gpu_uuid TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    assignment_status TEXT NOT NULL,
    grant_id TEXT NOT NULL,
    windows INTEGER NOT NULL,
    raw INTEGER NOT NULL,
    good_ms INTEGER NOT NULL,
    unavailable_ms INTEGER NOT NULL,
    unattributed_ms INTEGER NOT NULL,
    energy_mj INTEGER NOT NULL,
    occupied_ms INTEGER NOT NULL,
    grantee_occupied_ms INTEGER NOT NULL,
    active_ms INTEGER NOT NULL,
    foreign_ms INTEGER NOT NULL,
    max_seq INTEGER NOT NULL,
    PRIMARY KEY (start_ms, gpu_uuid, agent_id, assignment_status, grant_id)
) WITHOUT ROWID;
CREATE TABLE card_days (
    start_ms INTEGER NOT NULL,
    gpu_uuid TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    assignment_status TEXT NOT NULL,
    grant_id TEXT NOT NULL,
    windows INTEGER NOT NULL,
    raw INTEGER NOT NULL,
    good_ms INTEGER NOT NULL,
    unavailable_ms INTEGER NOT NULL,
    unattributed_ms INTEGER NOT NULL,
    energy_mj INTEGER NOT NULL,
    occupied_ms INTEGER NOT NULL,
    grantee_occupied_ms INTEGER NOT NULL,
    active_ms INTEGER NOT NULL,
    foreign_ms INTEGER NOT NULL,
    max_seq INTEGER NOT NULL,
    PRIMARY KEY (start_ms, gpu_uuid, agent_id, assignment_status, grant_id)
) WITHOUT ROWID;
"#;

/// The temporary table the derivation reads (both levels read it once).
const SOURCE: &str = "rollup_src";

fn create_source(c: &Connection) -> Result<(), StoreError> {
    c.execute_batch(&format!(
        "DROP TABLE IF EXISTS temp.{SOURCE}; CREATE TEMP TABLE {SOURCE} AS {}",
        source_select(Dialect::Sqlite)
    ))
    .map_err(db)
}

/// Fills the rollup tables from the windows stored (migration 9).
pub fn backfill(c: &Connection) -> Result<(), StoreError> {
    create_source(c)?;
    for level in [Level::Hour, Level::Day] {
        c.execute_batch(&format!(
            "INSERT INTO {} ({COLUMNS}) {}",
            table(level),
            derive(Dialect::Sqlite, level, Source::Table(SOURCE))
        ))
        .map_err(db)?;
    }
    c.execute_batch(&format!("DROP TABLE temp.{SOURCE}"))
        .map_err(db)
}

/// Adds one batch's counted windows (seq, window, disputed: reported for a card another host
/// held) of `agent_id` to their rows: summed per row first ([`crate::rollup::batch_rows`]),
/// then one upsert per row and level.
pub fn add_windows(
    c: &Connection,
    agent_id: &str,
    windows: &[(i64, &WindowRow, bool)],
) -> Result<(), StoreError> {
    if windows.is_empty() {
        return Ok(());
    }
    for level in [Level::Hour, Level::Day] {
        let mut st = c
            .prepare_cached(&format!(
                "INSERT INTO {} ({COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16)
                 ON CONFLICT (start_ms, gpu_uuid, agent_id, assignment_status, grant_id) DO UPDATE SET
                   windows = windows + excluded.windows,
                   good_ms = good_ms + excluded.good_ms,
                   unavailable_ms = unavailable_ms + excluded.unavailable_ms,
                   unattributed_ms = unattributed_ms + excluded.unattributed_ms,
                   energy_mj = energy_mj + excluded.energy_mj,
                   occupied_ms = occupied_ms + excluded.occupied_ms,
                   grantee_occupied_ms = grantee_occupied_ms + excluded.grantee_occupied_ms,
                   active_ms = active_ms + excluded.active_ms,
                   foreign_ms = foreign_ms + excluded.foreign_ms,
                   max_seq = MAX(max_seq, excluded.max_seq)",
                table(level)
            ))
            .map_err(db)?;
        let i = |v: u64| v.min(i64::MAX as u64) as i64;
        for ((start, gpu, status, grant), a) in crate::rollup::batch_rows(level, windows) {
            let s = a.sums;
            st.execute(params![
                start,
                gpu,
                agent_id,
                status,
                grant,
                a.windows,
                a.raw,
                i(s.good_ms),
                i(s.unavailable_ms),
                i(s.unattributed_ms),
                i(s.energy_mj),
                i(s.occupied_ms),
                i(s.grantee_occupied_ms),
                i(s.active_ms),
                i(s.foreign_ms),
                a.max_seq
            ])
            .map_err(db)?;
        }
    }
    Ok(())
}

/// Visits the rows of `level` whose bucket overlaps `[from, until)`, one card's bucket (all its
/// rows) at a time, in bucket order.
pub fn visit(
    c: &Connection,
    level: Level,
    from_ms: i64,
    until_ms: i64,
    visit: &mut dyn FnMut(Vec<RollupRow>),
) -> Result<(), StoreError> {
    let mut agents: std::collections::HashMap<String, (String, String)> = Default::default();
    {
        let mut st = c
            .prepare_cached("SELECT agent_id, host_id, csp FROM agents")
            .map_err(db)?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
            .map_err(db)?;
        for r in rows {
            let (id, at): (String, (String, String)) = r.map_err(db)?;
            agents.insert(id, at);
        }
    }
    let mut st = c
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM {} WHERE start_ms > ?1 - ?3 AND start_ms < ?2
             ORDER BY start_ms, gpu_uuid",
            table(level)
        ))
        .map_err(db)?;
    let mut rows = st
        .query(params![from_ms, until_ms, level.len_ms()])
        .map_err(db)?;
    let mut buckets = Buckets::default();
    let none = (String::new(), String::new());
    while let Some(r) = rows.next().map_err(db)? {
        let agent_id: String = r.get(2).map_err(db)?;
        let at = agents.get(&agent_id).unwrap_or(&none);
        buckets.push(stored_row(r, level, at).map_err(db)?, visit);
    }
    buckets.finish(visit);
    Ok(())
}

/// A rollup row read in [`COLUMNS`] order, with its agent's host and CSP.
pub fn stored_row(
    r: &rusqlite::Row<'_>,
    level: Level,
    at: &(String, String),
) -> rusqlite::Result<RollupRow> {
    let mut n = [0i64; 10];
    for (k, v) in n.iter_mut().enumerate() {
        *v = r.get(if k == 0 { 5 } else { k + 6 })?;
    }
    let status: String = r.get(3)?;
    Ok(RollupRow::stored(
        level,
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        at.clone(),
        &status,
        r.get(4)?,
        r.get(6)?,
        n,
    ))
}

/// Re-derives both rollup tables from the windows (as migration 9 fills them) and lists every
/// row that differs, by key. Runs on a connection that may write temporary tables.
pub fn mismatches(c: &Connection, retained: bool) -> Result<Vec<Mismatch>, StoreError> {
    create_source(c)?;
    let mut out = Vec::new();
    for level in [Level::Hour, Level::Day] {
        let mut st = c
            .prepare(&mismatch_sql(
                Dialect::Sqlite,
                level,
                Source::Table(SOURCE),
                retained,
            ))
            .map_err(db)?;
        let rows = st
            .query_map([], |r| {
                Ok(Mismatch {
                    table: table(level),
                    start_ms: r.get(0)?,
                    gpu_uuid: r.get(1)?,
                    agent_id: r.get(2)?,
                    problem: problem(&r.get::<_, String>(3)?),
                })
            })
            .map_err(db)?;
        for r in rows {
            out.push(r.map_err(db)?);
        }
    }
    c.execute_batch(&format!("DROP TABLE temp.{SOURCE}"))
        .map_err(db)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::grants::{Grant, GrantCard, Program};
    use crate::reconcile::{IdleSettings, Inputs};
    use crate::rollup::{DAY_MS, HOUR_MS};
    use crate::store::sqlite::SqliteStore;
    use crate::store::{
        AgentHello, CheckpointRow, GpuRow, IngestBatch, IngestRecord, PrincipalRow, RecordContent,
        Store,
    };

    const MIN: i64 = 60_000;
    /// A Seoul midnight (30 November 2026, 2026-11-29T15:00Z).
    const T0: i64 = 1_795_964_400_000;
    const CARDS: [&str; 3] = [
        "GPU-00000001-0000-4000-8000-000000000000",
        "GPU-00000002-0000-4000-8000-000000000000",
        "GPU-00000003-0000-4000-8000-000000000000",
    ];

    fn hello(agent: &str, cards: &[&str]) -> AgentHello {
        AgentHello {
            agent_id: agent.into(),
            host_id: format!("host-{agent}"),
            csp: "kt".into(),
            hostname: agent.into(),
            agent_version: "t".into(),
            public_key: [7; 32],
            driver_version: "t".into(),
            gpus: cards
                .iter()
                .enumerate()
                .map(|(i, u)| GpuRow {
                    uuid: (*u).into(),
                    index: i as u32,
                    name: "NVIDIA H100".into(),
                    serial: format!("S{i}"),
                    pci_bus_id: format!("0000:0{i}:00.0"),
                    memory_total_bytes: None,
                    mig_mode: String::new(),
                    mig: None,
                })
                .collect(),
            epoch: 1,
            received_ms: 0,
        }
    }

    /// A generated window: card, agent, start (minutes after T0), length (minutes), and its
    /// values; `bad` makes it impossible (flagged), and windows may overlap (flagged too).
    #[derive(Debug, Clone)]
    struct Gen {
        card: usize,
        agent_b: bool,
        start_min: i64,
        len_min: i64,
        good_pct: u64,
        assignment: u8,
        grantee: Option<u64>,
        matches: (bool, bool),
        energy: Option<u64>,
        unattributed: Option<u64>,
        bad: bool,
    }

    fn arb_gen() -> impl Strategy<Value = Gen> {
        (
            (0usize..3, proptest::bool::weighted(0.15), 0i64..3 * 1440),
            prop_oneof![4 => Just(1i64), 2 => Just(30), 1 => Just(120), 1 => 1i64..5],
            (0u64..=100, 0u8..3, proptest::option::of(0u64..=100)),
            (any::<bool>(), any::<bool>()),
            (
                proptest::option::of(0u64..1_000_000),
                proptest::option::of(0u64..=100),
            ),
            proptest::bool::weighted(0.05),
        )
            .prop_map(
                |(
                    (card, agent_b, start_min),
                    len_min,
                    (good_pct, assignment, grantee),
                    matches,
                    (energy, unattributed),
                    bad,
                )| Gen {
                    card,
                    agent_b,
                    start_min,
                    len_min,
                    good_pct,
                    assignment,
                    grantee,
                    matches,
                    energy,
                    unattributed,
                    bad,
                },
            )
    }

    fn window_of(g: &Gen) -> WindowRow {
        // Windows sit on their own length's grid, as the agent's do (a 2-hour one crosses
        // hours; one of a few minutes may cross one too).
        let len = g.len_min * MIN;
        let start = T0 + (g.start_min * MIN).div_euclid(len) * len;
        let samples = (len / 1_000) as u32;
        let good = (u64::from(samples) * g.good_pct / 100) as u32;
        let occupied = (len as u64) / 2;
        let (status, grant) = match g.assignment {
            0 => ("assigned", "G1"),
            1 => ("assigned", "G2"),
            _ => ("unassigned", ""),
        };
        WindowRow {
            gpu_uuid: CARDS[g.card].into(),
            start_ms: start,
            end_ms: start + len,
            interval_ms: 1_000,
            expected_samples: samples,
            good_samples: if g.bad { samples + 1 } else { good },
            util_avg_pct: Some(50.0),
            util_max_pct: None,
            mem_util_avg_pct: None,
            memory_used_max_bytes: None,
            energy_mj: g.energy,
            energy_estimated: false,
            power_avg_w: None,
            temperature_max_c: None,
            throttle_reasons: None,
            health: "ok",
            unavailable_ms: (len as u64 - u64::from(good) * 1_000) / 3,
            assignment_status: status,
            grant_id: grant.into(),
            principal: String::new(),
            active_ms: occupied / 2,
            occupied_ms: occupied,
            foreign_ms: occupied / 4,
            grantee_occupied_ms: g.grantee.map(|p| occupied * p / 100),
            unattributed_ms: g.unattributed.map(|p| (len as u64 / 4) * p / 100),
            energy_estimated_mj: None,
            principals: vec![
                PrincipalRow {
                    principal: "user:alice".into(),
                    uid: Some(1001),
                    occupied_ms: occupied / 2,
                    active_ms: occupied / 4,
                    memory_max_bytes: 1,
                    process_count: 1,
                    matches_grant: g.matches.0,
                },
                PrincipalRow {
                    principal: "user:bob".into(),
                    uid: None,
                    occupied_ms: occupied / 3,
                    active_ms: occupied / 5,
                    memory_max_bytes: 2,
                    process_count: 1,
                    matches_grant: g.matches.1,
                },
            ],
        }
    }

    fn commit(store: &dyn Store, agent: &str, first_seq: u64, windows: Vec<WindowRow>) {
        let records: Vec<IngestRecord> = windows
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                let seq = first_seq + i as u64;
                let mut hash = [0u8; 32];
                hash[..8].copy_from_slice(&seq.to_be_bytes());
                IngestRecord {
                    seq,
                    prev_hash: [0; 32],
                    hash,
                    body: seq.to_be_bytes().to_vec(),
                    created_ms: 0,
                    content: RecordContent::Window(w),
                }
            })
            .collect();
        let last = records.last().map_or(first_seq, |r| r.seq);
        store
            .commit(&[IngestBatch {
                agent_id: agent.into(),
                checkpoint: CheckpointRow {
                    epoch: 1,
                    seq: last,
                    chain_hash: [0; 32],
                    signature: vec![],
                },
                records,
                received_ms: 0,
                alarms: vec![],
            }])
            .unwrap();
    }

    fn grant(id: &str, cards: &[&str], from: i64, until: i64, revoked: Option<i64>) -> Grant {
        Grant {
            grant_id: id.into(),
            program: Program::Research,
            grantee: "Lab".into(),
            principal: "user:alice".parse().unwrap(),
            csp: "kt".into(),
            valid_from_ms: from,
            valid_until_ms: until,
            cards: cards.iter().map(|u| GrantCard::new("host-a", *u)).collect(),
            revoked_at_ms: revoked,
        }
    }

    /// Sorted for comparison: the planner returns windows in another order than the store.
    fn report(
        store: &dyn Store,
        grants: &[Grant],
        span: (i64, i64, i64),
        covered: &HashMap<&str, u64>,
        rollups: bool,
    ) -> (
        crate::reconcile::Reconciliation,
        Vec<crate::render::CardDay>,
    ) {
        try_report(store, grants, span, covered, rollups).unwrap()
    }

    type Figures = (
        crate::reconcile::Reconciliation,
        Vec<crate::render::CardDay>,
    );

    fn try_report(
        store: &dyn Store,
        grants: &[Grant],
        (from, until, as_of): (i64, i64, i64),
        covered: &HashMap<&str, u64>,
        rollups: bool,
    ) -> Result<Figures, StoreError> {
        let in_head = |a: &str, s: u64| covered.get(a).is_some_and(|&c| s <= c);
        let idle = IdleSettings {
            threshold_pct: 10.0,
            days: 1,
            as_of_ms: until.min(as_of),
        };
        crate::query::figures_of(
            store,
            &Inputs {
                period: "p",
                from_ms: from,
                until_ms: until,
                program: None,
                grant_id: None,
                grants,
                windows: &[],
                events: &[],
                invoices: &[],
                idle,
            },
            as_of,
            &in_head,
            rollups,
            true,
        )
    }

    #[test]
    fn consecutive_clean_days_of_a_card_are_read_as_one_window() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("m.db")).unwrap();
        store.hello(&hello("a", &CARDS)).unwrap();
        let hourly: Vec<WindowRow> = (0..72)
            .map(|h| {
                window_of(&Gen {
                    card: 0,
                    agent_b: false,
                    start_min: h * 60,
                    len_min: 60,
                    good_pct: 100,
                    assignment: 0,
                    grantee: Some(50),
                    matches: (true, false),
                    energy: Some(5),
                    unattributed: None,
                    bad: false,
                })
            })
            .collect();
        commit(&store, "a", 1, hourly);
        let read = |cuts: &crate::rollup::Cuts| {
            let mut days = Vec::new();
            let ws =
                crate::rollup::metered(&store, T0, T0 + 3 * DAY_MS, cuts, &|_, _| true, &mut |c| {
                    days.push((c.start_ms, c.end_ms))
                })
                .unwrap();
            let spans: Vec<(i64, i64)> = ws
                .iter()
                .map(|w| (w.window.start_ms, w.window.end_ms))
                .collect();
            (spans, days)
        };
        // Three clean days, no cut: one window for the figures, three days counted.
        let (spans, days) = read(&crate::rollup::Cuts::default());
        assert_eq!(spans, vec![(T0, T0 + 3 * DAY_MS)]);
        assert_eq!(
            days,
            vec![
                (T0, T0 + DAY_MS),
                (T0 + DAY_MS, T0 + 2 * DAY_MS),
                (T0 + 2 * DAY_MS, T0 + 3 * DAY_MS)
            ]
        );
        // A cut at the second midnight keeps the runs apart.
        let cuts = crate::rollup::Cuts {
            everywhere: vec![T0 + 2 * DAY_MS],
            ..Default::default()
        };
        assert_eq!(
            read(&cuts).0,
            vec![(T0, T0 + 2 * DAY_MS), (T0 + 2 * DAY_MS, T0 + 3 * DAY_MS)]
        );
    }

    #[test]
    fn verify_finds_a_rollup_row_edited_deleted_or_inserted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        let store = SqliteStore::open(&path).unwrap();
        store.hello(&hello("a", &CARDS)).unwrap();
        let make = |start_min, len_min| Gen {
            card: 0,
            agent_b: false,
            start_min,
            len_min,
            good_pct: 90,
            assignment: 0,
            grantee: Some(50),
            matches: (true, false),
            energy: Some(5),
            unattributed: None,
            bad: false,
        };
        commit(
            &store,
            "a",
            1,
            vec![
                window_of(&make(0, 1)),
                window_of(&make(61, 1)),
                window_of(&make(150, 120)),
            ],
        );
        let findings = || {
            let report = crate::verify::verify(store.ledger().unwrap().as_ref()).unwrap();
            report
                .agents
                .iter()
                .flat_map(|a| a.findings.iter())
                .filter_map(|f| match f {
                    crate::verify::Finding::RollupMismatch { table, problem, .. } => {
                        Some(format!("{table} {problem}"))
                    }
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(findings(), Vec::<String>::new());
        let c = Connection::open(&path).unwrap();
        let marks: i64 = c
            .query_row("SELECT COUNT(*) FROM card_hours WHERE raw", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(marks, 2, "the 2-hour window marks both its hours");
        c.execute("UPDATE card_days SET good_ms = good_ms + 1000", [])
            .unwrap();
        assert_eq!(findings(), vec!["card_days differs"]);
        c.execute(
            &format!("DELETE FROM card_hours WHERE start_ms = {}", T0 + HOUR_MS),
            [],
        )
        .unwrap();
        c.execute(
            &format!(
                "INSERT INTO card_hours ({COLUMNS}) VALUES ({}, '{}', 'a', 'assigned', 'G1', 1, 0, 60000, 0, 0, 0, 0, 0, 0, 0, 1)",
                T0 + 5 * HOUR_MS,
                CARDS[1]
            ),
            [],
        )
        .unwrap();
        let mut f = findings();
        f.sort();
        assert_eq!(
            f,
            vec![
                "card_days differs",
                "card_hours missing",
                "card_hours not derived"
            ]
        );
    }

    #[test]
    fn migration_9_fills_the_rollups_from_the_windows_already_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let kept: Vec<(i64, String, i64, i64)>;
        {
            let store = SqliteStore::open(&path).unwrap();
            store.hello(&hello("a", &CARDS)).unwrap();
            let ws = (0..90)
                .map(|i| {
                    window_of(&Gen {
                        card: i % 3,
                        agent_b: false,
                        start_min: i as i64 * 7,
                        len_min: if i % 10 == 0 { 120 } else { 1 },
                        good_pct: 80,
                        assignment: (i % 3) as u8,
                        grantee: None,
                        matches: (true, i % 2 == 0),
                        energy: Some(i as u64),
                        unattributed: Some(10),
                        bad: i == 5,
                    })
                })
                .collect();
            commit(&store, "a", 1, ws);
            let c = Connection::open(&path).unwrap();
            kept = all_rows(&c);
            // Back to a version-8 ledger: the same windows, no rollups (nor the later
            // versions' tables).
            c.execute_batch(
                "CREATE TABLE w8 AS SELECT * FROM windows; DROP VIEW windows;
                 ALTER TABLE w8 RENAME TO windows;
                 CREATE TABLE p8 AS SELECT * FROM window_principals; DROP VIEW window_principals;
                 ALTER TABLE p8 RENAME TO window_principals;
                 DROP TABLE window_rows; DROP TABLE window_principal_rows; DROP TABLE names;
                 DROP TABLE card_hours; DROP TABLE card_days; DROP TABLE registry_history;
                 DROP TABLE registered_hosts; DROP TABLE providers; DROP TABLE record_blocks;
                 PRAGMA user_version = 8;",
            )
            .unwrap();
        }
        assert!(kept.len() > 20, "{}", kept.len());
        let _store = SqliteStore::open(&path).unwrap();
        let c = Connection::open(&path).unwrap();
        assert_eq!(all_rows(&c), kept, "the backfill gives what commits kept");
    }

    /// Every column of every window and principal row, as the views give them.
    fn derived_dump(c: &Connection) -> Vec<String> {
        let mut out = Vec::new();
        for sql in [
            "SELECT * FROM windows ORDER BY agent_id, seq",
            "SELECT * FROM window_principals ORDER BY agent_id, seq, principal",
        ] {
            let mut st = c.prepare(sql).unwrap();
            let n = st.column_count();
            let rows = st
                .query_map([], |r| {
                    Ok((0..n)
                        .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                        .collect::<Vec<_>>()
                        .join("|"))
                })
                .unwrap();
            out.extend(rows.map(Result::unwrap));
        }
        out
    }

    #[test]
    fn migration_12_moves_windows_and_principals_over_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let kept: Vec<String>;
        {
            let store = SqliteStore::open(&path).unwrap();
            store.hello(&hello("a", &CARDS)).unwrap();
            let ws = (0..40)
                .map(|i| {
                    window_of(&Gen {
                        card: i % 3,
                        agent_b: false,
                        start_min: i as i64 * 7,
                        len_min: 1,
                        good_pct: 80,
                        assignment: (i % 3) as u8,
                        grantee: None,
                        matches: (true, i % 2 == 0),
                        energy: Some(i as u64),
                        unattributed: Some(10),
                        bad: false,
                    })
                })
                .collect();
            commit(&store, "a", 1, ws);
            let c = Connection::open(&path).unwrap();
            kept = derived_dump(&c);
            // Back to a version-11 ledger: the same rows in plain tables.
            c.execute_batch(
                "CREATE TABLE w11 AS SELECT * FROM windows; DROP VIEW windows;
                 ALTER TABLE w11 RENAME TO windows;
                 CREATE TABLE p11 AS SELECT * FROM window_principals; DROP VIEW window_principals;
                 ALTER TABLE p11 RENAME TO window_principals;
                 DROP TABLE window_rows; DROP TABLE window_principal_rows; DROP TABLE names;
                 PRAGMA user_version = 11;",
            )
            .unwrap();
        }
        assert!(kept.len() > 60, "{}", kept.len());
        let _store = SqliteStore::open(&path).unwrap();
        let c = Connection::open(&path).unwrap();
        assert_eq!(
            derived_dump(&c),
            kept,
            "the views give back every row as it was"
        );
        // Each name is stored once, however many rows carry it.
        let names: i64 = c
            .query_row("SELECT COUNT(*) FROM names WHERE name = 'a'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(names, 1);
        // The views stay writable for tools that edit the ledger by hand.
        let occupied_of = |c: &Connection| -> i64 {
            c.query_row(
                "SELECT occupied_ms FROM windows WHERE agent_id = 'a' AND seq = 1",
                [],
                |r| r.get(0),
            )
            .unwrap()
        };
        let was = occupied_of(&c);
        let before = c.total_changes();
        c.execute(
            "UPDATE windows SET occupied_ms = occupied_ms + 1 WHERE agent_id = 'a' AND seq = 1",
            [],
        )
        .unwrap();
        c.execute(
            "DELETE FROM window_principals WHERE agent_id = 'a' AND seq = 2",
            [],
        )
        .unwrap();
        c.execute(
            "INSERT INTO windows SELECT 'b', seq, gpu_uuid, start_ms, end_ms, interval_ms,
                 expected_samples, good_samples, util_avg_pct, util_max_pct, mem_util_avg_pct,
                 memory_used_max_bytes, energy_mj, energy_estimated, power_avg_w,
                 temperature_max_c, throttle_reasons, health, unavailable_ms, assignment_status,
                 grant_id, principal, active_ms, occupied_ms, foreign_ms, grantee_occupied_ms,
                 unattributed_ms, energy_estimated_mj
             FROM windows WHERE agent_id = 'a' AND seq = 3",
            [],
        )
        .unwrap();
        assert!(c.total_changes() - before >= 3);
        assert_eq!(occupied_of(&c), was + 1);
        let gone: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM window_principals WHERE agent_id = 'a' AND seq = 2",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(gone, 0);
        let copied: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM windows WHERE agent_id = 'b' AND seq = 3",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(copied, 1);
    }

    fn all_rows(c: &Connection) -> Vec<(i64, String, i64, i64)> {
        let mut out = Vec::new();
        for t in ["card_hours", "card_days"] {
            let mut st = c
                .prepare(&format!(
                    "SELECT start_ms, gpu_uuid || agent_id || assignment_status || grant_id || raw, windows,
                            good_ms + 3 * unavailable_ms + 5 * unattributed_ms + 7 * energy_mj + 11 * occupied_ms
                            + 13 * grantee_occupied_ms + 17 * active_ms + 19 * foreign_ms + 23 * max_seq
                     FROM {t} ORDER BY 1, 2"
                ))
                .unwrap();
            out.extend(
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                    .unwrap()
                    .map(Result::unwrap),
            );
        }
        out
    }

    #[test]
    fn a_window_overlapping_a_counted_one_is_flagged_wherever_they_meet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let store = SqliteStore::open(&path).unwrap();
        store.hello(&hello("a", &CARDS)).unwrap();
        let at = |start_min: i64, len_min: i64| {
            let mut w = window_of(&Gen {
                card: 0,
                agent_b: false,
                start_min: 0,
                len_min: 1,
                good_pct: 100,
                assignment: 0,
                grantee: None,
                matches: (true, true),
                energy: None,
                unattributed: None,
                bad: false,
            });
            (w.start_ms, w.end_ms) = (T0 + start_min * MIN, T0 + (start_min + len_min) * MIN);
            w.expected_samples = (len_min * 60) as u32;
            w.good_samples = w.expected_samples;
            (w.occupied_ms, w.foreign_ms, w.active_ms) = (0, 0, 0);
            w.principals.clear();
            w.unavailable_ms = 0;
            w
        };
        // A two-hour window; one inside it; one after it; one across its end and the next's
        // start; one long before (more than a day); one starting where the first ends.
        commit(
            &store,
            "a",
            1,
            vec![
                at(0, 120),
                at(30, 1),
                at(121, 1),
                at(119, 2),
                at(-2000, 1),
                at(120, 1),
            ],
        );
        let c = Connection::open(&path).unwrap();
        let flagged: Vec<i64> = c
            .prepare("SELECT seq FROM window_flags WHERE flag = 'overlap' ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(flagged, vec![2, 4]);
    }

    /// One case of the property below, on `store`.
    fn rollups_agree(
        store: &dyn Store,
        gens: &[Gen],
        split: usize,
        period: (i64, i64, i64),
        edges: (i64, Option<i64>),
        head: (u64, u64),
        keep_days: i64,
    ) -> Result<(), TestCaseError> {
        // host-a holds every card; what agent b reports is disputed.
        store.hello(&hello("a", &CARDS)).unwrap();
        store.hello(&hello("b", &[])).unwrap();
        let (mut a, mut b): (Vec<WindowRow>, Vec<WindowRow>) = (vec![], vec![]);
        for g in gens {
            if g.agent_b {
                b.push(window_of(g))
            } else {
                a.push(window_of(g))
            }
        }
        // Two commits each, so rows are added to as well as created.
        let cut = split.min(a.len());
        let later = a.split_off(cut);
        commit(store, "a", 1, a.clone());
        commit(store, "a", 1 + a.len() as u64, later);
        commit(store, "b", 1, b);
        // What commits kept is what verify derives from the windows.
        prop_assert_eq!(store.ledger().unwrap().rollup_mismatches().unwrap(), vec![]);

        // Grants cut at whole days, at odd minutes, and revoked mid-hour.
        let g1_from = T0 + edges.0 * MIN;
        let grants = vec![
            grant("G1", &CARDS[..2], T0, T0 + 2 * DAY_MS, None),
            grant(
                "G2",
                &CARDS[2..],
                g1_from,
                T0 + 3 * DAY_MS,
                edges.1.map(|r| T0 + r * MIN + 7),
            ),
            grant(
                "G3",
                &CARDS[1..2],
                T0 + 2 * DAY_MS + HOUR_MS,
                T0 + 3 * DAY_MS,
                None,
            ),
        ];
        let from = T0 + period.0 * MIN;
        let span = (from, from + period.1 * MIN, T0 + period.2 * MIN + 13);
        let covered: HashMap<&str, u64> = [("a", head.0), ("b", head.1)].into();
        let raw = report(store, &grants, span, &covered, false);
        let rolled = report(store, &grants, span, &covered, true);
        prop_assert_eq!(&rolled.0, &raw.0);
        prop_assert_eq!(&rolled.1, &raw.1);
        // A period of whole days reads rollups and still agrees.
        let whole = (T0, T0 + 3 * DAY_MS, T0 + 3 * DAY_MS);
        let all: HashMap<&str, u64> = [("a", u64::MAX), ("b", u64::MAX)].into();
        let whole_before = report(store, &grants, whole, &all, true);
        prop_assert_eq!(&whole_before, &report(store, &grants, whole, &all, false));

        // Retention to a horizon anywhere in those days: every report gives the answer it gave
        // before, or says that it needs windows retention dropped; whole days always answer.
        let before_windows = store.windows(T0 - DAY_MS, T0 + 5 * DAY_MS, None).unwrap();
        let horizon = T0 + keep_days * DAY_MS;
        let edges = grants
            .iter()
            .flat_map(|g| {
                g.cards.iter().flat_map(move |c| {
                    let (f, u) = g.card_interval(c);
                    [(c.gpu_uuid.clone(), f), (c.gpu_uuid.clone(), u)]
                })
            })
            .collect();
        let req = crate::retention::RetainRequest {
            horizon_ms: horizon,
            at_ms: T0 + 10 * DAY_MS,
            actor: "test".into(),
            edges,
        };
        let done = store.retain(&req).unwrap();
        let kept = store.retention().unwrap();
        let after_windows = store.windows(T0 - DAY_MS, T0 + 5 * DAY_MS, None).unwrap();
        prop_assert_eq!(
            before_windows.len() - after_windows.len(),
            done.windows_dropped as usize
        );
        let key = |w: &crate::store::MeteredWindow| (w.agent_id.clone(), w.seq);
        let left: std::collections::HashSet<_> = after_windows.iter().map(key).collect();
        for w in &before_windows {
            let may = kept.may_drop(&w.agent_id, w.seq, &w.window.gpu_uuid, w.window.start_ms);
            prop_assert_eq!(!left.contains(&key(w)), may, "{:?}", (&w.agent_id, w.seq));
            if may {
                prop_assert!(w.window.end_ms <= horizon);
            }
        }
        prop_assert_eq!(store.ledger().unwrap().rollup_mismatches().unwrap(), vec![]);
        match try_report(store, &grants, span, &covered, true) {
            Ok(after) => prop_assert_eq!(&after, &rolled),
            Err(StoreError::Retained(_)) => prop_assert!(done.windows_dropped > 0),
            Err(e) => panic!("{e}"),
        }
        prop_assert_eq!(&report(store, &grants, whole, &all, true), &whole_before);
        // Run again: nothing more goes; a horizon before it is refused.
        prop_assert_eq!(store.retain(&req).unwrap().windows_dropped, 0);
        let back = crate::retention::RetainRequest {
            horizon_ms: horizon - DAY_MS,
            ..req
        };
        prop_assert!(matches!(store.retain(&back), Err(StoreError::Conflict(_))));
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Reports read through the rollups equal reports over the windows themselves, for
        /// periods, as-of instants, grant edges and heads that fall anywhere; and the rollups
        /// kept at commit are the ones `verify` derives.
        #[test]
        fn reports_from_rollups_equal_reports_from_windows(
            gens in proptest::collection::vec(arb_gen(), 1..120),
            split in 0usize..120,
            period in (0i64..3 * 1440, 1i64..3 * 1440, 0i64..4 * 1440),
            edges in (0i64..3 * 1440, proptest::option::of(0i64..3 * 1440)),
            head in (0u64..130, 0u64..130),
            keep_days in 0i64..4,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(&dir.path().join("r.db")).unwrap();
            rollups_agree(&store, &gens, split, period, edges, head, keep_days)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]

        /// The same on PostgreSQL (fewer cases: each is a database of its own).
        #[test]
        fn reports_from_rollups_equal_reports_from_windows_on_postgres(
            gens in proptest::collection::vec(arb_gen(), 1..120),
            split in 0usize..120,
            period in (0i64..3 * 1440, 1i64..3 * 1440, 0i64..4 * 1440),
            edges in (0i64..3 * 1440, proptest::option::of(0i64..3 * 1440)),
            head in (0u64..130, 0u64..130),
            keep_days in 0i64..4,
        ) {
            let Some(db) = crate::store::pg_testdb::TestPg::create("rollups") else {
                return Ok(());
            };
            let dir = tempfile::tempdir().unwrap();
            let store =
                crate::store::postgres::PgStore::open(&db.url, Some(&dir.path().join("key")))
                    .unwrap();
            rollups_agree(&store, &gens, split, period, edges, head, keep_days)?;
        }
    }
}
