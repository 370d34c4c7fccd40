//! The uplink: one `Ingest.Session` stream to the collector at a time. Sends `Hello`, resumes
//! from the collector's durable point, streams spooled records in signed batches, drops spooled
//! records only when an `Ack` covers them, and applies assignment sets as they arrive. Any
//! failure closes the stream and reconnects with exponential backoff; the spool keeps
//! everything meanwhile.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use gpumeter_proto::chain;
use gpumeter_proto::v1::{self, agent_message, collector_message, ingest_client::IngestClient};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tracing::{debug, error, info, warn};

use crate::assignments::Assignments;
use crate::clock::Clock;
use crate::config::CollectorConfig;
use crate::ledger::Ledger;
use crate::record::event_body;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("cannot connect to collector {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("collector refused the session: {message} ({code:?})")]
    Refused { code: tonic::Code, message: String },
    #[error("collector closed the stream")]
    Closed,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("spool: {0}")]
    Spool(#[from] crate::spool::SpoolError),
    #[error("started epoch {0}; reconnecting to announce it")]
    NewEpoch(u64),
}

/// An error with every cause under it (`transport error: tcp connect error: Connection
/// refused`), so a log line names the reason and not only the layer that failed.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cause = c.source();
    }
    text
}

/// A wait drawn uniformly from `[0, ceiling]` ms ("full jitter"), so a fleet of agents that
/// lost the collector together does not reconnect in lock-step when it comes back.
pub fn full_jitter(ceiling_ms: u64) -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return ceiling_ms;
    }
    u64::from_le_bytes(b) % (ceiling_ms.saturating_add(1))
}

impl UplinkError {
    /// Whether the collector refused this agent for a reason only a person can fix: its key
    /// is not the pinned one, or it sent something the collector rejects.
    pub fn needs_operator(&self) -> bool {
        matches!(
            self,
            UplinkError::Refused {
                code: tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
                    | tonic::Code::InvalidArgument,
                ..
            }
        )
    }
}

/// TLS for the collector: trust its CA, present this agent's certificate.
fn client_tls(cfg: &CollectorConfig) -> Result<ClientTlsConfig, String> {
    let read = |field: &str, p: &Option<PathBuf>| {
        let p = p
            .as_ref()
            .ok_or_else(|| format!("collector.{field} is not set"))?;
        std::fs::read(p).map_err(|e| format!("collector.{field} {}: {e}", p.display()))
    };
    let ca = read("ca_cert", &cfg.ca_cert)?;
    let cert = read("client_cert", &cfg.client_cert)?;
    let key = read("client_key", &cfg.client_key)?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key)))
}

fn refused(s: tonic::Status) -> UplinkError {
    UplinkError::Refused {
        code: s.code(),
        message: s.message().to_string(),
    }
}

/// What the uplink needs.
pub struct Uplink {
    pub cfg: CollectorConfig,
    pub hello: v1::Hello,
    pub key: SigningKey,
    pub ledger: Ledger,
    pub clock: Arc<dyn Clock>,
    pub assignments: watch::Sender<Arc<Assignments>>,
    pub assignment_cache: PathBuf,
    /// Records in flight (sent, not acked) at most.
    pub max_in_flight: u64,
}

/// Status the agent exposes (logs, metrics, tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UplinkStatus {
    pub connected: bool,
    pub sessions: u64,
    pub acked_seq: u64,
    /// When the collector last acknowledged records (agent clock).
    pub last_ack_ms: Option<i64>,
    pub last_error: Option<String>,
}

