//! A map saved beside a checkpoint, so two checkpoints' maps can be
//! compared long after the filesystem moved on. Format (docs/fsmap.md):
//! a 64-byte header, the metadata runs, special inodes, inode records and
//! directories, then a CRC-32C of everything before it. Little-endian.

use crate::ext4::{EXTENT_BLOCKS_MAX, FileExtent, MetaKind, MetaRun};
use crate::map::{FileRecord, FsMap, RUN_BLOCKS_MAX};

const MAGIC: &[u8; 8] = b"BWFSMAP1";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 64;
/// Smallest encodings, used to bound counts before allocating.
const META_RUN_BYTES: usize = 17;
/// A record's fixed fields (no extents, no mapping runs).
const RECORD_BYTES_MIN: usize = 72;
const EXTENT_BYTES: usize = 21;
const DIRECTORY_BYTES_MIN: usize = 8;
const ENTRY_BYTES_MIN: usize = 6;
/// Longest name an ext4 directory entry can hold.
const NAME_BYTES_MAX: usize = 255;
/// Block sizes ext4 allows (a power of two in between), as a built map has.
const BLOCK_SIZE_MIN_BYTES: u64 = 1024;
const BLOCK_SIZE_MAX_BYTES: u64 = 65536;
/// ext4 logical block numbers are 32-bit.
const LOGICAL_BLOCKS_MAX: u64 = 1 << 32;
/// The owner index of a loaded map is rebuilt from its runs' counts, one
/// entry per RUN_BLOCKS_MAX blocks, so a few bytes claiming a long run
/// could make loading loop and allocate for hours. A map's runs may need
/// OWNER_RUNS_BASE entries plus, on average, as many as a run of
/// EXTENT_BLOCKS_MAX blocks does: 128 for each run, at least 16 bytes.
/// A map built from ext4 needs fewer: no extent is longer, and each group's
/// metadata runs (two bitmaps and an inode table) average less unless its
/// inodes are over 8 KiB. The base is for a small map with a long run.
const OWNER_RUNS_PER_RUN_MAX: u64 = EXTENT_BLOCKS_MAX / RUN_BLOCKS_MAX;
const OWNER_RUNS_BASE: u64 = 1 << 12;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("saved file map is corrupt: {0}")]
    Corrupt(&'static str),
    #[error("saved file map has version {0}; this blockwatch reads version {VERSION}")]
    Version(u32),
}

pub fn encode(map: &FsMap) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + map.inodes.len() * 96);
    out.extend_from_slice(MAGIC);
    put32(&mut out, VERSION);
    put32(&mut out, map.block_size as u32);
    put64(&mut out, map.blocks_count);
    out.extend_from_slice(&map.uuid);
    put32(&mut out, map.first_inode);
    put32(&mut out, map.journal_inode);
    put32(&mut out, map.inodes.len() as u32);
    put32(&mut out, map.children.len() as u32);
    put32(&mut out, map.meta_runs.len() as u32);
    put32(&mut out, map.special_inodes.len() as u32);
    debug_assert_eq!(out.len(), HEADER_BYTES);
    for run in &map.meta_runs {
        put64(&mut out, run.start_block);
        put64(&mut out, run.block_count);
        out.push(run.kind as u8);
    }
    for &number in &map.special_inodes {
        put32(&mut out, number);
    }
    let mut numbers: Vec<&u32> = map.inodes.keys().collect();
    numbers.sort_unstable();
    for number in numbers {
        encode_record(&mut out, &map.inodes[number]);
    }
    let mut directories: Vec<&u32> = map.children.keys().collect();
    directories.sort_unstable();
    for directory in directories {
        let entries = &map.children[directory];
        put32(&mut out, *directory);
        put32(&mut out, entries.len() as u32);
        for (name, child) in entries {
            put32(&mut out, *child);
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name);
        }
    }
    put_notes(
        &mut out,
        map.problems
            .iter()
            .map(|(number, text)| (*number, text.as_str())),
    );
    let crc = crc32c::crc32c(&out);
    put32(&mut out, crc);
    out
}

