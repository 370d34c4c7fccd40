//! Which backend a `--db` names: `postgres://…` or `postgresql://…` is a PostgreSQL database,
//! anything else a SQLite file. The one place the command line and the server open a store.

use std::path::Path;
use std::sync::Arc;

use super::postgres::{PgStore, is_postgres_url, redact};
use super::sqlite::SqliteStore;
use super::{Store, StoreError};

/// Opens (and migrates) the store `db` names. `collector_key` is where a PostgreSQL store keeps
/// the collector's signing key (SQLite keeps it beside its file and ignores this); a
/// PostgreSQL store opened without one cannot sign heads or reports.
pub fn open_store(db: &str, collector_key: Option<&Path>) -> Result<Arc<dyn Store>, StoreError> {
    if is_postgres_url(db) {
        Ok(Arc::new(PgStore::open(db, collector_key)?))
    } else {
        Ok(Arc::new(SqliteStore::open(Path::new(db))?))
    }
}

/// A read-only view of the ledger `db` names, for `verify --db` and `heads --db`: a SQLite
/// file (a copy, never migrated or written) or a PostgreSQL database (one snapshot).
pub fn open_ledger(db: &str) -> Result<Ledger, StoreError> {
    if is_postgres_url(db) {
        Ok(Ledger::Postgres(Box::new(
            super::postgres_ledger::PgLedger::open(db)?,
        )))
    } else {
        Ok(Ledger::Sqlite(
            super::sqlite_ledger::SqliteLedger::open_read_only(Path::new(db))?,
        ))
    }
}

/// A ledger opened for reading, of either backend.
#[derive(Debug)]
pub enum Ledger {
    Sqlite(super::sqlite_ledger::SqliteLedger),
    Postgres(Box<super::postgres_ledger::PgLedger>),
}

impl Ledger {
    pub fn source(&self) -> &dyn crate::verify::ChainSource {
        match self {
            Ledger::Sqlite(l) => l,
            Ledger::Postgres(l) => l.as_ref(),
        }
    }

    /// Signed heads held, oldest first, from `since_ms` on.
    pub fn heads(&self, since_ms: i64) -> Result<Vec<crate::heads::SignedHead>, StoreError> {
        match self {
            Ledger::Sqlite(l) => l.heads(since_ms),
            Ledger::Postgres(l) => l.heads(since_ms),
        }
    }
}

/// `db` as it may be printed (a PostgreSQL password is hidden).
pub fn display_db(db: &str) -> String {
    if is_postgres_url(db) {
        redact(db)
    } else {
        db.to_string()
    }
}
