//! The agent's local ledger: gives each record body its sequence number and chain link and
//! writes it to the spool before anything may send it. One lock covers both so seq order,
//! chain order and spool order are the same.

use std::sync::{Arc, Mutex, MutexGuard};

use gpumeter_proto::chain::Hash;
use tokio::sync::Notify;

use crate::record::Sequencer;
use crate::spool::{Spool, SpoolError, SpooledRecord};

/// Sequencer + spool, shared by the sampler (appends) and the uplink (reads, acks).
#[derive(Debug, Clone)]
pub struct Ledger {
    inner: Arc<Mutex<Inner>>,
    /// Woken whenever records are appended.
    pub appended: Arc<Notify>,
}

#[derive(Debug)]
pub struct Inner {
    pub spool: Spool,
    seq: Sequencer,
}

impl Ledger {
    pub fn new(spool: Spool) -> Self {
        let (seq, head) = spool.head();
        Self {
            inner: Arc::new(Mutex::new(Inner {
                spool,
                seq: Sequencer::new(seq, head),
            })),
            appended: Arc::new(Notify::new()),
        }
    }

    /// Locks the ledger. A panic while holding the lock cannot leave the spool half-written
    /// (appends are all-or-nothing on disk), so a poisoned lock is taken over.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sequences and durably spools `bodies`. On error nothing was spooled and the sequencer
    /// is unchanged, so the caller may retry with the same bodies.
    pub fn append(&self, bodies: &[Vec<u8>]) -> Result<Vec<SpooledRecord>, SpoolError> {
        if bodies.is_empty() {
            return Ok(Vec::new());
        }
        let mut g = self.lock();
        let mut seq = g.seq.clone();
        let records: Vec<SpooledRecord> = bodies.iter().map(|b| seq.next(b.clone())).collect();
        g.spool.append(&records)?;
        g.seq = seq;
        drop(g);
        self.appended.notify_waiters();
        self.appended.notify_one();
        Ok(records)
    }

    pub fn head(&self) -> (u64, Hash) {
        self.lock().seq.head()
    }
}
