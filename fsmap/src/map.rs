//! The file map of one filesystem: which inode or metadata owns each block,
//! and which paths name each inode. Built once in full, then updated from
//! the blocks that changed; two maps and the blocks changed between them
//! give the per-file changes (`diff.rs`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use crate::ext4::{Ext4, Ext4Error, FileExtent, Inode, MetaKind, MetaRun, ReadAt};
use crate::runs::merge_runs;

/// Owner runs longer than this are split, so a range query only has to look
/// this far back for a run that starts before it (a long window would scan
/// every small file's run inside it).
pub const RUN_BLOCKS_MAX: u64 = 32;
/// Paths reported for one inode (hard links).
const PATHS_PER_INODE_MAX: usize = 16;
/// Directory levels followed when building a path.
const PATH_DEPTH_MAX: usize = 4096;
/// Directory steps one path query may take (a corrupt graph can branch).
const PATH_STEPS_MAX: usize = 100_000;
/// Chain depth up to which a cycle check scans the chain instead of a set.
const CHAIN_SCAN_MAX: usize = 32;
const ROOT_INODE: u32 = 2;
/// Problems kept for reporting; the rest are counted out.
const PROBLEMS_MAX: usize = 100;

/// A map keyed by inode number. Inode numbers come from the image, but a
/// crafted image can only make lookups slower, never wrong, so a cheap
/// multiplicative hash replaces SipHash (whose cost showed in the diff).
pub type InodeMap<V> = HashMap<u32, V, BuildHasherDefault<InodeHasher>>;

#[derive(Debug, Default, Clone, Copy)]
pub struct InodeHasher(u64);

impl Hasher for InodeHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(byte)).wrapping_mul(0x517C_C1B7_2722_0A95);
        }
    }
    fn write_u32(&mut self, value: u32) {
        self.0 = (u64::from(value) ^ self.0)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

/// A directory's entries: (name, child inode).
pub type DirEntries = Vec<(Box<[u8]>, u32)>;

/// What an inode's block is to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// File contents (or a directory's entries, a symlink's target).
    Data,
    /// Extent-tree nodes or indirect blocks.
    Map,
    /// The extended-attribute block.
    Xattr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    Inode(u32, Role),
    Meta(MetaKind),
}

/// What the map keeps of one inode: enough to tell whether it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub number: u32,
    pub generation: u32,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub links: u16,
    pub size_bytes: u64,
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    pub extents: Vec<FileExtent>,
    pub map_blocks: Vec<(u64, u64)>,
    pub xattr_block: Option<u64>,
    /// CRC-32C of the inode's in-body xattr area (xattrs, inline data), so
    /// a changed attribute shows as a change.
    pub xattr_checksum: u32,
}

impl FileRecord {
    pub fn is_directory(&self) -> bool {
        self.mode & 0xF000 == 0x4000
    }
    pub fn kind_char(&self) -> char {
        match self.mode & 0xF000 {
            0x4000 => '/',
            0xA000 => '@',
            0x8000 => 'F',
            _ => '|',
        }
    }
    /// Blocks holding the contents.
    pub fn data_blocks(&self) -> u64 {
        self.extents.iter().map(|e| e.block_count).sum()
    }
    fn owned_runs(&self) -> impl Iterator<Item = (u64, u64, Role)> + '_ {
        let data = self
            .extents
            .iter()
            .map(|e| (e.physical_block, e.block_count, Role::Data));
        let map = self.map_blocks.iter().map(|&(s, c)| (s, c, Role::Map));
        let xattr = self.xattr_block.map(|b| (b, 1, Role::Xattr));
        data.chain(map).chain(xattr)
    }
}

