//! The SQLite side of ledger integrity, called from the commit, hello and key-registration
//! paths: key history, card identity as first reported, window flags (impossible values,
//! card time counted twice) and their alarms, and signed heads. Rules are in
//! `crate::sanity`, `crate::heads` and `crate::verify`; this module only stores.
//!
//! Rules: a flag row is written in the same transaction as its window, never updated; the
//! window counted first for a card instant keeps counting, a later one covering any of that
//! time is flagged `overlap` naming it. `card_identity` is written once per card and never
//! updated; a change is an alarm. `agent_keys` is append-only.

use rusqlite::{Connection, OptionalExtension, params};

use super::{AgentHello, Alarm, StoreError, WindowRow};
use crate::identity::{self, model_alarm, model_matches};
use crate::sanity::{self, FLAG_IMPOSSIBLE, FLAG_OVERLAP};

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

fn alarm(c: &Connection, a: Alarm) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO alarms (agent_id, at_ms, kind, seq, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            a.agent_id,
            a.at_ms,
            a.kind,
            a.seq.map(|s| s as i64),
            a.detail
        ],
    )
    .map_err(db)?;
    Ok(())
}

fn flag(
    c: &Connection,
    agent_id: &str,
    seq: u64,
    flag: &str,
    other: Option<(&str, i64)>,
    detail: &str,
) -> Result<(), StoreError> {
    c.prepare_cached(
        "INSERT INTO window_flags (agent_id, seq, flag, other_agent_id, other_seq, detail)
         VALUES (?1,?2,?3,?4,?5,?6) ON CONFLICT DO NOTHING",
    )
    .map_err(db)?
    .execute(params![
        agent_id,
        seq as i64,
        flag,
        other.map(|o| o.0),
        other.map(|o| o.1),
        detail
    ])
    .map_err(db)?;
    Ok(())
}

