//! Rollups in SQLite (see [`crate::rollup`]): the tables `card_hours` and `card_days`, their
//! upkeep as each window commits, the rows reports read, and their re-derivation from the
//! `windows` table for `verify`.
//!
//! The commit path adds each window to its rows in Rust ([`add_window`]); migration 9 and
//! `verify` derive the same rows in SQL from the windows ([`derive_sql`]). The two must agree
//! to the row: verify compares them, and the store tests check every kind of window.

use rusqlite::{Connection, params};

use super::{StoreError, WindowRow};
use crate::rollup::{Entry, Level, RollupMismatch as Mismatch, RollupRow, RollupSums, entry};

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

/// The most one window contributes to a rollup sum as `verify` re-derives it (1e12).
const VALUE_CAP: i64 = 1_000_000_000_000;

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

pub fn table(level: Level) -> &'static str {
    match level {
        Level::Hour => "card_hours",
        Level::Day => "card_days",
    }
}

const COLUMNS: &str = "start_ms, gpu_uuid, agent_id, assignment_status, grant_id, windows, raw, good_ms, unavailable_ms, unattributed_ms, energy_mj, occupied_ms, grantee_occupied_ms, active_ms, foreign_ms, max_seq";

/// SQL for the start of the bucket holding `x` (see [`Level::bucket`]).
fn bucket_sql(level: Level, x: &str) -> String {
    match level {
        Level::Hour => format!("(({x}) - ((({x}) % 3600000) + 3600000) % 3600000)"),
        Level::Day => {
            format!("(({x}) - (((({x}) + 32400000) % 86400000) + 86400000) % 86400000)")
        }
    }
}

/// A temporary table `rollup_src` of every window that counts, as the rollups read it: its
/// summed values, whether it is disputed, and its first and last hour and day.
///
/// Each value is clamped to [0, [`VALUE_CAP`]]: a window that counts holds far less (sanity
/// bounds every time by a day and energy by 2,000 W over it), so the clamp changes nothing
/// the commit path sums, and a tampered ledger (an impossible window's flag deleted) cannot
/// overflow a sum: its row comes out different and is reported.
fn source_sql() -> String {
    let by_seq = "p.agent_id = w.agent_id AND p.seq = w.seq";
    let cap = |x: &str| format!("MIN(MAX({x}, 0), {VALUE_CAP})");
    format!(
        "CREATE TEMP TABLE rollup_src AS
         SELECT w.agent_id, w.seq, w.gpu_uuid, w.assignment_status, w.grant_id,
                {good} AS good_ms, {unavailable} AS unavailable_ms,
                {unattributed} AS unattributed_ms, {energy} AS energy_mj,
                {occupied} AS occupied_ms, {foreign} AS foreign_ms,
                {grantee} AS grantee_ms,
                {active} AS active_ms,
                EXISTS (SELECT 1 FROM disputed_windows d WHERE d.agent_id = w.agent_id AND d.seq = w.seq) AS disputed,
                {h0} AS first_hour, {h1} AS last_hour, {d0} AS first_day, {d1} AS last_day
         FROM windows w
         WHERE NOT EXISTS (SELECT 1 FROM window_flags f WHERE f.agent_id = w.agent_id AND f.seq = w.seq)",
        good = cap("w.good_samples * w.interval_ms"),
        unavailable = cap("w.unavailable_ms"),
        unattributed = cap("COALESCE(w.unattributed_ms, 0)"),
        energy = cap("COALESCE(w.energy_mj, 0)"),
        occupied = cap("w.occupied_ms"),
        foreign = cap("w.foreign_ms"),
        grantee = cap(&format!(
            "COALESCE(w.grantee_occupied_ms,
               CASE WHEN EXISTS (SELECT 1 FROM window_principals p WHERE {by_seq})
                     AND NOT EXISTS (SELECT 1 FROM window_principals p WHERE {by_seq} AND NOT p.matches_grant)
                    THEN w.occupied_ms
                    ELSE COALESCE((SELECT MAX(p.occupied_ms) FROM window_principals p WHERE {by_seq} AND p.matches_grant), 0)
               END)"
        )),
        active = cap(&format!(
            "COALESCE((SELECT SUM(MIN(MAX(p.active_ms, 0), {VALUE_CAP})) FROM window_principals p WHERE {by_seq} AND p.matches_grant), 0)"
        )),
        h0 = bucket_sql(Level::Hour, "w.start_ms"),
        h1 = bucket_sql(Level::Hour, "MAX(w.end_ms, w.start_ms + 1) - 1"),
        d0 = bucket_sql(Level::Day, "w.start_ms"),
        d1 = bucket_sql(Level::Day, "MAX(w.end_ms, w.start_ms + 1) - 1"),
    )
}

