//! What a file is and holds, for reading files out of an image without
//! mounting it: its full metadata (`FileMeta`: type, device numbers,
//! owner, times to the nanosecond, xattrs, symlink target) and where its
//! bytes are (`FileLayout`: the data segments within its size, holes
//! left out), and positioned reads of its contents.

use super::inode::{FLAG_EXTENTS, inode_time};
use super::{Ext4, Ext4Error, FileExtent, Inode, ReadAt, corrupt, le32};

/// i_flags: contents and names encrypted (fscrypt); we hold no keys.
const FLAG_ENCRYPT: u32 = 0x800;
/// i_flags: the file has compressed clusters (the out-of-tree e2compr
/// patches; mainline never compresses, and ignores `chattr +c`'s 0x4).
const FLAG_COMPRESSED_BLOCKS: u32 = 0x200;
/// Where the extra fields keep crtime and its epoch and nanoseconds word.
const CRTIME_AT: usize = 0x90;
const CRTIME_EXTRA_AT: usize = 0x94;
const ATIME_AT: usize = 0x08;
const ATIME_EXTRA_AT: usize = 0x8C;

/// What kind of file an inode is, with a device's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    CharDevice { major: u32, minor: u32 },
    BlockDevice { major: u32, minor: u32 },
    Fifo,
    Socket,
}

/// Everything about a file that a restore or a tar header carries.
/// Times are (seconds since the epoch, nanoseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    pub number: u32,
    pub kind: FileKind,
    /// mode & 0o7777: permission, setuid, setgid and sticky bits.
    pub permissions: u16,
    pub uid: u32,
    pub gid: u32,
    pub size_bytes: u64,
    pub links: u16,
    /// i_flags (immutable, append-only, ...), as `lsattr` shows them.
    pub flags: u32,
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    /// The creation time, kept only by inodes with room for it.
    pub crtime: Option<(i64, u32)>,
    /// (full name, value) as `getxattr` gives them; ACLs in the VFS format.
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub symlink_target: Option<Vec<u8>>,
}

/// Where one segment of a file's bytes comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentSource {
    /// At this byte offset of the filesystem's device (the partition,
    /// through the journal when the filesystem was opened through it).
    Device { offset_bytes: u64 },
    /// In the inode itself (inline data, a fast symlink's target).
    Inline,
}

/// A run of a file's bytes that holds data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Where the run starts in the file.
    pub offset_bytes: u64,
    pub length_bytes: u64,
    pub source: SegmentSource,
}

impl Segment {
    fn end_bytes(&self) -> u64 {
        self.offset_bytes + self.length_bytes
    }
}

/// Where a file's bytes are: its segments in file order, none overlapping,
/// all within `size_bytes`. Every byte outside them is a hole and reads
/// as zero: a gap between extents, an uninitialised (preallocated) extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileLayout {
    pub number: u32,
    pub size_bytes: u64,
    pub segments: Vec<Segment>,
    /// The bytes an `Inline` segment reads from.
    inline_bytes: Vec<u8>,
}

impl FileLayout {
    /// (offset, length) of the file's data, adjacent segments merged: what
    /// a sparse writer writes, everything else being a hole.
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for segment in &self.segments {
            match out.last_mut() {
                Some((start, length)) if *start + *length == segment.offset_bytes => {
                    *length += segment.length_bytes;
                }
                _ => out.push((segment.offset_bytes, segment.length_bytes)),
            }
        }
        out
    }

    /// Bytes of data (the size less its holes).
    pub fn data_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.length_bytes).sum()
    }

    fn inline(number: u32, bytes: Vec<u8>) -> FileLayout {
        let size_bytes = bytes.len() as u64;
        let segments = (size_bytes > 0)
            .then_some(Segment {
                offset_bytes: 0,
                length_bytes: size_bytes,
                source: SegmentSource::Inline,
            })
            .into_iter()
            .collect();
        FileLayout {
            number,
            size_bytes,
            segments,
            inline_bytes: bytes,
        }
    }
}

impl<R: ReadAt> Ext4<R> {
    /// The file's type, owner, permissions, size, links, times, xattrs
    /// (in the body and the xattr block) and symlink target.
    pub fn file_meta(&self, inode: &Inode) -> Result<FileMeta, Ext4Error> {
        let kind = file_kind(inode)?;
        let raw = inode.raw();
        let crtime = (inode.fields_end() >= CRTIME_AT + 4)
            .then(|| inode_time(raw, CRTIME_AT, CRTIME_EXTRA_AT));
        let symlink_target = match kind {
            FileKind::Symlink => Some(self.read_link(inode)?),
            _ => None,
        };
        Ok(FileMeta {
            number: inode.number,
            kind,
            permissions: inode.mode & 0o7777,
            uid: inode.uid,
            gid: inode.gid,
            size_bytes: inode.size_bytes,
            links: inode.links,
            flags: inode.flags,
            atime: inode_time(raw, ATIME_AT, ATIME_EXTRA_AT),
            mtime: (inode.mtime_seconds, inode.mtime_nanoseconds),
            ctime: (inode.ctime_seconds, inode.ctime_nanoseconds),
            crtime,
            xattrs: self.xattrs(inode)?,
            symlink_target,
        })
    }

