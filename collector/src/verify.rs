//! Ledger verification: re-checks every agent's whole chain as stored — each record's hash
//! against its exact body bytes, each link to the record before it, each checkpoint against
//! the chain and the agent's pinned key — and reports gaps, rewrites, reordering, truncation
//! and bad signatures. Pure over a [`ChainSource`], so it runs on a live collector and on a
//! copy of the database handed to an auditor alike.
//!
//! What it can prove: any change to a stored body, hash, link or order, any record missing
//! below the last checkpoint, and any checkpoint not signed by the key the agent held for that
//! seq (its key history). What it cannot prove from the ledger alone: records and their
//! checkpoints both removed from the end of a chain, or a whole agent removed, or everything
//! re-signed under a new key (the collector's signed heads, kept by auditors, show those: see
//! `crate::heads`; and the agent's acknowledged point, which it names in its Hello).
//!
//! Derived rows (`windows`, `window_principals`, `events`, `window_flags`) are what reports
//! read, so they are checked as strictly as the bodies: each is re-derived from its record's
//! signed body and compared, keyed by (agent_id, seq). An edited derived row is
//! `derived_mismatch`, a record without its rows `derived_missing`, a row without its record
//! (or of another kind) `derived_orphan`. Windows flagged `impossible` must be exactly those
//! `crate::sanity` finds impossible; windows that count must not overlap on a card, and each
//! window flagged `overlap` must overlap one that counts. The flagged windows are listed.

use std::collections::HashMap;

use gpumeter_proto::chain::{self, GENESIS, Hash};
use serde::Serialize;

use crate::store::{PrincipalRow, RecordContent, StoreError, WindowRow};

/// One stored record as verification needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRow {
    pub seq: u64,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
    pub body: Vec<u8>,
    /// Why the body could not be read back from where it is stored (a compressed body block
    /// that is missing or damaged); `body` is then empty.
    pub unreadable: Option<String>,
    /// The ledger keeps no copy of this record's prev_hash: it is the hash of the record
    /// stored before it, so a mismatch cannot tell this record's edit from that one's
    /// replacement.
    pub prev_derived: bool,
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
    /// An agent's records and derived rows interleaved in ascending seq order: each record
    /// first, then the derived rows of its seq; a derived row whose seq has no record comes
    /// at its own seq. A source that keeps no derived rows yields only records (then every
    /// window and event record is reported `derived_missing`: it fails closed).
    fn scan(&self, agent_id: &str, visit: &mut dyn FnMut(ScanItem)) -> Result<(), StoreError> {
        self.scan_records(agent_id, &mut |r| visit(ScanItem::Record(r)))
    }
    /// Every key the agent has had, oldest first. Empty: only the pinned key is known.
    fn key_history(&self, agent_id: &str) -> Result<Vec<KeyEntry>, StoreError> {
        let _ = agent_id;
        Ok(Vec::new())
    }
    /// Each card's total memory as first reported (the sanity bound of memory used).
    fn card_memory(&self) -> Result<HashMap<String, u64>, StoreError> {
        Ok(HashMap::new())
    }
    /// Agents that have derived rows, whether or not they have an agents row.
    fn derived_agents(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
    /// Every window that counts (no flag) and every `overlap`-flagged window, ordered by card
    /// then start: the card-time check.
    fn card_windows(&self, visit: &mut dyn FnMut(CardWindowRef)) -> Result<(), StoreError> {
        let _ = visit;
        Ok(())
    }
    /// Hash of an agent's stored record at `seq` (for heads). `None` when not held.
    fn record_hash_at(&self, agent_id: &str, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let _ = (agent_id, seq);
        Ok(None)
    }
    /// An agent's flagged windows, by seq.
    fn flagged(&self, agent_id: &str) -> Result<Vec<FlaggedWindow>, StoreError> {
        let _ = agent_id;
        Ok(Vec::new())
    }
    /// Rollup rows that differ from what the stored windows give (re-derived; see
    /// [`crate::rollup`]). A source without rollups has none.
    fn rollup_mismatches(&self) -> Result<Vec<crate::rollup::RollupMismatch>, StoreError> {
        Ok(Vec::new())
    }
    /// What retention dropped: each agent's cut and horizon, and the pinned card-hours. The
    /// SQL behind [`ChainSource::rollup_mismatches`] leaves out each agent's rows before its
    /// horizon; verification re-derives those from the bodies.
    fn retention(&self) -> Result<crate::retention::Retention, StoreError> {
        Ok(Default::default())
    }
    /// Seqs of an agent's windows reported for a card another host held.
    fn disputed(&self, agent_id: &str) -> Result<std::collections::HashSet<u64>, StoreError> {
        let _ = agent_id;
        Ok(Default::default())
    }
    /// An agent's stored rollup rows (both levels) whose bucket starts before `until_ms`.
    fn rollups_before(
        &self,
        agent_id: &str,
        until_ms: i64,
    ) -> Result<Vec<crate::rollup::RollupRow>, StoreError> {
        let _ = (agent_id, until_ms);
        Ok(Vec::new())
    }
}

