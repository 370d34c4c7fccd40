//! The PostgreSQL store (`--db postgres://…`): the scale-out backend, with the SQLite store's
//! schema, versions and semantics (see [`super::postgres_schema`] for the format).
//!
//! Rules, as in `sqlite.rs`: a commit returns only once PostgreSQL has it durably (the server's
//! `synchronous_commit`, on by default), and acks are sent only after that. `records` keeps
//! every body and chain link verbatim, keyed by (agent_id, seq) forever; a duplicate with the
//! same bytes is skipped, one with other bytes is kept out and raises an `equivocation` alarm
//! (see [`super::postgres_commit`]). Grants are changed in place only together with a
//! `grant_history` row in the same transaction. Changes that read before they write (grant
//! imports and amendments, card moves, heads) take a transaction-scoped advisory lock, so
//! collectors sharing one database take turns as SQLite's IMMEDIATE transactions do.
//!
//! The collector's signing key is never stored in the database: it lives in a file named by
//! `--collector-key` (SQLite keeps it beside its database file instead).
//!
//! Threads. The `postgres` crate is synchronous, which fits the synchronous [`Store`] trait,
//! but each client drives its socket with a tokio runtime of its own and panics when called
//! (or dropped) on a thread that is running async code. Every call here goes through
//! [`PgConn::with`], which runs it on the calling thread when that thread is outside any
//! runtime (the writer thread, the CLI's blocking paths) and on a scoped helper thread
//! otherwise (tokio workers, `spawn_blocking`), so the store is safe from anywhere.
//! Connections: one for ingest and admin writes, one for queries, one for token lookups (so a
//! long report never delays authentication), as in the SQLite store; one more per `ledger()`;
//! and one holding the session claims.
//!
//! Several collectors on one database. Each agent has one live session across all of them:
//! [`Store::claim_session`] takes a session-scoped advisory lock keyed by the agent id on
//! this collector's claims connection and holds it for the session, so a collector that dies
//! (its connection closes) releases its agents at once. Dedup, equivocation and window flags
//! are decided inside each commit's transaction against what is committed, whichever
//! collector committed it; a batch re-sent to another collector after a switch is a
//! duplicate. Grant changes made through another collector are seen by polling the
//! assignments version ([`Store::shared_poll`]). Heads are numbered under a lock across
//! collectors; all collectors of one database must be given the same `--collector-key` file
//! (an auditor's heads file refuses a head under another key). Limitation: if the claims
//! connection itself breaks, the claims it held are gone while their sessions continue
//! until they next reconnect.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use gpumeter_proto::chain::{GENESIS, Hash};
use postgres::{GenericClient, NoTls, Row};

use super::{
    AgentHello, AgentState, Alarm, AssignmentRow, CardMoveRow, CardUsageRow, CommitOutcome,
    EventRow, GpuRow, GrantChangeRow, GrantRecord, HostRow, IngestBatch, Invoice, MeteredWindow,
    MigRow, PrincipalRow, Store, StoreError, StoredEvent, StoredInvoice, TenantUsageRow, TokenRow,
    Usage, WindowRow,
};
use crate::grants::{Amendment, Grant, GrantCard, Program, amend};
use crate::store::postgres_schema::MIGRATIONS;
use crate::store::sqlite::{EVENT_KINDS, HEALTHS, STATUSES, known};

/// Whether `db` names a PostgreSQL database rather than a SQLite file.
pub fn is_postgres_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// A connection string safe to print: any password is replaced.
pub fn redact(url: &str) -> String {
    // postgres://user:secret@host/db → postgres://user:***@host/db
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((auth, host)) = rest.split_once('@') {
            if let Some((user, _)) = auth.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
    }
    url.to_string()
}

/// Advisory lock keys (transaction scope) of the changes that read before they write.
pub(crate) const LOCK_GRANTS: i64 = 0x6770_6d01;
pub(crate) const LOCK_HEADS: i64 = 0x6770_6d02;
pub(crate) const LOCK_CARDS: i64 = 0x6770_6d03;
/// Registry changes (providers, hosts): read, decide, write under it.
const LOCK_REGISTRY: i64 = 0x6770_6d04;
/// Session-scoped: one collector at a time migrates.
const LOCK_MIGRATE: i64 = 0x6770_6d00;

pub(crate) fn db(e: postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(d) => {
            let mut s = String::new();
            // The same words as SQLite's for the same failure, so operators (and the suite
            // that runs on both) read one message.
            if d.code() == &postgres::error::SqlState::UNIQUE_VIOLATION {
                s.push_str("UNIQUE constraint failed: ");
            }
            s.push_str(d.message());
            if let Some(detail) = d.detail() {
                s.push_str(": ");
                s.push_str(detail);
            }
            StoreError::Db(s)
        }
        None => {
            // The crate's message names only the step ("error serializing parameter 1"); the
            // cause says what went wrong.
            let mut s = e.to_string();
            if let Some(cause) = std::error::Error::source(&e) {
                s.push_str(": ");
                s.push_str(&cause.to_string());
            }
            StoreError::Db(s)
        }
    }
}

/// Runs `f` where a `postgres` client may block: here when this thread runs no async code,
/// on a scoped helper thread otherwise.
pub(crate) fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// One PostgreSQL connection, usable from any thread; reconnects when the server closed it.
pub(crate) struct PgConn {
    config: postgres::Config,
    label: String,
    client: Mutex<Option<Conn>>,
}

/// A live connection and the commit statements prepared on it (gone with it).
struct Conn {
    client: postgres::Client,
    commit: Option<super::postgres_commit::Statements>,
}

impl std::fmt::Debug for PgConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConn").field("db", &self.label).finish()
    }
}

impl PgConn {
    pub(crate) fn open(url: &str) -> Result<Self, StoreError> {
        let config: postgres::Config =
            url.parse().map_err(|e: postgres::Error| StoreError::Open {
                path: redact(url),
                reason: e.to_string(),
            })?;
        let conn = Self {
            config,
            label: redact(url),
            client: Mutex::new(None),
        };
        // Connect now, so a wrong URL fails at open and names the database.
        conn.with(|_| Ok(()))?;
        Ok(conn)
    }

    /// Runs `f` on the connection (see the module doc for which thread).
    pub(crate) fn with<T: Send>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        self.with_commit(|c, _| f(c))
    }

    /// [`PgConn::with`], also handing over the commit statements prepared on this
    /// connection (`None` until the commit path prepares them; reset on reconnect).
    pub(crate) fn with_commit<T: Send>(
        &self,
        f: impl FnOnce(
            &mut postgres::Client,
            &mut Option<super::postgres_commit::Statements>,
        ) -> Result<T, StoreError>
        + Send,
    ) -> Result<T, StoreError> {
        let mut guard = self.client.lock().unwrap_or_else(|p| p.into_inner());
        let slot: &mut Option<Conn> = &mut guard;
        let config = &self.config;
        let label = &self.label;
        off_runtime(move || {
            if slot.as_ref().is_none_or(|c| c.client.is_closed()) {
                let c = config.connect(NoTls).map_err(|e| StoreError::Open {
                    path: label.clone(),
                    reason: match e.as_db_error() {
                        Some(d) => d.message().to_string(),
                        None => e.to_string(),
                    },
                })?;
                *slot = Some(Conn {
                    client: c,
                    commit: None,
                });
            }
            match slot.as_mut() {
                Some(c) => f(&mut c.client, &mut c.commit),
                None => Err(StoreError::Closed),
            }
        })
    }
}

impl Drop for PgConn {
    fn drop(&mut self) {
        // A client's runtime must not be dropped on a thread that runs async code either.
        let client = self
            .client
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if client.is_some() {
            off_runtime(move || drop(client));
        }
    }
}

/// Applies pending migrations, one transaction each; returns the version now held.
pub fn migrate(c: &mut postgres::Client) -> Result<i64, StoreError> {
    let known = MIGRATIONS.len() as i64;
    c.execute("SELECT pg_advisory_lock($1::BIGINT)", &[&LOCK_MIGRATE])
        .map_err(db)?;
    let result = (|| {
        c.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            .map_err(db)?;
        let found: i64 = match c
            .query_opt("SELECT version FROM schema_version", &[])
            .map_err(db)?
        {
            Some(r) => r.get(0),
            None => {
                c.execute("INSERT INTO schema_version (version) VALUES (0)", &[])
                    .map_err(db)?;
                0
            }
        };
        if found > known {
            return Err(StoreError::SchemaTooNew { found, known });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let mut tx = c.transaction().map_err(db)?;
            tx.batch_execute(sql).map_err(db)?;
            if i + 1 == super::postgres_rollup::ROLLUPS_VERSION {
                super::postgres_rollup::backfill(&mut tx)?;
            }
            tx.execute("UPDATE schema_version SET version = $1", &[&(i as i64 + 1)])
                .map_err(db)?;
            tx.commit().map_err(db)?;
        }
        Ok(known)
    })();
    let unlock = c
        .execute("SELECT pg_advisory_unlock($1::BIGINT)", &[&LOCK_MIGRATE])
        .map_err(db);
    let v = result?;
    unlock?;
    Ok(v)
}

/// The schema version a database holds (0 for none).
pub fn schema_version(c: &mut impl GenericClient) -> Result<i64, StoreError> {
    let exists: bool = c
        .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])
        .map_err(db)?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(c.query_opt("SELECT version FROM schema_version", &[])
        .map_err(db)?
        .map_or(0, |r| r.get(0)))
}

/// PostgreSQL-backed [`Store`].
#[derive(Debug)]
pub struct PgStore {
    url: String,
    pub(crate) writer: PgConn,
    reader: PgConn,
    auth: PgConn,
    key_path: Option<PathBuf>,
    head_key: OnceLock<ed25519_dalek::SigningKey>,
    /// Holds the session claims (advisory locks) of this collector's live sessions.
    claims: std::sync::Arc<PgConn>,
}