/// The rows of `level` as derived from `rollup_src`, in [`COLUMNS`] order.
pub fn derive_sql(level: Level) -> String {
    let (first, last) = match level {
        Level::Hour => ("first_hour", "last_hour"),
        Level::Day => ("first_day", "last_day"),
    };
    let len = level.len_ms();
    format!(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 24)
         SELECT {first}, gpu_uuid, agent_id, assignment_status, grant_id, COUNT(*), 0,
                SUM(good_ms), SUM(unavailable_ms), SUM(unattributed_ms), SUM(energy_mj),
                SUM(occupied_ms), SUM(grantee_ms), SUM(active_ms), SUM(foreign_ms), MAX(seq)
         FROM rollup_src WHERE {first} = {last} AND NOT disputed
         GROUP BY {first}, gpu_uuid, agent_id, assignment_status, grant_id
         UNION ALL
         SELECT {first} + n.i * {len}, gpu_uuid, agent_id, '', '', COUNT(*), 1,
                0, 0, 0, 0, 0, 0, 0, 0, MAX(seq)
         FROM rollup_src JOIN n ON {first} + n.i * {len} <= {last}
         WHERE {first} <> {last} OR disputed
         GROUP BY {first} + n.i * {len}, gpu_uuid, agent_id"
    )
}

/// Fills the rollup tables from the windows stored (migration 9).
pub fn backfill(c: &Connection) -> Result<(), StoreError> {
    c.execute_batch(&source_sql()).map_err(db)?;
    for level in [Level::Hour, Level::Day] {
        c.execute_batch(&format!(
            "INSERT INTO {} ({COLUMNS}) {}",
            table(level),
            derive_sql(level)
        ))
        .map_err(db)?;
    }
    c.execute_batch("DROP TABLE rollup_src").map_err(db)
}

