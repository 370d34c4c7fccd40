//! The single writer: one thread owns every ingest commit. Sessions hand it verified batches;
//! it takes whatever has queued up (up to a limit), commits it all in one transaction (group
//! commit), and only then answers each session, which only then acks its agent.
//!
//! One client cannot hurt the others: each batch is committed under its own savepoint
//! ([`Store::commit_each`]), so a batch whose insert fails is rolled back alone and only its
//! session hears of it. Its agent is then held "poisoned" at that batch's first seq: a later
//! batch that continues past it (queued before the session learnt of the failure) is refused
//! too, since storing it would leave a hole; a batch that starts at or before that seq (the
//! agent resending after it reconnected) clears the mark.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use super::{CommitOutcome, IngestBatch, Store, StoreError};

struct Req {
    batch: IngestBatch,
    reply: oneshot::Sender<Result<CommitOutcome, StoreError>>,
    /// When the session handed the batch over, for the commit-latency histogram.
    queued: std::time::Instant,
}

/// Told of the batches a group commit stored, once its transaction has committed (a batch
/// that failed alone is not among them). Runs on the writer thread: it must return at once.
pub trait CommitObserver: Send + Sync {
    fn committed(&self, batches: &[&IngestBatch]);
}

/// A handle for submitting batches to the writer thread. Cloning is cheap.
#[derive(Clone, Debug)]
pub struct Writer {
    tx: mpsc::Sender<Req>,
    /// What the writer has done, for the metrics endpoint.
    pub stats: Arc<WriterStats>,
}

/// Counters the writer thread keeps.
#[derive(Debug)]
pub struct WriterStats {
    pub commits: std::sync::atomic::AtomicU64,
    pub records: std::sync::atomic::AtomicU64,
    pub failed_commits: std::sync::atomic::AtomicU64,
    /// Seconds from a batch's hand-over to its commit (or failure): the collector's share of
    /// an agent's ack latency.
    pub commit_latency: gpumeter_telemetry::prometheus_client::metrics::histogram::Histogram,
    /// Batches that failed alone inside a commit that went through for the others.
    pub failed_batches: std::sync::atomic::AtomicU64,
}

impl Default for WriterStats {
    fn default() -> Self {
        Self {
            commits: Default::default(),
            records: Default::default(),
            failed_commits: Default::default(),
            failed_batches: Default::default(),
            commit_latency:
                gpumeter_telemetry::prometheus_client::metrics::histogram::Histogram::new(
                    gpumeter_telemetry::prometheus_client::metrics::histogram::exponential_buckets(
                        0.0005, 2.0, 14,
                    ),
                ),
        }
    }
}

/// Whether a batch may go into the next commit, given the agents whose earlier batch failed
/// (agent → that batch's first seq). Clears the mark of an agent that starts over.
fn admit(poisoned: &mut HashMap<String, u64>, batch: &IngestBatch) -> Result<(), StoreError> {
    let Some(&failed_at) = poisoned.get(&batch.agent_id) else {
        return Ok(());
    };
    let first = batch.records.iter().map(|r| r.seq).min().unwrap_or(0);
    if first > failed_at {
        return Err(StoreError::BatchRefused {
            agent_id: batch.agent_id.clone(),
            seq: batch.checkpoint.seq,
            reason: format!("it continues past seq {failed_at}, whose batch failed"),
        });
    }
    poisoned.remove(&batch.agent_id);
    Ok(())
}

impl std::fmt::Debug for Req {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Req")
            .field("agent", &self.batch.agent_id)
            .finish()
    }
}

/// Most batches folded into one transaction.
pub const MAX_GROUP: usize = 512;
/// Most records folded into one transaction: a commit of tens of thousands of records holds
/// every session waiting for it; a few thousand keep the fsync amortized and acks prompt.
pub const MAX_GROUP_RECORDS: usize = 8192;

impl Writer {
    /// Starts the writer thread; it ends when every handle is dropped.
    pub fn spawn(store: Arc<dyn Store>) -> Writer {
        Self::spawn_observed(store, None)
    }

