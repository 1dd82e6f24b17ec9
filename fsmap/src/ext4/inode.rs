//! Inodes and the blocks they own: extent trees, legacy block maps, inline
//! data and xattr blocks, with the metadata_csum checks of each. (What
//! the xattrs say is read in `xattr.rs`, what the file holds in `file.rs`.)

use std::collections::HashSet;

use super::xattr::{Entries, RawValue};
use super::{Ext4, Ext4Error, GROUP_INODE_UNINIT, ReadAt, corrupt, crc32c_raw, le16, le32};

const EXTENT_MAGIC: u16 = 0xF30A;
pub(crate) const FLAG_EXTENTS: u32 = 0x8_0000;
pub(crate) const FLAG_INLINE_DATA: u32 = 0x1000_0000;
const FLAG_HUGE_FILE: u32 = 0x4_0000;
/// ext4 extent trees are at most 5 levels deep.
const EXTENT_DEPTH_MAX: u16 = 5;
/// Extent-tree or indirect blocks followed for one inode.
const MAP_BLOCKS_MAX: u64 = 1 << 22;
/// Longest run one extent describes (initialised extents: 32768 blocks).
pub const EXTENT_BLOCKS_MAX: u64 = 32768;
const GOOD_OLD_INODE_SIZE: usize = 128;

/// One in-use inode of a group: parsed, or its number and why it is unreadable.
pub type InodeRead = Result<Inode, (u32, Ext4Error)>;

/// A run of a file's logical blocks stored contiguously on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileExtent {
    pub logical_block: u64,
    pub physical_block: u64,
    pub block_count: u64,
    pub uninitialized: bool,
}

/// Everything on the device an inode owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InodeBlocks {
    /// File (or directory, or symlink) contents, in logical order.
    pub data: Vec<FileExtent>,
    /// Extent-tree nodes below the inode, or indirect blocks: (start, count).
    pub map: Vec<(u64, u64)>,
    /// The extended-attribute block, if any.
    pub xattr_block: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Inode {
    pub number: u32,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size_bytes: u64,
    pub links: u16,
    pub flags: u32,
    pub generation: u32,
    pub dtime: u32,
    pub ctime_seconds: i64,
    pub ctime_nanoseconds: u32,
    pub mtime_seconds: i64,
    pub mtime_nanoseconds: u32,
    /// Allocated space counted in 512-byte sectors (i_blocks).
    pub sectors: u64,
    pub file_acl_block: u64,
    raw: Vec<u8>,
}

impl Inode {
    pub fn kind(&self) -> u16 {
        self.mode & 0xF000
    }
    pub fn is_directory(&self) -> bool {
        self.kind() == 0x4000
    }
    pub fn is_regular(&self) -> bool {
        self.kind() == 0x8000
    }
    pub fn is_symlink(&self) -> bool {
        self.kind() == 0xA000
    }
    pub fn has_inline_data(&self) -> bool {
        self.flags & FLAG_INLINE_DATA != 0
    }
    /// The 60 bytes of `i_block`: extent root, block map, inline data or a
    /// fast symlink's target.
    pub fn block_area(&self) -> &[u8] {
        &self.raw[0x28..0x64]
    }
    /// The inode's on-disk bytes (inode_size of them).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }
    /// Whether `i_block` holds block pointers or an extent root (rather
    /// than device numbers, a fast symlink, or inline data).
    pub fn has_block_map(&self) -> bool {
        if self.has_inline_data() {
            return false;
        }
        match self.kind() {
            0x8000 | 0x4000 => true,
            // A fast symlink keeps its target (under 60 bytes) in i_block.
            0xA000 => self.size_bytes >= 60,
            _ => false,
        }
    }

    /// A fast symlink's target.
    pub fn fast_symlink_target(&self) -> Option<&[u8]> {
        (self.is_symlink() && !self.has_block_map() && !self.has_inline_data())
            .then(|| &self.block_area()[..(self.size_bytes as usize).min(60)])
    }