/// Notes kept in a saved map (the map's unreadable structures, a disk's
/// notes) and the longest one, in bytes.
pub const NOTES_MAX: usize = 128;
const NOTE_BYTES_MAX: usize = 1024;

/// u32 count, then (u32 key, u16 length, UTF-8 bytes) each.
pub(crate) fn put_notes<'a>(out: &mut Vec<u8>, notes: impl Iterator<Item = (u32, &'a str)>) {
    let notes: Vec<(u32, &str)> = notes.take(NOTES_MAX).collect();
    put32(out, notes.len() as u32);
    for (key, text) in notes {
        let mut end = text.len().min(NOTE_BYTES_MAX);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        put32(out, key);
        out.extend_from_slice(&(end as u16).to_le_bytes());
        out.extend_from_slice(&text.as_bytes()[..end]);
    }
}

/// Reads what `put_notes` wrote at the start of `bytes`; returns the notes
/// and how many bytes they took.
pub(crate) fn get_notes(bytes: &[u8]) -> Result<(Vec<(u32, String)>, usize), PersistError> {
    let mut cursor = Cursor { bytes, at: 0 };
    let count = cursor.count(6)?;
    if count > NOTES_MAX {
        return Err(PersistError::Corrupt("too many notes"));
    }
    let mut notes = Vec::with_capacity(count);
    for _ in 0..count {
        let key = cursor.u32()?;
        let length = usize::from(cursor.u16()?);
        if length > NOTE_BYTES_MAX {
            return Err(PersistError::Corrupt("note too long"));
        }
        notes.push((
            key,
            String::from_utf8_lossy(cursor.take(length)?).into_owned(),
        ));
    }
    Ok((notes, cursor.at))
}

fn encode_record(out: &mut Vec<u8>, record: &FileRecord) {
    put32(out, record.number);
    put32(out, record.generation);
    out.extend_from_slice(&record.mode.to_le_bytes());
    out.extend_from_slice(&record.links.to_le_bytes());
    put32(out, record.uid);
    put32(out, record.gid);
    put64(out, record.size_bytes);
    put64(out, record.mtime.0 as u64);
    put32(out, record.mtime.1);
    put64(out, record.ctime.0 as u64);
    put32(out, record.ctime.1);
    put64(out, record.xattr_block.unwrap_or(0));
    put32(out, record.xattr_checksum);
    put32(out, record.extents.len() as u32);
    put32(out, record.map_blocks.len() as u32);
    for extent in &record.extents {
        put64(out, extent.logical_block);
        put64(out, extent.physical_block);
        put32(out, extent.block_count as u32);
        out.push(u8::from(extent.uninitialized));
    }
    for &(start, count) in &record.map_blocks {
        put64(out, start);
        put64(out, count);
    }
}

