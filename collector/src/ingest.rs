//! The `Ingest` service: one `Session` stream per agent. Checks the `Hello`, pins the agent's
//! key, answers where to resume and the host's assignments; then verifies each batch's chain
//! and checkpoint signature, hands it to the writer, and acks in order once it is committed.
//! Pushes a new assignment set whenever the grants change.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use futures::Stream;
use gpumeter_proto::chain::{self, ChainCursor, ChainError, Hash};
use gpumeter_proto::v1::{self, agent_message, collector_message, ingest_server::Ingest};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::convert::{decode_body, hello_from_wire};
use crate::store::writer::Writer;
use crate::store::{AgentHello, Alarm, CheckpointRow, IngestBatch, IngestRecord, Store};

/// Limits one agent's session must respect.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_batch_records: u32,
    pub max_message_bytes: u32,
    /// A session with no message for this long is closed.
    pub idle_timeout: Duration,
    /// Agent clocks further off than this raise a `clock_skew` alarm; windows that end
    /// later than the collector's now plus this are refused.
    pub max_clock_skew_ms: i64,
    /// Most cards one Hello may list (`limits.max_gpus_per_hello`).
    pub max_gpus_per_hello: u32,
    /// Longest string in a Hello or in a record's identity fields (`limits.max_string_bytes`).
    pub max_string_bytes: u32,
    /// How long before the agent's first registration a window may start
    /// (`limits.max_backfill_s`): 0 in production, so a new agent id cannot write history from
    /// before it existed; simulations that replay the past raise it.
    pub max_backfill_ms: i64,
    /// A session must say Hello within this long (`limits.hello_timeout_s`).
    pub hello_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch_records: 4096,
            max_message_bytes: 16 << 20,
            idle_timeout: Duration::from_secs(900),
            max_clock_skew_ms: 300_000,
            max_gpus_per_hello: 1024,
            max_string_bytes: 256,
            max_backfill_ms: 0,
            hello_timeout: Duration::from_secs(30),
        }
    }
}

/// What a batch that fails verification did wrong.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("batch has no records")]
    Empty,
    #[error("batch has {count} records, more than the limit {limit}")]
    TooLarge { count: usize, limit: u32 },
    #[error("batch has no checkpoint")]
    NoCheckpoint,
    #[error("checkpoint names agent {got:?}, not this session's {expected:?}")]
    WrongAgent { got: String, expected: String },
    #[error("checkpoint is for epoch {got}, session is in epoch {expected}")]
    WrongEpoch { got: u64, expected: u64 },
    #[error("checkpoint covers seq {checkpoint_seq} but the batch ends at seq {last_seq}")]
    CheckpointNotLast { checkpoint_seq: u64, last_seq: u64 },
    #[error("records are not in ascending seq order at seq {seq}")]
    Order { seq: u64 },
    #[error(transparent)]
    Chain(#[from] ChainError),
}