    /// The bytes after the inode's fixed fields: in-body xattrs (and so
    /// inline data beyond i_block).
    pub fn inline_xattr_area(&self) -> &[u8] {
        if self.raw.len() <= GOOD_OLD_INODE_SIZE {
            return &[];
        }
        let start = GOOD_OLD_INODE_SIZE + usize::from(le16(&self.raw[0x80..]));
        self.raw.get(start..).unwrap_or_default()
    }

    /// Extended attributes stored in the inode body: (name index, name,
    /// value), up to the first damaged entry; a value in an EA inode reads
    /// as empty (`Ext4::xattrs` reads it, and checks every entry).
    pub fn inline_xattrs(&self) -> Vec<(u8, Vec<u8>, Vec<u8>)> {
        Entries::in_body(self.inline_xattr_area())
            .map_while(Result::ok)
            .map(|entry| {
                let value = match entry.value {
                    RawValue::Here(bytes) => bytes.to_vec(),
                    RawValue::Inode { .. } => Vec::new(),
                };
                (entry.index, entry.name.to_vec(), value)
            })
            .collect()
    }

    /// Where the fixed fields end: 128 bytes, plus i_extra_isize in a
    /// large inode (checked against the inode size when it was read).
    pub(crate) fn fields_end(&self) -> usize {
        fields_end(&self.raw)
    }
}

fn fields_end(raw: &[u8]) -> usize {
    if raw.len() > GOOD_OLD_INODE_SIZE {
        GOOD_OLD_INODE_SIZE + usize::from(le16(&raw[0x80..]))
    } else {
        GOOD_OLD_INODE_SIZE
    }
}

/// A timestamp of a raw inode: signed seconds at `base`; when the fixed
/// fields reach past `extra_at`, two epoch bits (seconds past 2038) and
/// the nanoseconds from the word there, as the kernel decodes them.
pub(crate) fn inode_time(raw: &[u8], base: usize, extra_at: usize) -> (i64, u32) {
    let seconds = i64::from(le32(&raw[base..]) as i32);
    if fields_end(raw) >= extra_at + 4 {
        let word = le32(&raw[extra_at..]);
        (seconds + (i64::from(word & 3) << 32), word >> 2)
    } else {
        (seconds, 0)
    }
}

impl<R: ReadAt> Ext4<R> {
    fn inode_location(&self, number: u32) -> Result<(u64, u64), Ext4Error> {
        if number == 0 || number > self.sb.inodes_count {
            return Err(corrupt(format!("inode number {number}")));
        }
        let index = u64::from(number - 1);
        let group = index / u64::from(self.sb.inodes_per_group);
        let slot = index % u64::from(self.sb.inodes_per_group);
        Ok((group, slot))
    }

    /// Reads and checks one inode.
    pub fn inode(&self, number: u32) -> Result<Inode, Ext4Error> {
        let (group, slot) = self.inode_location(number)?;
        let desc = self.groups[group as usize];
        let offset = desc.inode_table * self.sb.block_size + slot * self.sb.inode_size;
        let mut raw = vec![0u8; self.sb.inode_size as usize];
        self.device.read_exact_at(&mut raw, offset)?;
        self.parse_inode(number, raw)
    }

    /// How many inodes of `group` can be in use: the uninitialised tail of
    /// the table (`itable_unused`) never holds one.
    pub fn group_inodes_initialized(&self, group: u64) -> u32 {
        let Some(desc) = self.group(group) else {
            return 0;
        };
        if desc.flags & GROUP_INODE_UNINIT != 0 {
            return 0;
        }
        let per_group = self.sb.inodes_per_group;
        if self.sb.feature_ro_compat & 0x410 != 0 {
            per_group.saturating_sub(desc.itable_unused)
        } else {
            per_group
        }
    }