/// One entry of an agent's key history: `public_key` signs checkpoints from `from_seq` until
/// the next entry's `from_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    pub public_key: Vec<u8>,
    pub from_seq: u64,
    pub at_ms: i64,
    /// Who made the change ("first use" for a key pinned on first contact).
    pub actor: String,
    pub reason: String,
}

/// A derived row as stored, keyed by the record it came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Derived {
    /// The `windows` row (principals empty).
    Window(WindowRow),
    /// The `window_principals` rows of one seq.
    Principals(Vec<PrincipalRow>),
    Event(crate::store::EventRow),
    /// The flags of one seq other than `overlap` (checked across cards instead).
    Flags(Vec<String>),
}

impl Derived {
    pub fn table(&self) -> &'static str {
        match self {
            Derived::Window(_) => "windows",
            Derived::Principals(_) => "window_principals",
            Derived::Event(_) => "events",
            Derived::Flags(_) => "window_flags",
        }
    }
}

/// What [`ChainSource::scan`] yields.
// Items are visited one at a time and never held in bulk, so the size gap costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum ScanItem {
    Record(ChainRow),
    Derived { seq: u64, row: Derived },
}

/// A window in the card-time check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardWindowRef {
    pub gpu_uuid: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub agent_id: String,
    pub seq: u64,
    /// Flagged `overlap`, naming the window it overlaps.
    pub overlap_of: Option<(String, u64)>,
}

