//! The PostgreSQL side of ledger integrity, with the rules of `sqlite_integrity.rs`: card
//! identity as first reported (never updated; a change is an alarm), granted card models, and
//! the append-only key history. Window flags are decided in `postgres_commit.rs`, a batch at
//! a time, with the same rules as `sqlite_integrity::check_window`.

use postgres::GenericClient;

use super::postgres::{db, insert_alarm};
use super::{AgentHello, StoreError};
use crate::identity::{self, model_alarm, model_matches};

/// Keeps each card's identity as first reported; a change of serial, model or memory under
/// the same UUID is an alarm (the first report stays).
pub fn note_cards(c: &mut impl GenericClient, h: &AgentHello) -> Result<(), StoreError> {
    for g in &h.gpus {
        let held: Option<(String, String, Option<i64>)> = c
            .query_opt(
                "SELECT name, serial, memory_total_bytes FROM card_identity WHERE gpu_uuid = $1",
                &[&g.uuid],
            )
            .map_err(db)?
            .map(|r| (r.get(0), r.get(1), r.get(2)));
        let memory = g.memory_total_bytes.map(|m| m as i64);
        let granted: Vec<(String, String)> = c
            .query(
                "SELECT grant_id, gpu_model FROM grant_card_models WHERE gpu_uuid = $1 ORDER BY grant_id",
                &[&g.uuid],
            )
            .map_err(db)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if held.is_none() {
            for (grant_id, model) in granted {
                if !model_matches(&g.name, &model) {
                    insert_alarm(
                        c,
                        &model_alarm(
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
                c.execute(
                    "INSERT INTO card_identity (gpu_uuid, agent_id, host_id, name, serial, pci_bus_id, memory_total_bytes, first_seen_ms)
                     VALUES ($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT (gpu_uuid) DO NOTHING",
                    &[&g.uuid, &h.agent_id, &h.host_id, &g.name, &g.serial, &g.pci_bus_id, &memory, &h.received_ms],
                )
                .map_err(db)?;
            }
            Some((name, serial, mem)) => {
                if let Some(a) =
                    identity::changed_alarm(&h.agent_id, h.received_ms, g, (&name, &serial, mem))
                {
                    insert_alarm(c, &a)?;
                }
            }
        }
    }
    Ok(())
}

/// Keeps granted models; a card already reported as another model is an alarm.
pub fn note_card_models(
    c: &mut impl GenericClient,
    models: &[crate::grants::CardModel],
    at_ms: i64,
) -> Result<(), StoreError> {
    for m in models {
        c.execute(
            "INSERT INTO grant_card_models (grant_id, gpu_uuid, gpu_model) VALUES ($1,$2,$3)
             ON CONFLICT (grant_id, gpu_uuid) DO UPDATE SET gpu_model = excluded.gpu_model",
            &[&m.grant_id, &m.gpu_uuid, &m.gpu_model],
        )
        .map_err(db)?;
        let seen: Option<(String, String)> = c
            .query_opt(
                "SELECT agent_id, name FROM card_identity WHERE gpu_uuid = $1",
                &[&m.gpu_uuid],
            )
            .map_err(db)?
            .map(|r| (r.get(0), r.get(1)));
        if let Some((agent, name)) = seen {
            if !model_matches(&name, &m.gpu_model) {
                insert_alarm(
                    c,
                    &model_alarm(&agent, at_ms, &m.gpu_uuid, &name, &m.grant_id, &m.gpu_model),
                )?;
            }
        }
    }
    Ok(())
}

/// Appends `public_key` to an agent's key history when it differs from the latest entry:
/// it signs from the seq after the last one held.
pub fn note_key(
    c: &mut impl GenericClient,
    agent_id: &str,
    public_key: &[u8],
    actor: &str,
    reason: &str,
    at_ms: i64,
) -> Result<(), StoreError> {
    let latest: Option<(i64, Vec<u8>)> = c
        .query_opt(
            "SELECT idx, public_key FROM agent_keys WHERE agent_id = $1 ORDER BY idx DESC LIMIT 1",
            &[&agent_id],
        )
        .map_err(db)?
        .map(|r| (r.get(0), r.get(1)));
    if latest
        .as_ref()
        .is_some_and(|(_, k)| k.as_slice() == public_key)
    {
        return Ok(());
    }
    let held: i64 = c
        .query_one(
            "SELECT COALESCE(MAX(seq), 0) FROM records WHERE agent_id = $1",
            &[&agent_id],
        )
        .map_err(db)?
        .get(0);
    c.execute(
        "INSERT INTO agent_keys (agent_id, idx, public_key, from_seq, at_ms, actor, reason) VALUES ($1,$2,$3,$4,$5,$6,$7)",
        &[
            &agent_id,
            &latest.map_or(0, |l| l.0 + 1),
            &public_key,
            &(held + 1),
            &at_ms,
            &actor,
            &reason,
        ],
    )
    .map_err(db)?;
    Ok(())
}
