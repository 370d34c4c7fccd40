//! Read-only access to a SQLite ledger for verification: the live collector's database, or a
//! copy handed to an auditor (opened read-only, never migrated or written).

use std::path::Path;

use rusqlite::{Connection, OpenFlags, params};

use super::body_block::{RecordReader, StoredRecord};
use super::sqlite::{EVENT_KINDS, HEALTHS, STATUSES, known};
use super::{EventRow, PrincipalRow, StoreError, WindowRow};
use crate::verify::{
    CardWindowRef, ChainRow, ChainSource, Derived, FlaggedWindow, KeyEntry, ScanItem,
    StoredCheckpoint,
};

/// A read-only connection to a ledger file.
#[derive(Debug)]
pub struct SqliteLedger {
    conn: Connection,
}

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

impl SqliteLedger {
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Open {
                path: path.display().to_string(),
                reason: "no such file".into(),
            });
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        // Fail early, naming the file, when it is not a gpumeter ledger.
        conn.query_row("SELECT COUNT(*) FROM records", [], |r| r.get::<_, i64>(0))
            .map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                reason: format!("not a gpumeter ledger: {e}"),
            })?;
        Ok(Self { conn })
    }
}

impl ChainSource for SqliteLedger {
    fn agents(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT agent_id, public_key FROM agents ORDER BY agent_id")
            .map_err(db)?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(db)?
            .collect::<Result<_, _>>()
            .map_err(db)
    }

    fn scan_records(
        &self,
        agent_id: &str,
        visit: &mut dyn FnMut(ChainRow),
    ) -> Result<(), StoreError> {
        let mut st = self
            .conn
            .prepare(records_sql(self.has_blocks()?))
            .map_err(db)?;
        let mut rows = st.query(params![agent_id]).map_err(db)?;
        let mut read = RecordReader::default();
        while let Some(r) = rows.next().map_err(db)? {
            visit(record_row(&mut read, &self.conn, agent_id, r)?);
        }
        Ok(())
    }

    fn scan(&self, agent_id: &str, visit: &mut dyn FnMut(ScanItem)) -> Result<(), StoreError> {
        self.scan_merged(agent_id, visit)
    }

    fn key_history(&self, agent_id: &str) -> Result<Vec<KeyEntry>, StoreError> {
        if !self.has_integrity_tables()? {
            return Ok(Vec::new());
        }
        key_history_of(&self.conn, agent_id)
    }

    fn card_memory(&self) -> Result<std::collections::HashMap<String, u64>, StoreError> {
        if !self.has_integrity_tables()? {
            return Ok(Default::default());
        }
        let mut st = self
            .conn
            .prepare("SELECT gpu_uuid, memory_total_bytes FROM card_identity WHERE memory_total_bytes IS NOT NULL")
            .map_err(db)?;
        st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
            .map_err(db)?
            .collect::<Result<_, _>>()
            .map_err(db)
    }

