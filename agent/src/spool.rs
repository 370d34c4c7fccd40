//! The durable spool: every record is on local disk, fsync'd, before it is sent, and leaves the
//! disk only after the collector's ack covers it. A restarted agent resumes from here with the
//! same sequence and chain head.
//!
//! # Format
//!
//! One directory holds:
//!
//! - **segment files** `seg-<first seq, 20 digits>.log`, each a run of frames
//!   `[magic u32 | len u32 | crc32c(payload) u32 | payload]` where `payload` is
//!   `seq u64 | prev_hash [32] | body` (all integers big-endian, `len` is the payload length,
//!   the magic is `0x4750_5352`, "GPSR"). A segment is closed once the next frame would take it
//!   past `segment_bytes` (a record larger than that gets a segment of its own). The file name
//!   only orders segments; the frames say which seqs they hold.
//! - **`state`**, 64 bytes: `"GPMSPOOL" | version u32 (1) | epoch u64 | acked seq u64 |
//!   acked hash [32] | crc32c(all before) u32`. It is replaced atomically: written to
//!   `state.tmp`, fsync'd, renamed over `state`, then the directory is fsync'd.
//!
//! # Rules
//!
//! - Records are appended strictly in seq order and each must link to the chain head
//!   (`prev_hash` is the hash of the record before, see [`gpumeter_proto::chain`]).
//!   [`Spool::append`] fsyncs everything it wrote (and the directory when it created a segment)
//!   before it returns, so a record the uplink may send is always on disk first.
//! - An ack is written to `state` before any segment is deleted, and a segment is deleted only
//!   when every record in it is at or below the acked seq. Records at or below the acked seq that
//!   are still on disk (the rest of a partly acked segment, or a crash between the state write and
//!   the delete) are ignored.
//! - Full: when an append would take the segments past `max_bytes` it is refused with
//!   [`SpoolError::Full`] and nothing is written; the caller decides (block, or a gap record).
//! - Corrupt data never stops `open`: every segment is scanned, each frame's checksum is checked,
//!   seqs must ascend and each record must link to the one before. Undecodable bytes at the end
//!   of the last segment are a torn write (an append that never returned) and are truncated away.
//!   Undecodable bytes elsewhere are skipped: scanning resumes at the next frame that decodes,
//!   and the records lost show as a gap in seq (counted in [`Recovery::corrupt_records`]); the
//!   collector sees the same gap and records it. Frames whose seq goes backwards are skipped too.
//!   Truncating a torn tail makes the spool reuse that seq: if the lost frame had been sent, the
//!   collector will see different bytes for it and raise an equivocation alarm, which is the
//!   honest outcome.
//! - A missing or unreadable `state` beside existing segments loses the acked point and the
//!   epoch: the spool then treats every record it finds as unacked (resending is harmless, the
//!   collector's ingest is idempotent), takes epoch 1, and says so in
//!   [`Recovery::state_lost`] so the uplink can reconcile with the collector.
//! - Corruption that appears after `open` (the disk rotting under a running agent) is skipped the
//!   same way by [`Spool::read_from`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use gpumeter_proto::chain::{self, GENESIS};
use tracing::{debug, error, warn};

/// A chain hash.
pub type Hash = chain::Hash;

/// Largest record body the spool accepts. Real bodies are well under a kilobyte; the bound keeps a
/// corrupt length field from making `open` or `read_from` allocate gigabytes.
pub const MAX_BODY_BYTES: usize = 16 << 20;

const FRAME_MAGIC: u32 = 0x4750_5352;
const FRAME_HEADER: usize = 12;
/// seq + prev_hash in front of the body.
const PAYLOAD_FIXED: usize = 8 + 32;
const MAX_PAYLOAD: usize = PAYLOAD_FIXED + MAX_BODY_BYTES;
/// One index entry per this many records keeps the index at a few bytes per kilobyte of
/// records while a lookup reads at most this many frames.
const INDEX_EVERY: u64 = 64;

const STATE_FILE: &str = "state";
const STATE_TMP: &str = "state.tmp";
const STATE_MAGIC: &[u8; 8] = b"GPMSPOOL";
const STATE_VERSION: u32 = 1;
const STATE_LEN: usize = 8 + 4 + 8 + 8 + 32 + 4;

/// One spooled record, exactly as it will be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledRecord {
    pub seq: u64,
    pub prev_hash: Hash,
    pub body: Vec<u8>,
}

impl SpooledRecord {
    /// This record's chain hash.
    pub fn hash(&self) -> Hash {
        chain::record_hash(&self.prev_hash, self.seq, &self.body)
    }

    fn frame_len(&self) -> u64 {
        (FRAME_HEADER + PAYLOAD_FIXED + self.body.len()) as u64
    }

    fn encode_frame(&self, out: &mut Vec<u8>) {
        let payload_len = PAYLOAD_FIXED + self.body.len();
        let start = out.len();
        out.extend_from_slice(&FRAME_MAGIC.to_be_bytes());
        // The body was checked against MAX_BODY_BYTES, so the length fits in a u32.
        out.extend_from_slice(&(payload_len as u32).to_be_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.prev_hash);
        out.extend_from_slice(&self.body);
        let crc = crc32c(&out[start + FRAME_HEADER..]);
        out[start + 8..start + 12].copy_from_slice(&crc.to_be_bytes());
    }
}

/// Where the spool lives and how big it may grow.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Cap on the bytes of all segment files together.
    pub max_bytes: u64,
    /// A segment is closed once the next frame would take it past this size.
    pub segment_bytes: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("spool"),
            max_bytes: 1 << 30,
            segment_bytes: 8 << 20,
        }
    }
}

/// What [`Spool::open`] found on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Unacked records recovered.
    pub records: u64,
    /// Records lost or rejected: seqs missing behind undecodable bytes, frames whose seq went
    /// backwards, and records whose `prev_hash` does not link to the record before.
    pub corrupt_records: u64,
    /// Bytes of a partly written last frame that were truncated away.
    pub torn_tail_bytes: u64,
    /// Segment files removed because nothing unacked in them was left, or skipped because they
    /// could not be read.
    pub dropped_segments: Vec<String>,
    /// The directory had no spool state at all.
    pub fresh: bool,
    /// Segments were there but the state file was missing or did not decode: the acked point was
    /// taken as just before the first record found and the epoch reset to 1.
    pub state_lost: bool,
}

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("spool full: appending would hold {bytes} bytes, over the limit of {limit}")]
    Full { bytes: u64, limit: u64 },
    #[error("spool file {path} is corrupt at offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("record seq {seq} appended out of order, expected seq {expected}")]
    OutOfOrder { seq: u64, expected: u64 },
    #[error("record seq {seq} names prev_hash {got} but the spool head is {expected}")]
    BrokenChain {
        seq: u64,
        got: String,
        expected: String,
    },
    #[error("record seq {seq} has a {len} byte body, over the limit of {limit}")]
    RecordTooLarge { seq: u64, len: usize, limit: usize },
    #[error("ack for seq {seq} names hash {got} but the spooled record has {expected}")]
    AckMismatch {
        seq: u64,
        got: String,
        expected: String,
    },
    #[error("cannot start a new epoch: {pending} records are not acked yet")]
    NotEmpty { pending: u64 },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One segment file as far as the spool trusts it.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    last_seq: u64,
    /// Bytes of it the spool knows; reads stop here.
    len: u64,
    records: u64,
    /// `(seq, offset)` of every [`INDEX_EVERY`]th record, and of the first record after each
    /// skipped region; never empty.
    index: Vec<(u64, u64)>,
    /// Byte ranges `[start, end)` that open skipped (undecodable or out of order).
    skip: Vec<(u64, u64)>,
}

