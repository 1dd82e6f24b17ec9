//! Positioned reads of a disk, and the two views the map reads through:
//! a `Slice` (one partition of a disk) and an `Overlay` (the filesystem as
//! its jbd2 journal says it is, with committed blocks replaced).

use std::collections::BTreeMap;
use std::io;

/// Positioned reads of the device or image holding the filesystem.
pub trait ReadAt {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl<R: ReadAt + ?Sized> ReadAt for &R {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

impl<R: ReadAt + ?Sized> ReadAt for std::sync::Arc<R> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

/// An image held in memory (tests, fuzzing). Reads past the end fail with
/// `UnexpectedEof`, as a file's would.
#[derive(Debug, Clone)]
pub struct Bytes(pub Vec<u8>);

impl ReadAt for Bytes {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        let slice = self.0.get(start..end).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(slice);
        Ok(())
    }
}

/// `length_bytes` of `inner` starting at `start_bytes`: one partition.
#[derive(Debug, Clone)]
pub struct Slice<R> {
    pub inner: R,
    pub start_bytes: u64,
    pub length_bytes: u64,
}

impl<R: ReadAt> ReadAt for Slice<R> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        if end > self.length_bytes {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.inner.read_exact_at(buf, self.start_bytes + offset)
    }
}

/// Where the newest committed copy of a filesystem block lives in the
/// journal, as jbd2 replay found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replacement {
    /// Byte offset of the copy on the device (inside the journal).
    pub offset_bytes: u64,
    /// The block began with the jbd2 magic, which the journal stores
    /// zeroed ("escaped"); replay puts the magic back.
    pub escaped: bool,
}

/// The jbd2 magic number, big-endian on disk.
pub const JBD2_MAGIC: u32 = 0xC03B_3998;

/// The filesystem as its journal says it is: reads of a replaced block come
/// from the journal's copy; every other read goes to the device.
#[derive(Debug, Clone)]
pub struct Overlay<R> {
    pub inner: R,
    pub block_size: u64,
    /// Filesystem block number -> its newest committed copy.
    pub replaced: BTreeMap<u64, Replacement>,
}

impl<R: ReadAt> ReadAt for Overlay<R> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.replaced.is_empty() {
            return self.inner.read_exact_at(buf, offset);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let block = at / self.block_size;
            let within = at % self.block_size;
            let take = ((self.block_size - within) as usize).min(buf.len() - done);
            let part = &mut buf[done..done + take];
            match self.replaced.get(&block) {
                Some(copy) => {
                    self.inner.read_exact_at(part, copy.offset_bytes + within)?;
                    if copy.escaped && within < 4 {
                        let magic = JBD2_MAGIC.to_be_bytes();
                        for (index, byte) in part.iter_mut().enumerate() {
                            let position = within as usize + index;
                            if position >= 4 {
                                break;
                            }
                            *byte = magic[position];
                        }
                    }
                }
                None => self.inner.read_exact_at(part, at)?,
            }
            done += take;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overlay_reads_replaced_blocks_from_the_journal_and_unescapes_them() {
        let mut disk = vec![0u8; 8 * 1024];
        disk[1024..2048].fill(1); // block 1 in place
        disk[6 * 1024..7 * 1024].fill(6); // the journal's copy of block 1
        disk[7 * 1024..8 * 1024].fill(7); // an escaped copy of block 2
        let mut replaced = BTreeMap::new();
        replaced.insert(
            1,
            Replacement {
                offset_bytes: 6 * 1024,
                escaped: false,
            },
        );
        replaced.insert(
            2,
            Replacement {
                offset_bytes: 7 * 1024,
                escaped: true,
            },
        );
        let overlay = Overlay {
            inner: Bytes(disk),
            block_size: 1024,
            replaced,
        };
        let mut buf = vec![0u8; 3 * 1024];
        overlay.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..1024].iter().all(|&b| b == 0));
        assert!(buf[1024..2048].iter().all(|&b| b == 6));
        assert_eq!(&buf[2048..2052], &JBD2_MAGIC.to_be_bytes());
        assert!(buf[2052..].iter().all(|&b| b == 7));
        let mut tail = [0u8; 3];
        overlay.read_exact_at(&mut tail, 2049).unwrap();
        assert_eq!(tail, [0x3B, 0x39, 0x98]);
    }

    #[test]
    fn a_slice_refuses_reads_past_its_end() {
        let slice = Slice {
            inner: Bytes(vec![5u8; 4096]),
            start_bytes: 1024,
            length_bytes: 2048,
        };
        let mut buf = [0u8; 16];
        slice.read_exact_at(&mut buf, 2032).unwrap();
        assert!(slice.read_exact_at(&mut buf, 2040).is_err());
    }
}
