//! Records: turns window summaries and events into encoded `RecordBody` bytes, and gives each
//! the next sequence number and chain link. The encoded bytes are final: they are spooled,
//! sent and stored as they are.

use gpumeter_proto::chain::{self, Hash};
use gpumeter_proto::v1;
use prost::Message;

use crate::assignments::Status;
use crate::clock::UnixMs;
use crate::spool::SpooledRecord;
use crate::window::{Health, WindowSummary};

pub fn status_to_wire(s: Status) -> v1::AssignmentStatus {
    match s {
        Status::Assigned => v1::AssignmentStatus::Assigned,
        Status::Unassigned => v1::AssignmentStatus::Unassigned,
        Status::Expired => v1::AssignmentStatus::Expired,
        Status::Revoked => v1::AssignmentStatus::Revoked,
    }
}

impl From<&WindowSummary> for v1::CardWindow {
    fn from(w: &WindowSummary) -> Self {
        v1::CardWindow {
            gpu_uuid: w.gpu_uuid.clone(),
            window_start_unix_ms: w.start_ms,
            window_end_unix_ms: w.end_ms,
            sample_interval_ms: w.interval_ms,
            expected_samples: w.expected_samples,
            good_samples: w.good_samples,
            util_avg_pct: w.util_avg_pct,
            util_max_pct: w.util_max_pct,
            mem_util_avg_pct: w.mem_util_avg_pct,
            memory_used_max_bytes: w.memory_used_max_bytes,
            memory_total_bytes: w.memory_total_bytes,
            energy_mj: w.energy_mj,
            energy_estimated: w.energy_estimated,
            power_avg_w: w.power_avg_w,
            temperature_max_c: w.temperature_max_c,
            sm_clock_max_mhz: w.sm_clock_max_mhz,
            mem_clock_max_mhz: w.mem_clock_max_mhz,
            throttle_reasons: w.throttle_reasons,
            ecc_corrected_total: w.ecc_corrected_total,
            ecc_uncorrected_total: w.ecc_uncorrected_total,
            health: match w.health {
                Health::Ok => v1::Health::Ok,
                Health::Degraded => v1::Health::Degraded,
                Health::Lost => v1::Health::Lost,
            } as i32,
            unavailable_ms: w.unavailable_ms,
            assignment: Some(v1::AppliedAssignment {
                status: status_to_wire(w.assignment.status) as i32,
                grant_id: w.assignment.grant_id.clone(),
                principal: w.assignment.principal.clone(),
                assignment_version: w.assignment.version,
            }),
            principals: w
                .principals
                .iter()
                .map(|p| {
                    let id = p.identity.as_ref();
                    v1::PrincipalUsage {
                        principal: p.principal.clone(),
                        uid: id.and_then(|i| i.id.uid),
                        gid: id.and_then(|i| i.id.gid),
                        cgroup: id.and_then(|i| i.id.cgroup.clone()).unwrap_or_default(),
                        slurm_job_id: id.and_then(|i| i.slurm_job_id.clone()).unwrap_or_default(),
                        k8s_pod_uid: id.and_then(|i| i.k8s_pod_uid.clone()).unwrap_or_default(),
                        container_id: id.and_then(|i| i.container_id.clone()).unwrap_or_default(),
                        occupied_ms: p.occupied_ms,
                        active_ms: p.active_ms,
                        memory_max_bytes: p.memory_max_bytes,
                        process_count: p.process_count,
                        matches_grant: p.matches_grant,
                        k8s_namespace: id.and_then(|i| i.k8s_namespace.clone()).unwrap_or_default(),
                        k8s_pod_name: id.and_then(|i| i.k8s_pod_name.clone()).unwrap_or_default(),
                        k8s_container_name: id
                            .and_then(|i| i.k8s_container_name.clone())
                            .unwrap_or_default(),
                    }
                })
                .collect(),
            active_ms: w.active_ms,
            occupied_ms: w.occupied_ms,
            foreign_ms: w.foreign_ms,
            grantee_occupied_ms: Some(w.grantee_occupied_ms),
            unattributed_ms: Some(w.unattributed_ms),
            energy_estimated_mj: w.energy_estimated_mj,
        }
    }
}

