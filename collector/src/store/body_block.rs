//! Record bodies stored compactly: one zstd frame per committed batch of an agent.
//!
//! A record's body is the exact signed bytes the agent sent, and it stays exactly those bytes:
//! a block only changes how they lie on disk. Bodies of one batch are alike (the same cards,
//! hosts, grants and principals, window after window), so compressing them together takes
//! them to a small fraction of their size where compressing each alone gains little.
//!
//! Block format, before compression: for each body in seq order, `seq − previous seq` (the
//! first against 0) and the body's length as protobuf varints, then the body. The stored row
//! keeps the uncompressed length, which bounds decompression (a hostile or corrupt file cannot
//! make a reader allocate more), and the seq range, which names the block in errors.
//!
//! A block that does not decompress, or whose entries run past its end, is an error naming the
//! block; verification reports the records it held as unreadable rather than guessing.

/// zstd level: 3 is zstd's default; blocks are written once and read rarely.
const LEVEL: i32 = 3;

thread_local! {
    /// One compression context per writing thread, reused from batch to batch. Frames carry
    /// zstd's content checksum, so a damaged block is an error, not other bytes.
    static COMPRESSOR: std::cell::RefCell<zstd::bulk::Compressor<'static>> = {
        let mut c = zstd::bulk::Compressor::new(LEVEL).expect("zstd level 3 is valid");
        c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
            .expect("zstd accepts the checksum flag");
        std::cell::RefCell::new(c)
    };
}

/// The largest uncompressed block a reader accepts (a batch is at most a few MiB of bodies).
pub const MAX_RAW_BYTES: usize = 256 << 20;

/// A batch's bodies, compressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub first_seq: u64,
    pub last_seq: u64,
    /// Length of the uncompressed entries.
    pub raw_len: usize,
    pub data: Vec<u8>,
}

/// Records per block written by `gpumeter-collector compact` (a writer's batch is usually
/// smaller).
pub const PER_BLOCK: usize = 1024;

/// What a compaction of verbatim bodies into blocks did (`sqlite_compact`,
/// `postgres_compact`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Compacted {
    pub agents: u64,
    pub records: u64,
    pub blocks: u64,
    /// Bytes of the bodies moved, as they were in their rows.
    pub body_bytes: u64,
    /// Bytes of the blocks written for them.
    pub block_bytes: u64,
    /// prev_hashes no longer stored (each restored from the record before it).
    pub links_dropped: u64,
}

/// Why a stored block cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error(
        "body block {id}: uncompressed length {raw_len} is over the {MAX_RAW_BYTES}-byte limit"
    )]
    TooLarge { id: i64, raw_len: i64 },
    #[error("body block {id}: {what}")]
    Corrupt { id: i64, what: String },
    #[error("body block {id} is not in the ledger")]
    Missing { id: i64 },
}

/// Compresses `bodies` (seq, body) given in increasing seq order.
pub fn encode<'a>(bodies: impl IntoIterator<Item = (u64, &'a [u8])>) -> Block {
    let mut raw = Vec::new();
    let (mut first, mut prev) = (None, 0u64);
    for (seq, body) in bodies {
        debug_assert!(
            first.is_none() || seq > prev,
            "bodies must come in seq order"
        );
        first.get_or_insert(seq);
        prost::encoding::encode_varint(seq - prev, &mut raw);
        prost::encoding::encode_varint(body.len() as u64, &mut raw);
        raw.extend_from_slice(body);
        prev = seq;
    }
    let data = COMPRESSOR
        .with(|c| c.borrow_mut().compress(&raw))
        .expect("zstd compresses any input in memory");
    Block {
        first_seq: first.unwrap_or(0),
        last_seq: prev,
        raw_len: raw.len(),
        data,
    }
}