/// One filesystem's map.
#[derive(Debug, Clone, Default)]
pub struct FsMap {
    pub block_size: u64,
    pub blocks_count: u64,
    pub uuid: [u8; 16],
    /// Inodes below this (but the root) are the filesystem's own.
    pub first_inode: u32,
    pub journal_inode: u32,
    /// Quota and orphan-file inodes the superblock names.
    pub special_inodes: Vec<u32>,
    /// Superblocks, descriptors, bitmaps, inode tables (`metadata_runs`).
    pub meta_runs: Vec<MetaRun>,
    pub inodes: InodeMap<FileRecord>,
    /// Directory inode -> its entries (name, child), "." and ".." left out.
    pub children: InodeMap<DirEntries>,
    /// Child inode -> the directories that name it.
    /// (directory, index into its entries) for each entry naming the child.
    pub(crate) parents: InodeMap<Vec<(u32, u32)>>,
    /// (start block, owner) -> block count. Runs never exceed RUN_BLOCKS_MAX.
    pub(crate) owners: BTreeMap<(u64, Owner), u64>,
    /// Inodes (or structures) that could not be read, and why.
    /// Inode (or directory) number -> why it could not be read; cleared
    /// when a later read succeeds.
    pub problems: BTreeMap<u32, String>,
}

impl FsMap {
    /// Reads the whole filesystem: every in-use inode, its blocks, every
    /// directory, and the fixed metadata.
    pub fn build<R: ReadAt>(fs: &Ext4<R>) -> Result<FsMap, Ext4Error> {
        let mut map = FsMap {
            block_size: fs.sb.block_size,
            blocks_count: fs.sb.blocks_count,
            uuid: fs.sb.uuid,
            first_inode: fs.sb.first_inode,
            journal_inode: if fs.sb.has_journal() {
                fs.sb.journal_inode
            } else {
                0
            },
            special_inodes: fs.sb.special_inodes.clone(),
            ..FsMap::default()
        };
        map.meta_runs = fs.metadata_runs();
        for run in map.meta_runs.clone() {
            map.insert_run(run.start_block, run.block_count, Owner::Meta(run.kind));
        }
        let mut directories = Vec::new();
        for group in 0..fs.sb.group_count {
            for read in fs.group_inodes(group)? {
                match read {
                    Ok(inode) => {
                        if let Some(directory) = map.add_inode(fs, &inode) {
                            directories.push(directory);
                        }
                    }
                    Err((number, error)) => map.problem(number, format!("inode {number}: {error}")),
                }
            }
        }
        for inode in directories {
            map.read_directory(fs, &inode);
        }
        Ok(map)
    }

    /// Records an in-use inode and its blocks; returns it back when it is
    /// a directory whose entries still need reading.
    fn add_inode<R: ReadAt>(&mut self, fs: &Ext4<R>, inode: &Inode) -> Option<Inode> {
        let blocks = match fs.blocks(inode) {
            Ok(blocks) => blocks,
            Err(error) => {
                self.problem(inode.number, format!("inode {}: {error}", inode.number));
                Default::default()
            }
        };
        let record = FileRecord {
            number: inode.number,
            generation: inode.generation,
            mode: inode.mode,
            uid: inode.uid,
            gid: inode.gid,
            links: inode.links,
            size_bytes: inode.size_bytes,
            mtime: (inode.mtime_seconds, inode.mtime_nanoseconds),
            ctime: (inode.ctime_seconds, inode.ctime_nanoseconds),
            extents: blocks.data,
            map_blocks: blocks.map,
            xattr_block: blocks.xattr_block,
            xattr_checksum: crc32c::crc32c(inode.inline_xattr_area()),
        };
        self.insert_record(record);
        inode.is_directory().then(|| inode.clone())
    }

    /// Records something the map could not read (the first PROBLEMS_MAX).
    fn problem(&mut self, number: u32, text: String) {
        if self.problems.len() < PROBLEMS_MAX || self.problems.contains_key(&number) {
            self.problems.insert(number, text);
        }
    }

    /// Whether inode `number` is the filesystem's own (journal, resize,
    /// quota, orphan file...) rather than a user's file.
    pub fn is_special(&self, number: u32) -> bool {
        number < self.first_inode && number != ROOT_INODE
    }

    fn insert_record(&mut self, record: FileRecord) {
        let number = record.number;
        self.inodes.insert(number, record);
        self.index_record(number);
    }

    fn remove_record(&mut self, number: u32) -> Option<FileRecord> {
        let record = self.inodes.remove(&number)?;
        for (start, count, role) in record.owned_runs() {
            self.remove_run(start, count, self.owner_for(number, role));
        }
        Some(record)
    }