impl Segment {
    fn push_record(&mut self, seq: u64, offset: u64, force_index: bool) {
        if self.records % INDEX_EVERY == 0 || force_index {
            self.index.push((seq, offset));
        }
        self.records += 1;
        self.last_seq = seq;
    }
}

/// The durable spool. See the module docs for the format and the rules.
#[derive(Debug)]
pub struct Spool {
    cfg: SpoolConfig,
    epoch: u64,
    acked: (u64, Hash),
    head: (u64, Hash),
    /// Segments in seq order.
    segments: Vec<Segment>,
    /// Open for appending: always the last of `segments`.
    active: Option<File>,
    bytes: u64,
    /// Seq ranges above the acked seq that open found missing (corruption), sorted.
    missing: Vec<(u64, u64)>,
}

impl Spool {
    /// Opens the spool in `cfg.dir` (created if missing), recovering whatever decodes.
    pub fn open(cfg: SpoolConfig) -> Result<(Spool, Recovery), SpoolError> {
        let dir = cfg.dir.clone();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        // A state.tmp is a write that never got renamed; the state it carried was not promised.
        let tmp = dir.join(STATE_TMP);
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(path = %tmp.display(), error = %e, "could not remove stale spool state")
            }
        }

        let state_path = dir.join(STATE_FILE);
        let state = read_state(&state_path)?;
        let files = list_segments(&dir)?;
        let mut rec = Recovery {
            fresh: matches!(state, StateRead::Missing) && files.is_empty(),
            ..Recovery::default()
        };

        let (epoch, mut acked) = match &state {
            StateRead::Ok(s) => (s.epoch, Some((s.acked_seq, s.acked_hash))),
            StateRead::Missing if files.is_empty() => (1, Some((0, GENESIS))),
            StateRead::Missing => {
                error!(path = %state_path.display(), "spool state missing beside segments; resending everything found");
                rec.state_lost = true;
                (1, None)
            }
            StateRead::Unreadable(reason) => {
                error!(path = %state_path.display(), reason = %reason, "spool state unreadable; resending everything found");
                rec.state_lost = true;
                (1, None)
            }
        };

        let mut segments = Vec::new();
        let mut missing = Vec::new();
        // The last record accepted, or `acked` while none is.
        let mut cursor = acked;
        for (i, (name, path)) in files.iter().enumerate() {
            let is_last = i + 1 == files.len();
            let buf = match fs::read(path) {
                Ok(b) => b,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "spool segment unreadable; skipping it");
                    rec.dropped_segments.push(name.clone());
                    continue;
                }
            };
            let mut seg = Segment {
                path: path.clone(),
                last_seq: 0,
                len: buf.len() as u64,
                records: 0,
                index: Vec::new(),
                skip: Vec::new(),
            };
            let mut after_skip = false;
            let mut torn_at = None;
            for item in FrameScanner::new(&buf) {
                match item {
                    Scanned::Bad { start, end } => {
                        if is_last && end == buf.len() {
                            torn_at = Some(start);
                            rec.torn_tail_bytes = (end - start) as u64;
                            warn!(path = %path.display(), offset = start, bytes = end - start, "spool segment has a torn tail; truncating it");
                        } else {
                            warn!(path = %path.display(), offset = start, bytes = end - start, "spool segment has bytes that do not decode; skipping them");
                            seg.skip.push((start as u64, end as u64));
                            after_skip = true;
                        }
                    }
                    Scanned::Frame {
                        offset,
                        end,
                        seq,
                        prev_hash,
                        body,
                    } => {
                        let (cseq, chash) = match cursor {
                            Some(c) => c,
                            None if seq >= 1 => {
                                // State lost: the first record found marks the acked point.
                                let a = (seq - 1, prev_hash);
                                acked = Some(a);
                                cursor = Some(a);
                                a
                            }
                            None => {
                                warn!(path = %path.display(), offset, "spool frame has seq 0; skipping it");
                                rec.corrupt_records += 1;
                                seg.skip.push((offset as u64, end as u64));
                                after_skip = true;
                                continue;
                            }
                        };
                        let acked_seq = acked.map_or(0, |a| a.0);
                        if seq <= acked_seq {
                            continue;
                        }
                        if seq <= cseq {
                            warn!(path = %path.display(), offset, seq, after = cseq, "spool record out of order; skipping it");
                            rec.corrupt_records += 1;
                            seg.skip.push((offset as u64, end as u64));
                            after_skip = true;
                            continue;
                        }
                        if seq > cseq + 1 {
                            warn!(path = %path.display(), offset, from = cseq + 1, to = seq - 1, "spool records missing");
                            rec.corrupt_records += seq - cseq - 1;
                            missing.push((cseq + 1, seq - 1));
                        } else if prev_hash != chash {
                            warn!(path = %path.display(), offset, seq, "spool record does not link to the record before");
                            rec.corrupt_records += 1;
                        }
                        cursor = Some((seq, chain::record_hash(&prev_hash, seq, body)));
                        seg.push_record(seq, offset as u64, after_skip);
                        after_skip = false;
                        rec.records += 1;
                    }
                }
            }
            if let Some(at) = torn_at {
                seg.len = at as u64;
                if seg.records > 0 {
                    truncate(path, seg.len)?;
                }
            }
            if seg.records == 0 {
                // Nothing unacked left in it: acked, empty, or all of it unusable.
                match fs::remove_file(path) {
                    Ok(()) => {
                        debug!(path = %path.display(), "removed spool segment with nothing unacked")
                    }
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "could not remove spool segment")
                    }
                }
                rec.dropped_segments.push(name.clone());
                continue;
            }
            segments.push(seg);
        }

        let acked = acked.unwrap_or((0, GENESIS));
        let head = cursor.unwrap_or(acked);
        let bytes = segments.iter().map(|s| s.len).sum();
        if rec.fresh || rec.state_lost {
            write_state(&dir, epoch, acked.0, &acked.1)?;
        }
        if !rec.dropped_segments.is_empty() {
            sync_dir(&dir)?;
        }
        let spool = Spool {
            cfg,
            epoch,
            acked,
            head,
            segments,
            active: None,
            bytes,
            missing,
        };
        Ok((spool, rec))
    }

    /// Appends records in seq order (each seq must be last_seq+1 and prev_hash must equal the
    /// current head — returns [`SpoolError::OutOfOrder`] / [`SpoolError::BrokenChain`]
    /// otherwise); all are fsync'd before it returns, one fsync per file touched. Returns
    /// [`SpoolError::Full`] (writing nothing) if the cap would be exceeded.
    pub fn append(&mut self, records: &[SpooledRecord]) -> Result<(), SpoolError> {
        if records.is_empty() {
            return Ok(());
        }
        let (mut seq, mut head) = self.head;
        let mut need = 0u64;
        for r in records {
            if r.seq != seq + 1 {
                return Err(SpoolError::OutOfOrder {
                    seq: r.seq,
                    expected: seq + 1,
                });
            }
            if r.prev_hash != head {
                return Err(SpoolError::BrokenChain {
                    seq: r.seq,
                    got: hex::encode(r.prev_hash),
                    expected: hex::encode(head),
                });
            }
            if r.body.len() > MAX_BODY_BYTES {
                return Err(SpoolError::RecordTooLarge {
                    seq: r.seq,
                    len: r.body.len(),
                    limit: MAX_BODY_BYTES,
                });
            }
            seq = r.seq;
            head = r.hash();
            need += r.frame_len();
        }
        if self.bytes + need > self.cfg.max_bytes {
            return Err(SpoolError::Full {
                bytes: self.bytes + need,
                limit: self.cfg.max_bytes,
            });
        }

        let chunks = self.plan(records);
        match self.write_chunks(&chunks) {
            Ok(new_active) => {
                self.commit(chunks, new_active, (seq, head), need);
                Ok(())
            }
            Err(e) => {
                // Whatever reached the disk lies beyond what the spool knows, so reads never see
                // it and a reopen truncates or skips it; a fresh segment keeps later appends off
                // it.
                self.active = None;
                Err(e)
            }
        }
    }

    /// Up to `max` records with seq >= `from` (and above the acked seq), in order, read from
    /// disk. Bytes that stopped decoding since `open` are skipped with a warning.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<SpooledRecord>, SpoolError> {
        let from = from.max(self.acked.0.saturating_add(1));
        let mut out = Vec::new();
        if max == 0 || from > self.head.0 {
            return Ok(out);
        }
        let start = self.segments.partition_point(|s| s.last_seq < from);
        for seg in &self.segments[start..] {
            if out.len() >= max {
                break;
            }
            self.read_segment(seg, from, max, &mut out)?;
        }
        Ok(out)
    }

    fn read_segment(
        &self,
        seg: &Segment,
        from: u64,
        max: usize,
        out: &mut Vec<SpooledRecord>,
    ) -> Result<(), SpoolError> {
        let i = seg.index.partition_point(|&(s, _)| s <= from);
        let mut off = match i {
            0 => seg.index.first().map_or(0, |e| e.1),
            _ => seg.index[i - 1].1,
        };
        let path = &seg.path;
        let file = File::open(path).map_err(io_err(path))?;
        let mut rd = BufReader::with_capacity(64 << 10, file);
        rd.seek(SeekFrom::Start(off)).map_err(io_err(path))?;
        let floor = from.max(out.last().map_or(0, |r| r.seq + 1));
        while off < seg.len && out.len() < max {
            if let Some(&(_, end)) = seg.skip.iter().find(|&&(s, _)| s == off) {
                off = end;
                rd.seek(SeekFrom::Start(off)).map_err(io_err(path))?;
                continue;
            }
            match read_frame(&mut rd, seg.len - off).map_err(io_err(path))? {
                Ok(r) => {
                    off += r.frame_len();
                    if r.seq > seg.last_seq {
                        break;
                    }
                    if r.seq >= floor && out.last().is_none_or(|l| r.seq > l.seq) {
                        out.push(r);
                    }
                }
                Err(reason) => {
                    warn!(path = %path.display(), offset = off, reason = %reason, "spool segment changed since open; salvaging what decodes");
                    return self.salvage(seg, off, floor, max, out);
                }
            }
        }
        Ok(())
    }

    /// Reads the rest of a segment whose bytes rotted after `open`, keeping what decodes.
    fn salvage(
        &self,
        seg: &Segment,
        off: u64,
        floor: u64,
        max: usize,
        out: &mut Vec<SpooledRecord>,
    ) -> Result<(), SpoolError> {
        let path = &seg.path;
        let mut file = File::open(path).map_err(io_err(path))?;
        file.seek(SeekFrom::Start(off)).map_err(io_err(path))?;
        let mut buf = Vec::new();
        file.take(seg.len - off)
            .read_to_end(&mut buf)
            .map_err(io_err(path))?;
        for item in FrameScanner::new(&buf) {
            if out.len() >= max {
                break;
            }
            let Scanned::Frame {
                seq,
                prev_hash,
                body,
                ..
            } = item
            else {
                continue;
            };
            if seq >= floor && seq <= seg.last_seq && out.last().is_none_or(|l| seq > l.seq) {
                out.push(SpooledRecord {
                    seq,
                    prev_hash,
                    body: body.to_vec(),
                });
            }
        }
        Ok(())
    }

    /// The collector holds everything <= `seq` durably: persists that (state file replaced
    /// atomically) and deletes segment files whose records are all <= `seq`. An ack beyond the
    /// head or at or below the current ack is ignored. An ack whose hash differs from the spooled
    /// record's is refused with [`SpoolError::AckMismatch`].
    pub fn ack(&mut self, seq: u64, hash: Hash) -> Result<(), SpoolError> {
        if seq <= self.acked.0 || seq > self.head.0 {
            debug!(
                seq,
                acked = self.acked.0,
                head = self.head.0,
                "ignoring ack outside the spool"
            );
            return Ok(());
        }
        let ours = if seq == self.head.0 {
            Some(self.head.1)
        } else {
            self.read_from(seq, 1)?
                .first()
                .filter(|r| r.seq == seq)
                .map(SpooledRecord::hash)
        };
        match ours {
            Some(h) if h != hash => {
                return Err(SpoolError::AckMismatch {
                    seq,
                    got: hex::encode(hash),
                    expected: hex::encode(h),
                });
            }
            Some(_) => {}
            None => warn!(
                seq,
                "ack names a record the spool lost; taking the collector's hash"
            ),
        }

        write_state(&self.cfg.dir, self.epoch, seq, &hash)?;
        self.acked = (seq, hash);
        self.missing.retain_mut(|r| {
            r.0 = r.0.max(seq + 1);
            r.0 <= r.1
        });
        let covered = self
            .segments
            .iter()
            .take_while(|s| s.last_seq <= seq)
            .count();
        let mut removed = 0;
        for seg in &self.segments[..covered] {
            match fs::remove_file(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    // It stays listed, and the next ack tries again.
                    warn!(path = %seg.path.display(), error = %e, "could not remove acked spool segment");
                    break;
                }
            }
            removed += 1;
        }
        if removed == self.segments.len() {
            self.active = None;
        }
        for seg in self.segments.drain(..removed) {
            self.bytes -= seg.len;
        }
        Ok(())
    }

    /// Last seq written and its hash; the acked seq and hash if nothing is unacked;
    /// `(0, GENESIS)` for a new spool.
    pub fn head(&self) -> (u64, Hash) {
        self.head
    }

    /// Highest seq the collector holds durably, and its hash.
    pub fn acked(&self) -> (u64, Hash) {
        self.acked
    }

    /// Seq of the oldest record not acked yet.
    pub fn oldest_unacked(&self) -> Option<u64> {
        if self.pending() == 0 {
            return None;
        }
        let mut s = self.acked.0 + 1;
        for &(a, b) in &self.missing {
            if a <= s && s <= b {
                s = b + 1;
            }
        }
        Some(s)
    }

    /// Records written but not acked.
    pub fn pending(&self) -> u64 {
        let lost: u64 = self.missing.iter().map(|&(a, b)| b - a + 1).sum();
        self.head.0 - self.acked.0 - lost
    }

    /// Bytes of segment files on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Segment files on disk.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Epoch of this spool's chain: 1 for a fresh spool.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Starts a new epoch on an empty spool: the next append must be `seq_base + 1` with
    /// `prev_hash == head`. Used when the agent lost its spool and continues after what the
    /// collector acknowledged.
    pub fn start_epoch(&mut self, epoch: u64, seq_base: u64, head: Hash) -> Result<(), SpoolError> {
        let pending = self.pending();
        if pending > 0 {
            return Err(SpoolError::NotEmpty { pending });
        }
        // Acked leftovers go first: under a lower seq_base they would read as unacked.
        self.active = None;
        while let Some(seg) = self.segments.first() {
            match fs::remove_file(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&seg.path)(e)),
            }
            self.bytes -= seg.len;
            self.segments.remove(0);
        }
        write_state(&self.cfg.dir, epoch, seq_base, &head)?;
        self.epoch = epoch;
        self.acked = (seq_base, head);
        self.head = (seq_base, head);
        self.missing.clear();
        Ok(())
    }

    /// Splits encoded frames into per-segment chunks, continuing the active segment first.
    fn plan(&self, records: &[SpooledRecord]) -> Vec<Chunk> {
        let mut chunks: Vec<Chunk> = Vec::new();
        if let (Some(_), Some(last)) = (&self.active, self.segments.last()) {
            chunks.push(Chunk {
                new_first_seq: None,
                base: last.len,
                frames: Vec::new(),
                entries: Vec::new(),
            });
        }
        for r in records {
            let flen = r.frame_len();
            let roll = chunks.last().is_none_or(|c| {
                let used = c.base + c.frames.len() as u64;
                used > 0 && used + flen > self.cfg.segment_bytes
            });
            if roll {
                chunks.push(Chunk {
                    new_first_seq: Some(r.seq),
                    base: 0,
                    frames: Vec::new(),
                    entries: Vec::new(),
                });
            }
            if let Some(c) = chunks.last_mut() {
                c.entries.push((r.seq, c.base + c.frames.len() as u64));
                r.encode_frame(&mut c.frames);
            }
        }
        chunks.retain(|c| !c.entries.is_empty());
        chunks
    }

    /// Writes and fsyncs every chunk; returns the last new segment's file, which becomes the
    /// active one. On failure it undoes what it can.
    fn write_chunks(&mut self, chunks: &[Chunk]) -> Result<Option<File>, SpoolError> {
        let dir = self.cfg.dir.clone();
        let mut created: Vec<PathBuf> = Vec::new();
        let mut new_active = None;
        let mut result = Ok(());
        for c in chunks {
            let r = match c.new_first_seq {
                None => match (&mut self.active, self.segments.last()) {
                    (Some(file), Some(seg)) => write_at(file, &seg.path, c.base, &c.frames),
                    _ => Ok(()),
                },
                Some(first) => {
                    let path = dir.join(segment_name(first));
                    created.push(path.clone());
                    // Truncating is right: a file of that name is not part of the spool (its
                    // seqs are all new), so it is left over from a failed append.
                    OpenOptions::new()
                        .create(true)
                        .truncate(true)
                        .write(true)
                        .open(&path)
                        .map_err(io_err(&path))
                        .and_then(|mut f| {
                            write_at(&mut f, &path, 0, &c.frames)?;
                            new_active = Some(f);
                            Ok(())
                        })
                }
            };
            if let Err(e) = r {
                result = Err(e);
                break;
            }
        }
        if result.is_ok() && !created.is_empty() {
            result = sync_dir(&dir);
        }
        if let Err(e) = result {
            let continued = chunks.first().filter(|c| c.new_first_seq.is_none());
            if let (Some(c), Some(file), Some(seg)) =
                (continued, &self.active, self.segments.last())
            {
                if let Err(e) = file.set_len(c.base).and_then(|()| file.sync_data()) {
                    warn!(path = %seg.path.display(), error = %e, "could not undo a failed spool append");
                }
            }
            for p in created {
                if let Err(e) = fs::remove_file(&p) {
                    warn!(path = %p.display(), error = %e, "could not remove a segment of a failed spool append");
                }
            }
            return Err(e);
        }
        Ok(new_active)
    }

    fn commit(
        &mut self,
        chunks: Vec<Chunk>,
        new_active: Option<File>,
        head: (u64, Hash),
        need: u64,
    ) {
        for c in chunks {
            match c.new_first_seq {
                None => {
                    if let Some(seg) = self.segments.last_mut() {
                        for &(seq, off) in &c.entries {
                            seg.push_record(seq, off, false);
                        }
                        seg.len += c.frames.len() as u64;
                    }
                }
                Some(first) => {
                    let mut seg = Segment {
                        path: self.cfg.dir.join(segment_name(first)),
                        last_seq: first,
                        len: c.frames.len() as u64,
                        records: 0,
                        index: Vec::new(),
                        skip: Vec::new(),
                    };
                    for &(seq, off) in &c.entries {
                        seg.push_record(seq, off, false);
                    }
                    self.segments.push(seg);
                }
            }
        }
        if new_active.is_some() {
            self.active = new_active;
        }
        self.head = head;
        self.bytes += need;
    }
}

