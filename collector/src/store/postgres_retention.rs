//! Retention on PostgreSQL (see [`crate::retention`]): the same tables as SQLite's migration
//! 13 (`postgres_schema`), `crate::retention::run`'s SQL over the writer's connection, and
//! what readers and `verify` read of it. Each seq range's rows are deleted in a transaction of
//! its own, so serving collectors' writers never wait long behind it.

use std::collections::{BTreeSet, HashSet};

use postgres::GenericClient;

use super::StoreError;
use super::postgres::{PgConn, db};
use super::rollup_sql::{COLUMNS, table};
use crate::retention::{Cut, RetainRequest, Retention};
use crate::rollup::{Level, RollupRow};

/// A window row's hour is pinned (alias `w`): see `Retention::pinned`.
fn pinned() -> String {
    format!(
        "({} OR EXISTS (SELECT 1 FROM retention_pins p
            WHERE p.gpu_uuid = w.gpu_uuid
              AND p.hour_ms = w.start_ms - ((w.start_ms % 3600000) + 3600000) % 3600000))",
        crate::retention::last_hour_sql("w.start_ms")
    )
}

/// What retention has dropped.
pub fn load(c: &mut impl GenericClient) -> Result<Retention, StoreError> {
    let mut out = Retention::default();
    for r in c
        .query(
            "SELECT agent_id, cut_seq, horizon_ms FROM retention_cuts",
            &[],
        )
        .map_err(db)?
    {
        let cut = Cut {
            seq: r.get::<_, i64>(1) as u64,
            horizon_ms: r.get(2),
        };
        out.cuts.insert(r.get(0), cut);
    }
    if out.cuts.is_empty() {
        return Ok(out);
    }
    for r in c
        .query("SELECT gpu_uuid, hour_ms FROM retention_pins", &[])
        .map_err(db)?
    {
        out.pin(r.get(0), r.get(1));
    }
    Ok(out)
}

/// Seqs of an agent's disputed windows.
pub fn disputed(c: &mut impl GenericClient, agent_id: &str) -> Result<HashSet<u64>, StoreError> {
    Ok(c.query(
        "SELECT seq FROM disputed_windows WHERE agent_id = $1",
        &[&agent_id],
    )
    .map_err(db)?
    .iter()
    .map(|r| r.get::<_, i64>(0) as u64)
    .collect())
}

/// An agent's rollup rows of both levels starting before `until_ms`.
pub fn rollups_before(
    c: &mut impl GenericClient,
    agent_id: &str,
    until_ms: i64,
) -> Result<Vec<RollupRow>, StoreError> {
    let mut out = Vec::new();
    for level in [Level::Hour, Level::Day] {
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE agent_id = $1 AND start_ms < $2",
            table(level)
        );
        for r in c.query(sql.as_str(), &[&agent_id, &until_ms]).map_err(db)? {
            out.push(super::postgres_rollup::stored_row(
                &r,
                level,
                &Default::default(),
            ));
        }
    }
    Ok(out)
}

/// Retention's SQL on a PostgreSQL ledger (the writer's connection).
pub(crate) struct Ops<'c>(pub(crate) &'c PgConn);