    fn insert_run(&mut self, start: u64, count: u64, owner: Owner) {
        let mut at = start;
        while at < start + count {
            let take = (start + count - at).min(RUN_BLOCKS_MAX);
            self.owners.insert((at, owner), take);
            at += take;
        }
    }

    fn remove_run(&mut self, start: u64, count: u64, owner: Owner) {
        let mut at = start;
        while at < start + count {
            self.owners.remove(&(at, owner));
            at += (start + count - at).min(RUN_BLOCKS_MAX);
        }
    }

    fn read_directory<R: ReadAt>(&mut self, fs: &Ext4<R>, inode: &Inode) {
        let entries = match fs.directory(inode) {
            Ok(entries) => entries,
            Err(error) => {
                // Most likely read mid-update: keep the entries the map
                // had, rather than strip every child of its path.
                self.problem(inode.number, format!("directory {}: {error}", inode.number));
                return;
            }
        };
        self.problems.remove(&inode.number);
        let kept: Vec<(Box<[u8]>, u32)> = entries
            .into_iter()
            .filter(|entry| !entry.is_dot_or_dotdot())
            .map(|entry| (entry.name.into_boxed_slice(), entry.inode))
            .collect();
        self.set_children(inode.number, kept);
    }

    /// Replaces a directory's entries, keeping the parent links in step.
    pub(crate) fn set_children(&mut self, directory: u32, entries: Vec<(Box<[u8]>, u32)>) {
        if let Some(old) = self.children.remove(&directory) {
            for (_, child) in old {
                if let Some(parents) = self.parents.get_mut(&child) {
                    parents.retain(|&(p, _)| p != directory);
                    if parents.is_empty() {
                        self.parents.remove(&child);
                    }
                }
            }
        }
        for (index, (_, child)) in entries.iter().enumerate() {
            self.parents
                .entry(*child)
                .or_default()
                .push((directory, index as u32));
        }
        if !entries.is_empty() {
            self.children.insert(directory, entries);
        }
    }

    /// Rebuilds the owner index from the records and the fixed metadata
    /// runs (after loading a saved map).
    pub(crate) fn index_records(&mut self) {
        self.owners.clear();
        for run in self.meta_runs.clone() {
            self.insert_run(run.start_block, run.block_count, Owner::Meta(run.kind));
        }
        let numbers: Vec<u32> = self.inodes.keys().copied().collect();
        for number in numbers {
            self.index_record(number);
        }
    }

    fn owner_for(&self, number: u32, role: Role) -> Owner {
        if number == self.journal_inode && self.journal_inode != 0 {
            Owner::Meta(MetaKind::Journal)
        } else if self.is_special(number) || self.special_inodes.contains(&number) {
            Owner::Meta(MetaKind::SpecialInode)
        } else {
            Owner::Inode(number, role)
        }
    }

    fn index_record(&mut self, number: u32) {
        let Some(record) = self.inodes.get(&number) else {
            return;
        };
        let runs: Vec<_> = record
            .owned_runs()
            .map(|(start, count, role)| (start, count, self.owner_for(number, role)))
            .collect();
        for (start, count, owner) in runs {
            self.insert_run(start, count, owner);
        }
    }

