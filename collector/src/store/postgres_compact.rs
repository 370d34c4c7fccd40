//! `gpumeter-collector compact` on a PostgreSQL ledger: the same rules as `sqlite_compact`.
//! Records stored before version 11 keep their bodies and prev_hashes verbatim; this moves
//! each agent's into blocks, [`PER_BLOCK`] records a transaction, their rows locked
//! (`FOR UPDATE`) so serving collectors' writers wait for one chunk at most. A prev_hash is
//! dropped only where the record stored at seq − 1 has that very hash, the rule
//! `RecordReader` restores it by.

use super::StoreError;
use super::body_block::{Compacted, PER_BLOCK};
use super::postgres::PgStore;

fn db(e: postgres::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

impl PgStore {
    /// Moves every verbatim body of the ledger into blocks, `per_block` records at a time
    /// (`PER_BLOCK` when 0).
    pub fn compact_verbatim(&self, per_block: usize) -> Result<Compacted, StoreError> {
        let per_block = if per_block == 0 { PER_BLOCK } else { per_block } as i64;
        self.writer.with(|c| {
            let agents: Vec<String> = c
                .query(
                    "SELECT DISTINCT agent_id FROM records WHERE body IS NOT NULL ORDER BY 1",
                    &[],
                )
                .map_err(db)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut done = Compacted::default();
            for agent in &agents {
                done.agents += 1;
                while chunk(c, agent, per_block, &mut done)? {}
            }
            Ok(done)
        })
    }
}

impl PgStore {
    /// Lets the space freed in `records` be reused (`VACUUM`, outside any transaction).
    pub fn vacuum(&self) -> Result<(), StoreError> {
        self.writer
            .with(|c| c.batch_execute("VACUUM records").map_err(db))
    }
}

/// Compacts the next chunk of `agent`'s verbatim records; false once none is left.
fn chunk(
    c: &mut postgres::Client,
    agent: &str,
    per_block: i64,
    done: &mut Compacted,
) -> Result<bool, StoreError> {
    let mut tx = c.transaction().map_err(db)?;
    let rows = tx
        .query(
            "SELECT seq, prev_hash, hash, body FROM records
             WHERE agent_id = $1 AND body IS NOT NULL ORDER BY seq LIMIT $2 FOR UPDATE",
            &[&agent, &per_block],
        )
        .map_err(db)?;
    if rows.is_empty() {
        return Ok(false);
    }
    // (seq, prev_hash, hash, body)
    type Verbatim = (i64, Option<Vec<u8>>, Vec<u8>, Vec<u8>);
    let chunk: Vec<Verbatim> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let block = super::body_block::encode(
        chunk
            .iter()
            .map(|(seq, _, _, body)| (*seq as u64, body.as_slice())),
    );
    let id: i64 = tx
        .query_one(
            "INSERT INTO record_blocks (agent_id, first_seq, last_seq, raw_len, data)
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
            &[
                &agent,
                &(block.first_seq as i64),
                &(block.last_seq as i64),
                &(block.raw_len as i64),
                &block.data,
            ],
        )
        .map_err(db)?
        .get(0);
    let hash_at = tx
        .prepare("SELECT hash FROM records WHERE agent_id = $1 AND seq = $2")
        .map_err(db)?;
    let update = tx
        .prepare(
            "UPDATE records SET body = NULL, block = $3, prev_hash = $4
             WHERE agent_id = $1 AND seq = $2 AND body IS NOT NULL",
        )
        .map_err(db)?;
    let mut before: Option<(i64, Vec<u8>)> = None;
    for (seq, prev_hash, hash, body) in &chunk {
        let held_before: Option<Vec<u8>> = match &before {
            Some((s, h)) if s + 1 == *seq => Some(h.clone()),
            _ => tx
                .query_opt(&hash_at, &[&agent, &(seq - 1)])
                .map_err(db)?
                .map(|r| r.get(0)),
        };
        let links = prev_hash
            .as_ref()
            .is_some_and(|p| held_before.as_ref() == Some(p));
        let kept: Option<&[u8]> = if links { None } else { prev_hash.as_deref() };
        let n = tx
            .execute(&update, &[&agent, seq, &id, &kept])
            .map_err(db)?;
        if n != 1 {
            return Err(StoreError::Db(format!(
                "compact: record {agent} seq {seq} changed under the compaction"
            )));
        }
        done.records += 1;
        done.body_bytes += body.len() as u64;
        done.links_dropped += u64::from(links);
        before = Some((*seq, hash.clone()));
    }
    tx.commit().map_err(db)?;
    done.blocks += 1;
    done.block_bytes += block.data.len() as u64;
    Ok(true)
}