/// Something wrong with a stored chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Finding {
    /// Records `from..=to` are not in the ledger.
    Gap { from: u64, to: u64 },
    /// The stored hash does not match the stored body: the body or hash was edited.
    Rewritten { seq: u64 },
    /// The record's body cannot be read back (its compressed block is missing or damaged).
    Unreadable { seq: u64, why: String },
    /// A record whose row keeps no prev_hash does not hash to its stored value from the
    /// record stored before it: it was edited, or the one before it was replaced.
    RewrittenOrReplaced { seq: u64 },
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
    /// A record's derived row differs from what its signed body says.
    DerivedMismatch { seq: u64, table: &'static str },
    /// A record lacks a derived row its body calls for.
    DerivedMissing { seq: u64, table: &'static str },
    /// A derived row with no record of its kind behind it (inserted).
    DerivedOrphan { seq: u64, table: &'static str },
    /// Two windows that both count cover the same card time.
    OverlapCounted {
        seq: u64,
        gpu_uuid: String,
        other_agent_id: String,
        other_seq: u64,
    },
    /// A window flagged `overlap` overlaps no counted window it names.
    OverlapUnfounded { seq: u64 },
    /// A rollup row (derived from the windows, read by reports) differs from what the
    /// agent's windows give: `problem` is "differs", "missing" or "not derived".
    RollupMismatch {
        table: &'static str,
        start_ms: i64,
        gpu_uuid: String,
        problem: &'static str,
    },
}

impl Finding {
    /// The seq a finding is about (the first of a range).
    pub fn seq(&self) -> u64 {
        match self {
            Finding::Gap { from, .. } | Finding::Unsigned { from, .. } => *from,
            Finding::Truncated { checkpoint_seq, .. } => *checkpoint_seq,
            Finding::BadKey | Finding::RollupMismatch { .. } => 0,
            Finding::Rewritten { seq }
            | Finding::Unreadable { seq, .. }
            | Finding::RewrittenOrReplaced { seq }
            | Finding::BrokenLink { seq }
            | Finding::CheckpointMismatch { seq }
            | Finding::BadSignature { seq }
            | Finding::DerivedMismatch { seq, .. }
            | Finding::DerivedMissing { seq, .. }
            | Finding::DerivedOrphan { seq, .. }
            | Finding::OverlapCounted { seq, .. }
            | Finding::OverlapUnfounded { seq } => *seq,
        }
    }
}

/// A window kept as evidence but counted in no figure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlaggedWindow {
    pub seq: u64,
    /// "impossible" or "overlap".
    pub flag: String,
    pub detail: String,
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
            Finding::RewrittenOrReplaced { seq } => write!(
                f,
                "record {seq}: stored hash does not match its body and the record before it (rewritten, or the record before it replaced)"
            ),
            Finding::Unreadable { seq, why } => {
                write!(f, "record {seq}: its body cannot be read back: {why}")
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
            Finding::DerivedMismatch { seq, table } => write!(
                f,
                "record {seq}: its {table} row differs from its signed body"
            ),
            Finding::DerivedMissing { seq, table } => {
                write!(f, "record {seq}: its {table} row is missing")
            }
            Finding::DerivedOrphan { seq, table } => write!(
                f,
                "record {seq}: a {table} row has no record of its kind behind it (inserted)"
            ),
            Finding::OverlapCounted {
                seq,
                gpu_uuid,
                other_agent_id,
                other_seq,
            } => write!(
                f,
                "record {seq}: counts card time of {gpu_uuid} that {other_agent_id} seq {other_seq} also counts"
            ),
            Finding::OverlapUnfounded { seq } => write!(
                f,
                "record {seq}: flagged as overlapping a window it does not overlap"
            ),
            Finding::RollupMismatch {
                table,
                start_ms,
                gpu_uuid,
                problem,
            } => match *problem {
                "missing" => write!(
                    f,
                    "{table}: the row of {gpu_uuid} at {start_ms} that its windows give is missing"
                ),
                "not derived" => write!(
                    f,
                    "{table}: a row of {gpu_uuid} at {start_ms} has no windows behind it (inserted)"
                ),
                _ => write!(
                    f,
                    "{table}: the row of {gpu_uuid} at {start_ms} differs from what its windows give"
                ),
            },
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
    /// Windows kept but counted in no figure (not a failure: they are signed evidence).
    pub flagged: Vec<FlaggedWindow>,
}

/// Verification of the whole ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct VerifyReport {
    pub agents: Vec<AgentVerification>,
    pub records: u64,
    pub ok: bool,
    /// What the auditor's heads file shows (empty without `--heads`).
    pub heads: Vec<crate::heads::HeadFinding>,
}

/// What a record's body says its derived rows must be.
fn expected_derived(body: &[u8], card_memory: &HashMap<String, u64>) -> Vec<Derived> {
    match crate::convert::decode_body(body).1 {
        RecordContent::Window(mut w) => {
            let problems =
                crate::sanity::window_problems(&w, card_memory.get(&w.gpu_uuid).copied());
            let mut principals = std::mem::take(&mut w.principals);
            principals.sort_by(|a, b| a.principal.cmp(&b.principal));
            let mut out = vec![Derived::Window(w)];
            if !principals.is_empty() {
                out.push(Derived::Principals(principals));
            }
            if !problems.is_empty() {
                out.push(Derived::Flags(vec![
                    crate::sanity::FLAG_IMPOSSIBLE.to_string(),
                ]));
            }
            out
        }
        RecordContent::Event(e) => vec![Derived::Event(e)],
        _ => Vec::new(),
    }
}

/// A derived row in comparable form: NaN (which SQLite stores as NULL) reads as absent, and
/// principals in key order.
fn canonical(d: &Derived) -> Derived {
    let nan = |v: Option<f64>| v.filter(|x| !x.is_nan());
    match d {
        Derived::Window(w) => {
            let mut w = w.clone();
            w.util_avg_pct = nan(w.util_avg_pct);
            w.util_max_pct = nan(w.util_max_pct);
            w.mem_util_avg_pct = nan(w.mem_util_avg_pct);
            w.power_avg_w = nan(w.power_avg_w);
            w.principals.clear();
            Derived::Window(w)
        }
        Derived::Principals(p) => {
            let mut p = p.clone();
            p.sort_by(|a, b| a.principal.cmp(&b.principal));
            Derived::Principals(p)
        }
        Derived::Flags(f) => {
            let mut f = f.clone();
            f.sort();
            Derived::Flags(f)
        }
        other => other.clone(),
    }
}

/// The record being checked and the derived rows it still expects.
struct Pending {
    seq: u64,
    expected: Vec<Option<Derived>>,
    /// Retention may have dropped its window rows: they are compared if present, and not
    /// missed if absent.
    dropped: bool,
}

impl Pending {
    fn finish(self, findings: &mut Vec<Finding>) {
        let dropped = self.dropped;
        for d in self
            .expected
            .into_iter()
            .flatten()
            .filter(|d| !(dropped && matches!(d, Derived::Window(_) | Derived::Principals(_))))
        {
            findings.push(Finding::DerivedMissing {
                seq: self.seq,
                table: d.table(),
            });
        }
    }
}

/// The key that signed a checkpoint at `seq`: the last history entry starting at or below it,
/// or the pinned key when there is no history.
pub(crate) fn key_for<'a>(history: &'a [KeyEntry], pinned: &'a [u8], seq: u64) -> &'a [u8] {
    history
        .iter()
        .rev()
        .find(|k| k.from_seq <= seq)
        .map_or(pinned, |k| k.public_key.as_slice())
}

/// Verifies one agent's chain and derived rows.
pub fn verify_agent(
    src: &dyn ChainSource,
    agent_id: &str,
    key: &[u8],
) -> Result<AgentVerification, StoreError> {
    let card_memory = src.card_memory()?;
    verify_agent_with(src, agent_id, key, &card_memory, &src.retention()?)
}

fn verify_agent_with(
    src: &dyn ChainSource,
    agent_id: &str,
    key: &[u8],
    card_memory: &HashMap<String, u64>,
    retention: &crate::retention::Retention,
) -> Result<AgentVerification, StoreError> {
    let mut findings = Vec::new();
    let history = src.key_history(agent_id)?;
    let mut keys: HashMap<Vec<u8>, Option<ed25519_dalek::VerifyingKey>> = HashMap::new();
    for k in history
        .iter()
        .map(|k| k.public_key.clone())
        .chain([key.to_vec()])
    {
        let vk = chain::verifying_key(&k).ok();
        keys.insert(k, vk);
    }
    if keys.get(key).is_some_and(|k| k.is_none()) {
        findings.push(Finding::BadKey);
    }
    let checkpoints = src.checkpoints(agent_id)?;
    let mut cps = checkpoints.iter().peekable();
    // Below an agent's retention horizon its rollups are re-derived here, from the bodies.
    let cut = retention.cuts.get(agent_id).copied();
    let mut fold = match cut {
        Some(c) => Some((
            crate::rollup::Fold::new(c.horizon_ms),
            src.flagged(agent_id)?
                .into_iter()
                .map(|f| f.seq)
                .collect::<std::collections::HashSet<u64>>(),
            src.disputed(agent_id)?,
        )),
        None => None,
    };
    let mut prev: Option<(u64, Hash)> = None;
    let mut first_seq = 0;
    let mut records = 0u64;
    let mut last_signed = 0u64;
    let mut pending: Option<Pending> = None;
    // A record whose body cannot be read: its derived rows cannot be checked either.
    let mut unreadable_seq = None;
    src.scan(agent_id, &mut |item| {
        let row = match item {
            ScanItem::Record(row) => row,
            ScanItem::Derived { seq, .. } if unreadable_seq == Some(seq) => return,
            ScanItem::Derived { seq, row } => {
                let table = row.table();
                let Some(p) = pending.as_mut().filter(|p| p.seq == seq) else {
                    findings.push(Finding::DerivedOrphan { seq, table });
                    return;
                };
                let Some(slot) = p
                    .expected
                    .iter_mut()
                    .find(|e| e.as_ref().is_some_and(|e| e.table() == table))
                else {
                    findings.push(Finding::DerivedOrphan { seq, table });
                    return;
                };
                let want = slot.take().map(|w| canonical(&w));
                if want != Some(canonical(&row)) {
                    findings.push(Finding::DerivedMismatch { seq, table });
                }
                return;
            }
        };
        if let Some(p) = pending.take() {
            p.finish(&mut findings);
        }
        records += 1;
        let prev_hash = chain::to_hash(&row.prev_hash).unwrap_or([0xff; 32]);
        let computed = if let Some(why) = &row.unreadable {
            // Nothing to hash: the stored hash stands in, so that the links and checkpoints
            // around it are still checked.
            findings.push(Finding::Unreadable {
                seq: row.seq,
                why: why.clone(),
            });
            unreadable_seq = Some(row.seq);
            chain::to_hash(&row.hash).unwrap_or([0xff; 32])
        } else {
            let expected = expected_derived(&row.body, card_memory);
            let mut dropped = false;
            if let Some(Derived::Window(w)) = expected.first() {
                dropped = retention.may_drop(agent_id, row.seq, &w.gpu_uuid, w.start_ms);
                if let Some((fold, uncounted, disputed)) = fold.as_mut() {
                    if w.start_ms < fold.until_ms && !uncounted.contains(&row.seq) {
                        let mut w = w.clone();
                        if let Some(Derived::Principals(p)) = expected.get(1) {
                            w.principals = p.clone();
                        }
                        fold.add(row.seq, &w, disputed.contains(&row.seq));
                    }
                }
            }
            pending = Some(Pending {
                seq: row.seq,
                expected: expected.into_iter().map(Some).collect(),
                dropped,
            });
            let computed = chain::record_hash(&prev_hash, row.seq, &row.body);
            if row.hash.as_slice() != computed.as_slice() {
                findings.push(if row.prev_derived {
                    Finding::RewrittenOrReplaced { seq: row.seq }
                } else {
                    Finding::Rewritten { seq: row.seq }
                });
            }
            computed
        };
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
            let signer = key_for(&history, key, cp.seq);
            if let Some(Some(vk)) = keys.get(signer) {
                if chain::verify_checkpoint(vk, agent_id, cp.epoch, cp.seq, &hash, &cp.signature)
                    .is_err()
                {
                    findings.push(Finding::BadSignature { seq: cp.seq });
                }
            } else if signer != key {
                // A key in the history that is not a valid key signs nothing.
                findings.push(Finding::BadSignature { seq: cp.seq });
            }
            last_signed = row.seq;
            cps.next();
        }
        // Links are checked against what is stored, so one edited record is one finding.
        prev = Some((row.seq, chain::to_hash(&row.hash).unwrap_or(computed)));
    })?;
    if let Some(p) = pending.take() {
        p.finish(&mut findings);
    }
    if let (Some((fold, _, _)), Some(c)) = (fold, cut) {
        let stored = src.rollups_before(agent_id, c.horizon_ms)?;
        for m in fold.mismatches(agent_id, stored) {
            findings.push(Finding::RollupMismatch {
                table: m.table,
                start_ms: m.start_ms,
                gpu_uuid: m.gpu_uuid,
                problem: m.problem,
            });
        }
    }
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
        flagged: src.flagged(agent_id)?,
    })
}