/// Frames bound for one segment file.
struct Chunk {
    /// `Some(first seq)` for a new segment, `None` to continue the active one.
    new_first_seq: Option<u64>,
    /// Offset in the file where `frames` go.
    base: u64,
    frames: Vec<u8>,
    /// `(seq, offset)` of each frame.
    entries: Vec<(u64, u64)>,
}

fn segment_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.log")
}

/// Segment files in the directory as `(name, path)`, in seq order.
fn list_segments(dir: &Path) -> Result<Vec<(String, PathBuf)>, SpoolError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let Some(digits) = name
            .strip_prefix("seg-")
            .and_then(|n| n.strip_suffix(".log"))
        else {
            continue;
        };
        if digits.len() != 20 {
            continue;
        }
        let Ok(first) = digits.parse::<u64>() else {
            continue;
        };
        found.push((first, name, entry.path()));
    }
    found.sort_by_key(|f| f.0);
    Ok(found.into_iter().map(|(_, n, p)| (n, p)).collect())
}

fn write_at(file: &mut File, path: &Path, offset: u64, bytes: &[u8]) -> Result<(), SpoolError> {
    file.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
    file.write_all(bytes).map_err(io_err(path))?;
    // fdatasync covers the new length too, which is all the metadata a reader needs.
    file.sync_data().map_err(io_err(path))
}