/// The bodies of stored block `id` (its row's `raw_len` and `data`), in seq order.
pub fn decode(id: i64, raw_len: i64, data: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, BlockError> {
    let corrupt = |what: String| BlockError::Corrupt { id, what };
    let cap = usize::try_from(raw_len)
        .ok()
        .filter(|n| *n <= MAX_RAW_BYTES)
        .ok_or(BlockError::TooLarge { id, raw_len })?;
    let raw = zstd::bulk::decompress(data, cap)
        .map_err(|e| corrupt(format!("does not decompress: {e}")))?;
    if raw.len() != cap {
        return Err(corrupt(format!(
            "decompresses to {} bytes, its row says {cap}",
            raw.len()
        )));
    }
    let mut out = Vec::new();
    let mut buf = raw.as_slice();
    let mut seq = 0u64;
    while !buf.is_empty() {
        let delta = prost::encoding::decode_varint(&mut buf)
            .map_err(|_| corrupt(format!("entry {} has no seq", out.len())))?;
        let len = prost::encoding::decode_varint(&mut buf)
            .map_err(|_| corrupt(format!("entry {} has no length", out.len())))?;
        seq = seq
            .checked_add(delta)
            .filter(|_| delta > 0 || out.is_empty())
            .ok_or_else(|| corrupt(format!("entry {} does not follow seq {seq}", out.len())))?;
        let len = usize::try_from(len)
            .ok()
            .filter(|n| *n <= buf.len())
            .ok_or_else(|| {
                corrupt(format!(
                    "entry for seq {seq} runs {len} bytes past the block's end"
                ))
            })?;
        out.push((seq, buf[..len].to_vec()));
        buf = &buf[len..];
    }
    Ok(out)
}

/// The last block read, so that reading consecutive records decodes each block once.
#[derive(Debug, Default)]
pub struct BlockCache {
    id: Option<i64>,
    bodies: Vec<(u64, Vec<u8>)>,
}

impl BlockCache {
    /// The body of `seq` in block `id`, loading the block through `load` (which returns its
    /// `raw_len` and `data`, or `None` when there is no such block) unless it is the one held.
    /// `Ok(Ok(None))`: the block does not hold `seq`.
    pub fn body<E>(
        &mut self,
        id: i64,
        seq: u64,
        load: impl FnOnce(i64) -> Result<Option<(i64, Vec<u8>)>, E>,
    ) -> Result<Result<Option<Vec<u8>>, BlockError>, E> {
        if self.id != Some(id) {
            self.id = None;
            let Some((raw_len, data)) = load(id)? else {
                return Ok(Err(BlockError::Missing { id }));
            };
            match decode(id, raw_len, &data) {
                Ok(bodies) => self.bodies = bodies,
                Err(e) => return Ok(Err(e)),
            }
            self.id = Some(id);
        }
        Ok(Ok(self
            .bodies
            .binary_search_by_key(&seq, |(s, _)| *s)
            .ok()
            .map(|i| self.bodies[i].1.clone())))
    }
}

impl BlockCache {
    /// A record's body where its row keeps it, or from its block; `Ok(Err(why))` when it
    /// cannot be read (verification reports that, queries fail on it).
    fn resolve<E>(
        &mut self,
        seq: u64,
        body: Option<Vec<u8>>,
        block: Option<i64>,
        load: impl FnOnce(i64) -> Result<Option<(i64, Vec<u8>)>, E>,
    ) -> Result<Result<Vec<u8>, String>, E> {
        Ok(match (body, block) {
            (Some(body), _) => Ok(body),
            (None, Some(id)) => match self.body(id, seq, load)? {
                Ok(Some(body)) => Ok(body),
                Ok(None) => Err(format!("body block {id} does not hold it")),
                Err(e) => Err(e.to_string()),
            },
            (None, None) => Err("its row keeps no body and names no block".into()),
        })
    }

    /// A record's body for a query (not for verification, which reports instead): the row's
    /// own, or the one in its block; an error naming the record when it cannot be read.
    pub fn body_of(
        &mut self,
        agent_id: &str,
        seq: u64,
        body: Option<Vec<u8>>,
        block: Option<i64>,
        load: impl FnOnce(i64) -> Result<Option<(i64, Vec<u8>)>, super::StoreError>,
    ) -> Result<Vec<u8>, super::StoreError> {
        self.resolve(seq, body, block, load)?.map_err(|why| {
            super::StoreError::Db(format!(
                "record {agent_id} seq {seq}: its body cannot be read back: {why}"
            ))
        })
    }
}

/// A record row as a ledger keeps it (see migration 11): no body where it lies in `block`, no
/// prev_hash where it links to the record stored just before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub seq: u64,
    pub prev_hash: Option<Vec<u8>>,
    pub hash: Vec<u8>,
    pub body: Option<Vec<u8>>,
    pub block: Option<i64>,
}

