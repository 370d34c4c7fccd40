//! Reading a PostgreSQL ledger for verification ([`PgLedger`], a [`ChainSource`]) and the
//! PostgreSQL side of signed heads (the rules and formats are `crate::heads`'s).
//!
//! A `PgLedger` is one connection holding one `REPEATABLE READ READ ONLY` transaction for its
//! whole life, so a verification sees a single snapshot of the ledger however long it runs
//! while ingest goes on. Records and derived rows are streamed through server-side cursors a
//! thousand rows at a time, never loaded whole. It never migrates or writes.

use crate::store::body_block::{RecordReader, StoredRecord};
use std::collections::{HashMap, VecDeque};

use ed25519_dalek::{Signer, SigningKey};
use gpumeter_proto::chain::GENESIS;
use postgres::types::ToSql;
use postgres::{GenericClient, Row};

use super::postgres::{
    EVENT_COLUMNS, PRINCIPAL_COLUMNS, PgConn, WINDOW_COLUMNS, db, event_row, principal_row, redact,
    schema_version, window_row,
};
use super::postgres_schema::MIGRATIONS;
use super::{PrincipalRow, StoreError};
use crate::heads::{Leaf, SignedHead, head_message, key_history_hash, merkle_root};
use crate::verify::{
    CardWindowRef, ChainRow, ChainSource, Derived, FlaggedWindow, KeyEntry, ScanItem,
    StoredCheckpoint,
};

/// Rows fetched per round trip from a cursor.
const FETCH: usize = 1000;

/// A read-only snapshot of a PostgreSQL ledger.
#[derive(Debug)]
pub struct PgLedger {
    conn: PgConn,
}

impl PgLedger {
    /// Opens `url` read-only; refuses a database that is not a gpumeter ledger of this
    /// collector's schema (an older one is migrated by opening it with the collector once).
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let conn = PgConn::open(url)?;
        let version = conn.with(|c| {
            c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .map_err(db)?;
            schema_version(c)
        })?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::SchemaTooNew {
                found: version,
                known,
            });
        }
        if version < known {
            return Err(StoreError::Open {
                path: redact(url),
                reason: format!(
                    "not a gpumeter ledger of schema version {known} (found {version}); a collector opening it migrates it"
                ),
            });
        }
        Ok(Self { conn })
    }

    fn rows(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StoreError> {
        self.conn.with(|c| c.query(sql, params).map_err(db))
    }

    fn cursor(
        &self,
        name: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Cursor<'_>, StoreError> {
        self.conn.with(|c| {
            c.execute(
                &format!("DECLARE {name} NO SCROLL CURSOR FOR {sql}"),
                params,
            )
            .map_err(db)
        })?;
        Ok(Cursor {
            conn: &self.conn,
            name,
            buf: VecDeque::new(),
            done: false,
        })
    }

    /// Body block `id` of `agent_id`: its uncompressed length and data.
    fn block(&self, agent_id: &str, id: i64) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        self.conn.with(|c| load_block(c, agent_id, id))
    }

    /// Signed heads held, oldest first, from `since_ms` on.
    pub fn heads(&self, since_ms: i64) -> Result<Vec<SignedHead>, StoreError> {
        self.conn.with(|c| load_heads(c, since_ms))
    }

    /// The ledger's current head leaves (what a head signed now would cover).
    pub fn leaves(&self) -> Result<Vec<Leaf>, StoreError> {
        self.conn.with(current_leaves)
    }
}

/// A server-side cursor inside the ledger's transaction.
struct Cursor<'a> {
    conn: &'a PgConn,
    name: &'static str,
    buf: VecDeque<Row>,
    done: bool,
}

impl Cursor<'_> {
    fn next(&mut self) -> Result<Option<Row>, StoreError> {
        if self.buf.is_empty() && !self.done {
            let sql = format!("FETCH {FETCH} FROM {}", self.name);
            let rows = self.conn.with(|c| c.query(&sql, &[]).map_err(db))?;
            self.done = rows.len() < FETCH;
            self.buf.extend(rows);
        }
        Ok(self.buf.pop_front())
    }
}

impl Drop for Cursor<'_> {
    fn drop(&mut self) {
        let sql = format!("CLOSE {}", self.name);
        let _ = self.conn.with(|c| c.batch_execute(&sql).map_err(db));
    }
}

fn u(v: i64) -> u64 {
    v.max(0) as u64
}

/// Body block `id` of `agent_id`: its uncompressed length and data.
pub(crate) fn load_block(
    c: &mut postgres::Client,
    agent_id: &str,
    id: i64,
) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
    Ok(c.query_opt(
        "SELECT raw_len, data FROM record_blocks WHERE id = $1 AND agent_id = $2",
        &[&id, &agent_id],
    )
    .map_err(db)?
    .map(|b| (b.get(0), b.get(1))))
}

