//! The embedded SQLite store (rusqlite, bundled SQLite).
//!
//! Format and rules: one database file in WAL mode with `synchronous=FULL`, so a commit is on
//! disk before it returns and an ack is only sent after that. Schema versions are applied in
//! order from [`MIGRATIONS`] and recorded in `PRAGMA user_version`; a database newer than this
//! collector is refused. `records` keeps every record's body and chain link verbatim, keyed by
//! (agent_id, seq) forever; `windows`, `window_principals` and `events` are the decoded columns
//! of those bodies, for queries. Rows are never updated or deleted by ingest: a duplicate with
//! the same bytes is skipped, one with other bytes is kept out and raises an alarm.
//! Grants are the one thing changed in place, and only together with a `grant_history` row in
//! the same transaction: an amendment updates the `grants` row and rewrites the grant's
//! `grant_cards` rows, whose own bounds keep every card it ever held.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gpumeter_proto::chain::{GENESIS, Hash};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    AgentHello, AgentState, Alarm, AssignmentRow, CardMoveRow, CardUsageRow, CommitOutcome,
    EventRow, GpuRow, GrantChangeRow, GrantRecord, HostRow, IngestBatch, Invoice, MeteredWindow,
    PrincipalRow, RecordContent, Store, StoreError, StoredEvent, StoredInvoice, TenantUsageRow,
    TokenRow, Usage, WindowRow,
};
use crate::grants::{Amendment, Grant, GrantCard, Program, amend};

