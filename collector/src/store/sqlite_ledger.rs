//! Read-only access to a SQLite ledger for verification: the live collector's database, or a
//! copy handed to an auditor (opened read-only, never migrated or written).

use std::path::Path;

use rusqlite::{Connection, OpenFlags, params};

use super::StoreError;
use crate::verify::{ChainRow, ChainSource, StoredCheckpoint};

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
            .prepare(
                "SELECT seq, prev_hash, hash, body FROM records WHERE agent_id = ?1 ORDER BY seq",
            )
            .map_err(db)?;
        let mut rows = st.query(params![agent_id]).map_err(db)?;
        while let Some(r) = rows.next().map_err(db)? {
            visit(ChainRow {
                seq: r.get::<_, i64>(0).map_err(db)? as u64,
                prev_hash: r.get(1).map_err(db)?,
                hash: r.get(2).map_err(db)?,
                body: r.get(3).map_err(db)?,
            });
        }
        Ok(())
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
