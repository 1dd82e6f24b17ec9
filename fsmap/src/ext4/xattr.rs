//! Extended attributes: the entries in the inode body and in the xattr
//! block (one parser for both), their full names, values kept in EA
//! inodes, and POSIX ACLs converted from ext4's compact format to the one
//! `getxattr` returns.

use super::{Ext4, Ext4Error, Inode, ReadAt, corrupt, crc32c_raw, le16, le32};

pub(crate) const XATTR_MAGIC: u32 = 0xEA02_0000;
/// The xattr block's header: magic, refcount, blocks, hash, checksum and
/// reserved words; its entries follow.
const BLOCK_HEADER_BYTES: usize = 32;
const BLOCK_CHECKSUM_AT: usize = 0x10;
/// An entry's fixed part: name length, name index, value offset, value
/// inode, value size, hash. The name follows, padded to 4 bytes.
const ENTRY_BYTES: usize = 16;
const INCOMPAT_EA_INODE: u32 = 0x400;
/// i_flags of an inode that holds one xattr value.
const FLAG_EA_INODE: u32 = 0x20_0000;
/// Largest value the VFS lets one attribute have (XATTR_SIZE_MAX).
const VALUE_BYTES_MAX: u64 = 65536;
/// Value bytes returned for one inode. Without ea_inode every value lies in
/// the inode or its one block (at most 128 KiB), but entries may share a
/// value, and with ea_inode each of a block's ~200 entries may name a
/// 64 KiB inode: a crafted inode must not make us allocate more than this.
const VALUES_BYTES_MAX: usize = 16 << 20;

const INDEX_USER: u8 = 1;
const INDEX_POSIX_ACL_ACCESS: u8 = 2;
const INDEX_POSIX_ACL_DEFAULT: u8 = 3;
const INDEX_TRUSTED: u8 = 4;
const INDEX_SECURITY: u8 = 6;
pub(crate) const INDEX_SYSTEM: u8 = 7;
const INDEX_RICHACL: u8 = 8;

/// ext4's on-disk ACL header version (struct ext4_acl_header).
const EXT4_ACL_VERSION: u32 = 1;
/// The VFS ACL xattr version (struct posix_acl_xattr_header).
const VFS_ACL_VERSION: u32 = 2;
/// The id a VFS ACL entry carries when its tag names no user or group.
const ACL_UNDEFINED_ID: u32 = u32::MAX;
const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_GROUP: u16 = 0x08;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;

/// Where an entry's value is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RawValue<'a> {
    Here(&'a [u8]),
    /// In an EA inode of its own (the ea_inode feature).
    Inode {
        number: u32,
        size_bytes: u32,
    },
}

/// One entry as stored: name index, name without its prefix, value.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawXattr<'a> {
    pub index: u8,
    pub name: &'a [u8],
    pub value: RawValue<'a>,
}

/// The entries of one xattr area, checked as the kernel checks them: every
/// entry and value inside the area, the list ended by a zero word. After
/// the first error it yields nothing more.
#[derive(Debug)]
pub(crate) struct Entries<'a> {
    /// What value offsets count from: the first entry in an inode body,
    /// the block's first byte in a block.
    values: &'a [u8],
    at: usize,
    done: bool,
}

