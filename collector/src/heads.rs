//! Signed ledger heads: the collector's own signed statement of how far every agent's chain
//! reached, for auditors to keep, so a ledger later shortened, an agent deleted, or a history
//! rewritten (even re-signed under a new agent key) is caught by anyone holding an older head.
//!
//! Format. A head covers one *leaf* per agent known to the ledger, sorted by agent id:
//! `len(agent_id) (u32 BE) || agent_id || epoch (u64 BE) || seq (u64 BE) || chain_hash[32] ||
//! keys (u32 BE) || key_hash[32]`, where (epoch, seq, chain_hash) is the agent's last stored
//! checkpoint (0, 0, 32 zero bytes before its first) and `key_hash` covers the first `keys`
//! entries of its key history (see [`key_history_hash`]). The leaves form a Merkle tree as
//! Certificate Transparency's (RFC 6962 §2.1: leaf hash `SHA-256(0x00 || leaf)`, node hash
//! `SHA-256(0x01 || left || right)`, the empty tree `SHA-256("")`). The collector signs, with its
//! ed25519 key, `"gpumeter.v1.head" 0x00 || id (u64 BE) || at_ms (i64 BE) || agents (u64 BE) ||
//! root[32]`. Heads are numbered from 1 in the order signed and kept in the `heads` table with
//! their leaves, so an auditor's copy holds everything needed to check them.
//!
//! The collector's key is 32 raw secret bytes in a file beside the database (`<db>.collector-key`,
//! mode 0600), created the first time a head is signed and never rewritten. Heads are signed at a
//! fixed interval (`head_interval_s`, default 600) and on demand (`heads --server`).
//!
//! Rules of `verify --heads FILE`: every head in the file must be signed by the key of the
//! file's first head, its root must match its leaves, and the ledger must still extend each
//! leaf: the agent is there, its record at the leaf's seq has the leaf's chain hash, and its
//! key history still begins with the leaf's `keys` entries.

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};
use gpumeter_proto::chain::{self, GENESIS, Hash};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::StoreError;
use crate::verify::{ChainSource, KeyEntry};

const HEAD_DOMAIN: &[u8] = b"gpumeter.v1.head\0";
const KEYS_DOMAIN: &[u8] = b"gpumeter.v1.keys\0";

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

/// One agent's entry in a head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leaf {
    pub agent_id: String,
    pub epoch: u64,
    pub seq: u64,
    #[serde(with = "hex32")]
    pub chain_hash: Vec<u8>,
    pub keys: u32,
    #[serde(with = "hex32")]
    pub key_hash: Vec<u8>,
}

impl Leaf {
    fn bytes(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(4 + self.agent_id.len() + 16 + 32 + 4 + 32);
        m.extend_from_slice(&(self.agent_id.len() as u32).to_be_bytes());
        m.extend_from_slice(self.agent_id.as_bytes());
        m.extend_from_slice(&self.epoch.to_be_bytes());
        m.extend_from_slice(&self.seq.to_be_bytes());
        m.extend_from_slice(&self.chain_hash);
        m.extend_from_slice(&self.keys.to_be_bytes());
        m.extend_from_slice(&self.key_hash);
        m
    }
}

/// A head as signed and kept (one line of an auditor's heads file, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHead {
    pub id: u64,
    pub at_ms: i64,
    pub agents: u64,
    #[serde(with = "hex32")]
    pub root: Vec<u8>,
    pub leaves: Vec<Leaf>,
    #[serde(with = "hex32")]
    pub public_key: Vec<u8>,
    #[serde(with = "hex32")]
    pub signature: Vec<u8>,
}

/// Something a head shows about the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeadFinding {
    pub head_id: u64,
    /// Empty for a finding about the head itself.
    pub agent_id: String,
    pub seq: u64,
    /// "head_signature", "head_key_changed", "head_root", "agent_missing", "chain_cut",
    /// "chain_rewritten", "keys_rewritten".
    pub kind: &'static str,
    pub detail: String,
}

fn leaf_hash(leaf: &Leaf) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(leaf.bytes());
    h.finalize().into()
}

fn tree(hashes: &[Hash]) -> Hash {
    match hashes.len() {
        0 => Sha256::digest([]).into(),
        1 => hashes[0],
        n => {
            let k = n.next_power_of_two() / 2;
            let mut h = Sha256::new();
            h.update([1u8]);
            h.update(tree(&hashes[..k]));
            h.update(tree(&hashes[k..]));
            h.finalize().into()
        }
    }
}

