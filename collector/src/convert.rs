//! The gRPC edge: generated `gpumeter.v1` types become domain rows here, and domain errors
//! become `tonic::Status` in one place.

use gpumeter_proto::v1;
use prost::Message;

use crate::grants::AmendError;
use crate::store::{
    AgentHello, EventRow, GpuRow, PrincipalRow, RecordContent, StoreError, WindowRow,
};

impl From<StoreError> for tonic::Status {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::KeyMismatch { .. } => tonic::Status::permission_denied(e.to_string()),
            StoreError::UnknownAgent { .. } => tonic::Status::not_found(e.to_string()),
            StoreError::Conflict(_) | StoreError::Retained(_) => {
                tonic::Status::failed_precondition(e.to_string())
            }
            StoreError::NotFound { .. } => tonic::Status::not_found(e.to_string()),
            StoreError::Amend(AmendError::Invalid { .. }) => {
                tonic::Status::invalid_argument(e.to_string())
            }
            StoreError::Amend(AmendError::Conflict { .. }) => {
                tonic::Status::failed_precondition(e.to_string())
            }
            StoreError::HostMismatch { .. } => tonic::Status::permission_denied(e.to_string()),
            StoreError::BatchRefused { .. } => tonic::Status::invalid_argument(e.to_string()),
            StoreError::Open { .. }
            | StoreError::Db(_)
            | StoreError::SchemaTooNew { .. }
            | StoreError::Closed => tonic::Status::unavailable(e.to_string()),
        }
    }
}

impl From<crate::auth::AuthError> for tonic::Status {
    fn from(e: crate::auth::AuthError) -> Self {
        use crate::auth::AuthError as A;
        if let A::Store(s) = e {
            return s.into();
        }
        match &e {
            A::NoToken | A::UnknownToken | A::RevokedToken { .. } | A::NoCertificate => {
                tonic::Status::unauthenticated(e.to_string())
            }
            A::Forbidden { .. } | A::IdentityMismatch { .. } | A::UnregisteredAgent { .. } => {
                tonic::Status::permission_denied(e.to_string())
            }
            A::BadCertificate(_) => tonic::Status::unauthenticated(e.to_string()),
            A::Random(_) | A::Store(_) => tonic::Status::internal(e.to_string()),
        }
    }
}

impl From<crate::grants::Grant> for v1::Grant {
    fn from(g: crate::grants::Grant) -> Self {
        v1::Grant {
            grant_id: g.grant_id,
            program: g.program.as_str().into(),
            grantee: g.grantee,
            principal: g.principal.to_string(),
            csp: g.csp,
            valid_from_unix_ms: g.valid_from_ms,
            valid_until_unix_ms: g.valid_until_ms,
            cards: g
                .cards
                .into_iter()
                .map(|c| v1::GrantCard {
                    host_id: c.host_id,
                    gpu_uuid: c.gpu_uuid,
                    from_unix_ms: c.from_ms,
                    until_unix_ms: c.until_ms,
                })
                .collect(),
            revoked: g.revoked_at_ms.is_some(),
            revoked_at_unix_ms: g.revoked_at_ms.unwrap_or(0),
        }
    }
}

impl From<crate::admission::AdmissionError> for tonic::Status {
    fn from(e: crate::admission::AdmissionError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// A `Hello` that cannot be accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HelloError {
    #[error("hello.{field}: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("protocol version {0} is not supported (this collector speaks 1)")]
    Protocol(u32),
}

fn ident_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Validates and converts a `Hello`.
pub fn hello_from_wire(h: &v1::Hello, received_ms: i64) -> Result<AgentHello, HelloError> {
    let field = |field: &'static str, reason: &str| HelloError::Field {
        field,
        reason: reason.to_string(),
    };
    if h.protocol_version != gpumeter_proto::PROTOCOL_VERSION {
        return Err(HelloError::Protocol(h.protocol_version));
    }
    if !ident_ok(&h.agent_id) {
        return Err(field(
            "agent_id",
            "must be 1-128 letters, digits, '-', '_', '.', ':'",
        ));
    }
    if !ident_ok(&h.host_id) {
        return Err(field(
            "host_id",
            "must be 1-128 letters, digits, '-', '_', '.', ':'",
        ));
    }
    if h.csp.is_empty() || h.csp.len() > 128 {
        return Err(field("csp", "must be 1-128 characters"));
    }
    let public_key: [u8; 32] = h
        .public_key
        .as_slice()
        .try_into()
        .map_err(|_| field("public_key", "must be 32 bytes"))?;
    gpumeter_proto::chain::verifying_key(&public_key)
        .map_err(|_| field("public_key", "is not a valid ed25519 key"))?;
    if h.gpus.len() > 4096 {
        return Err(field("gpus", "more than 4096 cards"));
    }
    if h.epoch == 0 {
        return Err(field("epoch", "must be at least 1"));
    }
    Ok(AgentHello {
        agent_id: h.agent_id.clone(),
        host_id: h.host_id.clone(),
        csp: h.csp.clone(),
        hostname: h.hostname.chars().take(256).collect(),
        agent_version: h.agent_version.chars().take(64).collect(),
        public_key,
        driver_version: h.driver_version.chars().take(64).collect(),
        gpus: h
            .gpus
            .iter()
            .map(|g| GpuRow {
                uuid: g.uuid.clone(),
                index: g.index,
                name: g.name.clone(),
                serial: g.serial.clone(),
                pci_bus_id: g.pci_bus_id.clone(),
                memory_total_bytes: g.memory_total_bytes,
                mig_mode: g.mig_mode.clone(),
                mig: (!g.parent_uuid.is_empty()).then(|| crate::store::MigRow {
                    parent_uuid: g.parent_uuid.clone(),
                    profile: g.mig_profile.clone(),
                    slices: g.mig_slices,
                    parent_slices: g.parent_slices,
                }),
            })
            .collect(),
        epoch: h.epoch,
        received_ms,
    })
}

