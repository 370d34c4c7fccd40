//! Ledger verification: re-checks every agent's whole chain as stored — each record's hash
//! against its exact body bytes, each link to the record before it, each checkpoint against
//! the chain and the agent's pinned key — and reports gaps, rewrites, reordering, truncation
//! and bad signatures. Pure over a [`ChainSource`], so it runs on a live collector and on a
//! copy of the database handed to an auditor alike.
//!
//! What it can prove: any change to a stored body, hash, link or order, any record missing
//! below the last checkpoint, and any checkpoint not signed by the agent's pinned key. What it
//! cannot prove from the ledger alone: records and their checkpoints both removed from the
//! end of a chain (the agent's acknowledged point, kept by the agent, shows that).

use gpumeter_proto::chain::{self, GENESIS, Hash};
use serde::Serialize;

use crate::store::StoreError;

/// One stored record as verification needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRow {
    pub seq: u64,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
    pub body: Vec<u8>,
}

/// One stored checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    pub epoch: u64,
    pub seq: u64,
    pub chain_hash: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Where verification reads the ledger from.
pub trait ChainSource {
    /// Every agent with its pinned public key.
    fn agents(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// An agent's records in ascending seq order.
    fn scan_records(
        &self,
        agent_id: &str,
        visit: &mut dyn FnMut(ChainRow),
    ) -> Result<(), StoreError>;
    /// An agent's checkpoints in ascending seq order.
    fn checkpoints(&self, agent_id: &str) -> Result<Vec<StoredCheckpoint>, StoreError>;
}

/// Something wrong with a stored chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Finding {
    /// Records `from..=to` are not in the ledger.
    Gap { from: u64, to: u64 },
    /// The stored hash does not match the stored body: the body or hash was edited.
    Rewritten { seq: u64 },
    /// The record does not link to the one stored before it: reordered, or an earlier record
    /// was replaced.
    BrokenLink { seq: u64 },
    /// A checkpoint covers a chain head other than the stored chain's.
    CheckpointMismatch { seq: u64 },
    /// A checkpoint whose signature does not verify with the agent's pinned key.
    BadSignature { seq: u64 },
    /// A checkpoint covers records beyond the last one stored: the tail was cut off.
    Truncated {
        last_stored: u64,
        checkpoint_seq: u64,
    },
    /// Records after the last checkpoint: nothing signed vouches for them.
    Unsigned { from: u64, to: u64 },
    /// The agent's pinned key is not a valid ed25519 key.
    BadKey,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Gap { from, to } => write!(f, "records {from}..={to} are missing"),
            Finding::Rewritten { seq } => {
                write!(
                    f,
                    "record {seq}: stored hash does not match its body (rewritten)"
                )
            }
            Finding::BrokenLink { seq } => write!(
                f,
                "record {seq}: does not link to the record before it (reordered or replaced)"
            ),
            Finding::CheckpointMismatch { seq } => {
                write!(
                    f,
                    "checkpoint {seq}: signed chain head differs from the stored chain"
                )
            }
            Finding::BadSignature { seq } => {
                write!(
                    f,
                    "checkpoint {seq}: signature does not verify with the agent's key"
                )
            }
            Finding::Truncated {
                last_stored,
                checkpoint_seq,
            } => write!(
                f,
                "chain ends at record {last_stored} but a checkpoint covers record {checkpoint_seq} (tail cut off)"
            ),
            Finding::Unsigned { from, to } => {
                write!(f, "records {from}..={to} are covered by no checkpoint")
            }
            Finding::BadKey => write!(
                f,
                "the agent's pinned public key is not a valid ed25519 key"
            ),
        }
    }
}

/// Verification of one agent's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentVerification {
    pub agent_id: String,
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub checkpoints: u64,
    pub findings: Vec<Finding>,
}

/// Verification of the whole ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct VerifyReport {
    pub agents: Vec<AgentVerification>,
    pub records: u64,
    pub ok: bool,
}