    /// Where the file's bytes are: the data segments within its size
    /// (extents or block maps of any depth; inline data; a fast symlink's
    /// target). Devices, fifos and sockets have none.
    pub fn file_layout(&self, inode: &Inode) -> Result<FileLayout, Ext4Error> {
        let number = inode.number;
        if inode.flags & FLAG_ENCRYPT != 0 {
            return Err(Ext4Error::Unsupported("encrypted file contents"));
        }
        if inode.flags & FLAG_COMPRESSED_BLOCKS != 0 && inode.flags & FLAG_EXTENTS == 0 {
            return Err(Ext4Error::Unsupported("e2compr compressed file contents"));
        }
        if inode.has_inline_data() {
            return self.inline_layout(inode);
        }
        if let Some(target) = inode.fast_symlink_target() {
            return Ok(FileLayout::inline(number, target.to_vec()));
        }
        let segments = if inode.has_block_map() {
            let extents = self.extents(inode)?;
            extent_segments(number, inode.size_bytes, self.sb.block_size, &extents)?
        } else {
            Vec::new()
        };
        Ok(FileLayout {
            number,
            size_bytes: inode.size_bytes,
            segments,
            inline_bytes: Vec::new(),
        })
    }

    /// Inline data: the first 60 bytes in i_block, the rest in the
    /// "system.data" xattr of the inode body.
    fn inline_layout(&self, inode: &Inode) -> Result<FileLayout, Ext4Error> {
        let tail = self.inline_data_tail(inode)?;
        let head = inode.block_area();
        let stored = (head.len() + tail.len()) as u64;
        if inode.size_bytes > stored {
            return Err(corrupt(format!(
                "inode {}: {} bytes of inline data hold only {stored}",
                inode.number, inode.size_bytes
            )));
        }
        let mut bytes = [head, tail].concat();
        bytes.truncate(inode.size_bytes as usize);
        Ok(FileLayout::inline(inode.number, bytes))
    }

    /// Fills `buf` with the file's bytes from `offset_bytes` (holes as
    /// zeros). The range must lie within the file's size.
    pub fn read_file_at(
        &self,
        inode: &Inode,
        layout: &FileLayout,
        offset_bytes: u64,
        buf: &mut [u8],
    ) -> Result<(), Ext4Error> {
        assert_eq!(
            layout.number, inode.number,
            "a layout read with another inode"
        );
        let end_bytes = offset_bytes
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= layout.size_bytes)
            .ok_or_else(|| {
                Ext4Error::PastEnd(format!(
                    "{} bytes at {offset_bytes} of inode {}, which holds {}",
                    buf.len(),
                    inode.number,
                    layout.size_bytes
                ))
            })?;
        buf.fill(0);
        let first = layout
            .segments
            .partition_point(|s| s.end_bytes() <= offset_bytes);
        for segment in &layout.segments[first..] {
            if segment.offset_bytes >= end_bytes {
                break;
            }
            let from = segment.offset_bytes.max(offset_bytes);
            let to = segment.end_bytes().min(end_bytes);
            let part = &mut buf[(from - offset_bytes) as usize..(to - offset_bytes) as usize];
            match segment.source {
                SegmentSource::Device { offset_bytes: at } => {
                    self.device
                        .read_exact_at(part, at + (from - segment.offset_bytes))?;
                }
                SegmentSource::Inline => {
                    part.copy_from_slice(&layout.inline_bytes[from as usize..to as usize]);
                }
            }
        }
        Ok(())
    }

    /// A symlink's target (fast, inline or in a data block).
    pub fn read_link(&self, inode: &Inode) -> Result<Vec<u8>, Ext4Error> {
        let number = inode.number;
        if !inode.is_symlink() {
            return Err(corrupt(format!("inode {number} is not a symlink")));
        }
        // The kernel keeps a target in one block at most.
        if inode.size_bytes > self.sb.block_size {
            return Err(corrupt(format!(
                "symlink {number}: a target of {} bytes",
                inode.size_bytes
            )));
        }
        let layout = self.file_layout(inode)?;
        let mut target = vec![0u8; inode.size_bytes as usize];
        self.read_file_at(inode, &layout, 0, &mut target)?;
        Ok(target)
    }
}

fn file_kind(inode: &Inode) -> Result<FileKind, Ext4Error> {
    let device = || device_numbers(inode.block_area());
    Ok(match inode.kind() {
        0x8000 => FileKind::Regular,
        0x4000 => FileKind::Directory,
        0xA000 => FileKind::Symlink,
        0x2000 => {
            let (major, minor) = device();
            FileKind::CharDevice { major, minor }
        }
        0x6000 => {
            let (major, minor) = device();
            FileKind::BlockDevice { major, minor }
        }
        0x1000 => FileKind::Fifo,
        0xC000 => FileKind::Socket,
        other => {
            return Err(corrupt(format!(
                "inode {}: file type {other:#o}",
                inode.number
            )));
        }
    })
}