fn truncate(path: &Path, len: u64) -> Result<(), SpoolError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    file.set_len(len).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

/// Makes renames, creations and deletions in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    epoch: u64,
    acked_seq: u64,
    acked_hash: Hash,
}

enum StateRead {
    Missing,
    Unreadable(String),
    Ok(State),
}

fn encode_state(epoch: u64, acked_seq: u64, acked_hash: &Hash) -> [u8; STATE_LEN] {
    let mut b = [0u8; STATE_LEN];
    b[0..8].copy_from_slice(STATE_MAGIC);
    b[8..12].copy_from_slice(&STATE_VERSION.to_be_bytes());
    b[12..20].copy_from_slice(&epoch.to_be_bytes());
    b[20..28].copy_from_slice(&acked_seq.to_be_bytes());
    b[28..60].copy_from_slice(acked_hash);
    let crc = crc32c(&b[..60]);
    b[60..64].copy_from_slice(&crc.to_be_bytes());
    b
}

fn read_state(path: &Path) -> Result<StateRead, SpoolError> {
    let b = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(StateRead::Missing),
        Err(e) => return Err(io_err(path)(e)),
    };
    if b.len() >= 12 && &b[0..8] == STATE_MAGIC {
        let version = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
        if version > STATE_VERSION {
            // Written by a newer agent: guessing would risk its data, so an operator decides.
            return Err(SpoolError::Corrupt {
                path: path.to_path_buf(),
                offset: 8,
                reason: format!("state version {version} is newer than this agent understands"),
            });
        }
    }
    let Ok(b) = <[u8; STATE_LEN]>::try_from(b.as_slice()) else {
        return Ok(StateRead::Unreadable(format!(
            "{} bytes, expected {STATE_LEN}",
            b.len()
        )));
    };
    if &b[0..8] != STATE_MAGIC {
        return Ok(StateRead::Unreadable("bad magic".into()));
    }
    let crc = u32::from_be_bytes([b[60], b[61], b[62], b[63]]);
    if crc != crc32c(&b[..60]) {
        return Ok(StateRead::Unreadable("checksum mismatch".into()));
    }
    let version = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
    if version != STATE_VERSION {
        return Ok(StateRead::Unreadable(format!("unknown version {version}")));
    }
    let mut acked_hash = [0u8; 32];
    acked_hash.copy_from_slice(&b[28..60]);
    let u64_at = |i: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[i..i + 8]);
        u64::from_be_bytes(v)
    };
    Ok(StateRead::Ok(State {
        epoch: u64_at(12),
        acked_seq: u64_at(20),
        acked_hash,
    }))
}