impl From<BatchError> for Status {
    fn from(e: BatchError) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

/// A batch after verification: what to store, what was already held.
#[derive(Debug)]
pub struct Verified {
    pub batch: IngestBatch,
    /// Records at or below the session's head, to compare with what is stored.
    pub resent: Vec<IngestRecord>,
}

/// Checks a batch against the chain head: links, order, checkpoint and signature. Pure.
pub fn verify_batch(
    cursor: &mut ChainCursor,
    agent_id: &str,
    epoch: u64,
    key: &VerifyingKey,
    batch: &v1::RecordBatch,
    limits: &Limits,
    received_ms: i64,
) -> Result<Verified, BatchError> {
    if batch.records.is_empty() {
        return Err(BatchError::Empty);
    }
    if batch.records.len() > limits.max_batch_records as usize {
        return Err(BatchError::TooLarge {
            count: batch.records.len(),
            limit: limits.max_batch_records,
        });
    }
    let cp = batch.checkpoint.as_ref().ok_or(BatchError::NoCheckpoint)?;
    if cp.agent_id != agent_id {
        return Err(BatchError::WrongAgent {
            got: cp.agent_id.clone(),
            expected: agent_id.to_string(),
        });
    }
    if cp.epoch != epoch {
        return Err(BatchError::WrongEpoch {
            got: cp.epoch,
            expected: epoch,
        });
    }
    let mut work = cursor.clone();
    let mut records = Vec::with_capacity(batch.records.len());
    let mut resent = Vec::new();
    let mut alarms = Vec::new();
    let mut last: Option<(u64, Hash)> = None;
    for r in &batch.records {
        if let Some((prev_seq, _)) = last {
            if r.seq <= prev_seq {
                return Err(BatchError::Order { seq: r.seq });
            }
        }
        let prev = chain::to_hash(&r.prev_hash)?;
        let hash = chain::record_hash(&prev, r.seq, &r.body);
        let (created_ms, content) = decode_body(&r.body);
        let rec = IngestRecord {
            seq: r.seq,
            prev_hash: prev,
            hash,
            body: r.body.clone(),
            created_ms,
            content,
        };
        if r.seq <= work.seq {
            // Already past the head: the collector may hold it. Links inside the batch still
            // have to hold for the checkpoint to mean anything.
            if let Some((ps, ph)) = last {
                if ps + 1 == r.seq && ph != prev {
                    return Err(ChainError::BrokenLink {
                        seq: r.seq,
                        got: hex::encode(prev),
                        expected: hex::encode(ph),
                    }
                    .into());
                }
            }
            last = Some((r.seq, hash));
            resent.push(rec);
            continue;
        }
        if r.seq > work.seq + 1 {
            alarms.push(Alarm {
                agent_id: agent_id.to_string(),
                at_ms: received_ms,
                kind: "seq_gap".into(),
                seq: Some(work.seq + 1),
                detail: format!(
                    "records {}..={} never arrived; the chain resumes at seq {}",
                    work.seq + 1,
                    r.seq - 1,
                    r.seq
                ),
            });
            work = ChainCursor::new(r.seq - 1, prev);
        }
        work.push(r.seq, &r.prev_hash, &r.body)?;
        last = Some((r.seq, hash));
        records.push(rec);
    }
    let (last_seq, last_hash) = last.ok_or(BatchError::Empty)?;
    if cp.seq != last_seq {
        return Err(BatchError::CheckpointNotLast {
            checkpoint_seq: cp.seq,
            last_seq,
        });
    }
    let claimed = chain::to_hash(&cp.chain_hash)?;
    if claimed != last_hash {
        return Err(ChainError::CheckpointMismatch {
            checkpoint_seq: cp.seq,
            checkpoint_hash: hex::encode(claimed),
            chain_hash: hex::encode(last_hash),
        }
        .into());
    }
    chain::verify_checkpoint(key, agent_id, epoch, cp.seq, &last_hash, &cp.signature)?;
    *cursor = work;
    Ok(Verified {
        batch: IngestBatch {
            agent_id: agent_id.to_string(),
            records,
            checkpoint: CheckpointRow {
                epoch,
                seq: cp.seq,
                chain_hash: last_hash,
                signature: cp.signature.clone(),
            },
            received_ms,
            alarms,
        },
        resent,
    })
}

/// Shared state of the ingest service.
#[derive(Clone)]
pub struct IngestService {
    pub store: Arc<dyn Store>,
    pub writer: Writer,
    pub live: Arc<Mutex<HashSet<String>>>,
    /// What each agent's last Hello here said its head was (for `hosts`' lag).
    pub heads: AgentHeads,
    pub limits: Limits,
    pub collector_id: String,
    /// Bumped whenever grants change; sessions then push new assignment sets.
    pub grants_version: watch::Receiver<u64>,
    /// Turns true when the server shuts down; sessions then end so the server can stop.
    pub closing: watch::Receiver<bool>,
}

/// Agent id → the agent's own head seq (the one before the next it would assign) as its last
/// Hello to this collector said. Kept in memory only: it is a gauge of how far behind an agent
/// is, never evidence, so a restart (or another collector sharing the database) forgets it.
pub type AgentHeads = Arc<Mutex<HashMap<String, u64>>>;

/// Removes an agent from the live set when its session ends, however it ends.
struct LiveGuard {
    live: Arc<Mutex<HashSet<String>>>,
    agent_id: String,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.agent_id);
        info!(agent = %self.agent_id, "session closed");
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The assignment set for a host, as the agent receives it.
pub fn assignment_set(store: &dyn Store, host_id: &str) -> Result<v1::AssignmentSet, Status> {
    let (version, rows) = store.assignments(host_id)?;
    Ok(v1::AssignmentSet {
        version,
        host_id: host_id.to_string(),
        assignments: rows
            .into_iter()
            .map(|a| v1::Assignment {
                gpu_uuid: a.gpu_uuid,
                grant_id: a.grant_id,
                program: a.program,
                principal: a.principal,
                valid_from_unix_ms: a.valid_from_ms,
                valid_until_unix_ms: a.valid_until_ms,
                revoked: a.revoked_at_ms.is_some(),
                revoked_at_unix_ms: a.revoked_at_ms.unwrap_or(0),
            })
            .collect(),
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<v1::CollectorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Ingest for IngestService {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let conn = crate::auth::connection(&request);
        let mut inbound = request.into_inner();
        let hello_timeout = self.limits.hello_timeout;
        let first = tokio::time::timeout(hello_timeout, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no hello within {} s (limits.hello_timeout_s)",
                    hello_timeout.as_secs()
                ))
            })??;
        let Some(v1::AgentMessage {
            kind: Some(agent_message::Kind::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument("the first message must be Hello"));
        };
        let received = now_ms();
        if let Err(e) = crate::admission::check_hello(&hello, &self.limits) {
            warn!(error = %e, "hello refused");
            let alarm = Alarm {
                agent_id: hello.agent_id.chars().take(128).collect(),
                at_ms: received,
                kind: e.alarm_kind().into(),
                seq: None,
                detail: e.to_string(),
            };
            let store = self.store.clone();
            let _ = blocking(move || store.alarm(&alarm).map_err(Status::from)).await;
            return Err(e.into());
        }
        let h = hello_from_wire(&hello, received)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let agent_id = h.agent_id.clone();
        self.admit(conn.as_ref(), &h).await?;
        {
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            if !live.insert(agent_id.clone()) {
                warn!(agent = %agent_id, "refused a second live session");
                return Err(Status::already_exists(format!(
                    "agent {agent_id} already has a live session on this collector"
                )));
            }
        }
        let guard = LiveGuard {
            live: self.live.clone(),
            agent_id: agent_id.clone(),
        };
        // One live session per agent across every collector sharing the store.
        let store = self.store.clone();
        let id = agent_id.clone();
        let Some(claim) = blocking(move || store.claim_session(&id).map_err(Status::from)).await?
        else {
            warn!(agent = %agent_id, "refused a session another collector holds");
            return Err(Status::already_exists(format!(
                "agent {agent_id} already has a live session on another collector"
            )));
        };
        let store = self.store.clone();
        let h2 = h.clone();
        let state = match blocking(move || Ok(store.hello(&h2))).await? {
            Ok(state) => state,
            Err(e @ crate::store::StoreError::HostMismatch { .. }) => {
                warn!(agent = %agent_id, error = %e, "hello refused");
                let alarm = Alarm {
                    agent_id: agent_id.clone(),
                    at_ms: received,
                    kind: "host_mismatch".into(),
                    seq: None,
                    detail: e.to_string(),
                };
                let store = self.store.clone();
                let _ = blocking(move || store.alarm(&alarm).map_err(Status::from)).await;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        let store = self.store.clone();
        let id = agent_id.clone();
        let registered_ms = blocking(move || store.agent_registered_ms(&id).map_err(Status::from))
            .await?
            .unwrap_or(received);
        let skew = hello.agent_time_unix_ms - received;
        if hello.agent_time_unix_ms != 0 && skew.abs() > self.limits.max_clock_skew_ms {
            let store = self.store.clone();
            let alarm = Alarm {
                agent_id: agent_id.clone(),
                at_ms: received,
                kind: "clock_skew".into(),
                seq: None,
                detail: format!("agent clock is {skew} ms off the collector's"),
            };
            warn!(agent = %agent_id, skew_ms = skew, "agent clock skew");
            blocking(move || store.alarm(&alarm).map_err(Status::from)).await?;
        }
        if let Some(alarm) = self
            .ledger_behind_agent(&hello, &agent_id, received)
            .await?
        {
            warn!(agent = %agent_id, acked_seq = hello.acked_seq, "collector holds less than it acknowledged");
            let store = self.store.clone();
            blocking(move || store.alarm(&alarm).map_err(Status::from)).await?;
        }
        // Watch for grant changes from before the Welcome's assignment set is read, so a change
        // in between is pushed rather than missed.
        let mut grants_version = self.grants_version.clone();
        grants_version.mark_unchanged();
        let store = self.store.clone();
        let host = h.host_id.clone();
        let assignments = blocking(move || assignment_set(store.as_ref(), &host)).await?;
        info!(agent = %agent_id, host = %h.host_id, durable_seq = state.durable_seq, agent_next = hello.next_seq, "session open");
        self.heads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(agent_id.clone(), hello.next_seq.saturating_sub(1));

        let (tx, rx) = mpsc::channel::<Result<v1::CollectorMessage, Status>>(64);
        let welcome = v1::CollectorMessage {
            kind: Some(collector_message::Kind::Welcome(v1::Welcome {
                collector_id: self.collector_id.clone(),
                durable_seq: state.durable_seq,
                durable_hash: state.durable_hash.to_vec(),
                assignments: Some(assignments),
                collector_time_unix_ms: received,
                max_batch_records: self.limits.max_batch_records,
                max_message_bytes: self.limits.max_message_bytes,
                epoch: state.epoch,
            })),
        };
        tx.send(Ok(welcome))
            .await
            .map_err(|_| Status::cancelled("agent went away"))?;

        let key = chain::verifying_key(&h.public_key)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let svc = self.clone();
        let epoch = h.epoch;
        let host_id = h.host_id.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let _claim = claim;
            if let Err(status) = svc
                .pump(
                    &mut inbound,
                    &tx,
                    agent_id.clone(),
                    host_id,
                    epoch,
                    key,
                    ChainCursor::new(state.durable_seq, state.durable_hash),
                    grants_version,
                    registered_ms,
                )
                .await
            {
                warn!(agent = %agent_id, error = %status.message(), "session failed");
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl IngestService {
    /// The alarm to raise when the agent says the collector acknowledged more than it now
    /// holds (records lost or cut from the ledger), or a different record at that seq.
    async fn ledger_behind_agent(
        &self,
        hello: &v1::Hello,
        agent_id: &str,
        at_ms: i64,
    ) -> Result<Option<Alarm>, Status> {
        if hello.acked_seq == 0 {
            return Ok(None);
        }
        let store = self.store.clone();
        let (id, seq) = (agent_id.to_string(), hello.acked_seq);
        let held = blocking(move || store.record_hash(&id, seq).map_err(Status::from)).await?;
        let detail = match held {
            None => format!(
                "the agent was acknowledged through seq {seq} (hash {}) but the ledger does not hold that record",
                hex::encode(&hello.acked_hash)
            ),
            Some(h) if h.as_slice() != hello.acked_hash.as_slice() => format!(
                "the agent was acknowledged seq {seq} with hash {} but the ledger holds {} there",
                hex::encode(&hello.acked_hash),
                hex::encode(h)
            ),
            Some(_) => return Ok(None),
        };
        Ok(Some(Alarm {
            agent_id: agent_id.to_string(),
            at_ms,
            kind: "ledger_behind_agent".into(),
            seq: Some(seq),
            detail,
        }))
    }

    /// Who may say this Hello: the agent and host its certificate names, or (without TLS) an
    /// agent an admin registered. A mismatch is stored as an alarm and nothing else.
    async fn admit(
        &self,
        conn: Option<&crate::auth::ConnInfo>,
        h: &AgentHello,
    ) -> Result<(), Status> {
        use crate::auth::{Admission, AuthError, check_hello};
        match check_hello(conn, &h.agent_id, &h.host_id) {
            Ok(Admission::Certified) => Ok(()),
            Ok(Admission::MustBeRegistered) => {
                let store = self.store.clone();
                let id = h.agent_id.clone();
                if blocking(move || store.agent_known(&id).map_err(Status::from)).await? {
                    Ok(())
                } else {
                    warn!(agent = %h.agent_id, "refused an unregistered agent (no certificate)");
                    Err(AuthError::UnregisteredAgent {
                        agent_id: h.agent_id.clone(),
                    }
                    .into())
                }
            }
            Err(e @ AuthError::IdentityMismatch { .. }) => {
                let certified = conn
                    .and_then(|c| c.identity.as_ref())
                    .map(|i| i.agent_id.clone())
                    .unwrap_or_default();
                let alarm = Alarm {
                    agent_id: certified,
                    at_ms: h.received_ms,
                    kind: "identity_mismatch".into(),
                    seq: None,
                    detail: format!(
                        "{e}; from {}",
                        conn.and_then(|c| c.remote_addr)
                            .map_or("?".to_string(), |a| a.to_string())
                    ),
                };
                warn!(agent = %h.agent_id, host = %h.host_id, error = %e, "refused a Hello its certificate does not cover");
                let store = self.store.clone();
                blocking(move || store.alarm(&alarm).map_err(Status::from)).await?;
                Err(e.into())
            }
            Err(e) => {
                warn!(agent = %h.agent_id, error = %e, "refused a Hello");
                Err(e.into())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn pump(
        &self,
        inbound: &mut Streaming<v1::AgentMessage>,
        tx: &mpsc::Sender<Result<v1::CollectorMessage, Status>>,
        agent_id: String,
        host_id: String,
        epoch: u64,
        key: VerifyingKey,
        mut cursor: ChainCursor,
        mut grants_version: watch::Receiver<u64>,
        registered_ms: i64,
    ) -> Result<(), Status> {
        // Acks go out in commit order from their own task, so verification of the next
        // batch overlaps the commit of this one.
        let (ack_tx, mut ack_rx) = mpsc::channel::<
            tokio::sync::oneshot::Receiver<
                Result<crate::store::CommitOutcome, crate::store::StoreError>,
            >,
        >(32);
        let acker_tx = tx.clone();
        let acker_agent = agent_id.clone();
        let acker = tokio::spawn(async move {
            while let Some(rx) = ack_rx.recv().await {
                let outcome = match rx.await {
                    Ok(Ok(o)) => o,
                    Ok(Err(e)) => {
                        let _ = acker_tx.send(Err(Status::from(e))).await;
                        return;
                    }
                    Err(_) => return,
                };
                if !outcome.equivocations.is_empty() {
                    warn!(agent = %acker_agent, seqs = ?outcome.equivocations, "equivocation: records re-sent with different bytes");
                }
                let ack = v1::CollectorMessage {
                    kind: Some(collector_message::Kind::Ack(v1::Ack {
                        durable_seq: outcome.durable_seq,
                        durable_hash: outcome.durable_hash.to_vec(),
                    })),
                };
                if acker_tx.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
        });
        let mut closing = self.closing.clone();
        let result = loop {
            if *closing.borrow() {
                break Err(Status::unavailable("collector is shutting down"));
            }
            let msg = tokio::select! {
                _ = closing.changed() => continue,
                m = tokio::time::timeout(self.limits.idle_timeout, inbound.message()) => m,
                changed = grants_version.changed() => {
                    if changed.is_ok() {
                        let store = self.store.clone();
                        let host = host_id.clone();
                        let set = blocking(move || assignment_set(store.as_ref(), &host)).await?;
                        let m = v1::CollectorMessage { kind: Some(collector_message::Kind::Assignments(set)) };
                        if tx.send(Ok(m)).await.is_err() {
                            break Ok(());
                        }
                    }
                    continue;
                }
            };
            let msg = match msg {
                Err(_) => break Err(Status::deadline_exceeded("session idle too long")),
                Ok(Err(s)) => break Err(s),
                Ok(Ok(None)) => break Ok(()),
                Ok(Ok(Some(m))) => m,
            };
            match msg.kind {
                Some(agent_message::Kind::Batch(b)) => {
                    let verified = match verify_batch(
                        &mut cursor,
                        &agent_id,
                        epoch,
                        &key,
                        &b,
                        &self.limits,
                        now_ms(),
                    ) {
                        Ok(v) => v,
                        Err(e) => {
                            let store = self.store.clone();
                            let alarm = Alarm {
                                agent_id: agent_id.clone(),
                                at_ms: now_ms(),
                                kind: "bad_batch".into(),
                                seq: b.records.first().map(|r| r.seq),
                                detail: e.to_string(),
                            };
                            let _ =
                                blocking(move || store.alarm(&alarm).map_err(Status::from)).await;
                            break Err(e.into());
                        }
                    };
                    let mut batch = verified.batch;
                    let now = now_ms();
                    if let Err(e) = crate::admission::check_records(
                        &batch.records,
                        now,
                        registered_ms,
                        &self.limits,
                    ) {
                        warn!(agent = %agent_id, error = %e, "batch refused");
                        let store = self.store.clone();
                        let alarm = Alarm {
                            agent_id: agent_id.clone(),
                            at_ms: now,
                            kind: e.alarm_kind().into(),
                            seq: e.seq(),
                            detail: e.to_string(),
                        };
                        let _ = blocking(move || store.alarm(&alarm).map_err(Status::from)).await;
                        break Err(e.into());
                    }
                    // Resent records already held: same bytes are no-ops, others are alarms.
                    // They go through the writer too, so its dedup decides (it sees every copy).
                    let mut all = verified.resent;
                    all.append(&mut batch.records);
                    batch.records = all;
                    match self.writer.submit(batch).await {
                        Ok(rx) => {
                            if ack_tx.send(rx).await.is_err() {
                                break Ok(());
                            }
                        }
                        Err(e) => break Err(e.into()),
                    }
                }
                Some(agent_message::Kind::AssignmentApplied(a)) => {
                    info!(agent = %agent_id, version = a.version, "agent applied assignments");
                }
                Some(agent_message::Kind::Hello(_)) => {
                    break Err(Status::invalid_argument("Hello sent twice"));
                }
                None => break Err(Status::invalid_argument("empty message")),
            }
        };
        drop(ack_tx);
        let _ = acker.await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn batch(key: &SigningKey, from: u64, n: u64, head: Hash) -> (v1::RecordBatch, Hash) {
        let mut c = ChainCursor::new(from - 1, head);
        let mut records = Vec::new();
        for seq in from..from + n {
            let body = format!("body-{seq}").into_bytes();
            let prev = c.head;
            c.push(seq, &prev, &body).unwrap();
            records.push(v1::Record {
                seq,
                prev_hash: prev.to_vec(),
                body,
            });
        }
        let last = from + n - 1;
        let sig = chain::sign_checkpoint(key, "a1", 1, last, &c.head);
        (
            v1::RecordBatch {
                records,
                checkpoint: Some(v1::Checkpoint {
                    agent_id: "a1".into(),
                    epoch: 1,
                    seq: last,
                    chain_hash: c.head.to_vec(),
                    signature: sig.to_vec(),
                }),
            },
            c.head,
        )
    }

    #[test]
    fn verifies_consecutive_batches_and_refuses_forgeries() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let vk = key.verifying_key();
        let l = Limits::default();
        let mut cur = ChainCursor::new(0, chain::GENESIS);
        let (b1, h1) = batch(&key, 1, 3, chain::GENESIS);
        let v = verify_batch(&mut cur, "a1", 1, &vk, &b1, &l, 0).unwrap();
        assert_eq!(v.batch.records.len(), 3);
        assert_eq!(cur.seq, 3);
        let (b2, _) = batch(&key, 4, 2, h1);

        // Tampered body: the checkpoint no longer matches.
        let mut bad = b2.clone();
        bad.records[1].body[0] ^= 1;
        let mut c2 = cur.clone();
        assert!(matches!(
            verify_batch(&mut c2, "a1", 1, &vk, &bad, &l, 0),
            Err(BatchError::Chain(ChainError::CheckpointMismatch { .. }))
        ));
        // Signed by another key.
        let other = SigningKey::from_bytes(&[4; 32]);
        let (forged, _) = batch(&other, 4, 2, h1);
        let mut c3 = cur.clone();
        assert!(matches!(
            verify_batch(&mut c3, "a1", 1, &vk, &forged, &l, 0),
            Err(BatchError::Chain(ChainError::BadSignature { seq: 5 }))
        ));
        // Wrong link to the head.
        let (unlinked, _) = batch(&key, 4, 2, [9; 32]);
        let mut c4 = cur.clone();
        assert!(matches!(
            verify_batch(&mut c4, "a1", 1, &vk, &unlinked, &l, 0),
            Err(BatchError::Chain(ChainError::BrokenLink { seq: 4, .. }))
        ));
        assert_eq!(cur.seq, 3, "failed batches leave the cursor alone");
        let v = verify_batch(&mut cur, "a1", 1, &vk, &b2, &l, 0).unwrap();
        assert_eq!(v.batch.records.len(), 2);
        // Replaying the first batch: everything is resent, nothing new.
        let v = verify_batch(&mut cur, "a1", 1, &vk, &b1, &l, 0).unwrap();
        assert_eq!((v.batch.records.len(), v.resent.len()), (0, 3));
    }

    #[test]
    fn a_gap_is_accepted_with_an_alarm() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let mut cur = ChainCursor::new(0, chain::GENESIS);
        let (b, _) = batch(&key, 5, 2, [7; 32]);
        let v = verify_batch(
            &mut cur,
            "a1",
            1,
            &key.verifying_key(),
            &b,
            &Limits::default(),
            9,
        )
        .unwrap();
        assert_eq!(v.batch.alarms.len(), 1);
        assert_eq!(v.batch.alarms[0].kind, "seq_gap");
        assert_eq!(v.batch.alarms[0].seq, Some(1));
        assert_eq!(cur.seq, 6);
    }
}