/// A row of [`RECORDS_SQL`] as the ledger keeps it.
fn stored_record(r: &Row) -> StoredRecord {
    StoredRecord {
        seq: u(r.get(0)),
        prev_hash: r.get(1),
        hash: r.get(2),
        body: r.get(3),
        block: r.get(4),
    }
}

/// An agent's records in seq order, read back as signed by `body_block::RecordReader`.
const RECORDS_SQL: &str =
    "SELECT seq, prev_hash, hash, body, block FROM records WHERE agent_id = $1 ORDER BY seq";

fn key_entry(r: &Row, at: usize) -> KeyEntry {
    KeyEntry {
        public_key: r.get(at),
        from_seq: u(r.get(at + 1)),
        at_ms: r.get(at + 2),
        actor: r.get(at + 3),
        reason: r.get(at + 4),
    }
}

impl ChainSource for PgLedger {
    fn agents(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self
            .rows(
                "SELECT agent_id, public_key FROM agents ORDER BY agent_id",
                &[],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    fn scan_records(
        &self,
        agent_id: &str,
        visit: &mut dyn FnMut(ChainRow),
    ) -> Result<(), StoreError> {
        let mut cur = self.cursor("gpumeter_records", RECORDS_SQL, &[&agent_id])?;
        let mut read = RecordReader::default();
        while let Some(r) = cur.next()? {
            visit(read.row(stored_record(&r), |id| self.block(agent_id, id))?);
        }
        Ok(())
    }

    fn checkpoints(&self, agent_id: &str) -> Result<Vec<StoredCheckpoint>, StoreError> {
        Ok(self
            .rows(
                "SELECT epoch, seq, chain_hash, signature FROM checkpoints WHERE agent_id = $1 ORDER BY seq",
                &[&agent_id],
            )?
            .iter()
            .map(|r| StoredCheckpoint {
                epoch: u(r.get(0)),
                seq: u(r.get(1)),
                chain_hash: r.get(2),
                signature: r.get(3),
            })
            .collect())
    }

    fn scan(&self, agent_id: &str, visit: &mut dyn FnMut(ScanItem)) -> Result<(), StoreError> {
        let mut rec = self.cursor("gpumeter_scan_records", RECORDS_SQL, &[&agent_id])?;
        let mut read = RecordReader::default();
        let mut win = self.cursor(
            "gpumeter_scan_windows",
            &format!(
                "SELECT w.seq, {WINDOW_COLUMNS} FROM windows w WHERE w.agent_id = $1 ORDER BY w.seq"
            ),
            &[&agent_id],
        )?;
        let mut pr = self.cursor(
            "gpumeter_scan_principals",
            &format!(
                "SELECT p.seq, {PRINCIPAL_COLUMNS} FROM window_principals p WHERE p.agent_id = $1 ORDER BY p.seq, p.principal"
            ),
            &[&agent_id],
        )?;
        let mut ev = self.cursor(
            "gpumeter_scan_events",
            &format!(
                "SELECT e.seq, {EVENT_COLUMNS} FROM events e WHERE e.agent_id = $1 ORDER BY e.seq"
            ),
            &[&agent_id],
        )?;
        let mut fl = self.cursor(
            "gpumeter_scan_flags",
            "SELECT seq, flag FROM window_flags WHERE agent_id = $1 AND flag <> 'overlap' ORDER BY seq, flag",
            &[&agent_id],
        )?;
        let seq_of = |r: &Row| u(r.get(0));
        let mut r_next = rec.next()?;
        let mut w_next = win.next()?;
        let mut p_next = pr.next()?;
        let mut e_next = ev.next()?;
        let mut f_next = fl.next()?;
        loop {
            let Some(seq) = [&r_next, &w_next, &p_next, &e_next, &f_next]
                .into_iter()
                .filter_map(|r| r.as_ref().map(seq_of))
                .min()
            else {
                return Ok(());
            };
            if r_next.as_ref().is_some_and(|r| seq_of(r) == seq) {
                if let Some(r) = r_next.take() {
                    let row = read.row(stored_record(&r), |id| self.block(agent_id, id))?;
                    visit(ScanItem::Record(row));
                }
                r_next = rec.next()?;
            }
            if w_next.as_ref().is_some_and(|r| seq_of(r) == seq) {
                if let Some(r) = w_next.take() {
                    visit(ScanItem::Derived {
                        seq,
                        row: Derived::Window(window_row(&r, 1)),
                    });
                }
                w_next = win.next()?;
            }
            let mut group: Vec<PrincipalRow> = Vec::new();
            while p_next.as_ref().is_some_and(|r| seq_of(r) == seq) {
                if let Some(r) = p_next.take() {
                    group.push(principal_row(&r, 1));
                }
                p_next = pr.next()?;
            }
            if !group.is_empty() {
                visit(ScanItem::Derived {
                    seq,
                    row: Derived::Principals(group),
                });
            }
            if e_next.as_ref().is_some_and(|r| seq_of(r) == seq) {
                if let Some(r) = e_next.take() {
                    visit(ScanItem::Derived {
                        seq,
                        row: Derived::Event(event_row(&r, 1)),
                    });
                }
                e_next = ev.next()?;
            }
            let mut flags = Vec::new();
            while f_next.as_ref().is_some_and(|r| seq_of(r) == seq) {
                if let Some(r) = f_next.take() {
                    flags.push(r.get::<_, String>(1));
                }
                f_next = fl.next()?;
            }
            if !flags.is_empty() {
                visit(ScanItem::Derived {
                    seq,
                    row: Derived::Flags(flags),
                });
            }
        }
    }

    fn key_history(&self, agent_id: &str) -> Result<Vec<KeyEntry>, StoreError> {
        Ok(self
            .rows(
                "SELECT public_key, from_seq, at_ms, actor, reason FROM agent_keys WHERE agent_id = $1 ORDER BY idx",
                &[&agent_id],
            )?
            .iter()
            .map(|r| key_entry(r, 0))
            .collect())
    }

    fn card_memory(&self) -> Result<HashMap<String, u64>, StoreError> {
        Ok(self
            .rows(
                "SELECT gpu_uuid, memory_total_bytes FROM card_identity WHERE memory_total_bytes IS NOT NULL",
                &[],
            )?
            .iter()
            .map(|r| (r.get(0), u(r.get(1))))
            .collect())
    }

    fn derived_agents(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .rows(
                "SELECT agent_id FROM windows UNION SELECT agent_id FROM window_principals
                 UNION SELECT agent_id FROM events ORDER BY 1",
                &[],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    fn card_windows(&self, visit: &mut dyn FnMut(CardWindowRef)) -> Result<(), StoreError> {
        let mut cur = self.cursor(
            "gpumeter_card_windows",
            "SELECT w.gpu_uuid, w.start_ms, w.end_ms, w.agent_id, w.seq, o.other_agent_id, o.other_seq
             FROM windows w
             LEFT JOIN window_flags o ON o.agent_id = w.agent_id AND o.seq = w.seq AND o.flag = 'overlap'
             WHERE NOT EXISTS (SELECT 1 FROM window_flags i
                               WHERE i.agent_id = w.agent_id AND i.seq = w.seq AND i.flag = 'impossible')
             ORDER BY w.gpu_uuid, w.start_ms",
            &[],
        )?;
        while let Some(r) = cur.next()? {
            let other: Option<String> = r.get(5);
            let other_seq: Option<i64> = r.get(6);
            visit(CardWindowRef {
                gpu_uuid: r.get(0),
                start_ms: r.get(1),
                end_ms: r.get(2),
                agent_id: r.get(3),
                seq: u(r.get(4)),
                overlap_of: other.map(|a| (a, u(other_seq.unwrap_or(0)))),
            });
        }
        Ok(())
    }

    fn record_hash_at(&self, agent_id: &str, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .rows(
                "SELECT hash FROM records WHERE agent_id = $1 AND seq = $2",
                &[&agent_id, &(seq as i64)],
            )?
            .first()
            .map(|r| r.get(0)))
    }

    fn rollup_mismatches(&self) -> Result<Vec<crate::rollup::RollupMismatch>, StoreError> {
        self.conn.with(super::postgres_rollup::mismatches)
    }

    fn retention(&self) -> Result<crate::retention::Retention, StoreError> {
        self.conn.with(super::postgres_retention::load)
    }

    fn disputed(&self, agent_id: &str) -> Result<std::collections::HashSet<u64>, StoreError> {
        self.conn
            .with(|c| super::postgres_retention::disputed(c, agent_id))
    }

    fn rollups_before(
        &self,
        agent_id: &str,
        until_ms: i64,
    ) -> Result<Vec<crate::rollup::RollupRow>, StoreError> {
        self.conn
            .with(|c| super::postgres_retention::rollups_before(c, agent_id, until_ms))
    }

    fn flagged(&self, agent_id: &str) -> Result<Vec<FlaggedWindow>, StoreError> {
        Ok(self
            .rows(
                "SELECT seq, flag, detail FROM window_flags WHERE agent_id = $1 ORDER BY seq, flag",
                &[&agent_id],
            )?
            .iter()
            .map(|r| FlaggedWindow {
                seq: u(r.get(0)),
                flag: r.get(1),
                detail: r.get(2),
            })
            .collect())
    }
}

/// The leaves a head signed now would cover (see `crate::heads::current_leaves`).
pub fn current_leaves(c: &mut impl GenericClient) -> Result<Vec<Leaf>, StoreError> {
    let agents: Vec<String> = c
        .query("SELECT agent_id FROM agents ORDER BY agent_id", &[])
        .map_err(db)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut last: HashMap<String, (i64, i64, Vec<u8>)> = c
        .query(
            "SELECT DISTINCT ON (agent_id) agent_id, epoch, seq, chain_hash FROM checkpoints
             ORDER BY agent_id, seq DESC",
            &[],
        )
        .map_err(db)?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    let mut keys: HashMap<String, Vec<KeyEntry>> = HashMap::new();
    for r in c
        .query(
            "SELECT agent_id, public_key, from_seq, at_ms, actor, reason FROM agent_keys ORDER BY agent_id, idx",
            &[],
        )
        .map_err(db)?
    {
        keys.entry(r.get(0)).or_default().push(key_entry(&r, 1));
    }
    Ok(agents
        .into_iter()
        .map(|agent_id| {
            let (epoch, seq, chain_hash) =
                last.remove(&agent_id).unwrap_or((0, 0, GENESIS.to_vec()));
            let history = keys.remove(&agent_id).unwrap_or_default();
            Leaf {
                epoch: u(epoch),
                seq: u(seq),
                chain_hash,
                keys: history.len() as u32,
                key_hash: key_history_hash(&history).to_vec(),
                agent_id,
            }
        })
        .collect())
}

/// Signs a head over the ledger as `c` sees it and stores it (the caller holds the heads
/// lock in the same transaction); the latest head is returned again when nothing changed.
pub fn sign_and_store(
    c: &mut impl GenericClient,
    key: &SigningKey,
    at_ms: i64,
) -> Result<SignedHead, StoreError> {
    let leaves = current_leaves(c)?;
    let root = merkle_root(&leaves);
    let latest = c
        .query_opt(
            "SELECT id, root, public_key FROM heads ORDER BY id DESC LIMIT 1",
            &[],
        )
        .map_err(db)?
        .map(|r| {
            (
                r.get::<_, i64>(0),
                r.get::<_, Vec<u8>>(1),
                r.get::<_, Vec<u8>>(2),
            )
        });
    if let Some((id, held_root, held_key)) = latest {
        if held_root == root && held_key == key.verifying_key().to_bytes() {
            if let Some(h) = load_head(c, id as u64)? {
                return Ok(h);
            }
        }
    }
    let id: i64 = c
        .query_one("SELECT COALESCE(MAX(id), 0) + 1 FROM heads", &[])
        .map_err(db)?
        .get(0);
    let agents = leaves.len() as u64;
    let sig = key.sign(&head_message(id as u64, at_ms, agents, &root));
    let head = SignedHead {
        id: id as u64,
        at_ms,
        agents,
        root: root.to_vec(),
        leaves,
        public_key: key.verifying_key().to_bytes().to_vec(),
        signature: sig.to_bytes().to_vec(),
    };
    let leaves_json =
        serde_json::to_vec(&head.leaves).map_err(|e| StoreError::Db(e.to_string()))?;
    c.execute(
        "INSERT INTO heads (id, at_ms, agents, root, leaves, public_key, signature) VALUES ($1,$2,$3,$4,$5,$6,$7)",
        &[&id, &at_ms, &(agents as i64), &head.root, &leaves_json, &head.public_key, &head.signature],
    )
    .map_err(db)?;
    Ok(head)
}

fn head_of(r: &Row) -> Result<SignedHead, StoreError> {
    let id: i64 = r.get(0);
    let leaves: Vec<u8> = r.get(4);
    Ok(SignedHead {
        id: u(id),
        at_ms: r.get(1),
        agents: u(r.get(2)),
        root: r.get(3),
        leaves: serde_json::from_slice(&leaves)
            .map_err(|e| StoreError::Db(format!("head {id}: leaves: {e}")))?,
        public_key: r.get(5),
        signature: r.get(6),
    })
}

/// The head numbered `id`, when held.
pub fn load_head(c: &mut impl GenericClient, id: u64) -> Result<Option<SignedHead>, StoreError> {
    c.query_opt(
        "SELECT id, at_ms, agents, root, leaves, public_key, signature FROM heads WHERE id = $1",
        &[&(id as i64)],
    )
    .map_err(db)?
    .as_ref()
    .map(head_of)
    .transpose()
}

/// Heads stored from `since_ms` on, oldest first.
pub fn load_heads(
    c: &mut impl GenericClient,
    since_ms: i64,
) -> Result<Vec<SignedHead>, StoreError> {
    c.query(
        "SELECT id, at_ms, agents, root, leaves, public_key, signature FROM heads WHERE at_ms >= $1 ORDER BY id",
        &[&since_ms],
    )
    .map_err(db)?
    .iter()
    .map(head_of)
    .collect()
}
