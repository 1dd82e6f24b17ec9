//! A read-only ext4 reader over positioned reads of the image: superblock,
//! group descriptors (32- and 64-bit), inodes, extent trees of any depth,
//! and linear directories, enough to resolve a path to its inode and an
//! inode to the physical blocks it owns.
//!
//! Not yet: legacy (ext2/ext3) block maps, htree-indexed directory lookup
//! beyond a linear scan of the leaf blocks, inline data, the jbd2 journal,
//! partition tables, metadata_csum verification. Those report
//! `Ext4Error::Unsupported` instead of guessing.
//!
//! Every count and length read from the image is checked against the
//! structure that holds it before it is used or allocated.

use std::io;

pub use crate::read::ReadAt;

pub const SUPERBLOCK_OFFSET: u64 = 1024;
const EXT4_MAGIC: u16 = 0xEF53;
const EXTENT_MAGIC: u16 = 0xF30A;
const INCOMPAT_64BIT: u32 = 0x80;
const INODE_FLAG_EXTENTS: u32 = 0x8_0000;
const INODE_FLAG_INLINE_DATA: u32 = 0x1000_0000;
/// ext4 extent trees are at most 5 levels deep.
const EXTENT_DEPTH_MAX: u16 = 5;
/// Largest directory read whole.
const DIRECTORY_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Path components followed in one lookup.
const PATH_COMPONENTS_MAX: usize = 4096;

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
}

fn corrupt(what: impl Into<String>) -> Ext4Error {
    Ext4Error::Corrupt(what.into())
}


#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileExtent {
    pub logical_block: u64,
    pub physical_block: u64,
    pub block_count: u64,
    pub uninitialized: bool,
}

#[derive(Debug, Clone)]
pub struct Inode {
    pub number: u32,
    pub mode: u16,
    pub size_bytes: u64,
    pub flags: u32,
    pub links: u16,
    block: [u8; 60],
}

impl Inode {
    pub fn is_directory(&self) -> bool {
        self.mode & 0xF000 == 0x4000
    }
    pub fn is_regular(&self) -> bool {
        self.mode & 0xF000 == 0x8000
    }
}

#[derive(Debug)]
pub struct Ext4<R> {
    device: R,
    pub block_size: u64,
    pub blocks_count: u64,
    inodes_count: u32,
    inodes_per_group: u32,
    inode_size: u64,
    desc_size: u64,
    first_data_block: u64,
    group_count: u64,
}

impl<R: ReadAt> Ext4<R> {
    pub fn open(device: R) -> Result<Ext4<R>, Ext4Error> {
        let mut sb = [0u8; 1024];
        device.read_exact_at(&mut sb, SUPERBLOCK_OFFSET)?;
        if le16(&sb[0x38..]) != EXT4_MAGIC {
            return Err(Ext4Error::NotExt4);
        }
        let log_block_size = le32(&sb[0x18..]);
        if log_block_size > 6 {
            return Err(corrupt(format!("block size 1024 << {log_block_size}")));
        }
        let block_size = 1024u64 << log_block_size;
        let incompat = le32(&sb[0x60..]);
        let is_64bit = incompat & INCOMPAT_64BIT != 0;
        let blocks_count = u64::from(le32(&sb[0x04..]))
            | if is_64bit {
                u64::from(le32(&sb[0x150..])) << 32
            } else {
                0
            };
        let inodes_count = le32(&sb[0x00..]);
        let blocks_per_group = u64::from(le32(&sb[0x20..]));
        let inodes_per_group = le32(&sb[0x28..]);
        let rev_level = le32(&sb[0x4C..]);
        let inode_size = if rev_level == 0 {
            128
        } else {
            u64::from(le16(&sb[0x58..]))
        };
        let desc_size = if is_64bit {
            u64::from(le16(&sb[0xFE..]))
        } else {
            32
        };
        let first_data_block = u64::from(le32(&sb[0x14..]));
        if blocks_per_group == 0 || inodes_per_group == 0 {
            return Err(corrupt("zero blocks or inodes per group"));
        }
        if !(128..=block_size).contains(&inode_size) || !inode_size.is_power_of_two() {
            return Err(corrupt(format!("inode size {inode_size}")));
        }
        if !(32..=block_size).contains(&desc_size) {
            return Err(corrupt(format!("group descriptor size {desc_size}")));
        }
        let group_count =
            (blocks_count.saturating_sub(first_data_block)).div_ceil(blocks_per_group);
        if group_count == 0 || group_count * u64::from(inodes_per_group) < u64::from(inodes_count) {
            return Err(corrupt("group count does not cover the inodes"));
        }
        Ok(Ext4 {
            device,
            block_size,
            blocks_count,
            inodes_count,
            inodes_per_group,
            inode_size,
            desc_size,
            first_data_block,
            group_count,
        })
    }

