//! Rollups in PostgreSQL: the same tables, rows and rules as [`super::sqlite_rollup`] (see
//! [`crate::rollup`]). The group commit sums its counted windows per row in Rust and upserts
//! them in one multi-row statement per level; migration 9 and `verify` derive the rows with
//! the SQL both backends share ([`super::rollup_sql`]), and verify compares them.

use postgres::GenericClient;
use postgres::types::ToSql;

use super::rollup_sql::{COLUMNS, Dialect, Source, derive, mismatch_sql, problem, table};
use super::{StoreError, WindowRow};
use crate::rollup::{Buckets, Level, RollupMismatch, RollupRow};

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

/// Fills the rollup tables from the windows stored (migration 9).
pub fn backfill(c: &mut impl GenericClient) -> Result<(), StoreError> {
    for level in [Level::Hour, Level::Day] {
        c.batch_execute(&format!(
            "INSERT INTO {} ({COLUMNS}) {}",
            table(level),
            derive(Dialect::Postgres, level, Source::Inline)
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
        let rows = crate::rollup::batch_rows(level, windows);
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
    let mut buckets = Buckets::default();
    let none = (String::new(), String::new());
    for r in rows {
        let at = agents.get(r.get::<_, &str>(2)).unwrap_or(&none);
        buckets.push(stored_row(&r, level, at), visit);
    }
    buckets.finish(visit);
    Ok(())
}

/// A rollup row read in [`COLUMNS`] order, with its agent's host and CSP.
pub fn stored_row(r: &postgres::Row, level: Level, at: &(String, String)) -> RollupRow {
    let mut n = [0i64; 10];
    for (k, v) in n.iter_mut().enumerate() {
        *v = r.get(if k == 0 { 5 } else { k + 6 });
    }
    RollupRow::stored(
        level,
        r.get(0),
        r.get(1),
        r.get(2),
        at.clone(),
        r.get::<_, &str>(3),
        r.get(4),
        r.get(6),
        n,
    )
}

/// Re-derives both tables from the windows and lists every row that differs, by key (read-only:
/// no temporary table, so it runs in verify's read-only snapshot).
pub fn mismatches(c: &mut impl GenericClient) -> Result<Vec<RollupMismatch>, StoreError> {
    let mut out = Vec::new();
    for level in [Level::Hour, Level::Day] {
        let sql = mismatch_sql(Dialect::Postgres, level, Source::Inline, true);
        for r in c.query(sql.as_str(), &[]).map_err(db)? {
            out.push(RollupMismatch {
                table: table(level),
                start_ms: r.get(0),
                gpu_uuid: r.get(1),
                agent_id: r.get(2),
                problem: problem(r.get(3)),
            });
        }
    }
    Ok(out)
}