pub fn decode(bytes: &[u8]) -> Result<FsMap, PersistError> {
    if bytes.len() < HEADER_BYTES + 4 || &bytes[..8] != MAGIC {
        return Err(PersistError::Corrupt("no header"));
    }
    let (body, trailer) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(trailer.try_into().unwrap_or_default()) {
        return Err(PersistError::Corrupt("checksum does not match"));
    }
    let mut cursor = Cursor { bytes: body, at: 8 };
    let version = cursor.u32()?;
    if version != VERSION {
        return Err(PersistError::Version(version));
    }
    let mut map = FsMap {
        block_size: u64::from(cursor.u32()?),
        blocks_count: cursor.u64()?,
        ..FsMap::default()
    };
    // What the diff computes from these (byte offsets and lengths) must
    // fit, as it does for a map built from a filesystem.
    if !(BLOCK_SIZE_MIN_BYTES..=BLOCK_SIZE_MAX_BYTES).contains(&map.block_size)
        || !map.block_size.is_power_of_two()
    {
        return Err(PersistError::Corrupt("block size"));
    }
    if map.blocks_count.checked_mul(map.block_size).is_none() {
        return Err(PersistError::Corrupt("block count past 2^64 bytes"));
    }
    map.uuid.copy_from_slice(cursor.take(16)?);
    map.first_inode = cursor.u32()?;
    map.journal_inode = cursor.u32()?;
    let record_count = cursor.count(RECORD_BYTES_MIN)?;
    let directory_count = cursor.count(DIRECTORY_BYTES_MIN)?;
    let meta_count = cursor.count(META_RUN_BYTES)?;
    let special_count = cursor.count(4)?;
    for _ in 0..meta_count {
        let start_block = cursor.u64()?;
        let block_count = cursor.u64()?;
        let kind = meta_kind(cursor.take(1)?[0])?;
        map.meta_runs.push(MetaRun {
            start_block,
            block_count,
            kind,
        });
    }
    for _ in 0..special_count {
        map.special_inodes.push(cursor.u32()?);
    }
    for _ in 0..record_count {
        let record = decode_record(&mut cursor)?;
        map.inodes.insert(record.number, record);
    }
    for _ in 0..directory_count {
        let directory = cursor.u32()?;
        let entry_count = cursor.count(ENTRY_BYTES_MIN)?;
        let mut entries = Vec::with_capacity(entry_count);
        for _ in 0..entry_count {
            let child = cursor.u32()?;
            let length = usize::from(u16::from_le_bytes(
                cursor.take(2)?.try_into().unwrap_or_default(),
            ));
            if length > NAME_BYTES_MAX {
                return Err(PersistError::Corrupt("name too long"));
            }
            entries.push((cursor.take(length)?.into(), child));
        }
        map.set_children(directory, entries);
    }
    let (problems, used) = get_notes(&body[cursor.at..])?;
    map.problems = problems.into_iter().collect();
    cursor.at += used;
    if cursor.at != body.len() {
        return Err(PersistError::Corrupt("trailing bytes"));
    }
    check_owner_runs(&map)?;
    map.index_records();
    Ok(map)
}

/// Refuses a map whose owner index could not be rebuilt: a block run that
/// ends past 2^64, or runs longer than OWNER_RUNS_PER_RUN_MAX allows.
/// Only the runs the map kept count (not those of a record a later one
/// with the same number replaced), so a map that loads saves as one that
/// loads.
fn check_owner_runs(map: &FsMap) -> Result<(), PersistError> {
    let meta = map
        .meta_runs
        .iter()
        .map(|run| (run.start_block, run.block_count));
    let records = map.inodes.values().flat_map(|record| {
        let data = record
            .extents
            .iter()
            .map(|extent| (extent.physical_block, extent.block_count));
        let xattr = record.xattr_block.map(|block| (block, 1));
        data.chain(record.map_blocks.iter().copied()).chain(xattr)
    });
    let (mut run_count, mut owner_runs) = (0u64, 0u64);
    for (start, count) in meta.chain(records) {
        if start.checked_add(count).is_none() {
            return Err(PersistError::Corrupt("block run ends past 2^64"));
        }
        run_count += 1;
        owner_runs = owner_runs.saturating_add(count.div_ceil(RUN_BLOCKS_MAX));
    }
    if owner_runs > OWNER_RUNS_BASE + OWNER_RUNS_PER_RUN_MAX * run_count {
        return Err(PersistError::Corrupt(
            "block runs longer than ext4 makes them (OWNER_RUNS_PER_RUN_MAX)",
        ));
    }
    Ok(())
}

