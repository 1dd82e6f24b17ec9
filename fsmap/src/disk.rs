//! The map of a whole disk: its partition table (or none), and for each
//! ext2/3/4 filesystem on it a file map read through its journal, so a
//! mounted, live filesystem reads as what it really holds.

use std::collections::{BTreeMap, HashSet};
use std::hash::BuildHasherDefault;

use crate::diff::{self, FsChanges};
use crate::ext4::{self, Ext4, Ext4Error, ReadAt};
use crate::jbd2;
use crate::map::{FsMap, InodeHasher};
use crate::partition::{self, Table};
use crate::read::{Overlay, Replacement, Slice};
use crate::runs::merge_runs;

const DISK_MAGIC: &[u8; 8] = b"BWDISKM1";
/// Filesystems one disk map holds (a GPT may list many partitions).
const FILESYSTEMS_MAX: usize = 128;
/// Unreadable structures reported per filesystem.
const NOTES_PER_FILESYSTEM_MAX: usize = 5;

/// One filesystem found on the disk and its map.
#[derive(Debug, Clone)]
pub struct MappedFs {
    /// Partition number, or 0 for a filesystem on the whole disk.
    pub partition: u32,
    pub start_bytes: u64,
    pub length_bytes: u64,
    pub map: FsMap,
    /// Blocks the journal replaced when the map was last read.
    pub replaced: BTreeMap<u64, Replacement>,
    /// Whether `replaced` is what the journal said when the map was last
    /// read from the device. A map decoded from its saved form does not
    /// keep the replay, so its `replaced` is empty, not known.
    pub replay_known: bool,
    pub journal_transactions: u32,
}

impl MappedFs {
    /// Filesystem blocks (start, count) covering the disk byte ranges
    /// `changed`, clipped to this filesystem.
    pub fn blocks_of(&self, changed: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let block_size = self.map.block_size;
        let end_bytes = self.start_bytes + self.length_bytes;
        let mut out = Vec::new();
        for &(offset, length) in changed {
            let from = offset.max(self.start_bytes);
            let to = offset.saturating_add(length).min(end_bytes);
            if to > from {
                let first = (from - self.start_bytes) / block_size;
                let last = (to - self.start_bytes).div_ceil(block_size);
                out.push((first, last - first));
            }
        }
        merge_runs(out)
    }

    /// The mapped filesystem on `device` (the whole disk the map was built
    /// from), read through the same journal replay as the map, so that
    /// what it reads (file contents, metadata) agrees with the map. A map
    /// decoded from its saved form kept no replay: its journal is
    /// replayed again, as `DiskMap::build` did. The filesystem found must
    /// be the one mapped (UUID and geometry), or `Ext4Error::Mismatch`.
    pub fn open_fs<R: ReadAt + Clone>(
        &self,
        device: R,
    ) -> Result<Ext4<Overlay<Slice<R>>>, Ext4Error> {
        let slice = Slice {
            inner: device,
            start_bytes: self.start_bytes,
            length_bytes: self.length_bytes,
        };
        let label = label(self.partition);
        // In place first: through the replay, another device would read
        // its blocks at this journal's positions, which mean nothing there.
        if ext4::read_superblock(&slice)?.uuid != self.map.uuid {
            return Err(Ext4Error::Mismatch(format!("{label}: another UUID")));
        }
        let fs = if self.replay_known {
            Ext4::open(Overlay {
                inner: slice,
                block_size: self.map.block_size,
                replaced: self.replaced.clone(),
            })?
        } else {
            // Notes are dropped: `build` made the same ones for the map.
            open_live(slice, &mut Vec::new(), &label)?.0
        };
        let sb = &fs.sb;
        if sb.uuid != self.map.uuid {
            return Err(Ext4Error::Mismatch(format!(
                "{label}: another UUID through the journal"
            )));
        }
        if sb.block_size != self.map.block_size || sb.blocks_count != self.map.blocks_count {
            return Err(Ext4Error::Mismatch(format!(
                "{label}: {} blocks of {} bytes, where the map has {} of {}",
                sb.blocks_count, sb.block_size, self.map.blocks_count, self.map.block_size
            )));
        }
        Ok(fs)
    }

    /// Disk byte range of filesystem blocks (start, count).
    pub fn bytes_of(&self, start_block: u64, block_count: u64) -> (u64, u64) {
        let block_size = self.map.block_size;
        (
            self.start_bytes + start_block * block_size,
            block_count * block_size,
        )
    }
}