    fn read_block(&self, block: u64) -> Result<Vec<u8>, Ext4Error> {
        if block >= self.blocks_count {
            return Err(corrupt(format!(
                "block {block} past the end ({})",
                self.blocks_count
            )));
        }
        let mut buf = vec![0u8; self.block_size as usize];
        self.device
            .read_exact_at(&mut buf, block * self.block_size)?;
        Ok(buf)
    }

    /// Block where group `group`'s inode table starts.
    fn inode_table_block(&self, group: u64) -> Result<u64, Ext4Error> {
        if group >= self.group_count {
            return Err(corrupt(format!("group {group} past the last")));
        }
        let gdt_offset = (self.first_data_block + 1) * self.block_size + group * self.desc_size;
        let mut desc = vec![0u8; self.desc_size as usize];
        self.device.read_exact_at(&mut desc, gdt_offset)?;
        let low = u64::from(le32(&desc[0x08..]));
        let high = if self.desc_size >= 64 {
            u64::from(le32(&desc[0x28..])) << 32
        } else {
            0
        };
        Ok(low | high)
    }

    pub fn inode(&self, number: u32) -> Result<Inode, Ext4Error> {
        if number == 0 || number > self.inodes_count {
            return Err(corrupt(format!("inode number {number}")));
        }
        let index = u64::from(number - 1);
        let group = index / u64::from(self.inodes_per_group);
        let slot = index % u64::from(self.inodes_per_group);
        let offset = self.inode_table_block(group)? * self.block_size + slot * self.inode_size;
        let mut raw = [0u8; 128];
        self.device.read_exact_at(&mut raw, offset)?;
        let mut block = [0u8; 60];
        block.copy_from_slice(&raw[0x28..0x64]);
        Ok(Inode {
            number,
            mode: le16(&raw[0x00..]),
            size_bytes: u64::from(le32(&raw[0x04..])) | (u64::from(le32(&raw[0x6C..])) << 32),
            flags: le32(&raw[0x20..]),
            links: le16(&raw[0x1A..]),
            block,
        })
    }

    /// The inode's extents, in logical order.
    pub fn extents(&self, inode: &Inode) -> Result<Vec<FileExtent>, Ext4Error> {
        if inode.flags & INODE_FLAG_INLINE_DATA != 0 {
            return Ok(Vec::new()); // data lives in the inode itself
        }
        if inode.flags & INODE_FLAG_EXTENTS == 0 {
            return Err(Ext4Error::Unsupported("block-mapped (ext2/ext3) files"));
        }
        let mut out = Vec::new();
        self.walk_node(&inode.block, None, &mut out)?;
        out.sort_by_key(|e| e.logical_block);
        Ok(out)
    }