/// Merkle root over the leaves (in the order given: sorted by agent id).
pub fn merkle_root(leaves: &[Leaf]) -> Hash {
    tree(&leaves.iter().map(leaf_hash).collect::<Vec<_>>())
}

/// The exact bytes a head signature covers.
pub fn head_message(id: u64, at_ms: i64, agents: u64, root: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEAD_DOMAIN.len() + 24 + 32);
    m.extend_from_slice(HEAD_DOMAIN);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&at_ms.to_be_bytes());
    m.extend_from_slice(&agents.to_be_bytes());
    m.extend_from_slice(root);
    m
}

/// Hash of the first entries of a key history: `SHA-256("gpumeter.v1.keys" 0x00 || for each:
/// public_key[32] || from_seq (u64 BE) || at_ms (i64 BE) || len(actor) (u32 BE) || actor ||
/// len(reason) (u32 BE) || reason)`.
pub fn key_history_hash(entries: &[KeyEntry]) -> Hash {
    let mut h = Sha256::new();
    h.update(KEYS_DOMAIN);
    for k in entries {
        h.update(&k.public_key);
        h.update(k.from_seq.to_be_bytes());
        h.update(k.at_ms.to_be_bytes());
        h.update((k.actor.len() as u32).to_be_bytes());
        h.update(k.actor.as_bytes());
        h.update((k.reason.len() as u32).to_be_bytes());
        h.update(k.reason.as_bytes());
    }
    h.finalize().into()
}

/// Where the collector's key lives for a database file.
pub fn key_path(db: &Path) -> PathBuf {
    let mut name = db.file_name().unwrap_or_default().to_os_string();
    name.push(".collector-key");
    db.with_file_name(name)
}

/// Loads the collector's key beside `db`, creating it (0600) the first time.
pub fn load_or_create_key(db: &Path) -> Result<SigningKey, StoreError> {
    // The agent's key file has the same format and rules; one implementation of them.
    gpumeter_proto::keys::load_or_create(&key_path(db)).map_err(|e| StoreError::Open {
        path: key_path(db).display().to_string(),
        reason: e.to_string(),
    })
}

/// The leaves a head signed now would cover.
pub fn current_leaves(c: &Connection) -> Result<Vec<Leaf>, StoreError> {
    let agents: Vec<String> = c
        .prepare_cached("SELECT agent_id FROM agents ORDER BY agent_id")
        .map_err(db)?
        .query_map([], |r| r.get(0))
        .map_err(db)?
        .collect::<Result<_, _>>()
        .map_err(db)?;
    let mut cp = c
        .prepare_cached(
            "SELECT epoch, seq, chain_hash FROM checkpoints WHERE agent_id = ?1 ORDER BY seq DESC LIMIT 1",
        )
        .map_err(db)?;
    let mut leaves = Vec::with_capacity(agents.len());
    for agent_id in agents {
        let last: Option<(i64, i64, Vec<u8>)> = cp
            .query_row(params![agent_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()
            .map_err(db)?;
        let (epoch, seq, chain_hash) = last.unwrap_or((0, 0, GENESIS.to_vec()));
        let keys = crate::store::sqlite_ledger::key_history(c, &agent_id)?;
        leaves.push(Leaf {
            epoch: epoch as u64,
            seq: seq as u64,
            chain_hash,
            keys: keys.len() as u32,
            key_hash: key_history_hash(&keys).to_vec(),
            agent_id,
        });
    }
    Ok(leaves)
}

/// Signs a head over the ledger as `c` sees it and stores it. Run inside the writer's
/// connection so it covers exactly what is committed.
pub fn sign_and_store(
    c: &Connection,
    key: &SigningKey,
    at_ms: i64,
) -> Result<SignedHead, StoreError> {
    let leaves = current_leaves(c)?;
    let root = merkle_root(&leaves);
    // Nothing changed since the latest head (same key): it still states the ledger.
    let latest: Option<(i64, Vec<u8>, Vec<u8>)> = c
        .query_row(
            "SELECT id, root, public_key FROM heads ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .map_err(db)?;
    if let Some((id, held_root, held_key)) = latest {
        if held_root == root && held_key == key.verifying_key().to_bytes() {
            if let Some(h) = load_head(c, id as u64)? {
                return Ok(h);
            }
        }
    }
    let id: i64 = c
        .query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM heads", [], |r| {
            r.get(0)
        })
        .map_err(db)?;
    let agents = leaves.len() as u64;
    let sig = key.sign(&head_message(id as u64, at_ms, agents, &root));
    let head = SignedHead {
        id: id as u64,
        at_ms,
        agents,
        root: root.to_vec(),
        leaves,
        public_key: key.verifying_key().to_bytes().to_vec(),
        signature: sig.to_bytes().to_vec(),
    };
    let leaves_json =
        serde_json::to_vec(&head.leaves).map_err(|e| StoreError::Db(e.to_string()))?;
    c.execute(
        "INSERT INTO heads (id, at_ms, agents, root, leaves, public_key, signature) VALUES (?1,?2,?3,?4,?5,?6,?7)",
        params![id, at_ms, agents as i64, head.root, leaves_json, head.public_key, head.signature],
    )
    .map_err(db)?;
    Ok(head)
}

/// The head numbered `id`, when held.
pub fn load_head(c: &Connection, id: u64) -> Result<Option<SignedHead>, StoreError> {
    let mut st = c
        .prepare_cached("SELECT at_ms FROM heads WHERE id = ?1")
        .map_err(db)?;
    let at: Option<i64> = st
        .query_row(params![id as i64], |r| r.get(0))
        .optional()
        .map_err(db)?;
    let Some(at) = at else {
        return Ok(None);
    };
    Ok(load_heads(c, at)?.into_iter().find(|h| h.id == id))
}

/// Heads stored from `since_ms` on, oldest first.
pub fn load_heads(c: &Connection, since_ms: i64) -> Result<Vec<SignedHead>, StoreError> {
    let mut st = c
        .prepare_cached(
            "SELECT id, at_ms, agents, root, leaves, public_key, signature FROM heads WHERE at_ms >= ?1 ORDER BY id",
        )
        .map_err(db)?;
    let rows = st
        .query_map(params![since_ms], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, Vec<u8>>(5)?,
                r.get::<_, Vec<u8>>(6)?,
            ))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    rows.into_iter()
        .map(|(id, at_ms, agents, root, leaves, public_key, signature)| {
            Ok(SignedHead {
                id: id as u64,
                at_ms,
                agents: agents as u64,
                root,
                leaves: serde_json::from_slice(&leaves)
                    .map_err(|e| StoreError::Db(format!("head {id}: leaves: {e}")))?,
                public_key,
                signature,
            })
        })
        .collect()
}