impl PgStore {
    /// Opens (and migrates) the database at `url`. `collector_key` is the file holding the
    /// collector's signing key (created on first use); without it, signing heads and reports
    /// fails with an error naming `--collector-key`.
    pub fn open(url: &str, collector_key: Option<&Path>) -> Result<Self, StoreError> {
        let writer = PgConn::open(url)?;
        writer.with(|c| migrate(c).map(|_| ()))?;
        Ok(Self {
            url: url.to_string(),
            reader: PgConn::open(url)?,
            auth: PgConn::open(url)?,
            writer,
            key_path: collector_key.map(Path::to_path_buf),
            head_key: OnceLock::new(),
            claims: std::sync::Arc::new(PgConn::open(url)?),
        })
    }

    /// The database, as given (for opening further connections).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn collector_key(&self) -> Result<&ed25519_dalek::SigningKey, StoreError> {
        if let Some(k) = self.head_key.get() {
            return Ok(k);
        }
        let path = self.key_path.as_ref().ok_or_else(|| StoreError::Open {
            path: redact(&self.url),
            reason: "the PostgreSQL store keeps the collector's signing key in a file, never in the database: give --collector-key PATH (config field collector_key)".into(),
        })?;
        let k = gpumeter_proto::keys::load_or_create(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(self.head_key.get_or_init(|| k))
    }

    /// Where an agent's ledger stands.
    pub(crate) fn durable(
        c: &mut impl GenericClient,
        agent_id: &str,
    ) -> Result<AgentState, StoreError> {
        let row = c
            .query_opt(
                "SELECT seq, hash FROM records WHERE agent_id = $1 ORDER BY seq DESC LIMIT 1",
                &[&agent_id],
            )
            .map_err(db)?;
        Ok(match row {
            Some(r) => AgentState {
                durable_seq: r.get::<_, i64>(0) as u64,
                durable_hash: hash_from(r.get(1)),
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

/// The advisory lock key of an agent's live session.
fn session_key(agent_id: &str) -> i64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"gpumeter.v1.session\0");
    h.update(agent_id.as_bytes());
    let d = h.finalize();
    let mut k = [0u8; 8];
    k.copy_from_slice(&d[..8]);
    i64::from_be_bytes(k)
}

/// A live session's claim: the advisory lock, released on drop.
struct PgClaim {
    conn: std::sync::Arc<PgConn>,
    key: i64,
}

impl Drop for PgClaim {
    fn drop(&mut self) {
        let key = self.key;
        if let Err(e) = self.conn.with(|c| {
            c.execute("SELECT pg_advisory_unlock($1::BIGINT)", &[&key])
                .map_err(db)
        }) {
            tracing::warn!(error = %e, "releasing a session claim failed");
        }
    }
}

pub(crate) fn hash_from(v: Vec<u8>) -> Hash {
    v.as_slice().try_into().unwrap_or(GENESIS)
}

pub(crate) fn opt_u64(v: Option<u64>) -> Option<i64> {
    v.map(|x| x as i64)
}

pub(crate) fn opt_u32(v: Option<u32>) -> Option<i64> {
    v.map(i64::from)
}

fn u(v: i64) -> u64 {
    v.max(0) as u64
}

fn opt_u(v: Option<i64>) -> Option<u64> {
    v.map(u)
}

fn opt_small(v: Option<i64>) -> Option<u32> {
    v.map(|x| x.clamp(0, u32::MAX as i64) as u32)
}

fn small(v: i64) -> u32 {
    v.clamp(0, u32::MAX as i64) as u32
}

pub(crate) fn insert_alarm(c: &mut impl GenericClient, a: &Alarm) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO alarms (agent_id, at_ms, kind, seq, detail) VALUES ($1, $2, $3, $4, $5)",
        &[
            &a.agent_id,
            &a.at_ms,
            &a.kind,
            &a.seq.map(|s| s as i64),
            &a.detail,
        ],
    )
    .map_err(db)?;
    Ok(())
}

/// The providers held, by CSP id.
fn pg_providers(c: &mut impl GenericClient) -> Result<Vec<crate::registry::Provider>, StoreError> {
    Ok(c.query(
        "SELECT csp, name_ko, name_en, committed_hpc, committed_research, committed_advanced,
                updated_ms, updated_by FROM providers ORDER BY csp",
        &[],
    )
    .map_err(db)?
    .iter()
    .map(|r| crate::registry::Provider {
        csp: r.get(0),
        name_ko: r.get(1),
        name_en: r.get(2),
        committed_hpc: small(r.get(3)),
        committed_research: small(r.get(4)),
        committed_advanced: small(r.get(5)),
        updated_ms: r.get(6),
        updated_by: r.get(7),
    })
    .collect())
}

/// The registered hosts, by host id.
fn pg_registered_hosts(
    c: &mut impl GenericClient,
) -> Result<Vec<crate::registry::RegisteredHost>, StoreError> {
    Ok(c.query(
        "SELECT host_id, csp, updated_ms, updated_by FROM registered_hosts ORDER BY host_id",
        &[],
    )
    .map_err(db)?
    .iter()
    .map(|r| crate::registry::RegisteredHost {
        host_id: r.get(0),
        csp: r.get(1),
        updated_ms: r.get(2),
        updated_by: r.get(3),
    })
    .collect())
}

/// Appends a registry history row.
fn pg_registry_change(
    c: &mut impl GenericClient,
    at_ms: i64,
    actor: &str,
    kind: &str,
    subject: &str,
    action: &str,
    detail: &str,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO registry_history (at_ms, actor, kind, subject, action, detail)
         VALUES ($1,$2,$3,$4,$5,$6)",
        &[&at_ms, &actor, &kind, &subject, &action, &detail],
    )
    .map_err(db)?;
    Ok(())
}

fn lock(c: &mut impl GenericClient, key: i64) -> Result<(), StoreError> {
    c.execute("SELECT pg_advisory_xact_lock($1::BIGINT)", &[&key])
        .map_err(db)?;
    Ok(())
}

/// The windows that count (alias `w`): see `COUNTED` in `sqlite.rs` (migration 7).
const COUNTED: &str = "NOT EXISTS (SELECT 1 FROM disputed_windows d JOIN gpus o ON o.gpu_uuid = d.gpu_uuid
                         WHERE d.agent_id = w.agent_id AND d.seq = w.seq AND o.host_id <> d.host_id)";

const UNFLAGGED: &str =
    "NOT EXISTS (SELECT 1 FROM window_flags f WHERE f.agent_id = w.agent_id AND f.seq = w.seq)";

