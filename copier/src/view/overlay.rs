//! Writes over a backup kept in a file of their own: a VM runs from its
//! backup (or a user repairs a filesystem in it) while the backup stays
//! exactly as it was. The overlay file is sparse, as large as the disk;
//! a 4 KiB block the client wrote is allocated in it and read from it,
//! every other block is read from the backup. A write of part of a block
//! first copies the rest of that block from the backup, so a block is
//! always wholly the overlay's or wholly the backup's. A record beside
//! the file (`FILE.blockwatch-overlay`) names the backup and checkpoint
//! it was made over, so it is never laid over another one.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use backend::{BlockBackend, Extent, ZeroError, ZeroRequest};

use super::{BackupView, ViewError};

const BLOCK_BYTES: u64 = 4096;
/// Locks that serialise copy-ins of partly written blocks, by block.
const STRIPES: usize = 64;

pub struct Overlay {
    view: BackupView,
    path: PathBuf,
    file: File,
    /// One bit per block: written by the client (so read from the file).
    written: Vec<AtomicU64>,
    stripes: Vec<Mutex<()>>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("path", &self.path)
            .field("view", &self.view)
            .finish_non_exhaustive()
    }
}

fn io_error(path: &Path, source: io::Error) -> ViewError {
    ViewError::Io {
        what: format!("overlay {}", path.display()),
        source,
    }
}

pub fn record_path(overlay: &Path) -> PathBuf {
    let mut name = overlay.file_name().unwrap_or_default().to_os_string();
    name.push(".blockwatch-overlay");
    overlay.with_file_name(name)
}

impl Overlay {
    /// Opens (or creates) the overlay `path` over `view`. An existing one
    /// must have been made over the same backup at the same checkpoint.
    pub fn open(path: &Path, view: BackupView) -> Result<Overlay, ViewError> {
        let size_bytes = view.size_bytes();
        let record = format!(
            "blockwatch overlay 1\nbackup {}\ncheckpoint {}\nsession {}\nsize {size_bytes}\n",
            view.description,
            view.checkpoint,
            view.session.as_deref().unwrap_or("-")
        );
        let record_file = record_path(path);
        let exists = path.exists();
        if exists {
            let held = std::fs::read_to_string(&record_file).map_err(|_| {
                ViewError::Refused(format!(
                    "overlay {} exists without its record {}: it may belong to another backup; give a new file",
                    path.display(),
                    record_file.display()
                ))
            })?;
            if held != record {
                return Err(ViewError::Refused(format!(
                    "overlay {} was made over another backup or checkpoint ({}); give a new file",
                    path.display(),
                    held.lines().skip(1).collect::<Vec<_>>().join(", ")
                )));
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| io_error(path, source))?;
        check_block_size(&file).map_err(|source| io_error(path, source))?;
        if !exists {
            file.set_len(size_bytes)
                .map_err(|source| io_error(path, source))?;
            std::fs::write(&record_file, &record)
                .map_err(|source| io_error(&record_file, source))?;
        }
        let length = file
            .metadata()
            .map_err(|source| io_error(path, source))?
            .len();
        if length != size_bytes {
            return Err(ViewError::Refused(format!(
                "overlay {} is {length} bytes, the backup's disk {size_bytes}",
                path.display()
            )));
        }
        let blocks = size_bytes.div_ceil(BLOCK_BYTES);
        let written: Vec<AtomicU64> = (0..blocks.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        let overlay = Overlay {
            view,
            path: path.to_path_buf(),
            file,
            written,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        };
        overlay
            .load_written(size_bytes)
            .map_err(|source| io_error(path, source))?;
        Ok(overlay)
    }

    /// Marks the blocks an earlier run wrote: those allocated in the file.
    fn load_written(&self, size_bytes: u64) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let mut position = 0i64;
        while (position as u64) < size_bytes {
            // SAFETY: lseek on a descriptor this struct owns.
            let data = unsafe { libc::lseek(fd, position, libc::SEEK_DATA) };
            if data < 0 {
                let error = io::Error::last_os_error();
                if error.raw_os_error() == Some(libc::ENXIO) {
                    break;
                }
                return Err(error);
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(io::Error::last_os_error());
            }
            let first = data as u64 / BLOCK_BYTES;
            let end = (hole as u64).div_ceil(BLOCK_BYTES);
            for block in first..end {
                self.mark(block);
            }
            position = hole;
        }
        Ok(())
    }

    fn is_written(&self, block: u64) -> bool {
        self.written[(block / 64) as usize].load(Ordering::Acquire) & (1 << (block % 64)) != 0
    }

    /// Whether any block of `first..last` is written, a word at a time.
    fn any_written(&self, first: u64, last: u64) -> bool {
        let mut block = first;
        while block < last {
            if block % 64 == 0 && block + 64 <= last {
                if self.written[(block / 64) as usize].load(Ordering::Acquire) != 0 {
                    return true;
                }
                block += 64;
            } else {
                if self.is_written(block) {
                    return true;
                }
                block += 1;
            }
        }
        false
    }

    fn mark(&self, block: u64) {
        self.written[(block / 64) as usize].fetch_or(1 << (block % 64), Ordering::Release);
    }

    /// Writes part of one block: the rest comes from the backup the first
    /// time, under the block's stripe lock.
    fn write_partial(&self, block: u64, within: usize, bytes: &[u8]) -> io::Result<()> {
        let _guard = self.stripes[(block % STRIPES as u64) as usize]
            .lock()
            .expect("stripe lock");
        let start = block * BLOCK_BYTES;
        if self.is_written(block) {
            return self.file.write_all_at(bytes, start + within as u64);
        }
        let length = BLOCK_BYTES.min(self.view.size_bytes() - start) as usize;
        let mut whole = vec![0u8; length];
        self.view.read_at(&mut whole, start)?;
        whole[within..within + bytes.len()].copy_from_slice(bytes);
        self.file.write_all_at(&whole, start)?;
        self.mark(block);
        Ok(())
    }
}

/// Blocks are told apart by the file's allocation, so the filesystem
/// holding it must allocate in 4 KiB blocks or smaller.
fn check_block_size(file: &File) -> io::Result<()> {
    // SAFETY: fstatvfs fills the struct it is given from a valid descriptor.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if stat.f_frsize as u64 > BLOCK_BYTES {
        return Err(io::Error::other(format!(
            "its filesystem allocates {}-byte blocks; put the overlay on one with 4 KiB blocks or smaller",
            stat.f_frsize
        )));
    }
    Ok(())
}