/// Checks one head on its own: signature and root.
pub fn check_head(h: &SignedHead) -> Result<(), &'static str> {
    let vk = chain::verifying_key(&h.public_key).map_err(|_| "head_signature")?;
    let sig: [u8; 64] = h
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| "head_signature")?;
    vk.verify(
        &head_message(h.id, h.at_ms, h.agents, &h.root),
        &Signature::from_bytes(&sig),
    )
    .map_err(|_| "head_signature")?;
    if merkle_root(&h.leaves).as_slice() != h.root.as_slice() || h.agents != h.leaves.len() as u64 {
        return Err("head_root");
    }
    Ok(())
}

/// Proves that the ledger still extends every head: see the module doc for the rules.
pub fn verify_heads(
    heads: &[SignedHead],
    src: &dyn ChainSource,
) -> Result<Vec<HeadFinding>, StoreError> {
    let mut out = Vec::new();
    let Some(first) = heads.first() else {
        return Ok(out);
    };
    let agents: std::collections::HashMap<String, Vec<u8>> = src.agents()?.into_iter().collect();
    let mut histories: std::collections::HashMap<String, Vec<KeyEntry>> = Default::default();
    for h in heads {
        let finding = |agent_id: &str, seq: u64, kind: &'static str, detail: String| HeadFinding {
            head_id: h.id,
            agent_id: agent_id.to_string(),
            seq,
            kind,
            detail,
        };
        if h.public_key != first.public_key {
            out.push(finding(
                "",
                0,
                "head_key_changed",
                format!(
                    "head {} is signed by collector key {}, not {} that signed head {}",
                    h.id,
                    hex::encode(&h.public_key),
                    hex::encode(&first.public_key),
                    first.id
                ),
            ));
            continue;
        }
        if let Err(kind) = check_head(h) {
            out.push(finding(
                "",
                0,
                kind,
                format!("head {} does not verify ({kind})", h.id),
            ));
            continue;
        }
        for leaf in &h.leaves {
            if !agents.contains_key(&leaf.agent_id) {
                out.push(finding(
                    &leaf.agent_id,
                    leaf.seq,
                    "agent_missing",
                    format!(
                        "agent {} (seq {} in head {}) is gone from the ledger",
                        leaf.agent_id, leaf.seq, h.id
                    ),
                ));
                continue;
            }
            if leaf.seq > 0 {
                match src.record_hash_at(&leaf.agent_id, leaf.seq)? {
                    None => out.push(finding(
                        &leaf.agent_id,
                        leaf.seq,
                        "chain_cut",
                        format!(
                            "agent {} record {} (in head {}) is gone: the chain was cut back",
                            leaf.agent_id, leaf.seq, h.id
                        ),
                    )),
                    Some(hash) if hash != leaf.chain_hash => out.push(finding(
                        &leaf.agent_id,
                        leaf.seq,
                        "chain_rewritten",
                        format!(
                            "agent {} record {} has hash {}, head {} signed {}: the history was rewritten",
                            leaf.agent_id,
                            leaf.seq,
                            hex::encode(&hash),
                            h.id,
                            hex::encode(&leaf.chain_hash)
                        ),
                    )),
                    Some(_) => {}
                }
            }
            if !histories.contains_key(&leaf.agent_id) {
                let hist = src.key_history(&leaf.agent_id)?;
                histories.insert(leaf.agent_id.clone(), hist);
            }
            let hist = histories
                .get(&leaf.agent_id)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let k = leaf.keys as usize;
            if hist.len() < k || key_history_hash(&hist[..k]).as_slice() != leaf.key_hash {
                out.push(finding(
                    &leaf.agent_id,
                    leaf.seq,
                    "keys_rewritten",
                    format!(
                        "agent {}: the key history no longer begins with the {k} entries head {} signed",
                        leaf.agent_id, h.id
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// Reads a heads file (JSON lines); a missing file holds no heads.
pub fn read_heads_file(path: &Path) -> Result<Vec<SignedHead>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// Appends to a heads file the heads newer than its last one; refuses (appending nothing) a
/// head that fails its own check or is signed by another key than the file's first head.
/// Returns how many were appended.
pub fn append_heads(path: &Path, new: &[SignedHead]) -> Result<usize, String> {
    use std::io::Write;
    let held = read_heads_file(path)?;
    let last = held.last().map_or(0, |h| h.id);
    let pinned = held.first().map(|h| h.public_key.clone());
    let fresh: Vec<&SignedHead> = new.iter().filter(|h| h.id > last).collect();
    for h in &fresh {
        if let Some(k) = &pinned {
            if &h.public_key != k {
                return Err(format!(
                    "head {} is signed by collector key {}, not {} that signed the heads in {}: refusing to append",
                    h.id,
                    hex::encode(&h.public_key),
                    hex::encode(k),
                    path.display()
                ));
            }
        }
        check_head(h).map_err(|kind| format!("head {} does not verify ({kind})", h.id))?;
    }
    let mut text = String::new();
    for h in &fresh {
        text.push_str(&serde_json::to_string(h).map_err(|e| e.to_string())?);
        text.push('\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(fresh.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(id: &str, seq: u64) -> Leaf {
        Leaf {
            agent_id: id.into(),
            epoch: 1,
            seq,
            chain_hash: vec![seq as u8; 32],
            keys: 1,
            key_hash: vec![0; 32],
        }
    }

    #[test]
    fn roots_follow_rfc6962_and_change_with_any_leaf() {
        assert_eq!(
            hex::encode(merkle_root(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let three = [leaf("a", 1), leaf("b", 2), leaf("c", 3)];
        let root = merkle_root(&three);
        let mut h = Sha256::new();
        h.update([1u8]);
        h.update(tree(&[leaf_hash(&three[0]), leaf_hash(&three[1])]));
        h.update(leaf_hash(&three[2]));
        assert_eq!(root, <[u8; 32]>::from(h.finalize()));
        let mut other = three.clone();
        other[1].seq = 1;
        assert_ne!(merkle_root(&other), root);
        assert_ne!(merkle_root(&three[..2]), root);
    }

    #[test]
    fn a_head_checks_and_an_edited_one_does_not() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let leaves = vec![leaf("a", 4)];
        let root = merkle_root(&leaves);
        let sig = key.sign(&head_message(1, 99, 1, &root));
        let mut h = SignedHead {
            id: 1,
            at_ms: 99,
            agents: 1,
            root: root.to_vec(),
            leaves,
            public_key: key.verifying_key().to_bytes().to_vec(),
            signature: sig.to_bytes().to_vec(),
        };
        assert_eq!(check_head(&h), Ok(()));
        let line = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<SignedHead>(&line).unwrap(), h);
        h.leaves[0].seq = 3;
        assert_eq!(check_head(&h), Err("head_root"));
        h.leaves[0].seq = 4;
        h.at_ms = 100;
        assert_eq!(check_head(&h), Err("head_signature"));
    }
}