impl Store for PgStore {
    fn hello(&self, h: &AgentHello) -> Result<AgentState, StoreError> {
        self.writer.with(|c| {
            let mut tx = c.transaction().map_err(db)?;
            let pinned = tx
                .query_opt(
                    "SELECT public_key, host_id, csp FROM agents WHERE agent_id = $1 FOR UPDATE",
                    &[&h.agent_id],
                )
                .map_err(db)?
                .map(|r| {
                    (
                        r.get::<_, Vec<u8>>(0),
                        r.get::<_, String>(1),
                        r.get::<_, String>(2),
                    )
                });
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
                        "UPDATE agents SET host_id=$2, csp=$3, hostname=$4, agent_version=$5, driver_version=$6, epoch=$7, last_seen_ms=$8 WHERE agent_id=$1",
                        &[&h.agent_id, &h.host_id, &h.csp, &h.hostname, &h.agent_version, &h.driver_version, &(h.epoch as i64), &h.received_ms],
                    )
                    .map_err(db)?;
                }
                None => {
                    tx.execute(
                        "INSERT INTO agents (agent_id, host_id, csp, hostname, agent_version, driver_version, public_key, epoch, first_seen_ms, last_seen_ms) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$9)",
                        &[&h.agent_id, &h.host_id, &h.csp, &h.hostname, &h.agent_version, &h.driver_version, &h.public_key.as_slice(), &(h.epoch as i64), &h.received_ms],
                    )
                    .map_err(db)?;
                }
            }
            for g in &h.gpus {
                // A card another host holds stays that host's; the claim is an alarm.
                let holder: Option<String> = tx
                    .query_opt("SELECT host_id FROM gpus WHERE gpu_uuid = $1", &[&g.uuid])
                    .map_err(db)?
                    .map(|r| r.get(0));
                // A card no host reported yet but a grant assigns to another host is that
                // host's (an admin's assignment): held for it, with no agent until its Hello.
                let holder = match holder {
                    Some(h) => Some(h),
                    None => {
                        let granted: Option<String> = tx
                            .query_opt(
                                "SELECT host_id FROM grant_cards WHERE gpu_uuid = $1 ORDER BY id DESC LIMIT 1",
                                &[&g.uuid],
                            )
                            .map_err(db)?
                            .map(|r| r.get(0));
                        if let Some(k) = granted.as_ref().filter(|k| **k != h.host_id) {
                            tx.execute(
                                "INSERT INTO gpus (gpu_uuid, agent_id, host_id, idx, name, serial, pci_bus_id, memory_total_bytes, mig_mode, last_seen_ms)
                                 VALUES ($1, '', $2, 0, '', '', '', NULL, '', $3) ON CONFLICT (gpu_uuid) DO NOTHING",
                                &[&g.uuid, k, &h.received_ms],
                            )
                            .map_err(db)?;
                        }
                        granted
                    }
                };
                let claimed = |holder: &str| Alarm {
                    agent_id: h.agent_id.clone(),
                    at_ms: h.received_ms,
                    kind: "card_claimed".into(),
                    seq: None,
                    detail: format!(
                        "host {} listed card {} that host {holder} holds; the card stays with {holder} and windows for it from {} count in no figure until an admin moves it (hosts move-card)",
                        h.host_id, g.uuid, h.host_id
                    ),
                };
                if let Some(holder) = holder.filter(|o| *o != h.host_id) {
                    insert_alarm(&mut tx, &claimed(&holder))?;
                    continue;
                }
                let mig = g.mig.clone().unwrap_or_default();
                // Only the holder's own row is updated: another host that took the card
                // in between (through another collector) keeps it, and this is a claim.
                let taken = tx
                    .query(
                        "INSERT INTO gpus (gpu_uuid, agent_id, host_id, idx, name, serial, pci_bus_id, memory_total_bytes, mig_mode, last_seen_ms,
                                           parent_uuid, mig_profile, mig_slices, parent_slices)
                         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)
                         ON CONFLICT (gpu_uuid) DO UPDATE SET agent_id=excluded.agent_id, host_id=excluded.host_id, idx=excluded.idx,
                           name=excluded.name, serial=excluded.serial, pci_bus_id=excluded.pci_bus_id,
                           memory_total_bytes=excluded.memory_total_bytes, mig_mode=excluded.mig_mode, last_seen_ms=excluded.last_seen_ms,
                           parent_uuid=excluded.parent_uuid, mig_profile=excluded.mig_profile,
                           mig_slices=excluded.mig_slices, parent_slices=excluded.parent_slices
                         WHERE gpus.host_id = excluded.host_id
                         RETURNING 1",
                        &[
                            &g.uuid, &h.agent_id, &h.host_id, &i64::from(g.index), &g.name, &g.serial, &g.pci_bus_id,
                            &opt_u64(g.memory_total_bytes), &g.mig_mode, &h.received_ms,
                            &mig.parent_uuid, &mig.profile, &opt_u32(mig.slices), &opt_u32(mig.parent_slices),
                        ],
                    )
                    .map_err(db)?
                    .is_empty();
                if taken {
                    let holder: String = tx
                        .query_one("SELECT host_id FROM gpus WHERE gpu_uuid = $1", &[&g.uuid])
                        .map_err(db)?
                        .get(0);
                    insert_alarm(&mut tx, &claimed(&holder))?;
                }
            }
            super::postgres_integrity::note_cards(&mut tx, h)?;
            super::postgres_integrity::note_key(
                &mut tx,
                &h.agent_id,
                &h.public_key,
                "first use",
                "",
                h.received_ms,
            )?;
            let mut state = Self::durable(&mut tx, &h.agent_id)?;
            state.epoch = tx
                .query_one(
                    "SELECT COALESCE(MAX(epoch), 0) FROM checkpoints WHERE agent_id = $1",
                    &[&h.agent_id],
                )
                .map_err(db)?
                .get::<_, i64>(0) as u64;
            tx.commit().map_err(db)?;
            Ok(state)
        })
    }

    fn commit(&self, batches: &[IngestBatch]) -> Result<Vec<CommitOutcome>, StoreError> {
        super::postgres_commit::commit_batches(self, batches, false)?
            .into_iter()
            .collect()
    }

    fn commit_each(
        &self,
        batches: &[IngestBatch],
    ) -> Result<Vec<Result<CommitOutcome, StoreError>>, StoreError> {
        super::postgres_commit::commit_batches(self, batches, true)
    }

    fn agent_registered_ms(&self, agent_id: &str) -> Result<Option<i64>, StoreError> {
        self.reader.with(|c| {
            Ok(c.query_opt(
                "SELECT first_seen_ms FROM agents WHERE agent_id = $1",
                &[&agent_id],
            )
            .map_err(db)?
            .map(|r| r.get(0)))
        })
    }

    fn move_host_card(
        &self,
        gpu_uuid: &str,
        to_host_id: &str,
        actor: &str,
        reason: &str,
        at_ms: i64,
    ) -> Result<CardMoveRow, StoreError> {
        self.writer.with(|c| {
            let mut tx = c.transaction().map_err(db)?;
            lock(&mut tx, LOCK_CARDS)?;
            let from: String = tx
                .query_opt("SELECT host_id FROM gpus WHERE gpu_uuid = $1", &[&gpu_uuid])
                .map_err(db)?
                .map(|r| r.get(0))
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
                .query_opt(
                    "SELECT agent_id FROM agents WHERE host_id = $1 AND csp <> '' ORDER BY last_seen_ms DESC LIMIT 1",
                    &[&to_host_id],
                )
                .map_err(db)?
                .map(|r| r.get(0))
                .unwrap_or_default();
            tx.execute(
                "UPDATE gpus SET host_id = $2, agent_id = $3 WHERE gpu_uuid = $1",
                &[&gpu_uuid, &to_host_id, &agent],
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
                "INSERT INTO card_moves (gpu_uuid, from_host_id, to_host_id, at_ms, actor, reason) VALUES ($1,$2,$3,$4,$5,$6)",
                &[&row.gpu_uuid, &row.from_host_id, &row.to_host_id, &row.at_ms, &row.actor, &row.reason],
            )
            .map_err(db)?;
            insert_alarm(
                &mut tx,
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
        })
    }

    fn claim_session(&self, agent_id: &str) -> Result<Option<super::SessionClaim>, StoreError> {
        let key = session_key(agent_id);
        let got: bool = self.claims.with(|c| {
            Ok(
                c.query_one("SELECT pg_try_advisory_lock($1::BIGINT)", &[&key])
                    .map_err(db)?
                    .get(0),
            )
        })?;
        Ok(got.then(|| {
            super::SessionClaim::holding(PgClaim {
                conn: self.claims.clone(),
                key,
            })
        }))
    }

    fn shared_poll(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_secs(1))
    }

    fn rollups(
        &self,
        level: crate::rollup::Level,
        from_ms: i64,
        until_ms: i64,
        visit: &mut dyn FnMut(Vec<crate::rollup::RollupRow>),
    ) -> Result<bool, StoreError> {
        let mut groups = Vec::new();
        self.reader.with(|c| {
            super::postgres_rollup::visit(c, level, from_ms, until_ms, &mut |g| groups.push(g))
        })?;
        for g in groups {
            visit(g);
        }
        Ok(true)
    }

    fn retention(&self) -> Result<crate::retention::Retention, StoreError> {
        self.reader.with(super::postgres_retention::load)
    }

    fn retain(
        &self,
        req: &crate::retention::RetainRequest,
    ) -> Result<crate::retention::Retained, StoreError> {
        let head = self.sign_head(req.at_ms)?;
        crate::retention::run(
            &mut super::postgres_retention::Ops(&self.writer),
            req,
            &head,
        )
    }

    fn card_moves(&self, gpu_uuid: Option<&str>) -> Result<Vec<CardMoveRow>, StoreError> {
        self.reader.with(|c| {
            let rows = c
                .query(
                    "SELECT gpu_uuid, from_host_id, to_host_id, at_ms, actor, reason FROM card_moves
                     WHERE ($1::text IS NULL OR gpu_uuid = $1) ORDER BY id",
                    &[&gpu_uuid],
                )
                .map_err(db)?;
            Ok(rows
                .iter()
                .map(|r| CardMoveRow {
                    gpu_uuid: r.get(0),
                    from_host_id: r.get(1),
                    to_host_id: r.get(2),
                    at_ms: r.get(3),
                    actor: r.get(4),
                    reason: r.get(5),
                })
                .collect())
        })
    }

    fn record_hash(&self, agent_id: &str, seq: u64) -> Result<Option<Hash>, StoreError> {
        self.reader.with(|c| {
            Ok(c.query_opt(
                "SELECT hash FROM records WHERE agent_id = $1 AND seq = $2",
                &[&agent_id, &(seq as i64)],
            )
            .map_err(db)?
            .map(|r| hash_from(r.get(0))))
        })
    }

    fn alarm(&self, alarm: &Alarm) -> Result<(), StoreError> {
        self.writer.with(|c| insert_alarm(c, alarm))
    }

    fn alarms(&self, agent_id: Option<&str>) -> Result<Vec<Alarm>, StoreError> {
        self.reader.with(|c| {
            let rows = c
                .query(
                    "SELECT agent_id, at_ms, kind, seq, detail FROM alarms WHERE ($1::text IS NULL OR agent_id = $1) ORDER BY id",
                    &[&agent_id],
                )
                .map_err(db)?;
            Ok(rows
                .iter()
                .map(|r| Alarm {
                    agent_id: r.get(0),
                    at_ms: r.get(1),
                    kind: r.get(2),
                    seq: opt_u(r.get(3)),
                    detail: r.get(4),
                })
                .collect())
        })
    }

    fn window_bodies(
        &self,
        from_ms: i64,
        until_ms: i64,
        cards: Option<&[String]>,
    ) -> Result<Vec<super::WindowBody>, StoreError> {
        let cards: Option<Vec<String>> = cards.map(<[String]>::to_vec);
        self.reader.with(|c| {
            let rows = c
                .query(
                    &format!(
                        "SELECT w.agent_id, a.host_id, w.seq, r.body, r.block
                     FROM windows w JOIN records r ON r.agent_id = w.agent_id AND r.seq = w.seq
                     JOIN agents a ON a.agent_id = w.agent_id
                     WHERE w.start_ms >= $1 AND w.start_ms < $2
                       AND ($3::text[] IS NULL OR w.gpu_uuid = ANY($3))
                       AND {COUNTED} AND {UNFLAGGED}
                     ORDER BY w.agent_id, w.seq"
                    ),
                    &[&from_ms, &until_ms, &cards],
                )
                .map_err(db)?;
            let mut blocks = super::body_block::BlockCache::default();
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let (agent_id, seq): (String, u64) = (r.get(0), r.get::<_, i64>(2) as u64);
                let body = blocks.body_of(&agent_id, seq, r.get(3), r.get(4), |id| {
                    super::postgres_ledger::load_block(c, &agent_id, id)
                })?;
                out.push((agent_id, r.get(1), seq, body));
            }
            Ok(out)
        })
    }

    fn usage(&self, from_ms: i64, until_ms: i64) -> Result<Usage, StoreError> {
        self.reader.with(|c| {
            let cards = c
                .query(
                    &format!(
                        "SELECT w.agent_id, a.host_id, a.csp, w.gpu_uuid, COALESCE(MAX(g.name), ''), COUNT(*),
                                SUM(w.good_samples * w.interval_ms + w.unavailable_ms)::BIGINT,
                                SUM(w.occupied_ms)::BIGINT, SUM(w.active_ms)::BIGINT, SUM(w.foreign_ms)::BIGINT,
                                SUM(w.unavailable_ms)::BIGINT,
                                SUM(CASE WHEN w.util_avg_pct IS NULL THEN 0 ELSE w.util_avg_pct * w.good_samples * w.interval_ms END)::DOUBLE PRECISION,
                                SUM(CASE WHEN w.util_avg_pct IS NULL THEN 0 ELSE w.good_samples * w.interval_ms END)::BIGINT,
                                COALESCE(SUM(w.energy_mj), 0)::BIGINT, COALESCE(MAX(w.memory_used_max_bytes), 0)
                         FROM windows w JOIN agents a ON a.agent_id = w.agent_id
                         LEFT JOIN gpus g ON g.gpu_uuid = w.gpu_uuid
                         WHERE w.start_ms >= $1 AND w.start_ms < $2 AND {COUNTED} AND {UNFLAGGED}
                         GROUP BY w.agent_id, a.host_id, a.csp, w.gpu_uuid
                         ORDER BY a.host_id, w.gpu_uuid"
                    ),
                    &[&from_ms, &until_ms],
                )
                .map_err(db)?
                .iter()
                .map(|r| {
                    let weighted: f64 = r.get(11);
                    let util_ms: i64 = r.get(12);
                    CardUsageRow {
                        agent_id: r.get(0),
                        host_id: r.get(1),
                        csp: r.get(2),
                        gpu_uuid: r.get(3),
                        gpu_name: r.get(4),
                        windows: small(r.get(5)),
                        metered_ms: u(r.get(6)),
                        occupied_ms: u(r.get(7)),
                        active_ms: u(r.get(8)),
                        foreign_ms: u(r.get(9)),
                        unavailable_ms: u(r.get(10)),
                        util_avg_pct: (util_ms > 0).then(|| weighted / util_ms as f64),
                        energy_mj: u(r.get(13)),
                        memory_used_max_bytes: u(r.get(14)),
                    }
                })
                .collect();
            let tenants = c
                .query(
                    &format!(
                        "SELECT a.host_id, w.gpu_uuid, p.principal, w.grant_id, SUM(p.occupied_ms)::BIGINT,
                                SUM(p.active_ms)::BIGINT, MAX(p.memory_max_bytes), bool_and(p.matches_grant)
                         FROM window_principals p
                         JOIN windows w ON w.agent_id = p.agent_id AND w.seq = p.seq
                         JOIN agents a ON a.agent_id = w.agent_id
                         WHERE w.start_ms >= $1 AND w.start_ms < $2 AND {COUNTED} AND {UNFLAGGED}
                         GROUP BY a.host_id, w.gpu_uuid, p.principal, w.grant_id
                         ORDER BY a.host_id, w.gpu_uuid, p.principal, w.grant_id"
                    ),
                    &[&from_ms, &until_ms],
                )
                .map_err(db)?
                .iter()
                .map(|r| TenantUsageRow {
                    host_id: r.get(0),
                    gpu_uuid: r.get(1),
                    principal: r.get(2),
                    grant_id: r.get(3),
                    occupied_ms: u(r.get(4)),
                    active_ms: u(r.get(5)),
                    memory_max_bytes: u(r.get(6)),
                    matches_grant: r.get(7),
                })
                .collect();
            Ok(Usage { cards, tenants })
        })
    }

    fn hosts(&self) -> Result<Vec<HostRow>, StoreError> {
        self.reader.with(|c| {
            let mut hosts: Vec<HostRow> = c
                .query(
                    "SELECT agent_id, host_id, csp, hostname, agent_version, last_seen_ms FROM agents ORDER BY host_id, agent_id",
                    &[],
                )
                .map_err(db)?
                .iter()
                .map(|r| HostRow {
                    agent_id: r.get(0),
                    host_id: r.get(1),
                    csp: r.get(2),
                    hostname: r.get(3),
                    agent_version: r.get(4),
                    last_seen_ms: r.get(5),
                    durable_seq: 0,
                    last_record_ms: None,
                    gpus: vec![],
                })
                .collect();
            // Every card in one read, dealt out to its agent: a read per agent has no index on
            // agent_id to use and reads the whole table each time (2,500 hosts × 20,000 cards).
            let mut gpus: std::collections::HashMap<String, Vec<GpuRow>> = Default::default();
            for r in c
                .query(
                    "SELECT gpu_uuid, idx, name, serial, pci_bus_id, memory_total_bytes, mig_mode,
                            parent_uuid, mig_profile, mig_slices, parent_slices, agent_id
                     FROM gpus ORDER BY agent_id, idx, parent_uuid, gpu_uuid",
                    &[],
                )
                .map_err(db)?
            {
                gpus.entry(r.get(11)).or_default().push(gpu_row(&r));
            }
            let last = c
                .prepare(
                    "SELECT seq, received_ms FROM records WHERE agent_id = $1 ORDER BY seq DESC LIMIT 1",
                )
                .map_err(db)?;
            for h in &mut hosts {
                if let Some(r) = c.query_opt(&last, &[&h.agent_id]).map_err(db)? {
                    h.durable_seq = r.get::<_, i64>(0).max(0) as u64;
                    h.last_record_ms = Some(r.get(1));
                }
                h.gpus = gpus.remove(&h.agent_id).unwrap_or_default();
            }
            Ok(hosts)
        })
    }

    fn known_card(&self, host_id: &str, gpu_uuid: &str) -> Result<bool, StoreError> {
        self.reader.with(|c| {
            Ok(c.query_opt(
                "SELECT 1 FROM gpus WHERE host_id = $1 AND gpu_uuid = $2",
                &[&host_id, &gpu_uuid],
            )
            .map_err(db)?
            .is_some())
        })
    }

    fn grants(&self) -> Result<Vec<Grant>, StoreError> {
        self.reader.with(|c| load_grants(c, None))
    }

    fn insert_grants(&self, grants: &[Grant], actor: &str, at_ms: i64) -> Result<(), StoreError> {
        self.writer.with(|c| {
            let mut tx = c.transaction().map_err(db)?;
            lock(&mut tx, LOCK_GRANTS)?;
            // The import was validated against the grants this collector read before taking
            // the lock; another collector may have imported since. No card may be in two
            // grants whose validity overlaps: checked again against what is held now.
            let held = load_grants(&mut tx, None)?;
            for g in grants {
                for card in &g.cards {
                    let mine = g.card_interval(card);
                    for h in held.iter().filter(|h| h.grant_id != g.grant_id) {
                        for theirs in h
                            .cards
                            .iter()
                            .filter(|c| c.gpu_uuid.eq_ignore_ascii_case(&card.gpu_uuid))
                        {
                            let t = h.card_interval(theirs);
                            if mine.0.max(t.0) < mine.1.min(t.1) {
                                return Err(StoreError::Conflict(format!(
                                    "card {} is already in grant {} for an overlapping period (imported since this import was checked); grant {} was not stored",
                                    card.gpu_uuid, h.grant_id, g.grant_id
                                )));
                            }
                        }
                    }
                }
            }
            for g in grants {
                tx.execute(
                    "INSERT INTO grants (grant_id, program, grantee, principal, csp, valid_from_ms, valid_until_ms, revoked_at_ms)
                     VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
                    &[&g.grant_id, &g.program.as_str(), &g.grantee, &g.principal.to_string(), &g.csp, &g.valid_from_ms, &g.valid_until_ms, &g.revoked_at_ms],
                )
                .map_err(|e| StoreError::Conflict(format!("grant {}: {}", g.grant_id, db(e))))?;
                insert_cards(&mut tx, g)?;
                insert_history(
                    &mut tx,
                    &g.grant_id,
                    &GrantChangeRow {
                        at_ms,
                        actor: actor.to_owned(),
                        action: "import".into(),
                        detail: format!("{} cards", g.cards.len()),
                    },
                )?;
            }
            bump_assignments_version(&mut tx)?;
            tx.commit().map_err(db)
        })
    }

    fn register_agent(
        &self,
        agent_id: &str,
        public_key: &[u8; 32],
        actor: &str,
        reason: &str,
        at_ms: i64,
    ) -> Result<(bool, bool), StoreError> {
        self.writer.with(|c| {
            let mut tx = c.transaction().map_err(db)?;
            let pinned: Option<Vec<u8>> = tx
                .query_opt(
                    "SELECT public_key FROM agents WHERE agent_id = $1 FOR UPDATE",
                    &[&agent_id],
                )
                .map_err(db)?
                .map(|r| r.get(0));
            let (created, replaced) = match &pinned {
                None => {
                    // Host, CSP and the rest arrive with the agent's first Hello.
                    tx.execute(
                        "INSERT INTO agents (agent_id, host_id, csp, hostname, agent_version, driver_version, public_key, epoch, first_seen_ms, last_seen_ms)
                         VALUES ($1, $1, '', '', '', '', $2, 0, $3, $3)",
                        &[&agent_id, &public_key.as_slice(), &at_ms],
                    )
                    .map_err(db)?;
                    (true, false)
                }
                Some(k) if k.as_slice() == public_key.as_slice() => (false, false),
                Some(_) => {
                    tx.execute(
                        "UPDATE agents SET public_key = $2 WHERE agent_id = $1",
                        &[&agent_id, &public_key.as_slice()],
                    )
                    .map_err(db)?;
                    (false, true)
                }
            };
            super::postgres_integrity::note_key(
                &mut tx, agent_id, public_key, actor, reason, at_ms,
            )?;
            insert_alarm(
                &mut tx,
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
        })
    }

    fn ledger(&self) -> Result<Box<dyn crate::verify::ChainSource + Send>, StoreError> {
        Ok(Box::new(super::postgres_ledger::PgLedger::open(&self.url)?))
    }

    fn assignments(&self, host_id: &str) -> Result<(u64, Vec<AssignmentRow>), StoreError> {
        self.reader.with(|c| {
            let version: String = c
                .query_one(
                    "SELECT value FROM meta WHERE key = 'assignments_version'",
                    &[],
                )
                .map_err(db)?
                .get(0);
            // A card's own bounds cut the grant's validity (see Grant::card_interval); the
            // revocation travels separately so the agent can say "revoked" rather than
            // "expired".
            let rows = c
                .query(
                    "SELECT gpu_uuid, grant_id, program, principal, from_ms, until_ms, revoked_at_ms FROM (
                       SELECT gc.gpu_uuid, g.grant_id, g.program, g.principal,
                              GREATEST(g.valid_from_ms, COALESCE(gc.card_from_ms, g.valid_from_ms)) AS from_ms,
                              LEAST(g.valid_until_ms, COALESCE(gc.card_until_ms, g.valid_until_ms)) AS until_ms,
                              g.revoked_at_ms
                       FROM grant_cards gc JOIN grants g ON g.grant_id = gc.grant_id
                       WHERE gc.host_id = $1) AS a
                     WHERE until_ms > from_ms
                     ORDER BY gpu_uuid, from_ms",
                    &[&host_id],
                )
                .map_err(db)?
                .iter()
                .map(|r| AssignmentRow {
                    gpu_uuid: r.get(0),
                    grant_id: r.get(1),
                    program: r.get(2),
                    principal: r.get(3),
                    valid_from_ms: r.get(4),
                    valid_until_ms: r.get(5),
                    revoked_at_ms: r.get(6),
                })
                .collect();
            Ok((version.parse().unwrap_or(0), rows))
        })
    }

    fn grant(&self, grant_id: &str) -> Result<Option<GrantRecord>, StoreError> {
        self.reader.with(|c| {
            let Some(grant) = load_grants(c, Some(grant_id))?.into_iter().next() else {
                return Ok(None);
            };
            let history = load_history(c, grant_id)?;
            Ok(Some(GrantRecord { grant, history }))
        })
    }

    fn amend_grant(
        &self,
        grant_id: &str,
        amendment: &Amendment,
        actor: &str,
        at_ms: i64,
    ) -> Result<GrantRecord, StoreError> {
        self.writer.with(|c| {
            let mut tx = c.transaction().map_err(db)?;
            // The grants read here must still be what is held when the change lands.
            lock(&mut tx, LOCK_GRANTS)?;
            let mut held = load_grants(&mut tx, None)?;
            let Some(index) = held.iter().position(|g| g.grant_id == grant_id) else {
                return Err(StoreError::NotFound {
                    what: "grant",
                    id: grant_id.to_owned(),
                });
            };
            let grant = held.swap_remove(index);
            let (amended, detail) = amend(&grant, &held, amendment)?;
            tx.execute(
                "UPDATE grants SET valid_from_ms = $2, valid_until_ms = $3, revoked_at_ms = $4 WHERE grant_id = $1",
                &[&grant_id, &amended.valid_from_ms, &amended.valid_until_ms, &amended.revoked_at_ms],
            )
            .map_err(db)?;
            // The card list is rewritten whole (see sqlite.rs): nothing is lost.
            tx.execute("DELETE FROM grant_cards WHERE grant_id = $1", &[&grant_id])
                .map_err(db)?;
            insert_cards(&mut tx, &amended)?;
            insert_history(
                &mut tx,
                grant_id,
                &GrantChangeRow {
                    at_ms,
                    actor: actor.to_owned(),
                    action: amendment.action().into(),
                    detail,
                },
            )?;
            bump_assignments_version(&mut tx)?;
            let history = load_history(&mut tx, grant_id)?;
            tx.commit().map_err(db)?;
            Ok(GrantRecord {
                grant: amended,
                history,
            })
        })
    }

    fn windows(
        &self,
        from_ms: i64,
        until_ms: i64,
        gpu_uuid: Option<&str>,
    ) -> Result<Vec<MeteredWindow>, StoreError> {
        self.reader.with(|c| {
            // As in sqlite.rs: no window is longer than a day, so the lower bound on start_ms
            // lets the index answer; disputed and flagged windows do not count.
            let where_ = format!(
                "w.start_ms >= $1::BIGINT - 86400000 AND w.start_ms < $2::BIGINT AND w.end_ms > $1::BIGINT
                 AND ($3::text IS NULL OR w.gpu_uuid = $3) AND {COUNTED} AND {UNFLAGGED}"
            );
            let mut windows: Vec<MeteredWindow> = c
                .query(
                    &format!(
                        "SELECT w.agent_id, a.host_id, a.csp, w.seq, {WINDOW_COLUMNS}
                         FROM windows w JOIN agents a ON a.agent_id = w.agent_id
                         WHERE {where_}
                         ORDER BY w.gpu_uuid, w.start_ms, w.agent_id, w.seq"
                    ),
                    &[&from_ms, &until_ms, &gpu_uuid],
                )
                .map_err(db)?
                .iter()
                .map(|r| MeteredWindow {
                    agent_id: r.get(0),
                    host_id: r.get(1),
                    csp: r.get(2),
                    seq: u(r.get(3)),
                    window: window_row(r, 4),
                })
                .collect();
            let index: std::collections::HashMap<(String, u64), usize> = windows
                .iter()
                .enumerate()
                .map(|(i, w)| ((w.agent_id.clone(), w.seq), i))
                .collect();
            let rows = c
                .query(
                    &format!(
                        "SELECT p.agent_id, p.seq, {PRINCIPAL_COLUMNS}
                         FROM window_principals p JOIN windows w ON w.agent_id = p.agent_id AND w.seq = p.seq
                         WHERE {where_}
                         ORDER BY p.agent_id, p.seq, p.principal"
                    ),
                    &[&from_ms, &until_ms, &gpu_uuid],
                )
                .map_err(db)?;
            for r in &rows {
                let key = (r.get::<_, String>(0), u(r.get(1)));
                if let Some(&i) = index.get(&key) {
                    windows[i].window.principals.push(principal_row(r, 2));
                }
            }
            Ok(windows)
        })
    }

    fn events(
        &self,
        from_ms: i64,
        until_ms: i64,
        kind: Option<&str>,
        gpu_uuid: Option<&str>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.reader.with(|c| {
            Ok(c.query(
                &format!(
                    "SELECT e.agent_id, a.host_id, a.csp, e.seq, {EVENT_COLUMNS}
                     FROM events e JOIN agents a ON a.agent_id = e.agent_id
                     WHERE e.at_ms >= $1 AND e.at_ms < $2 AND ($3::text IS NULL OR e.kind = $3)
                       AND ($4::text IS NULL OR e.gpu_uuid = $4)
                     ORDER BY e.at_ms, e.agent_id, e.seq"
                ),
                &[&from_ms, &until_ms, &kind, &gpu_uuid],
            )
            .map_err(db)?
            .iter()
            .map(|r| StoredEvent {
                agent_id: r.get(0),
                host_id: r.get(1),
                csp: r.get(2),
                seq: u(r.get(3)),
                event: event_row(r, 4),
            })
            .collect())
        })
    }

    fn insert_invoices(
        &self,
        invoices: &[Invoice],
        actor: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.writer.with(|c| {
            let mut tx = c.transaction().map_err(db)?;
            let st = tx
                .prepare(
                    "INSERT INTO invoices (csp, grant_id, period, billed_gpu_hours, line, actor, imported_at_ms)
                     VALUES ($1,$2,$3,$4,$5,$6,$7)",
                )
                .map_err(db)?;
            for i in invoices {
                tx.execute(
                    &st,
                    &[
                        &i.csp,
                        &i.grant_id,
                        &i.period,
                        &i.billed_gpu_hours,
                        &i64::from(i.line),
                        &actor,
                        &at_ms,
                    ],
                )
                .map_err(db)?;
            }
            tx.commit().map_err(db)
        })
    }

    fn invoices(&self) -> Result<Vec<StoredInvoice>, StoreError> {
        self.reader.with(|c| {
            Ok(c.query(
                "SELECT csp, grant_id, period, billed_gpu_hours, line, actor, imported_at_ms FROM invoices
                 WHERE id IN (SELECT MAX(id) FROM invoices GROUP BY csp, grant_id, period)
                 ORDER BY csp, grant_id, period",
                &[],
            )
            .map_err(db)?
            .iter()
            .map(|r| StoredInvoice {
                invoice: Invoice {
                    csp: r.get(0),
                    grant_id: r.get(1),
                    period: r.get(2),
                    billed_gpu_hours: r.get(3),
                    line: small(r.get(4)),
                },
                actor: r.get(5),
                imported_at_ms: r.get(6),
            })
            .collect())
        })
    }

    fn import_providers(
        &self,
        providers: &[crate::registry::Provider],
        actor: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.writer.with(|c| {
            let mut tx = c.transaction().map_err(db)?;
            // Read, decide, write: one registry change at a time across collectors.
            lock(&mut tx, LOCK_REGISTRY)?;
            let held = pg_providers(&mut tx)?;
            for (csp, action, detail) in crate::registry::provider_changes(&held, providers) {
                let Some(p) = providers.iter().find(|p| p.csp == csp) else {
                    continue;
                };
                tx.execute(
                    "INSERT INTO providers (csp, name_ko, name_en, committed_hpc, committed_research,
                         committed_advanced, updated_ms, updated_by)
                     VALUES ($1,$2,$3,$4,$5,$6,$7,$8)
                     ON CONFLICT (csp) DO UPDATE SET name_ko = excluded.name_ko,
                         name_en = excluded.name_en, committed_hpc = excluded.committed_hpc,
                         committed_research = excluded.committed_research,
                         committed_advanced = excluded.committed_advanced,
                         updated_ms = excluded.updated_ms, updated_by = excluded.updated_by",
                    &[
                        &p.csp,
                        &p.name_ko,
                        &p.name_en,
                        &i64::from(p.committed_hpc),
                        &i64::from(p.committed_research),
                        &i64::from(p.committed_advanced),
                        &at_ms,
                        &actor,
                    ],
                )
                .map_err(db)?;
                pg_registry_change(&mut tx, at_ms, actor, "provider", &csp, action, &detail)?;
            }
            tx.commit().map_err(db)
        })
    }

    fn providers(&self) -> Result<Vec<crate::registry::Provider>, StoreError> {
        self.reader.with(pg_providers)
    }

    fn register_hosts(
        &self,
        hosts: &[crate::registry::RegisteredHost],
        actor: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.writer.with(|c| {
            let mut tx = c.transaction().map_err(db)?;
            lock(&mut tx, LOCK_REGISTRY)?;
            let held = pg_registered_hosts(&mut tx)?;
            for (host, action, detail) in crate::registry::host_changes(&held, hosts) {
                let Some(h) = hosts.iter().find(|h| h.host_id == host) else {
                    continue;
                };
                tx.execute(
                    "INSERT INTO registered_hosts (host_id, csp, updated_ms, updated_by) VALUES ($1,$2,$3,$4)
                     ON CONFLICT (host_id) DO UPDATE SET csp = excluded.csp,
                         updated_ms = excluded.updated_ms, updated_by = excluded.updated_by",
                    &[&h.host_id, &h.csp, &at_ms, &actor],
                )
                .map_err(db)?;
                pg_registry_change(&mut tx, at_ms, actor, "host", &host, action, &detail)?;
            }
            tx.commit().map_err(db)
        })
    }

    fn registered_hosts(&self) -> Result<Vec<crate::registry::RegisteredHost>, StoreError> {
        self.reader.with(pg_registered_hosts)
    }

    fn registry_history(&self) -> Result<Vec<crate::registry::RegistryChange>, StoreError> {
        self.reader.with(|c| {
            Ok(c.query(
                "SELECT at_ms, actor, kind, subject, action, detail FROM registry_history ORDER BY id",
                &[],
            )
            .map_err(db)?
            .iter()
            .map(|r| crate::registry::RegistryChange {
                at_ms: r.get(0),
                actor: r.get(1),
                kind: r.get(2),
                subject: r.get(3),
                action: r.get(4),
                detail: r.get(5),
            })
            .collect())
        })
    }

    fn size_bytes(&self) -> Option<u64> {
        self.reader
            .with(|c| {
                Ok(
                    c.query_one("SELECT pg_database_size(current_database())", &[])
                        .map_err(db)?
                        .get::<_, i64>(0),
                )
            })
            .ok()
            .map(u)
    }

    fn sign_head(&self, at_ms: i64) -> Result<crate::heads::SignedHead, StoreError> {
        let key = self.collector_key()?;
        self.writer.with(|c| {
            let mut tx = c.transaction().map_err(db)?;
            // The leaves read are what is committed when the head lands; one head at a time
            // across every collector on this database.
            lock(&mut tx, LOCK_HEADS)?;
            let head = super::postgres_ledger::sign_and_store(&mut tx, key, at_ms)?;
            tx.commit().map_err(db)?;
            Ok(head)
        })
    }

    fn heads(&self, since_ms: i64) -> Result<Vec<crate::heads::SignedHead>, StoreError> {
        self.reader
            .with(|c| super::postgres_ledger::load_heads(c, since_ms))
    }

    fn set_card_models(
        &self,
        models: &[crate::grants::CardModel],
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.writer.with(|c| {
            let mut tx = c.transaction().map_err(db)?;
            super::postgres_integrity::note_card_models(&mut tx, models, at_ms)?;
            tx.commit().map_err(db)
        })
    }

    fn head(&self, id: u64) -> Result<Option<crate::heads::SignedHead>, StoreError> {
        self.reader
            .with(|c| super::postgres_ledger::load_head(c, id))
    }

    fn collector_sign(&self, message: &[u8]) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
        use ed25519_dalek::Signer;
        let key = self.collector_key()?;
        Ok((
            key.sign(message).to_bytes().to_vec(),
            key.verifying_key().to_bytes().to_vec(),
        ))
    }

    fn create_token(&self, t: &TokenRow) -> Result<(), StoreError> {
        self.writer.with(|c| {
            let n = c
                .execute(
                    "INSERT INTO api_tokens (name, role, hash, created_ms, revoked_ms) VALUES ($1, $2, $3, $4, NULL)
                     ON CONFLICT DO NOTHING",
                    &[&t.name, &t.role, &t.hash, &t.created_ms],
                )
                .map_err(db)?;
            if n == 0 {
                return Err(StoreError::Conflict(format!(
                    "a token named {:?} exists or existed; names are not reused",
                    t.name
                )));
            }
            Ok(())
        })
    }

    fn tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        self.reader.with(|c| {
            Ok(c.query(
                "SELECT name, role, hash, created_ms, revoked_ms FROM api_tokens ORDER BY name",
                &[],
            )
            .map_err(db)?
            .iter()
            .map(token_row)
            .collect())
        })
    }

    fn revoke_token(&self, name: &str, at_ms: i64) -> Result<bool, StoreError> {
        self.writer.with(|c| {
            let mut tx = c.transaction().map_err(db)?;
            let revoked: Option<Option<i64>> = tx
                .query_opt(
                    "SELECT revoked_ms FROM api_tokens WHERE name = $1 FOR UPDATE",
                    &[&name],
                )
                .map_err(db)?
                .map(|r| r.get(0));
            let changed = match revoked {
                None => {
                    return Err(StoreError::NotFound {
                        what: "token",
                        id: name.to_string(),
                    });
                }
                Some(Some(_)) => false,
                Some(None) => {
                    tx.execute(
                        "UPDATE api_tokens SET revoked_ms = $2 WHERE name = $1",
                        &[&name, &at_ms],
                    )
                    .map_err(db)?;
                    true
                }
            };
            tx.commit().map_err(db)?;
            Ok(changed)
        })
    }

    fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRow>, StoreError> {
        self.auth.with(|c| {
            Ok(c.query_opt(
                "SELECT name, role, hash, created_ms, revoked_ms FROM api_tokens WHERE hash = $1",
                &[&hash],
            )
            .map_err(db)?
            .as_ref()
            .map(token_row))
        })
    }

    fn agent_known(&self, agent_id: &str) -> Result<bool, StoreError> {
        self.reader.with(|c| {
            Ok(c.query_one(
                "SELECT EXISTS (SELECT 1 FROM agents WHERE agent_id = $1)",
                &[&agent_id],
            )
            .map_err(db)?
            .get(0))
        })
    }
}