/// Encodes a body made at `created`.
pub fn encode_body(created: UnixMs, kind: v1::record_body::Kind) -> Vec<u8> {
    v1::RecordBody {
        created_unix_ms: created,
        kind: Some(kind),
    }
    .encode_to_vec()
}

pub fn window_body(created: UnixMs, w: &WindowSummary) -> Vec<u8> {
    encode_body(created, v1::record_body::Kind::CardWindow(w.into()))
}

pub fn event_body(created: UnixMs, e: v1::Event) -> Vec<u8> {
    encode_body(created, v1::record_body::Kind::Event(e))
}

/// An explicit statement that records for a span were not written.
pub fn gap_body(
    created: UnixMs,
    from: UnixMs,
    until: UnixMs,
    gpu_uuids: Vec<String>,
    records_not_written: u64,
    reason: &str,
) -> Vec<u8> {
    encode_body(
        created,
        v1::record_body::Kind::Gap(v1::Gap {
            from_unix_ms: from,
            until_unix_ms: until,
            gpu_uuids,
            reason: reason.to_string(),
            records_not_written,
        }),
    )
}

/// The first record of a new epoch: names the collector's last durable point, so the break in
/// the agent's own history is explained in the signed chain.
pub fn epoch_start_body(
    created: UnixMs,
    epoch: u64,
    previous_epoch: u64,
    last_acked_seq: u64,
    last_acked_hash: &Hash,
    reason: &str,
) -> Vec<u8> {
    encode_body(
        created,
        v1::record_body::Kind::EpochStart(v1::EpochStart {
            epoch,
            previous_epoch,
            last_acked_seq,
            last_acked_hash: last_acked_hash.to_vec(),
            reason: reason.to_string(),
        }),
    )
}

/// Records ready to send, closed by a checkpoint over the last one signed with `key`.
/// `None` for no records.
pub fn signed_batch(
    key: &ed25519_dalek::SigningKey,
    agent_id: &str,
    epoch: u64,
    records: Vec<SpooledRecord>,
) -> Option<v1::RecordBatch> {
    let last = records.last()?;
    let (last_seq, last_hash) = (last.seq, last.hash());
    let signature = chain::sign_checkpoint(key, agent_id, epoch, last_seq, &last_hash);
    Some(v1::RecordBatch {
        records: records
            .into_iter()
            .map(|r| v1::Record {
                seq: r.seq,
                prev_hash: r.prev_hash.to_vec(),
                body: r.body,
            })
            .collect(),
        checkpoint: Some(v1::Checkpoint {
            agent_id: agent_id.to_string(),
            epoch,
            seq: last_seq,
            chain_hash: last_hash.to_vec(),
            signature: signature.to_vec(),
        }),
    })
}

/// Hands out sequence numbers and chain links, continuing from a head (the spool's).
#[derive(Debug, Clone)]
pub struct Sequencer {
    seq: u64,
    head: Hash,
}

impl Sequencer {
    pub fn new(last_seq: u64, head: Hash) -> Self {
        Self {
            seq: last_seq,
            head,
        }
    }

    /// The next record for `body`.
    pub fn next(&mut self, body: Vec<u8>) -> SpooledRecord {
        let seq = self.seq + 1;
        let prev_hash = self.head;
        self.head = chain::record_hash(&prev_hash, seq, &body);
        self.seq = seq;
        SpooledRecord {
            seq,
            prev_hash,
            body,
        }
    }

    pub fn head(&self) -> (u64, Hash) {
        (self.seq, self.head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequencer_links_records() {
        let mut s = Sequencer::new(0, chain::GENESIS);
        let a = s.next(b"a".to_vec());
        let b = s.next(b"b".to_vec());
        assert_eq!((a.seq, b.seq), (1, 2));
        assert_eq!(a.prev_hash, chain::GENESIS);
        assert_eq!(b.prev_hash, a.hash());
        assert_eq!(s.head(), (2, b.hash()));
    }
}
