//! The read-only `Query` service for auditors and the ministry.

use std::sync::Arc;

use gpumeter_proto::v1::{self, query_server::Query};
use tonic::{Request, Response, Status};

use crate::grants::{Grant, Program};
use crate::reconcile::{
    self, CardRow, CspTotal, Figures, GrantRow, IdleGrant, IdleReport, IdleSettings, Inputs,
    Interval, InvoiceCspTotal, InvoiceRow, ProgramTotal, ReclaimableCard, Reconciliation,
    UnassignedCard, UnassignedUse, gpu_hours,
};
use crate::report::parse_period;
use crate::store::{MeteredWindow, Store, StoreError, StoredEvent};
use crate::verify::{Finding, VerifyReport, verify, verify_agent};

#[derive(Clone)]
pub struct QueryService {
    pub store: Arc<dyn Store>,
    /// The agents' heads as their Hellos here said (see [`crate::ingest::AgentHeads`]).
    pub agent_heads: crate::ingest::AgentHeads,
    /// Live figures for `Watch` (see [`crate::watch`]).
    pub hub: crate::watch::Hub,
}

/// Longest period one usage query may span (a little over a year).
const MAX_PERIOD_MS: i64 = 400 * 86_400_000;

#[tonic::async_trait]
impl Query for QueryService {
    async fn usage(
        &self,
        request: Request<v1::UsageRequest>,
    ) -> Result<Response<v1::UsageReport>, Status> {
        bounded(
            self.usage_report(request.into_inner()).await?,
            "StreamUsage",
        )
    }