impl crate::retention::RetainOps for Ops<'_> {
    fn previous_horizon(&mut self) -> Result<Option<i64>, StoreError> {
        self.0.with(|c| {
            Ok(
                c.query_one("SELECT MAX(horizon_ms) FROM retention_runs", &[])
                    .map_err(db)?
                    .get(0),
            )
        })
    }

    fn first_after(
        &mut self,
        agent_id: &str,
        horizon_ms: i64,
    ) -> Result<(u64, Option<u64>), StoreError> {
        self.0.with(|c| {
            let before: i64 = c
                .query_opt(
                    "SELECT cut_seq FROM retention_cuts WHERE agent_id = $1",
                    &[&agent_id],
                )
                .map_err(db)?
                .map_or(0, |r| r.get(0));
            let window: Option<i64> = c
                .query_one(
                    "SELECT MIN(seq) FROM windows WHERE agent_id = $1 AND seq > $2 AND end_ms > $3",
                    &[&agent_id, &before, &horizon_ms],
                )
                .map_err(db)?
                .get(0);
            let event: Option<i64> = c
                .query_one(
                    "SELECT MIN(seq) FROM events WHERE agent_id = $1 AND seq > $2 AND at_ms >= $3",
                    &[&agent_id, &before, &horizon_ms],
                )
                .map_err(db)?
                .get(0);
            Ok((
                before as u64,
                window.into_iter().chain(event).min().map(|s| s as u64),
            ))
        })
    }

    fn checkpoints(
        &mut self,
        agent_id: &str,
        above: u64,
        upto: u64,
    ) -> Result<Vec<u64>, StoreError> {
        self.0.with(|c| {
            Ok(c.query(
                "SELECT seq FROM checkpoints WHERE agent_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq",
                &[&agent_id, &(above as i64), &(upto as i64)],
            )
            .map_err(db)?
            .iter()
            .map(|r| r.get::<_, i64>(0) as u64)
            .collect())
        })
    }

    fn marked_hours(
        &mut self,
        from_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        self.0.with(|c| {
            Ok(c.query(
                "SELECT gpu_uuid, start_ms FROM card_hours WHERE start_ms >= $1 AND start_ms < $2 AND raw",
                &[&from_ms, &until_ms],
            )
            .map_err(db)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
        })
    }

    fn flagged_windows(&mut self, until_ms: i64) -> Result<Vec<(String, i64, i64)>, StoreError> {
        self.0.with(|c| {
            Ok(c.query(
                "SELECT w.gpu_uuid, w.start_ms, w.end_ms FROM window_flags f
                 JOIN windows w ON w.agent_id = f.agent_id AND w.seq = f.seq
                 WHERE w.start_ms < $1",
                &[&until_ms],
            )
            .map_err(db)?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
        })
    }

    fn record(
        &mut self,
        req: &RetainRequest,
        head_id: u64,
        pins: &BTreeSet<(String, i64)>,
        cuts: &[crate::retention::MovedCut],
    ) -> Result<u64, StoreError> {
        self.0.with(|c| {
            let mut tx = c.transaction().map_err(db)?;
            let (gpus, hours): (Vec<&str>, Vec<i64>) =
                pins.iter().map(|(g, h)| (g.as_str(), *h)).unzip();
            let added = tx
                .execute(
                    "INSERT INTO retention_pins (gpu_uuid, hour_ms)
                     SELECT * FROM UNNEST($1::text[], $2::bigint[]) ON CONFLICT DO NOTHING",
                    &[&gpus, &hours],
                )
                .map_err(db)?;
            for c in cuts {
                tx.execute(
                    "INSERT INTO retention_cuts (agent_id, cut_seq, horizon_ms, at_ms) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (agent_id) DO UPDATE SET cut_seq = excluded.cut_seq,
                         horizon_ms = excluded.horizon_ms, at_ms = excluded.at_ms",
                    &[&c.agent_id, &(c.cut as i64), &req.horizon_ms, &req.at_ms],
                )
                .map_err(db)?;
            }
            tx.execute(
                "INSERT INTO retention_runs (at_ms, horizon_ms, actor, head_id, agents, pins)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &req.at_ms,
                    &req.horizon_ms,
                    &req.actor,
                    &(head_id as i64),
                    &(cuts.len() as i64),
                    &(added as i64),
                ],
            )
            .map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(added)
        })
    }

    fn cuts(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        self.0.with(|c| {
            Ok(c.query(
                "SELECT agent_id, cut_seq FROM retention_cuts ORDER BY agent_id",
                &[],
            )
            .map_err(db)?
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect())
        })
    }

    fn drop_range(&mut self, agent_id: &str, lo: u64, hi: u64) -> Result<u64, StoreError> {
        let (lo, hi) = (lo as i64, hi as i64);
        self.0.with(|c| {
            let mut tx = c.transaction().map_err(db)?;
            tx.execute(
                &format!(
                    "DELETE FROM window_principals WHERE agent_id = $1 AND seq IN (
                         SELECT seq FROM windows w
                         WHERE w.agent_id = $1 AND w.seq > $2 AND w.seq <= $3 AND NOT {})",
                    pinned()
                ),
                &[&agent_id, &lo, &hi],
            )
            .map_err(db)?;
            let dropped = tx
                .execute(
                    &format!(
                        "DELETE FROM windows w
                         WHERE w.agent_id = $1 AND w.seq > $2 AND w.seq <= $3 AND NOT {}",
                        pinned()
                    ),
                    &[&agent_id, &lo, &hi],
                )
                .map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(dropped)
        })
    }
}
