//! Retention on SQLite (see [`crate::retention`]): migration 13's tables, `retain`, and what
//! readers and `verify` read of it.
//!
//! [`Ops`] is `crate::retention::run`'s SQL here: the pins, the cuts and the run recorded in
//! one IMMEDIATE transaction, then each seq range's rows deleted in an IMMEDIATE transaction
//! of its own, so a serving collector's writer waits one range at most. Rows below a
//! recorded cut are optional to every reader, so an interrupted run is consistent; the next
//! run deletes what it left.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use std::collections::BTreeSet;

use super::StoreError;
use crate::retention::{Cut, RetainRequest, Retention};
use crate::rollup::{Level, RollupRow};

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

/// Migration 13: retention's cuts, pins and runs; the per-agent rollup indexes `verify`
/// reads a retained agent's rows by; and the index hello's card lookup lacked. Written to
/// run again over its own tables (the migration tests rewind `user_version`).
pub const MIGRATION: &str = r#"
CREATE TABLE IF NOT EXISTS retention_cuts (
    agent_id TEXT PRIMARY KEY,
    cut_seq INTEGER NOT NULL,
    horizon_ms INTEGER NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS retention_pins (
    gpu_uuid TEXT NOT NULL,
    hour_ms INTEGER NOT NULL,
    PRIMARY KEY (gpu_uuid, hour_ms)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS retention_runs (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    horizon_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    head_id INTEGER NOT NULL,
    agents INTEGER NOT NULL,
    pins INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS card_hours_by_agent ON card_hours(agent_id, start_ms);
CREATE INDEX IF NOT EXISTS card_days_by_agent ON card_days(agent_id, start_ms);
CREATE INDEX IF NOT EXISTS grant_cards_by_gpu ON grant_cards(gpu_uuid);
"#;

/// The first schema version with retention's tables.
pub const VERSION: i64 = 13;

/// A window row's hour is pinned (alias `w`, a `window_rows` row): see
/// `Retention::pinned`.
fn pinned() -> String {
    format!(
        "({} OR EXISTS (SELECT 1 FROM retention_pins p
            WHERE p.gpu_uuid = (SELECT name FROM names WHERE no = w.card_no)
              AND p.hour_ms = w.start_ms - ((w.start_ms % 3600000) + 3600000) % 3600000))",
        crate::retention::last_hour_sql("w.start_ms")
    )
}

/// What retention has dropped; empty on a ledger from before migration 13.
pub fn load(c: &Connection, version: i64) -> Result<Retention, StoreError> {
    let mut out = Retention::default();
    if version < VERSION {
        return Ok(out);
    }
    let mut st = c
        .prepare_cached("SELECT agent_id, cut_seq, horizon_ms FROM retention_cuts")
        .map_err(db)?;
    let rows = st
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Cut {
                    seq: r.get::<_, i64>(1)? as u64,
                    horizon_ms: r.get(2)?,
                },
            ))
        })
        .map_err(db)?;
    for r in rows {
        let (a, cut) = r.map_err(db)?;
        out.cuts.insert(a, cut);
    }
    if out.cuts.is_empty() {
        return Ok(out);
    }
    let mut st = c
        .prepare_cached("SELECT gpu_uuid, hour_ms FROM retention_pins")
        .map_err(db)?;
    let rows = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(db)?;
    for r in rows {
        let (gpu, hour) = r.map_err(db)?;
        out.pin(gpu, hour);
    }
    Ok(out)
}

/// Seqs of an agent's disputed windows.
pub fn disputed(
    c: &Connection,
    agent_id: &str,
) -> Result<std::collections::HashSet<u64>, StoreError> {
    let mut st = c
        .prepare_cached("SELECT seq FROM disputed_windows WHERE agent_id = ?1")
        .map_err(db)?;
    st.query_map(params![agent_id], |r| Ok(r.get::<_, i64>(0)? as u64))
        .map_err(db)?
        .collect::<Result<_, _>>()
        .map_err(db)
}

/// An agent's rollup rows of both levels starting before `until_ms`.
pub fn rollups_before(
    c: &Connection,
    agent_id: &str,
    until_ms: i64,
) -> Result<Vec<RollupRow>, StoreError> {
    use super::rollup_sql::{COLUMNS, table};
    let mut out = Vec::new();
    for level in [Level::Hour, Level::Day] {
        let mut st = c
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM {} WHERE agent_id = ?1 AND start_ms < ?2",
                table(level)
            ))
            .map_err(db)?;
        let mut rows = st.query(params![agent_id, until_ms]).map_err(db)?;
        while let Some(r) = rows.next().map_err(db)? {
            out.push(super::sqlite_rollup::stored_row(r, level, &Default::default()).map_err(db)?);
        }
    }
    Ok(out)
}

/// Retention's SQL on a SQLite ledger (the writer's connection).
pub struct Ops<'c>(pub &'c mut Connection);

