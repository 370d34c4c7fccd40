//! Interned names in the SQLite ledger (migration 12).
//!
//! The derived rows of every card-window repeated the same long strings: the agent id, the
//! card's 40-character UUID, the grant id and the principal, once in the row and again in each
//! index. From version 12 each distinct string is stored once in `names` and the rows carry its
//! number:
//!
//! - `window_rows` (keyed by (agent_no, seq), WITHOUT ROWID: the key is the table) with two
//!   narrow indexes, by card and time and by start time;
//! - `window_principal_rows` (keyed by (agent_no, seq, principal_no)).
//!
//! `windows` and `window_principals` are views over them with the columns and column order the
//! tables had, so every reader (reconciliation, rollups, verify, tools) reads them as before.
//! INSTEAD OF triggers make the views writable for tools and tests that edit the ledger by
//! hand; the writer inserts into the row tables directly ([`Interner`]).
//!
//! A number is never reused or renumbered (`names.no` is an INTEGER PRIMARY KEY, which VACUUM
//! keeps), so a name's number can be held for the life of a transaction.

use std::collections::HashMap;

use rusqlite::{OptionalExtension, Transaction, params};

use super::StoreError;

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

/// Migration 12: names, the row tables, the views and their triggers; rows already stored are
/// moved over.
pub const MIGRATION: &str = r#"
CREATE TABLE names (
    no INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
INSERT INTO names (name)
    SELECT agent_id FROM windows UNION SELECT gpu_uuid FROM windows
    UNION SELECT grant_id FROM windows UNION SELECT principal FROM windows
    UNION SELECT agent_id FROM window_principals UNION SELECT principal FROM window_principals
    ORDER BY 1;

CREATE TABLE window_rows (
    agent_no INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    card_no INTEGER NOT NULL,
    start_ms INTEGER NOT NULL,
    end_ms INTEGER NOT NULL,
    interval_ms INTEGER NOT NULL,
    expected_samples INTEGER NOT NULL,
    good_samples INTEGER NOT NULL,
    util_avg_pct REAL,
    util_max_pct REAL,
    mem_util_avg_pct REAL,
    memory_used_max_bytes INTEGER,
    energy_mj INTEGER,
    energy_estimated INTEGER NOT NULL,
    power_avg_w REAL,
    temperature_max_c INTEGER,
    throttle_reasons INTEGER,
    health TEXT NOT NULL,
    unavailable_ms INTEGER NOT NULL,
    assignment_status TEXT NOT NULL,
    grant_no INTEGER NOT NULL,
    principal_no INTEGER NOT NULL,
    active_ms INTEGER NOT NULL,
    occupied_ms INTEGER NOT NULL,
    foreign_ms INTEGER NOT NULL,
    grantee_occupied_ms INTEGER,
    unattributed_ms INTEGER,
    energy_estimated_mj INTEGER,
    PRIMARY KEY (agent_no, seq)
) WITHOUT ROWID;
INSERT INTO window_rows
    SELECT a.no, w.seq, c.no, w.start_ms, w.end_ms, w.interval_ms, w.expected_samples,
           w.good_samples, w.util_avg_pct, w.util_max_pct, w.mem_util_avg_pct,
           w.memory_used_max_bytes, w.energy_mj, w.energy_estimated, w.power_avg_w,
           w.temperature_max_c, w.throttle_reasons, w.health, w.unavailable_ms,
           w.assignment_status, g.no, p.no, w.active_ms, w.occupied_ms, w.foreign_ms,
           w.grantee_occupied_ms, w.unattributed_ms, w.energy_estimated_mj
    FROM windows w
    JOIN names a ON a.name = w.agent_id JOIN names c ON c.name = w.gpu_uuid
    JOIN names g ON g.name = w.grant_id JOIN names p ON p.name = w.principal;
DROP TABLE windows;
CREATE INDEX window_rows_by_card ON window_rows(card_no, start_ms, end_ms);
CREATE INDEX window_rows_by_start ON window_rows(start_ms);

CREATE TABLE window_principal_rows (
    agent_no INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    principal_no INTEGER NOT NULL,
    uid INTEGER,
    occupied_ms INTEGER NOT NULL,
    active_ms INTEGER NOT NULL,
    memory_max_bytes INTEGER NOT NULL,
    process_count INTEGER NOT NULL,
    matches_grant INTEGER NOT NULL,
    PRIMARY KEY (agent_no, seq, principal_no)
) WITHOUT ROWID;
INSERT INTO window_principal_rows
    SELECT a.no, w.seq, p.no, w.uid, w.occupied_ms, w.active_ms, w.memory_max_bytes,
           w.process_count, w.matches_grant
    FROM window_principals w
    JOIN names a ON a.name = w.agent_id JOIN names p ON p.name = w.principal;
DROP TABLE window_principals;

CREATE VIEW windows AS
    SELECT a.name AS agent_id, w.seq AS seq, c.name AS gpu_uuid, w.start_ms AS start_ms,
           w.end_ms AS end_ms, w.interval_ms AS interval_ms,
           w.expected_samples AS expected_samples, w.good_samples AS good_samples,
           w.util_avg_pct AS util_avg_pct, w.util_max_pct AS util_max_pct,
           w.mem_util_avg_pct AS mem_util_avg_pct,
           w.memory_used_max_bytes AS memory_used_max_bytes, w.energy_mj AS energy_mj,
           w.energy_estimated AS energy_estimated, w.power_avg_w AS power_avg_w,
           w.temperature_max_c AS temperature_max_c, w.throttle_reasons AS throttle_reasons,
           w.health AS health, w.unavailable_ms AS unavailable_ms,
           w.assignment_status AS assignment_status, g.name AS grant_id, p.name AS principal,
           w.active_ms AS active_ms, w.occupied_ms AS occupied_ms, w.foreign_ms AS foreign_ms,
           w.grantee_occupied_ms AS grantee_occupied_ms, w.unattributed_ms AS unattributed_ms,
           w.energy_estimated_mj AS energy_estimated_mj
    FROM window_rows w
    JOIN names a ON a.no = w.agent_no JOIN names c ON c.no = w.card_no
    JOIN names g ON g.no = w.grant_no JOIN names p ON p.no = w.principal_no;

CREATE VIEW window_principals AS
    SELECT a.name AS agent_id, w.seq AS seq, p.name AS principal, w.uid AS uid,
           w.occupied_ms AS occupied_ms, w.active_ms AS active_ms,
           w.memory_max_bytes AS memory_max_bytes, w.process_count AS process_count,
           w.matches_grant AS matches_grant
    FROM window_principal_rows w
    JOIN names a ON a.no = w.agent_no JOIN names p ON p.no = w.principal_no;

CREATE TRIGGER windows_insert INSTEAD OF INSERT ON windows BEGIN
    INSERT OR IGNORE INTO names (name)
        VALUES (NEW.agent_id), (NEW.gpu_uuid), (NEW.grant_id), (NEW.principal);
    INSERT INTO window_rows VALUES (
        (SELECT no FROM names WHERE name = NEW.agent_id), NEW.seq,
        (SELECT no FROM names WHERE name = NEW.gpu_uuid), NEW.start_ms, NEW.end_ms,
        NEW.interval_ms, NEW.expected_samples, NEW.good_samples, NEW.util_avg_pct,
        NEW.util_max_pct, NEW.mem_util_avg_pct, NEW.memory_used_max_bytes, NEW.energy_mj,
        NEW.energy_estimated, NEW.power_avg_w, NEW.temperature_max_c, NEW.throttle_reasons,
        NEW.health, NEW.unavailable_ms, NEW.assignment_status,
        (SELECT no FROM names WHERE name = NEW.grant_id),
        (SELECT no FROM names WHERE name = NEW.principal), NEW.active_ms, NEW.occupied_ms,
        NEW.foreign_ms, NEW.grantee_occupied_ms, NEW.unattributed_ms, NEW.energy_estimated_mj);
END;
CREATE TRIGGER windows_update INSTEAD OF UPDATE ON windows BEGIN
    INSERT OR IGNORE INTO names (name)
        VALUES (NEW.agent_id), (NEW.gpu_uuid), (NEW.grant_id), (NEW.principal);
    UPDATE window_rows SET
        agent_no = (SELECT no FROM names WHERE name = NEW.agent_id), seq = NEW.seq,
        card_no = (SELECT no FROM names WHERE name = NEW.gpu_uuid), start_ms = NEW.start_ms,
        end_ms = NEW.end_ms, interval_ms = NEW.interval_ms,
        expected_samples = NEW.expected_samples, good_samples = NEW.good_samples,
        util_avg_pct = NEW.util_avg_pct, util_max_pct = NEW.util_max_pct,
        mem_util_avg_pct = NEW.mem_util_avg_pct,
        memory_used_max_bytes = NEW.memory_used_max_bytes, energy_mj = NEW.energy_mj,
        energy_estimated = NEW.energy_estimated, power_avg_w = NEW.power_avg_w,
        temperature_max_c = NEW.temperature_max_c, throttle_reasons = NEW.throttle_reasons,
        health = NEW.health, unavailable_ms = NEW.unavailable_ms,
        assignment_status = NEW.assignment_status,
        grant_no = (SELECT no FROM names WHERE name = NEW.grant_id),
        principal_no = (SELECT no FROM names WHERE name = NEW.principal),
        active_ms = NEW.active_ms, occupied_ms = NEW.occupied_ms, foreign_ms = NEW.foreign_ms,
        grantee_occupied_ms = NEW.grantee_occupied_ms, unattributed_ms = NEW.unattributed_ms,
        energy_estimated_mj = NEW.energy_estimated_mj
    WHERE agent_no = (SELECT no FROM names WHERE name = OLD.agent_id) AND seq = OLD.seq;
END;
CREATE TRIGGER windows_delete INSTEAD OF DELETE ON windows BEGIN
    DELETE FROM window_rows
    WHERE agent_no = (SELECT no FROM names WHERE name = OLD.agent_id) AND seq = OLD.seq;
END;

CREATE TRIGGER window_principals_insert INSTEAD OF INSERT ON window_principals BEGIN
    INSERT OR IGNORE INTO names (name) VALUES (NEW.agent_id), (NEW.principal);
    INSERT INTO window_principal_rows VALUES (
        (SELECT no FROM names WHERE name = NEW.agent_id), NEW.seq,
        (SELECT no FROM names WHERE name = NEW.principal), NEW.uid, NEW.occupied_ms,
        NEW.active_ms, NEW.memory_max_bytes, NEW.process_count, NEW.matches_grant);
END;
CREATE TRIGGER window_principals_update INSTEAD OF UPDATE ON window_principals BEGIN
    INSERT OR IGNORE INTO names (name) VALUES (NEW.agent_id), (NEW.principal);
    UPDATE window_principal_rows SET
        agent_no = (SELECT no FROM names WHERE name = NEW.agent_id), seq = NEW.seq,
        principal_no = (SELECT no FROM names WHERE name = NEW.principal), uid = NEW.uid,
        occupied_ms = NEW.occupied_ms, active_ms = NEW.active_ms,
        memory_max_bytes = NEW.memory_max_bytes, process_count = NEW.process_count,
        matches_grant = NEW.matches_grant
    WHERE agent_no = (SELECT no FROM names WHERE name = OLD.agent_id) AND seq = OLD.seq
      AND principal_no = (SELECT no FROM names WHERE name = OLD.principal);
END;
CREATE TRIGGER window_principals_delete INSTEAD OF DELETE ON window_principals BEGIN
    DELETE FROM window_principal_rows
    WHERE agent_no = (SELECT no FROM names WHERE name = OLD.agent_id) AND seq = OLD.seq
      AND principal_no = (SELECT no FROM names WHERE name = OLD.principal);
END;
"#;

/// Names' numbers for one transaction of the writer: looked up (or added) once each, then
/// held. Held only for the transaction, so a rolled-back addition is never remembered.
#[derive(Debug, Default)]
pub struct Interner {
    held: HashMap<String, i64>,
}

impl Interner {
    /// The number of `name`, added to `names` if it is not there yet.
    pub fn no(&mut self, tx: &Transaction<'_>, name: &str) -> Result<i64, StoreError> {
        if let Some(&n) = self.held.get(name) {
            return Ok(n);
        }
        let found: Option<i64> = tx
            .prepare_cached("SELECT no FROM names WHERE name = ?1")
            .map_err(db)?
            .query_row(params![name], |r| r.get(0))
            .optional()
            .map_err(db)?;
        let n = match found {
            Some(n) => n,
            None => {
                tx.prepare_cached("INSERT INTO names (name) VALUES (?1)")
                    .map_err(db)?
                    .execute(params![name])
                    .map_err(db)?;
                tx.last_insert_rowid()
            }
        };
        self.held.insert(name.to_owned(), n);
        Ok(n)
    }
}