    /// The parts of owner runs inside blocks [start, start + count):
    /// (owner, first block, block count).
    pub fn runs_in(&self, start: u64, count: u64) -> impl Iterator<Item = (Owner, u64, u64)> + '_ {
        let end = start.saturating_add(count);
        let lowest = Owner::Inode(0, Role::Data);
        let from = (start.saturating_sub(RUN_BLOCKS_MAX - 1), lowest);
        self.owners.range(from..(end, lowest)).filter_map(
            move |(&(run_start, owner), &run_count)| {
                let overlap_start = run_start.max(start);
                let overlap_end = (run_start + run_count).min(end);
                (overlap_end > overlap_start)
                    .then(|| (owner, overlap_start, overlap_end - overlap_start))
            },
        )
    }

    /// Every owner of blocks [start, start + count), with how many of those
    /// blocks it owns.
    pub fn owners_of(&self, start: u64, count: u64) -> Vec<(Owner, u64)> {
        let mut out: Vec<(Owner, u64)> = Vec::new();
        for (owner, _, blocks) in self.runs_in(start, count) {
            match out.iter_mut().find(|(o, _)| *o == owner) {
                Some((_, total)) => *total += blocks,
                None => out.push((owner, blocks)),
            }
        }
        out
    }

    /// The (directory, name) pairs that name `number`, sorted.
    pub fn links(&self, number: u32) -> Vec<(u32, &[u8])> {
        let mut out: Vec<(u32, &[u8])> = self
            .parents
            .get(&number)
            .into_iter()
            .flatten()
            .filter_map(|&(parent, index)| {
                self.entry_name(parent, index).map(|name| (parent, name))
            })
            .collect();
        out.sort_unstable();
        out
    }

    fn entry_name(&self, directory: u32, index: u32) -> Option<&[u8]> {
        self.children
            .get(&directory)
            .and_then(|entries| entries.get(index as usize))
            .map(|(name, _)| &name[..])
    }

    /// Every path naming `number` ("/" for the root), at most
    /// PATHS_PER_INODE_MAX of them. An inode no directory names (an orphan
    /// kept open, or a directory lost by corruption) has none.
    pub fn paths(&self, number: u32) -> Vec<String> {
        let mut out = self.walk_up(number);
        out.sort();
        out
    }

    /// Walks from `number` up to the root along every parent link, with an
    /// explicit stack (a deep tree must not overflow the thread's stack).
    /// A directory already on the chain (a cycle, from corruption) is not
    /// entered again; PATH_STEPS_MAX bounds the walk on a corrupt graph.
    fn walk_up(&self, number: u32) -> Vec<String> {
        let mut out = Vec::new();
        let mut budget = PATH_STEPS_MAX;
        // (inode, next parent link to try); names[k] is frames[k]'s name
        // in frames[k + 1].
        let mut frames: Vec<(u32, usize)> = vec![(number, 0)];
        let mut names: Vec<&[u8]> = Vec::new();
        // Directories on the chain: a scan of `frames` while it is short
        // (every real path), a set once it is deep (a crafted chain).
        let mut on_chain: Option<HashSet<u32>> = None;
        while let Some(&(node, next)) = frames.last() {
            if out.len() >= PATHS_PER_INODE_MAX || budget == 0 {
                break;
            }
            budget -= 1;
            let parents = self
                .parents
                .get(&node)
                .map(Vec::as_slice)
                .unwrap_or_default();
            if node == ROOT_INODE || next >= parents.len() || frames.len() > PATH_DEPTH_MAX {
                if node == ROOT_INODE {
                    out.push(path_of(&names));
                }
                if let Some(set) = &mut on_chain {
                    set.remove(&node);
                }
                frames.pop();
                names.pop();
                continue;
            }
            if let Some(top) = frames.last_mut() {
                top.1 += 1;
            }
            let (parent, index) = parents[next];
            let Some(name) = self.entry_name(parent, index) else {
                continue;
            };
            let seen = match &on_chain {
                Some(set) => set.contains(&parent),
                None => frames.iter().any(|&(inode, _)| inode == parent),
            };
            if !seen {
                names.push(name);
                frames.push((parent, 0));
                match &mut on_chain {
                    Some(set) => {
                        set.insert(parent);
                    }
                    None if frames.len() > CHAIN_SCAN_MAX => {
                        on_chain = Some(frames.iter().map(|&(inode, _)| inode).collect());
                    }
                    None => {}
                }
            }
        }
        out
    }

    /// Every path under the root with its inode, "/" first: depth first,
    /// each directory's entries in byte order of their names, a directory
    /// just before what it holds (the order a tar stream wants). A hard
    /// link gives one entry per name. Each directory is listed once, at
    /// its first name, so a directory that corruption named twice or put
    /// in a cycle is not walked again, and the walk yields at most one
    /// item per stored entry; directories deeper than PATH_DEPTH_MAX are
    /// not listed, as `paths` gives them none. An entry is yielded even
    /// when the map holds no record of its inode (see `problems`).
    pub fn walk(&self) -> Walk<'_> {
        Walk {
            map: self,
            frames: Vec::new(),
            names: Vec::new(),
            listed: HashSet::new(),
            started: false,
        }
    }

    /// Brings the map up to date with `fs` after `changed` blocks (start,
    /// count) were written: re-reads only the inodes in changed inode-table
    /// blocks, the inodes whose mapping or directory blocks changed, and the
    /// directories whose entries could have changed. Returns how many
    /// inodes it re-read.
    pub fn update<R: ReadAt>(
        &mut self,
        fs: &Ext4<R>,
        changed: &[(u64, u64)],
    ) -> Result<usize, Ext4Error> {
        if fs.sb.block_size != self.block_size
            || fs.sb.blocks_count != self.blocks_count
            || fs.sb.uuid != self.uuid
        {
            *self = FsMap::build(fs)?;
            return Ok(self.inodes.len());
        }
        let mut suspects: HashSet<u32> = HashSet::new();
        let mut directories: HashSet<u32> = HashSet::new();
        let mut table_ranges = Vec::new();
        for &(start, count) in changed {
            for (owner, _) in self.owners_of(start, count) {
                match owner {
                    Owner::Meta(MetaKind::InodeTable) => table_ranges.push((start, count)),
                    Owner::Inode(number, Role::Data) => {
                        if self
                            .inodes
                            .get(&number)
                            .is_some_and(FileRecord::is_directory)
                        {
                            directories.insert(number);
                        }
                    }
                    Owner::Inode(number, _) => {
                        suspects.insert(number);
                    }
                    Owner::Meta(_) => {}
                }
            }
        }
        suspects.extend(inodes_in_blocks(fs, merge_runs(table_ranges)));
        let mut reread = 0;
        let mut suspects: Vec<u32> = suspects.into_iter().collect();
        suspects.sort_unstable();
        for number in suspects {
            reread += 1;
            self.reread_inode(fs, number, &mut directories)?;
        }
        for number in directories {
            if self
                .inodes
                .get(&number)
                .is_some_and(FileRecord::is_directory)
            {
                match fs.inode(number) {
                    Ok(inode) => self.read_directory(fs, &inode),
                    Err(error) => self.problem(number, format!("directory {number}: {error}")),
                }
            }
        }
        Ok(reread)
    }

    fn reread_inode<R: ReadAt>(
        &mut self,
        fs: &Ext4<R>,
        number: u32,
        directories: &mut HashSet<u32>,
    ) -> Result<(), Ext4Error> {
        let inode = if fs.inode_in_use(number)? {
            match fs.inode(number) {
                Ok(inode) => Some(inode),
                Err(error) => {
                    // Read mid-update (a torn block, a stale checksum):
                    // keep what the map knew rather than call it deleted.
                    self.problem(number, format!("inode {number}: {error}"));
                    return Ok(());
                }
            }
        } else {
            None
        };
        if inode.is_some()
            || self
                .problems
                .get(&number)
                .is_some_and(|p| p.starts_with("inode"))
        {
            self.problems.remove(&number);
        }
        let old = self.remove_record(number);
        match inode {
            Some(inode) => {
                let was_directory = old.as_ref().is_some_and(FileRecord::is_directory);
                let changed = old
                    .as_ref()
                    .is_none_or(|old| !same_inode_state(old, &inode));
                if self.add_inode(fs, &inode).is_some() && (changed || !was_directory) {
                    directories.insert(number);
                }
            }
            None => {
                if old.as_ref().is_some_and(FileRecord::is_directory) {
                    self.set_children(number, Vec::new());
                }
            }
        }
        Ok(())
    }
}

