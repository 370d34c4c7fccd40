//! Rollups in PostgreSQL: the same tables, rows and rules as [`super::sqlite_rollup`] (see
//! [`crate::rollup`]). The group commit sums its counted windows per row in Rust and upserts
//! them in one multi-row statement per level; migration 9 and `verify` derive the rows in SQL
//! from the windows, and verify compares them.

use std::collections::BTreeMap;

use postgres::GenericClient;
use postgres::types::ToSql;

use super::{StoreError, WindowRow};
use crate::rollup::{Entry, Level, RollupMismatch, RollupRow, RollupSums, entry};

use super::postgres::db;

/// Migration 9: the rollup tables (filled from the windows already stored by [`backfill`]).
pub const MIGRATION: &str = r#"
CREATE TABLE card_hours (
    start_ms BIGINT NOT NULL,
    gpu_uuid TEXT COLLATE "C" NOT NULL,
    agent_id TEXT COLLATE "C" NOT NULL,
    assignment_status TEXT COLLATE "C" NOT NULL,
    grant_id TEXT COLLATE "C" NOT NULL,
    windows BIGINT NOT NULL,
    raw BOOLEAN NOT NULL,
    good_ms BIGINT NOT NULL,
    unavailable_ms BIGINT NOT NULL,
    unattributed_ms BIGINT NOT NULL,
    energy_mj BIGINT NOT NULL,
    occupied_ms BIGINT NOT NULL,
    grantee_occupied_ms BIGINT NOT NULL,
    active_ms BIGINT NOT NULL,
    foreign_ms BIGINT NOT NULL,
    max_seq BIGINT NOT NULL,
    PRIMARY KEY (start_ms, gpu_uuid, agent_id, assignment_status, grant_id)
);
CREATE TABLE card_days (LIKE card_hours INCLUDING ALL);
"#;

/// The version whose migration is followed by [`backfill`].
pub const ROLLUPS_VERSION: usize = 9;

fn table(level: Level) -> &'static str {
    super::sqlite_rollup::table(level)
}

const COLUMNS: &str = "start_ms, gpu_uuid, agent_id, assignment_status, grant_id, windows, raw, good_ms, unavailable_ms, unattributed_ms, energy_mj, occupied_ms, grantee_occupied_ms, active_ms, foreign_ms, max_seq";

/// What one window contributes at most, as verify derives it (see the SQLite store).
const VALUE_CAP: i64 = 1_000_000_000_000;

fn bucket_sql(level: Level, x: &str) -> String {
    match level {
        Level::Hour => format!("(({x}) - ((({x}) % 3600000) + 3600000) % 3600000)"),
        Level::Day => {
            format!("(({x}) - (((({x}) + 32400000) % 86400000) + 86400000) % 86400000)")
        }
    }
}

/// Every counted window as the rollups read it (the SQLite store's `rollup_src`).
fn source_sql() -> String {
    let by_seq = "p.agent_id = w.agent_id AND p.seq = w.seq";
    let cap = |x: &str| format!("LEAST(GREATEST({x}, 0), {VALUE_CAP})");
    format!(
        "SELECT w.agent_id, w.seq, w.gpu_uuid, w.assignment_status, w.grant_id,
                {good} AS good_ms, {unavailable} AS unavailable_ms,
                {unattributed} AS unattributed_ms, {energy} AS energy_mj,
                {occupied} AS occupied_ms, {foreign} AS foreign_ms,
                {grantee} AS grantee_ms, {active} AS active_ms,
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
            "COALESCE((SELECT SUM(LEAST(GREATEST(p.active_ms, 0), {VALUE_CAP})) FROM window_principals p WHERE {by_seq} AND p.matches_grant), 0)"
        )),
        h0 = bucket_sql(Level::Hour, "w.start_ms"),
        h1 = bucket_sql(Level::Hour, "GREATEST(w.end_ms, w.start_ms + 1) - 1"),
        d0 = bucket_sql(Level::Day, "w.start_ms"),
        d1 = bucket_sql(Level::Day, "GREATEST(w.end_ms, w.start_ms + 1) - 1"),
    )
}