fn health_str(h: i32) -> &'static str {
    match v1::Health::try_from(h) {
        Ok(v1::Health::Ok) => "ok",
        Ok(v1::Health::Degraded) => "degraded",
        Ok(v1::Health::Lost) => "lost",
        _ => "unknown",
    }
}

pub fn status_str(s: i32) -> &'static str {
    match v1::AssignmentStatus::try_from(s) {
        Ok(v1::AssignmentStatus::Assigned) => "assigned",
        Ok(v1::AssignmentStatus::Unassigned) => "unassigned",
        Ok(v1::AssignmentStatus::Expired) => "expired",
        Ok(v1::AssignmentStatus::Revoked) => "revoked",
        _ => "unknown",
    }
}

fn event_kind_str(k: i32) -> &'static str {
    match v1::EventKind::try_from(k) {
        Ok(v1::EventKind::Xid) => "xid",
        Ok(v1::EventKind::EccSingleBit) => "ecc_single_bit",
        Ok(v1::EventKind::EccDoubleBit) => "ecc_double_bit",
        Ok(v1::EventKind::GpuLost) => "gpu_lost",
        Ok(v1::EventKind::GpuRecovered) => "gpu_recovered",
        Ok(v1::EventKind::Enforcement) => "enforcement",
        Ok(v1::EventKind::AssignmentChanged) => "assignment_changed",
        Ok(v1::EventKind::AgentStarted) => "agent_started",
        Ok(v1::EventKind::SpoolFull) => "spool_full",
        Ok(v1::EventKind::CardHealth) => "card_health",
        Ok(v1::EventKind::PodDeviceMismatch) => "pod_device_mismatch",
        _ => "unknown",
    }
}

fn mode_str(m: i32) -> &'static str {
    match v1::EnforcementMode::try_from(m) {
        Ok(v1::EnforcementMode::Observe) => "observe",
        Ok(v1::EnforcementMode::Terminate) => "terminate",
        _ => "",
    }
}

impl From<&v1::CardWindow> for WindowRow {
    fn from(w: &v1::CardWindow) -> Self {
        let a = w.assignment.clone().unwrap_or_default();
        WindowRow {
            gpu_uuid: w.gpu_uuid.clone(),
            start_ms: w.window_start_unix_ms,
            end_ms: w.window_end_unix_ms,
            interval_ms: w.sample_interval_ms,
            expected_samples: w.expected_samples,
            good_samples: w.good_samples,
            util_avg_pct: w.util_avg_pct,
            util_max_pct: w.util_max_pct,
            mem_util_avg_pct: w.mem_util_avg_pct,
            memory_used_max_bytes: w.memory_used_max_bytes,
            energy_mj: w.energy_mj,
            energy_estimated: w.energy_estimated,
            power_avg_w: w.power_avg_w,
            temperature_max_c: w.temperature_max_c,
            throttle_reasons: w.throttle_reasons,
            health: health_str(w.health),
            unavailable_ms: w.unavailable_ms,
            assignment_status: status_str(a.status),
            grant_id: a.grant_id,
            principal: a.principal,
            active_ms: w.active_ms,
            occupied_ms: w.occupied_ms,
            foreign_ms: w.foreign_ms,
            grantee_occupied_ms: w.grantee_occupied_ms,
            unattributed_ms: w.unattributed_ms,
            energy_estimated_mj: w.energy_estimated_mj,
            principals: w
                .principals
                .iter()
                .map(|p| PrincipalRow {
                    principal: p.principal.clone(),
                    uid: p.uid,
                    occupied_ms: p.occupied_ms,
                    active_ms: p.active_ms,
                    memory_max_bytes: p.memory_max_bytes,
                    process_count: p.process_count,
                    matches_grant: p.matches_grant,
                })
                .collect(),
        }
    }
}