    fn derived_agents(&self) -> Result<Vec<String>, StoreError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT agent_id FROM windows UNION SELECT agent_id FROM window_principals
                 UNION SELECT agent_id FROM events ORDER BY 1",
            )
            .map_err(db)?;
        st.query_map([], |r| r.get(0))
            .map_err(db)?
            .collect::<Result<_, _>>()
            .map_err(db)
    }

    fn card_windows(&self, visit: &mut dyn FnMut(CardWindowRef)) -> Result<(), StoreError> {
        // From version 12 the rows are read by card number, in the order of their index;
        // the check needs each card's windows together and in time order, not cards in the
        // order of their UUIDs.
        let sql = if self.schema_version()? >= NAMES_SCHEMA {
            "SELECT c.name, w.start_ms, w.end_ms, a.name, w.seq, o.other_agent_id, o.other_seq
             FROM window_rows w
             JOIN names c ON c.no = w.card_no JOIN names a ON a.no = w.agent_no
             LEFT JOIN window_flags o ON o.agent_id = a.name AND o.seq = w.seq AND o.flag = 'overlap'
             WHERE NOT EXISTS (SELECT 1 FROM window_flags i
                               WHERE i.agent_id = a.name AND i.seq = w.seq AND i.flag = 'impossible')
             ORDER BY w.card_no, w.start_ms"
        } else if self.has_integrity_tables()? {
            "SELECT w.gpu_uuid, w.start_ms, w.end_ms, w.agent_id, w.seq, o.other_agent_id, o.other_seq
             FROM windows w
             LEFT JOIN window_flags o ON o.agent_id = w.agent_id AND o.seq = w.seq AND o.flag = 'overlap'
             WHERE NOT EXISTS (SELECT 1 FROM window_flags i
                               WHERE i.agent_id = w.agent_id AND i.seq = w.seq AND i.flag = 'impossible')
             ORDER BY w.gpu_uuid, w.start_ms"
        } else {
            "SELECT gpu_uuid, start_ms, end_ms, agent_id, seq, NULL, NULL FROM windows
             ORDER BY gpu_uuid, start_ms"
        };
        let mut st = self.conn.prepare(sql).map_err(db)?;
        let mut rows = st.query([]).map_err(db)?;
        while let Some(r) = rows.next().map_err(db)? {
            let other: Option<String> = r.get(5).map_err(db)?;
            let other_seq: Option<i64> = r.get(6).map_err(db)?;
            visit(CardWindowRef {
                gpu_uuid: r.get(0).map_err(db)?,
                start_ms: r.get(1).map_err(db)?,
                end_ms: r.get(2).map_err(db)?,
                agent_id: r.get(3).map_err(db)?,
                seq: r.get::<_, i64>(4).map_err(db)? as u64,
                overlap_of: other.map(|a| (a, other_seq.unwrap_or(0) as u64)),
            });
        }
        Ok(())
    }

    fn record_hash_at(&self, agent_id: &str, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        use rusqlite::OptionalExtension;
        self.conn
            .query_row(
                "SELECT hash FROM records WHERE agent_id = ?1 AND seq = ?2",
                params![agent_id, seq as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)
    }

    fn rollup_mismatches(&self) -> Result<Vec<crate::rollup::RollupMismatch>, StoreError> {
        // A ledger from before migration 9 keeps no rollups, so reports read its windows.
        let has: bool = self
            .conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'card_days')",
                [],
                |r| r.get(0),
            )
            .map_err(db)?;
        if !has {
            return Ok(Vec::new());
        }
        super::sqlite_rollup::mismatches(
            &self.conn,
            self.schema_version()? >= super::sqlite_retention::VERSION,
        )
    }

    fn retention(&self) -> Result<crate::retention::Retention, StoreError> {
        super::sqlite_retention::load(&self.conn, self.schema_version()?)
    }

    fn disputed(&self, agent_id: &str) -> Result<std::collections::HashSet<u64>, StoreError> {
        if !self.has_integrity_tables()? {
            return Ok(Default::default());
        }
        super::sqlite_retention::disputed(&self.conn, agent_id)
    }

    fn rollups_before(
        &self,
        agent_id: &str,
        until_ms: i64,
    ) -> Result<Vec<crate::rollup::RollupRow>, StoreError> {
        super::sqlite_retention::rollups_before(&self.conn, agent_id, until_ms)
    }

    fn flagged(&self, agent_id: &str) -> Result<Vec<FlaggedWindow>, StoreError> {
        if !self.has_integrity_tables()? {
            return Ok(Vec::new());
        }
        let mut st = self
            .conn
            .prepare(
                "SELECT seq, flag, detail FROM window_flags WHERE agent_id = ?1 ORDER BY seq, flag",
            )
            .map_err(db)?;
        st.query_map(params![agent_id], |r| {
            Ok(FlaggedWindow {
                seq: r.get::<_, i64>(0)? as u64,
                flag: r.get(1)?,
                detail: r.get(2)?,
            })
        })
        .map_err(db)?
        .collect::<Result<_, _>>()
        .map_err(db)
    }

    fn checkpoints(&self, agent_id: &str) -> Result<Vec<StoredCheckpoint>, StoreError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT epoch, seq, chain_hash, signature FROM checkpoints WHERE agent_id = ?1 ORDER BY seq",
            )
            .map_err(db)?;
        st.query_map(params![agent_id], |r| {
            Ok(StoredCheckpoint {
                epoch: r.get::<_, i64>(0)? as u64,
                seq: r.get::<_, i64>(1)? as u64,
                chain_hash: r.get(2)?,
                signature: r.get(3)?,
            })
        })
        .map_err(db)?
        .collect::<Result<_, _>>()
        .map_err(db)
    }
}

/// The schema version that added key history, flags and card identity.
const INTEGRITY_SCHEMA: i64 = 5;

/// The schema version from which records may keep their bodies in blocks (migration 11).
const BLOCKS_SCHEMA: i64 = 11;
/// The first version whose windows are rows keyed by interned names (`sqlite_names`).
const NAMES_SCHEMA: i64 = 12;