/// A device inode's (major, minor): the old 16-bit encoding in i_block[0]
/// when it is set (8 bits each), else the new 32-bit one in i_block[1]
/// (12-bit major; minor's low 8 bits low, its high 12 bits at bit 20).
fn device_numbers(block_area: &[u8]) -> (u32, u32) {
    let old = le32(block_area);
    if old != 0 {
        return ((old >> 8) & 0xFF, old & 0xFF);
    }
    let new = le32(&block_area[4..]);
    (
        (new & 0xF_FF00) >> 8,
        (new & 0xFF) | ((new >> 12) & 0xF_FF00),
    )
}

/// The data segments of sorted extents, clipped to `size_bytes`;
/// uninitialised extents are holes, physically contiguous neighbours are
/// merged, and extents that overlap are corruption.
fn extent_segments(
    number: u32,
    size_bytes: u64,
    block_size: u64,
    extents: &[FileExtent],
) -> Result<Vec<Segment>, Ext4Error> {
    let mut out: Vec<Segment> = Vec::new();
    let mut end_block = 0u64;
    for extent in extents {
        if extent.logical_block < end_block {
            return Err(corrupt(format!(
                "inode {number}: extents overlap at logical block {}",
                extent.logical_block
            )));
        }
        end_block = extent.logical_block + extent.block_count;
        let offset_bytes = extent.logical_block * block_size;
        if extent.uninitialized || extent.block_count == 0 || offset_bytes >= size_bytes {
            continue;
        }
        let length_bytes = (extent.block_count * block_size).min(size_bytes - offset_bytes);
        let device_bytes = extent.physical_block * block_size;
        if let Some(last) = out.last_mut()
            && let SegmentSource::Device { offset_bytes: at } = last.source
            && last.end_bytes() == offset_bytes
            && at + last.length_bytes == device_bytes
        {
            last.length_bytes += length_bytes;
            continue;
        }
        out.push(Segment {
            offset_bytes,
            length_bytes,
            source: SegmentSource::Device {
                offset_bytes: device_bytes,
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extent(logical_block: u64, physical_block: u64, block_count: u64) -> FileExtent {
        FileExtent {
            logical_block,
            physical_block,
            block_count,
            uninitialized: false,
        }
    }

    fn device(offset_bytes: u64, length_bytes: u64, at: u64) -> Segment {
        Segment {
            offset_bytes,
            length_bytes,
            source: SegmentSource::Device { offset_bytes: at },
        }
    }

    #[test]
    fn extents_become_segments_merged_clipped_and_with_holes() {
        let mut unwritten = extent(6, 300, 2);
        unwritten.uninitialized = true;
        let extents = [
            extent(0, 100, 2),
            extent(2, 102, 1), // contiguous on both sides: merged
            extent(4, 200, 1), // after a hole
            unwritten,
            extent(9, 400, 4), // past the size after 1.5 blocks
            extent(20, 500, 1),
        ];
        let segments = extent_segments(7, 10 * 1024 + 512, 1024, &extents).unwrap();
        assert_eq!(
            segments,
            vec![
                device(0, 3 * 1024, 100 * 1024),
                device(4 * 1024, 1024, 200 * 1024),
                device(9 * 1024, 1024 + 512, 400 * 1024),
            ]
        );
    }

    #[test]
    fn overlapping_extents_are_corrupt() {
        let extents = [extent(0, 100, 4), extent(3, 200, 1)];
        assert!(matches!(
            extent_segments(7, 1 << 20, 1024, &extents),
            Err(Ext4Error::Corrupt(_))
        ));
    }

    #[test]
    fn data_ranges_join_segments_that_touch_in_the_file() {
        let layout = FileLayout {
            number: 7,
            size_bytes: 10_000,
            segments: vec![
                device(0, 100, 5000),
                device(100, 50, 9000),
                device(400, 1, 0),
            ],
            inline_bytes: Vec::new(),
        };
        assert_eq!(layout.data_ranges(), vec![(0, 150), (400, 1)]);
        assert_eq!(layout.data_bytes(), 151);
    }

    #[test]
    fn device_numbers_read_both_encodings() {
        let mut area = [0u8; 60];
        area[..4].copy_from_slice(&0x0801u32.to_le_bytes()); // old: 8:1
        assert_eq!(device_numbers(&area), (8, 1));
        area[..4].fill(0);
        // new_encode_dev(259, 70000): minor low 8 bits, major, minor high.
        let (major, minor) = (259u32, 70_000u32);
        let new = (minor & 0xFF) | (major << 8) | ((minor & !0xFF) << 12);
        area[4..8].copy_from_slice(&new.to_le_bytes());
        assert_eq!(device_numbers(&area), (major, minor));
    }
}
