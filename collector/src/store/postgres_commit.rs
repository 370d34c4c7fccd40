//! The PostgreSQL group commit: the semantics of `SqliteStore`'s commit, a batch at a time
//! in multi-row statements (`INSERT … SELECT FROM UNNEST(arrays)`), so a batch costs about a
//! dozen round trips whatever its size.
//!
//! Rules (the same as SQLite's, checked by the store suite on both):
//! - Records are inserted `ON CONFLICT (agent_id, seq) DO NOTHING`; a seq not inserted is held
//!   already: with the same hash it is a duplicate, with another an `equivocation` alarm, and
//!   the first copy is kept. Only records newly inserted get derived rows.
//! - A window is flagged `impossible` ([`crate::sanity::window_problems`]) or, failing that,
//!   `overlap` when a counted window (no flag) of its card already covers some of its time;
//!   windows of the batch are judged in seq order, each against what was committed before it
//!   and the batch's own earlier windows that count, exactly as SQLite judges each window
//!   just after inserting it.
//! - A checkpoint is stored only when it vouches for the chain held (no equivocation in its
//!   batch, or its hash is the held record's).
//! - Alarms keep SQLite's order: per record (equivocation, window flag, agent gap, epoch
//!   start), then the batch's own, then `card_not_owned`.
//! - With `isolate`, each batch runs under a savepoint and fails alone (a `batch_failed`
//!   alarm), and a later batch of the same agent in the same commit fails with it.
//! - Several collectors: a commit takes a transaction-scoped advisory lock per card its
//!   batches have windows for before judging any, so concurrent commits of one card's windows
//!   are judged one after the other, each seeing what the other committed (the one writer of
//!   SQLite). It takes them all at once, first thing in the transaction and in key order:
//!   locked batch by batch, two group commits holding the cards of their first batches would
//!   wait on each other for those of their later ones, a deadlock PostgreSQL breaks by failing
//!   one commit's batch (the store test `two_collectors_group_committing_…` shows it). The
//!   locks cover the cards of every window sent, duplicates included: more than the rules
//!   need, never fewer.

use std::collections::{HashMap, HashSet};

use postgres::types::ToSql;
use postgres::{Statement, Transaction};

use super::postgres::{PgStore, db, hash_from, insert_alarm, opt_u32, opt_u64};
use super::{Alarm, CommitOutcome, IngestBatch, RecordContent, StoreError, WindowRow};
use crate::sanity::{self, DAY_MS, FLAG_IMPOSSIBLE, FLAG_OVERLAP};

/// The commit path's statements, prepared once per connection (each saves a round trip per
/// use).
pub(crate) struct Statements {
    rec_insert: Statement,
    rec_held: Statement,
    block_insert: Statement,
    block_delete: Statement,
    prev_restore: Statement,
    card_memory: Statement,
    card_holders: Statement,
    agent_host: Statement,
    counted_spans: Statement,
    win_insert: Statement,
    principal_insert: Statement,
    event_insert: Statement,
    disputed_insert: Statement,
    flag_insert: Statement,
    cp_held: Statement,
    cp_insert: Statement,
    alarms_insert: Statement,
    durable: Statement,
    card_locks: Statement,
}

