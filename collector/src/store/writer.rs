//! The single writer: one thread owns every ingest commit. Sessions hand it verified batches;
//! it takes whatever has queued up (up to a limit), commits it all in one transaction (group
//! commit), and only then answers each session, which only then acks its agent.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::error;

use super::{CommitOutcome, IngestBatch, Store, StoreError};

struct Req {
    batch: IngestBatch,
    reply: oneshot::Sender<Result<CommitOutcome, StoreError>>,
    /// When the session handed the batch over, for the commit-latency histogram.
    queued: std::time::Instant,
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
}

impl Default for WriterStats {
    fn default() -> Self {
        Self {
            commits: Default::default(),
            records: Default::default(),
            failed_commits: Default::default(),
            commit_latency:
                gpumeter_telemetry::prometheus_client::metrics::histogram::Histogram::new(
                    gpumeter_telemetry::prometheus_client::metrics::histogram::exponential_buckets(
                        0.0005, 2.0, 14,
                    ),
                ),
        }
    }
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
        let (tx, mut rx) = mpsc::channel::<Req>(4 * MAX_GROUP);
        let stats = Arc::new(WriterStats::default());
        let counters = stats.clone();
        let spawned = std::thread::Builder::new()
            .name("gpumeter-writer".into())
            .spawn(move || {
                let mut group = Vec::with_capacity(MAX_GROUP);
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
                    let batches: Vec<IngestBatch> =
                        group.iter_mut().map(|r| std::mem::replace(&mut r.batch, IngestBatch::empty())).collect();
                    use std::sync::atomic::Ordering::Relaxed;
                    match store.commit(&batches) {
                        Ok(outcomes) => {
                            counters.commits.fetch_add(1, Relaxed);
                            counters.records.fetch_add(
                                batches.iter().map(|b| b.records.len() as u64).sum(),
                                Relaxed,
                            );
                            for (r, o) in group.drain(..).zip(outcomes) {
                                counters.commit_latency.observe(r.queued.elapsed().as_secs_f64());
                                let _ = r.reply.send(Ok(o));
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