    /// [`Writer::spawn`], telling `observer` of every commit (the live figures' hub).
    pub fn spawn_observed(
        store: Arc<dyn Store>,
        observer: Option<Arc<dyn CommitObserver>>,
    ) -> Writer {
        let (tx, mut rx) = mpsc::channel::<Req>(4 * MAX_GROUP);
        let stats = Arc::new(WriterStats::default());
        let counters = stats.clone();
        let spawned = std::thread::Builder::new()
            .name("gpumeter-writer".into())
            .spawn(move || {
                let mut group = Vec::with_capacity(MAX_GROUP);
                let mut poisoned: HashMap<String, u64> = HashMap::new();
                while let Some(first) = rx.blocking_recv() {
                    let mut records = first.batch.records.len();
                    group.push(first);
                    while group.len() < MAX_GROUP && records < MAX_GROUP_RECORDS {
                        match rx.try_recv() {
                            Ok(r) => {
                                records += r.batch.records.len();
                                group.push(r);
                            }
                            Err(_) => break,
                        }
                    }
                    use std::sync::atomic::Ordering::Relaxed;
                    group.retain_mut(|r| match admit(&mut poisoned, &r.batch) {
                        Ok(()) => true,
                        Err(e) => {
                            counters.failed_batches.fetch_add(1, Relaxed);
                            let (tx, _) = oneshot::channel();
                            let _ = std::mem::replace(&mut r.reply, tx).send(Err(e));
                            false
                        }
                    });
                    if group.is_empty() {
                        continue;
                    }
                    let batches: Vec<IngestBatch> =
                        group.iter_mut().map(|r| std::mem::replace(&mut r.batch, IngestBatch::empty())).collect();
                    match store.commit_each(&batches) {
                        Ok(outcomes) => {
                            counters.commits.fetch_add(1, Relaxed);
                            if let Some(o) = &observer {
                                let stored: Vec<&IngestBatch> = batches
                                    .iter()
                                    .zip(&outcomes)
                                    .filter(|(_, o)| o.is_ok())
                                    .map(|(b, _)| b)
                                    .collect();
                                if !stored.is_empty() {
                                    o.committed(&stored);
                                }
                            }
                            for ((r, o), b) in group.drain(..).zip(outcomes).zip(&batches) {
                                counters.commit_latency.observe(r.queued.elapsed().as_secs_f64());
                                match &o {
                                    Ok(_) => {
                                        counters.records.fetch_add(b.records.len() as u64, Relaxed);
                                    }
                                    Err(e) => {
                                        counters.failed_batches.fetch_add(1, Relaxed);
                                        warn!(agent = %b.agent_id, error = %e, "batch failed alone; the rest of the commit went through");
                                        let first = b.records.iter().map(|r| r.seq).min().unwrap_or(0);
                                        poisoned.insert(b.agent_id.clone(), first);
                                    }
                                }
                                let _ = r.reply.send(o);
                            }
                        }
                        Err(e) => {
                            counters.failed_commits.fetch_add(1, Relaxed);
                            error!(error = %e, batches = group.len(), "commit failed; nothing acknowledged");
                            for r in group.drain(..) {
                                counters.commit_latency.observe(r.queued.elapsed().as_secs_f64());
                                let _ = r.reply.send(Err(StoreError::Db(e.to_string())));
                            }
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            error!(error = %e, "cannot start the writer thread");
        }
        Writer { tx, stats }
    }

    /// Queues a batch; resolves once it is committed (or failed).
    pub async fn commit(&self, batch: IngestBatch) -> Result<CommitOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Req {
                batch,
                reply,
                queued: std::time::Instant::now(),
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues a batch and returns the receiver for its outcome, so a session can keep
    /// verifying the next batch while this one commits.
    pub async fn submit(
        &self,
        batch: IngestBatch,
    ) -> Result<oneshot::Receiver<Result<CommitOutcome, StoreError>>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Req {
                batch,
                reply,
                queued: std::time::Instant::now(),
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CheckpointRow, IngestRecord, RecordContent};

    fn batch(agent: &str, seqs: std::ops::RangeInclusive<u64>) -> IngestBatch {
        IngestBatch {
            agent_id: agent.into(),
            records: seqs
                .clone()
                .map(|seq| IngestRecord {
                    seq,
                    prev_hash: [0; 32],
                    hash: [0; 32],
                    body: vec![],
                    created_ms: 0,
                    content: RecordContent::Unknown,
                })
                .collect(),
            checkpoint: CheckpointRow {
                epoch: 1,
                seq: *seqs.end(),
                chain_hash: [0; 32],
                signature: vec![],
            },
            received_ms: 0,
            alarms: vec![],
        }
    }

    #[test]
    fn a_poisoned_agent_is_held_until_it_starts_over() {
        let mut poisoned = HashMap::from([("p".to_string(), 5u64)]);
        assert!(admit(&mut poisoned, &batch("other", 9..=10)).is_ok());
        assert!(matches!(
            admit(&mut poisoned, &batch("p", 8..=9)),
            Err(StoreError::BatchRefused { seq: 9, .. })
        ));
        assert!(poisoned.contains_key("p"));
        assert!(admit(&mut poisoned, &batch("p", 5..=7)).is_ok());
        assert!(
            poisoned.is_empty(),
            "resending from the failed seq clears the mark"
        );
    }
}