/// Reads an agent's records, in seq order, back as they were signed: a body from its block,
/// a prev_hash from the record before. A body that cannot be read is reported in
/// `ChainRow::unreadable`, never guessed; a missing prev_hash with no record just before
/// reads as empty, which verification reports as a broken link.
#[derive(Debug, Default)]
pub struct RecordReader {
    blocks: BlockCache,
    prev: Option<(u64, Vec<u8>)>,
}

impl RecordReader {
    /// The next row; `load` fetches a block's `raw_len` and `data` by id (of this agent).
    pub fn row<E>(
        &mut self,
        r: StoredRecord,
        load: impl FnOnce(i64) -> Result<Option<(i64, Vec<u8>)>, E>,
    ) -> Result<crate::verify::ChainRow, E> {
        let seq = r.seq;
        let prev_derived = r.prev_hash.is_none();
        let prev_hash = r.prev_hash.unwrap_or_else(|| match &self.prev {
            Some((s, h)) if s + 1 == seq => h.clone(),
            _ => Vec::new(),
        });
        let (body, unreadable) = match self.blocks.resolve(seq, r.body, r.block, load)? {
            Ok(body) => (body, None),
            Err(why) => (Vec::new(), Some(why)),
        };
        self.prev = Some((seq, r.hash.clone()));
        Ok(crate::verify::ChainRow {
            seq,
            prev_hash,
            hash: r.hash,
            body,
            unreadable,
            prev_derived,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bodies() -> Vec<(u64, Vec<u8>)> {
        (0..200u64)
            .map(|i| {
                let body = format!("card GPU-0000-{:04} window {i} util {}", i % 8, i % 97);
                (10 + i * 2, body.into_bytes())
            })
            .collect()
    }

    #[test]
    fn bodies_come_back_byte_for_byte_and_smaller() {
        let b = bodies();
        let block = encode(b.iter().map(|(s, v)| (*s, v.as_slice())));
        assert_eq!((block.first_seq, block.last_seq), (10, 408));
        let raw: usize = b.iter().map(|(_, v)| v.len()).sum();
        assert!(block.data.len() * 4 < raw, "{} of {raw}", block.data.len());
        assert_eq!(decode(1, block.raw_len as i64, &block.data).unwrap(), b);
        assert_eq!(decode(1, 0, &encode([]).data).unwrap(), vec![]);
        // An empty body survives too.
        let one = encode([(5u64, &b""[..])]);
        assert_eq!(
            decode(1, one.raw_len as i64, &one.data).unwrap(),
            vec![(5, vec![])]
        );
    }

    #[test]
    fn damaged_blocks_are_errors_naming_the_block() {
        let b = bodies();
        let block = encode(b.iter().map(|(s, v)| (*s, v.as_slice())));
        let raw = block.raw_len as i64;
        let err = |r: Result<_, BlockError>| r.unwrap_err().to_string();
        assert!(err(decode(7, raw, &block.data[..block.data.len() / 2])).contains("body block 7"));
        let mut flipped = block.data.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        assert!(decode(7, raw, &flipped).is_err());
        assert!(err(decode(7, raw - 1, &block.data)).contains("body block 7"));
        assert!(err(decode(7, raw + 1, &block.data)).contains("its row says"));
        assert!(err(decode(7, -1, &block.data)).contains("limit"));
        assert!(err(decode(7, 1 << 40, &block.data)).contains("limit"));
        // Entries that claim more bytes than remain, or a seq that does not advance.
        let mut raw_entries = Vec::new();
        prost::encoding::encode_varint(3, &mut raw_entries);
        prost::encoding::encode_varint(100, &mut raw_entries);
        raw_entries.extend_from_slice(b"short");
        let data = zstd::bulk::compress(&raw_entries, 3).unwrap();
        assert!(err(decode(8, raw_entries.len() as i64, &data)).contains("past the block's end"));
        let mut stuck = Vec::new();
        for _ in 0..2 {
            prost::encoding::encode_varint(0, &mut stuck);
            prost::encoding::encode_varint(1, &mut stuck);
            stuck.push(b'x');
        }
        let data = zstd::bulk::compress(&stuck, 3).unwrap();
        assert!(err(decode(9, stuck.len() as i64, &data)).contains("does not follow"));
    }

    #[test]
    fn records_read_back_as_signed() {
        let b = bodies();
        let block = encode(b.iter().take(6).map(|(s, v)| (*s, v.as_slice())));
        let load = |id: i64| -> Result<_, ()> {
            Ok((id == 1).then(|| (block.raw_len as i64, block.data.clone())))
        };
        let row = |seq, prev: Option<&[u8]>, body: Option<&[u8]>, block| StoredRecord {
            seq,
            prev_hash: prev.map(<[u8]>::to_vec),
            hash: vec![seq as u8; 32],
            body: body.map(<[u8]>::to_vec),
            block,
        };
        let mut read = RecordReader::default();
        // Seqs 10 and 12 lie in block 1; 11 keeps its body; 12 keeps no prev_hash.
        let first = read
            .row(row(10, Some(&[0; 32]), None, Some(1)), load)
            .unwrap();
        assert_eq!((first.body, first.unreadable), (b[0].1.clone(), None));
        let kept = read.row(row(11, None, Some(b"kept"), None), load).unwrap();
        assert_eq!(kept.prev_hash, vec![10u8; 32], "links to the record before");
        assert!(kept.prev_derived && !first.prev_derived);
        assert_eq!(kept.body, b"kept");
        let third = read.row(row(12, None, None, Some(1)), load).unwrap();
        assert_eq!(
            (third.prev_hash, third.body),
            (vec![11u8; 32], b[1].1.clone())
        );
        // After a hole, a missing prev_hash has nothing to link to.
        let after_hole = read.row(row(20, None, None, Some(1)), load).unwrap();
        assert!(after_hole.prev_hash.is_empty());
        assert_eq!(after_hole.body, b[5].1.clone());
        let absent = read.row(row(21, None, None, Some(1)), load).unwrap();
        assert_eq!(
            absent.unreadable.as_deref(),
            Some("body block 1 does not hold it")
        );
        let gone = read.row(row(22, None, None, Some(2)), load).unwrap();
        assert_eq!(
            gone.unreadable.as_deref(),
            Some("body block 2 is not in the ledger")
        );
        let neither = read.row(row(23, None, None, None), load).unwrap();
        assert!(neither.unreadable.unwrap().contains("no body"));
    }

    #[test]
    fn the_cache_decodes_each_block_once() {
        let b = bodies();
        let block = encode(b.iter().map(|(s, v)| (*s, v.as_slice())));
        let mut cache = BlockCache::default();
        let mut loads = 0;
        for (seq, body) in &b {
            let got = cache
                .body(3, *seq, |_| -> Result<_, ()> {
                    loads += 1;
                    Ok(Some((block.raw_len as i64, block.data.clone())))
                })
                .unwrap()
                .unwrap();
            assert_eq!(got.as_deref(), Some(body.as_slice()));
        }
        assert_eq!(loads, 1);
        let missing = cache.body(3, 11, |_| -> Result<_, ()> { unreachable!() });
        assert_eq!(missing, Ok(Ok(None)));
        let gone = cache.body(4, 10, |_| -> Result<_, ()> { Ok(None) });
        assert_eq!(gone, Ok(Err(BlockError::Missing { id: 4 })));
    }
}
