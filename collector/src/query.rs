//! The read-only `Query` service for auditors and the ministry.

use std::sync::Arc;

use gpumeter_proto::v1::{self, query_server::Query};
use tonic::{Request, Response, Status};

use crate::store::Store;
use crate::verify::{Finding, VerifyReport, verify, verify_agent};

#[derive(Clone)]
pub struct QueryService {
    pub store: Arc<dyn Store>,
}

/// Longest period one usage query may span (a little over a year).
const MAX_PERIOD_MS: i64 = 400 * 86_400_000;

#[tonic::async_trait]
impl Query for QueryService {
    async fn usage(
        &self,
        request: Request<v1::UsageRequest>,
    ) -> Result<Response<v1::UsageReport>, Status> {
        let q = request.into_inner();
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
        let usage = tokio::task::spawn_blocking(move || store.usage(from, until))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let keep_host = |h: &str| q.host_id.is_empty() || q.host_id == h;
        let keep_gpu = |g: &str| q.gpu_uuid.is_empty() || q.gpu_uuid == g;
        Ok(Response::new(v1::UsageReport {
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
        }))
    }

    async fn verify(
        &self,
        request: Request<v1::VerifyRequest>,
    ) -> Result<Response<v1::VerifyReply>, Status> {
        let agent = request.into_inner().agent_id;
        let store = self.store.clone();
        let report = tokio::task::spawn_blocking(move || -> Result<VerifyReport, Status> {
            let ledger = store.ledger()?;
            if agent.is_empty() {
                return Ok(verify(ledger.as_ref())?);
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
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(report_to_wire(&report)))
    }

    async fn hosts(
        &self,
        _request: Request<v1::HostsRequest>,
    ) -> Result<Response<v1::HostsReply>, Status> {
        let store = self.store.clone();
        let hosts = tokio::task::spawn_blocking(move || store.hosts())
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(v1::HostsReply {
            hosts: hosts
                .into_iter()
                .map(|h| v1::HostInfo {
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
                        })
                        .collect(),
                })
                .collect(),
        }))
    }
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
            })
            .collect(),
    }
}

fn finding_to_wire(f: &Finding) -> v1::VerifyFinding {
    let (kind, seq, from_seq, to_seq) = match f {
        Finding::Gap { from, to } => ("gap", 0, *from, *to),
        Finding::Rewritten { seq } => ("rewritten", *seq, 0, 0),
        Finding::BrokenLink { seq } => ("broken_link", *seq, 0, 0),
        Finding::CheckpointMismatch { seq } => ("checkpoint_mismatch", *seq, 0, 0),
        Finding::BadSignature { seq } => ("bad_signature", *seq, 0, 0),
        Finding::Truncated {
            last_stored,
            checkpoint_seq,
        } => ("truncated", *checkpoint_seq, *last_stored, *checkpoint_seq),
        Finding::Unsigned { from, to } => ("unsigned", 0, *from, *to),
        Finding::BadKey => ("bad_key", 0, 0, 0),
    };
    v1::VerifyFinding {
        kind: kind.into(),
        seq,
        from_seq,
        to_seq,
        detail: f.to_string(),
    }
}
