//! A read-only ext2/ext3/ext4 reader over positioned reads of the image.
//!
//! - `mod.rs` (here): the superblock, group descriptors and where each
//!   group's metadata lives; metadata checksums.
//! - `inode.rs`: inodes (read one, or a group's table at once), extent trees
//!   of any depth, legacy direct/indirect block maps, the blocks an inode
//!   owns.
//! - `xattr.rs`: extended attributes in the inode body and the xattr block
//!   (one checked parser for both), values in EA inodes, POSIX ACLs
//!   converted to the VFS format.
//! - `file.rs`: reading files: full metadata (`FileMeta`), where the bytes
//!   are (`FileLayout`: data segments, holes, inline data), positioned
//!   reads of the contents, symlink targets.
//! - `dir.rs`: directory entries (linear and htree, which a linear walk of
//!   the leaf blocks reads whole; inline directories) and path lookup.
//!
//! Every count and length read from the image is checked against the
//! structure that holds it before it is used or allocated. What the reader
//! does not understand is reported as `Ext4Error::Unsupported`, never
//! guessed: the caller falls back to block-only tracking.

mod dir;
mod file;
mod inode;
mod xattr;

use std::io;

pub use crate::read::ReadAt;
pub use dir::DirEntry;
pub use file::{FileKind, FileLayout, FileMeta, Segment, SegmentSource};
pub use inode::{EXTENT_BLOCKS_MAX, FileExtent, Inode, InodeBlocks, InodeRead};

pub const SUPERBLOCK_OFFSET: u64 = 1024;
const EXT4_MAGIC: u16 = 0xEF53;

const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const GROUP_INODE_UNINIT: u16 = 0x1;

/// Groups read at open; 2^24 groups of 128 MiB is a 2 PiB filesystem.
const GROUP_COUNT_MAX: u64 = 1 << 24;

#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error("reading the image")]
    Io(#[from] io::Error),
    #[error("not an ext2/3/4 filesystem (no superblock magic)")]
    NotExt4,
    #[error("corrupt filesystem: {0}")]
    Corrupt(String),
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    #[error("{0} not found")]
    NotFound(String),
    #[error("the device holds another filesystem than the map ({0})")]
    Mismatch(String),
    #[error("read past the end of a file: {0}")]
    PastEnd(String),
}

pub(crate) fn corrupt(what: impl Into<String>) -> Ext4Error {
    Ext4Error::Corrupt(what.into())
}

/// What the superblock says, in the units its names give.
#[derive(Debug, Clone)]
pub struct Superblock {
    pub block_size: u64,
    pub blocks_count: u64,
    pub inodes_count: u32,
    pub blocks_per_group: u64,
    pub inodes_per_group: u32,
    pub inode_size: u64,
    pub desc_size: u64,
    pub first_data_block: u64,
    pub group_count: u64,
    pub first_inode: u32,
    pub feature_compat: u32,
    pub feature_incompat: u32,
    pub feature_ro_compat: u32,
    pub journal_inode: u32,
    pub reserved_gdt_blocks: u64,
    pub backup_groups: [u32; 2],
    pub uuid: [u8; 16],
    pub volume_name: String,
    /// Seed of every metadata checksum (metadata_csum).
    pub checksum_seed: u32,
    pub mmp_block: u64,
    pub special_inodes: Vec<u32>,
}

impl Superblock {
    pub fn metadata_csum(&self) -> bool {
        self.feature_ro_compat & RO_COMPAT_METADATA_CSUM != 0
    }
    pub fn has_journal(&self) -> bool {
        self.feature_compat & COMPAT_HAS_JOURNAL != 0 && self.journal_inode != 0
    }
    fn huge_file(&self) -> bool {
        self.feature_ro_compat & RO_COMPAT_HUGE_FILE != 0
    }