fn write_state(
    dir: &Path,
    epoch: u64,
    acked_seq: u64,
    acked_hash: &Hash,
) -> Result<(), SpoolError> {
    let tmp = dir.join(STATE_TMP);
    let path = dir.join(STATE_FILE);
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&encode_state(epoch, acked_seq, acked_hash))
        .map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)
}

/// Reads one frame of at most `remaining` bytes. The outer error is I/O; the inner one says why
/// the bytes are not a frame.
fn read_frame(rd: &mut impl Read, remaining: u64) -> io::Result<Result<SpooledRecord, String>> {
    if remaining < (FRAME_HEADER + PAYLOAD_FIXED) as u64 {
        return Ok(Err(format!("{remaining} bytes left, too few for a frame")));
    }
    let mut hdr = [0u8; FRAME_HEADER];
    match rd.read_exact(&mut hdr) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Ok(Err("file is shorter than the spool expects".into()));
        }
        Err(e) => return Err(e),
    }
    let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let len = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
    let crc = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    if magic != FRAME_MAGIC {
        return Ok(Err("bad frame magic".into()));
    }
    if !(PAYLOAD_FIXED..=MAX_PAYLOAD).contains(&len) || len as u64 > remaining - FRAME_HEADER as u64
    {
        return Ok(Err(format!("bad frame length {len}")));
    }
    let mut payload = vec![0u8; len];
    match rd.read_exact(&mut payload) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Ok(Err("file is shorter than the spool expects".into()));
        }
        Err(e) => return Err(e),
    }
    if crc32c(&payload) != crc {
        return Ok(Err("frame checksum mismatch".into()));
    }
    let (seq, prev_hash) = split_payload(&payload);
    payload.drain(..PAYLOAD_FIXED);
    Ok(Ok(SpooledRecord {
        seq,
        prev_hash,
        body: payload,
    }))
}

/// Seq and prev_hash from a payload of at least [`PAYLOAD_FIXED`] bytes.
fn split_payload(payload: &[u8]) -> (u64, Hash) {
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&payload[..8]);
    let mut prev = [0u8; 32];
    prev.copy_from_slice(&payload[8..PAYLOAD_FIXED]);
    (u64::from_be_bytes(seq), prev)
}

/// What a scan of a segment's bytes finds, in order; frames and bad ranges tile the buffer.
#[derive(Debug)]
enum Scanned<'a> {
    Frame {
        offset: usize,
        end: usize,
        seq: u64,
        prev_hash: Hash,
        body: &'a [u8],
    },
    /// Bytes that do not decode, up to the next frame that does (or the end).
    Bad { start: usize, end: usize },
}

struct FrameScanner<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> FrameScanner<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// The frame at `pos` if it decodes: `(end, payload)`.
    fn frame_at(&self, pos: usize) -> Option<(usize, &'a [u8])> {
        let hdr = self.buf.get(pos..pos.checked_add(FRAME_HEADER)?)?;
        if u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) != FRAME_MAGIC {
            return None;
        }
        let len = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
        if !(PAYLOAD_FIXED..=MAX_PAYLOAD).contains(&len) {
            return None;
        }
        let start = pos + FRAME_HEADER;
        let payload = self.buf.get(start..start + len)?;
        let crc = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
        (crc32c(payload) == crc).then_some((start + len, payload))
    }
}

impl<'a> Iterator for FrameScanner<'a> {
    type Item = Scanned<'a>;

    fn next(&mut self) -> Option<Scanned<'a>> {
        let pos = self.pos;
        if pos >= self.buf.len() {
            return None;
        }
        if let Some((end, payload)) = self.frame_at(pos) {
            self.pos = end;
            let (seq, prev_hash) = split_payload(payload);
            return Some(Scanned::Frame {
                offset: pos,
                end,
                seq,
                prev_hash,
                body: &payload[PAYLOAD_FIXED..],
            });
        }
        // Resynchronise on the next position where a whole frame checks out.
        let magic = FRAME_MAGIC.to_be_bytes();
        let next = (pos + 1..self.buf.len())
            .find(|&q| self.buf[q..].starts_with(&magic) && self.frame_at(q).is_some())
            .unwrap_or(self.buf.len());
        self.pos = next;
        Some(Scanned::Bad {
            start: pos,
            end: next,
        })
    }
}

