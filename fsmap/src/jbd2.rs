//! In-memory replay of an ext4 internal jbd2 journal: which filesystem
//! blocks have a newer committed copy in the journal than in place, and
//! where on the device that copy is. Nothing is written; `read::Overlay`
//! serves the replaced blocks from the journal, so a mounted or crashed
//! filesystem reads as the kernel would see it after recovery.
//!
//! The passes follow Linux fs/jbd2/recovery.c (e2fsck carries the same
//! file): a scan from `s_start` finds the end of the log and the committed
//! transactions, a revoke pass collects the newest transaction revoking
//! each logged block, and a replay pass keeps each block's newest logged
//! copy that is neither revoked nor failing its checksum.
//!
//! On-disk layout (integers big-endian; a journal block is a filesystem
//! block; the journal inode's extents map journal blocks to the device):
//! - every block except data blocks opens with a 12-byte header: magic
//!   0xC03B3998, block type, transaction sequence;
//! - superblock (type 3 or 4, journal block 0): block size at 0x0C, length
//!   in blocks 0x10, first log block 0x14, first sequence 0x18, log start
//!   0x1C (0: nothing to replay), features 0x24/0x28/0x2C, uuid 0x30,
//!   checksum type 0x50, fast-commit blocks 0x54, crc32c 0xFC;
//! - descriptor (type 1): tags from byte 12, each followed by a 16-byte
//!   uuid unless flagged SAME_UUID, the last one flagged LAST_TAG; tag N
//!   names the filesystem block that the Nth block after the descriptor
//!   holds; with checksums the block ends in a 4-byte crc32c tail;
//! - commit (type 2): checksum type and size at 12 and 13, checksum at 16,
//!   commit time in seconds at 48; it makes its transaction durable;
//! - revoke (type 5): bytes used at 12, then 4- or 8-byte block numbers
//!   from byte 16; a revoke cancels the logged copies of a block in its own
//!   and earlier transactions.
//!
//! Not handled here: external journals (the caller opens the journal
//! device) and fast commits (`Jbd2Error::Unsupported` when the fast-commit
//! area holds one for the next transaction; a mount or e2fsck replays it).

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use crate::ext4::{FileExtent, crc32c_raw};
use crate::read::{JBD2_MAGIC, ReadAt, Replacement};

const BLOCK_TYPE_DESCRIPTOR: u32 = 1;
const BLOCK_TYPE_COMMIT: u32 = 2;
const BLOCK_TYPE_SUPERBLOCK_V1: u32 = 3;
const BLOCK_TYPE_SUPERBLOCK_V2: u32 = 4;
const BLOCK_TYPE_REVOKE: u32 = 5;

/// Checksum v1: crc32 of descriptor and data blocks in the commit block.
const COMPAT_CHECKSUM: u32 = 0x1;
const INCOMPAT_REVOKE: u32 = 0x1;
const INCOMPAT_64BIT: u32 = 0x2;
const INCOMPAT_ASYNC_COMMIT: u32 = 0x4;
const INCOMPAT_CSUM_V2: u32 = 0x8;
const INCOMPAT_CSUM_V3: u32 = 0x10;
const INCOMPAT_FAST_COMMIT: u32 = 0x20;
const INCOMPAT_KNOWN: u32 = INCOMPAT_REVOKE
    | INCOMPAT_64BIT
    | INCOMPAT_ASYNC_COMMIT
    | INCOMPAT_CSUM_V2
    | INCOMPAT_CSUM_V3
    | INCOMPAT_FAST_COMMIT;

const TAG_FLAG_ESCAPE: u16 = 0x1;
const TAG_FLAG_SAME_UUID: u16 = 0x2;
const TAG_FLAG_LAST_TAG: u16 = 0x8;

const HEADER_BYTES: usize = 12;
const UUID_BYTES: usize = 16;
/// The crc32c that ends descriptor and revoke blocks under checksum v2/v3.
const TAIL_BYTES: usize = 4;
const REVOKE_COUNT_OFFSET: usize = 12;
const REVOKE_RECORDS_OFFSET: usize = 16;

const SUPERBLOCK_BYTES: usize = 1024;
const SUPERBLOCK_BLOCK_SIZE_OFFSET: usize = 0x0C;
const SUPERBLOCK_MAXLEN_OFFSET: usize = 0x10;
const SUPERBLOCK_FIRST_OFFSET: usize = 0x14;
const SUPERBLOCK_SEQUENCE_OFFSET: usize = 0x18;
const SUPERBLOCK_START_OFFSET: usize = 0x1C;
const SUPERBLOCK_COMPAT_OFFSET: usize = 0x24;
const SUPERBLOCK_INCOMPAT_OFFSET: usize = 0x28;
const SUPERBLOCK_RO_COMPAT_OFFSET: usize = 0x2C;
const SUPERBLOCK_UUID_OFFSET: usize = 0x30;
const SUPERBLOCK_CHECKSUM_TYPE_OFFSET: usize = 0x50;
const SUPERBLOCK_FAST_COMMIT_BLOCKS_OFFSET: usize = 0x54;
const SUPERBLOCK_CHECKSUM_OFFSET: usize = 0xFC;
const CHECKSUM_TYPE_CRC32C: u8 = 4;

const COMMIT_CHECKSUM_TYPE_OFFSET: usize = 12;
const COMMIT_CHECKSUM_SIZE_OFFSET: usize = 13;
const COMMIT_CHECKSUM_OFFSET: usize = 16;
const COMMIT_SECONDS_OFFSET: usize = 48;
/// `sizeof(struct commit_header)` with 8-byte alignment (x86-64, arm64):
/// what the kernel checksums when only the header of a commit block made
/// it to disk.
const COMMIT_HEADER_BYTES: usize = 64;
const V1_CHECKSUM_TYPE_CRC32: u8 = 1;
const V1_CHECKSUM_SIZE_BYTES: u8 = 4;

const BLOCK_SIZE_MIN_BYTES: u64 = 1024;
const BLOCK_SIZE_MAX_BYTES: u64 = 65536;
/// The longest journal mke2fs and tune2fs create (JBD2_MAX_JOURNAL_BLOCKS);
/// it bounds the walk and the tags held in memory.
const JOURNAL_BLOCKS_MAX: u32 = 10_240_000;
/// With fast commits the normal log must keep this many blocks.
const FAST_COMMIT_LOG_BLOCKS_MIN: u32 = 1024;
const FAST_COMMIT_BLOCKS_DEFAULT: u32 = 256;
/// ext4's fast-commit HEAD tag (ext4 structures are little-endian).
const FAST_COMMIT_TAG_HEAD: u16 = 9;
const FAST_COMMIT_TID_OFFSET: usize = 8;

const _: () = assert!(SUPERBLOCK_CHECKSUM_OFFSET + 4 <= SUPERBLOCK_BYTES);
const _: () = assert!(SUPERBLOCK_BYTES as u64 <= BLOCK_SIZE_MIN_BYTES);
const _: () = assert!(COMMIT_SECONDS_OFFSET + 8 <= COMMIT_HEADER_BYTES);
const _: () = assert!(COMMIT_HEADER_BYTES as u64 <= BLOCK_SIZE_MIN_BYTES);

