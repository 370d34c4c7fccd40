//! The record hash chain and signed checkpoints.
//!
//! Each record's hash is `SHA-256("gpumeter.v1.record" 0x00 || prev_hash[32] || seq (u64 BE) ||
//! body)`, where `body` is the exact encoded `RecordBody` bytes and `prev_hash` is the hash of
//! the record before it (32 zero bytes before seq 1 of an agent). A checkpoint signs
//! `"gpumeter.v1.checkpoint" 0x00 || len(agent_id) (u32 BE) || agent_id || epoch (u64 BE) ||
//! seq (u64 BE) || chain_hash[32]` with the agent's ed25519 key, so one signature vouches for
//! every record up to `seq`. Protobuf encoding is not canonical, so nothing here re-encodes:
//! hashes and signatures are over bytes exactly as sent and stored.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

/// A chain hash.
pub type Hash = [u8; 32];

/// The `prev_hash` of an agent's first record.
pub const GENESIS: Hash = [0u8; 32];

const RECORD_DOMAIN: &[u8] = b"gpumeter.v1.record\0";
const CHECKPOINT_DOMAIN: &[u8] = b"gpumeter.v1.checkpoint\0";

/// Why a chain or checkpoint does not verify.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("hash has {len} bytes, expected 32")]
    BadHashLength { len: usize },
    #[error("record seq {seq} does not follow seq {expected_prev}")]
    SeqOutOfOrder { seq: u64, expected_prev: u64 },
    #[error("record seq {seq} names prev_hash {got} but the chain head is {expected}")]
    BrokenLink {
        seq: u64,
        got: String,
        expected: String,
    },
    #[error("public key is not a valid ed25519 key")]
    BadPublicKey,
    #[error("signature has {len} bytes, expected 64")]
    BadSignatureLength { len: usize },
    #[error("checkpoint signature for seq {seq} does not verify")]
    BadSignature { seq: u64 },
    #[error(
        "checkpoint covers seq {checkpoint_seq} with hash {checkpoint_hash} but the chain has {chain_hash}"
    )]
    CheckpointMismatch {
        checkpoint_seq: u64,
        checkpoint_hash: String,
        chain_hash: String,
    },
}

/// Hash of one record.
pub fn record_hash(prev_hash: &Hash, seq: u64, body: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(RECORD_DOMAIN);
    h.update(prev_hash);
    h.update(seq.to_be_bytes());
    h.update(body);
    h.finalize().into()
}

/// Parses a hash received as bytes.
pub fn to_hash(bytes: &[u8]) -> Result<Hash, ChainError> {
    bytes
        .try_into()
        .map_err(|_| ChainError::BadHashLength { len: bytes.len() })
}

/// The exact bytes a checkpoint signature covers.
pub fn checkpoint_message(agent_id: &str, epoch: u64, seq: u64, chain_hash: &Hash) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 4 + agent_id.len() + 16 + 32);
    m.extend_from_slice(CHECKPOINT_DOMAIN);
    m.extend_from_slice(&(agent_id.len() as u32).to_be_bytes());
    m.extend_from_slice(agent_id.as_bytes());
    m.extend_from_slice(&epoch.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(chain_hash);
    m
}

/// Signs a checkpoint.
pub fn sign_checkpoint(
    key: &SigningKey,
    agent_id: &str,
    epoch: u64,
    seq: u64,
    chain_hash: &Hash,
) -> [u8; 64] {
    key.sign(&checkpoint_message(agent_id, epoch, seq, chain_hash))
        .to_bytes()
}

/// A parsed agent public key.
pub fn verifying_key(public_key: &[u8]) -> Result<VerifyingKey, ChainError> {
    let bytes: [u8; 32] = public_key
        .try_into()
        .map_err(|_| ChainError::BadPublicKey)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| ChainError::BadPublicKey)
}

/// Checks a checkpoint signature.
pub fn verify_checkpoint(
    key: &VerifyingKey,
    agent_id: &str,
    epoch: u64,
    seq: u64,
    chain_hash: &Hash,
    signature: &[u8],
) -> Result<(), ChainError> {
    let sig: [u8; 64] = signature
        .try_into()
        .map_err(|_| ChainError::BadSignatureLength {
            len: signature.len(),
        })?;
    key.verify(
        &checkpoint_message(agent_id, epoch, seq, chain_hash),
        &Signature::from_bytes(&sig),
    )
    .map_err(|_| ChainError::BadSignature { seq })
}

/// Walks records in order from a known head, checking every link. Returns each record's hash.
#[derive(Debug, Clone)]
pub struct ChainCursor {
    /// Seq of the last record accepted (0 before the first).
    pub seq: u64,
    /// Hash of the last record accepted ([`GENESIS`] before the first).
    pub head: Hash,
}

impl ChainCursor {
    pub fn new(seq: u64, head: Hash) -> Self {
        Self { seq, head }
    }

    /// Accepts the next record if it follows the head; returns its hash.
    pub fn push(&mut self, seq: u64, prev_hash: &[u8], body: &[u8]) -> Result<Hash, ChainError> {
        if seq != self.seq + 1 {
            return Err(ChainError::SeqOutOfOrder {
                seq,
                expected_prev: self.seq,
            });
        }
        let prev = to_hash(prev_hash)?;
        if prev != self.head {
            return Err(ChainError::BrokenLink {
                seq,
                got: hex::encode(prev),
                expected: hex::encode(self.head),
            });
        }
        let h = record_hash(&prev, seq, body);
        self.seq = seq;
        self.head = h;
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    #[test]
    fn chain_links_and_checkpoint_verifies() {
        let mut agent = ChainCursor::new(0, GENESIS);
        let mut records = Vec::new();
        for seq in 1..=5u64 {
            let body = format!("body {seq}").into_bytes();
            let prev = agent.head;
            agent.push(seq, &prev, &body).unwrap();
            records.push((seq, prev, body));
        }
        let sig = sign_checkpoint(&key(), "a1", 1, 5, &agent.head);

        let mut collector = ChainCursor::new(0, GENESIS);
        for (seq, prev, body) in &records {
            collector.push(*seq, prev, body).unwrap();
        }
        assert_eq!(collector.head, agent.head);
        let vk = key().verifying_key();
        verify_checkpoint(&vk, "a1", 1, 5, &collector.head, &sig).unwrap();
        assert_eq!(
            verify_checkpoint(&vk, "a2", 1, 5, &collector.head, &sig),
            Err(ChainError::BadSignature { seq: 5 })
        );
        assert!(verify_checkpoint(&vk, "a1", 1, 4, &collector.head, &sig).is_err());
    }

    #[test]
    fn a_changed_byte_breaks_the_next_link() {
        let mut c = ChainCursor::new(0, GENESIS);
        let h1 = c.push(1, &GENESIS, b"one").unwrap();
        let tampered = record_hash(&GENESIS, 1, b"onE");
        assert_ne!(h1, tampered);
        let mut v = ChainCursor::new(0, GENESIS);
        v.push(1, &GENESIS, b"onE").unwrap();
        assert!(matches!(
            v.push(2, &h1, b"two"),
            Err(ChainError::BrokenLink { seq: 2, .. })
        ));
    }

    #[test]
    fn skipped_seq_is_refused() {
        let mut c = ChainCursor::new(0, GENESIS);
        c.push(1, &GENESIS, b"one").unwrap();
        let head = c.head;
        assert_eq!(
            c.push(3, &head, b"three"),
            Err(ChainError::SeqOutOfOrder {
                seq: 3,
                expected_prev: 1
            })
        );
    }
}
