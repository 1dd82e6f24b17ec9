//! Directories: entries of linear and htree directories (an htree's index
//! blocks read as empty entries, so a walk of every block finds every leaf
//! entry) and of inline-data directories; path lookup.

use super::xattr::INDEX_SYSTEM;
use super::{Ext4, Ext4Error, Inode, ReadAt, corrupt, crc32c_raw, le16, le32};

/// Largest directory read whole.
const DIRECTORY_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// Path components followed in one lookup.
const PATH_COMPONENTS_MAX: usize = 4096;
const INCOMPAT_FILETYPE: u32 = 0x2;
/// File type byte of the metadata_csum tail that ends a leaf block.
const TAIL_FILE_TYPE: u8 = 0xDE;
/// i_flags: the directory is hash-indexed (htree).
const FLAG_INDEX: u32 = 0x1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Raw bytes: ext4 names need not be UTF-8.
    pub name: Vec<u8>,
    pub inode: u32,
    pub file_type: u8,
}

impl DirEntry {
    pub fn is_dot_or_dotdot(&self) -> bool {
        self.name == b"." || self.name == b".."
    }
}

impl<R: ReadAt> Ext4<R> {
    /// Entries of a directory, "." and ".." included when stored.
    pub fn directory(&self, inode: &Inode) -> Result<Vec<DirEntry>, Ext4Error> {
        if !inode.is_directory() {
            return Err(corrupt(format!(
                "inode {} is not a directory",
                inode.number
            )));
        }
        if inode.has_inline_data() {
            return self.inline_directory(inode);
        }
        if inode.size_bytes > DIRECTORY_BYTES_MAX {
            return Err(Ext4Error::Unsupported("directories over 256 MiB"));
        }
        let block_size = self.sb.block_size;
        let block_total = inode.size_bytes.div_ceil(block_size);
        // Extents that overlap (corruption) would read the same logical
        // blocks again, up to 32768 blocks per extent: read no more blocks
        // than the directory's size holds.
        let mut blocks_left = block_total;
        let indexed = inode.flags & FLAG_INDEX != 0;
        let mut entries = Vec::new();
        for extent in self.extents(inode)? {
            if extent.uninitialized {
                continue;
            }
            let within = block_total.saturating_sub(extent.logical_block);
            for index in 0..extent.block_count.min(within) {
                blocks_left = blocks_left.checked_sub(1).ok_or_else(|| {
                    corrupt(format!("directory inode {}: extents overlap", inode.number))
                })?;
                let block = self.read_block(extent.physical_block + index)?;
                let logical = extent.logical_block + index;
                if indexed && (logical == 0 || is_index_node(&block)) {
                    // The htree root ("." and "..", whose record spans the
                    // index and may hide a stale leaf tail) or an interior
                    // node: no entries beyond "." and "..".
                    let head = &block[..block.len().min(24)];
                    self.parse_entries(inode.number, head, &mut entries, true)?;
                    continue;
                }
                self.parse_leaf(inode, &block, &mut entries)?;
            }
        }
        Ok(entries)
    }

    fn parse_leaf(
        &self,
        inode: &Inode,
        block: &[u8],
        entries: &mut Vec<DirEntry>,
    ) -> Result<(), Ext4Error> {
        let mut end = block.len();
        if self.sb.metadata_csum() && has_csum_tail(block) {
            end -= 12;
            let seed = self.inode_seed(inode.number, inode.generation);
            if le32(&block[end + 8..]) != crc32c_raw(seed, &block[..end]) {
                return Err(corrupt(format!(
                    "directory inode {}: leaf block checksum",
                    inode.number
                )));
            }
        }
        self.parse_entries(inode.number, &block[..end], entries, false)
    }

    /// Entries packed in `bytes`. With `truncated`, a record may run past
    /// the end of `bytes` (only the start of an htree root is passed).
    fn parse_entries(
        &self,
        directory: u32,
        bytes: &[u8],
        entries: &mut Vec<DirEntry>,
        truncated: bool,
    ) -> Result<(), Ext4Error> {
        let filetype = self.sb.feature_incompat & INCOMPAT_FILETYPE != 0;
        let mut at = 0usize;
        while at + 8 <= bytes.len() {
            let number = le32(&bytes[at..]);
            let mut record_len = usize::from(le16(&bytes[at + 4..]));
            if bytes.len() >= 65536 && (record_len == 0 || record_len == 65535) {
                record_len = 65536; // how 64 KiB blocks spell a whole-block entry
            }
            let (name_len, file_type) = if filetype {
                (usize::from(bytes[at + 6]), bytes[at + 7])
            } else {
                (usize::from(le16(&bytes[at + 6..])), 0)
            };
            let overruns = at + record_len > bytes.len() && !truncated;
            if record_len < 8
                || overruns
                || 8 + name_len > record_len
                || at + 8 + name_len > bytes.len()
            {
                return Err(corrupt(format!(
                    "directory inode {directory}: entry at {at}"
                )));
            }
            if number != 0 && name_len > 0 {
                if number > self.sb.inodes_count {
                    return Err(corrupt(format!(
                        "directory inode {directory}: inode {number}"
                    )));
                }
                entries.push(DirEntry {
                    name: bytes[at + 8..at + 8 + name_len].to_vec(),
                    inode: number,
                    file_type,
                });
            }
            at += record_len;
        }
        Ok(())
    }

    /// An inline directory keeps its parent in the first 4 bytes of
    /// `i_block`, entries in the rest, and more in the "system.data" xattr.
    fn inline_directory(&self, inode: &Inode) -> Result<Vec<DirEntry>, Ext4Error> {
        let area = inode.block_area();
        let mut entries = vec![DirEntry {
            name: b"..".to_vec(),
            inode: le32(area),
            file_type: 2,
        }];
        self.parse_entries(inode.number, &area[4..], &mut entries, false)?;
        for (index, name, value) in inode.inline_xattrs() {
            if index == INDEX_SYSTEM && name == b"data" && !value.is_empty() {
                self.parse_entries(inode.number, &value, &mut entries, false)?;
            }
        }
        Ok(entries)
    }

    /// Resolves an absolute path to its inode number (symlinks are not
    /// followed: the map wants the link itself).
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
                .find(|entry| entry.name == component.as_bytes())
                .map(|entry| entry.inode)
                .ok_or_else(|| Ext4Error::NotFound(path.to_string()))?;
        }
        Ok(number)
    }
}

/// Whether a block of an indexed directory is an htree interior node: one
/// empty entry spanning the whole block, the index hidden inside it.
fn is_index_node(block: &[u8]) -> bool {
    let record_len = usize::from(le16(&block[4..]));
    le32(block) == 0 && (record_len == block.len() || block.len() == 65536 && record_len == 0)
}

/// Whether a directory block ends with the 12-byte checksum tail (a fake
/// entry: inode 0, length 12, no name, type 0xDE).
fn has_csum_tail(block: &[u8]) -> bool {
    let tail = &block[block.len() - 12..];
    le32(tail) == 0 && le16(&tail[4..]) == 12 && tail[6] == 0 && tail[7] == TAIL_FILE_TYPE
}
