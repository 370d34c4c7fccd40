//! What a session may send, checked before anything of it is stored (pure functions).
//!
//! Rules:
//! - A Hello lists at most `limits.max_gpus_per_hello` cards, and none of its strings (host
//!   name, versions, every card's UUID, name, serial, PCI bus id, MIG mode) is longer than
//!   `limits.max_string_bytes`. A longer one is refused, never silently cut: what is stored is
//!   what the agent said.
//! - A record's identity fields (card UUID, grant, principal, every principal of a window;
//!   an event's card, principal, grant, mode, action and result) are no longer than
//!   `limits.max_string_bytes`.
//! - A window may not end later than the collector's now plus `limits.max_clock_skew_s`: a
//!   window from the future is a forgery or a broken clock, and either way counts nowhere.
//! - A window may not start before the agent was first registered (its first Hello, or an
//!   admin's `agents register`), less one window (the one already running when the agent
//!   registered), the allowed skew and `limits.max_backfill_s` (0 by default; simulations that
//!   replay the past raise it). A new agent id cannot write history from before it existed.
//!
//! A refusal names the limit by its config field, or the record's seq and the reason. The
//! session that sent it gets INVALID_ARGUMENT and an alarm is stored; nothing of a refused
//! Hello or batch is written.

use gpumeter_proto::v1;

use crate::ingest::Limits;
use crate::store::{IngestRecord, RecordContent};

/// Why a Hello or a batch is refused before it is stored.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AdmissionError {
    #[error("hello.gpus: {count} cards, more than limits.max_gpus_per_hello ({limit})")]
    TooManyGpus { count: usize, limit: u32 },
    #[error("hello.{field}: {len} bytes, more than limits.max_string_bytes ({limit})")]
    HelloStringTooLong {
        field: String,
        len: usize,
        limit: u32,
    },
    #[error("record seq {seq}: {field}: {len} bytes, more than limits.max_string_bytes ({limit})")]
    RecordStringTooLong {
        seq: u64,
        field: &'static str,
        len: usize,
        limit: u32,
    },
    #[error(
        "record seq {seq}: window ends at {end_ms} (ms since the epoch), {ahead_ms} ms after the collector's clock, more than limits.max_clock_skew_s ({skew_s} s) allows"
    )]
    FutureWindow {
        seq: u64,
        end_ms: i64,
        ahead_ms: i64,
        skew_s: i64,
    },
    #[error(
        "record seq {seq}: window starts at {start_ms} (ms since the epoch), before the agent was first registered at {registered_ms} (limits.max_backfill_s: {backfill_s} s)"
    )]
    BeforeRegistration {
        seq: u64,
        start_ms: i64,
        registered_ms: i64,
        backfill_s: i64,
    },
}

impl AdmissionError {
    /// The alarm kind a refusal is stored under.
    pub fn alarm_kind(&self) -> &'static str {
        match self {
            AdmissionError::TooManyGpus { .. } | AdmissionError::HelloStringTooLong { .. } => {
                "hello_refused"
            }
            AdmissionError::RecordStringTooLong { .. } => "record_too_long",
            AdmissionError::FutureWindow { .. } => "future_window",
            AdmissionError::BeforeRegistration { .. } => "before_registration",
        }
    }

    /// The seq of the refused record, if a record was refused.
    pub fn seq(&self) -> Option<u64> {
        match self {
            AdmissionError::RecordStringTooLong { seq, .. }
            | AdmissionError::FutureWindow { seq, .. }
            | AdmissionError::BeforeRegistration { seq, .. } => Some(*seq),
            _ => None,
        }
    }
}

/// Checks a Hello's size against the limits.
pub fn check_hello(h: &v1::Hello, limits: &Limits) -> Result<(), AdmissionError> {
    if h.gpus.len() > limits.max_gpus_per_hello as usize {
        return Err(AdmissionError::TooManyGpus {
            count: h.gpus.len(),
            limit: limits.max_gpus_per_hello,
        });
    }
    let limit = limits.max_string_bytes;
    let check = |field: &dyn Fn() -> String, s: &str| {
        if s.len() > limit as usize {
            Err(AdmissionError::HelloStringTooLong {
                field: field(),
                len: s.len(),
                limit,
            })
        } else {
            Ok(())
        }
    };
    check(&|| "hostname".into(), &h.hostname)?;
    check(&|| "agent_version".into(), &h.agent_version)?;
    check(&|| "driver_version".into(), &h.driver_version)?;
    check(&|| "csp".into(), &h.csp)?;
    for (i, g) in h.gpus.iter().enumerate() {
        check(&|| format!("gpus[{i}].uuid"), &g.uuid)?;
        check(&|| format!("gpus[{i}].name"), &g.name)?;
        check(&|| format!("gpus[{i}].serial"), &g.serial)?;
        check(&|| format!("gpus[{i}].pci_bus_id"), &g.pci_bus_id)?;
        check(&|| format!("gpus[{i}].mig_mode"), &g.mig_mode)?;
    }
    Ok(())
}

