//! The retention archive: the signed records a `retain` run put below the agents' cuts, with
//! their checkpoints, in one file an auditor keeps and `verify --archive` reads.
//!
//! Format: a zstd stream of JSON lines. The first line is the header (`kind: "header"`,
//! `format: "gpumeter-archive"`, `version: 1`, the horizon, the head the run signed and when
//! it was written); then, per agent in id order, its `record` lines in seq order (seq,
//! prev_hash, hash, and the body as stored, all hex) and its `checkpoint` lines; the last
//! line is `end`, with the counts and the SHA-256 of every byte before it (the uncompressed
//! lines, newlines included). A file cut short, edited or reordered fails that hash or the
//! chain.
//!
//! What `verify --archive` checks, each against the ledger it verifies: the file's own
//! framing and hash; every record hashing to its stored hash from its prev_hash, and linking
//! to the record before it (the first of an agent's to the ledger's record before it); every
//! checkpoint naming the chain hash of its seq and signed by the key the agent held then;
//! and every record the ledger still holds having the same hash there. Bodies stay in the
//! ledger (retention drops derived rows only), so the archive is a copy kept apart from the
//! database, checked to be the ledger's own.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use gpumeter_proto::chain::{self, GENESIS};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::StoreError;
use crate::verify::{ChainSource, KeyEntry};

const FORMAT: &str = "gpumeter-archive";
const VERSION: u32 = 1;

/// One line of the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum Line {
    Header {
        format: String,
        version: u32,
        horizon_ms: i64,
        head_id: u64,
        created_ms: i64,
    },
    Record {
        agent_id: String,
        seq: u64,
        prev_hash: String,
        hash: String,
        body: String,
    },
    Checkpoint {
        agent_id: String,
        epoch: u64,
        seq: u64,
        chain_hash: String,
        signature: String,
    },
    End {
        records: u64,
        checkpoints: u64,
        sha256: String,
    },
}

/// What one archive run wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Written {
    pub records: u64,
    pub checkpoints: u64,
    pub bytes: u64,
}

/// Writes the archive of `ranges` (agent, seqs above, seqs up to) from `src` to `path`,
/// through a temporary file renamed into place once complete and synced.
pub fn write(
    src: &dyn ChainSource,
    path: &Path,
    ranges: &[(String, u64, u64)],
    (horizon_ms, head_id, created_ms): (i64, u64, i64),
) -> Result<Written, String> {
    let tmp = path.with_extension("partial");
    let file = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut z = zstd::Encoder::new(BufWriter::new(file), 9).map_err(|e| e.to_string())?;
    let mut hash = Sha256::new();
    let mut out = Written::default();
    let mut emit = |z: &mut zstd::Encoder<'_, BufWriter<std::fs::File>>, line: &Line| {
        let mut bytes = serde_json::to_vec(line).map_err(|e| e.to_string())?;
        bytes.push(b'\n');
        hash.update(&bytes);
        z.write_all(&bytes).map_err(|e| e.to_string())
    };
    emit(
        &mut z,
        &Line::Header {
            format: FORMAT.into(),
            version: VERSION,
            horizon_ms,
            head_id,
            created_ms,
        },
    )?;
    let mut sorted = ranges.to_vec();
    sorted.sort();
    for (agent, above, upto) in &sorted {
        // Each checkpoint goes right after the record it covers.
        let mut cps: std::collections::BTreeMap<u64, crate::verify::StoredCheckpoint> = src
            .checkpoints(agent)
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|c| c.seq > *above && c.seq <= *upto)
            .map(|c| (c.seq, c))
            .collect();
        let mut failed = None;
        src.scan_records(agent, &mut |r| {
            if failed.is_some() || r.seq <= *above || r.seq > *upto {
                return;
            }
            if let Some(why) = &r.unreadable {
                failed = Some(format!("agent {agent} record {}: {why}", r.seq));
                return;
            }
            let mut lines = vec![Line::Record {
                agent_id: agent.clone(),
                seq: r.seq,
                prev_hash: hex::encode(&r.prev_hash),
                hash: hex::encode(&r.hash),
                body: hex::encode(&r.body),
            }];
            if let Some(cp) = cps.remove(&r.seq) {
                lines.push(Line::Checkpoint {
                    agent_id: agent.clone(),
                    epoch: cp.epoch,
                    seq: cp.seq,
                    chain_hash: hex::encode(&cp.chain_hash),
                    signature: hex::encode(&cp.signature),
                });
            }
            for line in &lines {
                if let Err(e) = emit(&mut z, line) {
                    failed = Some(e);
                    return;
                }
            }
            out.records += 1;
            out.checkpoints += lines.len() as u64 - 1;
        })
        .map_err(|e| e.to_string())?;
        if let Some(e) = failed {
            return Err(e);
        }
        if let Some(seq) = cps.keys().next() {
            return Err(format!(
                "agent {agent}: checkpoint {seq} has no record in the ledger"
            ));
        }
    }
    let end = Line::End {
        records: out.records,
        checkpoints: out.checkpoints,
        sha256: hex::encode(hash.finalize()),
    };
    let mut bytes = serde_json::to_vec(&end).map_err(|e| e.to_string())?;
    bytes.push(b'\n');
    z.write_all(&bytes).map_err(|e| e.to_string())?;
    let file = z
        .finish()
        .map_err(|e| e.to_string())?
        .into_inner()
        .map_err(|e| e.to_string())?;
    file.sync_all().map_err(|e| e.to_string())?;
    out.bytes = file.metadata().map_err(|e| e.to_string())?.len();
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(out)
}