impl crate::retention::RetainOps for Ops<'_> {
    fn previous_horizon(&mut self) -> Result<Option<i64>, StoreError> {
        self.0
            .query_row("SELECT MAX(horizon_ms) FROM retention_runs", [], |r| {
                r.get(0)
            })
            .map_err(db)
    }

    fn first_after(
        &mut self,
        agent_id: &str,
        horizon_ms: i64,
    ) -> Result<(u64, Option<u64>), StoreError> {
        let c = &*self.0;
        let before: i64 = c
            .query_row(
                "SELECT cut_seq FROM retention_cuts WHERE agent_id = ?1",
                params![agent_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?
            .unwrap_or(0);
        // Walks the agent's rows from its cut on, in seq order: those it passes are the
        // ones the new cut drops.
        let window: Option<i64> = c
            .query_row(
                "SELECT MIN(seq) FROM window_rows
                 WHERE agent_no = (SELECT no FROM names WHERE name = ?1) AND seq > ?2 AND end_ms > ?3",
                params![agent_id, before, horizon_ms],
                |r| r.get(0),
            )
            .map_err(db)?;
        let event: Option<i64> = c
            .query_row(
                "SELECT MIN(seq) FROM events WHERE agent_id = ?1 AND seq > ?2 AND at_ms >= ?3",
                params![agent_id, before, horizon_ms],
                |r| r.get(0),
            )
            .map_err(db)?;
        Ok((
            before as u64,
            window.into_iter().chain(event).min().map(|s| s as u64),
        ))
    }

    fn checkpoints(
        &mut self,
        agent_id: &str,
        above: u64,
        upto: u64,
    ) -> Result<Vec<u64>, StoreError> {
        let mut st = self
            .0
            .prepare_cached(
                "SELECT seq FROM checkpoints WHERE agent_id = ?1 AND seq > ?2 AND seq <= ?3 ORDER BY seq",
            )
            .map_err(db)?;
        st.query_map(params![agent_id, above as i64, upto as i64], |r| {
            Ok(r.get::<_, i64>(0)? as u64)
        })
        .map_err(db)?
        .collect::<Result<_, _>>()
        .map_err(db)
    }

    fn marked_hours(
        &mut self,
        from_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let mut st = self
            .0
            .prepare(
                "SELECT gpu_uuid, start_ms FROM card_hours WHERE start_ms >= ?1 AND start_ms < ?2 AND raw <> 0",
            )
            .map_err(db)?;
        st.query_map(params![from_ms, until_ms], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(db)?
            .collect::<Result<_, _>>()
            .map_err(db)
    }

    fn flagged_windows(&mut self, until_ms: i64) -> Result<Vec<(String, i64, i64)>, StoreError> {
        let mut st = self
            .0
            .prepare(
                "SELECT w.gpu_uuid, w.start_ms, w.end_ms FROM window_flags f
                 JOIN windows w ON w.agent_id = f.agent_id AND w.seq = f.seq
                 WHERE w.start_ms < ?1",
            )
            .map_err(db)?;
        st.query_map(params![until_ms], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(db)?
            .collect::<Result<_, _>>()
            .map_err(db)
    }

    fn record(
        &mut self,
        req: &RetainRequest,
        head_id: u64,
        pins: &BTreeSet<(String, i64)>,
        cuts: &[crate::retention::MovedCut],
    ) -> Result<u64, StoreError> {
        let tx = self
            .0
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let mut added = 0u64;
        {
            let mut st = tx
                .prepare("INSERT OR IGNORE INTO retention_pins (gpu_uuid, hour_ms) VALUES (?1, ?2)")
                .map_err(db)?;
            for (gpu, hour) in pins {
                added += st.execute(params![gpu, hour]).map_err(db)? as u64;
            }
            let mut st = tx
                .prepare(
                    "INSERT INTO retention_cuts (agent_id, cut_seq, horizon_ms, at_ms) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (agent_id) DO UPDATE SET cut_seq = excluded.cut_seq,
                         horizon_ms = excluded.horizon_ms, at_ms = excluded.at_ms",
                )
                .map_err(db)?;
            for c in cuts {
                st.execute(params![c.agent_id, c.cut as i64, req.horizon_ms, req.at_ms])
                    .map_err(db)?;
            }
        }
        tx.execute(
            "INSERT INTO retention_runs (at_ms, horizon_ms, actor, head_id, agents, pins)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                req.at_ms,
                req.horizon_ms,
                req.actor,
                head_id as i64,
                cuts.len() as i64,
                added as i64
            ],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(added)
    }

    fn cuts(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut st = self
            .0
            .prepare("SELECT agent_id, cut_seq FROM retention_cuts ORDER BY agent_id")
            .map_err(db)?;
        st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
            .map_err(db)?
            .collect::<Result<_, _>>()
            .map_err(db)
    }

    fn drop_range(&mut self, agent_id: &str, lo: u64, hi: u64) -> Result<u64, StoreError> {
        let tx = self
            .0
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let agent_no: Option<i64> = tx
            .query_row(
                "SELECT no FROM names WHERE name = ?1",
                params![agent_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        let Some(agent_no) = agent_no else {
            return Ok(0);
        };
        let range = params![agent_no, lo as i64, hi as i64];
        tx.execute(
            &format!(
                "DELETE FROM window_principal_rows WHERE agent_no = ?1 AND seq IN (
                     SELECT seq FROM window_rows w
                     WHERE w.agent_no = ?1 AND w.seq > ?2 AND w.seq <= ?3 AND NOT {})",
                pinned()
            ),
            range,
        )
        .map_err(db)?;
        let dropped = tx
            .execute(
                &format!(
                    "DELETE FROM window_rows AS w
                     WHERE w.agent_no = ?1 AND w.seq > ?2 AND w.seq <= ?3 AND NOT {}",
                    pinned()
                ),
                range,
            )
            .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(dropped as u64)
    }
}