impl From<&v1::Event> for EventRow {
    fn from(e: &v1::Event) -> Self {
        let enf = e.enforcement.clone().unwrap_or_default();
        EventRow {
            gpu_uuid: e.gpu_uuid.clone(),
            at_ms: e.at_unix_ms,
            kind: event_kind_str(e.kind),
            code: e.code,
            detail: e.detail.clone(),
            pid: e.enforcement.as_ref().map(|x| x.pid),
            principal: enf.principal,
            grant_id: enf.grant_id,
            mode: mode_str(enf.mode).to_string(),
            action: enf.action,
            result: enf.result,
        }
    }
}

/// A signed head on the wire.
pub fn head_to_wire(h: &crate::heads::SignedHead) -> v1::SignedHead {
    v1::SignedHead {
        id: h.id,
        at_unix_ms: h.at_ms,
        agents: h.agents,
        root: h.root.clone(),
        leaves: h
            .leaves
            .iter()
            .map(|l| v1::HeadLeaf {
                agent_id: l.agent_id.clone(),
                epoch: l.epoch,
                seq: l.seq,
                chain_hash: l.chain_hash.clone(),
                keys: l.keys,
                key_hash: l.key_hash.clone(),
            })
            .collect(),
        public_key: h.public_key.clone(),
        signature: h.signature.clone(),
    }
}

/// A signed head from the wire (checked by whoever uses it, never trusted as received).
pub fn head_from_wire(h: v1::SignedHead) -> crate::heads::SignedHead {
    crate::heads::SignedHead {
        id: h.id,
        at_ms: h.at_unix_ms,
        agents: h.agents,
        root: h.root,
        leaves: h
            .leaves
            .into_iter()
            .map(|l| crate::heads::Leaf {
                agent_id: l.agent_id,
                epoch: l.epoch,
                seq: l.seq,
                chain_hash: l.chain_hash,
                keys: l.keys,
                key_hash: l.key_hash,
            })
            .collect(),
        public_key: h.public_key,
        signature: h.signature,
    }
}

/// Decodes a record body. A body that does not decode, or of a kind this collector does not
/// know, is kept as `Unknown` (the signed bytes are evidence either way).
pub fn decode_body(body: &[u8]) -> (i64, RecordContent) {
    let Ok(b) = v1::RecordBody::decode(body) else {
        return (0, RecordContent::Unknown);
    };
    let content = match &b.kind {
        Some(v1::record_body::Kind::CardWindow(w)) => RecordContent::Window(w.into()),
        Some(v1::record_body::Kind::Event(e)) => RecordContent::Event(e.into()),
        Some(v1::record_body::Kind::Gap(g)) => RecordContent::Gap {
            from_ms: g.from_unix_ms,
            until_ms: g.until_unix_ms,
            reason: g.reason.clone(),
        },
        Some(v1::record_body::Kind::EpochStart(e)) => RecordContent::EpochStart {
            epoch: e.epoch,
            last_acked_seq: e.last_acked_seq,
        },
        None => RecordContent::Unknown,
    };
    (b.created_unix_ms, content)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> v1::Hello {
        v1::Hello {
            protocol_version: 1,
            agent_id: "a1".into(),
            host_id: "h1".into(),
            csp: "kt".into(),
            public_key: ed25519_dalek::SigningKey::from_bytes(&[1; 32])
                .verifying_key()
                .to_bytes()
                .to_vec(),
            epoch: 1,
            ..Default::default()
        }
    }

    #[test]
    fn hostile_hellos_are_named() {
        assert!(hello_from_wire(&hello(), 0).is_ok());
        let mut h = hello();
        h.agent_id = "a b".into();
        assert_eq!(
            hello_from_wire(&h, 0).unwrap_err().to_string(),
            "hello.agent_id: must be 1-128 letters, digits, '-', '_', '.', ':'"
        );
        let mut h = hello();
        h.public_key = vec![1, 2, 3];
        assert!(
            hello_from_wire(&h, 0)
                .unwrap_err()
                .to_string()
                .contains("public_key")
        );
        let mut h = hello();
        h.protocol_version = 9;
        assert_eq!(hello_from_wire(&h, 0).unwrap_err(), HelloError::Protocol(9));
    }

    #[test]
    fn garbage_body_is_unknown() {
        assert_eq!(decode_body(&[0xff, 0xff, 0xff]).1, RecordContent::Unknown);
        let body = v1::RecordBody {
            created_unix_ms: 5,
            kind: Some(v1::record_body::Kind::Event(v1::Event {
                kind: v1::EventKind::Xid as i32,
                code: 79,
                ..Default::default()
            })),
        }
        .encode_to_vec();
        let (created, c) = decode_body(&body);
        assert_eq!(created, 5);
        let RecordContent::Event(e) = c else {
            panic!("{c:?}")
        };
        assert_eq!((e.kind, e.code), ("xid", 79));
    }
}