/// "/a/b" from names listed child first; "/" for none.
fn path_of(names: &[&[u8]]) -> String {
    String::from_utf8_lossy(&join_path(names.iter().rev().copied())).into_owned()
}

/// "/a/b" from names listed root first; "/" for none. The one spelling of
/// a path, for `paths` (which walks up) and `walk` (which walks down).
fn join_path<'a>(names: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut path = Vec::new();
    for name in names {
        path.push(b'/');
        path.extend_from_slice(name);
    }
    if path.is_empty() {
        path.push(b'/');
    }
    path
}

/// Every name under the root, from `FsMap::walk`.
#[derive(Debug)]
pub struct Walk<'a> {
    map: &'a FsMap,
    /// The directories being listed, outermost first.
    frames: Vec<Listing<'a>>,
    /// names[k] names frames[k + 1]'s directory.
    names: Vec<&'a [u8]>,
    /// Directories listed so far: each is listed once.
    listed: HashSet<u32>,
    started: bool,
}

/// One directory of a walk: its entries, their indexes in name order, and
/// how many of them were yielded.
type Listing<'a> = (&'a [(Box<[u8]>, u32)], Vec<usize>, usize);

impl Walk<'_> {
    fn enter(&mut self, directory: u32) {
        let entries = self
            .map
            .children
            .get(&directory)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by(|&a, &b| entries[a].0.cmp(&entries[b].0));
        self.frames.push((entries, order, 0));
    }
}