impl<'a> Entries<'a> {
    /// The entries in an inode body's xattr area (after i_extra_isize):
    /// none unless it starts with the magic.
    pub(crate) fn in_body(area: &'a [u8]) -> Entries<'a> {
        let magic = area.len() >= 4 && le32(area) == XATTR_MAGIC;
        Entries {
            values: area.get(4..).unwrap_or_default(),
            at: 0,
            done: !magic,
        }
    }

    /// The entries of an xattr block whose header has been checked.
    fn in_block(block: &'a [u8]) -> Entries<'a> {
        Entries {
            values: block,
            at: BLOCK_HEADER_BYTES,
            done: false,
        }
    }

    fn entry(&mut self) -> Result<Option<RawXattr<'a>>, String> {
        let area = self.values;
        let at = self.at;
        let word = area.get(at..at + 4).ok_or("entries not ended")?;
        if le32(word) == 0 {
            return Ok(None);
        }
        let fixed = area.get(at..at + ENTRY_BYTES).ok_or("entry past the end")?;
        let name_len = usize::from(fixed[0]);
        let value_offset = usize::from(le16(&fixed[2..]));
        let value_inode = le32(&fixed[4..]);
        let value_size = le32(&fixed[8..]);
        let name = area
            .get(at + ENTRY_BYTES..at + ENTRY_BYTES + name_len)
            .ok_or("name past the end")?;
        let value = if value_inode != 0 {
            RawValue::Inode {
                number: value_inode,
                size_bytes: value_size,
            }
        } else {
            let end = value_offset.saturating_add(value_size as usize);
            RawValue::Here(area.get(value_offset..end).ok_or("value past the end")?)
        };
        self.at += (ENTRY_BYTES + name_len).div_ceil(4) * 4;
        Ok(Some(RawXattr {
            index: fixed[1],
            name,
            value,
        }))
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<RawXattr<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let entry = self.entry().transpose();
        if !matches!(entry, Some(Ok(_))) {
            self.done = true;
        }
        entry
    }
}

/// The name `getxattr` knows an entry by; `None` for what the kernel does
/// not list (inline data's "system.data", which is the file's contents,
/// and indexes it has no prefix for, such as the encryption context).
fn full_name(index: u8, name: &[u8]) -> Result<Option<String>, Ext4Error> {
    let prefix = match index {
        INDEX_USER => "user.",
        INDEX_POSIX_ACL_ACCESS => "system.posix_acl_access",
        INDEX_POSIX_ACL_DEFAULT => "system.posix_acl_default",
        INDEX_TRUSTED => "trusted.",
        INDEX_SECURITY => "security.",
        INDEX_SYSTEM if name == b"data" => return Ok(None),
        INDEX_SYSTEM => "system.",
        INDEX_RICHACL => "system.richacl",
        _ => return Ok(None),
    };
    let name = std::str::from_utf8(name)
        .map_err(|_| Ext4Error::Unsupported("an xattr name that is not UTF-8"))?;
    Ok(Some(format!("{prefix}{name}")))
}

/// An ext4 ACL (a version 1 header, 4-byte entries for the owner, group,
/// mask and other, 8-byte ones naming a user or group) as the VFS spells
/// it: a version 2 header and 8-byte entries throughout.
fn acl_to_vfs(disk: &[u8]) -> Result<Vec<u8>, String> {
    if disk.len() < 4 || le32(disk) != EXT4_ACL_VERSION {
        return Err("ACL header".into());
    }
    let mut out = VFS_ACL_VERSION.to_le_bytes().to_vec();
    let mut at = 4;
    while at < disk.len() {
        let short = disk.get(at..at + 4).ok_or("ACL entry past the end")?;
        let tag = le16(short);
        let id = match tag {
            ACL_USER_OBJ | ACL_GROUP_OBJ | ACL_MASK | ACL_OTHER => {
                at += 4;
                ACL_UNDEFINED_ID
            }
            ACL_USER | ACL_GROUP => {
                let long = disk.get(at..at + 8).ok_or("ACL entry past the end")?;
                at += 8;
                le32(&long[4..])
            }
            _ => return Err(format!("ACL entry tag {tag:#x}")),
        };
        out.extend_from_slice(&short[..4]);
        out.extend_from_slice(&id.to_le_bytes());
    }
    Ok(out)
}

impl<R: ReadAt> Ext4<R> {
    /// Every extended attribute of `inode` by its full name ("user.foo",
    /// "system.posix_acl_access", ...), those in the inode body first,
    /// then those of its xattr block, each in stored order. ACL values are
    /// converted to the VFS format; values in EA inodes are read.
    pub fn xattrs(&self, inode: &Inode) -> Result<Vec<(String, Vec<u8>)>, Ext4Error> {
        let number = inode.number;
        let mut out = Vec::new();
        let mut value_bytes = 0usize;
        let block = self.xattr_block(inode)?;
        let body = Entries::in_body(inode.inline_xattr_area());
        let listed = block
            .as_deref()
            .map(Entries::in_block)
            .into_iter()
            .flatten();
        for entry in body.chain(listed) {
            let entry = entry.map_err(|why| corrupt(format!("inode {number}: xattr {why}")))?;
            let Some(name) = full_name(entry.index, entry.name)? else {
                continue;
            };
            let mut value = self.xattr_value(number, entry.value)?;
            value_bytes = value_bytes.saturating_add(value.len());
            if value_bytes > VALUES_BYTES_MAX {
                return Err(corrupt(format!("inode {number}: xattr values over 16 MiB")));
            }
            if matches!(
                entry.index,
                INDEX_POSIX_ACL_ACCESS | INDEX_POSIX_ACL_DEFAULT
            ) {
                value = acl_to_vfs(&value)
                    .map_err(|why| corrupt(format!("inode {number}: {name}: {why}")))?;
            }
            out.push((name, value));
        }
        Ok(out)
    }