/// What replaying the journal found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// Filesystem block number -> its newest committed copy (byte offset
    /// on the device and whether the journal escaped its magic).
    pub replaced: BTreeMap<u64, Replacement>,
    /// Committed transactions replayed.
    pub transactions: u32,
    /// Sequence of the first transaction in the log (`s_sequence`).
    pub first_sequence: u32,
    /// Sequence of the first transaction not replayed: the uncommitted or
    /// missing one that ends the log.
    pub next_sequence: u32,
    /// Journal blocks from `s_start` through the last commit block replayed.
    pub log_blocks: u64,
    /// Journal blocks read, the superblock included: the cost of a replay.
    pub journal_blocks_read: u64,
    /// Logged copies skipped because their checksum failed (the kernel
    /// skips them too, with an error). Only copies that would have been
    /// used are checked: a block's older copies are read only when every
    /// newer one failed.
    pub bad_blocks: u32,
    /// Logged copies skipped because a revoke record of their own or a
    /// later transaction covers them.
    pub revoked_blocks: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum Jbd2Error {
    #[error("reading the journal")]
    Io(#[from] io::Error),
    #[error("corrupt journal: {0}")]
    Corrupt(String),
    #[error("unsupported journal: {0}")]
    Unsupported(&'static str),
}

fn corrupt(what: impl Into<String>) -> Jbd2Error {
    Jbd2Error::Corrupt(what.into())
}

/// Replays the internal journal whose inode maps `journal` (logical
/// journal block -> device block) on a filesystem of `fs_block_size`-byte
/// blocks, without writing anything.
pub fn replay<R: ReadAt>(
    device: &R,
    fs_block_size: u64,
    journal: &[FileExtent],
) -> Result<Replay, Jbd2Error> {
    if !(BLOCK_SIZE_MIN_BYTES..=BLOCK_SIZE_MAX_BYTES).contains(&fs_block_size)
        || !fs_block_size.is_power_of_two()
    {
        return Err(corrupt(format!(
            "filesystem block size {fs_block_size} bytes"
        )));
    }
    let mut file = JournalFile::new(device, fs_block_size, journal);
    let mut block = vec![0u8; fs_block_size as usize];
    file.read(0, &mut block)?;
    let superblock = Superblock::parse(&block, file.mapped_blocks())?;
    let mut replay = Replay {
        first_sequence: superblock.sequence,
        next_sequence: superblock.sequence,
        ..Replay::default()
    };
    // s_start is zero exactly when the journal was emptied (clean unmount
    // or checkpoint): nothing to replay, and the kernel looks no further.
    if superblock.start_block != 0 {
        let log = scan(&mut file, &superblock)?;
        replay.transactions = log.committed.len() as u32;
        replay.next_sequence = superblock.sequence.wrapping_add(replay.transactions);
        replay.log_blocks = log.log_blocks;
        check_fast_commits(&mut file, &superblock, replay.next_sequence)?;
        let revokes = collect_revokes(&mut file, &superblock, &log.committed)?;
        replay_tags(
            &mut file,
            &superblock,
            &log.committed,
            &revokes,
            &mut replay,
        )?;
    }
    replay.journal_blocks_read = file.blocks_read;
    Ok(replay)
}

/// The journal inode's blocks on the device, and a count of the blocks
/// read through it.
struct JournalFile<'a, R> {
    device: &'a R,
    block_size_bytes: u64,
    /// Sorted by logical block, for a binary search.
    extents: Vec<FileExtent>,
    blocks_read: u64,
}

impl<'a, R: ReadAt> JournalFile<'a, R> {
    fn new(device: &'a R, block_size_bytes: u64, journal: &[FileExtent]) -> Self {
        let mut extents = journal.to_vec();
        extents.sort_by_key(|extent| extent.logical_block);
        JournalFile {
            device,
            block_size_bytes,
            extents,
            blocks_read: 0,
        }
    }

    /// One past the highest journal block the extents map.
    fn mapped_blocks(&self) -> u64 {
        self.extents
            .iter()
            .map(|extent| extent.logical_block.saturating_add(extent.block_count))
            .max()
            .unwrap_or(0)
    }

    fn offset_bytes(&self, journal_block: u32) -> Result<u64, Jbd2Error> {
        let logical = u64::from(journal_block);
        let index = self
            .extents
            .partition_point(|extent| extent.logical_block <= logical);
        index
            .checked_sub(1)
            .map(|index| &self.extents[index])
            // An unwritten extent reads as zeros, not as the journal: the
            // kernel's bmap does not map it either.
            .filter(|extent| {
                !extent.uninitialized
                    && logical < extent.logical_block.saturating_add(extent.block_count)
            })
            .and_then(|extent| {
                extent
                    .physical_block
                    .checked_add(logical - extent.logical_block)?
                    .checked_mul(self.block_size_bytes)
            })
            .ok_or_else(|| {
                corrupt(format!(
                    "journal block {journal_block} is not mapped by the journal inode"
                ))
            })
    }

    /// Reads journal block `journal_block`; returns its device offset.
    fn read(&mut self, journal_block: u32, buf: &mut [u8]) -> Result<u64, Jbd2Error> {
        let offset_bytes = self.offset_bytes(journal_block)?;
        self.device.read_exact_at(buf, offset_bytes)?;
        self.blocks_read += 1;
        Ok(offset_bytes)
    }
}

#[derive(Debug)]
struct Superblock {
    block_size_bytes: usize,
    first_block: u32,
    /// One past the last block of the circular log (the fast-commit area,
    /// if any, follows it).
    last_block: u32,
    sequence: u32,
    start_block: u32,
    compat: u32,
    incompat: u32,
    /// crc32c of the uuid, the seed of every v2/v3 checksum.
    checksum_seed: Option<u32>,
    fast_commit_block: Option<u32>,
}

impl Superblock {
    fn parse(block: &[u8], mapped_blocks: u64) -> Result<Superblock, Jbd2Error> {
        let (compat, incompat) = superblock_features(block)?;
        check_superblock_checksum(block, incompat)?;
        let block_size_bytes = be32(block, SUPERBLOCK_BLOCK_SIZE_OFFSET);
        if u64::from(block_size_bytes) != block.len() as u64 {
            return Err(corrupt(format!(
                "journal block size {block_size_bytes} bytes, the filesystem's is {}",
                block.len()
            )));
        }
        let maxlen_blocks = be32(block, SUPERBLOCK_MAXLEN_OFFSET);
        if maxlen_blocks > JOURNAL_BLOCKS_MAX {
            return Err(Jbd2Error::Unsupported(
                "journals longer than mke2fs makes (10,240,000 blocks)",
            ));
        }
        if u64::from(maxlen_blocks) > mapped_blocks {
            return Err(corrupt(format!(
                "the journal superblock says {maxlen_blocks} blocks, \
                 the journal inode maps {mapped_blocks}"
            )));
        }
        let (last_block, fast_commit_block) = log_end(block, incompat, maxlen_blocks)?;
        let first_block = be32(block, SUPERBLOCK_FIRST_OFFSET);
        if first_block == 0 || first_block >= last_block {
            return Err(corrupt(format!(
                "log starts at journal block {first_block}, ends at {last_block}"
            )));
        }
        let start_block = be32(block, SUPERBLOCK_START_OFFSET);
        if start_block != 0 && !(first_block..last_block).contains(&start_block) {
            return Err(corrupt(format!(
                "log head at journal block {start_block}, outside {first_block}..{last_block}"
            )));
        }
        let uuid = &block[SUPERBLOCK_UUID_OFFSET..SUPERBLOCK_UUID_OFFSET + UUID_BYTES];
        let checksum_seed =
            (incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) != 0).then(|| crc32c_raw(!0, uuid));
        Ok(Superblock {
            block_size_bytes: block.len(),
            first_block,
            last_block,
            sequence: be32(block, SUPERBLOCK_SEQUENCE_OFFSET),
            start_block,
            compat,
            incompat,
            checksum_seed,
            fast_commit_block,
        })
    }

    fn has(&self, incompat_flag: u32) -> bool {
        self.incompat & incompat_flag != 0
    }

    /// Bytes of one descriptor tag, uuid not counted (journal_tag_bytes).
    fn tag_bytes(&self) -> usize {
        if self.has(INCOMPAT_CSUM_V3) {
            return 16;
        }
        // A v2 tag is 2 bytes longer than its fields: the kernel sizes it
        // so, and the layout on disk follows the kernel.
        let with_checksum = if self.has(INCOMPAT_CSUM_V2) { 14 } else { 12 };
        if self.has(INCOMPAT_64BIT) {
            with_checksum
        } else {
            with_checksum - 4
        }
    }

    fn tail_bytes(&self) -> usize {
        if self.checksum_seed.is_some() {
            TAIL_BYTES
        } else {
            0
        }
    }

    /// The log block after `block`, wrapping at the end of the log.
    fn after(&self, block: u32) -> u32 {
        let next = block + 1;
        if next >= self.last_block {
            self.first_block
        } else {
            next
        }
    }

    fn ring_blocks(&self) -> u64 {
        u64::from(self.last_block - self.first_block)
    }
}

/// Compat and incompat features, or why this journal cannot be read.
/// A v1 superblock has no feature fields.
fn superblock_features(block: &[u8]) -> Result<(u32, u32), Jbd2Error> {
    if be32(block, 0) != JBD2_MAGIC {
        return Err(corrupt("no jbd2 magic in the journal superblock"));
    }
    let (compat, incompat, ro_compat) = match be32(block, 4) {
        BLOCK_TYPE_SUPERBLOCK_V1 => (0, 0, 0),
        BLOCK_TYPE_SUPERBLOCK_V2 => (
            be32(block, SUPERBLOCK_COMPAT_OFFSET),
            be32(block, SUPERBLOCK_INCOMPAT_OFFSET),
            be32(block, SUPERBLOCK_RO_COMPAT_OFFSET),
        ),
        BLOCK_TYPE_DESCRIPTOR | BLOCK_TYPE_COMMIT | BLOCK_TYPE_REVOKE => {
            return Err(corrupt(
                "journal block 0 is a log block, not the superblock",
            ));
        }
        _ => {
            return Err(Jbd2Error::Unsupported(
                "journal superblock of an unknown version",
            ));
        }
    };
    if incompat & !INCOMPAT_KNOWN != 0 {
        return Err(Jbd2Error::Unsupported(
            "unknown incompatible journal features",
        ));
    }
    if ro_compat != 0 {
        return Err(Jbd2Error::Unsupported("unknown read-only journal features"));
    }
    let v2_or_v3 = incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3);
    if v2_or_v3 == INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3 {
        return Err(corrupt("journal checksums v2 and v3 both set"));
    }
    if v2_or_v3 != 0 && compat & COMPAT_CHECKSUM != 0 {
        return Err(corrupt("journal checksums v1 and v2/v3 both set"));
    }
    Ok((compat, incompat))
}