impl Uplink {
    /// Runs sessions, reconnecting with backoff, until `shutdown` turns true.
    pub async fn run(
        self,
        mut shutdown: watch::Receiver<bool>,
        status: watch::Sender<UplinkStatus>,
    ) {
        let mut backoff = self.cfg.backoff_initial_ms;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let started = tokio::time::Instant::now();
            let res = self.session(&mut shutdown, &status).await;
            status.send_modify(|s| s.connected = false);
            match res {
                Ok(()) => return,
                Err(e) => {
                    if started.elapsed() > Duration::from_secs(10) {
                        backoff = self.cfg.backoff_initial_ms;
                    }
                    let wait = full_jitter(backoff);
                    if e.needs_operator() {
                        // Retrying alone will not fix it (a refused key, a bad batch): say so
                        // loudly; records stay spooled meanwhile.
                        error!(error = %e, retry_in_ms = wait, "the collector refuses this agent; an operator must act");
                    } else if matches!(e, UplinkError::Connect { .. }) {
                        warn!(error = %e, retry_in_ms = wait, "cannot reach the collector; retrying");
                    } else {
                        warn!(error = %e, retry_in_ms = wait, "collector session ended; retrying");
                    }
                    status.send_modify(|s| s.last_error = Some(e.to_string()));
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
            backoff = (backoff * 2).min(self.cfg.backoff_max_ms);
        }
    }

    fn apply_assignments(&self, set: &v1::AssignmentSet) {
        match Assignments::try_from(set) {
            Ok(a) => {
                if let Err(e) = a.save(&self.assignment_cache) {
                    error!(error = %e, "cannot cache assignments; enforcement offline would use the old set");
                }
                // Once per version: a reconnect (or a restart, the cache holding the version)
                // brings the same version again and records nothing.
                let previous = self.assignments.borrow().clone();
                if a.version != previous.version {
                    let now = self.clock.now_ms();
                    let event = crate::enforce::assignment_changed(&previous, &a, now);
                    if let Err(e) = self.ledger.append(&[event_body(now, event)]) {
                        error!(error = %e, version = a.version, "cannot record the assignment change");
                    }
                }
                info!(
                    version = a.version,
                    cards = a.cards.len(),
                    "assignments applied"
                );
                self.assignments.send_replace(Arc::new(a));
            }
            Err(e) => error!(error = %e, "refusing an assignment set from the collector"),
        }
    }

    async fn session(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        status: &watch::Sender<UplinkStatus>,
    ) -> Result<(), UplinkError> {
        let url = self.cfg.url.clone();
        let connect_err = |e: &dyn std::error::Error| UplinkError::Connect {
            url: url.clone(),
            reason: error_chain(e),
        };
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| connect_err(&e))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20));
        if url.starts_with("https://") {
            // Read at every connect, so a renewed certificate is used from the next session.
            endpoint = endpoint
                .tls_config(
                    client_tls(&self.cfg).map_err(|reason| UplinkError::Connect {
                        url: url.clone(),
                        reason,
                    })?,
                )
                .map_err(|e| connect_err(&e))?;
        }
        let channel = endpoint.connect().await.map_err(|e| connect_err(&e))?;
        let mut client = IngestClient::new(channel)
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20);

        let (head_seq, head_hash, oldest) = {
            let g = self.ledger.lock();
            let (s, h) = g.spool.head();
            (s, h, g.spool.oldest_unacked().unwrap_or(s + 1))
        };
        let mut hello = self.hello.clone();
        hello.next_seq = head_seq + 1;
        hello.chain_head = head_hash.to_vec();
        hello.oldest_spooled_seq = oldest;
        // What the collector acknowledged, so a collector holding less is caught.
        let (acked_seq, acked_hash) = self.ledger.lock().spool.acked();
        hello.acked_seq = acked_seq;
        hello.acked_hash = if acked_seq == 0 {
            Vec::new()
        } else {
            acked_hash.to_vec()
        };
        hello.agent_time_unix_ms = self.clock.now_ms();
        hello.epoch = self.ledger.lock().spool.epoch();
        let epoch = hello.epoch;

        let (tx, rx) = mpsc::channel::<v1::AgentMessage>(8);
        tx.send(v1::AgentMessage {
            kind: Some(agent_message::Kind::Hello(hello)),
        })
        .await
        .map_err(|_| UplinkError::Closed)?;
        let mut inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .map_err(refused)?
            .into_inner();
        let welcome = match inbound.message().await {
            Ok(Some(v1::CollectorMessage {
                kind: Some(collector_message::Kind::Welcome(w)),
            })) => w,
            Ok(Some(_)) => {
                return Err(UplinkError::Protocol(
                    "first message was not Welcome".into(),
                ));
            }
            Ok(None) => return Err(UplinkError::Closed),
            Err(s) => {
                return Err(refused(s));
            }
        };
        info!(collector = %welcome.collector_id, durable_seq = welcome.durable_seq, "connected to collector");
        if let Some(set) = &welcome.assignments {
            self.apply_assignments(set);
        }
        // The collector's durable point must lie on this agent's chain. If it does not (the
        // spool was lost, or holds another history), start a new epoch after it and reconnect.
        let diverged = if welcome.durable_seq > head_seq {
            true
        } else {
            matches!(
                self.on_ack(welcome.durable_seq, &welcome.durable_hash, status),
                Err(UplinkError::Spool(
                    crate::spool::SpoolError::AckMismatch { .. }
                ))
            )
        };
        if diverged {
            let hash = chain::to_hash(&welcome.durable_hash)
                .map_err(|e| UplinkError::Protocol(e.to_string()))?;
            let ledger = self.ledger.clone();
            let now = self.clock.now_ms();
            let (seq, ep) = (welcome.durable_seq, welcome.epoch);
            let epoch = tokio::task::spawn_blocking(move || {
                ledger.rebase(
                    seq,
                    hash,
                    ep,
                    now,
                    "the agent's spool does not hold the chain the collector has",
                )
            })
            .await
            .map_err(|e| UplinkError::Protocol(e.to_string()))??;
            error!(
                collector_seq = welcome.durable_seq,
                agent_seq = head_seq,
                epoch,
                "spool lost or replaced: started a new epoch after the collector's last record"
            );
            return Err(UplinkError::NewEpoch(epoch));
        }
        let mut sent_through = self.on_ack(welcome.durable_seq, &welcome.durable_hash, status)?;
        let batch_max = welcome
            .max_batch_records
            .clamp(1, self.cfg.max_batch_records.max(1)) as usize;
        status.send_modify(|s| {
            s.connected = true;
            s.sessions += 1;
            s.last_error = None;
        });
        let mut acked = welcome.durable_seq;
        // Appends and acks wake the loop themselves (`appended` keeps a permit for a wake-up
        // that comes while the loop is busy); the tick is only a backstop, kept rare because
        // every wake-up of an idle agent is CPU on a GPU server.
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            // Send what the window allows.
            loop {
                let head = self.ledger.head().0;
                if sent_through >= head || sent_through.saturating_sub(acked) >= self.max_in_flight
                {
                    break;
                }
                let ledger = self.ledger.clone();
                let from = sent_through + 1;
                let records = tokio::task::spawn_blocking(move || {
                    ledger.lock().spool.read_from(from, batch_max)
                })
                .await
                .map_err(|e| UplinkError::Protocol(e.to_string()))??;
                let Some(batch) =
                    crate::record::signed_batch(&self.key, &self.hello.agent_id, epoch, records)
                else {
                    break;
                };
                let last_seq = batch.checkpoint.as_ref().map_or(sent_through, |c| c.seq);
                debug!(through = last_seq, "sending batch");
                tx.send(v1::AgentMessage {
                    kind: Some(agent_message::Kind::Batch(batch)),
                })
                .await
                .map_err(|_| UplinkError::Closed)?;
                sent_through = last_seq;
            }
            if *shutdown.borrow() {
                return Ok(());
            }
            tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(v1::CollectorMessage { kind: Some(collector_message::Kind::Ack(a)) })) => {
                        acked = acked.max(a.durable_seq);
                        self.on_ack(a.durable_seq, &a.durable_hash, status)?;
                    }
                    Ok(Some(v1::CollectorMessage { kind: Some(collector_message::Kind::Assignments(set)) })) => {
                        self.apply_assignments(&set);
                        let _ = tx.send(v1::AgentMessage {
                            kind: Some(agent_message::Kind::AssignmentApplied(v1::AssignmentApplied { version: set.version })),
                        }).await;
                    }
                    Ok(Some(_)) => return Err(UplinkError::Protocol("unexpected message".into())),
                    Ok(None) => return Err(UplinkError::Closed),
                    Err(s) => return Err(refused(s)),
                },
                _ = self.ledger.appended.notified() => {}
                _ = tick.tick() => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Applies an ack; returns the seq sending resumes after.
    fn on_ack(
        &self,
        seq: u64,
        hash: &[u8],
        status: &watch::Sender<UplinkStatus>,
    ) -> Result<u64, UplinkError> {
        let mut g = self.ledger.lock();
        let (head, _) = g.spool.head();
        let (acked, _) = g.spool.acked();
        if seq > head {
            return Ok(head);
        }
        if seq > acked {
            let h = chain::to_hash(hash).map_err(|e| UplinkError::Protocol(e.to_string()))?;
            g.spool.ack(seq, h)?;
            let now = self.clock.now_ms();
            status.send_modify(|s| {
                s.acked_seq = seq;
                s.last_ack_ms = Some(now);
            });
        }
        if seq < acked {
            warn!(
                collector_seq = seq,
                acked,
                "collector is behind what it acknowledged before; records after its point are gone from the spool"
            );
            return Ok(acked);
        }
        Ok(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_a_person_must_fix_are_raised_to_operators() {
        let key = refused(tonic::Status::permission_denied("key differs"));
        assert!(key.needs_operator());
        assert!(key.to_string().contains("key differs"));
        assert!(refused(tonic::Status::invalid_argument("bad batch")).needs_operator());
        assert!(!refused(tonic::Status::already_exists("live session")).needs_operator());
        assert!(!refused(tonic::Status::unavailable("shutting down")).needs_operator());
        assert!(!UplinkError::Closed.needs_operator());
    }

    #[test]
    fn full_jitter_spreads_waits_over_the_whole_range() {
        let waits: Vec<u64> = (0..2000).map(|_| full_jitter(1000)).collect();
        assert!(waits.iter().all(|w| *w <= 1000));
        // Uniform over [0, 1000]: both halves are well populated, and the draws differ.
        let low = waits.iter().filter(|w| **w < 500).count();
        assert!((700..1300).contains(&low), "{low} of 2000 below the middle");
        let distinct: std::collections::BTreeSet<_> = waits.iter().collect();
        assert!(distinct.len() > 500, "{} distinct waits", distinct.len());
        assert_eq!(full_jitter(0), 0);
    }

    #[tokio::test]
    async fn a_connect_error_names_its_cause() {
        // Port 1 on loopback: nothing listens, the connection is refused.
        let err = tonic::transport::Endpoint::from_static("http://127.0.0.1:1")
            .connect()
            .await
            .unwrap_err();
        let text = error_chain(&err);
        assert!(text.starts_with("transport error"), "{text}");
        assert!(text.to_lowercase().contains("refused"), "{text}");
    }
}