/// Every filesystem on a disk, mapped; what could not be mapped is in
/// `notes` (block-only tracking for that part of the disk).
#[derive(Debug, Clone, Default)]
pub struct DiskMap {
    pub filesystems: Vec<MappedFs>,
    /// Every partition's (start, length) in bytes; the whole disk when it
    /// has no table.
    pub partitions: Vec<(u64, u64)>,
    pub notes: Vec<String>,
}

/// A filesystem as its journal says it is, and the replay that says so.
type Opened<R> = (Ext4<Overlay<Slice<R>>>, jbd2::Replay);

impl DiskMap {
    /// Maps every ext2/3/4 filesystem on `device`. Never fails: anything it
    /// cannot read becomes a note.
    pub fn build<R: ReadAt + Clone>(device: R, size_bytes: u64) -> DiskMap {
        let mut disk = DiskMap::default();
        let candidates = candidates(&device, size_bytes, &mut disk.notes);
        disk.partitions = candidates
            .iter()
            .map(|&(_, start, length)| (start, length))
            .collect();
        for (partition, start_bytes, length_bytes) in candidates {
            let slice = Slice {
                inner: device.clone(),
                start_bytes,
                length_bytes,
            };
            let label = label(partition);
            match open_live(slice, &mut disk.notes, &label).and_then(|(fs, replay)| {
                let map = FsMap::build(&fs)?;
                Ok((map, replay))
            }) {
                Ok((map, replay)) => {
                    disk.filesystems.push(MappedFs {
                        partition,
                        start_bytes,
                        length_bytes,
                        map,
                        replaced: replay.replaced,
                        replay_known: true,
                        journal_transactions: replay.transactions,
                    });
                }
                Err(Ext4Error::NotExt4) if partition != 0 => {
                    disk.notes.push(format!(
                        "{label}: not ext2/3/4; its changes are reported by block only"
                    ));
                }
                Err(Ext4Error::NotExt4) => {}
                Err(error) => disk.notes.push(format!(
                    "{label}: {error}; its changes are reported by block only"
                )),
            }
        }
        if disk.filesystems.is_empty() && disk.notes.is_empty() {
            disk.notes.push(
                "no ext2/3/4 filesystem on this disk; changes are reported by block only".into(),
            );
        }
        disk
    }

    /// Brings each filesystem's map up to date after the disk byte ranges
    /// `changed` were written. Returns the inodes re-read.
    pub fn update<R: ReadAt + Clone>(
        &mut self,
        device: R,
        changed: &[(u64, u64)],
    ) -> Result<usize, Ext4Error> {
        let mut reread = 0;
        for mapped in &mut self.filesystems {
            let slice = Slice {
                inner: device.clone(),
                start_bytes: mapped.start_bytes,
                length_bytes: mapped.length_bytes,
            };
            let mut blocks = mapped.blocks_of(changed);
            if blocks.is_empty() {
                continue;
            }
            let mut notes = Vec::new();
            let (fs, replay) = open_live(slice, &mut notes, &label(mapped.partition))?;
            let moved = journal_moved(
                &mapped.replaced,
                &replay.replaced,
                fs.sb.block_size,
                &blocks,
            );
            blocks.extend(moved);
            let blocks = merge_runs(blocks);
            reread += mapped.map.update(&fs, &blocks)?;
            mapped.replaced = replay.replaced;
            mapped.replay_known = true;
            mapped.journal_transactions = replay.transactions;
        }
        Ok(reread)
    }

    /// Whether `changed` (disk byte ranges) calls for a full rebuild
    /// rather than an update: nothing was mapped (a filesystem may have
    /// been made since), or bytes outside every partition were written
    /// (where the MBR, EBRs and GPT copies live: the table may differ).
    pub fn needs_rebuild(&self, changed: &[(u64, u64)]) -> bool {
        if changed.is_empty() {
            return false;
        }
        if self.filesystems.is_empty() {
            return true;
        }
        changed.iter().any(|&(offset, length)| {
            let end = offset.saturating_add(length);
            !self
                .partitions
                .iter()
                .any(|&(start, size)| start <= offset && end <= start + size)
        })
    }