fn token_row(r: &Row) -> TokenRow {
    TokenRow {
        name: r.get(0),
        role: r.get(1),
        hash: r.get(2),
        created_ms: r.get(3),
        revoked_ms: r.get(4),
    }
}

fn gpu_row(r: &Row) -> GpuRow {
    GpuRow {
        uuid: r.get(0),
        index: small(r.get(1)),
        name: r.get(2),
        serial: r.get(3),
        pci_bus_id: r.get(4),
        memory_total_bytes: opt_u(r.get(5)),
        mig_mode: r.get(6),
        mig: {
            let parent_uuid: String = r.get(7);
            (!parent_uuid.is_empty()).then(|| MigRow {
                parent_uuid,
                profile: r.get(8),
                slices: opt_small(r.get(9)),
                parent_slices: opt_small(r.get(10)),
            })
        },
    }
}

/// The columns [`window_row`] reads, in its order (alias `w`).
pub(crate) const WINDOW_COLUMNS: &str = "w.gpu_uuid, w.start_ms, w.end_ms, w.interval_ms,
    w.expected_samples, w.good_samples, w.util_avg_pct, w.util_max_pct, w.mem_util_avg_pct,
    w.memory_used_max_bytes, w.energy_mj, w.energy_estimated, w.power_avg_w,
    w.temperature_max_c, w.throttle_reasons, w.health, w.unavailable_ms,
    w.assignment_status, w.grant_id, w.principal, w.active_ms, w.occupied_ms,
    w.foreign_ms, w.grantee_occupied_ms, w.unattributed_ms, w.energy_estimated_mj";

