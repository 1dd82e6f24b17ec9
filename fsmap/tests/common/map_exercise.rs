//! What a saved map that decodes has to survive without a panic, a hang
//! or an absurd allocation: the calls the tracker makes on a loaded map
//! (paths of every inode, owners of block ranges, per-file changes against
//! itself, an empty map and no map, disk byte ranges to blocks), and a
//! round trip: it encodes to bytes that decode and encode the same again.
//! Shared by `tests/corrupt_maps.rs` and the cargo-fuzz target
//! `fuzz/fuzz_targets/saved_map.rs`, which include this file by path.
//!
//! Both formats end in a CRC-32C of everything before it, and a disk map
//! holds a filesystem map (with its own CRC) per filesystem, so damage
//! would almost never get past the checksums: `with_checksums` recomputes
//! them, each filesystem map's inside a disk map (as far as the disk map's
//! framing can be followed), then the trailer.

use fsmap::diff;
use fsmap::disk::DiskMap;
use fsmap::map::FsMap;
use fsmap::persist;

const DISK_MAGIC: &[u8; 8] = b"BWDISKM1";
const TRAILER_BYTES: usize = 4;
/// A disk map's header: magic, filesystem count.
const DISK_HEADER_BYTES: usize = 12;
/// Before each filesystem map: partition (4), start (8), length (8) and
/// the map's length in bytes (8).
const FILESYSTEM_HEADER_BYTES: usize = 28;
const FILESYSTEMS_MAX: usize = 128;
/// Inodes whose first extent is also asked for its owners.
const EXTENT_QUERIES_MAX: usize = 16;

/// Which decoder took the bytes.
#[derive(Debug, Default, Clone, Copy)]
pub struct Decoded {
    pub filesystem_map: bool,
    pub disk_map: bool,
}

/// Decodes `bytes` as a filesystem map and as a disk map, and uses what
/// decodes. Panics when a decoded map does not survive its round trip.
pub fn exercise(bytes: &[u8]) -> Decoded {
    let mut decoded = Decoded::default();
    if let Ok(map) = persist::decode(bytes) {
        decoded.filesystem_map = true;
        exercise_map(&map);
        let encoded = persist::encode(&map);
        let again = persist::decode(&encoded).expect("an encoded map decodes");
        assert!(
            persist::encode(&again) == encoded,
            "a decoded map encodes differently a second time"
        );
    }
    if let Ok(disk) = DiskMap::decode(bytes) {
        decoded.disk_map = true;
        exercise_disk(&disk);
        let encoded = disk.encode();
        let again = DiskMap::decode(&encoded).expect("an encoded disk map decodes");
        assert!(
            again.encode() == encoded,
            "a decoded disk map encodes differently a second time"
        );
    }
    decoded
}

/// The input with every CRC-32C it holds recomputed.
pub fn with_checksums(data: &[u8]) -> Vec<u8> {
    let mut bytes = data.to_vec();
    if bytes.len() < TRAILER_BYTES {
        return bytes;
    }
    let body_end = bytes.len() - TRAILER_BYTES;
    if bytes.starts_with(DISK_MAGIC) {
        fix_filesystem_maps(&mut bytes[..body_end]);
    }
    fix_trailer(&mut bytes);
    bytes
}

/// Overwrites the last 4 bytes with the CRC-32C of the rest.
fn fix_trailer(bytes: &mut [u8]) {
    if let Some(body_end) = bytes.len().checked_sub(TRAILER_BYTES) {
        let crc = crc32c::crc32c(&bytes[..body_end]);
        bytes[body_end..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Fixes the trailer of each filesystem map in a disk map's body, for as
/// many as its count says and its lengths allow.
fn fix_filesystem_maps(body: &mut [u8]) {
    let Some(count) = body.get(8..DISK_HEADER_BYTES) else {
        return;
    };
    let count =
        (u32::from_le_bytes(count.try_into().unwrap_or_default()) as usize).min(FILESYSTEMS_MAX);
    let mut at = DISK_HEADER_BYTES;
    for _ in 0..count {
        let Some(header) = body.get(at..at + FILESYSTEM_HEADER_BYTES) else {
            return;
        };
        let map_bytes = u64::from_le_bytes(header[20..28].try_into().unwrap_or_default());
        let start = at + FILESYSTEM_HEADER_BYTES;
        let Some(end) = usize::try_from(map_bytes)
            .ok()
            .and_then(|length| start.checked_add(length))
            .filter(|&end| end <= body.len())
        else {
            return;
        };
        fix_trailer(&mut body[start..end]);
        at = end;
    }
}

/// Paths of every inode, owners of a few ranges, links, and per-file
/// changes between this map, itself and an empty one.
fn exercise_map(map: &FsMap) {
    let mut numbers: Vec<u32> = map.inodes.keys().copied().collect();
    numbers.sort_unstable();
    for &number in &numbers {
        let _ = map.paths(number);
        let _ = map.links(number);
        let _ = map.is_special(number);
    }
    let blocks_count = map.blocks_count;
    let mut ranges = vec![
        (0, blocks_count),
        (0, u64::MAX),
        (blocks_count / 2, 1),
        (blocks_count.saturating_sub(1), 2),
        (u64::MAX, 1),
        (u64::MAX - 300, 300),
    ];
    ranges.extend(
        map.meta_runs
            .iter()
            .take(EXTENT_QUERIES_MAX)
            .map(|run| (run.start_block, run.block_count)),
    );
    for number in numbers.iter().take(EXTENT_QUERIES_MAX) {
        let record = &map.inodes[number];
        ranges.extend(
            record
                .extents
                .first()
                .map(|e| (e.physical_block, e.block_count)),
        );
        ranges.extend(record.map_blocks.first().copied());
        ranges.extend(record.xattr_block.map(|block| (block, 1)));
    }
    for &(start, count) in &ranges {
        let _ = map.owners_of(start, count);
        let _ = map.runs_in(start, count).count();
    }
    // What the tracker reports changed lies inside the filesystem.
    let changed: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|&&(start, _)| start < blocks_count)
        .map(|&(start, count)| (start, count.min(blocks_count - start)))
        .collect();
    let changed = diff::merge_runs(changed);
    let empty = FsMap::default();
    let _ = diff::diff(map, map, &changed);
    let _ = diff::diff(&empty, map, &changed);
    let _ = diff::diff(map, &empty, &changed);
    let _ = diff::diff_without_old(map, &changed);
}

/// Each filesystem's map, then what the tracker asks of a loaded disk map:
/// changes against it, owners of byte ranges, notes.
fn exercise_disk(disk: &DiskMap) {
    for mapped in &disk.filesystems {
        exercise_map(&mapped.map);
    }
    // Disk byte ranges, as the tracker reports them.
    let mut changed = vec![(0, 4096)];
    for mapped in &disk.filesystems {
        changed.push((mapped.start_bytes, mapped.length_bytes));
        changed.push((mapped.start_bytes, 1));
        changed.push((
            mapped.start_bytes.saturating_add(mapped.length_bytes / 2),
            4096,
        ));
    }
    let changed = diff::merge_runs(changed);
    for mapped in &disk.filesystems {
        let _ = mapped.blocks_of(&changed);
    }
    let _ = disk.diff(Some(disk), &changed);
    let _ = disk.diff(None, &changed);
    let _ = disk.diff(Some(&DiskMap::default()), &changed);
    let _ = disk.owners(&changed, 100);
    let _ = disk.needs_rebuild(&changed);
    let _ = disk.all_notes();
}