/// Verifies one agent's chain.
pub fn verify_agent(
    src: &dyn ChainSource,
    agent_id: &str,
    key: &[u8],
) -> Result<AgentVerification, StoreError> {
    let mut findings = Vec::new();
    let vk = chain::verifying_key(key).ok();
    if vk.is_none() {
        findings.push(Finding::BadKey);
    }
    let checkpoints = src.checkpoints(agent_id)?;
    let mut cps = checkpoints.iter().peekable();
    let mut prev: Option<(u64, Hash)> = None;
    let mut first_seq = 0;
    let mut records = 0u64;
    let mut last_signed = 0u64;
    src.scan_records(agent_id, &mut |row| {
        records += 1;
        let prev_hash = chain::to_hash(&row.prev_hash).unwrap_or([0xff; 32]);
        let computed = chain::record_hash(&prev_hash, row.seq, &row.body);
        if row.hash.as_slice() != computed.as_slice() {
            findings.push(Finding::Rewritten { seq: row.seq });
        }
        match prev {
            None => {
                first_seq = row.seq;
                if row.seq > 1 {
                    findings.push(Finding::Gap {
                        from: 1,
                        to: row.seq - 1,
                    });
                } else if prev_hash != GENESIS {
                    findings.push(Finding::BrokenLink { seq: row.seq });
                }
            }
            Some((ps, ph)) => {
                if row.seq > ps + 1 {
                    findings.push(Finding::Gap {
                        from: ps + 1,
                        to: row.seq - 1,
                    });
                } else if prev_hash != ph {
                    findings.push(Finding::BrokenLink { seq: row.seq });
                }
            }
        }
        // Checkpoints at seqs that are missing were reported as part of the gap.
        while cps.peek().is_some_and(|c| c.seq < row.seq) {
            cps.next();
        }
        if let Some(cp) = cps.peek().filter(|c| c.seq == row.seq) {
            if cp.chain_hash.as_slice() != computed.as_slice() {
                findings.push(Finding::CheckpointMismatch { seq: cp.seq });
            }
            let hash = chain::to_hash(&cp.chain_hash).unwrap_or([0xff; 32]);
            if let Some(vk) = &vk {
                if chain::verify_checkpoint(vk, agent_id, cp.epoch, cp.seq, &hash, &cp.signature)
                    .is_err()
                {
                    findings.push(Finding::BadSignature { seq: cp.seq });
                }
            }
            last_signed = row.seq;
            cps.next();
        }
        // Links are checked against what is stored, so one edited record is one finding.
        prev = Some((row.seq, chain::to_hash(&row.hash).unwrap_or(computed)));
    })?;
    let last_seq = prev.map_or(0, |p| p.0);
    if let Some(cp) = checkpoints.last() {
        if cp.seq > last_seq {
            findings.push(Finding::Truncated {
                last_stored: last_seq,
                checkpoint_seq: cp.seq,
            });
        }
    }
    if last_seq > last_signed && records > 0 {
        findings.push(Finding::Unsigned {
            from: last_signed + 1,
            to: last_seq,
        });
    }
    Ok(AgentVerification {
        agent_id: agent_id.to_string(),
        records,
        first_seq,
        last_seq,
        checkpoints: checkpoints.len() as u64,
        findings,
    })
}