    fn walk_node(
        &self,
        node: &[u8],
        parent_depth: Option<u16>,
        out: &mut Vec<FileExtent>,
    ) -> Result<(), Ext4Error> {
        if node.len() < 12 || le16(node) != EXTENT_MAGIC {
            return Err(corrupt("bad extent header magic"));
        }
        let entries = usize::from(le16(&node[2..]));
        let max = usize::from(le16(&node[4..]));
        let depth = le16(&node[6..]);
        if entries > max || 12 + max * 12 > node.len() {
            return Err(corrupt("extent node entry count exceeds its node"));
        }
        if depth > EXTENT_DEPTH_MAX || parent_depth.is_some_and(|parent| depth + 1 != parent) {
            return Err(corrupt(format!("extent depth {depth}")));
        }
        for entry in node[12..12 + entries * 12].chunks_exact(12) {
            if depth == 0 {
                let length = le16(&entry[4..]);
                let (block_count, uninitialized) = if length > 32768 {
                    (length - 32768, true)
                } else {
                    (length, false)
                };
                let physical_block =
                    u64::from(le32(&entry[8..])) | (u64::from(le16(&entry[6..])) << 32);
                if physical_block + u64::from(block_count) > self.blocks_count {
                    return Err(corrupt("extent past the end of the filesystem"));
                }
                out.push(FileExtent {
                    logical_block: u64::from(le32(entry)),
                    physical_block,
                    block_count: u64::from(block_count),
                    uninitialized,
                });
            } else {
                let child = u64::from(le32(&entry[4..])) | (u64::from(le16(&entry[8..])) << 32);
                let block = self.read_block(child)?;
                self.walk_node(&block, Some(depth), out)?;
            }
        }
        Ok(())
    }

    /// Reads a (small) file or directory whole.
    fn read_whole(&self, inode: &Inode) -> Result<Vec<u8>, Ext4Error> {
        if inode.size_bytes > DIRECTORY_BYTES_MAX {
            return Err(Ext4Error::Unsupported("directories over 64 MiB"));
        }
        let mut data = vec![0u8; inode.size_bytes as usize];
        for extent in self.extents(inode)? {
            for i in 0..extent.block_count {
                let at = (extent.logical_block + i) * self.block_size;
                if at >= inode.size_bytes {
                    break;
                }
                let end = (at + self.block_size).min(inode.size_bytes);
                if !extent.uninitialized {
                    let block = self.read_block(extent.physical_block + i)?;
                    data[at as usize..end as usize].copy_from_slice(&block[..(end - at) as usize]);
                }
            }
        }
        Ok(data)
    }

    /// Entries of a directory: (name, inode number).
    pub fn directory(&self, inode: &Inode) -> Result<Vec<(String, u32)>, Ext4Error> {
        if !inode.is_directory() {
            return Err(corrupt(format!(
                "inode {} is not a directory",
                inode.number
            )));
        }
        let data = self.read_whole(inode)?;
        let mut entries = Vec::new();
        for block in data.chunks(self.block_size as usize) {
            let mut at = 0usize;
            while at + 8 <= block.len() {
                let number = le32(&block[at..]);
                let record_len = usize::from(le16(&block[at + 4..]));
                let name_len = usize::from(block[at + 6]);
                if record_len < 8 || at + record_len > block.len() || 8 + name_len > record_len {
                    return Err(corrupt(format!(
                        "directory entry in inode {}",
                        inode.number
                    )));
                }
                if number != 0 && name_len > 0 {
                    let name =
                        String::from_utf8_lossy(&block[at + 8..at + 8 + name_len]).into_owned();
                    entries.push((name, number));
                }
                at += record_len;
            }
        }
        Ok(entries)
    }

    /// Resolves an absolute path to its inode number.
    pub fn lookup(&self, path: &str) -> Result<u32, Ext4Error> {
        let mut number = 2; // the root directory
        for (index, component) in path.split('/').filter(|c| !c.is_empty()).enumerate() {
            if index >= PATH_COMPONENTS_MAX {
                return Err(corrupt("path too deep"));
            }
            let directory = self.inode(number)?;
            number = self
                .directory(&directory)?
                .into_iter()
                .find(|(name, _)| name == component)
                .map(|(_, child)| child)
                .ok_or_else(|| Ext4Error::NotFound(path.to_string()))?;
        }
        Ok(number)
    }
}

fn le16(bytes: &[u8]) -> u16 {
    u16::from_le_bytes([bytes[0], bytes[1]])
}

fn le32(bytes: &[u8]) -> u32 {
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
}