/// Schema migrations; entry i brings the schema to version i + 1.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE agents (
    agent_id TEXT PRIMARY KEY,
    host_id TEXT NOT NULL,
    csp TEXT NOT NULL,
    hostname TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    driver_version TEXT NOT NULL,
    public_key BLOB NOT NULL,
    epoch INTEGER NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE TABLE gpus (
    gpu_uuid TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    host_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    serial TEXT NOT NULL,
    pci_bus_id TEXT NOT NULL,
    memory_total_bytes INTEGER,
    mig_mode TEXT NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE INDEX gpus_by_host ON gpus(host_id);
CREATE TABLE records (
    agent_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    body BLOB NOT NULL,
    kind TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (agent_id, seq)
) WITHOUT ROWID;
CREATE TABLE checkpoints (
    agent_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    chain_hash BLOB NOT NULL,
    signature BLOB NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (agent_id, seq)
) WITHOUT ROWID;
CREATE TABLE windows (
    agent_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    gpu_uuid TEXT NOT NULL,
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
    grant_id TEXT NOT NULL,
    principal TEXT NOT NULL,
    active_ms INTEGER NOT NULL,
    occupied_ms INTEGER NOT NULL,
    foreign_ms INTEGER NOT NULL,
    PRIMARY KEY (agent_id, seq)
) WITHOUT ROWID;
CREATE INDEX windows_by_start ON windows(start_ms, gpu_uuid);
CREATE TABLE window_principals (
    agent_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    principal TEXT NOT NULL,
    uid INTEGER,
    occupied_ms INTEGER NOT NULL,
    active_ms INTEGER NOT NULL,
    memory_max_bytes INTEGER NOT NULL,
    process_count INTEGER NOT NULL,
    matches_grant INTEGER NOT NULL,
    PRIMARY KEY (agent_id, seq, principal)
) WITHOUT ROWID;
CREATE TABLE events (
    agent_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    gpu_uuid TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    code INTEGER NOT NULL,
    detail TEXT NOT NULL,
    pid INTEGER,
    principal TEXT NOT NULL,
    grant_id TEXT NOT NULL,
    mode TEXT NOT NULL,
    action TEXT NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (agent_id, seq)
) WITHOUT ROWID;
CREATE INDEX events_by_time ON events(at_ms);
CREATE TABLE alarms (
    id INTEGER PRIMARY KEY,
    agent_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    seq INTEGER,
    detail TEXT NOT NULL
);
CREATE TABLE grants (
    grant_id TEXT PRIMARY KEY,
    program TEXT NOT NULL,
    grantee TEXT NOT NULL,
    principal TEXT NOT NULL,
    csp TEXT NOT NULL,
    valid_from_ms INTEGER NOT NULL,
    valid_until_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER
);
CREATE TABLE grant_cards (
    grant_id TEXT NOT NULL REFERENCES grants(grant_id),
    host_id TEXT NOT NULL,
    gpu_uuid TEXT NOT NULL,
    PRIMARY KEY (grant_id, gpu_uuid)
);
CREATE INDEX grant_cards_by_host ON grant_cards(host_id);
CREATE TABLE grant_history (
    id INTEGER PRIMARY KEY,
    grant_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta (key, value) VALUES ('assignments_version', '1');
"#,
    // 2: grant amendments. A card moved into or out of a grant keeps its own bounds
    // (card_from_ms / card_until_ms, NULL: the grant's own), so it is known which card belonged
    // to a grant when. The table is rebuilt rather than altered because its old primary key
    // (grant_id, gpu_uuid) would forbid a card from coming back to a grant it once left.
    r#"
CREATE TABLE grant_cards_v2 (
    id INTEGER PRIMARY KEY,
    grant_id TEXT NOT NULL REFERENCES grants(grant_id),
    host_id TEXT NOT NULL,
    gpu_uuid TEXT NOT NULL,
    card_from_ms INTEGER,
    card_until_ms INTEGER
);
INSERT INTO grant_cards_v2 (id, grant_id, host_id, gpu_uuid)
    SELECT rowid, grant_id, host_id, gpu_uuid FROM grant_cards ORDER BY rowid;
DROP TABLE grant_cards;
ALTER TABLE grant_cards_v2 RENAME TO grant_cards;
CREATE INDEX grant_cards_by_host ON grant_cards(host_id);
CREATE INDEX grant_cards_by_grant ON grant_cards(grant_id);
CREATE INDEX grant_history_by_grant ON grant_history(grant_id);
"#,
    // 3: reconciliation. Windows keep the grantee's occupied time (NULL for windows from agents
    // older than the field). Invoices are appended, never updated: a re-issued invoice is a new
    // row, and the latest row for (csp, grant_id, period) is the one that counts.
    r#"
ALTER TABLE windows ADD COLUMN grantee_occupied_ms INTEGER;
CREATE INDEX events_by_kind_time ON events(kind, at_ms);
CREATE TABLE invoices (
    id INTEGER PRIMARY KEY,
    csp TEXT NOT NULL,
    grant_id TEXT NOT NULL,
    period TEXT NOT NULL,
    billed_gpu_hours REAL NOT NULL,
    line INTEGER NOT NULL,
    actor TEXT NOT NULL,
    imported_at_ms INTEGER NOT NULL
);
CREATE INDEX invoices_by_key ON invoices(csp, grant_id, period);
"#,
    // 4: the ledger's big tables become rowid tables keyed by a unique index. As WITHOUT ROWID
    // tables, every row over ~1 KB (most record bodies) overflowed to pages of its own and
    // each small commit rewrote partly filled pages per agent; appends by rowid touch far
    // fewer pages (the ingest benchmark measured the difference).
    r#"
CREATE TABLE records_v4 (
    agent_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    body BLOB NOT NULL,
    kind TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL
);
INSERT INTO records_v4 SELECT agent_id, seq, prev_hash, hash, body, kind, created_ms, received_ms
    FROM records ORDER BY received_ms, agent_id, seq;
DROP TABLE records;
ALTER TABLE records_v4 RENAME TO records;
CREATE UNIQUE INDEX records_key ON records(agent_id, seq);

CREATE TABLE windows_v4 (
    agent_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    gpu_uuid TEXT NOT NULL,
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
    grant_id TEXT NOT NULL,
    principal TEXT NOT NULL,
    active_ms INTEGER NOT NULL,
    occupied_ms INTEGER NOT NULL,
    foreign_ms INTEGER NOT NULL,
    grantee_occupied_ms INTEGER
);
INSERT INTO windows_v4 SELECT agent_id, seq, gpu_uuid, start_ms, end_ms, interval_ms,
    expected_samples, good_samples, util_avg_pct, util_max_pct, mem_util_avg_pct,
    memory_used_max_bytes, energy_mj, energy_estimated, power_avg_w, temperature_max_c,
    throttle_reasons, health, unavailable_ms, assignment_status, grant_id, principal,
    active_ms, occupied_ms, foreign_ms, grantee_occupied_ms FROM windows ORDER BY start_ms;
DROP TABLE windows;
ALTER TABLE windows_v4 RENAME TO windows;
CREATE UNIQUE INDEX windows_key ON windows(agent_id, seq);
CREATE INDEX windows_by_start ON windows(start_ms, gpu_uuid);

CREATE TABLE window_principals_v4 (
    agent_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    principal TEXT NOT NULL,
    uid INTEGER,
    occupied_ms INTEGER NOT NULL,
    active_ms INTEGER NOT NULL,
    memory_max_bytes INTEGER NOT NULL,
    process_count INTEGER NOT NULL,
    matches_grant INTEGER NOT NULL
);
INSERT INTO window_principals_v4 SELECT agent_id, seq, principal, uid, occupied_ms, active_ms,
    memory_max_bytes, process_count, matches_grant FROM window_principals;
DROP TABLE window_principals;
ALTER TABLE window_principals_v4 RENAME TO window_principals;
CREATE UNIQUE INDEX window_principals_key ON window_principals(agent_id, seq, principal);
"#,
    // 5: ledger integrity (see crate::integrity). Every key an agent has had, from the seq it
    // first signs; signed ledger heads; windows kept but counted in no figure (impossible
    // values, or card time another window already covers); each card's identity as first
    // reported. Existing agents get their pinned key as the first history entry.
    r#"
CREATE TABLE agent_keys (
    agent_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    public_key BLOB NOT NULL,
    from_seq INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (agent_id, idx)
);
INSERT INTO agent_keys (agent_id, idx, public_key, from_seq, at_ms, actor, reason)
    SELECT agent_id, 0, public_key, 1, first_seen_ms, 'migration', 'key pinned before key history'
    FROM agents;
CREATE TABLE heads (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    agents INTEGER NOT NULL,
    root BLOB NOT NULL,
    leaves BLOB NOT NULL,
    public_key BLOB NOT NULL,
    signature BLOB NOT NULL
);
CREATE TABLE window_flags (
    agent_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    flag TEXT NOT NULL,
    other_agent_id TEXT,
    other_seq INTEGER,
    detail TEXT NOT NULL,
    PRIMARY KEY (agent_id, seq, flag)
);
CREATE INDEX windows_by_card ON windows(gpu_uuid, start_ms, end_ms, agent_id, seq);
CREATE TABLE card_identity (
    gpu_uuid TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    host_id TEXT NOT NULL,
    name TEXT NOT NULL,
    serial TEXT NOT NULL,
    pci_bus_id TEXT NOT NULL,
    memory_total_bytes INTEGER,
    first_seen_ms INTEGER NOT NULL
);
INSERT INTO card_identity SELECT gpu_uuid, agent_id, host_id, name, serial, pci_bus_id,
    memory_total_bytes, last_seen_ms FROM gpus;
CREATE TABLE grant_card_models (
    grant_id TEXT NOT NULL,
    gpu_uuid TEXT NOT NULL,
    gpu_model TEXT NOT NULL,
    PRIMARY KEY (grant_id, gpu_uuid)
);
"#,
    // Bearer tokens for people: only the SHA-256 of each secret; names never reused.
    r#"
CREATE TABLE api_tokens (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
"#,
    // 7: card binding. A card belongs to the host that first reported it (`gpus.host_id`, no
    // longer moved by another host's Hello) or to the host an admin moved it to (`card_moves`,
    // the history with who and when). A window that arrives for a card another host holds is
    // stored (the chain must stay whole) and listed in `disputed_windows` with the host that
    // reported it; queries leave it out of every figure unless the card's holder is, by now,
    // that host (an admin moved the card to it).
    r#"
CREATE TABLE disputed_windows (
    agent_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    gpu_uuid TEXT NOT NULL,
    host_id TEXT NOT NULL,
    owner_host_id TEXT NOT NULL,
    PRIMARY KEY (agent_id, seq)
) WITHOUT ROWID;
CREATE TABLE card_moves (
    id INTEGER PRIMARY KEY,
    gpu_uuid TEXT NOT NULL,
    from_host_id TEXT NOT NULL,
    to_host_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX card_moves_by_card ON card_moves(gpu_uuid);
"#,
    // 8: windows keep the time the card was used with no process visible, and the energy
    // estimated from power where the card's counter was frozen (NULL for windows from agents
    // older than the fields, and where there was no frozen counter).
    r#"
ALTER TABLE windows ADD COLUMN unattributed_ms INTEGER;
ALTER TABLE windows ADD COLUMN energy_estimated_mj INTEGER;
ALTER TABLE gpus ADD COLUMN parent_uuid TEXT NOT NULL DEFAULT '';
ALTER TABLE gpus ADD COLUMN mig_profile TEXT NOT NULL DEFAULT '';
ALTER TABLE gpus ADD COLUMN mig_slices INTEGER;
ALTER TABLE gpus ADD COLUMN parent_slices INTEGER;
"#,
    // 9: rollups per card and hour and per card and Seoul day (crate::rollup), filled from the
    // windows already stored.
    super::sqlite_rollup::MIGRATION,
    // 10: the providers and hosts registry (crate::registry) and its history.
    r#"
CREATE TABLE providers (
    csp TEXT PRIMARY KEY,
    name_ko TEXT NOT NULL,
    name_en TEXT NOT NULL,
    committed_hpc INTEGER NOT NULL,
    committed_research INTEGER NOT NULL,
    committed_advanced INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    updated_by TEXT NOT NULL
);
CREATE TABLE registered_hosts (
    host_id TEXT PRIMARY KEY,
    csp TEXT NOT NULL REFERENCES providers(csp),
    updated_ms INTEGER NOT NULL,
    updated_by TEXT NOT NULL
);
CREATE TABLE registry_history (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
"#,
    // 11: a compact ledger (crate::store::body_block). Bodies committed from now on lie in one
    // zstd block per batch (`records.block`, body NULL), and a record whose prev_hash is the
    // hash of the record before it in its batch keeps no copy of it (prev_hash NULL). Records
    // already stored keep their bodies and links as they are. With bodies out of their rows,
    // records and window principals are small rows keyed by (agent, seq[, principal]): as
    // WITHOUT ROWID tables their key is the table, not a second b-tree beside it.
    r#"
CREATE TABLE record_blocks (
    id INTEGER PRIMARY KEY,
    agent_id TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    raw_len INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE records_v11 (
    agent_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    prev_hash BLOB,
    hash BLOB NOT NULL,
    body BLOB,
    block INTEGER,
    kind TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (agent_id, seq)
) WITHOUT ROWID;
INSERT INTO records_v11 (agent_id, seq, prev_hash, hash, body, kind, created_ms, received_ms)
    SELECT agent_id, seq, prev_hash, hash, body, kind, created_ms, received_ms FROM records;
DROP TABLE records;
ALTER TABLE records_v11 RENAME TO records;
CREATE TABLE window_principals_v11 (
    agent_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    principal TEXT NOT NULL,
    uid INTEGER,
    occupied_ms INTEGER NOT NULL,
    active_ms INTEGER NOT NULL,
    memory_max_bytes INTEGER NOT NULL,
    process_count INTEGER NOT NULL,
    matches_grant INTEGER NOT NULL,
    PRIMARY KEY (agent_id, seq, principal)
) WITHOUT ROWID;
INSERT INTO window_principals_v11 SELECT agent_id, seq, principal, uid, occupied_ms, active_ms,
    memory_max_bytes, process_count, matches_grant FROM window_principals;
DROP TABLE window_principals;
ALTER TABLE window_principals_v11 RENAME TO window_principals;
"#,
    // 12: names interned (crate::store::sqlite_names): windows and window principals become
    // views over narrow row tables keyed by numbers.
    super::sqlite_names::MIGRATION,
    // 13: retention (crate::retention): cuts, pins and runs; rollups by agent; grant cards by
    // card.
    super::sqlite_retention::MIGRATION,
];

/// The version whose migration is followed by the rollups' backfill.
const ROLLUPS_VERSION: usize = 9;

/// The windows that count (alias `w`): all but those reported for a card another host held,
/// unless the card has since been moved to the reporting host (see migration 7).
const COUNTED: &str = "NOT EXISTS (SELECT 1 FROM disputed_windows d JOIN gpus o ON o.gpu_uuid = d.gpu_uuid
                         WHERE d.agent_id = w.agent_id AND d.seq = w.seq AND o.host_id <> d.host_id)";

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

/// SQLite-backed [`Store`]. One connection writes (used by the single writer thread), another
/// reads, so queries never wait behind a commit.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    writer: Arc<Mutex<Connection>>,
    reader: Mutex<Connection>,
    /// The collector's head-signing key, loaded beside the database on first use.
    head_key: std::sync::OnceLock<ed25519_dalek::SigningKey>,
    /// Token lookups (every Query and Admin call) on their own connection, so they never
    /// wait behind a long report query.
    auth: Mutex<Connection>,
    /// Dropping it stops the checkpointer thread (after a last checkpoint).
    _checkpointer: Checkpointer,
}

/// Copies the write-ahead log into the database off the writer's commit path: the writer's
/// connection never checkpoints (`wal_autocheckpoint=0`); this thread, on a connection of its
/// own, runs a PASSIVE checkpoint (which never waits for the writer) every
/// [`CHECKPOINT_EVERY`]. Under steady ingest the writer appends while a PASSIVE checkpoint
/// copies, so the log is never wholly copied when the next commit begins and SQLite never
/// starts it over: it would grow, every commit writing into fresh file blocks (which the
/// kernel zeroes first: an eighth of the writer's time at 20,000 records/s). So once the log
/// passes [`WAL_RESTART_BYTES`], a RESTART checkpoint follows the PASSIVE one, between two
/// commits (it holds the writer's connection, so no commit is under way and none starts): it
/// has only the frames appended since the PASSIVE one to copy, and it waits at most
/// [`RESTART_WAIT`] for readers (a long report must not hold ingest up), to try again next
/// time. The next commit then starts the log over, reusing its blocks (`journal_size_limit`
/// bounds what it keeps). A TRUNCATE checkpoint, past [`WAL_TRUNCATE_BYTES`] or as the store
/// closes, leaves no log.
#[derive(Debug)]
struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
const WAL_RESTART_BYTES: u64 = 32 << 20;
const RESTART_WAIT: std::time::Duration = std::time::Duration::from_millis(20);
const WAL_TRUNCATE_BYTES: u64 = 256 << 20;
/// What the writer keeps of the log's file when it starts the log over.
const WAL_KEEP_BYTES: i64 = 64 << 20;

impl Checkpointer {
    fn start(path: &Path, writer: std::sync::Weak<Mutex<Connection>>) -> Result<Self, StoreError> {
        let c = open_conn(path)?;
        let wal = PathBuf::from(format!("{}-wal", path.display()));
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                use std::sync::mpsc::RecvTimeoutError;
                // A checkpoint that gave up waiting (SQLITE_BUSY, its first column 1) is
                // no failure: the next round tries again.
                let checkpoint = |mode: &str, wait: std::time::Duration| {
                    let r = c.busy_timeout(wait).and_then(|()| {
                        c.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(()))
                    });
                    if let Err(e) = r {
                        tracing::warn!(error = %e, mode, "WAL checkpoint failed; retrying");
                    }
                };
                let log_len = || std::fs::metadata(&wal).map_or(0, |m| m.len());
                loop {
                    let last = !matches!(
                        stopped.recv_timeout(CHECKPOINT_EVERY),
                        Err(RecvTimeoutError::Timeout)
                    );
                    // The last one, as the store closes, leaves no log behind.
                    if last || log_len() > WAL_TRUNCATE_BYTES {
                        checkpoint("TRUNCATE", std::time::Duration::from_secs(30));
                    } else {
                        checkpoint("PASSIVE", std::time::Duration::from_secs(30));
                        if log_len() > WAL_RESTART_BYTES
                            && let Some(writer) = writer.upgrade()
                        {
                            let _between_commits = writer.lock().unwrap_or_else(|p| p.into_inner());
                            checkpoint("RESTART", RESTART_WAIT);
                        }
                    }
                    if last {
                        return;
                    }
                }
            })
            .map_err(|e| StoreError::Db(format!("starting the checkpoint thread: {e}")))?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open_conn(path: &Path) -> Result<Connection, StoreError> {
    let c = Connection::open(path).map_err(|e| StoreError::Open {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    c.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(db)?;
    c.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
        .map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    Ok(c)
}

/// Applies pending migrations in one transaction each.
pub fn migrate(c: &mut Connection) -> Result<i64, StoreError> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db)?;
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = c.transaction().map_err(db)?;
        tx.execute_batch(sql).map_err(db)?;
        if i + 1 == ROLLUPS_VERSION {
            super::sqlite_rollup::backfill(&tx)?;
        }
        tx.pragma_update(None, "user_version", i as i64 + 1)
            .map_err(db)?;
        tx.commit().map_err(db)?;
    }
    Ok(known)
}

fn hash_from(v: Vec<u8>) -> Hash {
    v.as_slice().try_into().unwrap_or(GENESIS)
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut w = open_conn(path)?;
        migrate(&mut w)?;
        w.pragma_update(None, "wal_autocheckpoint", 0).map_err(db)?;
        // The writer's group commits touch a page or more per card of every table: a page
        // cache of SQLite's default 2 MiB spilled them to the log mid-transaction. Each batch's
        // savepoint keeps the pages it first changes in a statement journal, in memory rather
        // than in temporary files (migrations, which may build large temporary tables, have
        // run by now).
        w.execute_batch(&format!(
            "PRAGMA cache_size = -32768; PRAGMA temp_store = MEMORY; PRAGMA journal_size_limit = {WAL_KEEP_BYTES};"
        ))
        .map_err(db)?;
        let r = open_conn(path)?;
        let a = open_conn(path)?;
        let writer = Arc::new(Mutex::new(w));
        let checkpointer = Checkpointer::start(path, Arc::downgrade(&writer))?;
        Ok(Self {
            path: path.to_path_buf(),
            writer,
            reader: Mutex::new(r),
            head_key: std::sync::OnceLock::new(),
            auth: Mutex::new(a),
            _checkpointer: checkpointer,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves bodies stored verbatim (before migration 11) into blocks
    /// ([`super::sqlite_compact`]), on the writer's connection.
    pub fn compact_verbatim(
        &self,
        per_block: usize,
    ) -> Result<super::sqlite_compact::Compacted, StoreError> {
        super::sqlite_compact::compact(&mut self.w(), per_block)
    }

    /// Rewrites the file without its free pages.
    pub fn vacuum(&self) -> Result<(), StoreError> {
        self.w().execute_batch("VACUUM").map_err(db)
    }

    /// The collector's signing key, beside the database (created on first use).
    fn collector_key(&self) -> Result<&ed25519_dalek::SigningKey, StoreError> {
        if let Some(k) = self.head_key.get() {
            return Ok(k);
        }
        let k = crate::heads::load_or_create_key(&self.path)?;
        Ok(self.head_key.get_or_init(|| k))
    }

    fn w(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn r(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The group commit: one transaction. With `isolate`, a batch whose insert fails is
    /// rolled back alone (with an alarm), and every later batch of the same agent in this
    /// commit fails with it (its chain would have a hole): the group is first tried whole,
    /// without a savepoint per batch (a savepoint's statement journal and its own statements
    /// cost about as much as an 8-record batch's inserts), and only when a batch fails is the
    /// transaction rolled back and the group committed again with one savepoint per batch.
    fn commit_batches(
        &self,
        batches: &[IngestBatch],
        isolate: bool,
    ) -> Result<Vec<Result<CommitOutcome, StoreError>>, StoreError> {
        let retry = match self.commit_group(batches, false)? {
            Attempt::Done(outcomes) => return Ok(outcomes),
            Attempt::Failed(e) if !isolate => return Err(e),
            Attempt::Failed(_) => self.commit_group(batches, true)?,
        };
        match retry {
            Attempt::Done(outcomes) => Ok(outcomes),
            Attempt::Failed(e) => Err(e),
        }
    }

    /// One attempt at a group commit: `savepoints`, each batch under one of its own, rolled
    /// back alone when it fails; without, the first batch that fails gives the attempt up.
    fn commit_group<'b>(
        &self,
        batches: &'b [IngestBatch],
        savepoints: bool,
    ) -> Result<Attempt, StoreError> {
        let mut c = self.w();
        // IMMEDIATE: the commit takes the write lock before its first read (the next block
        // id), so another process's write waits under the busy timeout instead of turning
        // this transaction's read snapshot stale (SQLITE_BUSY_SNAPSHOT, which no timeout
        // retries).
        let tx = c
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db)?;
        let mut outcomes = Vec::with_capacity(batches.len());
        {
            // Bodies go into one block per batch (`body_block`), written after its records;
            // ids are handed out here, by the only writer, so records can name theirs.
            let mut ins_rec = tx
                .prepare_cached(
                    "INSERT INTO records (agent_id, seq, prev_hash, hash, body, block, kind, created_ms, received_ms)
                     VALUES (?1,?2,?3,?4,NULL,?5,?6,?7,?8) ON CONFLICT(agent_id, seq) DO NOTHING",
                )
                .map_err(db)?;
            let mut ins_block = tx
                .prepare_cached(
                    "INSERT INTO record_blocks (id, agent_id, first_seq, last_seq, raw_len, data)
                     VALUES (?1,?2,?3,?4,?5,?6)",
                )
                .map_err(db)?;
            let mut next_block: i64 = tx
                .query_row(
                    "SELECT COALESCE(MAX(id), 0) + 1 FROM record_blocks",
                    [],
                    |r| r.get(0),
                )
                .map_err(db)?;
            let mut get_hash = tx
                .prepare_cached("SELECT hash FROM records WHERE agent_id=?1 AND seq=?2")
                .map_err(db)?;
            let mut ins_win = tx
                .prepare_cached(
                    "INSERT INTO window_rows (agent_no, seq, card_no, start_ms, end_ms, interval_ms, expected_samples, good_samples,
                       util_avg_pct, util_max_pct, mem_util_avg_pct, memory_used_max_bytes, energy_mj, energy_estimated, power_avg_w,
                       temperature_max_c, throttle_reasons, health, unavailable_ms, assignment_status, grant_no, principal_no,
                       active_ms, occupied_ms, foreign_ms, grantee_occupied_ms, unattributed_ms, energy_estimated_mj)
                     VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20,?21,?22,?23,?24,?25,?26,?27,?28)",
                )
                .map_err(db)?;
            let mut ins_pr = tx
                .prepare_cached(
                    "INSERT INTO window_principal_rows (agent_no, seq, principal_no, uid, occupied_ms, active_ms, memory_max_bytes, process_count, matches_grant)
                     VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)",
                )
                .map_err(db)?;
            let mut ins_ev = tx
                .prepare_cached(
                    "INSERT INTO events (agent_id, seq, gpu_uuid, at_ms, kind, code, detail, pid, principal, grant_id, mode, action, result)
                     VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13)",
                )
                .map_err(db)?;
            let mut mark_disputed = tx
                .prepare_cached(
                    "INSERT INTO disputed_windows (agent_id, seq, gpu_uuid, host_id, owner_host_id)
                     SELECT a.agent_id, ?2, g.gpu_uuid, a.host_id, g.host_id
                     FROM agents a JOIN gpus g ON g.gpu_uuid = ?3
                     WHERE a.agent_id = ?1 AND g.host_id <> a.host_id",
                )
                .map_err(db)?;
            let mut ins_cp = tx
                .prepare_cached(
                    "INSERT INTO checkpoints (agent_id, epoch, seq, chain_hash, signature, received_ms)
                     VALUES (?1,?2,?3,?4,?5,?6) ON CONFLICT(agent_id, seq) DO NOTHING",
                )
                .map_err(db)?;
            let mut names = super::sqlite_names::Interner::default();
            // A savepoint rolled back takes its new names with it: the interner is then dropped.
            // Counted windows go to the rollups per agent, once per group (summed per row
            // first), or with each batch inside its savepoint when batches are isolated.
            let mut one = |b: &'b IngestBatch,
                           names: &mut super::sqlite_names::Interner|
             -> Result<(CommitOutcome, Rolled<'b>), StoreError> {
                let mut out = CommitOutcome::default();
                let mut disputed: Vec<(u64, String)> = Vec::new();
                let mut rolled: Rolled<'b> = Vec::new();
                let block = next_block;
                let mut bodies: Vec<(u64, &[u8])> = Vec::new();
                // The seq and hash now held just before the record at hand: a record that
                // links to it keeps no copy of its prev_hash.
                let mut held_prev: Option<(u64, &[u8])> = None;
                for r in &b.records {
                    let seq = r.seq as i64;
                    let links = held_prev
                        .is_some_and(|(s, h)| s + 1 == r.seq && h == r.prev_hash.as_slice());
                    let n = ins_rec
                        .execute(params![
                            b.agent_id,
                            seq,
                            (!links).then_some(&r.prev_hash[..]),
                            &r.hash[..],
                            block,
                            r.content.kind(),
                            r.created_ms,
                            b.received_ms
                        ])
                        .map_err(db)?;
                    held_prev = Some((r.seq, r.hash.as_slice()));
                    if n == 1 {
                        bodies.push((r.seq, r.body.as_slice()));
                    }
                    if n == 0 {
                        let held: Vec<u8> = get_hash
                            .query_row(params![b.agent_id, seq], |row| row.get(0))
                            .map_err(db)?;
                        if held.as_slice() == r.hash.as_slice() {
                            out.duplicates += 1;
                        } else {
                            held_prev = None;
                            out.equivocations.push(r.seq);
                            insert_alarm(
                                &tx,
                                &Alarm {
                                    agent_id: b.agent_id.clone(),
                                    at_ms: b.received_ms,
                                    kind: "equivocation".into(),
                                    seq: Some(r.seq),
                                    // The batch's signed checkpoint covers the other
                                    // history; it stays here as the evidence, since it
                                    // cannot go into `checkpoints` (see below).
                                    detail: format!(
                                        "seq {} re-sent with different bytes (held hash {}, new hash {}); the first copy is kept; the re-sent batch's checkpoint: epoch {}, seq {}, chain hash {}, signature {}",
                                        r.seq,
                                        hex::encode(&held),
                                        hex::encode(r.hash),
                                        b.checkpoint.epoch,
                                        b.checkpoint.seq,
                                        hex::encode(b.checkpoint.chain_hash),
                                        hex::encode(&b.checkpoint.signature)
                                    ),
                                },
                            )?;
                        }
                        continue;
                    }
                    match &r.content {
                        RecordContent::Window(w) => {
                            let agent_no = names.no(&tx, &b.agent_id)?;
                            let card_no = names.no(&tx, &w.gpu_uuid)?;
                            let grant_no = names.no(&tx, &w.grant_id)?;
                            let principal_no = names.no(&tx, &w.principal)?;
                            ins_win
                                .execute(params![
                                    agent_no,
                                    seq,
                                    card_no,
                                    w.start_ms,
                                    w.end_ms,
                                    w.interval_ms as i64,
                                    w.expected_samples,
                                    w.good_samples,
                                    w.util_avg_pct,
                                    w.util_max_pct,
                                    w.mem_util_avg_pct,
                                    opt_u64(w.memory_used_max_bytes),
                                    opt_u64(w.energy_mj),
                                    w.energy_estimated,
                                    w.power_avg_w,
                                    w.temperature_max_c,
                                    opt_u64(w.throttle_reasons),
                                    w.health,
                                    w.unavailable_ms as i64,
                                    w.assignment_status,
                                    grant_no,
                                    principal_no,
                                    w.active_ms as i64,
                                    w.occupied_ms as i64,
                                    w.foreign_ms as i64,
                                    opt_u64(w.grantee_occupied_ms),
                                    opt_u64(w.unattributed_ms),
                                    opt_u64(w.energy_estimated_mj)
                                ])
                                .map_err(db)?;
                            let is_disputed = mark_disputed
                                .execute(params![b.agent_id, seq, w.gpu_uuid])
                                .map_err(db)?
                                > 0;
                            if is_disputed {
                                disputed.push((r.seq, w.gpu_uuid.clone()));
                            }
                            for p in &w.principals {
                                let principal_no = names.no(&tx, &p.principal)?;
                                ins_pr
                                    .execute(params![
                                        agent_no,
                                        seq,
                                        principal_no,
                                        p.uid,
                                        p.occupied_ms as i64,
                                        p.active_ms as i64,
                                        p.memory_max_bytes as i64,
                                        p.process_count,
                                        p.matches_grant
                                    ])
                                    .map_err(db)?;
                            }
                            let flagged = super::sqlite_integrity::check_window(
                                &tx,
                                &b.agent_id,
                                r.seq,
                                w,
                                b.received_ms,
                            )?;
                            if !flagged {
                                rolled.push((seq, w, is_disputed));
                            }
                        }
                        RecordContent::Event(e) => {
                            ins_ev
                                .execute(params![
                                    b.agent_id,
                                    seq,
                                    e.gpu_uuid,
                                    e.at_ms,
                                    e.kind,
                                    e.code,
                                    e.detail,
                                    e.pid,
                                    e.principal,
                                    e.grant_id,
                                    e.mode,
                                    e.action,
                                    e.result
                                ])
                                .map_err(db)?;
                        }
                        // The agent says, signed, that something is missing: operators and
                        // auditors must see it without decoding bodies.
                        RecordContent::Gap {
                            from_ms,
                            until_ms,
                            reason,
                        } => insert_alarm(
                            &tx,
                            &Alarm {
                                agent_id: b.agent_id.clone(),
                                at_ms: b.received_ms,
                                kind: "agent_gap".into(),
                                seq: Some(r.seq),
                                detail: format!(
                                    "the agent did not record {from_ms}..{until_ms} (ms since the epoch): {reason}"
                                ),
                            },
                        )?,
                        RecordContent::EpochStart {
                            epoch,
                            last_acked_seq,
                        } => insert_alarm(
                            &tx,
                            &Alarm {
                                agent_id: b.agent_id.clone(),
                                at_ms: b.received_ms,
                                kind: "epoch_start".into(),
                                seq: Some(r.seq),
                                detail: format!(
                                    "the agent lost its spool and started epoch {epoch} after seq {last_acked_seq}"
                                ),
                            },
                        )?,
                        RecordContent::Unknown => {}
                    }
                }
                if !bodies.is_empty() {
                    let z = super::body_block::encode(bodies);
                    ins_block
                        .execute(params![
                            block,
                            b.agent_id,
                            z.first_seq as i64,
                            z.last_seq as i64,
                            z.raw_len as i64,
                            z.data
                        ])
                        .map_err(db)?;
                    next_block += 1;
                }
                // A batch that re-sent a record with other bytes comes with a checkpoint
                // over the other history (links inside a batch are verified), which the
                // ledger does not hold: stored, it would make the kept chain fail
                // verification for good. Only a checkpoint matching the stored chain goes in.
                let cp = &b.checkpoint;
                let vouches = out.equivocations.is_empty()
                    || get_hash
                        .query_row(params![b.agent_id, cp.seq as i64], |row| {
                            row.get::<_, Vec<u8>>(0)
                        })
                        .optional()
                        .map_err(db)?
                        .is_some_and(|h| h.as_slice() == cp.chain_hash.as_slice());
                if vouches {
                    ins_cp
                        .execute(params![
                            b.agent_id,
                            cp.epoch as i64,
                            cp.seq as i64,
                            &cp.chain_hash[..],
                            cp.signature,
                            b.received_ms
                        ])
                        .map_err(db)?;
                }
                for a in &b.alarms {
                    insert_alarm(&tx, a)?;
                }
                if let (Some(first), Some(last)) = (disputed.first(), disputed.last()) {
                    let mut cards: Vec<&str> = disputed.iter().map(|(_, u)| u.as_str()).collect();
                    cards.sort_unstable();
                    cards.dedup();
                    insert_alarm(
                        &tx,
                        &Alarm {
                            agent_id: b.agent_id.clone(),
                            at_ms: b.received_ms,
                            kind: "card_not_owned".into(),
                            seq: Some(first.0),
                            detail: format!(
                                "{} windows (seq {}..={}) for cards another host holds: {}; they count in no figure until an admin moves the card (hosts move-card)",
                                disputed.len(),
                                first.0,
                                last.0,
                                cards.join(", ")
                            ),
                        },
                    )?;
                }
                let st = Self::durable(&tx, &b.agent_id)?;
                out.durable_seq = st.durable_seq;
                out.durable_hash = st.durable_hash;
                Ok((out, rolled))
            };
            let mut failed: std::collections::HashSet<&str> = std::collections::HashSet::new();
            let mut rolled_by_agent: std::collections::BTreeMap<&str, Rolled<'b>> =
                Default::default();
            for b in batches {
                if !savepoints {
                    match one(b, &mut names) {
                        Ok((o, rolled)) => {
                            rolled_by_agent
                                .entry(b.agent_id.as_str())
                                .or_default()
                                .extend(rolled);
                            outcomes.push(Ok(o));
                        }
                        // Dropped, the transaction rolls back.
                        Err(e) => return Ok(Attempt::Failed(e)),
                    }
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
                tx.execute_batch("SAVEPOINT batch").map_err(db)?;
                let stored = one(b, &mut names).and_then(|(o, rolled)| {
                    super::sqlite_rollup::add_windows(&tx, &b.agent_id, &rolled)?;
                    Ok(o)
                });
                match stored {
                    Ok(o) => {
                        tx.execute_batch("RELEASE batch").map_err(db)?;
                        outcomes.push(Ok(o));
                    }
                    Err(e) => {
                        tx.execute_batch("ROLLBACK TO batch; RELEASE batch")
                            .map_err(db)?;
                        names = super::sqlite_names::Interner::default();
                        failed.insert(b.agent_id.as_str());
                        let reason = e.to_string();
                        insert_alarm(
                            &tx,
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
            for (agent_id, rolled) in &rolled_by_agent {
                if let Err(e) = super::sqlite_rollup::add_windows(&tx, agent_id, rolled) {
                    return Ok(Attempt::Failed(e));
                }
            }
        }

        tx.commit().map_err(db)?;
        Ok(Attempt::Done(outcomes))
    }

    fn durable(c: &Connection, agent_id: &str) -> Result<AgentState, StoreError> {
        let row: Option<(i64, Vec<u8>)> = c
            .query_row(
                "SELECT seq, hash FROM records WHERE agent_id = ?1 ORDER BY seq DESC LIMIT 1",
                params![agent_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db)?;
        Ok(match row {
            Some((seq, h)) => AgentState {
                durable_seq: seq as u64,
                durable_hash: hash_from(h),
                epoch: 0,
            },
            None => AgentState {
                durable_seq: 0,
                durable_hash: GENESIS,
                epoch: 0,
            },
        })
    }
}

/// What one attempt at a group commit came to.
enum Attempt {
    Done(Vec<Result<CommitOutcome, StoreError>>),
    /// A batch failed in an attempt without savepoints: nothing was committed.
    Failed(StoreError),
}

/// A batch's counted windows for the rollups: (seq, window, disputed).
type Rolled<'b> = Vec<(i64, &'b WindowRow, bool)>;

fn insert_alarm(c: &Connection, a: &Alarm) -> Result<(), StoreError> {
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

fn opt_u64(v: Option<u64>) -> Option<i64> {
    v.map(|x| x as i64)
}

impl Store for SqliteStore {
    fn hello(&self, h: &AgentHello) -> Result<AgentState, StoreError> {
        let mut c = self.w();
        let tx = c.transaction().map_err(db)?;
        let pinned: Option<(Vec<u8>, String, String)> = tx
            .query_row(
                "SELECT public_key, host_id, csp FROM agents WHERE agent_id = ?1",
                params![h.agent_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(db)?;
        match pinned {
            Some((k, _, _)) if k.as_slice() != h.public_key.as_slice() => {
                return Err(StoreError::KeyMismatch {
                    agent_id: h.agent_id.clone(),
                });
            }
            // An admin registration leaves csp empty until the first Hello binds the host.
            Some((_, bound, csp)) if !csp.is_empty() && bound != h.host_id => {
                return Err(StoreError::HostMismatch {
                    agent_id: h.agent_id.clone(),
                    bound,
                    claimed: h.host_id.clone(),
                });
            }
            Some(_) => {
                tx.execute(
                    "UPDATE agents SET host_id=?2, csp=?3, hostname=?4, agent_version=?5, driver_version=?6, epoch=?7, last_seen_ms=?8 WHERE agent_id=?1",
                    params![h.agent_id, h.host_id, h.csp, h.hostname, h.agent_version, h.driver_version, h.epoch as i64, h.received_ms],
                )
                .map_err(db)?;
            }
            None => {
                tx.execute(
                    "INSERT INTO agents (agent_id, host_id, csp, hostname, agent_version, driver_version, public_key, epoch, first_seen_ms, last_seen_ms) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?9)",
                    params![h.agent_id, h.host_id, h.csp, h.hostname, h.agent_version, h.driver_version, h.public_key.to_vec(), h.epoch as i64, h.received_ms],
                )
                .map_err(db)?;
            }
        }
        for g in &h.gpus {
            // A card another host holds stays that host's; the claim is an alarm.
            let holder: Option<String> = tx
                .query_row(
                    "SELECT host_id FROM gpus WHERE gpu_uuid = ?1",
                    params![g.uuid],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?;
            // A card no host reported yet but a grant assigns to another host is that host's
            // (an admin's assignment): held for it, with no agent until its own Hello.
            let holder = match holder {
                Some(h) => Some(h),
                None => {
                    let granted: Option<String> = tx
                        .query_row(
                            "SELECT host_id FROM grant_cards WHERE gpu_uuid = ?1 ORDER BY id DESC LIMIT 1",
                            params![g.uuid],
                            |r| r.get(0),
                        )
                        .optional()
                        .map_err(db)?;
                    if let Some(k) = granted.as_ref().filter(|k| **k != h.host_id) {
                        tx.execute(
                            "INSERT INTO gpus (gpu_uuid, agent_id, host_id, idx, name, serial, pci_bus_id, memory_total_bytes, mig_mode, last_seen_ms)
                             VALUES (?1, '', ?2, 0, '', '', '', NULL, '', ?3)",
                            params![g.uuid, k, h.received_ms],
                        )
                        .map_err(db)?;
                    }
                    granted
                }
            };
            if let Some(holder) = holder.filter(|o| *o != h.host_id) {
                insert_alarm(
                    &tx,
                    &Alarm {
                        agent_id: h.agent_id.clone(),
                        at_ms: h.received_ms,
                        kind: "card_claimed".into(),
                        seq: None,
                        detail: format!(
                            "host {} listed card {} that host {holder} holds; the card stays with {holder} and windows for it from {} count in no figure until an admin moves it (hosts move-card)",
                            h.host_id, g.uuid, h.host_id
                        ),
                    },
                )?;
                continue;
            }
            tx.execute(
                "INSERT INTO gpus (gpu_uuid, agent_id, host_id, idx, name, serial, pci_bus_id, memory_total_bytes, mig_mode, last_seen_ms)
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)
                 ON CONFLICT(gpu_uuid) DO UPDATE SET agent_id=excluded.agent_id, host_id=excluded.host_id, idx=excluded.idx,
                   name=excluded.name, serial=excluded.serial, pci_bus_id=excluded.pci_bus_id,
                   memory_total_bytes=excluded.memory_total_bytes, mig_mode=excluded.mig_mode, last_seen_ms=excluded.last_seen_ms",
                params![g.uuid, h.agent_id, h.host_id, g.index, g.name, g.serial, g.pci_bus_id, opt_u64(g.memory_total_bytes), g.mig_mode, h.received_ms],
            )
            .map_err(db)?;
            // Where a MIG device sits on its GPU (cleared for a whole GPU).
            let mig = g.mig.clone().unwrap_or_default();
            tx.execute(
                "UPDATE gpus SET parent_uuid=?2, mig_profile=?3, mig_slices=?4, parent_slices=?5 WHERE gpu_uuid=?1",
                params![g.uuid, mig.parent_uuid, mig.profile, mig.slices, mig.parent_slices],
            )
            .map_err(db)?;
        }
        super::sqlite_integrity::note_cards(&tx, h)?;
        super::sqlite_integrity::note_key(
            &tx,
            &h.agent_id,
            &h.public_key,
            "first use",
            "",
            h.received_ms,
        )?;
        let mut state = Self::durable(&tx, &h.agent_id)?;
        state.epoch = tx
            .query_row(
                "SELECT COALESCE(MAX(epoch), 0) FROM checkpoints WHERE agent_id = ?1",
                params![h.agent_id],
                |r| r.get::<_, i64>(0),
            )
            .map_err(db)? as u64;
        tx.commit().map_err(db)?;
        Ok(state)
    }

    fn commit(&self, batches: &[IngestBatch]) -> Result<Vec<CommitOutcome>, StoreError> {
        self.commit_batches(batches, false)?.into_iter().collect()
    }

    fn commit_each(
        &self,
        batches: &[IngestBatch],
    ) -> Result<Vec<Result<CommitOutcome, StoreError>>, StoreError> {
        self.commit_batches(batches, true)
    }

    fn agent_registered_ms(&self, agent_id: &str) -> Result<Option<i64>, StoreError> {
        self.r()
            .query_row(
                "SELECT first_seen_ms FROM agents WHERE agent_id = ?1",
                params![agent_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)
    }

    fn move_host_card(
        &self,
        gpu_uuid: &str,
        to_host_id: &str,
        actor: &str,
        reason: &str,
        at_ms: i64,
    ) -> Result<CardMoveRow, StoreError> {
        let mut c = self.w();
        let tx = c
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let from: String = tx
            .query_row(
                "SELECT host_id FROM gpus WHERE gpu_uuid = ?1",
                params![gpu_uuid],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?
            .ok_or_else(|| StoreError::NotFound {
                what: "card",
                id: gpu_uuid.to_owned(),
            })?;
        if from == to_host_id {
            return Err(StoreError::Conflict(format!(
                "card {gpu_uuid} is already held by host {to_host_id}"
            )));
        }
        // The card is listed under the new host's agent; none yet: its first Hello takes it.
        let agent: String = tx
            .query_row(
                "SELECT agent_id FROM agents WHERE host_id = ?1 AND csp <> '' ORDER BY last_seen_ms DESC LIMIT 1",
                params![to_host_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?
            .unwrap_or_default();
        tx.execute(
            "UPDATE gpus SET host_id = ?2, agent_id = ?3 WHERE gpu_uuid = ?1",
            params![gpu_uuid, to_host_id, agent],
        )
        .map_err(db)?;
        let row = CardMoveRow {
            gpu_uuid: gpu_uuid.to_owned(),
            from_host_id: from,
            to_host_id: to_host_id.to_owned(),
            at_ms,
            actor: actor.to_owned(),
            reason: reason.to_owned(),
        };
        tx.execute(
            "INSERT INTO card_moves (gpu_uuid, from_host_id, to_host_id, at_ms, actor, reason) VALUES (?1,?2,?3,?4,?5,?6)",
            params![row.gpu_uuid, row.from_host_id, row.to_host_id, row.at_ms, row.actor, row.reason],
        )
        .map_err(db)?;
        insert_alarm(
            &tx,
            &Alarm {
                agent_id: agent,
                at_ms,
                kind: "card_moved".into(),
                seq: None,
                detail: format!(
                    "{actor} moved card {gpu_uuid} from host {} to host {to_host_id}{}",
                    row.from_host_id,
                    if reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {reason}")
                    }
                ),
            },
        )?;
        tx.commit().map_err(db)?;
        Ok(row)
    }

    fn rollups(
        &self,
        level: crate::rollup::Level,
        from_ms: i64,
        until_ms: i64,
        visit: &mut dyn FnMut(Vec<crate::rollup::RollupRow>),
    ) -> Result<bool, StoreError> {
        super::sqlite_rollup::visit(&self.r(), level, from_ms, until_ms, visit)?;
        Ok(true)
    }

    fn retention(&self) -> Result<crate::retention::Retention, StoreError> {
        super::sqlite_retention::load(&self.r(), super::sqlite_retention::VERSION)
    }

    fn retain(
        &self,
        req: &crate::retention::RetainRequest,
    ) -> Result<crate::retention::Retained, StoreError> {
        let head = self.sign_head(req.at_ms)?;
        crate::retention::run(&mut super::sqlite_retention::Ops(&mut self.w()), req, &head)
    }

    fn card_moves(&self, gpu_uuid: Option<&str>) -> Result<Vec<CardMoveRow>, StoreError> {
        let c = self.r();
        let mut st = c
            .prepare(
                "SELECT gpu_uuid, from_host_id, to_host_id, at_ms, actor, reason FROM card_moves
                 WHERE (?1 IS NULL OR gpu_uuid = ?1) ORDER BY id",
            )
            .map_err(db)?;
        st.query_map(params![gpu_uuid], |r| {
            Ok(CardMoveRow {
                gpu_uuid: r.get(0)?,
                from_host_id: r.get(1)?,
                to_host_id: r.get(2)?,
                at_ms: r.get(3)?,
                actor: r.get(4)?,
                reason: r.get(5)?,
            })
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)
    }

    fn record_hash(&self, agent_id: &str, seq: u64) -> Result<Option<Hash>, StoreError> {
        self.r()
            .query_row(
                "SELECT hash FROM records WHERE agent_id=?1 AND seq=?2",
                params![agent_id, seq as i64],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()
            .map(|o| o.map(hash_from))
            .map_err(db)
    }

    fn alarm(&self, alarm: &Alarm) -> Result<(), StoreError> {
        insert_alarm(&self.w(), alarm)
    }

    fn alarms(&self, agent_id: Option<&str>) -> Result<Vec<Alarm>, StoreError> {
        let c = self.r();
        let mut st = c
            .prepare(
                "SELECT agent_id, at_ms, kind, seq, detail FROM alarms WHERE (?1 IS NULL OR agent_id = ?1) ORDER BY id",
            )
            .map_err(db)?;
        let rows = st
            .query_map(params![agent_id], |r| {
                Ok(Alarm {
                    agent_id: r.get(0)?,
                    at_ms: r.get(1)?,
                    kind: r.get(2)?,
                    seq: r.get::<_, Option<i64>>(3)?.map(|s| s as u64),
                    detail: r.get(4)?,
                })
            })
            .map_err(db)?;
        rows.collect::<Result<_, _>>().map_err(db)
    }

    fn window_bodies(
        &self,
        from_ms: i64,
        until_ms: i64,
        cards: Option<&[String]>,
    ) -> Result<Vec<super::WindowBody>, StoreError> {
        let c = self.r();
        // A card's windows are read through `window_rows_by_card`: with `?3 IS NULL OR
        // w.gpu_uuid = ?3` SQLite plans for either and reads every card's windows of the
        // period by start, once per card asked for.
        let card = if cards.is_some() {
            "AND w.gpu_uuid = ?3"
        } else {
            "AND ?3 IS NULL"
        };
        let mut st = c
            .prepare(&format!(
                "SELECT w.agent_id, a.host_id, w.seq, r.body, r.block
                 FROM windows w JOIN records r ON r.agent_id = w.agent_id AND r.seq = w.seq
                 JOIN agents a ON a.agent_id = w.agent_id
                 WHERE w.start_ms >= ?1 AND w.start_ms < ?2 {card}
                   AND {COUNTED}
                   AND NOT EXISTS (SELECT 1 FROM window_flags f WHERE f.agent_id = w.agent_id AND f.seq = w.seq)
                 ORDER BY w.agent_id, w.seq"
            ))
            .map_err(db)?;
        let all = [None];
        let each: Vec<Option<&str>> = match cards {
            None => all.to_vec(),
            Some(cards) => cards.iter().map(|c| Some(c.as_str())).collect(),
        };
        // Every row first, then the bodies in (agent, seq) order: the cards of one host share
        // their batches' body blocks, and in that order each block is decoded once.
        let mut rows = Vec::new();
        for card in each {
            let found = st
                .query_map(params![from_ms, until_ms, card], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)? as u64,
                        r.get::<_, Option<Vec<u8>>>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                    ))
                })
                .map_err(db)?;
            for row in found {
                rows.push(row.map_err(db)?);
            }
        }
        if cards.is_some() {
            rows.sort_by(|a, b| (&a.0, a.2).cmp(&(&b.0, b.2)));
            rows.dedup_by(|a, b| a.0 == b.0 && a.2 == b.2);
        }
        let mut blocks = super::body_block::BlockCache::default();
        let mut out = Vec::with_capacity(rows.len());
        for (agent_id, host_id, seq, body, block) in rows {
            let body = blocks.body_of(&agent_id, seq, body, block, |id| {
                super::sqlite_ledger::load_block(&c, &agent_id, id)
            })?;
            out.push((agent_id, host_id, seq, body));
        }
        Ok(out)
    }

    fn usage(&self, from_ms: i64, until_ms: i64) -> Result<Usage, StoreError> {
        let c = self.r();
        let mut st = c
            .prepare(&format!(
                "SELECT w.agent_id, a.host_id, a.csp, w.gpu_uuid, COALESCE(g.name, ''), COUNT(*),
                        SUM(w.good_samples * w.interval_ms + w.unavailable_ms),
                        SUM(w.occupied_ms), SUM(w.active_ms), SUM(w.foreign_ms), SUM(w.unavailable_ms),
                        SUM(CASE WHEN w.util_avg_pct IS NULL THEN 0 ELSE w.util_avg_pct * w.good_samples * w.interval_ms END),
                        SUM(CASE WHEN w.util_avg_pct IS NULL THEN 0 ELSE w.good_samples * w.interval_ms END),
                        COALESCE(SUM(w.energy_mj), 0), COALESCE(MAX(w.memory_used_max_bytes), 0)
                 FROM windows w JOIN agents a ON a.agent_id = w.agent_id
                 LEFT JOIN gpus g ON g.gpu_uuid = w.gpu_uuid
                 WHERE w.start_ms >= ?1 AND w.start_ms < ?2 AND {COUNTED}
                   AND NOT EXISTS (SELECT 1 FROM window_flags f WHERE f.agent_id = w.agent_id AND f.seq = w.seq)
                 GROUP BY w.agent_id, w.gpu_uuid
                 ORDER BY a.host_id, w.gpu_uuid"
            ))
            .map_err(db)?;
        let cards = st
            .query_map(params![from_ms, until_ms], |r| {
                let weighted: f64 = r.get(11)?;
                let util_ms: i64 = r.get(12)?;
                Ok(CardUsageRow {
                    agent_id: r.get(0)?,
                    host_id: r.get(1)?,
                    csp: r.get(2)?,
                    gpu_uuid: r.get(3)?,
                    gpu_name: r.get(4)?,
                    windows: r.get(5)?,
                    metered_ms: r.get::<_, i64>(6)? as u64,
                    occupied_ms: r.get::<_, i64>(7)? as u64,
                    active_ms: r.get::<_, i64>(8)? as u64,
                    foreign_ms: r.get::<_, i64>(9)? as u64,
                    unavailable_ms: r.get::<_, i64>(10)? as u64,
                    util_avg_pct: (util_ms > 0).then(|| weighted / util_ms as f64),
                    energy_mj: r.get::<_, i64>(13)? as u64,
                    memory_used_max_bytes: r.get::<_, i64>(14)? as u64,
                })
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        let mut st = c
            .prepare(&format!(
                "SELECT a.host_id, w.gpu_uuid, p.principal, w.grant_id, SUM(p.occupied_ms), SUM(p.active_ms),
                        MAX(p.memory_max_bytes), MIN(p.matches_grant)
                 FROM window_principals p
                 JOIN windows w ON w.agent_id = p.agent_id AND w.seq = p.seq
                 JOIN agents a ON a.agent_id = w.agent_id
                 WHERE w.start_ms >= ?1 AND w.start_ms < ?2 AND {COUNTED}
                   AND NOT EXISTS (SELECT 1 FROM window_flags f WHERE f.agent_id = w.agent_id AND f.seq = w.seq)
                 GROUP BY a.host_id, w.gpu_uuid, p.principal, w.grant_id
                 ORDER BY a.host_id, w.gpu_uuid, p.principal, w.grant_id"
            ))
            .map_err(db)?;
        let tenants = st
            .query_map(params![from_ms, until_ms], |r| {
                Ok(TenantUsageRow {
                    host_id: r.get(0)?,
                    gpu_uuid: r.get(1)?,
                    principal: r.get(2)?,
                    grant_id: r.get(3)?,
                    occupied_ms: r.get::<_, i64>(4)? as u64,
                    active_ms: r.get::<_, i64>(5)? as u64,
                    memory_max_bytes: r.get::<_, i64>(6)? as u64,
                    matches_grant: r.get(7)?,
                })
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(Usage { cards, tenants })
    }

    fn hosts(&self) -> Result<Vec<HostRow>, StoreError> {
        let c = self.r();
        let mut st = c
            .prepare(
                "SELECT agent_id, host_id, csp, hostname, agent_version, last_seen_ms FROM agents ORDER BY host_id, agent_id",
            )
            .map_err(db)?;
        let mut hosts = st
            .query_map([], |r| {
                Ok(HostRow {
                    agent_id: r.get(0)?,
                    host_id: r.get(1)?,
                    csp: r.get(2)?,
                    hostname: r.get(3)?,
                    agent_version: r.get(4)?,
                    last_seen_ms: r.get(5)?,
                    durable_seq: 0,
                    last_record_ms: None,
                    gpus: vec![],
                })
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        // Every card in one read, dealt out to its agent: a read per agent has no index on
        // agent_id to use and reads the whole table each time (2,500 hosts × 20,000 cards).
        let mut gst = c
            .prepare(
                "SELECT gpu_uuid, idx, name, serial, pci_bus_id, memory_total_bytes, mig_mode,
                        parent_uuid, mig_profile, mig_slices, parent_slices, agent_id
                 FROM gpus ORDER BY agent_id, idx, parent_uuid, gpu_uuid",
            )
            .map_err(db)?;
        let mut gpus: std::collections::HashMap<String, Vec<GpuRow>> = Default::default();
        let rows = gst
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(11)?,
                    GpuRow {
                        uuid: r.get(0)?,
                        index: r.get(1)?,
                        name: r.get(2)?,
                        serial: r.get(3)?,
                        pci_bus_id: r.get(4)?,
                        memory_total_bytes: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
                        mig_mode: r.get(6)?,
                        mig: {
                            let parent_uuid: String = r.get(7)?;
                            (!parent_uuid.is_empty()).then_some(crate::store::MigRow {
                                parent_uuid,
                                profile: r.get(8)?,
                                slices: r.get(9)?,
                                parent_slices: r.get(10)?,
                            })
                        },
                    },
                ))
            })
            .map_err(db)?;
        for row in rows {
            let (agent_id, gpu) = row.map_err(db)?;
            gpus.entry(agent_id).or_default().push(gpu);
        }
        let mut last = c
            .prepare(
                "SELECT seq, received_ms FROM records WHERE agent_id = ?1 ORDER BY seq DESC LIMIT 1",
            )
            .map_err(db)?;
        for h in &mut hosts {
            if let Some((seq, received)) = last
                .query_row(params![h.agent_id], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                })
                .optional()
                .map_err(db)?
            {
                h.durable_seq = seq.max(0) as u64;
                h.last_record_ms = Some(received);
            }
            h.gpus = gpus.remove(&h.agent_id).unwrap_or_default();
        }
        Ok(hosts)
    }

    fn known_card(&self, host_id: &str, gpu_uuid: &str) -> Result<bool, StoreError> {
        self.r()
            .query_row(
                "SELECT 1 FROM gpus WHERE host_id = ?1 AND gpu_uuid = ?2",
                params![host_id, gpu_uuid],
                |_| Ok(()),
            )
            .optional()
            .map(|o| o.is_some())
            .map_err(db)
    }

    fn grants(&self) -> Result<Vec<Grant>, StoreError> {
        load_grants(&self.r(), None)
    }

    fn insert_grants(&self, grants: &[Grant], actor: &str, at_ms: i64) -> Result<(), StoreError> {
        let mut c = self.w();
        let tx = c.transaction().map_err(db)?;
        for g in grants {
            tx.execute(
                "INSERT INTO grants (grant_id, program, grantee, principal, csp, valid_from_ms, valid_until_ms, revoked_at_ms)
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
                params![g.grant_id, g.program.as_str(), g.grantee, g.principal.to_string(), g.csp, g.valid_from_ms, g.valid_until_ms, g.revoked_at_ms],
            )
            .map_err(|e| StoreError::Conflict(format!("grant {}: {e}", g.grant_id)))?;
            insert_cards(&tx, g)?;
            insert_history(
                &tx,
                &g.grant_id,
                &GrantChangeRow {
                    at_ms,
                    actor: actor.to_owned(),
                    action: "import".into(),
                    detail: format!("{} cards", g.cards.len()),
                },
            )?;
        }
        bump_assignments_version(&tx)?;
        tx.commit().map_err(db)
    }

    fn register_agent(
        &self,
        agent_id: &str,
        public_key: &[u8; 32],
        actor: &str,
        reason: &str,
        at_ms: i64,
    ) -> Result<(bool, bool), StoreError> {
        let mut c = self.w();
        let tx = c.transaction().map_err(db)?;
        let pinned: Option<Vec<u8>> = tx
            .query_row(
                "SELECT public_key FROM agents WHERE agent_id = ?1",
                params![agent_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        let (created, replaced) = match &pinned {
            None => {
                // Host, CSP and the rest arrive with the agent's first Hello.
                tx.execute(
                    "INSERT INTO agents (agent_id, host_id, csp, hostname, agent_version, driver_version, public_key, epoch, first_seen_ms, last_seen_ms)
                     VALUES (?1, ?1, '', '', '', '', ?2, 0, ?3, ?3)",
                    params![agent_id, public_key.to_vec(), at_ms],
                )
                .map_err(db)?;
                (true, false)
            }
            Some(k) if k.as_slice() == public_key.as_slice() => (false, false),
            Some(_) => {
                tx.execute(
                    "UPDATE agents SET public_key = ?2 WHERE agent_id = ?1",
                    params![agent_id, public_key.to_vec()],
                )
                .map_err(db)?;
                (false, true)
            }
        };
        super::sqlite_integrity::note_key(&tx, agent_id, public_key, actor, reason, at_ms)?;
        insert_alarm(
            &tx,
            &Alarm {
                agent_id: agent_id.to_string(),
                at_ms,
                kind: "key_registered".into(),
                seq: None,
                detail: format!(
                    "{actor} pinned key {}{}{}",
                    hex::encode(public_key),
                    match &pinned {
                        Some(old) if replaced => format!(" replacing {}", hex::encode(old)),
                        _ => String::new(),
                    },
                    if reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {reason}")
                    }
                ),
            },
        )?;
        tx.commit().map_err(db)?;
        Ok((created, replaced))
    }

    fn ledger(&self) -> Result<Box<dyn crate::verify::ChainSource + Send>, StoreError> {
        Ok(Box::new(
            super::sqlite_ledger::SqliteLedger::open_read_only(&self.path)?,
        ))
    }

    fn assignments(&self, host_id: &str) -> Result<(u64, Vec<AssignmentRow>), StoreError> {
        let c = self.r();
        let version: String = c
            .query_row(
                "SELECT value FROM meta WHERE key = 'assignments_version'",
                [],
                |r| r.get(0),
            )
            .map_err(db)?;
        // A card's own bounds cut the grant's validity (see Grant::card_interval); the
        // revocation travels separately so the agent can say "revoked" rather than "expired".
        let mut st = c
            .prepare(
                "SELECT gpu_uuid, grant_id, program, principal, from_ms, until_ms, revoked_at_ms FROM (
                   SELECT gc.gpu_uuid, g.grant_id, g.program, g.principal,
                          MAX(g.valid_from_ms, COALESCE(gc.card_from_ms, g.valid_from_ms)) AS from_ms,
                          MIN(g.valid_until_ms, COALESCE(gc.card_until_ms, g.valid_until_ms)) AS until_ms,
                          g.revoked_at_ms
                   FROM grant_cards gc JOIN grants g ON g.grant_id = gc.grant_id
                   WHERE gc.host_id = ?1)
                 WHERE until_ms > from_ms
                 ORDER BY gpu_uuid, from_ms",
            )
            .map_err(db)?;
        let rows = st
            .query_map(params![host_id], |r| {
                Ok(AssignmentRow {
                    gpu_uuid: r.get(0)?,
                    grant_id: r.get(1)?,
                    program: r.get(2)?,
                    principal: r.get(3)?,
                    valid_from_ms: r.get(4)?,
                    valid_until_ms: r.get(5)?,
                    revoked_at_ms: r.get(6)?,
                })
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok((version.parse().unwrap_or(0), rows))
    }

    fn grant(&self, grant_id: &str) -> Result<Option<GrantRecord>, StoreError> {
        let c = self.r();
        let Some(grant) = load_grants(&c, Some(grant_id))?.into_iter().next() else {
            return Ok(None);
        };
        let history = load_history(&c, grant_id)?;
        Ok(Some(GrantRecord { grant, history }))
    }

    fn amend_grant(
        &self,
        grant_id: &str,
        amendment: &Amendment,
        actor: &str,
        at_ms: i64,
    ) -> Result<GrantRecord, StoreError> {
        let mut c = self.w();
        // Immediate: the grants read here must still be what is held when the change lands.
        let tx = c
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let mut held = load_grants(&tx, None)?;
        let Some(index) = held.iter().position(|g| g.grant_id == grant_id) else {
            return Err(StoreError::NotFound {
                what: "grant",
                id: grant_id.to_owned(),
            });
        };
        let grant = held.swap_remove(index);
        let (amended, detail) = amend(&grant, &held, amendment)?;
        tx.execute(
            "UPDATE grants SET valid_from_ms = ?2, valid_until_ms = ?3, revoked_at_ms = ?4 WHERE grant_id = ?1",
            params![grant_id, amended.valid_from_ms, amended.valid_until_ms, amended.revoked_at_ms],
        )
        .map_err(db)?;
        // The card list is rewritten whole: an amendment only ends cards and adds new ones, and
        // the rewritten rows still hold every card with its own bounds, so nothing is lost.
        tx.execute(
            "DELETE FROM grant_cards WHERE grant_id = ?1",
            params![grant_id],
        )
        .map_err(db)?;
        insert_cards(&tx, &amended)?;
        insert_history(
            &tx,
            grant_id,
            &GrantChangeRow {
                at_ms,
                actor: actor.to_owned(),
                action: amendment.action().into(),
                detail,
            },
        )?;
        bump_assignments_version(&tx)?;
        let history = load_history(&tx, grant_id)?;
        tx.commit().map_err(db)?;
        Ok(GrantRecord {
            grant: amended,
            history,
        })
    }

    fn windows(
        &self,
        from_ms: i64,
        until_ms: i64,
        gpu_uuid: Option<&str>,
    ) -> Result<Vec<MeteredWindow>, StoreError> {
        let c = self.r();
        // The lower bound on start_ms lets the (start_ms, gpu_uuid) index answer: no window is
        // longer than a day (the agent's window length divides a day).
        // Windows reported for a card another host held count only once it is theirs; flagged
        // windows (impossible, or card time already counted) never count.
        // One card's windows are read through `window_rows_by_card` (see `window_bodies`).
        let card = if gpu_uuid.is_some() {
            "w.gpu_uuid = ?3"
        } else {
            "?3 IS NULL"
        };
        let where_ = format!(
            "w.start_ms >= ?1 - 86400000 AND w.start_ms < ?2 AND w.end_ms > ?1
             AND {card} AND {COUNTED}
             AND NOT EXISTS (SELECT 1 FROM window_flags f WHERE f.agent_id = w.agent_id AND f.seq = w.seq)"
        );
        let mut st = c
            .prepare(&format!(
                "SELECT w.agent_id, a.host_id, a.csp, w.seq, w.gpu_uuid, w.start_ms, w.end_ms, w.interval_ms,
                        w.expected_samples, w.good_samples, w.util_avg_pct, w.util_max_pct, w.mem_util_avg_pct,
                        w.memory_used_max_bytes, w.energy_mj, w.energy_estimated, w.power_avg_w,
                        w.temperature_max_c, w.throttle_reasons, w.health, w.unavailable_ms,
                        w.assignment_status, w.grant_id, w.principal, w.active_ms, w.occupied_ms,
                        w.foreign_ms, w.grantee_occupied_ms, w.unattributed_ms, w.energy_estimated_mj
                 FROM windows w JOIN agents a ON a.agent_id = w.agent_id
                 WHERE {where_}
                 ORDER BY w.gpu_uuid, w.start_ms, w.agent_id, w.seq"
            ))
            .map_err(db)?;
        let u = |v: i64| v.max(0) as u64;
        let mut windows = st
            .query_map(params![from_ms, until_ms, gpu_uuid], |r| {
                Ok(MeteredWindow {
                    agent_id: r.get(0)?,
                    host_id: r.get(1)?,
                    csp: r.get(2)?,
                    seq: u(r.get(3)?),
                    window: WindowRow {
                        gpu_uuid: r.get(4)?,
                        start_ms: r.get(5)?,
                        end_ms: r.get(6)?,
                        interval_ms: u(r.get(7)?),
                        expected_samples: r.get(8)?,
                        good_samples: r.get(9)?,
                        util_avg_pct: r.get(10)?,
                        util_max_pct: r.get(11)?,
                        mem_util_avg_pct: r.get(12)?,
                        memory_used_max_bytes: r.get::<_, Option<i64>>(13)?.map(u),
                        energy_mj: r.get::<_, Option<i64>>(14)?.map(u),
                        energy_estimated: r.get(15)?,
                        power_avg_w: r.get(16)?,
                        temperature_max_c: r.get(17)?,
                        throttle_reasons: r.get::<_, Option<i64>>(18)?.map(u),
                        health: known(&r.get::<_, String>(19)?, HEALTHS),
                        unavailable_ms: u(r.get(20)?),
                        assignment_status: known(&r.get::<_, String>(21)?, STATUSES),
                        grant_id: r.get(22)?,
                        principal: r.get(23)?,
                        active_ms: u(r.get(24)?),
                        occupied_ms: u(r.get(25)?),
                        foreign_ms: u(r.get(26)?),
                        grantee_occupied_ms: r.get::<_, Option<i64>>(27)?.map(u),
                        unattributed_ms: r.get::<_, Option<i64>>(28)?.map(u),
                        energy_estimated_mj: r.get::<_, Option<i64>>(29)?.map(u),
                        principals: vec![],
                    },
                })
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        let index: std::collections::HashMap<(String, u64), usize> = windows
            .iter()
            .enumerate()
            .map(|(i, w)| ((w.agent_id.clone(), w.seq), i))
            .collect();
        let mut st = c
            .prepare(&format!(
                "SELECT p.agent_id, p.seq, p.principal, p.uid, p.occupied_ms, p.active_ms,
                        p.memory_max_bytes, p.process_count, p.matches_grant
                 FROM window_principals p JOIN windows w ON w.agent_id = p.agent_id AND w.seq = p.seq
                 WHERE {where_}
                 ORDER BY p.agent_id, p.seq, p.principal"
            ))
            .map_err(db)?;
        let rows = st
            .query_map(params![from_ms, until_ms, gpu_uuid], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    u(r.get(1)?),
                    PrincipalRow {
                        principal: r.get(2)?,
                        uid: r.get(3)?,
                        occupied_ms: u(r.get(4)?),
                        active_ms: u(r.get(5)?),
                        memory_max_bytes: u(r.get(6)?),
                        process_count: r.get(7)?,
                        matches_grant: r.get(8)?,
                    },
                ))
            })
            .map_err(db)?;
        for row in rows {
            let (agent, seq, p) = row.map_err(db)?;
            if let Some(&i) = index.get(&(agent, seq)) {
                windows[i].window.principals.push(p);
            }
        }
        Ok(windows)
    }

    fn events(
        &self,
        from_ms: i64,
        until_ms: i64,
        kind: Option<&str>,
        gpu_uuid: Option<&str>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let c = self.r();
        let mut st = c
            .prepare(
                "SELECT e.agent_id, a.host_id, a.csp, e.seq, e.gpu_uuid, e.at_ms, e.kind, e.code, e.detail,
                        e.pid, e.principal, e.grant_id, e.mode, e.action, e.result
                 FROM events e JOIN agents a ON a.agent_id = e.agent_id
                 WHERE e.at_ms >= ?1 AND e.at_ms < ?2 AND (?3 IS NULL OR e.kind = ?3)
                   AND (?4 IS NULL OR e.gpu_uuid = ?4)
                 ORDER BY e.at_ms, e.agent_id, e.seq",
            )
            .map_err(db)?;
        st.query_map(params![from_ms, until_ms, kind, gpu_uuid], |r| {
            Ok(StoredEvent {
                agent_id: r.get(0)?,
                host_id: r.get(1)?,
                csp: r.get(2)?,
                seq: r.get::<_, i64>(3)?.max(0) as u64,
                event: EventRow {
                    gpu_uuid: r.get(4)?,
                    at_ms: r.get(5)?,
                    kind: known(&r.get::<_, String>(6)?, EVENT_KINDS),
                    code: r.get(7)?,
                    detail: r.get(8)?,
                    pid: r.get(9)?,
                    principal: r.get(10)?,
                    grant_id: r.get(11)?,
                    mode: r.get(12)?,
                    action: r.get(13)?,
                    result: r.get(14)?,
                },
            })
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)
    }

    fn insert_invoices(
        &self,
        invoices: &[Invoice],
        actor: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let mut c = self.w();
        let tx = c.transaction().map_err(db)?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO invoices (csp, grant_id, period, billed_gpu_hours, line, actor, imported_at_ms)
                     VALUES (?1,?2,?3,?4,?5,?6,?7)",
                )
                .map_err(db)?;
            for i in invoices {
                st.execute(params![
                    i.csp,
                    i.grant_id,
                    i.period,
                    i.billed_gpu_hours,
                    i.line,
                    actor,
                    at_ms
                ])
                .map_err(db)?;
            }
        }
        tx.commit().map_err(db)
    }

    fn import_providers(
        &self,
        providers: &[crate::registry::Provider],
        actor: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let mut c = self.w();
        let tx = c
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let held = read_providers(&tx)?;
        for (csp, action, detail) in crate::registry::provider_changes(&held, providers) {
            let Some(p) = providers.iter().find(|p| p.csp == csp) else {
                continue;
            };
            tx.execute(
                "INSERT INTO providers (csp, name_ko, name_en, committed_hpc, committed_research,
                     committed_advanced, updated_ms, updated_by)
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8)
                 ON CONFLICT (csp) DO UPDATE SET name_ko = excluded.name_ko,
                     name_en = excluded.name_en, committed_hpc = excluded.committed_hpc,
                     committed_research = excluded.committed_research,
                     committed_advanced = excluded.committed_advanced,
                     updated_ms = excluded.updated_ms, updated_by = excluded.updated_by",
                params![
                    p.csp,
                    p.name_ko,
                    p.name_en,
                    p.committed_hpc,
                    p.committed_research,
                    p.committed_advanced,
                    at_ms,
                    actor
                ],
            )
            .map_err(db)?;
            registry_change(&tx, at_ms, actor, "provider", &csp, action, &detail)?;
        }
        tx.commit().map_err(db)
    }

    fn providers(&self) -> Result<Vec<crate::registry::Provider>, StoreError> {
        read_providers(&self.r())
    }

    fn register_hosts(
        &self,
        hosts: &[crate::registry::RegisteredHost],
        actor: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let mut c = self.w();
        let tx = c
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let held = read_registered_hosts(&tx)?;
        for (host, action, detail) in crate::registry::host_changes(&held, hosts) {
            let Some(h) = hosts.iter().find(|h| h.host_id == host) else {
                continue;
            };
            tx.execute(
                "INSERT INTO registered_hosts (host_id, csp, updated_ms, updated_by) VALUES (?1,?2,?3,?4)
                 ON CONFLICT (host_id) DO UPDATE SET csp = excluded.csp,
                     updated_ms = excluded.updated_ms, updated_by = excluded.updated_by",
                params![h.host_id, h.csp, at_ms, actor],
            )
            .map_err(db)?;
            registry_change(&tx, at_ms, actor, "host", &host, action, &detail)?;
        }
        tx.commit().map_err(db)
    }

    fn registered_hosts(&self) -> Result<Vec<crate::registry::RegisteredHost>, StoreError> {
        read_registered_hosts(&self.r())
    }

    fn registry_history(&self) -> Result<Vec<crate::registry::RegistryChange>, StoreError> {
        let c = self.r();
        let mut st = c
            .prepare(
                "SELECT at_ms, actor, kind, subject, action, detail FROM registry_history ORDER BY id",
            )
            .map_err(db)?;
        st.query_map([], |r| {
            Ok(crate::registry::RegistryChange {
                at_ms: r.get(0)?,
                actor: r.get(1)?,
                kind: r.get(2)?,
                subject: r.get(3)?,
                action: r.get(4)?,
                detail: r.get(5)?,
            })
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)
    }

    fn size_bytes(&self) -> Option<u64> {
        // The WAL holds committed data not yet checkpointed: it is part of the size.
        let sizes = ["", "-wal"].iter().filter_map(|suffix| {
            let mut p = self.path.clone().into_os_string();
            p.push(suffix);
            std::fs::metadata(p).ok().map(|m| m.len())
        });
        Some(sizes.sum())
    }

    fn sign_head(&self, at_ms: i64) -> Result<crate::heads::SignedHead, StoreError> {
        let key = self.collector_key()?;
        let mut c = self.w();
        // Immediate: the leaves read are what is committed when the head lands.
        let tx = c
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let head = crate::heads::sign_and_store(&tx, key, at_ms)?;
        tx.commit().map_err(db)?;
        Ok(head)
    }

    fn heads(&self, since_ms: i64) -> Result<Vec<crate::heads::SignedHead>, StoreError> {
        crate::heads::load_heads(&self.r(), since_ms)
    }

    fn set_card_models(
        &self,
        models: &[crate::grants::CardModel],
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let mut c = self.w();
        let tx = c.transaction().map_err(db)?;
        super::sqlite_integrity::note_card_models(&tx, models, at_ms)?;
        tx.commit().map_err(db)
    }

    fn head(&self, id: u64) -> Result<Option<crate::heads::SignedHead>, StoreError> {
        crate::heads::load_head(&self.r(), id)
    }

    fn collector_sign(&self, message: &[u8]) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
        use ed25519_dalek::Signer;
        let key = self.collector_key()?;
        Ok((
            key.sign(message).to_bytes().to_vec(),
            key.verifying_key().to_bytes().to_vec(),
        ))
    }

    fn invoices(&self) -> Result<Vec<StoredInvoice>, StoreError> {
        let c = self.r();
        let mut st = c
            .prepare(
                "SELECT csp, grant_id, period, billed_gpu_hours, line, actor, imported_at_ms FROM invoices
                 WHERE id IN (SELECT MAX(id) FROM invoices GROUP BY csp, grant_id, period)
                 ORDER BY csp, grant_id, period",
            )
            .map_err(db)?;
        st.query_map([], |r| {
            Ok(StoredInvoice {
                invoice: Invoice {
                    csp: r.get(0)?,
                    grant_id: r.get(1)?,
                    period: r.get(2)?,
                    billed_gpu_hours: r.get(3)?,
                    line: r.get(4)?,
                },
                actor: r.get(5)?,
                imported_at_ms: r.get(6)?,
            })
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)
    }

    fn create_token(&self, t: &TokenRow) -> Result<(), StoreError> {
        let c = self.w();
        let n = c
            .execute(
                "INSERT INTO api_tokens (name, role, hash, created_ms, revoked_ms) VALUES (?1, ?2, ?3, ?4, NULL)
                 ON CONFLICT DO NOTHING",
                params![t.name, t.role, t.hash, t.created_ms],
            )
            .map_err(db)?;
        if n == 0 {
            return Err(StoreError::Conflict(format!(
                "a token named {:?} exists or existed; names are not reused",
                t.name
            )));
        }
        Ok(())
    }

    fn tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        let c = self.r();
        let mut st = c
            .prepare(
                "SELECT name, role, hash, created_ms, revoked_ms FROM api_tokens ORDER BY name",
            )
            .map_err(db)?;
        st.query_map([], token_row)
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)
    }

    fn revoke_token(&self, name: &str, at_ms: i64) -> Result<bool, StoreError> {
        let c = self.w();
        let revoked: Option<Option<i64>> = c
            .query_row(
                "SELECT revoked_ms FROM api_tokens WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        match revoked {
            None => Err(StoreError::NotFound {
                what: "token",
                id: name.to_string(),
            }),
            Some(Some(_)) => Ok(false),
            Some(None) => {
                c.execute(
                    "UPDATE api_tokens SET revoked_ms = ?2 WHERE name = ?1",
                    params![name, at_ms],
                )
                .map_err(db)?;
                Ok(true)
            }
        }
    }

    fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRow>, StoreError> {
        let c = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        c.prepare_cached(
            "SELECT name, role, hash, created_ms, revoked_ms FROM api_tokens WHERE hash = ?1",
        )
        .map_err(db)?
        .query_row(params![hash], token_row)
        .optional()
        .map_err(db)
    }

    fn agent_known(&self, agent_id: &str) -> Result<bool, StoreError> {
        let c = self.r();
        c.query_row(
            "SELECT EXISTS (SELECT 1 FROM agents WHERE agent_id = ?1)",
            params![agent_id],
            |r| r.get(0),
        )
        .map_err(db)
    }
}

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok(TokenRow {
        name: r.get(0)?,
        role: r.get(1)?,
        hash: r.get(2)?,
        created_ms: r.get(3)?,
        revoked_ms: r.get(4)?,
    })
}

pub(crate) const HEALTHS: &[&str] = &["ok", "degraded", "lost"];
pub(crate) const STATUSES: &[&str] = &["assigned", "unassigned", "expired", "revoked"];
pub(crate) const EVENT_KINDS: &[&str] = &[
    "xid",
    "ecc_single_bit",
    "ecc_double_bit",
    "gpu_lost",
    "gpu_recovered",
    "enforcement",
    "assignment_changed",
    "agent_started",
    "spool_full",
    "card_health",
    "pod_device_mismatch",
];

/// A stored spelling as the `&'static str` the rows carry; one this collector does not know
/// reads as "unknown", as it was stored from a body it could not decode either.
pub(crate) fn known(s: &str, set: &[&'static str]) -> &'static str {
    set.iter().find(|k| **k == s).copied().unwrap_or("unknown")
}

/// Grants with their cards in insertion order; one grant when `only` names it.
fn load_grants(c: &Connection, only: Option<&str>) -> Result<Vec<Grant>, StoreError> {
    let mut st = c
        .prepare_cached(
            "SELECT grant_id, program, grantee, principal, csp, valid_from_ms, valid_until_ms, revoked_at_ms
             FROM grants WHERE (?1 IS NULL OR grant_id = ?1) ORDER BY grant_id",
        )
        .map_err(db)?;
    let mut grants = st
        .query_map(params![only], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, Option<i64>>(7)?,
            ))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?
        .into_iter()
        .map(
            |(id, program, grantee, principal, csp, from, until, revoked)| {
                Ok(Grant {
                    program: program
                        .parse::<Program>()
                        .map_err(|e| StoreError::Db(format!("grant {id}: stored program: {e}")))?,
                    principal: principal.parse().map_err(|e| {
                        StoreError::Db(format!("grant {id}: stored principal: {e}"))
                    })?,
                    grant_id: id,
                    grantee,
                    csp,
                    valid_from_ms: from,
                    valid_until_ms: until,
                    revoked_at_ms: revoked,
                    cards: vec![],
                })
            },
        )
        .collect::<Result<Vec<Grant>, StoreError>>()?;
    let mut cst = c
        .prepare_cached(
            "SELECT host_id, gpu_uuid, card_from_ms, card_until_ms FROM grant_cards WHERE grant_id = ?1 ORDER BY id",
        )
        .map_err(db)?;
    for g in &mut grants {
        g.cards = cst
            .query_map(params![g.grant_id], |r| {
                Ok(GrantCard {
                    host_id: r.get(0)?,
                    gpu_uuid: r.get(1)?,
                    from_ms: r.get(2)?,
                    until_ms: r.get(3)?,
                })
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
    }
    Ok(grants)
}

fn insert_cards(c: &Connection, g: &Grant) -> Result<(), StoreError> {
    let mut st = c
        .prepare_cached(
            "INSERT INTO grant_cards (grant_id, host_id, gpu_uuid, card_from_ms, card_until_ms) VALUES (?1,?2,?3,?4,?5)",
        )
        .map_err(db)?;
    for card in &g.cards {
        st.execute(params![
            g.grant_id,
            card.host_id,
            card.gpu_uuid,
            card.from_ms,
            card.until_ms
        ])
        .map_err(db)?;
    }
    Ok(())
}

fn insert_history(
    c: &Connection,
    grant_id: &str,
    change: &GrantChangeRow,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO grant_history (grant_id, at_ms, actor, action, detail) VALUES (?1,?2,?3,?4,?5)",
        params![grant_id, change.at_ms, change.actor, change.action, change.detail],
    )
    .map_err(db)?;
    Ok(())
}

fn load_history(c: &Connection, grant_id: &str) -> Result<Vec<GrantChangeRow>, StoreError> {
    let mut st = c
        .prepare_cached(
            "SELECT at_ms, actor, action, detail FROM grant_history WHERE grant_id = ?1 ORDER BY id",
        )
        .map_err(db)?;
    st.query_map(params![grant_id], |r| {
        Ok(GrantChangeRow {
            at_ms: r.get(0)?,
            actor: r.get(1)?,
            action: r.get(2)?,
            detail: r.get(3)?,
        })
    })
    .map_err(db)?
    .collect::<Result<Vec<_>, _>>()
    .map_err(db)
}

/// Tells sessions' next assignment sets apart from the ones before a grant change.
fn bump_assignments_version(c: &Connection) -> Result<(), StoreError> {
    c.execute(
        "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'assignments_version'",
        [],
    )
    .map_err(db)?;
    Ok(())
}

/// The providers held, by CSP id.
fn read_providers(c: &Connection) -> Result<Vec<crate::registry::Provider>, StoreError> {
    let mut st = c
        .prepare_cached(
            "SELECT csp, name_ko, name_en, committed_hpc, committed_research, committed_advanced,
                    updated_ms, updated_by FROM providers ORDER BY csp",
        )
        .map_err(db)?;
    st.query_map([], |r| {
        Ok(crate::registry::Provider {
            csp: r.get(0)?,
            name_ko: r.get(1)?,
            name_en: r.get(2)?,
            committed_hpc: r.get(3)?,
            committed_research: r.get(4)?,
            committed_advanced: r.get(5)?,
            updated_ms: r.get(6)?,
            updated_by: r.get(7)?,
        })
    })
    .map_err(db)?
    .collect::<Result<Vec<_>, _>>()
    .map_err(db)
}

/// The registered hosts, by host id.
fn read_registered_hosts(
    c: &Connection,
) -> Result<Vec<crate::registry::RegisteredHost>, StoreError> {
    let mut st = c
        .prepare_cached(
            "SELECT host_id, csp, updated_ms, updated_by FROM registered_hosts ORDER BY host_id",
        )
        .map_err(db)?;
    st.query_map([], |r| {
        Ok(crate::registry::RegisteredHost {
            host_id: r.get(0)?,
            csp: r.get(1)?,
            updated_ms: r.get(2)?,
            updated_by: r.get(3)?,
        })
    })
    .map_err(db)?
    .collect::<Result<Vec<_>, _>>()
    .map_err(db)
}

/// Appends a registry history row.
fn registry_change(
    c: &Connection,
    at_ms: i64,
    actor: &str,
    kind: &str,
    subject: &str,
    action: &str,
    detail: &str,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO registry_history (at_ms, actor, kind, subject, action, detail)
         VALUES (?1,?2,?3,?4,?5,?6)",
        params![at_ms, actor, kind, subject, action, detail],
    )
    .map_err(db)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const C1: &str = "GPU-00000001-0000-4000-8000-000000000000";
    const C2: &str = "GPU-00000002-0000-4000-8000-000000000000";
    const DAY: i64 = 86_400_000;

    /// A research grant of `cards` (host, card) from day 10 to day 40 (also the store suite's).
    pub(crate) fn grant(id: &str, cards: &[(&str, &str)]) -> Grant {
        Grant {
            grant_id: id.into(),
            program: Program::Research,
            grantee: "Lab".into(),
            principal: "user:alice".parse().unwrap(),
            csp: "kt".into(),
            valid_from_ms: 10 * DAY,
            valid_until_ms: 40 * DAY,
            cards: cards.iter().map(|(h, u)| GrantCard::new(*h, *u)).collect(),
            revoked_at_ms: None,
        }
    }

    #[test]
    fn the_log_reaches_the_database_file_off_the_writers_commit_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.db");
        let store = SqliteStore::open(&path).unwrap();
        let autocheckpoint: i64 = store
            .w()
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .unwrap();
        assert_eq!(autocheckpoint, 0, "the writer never checkpoints inline");
        store
            .insert_grants(&[grant("G-WAL", &[("h1", C1)])], "test", 1)
            .unwrap();
        // A connection that ignores the log sees only what was copied into the file.
        let in_file = || {
            let c = Connection::open_with_flags(
                format!("file:{}?immutable=1", path.display()),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
            )
            .unwrap();
            // Until the first checkpoint even the schema is only in the log.
            c.query_row(
                "SELECT COUNT(*) FROM grants WHERE grant_id = 'G-WAL'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap_or(0)
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while in_file() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the checkpointer never copied the commit into the database file"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    #[test]
    fn grants_migration_keeps_cards_of_a_version_1_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            c.execute_batch(&format!(
                "INSERT INTO grants VALUES ('G', 'hpc', 'Acme', 'user:alice', 'kt', 1, 2, NULL);
                 INSERT INTO grant_cards VALUES ('G', 'h2', '{C2}');
                 INSERT INTO grant_cards VALUES ('G', 'h1', '{C1}');"
            ))
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let version: i64 = store
            .r()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let g = &store.grants().unwrap()[0];
        assert_eq!(
            g.cards,
            vec![GrantCard::new("h2", C2), GrantCard::new("h1", C1)]
        );
        assert_eq!(store.assignments("h1").unwrap().1.len(), 1);
    }
}

#[cfg(test)]
mod reconcile_reads_tests {
    use super::*;

    #[test]
    fn a_version_2_database_gains_the_reconciliation_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v2.db");
        {
            let mut c = Connection::open(&path).unwrap();
            let tx = c.transaction().unwrap();
            tx.execute_batch(MIGRATIONS[0]).unwrap();
            tx.execute_batch(MIGRATIONS[1]).unwrap();
            tx.pragma_update(None, "user_version", 2).unwrap();
            tx.commit().unwrap();
            c.execute_batch(
                "INSERT INTO agents VALUES ('a', 'host-a', 'kt', 'a', 't', 't', x'00', 1, 0, 0);
                 INSERT INTO windows (agent_id, seq, gpu_uuid, start_ms, end_ms, interval_ms, expected_samples,
                   good_samples, energy_estimated, health, unavailable_ms, assignment_status, grant_id, principal,
                   active_ms, occupied_ms, foreign_ms)
                 VALUES ('a', 1, 'GPU-1', 0, 60000, 1000, 60, 60, 0, 'ok', 0, 'assigned', 'G', 'user:a', 1, 2, 0);",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let w = store.windows(0, 60_000, None).unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(
            w[0].window.grantee_occupied_ms, None,
            "older windows carry no union"
        );
        assert!(store.invoices().unwrap().is_empty());
    }
}