/// The rows of `level` derived from the windows, in [`COLUMNS`] order (sums as BIGINT).
fn derive_sql(level: Level) -> String {
    let (first, last) = match level {
        Level::Hour => ("first_hour", "last_hour"),
        Level::Day => ("first_day", "last_day"),
    };
    let len = level.len_ms();
    format!(
        "WITH RECURSIVE src AS ({src}),
         n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 24)
         SELECT {first}::BIGINT, gpu_uuid, agent_id, assignment_status, grant_id, COUNT(*)::BIGINT, false,
                SUM(good_ms)::BIGINT, SUM(unavailable_ms)::BIGINT, SUM(unattributed_ms)::BIGINT,
                SUM(energy_mj)::BIGINT, SUM(occupied_ms)::BIGINT, SUM(grantee_ms)::BIGINT,
                SUM(active_ms)::BIGINT, SUM(foreign_ms)::BIGINT, MAX(seq)::BIGINT
         FROM src WHERE {first} = {last} AND NOT disputed
         GROUP BY {first}, gpu_uuid, agent_id, assignment_status, grant_id
         UNION ALL
         SELECT ({first} + n.i * {len})::BIGINT, gpu_uuid, agent_id, '', '', COUNT(*)::BIGINT, true,
                0, 0, 0, 0, 0, 0, 0, 0, MAX(seq)::BIGINT
         FROM src JOIN n ON {first} + n.i * {len} <= {last}
         WHERE {first} <> {last} OR disputed
         GROUP BY {first} + n.i * {len}, gpu_uuid, agent_id",
        src = source_sql()
    )
}

/// Fills the rollup tables from the windows stored (migration 9).
pub fn backfill(c: &mut impl GenericClient) -> Result<(), StoreError> {
    for level in [Level::Hour, Level::Day] {
        c.batch_execute(&format!(
            "INSERT INTO {} ({COLUMNS}) {}",
            table(level),
            derive_sql(level)
        ))
        .map_err(db)?;
    }
    Ok(())
}

/// The upsert's columns: key, windows, raw, the eight sums, max seq.
type Cols<'a> = (
    Vec<i64>,
    Vec<&'a str>,
    Vec<&'a str>,
    Vec<&'a str>,
    Vec<i64>,
    Vec<bool>,
    [Vec<i64>; 8],
    Vec<i64>,
);

/// One rollup row's increment.
#[derive(Default)]
struct Add {
    windows: i64,
    raw: bool,
    sums: RollupSums,
    max_seq: i64,
}