impl BlockBackend for Overlay {
    fn size_bytes(&self) -> u64 {
        self.view.size_bytes()
    }
    fn can_multi_conn(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut position = offset;
        while position < end {
            let written = self.is_written(position / BLOCK_BYTES);
            let mut run_end = ((position / BLOCK_BYTES + 1) * BLOCK_BYTES).min(end);
            while run_end < end && self.is_written(run_end / BLOCK_BYTES) == written {
                run_end = (run_end + BLOCK_BYTES).min(end);
            }
            let part = &mut buf[(position - offset) as usize..(run_end - offset) as usize];
            if written {
                self.file.read_exact_at(part, position)?;
            } else {
                self.view.read_at(part, position)?;
            }
            position = run_end;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut position = offset;
        while position < end {
            let block = position / BLOCK_BYTES;
            let block_start = block * BLOCK_BYTES;
            let block_end = (block_start + BLOCK_BYTES).min(self.size_bytes());
            let piece_end = block_end.min(end);
            let bytes = &buf[(position - offset) as usize..(piece_end - offset) as usize];
            if position == block_start && piece_end == block_end {
                self.file.write_all_at(bytes, position)?;
                self.mark(block);
            } else {
                self.write_partial(block, (position - block_start) as usize, bytes)?;
            }
            position = piece_end;
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        // Trimmed blocks stay the overlay's (as zeroes): a hole would let
        // the backup's old contents show through again.
        self.write_zeroes(
            offset,
            length,
            ZeroRequest {
                fua,
                ..ZeroRequest::default()
            },
        )
        .map_err(|error| match error {
            ZeroError::Io(error) => error,
            ZeroError::NotFast => io::Error::from_raw_os_error(libc::EOPNOTSUPP),
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        request: ZeroRequest,
    ) -> Result<(), ZeroError> {
        if request.fast_only {
            return Err(ZeroError::NotFast);
        }
        crate::stream_write::write_zeroes(offset, length, |at, zeroes| {
            self.write_at(zeroes, at, false)
        })?;
        if request.fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn extents(
        &self,
        offset: u64,
        length: u64,
        max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        let first = offset / BLOCK_BYTES;
        let last = (offset + length).div_ceil(BLOCK_BYTES);
        if self.any_written(first, last) {
            // Data, which is never wrong; the backup's holes show again
            // past the written blocks.
            out.push(Extent {
                length_bytes: length,
                flags: 0,
            });
            return Ok(());
        }
        self.view.extents(offset, length, max_extents, out)
    }
}