    /// Per-filesystem changes between `old` (an earlier map of this disk,
    /// or none) and `self`, given the disk byte ranges changed in between.
    pub fn diff(
        &self,
        old: Option<&DiskMap>,
        changed: &[(u64, u64)],
    ) -> Vec<(&MappedFs, FsChanges)> {
        self.filesystems
            .iter()
            .map(|mapped| {
                let previous = old.and_then(|old| {
                    old.filesystems.iter().find(|o| {
                        o.start_bytes == mapped.start_bytes && o.map.uuid == mapped.map.uuid
                    })
                });
                let blocks = mapped.blocks_of(changed);
                let changes = match (old, previous) {
                    (_, Some(previous)) => diff::diff(&previous.map, &mapped.map, &blocks),
                    // The earlier map had no such filesystem (a blank disk
                    // then, or it was made again): everything in it is new.
                    (Some(_), None) => diff::diff(&FsMap::default(), &mapped.map, &blocks),
                    (None, None) => diff::diff_without_old(&mapped.map, &blocks),
                };
                (mapped, changes)
            })
            .collect()
    }

    /// Inodes (per partition) owning the disk byte ranges `changed`, at
    /// most `limit` of them; the bool says whether there were more.
    pub fn owners(&self, changed: &[(u64, u64)], limit: usize) -> (Vec<(u32, u32)>, bool) {
        let mut out = Vec::new();
        // Called on every FLUSH: the cheap inode hasher, not SipHash.
        let mut seen: HashSet<(u32, u32), BuildHasherDefault<InodeHasher>> = HashSet::default();
        for mapped in &self.filesystems {
            for (start, count) in mapped.blocks_of(changed) {
                for (owner, _, _) in mapped.map.runs_in(start, count) {
                    if let crate::map::Owner::Inode(number, _) = owner
                        && seen.insert((mapped.partition, number))
                    {
                        if out.len() == limit {
                            return (out, true);
                        }
                        out.push((mapped.partition, number));
                    }
                }
            }
        }
        (out, false)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = DISK_MAGIC.to_vec();
        out.extend_from_slice(&(self.filesystems.len() as u32).to_le_bytes());
        for mapped in &self.filesystems {
            let map = crate::persist::encode(&mapped.map);
            out.extend_from_slice(&mapped.partition.to_le_bytes());
            out.extend_from_slice(&mapped.start_bytes.to_le_bytes());
            out.extend_from_slice(&mapped.length_bytes.to_le_bytes());
            out.extend_from_slice(&(map.len() as u64).to_le_bytes());
            out.extend_from_slice(&map);
        }
        crate::persist::put_notes(&mut out, self.notes.iter().map(|note| (0, note.as_str())));
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<DiskMap, crate::persist::PersistError> {
        use crate::persist::PersistError::Corrupt;
        if bytes.len() < 16 || &bytes[..8] != DISK_MAGIC {
            return Err(Corrupt("no disk map header"));
        }
        let (body, trailer) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body).to_le_bytes() != trailer {
            return Err(Corrupt("disk map checksum does not match"));
        }
        let count = u32::from_le_bytes(body[8..12].try_into().unwrap_or_default()) as usize;
        if count > FILESYSTEMS_MAX {
            return Err(Corrupt("too many filesystems"));
        }
        let mut at = 12usize;
        let mut disk = DiskMap::default();
        for _ in 0..count {
            let header = body.get(at..at + 28).ok_or(Corrupt("truncated disk map"))?;
            let word = |from: usize| {
                u64::from_le_bytes(header[from..from + 8].try_into().unwrap_or_default())
            };
            let partition = u32::from_le_bytes(header[..4].try_into().unwrap_or_default());
            let (start_bytes, length_bytes) = (word(4), word(12));
            if start_bytes.checked_add(length_bytes).is_none() {
                return Err(Corrupt("filesystem ends past 2^64 bytes"));
            }
            let map_len = usize::try_from(word(20)).map_err(|_| Corrupt("map length"))?;
            at += 28;
            let map_bytes = body
                .get(at..at.checked_add(map_len).ok_or(Corrupt("map length"))?)
                .ok_or(Corrupt("truncated disk map"))?;
            at += map_len;
            disk.filesystems.push(MappedFs {
                partition,
                start_bytes,
                length_bytes,
                map: crate::persist::decode(map_bytes)?,
                replaced: BTreeMap::new(),
                replay_known: false,
                journal_transactions: 0,
            });
        }
        let (notes, used) = crate::persist::get_notes(&body[at..])?;
        if at + used != body.len() {
            return Err(Corrupt("trailing bytes in the disk map"));
        }
        disk.notes = notes.into_iter().map(|(_, text)| text).collect();
        Ok(disk)
    }
}