    async fn verify(
        &self,
        request: Request<v1::VerifyRequest>,
    ) -> Result<Response<v1::VerifyReply>, Status> {
        let request = request.into_inner();
        let agent = request.agent_id;
        let heads = request
            .heads
            .into_iter()
            .map(crate::convert::head_from_wire)
            .collect::<Vec<_>>();
        let store = self.store.clone();
        let report = tokio::task::spawn_blocking(move || -> Result<VerifyReport, Status> {
            let ledger = store.ledger()?;
            if agent.is_empty() {
                let mut report = verify(ledger.as_ref())?;
                report.heads = crate::heads::verify_heads(&heads, ledger.as_ref())?;
                report.ok &= report.heads.is_empty();
                return Ok(report);
            }
            let (id, key) = ledger
                .agents()?
                .into_iter()
                .find(|(id, _)| *id == agent)
                .ok_or_else(|| Status::not_found(format!("agent {agent} is unknown")))?;
            let a = verify_agent(ledger.as_ref(), &id, &key)?;
            Ok(VerifyReport {
                records: a.records,
                ok: a.findings.is_empty(),
                agents: vec![a],
                heads: Vec::new(),
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(report_to_wire(&report)))
    }

    async fn heads(
        &self,
        request: Request<v1::HeadsRequest>,
    ) -> Result<Response<v1::HeadsReply>, Status> {
        let q = request.into_inner();
        let store = self.store.clone();
        let heads = blocking(move || -> Result<_, StoreError> {
            if q.sign_now {
                store.sign_head(now_ms())?;
            }
            store.heads(q.since_unix_ms)
        })
        .await?;
        Ok(Response::new(v1::HeadsReply {
            heads: heads.iter().map(crate::convert::head_to_wire).collect(),
        }))
    }

    async fn reconcile(
        &self,
        request: Request<v1::ReconcileRequest>,
    ) -> Result<Response<v1::ReconcileReply>, Status> {
        bounded(
            self.reconcile_reply(request.into_inner()).await?,
            "StreamReconcile",
        )
    }

    async fn check_report(
        &self,
        request: Request<v1::CheckReportRequest>,
    ) -> Result<Response<v1::CheckReportReply>, Status> {
        let r = request.into_inner();
        let q = r
            .query
            .ok_or_else(|| Status::invalid_argument("query: missing"))?;
        if q.as_of_head == 0 {
            return Err(Status::invalid_argument(
                "query.as_of_head: must name a head",
            ));
        }
        let korean = match r.lang.as_str() {
            "ko" => true,
            "en" => false,
            _ => return Err(Status::invalid_argument("lang: ko or en")),
        };
        let store = self.store.clone();
        let reply = blocking(move || -> Result<v1::CheckReportReply, Status> {
            let (report, days, _) = compute_report(store.as_ref(), &q)?;
            let content = crate::provenance::render(&report, &days, &r.format, korean)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let hash = hex::decode(crate::provenance::content_hash(&content)).unwrap_or_default();
            let matches = hash == r.content_sha256;
            let head = store
                .head(q.as_of_head)?
                .ok_or_else(|| Status::not_found(format!("head {} not found", q.as_of_head)))?;
            let mut reply = v1::CheckReportReply {
                matches,
                recomputed_sha256: hash,
                head: Some(crate::convert::head_to_wire(&head)),
                ..Default::default()
            };
            if matches && r.sign {
                let p = provenance_of(&q, &head, &r.format, &r.lang, &content);
                let (sig, key) = store.collector_sign(&p.signed_message())?;
                reply.signature = sig;
                reply.public_key = key;
            }
            Ok(reply)
        })
        .await?;
        Ok(Response::new(reply))
    }

    async fn card_timeline(
        &self,
        request: Request<v1::CardTimelineRequest>,
    ) -> Result<Response<v1::CardTimelineReply>, Status> {
        let q = request.into_inner();
        let (from, until) = period_arg(&q.period)?;
        let gpu = q.gpu_uuid.trim().to_owned();
        if gpu.is_empty() {
            return Err(Status::invalid_argument(
                "gpu_uuid: required field is empty",
            ));
        }
        let store = self.store.clone();
        let (windows, events, grants) = blocking(move || {
            store.retention()?.check_raw(from, "a card's timeline")?;
            Ok::<_, StoreError>((
                store.windows(from, until, Some(&gpu))?,
                store.events(from, until, None, Some(&gpu))?,
                store.grants()?,
            ))
        })
        .await?;
        let gpu = q.gpu_uuid.trim();
        let mut holdings: Vec<v1::CardHolding> = grants
            .iter()
            .flat_map(|g| {
                g.cards
                    .iter()
                    .filter(|c| c.gpu_uuid == gpu)
                    .filter_map(move |c| {
                        let (a, b) = g.card_interval(c);
                        let span = Interval {
                            from_ms: a.max(from),
                            until_ms: b.min(until),
                        };
                        (span.until_ms > span.from_ms).then(|| v1::CardHolding {
                            grant_id: g.grant_id.clone(),
                            span: Some(span_to_wire(span)),
                        })
                    })
            })
            .collect();
        holdings.sort_by_key(|h| h.span.as_ref().map(|s| s.from_unix_ms));
        Ok(Response::new(v1::CardTimelineReply {
            gpu_uuid: gpu.to_owned(),
            from_unix_ms: from,
            until_unix_ms: until,
            windows: windows.into_iter().map(timeline_window).collect(),
            events: events.into_iter().map(event_to_wire).collect(),
            holdings,
        }))
    }

    async fn idle_grants(
        &self,
        request: Request<v1::IdleGrantsRequest>,
    ) -> Result<Response<v1::IdleGrantsReply>, Status> {
        let q = request.into_inner();
        let program = program_arg(&q.program)?;
        let idle = idle_arg(q.threshold_pct, q.days, now_ms())?;
        let store = self.store.clone();
        let found = blocking(move || -> Result<Vec<IdleGrant>, Status> {
            let grants = store.grants()?;
            let look = idle.window();
            let cuts = crate::rollup::Cuts::of_grants(vec![look.from_ms, look.until_ms], &grants);
            let windows = crate::rollup::metered(
                store.as_ref(),
                look.from_ms,
                look.until_ms,
                &cuts,
                &|_, _| true,
                &mut |_| {},
            )?;
            let events = store.events(look.from_ms, look.until_ms, Some("enforcement"), None)?;
            Ok(reconcile::idle_grants(
                grants
                    .iter()
                    .filter(|g| program.as_deref().is_none_or(|p| g.program.as_str() == p)),
                &windows,
                &events,
                idle,
            ))
        })
        .await?;
        Ok(Response::new(idle_to_wire(&IdleReport {
            threshold_pct: idle.threshold_pct,
            days: idle.days,
            as_of_ms: idle.as_of_ms,
            grants: found,
        })))
    }

    async fn alarms(
        &self,
        request: Request<v1::AlarmsRequest>,
    ) -> Result<Response<v1::AlarmsReply>, Status> {
        let alarms = self.alarm_list(request.into_inner()).await?;
        bounded(v1::AlarmsReply { alarms }, "StreamAlarms")
    }

    async fn violations(
        &self,
        request: Request<v1::ViolationsRequest>,
    ) -> Result<Response<v1::EventsReply>, Status> {
        let events = self.violation_list(request.into_inner()).await?;
        bounded(v1::EventsReply { events }, "StreamViolations")
    }

    async fn events(
        &self,
        request: Request<v1::EventsRequest>,
    ) -> Result<Response<v1::EventsReply>, Status> {
        let events = self.event_list(request.into_inner()).await?;
        bounded(v1::EventsReply { events }, "StreamEvents")
    }

    async fn grants(
        &self,
        request: Request<v1::GrantsRequest>,
    ) -> Result<Response<v1::GrantsReply>, Status> {
        let grants = self.grant_list(request.into_inner()).await?;
        bounded(v1::GrantsReply { grants }, "StreamGrants")
    }

    async fn hosts(
        &self,
        _request: Request<v1::HostsRequest>,
    ) -> Result<Response<v1::HostsReply>, Status> {
        let hosts = self.host_list().await?;
        bounded(v1::HostsReply { hosts }, "StreamHosts")
    }

    type StreamReconcileStream = ItemStream<v1::ReconcileReply>;
    type StreamUsageStream = ItemStream<v1::UsageReport>;

    async fn stream_reconcile(
        &self,
        request: Request<v1::ReconcileRequest>,
    ) -> Result<Response<Self::StreamReconcileStream>, Status> {
        let reply = self.reconcile_reply(request.into_inner()).await?;
        Ok(Response::new(stream_of(crate::parts::reconcile_parts(
            reply,
        ))))
    }

    async fn stream_usage(
        &self,
        request: Request<v1::UsageRequest>,
    ) -> Result<Response<Self::StreamUsageStream>, Status> {
        let reply = self.usage_report(request.into_inner()).await?;
        Ok(Response::new(stream_of(crate::parts::usage_parts(reply))))
    }

    type StreamJobsStream = ItemStream<v1::JobInfo>;

    async fn stream_jobs(
        &self,
        request: Request<v1::JobsRequest>,
    ) -> Result<Response<Self::StreamJobsStream>, Status> {
        let q = request.into_inner();
        let (from, until) = period_arg(&q.period)?;
        let grant = q.grant_id.trim().to_owned();
        let store = self.store.clone();
        let jobs = blocking(move || -> Result<Vec<v1::JobInfo>, Status> {
            store.retention()?.check_raw(from, "the jobs view")?;
            let bodies = store.window_bodies(from, until, None)?;
            Ok(
                crate::jobs::jobs(&bodies, (!grant.is_empty()).then_some(grant.as_str()))
                    .iter()
                    .map(crate::jobs::to_wire)
                    .collect(),
            )
        })
        .await?;
        Ok(Response::new(stream_of(jobs)))
    }

    type WatchStream = ItemStream<v1::WatchEvent>;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let filter = crate::watch::filter_from_wire(&request.into_inner())?;
        let mut sub = self.hub.subscribe(filter);
        // A few messages in flight; a reader slower than that holds this task, the hub's
        // channel overflows for it, and it is sent a fresh snapshot when it catches up.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    _ = tx.closed() => return,
                    f = sub.next() => f,
                };
                let Some(frame) = frame else {
                    return;
                };
                for event in crate::watch::frame_to_wire(&frame) {
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type StreamHostsStream = ItemStream<v1::HostInfo>;
    type StreamAlarmsStream = ItemStream<v1::Alarm>;
    type StreamEventsStream = ItemStream<v1::EventInfo>;
    type StreamViolationsStream = ItemStream<v1::EventInfo>;
    type StreamGrantsStream = ItemStream<v1::AuditedGrant>;

    async fn stream_hosts(
        &self,
        _request: Request<v1::HostsRequest>,
    ) -> Result<Response<Self::StreamHostsStream>, Status> {
        Ok(Response::new(stream_of(self.host_list().await?)))
    }

    async fn stream_alarms(
        &self,
        request: Request<v1::AlarmsRequest>,
    ) -> Result<Response<Self::StreamAlarmsStream>, Status> {
        Ok(Response::new(stream_of(
            self.alarm_list(request.into_inner()).await?,
        )))
    }

    async fn stream_events(
        &self,
        request: Request<v1::EventsRequest>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        Ok(Response::new(stream_of(
            self.event_list(request.into_inner()).await?,
        )))
    }

    async fn stream_violations(
        &self,
        request: Request<v1::ViolationsRequest>,
    ) -> Result<Response<Self::StreamViolationsStream>, Status> {
        Ok(Response::new(stream_of(
            self.violation_list(request.into_inner()).await?,
        )))
    }

    async fn stream_grants(
        &self,
        request: Request<v1::GrantsRequest>,
    ) -> Result<Response<Self::StreamGrantsStream>, Status> {
        Ok(Response::new(stream_of(
            self.grant_list(request.into_inner()).await?,
        )))
    }
}

/// The list RPCs' items, gathered once for their unary and streamed forms.
impl QueryService {
    /// The whole usage report of a request.
    async fn usage_report(&self, q: v1::UsageRequest) -> Result<v1::UsageReport, Status> {
        if q.until_unix_ms <= q.from_unix_ms {
            return Err(Status::invalid_argument(
                "until_unix_ms must be after from_unix_ms",
            ));
        }
        if q.until_unix_ms - q.from_unix_ms > MAX_PERIOD_MS {
            return Err(Status::invalid_argument("period longer than 400 days"));
        }
        let store = self.store.clone();
        let (from, until) = (q.from_unix_ms, q.until_unix_ms);
        let usage = tokio::task::spawn_blocking(move || {
            store.retention()?.check_raw(from, "the usage report")?;
            store.usage(from, until)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        let keep_host = |h: &str| q.host_id.is_empty() || q.host_id == h;
        let keep_gpu = |g: &str| q.gpu_uuid.is_empty() || q.gpu_uuid == g;
        Ok(v1::UsageReport {
            from_unix_ms: from,
            until_unix_ms: until,
            cards: usage
                .cards
                .into_iter()
                .filter(|c| keep_host(&c.host_id) && keep_gpu(&c.gpu_uuid))
                .map(|c| v1::CardUsage {
                    agent_id: c.agent_id,
                    host_id: c.host_id,
                    csp: c.csp,
                    gpu_uuid: c.gpu_uuid,
                    gpu_name: c.gpu_name,
                    windows: c.windows,
                    metered_ms: c.metered_ms,
                    occupied_ms: c.occupied_ms,
                    active_ms: c.active_ms,
                    foreign_ms: c.foreign_ms,
                    unavailable_ms: c.unavailable_ms,
                    util_avg_pct: c.util_avg_pct,
                    energy_mj: c.energy_mj,
                    memory_used_max_bytes: c.memory_used_max_bytes,
                })
                .collect(),
            tenants: usage
                .tenants
                .into_iter()
                .filter(|t| keep_host(&t.host_id) && keep_gpu(&t.gpu_uuid))
                .map(|t| v1::TenantUsage {
                    host_id: t.host_id,
                    gpu_uuid: t.gpu_uuid,
                    principal: t.principal,
                    occupied_ms: t.occupied_ms,
                    active_ms: t.active_ms,
                    memory_max_bytes: t.memory_max_bytes,
                    matches_grant: t.matches_grant,
                    grant_id: t.grant_id,
                })
                .collect(),
        })
    }

    /// The whole reconciliation reply of a request.
    async fn reconcile_reply(&self, q: v1::ReconcileRequest) -> Result<v1::ReconcileReply, Status> {
        let store = self.store.clone();
        blocking(move || reconcile_reply(store.as_ref(), &q, true)).await
    }

    async fn alarm_list(&self, q: v1::AlarmsRequest) -> Result<Vec<v1::Alarm>, Status> {
        let agent = q.agent_id;
        let store = self.store.clone();
        let alarms = tokio::task::spawn_blocking(move || {
            store.alarms((!agent.is_empty()).then_some(agent.as_str()))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(alarms
            .into_iter()
            .map(|a| v1::Alarm {
                agent_id: a.agent_id,
                at_unix_ms: a.at_ms,
                kind: a.kind,
                seq: a.seq,
                detail: a.detail,
            })
            .collect())
    }

    async fn violation_list(&self, q: v1::ViolationsRequest) -> Result<Vec<v1::EventInfo>, Status> {
        let (from, until) = period_arg(&q.period)?;
        let grant_id = q.grant_id.trim().to_owned();
        let store = self.store.clone();
        let events = blocking(move || -> Result<Vec<StoredEvent>, Status> {
            let events = store.events(from, until, Some("enforcement"), None)?;
            if grant_id.is_empty() {
                return Ok(events);
            }
            let grant = store
                .grant(&grant_id)?
                .ok_or_else(|| Status::not_found(format!("grant {grant_id} not found")))?
                .grant;
            Ok(events
                .into_iter()
                .filter(|e| held_at(&grant, &e.event.gpu_uuid, e.event.at_ms))
                .collect())
        })
        .await?;
        Ok(events.into_iter().map(event_to_wire).collect())
    }

    async fn event_list(&self, q: v1::EventsRequest) -> Result<Vec<v1::EventInfo>, Status> {
        let (from, until) = period_arg(&q.period)?;
        let agent = q.agent_id.trim().to_owned();
        let store = self.store.clone();
        let events = blocking(move || {
            let kind = q.kind.trim();
            let gpu = q.gpu_uuid.trim();
            store.events(
                from,
                until,
                (!kind.is_empty()).then_some(kind),
                (!gpu.is_empty()).then_some(gpu),
            )
        })
        .await?;
        Ok(events
            .into_iter()
            .filter(|e| agent.is_empty() || e.agent_id == agent)
            .map(event_to_wire)
            .collect())
    }

    async fn grant_list(&self, q: v1::GrantsRequest) -> Result<Vec<v1::AuditedGrant>, Status> {
        let program = program_arg(&q.program)?;
        let only = q.grant_id.trim().to_owned();
        let store = self.store.clone();
        let grants = blocking(move || -> Result<Vec<v1::AuditedGrant>, Status> {
            let mut out = Vec::new();
            for g in store.grants()? {
                if program.as_deref().is_some_and(|p| g.program.as_str() != p)
                    || (!only.is_empty() && g.grant_id != only)
                {
                    continue;
                }
                let history = store
                    .grant(&g.grant_id)?
                    .map(|r| r.history)
                    .unwrap_or_default();
                out.push(v1::AuditedGrant {
                    grant: Some(v1::Grant::from(g)),
                    history: history
                        .into_iter()
                        .map(|c| v1::GrantChange {
                            at_unix_ms: c.at_ms,
                            actor: c.actor,
                            action: c.action,
                            detail: c.detail,
                        })
                        .collect(),
                });
            }
            if !only.is_empty() && out.is_empty() {
                return Err(Status::not_found(format!("grant {only} not found")));
            }
            Ok(out)
        })
        .await?;
        Ok(grants)
    }

    async fn host_list(&self) -> Result<Vec<v1::HostInfo>, Status> {
        let store = self.store.clone();
        let hosts = tokio::task::spawn_blocking(move || store.hosts())
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let heads = self
            .agent_heads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(hosts
            .into_iter()
            .map(|h| v1::HostInfo {
                agent_head_seq: heads.get(&h.agent_id).copied(),
                last_record_unix_ms: h.last_record_ms,
                agent_id: h.agent_id,
                host_id: h.host_id,
                csp: h.csp,
                hostname: h.hostname,
                agent_version: h.agent_version,
                durable_seq: h.durable_seq,
                last_seen_unix_ms: h.last_seen_ms,
                gpus: h
                    .gpus
                    .into_iter()
                    .map(|g| v1::GpuInfo {
                        uuid: g.uuid,
                        index: g.index,
                        name: g.name,
                        serial: g.serial,
                        pci_bus_id: g.pci_bus_id,
                        memory_total_bytes: g.memory_total_bytes,
                        mig_mode: g.mig_mode,
                        parent_uuid: g
                            .mig
                            .as_ref()
                            .map(|m| m.parent_uuid.clone())
                            .unwrap_or_default(),
                        mig_profile: g
                            .mig
                            .as_ref()
                            .map(|m| m.profile.clone())
                            .unwrap_or_default(),
                        mig_slices: g.mig.as_ref().and_then(|m| m.slices),
                        parent_slices: g.mig.as_ref().and_then(|m| m.parent_slices),
                    })
                    .collect(),
            })
            .collect())
    }
}

/// The largest unary list reply sent: the usual client limit (tonic's default decoding
/// limit is 4 MiB). A longer list is refused with the name of its streamed form, never cut.
pub const MAX_UNARY_LIST_BYTES: usize = 4 << 20;

/// A list reply, unless it is too large for a client to take in one message.
pub fn bounded<M: prost::Message>(reply: M, streamed: &str) -> Result<Response<M>, Status> {
    let len = reply.encoded_len();
    if len > MAX_UNARY_LIST_BYTES {
        return Err(Status::resource_exhausted(format!(
            "the reply would be {len} bytes, more than {MAX_UNARY_LIST_BYTES}; use {streamed}, which sends one item per message"
        )));
    }
    Ok(Response::new(reply))
}

/// A streamed list: one item per message.
pub type ItemStream<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Streams items already gathered, one per message.
pub fn stream_of<T: Send + 'static>(items: Vec<T>) -> ItemStream<T> {
    Box::pin(futures::stream::iter(items.into_iter().map(Ok)))
}

/// The wire form of a verification report.
pub fn report_to_wire(r: &VerifyReport) -> v1::VerifyReply {
    v1::VerifyReply {
        records: r.records,
        ok: r.ok,
        agents: r
            .agents
            .iter()
            .map(|a| v1::AgentVerification {
                agent_id: a.agent_id.clone(),
                records: a.records,
                first_seq: a.first_seq,
                last_seq: a.last_seq,
                checkpoints: a.checkpoints,
                findings: a.findings.iter().map(finding_to_wire).collect(),
                flagged: a
                    .flagged
                    .iter()
                    .map(|f| v1::VerifyFinding {
                        kind: f.flag.clone(),
                        seq: f.seq,
                        from_seq: 0,
                        to_seq: 0,
                        detail: format!("record {}: {} window: {}", f.seq, f.flag, f.detail),
                    })
                    .collect(),
            })
            .collect(),
        head_findings: r
            .heads
            .iter()
            .map(|h| v1::HeadFinding {
                head_id: h.head_id,
                agent_id: h.agent_id.clone(),
                seq: h.seq,
                kind: h.kind.into(),
                detail: h.detail.clone(),
            })
            .collect(),
    }
}

fn finding_to_wire(f: &Finding) -> v1::VerifyFinding {
    let (kind, seq, from_seq, to_seq) = match f {
        Finding::Gap { from, to } => ("gap", 0, *from, *to),
        Finding::Rewritten { seq } => ("rewritten", *seq, 0, 0),
        Finding::Unreadable { seq, .. } => ("unreadable", *seq, 0, 0),
        Finding::RewrittenOrReplaced { seq } => ("rewritten_or_replaced", *seq, 0, 0),
        Finding::BrokenLink { seq } => ("broken_link", *seq, 0, 0),
        Finding::CheckpointMismatch { seq } => ("checkpoint_mismatch", *seq, 0, 0),
        Finding::BadSignature { seq } => ("bad_signature", *seq, 0, 0),
        Finding::Truncated {
            last_stored,
            checkpoint_seq,
        } => ("truncated", *checkpoint_seq, *last_stored, *checkpoint_seq),
        Finding::Unsigned { from, to } => ("unsigned", 0, *from, *to),
        Finding::BadKey => ("bad_key", 0, 0, 0),
        Finding::DerivedMismatch { seq, .. } => ("derived_mismatch", *seq, 0, 0),
        Finding::DerivedMissing { seq, .. } => ("derived_missing", *seq, 0, 0),
        Finding::DerivedOrphan { seq, .. } => ("derived_orphan", *seq, 0, 0),
        Finding::OverlapCounted { seq, .. } => ("overlap_counted", *seq, 0, 0),
        Finding::OverlapUnfounded { seq } => ("overlap_unfounded", *seq, 0, 0),
        Finding::RollupMismatch { .. } => ("rollup_mismatch", 0, 0, 0),
    };
    v1::VerifyFinding {
        kind: kind.into(),
        seq,
        from_seq,
        to_seq,
        detail: f.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Arguments and conversions of the reconciliation RPCs

/// Computes a reconciliation as of a signed head: only records the head covers count
/// (windows and events of an agent up to its leaf's seq), and idle grants are judged up to the
/// head's time, so recomputing as of the same head gives the same report while the ledger
/// still extends it. `as_of_head` 0 signs a head over the ledger as it is now (the latest is
/// reused when nothing changed).
pub fn compute_report(
    store: &dyn Store,
    q: &v1::ReconcileRequest,
) -> Result<
    (
        Reconciliation,
        Vec<crate::render::CardDay>,
        crate::heads::SignedHead,
    ),
    Status,
> {
    compute_report_with(store, q, true)
}

/// The reconciliation and per-day figures of `inputs` (whose `windows` and `events` are
/// ignored: they are read here) as of `as_of_ms`, counting only records `in_head` accepts;
/// `rollups` false reads every window (the baseline the rollups must equal); `with_days`
/// false leaves the per-day figures empty. Every card counts as one GPU here; the caller
/// applies the inventory's GPU-equivalents. The windows are
/// read once: the per-day figures are summed as they are read, and dropped before the reply
/// is built.
pub fn figures_of(
    store: &dyn Store,
    inputs: &Inputs<'_>,
    as_of_ms: i64,
    in_head: &dyn Fn(&str, u64) -> bool,
    rollups: bool,
    with_days: bool,
) -> Result<(Reconciliation, Vec<crate::render::CardDay>), StoreError> {
    let (from, until) = (inputs.from_ms, inputs.until_ms);
    let look = inputs.idle.window();
    let (span_from, span_until) = (from.min(look.from_ms), until.max(look.until_ms));
    // Every boundary the figures are cut at; rollups stand in for whole buckets between them.
    let elapsed = reconcile::elapsed_range(from, until, as_of_ms);
    let cuts = crate::rollup::Cuts::of_grants(
        vec![from, until, elapsed.until_ms, look.from_ms, look.until_ms],
        inputs.grants,
    );
    // The heatmaps' per-day figures are summed as rows are read, before the planner merges
    // consecutive days: the engine's grant cards are known before it runs.
    let report_cards =
        reconcile::report_grant_cards(inputs.grants, inputs.program, inputs.grant_id, elapsed);
    let mut per_day = crate::render::DayFigures::new(
        from,
        until,
        report_cards
            .iter()
            .filter(|_| with_days)
            .flat_map(|(g, cards)| {
                cards.iter().map(|(host, gpu, ivs)| {
                    (
                        g.grant_id.as_str(),
                        host.as_str(),
                        gpu.as_str(),
                        ivs.as_slice(),
                    )
                })
            }),
    );
    drop(report_cards);
    let windows = if rollups {
        crate::rollup::metered(store, span_from, span_until, &cuts, in_head, &mut |c| {
            per_day.add_counted(c)
        })?
    } else {
        let mut ws = store.windows(span_from, span_until, None)?;
        ws.retain(|w| in_head(&w.agent_id, w.seq));
        for w in &ws {
            per_day.add(&w.window);
        }
        ws
    };
    let mut events = store.events(span_from, span_until, Some("enforcement"), None)?;
    events.retain(|e| in_head(&e.agent_id, e.seq));
    let report = reconcile::reconcile_as_of(
        &Inputs {
            windows: &windows,
            events: &events,
            ..*inputs
        },
        as_of_ms,
    );
    drop(windows);
    Ok((report, per_day.finish()))
}

/// [`compute_report`], reading rollups where they stand in exactly (`rollups`), or every
/// window of the period (the benchmark's baseline: the same figures, the old way).
pub fn compute_report_with(
    store: &dyn Store,
    q: &v1::ReconcileRequest,
    rollups: bool,
) -> Result<
    (
        Reconciliation,
        Vec<crate::render::CardDay>,
        crate::heads::SignedHead,
    ),
    Status,
> {
    let (from, until) = period_arg(&q.period)?;
    let program = program_arg(&q.program)?;
    let grant_id = (!q.grant_id.trim().is_empty()).then(|| q.grant_id.trim().to_owned());
    let head = if q.as_of_head == 0 {
        store.sign_head(now_ms())?
    } else {
        store
            .head(q.as_of_head)?
            .ok_or_else(|| Status::not_found(format!("head {} not found", q.as_of_head)))?
    };
    // A period still in progress is reconciled up to the head's time (or the reader's as-of),
    // so the same head and as-of give the same report however the ledger grows.
    let as_of = q.as_of_unix_ms.unwrap_or(head.at_ms);
    let idle = idle_arg(q.idle_threshold_pct, q.idle_days, until.min(as_of))?;
    let period = q.period.trim().to_owned();
    let grants = store.grants()?;
    if let Some(id) = &grant_id {
        if !grants.iter().any(|g| g.grant_id == *id) {
            return Err(Status::not_found(format!("grant {id} not found")));
        }
    }
    let covered: std::collections::HashMap<&str, u64> = head
        .leaves
        .iter()
        .map(|l| (l.agent_id.as_str(), l.seq))
        .collect();
    let in_head = |agent: &str, seq: u64| covered.get(agent).is_some_and(|&s| seq <= s);
    let invoices = store.invoices()?;
    let (mut report, days) = figures_of(
        store,
        &Inputs {
            period: &period,
            from_ms: from,
            until_ms: until,
            program: program.as_deref(),
            grant_id: grant_id.as_deref(),
            grants: &grants,
            windows: &[],
            events: &[],
            invoices: &invoices,
            idle,
        },
        as_of,
        &in_head,
        rollups,
        !q.without_days,
    )?;
    report.card_alarms = crate::identity::report_alarms(&store.alarms(None)?, &report, head.at_ms);
    // The card inventory, read once for the GPU-equivalents and the fleet table.
    let hosts = store.hosts()?;
    let mig: std::collections::HashMap<&str, f64> = hosts
        .iter()
        .flat_map(|h| &h.gpus)
        .filter_map(|g| Some((g.uuid.as_str(), g.mig.as_ref()?.gpu_equivalents()?)))
        .collect();
    report.gpu_equivalents =
        reconcile::equivalents(&report, &|gpu| mig.get(gpu).copied().unwrap_or(1.0));
    if grant_id.is_none() {
        report.fleet = fleet_of(store, &hosts, &report, &head, &in_head)?;
    }
    Ok((report, days, head))
}

/// How far back from the end of a report's elapsed period a card's latest window is looked
/// for: a card with no window in it is not healthy (not reporting).
pub const HEALTH_LOOKBACK_MS: i64 = 15 * 60_000;

/// The report's fleet table ([`crate::registry::fleet`]): the registry as held now, the cards
/// of the agents the head covers as their Hellos listed them, each card's latest window in
/// the last [`HEALTH_LOOKBACK_MS`] of the elapsed period, and the report's granted cards.
fn fleet_of(
    store: &dyn Store,
    hosts: &[crate::store::HostRow],
    report: &Reconciliation,
    head: &crate::heads::SignedHead,
    in_head: &dyn Fn(&str, u64) -> bool,
) -> Result<Vec<crate::registry::FleetRow>, StoreError> {
    use crate::registry::{CardState, GrantedCard, KnownCard};
    let providers = store.providers()?;
    if providers.is_empty() {
        return Ok(vec![]);
    }
    let registered = store.registered_hosts()?;
    let covered: std::collections::HashSet<&str> =
        head.leaves.iter().map(|l| l.agent_id.as_str()).collect();
    let known: Vec<KnownCard> = hosts
        .iter()
        .filter(|h| covered.contains(h.agent_id.as_str()))
        .flat_map(|h| {
            h.gpus.iter().map(move |g| KnownCard {
                host_id: h.host_id.clone(),
                csp: h.csp.clone(),
                gpu_uuid: g.uuid.clone(),
            })
        })
        .collect();
    let end = report.elapsed_until_ms;
    let mut latest: std::collections::HashMap<String, (i64, CardState)> = Default::default();
    // Retention keeps every card's last hour of each Korean day, so a period ending at a day's
    // end still finds each card's latest window.
    if end > report.from_ms && crate::rollup::Level::Day.bucket(end) != end {
        store.retention()?.check_raw(
            end - HEALTH_LOOKBACK_MS,
            "the fleet's card health at a period's end",
        )?;
    }
    if end > report.from_ms {
        for w in store.windows((end - HEALTH_LOOKBACK_MS).max(report.from_ms), end, None)? {
            if !in_head(&w.agent_id, w.seq) {
                continue;
            }
            let state = CardState {
                healthy: w.window.health == "ok" && w.window.unavailable_ms == 0,
            };
            let e = latest
                .entry(w.window.gpu_uuid.clone())
                .or_insert((w.window.start_ms, state));
            if w.window.start_ms >= e.0 {
                *e = (w.window.start_ms, state);
            }
        }
    }
    let health = latest.into_iter().map(|(k, (_, s))| (k, s)).collect();
    let granted: Vec<GrantedCard> = report
        .grants
        .iter()
        .flat_map(|g| {
            g.cards.iter().map(move |c| GrantedCard {
                csp: g.csp.clone(),
                program: g.program.clone(),
                host_id: c.host_id.clone(),
                gpu_uuid: c.gpu_uuid.clone(),
                delivered: c.figures.delivered_ms > 0,
            })
        })
        .collect();
    Ok(crate::registry::fleet(
        &providers,
        &registered,
        &known,
        &health,
        &granted,
        report.program.as_deref(),
    ))
}

/// The reconciliation reply of `q` as the Query service sends it (before it is cut into
/// parts); `rollups` false reads every window (the benchmark's baseline).
pub fn reconcile_reply(
    store: &dyn Store,
    q: &v1::ReconcileRequest,
    rollups: bool,
) -> Result<v1::ReconcileReply, Status> {
    let (report, days, head) = compute_report_with(store, q, rollups)?;
    let mut reply = reconciliation_to_wire(&report);
    reply.days = days
        .into_iter()
        .map(|d| v1::CardDay {
            grant_id: d.grant_id,
            host_id: d.host_id,
            gpu_uuid: d.gpu_uuid,
            day: d.day,
            allocated_ms: d.allocated_ms,
            delivered_ms: d.delivered_ms,
            active_ms: d.active_ms,
        })
        .collect();
    reply.head = Some(v1::ReportHead {
        id: head.id,
        at_unix_ms: head.at_ms,
        root: head.root,
    });
    Ok(reply)
}

/// The provenance of a report rendered as `content` from query `q` as of `head`.
pub fn provenance_of(
    q: &v1::ReconcileRequest,
    head: &crate::heads::SignedHead,
    format: &str,
    lang: &str,
    content: &str,
) -> crate::provenance::Provenance {
    crate::provenance::Provenance {
        head_id: head.id,
        head_at_ms: head.at_ms,
        head_root: hex::encode(&head.root),
        period: q.period.trim().to_owned(),
        program: q.program.trim().to_owned(),
        grant_id: q.grant_id.trim().to_owned(),
        idle_threshold_pct: q.idle_threshold_pct.unwrap_or(DEFAULT_IDLE_THRESHOLD_PCT),
        idle_days: q.idle_days.unwrap_or(DEFAULT_IDLE_DAYS),
        format: format.to_owned(),
        lang: lang.to_owned(),
        content_sha256: crate::provenance::content_hash(content),
        as_of_ms: q.as_of_unix_ms,
        signature: String::new(),
        collector_key: String::new(),
    }
}

/// Idle-grant defaults: utilization under 10 % over the last 14 days (the ministry's reclaim
/// rule of thumb; both can be asked for).
pub const DEFAULT_IDLE_THRESHOLD_PCT: f64 = 10.0;
pub const DEFAULT_IDLE_DAYS: u32 = 14;

/// Runs store work off the async runtime.
async fn blocking<T: Send + 'static, E: Into<Status> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Into::into)
}

fn period_arg(period: &str) -> Result<(i64, i64), Status> {
    let (from, until) =
        parse_period(period).map_err(|e| Status::invalid_argument(format!("period: {e}")))?;
    if until - from > MAX_PERIOD_MS {
        return Err(Status::invalid_argument("period: longer than 400 days"));
    }
    Ok((from, until))
}

fn program_arg(program: &str) -> Result<Option<String>, Status> {
    let p = program.trim();
    if p.is_empty() {
        return Ok(None);
    }
    p.parse::<Program>()
        .map(|p| Some(p.as_str().to_owned()))
        .map_err(|e| Status::invalid_argument(format!("program: {e}")))
}

fn idle_arg(
    threshold: Option<f64>,
    days: Option<u32>,
    as_of_ms: i64,
) -> Result<IdleSettings, Status> {
    let threshold_pct = threshold.unwrap_or(DEFAULT_IDLE_THRESHOLD_PCT);
    if !(0.0..=100.0).contains(&threshold_pct) {
        return Err(Status::invalid_argument(
            "idle threshold_pct: must be between 0 and 100",
        ));
    }
    let days = days.unwrap_or(DEFAULT_IDLE_DAYS);
    if !(1..=366).contains(&days) {
        return Err(Status::invalid_argument("idle days: must be 1 to 366"));
    }
    Ok(IdleSettings {
        threshold_pct,
        days,
        as_of_ms,
    })
}

fn now_ms() -> i64 {
    crate::ingest::now_ms()
}

/// Whether `grant` held card `gpu` at instant `at`.
pub(crate) fn held_at(grant: &Grant, gpu: &str, at: i64) -> bool {
    grant.cards.iter().any(|c| {
        let (from, until) = grant.card_interval(c);
        c.gpu_uuid == gpu && at >= from && at < until
    })
}

fn event_to_wire(e: StoredEvent) -> v1::EventInfo {
    v1::EventInfo {
        agent_id: e.agent_id,
        host_id: e.host_id,
        csp: e.csp,
        seq: e.seq,
        gpu_uuid: e.event.gpu_uuid,
        at_unix_ms: e.event.at_ms,
        kind: e.event.kind.into(),
        code: e.event.code,
        detail: e.event.detail,
        pid: e.event.pid,
        principal: e.event.principal,
        grant_id: e.event.grant_id,
        mode: e.event.mode,
        action: e.event.action,
        result: e.event.result,
    }
}

fn timeline_window(m: MeteredWindow) -> v1::TimelineWindow {
    let w = m.window;
    v1::TimelineWindow {
        principals: w
            .principals
            .into_iter()
            .map(|p| v1::TenantUsage {
                host_id: m.host_id.clone(),
                gpu_uuid: w.gpu_uuid.clone(),
                principal: p.principal,
                occupied_ms: p.occupied_ms,
                active_ms: p.active_ms,
                memory_max_bytes: p.memory_max_bytes,
                matches_grant: p.matches_grant,
                grant_id: w.grant_id.clone(),
            })
            .collect(),
        agent_id: m.agent_id,
        host_id: m.host_id,
        seq: m.seq,
        start_unix_ms: w.start_ms,
        end_unix_ms: w.end_ms,
        sample_interval_ms: w.interval_ms,
        expected_samples: w.expected_samples,
        good_samples: w.good_samples,
        util_avg_pct: w.util_avg_pct,
        unavailable_ms: w.unavailable_ms,
        health: w.health.into(),
        assignment_status: w.assignment_status.into(),
        applied_grant_id: w.grant_id,
        occupied_ms: w.occupied_ms,
        grantee_occupied_ms: w.grantee_occupied_ms,
        active_ms: w.active_ms,
        foreign_ms: w.foreign_ms,
        energy_mj: w.energy_mj,
        memory_used_max_bytes: w.memory_used_max_bytes,
        energy_estimated: w.energy_estimated,
        unattributed_ms: w.unattributed_ms,
        energy_estimated_mj: w.energy_estimated_mj,
    }
}

fn span_to_wire(i: Interval) -> v1::TimeSpan {
    v1::TimeSpan {
        from_unix_ms: i.from_ms,
        until_unix_ms: i.until_ms,
    }
}

fn span_from_wire(s: Option<&v1::TimeSpan>) -> Interval {
    s.map_or(
        Interval {
            from_ms: 0,
            until_ms: 0,
        },
        |s| Interval {
            from_ms: s.from_unix_ms,
            until_ms: s.until_unix_ms,
        },
    )
}

pub(crate) fn figures_to_wire(f: &Figures) -> v1::Figures {
    v1::Figures {
        allocated_ms: f.allocated_ms,
        unmetered_ms: f.unmetered_ms,
        unavailable_ms: f.unavailable_ms,
        delivered_ms: f.delivered_ms,
        occupied_ms: f.occupied_ms,
        active_ms: f.active_ms,
        idle_ms: f.idle_ms,
        foreign_ms: f.foreign_ms,
        energy_mj: f.energy_mj,
        violations: f.violations,
        unattributed_ms: f.unattributed_ms,
    }
}

fn figures_from_wire(f: Option<&v1::Figures>) -> Figures {
    let f = f.cloned().unwrap_or_default();
    Figures {
        allocated_ms: f.allocated_ms,
        unmetered_ms: f.unmetered_ms,
        unavailable_ms: f.unavailable_ms,
        delivered_ms: f.delivered_ms,
        occupied_ms: f.occupied_ms,
        active_ms: f.active_ms,
        idle_ms: f.idle_ms,
        foreign_ms: f.foreign_ms,
        energy_mj: f.energy_mj,
        violations: f.violations,
        unattributed_ms: f.unattributed_ms,
    }
}

fn idle_to_wire(r: &IdleReport) -> v1::IdleGrantsReply {
    v1::IdleGrantsReply {
        threshold_pct: r.threshold_pct,
        days: r.days,
        as_of_unix_ms: r.as_of_ms,
        grants: r
            .grants
            .iter()
            .map(|g| v1::IdleGrant {
                grant_id: g.grant_id.clone(),
                program: g.program.clone(),
                grantee: g.grantee.clone(),
                csp: g.csp.clone(),
                window: Some(span_to_wire(g.window)),
                allocated_ms: g.allocated_ms,
                delivered_ms: g.delivered_ms,
                active_ms: g.active_ms,
                reclaimable_cards: g
                    .reclaimable_cards
                    .iter()
                    .map(|c| v1::ReclaimableCard {
                        host_id: c.host_id.clone(),
                        gpu_uuid: c.gpu_uuid.clone(),
                        allocated_ms: c.allocated_ms,
                        active_ms: c.active_ms,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// `active / allocated × 100`, 0 with nothing allocated (an idle finding always has some).
fn pct(active: u64, allocated: u64) -> f64 {
    if allocated == 0 {
        0.0
    } else {
        active as f64 * 100.0 / allocated as f64
    }
}

/// An idle-grant reply as the report's types.
pub fn idle_from_wire(r: &v1::IdleGrantsReply) -> IdleReport {
    IdleReport {
        threshold_pct: r.threshold_pct,
        days: r.days,
        as_of_ms: r.as_of_unix_ms,
        grants: r
            .grants
            .iter()
            .map(|g| IdleGrant {
                grant_id: g.grant_id.clone(),
                program: g.program.clone(),
                grantee: g.grantee.clone(),
                csp: g.csp.clone(),
                window: span_from_wire(g.window.as_ref()),
                allocated_ms: g.allocated_ms,
                delivered_ms: g.delivered_ms,
                active_ms: g.active_ms,
                utilization_pct: pct(g.active_ms, g.allocated_ms),
                reclaimable_cards: g
                    .reclaimable_cards
                    .iter()
                    .map(|c| ReclaimableCard {
                        host_id: c.host_id.clone(),
                        gpu_uuid: c.gpu_uuid.clone(),
                        allocated_ms: c.allocated_ms,
                        active_ms: c.active_ms,
                        utilization_pct: pct(c.active_ms, c.allocated_ms),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The wire form of a reconciliation: exact integers only; see [`reconciliation_from_wire`].
pub fn reconciliation_to_wire(r: &Reconciliation) -> v1::ReconcileReply {
    v1::ReconcileReply {
        head: None,
        period: r.period.clone(),
        from_unix_ms: r.from_ms,
        until_unix_ms: r.until_ms,
        time_zone: r.time_zone.clone(),
        program: r.program.clone().unwrap_or_default(),
        grant_id: r.grant_id.clone().unwrap_or_default(),
        grants: r
            .grants
            .iter()
            .map(|g| v1::GrantReconciliation {
                grant_id: g.grant_id.clone(),
                program: g.program.clone(),
                grantee: g.grantee.clone(),
                principal: g.principal.clone(),
                csp: g.csp.clone(),
                valid_from_unix_ms: g.valid_from_ms,
                valid_until_unix_ms: g.valid_until_ms,
                revoked_at_unix_ms: g.revoked_at_ms,
                cards: g
                    .cards
                    .iter()
                    .map(|c| v1::CardReconciliation {
                        host_id: c.host_id.clone(),
                        gpu_uuid: c.gpu_uuid.clone(),
                        intervals: c.intervals.iter().copied().map(span_to_wire).collect(),
                        figures: Some(figures_to_wire(&c.figures)),
                    })
                    .collect(),
                figures: Some(figures_to_wire(&g.figures)),
            })
            .collect(),
        programs: r
            .programs
            .iter()
            .map(|p| v1::ProgramTotal {
                program: p.program.clone(),
                grants: p.grants,
                cards: p.cards,
                figures: Some(figures_to_wire(&p.figures)),
            })
            .collect(),
        csps: r
            .csps
            .iter()
            .map(|c| v1::CspTotal {
                csp: c.csp.clone(),
                grants: c.grants,
                cards: c.cards,
                figures: Some(figures_to_wire(&c.figures)),
                unassigned_use_ms: c.unassigned_use_ms,
                unassigned_violations: c.unassigned_violations,
            })
            .collect(),
        total: Some(figures_to_wire(&r.total)),
        unassigned: r
            .unassigned
            .iter()
            .map(|u| v1::UnassignedUse {
                csp: u.csp.clone(),
                host_id: u.host_id.clone(),
                cards: u
                    .cards
                    .iter()
                    .map(|c| v1::UnassignedCard {
                        gpu_uuid: c.gpu_uuid.clone(),
                        unassigned_use_ms: c.unassigned_use_ms,
                        violations: c.violations,
                    })
                    .collect(),
                unassigned_use_ms: u.unassigned_use_ms,
                violations: u.violations,
            })
            .collect(),
        idle: Some(idle_to_wire(&r.idle)),
        invoices: r
            .invoices
            .iter()
            .map(|i| v1::InvoiceComparison {
                csp: i.csp.clone(),
                grant_id: i.grant_id.clone(),
                periods: i.periods.clone(),
                billed_gpu_hours: i.billed_gpu_hours,
                delivered_ms: i.delivered_ms,
            })
            .collect(),
        invoice_csps: r
            .invoice_csps
            .iter()
            .map(|c| v1::InvoiceCspTotal {
                csp: c.csp.clone(),
                billed_gpu_hours: c.billed_gpu_hours,
                delivered_ms: c.delivered_ms,
            })
            .collect(),
        days: Vec::new(),
        as_of_unix_ms: r.as_of_ms,
        elapsed_until_unix_ms: r.elapsed_until_ms,
        gpu_equivalents: Some(equivalents_to_wire(&r.gpu_equivalents)),
        card_alarms: r
            .card_alarms
            .iter()
            .map(|a| v1::CardIdentityAlarm {
                gpu_uuid: a.gpu_uuid.clone(),
                host_id: a.host_id.clone(),
                grant_ids: a.grant_ids.clone(),
                kind: a.kind.clone(),
                agent_id: a.agent_id.clone(),
                at_unix_ms: a.at_ms,
                detail: a.detail.clone(),
            })
            .collect(),
        fleet: r
            .fleet
            .iter()
            .map(|f| v1::FleetRow {
                csp: f.csp.clone(),
                name_ko: f.name_ko.clone(),
                name_en: f.name_en.clone(),
                program: f.program.clone(),
                committed_cards: f.committed_cards,
                registered_hosts: f.registered_hosts,
                registered_cards: f.registered_cards,
                healthy_cards: f.healthy_cards,
                granted_cards: f.granted_cards,
                delivered_cards: f.delivered_cards,
            })
            .collect(),
    }
}

fn equivalents_to_wire(e: &reconcile::Equivalents) -> v1::GpuEquivalents {
    let one = |f: &reconcile::Equivalent| v1::Equivalent {
        gpus: f.gpus,
        allocated_gpu_hours: f.allocated_gpu_hours,
        delivered_gpu_hours: f.delivered_gpu_hours,
        active_gpu_hours: f.active_gpu_hours,
    };
    let keyed = |v: &[reconcile::KeyedEquivalent]| {
        v.iter()
            .map(|k| v1::KeyedEquivalent {
                key: k.key.clone(),
                figures: Some(one(&k.figures)),
            })
            .collect()
    };
    v1::GpuEquivalents {
        cards: e
            .cards
            .iter()
            .map(|c| v1::CardEquivalent {
                grant_id: c.grant_id.clone(),
                gpu_uuid: c.gpu_uuid.clone(),
                gpu_equivalents: c.gpu_equivalents,
            })
            .collect(),
        grants: keyed(&e.grants),
        programs: keyed(&e.programs),
        csps: keyed(&e.csps),
        total: Some(one(&e.total)),
    }
}

fn equivalents_from_wire(e: Option<&v1::GpuEquivalents>) -> reconcile::Equivalents {
    let Some(e) = e else {
        return reconcile::Equivalents::default();
    };
    let one = |f: Option<&v1::Equivalent>| {
        f.map_or_else(reconcile::Equivalent::default, |f| reconcile::Equivalent {
            gpus: f.gpus,
            allocated_gpu_hours: f.allocated_gpu_hours,
            delivered_gpu_hours: f.delivered_gpu_hours,
            active_gpu_hours: f.active_gpu_hours,
        })
    };
    let keyed = |v: &[v1::KeyedEquivalent]| {
        v.iter()
            .map(|k| reconcile::KeyedEquivalent {
                key: k.key.clone(),
                figures: one(k.figures.as_ref()),
            })
            .collect()
    };
    reconcile::Equivalents {
        cards: e
            .cards
            .iter()
            .map(|c| reconcile::CardEquivalent {
                grant_id: c.grant_id.clone(),
                gpu_uuid: c.gpu_uuid.clone(),
                gpu_equivalents: c.gpu_equivalents,
            })
            .collect(),
        grants: keyed(&e.grants),
        programs: keyed(&e.programs),
        csps: keyed(&e.csps),
        total: one(e.total.as_ref()),
    }
}

/// A reconciliation reply as the report's types, with the derived values (GPU-hours, kWh,
/// percentages, differences) computed here from the exact integers.
pub fn reconciliation_from_wire(r: &v1::ReconcileReply) -> Reconciliation {
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    // A reply without an elapsed end (an older collector) covers its whole period.
    let elapsed_until = if r.elapsed_until_unix_ms == 0 {
        r.until_unix_ms
    } else {
        r.elapsed_until_unix_ms
    };
    let as_of = if r.as_of_unix_ms == 0 {
        r.until_unix_ms
    } else {
        r.as_of_unix_ms
    };
    let total = figures_from_wire(r.total.as_ref());
    let unassigned_violations: u64 = r.unassigned.iter().map(|u| u.violations).sum();
    Reconciliation {
        period: r.period.clone(),
        from_ms: r.from_unix_ms,
        until_ms: r.until_unix_ms,
        as_of_ms: as_of,
        elapsed_until_ms: elapsed_until,
        not_elapsed: (elapsed_until < r.until_unix_ms).then_some(Interval {
            from_ms: elapsed_until,
            until_ms: r.until_unix_ms,
        }),
        time_zone: r.time_zone.clone(),
        program: opt(&r.program),
        grant_id: opt(&r.grant_id),
        grants: r
            .grants
            .iter()
            .map(|g| GrantRow {
                grant_id: g.grant_id.clone(),
                program: g.program.clone(),
                grantee: g.grantee.clone(),
                principal: g.principal.clone(),
                csp: g.csp.clone(),
                valid_from_ms: g.valid_from_unix_ms,
                valid_until_ms: g.valid_until_unix_ms,
                revoked_at_ms: g.revoked_at_unix_ms,
                cards: g
                    .cards
                    .iter()
                    .map(|c| CardRow {
                        host_id: c.host_id.clone(),
                        gpu_uuid: c.gpu_uuid.clone(),
                        intervals: c
                            .intervals
                            .iter()
                            .map(|s| span_from_wire(Some(s)))
                            .collect(),
                        figures: figures_from_wire(c.figures.as_ref()),
                    })
                    .collect(),
                figures: figures_from_wire(g.figures.as_ref()),
            })
            .collect(),
        programs: r
            .programs
            .iter()
            .map(|p| ProgramTotal {
                program: p.program.clone(),
                grants: p.grants,
                cards: p.cards,
                figures: figures_from_wire(p.figures.as_ref()),
            })
            .collect(),
        csps: r
            .csps
            .iter()
            .map(|c| CspTotal {
                csp: c.csp.clone(),
                grants: c.grants,
                cards: c.cards,
                figures: figures_from_wire(c.figures.as_ref()),
                unassigned_use_ms: c.unassigned_use_ms,
                unassigned_use_gpu_hours: gpu_hours(c.unassigned_use_ms),
                unassigned_violations: c.unassigned_violations,
            })
            .collect(),
        all_violations: total.violations + unassigned_violations,
        total,
        unassigned_violations,
        unassigned: r
            .unassigned
            .iter()
            .map(|u| UnassignedUse {
                csp: u.csp.clone(),
                host_id: u.host_id.clone(),
                cards: u
                    .cards
                    .iter()
                    .map(|c| UnassignedCard {
                        gpu_uuid: c.gpu_uuid.clone(),
                        unassigned_use_ms: c.unassigned_use_ms,
                        violations: c.violations,
                    })
                    .collect(),
                unassigned_use_ms: u.unassigned_use_ms,
                unassigned_use_gpu_hours: gpu_hours(u.unassigned_use_ms),
                violations: u.violations,
            })
            .collect(),
        idle: idle_from_wire(&r.idle.clone().unwrap_or_default()),
        invoices: r
            .invoices
            .iter()
            .map(|i| InvoiceRow {
                csp: i.csp.clone(),
                grant_id: i.grant_id.clone(),
                periods: i.periods.clone(),
                billed_gpu_hours: i.billed_gpu_hours,
                delivered_ms: i.delivered_ms,
                delivered_gpu_hours: gpu_hours(i.delivered_ms),
                difference_gpu_hours: i.billed_gpu_hours.unwrap_or(0.0) - gpu_hours(i.delivered_ms),
            })
            .collect(),
        invoice_csps: r
            .invoice_csps
            .iter()
            .map(|c| InvoiceCspTotal {
                csp: c.csp.clone(),
                billed_gpu_hours: c.billed_gpu_hours,
                delivered_ms: c.delivered_ms,
                delivered_gpu_hours: gpu_hours(c.delivered_ms),
                difference_gpu_hours: c.billed_gpu_hours - gpu_hours(c.delivered_ms),
            })
            .collect(),
        gpu_equivalents: equivalents_from_wire(r.gpu_equivalents.as_ref()),
        card_alarms: r
            .card_alarms
            .iter()
            .map(|a| crate::identity::CardAlarm {
                gpu_uuid: a.gpu_uuid.clone(),
                host_id: a.host_id.clone(),
                grant_ids: a.grant_ids.clone(),
                kind: a.kind.clone(),
                agent_id: a.agent_id.clone(),
                at_ms: a.at_unix_ms,
                detail: a.detail.clone(),
            })
            .collect(),
        fleet: r
            .fleet
            .iter()
            .map(|f| crate::registry::FleetRow {
                csp: f.csp.clone(),
                name_ko: f.name_ko.clone(),
                name_en: f.name_en.clone(),
                program: f.program.clone(),
                committed_cards: f.committed_cards,
                registered_hosts: f.registered_hosts,
                registered_cards: f.registered_cards,
                healthy_cards: f.healthy_cards,
                granted_cards: f.granted_cards,
                delivered_cards: f.delivered_cards,
            })
            .collect(),
    }
}

/// The report page's per-day figures, from a reply.
pub fn card_days_from_wire(r: &v1::ReconcileReply) -> Vec<crate::render::CardDay> {
    r.days
        .iter()
        .map(|d| crate::render::CardDay {
            grant_id: d.grant_id.clone(),
            host_id: d.host_id.clone(),
            gpu_uuid: d.gpu_uuid.clone(),
            day: d.day.clone(),
            allocated_ms: d.allocated_ms,
            delivered_ms: d.delivered_ms,
            active_ms: d.active_ms,
            utilization_pct: (d.delivered_ms > 0 && d.allocated_ms > 0)
                .then(|| d.active_ms as f64 * 100.0 / d.allocated_ms as f64),
        })
        .collect()
}