impl Iterator for Walk<'_> {
    /// (path, inode number).
    type Item = (Vec<u8>, u32);

    fn next(&mut self) -> Option<(Vec<u8>, u32)> {
        if !self.started {
            self.started = true;
            self.listed.insert(ROOT_INODE);
            self.enter(ROOT_INODE);
            return Some((b"/".to_vec(), ROOT_INODE));
        }
        loop {
            let (entries, order, yielded) = self.frames.last_mut()?;
            let Some(&index) = order.get(*yielded) else {
                self.frames.pop();
                self.names.pop();
                continue;
            };
            *yielded += 1;
            let (name, child) = &entries[index];
            let path = join_path(self.names.iter().copied().chain([&name[..]]));
            let child = *child;
            if self.map.children.contains_key(&child)
                && self.frames.len() <= PATH_DEPTH_MAX
                && self.listed.insert(child)
            {
                self.names.push(name);
                self.enter(child);
            }
            return Some((path, child));
        }
    }
}

fn same_inode_state(old: &FileRecord, inode: &Inode) -> bool {
    old.generation == inode.generation
        && old.size_bytes == inode.size_bytes
        && old.mtime == (inode.mtime_seconds, inode.mtime_nanoseconds)
        && old.ctime == (inode.ctime_seconds, inode.ctime_nanoseconds)
}