fn check_superblock_checksum(block: &[u8], incompat: u32) -> Result<(), Jbd2Error> {
    if incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) == 0 {
        return Ok(());
    }
    let checksum_type = block[SUPERBLOCK_CHECKSUM_TYPE_OFFSET];
    if checksum_type != CHECKSUM_TYPE_CRC32C {
        return Err(corrupt(format!(
            "journal checksum type {checksum_type}, expected crc32c ({CHECKSUM_TYPE_CRC32C})"
        )));
    }
    let stored = be32(block, SUPERBLOCK_CHECKSUM_OFFSET);
    let computed = checksum_with_hole(!0, &block[..SUPERBLOCK_BYTES], SUPERBLOCK_CHECKSUM_OFFSET);
    if stored != computed {
        return Err(corrupt(format!(
            "journal superblock checksum {stored:#010x}, computed {computed:#010x}"
        )));
    }
    Ok(())
}

/// The end of the circular log and the fast-commit area's first block:
/// with fast commits the last `s_num_fc_blks` blocks are theirs.
fn log_end(
    block: &[u8],
    incompat: u32,
    maxlen_blocks: u32,
) -> Result<(u32, Option<u32>), Jbd2Error> {
    if incompat & INCOMPAT_FAST_COMMIT == 0 {
        return Ok((maxlen_blocks, None));
    }
    let fast_commit_blocks = match be32(block, SUPERBLOCK_FAST_COMMIT_BLOCKS_OFFSET) {
        0 => FAST_COMMIT_BLOCKS_DEFAULT,
        count => count,
    };
    let last_block = maxlen_blocks
        .checked_sub(fast_commit_blocks)
        .filter(|last| *last >= FAST_COMMIT_LOG_BLOCKS_MIN)
        .ok_or_else(|| {
            corrupt(format!(
                "{fast_commit_blocks} fast-commit blocks in a journal of {maxlen_blocks}"
            ))
        })?;
    // The kernel and e2fsck start fast commits one block past the log.
    let first_fast_commit = last_block + 1;
    Ok((
        last_block,
        (first_fast_commit < maxlen_blocks).then_some(first_fast_commit),
    ))
}

/// A logged copy of one filesystem block.
#[derive(Debug, Clone, Copy)]
struct Tag {
    fs_block: u64,
    log_block: u32,
    escaped: bool,
    /// The tag's data-block checksum (16 bits under v2, 32 under v3).
    checksum: u32,
}

#[derive(Debug)]
struct Transaction {
    sequence: u32,
    tags: Vec<Tag>,
    /// Where this transaction's revoke blocks are; the revoke pass reads
    /// them again rather than holding every record.
    revoke_blocks: Vec<u32>,
}

impl Transaction {
    fn new(sequence: u32) -> Self {
        Transaction {
            sequence,
            tags: Vec::new(),
            revoke_blocks: Vec::new(),
        }
    }
}

/// The committed part of the log.
struct Log {
    committed: Vec<Transaction>,
    log_blocks: u64,
}

/// The scan pass's state (recovery.c's PASS_SCAN).
struct Scan<'s> {
    superblock: &'s Superblock,
    next_block: u32,
    walked_blocks: u64,
    current: Transaction,
    committed: Vec<Transaction>,
    log_blocks: u64,
    last_commit_seconds: u64,
    /// A descriptor or revoke block of the current transaction failed its
    /// checksum; its commit block decides between corruption and a stale
    /// block from an earlier use of the journal.
    block_checksum_failed: bool,
    /// Running checksum v1 (crc32, big-endian) of the transaction.
    v1_checksum: u32,
}

enum Step {
    Next,
    End,
}

/// Walks the log from `s_start` until a block that is not the next one of
/// the expected transaction, and returns the transactions committed before
/// it. An uncommitted last transaction is dropped, as the kernel does.
fn scan<R: ReadAt>(file: &mut JournalFile<R>, superblock: &Superblock) -> Result<Log, Jbd2Error> {
    let mut scan = Scan {
        superblock,
        next_block: superblock.start_block,
        walked_blocks: 0,
        current: Transaction::new(superblock.sequence),
        committed: Vec::new(),
        log_blocks: 0,
        last_commit_seconds: 0,
        block_checksum_failed: false,
        v1_checksum: !0,
    };
    let mut block = vec![0u8; superblock.block_size_bytes];
    loop {
        // A valid log never laps the ring: each transaction has a higher
        // sequence than the blocks after its end. Without this a ring of
        // same-sequence descriptors would be walked forever.
        if scan.walked_blocks > superblock.ring_blocks() {
            return Err(corrupt(format!(
                "the log from journal block {} runs past its own start",
                superblock.start_block
            )));
        }
        let position = scan.next_block;
        file.read(position, &mut block)?;
        scan.next_block = superblock.after(position);
        scan.walked_blocks += 1;
        if be32(&block, 0) != JBD2_MAGIC || be32(&block, 8) != scan.current.sequence {
            break;
        }
        let step = match be32(&block, 4) {
            BLOCK_TYPE_DESCRIPTOR => scan.descriptor(file, &block)?,
            BLOCK_TYPE_COMMIT => scan.commit(&block, position)?,
            BLOCK_TYPE_REVOKE => scan.revoke(&block, position)?,
            _ => Step::End,
        };
        if let Step::End = step {
            break;
        }
    }
    Ok(Log {
        committed: scan.committed,
        log_blocks: scan.log_blocks,
    })
}

impl Scan<'_> {
    fn descriptor<R: ReadAt>(
        &mut self,
        file: &mut JournalFile<R>,
        block: &[u8],
    ) -> Result<Step, Jbd2Error> {
        if !tail_checksum_ok(self.superblock, block) {
            self.block_checksum_failed = true;
        }
        let tags = parse_tags(self.superblock, block, self.next_block);
        if self.superblock.compat & COMPAT_CHECKSUM != 0 {
            self.v1_checksum = crc32_be(self.v1_checksum, block);
            let mut data = vec![0u8; block.len()];
            for tag in &tags {
                file.read(tag.log_block, &mut data)?;
                self.v1_checksum = crc32_be(self.v1_checksum, &data);
            }
        }
        if let Some(last) = tags.last() {
            self.next_block = self.superblock.after(last.log_block);
        }
        self.walked_blocks += tags.len() as u64;
        self.current.tags.extend(tags);
        Ok(Step::Next)
    }

    fn commit(&mut self, block: &[u8], position: u32) -> Result<Step, Jbd2Error> {
        let commit_seconds = be64(block, COMMIT_SECONDS_OFFSET);
        if self.block_checksum_failed {
            // As the kernel: a commit at least as new as the last one means
            // this transaction is the journal's and is corrupt; an older
            // one means stale blocks left from before, so the log ends.
            if commit_seconds >= self.last_commit_seconds {
                return Err(corrupt(format!(
                    "transaction {} (commit at journal block {position}) has a \
                     descriptor or revoke block failing its checksum",
                    self.current.sequence
                )));
            }
            return Ok(Step::End);
        }
        if !self.commit_checksum_ok(block) {
            // An interrupted commit: the log ends before this transaction.
            // (With async_commit the kernel scans on but replays no more.)
            return Ok(Step::End);
        }
        self.last_commit_seconds = commit_seconds;
        let next = Transaction::new(self.current.sequence.wrapping_add(1));
        self.committed
            .push(std::mem::replace(&mut self.current, next));
        self.log_blocks = self.walked_blocks;
        Ok(Step::Next)
    }

    fn commit_checksum_ok(&mut self, block: &[u8]) -> bool {
        let stored = be32(block, COMMIT_CHECKSUM_OFFSET);
        if self.superblock.compat & COMPAT_CHECKSUM != 0 {
            let checksum_type = block[COMMIT_CHECKSUM_TYPE_OFFSET];
            let checksum_size = block[COMMIT_CHECKSUM_SIZE_OFFSET];
            let matches = stored == self.v1_checksum
                && checksum_type == V1_CHECKSUM_TYPE_CRC32
                && checksum_size == V1_CHECKSUM_SIZE_BYTES;
            // A commit written without a checksum is accepted as such.
            let absent = checksum_type == 0 && checksum_size == 0 && stored == 0;
            self.v1_checksum = !0;
            return matches || absent;
        }
        let Some(seed) = self.superblock.checksum_seed else {
            return true;
        };
        if checksum_with_hole(seed, block, COMMIT_CHECKSUM_OFFSET) == stored {
            return true;
        }
        // The kernel also accepts a commit block of which only the header
        // reached the disk, checksummed as if the rest were zeros.
        let mut header_only = vec![0u8; block.len()];
        header_only[..COMMIT_HEADER_BYTES].copy_from_slice(&block[..COMMIT_HEADER_BYTES]);
        checksum_with_hole(seed, &header_only, COMMIT_CHECKSUM_OFFSET) == stored
    }

    fn revoke(&mut self, block: &[u8], position: u32) -> Result<Step, Jbd2Error> {
        if !tail_checksum_ok(self.superblock, block) {
            self.block_checksum_failed = true;
        }
        revoke_records(self.superblock, block, position)?;
        self.current.revoke_blocks.push(position);
        Ok(Step::Next)
    }
}