/// Verifies every agent's chain.
pub fn verify(src: &dyn ChainSource) -> Result<VerifyReport, StoreError> {
    let mut report = VerifyReport {
        ok: true,
        ..Default::default()
    };
    for (agent_id, key) in src.agents()? {
        let a = verify_agent(src, &agent_id, &key)?;
        report.records += a.records;
        report.ok &= a.findings.is_empty();
        report.agents.push(a);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    struct Mem {
        key: Vec<u8>,
        rows: Vec<ChainRow>,
        cps: Vec<StoredCheckpoint>,
    }

    impl ChainSource for Mem {
        fn agents(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            Ok(vec![("a1".into(), self.key.clone())])
        }
        fn scan_records(&self, _: &str, visit: &mut dyn FnMut(ChainRow)) -> Result<(), StoreError> {
            let mut rows = self.rows.clone();
            rows.sort_by_key(|r| r.seq);
            rows.into_iter().for_each(visit);
            Ok(())
        }
        fn checkpoints(&self, _: &str) -> Result<Vec<StoredCheckpoint>, StoreError> {
            Ok(self.cps.clone())
        }
    }

    /// 20 records, a checkpoint every 5.
    fn ledger() -> Mem {
        let key = SigningKey::from_bytes(&[9; 32]);
        let mut rows = Vec::new();
        let mut cps = Vec::new();
        let mut head = GENESIS;
        for seq in 1..=20u64 {
            let body = format!("record {seq}").into_bytes();
            let hash = chain::record_hash(&head, seq, &body);
            rows.push(ChainRow {
                seq,
                prev_hash: head.to_vec(),
                hash: hash.to_vec(),
                body,
            });
            head = hash;
            if seq % 5 == 0 {
                cps.push(StoredCheckpoint {
                    epoch: 1,
                    seq,
                    chain_hash: hash.to_vec(),
                    signature: chain::sign_checkpoint(&key, "a1", 1, seq, &hash).to_vec(),
                });
            }
        }
        Mem {
            key: key.verifying_key().to_bytes().to_vec(),
            rows,
            cps,
        }
    }

    fn findings(m: &Mem) -> Vec<Finding> {
        verify(m).unwrap().agents[0].findings.clone()
    }

    #[test]
    fn an_intact_ledger_verifies() {
        let r = verify(&ledger()).unwrap();
        assert!(r.ok);
        assert_eq!((r.records, r.agents[0].checkpoints), (20, 4));
    }

    #[test]
    fn an_edited_byte_is_caught() {
        let mut m = ledger();
        m.rows[6].body[0] ^= 1;
        assert_eq!(findings(&m), vec![Finding::Rewritten { seq: 7 }]);
        // Recomputing the stored hash too moves the break to the next link.
        let mut m = ledger();
        m.rows[6].body[0] ^= 1;
        let h = chain::record_hash(
            &chain::to_hash(&m.rows[6].prev_hash).unwrap(),
            7,
            &m.rows[6].body,
        );
        m.rows[6].hash = h.to_vec();
        assert_eq!(findings(&m), vec![Finding::BrokenLink { seq: 8 }]);
        // ...and at a checkpointed record, the signature's chain head no longer matches.
        let mut m = ledger();
        m.rows[9].body[0] ^= 1;
        let h = chain::record_hash(
            &chain::to_hash(&m.rows[9].prev_hash).unwrap(),
            10,
            &m.rows[9].body,
        );
        m.rows[9].hash = h.to_vec();
        let f = findings(&m);
        assert!(
            f.contains(&Finding::CheckpointMismatch { seq: 10 }),
            "{f:?}"
        );
    }

    #[test]
    fn deleted_swapped_and_truncated_rows_are_caught() {
        let mut m = ledger();
        m.rows.remove(11);
        assert_eq!(findings(&m), vec![Finding::Gap { from: 12, to: 12 }]);

        let mut m = ledger();
        let (a, b) = (m.rows[3].seq, m.rows[4].seq);
        m.rows[3].seq = b;
        m.rows[4].seq = a;
        let f = findings(&m);
        assert!(
            f.contains(&Finding::Rewritten { seq: 4 })
                && f.contains(&Finding::Rewritten { seq: 5 }),
            "{f:?}"
        );

        let mut m = ledger();
        m.rows.truncate(17);
        assert_eq!(
            findings(&m),
            vec![
                Finding::Truncated {
                    last_stored: 17,
                    checkpoint_seq: 20
                },
                Finding::Unsigned { from: 16, to: 17 }
            ]
        );
    }

    #[test]
    fn a_forged_signature_is_caught() {
        let mut m = ledger();
        m.cps[1].signature[0] ^= 1;
        assert_eq!(findings(&m), vec![Finding::BadSignature { seq: 10 }]);
        let mut m = ledger();
        m.key = SigningKey::from_bytes(&[8; 32])
            .verifying_key()
            .to_bytes()
            .to_vec();
        assert_eq!(findings(&m).len(), 4);
        assert!(!verify(&m).unwrap().ok);
    }
}