/// An agent's records in seq order, as [`RecordReader::row`] reads them.
fn records_sql(blocks: bool) -> &'static str {
    if blocks {
        "SELECT seq, prev_hash, hash, body, block FROM records WHERE agent_id = ?1 ORDER BY seq"
    } else {
        "SELECT seq, prev_hash, hash, body, NULL FROM records WHERE agent_id = ?1 ORDER BY seq"
    }
}

/// One row of [`records_sql`], read back as signed (`body_block::RecordReader`).
fn record_row(
    read: &mut RecordReader,
    conn: &Connection,
    agent_id: &str,
    r: &rusqlite::Row<'_>,
) -> Result<ChainRow, StoreError> {
    let row = StoredRecord {
        seq: r.get::<_, i64>(0).map_err(db)? as u64,
        prev_hash: r.get(1).map_err(db)?,
        hash: r.get(2).map_err(db)?,
        body: r.get(3).map_err(db)?,
        block: r.get(4).map_err(db)?,
    };
    read.row(row, |id| load_block(conn, agent_id, id))
}

/// The body of one record as signed, wherever the ledger keeps it (its row, or its block);
/// `None` when there is no such record. For tools and tests that hold a connection.
pub fn record_body(
    conn: &Connection,
    agent_id: &str,
    seq: u64,
) -> Result<Option<Vec<u8>>, StoreError> {
    use rusqlite::OptionalExtension;
    let blocks = conn
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map_err(db)?
        >= BLOCKS_SCHEMA;
    let sql = if blocks {
        "SELECT body, block FROM records WHERE agent_id = ?1 AND seq = ?2"
    } else {
        "SELECT body, NULL FROM records WHERE agent_id = ?1 AND seq = ?2"
    };
    let Some((body, block)) = conn
        .query_row(sql, params![agent_id, seq as i64], |r| {
            Ok((r.get::<_, Option<Vec<u8>>>(0)?, r.get::<_, Option<i64>>(1)?))
        })
        .optional()
        .map_err(db)?
    else {
        return Ok(None);
    };
    super::body_block::BlockCache::default()
        .body_of(agent_id, seq, body, block, |id| {
            load_block(conn, agent_id, id)
        })
        .map(Some)
}