/// Card time counts at most once: windows that count must not overlap on a card, and each
/// window flagged `overlap` must overlap the counted window it names. Findings by agent.
///
/// One pass over the windows in card and start order, holding only what can still overlap
/// what comes next (windows are at most a day long), so memory stays flat however large the
/// ledger is.
fn check_card_time(src: &dyn ChainSource) -> Result<Vec<(String, Finding)>, StoreError> {
    /// A flagged window waiting for the counted window it names, and whether it was seen.
    struct Pending {
        w: CardWindowRef,
        founded: bool,
    }
    fn names(p: &CardWindowRef, c: &CardWindowRef) -> bool {
        p.overlap_of
            .as_ref()
            .is_some_and(|(a, s)| *a == c.agent_id && *s == c.seq)
            && crate::sanity::overlaps((p.start_ms, p.end_ms), (c.start_ms, c.end_ms))
    }
    fn resolve(pending: Vec<Pending>, out: &mut Vec<(String, Finding)>) {
        for p in pending.into_iter().filter(|p| !p.founded) {
            out.push((p.w.agent_id, Finding::OverlapUnfounded { seq: p.w.seq }));
        }
    }
    let mut out = Vec::new();
    let mut card = String::new();
    // Counted windows of the current card that end after the latest start seen.
    let mut live: Vec<CardWindowRef> = Vec::new();
    let mut pending: Vec<Pending> = Vec::new();
    src.card_windows(&mut |w| {
        if w.gpu_uuid != card {
            card = w.gpu_uuid.clone();
            live.clear();
            resolve(std::mem::take(&mut pending), &mut out);
        }
        live.retain(|c| c.end_ms > w.start_ms);
        let (done, waiting): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut pending)
            .into_iter()
            .partition(|p| p.w.end_ms <= w.start_ms);
        pending = waiting;
        resolve(done, &mut out);
        if w.overlap_of.is_some() {
            let founded = live.iter().any(|c| names(&w, c));
            pending.push(Pending { w, founded });
            return;
        }
        for c in &live {
            if crate::sanity::overlaps((c.start_ms, c.end_ms), (w.start_ms, w.end_ms)) {
                out.push((
                    w.agent_id.clone(),
                    Finding::OverlapCounted {
                        seq: w.seq,
                        gpu_uuid: w.gpu_uuid.clone(),
                        other_agent_id: c.agent_id.clone(),
                        other_seq: c.seq,
                    },
                ));
                break;
            }
        }
        for p in pending.iter_mut().filter(|p| !p.founded) {
            p.founded = names(&p.w, &w);
        }
        live.push(w);
    })?;
    resolve(pending, &mut out);
    Ok(out)
}

