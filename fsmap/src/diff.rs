//! Per-file changes between two maps of one filesystem, given the blocks
//! the tracker saw change between them, like `zfs diff`: `+` created, `-`
//! deleted, `R` renamed, `M` modified, and `~` for a file whose inode is
//! unchanged but whose blocks share a changed region with other writes.

use std::collections::{BTreeMap, HashSet};

use crate::map::{FileRecord, FsMap, InodeMap, Owner, Role};
// Re-exported where the tracker and the map tests have always found it.
pub use crate::runs::merge_runs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChangeKind {
    Created,
    Deleted,
    Renamed,
    Modified,
    /// The inode says nothing changed, but some of its blocks lie in
    /// changed regions: a neighbour's write in the same region, or a write
    /// that went around the filesystem. Listed so nothing is ever missed.
    Shared,
}

impl ChangeKind {
    pub fn symbol(self) -> char {
        match self {
            ChangeKind::Created => '+',
            ChangeKind::Deleted => '-',
            ChangeKind::Renamed => 'R',
            ChangeKind::Modified => 'M',
            ChangeKind::Shared => '~',
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    pub kind: ChangeKind,
    pub inode: u32,
    /// Current paths (for a deleted file: the paths it had).
    pub paths: Vec<String>,
    /// Paths before a rename.
    pub old_paths: Vec<String>,
    /// Whether the contents or attributes changed too (a renamed file can
    /// also be modified).
    pub content_changed: bool,
    pub is_directory: bool,
    pub size_bytes: u64,
    /// Bytes of the file's blocks inside changed regions.
    pub changed_bytes: u64,
    /// Its data blocks inside changed regions: (start block, count).
    pub changed_blocks: Vec<(u64, u64)>,
    /// The same as byte ranges within the file: (offset, length).
    pub changed_file_ranges: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsChanges {
    pub files: Vec<FileChange>,
    /// Changed metadata blocks by kind ("inode table", "journal",
    /// "extent tree", "directory"...).
    pub metadata_blocks: BTreeMap<&'static str, u64>,
    /// Changed metadata blocks themselves: (start block, count).
    pub metadata_runs: Vec<(u64, u64)>,
    /// Changed blocks no inode or structure owns now (free space: deleted
    /// files' old blocks, discards, writes the filesystem did not make).
    pub unowned_blocks: u64,
}

/// What changed between `old` and `new`, where `changed` are the blocks
/// (start, count) written between the two maps.
pub fn diff(old: &FsMap, new: &FsMap, changed: &[(u64, u64)]) -> FsChanges {
    let mut out = FsChanges::default();
    let mut overlap = attribute(new, changed, &mut out);
    let relinked = relinked_inodes(old, new);
    for (number, record) in &new.inodes {
        if new.is_special(*number) || new.special_inodes.contains(number) {
            continue;
        }
        let previous = old.inodes.get(number);
        let blocks = overlap.remove(number).unwrap_or_default();
        let quiet = previous == Some(record) && blocks.is_empty() && !relinked.contains(number);
        if quiet && !(record.is_directory() && old.children.get(number) != new.children.get(number))
        {
            continue; // the common case, decided without building a path
        }
        if let Some(change) = classify(old, new, previous, record, blocks) {
            out.files.push(change);
        }
        if let Some(previous) = previous
            && previous.generation != record.generation
        {
            out.files.push(deleted(old, previous));
        }
    }
    for (number, record) in &old.inodes {
        if !new.inodes.contains_key(number)
            && !old.is_special(*number)
            && !old.special_inodes.contains(number)
        {
            out.files.push(deleted(old, record));
        }
    }
    out.files
        .sort_unstable_by(|a, b| (&a.paths, a.kind, a.inode).cmp(&(&b.paths, b.kind, b.inode)));
    out
}

/// Inodes named by an entry that one map has and the other lacks: the
/// only candidates for a rename or a new hard link.
fn relinked_inodes(old: &FsMap, new: &FsMap) -> HashSet<u32> {
    let mut out = HashSet::new();
    let directories = old.children.keys().chain(new.children.keys());
    for directory in directories {
        let (before, after) = (old.children.get(directory), new.children.get(directory));
        if before == after {
            continue;
        }
        let before: HashSet<_> = before.into_iter().flatten().collect();
        let after: HashSet<_> = after.into_iter().flatten().collect();
        out.extend(before.symmetric_difference(&after).map(|(_, child)| *child));
    }
    out
}

/// Changes when no map was saved at the earlier point: every file whose
/// blocks changed is listed as modified (creations, deletions and renames
/// cannot be told apart without the earlier map).
pub fn diff_without_old(new: &FsMap, changed: &[(u64, u64)]) -> FsChanges {
    let mut out = FsChanges::default();
    for (number, blocks) in attribute(new, changed, &mut out) {
        let Some(record) = new.inodes.get(&number) else {
            continue;
        };
        out.files.push(FileChange {
            kind: ChangeKind::Modified,
            inode: number,
            paths: new.paths(number),
            old_paths: Vec::new(),
            content_changed: true,
            is_directory: record.is_directory(),
            size_bytes: record.size_bytes,
            changed_bytes: blocks.iter().map(|&(_, c)| c).sum::<u64>() * new.block_size,
            changed_file_ranges: file_ranges(record, &blocks, new.block_size),
            changed_blocks: blocks,
        });
    }
    out.files
        .sort_unstable_by(|a, b| (&a.paths, a.inode).cmp(&(&b.paths, b.inode)));
    out
}

fn classify(
    old: &FsMap,
    new: &FsMap,
    previous: Option<&FileRecord>,
    record: &FileRecord,
    changed_blocks: Vec<(u64, u64)>,
) -> Option<FileChange> {
    let changed_bytes = changed_blocks.iter().map(|&(_, c)| c).sum::<u64>() * new.block_size;
    let paths = new.paths(record.number);
    let mut change = FileChange {
        kind: ChangeKind::Modified,
        inode: record.number,
        paths,
        old_paths: Vec::new(),
        content_changed: true,
        is_directory: record.is_directory(),
        size_bytes: record.size_bytes,
        changed_bytes,
        changed_file_ranges: file_ranges(record, &changed_blocks, new.block_size),
        changed_blocks,
    };
    match previous {
        Some(previous) if previous.generation == record.generation => {
            change.content_changed = content_changed(previous, record)
                || record.is_directory()
                    && old.children.get(&record.number) != new.children.get(&record.number);
            // Renamed when its own names changed; a file whose ancestor
            // moved keeps its (directory, name) links and is not listed.
            if old.links(record.number) != new.links(record.number) {
                change.kind = ChangeKind::Renamed;
                change.old_paths = old.paths(record.number);
            } else if !change.content_changed {
                if change.changed_bytes == 0 {
                    return None;
                }
                change.kind = ChangeKind::Shared;
            }
        }
        _ => change.kind = ChangeKind::Created,
    }
    Some(change)
}

/// Physical block runs of a file turned into byte ranges of the file,
/// through its extents; merged and sorted.
fn file_ranges(record: &FileRecord, blocks: &[(u64, u64)], block_size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(start, count) in blocks {
        for extent in &record.extents {
            let from = start.max(extent.physical_block);
            let to = (start + count).min(extent.physical_block + extent.block_count);
            if to > from {
                let logical = extent.logical_block + (from - extent.physical_block);
                out.push((logical, to - from));
            }
        }
    }
    merge_runs(out)
        .into_iter()
        .map(|(logical, count)| (logical * block_size, count * block_size))
        .collect()
}

/// Contents or attributes differ (ctime alone does not count: a rename or
/// a new hard link updates it without changing the file).
fn content_changed(old: &FileRecord, new: &FileRecord) -> bool {
    old.size_bytes != new.size_bytes
        || old.mtime != new.mtime
        || old.extents != new.extents
        || old.mode != new.mode
        || old.uid != new.uid
        || old.gid != new.gid
        || old.xattr_block != new.xattr_block
        || old.xattr_checksum != new.xattr_checksum
}

fn deleted(old: &FsMap, record: &FileRecord) -> FileChange {
    FileChange {
        kind: ChangeKind::Deleted,
        inode: record.number,
        paths: old.paths(record.number),
        old_paths: Vec::new(),
        content_changed: true,
        is_directory: record.is_directory(),
        size_bytes: record.size_bytes,
        changed_bytes: 0,
        changed_blocks: Vec::new(),
        changed_file_ranges: Vec::new(),
    }
}

/// Sorts the changed blocks among their owners in `new`: each inode's
/// changed data blocks (returned), metadata counts and the unowned rest
/// (into `out`).
fn attribute(
    new: &FsMap,
    changed: &[(u64, u64)],
    out: &mut FsChanges,
) -> InodeMap<Vec<(u64, u64)>> {
    let mut per_inode: InodeMap<Vec<(u64, u64)>> = InodeMap::default();
    for &(start, count) in changed {
        // Runs come sorted by start: sweep to count the blocks any owner
        // covers, so what is left is unowned.
        let mut covered_until = start;
        let mut covered = 0;
        for (owner, run_start, run_count) in new.runs_in(start, count) {
            let run_end = run_start + run_count;
            covered += run_end.saturating_sub(covered_until.max(run_start));
            covered_until = covered_until.max(run_end);
            let kind = match owner {
                Owner::Inode(number, Role::Data) => {
                    let is_directory = new
                        .inodes
                        .get(&number)
                        .is_some_and(FileRecord::is_directory);
                    if !is_directory {
                        per_inode
                            .entry(number)
                            .or_default()
                            .push((run_start, run_count));
                        continue;
                    }
                    "directory"
                }
                Owner::Inode(_, Role::Map) => "extent tree or indirect block",
                Owner::Inode(_, Role::Xattr) => "extended attributes",
                Owner::Meta(kind) => kind.name(),
            };
            *out.metadata_blocks.entry(kind).or_default() += run_count;
            out.metadata_runs.push((run_start, run_count));
        }
        out.unowned_blocks += count - covered.min(count);
    }
    out.metadata_runs = merge_runs(std::mem::take(&mut out.metadata_runs));
    for runs in per_inode.values_mut() {
        *runs = merge_runs(std::mem::take(runs));
    }
    per_inode
}