    /// Reads a group's inode bitmap and its initialised inode table in two
    /// large reads and returns its inodes that are in use. An inode whose
    /// checksum fails is returned as an error beside the others.
    pub fn group_inodes(&self, group: u64) -> Result<Vec<InodeRead>, Ext4Error> {
        let count = self.group_inodes_initialized(group);
        if count == 0 {
            return Ok(Vec::new());
        }
        let desc = self.groups[group as usize];
        let bitmap = self.read_block(desc.inode_bitmap)?;
        let inode_size = self.sb.inode_size as usize;
        let mut table = vec![0u8; count as usize * inode_size];
        self.device
            .read_exact_at(&mut table, desc.inode_table * self.sb.block_size)?;
        let first = group as u32 * self.sb.inodes_per_group + 1;
        let mut out = Vec::new();
        for (slot, raw) in table.chunks_exact(inode_size).enumerate() {
            if bitmap[slot / 8] & (1 << (slot % 8)) == 0 {
                continue;
            }
            let number = first + slot as u32;
            out.push(
                self.parse_inode(number, raw.to_vec())
                    .map_err(|e| (number, e)),
            );
        }
        Ok(out)
    }

    fn parse_inode(&self, number: u32, raw: Vec<u8>) -> Result<Inode, Ext4Error> {
        let extra = if raw.len() > GOOD_OLD_INODE_SIZE {
            usize::from(le16(&raw[0x80..]))
        } else {
            0
        };
        if GOOD_OLD_INODE_SIZE + extra > raw.len() {
            return Err(corrupt(format!("inode {number}: extra size {extra}")));
        }
        let generation = le32(&raw[0x64..]);
        if self.sb.metadata_csum() {
            self.check_inode_checksum(number, generation, &raw, extra)?;
        }
        let (ctime_seconds, ctime_nanoseconds) = inode_time(&raw, 0x0C, 0x84);
        let (mtime_seconds, mtime_nanoseconds) = inode_time(&raw, 0x10, 0x88);
        let flags = le32(&raw[0x20..]);
        let blocks_low = u64::from(le32(&raw[0x1C..]));
        let sectors = if self.sb.huge_file() {
            let blocks = blocks_low | (u64::from(le16(&raw[0x74..])) << 32);
            if flags & FLAG_HUGE_FILE != 0 {
                blocks * (self.sb.block_size / 512)
            } else {
                blocks
            }
        } else {
            blocks_low
        };
        Ok(Inode {
            number,
            mode: le16(&raw[0x00..]),
            uid: u32::from(le16(&raw[0x02..])) | (u32::from(le16(&raw[0x78..])) << 16),
            gid: u32::from(le16(&raw[0x18..])) | (u32::from(le16(&raw[0x7A..])) << 16),
            size_bytes: u64::from(le32(&raw[0x04..])) | (u64::from(le32(&raw[0x6C..])) << 32),
            links: le16(&raw[0x1A..]),
            flags,
            generation,
            dtime: le32(&raw[0x14..]),
            ctime_seconds,
            ctime_nanoseconds,
            mtime_seconds,
            mtime_nanoseconds,
            sectors,
            file_acl_block: u64::from(le32(&raw[0x68..])) | (u64::from(le16(&raw[0x76..])) << 32),
            raw,
        })
    }

    fn check_inode_checksum(
        &self,
        number: u32,
        generation: u32,
        raw: &[u8],
        extra: usize,
    ) -> Result<(), Ext4Error> {
        let mut copy = raw.to_vec();
        copy[0x7C..0x7E].fill(0);
        let has_high = raw.len() > GOOD_OLD_INODE_SIZE && GOOD_OLD_INODE_SIZE + extra >= 0x84;
        if has_high {
            copy[0x82..0x84].fill(0);
        }
        let seed = self.inode_seed(number, generation);
        let computed = crc32c_raw(seed, &copy);
        let stored_low = u32::from(le16(&raw[0x7C..]));
        let matches = if has_high {
            computed == stored_low | (u32::from(le16(&raw[0x82..])) << 16)
        } else {
            computed & 0xFFFF == stored_low
        };
        if matches {
            Ok(())
        } else {
            Err(corrupt(format!("inode {number} checksum does not match")))
        }
    }