/// Adds a window that counts (no flag) to its rows; `disputed`: reported for a card another
/// host held.
pub fn add_window(
    c: &Connection,
    agent_id: &str,
    seq: u64,
    w: &WindowRow,
    disputed: bool,
) -> Result<(), StoreError> {
    let sums = RollupSums::of(w);
    for level in [Level::Hour, Level::Day] {
        let mut st = c
            .prepare_cached(&format!(
                "INSERT INTO {} ({COLUMNS}) VALUES (?1,?2,?3,?4,?5,1,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15)
                 ON CONFLICT (start_ms, gpu_uuid, agent_id, assignment_status, grant_id) DO UPDATE SET
                   windows = windows + 1,
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
        match entry(level, w, disputed) {
            Entry::Summed(start) => {
                st.execute(params![
                    start,
                    w.gpu_uuid,
                    agent_id,
                    w.assignment_status,
                    w.grant_id,
                    false,
                    i(sums.good_ms),
                    i(sums.unavailable_ms),
                    i(sums.unattributed_ms),
                    i(sums.energy_mj),
                    i(sums.occupied_ms),
                    i(sums.grantee_occupied_ms),
                    i(sums.active_ms),
                    i(sums.foreign_ms),
                    seq as i64
                ])
                .map_err(db)?;
            }
            Entry::Marks(starts) => {
                for start in starts {
                    st.execute(params![
                        start, w.gpu_uuid, agent_id, "", "", true, 0, 0, 0, 0, 0, 0, 0, 0,
                        seq as i64
                    ])
                    .map_err(db)?;
                }
            }
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
    let u = |v: i64| v.max(0) as u64;
    let mut group: Vec<RollupRow> = Vec::new();
    while let Some(r) = rows.next().map_err(db)? {
        let start_ms: i64 = r.get(0).map_err(db)?;
        let gpu_uuid: String = r.get(1).map_err(db)?;
        if group
            .first()
            .is_some_and(|g| g.start_ms != start_ms || g.gpu_uuid != gpu_uuid)
        {
            visit(std::mem::take(&mut group));
        }
        let agent_id: String = r.get(2).map_err(db)?;
        let (host_id, csp) = agents.get(&agent_id).cloned().unwrap_or_default();
        let status: String = r.get(3).map_err(db)?;
        group.push(RollupRow {
            level,
            start_ms,
            gpu_uuid,
            agent_id,
            host_id,
            csp,
            assignment_status: if status.is_empty() {
                ""
            } else {
                super::sqlite::known(&status, super::sqlite::STATUSES)
            },
            grant_id: r.get(4).map_err(db)?,
            windows: u(r.get(5).map_err(db)?),
            raw: r.get(6).map_err(db)?,
            sums: RollupSums {
                good_ms: u(r.get(7).map_err(db)?),
                unavailable_ms: u(r.get(8).map_err(db)?),
                unattributed_ms: u(r.get(9).map_err(db)?),
                energy_mj: u(r.get(10).map_err(db)?),
                occupied_ms: u(r.get(11).map_err(db)?),
                grantee_occupied_ms: u(r.get(12).map_err(db)?),
                active_ms: u(r.get(13).map_err(db)?),
                foreign_ms: u(r.get(14).map_err(db)?),
            },
            max_seq: u(r.get(15).map_err(db)?),
        });
    }
    if !group.is_empty() {
        visit(group);
    }
    Ok(())
}

/// Re-derives both rollup tables from the windows (as migration 9 fills them) and lists every
/// row that differs, by key. Runs on a connection that may write temporary tables.
pub fn mismatches(c: &Connection) -> Result<Vec<Mismatch>, StoreError> {
    c.execute_batch("DROP TABLE IF EXISTS temp.rollup_src")
        .map_err(db)?;
    c.execute_batch(&source_sql()).map_err(db)?;
    let mut out = Vec::new();
    for level in [Level::Hour, Level::Day] {
        let t = table(level);
        let same = "l.start_ms = e.start_ms AND l.gpu_uuid = e.gpu_uuid AND l.agent_id = e.agent_id
                    AND l.assignment_status = e.assignment_status AND l.grant_id = e.grant_id";
        let sql = format!(
            "WITH derived ({COLUMNS}) AS ({derive}),
             extra AS (SELECT {COLUMNS} FROM {t} EXCEPT SELECT {COLUMNS} FROM derived),
             lacking AS (SELECT {COLUMNS} FROM derived EXCEPT SELECT {COLUMNS} FROM {t})
             SELECT e.start_ms, e.gpu_uuid, e.agent_id,
                    CASE WHEN EXISTS (SELECT 1 FROM lacking l WHERE {same})
                         THEN 'differs' ELSE 'not derived' END
             FROM extra e
             UNION ALL
             SELECT l.start_ms, l.gpu_uuid, l.agent_id, 'missing' FROM lacking l
             WHERE NOT EXISTS (SELECT 1 FROM extra e WHERE {same})
             ORDER BY 1, 2, 3",
            derive = derive_sql(level),
        );
        let mut st = c.prepare(&sql).map_err(db)?;
        let rows = st
            .query_map([], |r| {
                let problem: String = r.get(3)?;
                Ok(Mismatch {
                    table: t,
                    start_ms: r.get(0)?,
                    gpu_uuid: r.get(1)?,
                    agent_id: r.get(2)?,
                    problem: match problem.as_str() {
                        "differs" => "differs",
                        "missing" => "missing",
                        _ => "not derived",
                    },
                })
            })
            .map_err(db)?;
        for r in rows {
            out.push(r.map_err(db)?);
        }
    }
    c.execute_batch("DROP TABLE temp.rollup_src").map_err(db)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::grants::{Grant, GrantCard, Program};
    use crate::reconcile::{IdleSettings, Inputs, reconcile_as_of};
    use crate::rollup::{Cuts, DAY_MS, HOUR_MS, metered};
    use crate::store::sqlite::SqliteStore;
    use crate::store::{
        AgentHello, CheckpointRow, GpuRow, IngestBatch, IngestRecord, MeteredWindow, PrincipalRow,
        RecordContent, Store,
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
        (from, until, as_of): (i64, i64, i64),
        covered: &HashMap<&str, u64>,
        rollups: bool,
    ) -> (
        crate::reconcile::Reconciliation,
        Vec<crate::render::CardDay>,
    ) {
        let in_head = |a: &str, s: u64| covered.get(a).is_some_and(|&c| s <= c);
        let idle = IdleSettings {
            threshold_pct: 10.0,
            days: 1,
            as_of_ms: until.min(as_of),
        };
        let look = idle.window();
        let (sf, su) = (from.min(look.from_ms), until.max(look.until_ms));
        let windows: Vec<MeteredWindow> = if rollups {
            let cuts = Cuts::of_grants(
                vec![
                    from,
                    until,
                    until.min(as_of.max(from)),
                    look.from_ms,
                    look.until_ms,
                ],
                grants,
            );
            metered(store, sf, su, &cuts, &in_head).unwrap()
        } else {
            let mut ws = store.windows(sf, su, None).unwrap();
            ws.retain(|w| in_head(&w.agent_id, w.seq));
            ws
        };
        let r = reconcile_as_of(
            &Inputs {
                period: "p",
                from_ms: from,
                until_ms: until,
                program: None,
                grant_id: None,
                grants,
                windows: &windows,
                events: &[],
                invoices: &[],
                idle,
            },
            as_of,
        );
        let days = crate::render::card_days(&r, &windows);
        (r, days)
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
            // Back to a version-8 ledger: the same windows, no rollups.
            c.execute_batch(
                "DROP TABLE card_hours; DROP TABLE card_days; PRAGMA user_version = 8;",
            )
            .unwrap();
        }
        assert!(kept.len() > 20, "{}", kept.len());
        let _store = SqliteStore::open(&path).unwrap();
        let c = Connection::open(&path).unwrap();
        assert_eq!(all_rows(&c), kept, "the backfill gives what commits kept");
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
        prop_assert_eq!(
            report(store, &grants, whole, &all, true),
            report(store, &grants, whole, &all, false)
        );
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
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(&dir.path().join("r.db")).unwrap();
            rollups_agree(&store, &gens, split, period, edges, head)?;
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
        ) {
            let Some(db) = crate::store::pg_testdb::TestPg::create("rollups") else {
                return Ok(());
            };
            let dir = tempfile::tempdir().unwrap();
            let store =
                crate::store::postgres::PgStore::open(&db.url, Some(&dir.path().join("key")))
                    .unwrap();
            rollups_agree(&store, &gens, split, period, edges, head)?;
        }
    }
}