    fn parse(sb: &[u8]) -> Result<Superblock, Ext4Error> {
        if le16(&sb[0x38..]) != EXT4_MAGIC {
            return Err(Ext4Error::NotExt4);
        }
        let feature_compat = le32(&sb[0x5C..]);
        let feature_incompat = le32(&sb[0x60..]);
        let feature_ro_compat = le32(&sb[0x64..]);
        if feature_ro_compat & RO_COMPAT_METADATA_CSUM != 0 {
            let stored = le32(&sb[0x3FC..]);
            if stored != crc32c_raw(!0, &sb[..0x3FC]) {
                return Err(corrupt("superblock checksum does not match"));
            }
        }
        let log_block_size = le32(&sb[0x18..]);
        if log_block_size > 6 {
            return Err(corrupt(format!("block size 1024 << {log_block_size}")));
        }
        let block_size = 1024u64 << log_block_size;
        let is_64bit = feature_incompat & INCOMPAT_64BIT != 0;
        let blocks_count = u64::from(le32(&sb[0x04..]))
            | if is_64bit {
                u64::from(le32(&sb[0x150..])) << 32
            } else {
                0
            };
        let rev_level = le32(&sb[0x4C..]);
        let (inode_size, first_inode) = if rev_level == 0 {
            (128, 11)
        } else {
            (u64::from(le16(&sb[0x58..])), le32(&sb[0x54..]))
        };
        let desc_size = if is_64bit {
            u64::from(le16(&sb[0xFE..]))
        } else {
            32
        };
        let blocks_per_group = u64::from(le32(&sb[0x20..]));
        let inodes_per_group = le32(&sb[0x28..]);
        let inodes_count = le32(&sb[0x00..]);
        let first_data_block = u64::from(le32(&sb[0x14..]));
        // Each group's block and inode bitmaps are one block each (the
        // kernel refuses the same).
        if blocks_per_group == 0
            || inodes_per_group == 0
            || blocks_per_group > 8 * block_size
            || u64::from(inodes_per_group) > 8 * block_size
        {
            return Err(corrupt("blocks or inodes per group out of range"));
        }
        if !(128..=block_size).contains(&inode_size) || !inode_size.is_power_of_two() {
            return Err(corrupt(format!("inode size {inode_size}")));
        }
        if !(32..=block_size).contains(&desc_size) || !desc_size.is_power_of_two() {
            return Err(corrupt(format!("group descriptor size {desc_size}")));
        }
        if blocks_count <= first_data_block || first_data_block > 1 {
            return Err(corrupt("block count"));
        }
        let group_count = (blocks_count - first_data_block).div_ceil(blocks_per_group);
        // Every group holds inodes_per_group inodes, so the total is exact
        // (the kernel refuses any other); it also keeps every inode number
        // a group computes within u32.
        if group_count > GROUP_COUNT_MAX
            || group_count * u64::from(inodes_per_group) != u64::from(inodes_count)
        {
            return Err(corrupt(format!(
                "{group_count} groups of {inodes_per_group} inodes are not {inodes_count}"
            )));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&sb[0x68..0x78]);
        let checksum_seed = if feature_incompat & INCOMPAT_CSUM_SEED != 0 {
            le32(&sb[0x270..])
        } else {
            crc32c_raw(!0, &uuid)
        };
        let name_bytes = &sb[0x78..0x88];
        let name_end = name_bytes.iter().position(|&b| b == 0).unwrap_or(16);
        let special_inodes = [0x240, 0x244, 0x26C, 0x28C]
            .iter()
            .map(|&at| le32(&sb[at..]))
            .filter(|&n| n != 0)
            .collect();
        Ok(Superblock {
            block_size,
            blocks_count,
            inodes_count,
            blocks_per_group,
            inodes_per_group,
            inode_size,
            desc_size,
            first_data_block,
            group_count,
            first_inode,
            feature_compat,
            feature_incompat,
            feature_ro_compat,
            journal_inode: le32(&sb[0xE0..]),
            reserved_gdt_blocks: u64::from(le16(&sb[0xCE..])),
            backup_groups: [le32(&sb[0x24C..]), le32(&sb[0x250..])],
            uuid,
            volume_name: String::from_utf8_lossy(&name_bytes[..name_end]).into_owned(),
            checksum_seed,
            mmp_block: u64::from(le32(&sb[0x168..])) | (u64::from(le32(&sb[0x16C..])) << 32),
            special_inodes,
        })
    }