/// A window row from [`WINDOW_COLUMNS`] starting at column `at` (principals empty).
pub(crate) fn window_row(r: &Row, at: usize) -> WindowRow {
    WindowRow {
        gpu_uuid: r.get(at),
        start_ms: r.get(at + 1),
        end_ms: r.get(at + 2),
        interval_ms: u(r.get(at + 3)),
        expected_samples: small(r.get(at + 4)),
        good_samples: small(r.get(at + 5)),
        util_avg_pct: r.get(at + 6),
        util_max_pct: r.get(at + 7),
        mem_util_avg_pct: r.get(at + 8),
        memory_used_max_bytes: opt_u(r.get(at + 9)),
        energy_mj: opt_u(r.get(at + 10)),
        energy_estimated: r.get(at + 11),
        power_avg_w: r.get(at + 12),
        temperature_max_c: opt_small(r.get(at + 13)),
        throttle_reasons: opt_u(r.get(at + 14)),
        health: known(&r.get::<_, String>(at + 15), HEALTHS),
        unavailable_ms: u(r.get(at + 16)),
        assignment_status: known(&r.get::<_, String>(at + 17), STATUSES),
        grant_id: r.get(at + 18),
        principal: r.get(at + 19),
        active_ms: u(r.get(at + 20)),
        occupied_ms: u(r.get(at + 21)),
        foreign_ms: u(r.get(at + 22)),
        grantee_occupied_ms: opt_u(r.get(at + 23)),
        unattributed_ms: opt_u(r.get(at + 24)),
        energy_estimated_mj: opt_u(r.get(at + 25)),
        principals: vec![],
    }
}