/// Checks a window just inserted: flags it `impossible` (see [`sanity::window_problems`]) or
/// `overlap` (another counted window of the card already covers some of its time), with an
/// alarm either way. Returns whether it was flagged.
pub fn check_window(
    c: &Connection,
    agent_id: &str,
    seq: u64,
    w: &WindowRow,
    at_ms: i64,
) -> Result<bool, StoreError> {
    let memory: Option<i64> = c
        .prepare_cached("SELECT memory_total_bytes FROM card_identity WHERE gpu_uuid = ?1")
        .map_err(db)?
        .query_row(params![w.gpu_uuid], |r| r.get(0))
        .optional()
        .map_err(db)?
        .flatten();
    let problems = sanity::window_problems(w, memory.map(|m| m as u64));
    if !problems.is_empty() {
        let detail = problems.join("; ");
        flag(c, agent_id, seq, FLAG_IMPOSSIBLE, None, &detail)?;
        alarm(
            c,
            Alarm {
                agent_id: agent_id.into(),
                at_ms,
                kind: "impossible_window".into(),
                seq: Some(seq),
                detail: format!(
                    "window of {} at {} is kept but counted in no figure: {detail}",
                    w.gpu_uuid, w.start_ms
                ),
            },
        )?;
        return Ok(true);
    }
    // Counted windows of a card never overlap one another (an overlapping one is flagged here
    // and counts no more), so their ends rise with their starts: if any counted window
    // overlaps this one, the counted window starting last before this one ends does. That
    // probe reads a row or two of the card's index (window_rows_by_card) from the top, where
    // a scan of every window that could overlap would read a day of the card's windows per
    // window committed. Only when it finds an overlap is the range read, to name the earliest
    // window overlapping, as verify and the PostgreSQL store name it. Windows are at most a
    // day long, which bounds the range. The row table is read, not the `windows` view: the
    // index covers every column used here.
    let key = params![w.gpu_uuid, w.start_ms, w.end_ms, agent_id, seq as i64];
    macro_rules! counted {
        () => {
            "FROM window_rows w JOIN names a ON a.no = w.agent_no
             WHERE w.card_no = (SELECT no FROM names WHERE name = ?1)
               AND w.start_ms < ?3 AND w.start_ms > ?2 - 86400000
               AND NOT (a.name = ?4 AND w.seq = ?5)
               AND NOT EXISTS (SELECT 1 FROM window_flags f WHERE f.agent_id = a.name AND f.seq = w.seq)"
        };
    }
    let last_end: Option<i64> = c
        .prepare_cached(concat!(
            "SELECT w.end_ms ",
            counted!(),
            " ORDER BY w.start_ms DESC LIMIT 1"
        ))
        .map_err(db)?
        .query_row(key, |r| r.get(0))
        .optional()
        .map_err(db)?;
    let other: Option<(String, i64, i64, i64)> = match last_end {
        Some(end) if end > w.start_ms => c
            .prepare_cached(concat!(
                "SELECT a.name, w.seq, w.start_ms, w.end_ms ",
                counted!(),
                " AND w.end_ms > ?2 ORDER BY w.start_ms LIMIT 1"
            ))
            .map_err(db)?
            .query_row(key, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .optional()
            .map_err(db)?,
        _ => None,
    };
    if let Some((other_agent, other_seq, from, until)) = other {
        let detail = format!(
            "card {} time {}..{} is already covered by {other_agent} seq {other_seq} ({from}..{until}); this window counts in no figure",
            w.gpu_uuid, w.start_ms, w.end_ms
        );
        flag(
            c,
            agent_id,
            seq,
            FLAG_OVERLAP,
            Some((&other_agent, other_seq)),
            &detail,
        )?;
        alarm(
            c,
            Alarm {
                agent_id: agent_id.into(),
                at_ms,
                kind: "card_time_overlap".into(),
                seq: Some(seq),
                detail: format!("{agent_id} seq {seq}: {detail}"),
            },
        )?;
        return Ok(true);
    }
    Ok(false)
}

/// Keeps each card's identity as first reported; a change of serial, model or memory under
/// the same UUID is an alarm (the first report stays).
pub fn note_cards(c: &Connection, h: &AgentHello) -> Result<(), StoreError> {
    for g in &h.gpus {
        let held: Option<(String, String, Option<i64>)> = c
            .prepare_cached(
                "SELECT name, serial, memory_total_bytes FROM card_identity WHERE gpu_uuid = ?1",
            )
            .map_err(db)?
            .query_row(params![g.uuid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()
            .map_err(db)?;
        let memory = g.memory_total_bytes.map(|m| m as i64);
        let granted: Vec<(String, String)> = c
            .prepare_cached("SELECT grant_id, gpu_model FROM grant_card_models WHERE gpu_uuid = ?1")
            .map_err(db)?
            .query_map(params![g.uuid], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(db)?
            .collect::<Result<_, _>>()
            .map_err(db)?;
        // A card first seen as another model than its grant names (a grant imported earlier
        // checks cards already seen itself, in note_card_models).
        if held.is_none() {
            for (grant_id, model) in granted {
                if !model_matches(&g.name, &model) {
                    alarm(
                        c,
                        model_alarm(
                            &h.agent_id,
                            h.received_ms,
                            &g.uuid,
                            &g.name,
                            &grant_id,
                            &model,
                        ),
                    )?;
                }
            }
        }
        match held {
            None => {
                c.prepare_cached(
                    "INSERT INTO card_identity (gpu_uuid, agent_id, host_id, name, serial, pci_bus_id, memory_total_bytes, first_seen_ms)
                     VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
                )
                .map_err(db)?
                .execute(params![
                    g.uuid,
                    h.agent_id,
                    h.host_id,
                    g.name,
                    g.serial,
                    g.pci_bus_id,
                    memory,
                    h.received_ms
                ])
                .map_err(db)?;
            }
            Some((name, serial, mem)) => {
                if let Some(a) =
                    identity::changed_alarm(&h.agent_id, h.received_ms, g, (&name, &serial, mem))
                {
                    alarm(c, a)?;
                }
            }
        }
    }
    Ok(())
}

/// Keeps granted models; a card already reported as another model is an alarm.
pub fn note_card_models(
    c: &Connection,
    models: &[crate::grants::CardModel],
    at_ms: i64,
) -> Result<(), StoreError> {
    for m in models {
        c.prepare_cached(
            "INSERT INTO grant_card_models (grant_id, gpu_uuid, gpu_model) VALUES (?1,?2,?3)
             ON CONFLICT(grant_id, gpu_uuid) DO UPDATE SET gpu_model = excluded.gpu_model",
        )
        .map_err(db)?
        .execute(params![m.grant_id, m.gpu_uuid, m.gpu_model])
        .map_err(db)?;
        let seen: Option<(String, String)> = c
            .prepare_cached("SELECT agent_id, name FROM card_identity WHERE gpu_uuid = ?1")
            .map_err(db)?
            .query_row(params![m.gpu_uuid], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(db)?;
        if let Some((agent, name)) = seen {
            if !model_matches(&name, &m.gpu_model) {
                alarm(
                    c,
                    model_alarm(&agent, at_ms, &m.gpu_uuid, &name, &m.grant_id, &m.gpu_model),
                )?;
            }
        }
    }
    Ok(())
}

/// Appends `public_key` to an agent's key history when it differs from the latest entry:
/// it signs from the seq after the last one held.
pub fn note_key(
    c: &Connection,
    agent_id: &str,
    public_key: &[u8],
    actor: &str,
    reason: &str,
    at_ms: i64,
) -> Result<(), StoreError> {
    let latest: Option<(i64, Vec<u8>)> = c
        .query_row(
            "SELECT idx, public_key FROM agent_keys WHERE agent_id = ?1 ORDER BY idx DESC LIMIT 1",
            params![agent_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(db)?;
    if latest
        .as_ref()
        .is_some_and(|(_, k)| k.as_slice() == public_key)
    {
        return Ok(());
    }
    let held: i64 = c
        .query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM records WHERE agent_id = ?1",
            params![agent_id],
            |r| r.get(0),
        )
        .map_err(db)?;
    c.execute(
        "INSERT INTO agent_keys (agent_id, idx, public_key, from_seq, at_ms, actor, reason) VALUES (?1,?2,?3,?4,?5,?6,?7)",
        params![
            agent_id,
            latest.map_or(0, |l| l.0 + 1),
            public_key,
            held + 1,
            at_ms,
            actor,
            reason
        ],
    )
    .map_err(db)?;
    Ok(())
}