/// Adds one batch's counted windows (seq, window, disputed) of `agent_id` to their rows: summed
/// per row first (a multi-row upsert may touch each row once), then one upsert per level.
pub fn add_windows(
    c: &mut impl GenericClient,
    agent_id: &str,
    windows: &[(i64, &WindowRow, bool)],
) -> Result<(), StoreError> {
    if windows.is_empty() {
        return Ok(());
    }
    for level in [Level::Hour, Level::Day] {
        let mut rows: BTreeMap<(i64, &str, &str, &str), Add> = BTreeMap::new();
        for (seq, w, disputed) in windows {
            match entry(level, w, *disputed) {
                Entry::Summed(start) => {
                    let s = RollupSums::of(w);
                    let a = rows
                        .entry((start, &w.gpu_uuid, w.assignment_status, &w.grant_id))
                        .or_default();
                    a.windows += 1;
                    a.max_seq = a.max_seq.max(*seq);
                    let t = &mut a.sums;
                    t.good_ms += s.good_ms;
                    t.unavailable_ms += s.unavailable_ms;
                    t.unattributed_ms += s.unattributed_ms;
                    t.energy_mj += s.energy_mj;
                    t.occupied_ms += s.occupied_ms;
                    t.grantee_occupied_ms += s.grantee_occupied_ms;
                    t.active_ms += s.active_ms;
                    t.foreign_ms += s.foreign_ms;
                }
                Entry::Marks(starts) => {
                    for start in starts {
                        let a = rows.entry((start, &w.gpu_uuid, "", "")).or_default();
                        a.windows += 1;
                        a.raw = true;
                        a.max_seq = a.max_seq.max(*seq);
                    }
                }
            }
        }
        let i = |v: u64| v.min(i64::MAX as u64) as i64;
        let mut cols = Cols::default();
        for ((start, gpu, status, grant), a) in &rows {
            cols.0.push(*start);
            cols.1.push(gpu);
            cols.2.push(status);
            cols.3.push(grant);
            cols.4.push(a.windows);
            cols.5.push(a.raw);
            let s = a.sums;
            for (k, v) in [
                s.good_ms,
                s.unavailable_ms,
                s.unattributed_ms,
                s.energy_mj,
                s.occupied_ms,
                s.grantee_occupied_ms,
                s.active_ms,
                s.foreign_ms,
            ]
            .into_iter()
            .enumerate()
            {
                cols.6[k].push(i(v));
            }
            cols.7.push(a.max_seq);
        }
        let t = table(level);
        let sql = format!(
            "INSERT INTO {t} ({COLUMNS})
             SELECT u.start_ms, u.gpu, $1::text, u.status, u.grant_id, u.windows, u.raw, u.good,
                    u.unavailable, u.unattributed, u.energy, u.occupied, u.grantee, u.active,
                    u.foreign_ms, u.max_seq
             FROM UNNEST($2::bigint[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::bool[],
                         $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[],
                         $13::bigint[], $14::bigint[], $15::bigint[], $16::bigint[])
                  AS u(start_ms, gpu, status, grant_id, windows, raw, good, unavailable,
                       unattributed, energy, occupied, grantee, active, foreign_ms, max_seq)
             ON CONFLICT (start_ms, gpu_uuid, agent_id, assignment_status, grant_id) DO UPDATE SET
               windows = {t}.windows + EXCLUDED.windows,
               good_ms = {t}.good_ms + EXCLUDED.good_ms,
               unavailable_ms = {t}.unavailable_ms + EXCLUDED.unavailable_ms,
               unattributed_ms = {t}.unattributed_ms + EXCLUDED.unattributed_ms,
               energy_mj = {t}.energy_mj + EXCLUDED.energy_mj,
               occupied_ms = {t}.occupied_ms + EXCLUDED.occupied_ms,
               grantee_occupied_ms = {t}.grantee_occupied_ms + EXCLUDED.grantee_occupied_ms,
               active_ms = {t}.active_ms + EXCLUDED.active_ms,
               foreign_ms = {t}.foreign_ms + EXCLUDED.foreign_ms,
               max_seq = GREATEST({t}.max_seq, EXCLUDED.max_seq)"
        );
        let s = &cols.6;
        let params: [&(dyn ToSql + Sync); 16] = [
            &agent_id, &cols.0, &cols.1, &cols.2, &cols.3, &cols.4, &cols.5, &s[0], &s[1], &s[2],
            &s[3], &s[4], &s[5], &s[6], &s[7], &cols.7,
        ];
        c.execute(sql.as_str(), &params).map_err(db)?;
    }
    Ok(())
}

/// Visits the rows of `level` whose bucket overlaps `[from, until)`, one card's bucket at a
/// time, in bucket order.
pub fn visit(
    c: &mut impl GenericClient,
    level: Level,
    from_ms: i64,
    until_ms: i64,
    visit: &mut dyn FnMut(Vec<RollupRow>),
) -> Result<(), StoreError> {
    let agents: std::collections::HashMap<String, (String, String)> = c
        .query("SELECT agent_id, host_id, csp FROM agents", &[])
        .map_err(db)?
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let rows = c
        .query(
            &format!(
                "SELECT {COLUMNS} FROM {} WHERE start_ms > $1::bigint - $3::bigint AND start_ms < $2::bigint
                 ORDER BY start_ms, gpu_uuid",
                table(level)
            ),
            &[&from_ms, &until_ms, &level.len_ms()],
        )
        .map_err(db)?;
    let u = |v: i64| v.max(0) as u64;
    let mut group: Vec<RollupRow> = Vec::new();
    for r in rows {
        let start_ms: i64 = r.get(0);
        let gpu_uuid: String = r.get(1);
        if group
            .first()
            .is_some_and(|g| g.start_ms != start_ms || g.gpu_uuid != gpu_uuid)
        {
            visit(std::mem::take(&mut group));
        }
        let agent_id: String = r.get(2);
        let (host_id, csp) = agents.get(&agent_id).cloned().unwrap_or_default();
        let status: String = r.get(3);
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
            grant_id: r.get(4),
            windows: u(r.get(5)),
            raw: r.get(6),
            sums: RollupSums {
                good_ms: u(r.get(7)),
                unavailable_ms: u(r.get(8)),
                unattributed_ms: u(r.get(9)),
                energy_mj: u(r.get(10)),
                occupied_ms: u(r.get(11)),
                grantee_occupied_ms: u(r.get(12)),
                active_ms: u(r.get(13)),
                foreign_ms: u(r.get(14)),
            },
            max_seq: u(r.get(15)),
        });
    }
    if !group.is_empty() {
        visit(group);
    }
    Ok(())
}

/// Re-derives both tables from the windows and lists every row that differs, by key (read-only:
/// no temporary table, so it runs in verify's read-only snapshot).
pub fn mismatches(c: &mut impl GenericClient) -> Result<Vec<RollupMismatch>, StoreError> {
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
        for r in c.query(sql.as_str(), &[]).map_err(db)? {
            let problem: String = r.get(3);
            out.push(RollupMismatch {
                table: t,
                start_ms: r.get(0),
                gpu_uuid: r.get(1),
                agent_id: r.get(2),
                problem: match problem.as_str() {
                    "differs" => "differs",
                    "missing" => "missing",
                    _ => "not derived",
                },
            });
        }
    }
    Ok(out)
}
