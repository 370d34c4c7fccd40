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

    /// Starts a new epoch after the collector's durable point, when this agent's spool no
    /// longer holds the chain the collector has (the spool was lost, or replaced by another
    /// history). The new epoch opens with an `EpochStart` record linked to the collector's
    /// head and naming it; records still pending are re-sequenced after it, bodies unchanged.
    /// Returns the new epoch.
    ///
    /// Between dropping the pending records from the spool and appending them again they are
    /// only in memory; a crash in that instant loses them, and the collector then sees the
    /// epoch start followed by a gap in windows (unmetered time), never a silent change.
    pub fn rebase(
        &self,
        durable_seq: u64,
        durable_hash: Hash,
        collector_epoch: u64,
        now: i64,
        reason: &str,
    ) -> Result<u64, SpoolError> {
        let mut g = self.lock();
        let previous = g.spool.epoch();
        let epoch = previous.max(collector_epoch) + 1;
        let (acked, _) = g.spool.acked();
        let pending = g.spool.read_from(acked + 1, usize::MAX)?;
        let (head_seq, head_hash) = g.spool.head();
        if head_seq > acked {
            g.spool.ack(head_seq, head_hash)?;
        }
        g.spool.start_epoch(epoch, durable_seq, durable_hash)?;
        let mut seq = Sequencer::new(durable_seq, durable_hash);
        let mut records = vec![seq.next(crate::record::epoch_start_body(
            now,
            epoch,
            previous,
            durable_seq,
            &durable_hash,
            reason,
        ))];
        records.extend(pending.into_iter().map(|r| seq.next(r.body)));
        g.spool.append(&records)?;
        g.seq = seq;
        drop(g);
        self.appended.notify_one();
        Ok(epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::SpoolConfig;
    use gpumeter_proto::chain::{self, GENESIS};

    #[test]
    fn rebase_continues_after_the_collectors_head_with_pending_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(SpoolConfig {
            dir: dir.path().to_path_buf(),
            max_bytes: 1 << 20,
            segment_bytes: 4096,
        })
        .unwrap();
        let ledger = Ledger::new(spool);
        ledger.append(&[b"a".to_vec(), b"b".to_vec()]).unwrap();
        // The collector already holds 40 records of an earlier life of this agent.
        let collector_head = chain::record_hash(&GENESIS, 40, b"old");
        let epoch = ledger
            .rebase(40, collector_head, 1, 5, "spool lost")
            .unwrap();
        assert_eq!(epoch, 2);
        let g = ledger.lock();
        assert_eq!(g.spool.epoch(), 2);
        let recs = g.spool.read_from(0, 10).unwrap();
        assert_eq!(
            recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![41, 42, 43]
        );
        assert_eq!(recs[0].prev_hash, collector_head);
        assert_eq!(
            (recs[1].body.as_slice(), recs[2].body.as_slice()),
            (&b"a"[..], &b"b"[..])
        );
        assert_eq!(recs[2].prev_hash, recs[1].hash());
        drop(g);
        assert_eq!(ledger.head().0, 43);
        assert_eq!(ledger.append(&[b"c".to_vec()]).unwrap()[0].seq, 44);
    }
}