    fn refuse_unsupported(&self) -> Result<(), Ext4Error> {
        if self.feature_incompat & INCOMPAT_JOURNAL_DEV != 0 {
            return Err(Ext4Error::Unsupported("an external journal device"));
        }
        if self.feature_incompat & INCOMPAT_META_BG != 0 {
            return Err(Ext4Error::Unsupported("meta_bg group descriptor layout"));
        }
        if self.feature_ro_compat & RO_COMPAT_BIGALLOC != 0 {
            return Err(Ext4Error::Unsupported("bigalloc clusters"));
        }
        Ok(())
    }

    /// Whether group `group` holds a superblock and group descriptor copy.
    pub fn group_has_super(&self, group: u64) -> bool {
        if group == 0 {
            return true;
        }
        if self.feature_compat & COMPAT_SPARSE_SUPER2 != 0 {
            return self.backup_groups.contains(&(group as u32));
        }
        if self.feature_ro_compat & RO_COMPAT_SPARSE_SUPER == 0 || group == 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&base| is_power_of(group, base))
    }

    /// Blocks of group descriptors (without the reserved growth blocks).
    pub fn gdt_blocks(&self) -> u64 {
        (self.group_count * self.desc_size).div_ceil(self.block_size)
    }
}

fn is_power_of(mut value: u64, base: u64) -> bool {
    while value > 1 && value % base == 0 {
        value /= base;
    }
    value == 1
}

/// One group descriptor: where the group's bitmaps and inode table are.
#[derive(Debug, Clone, Copy)]
pub struct GroupDesc {
    pub block_bitmap: u64,
    pub inode_bitmap: u64,
    pub inode_table: u64,
    pub flags: u16,
    pub itable_unused: u32,
}

/// Filesystem metadata that is not any one file's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetaKind {
    Superblock,
    GroupDescriptors,
    ReservedGdt,
    BlockBitmap,
    InodeBitmap,
    InodeTable,
    Journal,
    Mmp,
    /// Blocks of a special inode (resize, quota, orphan file, ...).
    SpecialInode,
}

impl MetaKind {
    pub fn name(self) -> &'static str {
        match self {
            MetaKind::Superblock => "superblock",
            MetaKind::GroupDescriptors => "group descriptors",
            MetaKind::ReservedGdt => "reserved group descriptors",
            MetaKind::BlockBitmap => "block bitmap",
            MetaKind::InodeBitmap => "inode bitmap",
            MetaKind::InodeTable => "inode table",
            MetaKind::Journal => "journal",
            MetaKind::Mmp => "multi-mount protection",
            MetaKind::SpecialInode => "special inode",
        }
    }
}

/// A run of metadata blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaRun {
    pub start_block: u64,
    pub block_count: u64,
    pub kind: MetaKind,
}

#[derive(Debug)]
pub struct Ext4<R> {
    device: R,
    pub sb: Superblock,
    groups: Vec<GroupDesc>,
}

/// The superblock of the filesystem on `device`, checked, without opening
/// the filesystem (no group descriptors are read).
pub fn read_superblock<R: ReadAt>(device: &R) -> Result<Superblock, Ext4Error> {
    let mut raw = [0u8; 1024];
    device.read_exact_at(&mut raw, SUPERBLOCK_OFFSET)?;
    Superblock::parse(&raw)
}

impl<R: ReadAt> Ext4<R> {
    pub fn open(device: R) -> Result<Ext4<R>, Ext4Error> {
        let sb = read_superblock(&device)?;
        sb.refuse_unsupported()?;
        // The last block must be readable before anything is sized from
        // the superblock's counts: a truncated image fails here.
        let mut probe = [0u8; 1];
        device.read_exact_at(&mut probe, sb.blocks_count * sb.block_size - 1)?;
        let mut fs = Ext4 {
            device,
            sb,
            groups: Vec::new(),
        };
        fs.groups = fs.read_groups()?;
        Ok(fs)
    }

    /// The device the filesystem is read from.
    pub fn device(&self) -> &R {
        &self.device
    }

    pub fn into_device(self) -> R {
        self.device
    }