    pub(crate) fn inode_seed(&self, number: u32, generation: u32) -> u32 {
        let seed = crc32c_raw(self.sb.checksum_seed, &number.to_le_bytes());
        crc32c_raw(seed, &generation.to_le_bytes())
    }

    /// The inode's extents, in logical order (extent-mapped, block-mapped
    /// or none for inline data, devices and fast symlinks).
    pub fn extents(&self, inode: &Inode) -> Result<Vec<FileExtent>, Ext4Error> {
        Ok(self.blocks(inode)?.data)
    }

    /// Every block the inode owns: data, mapping blocks, xattr block.
    pub fn blocks(&self, inode: &Inode) -> Result<InodeBlocks, Ext4Error> {
        let mut out = InodeBlocks::default();
        if inode.file_acl_block != 0 {
            if inode.file_acl_block >= self.sb.blocks_count {
                return Err(corrupt(format!("inode {}: xattr block", inode.number)));
            }
            out.xattr_block = Some(inode.file_acl_block);
        }
        if !inode.has_block_map() {
            return Ok(out);
        }
        // i_blocks bounds how many blocks a sane inode can reference.
        let mut budget = Budget {
            blocks_left: (inode.sectors * 512 / self.sb.block_size + 1).min(MAP_BLOCKS_MAX * 256),
            map_blocks_seen: HashSet::new(),
        };
        if inode.flags & FLAG_EXTENTS != 0 {
            let root = inode.block_area().to_vec();
            self.walk_extent_node(inode, &root, None, &mut out, &mut budget)?;
        } else {
            self.walk_block_map(inode, &mut out, &mut budget)?;
        }
        out.data.sort_by_key(|e| e.logical_block);
        Ok(out)
    }

    fn walk_extent_node(
        &self,
        inode: &Inode,
        node: &[u8],
        parent_depth: Option<u16>,
        out: &mut InodeBlocks,
        budget: &mut Budget,
    ) -> Result<(), Ext4Error> {
        let number = inode.number;
        if node.len() < 12 || le16(node) != EXTENT_MAGIC {
            return Err(corrupt(format!("inode {number}: bad extent header magic")));
        }
        let entries = usize::from(le16(&node[2..]));
        let max = usize::from(le16(&node[4..]));
        let depth = le16(&node[6..]);
        if entries > max || 12 + max * 12 > node.len() {
            return Err(corrupt(format!("inode {number}: extent node overfull")));
        }
        if depth > EXTENT_DEPTH_MAX || parent_depth.is_some_and(|parent| depth + 1 != parent) {
            return Err(corrupt(format!("inode {number}: extent depth {depth}")));
        }
        if parent_depth.is_some() && self.sb.metadata_csum() {
            let tail = 12 + max * 12;
            let seed = self.inode_seed(number, inode.generation);
            if node.len() < tail + 4 || le32(&node[tail..]) != crc32c_raw(seed, &node[..tail]) {
                return Err(corrupt(format!("inode {number}: extent block checksum")));
            }
        }
        for entry in node[12..12 + entries * 12].chunks_exact(12) {
            if depth == 0 {
                out.data.push(self.leaf_extent(number, entry)?);
                continue;
            }
            let child = u64::from(le32(&entry[4..])) | (u64::from(le16(&entry[8..])) << 32);
            budget.take(number, child, true)?;
            let block = self.read_block(child)?;
            out.map.push((child, 1));
            self.walk_extent_node(inode, &block, Some(depth), out, budget)?;
        }
        Ok(())
    }

