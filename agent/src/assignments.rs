//! Card assignments pushed by the collector: which grant (and so which principal) may use which
//! card, and until when. Cached on disk so enforcement keeps working while the collector is
//! unreachable; validity is judged against the clock, so an expiry takes effect on time offline.
//!
//! Cache file format: JSON of [`Assignments`], replaced atomically (write temp, fsync, rename).
//! A cache that does not parse is reported and ignored (cards are then unassigned until the
//! collector answers); it is never half-applied.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use gpumeter_proto::principal::PrincipalSpec;
use gpumeter_proto::v1;
use serde::{Deserialize, Serialize};

use crate::clock::UnixMs;

/// One card's assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardAssignment {
    pub gpu_uuid: String,
    pub grant_id: String,
    pub program: String,
    /// The principal as the grant names it (`user:alice;group:lab`).
    pub principal: String,
    pub valid_from_ms: UnixMs,
    /// Exclusive end.
    pub valid_until_ms: UnixMs,
    pub revoked_at_ms: Option<UnixMs>,
}

/// How a card stands at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Assigned,
    Unassigned,
    /// Outside its validity (expired, or not yet started).
    Expired,
    Revoked,
}

/// The full assignment map of this host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignments {
    pub version: u64,
    pub cards: BTreeMap<String, CardAssignment>,
}

/// An assignment that failed to convert from the wire.
#[derive(Debug, thiserror::Error)]
pub enum AssignmentError {
    #[error("assignment for card {gpu_uuid} has a bad principal {principal:?}: {reason}")]
    BadPrincipal {
        gpu_uuid: String,
        principal: String,
        reason: String,
    },
    #[error("assignment cache {path}: {reason}")]
    Cache { path: String, reason: String },
}

impl TryFrom<&v1::AssignmentSet> for Assignments {
    type Error = AssignmentError;

    fn try_from(set: &v1::AssignmentSet) -> Result<Self, Self::Error> {
        let mut cards = BTreeMap::new();
        for a in &set.assignments {
            a.principal
                .parse::<PrincipalSpec>()
                .map_err(|e| AssignmentError::BadPrincipal {
                    gpu_uuid: a.gpu_uuid.clone(),
                    principal: a.principal.clone(),
                    reason: e.to_string(),
                })?;
            cards.insert(
                a.gpu_uuid.clone(),
                CardAssignment {
                    gpu_uuid: a.gpu_uuid.clone(),
                    grant_id: a.grant_id.clone(),
                    program: a.program.clone(),
                    principal: a.principal.clone(),
                    valid_from_ms: a.valid_from_unix_ms,
                    valid_until_ms: a.valid_until_unix_ms,
                    revoked_at_ms: a.revoked.then_some(a.revoked_at_unix_ms),
                },
            );
        }
        Ok(Self {
            version: set.version,
            cards,
        })
    }
}

impl Assignments {
    /// Whether this is a set the collector sent (now or before, from the cache): the
    /// collector numbers its sets from 1, and the agent starts from version 0 with none.
    pub fn known(&self) -> bool {
        self.version > 0
    }

    /// How card `uuid` stands at `at`, with its assignment when it has one.
    pub fn judge(&self, uuid: &str, at: UnixMs) -> (Status, Option<&CardAssignment>) {
        let Some(a) = self.cards.get(uuid) else {
            return (Status::Unassigned, None);
        };
        if a.revoked_at_ms.is_some_and(|r| at >= r) {
            return (Status::Revoked, Some(a));
        }
        if at < a.valid_from_ms || at >= a.valid_until_ms {
            return (Status::Expired, Some(a));
        }
        (Status::Assigned, Some(a))
    }

    /// Loads the cache; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> Result<Option<Self>, AssignmentError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(AssignmentError::Cache {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                });
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| AssignmentError::Cache {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
    }

    /// Replaces the cache atomically.
    pub fn save(&self, path: &Path) -> Result<(), AssignmentError> {
        let err = |e: std::io::Error| AssignmentError::Cache {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let tmp = path.with_extension("tmp");
        let json = serde_json::to_vec_pretty(self).map_err(|e| AssignmentError::Cache {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&json).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        if let Some(dir) = path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> Assignments {
        let wire = v1::AssignmentSet {
            version: 3,
            host_id: "h1".into(),
            assignments: vec![v1::Assignment {
                gpu_uuid: "GPU-1".into(),
                grant_id: "G1".into(),
                program: "hpc".into(),
                principal: "user:alice".into(),
                valid_from_unix_ms: 1_000,
                valid_until_unix_ms: 5_000,
                revoked: false,
                revoked_at_unix_ms: 0,
            }],
        };
        Assignments::try_from(&wire).unwrap()
    }

    #[test]
    fn validity_is_judged_by_the_clock() {
        let s = set();
        assert_eq!(s.judge("GPU-1", 999).0, Status::Expired);
        assert_eq!(s.judge("GPU-1", 1_000).0, Status::Assigned);
        assert_eq!(s.judge("GPU-1", 4_999).0, Status::Assigned);
        assert_eq!(s.judge("GPU-1", 5_000).0, Status::Expired);
        assert_eq!(s.judge("GPU-2", 2_000).0, Status::Unassigned);
        let mut r = s.clone();
        r.cards.get_mut("GPU-1").unwrap().revoked_at_ms = Some(2_000);
        assert_eq!(r.judge("GPU-1", 1_999).0, Status::Assigned);
        assert_eq!(r.judge("GPU-1", 2_000).0, Status::Revoked);
    }

    #[test]
    fn cache_round_trip_and_corrupt_cache() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("assignments.json");
        assert_eq!(Assignments::load(&p).unwrap(), None);
        set().save(&p).unwrap();
        assert_eq!(Assignments::load(&p).unwrap(), Some(set()));
        std::fs::write(&p, b"{not json").unwrap();
        let e = Assignments::load(&p).unwrap_err().to_string();
        assert!(e.contains("assignments.json"), "{e}");
    }

    #[test]
    fn bad_principal_refused() {
        let wire = v1::AssignmentSet {
            version: 1,
            host_id: "h".into(),
            assignments: vec![v1::Assignment {
                gpu_uuid: "GPU-9".into(),
                principal: "nobody".into(),
                ..Default::default()
            }],
        };
        let e = Assignments::try_from(&wire).unwrap_err().to_string();
        assert!(e.contains("GPU-9"), "{e}");
    }
}