    pub fn group(&self, group: u64) -> Option<&GroupDesc> {
        self.groups.get(group as usize)
    }

    fn read_groups(&self) -> Result<Vec<GroupDesc>, Ext4Error> {
        let sb = &self.sb;
        let table_bytes = sb.group_count * sb.desc_size;
        let mut table = vec![0u8; table_bytes as usize];
        let table_offset = (sb.first_data_block + 1) * sb.block_size;
        self.device.read_exact_at(&mut table, table_offset)?;
        let mut groups = Vec::with_capacity(sb.group_count as usize);
        for (group, desc) in table.chunks_exact(sb.desc_size as usize).enumerate() {
            if sb.metadata_csum() {
                let mut copy = desc.to_vec();
                copy[0x1E..0x20].fill(0);
                let seed = crc32c_raw(sb.checksum_seed, &(group as u32).to_le_bytes());
                let expected = crc32c_raw(seed, &copy) & 0xFFFF;
                if u32::from(le16(&desc[0x1E..])) != expected {
                    return Err(corrupt(format!("group {group} descriptor checksum")));
                }
            }
            let wide = |low: usize, high: usize| {
                u64::from(le32(&desc[low..]))
                    | if sb.desc_size >= 64 {
                        u64::from(le32(&desc[high..])) << 32
                    } else {
                        0
                    }
            };
            let group_desc = GroupDesc {
                block_bitmap: wide(0x00, 0x20),
                inode_bitmap: wide(0x04, 0x24),
                inode_table: wide(0x08, 0x28),
                flags: le16(&desc[0x12..]),
                itable_unused: u32::from(le16(&desc[0x1C..]))
                    | if sb.desc_size >= 64 {
                        u32::from(le16(&desc[0x32..])) << 16
                    } else {
                        0
                    },
            };
            // A 64-bit descriptor can name a table near 2^64: add checked.
            let table_end = group_desc
                .inode_table
                .checked_add(self.inode_table_blocks());
            if table_end.is_none_or(|end| end > sb.blocks_count)
                || group_desc.block_bitmap >= sb.blocks_count
                || group_desc.inode_bitmap >= sb.blocks_count
            {
                return Err(corrupt(format!("group {group} metadata past the end")));
            }
            groups.push(group_desc);
        }
        Ok(groups)
    }

    pub fn inode_table_blocks(&self) -> u64 {
        (u64::from(self.sb.inodes_per_group) * self.sb.inode_size).div_ceil(self.sb.block_size)
    }

    pub(crate) fn read_block(&self, block: u64) -> Result<Vec<u8>, Ext4Error> {
        if block >= self.sb.blocks_count {
            return Err(corrupt(format!(
                "block {block} past the end ({})",
                self.sb.blocks_count
            )));
        }
        let mut buf = vec![0u8; self.sb.block_size as usize];
        self.device
            .read_exact_at(&mut buf, block * self.sb.block_size)?;
        Ok(buf)
    }

    /// Every run of filesystem metadata that belongs to no file: superblock
    /// and descriptor copies, reserved descriptor blocks, bitmaps, inode
    /// tables, the MMP block. (The journal's and other special inodes'
    /// blocks come from their inodes.)
    pub fn metadata_runs(&self) -> Vec<MetaRun> {
        let sb = &self.sb;
        let mut runs = Vec::new();
        let mut push = |start_block: u64, block_count: u64, kind| {
            if block_count > 0 {
                runs.push(MetaRun {
                    start_block,
                    block_count,
                    kind,
                });
            }
        };
        for (group, desc) in self.groups.iter().enumerate() {
            let group = group as u64;
            if sb.group_has_super(group) {
                let first = sb.first_data_block + group * sb.blocks_per_group;
                // With 1 KiB blocks group 0's superblock is block 1; with
                // larger blocks it sits inside block 0 with the boot area.
                let super_start = if group == 0 { 0 } else { first };
                push(super_start, first + 1 - super_start, MetaKind::Superblock);
                push(first + 1, sb.gdt_blocks(), MetaKind::GroupDescriptors);
                push(
                    first + 1 + sb.gdt_blocks(),
                    sb.reserved_gdt_blocks,
                    MetaKind::ReservedGdt,
                );
            }
            push(desc.block_bitmap, 1, MetaKind::BlockBitmap);
            push(desc.inode_bitmap, 1, MetaKind::InodeBitmap);
            push(
                desc.inode_table,
                self.inode_table_blocks(),
                MetaKind::InodeTable,
            );
        }
        if sb.mmp_block != 0 && sb.mmp_block < sb.blocks_count {
            push(sb.mmp_block, 1, MetaKind::Mmp);
        }
        runs
    }

