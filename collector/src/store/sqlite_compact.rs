//! `gpumeter-collector compact`: records stored before migration 11 kept their bodies (and
//! prev_hashes) verbatim in their rows; this moves them into blocks as the writer stores
//! bodies since (`body_block`), without changing a signed byte.
//!
//! Each agent's verbatim records are taken in seq order, [`PER_BLOCK`] at a time, each chunk
//! in its own IMMEDIATE transaction: a running collector's writer waits for one chunk at most
//! (it uses the same busy timeout), and an interrupted run leaves every record either as it
//! was or compacted. A prev_hash is dropped only where the record stored at seq − 1 has that
//! very hash, the rule `RecordReader` restores it by; every other one is kept.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::StoreError;

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

pub use super::body_block::{Compacted, PER_BLOCK};

/// One verbatim record.
struct Verbatim {
    seq: i64,
    prev_hash: Option<Vec<u8>>,
    hash: Vec<u8>,
    body: Vec<u8>,
}

/// Moves every verbatim body of the ledger into blocks.
pub fn compact(c: &mut Connection, per_block: usize) -> Result<Compacted, StoreError> {
    let per_block = per_block.max(1);
    let agents: Vec<String> = {
        let mut st = c
            .prepare("SELECT DISTINCT agent_id FROM records WHERE body IS NOT NULL ORDER BY 1")
            .map_err(db)?;
        st.query_map([], |r| r.get(0))
            .map_err(db)?
            .collect::<Result<_, _>>()
            .map_err(db)?
    };
    let mut done = Compacted::default();
    for agent in &agents {
        done.agents += 1;
        while compact_chunk(c, agent, per_block, &mut done)? {}
    }
    Ok(done)
}

/// Compacts the next chunk of `agent`'s verbatim records; false once none is left.
fn compact_chunk(
    c: &mut Connection,
    agent: &str,
    per_block: usize,
    done: &mut Compacted,
) -> Result<bool, StoreError> {
    let tx = c
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db)?;
    let chunk: Vec<Verbatim> = {
        let mut st = tx
            .prepare_cached(
                "SELECT seq, prev_hash, hash, body FROM records
                 WHERE agent_id = ?1 AND body IS NOT NULL ORDER BY seq LIMIT ?2",
            )
            .map_err(db)?;
        st.query_map(params![agent, per_block as i64], |r| {
            Ok(Verbatim {
                seq: r.get(0)?,
                prev_hash: r.get(1)?,
                hash: r.get(2)?,
                body: r.get(3)?,
            })
        })
        .map_err(db)?
        .collect::<Result<_, _>>()
        .map_err(db)?
    };
    if chunk.is_empty() {
        return Ok(false);
    }
    let block = super::body_block::encode(chunk.iter().map(|v| (v.seq as u64, v.body.as_slice())));
    let id: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(id), 0) + 1 FROM record_blocks",
            [],
            |r| r.get(0),
        )
        .map_err(db)?;
    tx.execute(
        "INSERT INTO record_blocks (id, agent_id, first_seq, last_seq, raw_len, data)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            id,
            agent,
            block.first_seq as i64,
            block.last_seq as i64,
            block.raw_len as i64,
            block.data
        ],
    )
    .map_err(db)?;
    {
        let mut hash_at = tx
            .prepare_cached("SELECT hash FROM records WHERE agent_id = ?1 AND seq = ?2")
            .map_err(db)?;
        let mut update = tx
            .prepare_cached(
                "UPDATE records SET body = NULL, block = ?3, prev_hash = ?4
                 WHERE agent_id = ?1 AND seq = ?2 AND body IS NOT NULL",
            )
            .map_err(db)?;
        let mut before: Option<(i64, Vec<u8>)> = None;
        for v in &chunk {
            let held_before = match &before {
                Some((s, h)) if s + 1 == v.seq => Some(h.clone()),
                _ => hash_at
                    .query_row(params![agent, v.seq - 1], |r| r.get::<_, Vec<u8>>(0))
                    .optional()
                    .map_err(db)?,
            };
            let links = v
                .prev_hash
                .as_ref()
                .is_some_and(|p| held_before.as_ref() == Some(p));
            let n = update
                .execute(params![
                    agent,
                    v.seq,
                    id,
                    if links { None } else { v.prev_hash.as_deref() }
                ])
                .map_err(db)?;
            if n != 1 {
                return Err(StoreError::Db(format!(
                    "compact: record {agent} seq {} changed under the compaction",
                    v.seq
                )));
            }
            done.records += 1;
            done.body_bytes += v.body.len() as u64;
            done.links_dropped += u64::from(links);
            before = Some((v.seq, v.hash.clone()));
        }
    }
    tx.commit().map_err(db)?;
    done.blocks += 1;
    done.block_bytes += block.data.len() as u64;
    Ok(true)
}