    fn leaf_extent(&self, number: u32, entry: &[u8]) -> Result<FileExtent, Ext4Error> {
        let length = le16(&entry[4..]);
        let (block_count, uninitialized) = if length > 32768 {
            (length - 32768, true)
        } else {
            (length, false)
        };
        let physical_block = u64::from(le32(&entry[8..])) | (u64::from(le16(&entry[6..])) << 32);
        if physical_block + u64::from(block_count) > self.sb.blocks_count {
            return Err(corrupt(format!("inode {number}: extent past the end")));
        }
        Ok(FileExtent {
            logical_block: u64::from(le32(entry)),
            physical_block,
            block_count: u64::from(block_count),
            uninitialized,
        })
    }

    /// ext2/ext3 block maps: 12 direct pointers, then single, double and
    /// triple indirect blocks. Contiguous blocks are merged into extents.
    fn walk_block_map(
        &self,
        inode: &Inode,
        out: &mut InodeBlocks,
        budget: &mut Budget,
    ) -> Result<(), Ext4Error> {
        let area = inode.block_area();
        let per_block = self.sb.block_size / 4;
        let mut logical = 0u64;
        let mut runs = Runs::default();
        for slot in 0..15usize {
            let pointer = u64::from(le32(&area[slot * 4..]));
            let level = slot.saturating_sub(11) as u32; // 0 direct, 1..3 indirect
            let span = per_block.pow(level);
            if pointer != 0 {
                self.walk_pointer(inode, pointer, level, logical, &mut runs, out, budget)?;
            }
            logical += span;
        }
        out.data = runs.extents;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn walk_pointer(
        &self,
        inode: &Inode,
        pointer: u64,
        level: u32,
        logical: u64,
        runs: &mut Runs,
        out: &mut InodeBlocks,
        budget: &mut Budget,
    ) -> Result<(), Ext4Error> {
        let number = inode.number;
        if pointer >= self.sb.blocks_count {
            return Err(corrupt(format!(
                "inode {number}: block {pointer} past the end"
            )));
        }
        budget.take(number, pointer, level > 0)?;
        if level == 0 {
            runs.push(logical, pointer);
            return Ok(());
        }
        out.map.push((pointer, 1));
        let block = self.read_block(pointer)?;
        let span = (self.sb.block_size / 4).pow(level - 1);
        for (index, word) in block.chunks_exact(4).enumerate() {
            let child = u64::from(le32(word));
            if child != 0 {
                let at = logical + index as u64 * span;
                self.walk_pointer(inode, child, level - 1, at, runs, out, budget)?;
            }
        }
        Ok(())
    }
}

/// What one inode's walk may still read: the blocks its i_blocks leaves,
/// and the mapping blocks (extent-tree nodes, indirect blocks) read so far.
/// A tree never shares a node, so a mapping block met twice is corruption;
/// without the check, one indirect block naming itself is walked
/// per_block^level times and makes an extent of every step.
struct Budget {
    blocks_left: u64,
    map_blocks_seen: HashSet<u64>,
}

impl Budget {
    /// Takes `block` of inode `number` from the budget; `map_block`: it is
    /// about to be read as a mapping block.
    fn take(&mut self, number: u32, block: u64, map_block: bool) -> Result<(), Ext4Error> {
        self.blocks_left = self
            .blocks_left
            .checked_sub(1)
            .ok_or_else(|| corrupt(format!("inode {number}: more blocks than i_blocks")))?;
        if map_block && !self.map_blocks_seen.insert(block) {
            return Err(corrupt(format!(
                "inode {number}: mapping block {block} reached twice"
            )));
        }
        Ok(())
    }
}

/// Merges (logical, physical) block pairs into extents.
#[derive(Default)]
struct Runs {
    extents: Vec<FileExtent>,
}

impl Runs {
    fn push(&mut self, logical_block: u64, physical_block: u64) {
        if let Some(last) = self.extents.last_mut()
            && last.logical_block + last.block_count == logical_block
            && last.physical_block + last.block_count == physical_block
            && last.block_count < EXTENT_BLOCKS_MAX
        {
            last.block_count += 1;
            return;
        }
        self.extents.push(FileExtent {
            logical_block,
            physical_block,
            block_count: 1,
            uninitialized: false,
        });
    }
}