impl Statements {
    pub(crate) fn prepare(c: &mut postgres::Client) -> Result<Self, StoreError> {
        Ok(Self {
            // Bodies lie in the batch's block (`body_block`); a prev_hash is NULL where it
            // is the hash of the record before it in the batch (restored below where that
            // record turned out to be held with other bytes).
            rec_insert: c.prepare("INSERT INTO records (agent_id, seq, prev_hash, hash, body, block, kind, created_ms, received_ms)
                 SELECT $1::text, u.seq, u.prev, u.hash, NULL, $3::bigint, u.kind, u.created, $2::bigint
                 FROM UNNEST($4::bigint[], $5::bytea[], $6::bytea[], $7::text[], $8::bigint[])
                      AS u(seq, prev, hash, kind, created)
                 ON CONFLICT (agent_id, seq) DO NOTHING
                 RETURNING seq").map_err(db)?,
            block_insert: c.prepare("INSERT INTO record_blocks (agent_id, first_seq, last_seq, raw_len, data)
                 VALUES ($1, $2, $3, $4, $5) RETURNING id").map_err(db)?,
            block_delete: c.prepare("DELETE FROM record_blocks WHERE id = $1").map_err(db)?,
            prev_restore: c.prepare("UPDATE records SET prev_hash = $3 WHERE agent_id = $1 AND seq = $2").map_err(db)?,
            rec_held: c.prepare("SELECT seq, hash FROM records WHERE agent_id = $1 AND seq = ANY($2)").map_err(db)?,
            card_memory: c.prepare("SELECT gpu_uuid, memory_total_bytes FROM card_identity WHERE gpu_uuid = ANY($1)").map_err(db)?,
            card_holders: c.prepare("SELECT gpu_uuid, host_id FROM gpus WHERE gpu_uuid = ANY($1)").map_err(db)?,
            agent_host: c.prepare("SELECT host_id FROM agents WHERE agent_id = $1").map_err(db)?,
            // Per card, bounded on (card, start) as row comparisons: the statement is planned
            // once generic, often while `windows` is still empty, and with `gpu_uuid = ANY($1)`
            // and a plain start range that plan walked `windows_by_start` over every card's
            // windows of the day (29k index entries a batch in the ingest benchmark, most of
            // the commit's time). Row bounds only `windows_by_card` can serve.
            counted_spans: c.prepare("SELECT w.gpu_uuid, w.agent_id, w.seq, w.start_ms, w.end_ms
                     FROM UNNEST($1::text[]) AS c(gpu_uuid)
                     CROSS JOIN LATERAL (SELECT gpu_uuid, agent_id, seq, start_ms, end_ms FROM windows w
                       WHERE (w.gpu_uuid, w.start_ms) > (c.gpu_uuid, $2::BIGINT - 86400000)
                         AND (w.gpu_uuid, w.start_ms) < (c.gpu_uuid, $3::BIGINT)
                         AND w.end_ms > $2::BIGINT
                         AND NOT EXISTS (SELECT 1 FROM window_flags f WHERE f.agent_id = w.agent_id AND f.seq = w.seq)) w
                     ORDER BY w.gpu_uuid, w.start_ms, w.end_ms, w.agent_id, w.seq").map_err(db)?,
            win_insert: c.prepare("INSERT INTO windows (agent_id, seq, gpu_uuid, start_ms, end_ms, interval_ms, expected_samples, good_samples,
                   util_avg_pct, util_max_pct, mem_util_avg_pct, memory_used_max_bytes, energy_mj, energy_estimated, power_avg_w,
                   temperature_max_c, throttle_reasons, health, unavailable_ms, assignment_status, grant_id, principal,
                   active_ms, occupied_ms, foreign_ms, grantee_occupied_ms, unattributed_ms, energy_estimated_mj)
                 SELECT $1::text, u.* FROM UNNEST($2::bigint[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
                   $7::bigint[], $8::bigint[], $9::float8[], $10::float8[], $11::float8[], $12::bigint[], $13::bigint[],
                   $14::bool[], $15::float8[], $16::bigint[], $17::bigint[], $18::text[], $19::bigint[], $20::text[],
                   $21::text[], $22::text[], $23::bigint[], $24::bigint[], $25::bigint[], $26::bigint[], $27::bigint[],
                   $28::bigint[]) AS u").map_err(db)?,
            principal_insert: c.prepare("INSERT INTO window_principals (agent_id, seq, principal, uid, occupied_ms, active_ms, memory_max_bytes, process_count, matches_grant)
                 SELECT $1::text, u.* FROM UNNEST($2::bigint[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
                   $7::bigint[], $8::bigint[], $9::bool[]) AS u").map_err(db)?,
            event_insert: c.prepare("INSERT INTO events (agent_id, seq, gpu_uuid, at_ms, kind, code, detail, pid, principal, grant_id, mode, action, result)
                 SELECT $1::text, u.* FROM UNNEST($2::bigint[], $3::text[], $4::bigint[], $5::text[], $6::bigint[],
                   $7::text[], $8::bigint[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[]) AS u").map_err(db)?,
            disputed_insert: c.prepare("INSERT INTO disputed_windows (agent_id, seq, gpu_uuid, host_id, owner_host_id)
                 SELECT $1::text, u.seq, u.gpu, $2::text, u.owner
                 FROM UNNEST($3::bigint[], $4::text[], $5::text[]) AS u(seq, gpu, owner)").map_err(db)?,
            flag_insert: c.prepare("INSERT INTO window_flags (agent_id, seq, flag, other_agent_id, other_seq, detail)
                 SELECT $1::text, u.* FROM UNNEST($2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::text[]) AS u
                 ON CONFLICT DO NOTHING").map_err(db)?,
            cp_held: c.prepare("SELECT hash FROM records WHERE agent_id = $1 AND seq = $2").map_err(db)?,
            cp_insert: c.prepare("INSERT INTO checkpoints (agent_id, epoch, seq, chain_hash, signature, received_ms)
                 VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT (agent_id, seq) DO NOTHING").map_err(db)?,
            alarms_insert: c.prepare("INSERT INTO alarms (agent_id, at_ms, kind, seq, detail)
                     SELECT u.a, u.t, u.k, u.s, u.d
                     FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::text[])
                          WITH ORDINALITY AS u(a, t, k, s, d, n)
                     ORDER BY u.n").map_err(db)?,
            card_locks: c
                .prepare("SELECT pg_advisory_xact_lock(k) FROM UNNEST($1::bigint[]) AS k")
                .map_err(db)?,
            durable: c
                .prepare("SELECT seq, hash FROM records WHERE agent_id = $1 ORDER BY seq DESC LIMIT 1")
                .map_err(db)?,
        })
    }
}

pub(crate) fn commit_batches(
    store: &PgStore,
    batches: &[IngestBatch],
    isolate: bool,
) -> Result<Vec<Result<CommitOutcome, StoreError>>, StoreError> {
    store.writer.with_commit(|c, prepared| {
        if prepared.is_none() {
            *prepared = Some(Statements::prepare(c)?);
        }
        let Some(st) = prepared.as_ref() else {
            return Err(StoreError::Closed);
        };
        let mut tx = c.transaction().map_err(db)?;
        lock_cards(&mut tx, st, batches)?;
        let mut outcomes = Vec::with_capacity(batches.len());
        let mut failed: HashSet<&str> = HashSet::new();
        for b in batches {
            if !isolate {
                outcomes.push(Ok(one(&mut tx, st, b)?));
                continue;
            }
            let last_seq = b.records.last().map_or(b.checkpoint.seq, |r| r.seq);
            if failed.contains(b.agent_id.as_str()) {
                outcomes.push(Err(StoreError::BatchRefused {
                    agent_id: b.agent_id.clone(),
                    seq: last_seq,
                    reason: "an earlier batch of this agent failed in the same commit".into(),
                }));
                continue;
            }
            tx.batch_execute("SAVEPOINT batch").map_err(db)?;
            match one(&mut tx, st, b) {
                Ok(o) => {
                    tx.batch_execute("RELEASE SAVEPOINT batch").map_err(db)?;
                    outcomes.push(Ok(o));
                }
                Err(e) => {
                    tx.batch_execute("ROLLBACK TO SAVEPOINT batch; RELEASE SAVEPOINT batch")
                        .map_err(db)?;
                    failed.insert(b.agent_id.as_str());
                    let reason = e.to_string();
                    insert_alarm(
                        &mut tx,
                        &Alarm {
                            agent_id: b.agent_id.clone(),
                            at_ms: b.received_ms,
                            kind: "batch_failed".into(),
                            seq: b.records.first().map(|r| r.seq),
                            detail: format!(
                                "batch ending at seq {last_seq} failed to insert and was rolled back alone: {reason}"
                            ),
                        },
                    )?;
                    outcomes.push(Err(StoreError::BatchRefused {
                        agent_id: b.agent_id.clone(),
                        seq: last_seq,
                        reason,
                    }));
                }
            }
        }
        tx.commit().map_err(db)?;
        Ok(outcomes)
    })
}

/// Locks every card the batches have windows for, in one statement and in key order (see the
/// module doc), held until the transaction ends: a batch rolled back to its savepoint keeps
/// them, since they were taken before it.
fn lock_cards(
    tx: &mut Transaction<'_>,
    st: &Statements,
    batches: &[IngestBatch],
) -> Result<(), StoreError> {
    let cards: HashSet<&str> = batches
        .iter()
        .flat_map(|b| &b.records)
        .filter_map(|r| match &r.content {
            RecordContent::Window(w) => Some(w.gpu_uuid.as_str()),
            _ => None,
        })
        .collect();
    if cards.is_empty() {
        return Ok(());
    }
    let mut keys: Vec<i64> = cards.into_iter().map(card_key).collect();
    keys.sort_unstable();
    keys.dedup();
    tx.execute(&st.card_locks, &[&keys]).map_err(db)?;
    Ok(())
}

/// The advisory lock key of a card's window judging.
pub(crate) fn card_key(gpu_uuid: &str) -> i64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"gpumeter.v1.card\0");
    h.update(gpu_uuid.as_bytes());
    let d = h.finalize();
    let mut k = [0u8; 8];
    k.copy_from_slice(&d[..8]);
    i64::from_be_bytes(k)
}

/// A counted window of a card, as the overlap rule sees it.
struct Span {
    agent_id: String,
    seq: i64,
    start_ms: i64,
    end_ms: i64,
}

/// A window flag to store: (seq, flag, other agent, other seq, detail).
type Flag = (i64, &'static str, Option<String>, Option<i64>, String);

/// The columns of the batch's new windows.
#[derive(Default)]
struct WindowCols<'a> {
    seq: Vec<i64>,
    gpu_uuid: Vec<&'a str>,
    start_ms: Vec<i64>,
    end_ms: Vec<i64>,
    interval_ms: Vec<i64>,
    expected: Vec<i64>,
    good: Vec<i64>,
    util_avg: Vec<Option<f64>>,
    util_max: Vec<Option<f64>>,
    mem_util: Vec<Option<f64>>,
    mem_max: Vec<Option<i64>>,
    energy: Vec<Option<i64>>,
    energy_estimated: Vec<bool>,
    power: Vec<Option<f64>>,
    temp: Vec<Option<i64>>,
    throttle: Vec<Option<i64>>,
    health: Vec<&'a str>,
    unavailable: Vec<i64>,
    status: Vec<&'a str>,
    grant_id: Vec<&'a str>,
    principal: Vec<&'a str>,
    active: Vec<i64>,
    occupied: Vec<i64>,
    foreign: Vec<i64>,
    grantee_occupied: Vec<Option<i64>>,
    unattributed: Vec<Option<i64>>,
    energy_estimated_mj: Vec<Option<i64>>,
}

impl<'a> WindowCols<'a> {
    fn push(&mut self, seq: i64, w: &'a WindowRow) {
        self.seq.push(seq);
        self.gpu_uuid.push(&w.gpu_uuid);
        self.start_ms.push(w.start_ms);
        self.end_ms.push(w.end_ms);
        self.interval_ms.push(w.interval_ms as i64);
        self.expected.push(i64::from(w.expected_samples));
        self.good.push(i64::from(w.good_samples));
        self.util_avg.push(w.util_avg_pct);
        self.util_max.push(w.util_max_pct);
        self.mem_util.push(w.mem_util_avg_pct);
        self.mem_max.push(opt_u64(w.memory_used_max_bytes));
        self.energy.push(opt_u64(w.energy_mj));
        self.energy_estimated.push(w.energy_estimated);
        self.power.push(w.power_avg_w);
        self.temp.push(opt_u32(w.temperature_max_c));
        self.throttle.push(opt_u64(w.throttle_reasons));
        self.health.push(w.health);
        self.unavailable.push(w.unavailable_ms as i64);
        self.status.push(w.assignment_status);
        self.grant_id.push(&w.grant_id);
        self.principal.push(&w.principal);
        self.active.push(w.active_ms as i64);
        self.occupied.push(w.occupied_ms as i64);
        self.foreign.push(w.foreign_ms as i64);
        self.grantee_occupied.push(opt_u64(w.grantee_occupied_ms));
        self.unattributed.push(opt_u64(w.unattributed_ms));
        self.energy_estimated_mj
            .push(opt_u64(w.energy_estimated_mj));
    }
}

/// Stores one batch (inside the caller's transaction or savepoint).
fn one(
    tx: &mut Transaction<'_>,
    st: &Statements,
    b: &IngestBatch,
) -> Result<CommitOutcome, StoreError> {
    let mut out = CommitOutcome::default();
    let agent = b.agent_id.as_str();
    let mut alarms: Vec<Alarm> = Vec::new();
    let alarm = |kind: &str, seq: Option<u64>, detail: String| Alarm {
        agent_id: b.agent_id.clone(),
        at_ms: b.received_ms,
        kind: kind.into(),
        seq,
        detail,
    };

    // Records, verbatim; what was held already is not inserted again.
    let seqs: Vec<i64> = b.records.iter().map(|r| r.seq as i64).collect();
    // Whether each record links to the one before it in the batch (its prev_hash not kept).
    let links: Vec<bool> = b
        .records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            i > 0 && {
                let before = &b.records[i - 1];
                before.seq + 1 == r.seq && before.hash == r.prev_hash
            }
        })
        .collect();
    let inserted: HashSet<i64> = if b.records.is_empty() {
        HashSet::new()
    } else {
        let z = super::body_block::encode(b.records.iter().map(|r| (r.seq, r.body.as_slice())));
        let block: i64 = tx
            .query_one(
                &st.block_insert,
                &[
                    &agent,
                    &(z.first_seq as i64),
                    &(z.last_seq as i64),
                    &(z.raw_len as i64),
                    &z.data,
                ],
            )
            .map_err(db)?
            .get(0);
        let prev: Vec<Option<&[u8]>> = b
            .records
            .iter()
            .zip(&links)
            .map(|(r, linked)| (!linked).then_some(&r.prev_hash[..]))
            .collect();
        let hash: Vec<&[u8]> = b.records.iter().map(|r| &r.hash[..]).collect();
        let kind: Vec<&str> = b.records.iter().map(|r| r.content.kind()).collect();
        let created: Vec<i64> = b.records.iter().map(|r| r.created_ms).collect();
        let inserted: HashSet<i64> = tx
            .query(
                &st.rec_insert,
                &[
                    &agent,
                    &b.received_ms,
                    &block,
                    &seqs,
                    &prev,
                    &hash,
                    &kind,
                    &created,
                ],
            )
            .map_err(db)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if inserted.is_empty() {
            // Every record was held already: the block holds nothing the ledger needs.
            tx.execute(&st.block_delete, &[&block]).map_err(db)?;
        }
        inserted
    };
    let held: HashMap<i64, Vec<u8>> = if inserted.len() == seqs.len() {
        HashMap::new()
    } else {
        let others: Vec<i64> = seqs
            .iter()
            .copied()
            .filter(|s| !inserted.contains(s))
            .collect();
        tx.query(&st.rec_held, &[&agent, &others])
            .map_err(db)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    // A record stored without its prev_hash whose predecessor in the batch was held with other
    // bytes does not link to what the ledger holds before it: it keeps its own prev_hash.
    for (i, r) in b.records.iter().enumerate() {
        let before = i.checked_sub(1).map(|j| &b.records[j]);
        let restore = links[i]
            && inserted.contains(&(r.seq as i64))
            && before.is_some_and(|p| {
                held.get(&(p.seq as i64))
                    .is_some_and(|h| h.as_slice() != p.hash.as_slice())
            });
        if restore {
            tx.execute(
                &st.prev_restore,
                &[&agent, &(r.seq as i64), &&r.prev_hash[..]],
            )
            .map_err(db)?;
        }
    }

    // What the window rules need, read once for the batch.
    let new_windows: Vec<(i64, &WindowRow)> = b
        .records
        .iter()
        .filter(|r| inserted.contains(&(r.seq as i64)))
        .filter_map(|r| match &r.content {
            RecordContent::Window(w) => Some((r.seq as i64, w)),
            _ => None,
        })
        .collect();
    let mut memory: HashMap<String, Option<i64>> = HashMap::new();
    let mut holders: HashMap<String, String> = HashMap::new();
    let mut counted: HashMap<String, Vec<Span>> = HashMap::new();
    let mut agent_host: Option<String> = None;
    if !new_windows.is_empty() {
        let mut cards: Vec<&str> = new_windows
            .iter()
            .map(|(_, w)| w.gpu_uuid.as_str())
            .collect();
        cards.sort_unstable();
        cards.dedup();
        // These cards are locked already (`lock_cards`): other collectors' commits of their
        // windows wait for this one, so each sees the other's windows as SQLite's one writer
        // would.
        for r in tx.query(&st.card_memory, &[&cards]).map_err(db)? {
            memory.insert(r.get(0), r.get(1));
        }
        for r in tx.query(&st.card_holders, &[&cards]).map_err(db)? {
            holders.insert(r.get(0), r.get(1));
        }
        agent_host = tx
            .query_opt(&st.agent_host, &[&agent])
            .map_err(db)?
            .map(|r| r.get(0));
        let from = new_windows
            .iter()
            .map(|(_, w)| w.start_ms)
            .min()
            .unwrap_or(0);
        let until = new_windows.iter().map(|(_, w)| w.end_ms).max().unwrap_or(0);
        for r in tx
            .query(&st.counted_spans, &[&cards, &from, &until])
            .map_err(db)?
        {
            counted.entry(r.get(0)).or_default().push(Span {
                agent_id: r.get(1),
                seq: r.get(2),
                start_ms: r.get(3),
                end_ms: r.get(4),
            });
        }
    }

    let mut wins = WindowCols::default();
    let (mut p_seq, mut p_name, mut p_uid, mut p_occ, mut p_act, mut p_mem, mut p_n, mut p_match) = (
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
    );
    type EventCols<'a> = (
        Vec<i64>,
        Vec<&'a str>,
        Vec<i64>,
        Vec<&'a str>,
        Vec<i64>,
        Vec<&'a str>,
        Vec<Option<i64>>,
        Vec<&'a str>,
        Vec<&'a str>,
        Vec<&'a str>,
        Vec<&'a str>,
        Vec<&'a str>,
    );
    let mut ev: EventCols<'_> = Default::default();
    let mut flags: Vec<Flag> = Vec::new();
    let mut disputed: Vec<(u64, String)> = Vec::new();
    let mut disputed_owner: Vec<String> = Vec::new();
    // Windows that count, for the rollups: (seq, window, disputed).
    let mut rolled: Vec<(i64, &WindowRow, bool)> = Vec::new();

    for r in &b.records {
        let seq = r.seq as i64;
        if !inserted.contains(&seq) {
            let held_hash = held.get(&seq).cloned().unwrap_or_default();
            if held_hash.as_slice() == r.hash.as_slice() {
                out.duplicates += 1;
            } else {
                out.equivocations.push(r.seq);
                // The batch's signed checkpoint covers the other history; it stays here as
                // the evidence, since it cannot go into `checkpoints` (see below).
                alarms.push(alarm(
                    "equivocation",
                    Some(r.seq),
                    format!(
                        "seq {} re-sent with different bytes (held hash {}, new hash {}); the first copy is kept; the re-sent batch's checkpoint: epoch {}, seq {}, chain hash {}, signature {}",
                        r.seq,
                        hex::encode(&held_hash),
                        hex::encode(r.hash),
                        b.checkpoint.epoch,
                        b.checkpoint.seq,
                        hex::encode(b.checkpoint.chain_hash),
                        hex::encode(&b.checkpoint.signature)
                    ),
                ));
            }
            continue;
        }
        match &r.content {
            RecordContent::Window(w) => {
                wins.push(seq, w);
                if let (Some(mine), Some(owner)) = (&agent_host, holders.get(&w.gpu_uuid)) {
                    if owner != mine {
                        disputed.push((r.seq, w.gpu_uuid.clone()));
                        disputed_owner.push(owner.clone());
                    }
                }
                for p in &w.principals {
                    p_seq.push(seq);
                    p_name.push(p.principal.as_str());
                    p_uid.push(opt_u32(p.uid));
                    p_occ.push(p.occupied_ms as i64);
                    p_act.push(p.active_ms as i64);
                    p_mem.push(p.memory_max_bytes as i64);
                    p_n.push(i64::from(p.process_count));
                    p_match.push(p.matches_grant);
                }
                let mem = memory.get(&w.gpu_uuid).copied().flatten();
                let problems = sanity::window_problems(w, mem.map(|m| m as u64));
                if !problems.is_empty() {
                    let detail = problems.join("; ");
                    alarms.push(alarm(
                        "impossible_window",
                        Some(r.seq),
                        format!(
                            "window of {} at {} is kept but counted in no figure: {detail}",
                            w.gpu_uuid, w.start_ms
                        ),
                    ));
                    flags.push((seq, FLAG_IMPOSSIBLE, None, None, detail));
                    continue;
                }
                let spans = counted.entry(w.gpu_uuid.clone()).or_default();
                let other = spans
                    .iter()
                    .filter(|o| {
                        o.start_ms < w.end_ms
                            && o.start_ms > w.start_ms - DAY_MS
                            && o.end_ms > w.start_ms
                            && !(o.agent_id == agent && o.seq == seq)
                    })
                    .min_by(|a, b| {
                        (a.start_ms, a.end_ms, &a.agent_id, a.seq).cmp(&(
                            b.start_ms,
                            b.end_ms,
                            &b.agent_id,
                            b.seq,
                        ))
                    });
                match other {
                    Some(o) => {
                        let detail = format!(
                            "card {} time {}..{} is already covered by {} seq {} ({}..{}); this window counts in no figure",
                            w.gpu_uuid,
                            w.start_ms,
                            w.end_ms,
                            o.agent_id,
                            o.seq,
                            o.start_ms,
                            o.end_ms
                        );
                        alarms.push(alarm(
                            "card_time_overlap",
                            Some(r.seq),
                            format!("{agent} seq {seq}: {detail}"),
                        ));
                        flags.push((
                            seq,
                            FLAG_OVERLAP,
                            Some(o.agent_id.clone()),
                            Some(o.seq),
                            detail,
                        ));
                    }
                    None => {
                        spans.push(Span {
                            agent_id: agent.to_string(),
                            seq,
                            start_ms: w.start_ms,
                            end_ms: w.end_ms,
                        });
                        let is_disputed = disputed.last().is_some_and(|(s, _)| *s == r.seq);
                        rolled.push((seq, w, is_disputed));
                    }
                }
            }
            RecordContent::Event(e) => {
                ev.0.push(seq);
                ev.1.push(&e.gpu_uuid);
                ev.2.push(e.at_ms);
                ev.3.push(e.kind);
                ev.4.push(e.code);
                ev.5.push(&e.detail);
                ev.6.push(opt_u32(e.pid));
                ev.7.push(&e.principal);
                ev.8.push(&e.grant_id);
                ev.9.push(&e.mode);
                ev.10.push(&e.action);
                ev.11.push(&e.result);
            }
            // The agent says, signed, that something is missing: operators and auditors must
            // see it without decoding bodies.
            RecordContent::Gap {
                from_ms,
                until_ms,
                reason,
            } => alarms.push(alarm(
                "agent_gap",
                Some(r.seq),
                format!(
                    "the agent did not record {from_ms}..{until_ms} (ms since the epoch): {reason}"
                ),
            )),
            RecordContent::EpochStart {
                epoch,
                last_acked_seq,
            } => alarms.push(alarm(
                "epoch_start",
                Some(r.seq),
                format!(
                    "the agent lost its spool and started epoch {epoch} after seq {last_acked_seq}"
                ),
            )),
            RecordContent::Unknown => {}
        }
    }

    if !wins.seq.is_empty() {
        let w = &wins;
        let params: [&(dyn ToSql + Sync); 28] = [
            &agent,
            &w.seq,
            &w.gpu_uuid,
            &w.start_ms,
            &w.end_ms,
            &w.interval_ms,
            &w.expected,
            &w.good,
            &w.util_avg,
            &w.util_max,
            &w.mem_util,
            &w.mem_max,
            &w.energy,
            &w.energy_estimated,
            &w.power,
            &w.temp,
            &w.throttle,
            &w.health,
            &w.unavailable,
            &w.status,
            &w.grant_id,
            &w.principal,
            &w.active,
            &w.occupied,
            &w.foreign,
            &w.grantee_occupied,
            &w.unattributed,
            &w.energy_estimated_mj,
        ];
        tx.execute(&st.win_insert, &params).map_err(db)?;
    }
    if !p_seq.is_empty() {
        tx.execute(
            &st.principal_insert,
            &[
                &agent, &p_seq, &p_name, &p_uid, &p_occ, &p_act, &p_mem, &p_n, &p_match,
            ],
        )
        .map_err(db)?;
    }
    if !ev.0.is_empty() {
        tx.execute(
            &st.event_insert,
            &[
                &agent, &ev.0, &ev.1, &ev.2, &ev.3, &ev.4, &ev.5, &ev.6, &ev.7, &ev.8, &ev.9,
                &ev.10, &ev.11,
            ],
        )
        .map_err(db)?;
    }
    if !disputed.is_empty() {
        let seq: Vec<i64> = disputed.iter().map(|(s, _)| *s as i64).collect();
        let gpu: Vec<&str> = disputed.iter().map(|(_, g)| g.as_str()).collect();
        tx.execute(
            &st.disputed_insert,
            &[&agent, &agent_host, &seq, &gpu, &disputed_owner],
        )
        .map_err(db)?;
    }
    super::postgres_rollup::add_windows(tx, agent, &rolled)?;
    if !flags.is_empty() {
        let seq: Vec<i64> = flags.iter().map(|f| f.0).collect();
        let flag: Vec<&str> = flags.iter().map(|f| f.1).collect();
        let other: Vec<Option<&str>> = flags.iter().map(|f| f.2.as_deref()).collect();
        let other_seq: Vec<Option<i64>> = flags.iter().map(|f| f.3).collect();
        let detail: Vec<&str> = flags.iter().map(|f| f.4.as_str()).collect();
        tx.execute(
            &st.flag_insert,
            &[&agent, &seq, &flag, &other, &other_seq, &detail],
        )
        .map_err(db)?;
    }

    // A batch that re-sent a record with other bytes comes with a checkpoint over the other
    // history, which the ledger does not hold: stored, it would make the kept chain fail
    // verification for good. Only a checkpoint matching the stored chain goes in.
    let cp = &b.checkpoint;
    let vouches = out.equivocations.is_empty()
        || tx
            .query_opt(&st.cp_held, &[&agent, &(cp.seq as i64)])
            .map_err(db)?
            .is_some_and(|r| r.get::<_, Vec<u8>>(0).as_slice() == cp.chain_hash.as_slice());
    if vouches {
        tx.execute(
            &st.cp_insert,
            &[
                &agent,
                &(cp.epoch as i64),
                &(cp.seq as i64),
                &&cp.chain_hash[..],
                &cp.signature,
                &b.received_ms,
            ],
        )
        .map_err(db)?;
    }
    alarms.extend(b.alarms.iter().cloned());
    if let (Some(first), Some(last)) = (disputed.first(), disputed.last()) {
        let mut cards: Vec<&str> = disputed.iter().map(|(_, u)| u.as_str()).collect();
        cards.sort_unstable();
        cards.dedup();
        alarms.push(alarm(
            "card_not_owned",
            Some(first.0),
            format!(
                "{} windows (seq {}..={}) for cards another host holds: {}; they count in no figure until an admin moves the card (hosts move-card)",
                disputed.len(),
                first.0,
                last.0,
                cards.join(", ")
            ),
        ));
    }
    insert_alarms(tx, st, &alarms)?;
    if let Some(r) = tx.query_opt(&st.durable, &[&agent]).map_err(db)? {
        out.durable_seq = r.get::<_, i64>(0) as u64;
        out.durable_hash = hash_from(r.get(1));
    } else {
        out.durable_seq = 0;
        out.durable_hash = gpumeter_proto::chain::GENESIS;
    }
    Ok(out)
}

/// Inserts alarms in one statement, their ids in the order given.
fn insert_alarms(
    tx: &mut Transaction<'_>,
    st: &Statements,
    alarms: &[Alarm],
) -> Result<(), StoreError> {
    if alarms.is_empty() {
        return Ok(());
    }
    let agent: Vec<&str> = alarms.iter().map(|a| a.agent_id.as_str()).collect();
    let at: Vec<i64> = alarms.iter().map(|a| a.at_ms).collect();
    let kind: Vec<&str> = alarms.iter().map(|a| a.kind.as_str()).collect();
    let seq: Vec<Option<i64>> = alarms.iter().map(|a| a.seq.map(|s| s as i64)).collect();
    let detail: Vec<&str> = alarms.iter().map(|a| a.detail.as_str()).collect();
    tx.execute(&st.alarms_insert, &[&agent, &at, &kind, &seq, &detail])
        .map_err(db)?;
    Ok(())
}