/// Block `id` of `agent_id`: its uncompressed length and data.
pub(crate) fn load_block(
    conn: &Connection,
    agent_id: &str,
    id: i64,
) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
    use rusqlite::OptionalExtension;
    conn.prepare_cached("SELECT raw_len, data FROM record_blocks WHERE id = ?1 AND agent_id = ?2")
        .map_err(db)?
        .query_row(params![id, agent_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(db)
}

impl SqliteLedger {
    fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(db)
    }

    fn has_integrity_tables(&self) -> Result<bool, StoreError> {
        Ok(self.schema_version()? >= INTEGRITY_SCHEMA)
    }

    fn has_blocks(&self) -> Result<bool, StoreError> {
        Ok(self.schema_version()? >= BLOCKS_SCHEMA)
    }

    /// Runs `visit` over an agent's records and derived rows, merged by seq.
    fn scan_merged(
        &self,
        agent_id: &str,
        visit: &mut dyn FnMut(ScanItem),
    ) -> Result<(), StoreError> {
        let integrity = self.has_integrity_tables()?;
        let prep = |sql: &str| self.conn.prepare(sql).map_err(db);
        let mut rec_st = prep(records_sql(self.has_blocks()?))?;
        let mut win_st = prep(
            "SELECT seq, gpu_uuid, start_ms, end_ms, interval_ms, expected_samples, good_samples,
                    util_avg_pct, util_max_pct, mem_util_avg_pct, memory_used_max_bytes, energy_mj,
                    energy_estimated, power_avg_w, temperature_max_c, throttle_reasons, health,
                    unavailable_ms, assignment_status, grant_id, principal, active_ms, occupied_ms,
                    foreign_ms, grantee_occupied_ms, unattributed_ms, energy_estimated_mj
             FROM windows WHERE agent_id = ?1 ORDER BY seq",
        )?;
        let mut pr_st = prep(
            "SELECT seq, principal, uid, occupied_ms, active_ms, memory_max_bytes, process_count,
                    matches_grant
             FROM window_principals WHERE agent_id = ?1 ORDER BY seq, principal",
        )?;
        let mut ev_st = prep(
            "SELECT seq, gpu_uuid, at_ms, kind, code, detail, pid, principal, grant_id, mode,
                    action, result
             FROM events WHERE agent_id = ?1 ORDER BY seq",
        )?;
        let mut fl_st = prep(if integrity {
            "SELECT seq, flag FROM window_flags WHERE agent_id = ?1 AND flag <> 'overlap'
             ORDER BY seq, flag"
        } else {
            "SELECT 0, '' WHERE 0 AND ?1 IS NOT NULL"
        })?;
        let mut rec = rec_st.query(params![agent_id]).map_err(db)?;
        let mut win = win_st.query(params![agent_id]).map_err(db)?;
        let mut pr = pr_st.query(params![agent_id]).map_err(db)?;
        let mut ev = ev_st.query(params![agent_id]).map_err(db)?;
        let mut fl = fl_st.query(params![agent_id]).map_err(db)?;

        let u = |v: i64| v as u64;
        let mut read = RecordReader::default();
        let conn = &self.conn;
        let mut next_rec = |rows: &mut rusqlite::Rows<'_>| -> Result<Option<ChainRow>, StoreError> {
            let Some(r) = rows.next().map_err(db)? else {
                return Ok(None);
            };
            record_row(&mut read, conn, agent_id, r).map(Some)
        };
        let next_win =
            |rows: &mut rusqlite::Rows<'_>| -> Result<Option<(u64, WindowRow)>, StoreError> {
                let Some(r) = rows.next().map_err(db)? else {
                    return Ok(None);
                };
                let w = (|| -> rusqlite::Result<(u64, WindowRow)> {
                    Ok((
                        u(r.get(0)?),
                        WindowRow {
                            gpu_uuid: r.get(1)?,
                            start_ms: r.get(2)?,
                            end_ms: r.get(3)?,
                            interval_ms: u(r.get(4)?),
                            expected_samples: r.get(5)?,
                            good_samples: r.get(6)?,
                            util_avg_pct: r.get(7)?,
                            util_max_pct: r.get(8)?,
                            mem_util_avg_pct: r.get(9)?,
                            memory_used_max_bytes: r.get::<_, Option<i64>>(10)?.map(u),
                            energy_mj: r.get::<_, Option<i64>>(11)?.map(u),
                            energy_estimated: r.get(12)?,
                            power_avg_w: r.get(13)?,
                            temperature_max_c: r.get(14)?,
                            throttle_reasons: r.get::<_, Option<i64>>(15)?.map(u),
                            health: known(&r.get::<_, String>(16)?, HEALTHS),
                            unavailable_ms: u(r.get(17)?),
                            assignment_status: known(&r.get::<_, String>(18)?, STATUSES),
                            grant_id: r.get(19)?,
                            principal: r.get(20)?,
                            active_ms: u(r.get(21)?),
                            occupied_ms: u(r.get(22)?),
                            foreign_ms: u(r.get(23)?),
                            grantee_occupied_ms: r.get::<_, Option<i64>>(24)?.map(u),
                            unattributed_ms: r.get::<_, Option<i64>>(25)?.map(u),
                            energy_estimated_mj: r.get::<_, Option<i64>>(26)?.map(u),
                            principals: vec![],
                        },
                    ))
                })();
                w.map(Some).map_err(db)
            };
        let next_pr =
            |rows: &mut rusqlite::Rows<'_>| -> Result<Option<(u64, PrincipalRow)>, StoreError> {
                let Some(r) = rows.next().map_err(db)? else {
                    return Ok(None);
                };
                let p = (|| -> rusqlite::Result<(u64, PrincipalRow)> {
                    Ok((
                        u(r.get(0)?),
                        PrincipalRow {
                            principal: r.get(1)?,
                            uid: r.get(2)?,
                            occupied_ms: u(r.get(3)?),
                            active_ms: u(r.get(4)?),
                            memory_max_bytes: u(r.get(5)?),
                            process_count: r.get(6)?,
                            matches_grant: r.get(7)?,
                        },
                    ))
                })();
                p.map(Some).map_err(db)
            };
        let next_ev =
            |rows: &mut rusqlite::Rows<'_>| -> Result<Option<(u64, EventRow)>, StoreError> {
                let Some(r) = rows.next().map_err(db)? else {
                    return Ok(None);
                };
                let e = (|| -> rusqlite::Result<(u64, EventRow)> {
                    Ok((
                        u(r.get(0)?),
                        EventRow {
                            gpu_uuid: r.get(1)?,
                            at_ms: r.get(2)?,
                            kind: known(&r.get::<_, String>(3)?, EVENT_KINDS),
                            code: r.get(4)?,
                            detail: r.get(5)?,
                            pid: r.get(6)?,
                            principal: r.get(7)?,
                            grant_id: r.get(8)?,
                            mode: r.get(9)?,
                            action: r.get(10)?,
                            result: r.get(11)?,
                        },
                    ))
                })();
                e.map(Some).map_err(db)
            };
        let next_fl = |rows: &mut rusqlite::Rows<'_>| -> Result<Option<(u64, String)>, StoreError> {
            let Some(r) = rows.next().map_err(db)? else {
                return Ok(None);
            };
            Ok(Some((u(r.get(0).map_err(db)?), r.get(1).map_err(db)?)))
        };

        let mut r_next = next_rec(&mut rec)?;
        let mut w_next = next_win(&mut win)?;
        let mut p_next = next_pr(&mut pr)?;
        let mut e_next = next_ev(&mut ev)?;
        let mut f_next = next_fl(&mut fl)?;
        loop {
            let Some(seq) = [
                r_next.as_ref().map(|r| r.seq),
                w_next.as_ref().map(|w| w.0),
                p_next.as_ref().map(|p| p.0),
                e_next.as_ref().map(|e| e.0),
                f_next.as_ref().map(|f| f.0),
            ]
            .into_iter()
            .flatten()
            .min() else {
                return Ok(());
            };
            if r_next.as_ref().is_some_and(|r| r.seq == seq) {
                if let Some(r) = r_next.take() {
                    visit(ScanItem::Record(r));
                }
                r_next = next_rec(&mut rec)?;
            }
            if w_next.as_ref().is_some_and(|w| w.0 == seq) {
                if let Some((_, w)) = w_next.take() {
                    visit(ScanItem::Derived {
                        seq,
                        row: Derived::Window(w),
                    });
                }
                w_next = next_win(&mut win)?;
            }
            let mut group = Vec::new();
            while p_next.as_ref().is_some_and(|p| p.0 == seq) {
                if let Some((_, p)) = p_next.take() {
                    group.push(p);
                }
                p_next = next_pr(&mut pr)?;
            }
            if !group.is_empty() {
                visit(ScanItem::Derived {
                    seq,
                    row: Derived::Principals(group),
                });
            }
            if e_next.as_ref().is_some_and(|e| e.0 == seq) {
                if let Some((_, e)) = e_next.take() {
                    visit(ScanItem::Derived {
                        seq,
                        row: Derived::Event(e),
                    });
                }
                e_next = next_ev(&mut ev)?;
            }
            let mut flags = Vec::new();
            while f_next.as_ref().is_some_and(|f| f.0 == seq) {
                if let Some((_, f)) = f_next.take() {
                    flags.push(f);
                }
                f_next = next_fl(&mut fl)?;
            }
            if !flags.is_empty() {
                visit(ScanItem::Derived {
                    seq,
                    row: Derived::Flags(flags),
                });
            }
        }
    }
}