/// The columns [`principal_row`] reads (alias `p`).
pub(crate) const PRINCIPAL_COLUMNS: &str = "p.principal, p.uid, p.occupied_ms, p.active_ms,
    p.memory_max_bytes, p.process_count, p.matches_grant";

pub(crate) fn principal_row(r: &Row, at: usize) -> PrincipalRow {
    PrincipalRow {
        principal: r.get(at),
        uid: opt_small(r.get(at + 1)),
        occupied_ms: u(r.get(at + 2)),
        active_ms: u(r.get(at + 3)),
        memory_max_bytes: u(r.get(at + 4)),
        process_count: small(r.get(at + 5)),
        matches_grant: r.get(at + 6),
    }
}

/// The columns [`event_row`] reads (alias `e`).
pub(crate) const EVENT_COLUMNS: &str = "e.gpu_uuid, e.at_ms, e.kind, e.code, e.detail, e.pid,
    e.principal, e.grant_id, e.mode, e.action, e.result";

pub(crate) fn event_row(r: &Row, at: usize) -> EventRow {
    EventRow {
        gpu_uuid: r.get(at),
        at_ms: r.get(at + 1),
        kind: known(&r.get::<_, String>(at + 2), EVENT_KINDS),
        code: r.get(at + 3),
        detail: r.get(at + 4),
        pid: opt_small(r.get(at + 5)),
        principal: r.get(at + 6),
        grant_id: r.get(at + 7),
        mode: r.get(at + 8),
        action: r.get(at + 9),
        result: r.get(at + 10),
    }
}