/// The tags of a descriptor block; the first names the block at
/// `first_data_block`, each next one the block after (count_tags: the
/// block size bounds them).
fn parse_tags(superblock: &Superblock, block: &[u8], first_data_block: u32) -> Vec<Tag> {
    let tag_bytes = superblock.tag_bytes();
    let end = block.len() - superblock.tail_bytes();
    let mut tags = Vec::new();
    let mut at = HEADER_BYTES;
    let mut log_block = first_data_block;
    while at + tag_bytes <= end {
        let flags = be16(block, at + 6);
        let mut fs_block = u64::from(be32(block, at));
        if superblock.has(INCOMPAT_64BIT) {
            fs_block |= u64::from(be32(block, at + 8)) << 32;
        }
        let checksum = if superblock.has(INCOMPAT_CSUM_V3) {
            be32(block, at + 12)
        } else {
            u32::from(be16(block, at + 4))
        };
        tags.push(Tag {
            fs_block,
            log_block,
            escaped: flags & TAG_FLAG_ESCAPE != 0,
            checksum,
        });
        log_block = superblock.after(log_block);
        at += tag_bytes;
        if flags & TAG_FLAG_SAME_UUID == 0 {
            at += UUID_BYTES;
        }
        if flags & TAG_FLAG_LAST_TAG != 0 {
            break;
        }
    }
    tags
}

/// The block numbers a revoke block lists.
fn revoke_records(
    superblock: &Superblock,
    block: &[u8],
    position: u32,
) -> Result<Vec<u64>, Jbd2Error> {
    let used_bytes = u64::from(be32(block, REVOKE_COUNT_OFFSET));
    let limit_bytes = block.len() - superblock.tail_bytes();
    if used_bytes > limit_bytes as u64 {
        return Err(corrupt(format!(
            "revoke block at journal block {position} uses {used_bytes} bytes of {limit_bytes}"
        )));
    }
    let records = block
        .get(REVOKE_RECORDS_OFFSET..used_bytes as usize)
        .unwrap_or_default();
    let wide = superblock.has(INCOMPAT_64BIT);
    let record_bytes = if wide { 8 } else { 4 };
    Ok(records
        .chunks_exact(record_bytes)
        .map(|record| {
            if wide {
                be64(record, 0)
            } else {
                u64::from(be32(record, 0))
            }
        })
        .collect())
}

/// Fast commits follow the last full commit and describe changes in
/// ext4's own terms, which this crate does not replay; say so rather than
/// show the filesystem without them. Stale ones name an older transaction.
fn check_fast_commits<R: ReadAt>(
    file: &mut JournalFile<R>,
    superblock: &Superblock,
    next_sequence: u32,
) -> Result<(), Jbd2Error> {
    let Some(position) = superblock.fast_commit_block else {
        return Ok(());
    };
    let mut block = vec![0u8; superblock.block_size_bytes];
    file.read(position, &mut block)?;
    let tag = u16::from_le_bytes([block[0], block[1]]);
    let tid_bytes = &block[FAST_COMMIT_TID_OFFSET..FAST_COMMIT_TID_OFFSET + 4];
    let tid = u32::from_le_bytes([tid_bytes[0], tid_bytes[1], tid_bytes[2], tid_bytes[3]]);
    if tag == FAST_COMMIT_TAG_HEAD && tid == next_sequence {
        return Err(Jbd2Error::Unsupported(
            "fast commits in the journal (mount the filesystem or run e2fsck to replay them)",
        ));
    }
    Ok(())
}

/// Filesystem block -> the newest committed transaction revoking it, for
/// the blocks the log holds copies of: revokes of other blocks change
/// nothing, and leaving them out bounds the table by the log's length.
fn collect_revokes<R: ReadAt>(
    file: &mut JournalFile<R>,
    superblock: &Superblock,
    committed: &[Transaction],
) -> Result<BTreeMap<u64, u32>, Jbd2Error> {
    let logged: BTreeSet<u64> = committed
        .iter()
        .flat_map(|transaction| transaction.tags.iter().map(|tag| tag.fs_block))
        .collect();
    let mut revokes = BTreeMap::new();
    let mut block = vec![0u8; superblock.block_size_bytes];
    for transaction in committed {
        for &position in &transaction.revoke_blocks {
            file.read(position, &mut block)?;
            for fs_block in revoke_records(superblock, &block, position)? {
                if !logged.contains(&fs_block) {
                    continue;
                }
                revokes
                    .entry(fs_block)
                    .and_modify(|sequence: &mut u32| {
                        if sequence_after(transaction.sequence, *sequence) {
                            *sequence = transaction.sequence;
                        }
                    })
                    .or_insert(transaction.sequence);
            }
        }
    }
    Ok(revokes)
}

/// Maps each logged block to its newest copy that no revoke covers and
/// whose checksum holds. Newest first, so older copies are read only
/// when every newer one failed its checksum.
fn replay_tags<R: ReadAt>(
    file: &mut JournalFile<R>,
    superblock: &Superblock,
    committed: &[Transaction],
    revokes: &BTreeMap<u64, u32>,
    replay: &mut Replay,
) -> Result<(), Jbd2Error> {
    let mut data = vec![0u8; superblock.block_size_bytes];
    for transaction in committed.iter().rev() {
        for tag in transaction.tags.iter().rev() {
            let revoked = revokes
                .get(&tag.fs_block)
                .is_some_and(|&revoking| !sequence_after(transaction.sequence, revoking));
            if revoked {
                replay.revoked_blocks += 1;
                continue;
            }
            if replay.replaced.contains_key(&tag.fs_block) {
                continue;
            }
            let offset_bytes = match superblock.checksum_seed {
                None => file.offset_bytes(tag.log_block)?,
                Some(seed) => {
                    let offset_bytes = file.read(tag.log_block, &mut data)?;
                    if !data_checksum_ok(superblock, seed, transaction.sequence, &data, tag) {
                        replay.bad_blocks += 1;
                        continue;
                    }
                    offset_bytes
                }
            };
            let copy = Replacement {
                offset_bytes,
                escaped: tag.escaped,
            };
            replay.replaced.insert(tag.fs_block, copy);
        }
    }
    Ok(())
}

/// The tail checksum of a descriptor or revoke block (true without v2/v3).
fn tail_checksum_ok(superblock: &Superblock, block: &[u8]) -> bool {
    let Some(seed) = superblock.checksum_seed else {
        return true;
    };
    let tail = block.len() - TAIL_BYTES;
    checksum_with_hole(seed, block, tail) == be32(block, tail)
}

/// A data block's checksum: crc32c over the sequence (big-endian) and the
/// block as logged (escaped).
fn data_checksum_ok(
    superblock: &Superblock,
    seed: u32,
    sequence: u32,
    data: &[u8],
    tag: &Tag,
) -> bool {
    let checksum = crc32c_raw(crc32c_raw(seed, &sequence.to_be_bytes()), data);
    if superblock.has(INCOMPAT_CSUM_V3) {
        checksum == tag.checksum
    } else {
        checksum & 0xFFFF == tag.checksum
    }
}

/// crc32c of `data` with its 4 bytes at `hole` read as zeros: where the
/// block keeps its own checksum.
fn checksum_with_hole(seed: u32, data: &[u8], hole: usize) -> u32 {
    let crc = crc32c_raw(seed, &data[..hole]);
    let crc = crc32c_raw(crc, &[0u8; 4]);
    crc32c_raw(crc, &data[hole + 4..])
}