/// CRC-32C (Castagnoli), the checksum iSCSI, ext4 and many logs use; table-driven.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(dir: &Path, segment_bytes: u64, max_bytes: u64) -> SpoolConfig {
        SpoolConfig {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes,
        }
    }

    /// `n` records continuing the chain after `(seq, head)`.
    fn chain_after(head: (u64, Hash), n: u64, tag: &str) -> Vec<SpooledRecord> {
        let (mut seq, mut prev) = head;
        (0..n)
            .map(|i| {
                seq += 1;
                let r = SpooledRecord {
                    seq,
                    prev_hash: prev,
                    body: format!("{tag}-{i}-{}", "x".repeat((seq % 7) as usize)).into_bytes(),
                };
                prev = r.hash();
                r
            })
            .collect()
    }

    fn seg_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        v.sort();
        v
    }

    fn disk_bytes(dir: &Path) -> u64 {
        seg_files(dir)
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum()
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn fresh_spool_starts_at_genesis_in_epoch_one() {
        let dir = tempfile::tempdir().unwrap();
        let (s, rec) = Spool::open(cfg(dir.path(), 1 << 20, 1 << 30)).unwrap();
        assert!(rec.fresh);
        assert_eq!(s.head(), (0, GENESIS));
        assert_eq!(s.acked(), (0, GENESIS));
        assert_eq!(s.epoch(), 1);
        assert_eq!(s.pending(), 0);
        assert_eq!(s.oldest_unacked(), None);
        drop(s);
        let (s, rec) = Spool::open(cfg(dir.path(), 1 << 20, 1 << 30)).unwrap();
        assert!(!rec.fresh, "the state file makes the second open not fresh");
        assert_eq!(rec, Recovery::default());
        assert_eq!(s.epoch(), 1);
    }

    #[test]
    fn append_read_ack_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(cfg(dir.path(), 1 << 20, 1 << 30)).unwrap();
        let recs = chain_after((0, GENESIS), 10, "a");
        s.append(&recs[..4]).unwrap();
        s.append(&recs[4..]).unwrap();
        assert_eq!(s.head(), (10, recs[9].hash()));
        assert_eq!(s.pending(), 10);
        assert_eq!(s.read_from(1, 100).unwrap(), recs);
        assert_eq!(s.read_from(4, 3).unwrap(), recs[3..6].to_vec());
        assert_eq!(s.read_from(11, 3).unwrap(), vec![]);
        assert_eq!(s.read_from(1, 0).unwrap(), vec![]);
        assert_eq!(s.bytes(), disk_bytes(dir.path()));

        s.ack(5, recs[4].hash()).unwrap();
        assert_eq!(s.acked(), (5, recs[4].hash()));
        assert_eq!(s.pending(), 5);
        assert_eq!(s.oldest_unacked(), Some(6));
        // Acked records are gone even where their segment is still on disk.
        assert_eq!(s.read_from(1, 100).unwrap(), recs[5..].to_vec());
        // Stale and future acks are ignored.
        s.ack(3, GENESIS).unwrap();
        s.ack(11, GENESIS).unwrap();
        assert_eq!(s.acked(), (5, recs[4].hash()));

        s.ack(10, recs[9].hash()).unwrap();
        assert_eq!(s.pending(), 0);
        assert_eq!(s.oldest_unacked(), None);
        assert_eq!(s.head(), (10, recs[9].hash()));
        assert_eq!(s.bytes(), 0);
        assert!(seg_files(dir.path()).is_empty());
        // The chain goes on after everything was acked.
        let more = chain_after(s.head(), 2, "b");
        s.append(&more).unwrap();
        assert_eq!(s.read_from(0, 100).unwrap(), more);
    }

    #[test]
    fn ack_with_a_different_hash_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(cfg(dir.path(), 1 << 20, 1 << 30)).unwrap();
        let recs = chain_after((0, GENESIS), 4, "a");
        s.append(&recs).unwrap();
        let err = s.ack(2, recs[0].hash()).unwrap_err();
        assert!(
            matches!(err, SpoolError::AckMismatch { seq: 2, .. }),
            "{err}"
        );
        let err = s.ack(4, GENESIS).unwrap_err();
        assert!(
            matches!(err, SpoolError::AckMismatch { seq: 4, .. }),
            "{err}"
        );
        assert_eq!(s.acked(), (0, GENESIS));
        assert_eq!(s.pending(), 4);
    }

    #[test]
    fn reopen_resumes_head_and_pending_records() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 200, 1 << 30);
        let (mut s, _) = Spool::open(c.clone()).unwrap();
        let recs = chain_after((0, GENESIS), 20, "a");
        s.append(&recs).unwrap();
        s.ack(7, recs[6].hash()).unwrap();
        let (head, acked, pending, bytes) = (s.head(), s.acked(), s.pending(), s.bytes());
        drop(s);

        let (mut s, rec) = Spool::open(c.clone()).unwrap();
        assert_eq!(rec.records, 13);
        assert_eq!(rec.corrupt_records, 0);
        assert_eq!(rec.torn_tail_bytes, 0);
        assert!(!rec.fresh && !rec.state_lost);
        assert_eq!(s.head(), head);
        assert_eq!(s.acked(), acked);
        assert_eq!(s.pending(), pending);
        assert_eq!(s.bytes(), bytes);
        assert_eq!(s.oldest_unacked(), Some(8));
        assert_eq!(s.read_from(0, usize::MAX).unwrap(), recs[7..].to_vec());

        // Appends go on from the same head, and a further reopen sees both runs.
        let more = chain_after(s.head(), 3, "b");
        s.append(&more).unwrap();
        drop(s);
        let (s, rec) = Spool::open(c).unwrap();
        assert_eq!(rec.records, 16);
        let mut want = recs[7..].to_vec();
        want.extend(more);
        assert_eq!(s.read_from(8, usize::MAX).unwrap(), want);
    }

    #[test]
    fn ack_deletes_fully_covered_segments_and_reopen_agrees() {
        let dir = tempfile::tempdir().unwrap();
        // Each frame is over 52 bytes, so every record gets a segment of its own.
        let c = cfg(dir.path(), 1, 1 << 30);
        let (mut s, _) = Spool::open(c.clone()).unwrap();
        let recs = chain_after((0, GENESIS), 10, "a");
        s.append(&recs).unwrap();
        assert_eq!(seg_files(dir.path()).len(), 10);
        assert_eq!(s.segment_count(), 10);
        let before = s.bytes();
        s.ack(4, recs[3].hash()).unwrap();
        let left = seg_files(dir.path());
        assert_eq!(left.len(), 6);
        assert_eq!(
            left[0].file_name().unwrap().to_str().unwrap(),
            "seg-00000000000000000005.log"
        );
        assert!(s.bytes() < before);
        assert_eq!(s.bytes(), disk_bytes(dir.path()));
        drop(s);

        let (s, rec) = Spool::open(c).unwrap();
        assert_eq!(rec.records, 6);
        assert!(rec.dropped_segments.is_empty(), "{rec:?}");
        assert_eq!(s.acked(), (4, recs[3].hash()));
        assert_eq!(s.read_from(0, usize::MAX).unwrap(), recs[4..].to_vec());
        assert_eq!(s.bytes(), disk_bytes(dir.path()));
    }

    #[test]
    fn segments_roll_at_the_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let recs = chain_after((0, GENESIS), 30, "a");
        let frame = recs[0].frame_len();
        let (mut s, _) = Spool::open(cfg(dir.path(), frame * 4, 1 << 30)).unwrap();
        for r in &recs {
            s.append(std::slice::from_ref(r)).unwrap();
        }
        for p in seg_files(dir.path()) {
            let len = fs::metadata(&p).unwrap().len();
            assert!(len <= frame * 4 + 8, "{} has {len} bytes", p.display());
        }
        assert!(s.segment_count() >= 30 / 4);
        assert_eq!(s.read_from(13, 9).unwrap(), recs[12..21].to_vec());
    }

    #[test]
    fn torn_tail_is_truncated_and_earlier_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 1 << 20, 1 << 30);
        let (mut s, _) = Spool::open(c.clone()).unwrap();
        let recs = chain_after((0, GENESIS), 5, "a");
        s.append(&recs).unwrap();
        drop(s);
        let seg = &seg_files(dir.path())[0];
        let len = fs::metadata(seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(seg)
            .unwrap()
            .set_len(len - 3)
            .unwrap();

        let (mut s, rec) = Spool::open(c.clone()).unwrap();
        assert_eq!(rec.torn_tail_bytes, recs[4].frame_len() - 3);
        assert_eq!(rec.records, 4);
        assert_eq!(rec.corrupt_records, 0);
        assert_eq!(s.head(), (4, recs[3].hash()));
        assert_eq!(s.read_from(1, 100).unwrap(), recs[..4].to_vec());
        assert_eq!(fs::metadata(seg).unwrap().len(), len - recs[4].frame_len());

        // The lost record is written again and everything reads back after a reopen.
        s.append(&recs[4..]).unwrap();
        drop(s);
        let (s, rec) = Spool::open(c).unwrap();
        assert_eq!(rec.torn_tail_bytes, 0);
        assert_eq!(s.read_from(1, 100).unwrap(), recs);
    }

    #[test]
    fn a_flipped_byte_mid_file_is_skipped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 1 << 20, 1 << 30);
        let (mut s, _) = Spool::open(c.clone()).unwrap();
        let recs = chain_after((0, GENESIS), 5, "a");
        s.append(&recs).unwrap();
        drop(s);
        let seg = &seg_files(dir.path())[0];
        let mut bytes = fs::read(seg).unwrap();
        // Inside record 3's body.
        let at = (recs[0].frame_len() + recs[1].frame_len() + recs[2].frame_len() - 2) as usize;
        bytes[at] ^= 0x40;
        fs::write(seg, &bytes).unwrap();

        let (mut s, rec) = Spool::open(c.clone()).unwrap();
        assert_eq!(rec.corrupt_records, 1);
        assert_eq!(rec.records, 4);
        assert_eq!(rec.torn_tail_bytes, 0);
        assert_eq!(s.head(), (5, recs[4].hash()));
        assert_eq!(s.pending(), 4);
        let got = s.read_from(1, 100).unwrap();
        let want: Vec<_> = recs.iter().filter(|r| r.seq != 3).cloned().collect();
        assert_eq!(got, want);
        assert_eq!(s.read_from(3, 1).unwrap(), vec![recs[3].clone()]);
        // The file is left alone and the chain goes on from the real head.
        assert_eq!(fs::read(seg).unwrap(), bytes);
        s.append(&chain_after(s.head(), 1, "b")).unwrap();
        s.ack(2, recs[1].hash()).unwrap();
        assert_eq!(s.oldest_unacked(), Some(4));
        assert_eq!(s.pending(), 3);
        // Acking past the hole needs no hash for the lost record.
        s.ack(3, GENESIS).unwrap();
        assert_eq!(s.pending(), 3);
    }

    #[test]
    fn corruption_after_open_is_skipped_by_reads() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(cfg(dir.path(), 1 << 20, 1 << 30)).unwrap();
        let mut s = s;
        let recs = chain_after((0, GENESIS), 5, "a");
        s.append(&recs).unwrap();
        let seg = &seg_files(dir.path())[0];
        let mut bytes = fs::read(seg).unwrap();
        let at = (recs[0].frame_len() + 20) as usize;
        bytes[at] ^= 1;
        fs::write(seg, &bytes).unwrap();
        let got: Vec<u64> = s.read_from(1, 100).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(got, vec![1, 3, 4, 5]);
    }

    #[test]
    fn full_spool_refuses_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let recs = chain_after((0, GENESIS), 10, "a");
        let cap = recs[..3].iter().map(SpooledRecord::frame_len).sum::<u64>() + 10;
        let (mut s, _) = Spool::open(cfg(dir.path(), 1 << 20, cap)).unwrap();
        s.append(&recs[..3]).unwrap();
        let on_disk = fs::read(&seg_files(dir.path())[0]).unwrap();
        let err = s.append(&recs[3..5]).unwrap_err();
        match err {
            SpoolError::Full { bytes, limit } => {
                assert_eq!(limit, cap);
                assert!(bytes > cap);
            }
            other => panic!("expected Full, got {other}"),
        }
        assert_eq!(s.head(), (3, recs[2].hash()));
        assert_eq!(s.pending(), 3);
        assert_eq!(fs::read(&seg_files(dir.path())[0]).unwrap(), on_disk);
        assert_eq!(seg_files(dir.path()).len(), 1);
        // An ack makes room again.
        s.ack(3, recs[2].hash()).unwrap();
        s.append(&recs[3..5]).unwrap();
        assert_eq!(s.read_from(0, 10).unwrap(), recs[3..5].to_vec());
    }

    #[test]
    fn out_of_order_and_unlinked_appends_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(cfg(dir.path(), 1 << 20, 1 << 30)).unwrap();
        let recs = chain_after((0, GENESIS), 4, "a");
        s.append(&recs[..2]).unwrap();
        let err = s.append(&recs[3..]).unwrap_err();
        assert!(
            matches!(
                err,
                SpoolError::OutOfOrder {
                    seq: 4,
                    expected: 3
                }
            ),
            "{err}"
        );
        let err = s.append(&recs[..1]).unwrap_err();
        assert!(
            matches!(
                err,
                SpoolError::OutOfOrder {
                    seq: 1,
                    expected: 3
                }
            ),
            "{err}"
        );
        let mut bad = recs[2].clone();
        bad.prev_hash = recs[0].hash();
        let err = s.append(&[bad]).unwrap_err();
        assert!(
            matches!(err, SpoolError::BrokenChain { seq: 3, .. }),
            "{err}"
        );
        // A bad record late in a batch refuses the whole batch.
        let mut batch = recs[2..].to_vec();
        batch[1].prev_hash = GENESIS;
        assert!(s.append(&batch).is_err());
        assert_eq!(s.head(), (2, recs[1].hash()));
        assert_eq!(s.read_from(0, 100).unwrap(), recs[..2].to_vec());
        assert_eq!(s.bytes(), disk_bytes(dir.path()));
    }

    #[test]
    fn oversized_body_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(cfg(dir.path(), 1 << 20, 1 << 30)).unwrap();
        let r = SpooledRecord {
            seq: 1,
            prev_hash: GENESIS,
            body: vec![0; MAX_BODY_BYTES + 1],
        };
        let err = s.append(&[r]).unwrap_err();
        assert!(
            matches!(err, SpoolError::RecordTooLarge { seq: 1, .. }),
            "{err}"
        );
        assert_eq!(s.bytes(), 0);
    }

    #[test]
    fn lost_state_file_resends_everything_found() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 1 << 20, 1 << 30);
        let (mut s, _) = Spool::open(c.clone()).unwrap();
        let recs = chain_after((0, GENESIS), 6, "a");
        s.append(&recs).unwrap();
        s.ack(2, recs[1].hash()).unwrap();
        drop(s);
        let state = dir.path().join(STATE_FILE);
        let mut b = fs::read(&state).unwrap();
        b[21] ^= 0xff;
        fs::write(&state, &b).unwrap();

        let (s, rec) = Spool::open(c.clone()).unwrap();
        assert!(rec.state_lost);
        assert!(!rec.fresh);
        assert_eq!(rec.records, 6);
        assert_eq!(s.acked(), (0, GENESIS));
        assert_eq!(s.head(), (6, recs[5].hash()));
        assert_eq!(s.read_from(0, 100).unwrap(), recs);
        drop(s);
        // The inferred state was written back, so the next open is clean.
        let (_, rec) = Spool::open(c).unwrap();
        assert!(!rec.state_lost);
    }

    #[test]
    fn state_from_a_newer_agent_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join(STATE_FILE);
        let mut b = encode_state(1, 0, &GENESIS);
        b[8..12].copy_from_slice(&9u32.to_be_bytes());
        fs::write(&state, b).unwrap();
        let err = Spool::open(cfg(dir.path(), 1 << 20, 1 << 30)).unwrap_err();
        assert!(matches!(err, SpoolError::Corrupt { .. }), "{err}");
        assert_eq!(fs::read(&state).unwrap(), b);
    }

    #[test]
    fn start_epoch_continues_after_the_collectors_head() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 1 << 20, 1 << 30);
        let (mut s, _) = Spool::open(c.clone()).unwrap();
        let base = chain::record_hash(&GENESIS, 100, b"collector held this");
        s.start_epoch(2, 100, base).unwrap();
        assert_eq!(s.epoch(), 2);
        assert_eq!(s.head(), (100, base));
        assert_eq!(s.pending(), 0);
        let recs = chain_after((100, base), 3, "e2");
        assert!(s.append(&chain_after((0, GENESIS), 1, "x")).is_err());
        s.append(&recs).unwrap();
        let err = s.start_epoch(3, 0, GENESIS).unwrap_err();
        assert!(matches!(err, SpoolError::NotEmpty { pending: 3 }), "{err}");
        drop(s);
        let (s, rec) = Spool::open(c).unwrap();
        assert_eq!(rec.records, 3);
        assert_eq!(s.epoch(), 2);
        assert_eq!(s.acked(), (100, base));
        assert_eq!(s.read_from(0, 10).unwrap(), recs);
    }

    #[test]
    fn reads_land_on_every_seq_in_a_large_segment() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 1 << 20, 1 << 30);
        let (mut s, _) = Spool::open(c.clone()).unwrap();
        let recs = chain_after((0, GENESIS), 300, "a");
        s.append(&recs[..150]).unwrap();
        s.append(&recs[150..]).unwrap();
        assert_eq!(s.segment_count(), 1);
        for from in 1..=300u64 {
            let got = s.read_from(from, 2).unwrap();
            let end = (from as usize + 1).min(300);
            assert_eq!(got, recs[from as usize - 1..end].to_vec(), "from {from}");
        }
        // After a reopen the index comes from the scan and must agree.
        s.ack(70, recs[69].hash()).unwrap();
        drop(s);
        let (s, _) = Spool::open(c).unwrap();
        for from in [1u64, 70, 71, 128, 129, 135, 192, 193, 299, 300] {
            let got = s.read_from(from, 3).unwrap();
            let start = from.max(71) as usize - 1;
            let end = (start + 3).min(300);
            assert_eq!(got, recs[start..end].to_vec(), "from {from}");
        }
    }

    #[test]
    fn acked_segments_left_by_a_crash_are_dropped_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 1, 1 << 30);
        let (mut s, _) = Spool::open(c.clone()).unwrap();
        let recs = chain_after((0, GENESIS), 6, "a");
        s.append(&recs).unwrap();
        let saved: Vec<(PathBuf, Vec<u8>)> = seg_files(dir.path())
            .into_iter()
            .map(|p| {
                let b = fs::read(&p).unwrap();
                (p, b)
            })
            .collect();
        s.ack(3, recs[2].hash()).unwrap();
        drop(s);
        // As if the agent died after writing the state but before deleting the segments.
        for (p, b) in &saved {
            fs::write(p, b).unwrap();
        }
        let (s, rec) = Spool::open(c).unwrap();
        assert_eq!(rec.records, 3);
        assert_eq!(rec.corrupt_records, 0);
        assert_eq!(
            rec.dropped_segments,
            vec![
                "seg-00000000000000000001.log".to_string(),
                "seg-00000000000000000002.log".to_string(),
                "seg-00000000000000000003.log".to_string(),
            ]
        );
        assert_eq!(seg_files(dir.path()).len(), 3);
        assert_eq!(s.read_from(0, 100).unwrap(), recs[3..].to_vec());
        assert_eq!(s.bytes(), disk_bytes(dir.path()));
    }

    #[test]
    fn torn_new_segment_is_dropped_and_the_chain_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 1, 1 << 30);
        let (mut s, _) = Spool::open(c.clone()).unwrap();
        let recs = chain_after((0, GENESIS), 3, "a");
        s.append(&recs).unwrap();
        drop(s);
        let last = seg_files(dir.path()).pop().unwrap();
        OpenOptions::new()
            .write(true)
            .open(&last)
            .unwrap()
            .set_len(7)
            .unwrap();
        let (s, rec) = Spool::open(c).unwrap();
        assert_eq!(rec.torn_tail_bytes, 7);
        assert_eq!(
            rec.dropped_segments,
            vec!["seg-00000000000000000003.log".to_string()]
        );
        assert_eq!(s.head(), (2, recs[1].hash()));
        assert!(!last.exists());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(Vec<Vec<u8>>),
        /// Acks the record this far past the acked one (0 = a stale ack; past the head = ignored).
        Ack(u64),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => prop::collection::vec(prop::collection::vec(any::<u8>(), 0..60), 1..6)
                .prop_map(Op::Append),
            2 => (0u64..12).prop_map(Op::Ack),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn unacked_records_survive_any_sequence_of_ops(
            ops in prop::collection::vec(op(), 1..40),
            segment_bytes in 1u64..400,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let c = cfg(dir.path(), segment_bytes, 1 << 30);
            let (mut s, _) = Spool::open(c.clone()).unwrap();
            // Every record ever appended (index = seq - 1), and the acked seq.
            let mut all: Vec<SpooledRecord> = Vec::new();
            let mut acked = 0u64;
            for op in ops {
                match op {
                    Op::Append(bodies) => {
                        let mut prev = all.last().map_or(GENESIS, SpooledRecord::hash);
                        let batch: Vec<_> = bodies.into_iter().map(|body| {
                            let r = SpooledRecord { seq: all.len() as u64 + 1, prev_hash: prev, body };
                            prev = r.hash();
                            all.push(r.clone());
                            r
                        }).collect();
                        s.append(&batch).unwrap();
                    }
                    Op::Ack(ahead) => {
                        let seq = acked + ahead;
                        let hash = all.get((seq as usize).wrapping_sub(1)).map_or(GENESIS, SpooledRecord::hash);
                        s.ack(seq, hash).unwrap();
                        if seq > acked && seq as usize <= all.len() {
                            acked = seq;
                        }
                    }
                    Op::Reopen => {
                        drop(s);
                        let (s2, rec) = Spool::open(c.clone()).unwrap();
                        s = s2;
                        prop_assert_eq!(rec.corrupt_records, 0);
                        prop_assert_eq!(rec.torn_tail_bytes, 0);
                        prop_assert!(!rec.fresh && !rec.state_lost);
                        prop_assert_eq!(rec.records, all.len() as u64 - acked);
                    }
                }
                let want = &all[acked as usize..];
                prop_assert_eq!(s.read_from(acked + 1, usize::MAX).unwrap(), want.to_vec());
                prop_assert_eq!(s.pending(), want.len() as u64);
                prop_assert_eq!(s.oldest_unacked(), want.first().map(|r| r.seq));
                let head = all.last().map_or((0, GENESIS), |r| (r.seq, r.hash()));
                prop_assert_eq!(s.head(), head);
                prop_assert_eq!(s.acked().0, acked);
                prop_assert_eq!(s.bytes(), disk_bytes(dir.path()));
                // A window in the middle reads the same records as the model.
                if want.len() > 2 {
                    let mid = want[want.len() / 2].seq;
                    let got = s.read_from(mid, 3).unwrap();
                    let end = (mid as usize + 2).min(all.len());
                    prop_assert_eq!(got, all[mid as usize - 1..end].to_vec());
                }
            }
        }
    }
}