impl DiskMap {
    /// Notes, then what each filesystem's map could not read (the first
    /// few per filesystem), for reports.
    pub fn all_notes(&self) -> Vec<String> {
        let mut out = self.notes.clone();
        for mapped in &self.filesystems {
            let problems = &mapped.map.problems;
            for problem in problems.values().take(NOTES_PER_FILESYSTEM_MAX) {
                out.push(format!("{}: {problem}", label(mapped.partition)));
            }
            if problems.len() > NOTES_PER_FILESYSTEM_MAX {
                out.push(format!(
                    "{}: and {} more unreadable structures",
                    label(mapped.partition),
                    problems.len() - NOTES_PER_FILESYSTEM_MAX
                ));
            }
        }
        out
    }
}

pub fn label(partition: u32) -> String {
    if partition == 0 {
        "disk".into()
    } else {
        format!("partition {partition}")
    }
}

/// Where filesystems may be: each data partition, or the whole disk.
fn candidates<R: ReadAt>(
    device: &R,
    size_bytes: u64,
    notes: &mut Vec<String>,
) -> Vec<(u32, u64, u64)> {
    match partition::read_table(device, size_bytes) {
        Ok(Table::None) => vec![(0, 0, size_bytes)],
        Ok(Table::Mbr(parts) | Table::Gpt(parts)) => parts
            .iter()
            .filter(|p| !p.is_extended())
            .take(FILESYSTEMS_MAX)
            .map(|p| (p.number, p.start_bytes, p.length_bytes))
            .collect(),
        Err(error) => {
            notes.push(format!("partition table: {error}; trying the whole disk"));
            vec![(0, 0, size_bytes)]
        }
    }
}

/// Opens a filesystem through its journal. A journal that cannot be
/// replayed is noted and the filesystem is read in place.
fn open_live<R: ReadAt + Clone>(
    slice: Slice<R>,
    notes: &mut Vec<String>,
    label: &str,
) -> Result<Opened<R>, Ext4Error> {
    let raw = Ext4::open(slice.clone())?;
    let block_size = raw.sb.block_size;
    let mut replay = jbd2::Replay::default();
    if raw.sb.has_journal() {
        let journal = raw.inode(raw.sb.journal_inode)?;
        let extents = raw.extents(&journal)?;
        match jbd2::replay(&slice, block_size, &extents) {
            Ok(found) => replay = found,
            Err(error) => notes.push(format!(
                "{label}: journal not replayed ({error}); reading the filesystem in place"
            )),
        }
    }
    let overlay = Overlay {
        inner: slice,
        block_size,
        replaced: replay.replaced.clone(),
    };
    Ok((Ext4::open(overlay)?, replay))
}

/// Filesystem blocks whose journal copy moved or was rewritten: a new
/// replacement, a dropped one, or one whose copy lies in changed blocks
/// (the journal wrapped and reused the same position).
fn journal_moved(
    old: &BTreeMap<u64, Replacement>,
    new: &BTreeMap<u64, Replacement>,
    block_size: u64,
    changed: &[(u64, u64)],
) -> Vec<(u64, u64)> {
    let in_changed = |block: u64| {
        let index = changed.partition_point(|&(start, _)| start <= block);
        index > 0 && block < changed[index - 1].0 + changed[index - 1].1
    };
    let mut out = Vec::new();
    for (block, copy) in new {
        if old.get(block) != Some(copy) || in_changed(copy.offset_bytes / block_size) {
            out.push((*block, 1));
        }
    }
    for block in old.keys() {
        if !new.contains_key(block) {
            out.push((*block, 1));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filesystem_ending_past_2_pow_64_bytes_is_corrupt_not_an_overflow() {
        // Found while writing the saved_map fuzz target: `blocks_of` on the
        // decoded map added the filesystem's start and length and overflowed.
        let map = FsMap {
            block_size: 4096,
            blocks_count: 16,
            ..FsMap::default()
        };
        let disk = DiskMap {
            filesystems: vec![MappedFs {
                partition: 1,
                start_bytes: u64::MAX - 4095,
                length_bytes: 16 * 4096,
                map,
                replaced: BTreeMap::new(),
                replay_known: false,
                journal_transactions: 0,
            }],
            ..DiskMap::default()
        };
        let error = DiskMap::decode(&disk.encode()).expect_err("the disk map decoded");
        assert!(error.to_string().contains("past 2^64"), "{error}");
    }
}