/// The kernel's crc32_be (checksum v1): polynomial 0x04C11DB7, most
/// significant bit first, no inversion. Only old journals use it, so a
/// bitwise loop is fast enough.
fn crc32_be(mut crc: u32, data: &[u8]) -> u32 {
    for &byte in data {
        crc ^= u32::from(byte) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04C1_1DB7
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// `a` is a later transaction than `b`, modulo 2^32 (tid_gt).
fn sequence_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn be64(bytes: &[u8], at: usize) -> u64 {
    (u64::from(be32(bytes, at)) << 32) | u64::from(be32(bytes, at + 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::read::{Bytes, Overlay};
    use crate::testing::Random;

    const BLOCK_BYTES: usize = 1024;
    /// Where the journal starts on the test device; the blocks before it
    /// stand for the filesystem.
    const JOURNAL_START_BLOCK: u64 = 4;
    const UUID: [u8; 16] = *b"blockwatch-jbd2!";

    fn fill(byte: u8) -> Vec<u8> {
        vec![byte; BLOCK_BYTES]
    }

    /// Device offset of journal block `position`.
    fn offset(position: u32) -> u64 {
        (JOURNAL_START_BLOCK + u64::from(position)) * BLOCK_BYTES as u64
    }

    fn header(block_type: u32, sequence: u32) -> Vec<u8> {
        let mut block = vec![0u8; BLOCK_BYTES];
        put32(&mut block, 0, JBD2_MAGIC);
        put32(&mut block, 4, block_type);
        put32(&mut block, 8, sequence);
        block
    }

    fn put16(block: &mut [u8], at: usize, value: u16) {
        block[at..at + 2].copy_from_slice(&value.to_be_bytes());
    }

    fn put32(block: &mut [u8], at: usize, value: u32) {
        block[at..at + 4].copy_from_slice(&value.to_be_bytes());
    }

    /// Writes journals the way jbd2 lays them out, written from the
    /// structures in include/linux/jbd2.h rather than from the parser.
    struct Builder {
        compat: u32,
        incompat: u32,
        maxlen: u32,
        fast_commit_blocks: u32,
        sequence: u32,
        start: u32,
        blocks: Vec<Vec<u8>>,
        cursor: u32,
        commit_seconds: u64,
        v1_checksum: u32,
    }

    impl Builder {
        fn new(compat: u32, incompat: u32, maxlen: u32) -> Builder {
            Builder {
                compat,
                incompat,
                maxlen,
                fast_commit_blocks: 0,
                sequence: 1,
                start: 1,
                blocks: vec![vec![0u8; BLOCK_BYTES]; maxlen as usize],
                cursor: 1,
                commit_seconds: 1_000,
                v1_checksum: !0,
            }
        }

        /// The log starts at `start` with transaction `sequence`.
        fn at(mut self, sequence: u32, start: u32) -> Builder {
            self.sequence = sequence;
            self.start = start;
            self.cursor = start;
            self
        }

        fn seed(&self) -> Option<u32> {
            (self.incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) != 0)
                .then(|| crc32c_raw(!0, &UUID))
        }

        fn take(&mut self) -> u32 {
            let position = self.cursor;
            self.cursor += 1;
            if self.cursor >= self.maxlen - self.fast_commit_blocks {
                self.cursor = 1;
            }
            position
        }

        fn set_tail(&self, block: &mut [u8]) {
            if let Some(seed) = self.seed() {
                let tail = BLOCK_BYTES - 4;
                let checksum = checksum_with_hole(seed, block, tail);
                put32(block, tail, checksum);
            }
        }

        /// A descriptor and its data blocks; returns where each copy went.
        fn descriptor(&mut self, sequence: u32, copies: &[(u64, &[u8])]) -> Vec<u32> {
            let position = self.take();
            let mut block = header(BLOCK_TYPE_DESCRIPTOR, sequence);
            let v3 = self.incompat & INCOMPAT_CSUM_V3 != 0;
            let v2 = self.incompat & INCOMPAT_CSUM_V2 != 0;
            let wide = self.incompat & INCOMPAT_64BIT != 0;
            let tag_bytes = match (v3, v2, wide) {
                (true, _, _) => 16,
                (false, true, true) => 14,
                (false, true, false) => 10,
                (false, false, true) => 12,
                (false, false, false) => 8,
            };
            let mut at = HEADER_BYTES;
            let mut positions = Vec::new();
            let mut logged_blocks = Vec::new();
            for (index, (fs_block, data)) in copies.iter().enumerate() {
                let mut logged = data.to_vec();
                let mut flags = 0u16;
                if logged[..4] == JBD2_MAGIC.to_be_bytes() {
                    logged[..4].fill(0);
                    flags |= TAG_FLAG_ESCAPE;
                }
                if index > 0 {
                    flags |= TAG_FLAG_SAME_UUID;
                }
                if index + 1 == copies.len() {
                    flags |= TAG_FLAG_LAST_TAG;
                }
                let checksum = self
                    .seed()
                    .map(|seed| crc32c_raw(crc32c_raw(seed, &sequence.to_be_bytes()), &logged))
                    .unwrap_or(0);
                put32(&mut block, at, *fs_block as u32);
                if v3 {
                    put32(&mut block, at + 4, u32::from(flags));
                    put32(&mut block, at + 8, (*fs_block >> 32) as u32);
                    put32(&mut block, at + 12, checksum);
                } else {
                    put16(&mut block, at + 4, checksum as u16);
                    put16(&mut block, at + 6, flags);
                    if wide {
                        put32(&mut block, at + 8, (*fs_block >> 32) as u32);
                    }
                }
                at += tag_bytes;
                if index == 0 {
                    block[at..at + 16].copy_from_slice(&UUID);
                    at += 16;
                }
                let data_position = self.take();
                positions.push(data_position);
                logged_blocks.push(logged.clone());
                self.blocks[data_position as usize] = logged;
            }
            self.set_tail(&mut block);
            if self.compat & COMPAT_CHECKSUM != 0 {
                self.v1_checksum = crc32_be(self.v1_checksum, &block);
                for logged in &logged_blocks {
                    self.v1_checksum = crc32_be(self.v1_checksum, logged);
                }
            }
            self.blocks[position as usize] = block;
            positions
        }

        fn commit(&mut self, sequence: u32) -> u32 {
            let position = self.take();
            let mut block = header(BLOCK_TYPE_COMMIT, sequence);
            block[COMMIT_SECONDS_OFFSET..COMMIT_SECONDS_OFFSET + 8]
                .copy_from_slice(&self.commit_seconds.to_be_bytes());
            self.commit_seconds += 1;
            if self.compat & COMPAT_CHECKSUM != 0 {
                block[COMMIT_CHECKSUM_TYPE_OFFSET] = V1_CHECKSUM_TYPE_CRC32;
                block[COMMIT_CHECKSUM_SIZE_OFFSET] = V1_CHECKSUM_SIZE_BYTES;
                put32(&mut block, COMMIT_CHECKSUM_OFFSET, self.v1_checksum);
                self.v1_checksum = !0;
            }
            if let Some(seed) = self.seed() {
                let checksum = checksum_with_hole(seed, &block, COMMIT_CHECKSUM_OFFSET);
                put32(&mut block, COMMIT_CHECKSUM_OFFSET, checksum);
            }
            self.blocks[position as usize] = block;
            position
        }

        fn revoke(&mut self, sequence: u32, fs_blocks: &[u64]) -> u32 {
            let position = self.take();
            let mut block = header(BLOCK_TYPE_REVOKE, sequence);
            let mut at = REVOKE_RECORDS_OFFSET;
            for &fs_block in fs_blocks {
                if self.incompat & INCOMPAT_64BIT != 0 {
                    block[at..at + 8].copy_from_slice(&fs_block.to_be_bytes());
                    at += 8;
                } else {
                    put32(&mut block, at, fs_block as u32);
                    at += 4;
                }
            }
            put32(&mut block, REVOKE_COUNT_OFFSET, at as u32);
            self.set_tail(&mut block);
            self.blocks[position as usize] = block;
            position
        }

        fn superblock(&self) -> Vec<u8> {
            let mut block = header(BLOCK_TYPE_SUPERBLOCK_V2, 0);
            put32(&mut block, SUPERBLOCK_BLOCK_SIZE_OFFSET, BLOCK_BYTES as u32);
            put32(&mut block, SUPERBLOCK_MAXLEN_OFFSET, self.maxlen);
            put32(&mut block, SUPERBLOCK_FIRST_OFFSET, 1);
            put32(&mut block, SUPERBLOCK_SEQUENCE_OFFSET, self.sequence);
            put32(&mut block, SUPERBLOCK_START_OFFSET, self.start);
            put32(&mut block, SUPERBLOCK_COMPAT_OFFSET, self.compat);
            put32(&mut block, SUPERBLOCK_INCOMPAT_OFFSET, self.incompat);
            block[SUPERBLOCK_UUID_OFFSET..SUPERBLOCK_UUID_OFFSET + 16].copy_from_slice(&UUID);
            put32(
                &mut block,
                SUPERBLOCK_FAST_COMMIT_BLOCKS_OFFSET,
                self.fast_commit_blocks,
            );
            if self.seed().is_some() {
                block[SUPERBLOCK_CHECKSUM_TYPE_OFFSET] = CHECKSUM_TYPE_CRC32C;
                let checksum = checksum_with_hole(!0, &block, SUPERBLOCK_CHECKSUM_OFFSET);
                put32(&mut block, SUPERBLOCK_CHECKSUM_OFFSET, checksum);
            }
            block
        }

        /// The device: filesystem blocks, then the journal.
        fn build(&self) -> (Bytes, Vec<FileExtent>) {
            let mut image = vec![0xEEu8; JOURNAL_START_BLOCK as usize * BLOCK_BYTES];
            image.extend_from_slice(&self.superblock());
            for block in &self.blocks[1..] {
                image.extend_from_slice(block);
            }
            let extent = FileExtent {
                logical_block: 0,
                physical_block: JOURNAL_START_BLOCK,
                block_count: u64::from(self.maxlen),
                uninitialized: false,
            };
            (Bytes(image), vec![extent])
        }

        fn replay(&self) -> Result<Replay, Jbd2Error> {
            let (image, extents) = self.build();
            replay(&image, BLOCK_BYTES as u64, &extents)
        }
    }

    fn copy_at(position: u32) -> Replacement {
        Replacement {
            offset_bytes: offset(position),
            escaped: false,
        }
    }

    /// Every layout of tags and every checksum version.
    const FEATURE_SETS: [(u32, u32); 9] = [
        (0, 0),
        (0, INCOMPAT_64BIT),
        (0, INCOMPAT_REVOKE),
        (0, INCOMPAT_CSUM_V2),
        (0, INCOMPAT_CSUM_V2 | INCOMPAT_64BIT),
        (0, INCOMPAT_CSUM_V3),
        (0, INCOMPAT_CSUM_V3 | INCOMPAT_64BIT | INCOMPAT_REVOKE),
        (COMPAT_CHECKSUM, 0),
        (COMPAT_CHECKSUM, INCOMPAT_64BIT),
    ];

    #[test]
    fn a_committed_transaction_maps_each_logged_block_to_its_copy() {
        for (compat, incompat) in FEATURE_SETS {
            let label = format!("compat {compat:#x} incompat {incompat:#x}");
            let high_block = if incompat & INCOMPAT_64BIT != 0 {
                0x1_0000_0005
            } else {
                5
            };
            let mut journal = Builder::new(compat, incompat, 64);
            let first = journal.descriptor(1, &[(3, &fill(0x33)), (high_block, &fill(0x55))]);
            journal.commit(1);
            let many: Vec<(u64, Vec<u8>)> = (100..140).map(|b| (b, fill(b as u8))).collect();
            let borrowed: Vec<(u64, &[u8])> =
                many.iter().map(|(b, data)| (*b, data.as_slice())).collect();
            let second = journal.descriptor(2, &borrowed);
            journal.commit(2);
            let replay = journal.replay().unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_eq!(replay.transactions, 2, "{label}");
            assert_eq!(
                (replay.first_sequence, replay.next_sequence),
                (1, 3),
                "{label}"
            );
            assert_eq!(replay.log_blocks, 4 + 42, "{label}");
            assert_eq!(replay.replaced.len(), 42, "{label}");
            assert_eq!(replay.replaced[&3], copy_at(first[0]), "{label}");
            assert_eq!(replay.replaced[&high_block], copy_at(first[1]), "{label}");
            for (index, fs_block) in (100..140).enumerate() {
                assert_eq!(
                    replay.replaced[&fs_block],
                    copy_at(second[index]),
                    "{label}"
                );
            }
            assert_eq!(
                (replay.bad_blocks, replay.revoked_blocks),
                (0, 0),
                "{label}"
            );
            let overlay = Overlay {
                inner: journal.build().0,
                block_size: BLOCK_BYTES as u64,
                replaced: replay.replaced,
            };
            let mut block = vec![0u8; BLOCK_BYTES];
            overlay
                .read_exact_at(&mut block, 3 * BLOCK_BYTES as u64)
                .unwrap();
            assert_eq!(block, fill(0x33), "{label}");
            overlay
                .read_exact_at(&mut block, 2 * BLOCK_BYTES as u64)
                .unwrap();
            assert_eq!(block, fill(0xEE), "{label}: a block not in the log");
        }
    }

    #[test]
    fn without_checksums_only_descriptor_and_commit_blocks_are_read() {
        let mut journal = Builder::new(0, INCOMPAT_64BIT, 64);
        journal.descriptor(1, &[(3, &fill(1)), (4, &fill(2)), (5, &fill(3))]);
        journal.commit(1);
        let replay = journal.replay().unwrap();
        // superblock, descriptor, commit, the block that ends the log
        assert_eq!(replay.journal_blocks_read, 4);
        assert_eq!(replay.replaced.len(), 3);
    }

    #[test]
    fn a_revoke_cancels_copies_in_its_own_and_earlier_transactions_only() {
        for (compat, incompat) in FEATURE_SETS {
            let label = format!("compat {compat:#x} incompat {incompat:#x}");
            let mut journal = Builder::new(compat, incompat, 64);
            journal.descriptor(1, &[(10, &fill(1)), (11, &fill(2))]);
            journal.commit(1);
            journal.revoke(2, &[10, 12, 999]);
            journal.descriptor(2, &[(12, &fill(3)), (13, &fill(4))]);
            journal.commit(2);
            let again = journal.descriptor(3, &[(10, &fill(5))]);
            journal.commit(3);
            let replay = journal.replay().unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_eq!(replay.transactions, 3, "{label}");
            let blocks: Vec<u64> = replay.replaced.keys().copied().collect();
            assert_eq!(
                blocks,
                [10, 11, 13],
                "{label}: 12 is revoked in its own transaction"
            );
            assert_eq!(replay.replaced[&10], copy_at(again[0]), "{label}");
            // 10 in transaction 1 and 12 in transaction 2
            assert_eq!(replay.revoked_blocks, 2, "{label}");
        }
    }

    #[test]
    fn an_uncommitted_last_transaction_and_its_revokes_are_ignored() {
        let mut journal = Builder::new(0, INCOMPAT_CSUM_V3, 64);
        let first = journal.descriptor(1, &[(10, &fill(1))]);
        journal.commit(1);
        journal.revoke(2, &[10]);
        journal.descriptor(2, &[(11, &fill(2))]);
        let replay = journal.replay().unwrap();
        assert_eq!(replay.transactions, 1);
        assert_eq!(replay.next_sequence, 2);
        assert_eq!(replay.log_blocks, 3);
        assert_eq!(replay.replaced.len(), 1);
        assert_eq!(replay.replaced[&10], copy_at(first[0]));
    }

    #[test]
    fn a_block_of_an_older_sequence_ends_the_log() {
        let mut journal = Builder::new(0, 0, 64).at(7, 1);
        journal.descriptor(7, &[(10, &fill(1))]);
        journal.commit(7);
        // Left from an earlier pass through the journal: sequence 5.
        journal.descriptor(5, &[(11, &fill(2))]);
        journal.commit(5);
        let replay = journal.replay().unwrap();
        assert_eq!((replay.transactions, replay.next_sequence), (1, 8));
        assert!(!replay.replaced.contains_key(&11));
    }

    #[test]
    fn the_log_wraps_from_the_end_of_the_journal_to_its_first_block() {
        let mut journal = Builder::new(0, INCOMPAT_CSUM_V3, 16).at(7, 13);
        let copies: Vec<(u64, Vec<u8>)> = (20..25).map(|b| (b, fill(b as u8))).collect();
        let borrowed: Vec<(u64, &[u8])> = copies
            .iter()
            .map(|(b, data)| (*b, data.as_slice()))
            .collect();
        let positions = journal.descriptor(7, &borrowed);
        assert_eq!(positions, [14, 15, 1, 2, 3], "the builder wraps");
        journal.commit(7);
        let later = journal.descriptor(8, &[(21, &fill(0x21))]);
        journal.commit(8);
        let replay = journal.replay().unwrap();
        assert_eq!((replay.transactions, replay.next_sequence), (2, 9));
        assert_eq!(replay.replaced[&22], copy_at(1));
        assert_eq!(replay.replaced[&24], copy_at(3));
        assert_eq!(replay.replaced[&21], copy_at(later[0]));
        assert_eq!(replay.log_blocks, 10);
    }

    #[test]
    fn an_escaped_block_reads_with_its_magic_restored() {
        for (compat, incompat) in FEATURE_SETS {
            let mut data = fill(0x44);
            data[..4].copy_from_slice(&JBD2_MAGIC.to_be_bytes());
            let mut journal = Builder::new(compat, incompat, 64);
            let positions = journal.descriptor(1, &[(6, &data)]);
            journal.commit(1);
            let replay = journal.replay().unwrap();
            let copy = replay.replaced[&6];
            assert_eq!(copy.offset_bytes, offset(positions[0]));
            assert!(copy.escaped);
            let overlay = Overlay {
                inner: journal.build().0,
                block_size: BLOCK_BYTES as u64,
                replaced: replay.replaced,
            };
            let mut block = vec![0u8; BLOCK_BYTES];
            overlay
                .read_exact_at(&mut block, 6 * BLOCK_BYTES as u64)
                .unwrap();
            assert_eq!(block, data);
        }
    }

    #[test]
    fn a_descriptor_failing_its_checksum_is_corruption_unless_its_commit_is_older() {
        for incompat in [INCOMPAT_CSUM_V2, INCOMPAT_CSUM_V3 | INCOMPAT_64BIT] {
            let mut journal = Builder::new(0, incompat, 64);
            journal.descriptor(1, &[(10, &fill(1))]);
            journal.commit(1);
            let descriptor = journal.cursor;
            journal.descriptor(2, &[(11, &fill(2))]);
            let commit = journal.commit(2);
            journal.blocks[descriptor as usize][BLOCK_BYTES - 1] ^= 1;
            assert!(matches!(journal.replay(), Err(Jbd2Error::Corrupt(_))));

            // The same blocks with an older commit time: stale blocks of an
            // earlier use of the journal, so the log ends before them.
            let block = &mut journal.blocks[commit as usize];
            block[COMMIT_SECONDS_OFFSET..COMMIT_SECONDS_OFFSET + 8]
                .copy_from_slice(&999u64.to_be_bytes());
            let seed = journal.seed().unwrap();
            let block = &mut journal.blocks[commit as usize];
            let checksum = checksum_with_hole(seed, block, COMMIT_CHECKSUM_OFFSET);
            put32(block, COMMIT_CHECKSUM_OFFSET, checksum);
            let replay = journal.replay().unwrap();
            assert_eq!((replay.transactions, replay.next_sequence), (1, 2));
        }
    }

    #[test]
    fn a_revoke_block_failing_its_checksum_is_corruption() {
        let mut journal = Builder::new(0, INCOMPAT_CSUM_V3, 64);
        let revoke = journal.revoke(1, &[10]);
        journal.descriptor(1, &[(11, &fill(2))]);
        journal.commit(1);
        journal.blocks[revoke as usize][REVOKE_RECORDS_OFFSET] ^= 1;
        assert!(matches!(journal.replay(), Err(Jbd2Error::Corrupt(_))));
    }

    #[test]
    fn a_commit_failing_its_checksum_ends_the_log_before_its_transaction() {
        for (compat, incompat) in [
            (0, INCOMPAT_CSUM_V3),
            (0, INCOMPAT_CSUM_V2),
            (COMPAT_CHECKSUM, 0),
        ] {
            let mut journal = Builder::new(compat, incompat, 64);
            journal.descriptor(1, &[(10, &fill(1))]);
            journal.commit(1);
            journal.descriptor(2, &[(11, &fill(2))]);
            let commit = journal.commit(2);
            journal.descriptor(3, &[(12, &fill(3))]);
            journal.commit(3);
            journal.blocks[commit as usize][COMMIT_CHECKSUM_OFFSET] ^= 0x80;
            let replay = journal.replay().unwrap();
            assert_eq!((replay.transactions, replay.next_sequence), (1, 2));
            assert_eq!(replay.replaced.keys().copied().collect::<Vec<_>>(), [10]);
        }
    }

    #[test]
    fn a_v1_checksum_covers_the_data_blocks() {
        let mut journal = Builder::new(COMPAT_CHECKSUM, 0, 64);
        journal.descriptor(1, &[(10, &fill(1))]);
        journal.commit(1);
        let data = journal.descriptor(2, &[(11, &fill(2))]);
        journal.commit(2);
        journal.blocks[data[0] as usize][100] ^= 1;
        let replay = journal.replay().unwrap();
        assert_eq!(replay.transactions, 1);
    }

    #[test]
    fn a_commit_whose_header_alone_reached_the_disk_still_commits() {
        let mut journal = Builder::new(0, INCOMPAT_CSUM_V3, 64);
        journal.descriptor(1, &[(10, &fill(1))]);
        let commit = journal.commit(1);
        let seed = journal.seed().unwrap();
        let block = &mut journal.blocks[commit as usize];
        put32(block, COMMIT_CHECKSUM_OFFSET, 0);
        let checksum = checksum_with_hole(seed, block, COMMIT_CHECKSUM_OFFSET);
        put32(block, COMMIT_CHECKSUM_OFFSET, checksum);
        block[COMMIT_HEADER_BYTES..].fill(0x5A);
        assert_eq!(journal.replay().unwrap().transactions, 1);
    }

    #[test]
    fn a_data_block_failing_its_checksum_falls_back_to_an_older_copy() {
        for incompat in [INCOMPAT_CSUM_V2, INCOMPAT_CSUM_V3] {
            let mut journal = Builder::new(0, incompat, 64);
            let older = journal.descriptor(1, &[(10, &fill(1)), (12, &fill(7))]);
            journal.commit(1);
            let newer = journal.descriptor(2, &[(10, &fill(2)), (11, &fill(3))]);
            journal.commit(2);
            journal.blocks[newer[0] as usize][500] ^= 1;
            journal.blocks[newer[1] as usize][500] ^= 1;
            let replay = journal.replay().unwrap();
            assert_eq!(replay.transactions, 2);
            assert_eq!(replay.bad_blocks, 2);
            assert_eq!(replay.replaced[&10], copy_at(older[0]));
            assert!(!replay.replaced.contains_key(&11));
            assert_eq!(replay.replaced[&12], copy_at(older[1]));
            // superblock, 2 descriptors, 2 commits, the end; data blocks
            // 10 (both copies), 11, 12
            assert_eq!(replay.journal_blocks_read, 6 + 4);
        }
    }

    #[test]
    fn sequence_numbers_wrap_past_u32_max() {
        let mut journal = Builder::new(0, INCOMPAT_REVOKE, 64).at(u32::MAX, 1);
        journal.descriptor(u32::MAX, &[(10, &fill(1)), (11, &fill(2))]);
        journal.commit(u32::MAX);
        journal.revoke(0, &[10]);
        journal.commit(0);
        let replay = journal.replay().unwrap();
        assert_eq!((replay.transactions, replay.next_sequence), (2, 1));
        assert_eq!(replay.replaced.keys().copied().collect::<Vec<_>>(), [11]);
    }

    #[test]
    fn an_empty_journal_reads_only_its_superblock() {
        let journal = Builder::new(0, INCOMPAT_CSUM_V3, 64).at(42, 0);
        let replay = journal.replay().unwrap();
        assert_eq!(replay.journal_blocks_read, 1);
        assert_eq!((replay.transactions, replay.next_sequence), (0, 42));
        assert!(replay.replaced.is_empty());
    }

    #[test]
    fn fast_commits_for_the_next_transaction_are_unsupported_and_stale_ones_ignored() {
        let mut journal = Builder::new(0, INCOMPAT_CSUM_V3 | INCOMPAT_FAST_COMMIT, 1040);
        journal.fast_commit_blocks = 16;
        journal.descriptor(1, &[(10, &fill(1))]);
        journal.commit(1);
        assert_eq!(journal.replay().unwrap().transactions, 1, "no fast commit");
        let mut head = vec![0u8; BLOCK_BYTES];
        head[0..2].copy_from_slice(&FAST_COMMIT_TAG_HEAD.to_le_bytes());
        head[2..4].copy_from_slice(&8u16.to_le_bytes());
        head[FAST_COMMIT_TID_OFFSET..FAST_COMMIT_TID_OFFSET + 4]
            .copy_from_slice(&1u32.to_le_bytes());
        journal.blocks[1025] = head.clone();
        assert_eq!(
            journal.replay().unwrap().transactions,
            1,
            "a stale fast commit"
        );
        head[FAST_COMMIT_TID_OFFSET..FAST_COMMIT_TID_OFFSET + 4]
            .copy_from_slice(&2u32.to_le_bytes());
        journal.blocks[1025] = head;
        assert!(matches!(journal.replay(), Err(Jbd2Error::Unsupported(_))));
    }

    #[test]
    fn a_log_that_never_ends_is_corrupt() {
        // 32 descriptors with one data block each fill the 64-block ring
        // exactly, so the walk comes back to its start with the same
        // sequence and no commit.
        let mut journal = Builder::new(0, 0, 65);
        for _ in 0..32 {
            journal.descriptor(1, &[(10, &fill(1))]);
        }
        assert_eq!(journal.cursor, 1);
        assert!(matches!(journal.replay(), Err(Jbd2Error::Corrupt(_))));
    }

    #[test]
    fn a_revoke_block_using_more_bytes_than_it_has_is_corrupt() {
        let mut journal = Builder::new(0, 0, 64);
        let revoke = journal.revoke(1, &[10]);
        journal.commit(1);
        put32(
            &mut journal.blocks[revoke as usize],
            REVOKE_COUNT_OFFSET,
            1025,
        );
        assert!(matches!(journal.replay(), Err(Jbd2Error::Corrupt(_))));
        put32(&mut journal.blocks[revoke as usize], REVOKE_COUNT_OFFSET, 3);
        assert_eq!(
            journal.replay().unwrap().transactions,
            1,
            "fewer bytes than the header"
        );
    }

    fn expect_corrupt(journal: &Builder, superblock: &[u8], label: &str) {
        let (mut image, extents) = journal.build();
        let at = JOURNAL_START_BLOCK as usize * BLOCK_BYTES;
        image.0[at..at + BLOCK_BYTES].copy_from_slice(superblock);
        let result = replay(&image, BLOCK_BYTES as u64, &extents);
        assert!(
            matches!(result, Err(Jbd2Error::Corrupt(_))),
            "{label}: {result:?}"
        );
    }

    #[test]
    fn superblocks_that_cannot_be_trusted_are_refused() {
        let journal = Builder::new(0, INCOMPAT_64BIT, 64);
        let good = journal.superblock();
        let edits: [(&str, usize, u32); 6] = [
            ("magic", 0, 0x1234_5678),
            ("a commit block type", 4, BLOCK_TYPE_COMMIT),
            ("block size", SUPERBLOCK_BLOCK_SIZE_OFFSET, 4096),
            ("longer than the inode", SUPERBLOCK_MAXLEN_OFFSET, 65),
            ("first block 0", SUPERBLOCK_FIRST_OFFSET, 0),
            ("start past the end", SUPERBLOCK_START_OFFSET, 64),
        ];
        for (label, at, value) in edits {
            let mut superblock = good.clone();
            put32(&mut superblock, at, value);
            expect_corrupt(&journal, &superblock, label);
        }
        let checksummed = Builder::new(0, INCOMPAT_CSUM_V3, 64);
        let mut superblock = checksummed.superblock();
        superblock[SUPERBLOCK_UUID_OFFSET] ^= 1;
        expect_corrupt(&checksummed, &superblock, "superblock checksum");
        let mut superblock = good.clone();
        put32(&mut superblock, SUPERBLOCK_INCOMPAT_OFFSET, 0x100);
        let (mut image, extents) = journal.build();
        let at = JOURNAL_START_BLOCK as usize * BLOCK_BYTES;
        image.0[at..at + BLOCK_BYTES].copy_from_slice(&superblock);
        assert!(matches!(
            replay(&image, BLOCK_BYTES as u64, &extents),
            Err(Jbd2Error::Unsupported(_))
        ));
        assert!(matches!(
            replay(&image, 1000, &extents),
            Err(Jbd2Error::Corrupt(_))
        ));
    }

    #[test]
    fn a_journal_block_the_extents_do_not_map_is_corrupt() {
        let mut journal = Builder::new(0, 0, 64);
        journal.descriptor(1, &[(10, &fill(1))]);
        journal.commit(1);
        let (image, _) = journal.build();
        // Journal blocks 0..2 and 3..64: the commit block (2) is a hole.
        let extents = [
            FileExtent {
                logical_block: 3,
                physical_block: JOURNAL_START_BLOCK + 3,
                block_count: 61,
                uninitialized: false,
            },
            FileExtent {
                logical_block: 0,
                physical_block: JOURNAL_START_BLOCK,
                block_count: 2,
                uninitialized: false,
            },
        ];
        let result = replay(&image, BLOCK_BYTES as u64, &extents);
        assert!(matches!(result, Err(Jbd2Error::Corrupt(_))), "{result:?}");
    }

    #[test]
    fn checksum_primitives_match_their_reference_values() {
        // CRC-32/MPEG-2 is the kernel's crc32_be(~0, ...) with no final xor.
        assert_eq!(crc32_be(!0, b"123456789"), 0x0376_E6E7);
        // The standard crc32c check value, inverted in and out by hand.
        assert_eq!(!crc32c_raw(!0, b"123456789"), 0xE306_9283);
        assert!(sequence_after(0, u32::MAX));
        assert!(!sequence_after(u32::MAX, 0));
    }

    /// A journal with every kind of block: two transactions, a revoke, an
    /// escaped block, an uncommitted tail.
    fn busy_journal(compat: u32, incompat: u32) -> Builder {
        let mut journal = Builder::new(compat, incompat, 24).at(9, 5);
        let mut escaped = fill(0x44);
        escaped[..4].copy_from_slice(&JBD2_MAGIC.to_be_bytes());
        journal.descriptor(9, &[(10, &fill(1)), (11, &escaped), (12, &fill(3))]);
        journal.commit(9);
        journal.revoke(10, &[11, 12]);
        journal.descriptor(10, &[(12, &fill(4)), (13, &fill(5))]);
        journal.commit(10);
        journal.descriptor(11, &[(14, &fill(6))]);
        journal
    }

    /// Outcomes of replaying damaged journals, so a test can tell that
    /// the damage reached every path and not only the first check.
    #[derive(Debug, Default)]
    struct Outcomes {
        replayed_blocks: u32,
        replayed_nothing: u32,
        corrupt: u32,
        unsupported: u32,
    }

    impl Outcomes {
        fn replay(&mut self, image: &Bytes, extents: &[FileExtent]) {
            match replay(image, BLOCK_BYTES as u64, extents) {
                Ok(replay) => {
                    let journal_end = image.0.len() as u64;
                    for copy in replay.replaced.values() {
                        assert!(copy.offset_bytes >= offset(1) && copy.offset_bytes < journal_end);
                    }
                    if replay.replaced.is_empty() {
                        self.replayed_nothing += 1;
                    } else {
                        self.replayed_blocks += 1;
                    }
                }
                Err(Jbd2Error::Corrupt(_)) => self.corrupt += 1,
                Err(Jbd2Error::Unsupported(_)) => self.unsupported += 1,
                Err(Jbd2Error::Io(error)) => panic!("reading an in-memory image: {error}"),
            }
        }
    }

    #[test]
    fn any_single_byte_change_gives_a_result_or_an_error_never_a_panic() {
        let feature_sets = [
            (0, INCOMPAT_REVOKE),
            (0, INCOMPAT_CSUM_V2),
            (0, INCOMPAT_CSUM_V3 | INCOMPAT_64BIT),
            (COMPAT_CHECKSUM, 0),
        ];
        for (compat, incompat) in feature_sets {
            let journal = busy_journal(compat, incompat);
            let (image, extents) = journal.build();
            let replay = replay(&image, BLOCK_BYTES as u64, &extents).unwrap();
            assert_eq!(replay.transactions, 2);
            let journal_at = JOURNAL_START_BLOCK as usize * BLOCK_BYTES;
            let mut mutated = image.clone();
            let mut outcomes = Outcomes::default();
            // Headers, tags and revoke records sit in the first bytes of a
            // block and checksums in the last; a change in the middle of a
            // block only breaks a checksum, which the tails already do.
            let interesting = |at: usize| {
                let within = (at - journal_at) % BLOCK_BYTES;
                !(160..BLOCK_BYTES - 8).contains(&within)
            };
            for at in (journal_at..image.0.len()).filter(|&at| interesting(at)) {
                for value in [image.0[at] ^ 0xFF, image.0[at] ^ 0x01] {
                    mutated.0[at] = value;
                    outcomes.replay(&mutated, &extents);
                }
                mutated.0[at] = image.0[at];
            }
            eprintln!("compat {compat:#x} incompat {incompat:#x}: {outcomes:?}");
            assert!(outcomes.replayed_blocks > 0 && outcomes.replayed_nothing > 0);
            assert!(outcomes.corrupt > 0);
        }
    }

    #[test]
    fn random_journals_give_a_result_or_an_error_never_a_panic() {
        let mut random = Random(0x9E37_79B9_7F4A_7C15);
        let mut outcomes = Outcomes::default();
        for round in 0..3000 {
            let (compat, incompat) = FEATURE_SETS[round % FEATURE_SETS.len()];
            let sequence = random.next() as u32;
            let mut journal =
                Builder::new(compat, incompat, 24).at(sequence, 1 + random.next() as u32 % 23);
            for position in 1..24 {
                let block = &mut journal.blocks[position];
                for byte in block.iter_mut() {
                    *byte = random.next() as u8;
                }
                // Mostly plausible headers (descriptors and commits of the
                // first two transactions, short descriptors), so the walk
                // gets past the magic and sequence checks.
                if random.next() % 4 != 0 {
                    const TYPES: [u32; 7] = [1, 1, 2, 2, 3, 5, 6];
                    put32(block, 0, JBD2_MAGIC);
                    put32(block, 4, TYPES[random.next() as usize % TYPES.len()]);
                    put32(block, 8, sequence.wrapping_add(random.next() as u32 % 2));
                    put32(block, REVOKE_COUNT_OFFSET, random.next() as u32 % 1100);
                    if random.next() % 2 == 0 {
                        put16(block, HEADER_BYTES + 6, TAG_FLAG_LAST_TAG);
                    }
                }
            }
            let (image, extents) = journal.build();
            outcomes.replay(&image, &extents);
        }
        eprintln!("{outcomes:?}");
        assert!(outcomes.replayed_blocks > 0 && outcomes.replayed_nothing > 0);
        assert!(outcomes.corrupt > 0);
    }
}