fn decode_record(cursor: &mut Cursor) -> Result<FileRecord, PersistError> {
    let number = cursor.u32()?;
    let generation = cursor.u32()?;
    let mode = cursor.u16()?;
    let links = cursor.u16()?;
    let uid = cursor.u32()?;
    let gid = cursor.u32()?;
    let size_bytes = cursor.u64()?;
    let mtime = (cursor.u64()? as i64, cursor.u32()?);
    let ctime = (cursor.u64()? as i64, cursor.u32()?);
    let xattr_block = Some(cursor.u64()?).filter(|&b| b != 0);
    let xattr_checksum = cursor.u32()?;
    let extent_count = cursor.count(EXTENT_BYTES)?;
    let map_count = cursor.count(16)?;
    let mut extents = Vec::with_capacity(extent_count);
    for _ in 0..extent_count {
        let extent = FileExtent {
            logical_block: cursor.u64()?,
            physical_block: cursor.u64()?,
            block_count: u64::from(cursor.u32()?),
            uninitialized: cursor.take(1)?[0] != 0,
        };
        if extent.logical_block >= LOGICAL_BLOCKS_MAX {
            return Err(PersistError::Corrupt("extent at a logical block past 2^32"));
        }
        extents.push(extent);
    }
    let mut map_blocks = Vec::with_capacity(map_count);
    for _ in 0..map_count {
        map_blocks.push((cursor.u64()?, cursor.u64()?));
    }
    Ok(FileRecord {
        number,
        generation,
        mode,
        uid,
        gid,
        links,
        size_bytes,
        mtime,
        ctime,
        extents,
        map_blocks,
        xattr_block,
        xattr_checksum,
    })
}

fn meta_kind(byte: u8) -> Result<MetaKind, PersistError> {
    Ok(match byte {
        0 => MetaKind::Superblock,
        1 => MetaKind::GroupDescriptors,
        2 => MetaKind::ReservedGdt,
        3 => MetaKind::BlockBitmap,
        4 => MetaKind::InodeBitmap,
        5 => MetaKind::InodeTable,
        6 => MetaKind::Journal,
        7 => MetaKind::Mmp,
        8 => MetaKind::SpecialInode,
        _ => return Err(PersistError::Corrupt("unknown metadata kind")),
    })
}