/// Grants with their cards in insertion order; one grant when `only` names it.
fn load_grants(c: &mut impl GenericClient, only: Option<&str>) -> Result<Vec<Grant>, StoreError> {
    let rows = c
        .query(
            "SELECT grant_id, program, grantee, principal, csp, valid_from_ms, valid_until_ms, revoked_at_ms
             FROM grants WHERE ($1::text IS NULL OR grant_id = $1) ORDER BY grant_id",
            &[&only],
        )
        .map_err(db)?;
    let mut grants = rows
        .iter()
        .map(|r| {
            let id: String = r.get(0);
            let program: String = r.get(1);
            let principal: String = r.get(3);
            Ok(Grant {
                program: program
                    .parse::<Program>()
                    .map_err(|e| StoreError::Db(format!("grant {id}: stored program: {e}")))?,
                principal: principal
                    .parse()
                    .map_err(|e| StoreError::Db(format!("grant {id}: stored principal: {e}")))?,
                grant_id: id,
                grantee: r.get(2),
                csp: r.get(4),
                valid_from_ms: r.get(5),
                valid_until_ms: r.get(6),
                revoked_at_ms: r.get(7),
                cards: vec![],
            })
        })
        .collect::<Result<Vec<Grant>, StoreError>>()?;
    let rows = c
        .query(
            "SELECT grant_id, host_id, gpu_uuid, card_from_ms, card_until_ms FROM grant_cards
             WHERE ($1::text IS NULL OR grant_id = $1) ORDER BY id",
            &[&only],
        )
        .map_err(db)?;
    let index: std::collections::HashMap<String, usize> = grants
        .iter()
        .enumerate()
        .map(|(i, g)| (g.grant_id.clone(), i))
        .collect();
    for r in &rows {
        if let Some(&i) = index.get(&r.get::<_, String>(0)) {
            grants[i].cards.push(GrantCard {
                host_id: r.get(1),
                gpu_uuid: r.get(2),
                from_ms: r.get(3),
                until_ms: r.get(4),
            });
        }
    }
    Ok(grants)
}

fn insert_cards(c: &mut impl GenericClient, g: &Grant) -> Result<(), StoreError> {
    if g.cards.is_empty() {
        return Ok(());
    }
    let hosts: Vec<&str> = g.cards.iter().map(|c| c.host_id.as_str()).collect();
    let uuids: Vec<&str> = g.cards.iter().map(|c| c.gpu_uuid.as_str()).collect();
    let from: Vec<Option<i64>> = g.cards.iter().map(|c| c.from_ms).collect();
    let until: Vec<Option<i64>> = g.cards.iter().map(|c| c.until_ms).collect();
    c.execute(
        "INSERT INTO grant_cards (grant_id, host_id, gpu_uuid, card_from_ms, card_until_ms)
         SELECT $1::text, u.h, u.g, u.f, u.t
         FROM UNNEST($2::text[], $3::text[], $4::bigint[], $5::bigint[]) WITH ORDINALITY AS u(h, g, f, t, n)
         ORDER BY u.n",
        &[&g.grant_id, &hosts, &uuids, &from, &until],
    )
    .map_err(db)?;
    Ok(())
}

fn insert_history(
    c: &mut impl GenericClient,
    grant_id: &str,
    change: &GrantChangeRow,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO grant_history (grant_id, at_ms, actor, action, detail) VALUES ($1,$2,$3,$4,$5)",
        &[&grant_id, &change.at_ms, &change.actor, &change.action, &change.detail],
    )
    .map_err(db)?;
    Ok(())
}

fn load_history(
    c: &mut impl GenericClient,
    grant_id: &str,
) -> Result<Vec<GrantChangeRow>, StoreError> {
    Ok(c.query(
        "SELECT at_ms, actor, action, detail FROM grant_history WHERE grant_id = $1 ORDER BY id",
        &[&grant_id],
    )
    .map_err(db)?
    .iter()
    .map(|r| GrantChangeRow {
        at_ms: r.get(0),
        actor: r.get(1),
        action: r.get(2),
        detail: r.get(3),
    })
    .collect())
}