/// One archive checked against a ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ArchiveCheck {
    pub path: String,
    pub records: u64,
    pub checkpoints: u64,
    pub agents: u64,
    /// What is wrong, each naming its line (1-based) and, where it has one, agent and seq.
    pub findings: Vec<String>,
}

/// The last record of an agent read from the file: seq and hash.
type Chain = Option<(u64, [u8; 32])>;

/// Reads and checks one archive against `src` (see the module doc).
pub fn check(src: &dyn ChainSource, path: &Path) -> Result<ArchiveCheck, StoreError> {
    let mut out = ArchiveCheck {
        path: path.display().to_string(),
        ..Default::default()
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            out.findings.push(format!("cannot be opened: {e}"));
            return Ok(out);
        }
    };
    let reader = match zstd::Decoder::new(file) {
        Ok(d) => BufReader::new(d),
        Err(e) => {
            out.findings
                .push(format!("not a zstd stream ({e}): not a gpumeter archive"));
            return Ok(out);
        }
    };
    let keys: HashMap<String, Vec<u8>> = src.agents()?.into_iter().collect();
    let mut histories: HashMap<String, Vec<KeyEntry>> = HashMap::new();
    let mut chains: HashMap<String, Chain> = HashMap::new();
    let mut hash = Sha256::new();
    let mut ended = false;
    let mut header = false;
    for (i, line) in reader.split(b'\n').enumerate() {
        let n = i + 1;
        let mut bytes = match line {
            Ok(b) => b,
            Err(e) => {
                out.findings.push(format!(
                    "line {n}: cannot be read ({e}): the file is damaged"
                ));
                return Ok(out);
            }
        };
        if ended {
            out.findings
                .push(format!("line {n}: follows the end line (appended)"));
            break;
        }
        let parsed: Line = match serde_json::from_slice(&bytes) {
            Ok(l) => l,
            Err(e) => {
                out.findings
                    .push(format!("line {n}: not an archive line: {e}"));
                return Ok(out);
            }
        };
        bytes.push(b'\n');
        if !matches!(parsed, Line::End { .. }) {
            hash.update(&bytes);
        }
        match parsed {
            Line::Header {
                format, version, ..
            } => {
                if n != 1 || format != FORMAT || version != VERSION {
                    out.findings.push(format!(
                        "line {n}: a header of {format} version {version} where a {FORMAT} version {VERSION} file begins"
                    ));
                    return Ok(out);
                }
                header = true;
            }
            _ if !header => {
                out.findings
                    .push("line 1: no header: not a gpumeter archive".into());
                return Ok(out);
            }
            Line::Record {
                agent_id,
                seq,
                prev_hash,
                hash: h,
                body,
            } => {
                out.records += 1;
                let (Some(prev_hash), Some(h), Ok(body)) =
                    (hash32(&prev_hash), hash32(&h), hex::decode(&body))
                else {
                    out.findings.push(format!(
                        "line {n}: agent {agent_id} record {seq}: a hash or body is not hex"
                    ));
                    continue;
                };
                let c = chains.entry(agent_id.clone()).or_default();
                let expected_prev = match *c {
                    Some((ps, ph)) if ps + 1 == seq => Some(ph),
                    Some((ps, _)) => {
                        out.findings.push(format!(
                            "line {n}: agent {agent_id} record {seq} follows record {ps} (records missing or reordered)"
                        ));
                        None
                    }
                    None if seq == 1 => Some(GENESIS),
                    None => src
                        .record_hash_at(&agent_id, seq - 1)?
                        .and_then(|v| chain::to_hash(&v).ok()),
                };
                if expected_prev.is_some_and(|p| p != prev_hash) {
                    out.findings.push(format!(
                        "line {n}: agent {agent_id} record {seq} does not link to the record before it"
                    ));
                }
                if chain::record_hash(&prev_hash, seq, &body) != h {
                    out.findings.push(format!(
                        "line {n}: agent {agent_id} record {seq}: its hash does not match its body"
                    ));
                }
                match src.record_hash_at(&agent_id, seq)? {
                    Some(l) if l.as_slice() != h.as_slice() => out.findings.push(format!(
                        "line {n}: agent {agent_id} record {seq} differs from the ledger's"
                    )),
                    Some(_) => {}
                    None => out.findings.push(format!(
                        "line {n}: agent {agent_id} record {seq} is not in the ledger"
                    )),
                }
                *c = Some((seq, h));
            }
            Line::Checkpoint {
                agent_id,
                epoch,
                seq,
                chain_hash,
                signature,
            } => {
                out.checkpoints += 1;
                // A checkpoint follows the record it covers.
                let at = chains.get(&agent_id).copied().flatten();
                let Some(ch) = hash32(&chain_hash).filter(|h| at == Some((seq, *h))) else {
                    out.findings.push(format!(
                        "line {n}: agent {agent_id} checkpoint {seq} does not name the chain hash of the record before it"
                    ));
                    continue;
                };
                let Some(pinned) = keys.get(&agent_id) else {
                    out.findings
                        .push(format!("line {n}: agent {agent_id} is not in the ledger"));
                    continue;
                };
                if !histories.contains_key(&agent_id) {
                    histories.insert(agent_id.clone(), src.key_history(&agent_id)?);
                }
                let key = crate::verify::key_for(&histories[&agent_id], pinned, seq);
                let good = chain::verifying_key(key).is_ok_and(|vk| {
                    hex::decode(&signature).is_ok_and(|sig| {
                        chain::verify_checkpoint(&vk, &agent_id, epoch, seq, &ch, &sig).is_ok()
                    })
                });
                if !good {
                    out.findings.push(format!(
                        "line {n}: agent {agent_id} checkpoint {seq}: its signature does not verify with the agent's key"
                    ));
                }
            }
            Line::End {
                records,
                checkpoints,
                sha256,
            } => {
                ended = true;
                let got = hex::encode(hash.clone().finalize());
                if sha256 != got || records != out.records || checkpoints != out.checkpoints {
                    out.findings.push(format!(
                        "line {n}: the end line's hash or counts do not match the lines before it (edited)"
                    ));
                }
            }
        }
    }
    if !ended && out.findings.is_empty() {
        out.findings
            .push("no end line: the file is cut short".into());
    }
    out.agents = chains.len() as u64;
    Ok(out)
}

fn hash32(s: &str) -> Option<[u8; 32]> {
    hex::decode(s).ok()?.try_into().ok()
}