fn put32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, length: usize) -> Result<&'a [u8], PersistError> {
        let end = self
            .at
            .checked_add(length)
            .filter(|&end| end <= self.bytes.len());
        let end = end.ok_or(PersistError::Corrupt("truncated"))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn u16(&mut self) -> Result<u16, PersistError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self) -> Result<u32, PersistError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64, PersistError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    /// A count of items of at least `item_bytes` each, refused when the
    /// rest of the file could not hold that many.
    fn count(&mut self, item_bytes: usize) -> Result<usize, PersistError> {
        let count = self.u32()? as usize;
        if count.saturating_mul(item_bytes) > self.bytes.len() - self.at {
            return Err(PersistError::Corrupt("count larger than the file"));
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_with_blocks(blocks_count: u64) -> FsMap {
        FsMap {
            block_size: 4096,
            blocks_count,
            ..FsMap::default()
        }
    }

    fn file_record(number: u32, extents: Vec<FileExtent>) -> FileRecord {
        FileRecord {
            number,
            generation: 0,
            mode: 0x8000,
            uid: 0,
            gid: 0,
            links: 1,
            size_bytes: 0,
            mtime: (0, 0),
            ctime: (0, 0),
            extents,
            map_blocks: Vec::new(),
            xattr_block: None,
            xattr_checksum: 0,
        }
    }

    fn decode_error(map: &FsMap) -> String {
        match decode(&encode(map)) {
            Ok(_) => panic!("the map decoded"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn a_metadata_run_of_2_pow_57_blocks_is_refused_not_indexed_for_hours() {
        // The saved_map fuzz target's first timeout: a mutated count made
        // loading a 6 KiB map insert 2^49 owner runs.
        let mut map = map_with_blocks(1 << 48);
        map.meta_runs.push(MetaRun {
            start_block: 3,
            block_count: (1 << 57) + 127,
            kind: MetaKind::GroupDescriptors,
        });
        assert!(decode_error(&map).contains("OWNER_RUNS_PER_RUN_MAX"));
    }

    #[test]
    fn extents_longer_than_their_bytes_allow_are_refused_and_real_ones_load() {
        // 64 extents of 32768 blocks, as long as ext4 makes them, load; the
        // same extents 16 times as long need more index entries than
        // OWNER_RUNS_BASE and OWNER_RUNS_PER_RUN_MAX allow.
        let mut map = map_with_blocks(1 << 32);
        let extents = |blocks: u64| {
            (0..64)
                .map(|index| FileExtent {
                    logical_block: index * blocks,
                    physical_block: index * blocks,
                    block_count: blocks,
                    uninitialized: false,
                })
                .collect()
        };
        map.inodes.insert(12, file_record(12, extents(32768)));
        assert_eq!(decode(&encode(&map)).unwrap().inodes[&12].extents.len(), 64);
        map.inodes.insert(12, file_record(12, extents(32768 * 16)));
        assert!(decode_error(&map).contains("OWNER_RUNS_PER_RUN_MAX"));
    }

    #[test]
    fn a_block_run_ending_past_2_pow_64_is_corrupt_not_an_overflow() {
        let mut map = map_with_blocks(1 << 48);
        map.meta_runs.push(MetaRun {
            start_block: u64::MAX - 1,
            block_count: 2,
            kind: MetaKind::Superblock,
        });
        assert!(decode_error(&map).contains("past 2^64"));
    }

    #[test]
    fn an_extent_past_logical_block_2_pow_32_is_corrupt_not_an_overflow_in_the_diff() {
        // The saved_map fuzz target's first panic: the diff turned the
        // extent's logical block into a byte offset and overflowed.
        let mut map = map_with_blocks(1 << 20);
        let extent = FileExtent {
            logical_block: 1 << 60,
            physical_block: 100,
            block_count: 1,
            uninitialized: false,
        };
        map.inodes.insert(12, file_record(12, vec![extent]));
        assert!(decode_error(&map).contains("logical block"));
        map.inodes.get_mut(&12).unwrap().extents[0].logical_block = u64::from(u32::MAX);
        let loaded = decode(&encode(&map)).expect("the last 32-bit logical block decodes");
        let changes = crate::diff::diff_without_old(&loaded, &[(0, 1 << 20)]);
        assert_eq!(
            changes.files[0].changed_file_ranges,
            [(u64::from(u32::MAX) * 4096, 4096)]
        );
    }

    #[test]
    fn a_block_size_outside_ext4s_range_is_corrupt_not_a_division_by_zero() {
        for block_size in [0, 512, 1000, 3072, 1 << 17] {
            let mut map = map_with_blocks(1 << 20);
            map.block_size = block_size;
            assert_eq!(decode_error(&map), "saved file map is corrupt: block size");
        }
        let mut map = map_with_blocks(1 << 50);
        map.block_size = 65536;
        assert!(decode_error(&map).contains("block count"));
    }

    #[test]
    fn a_map_whose_record_a_later_one_replaces_saves_as_one_that_loads() {
        // The saved_map fuzz target's round trip, when the bound was per
        // byte of the map: a replaced record's bytes counted when the map
        // loaded, and were gone when it was saved again.
        let extent = |physical_block, block_count| FileExtent {
            logical_block: 0,
            physical_block,
            block_count,
            uninitialized: false,
        };
        let mut map = map_with_blocks(1 << 32);
        let short: Vec<FileExtent> = (0..100).map(|block| extent(block, 1)).collect();
        map.inodes.insert(12, file_record(12, short));
        // As many index entries as one run may have.
        let longest = (OWNER_RUNS_BASE + OWNER_RUNS_PER_RUN_MAX) * RUN_BLOCKS_MAX;
        map.inodes
            .insert(13, file_record(13, vec![extent(1000, longest)]));
        let mut bytes = encode(&map);
        // Records are sorted by number: make the first one 13 too.
        assert_eq!(bytes[HEADER_BYTES..HEADER_BYTES + 4], 12u32.to_le_bytes());
        bytes[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&13u32.to_le_bytes());
        let body = bytes.len() - 4;
        let crc = crc32c::crc32c(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
        let loaded = decode(&bytes).expect("the map loads");
        assert_eq!(loaded.inodes[&13].extents, [extent(1000, longest)]);
        let saved = encode(&loaded);
        assert!(saved.len() < bytes.len());
        let again = decode(&saved).expect("the map saved again loads");
        assert_eq!(encode(&again), saved);
    }
}