    /// Whether inode `number` is in use according to its group's bitmap.
    pub fn inode_in_use(&self, number: u32) -> Result<bool, Ext4Error> {
        if number == 0 || number > self.sb.inodes_count {
            return Ok(false);
        }
        let index = u64::from(number - 1);
        let group = index / u64::from(self.sb.inodes_per_group);
        let desc = self.groups[group as usize];
        if desc.flags & GROUP_INODE_UNINIT != 0 {
            return Ok(false);
        }
        let bit = index % u64::from(self.sb.inodes_per_group);
        let mut byte = [0u8; 1];
        self.device
            .read_exact_at(&mut byte, desc.inode_bitmap * self.sb.block_size + bit / 8)?;
        Ok(byte[0] & (1 << (bit % 8)) != 0)
    }
}

/// CRC-32C as ext4 and jbd2 use it: seeded, without the final inversion.
/// (`crc32c_append` takes and returns the inverted register.)
pub fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

pub(crate) fn le16(bytes: &[u8]) -> u16 {
    u16::from_le_bytes([bytes[0], bytes[1]])
}

pub(crate) fn le32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::Bytes;

    #[test]
    fn garbage_is_not_ext4_and_truncation_is_an_error() {
        assert!(matches!(
            Ext4::open(Bytes(vec![0; 4096])),
            Err(Ext4Error::NotExt4)
        ));
        assert!(matches!(
            Ext4::open(Bytes(vec![0; 100])),
            Err(Ext4Error::Io(_))
        ));
    }

    #[test]
    fn a_superblock_with_impossible_sizes_is_corrupt() {
        let mut image = vec![0u8; 8192];
        image[1024 + 0x38..1024 + 0x3A].copy_from_slice(&EXT4_MAGIC.to_le_bytes());
        image[1024 + 0x18] = 40; // block size 1024 << 40
        assert!(matches!(
            Ext4::open(Bytes(image.clone())),
            Err(Ext4Error::Corrupt(_))
        ));
        image[1024 + 0x18] = 0;
        // zero blocks per group
        assert!(matches!(
            Ext4::open(Bytes(image)),
            Err(Ext4Error::Corrupt(_))
        ));
    }

    #[test]
    fn sparse_super_backups_are_in_groups_0_1_and_powers_of_3_5_7() {
        let mut raw = vec![0u8; 1024];
        raw[0x38..0x3A].copy_from_slice(&EXT4_MAGIC.to_le_bytes());
        raw[0x04..0x08].copy_from_slice(&100_000u32.to_le_bytes());
        raw[0x20..0x24].copy_from_slice(&8192u32.to_le_bytes());
        raw[0x28..0x2C].copy_from_slice(&16u32.to_le_bytes());
        raw[0x00..0x04].copy_from_slice(&(13 * 16u32).to_le_bytes()); // 13 groups
        raw[0x64..0x68].copy_from_slice(&RO_COMPAT_SPARSE_SUPER.to_le_bytes());
        raw[0x14] = 1;
        let sb = Superblock::parse(&raw).unwrap();
        let with: Vec<u64> = (0..60).filter(|&g| sb.group_has_super(g)).collect();
        assert_eq!(with, vec![0, 1, 3, 5, 7, 9, 25, 27, 49]);
    }

    #[test]
    fn crc32c_raw_matches_the_kernel_convention() {
        // crc32c_le(~0, "123456789") without the final xor is !0xE3069283.
        assert_eq!(crc32c_raw(!0, b"123456789"), !0xE306_9283);
    }
}