    /// The inode's xattr block, its header (and with metadata_csum its
    /// checksum) checked; `None` when it has none.
    fn xattr_block(&self, inode: &Inode) -> Result<Option<Vec<u8>>, Ext4Error> {
        let number = inode.number;
        let at = inode.file_acl_block;
        if at == 0 {
            return Ok(None);
        }
        let block = self.read_block(at)?;
        // h_blocks: the kernel only ever writes (and accepts) one block.
        if le32(&block) != XATTR_MAGIC || le32(&block[8..]) != 1 {
            return Err(corrupt(format!(
                "inode {number}: xattr block {at} has no xattr header"
            )));
        }
        if self.sb.metadata_csum() {
            // Seeded with the block number, not the inode: a block may be
            // shared by every inode with the same attributes.
            let mut copy = block.clone();
            copy[BLOCK_CHECKSUM_AT..BLOCK_CHECKSUM_AT + 4].fill(0);
            let seed = crc32c_raw(self.sb.checksum_seed, &at.to_le_bytes());
            if le32(&block[BLOCK_CHECKSUM_AT..]) != crc32c_raw(seed, &copy) {
                return Err(corrupt(format!(
                    "inode {number}: xattr block {at} checksum does not match"
                )));
            }
        }
        Ok(Some(block))
    }

    fn xattr_value(&self, owner: u32, value: RawValue<'_>) -> Result<Vec<u8>, Ext4Error> {
        let (number, size_bytes) = match value {
            RawValue::Here(bytes) => return Ok(bytes.to_vec()),
            RawValue::Inode { number, size_bytes } => (number, u64::from(size_bytes)),
        };
        if self.sb.feature_incompat & INCOMPAT_EA_INODE == 0 || number == owner {
            return Err(corrupt(format!(
                "inode {owner}: xattr value in inode {number}"
            )));
        }
        if size_bytes > VALUE_BYTES_MAX {
            return Err(corrupt(format!(
                "inode {owner}: xattr value of {size_bytes} bytes"
            )));
        }
        let holder = self.inode(number)?;
        if holder.flags & FLAG_EA_INODE == 0 || holder.size_bytes != size_bytes {
            return Err(corrupt(format!(
                "inode {owner}: inode {number} holds no xattr value of {size_bytes} bytes"
            )));
        }
        let layout = self.file_layout(&holder)?;
        let mut bytes = vec![0u8; size_bytes as usize];
        self.read_file_at(&holder, &layout, 0, &mut bytes)?;
        Ok(bytes)
    }