/// Tells sessions' next assignment sets apart from the ones before a grant change.
fn bump_assignments_version(c: &mut impl GenericClient) -> Result<(), StoreError> {
    c.execute(
        "UPDATE meta SET value = (value::BIGINT + 1)::TEXT WHERE key = 'assignments_version'",
        &[],
    )
    .map_err(db)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::pg_testdb::TestPg;

    const C1: &str = "GPU-00000001-0000-4000-8000-000000000000";
    const C2: &str = "GPU-00000002-0000-4000-8000-000000000000";

    fn client(url: &str) -> postgres::Client {
        postgres::Client::connect(url, NoTls).unwrap()
    }

    #[test]
    fn grants_migration_keeps_cards_of_a_version_1_database() {
        let Some(db) = TestPg::create("pg_migrate_v1") else {
            return;
        };
        {
            let mut c = client(&db.url);
            c.batch_execute(MIGRATIONS[0]).unwrap();
            c.batch_execute(&format!(
                "CREATE TABLE schema_version (version BIGINT NOT NULL);
                 INSERT INTO schema_version VALUES (1);
                 INSERT INTO grants VALUES ('G', 'hpc', 'Acme', 'user:alice', 'kt', 1, 2, NULL);
                 INSERT INTO grant_cards VALUES ('G', 'h2', '{C2}');
                 INSERT INTO grant_cards VALUES ('G', 'h1', '{C1}');"
            ))
            .unwrap();
        }
        let store = PgStore::open(&db.url, None).unwrap();
        let version = store.reader.with(schema_version).unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let g = &store.grants().unwrap()[0];
        assert_eq!(
            g.cards,
            vec![GrantCard::new("h2", C2), GrantCard::new("h1", C1)]
        );
        assert_eq!(store.assignments("h1").unwrap().1.len(), 1);
    }

    #[test]
    fn a_database_newer_than_the_collector_is_refused_and_opens_migrate_once() {
        let Some(db) = TestPg::create("pg_schema_too_new") else {
            return;
        };
        // Collectors starting together: each migration runs once.
        let opened: Vec<_> = std::thread::scope(|s| {
            (0..3)
                .map(|_| s.spawn(|| PgStore::open(&db.url, None).map(|_| ())))
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect()
        });
        assert!(opened.iter().all(Result::is_ok), "{opened:?}");
        let mut c = client(&db.url);
        let rows: i64 = c
            .query_one("SELECT COUNT(*) FROM schema_version", &[])
            .unwrap()
            .get(0);
        assert_eq!(rows, 1);
        c.execute("UPDATE schema_version SET version = 99", &[])
            .unwrap();
        let e = PgStore::open(&db.url, None).unwrap_err();
        assert!(
            matches!(e, StoreError::SchemaTooNew { found: 99, known } if known == MIGRATIONS.len() as i64),
            "{e}"
        );
        assert!(e.to_string().contains("newer than this collector"), "{e}");
    }

    #[test]
    fn signing_without_a_key_file_names_the_flag_and_a_bad_url_names_the_database() {
        let Some(db) = TestPg::create("pg_no_key") else {
            return;
        };
        let store = PgStore::open(&db.url, None).unwrap();
        let e = store.sign_head(1).unwrap_err().to_string();
        assert!(e.contains("--collector-key"), "{e}");
        assert!(store.collector_sign(b"x").is_err());
        let e = PgStore::open("postgres://nobody:secret@%2Fnonexistent/none", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nobody:***@") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn one_live_session_per_agent_across_collectors_and_a_dead_one_lets_go() {
        let Some(db) = TestPg::create("pg_claims") else {
            return;
        };
        let a = PgStore::open(&db.url, None).unwrap();
        let b = PgStore::open(&db.url, None).unwrap();
        let held = a.claim_session("agent-1").unwrap().expect("first claim");
        assert!(b.claim_session("agent-1").unwrap().is_none());
        let other = b.claim_session("agent-2").unwrap().expect("another agent");
        drop(held);
        let moved = b
            .claim_session("agent-1")
            .unwrap()
            .expect("released on drop");
        assert!(a.claim_session("agent-1").unwrap().is_none());
        // Collector B dies: its connections close and its agents are free at once.
        let mut c = client(&db.url);
        let pid: i32 = b
            .claims
            .with(|c| {
                Ok(c.query_one("SELECT pg_backend_pid()", &[])
                    .map_err(super::db)?
                    .get(0))
            })
            .unwrap();
        c.execute("SELECT pg_terminate_backend($1)", &[&pid])
            .unwrap();
        std::mem::forget(moved);
        std::mem::forget(other);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while a.claim_session("agent-1").unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "never released");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(a.claim_session("agent-2").unwrap().is_some());
    }

    #[test]
    fn an_import_racing_another_collectors_is_checked_again_under_the_lock() {
        let Some(db) = TestPg::create("pg_import_race") else {
            return;
        };
        let store = PgStore::open(&db.url, None).unwrap();
        let grant = |id: &str, from: i64, until: i64| Grant {
            grant_id: id.into(),
            program: Program::Research,
            grantee: "Lab".into(),
            principal: "user:alice".parse().unwrap(),
            csp: "kt".into(),
            valid_from_ms: from,
            valid_until_ms: until,
            cards: vec![GrantCard::new("h1", C1)],
            revoked_at_ms: None,
        };
        // Both validated against an empty store, as two collectors would.
        store
            .insert_grants(&[grant("A", 0, 100)], "ops", 1)
            .unwrap();
        let e = store
            .insert_grants(&[grant("B", 50, 150)], "ops", 2)
            .unwrap_err();
        assert!(
            matches!(&e, StoreError::Conflict(m) if m.contains(C1) && m.contains("grant A")),
            "{e}"
        );
        store
            .insert_grants(&[grant("C", 100, 200)], "ops", 3)
            .unwrap();
        let ids: Vec<String> = store
            .grants()
            .unwrap()
            .into_iter()
            .map(|g| g.grant_id)
            .collect();
        assert_eq!(ids, ["A", "C"]);
    }

    #[test]
    fn a_card_two_hosts_list_at_once_stays_with_the_first_to_commit() {
        let Some(db) = TestPg::create("pg_card_race") else {
            return;
        };
        let store = PgStore::open(&db.url, None).unwrap();
        // Host X's Hello (through another collector) has inserted the card, not committed.
        let mut other = client(&db.url);
        let mut tx = other.transaction().unwrap();
        tx.execute(
            "INSERT INTO gpus (gpu_uuid, agent_id, host_id, idx, name, serial, pci_bus_id, mig_mode, last_seen_ms)
             VALUES ($1, 'x', 'host-x', 0, '', '', '', '', 1)",
            &[&C1],
        )
        .unwrap();
        let hello = AgentHello {
            agent_id: "h".into(),
            host_id: "host-h".into(),
            csp: "kt".into(),
            hostname: "h".into(),
            agent_version: "t".into(),
            public_key: [1; 32],
            driver_version: "t".into(),
            gpus: vec![GpuRow {
                uuid: C1.into(),
                ..Default::default()
            }],
            epoch: 1,
            received_ms: 2,
        };
        std::thread::scope(|s| {
            // Host H reads no holder, then waits on X's row.
            let h = s.spawn(|| store.hello(&hello));
            std::thread::sleep(std::time::Duration::from_millis(300));
            tx.commit().unwrap();
            h.join().unwrap().unwrap();
        });
        assert!(store.known_card("host-x", C1).unwrap());
        assert!(!store.known_card("host-h", C1).unwrap());
        let kinds: Vec<String> = store
            .alarms(Some("h"))
            .unwrap()
            .into_iter()
            .map(|a| a.kind)
            .collect();
        assert_eq!(kinds, ["card_claimed"]);
    }

    #[test]
    fn windows_of_one_card_committed_at_once_by_two_collectors_count_once() {
        let Some(db) = TestPg::create("pg_card_lock") else {
            return;
        };
        let store = PgStore::open(&db.url, None).unwrap();
        let hello = |agent: &str| AgentHello {
            agent_id: agent.into(),
            host_id: "host-1".into(),
            csp: "kt".into(),
            hostname: agent.into(),
            agent_version: "t".into(),
            public_key: [1; 32],
            driver_version: "t".into(),
            gpus: vec![GpuRow {
                uuid: C1.into(),
                ..Default::default()
            }],
            epoch: 1,
            received_ms: 0,
        };
        store.hello(&hello("a1")).unwrap();
        store.hello(&hello("a2")).unwrap();
        // Collector X is committing a2's window of the card: it holds the card, not committed.
        let mut other = client(&db.url);
        let mut tx = other.transaction().unwrap();
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&crate::store::postgres_commit::card_key(C1)],
        )
        .unwrap();
        tx.execute(
            "INSERT INTO windows (agent_id, seq, gpu_uuid, start_ms, end_ms, interval_ms, expected_samples,
               good_samples, energy_estimated, health, unavailable_ms, assignment_status, grant_id, principal,
               active_ms, occupied_ms, foreign_ms)
             VALUES ('a2', 1, $1, 0, 60000, 1000, 60, 60, false, 'ok', 0, 'assigned', '', '', 0, 0, 0)",
            &[&C1],
        )
        .unwrap();
        let window = WindowRow {
            gpu_uuid: C1.into(),
            start_ms: 0,
            end_ms: 60_000,
            interval_ms: 1_000,
            expected_samples: 60,
            good_samples: 60,
            util_avg_pct: None,
            util_max_pct: None,
            mem_util_avg_pct: None,
            memory_used_max_bytes: None,
            energy_mj: None,
            energy_estimated: false,
            power_avg_w: None,
            temperature_max_c: None,
            throttle_reasons: None,
            health: "ok",
            unavailable_ms: 0,
            assignment_status: "assigned",
            grant_id: String::new(),
            principal: String::new(),
            active_ms: 0,
            occupied_ms: 0,
            foreign_ms: 0,
            grantee_occupied_ms: None,
            unattributed_ms: None,
            energy_estimated_mj: None,
            principals: vec![],
        };
        let batch = IngestBatch {
            agent_id: "a1".into(),
            records: vec![crate::store::IngestRecord {
                seq: 1,
                prev_hash: [0; 32],
                hash: [1; 32],
                body: vec![1],
                created_ms: 0,
                content: crate::store::RecordContent::Window(window),
            }],
            checkpoint: crate::store::CheckpointRow {
                epoch: 1,
                seq: 1,
                chain_hash: [1; 32],
                signature: vec![],
            },
            received_ms: 0,
            alarms: vec![],
        };
        std::thread::scope(|s| {
            // This collector's commit of a1's window of the same time waits, then sees it.
            let c = s.spawn(|| store.commit_each(std::slice::from_ref(&batch)));
            std::thread::sleep(std::time::Duration::from_millis(300));
            tx.commit().unwrap();
            assert!(c.join().unwrap().unwrap()[0].is_ok());
        });
        let counted: Vec<String> = store
            .windows(0, 60_000, Some(C1))
            .unwrap()
            .into_iter()
            .map(|w| w.agent_id)
            .collect();
        assert_eq!(counted, ["a2"], "the card's minute counts once");
        let kinds: Vec<String> = store
            .alarms(Some("a1"))
            .unwrap()
            .into_iter()
            .map(|a| a.kind)
            .collect();
        assert_eq!(kinds, ["card_time_overlap"]);
    }

    /// A counted one-minute window of `card` starting at `start_ms`.
    fn window_of(card: &str, start_ms: i64) -> WindowRow {
        WindowRow {
            gpu_uuid: card.into(),
            start_ms,
            end_ms: start_ms + 60_000,
            interval_ms: 1_000,
            expected_samples: 60,
            good_samples: 60,
            util_avg_pct: None,
            util_max_pct: None,
            mem_util_avg_pct: None,
            memory_used_max_bytes: None,
            energy_mj: None,
            energy_estimated: false,
            power_avg_w: None,
            temperature_max_c: None,
            throttle_reasons: None,
            health: "ok",
            unavailable_ms: 0,
            assignment_status: "assigned",
            grant_id: String::new(),
            principal: String::new(),
            active_ms: 0,
            occupied_ms: 0,
            foreign_ms: 0,
            grantee_occupied_ms: None,
            unattributed_ms: None,
            energy_estimated_mj: None,
            principals: vec![],
        }
    }

    /// A batch of one window record at `seq` of `agent`.
    fn batch_of(agent: &str, seq: u64, window: WindowRow) -> IngestBatch {
        let hash = [seq as u8; 32];
        IngestBatch {
            agent_id: agent.into(),
            records: vec![crate::store::IngestRecord {
                seq,
                prev_hash: [seq as u8 - 1; 32],
                hash,
                body: vec![1],
                created_ms: 0,
                content: crate::store::RecordContent::Window(window),
            }],
            checkpoint: crate::store::CheckpointRow {
                epoch: 1,
                seq,
                chain_hash: hash,
                signature: vec![],
            },
            received_ms: 0,
            alarms: vec![],
        }
    }

    #[test]
    fn two_collectors_group_committing_the_same_cards_in_opposite_orders_do_not_deadlock() {
        let Some(db) = TestPg::create("pg_card_deadlock") else {
            return;
        };
        let x = PgStore::open(&db.url, None).unwrap();
        let y = PgStore::open(&db.url, None).unwrap();
        // a1 and a4 send windows of C1, a2 and a3 of C2 (the second of each pair's windows are
        // disputed or overlaps: what matters here is only that every commit goes through).
        let cards = [("a1", C1), ("a2", C2), ("a3", C2), ("a4", C1)];
        let hello = |agent: &str, card: &str| AgentHello {
            agent_id: agent.into(),
            host_id: format!("host-{agent}"),
            csp: "kt".into(),
            hostname: agent.into(),
            agent_version: "t".into(),
            public_key: [1; 32],
            driver_version: "t".into(),
            gpus: vec![GpuRow {
                uuid: card.into(),
                ..Default::default()
            }],
            epoch: 1,
            received_ms: 0,
        };
        for (agent, card) in cards {
            x.hello(&hello(agent, card)).unwrap();
        }
        // Each round, collector X group-commits C1's batch then C2's while Y commits C2's then
        // C1's, both at once: card locks taken batch by batch would cross and one commit's
        // batch would fail with "deadlock detected".
        const ROUNDS: u64 = 20;
        let go = std::sync::Barrier::new(2);
        let run = |store: &PgStore, pair: [(&str, &str); 2]| {
            let mut failed = Vec::new();
            for round in 0..ROUNDS {
                let batches: Vec<IngestBatch> = pair
                    .iter()
                    .map(|(agent, card)| {
                        batch_of(agent, round + 1, window_of(card, round as i64 * 60_000))
                    })
                    .collect();
                go.wait();
                for o in store.commit_each(&batches).unwrap() {
                    if let Err(e) = o {
                        failed.push(e.to_string());
                    }
                }
            }
            failed
        };
        let (fx, fy) = std::thread::scope(|s| {
            let a = s.spawn(|| run(&x, [("a1", C1), ("a2", C2)]));
            let b = s.spawn(|| run(&y, [("a3", C2), ("a4", C1)]));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert!(fx.is_empty() && fy.is_empty(), "X: {fx:?}; Y: {fy:?}");
        for (agent, card) in cards {
            let seq = x.hello(&hello(agent, card)).unwrap().durable_seq;
            assert_eq!(seq, ROUNDS, "{agent}: every batch stored");
        }
    }

    #[test]
    fn the_store_answers_on_async_threads_too() {
        let Some(db) = TestPg::create("pg_async_threads") else {
            return;
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let store = std::sync::Arc::new(PgStore::open(&db.url, None).unwrap());
        let s = store.clone();
        // Called (and dropped) on a worker thread, as the token interceptor does: no panic.
        let known = rt
            .block_on(async move { tokio::spawn(async move { s.agent_known("a") }).await })
            .unwrap()
            .unwrap();
        assert!(!known);
        let s = store.clone();
        rt.block_on(async move {
            tokio::task::spawn_blocking(move || s.tokens().map(|t| t.len()))
                .await
                .unwrap()
        })
        .unwrap();
        rt.block_on(async move { drop(store) });
    }
}