/// Checks a verified batch's new records: identity lengths, no window from the future, none
/// from before the agent was registered. `registered_ms`: the agent's first registration.
pub fn check_records(
    records: &[IngestRecord],
    now_ms: i64,
    registered_ms: i64,
    limits: &Limits,
) -> Result<(), AdmissionError> {
    let limit = limits.max_string_bytes;
    for r in records {
        let long = |field: &'static str, s: &str| {
            if s.len() > limit as usize {
                Err(AdmissionError::RecordStringTooLong {
                    seq: r.seq,
                    field,
                    len: s.len(),
                    limit,
                })
            } else {
                Ok(())
            }
        };
        match &r.content {
            RecordContent::Window(w) => {
                long("window.gpu_uuid", &w.gpu_uuid)?;
                long("window.grant_id", &w.grant_id)?;
                long("window.principal", &w.principal)?;
                for p in &w.principals {
                    long("window.principals.principal", &p.principal)?;
                }
                let latest = now_ms.saturating_add(limits.max_clock_skew_ms);
                if w.end_ms > latest {
                    return Err(AdmissionError::FutureWindow {
                        seq: r.seq,
                        end_ms: w.end_ms,
                        ahead_ms: w.end_ms - now_ms,
                        skew_s: limits.max_clock_skew_ms / 1000,
                    });
                }
                let length = w.end_ms.saturating_sub(w.start_ms).max(0);
                let earliest = registered_ms
                    .saturating_sub(length)
                    .saturating_sub(limits.max_clock_skew_ms)
                    .saturating_sub(limits.max_backfill_ms);
                if w.start_ms < earliest {
                    return Err(AdmissionError::BeforeRegistration {
                        seq: r.seq,
                        start_ms: w.start_ms,
                        registered_ms,
                        backfill_s: limits.max_backfill_ms / 1000,
                    });
                }
            }
            RecordContent::Event(e) => {
                long("event.gpu_uuid", &e.gpu_uuid)?;
                long("event.principal", &e.principal)?;
                long("event.grant_id", &e.grant_id)?;
                long("event.mode", &e.mode)?;
                long("event.action", &e.action)?;
                long("event.result", &e.result)?;
            }
            RecordContent::Gap { .. }
            | RecordContent::EpochStart { .. }
            | RecordContent::Unknown => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::WindowRow;

    fn window(seq: u64, start: i64, end: i64, gpu: &str) -> IngestRecord {
        IngestRecord {
            seq,
            prev_hash: [0; 32],
            hash: [0; 32],
            body: vec![],
            created_ms: end,
            content: RecordContent::Window(WindowRow {
                gpu_uuid: gpu.into(),
                start_ms: start,
                end_ms: end,
                interval_ms: 1000,
                expected_samples: 60,
                good_samples: 60,
                util_avg_pct: None,
                util_max_pct: None,
                mem_util_avg_pct: None,
                memory_used_max_bytes: None,
                energy_mj: None,
                energy_estimated: false,
                power_avg_w: None,
                temperature_max_c: None,
                throttle_reasons: None,
                health: "ok",
                unavailable_ms: 0,
                assignment_status: "unassigned",
                grant_id: String::new(),
                principal: String::new(),
                active_ms: 0,
                occupied_ms: 0,
                foreign_ms: 0,
                grantee_occupied_ms: None,
                unattributed_ms: None,
                energy_estimated_mj: None,
                principals: vec![],
            }),
        }
    }

    const NOW: i64 = 1_000 * 86_400_000;
    const MIN: i64 = 60_000;

    #[test]
    fn windows_from_the_future_or_before_registration_are_refused_by_seq() {
        let l = Limits::default();
        let reg = NOW - 10 * MIN;
        // The window running when the agent registered, and one ending within the skew.
        let ok = [
            window(1, reg - MIN + 1, reg + 1, "GPU-a"),
            window(2, NOW, NOW + MIN, "GPU-a"),
        ];
        assert_eq!(check_records(&ok, NOW, reg, &l), Ok(()));
        let future = [window(
            3,
            NOW + 2 * 86_400_000,
            NOW + 2 * 86_400_000 + MIN,
            "GPU-a",
        )];
        let e = check_records(&future, NOW, reg, &l).unwrap_err();
        assert_eq!((e.alarm_kind(), e.seq()), ("future_window", Some(3)));
        assert!(e.to_string().contains("limits.max_clock_skew_s"), "{e}");
        let early = [window(4, reg - 20 * MIN, reg - 19 * MIN, "GPU-a")];
        let e = check_records(&early, NOW, reg, &l).unwrap_err();
        assert_eq!((e.alarm_kind(), e.seq()), ("before_registration", Some(4)));
        let backfill = Limits {
            max_backfill_ms: 3_600_000,
            ..Limits::default()
        };
        assert_eq!(check_records(&early, NOW, reg, &backfill), Ok(()));
        let long = [window(5, NOW - MIN, NOW, &"x".repeat(300))];
        let e = check_records(&long, NOW, reg, &l).unwrap_err();
        assert!(
            e.to_string().contains("window.gpu_uuid") && e.to_string().contains("seq 5"),
            "{e}"
        );
    }

    #[test]
    fn a_hello_over_a_limit_is_refused_by_name() {
        let l = Limits::default();
        let gpu = v1::GpuInfo {
            uuid: "GPU-1".into(),
            ..Default::default()
        };
        let mut h = v1::Hello {
            gpus: vec![gpu.clone(); 4096],
            ..Default::default()
        };
        let e = check_hello(&h, &l).unwrap_err();
        assert!(e.to_string().contains("limits.max_gpus_per_hello"), "{e}");
        h.gpus.truncate(2);
        assert_eq!(check_hello(&h, &l), Ok(()));
        h.gpus[1].name = "n".repeat(3000);
        let e = check_hello(&h, &l).unwrap_err();
        assert_eq!(
            e.to_string(),
            "hello.gpus[1].name: 3000 bytes, more than limits.max_string_bytes (256)"
        );
    }
}