    /// The "system.data" value of an inline-data inode: its contents past
    /// the 60 bytes of i_block (empty when it has none).
    pub(crate) fn inline_data_tail<'i>(&self, inode: &'i Inode) -> Result<&'i [u8], Ext4Error> {
        for entry in Entries::in_body(inode.inline_xattr_area()) {
            let entry =
                entry.map_err(|why| corrupt(format!("inode {}: xattr {why}", inode.number)))?;
            if entry.index == INDEX_SYSTEM && entry.name == b"data" {
                return match entry.value {
                    RawValue::Here(bytes) => Ok(bytes),
                    RawValue::Inode { .. } => Err(corrupt(format!(
                        "inode {}: inline data in an EA inode",
                        inode.number
                    ))),
                };
            }
        }
        Ok(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u8, name: &[u8], value_offset: u16, value_size: u32) -> Vec<u8> {
        let mut out = vec![name.len() as u8, index];
        out.extend_from_slice(&value_offset.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&value_size.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(name);
        out.resize(out.len().div_ceil(4) * 4, 0);
        out
    }

    fn body(entries: &[Vec<u8>], values: &[u8]) -> Vec<u8> {
        let mut area = XATTR_MAGIC.to_le_bytes().to_vec();
        for e in entries {
            area.extend_from_slice(e);
        }
        area.extend_from_slice(&[0; 4]);
        area.extend_from_slice(values);
        area
    }

    #[test]
    fn entries_in_a_body_give_their_names_and_values() {
        // Entries of 20 and 24 bytes and the end word: values from 48.
        let area = body(
            &[entry(1, b"ab", 48, 3), entry(6, b"selinux", 51, 2)],
            b"xyzhi",
        );
        let entries: Vec<_> = Entries::in_body(&area).collect::<Result<_, _>>().unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].name, b"ab");
        assert!(matches!(entries[0].value, RawValue::Here(b"xyz")));
        assert_eq!(
            full_name(entries[1].index, entries[1].name).unwrap(),
            Some("security.selinux".into())
        );
    }

    #[test]
    fn a_value_past_the_area_or_an_unended_list_is_an_error() {
        let area = body(&[entry(1, b"ab", 40, 30)], b"short");
        let results: Vec<_> = Entries::in_body(&area).collect();
        assert_eq!(results.len(), 1);
        assert!(results[0].is_err());
        let mut unended = XATTR_MAGIC.to_le_bytes().to_vec();
        unended.extend_from_slice(&entry(1, b"ab", 0, 0));
        let results: Vec<_> = Entries::in_body(&unended).collect();
        assert!(results[0].is_ok() && results[1].is_err() && results.len() == 2);
        assert_eq!(Entries::in_body(&[0u8; 40]).count(), 0, "no magic: none");
    }

    #[test]
    fn an_ext4_acl_becomes_the_vfs_format() {
        // u::rw-, u:1000:r--, g::r--, m::r--, o::---
        let mut disk = 1u32.to_le_bytes().to_vec();
        disk.extend_from_slice(&[1, 0, 6, 0]);
        disk.extend_from_slice(&[2, 0, 4, 0, 0xE8, 3, 0, 0]);
        disk.extend_from_slice(&[4, 0, 4, 0, 0x10, 0, 4, 0, 0x20, 0, 0, 0]);
        let mut vfs = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, u32::MAX),
            (2, 4, 1000),
            (4, 4, u32::MAX),
            (0x10, 4, u32::MAX),
            (0x20, 0, u32::MAX),
        ] {
            vfs.extend_from_slice(&tag.to_le_bytes());
            vfs.extend_from_slice(&perm.to_le_bytes());
            vfs.extend_from_slice(&id.to_le_bytes());
        }
        assert_eq!(acl_to_vfs(&disk).unwrap(), vfs);
        assert!(acl_to_vfs(&disk[..disk.len() - 2]).is_err(), "a cut entry");
        assert!(
            acl_to_vfs(&[2, 0, 0, 0]).is_err(),
            "the VFS version on disk"
        );
        assert!(
            acl_to_vfs(&[1, 0, 0, 0, 0x40, 0, 0, 0]).is_err(),
            "unknown tag"
        );
    }
}