/// Inode numbers whose on-disk slots lie in `ranges` (sorted, disjoint
/// block runs): one pass over the groups, each table matched against the
/// ranges by binary search.
fn inodes_in_blocks<R: ReadAt>(fs: &Ext4<R>, ranges: Vec<(u64, u64)>) -> Vec<u32> {
    let sb = &fs.sb;
    let table_blocks = fs.inode_table_blocks();
    let per_block = (sb.block_size / sb.inode_size).max(1);
    let mut out = Vec::new();
    if ranges.is_empty() {
        return out;
    }
    for group in 0..sb.group_count {
        let Some(desc) = fs.group(group) else { break };
        let table_end = desc.inode_table + table_blocks;
        let from = ranges.partition_point(|&(start, count)| start + count <= desc.inode_table);
        for &(start, count) in ranges[from..]
            .iter()
            .take_while(|&&(start, _)| start < table_end)
        {
            for block in start.max(desc.inode_table)..(start + count).min(table_end) {
                let slot = (block - desc.inode_table) * per_block;
                for index in slot..slot + per_block {
                    if index < u64::from(sb.inodes_per_group) {
                        out.push((group * u64::from(sb.inodes_per_group) + index + 1) as u32);
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain_map(depth: u32) -> FsMap {
        let mut map = FsMap::default();
        let mut parent = ROOT_INODE;
        for level in 0..depth {
            let child = 100 + level;
            map.set_children(
                parent,
                vec![(format!("d{level}").into_bytes().into(), child)],
            );
            parent = child;
        }
        map
    }

    #[test]
    fn a_directory_chain_deeper_than_the_stack_allows_recursion_is_walked_in_a_loop() {
        // A 64 KiB stack: a recursive walk of thousands of levels would
        // overflow it and abort the process.
        let paths = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(|| {
                let map = chain_map(5000);
                (
                    map.paths(100 + 3000).len(),
                    map.paths(100 + 4999).len(),
                    map.paths(100 + 2)[0].clone(),
                )
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(paths.0, 1, "3001 levels are within PATH_DEPTH_MAX");
        assert_eq!(paths.1, 0, "5000 levels are past PATH_DEPTH_MAX: no path");
        assert_eq!(paths.2, "/d0/d1/d2");
    }

    #[test]
    fn hard_links_give_every_path_and_a_cycle_ends() {
        let mut map = FsMap::default();
        map.set_children(
            ROOT_INODE,
            vec![(b"a".to_vec().into(), 20), (b"b".to_vec().into(), 21)],
        );
        map.set_children(20, vec![(b"f".to_vec().into(), 30)]);
        map.set_children(
            21,
            vec![(b"g".to_vec().into(), 30), (b"loop".to_vec().into(), 22)],
        );
        // A corrupt cycle: 22 names 21 names 22.
        map.set_children(22, vec![(b"back".to_vec().into(), 21)]);
        assert_eq!(map.paths(30), vec!["/a/f".to_string(), "/b/g".to_string()]);
        assert_eq!(map.paths(22), vec!["/b/loop".to_string()]);
        assert_eq!(map.paths(ROOT_INODE), vec!["/".to_string()]);
    }

    fn walked(map: &FsMap) -> Vec<(String, u32)> {
        map.walk()
            .map(|(path, number)| (String::from_utf8(path).unwrap(), number))
            .collect()
    }

    #[test]
    fn a_walk_lists_every_name_in_tar_order_once() {
        let mut map = FsMap::default();
        map.set_children(
            ROOT_INODE,
            vec![
                (b"b".to_vec().into(), 21),
                (b"a-z".to_vec().into(), 31),
                (b"a".to_vec().into(), 20),
            ],
        );
        map.set_children(20, vec![(b"f".to_vec().into(), 30)]);
        map.set_children(21, vec![(b"g".to_vec().into(), 30)]); // a hard link
        let expected = [
            ("/", 2),
            ("/a", 20),
            ("/a/f", 30),
            ("/a-z", 31),
            ("/b", 21),
            ("/b/g", 30),
        ];
        let expected: Vec<(String, u32)> = expected.iter().map(|&(p, n)| (p.into(), n)).collect();
        assert_eq!(walked(&map), expected);
    }

    #[test]
    fn a_walk_lists_a_directory_named_twice_or_in_a_cycle_once() {
        let mut map = FsMap::default();
        map.set_children(
            ROOT_INODE,
            vec![(b"a".to_vec().into(), 20), (b"b".to_vec().into(), 20)],
        );
        // 20 names itself and the root: a cycle both ways.
        map.set_children(
            20,
            vec![
                (b"self".to_vec().into(), 20),
                (b"up".to_vec().into(), ROOT_INODE),
            ],
        );
        let expected = [
            ("/", 2),
            ("/a", 20),
            ("/a/self", 20),
            ("/a/up", 2),
            ("/b", 20),
        ];
        let expected: Vec<(String, u32)> = expected.iter().map(|&(p, n)| (p.into(), n)).collect();
        assert_eq!(walked(&map), expected);
        // Each level naming the next twice would be 2^40 paths if every
        // name were followed.
        let mut map = FsMap::default();
        for level in 0..40u32 {
            let child = 100 + level;
            let parent = if level == 0 { ROOT_INODE } else { child - 1 };
            map.set_children(
                parent,
                vec![(b"x".to_vec().into(), child), (b"y".to_vec().into(), child)],
            );
        }
        assert_eq!(map.walk().count(), 1 + 2 * 40);
    }

    #[test]
    fn a_walk_of_a_chain_deeper_than_the_depth_limit_stops_there() {
        let count = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(|| chain_map(5000).walk().count())
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(count, 1 + PATH_DEPTH_MAX + 1);
    }
}