/// Verifies every agent's chain and derived rows, and that card time counts once.
pub fn verify(src: &dyn ChainSource) -> Result<VerifyReport, StoreError> {
    let mut report = VerifyReport {
        ok: true,
        ..Default::default()
    };
    let card_memory = src.card_memory()?;
    let retention = src.retention()?;
    let agents = src.agents()?;
    for (agent_id, key) in &agents {
        let a = verify_agent_with(src, agent_id, key, &card_memory, &retention)?;
        report.records += a.records;
        report.agents.push(a);
    }
    // Derived rows of an agent with no agents row: every one is an orphan.
    for id in src.derived_agents()? {
        if !agents.iter().any(|(a, _)| *a == id) {
            let a = verify_agent_with(src, &id, &[], &card_memory, &retention)?;
            report.agents.push(a);
        }
    }
    for (agent_id, f) in check_card_time(src)? {
        if let Some(a) = report.agents.iter_mut().find(|a| a.agent_id == agent_id) {
            a.findings.push(f);
        }
    }
    // The windows are checked against their bodies above; the rollups reports read are
    // re-derived from them. A row of an agent with no records still fails.
    for m in src.rollup_mismatches()? {
        let finding = Finding::RollupMismatch {
            table: m.table,
            start_ms: m.start_ms,
            gpu_uuid: m.gpu_uuid,
            problem: m.problem,
        };
        match report.agents.iter_mut().find(|a| a.agent_id == m.agent_id) {
            Some(a) => a.findings.push(finding),
            None => report.agents.push(AgentVerification {
                agent_id: m.agent_id,
                records: 0,
                first_seq: 0,
                last_seq: 0,
                checkpoints: 0,
                findings: vec![finding],
                flagged: vec![],
            }),
        }
    }
    for a in &report.agents {
        report.ok &= a.findings.is_empty();
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
                unreadable: None,
                prev_derived: false,
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
    fn an_unreadable_body_is_named_and_the_chain_around_it_still_checked() {
        let mut m = ledger();
        m.rows[6].body.clear();
        m.rows[6].unreadable = Some("body block 3: does not decompress".into());
        assert_eq!(
            findings(&m),
            vec![Finding::Unreadable {
                seq: 7,
                why: "body block 3: does not decompress".into()
            }]
        );
        assert!(
            Finding::Unreadable {
                seq: 7,
                why: "body block 3: does not decompress".into()
            }
            .to_string()
            .contains("record 7: its body cannot be read back: body block 3")
        );
        // Its stored hash still has to link on: an edited one breaks the next record.
        m.rows[6].hash[0] ^= 1;
        assert!(findings(&m).contains(&Finding::BrokenLink { seq: 8 }));
    }

    #[test]
    fn a_mismatch_behind_a_derived_link_names_both_possibilities() {
        // Record 8 keeps no prev_hash: it reads as record 7's stored hash.
        let mut m = ledger();
        m.rows[7].prev_derived = true;
        assert!(findings(&m).is_empty());
        // Record 7 replaced, its hash recomputed: record 8 no longer hashes from it.
        let prev = chain::to_hash(&m.rows[5].hash).unwrap();
        m.rows[6].body[0] ^= 1;
        m.rows[6].hash = chain::record_hash(&prev, 7, &m.rows[6].body).to_vec();
        m.rows[7].prev_hash = m.rows[6].hash.clone();
        assert_eq!(findings(&m), vec![Finding::RewrittenOrReplaced { seq: 8 }]);
        assert!(
            Finding::RewrittenOrReplaced { seq: 8 }
                .to_string()
                .starts_with("record 8: stored hash does not match its body")
        );
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

    struct Cards(Vec<CardWindowRef>);

    impl ChainSource for Cards {
        fn agents(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            Ok(vec![])
        }
        fn scan_records(&self, _: &str, _: &mut dyn FnMut(ChainRow)) -> Result<(), StoreError> {
            Ok(())
        }
        fn checkpoints(&self, _: &str) -> Result<Vec<StoredCheckpoint>, StoreError> {
            Ok(vec![])
        }
        fn card_windows(&self, visit: &mut dyn FnMut(CardWindowRef)) -> Result<(), StoreError> {
            let mut w = self.0.clone();
            w.sort_by(|a, b| (&a.gpu_uuid, a.start_ms).cmp(&(&b.gpu_uuid, b.start_ms)));
            w.into_iter().for_each(visit);
            Ok(())
        }
    }

    fn win(
        gpu: &str,
        minute: i64,
        agent: &str,
        seq: u64,
        of: Option<(&str, u64)>,
    ) -> CardWindowRef {
        CardWindowRef {
            gpu_uuid: gpu.into(),
            start_ms: minute * 60_000,
            end_ms: (minute + 1) * 60_000,
            agent_id: agent.into(),
            seq,
            overlap_of: of.map(|(a, s)| (a.into(), s)),
        }
    }

    #[test]
    fn card_time_counts_once_and_every_overlap_flag_is_founded() {
        // Flagged copies of minutes 0 and 1, one after its target and one sorted before it
        // (same start); another card's window at the same time is no overlap.
        let ok = Cards(vec![
            win("g1", 0, "a", 1, None),
            win("g1", 1, "a", 2, None),
            win("g1", 0, "a", 11, Some(("a", 1))),
            win("g1", 1, "b", 1, Some(("a", 2))),
            win("g2", 0, "b", 2, None),
        ]);
        assert_eq!(check_card_time(&ok).unwrap(), vec![]);
        // An overlap flag dropped: two windows count for minute 0.
        let double = Cards(vec![
            win("g1", 0, "a", 1, None),
            win("g1", 0, "a", 11, None),
        ]);
        let f = check_card_time(&double).unwrap();
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(matches!(&f[0].1, Finding::OverlapCounted { .. }), "{f:?}");
        // A flag naming a window that does not overlap it (or none at all).
        let forged = Cards(vec![
            win("g1", 0, "a", 1, None),
            win("g1", 5, "a", 6, Some(("a", 1))),
            win("g2", 0, "a", 7, Some(("a", 1))),
        ]);
        let f = check_card_time(&forged).unwrap();
        assert_eq!(
            f,
            vec![
                ("a".to_string(), Finding::OverlapUnfounded { seq: 6 }),
                ("a".to_string(), Finding::OverlapUnfounded { seq: 7 })
            ]
        );
    }
}