/// The integrity side of a ledger file: key history, card identity, flags and heads.
impl SqliteLedger {
    /// Signed heads held in the file, oldest first, from `since_ms` on.
    pub fn heads(&self, since_ms: i64) -> Result<Vec<crate::heads::SignedHead>, StoreError> {
        if !self.has_integrity_tables()? {
            return Ok(Vec::new());
        }
        crate::heads::load_heads(&self.conn, since_ms)
    }

    /// The ledger's current head leaves (what a head signed now would cover).
    pub fn leaves(&self) -> Result<Vec<crate::heads::Leaf>, StoreError> {
        crate::heads::current_leaves(&self.conn)
    }
}

fn key_history_of(c: &Connection, agent_id: &str) -> Result<Vec<KeyEntry>, StoreError> {
    let mut st = c
        .prepare_cached(
            "SELECT public_key, from_seq, at_ms, actor, reason FROM agent_keys WHERE agent_id = ?1 ORDER BY idx",
        )
        .map_err(db)?;
    st.query_map(params![agent_id], |r| {
        Ok(KeyEntry {
            public_key: r.get(0)?,
            from_seq: r.get::<_, i64>(1)? as u64,
            at_ms: r.get(2)?,
            actor: r.get(3)?,
            reason: r.get(4)?,
        })
    })
    .map_err(db)?
    .collect::<Result<_, _>>()
    .map_err(db)
}

/// Key history of an agent on any connection to a ledger of the current schema.
pub(crate) fn key_history(c: &Connection, agent_id: &str) -> Result<Vec<KeyEntry>, StoreError> {
    key_history_of(c, agent_id)
}
