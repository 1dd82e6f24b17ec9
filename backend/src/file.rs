//! The raw-file backend: a regular file (sparse-aware) or a block device.
//!
//! Positioned I/O only (`pread`/`pwrite` families), so any number of threads
//! share one descriptor without a lock. Reads first try `preadv2(RWF_NOWAIT)`
//! so that cached data is served on the connection's thread and only cache
//! misses go to a blocking thread. TRIM and WRITE_ZEROES punch holes or zero
//! ranges with `fallocate`; extents come from `SEEK_DATA`/`SEEK_HOLE`.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::block_backend::{
    BlockBackend, Extent, STATE_HOLE, STATE_ZERO, ZeroError, ZeroRequest, push_extent,
    write_zero_buffers,
};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open {path}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is neither a regular file nor a block device")]
    NotAFileOrDevice { path: PathBuf },
    #[error(
        "{path} is in use by another process (it holds a lock on it); stop that process or serve a copy"
    )]
    Locked { path: PathBuf },
    #[error("cannot read the size of {path}")]
    Size { path: PathBuf, source: io::Error },
}

#[derive(Debug)]
pub struct FileBackend {
    file: File,
    path: PathBuf,
    size_bytes: u64,
    read_only: bool,
    seek_data_works: bool,
    /// The file lives in memory (tmpfs, ramfs): a read never waits for a
    /// device, and tmpfs refuses RWF_NOWAIT with EOPNOTSUPP, which would
    /// otherwise send every read to the blocking pool.
    in_memory: bool,
}

impl FileBackend {
    /// The server checked every range against the export's size before
    /// calling in; a range past the end here is a bug in a layer above.
    fn debug_assert_in_range(&self, offset: u64, length: u64) {
        debug_assert!(
            offset
                .checked_add(length)
                .is_some_and(|end| end <= self.size_bytes),
            "range {offset}+{length} past the backend's {} bytes",
            self.size_bytes
        );
    }

    /// Opens `path` for serving and takes an advisory lock on it (shared when
    /// read-only, exclusive otherwise) so that two servers never write one image.
    pub fn open(path: &Path, read_only: bool) -> Result<FileBackend, OpenError> {
        let file_type = std::fs::metadata(path)
            .map_err(|source| OpenError::Open {
                path: path.to_owned(),
                source,
            })?
            .file_type();
        if !file_type.is_file() && !file_type.is_block_device() {
            return Err(OpenError::NotAFileOrDevice {
                path: path.to_owned(),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| OpenError::Open {
                path: path.to_owned(),
                source,
            })?;
        let metadata = file.metadata().map_err(|source| OpenError::Open {
            path: path.to_owned(),
            source,
        })?;
        let is_block_device = metadata.file_type().is_block_device();
        let lock = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            return Err(OpenError::Locked {
                path: path.to_owned(),
            });
        }
        let size_bytes = if is_block_device {
            (&file)
                .seek(SeekFrom::End(0))
                .map_err(|source| OpenError::Size {
                    path: path.to_owned(),
                    source,
                })?
        } else {
            metadata.len()
        };
        // SEEK_DATA answers ENXIO on a file with no data at all: that still works.
        let seek_data_works = !is_block_device
            && match lseek(&file, 0, libc::SEEK_DATA) {
                Ok(_) => true,
                Err(e) => e.raw_os_error() == Some(libc::ENXIO),
            };
        let in_memory = is_in_memory(&file);
        Ok(FileBackend {
            file,
            path: path.to_owned(),
            size_bytes,
            read_only,
            seek_data_works,
            in_memory,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                length as libc::off_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn sync_if(&self, fua: bool) -> io::Result<()> {
        if fua { self.file.sync_data() } else { Ok(()) }
    }
}

fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek on a descriptor we own. SEEK_DATA/SEEK_HOLE results do
    // not depend on the shared file position, which positioned I/O ignores.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as u64)
    }
}

/// Whether the file's filesystem keeps its data in memory (tmpfs, ramfs).
/// A tmpfs page may be swapped out, and its read then waits for the swap
/// device: rare on a server, and no worse than the pool's thread would do.
fn is_in_memory(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs fills the struct for a descriptor we own.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), stat.as_mut_ptr()) };
    if rc != 0 {
        return false;
    }
    // SAFETY: fstatfs succeeded, so the struct is initialised.
    // f_type is a long on x86_64 and narrower on some other targets.
    #[allow(clippy::unnecessary_cast)]
    let kind = unsafe { stat.assume_init() }.f_type as i64;
    kind == TMPFS_MAGIC || kind == RAMFS_MAGIC
}

fn is_unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

/// One `preadv2`/`pwritev2` call on a single buffer.
fn rw2(
    file: &File,
    write: bool,
    ptr: *mut u8,
    len: usize,
    offset: u64,
    flags: libc::c_int,
) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: ptr.cast(),
        iov_len: len,
    };
    // SAFETY: `iov` describes `len` bytes at `ptr`, which the callers derive
    // from a live slice of at least that length, borrowed for this call.
    let rc = unsafe {
        if write {
            libc::pwritev2(file.as_raw_fd(), &iov, 1, offset as libc::off_t, flags)
        } else {
            libc::preadv2(file.as_raw_fd(), &iov, 1, offset as libc::off_t, flags)
        }
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

impl BlockBackend for FileBackend {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn extents_are_slow(&self) -> bool {
        self.in_memory
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn can_multi_conn(&self) -> bool {
        // Every connection shares this descriptor and fdatasync covers all of
        // its dirty pages, so a FLUSH on one connection persists them all.
        true
    }
    fn can_trim(&self) -> bool {
        !self.read_only
    }
    fn can_fast_zero(&self) -> bool {
        !self.read_only
    }
    fn can_cache(&self) -> bool {
        true
    }
    fn can_extents(&self) -> bool {
        self.seek_data_works
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.debug_assert_in_range(offset, buf.len() as u64);
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    // The file shrank under us: what is gone reads as zeroes.
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn read_through_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(&self.file))
    }

    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        self.debug_assert_in_range(offset, buf.len() as u64);
        if self.in_memory {
            self.read_at(buf, offset)?;
            return Ok(true);
        }
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            match rw2(
                &self.file,
                false,
                rest.as_mut_ptr(),
                rest.len(),
                offset + done as u64,
                libc::RWF_NOWAIT,
            ) {
                Ok(0) => {
                    rest.fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.raw_os_error() == Some(libc::EOPNOTSUPP) =>
                {
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.debug_assert_in_range(offset, buf.len() as u64);
        debug_assert!(
            !self.read_only,
            "the server refuses writes to a read-only export"
        );
        if !fua {
            return self.file.write_all_at(buf, offset);
        }
        // RWF_DSYNC syncs just this write's range in the same call.
        let mut done = 0;
        while done < buf.len() {
            let rest = &buf[done..];
            match rw2(
                &self.file,
                true,
                rest.as_ptr().cast_mut(),
                rest.len(),
                offset + done as u64,
                libc::RWF_DSYNC,
            ) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.debug_assert_in_range(offset, length);
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            length,
        ) {
            Ok(()) => self.sync_if(fua),
            // TRIM is advisory: a filesystem that cannot punch holes just keeps the data.
            Err(e) if is_unsupported(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        request: ZeroRequest,
    ) -> Result<(), ZeroError> {
        self.debug_assert_in_range(offset, length);
        let mut modes = Vec::with_capacity(2);
        if request.may_trim {
            modes.push(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE);
        }
        modes.push(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE);
        for mode in modes {
            match self.fallocate(mode, offset, length) {
                Ok(()) => return Ok(self.sync_if(request.fua)?),
                Err(e) if is_unsupported(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if request.fast_only {
            return Err(ZeroError::NotFast);
        }
        write_zero_buffers(self, offset, length, request.fua)?;
        Ok(())
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: posix_fadvise on a descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                length as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    fn extents(
        &self,
        offset: u64,
        length: u64,
        max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        if !self.seek_data_works {
            out.push(Extent {
                length_bytes: length,
                flags: 0,
            });
            return Ok(());
        }
        let end = offset.saturating_add(length).min(self.size_bytes);
        let mut position = offset;
        let first = out.len();
        while position < end && out.len() - first < max_extents {
            let data_start = match lseek(&self.file, position, libc::SEEK_DATA) {
                Ok(data_start) => data_start,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                Err(e) => return Err(e),
            };
            let (next, flags) = if data_start > position {
                (data_start.min(end), STATE_HOLE | STATE_ZERO)
            } else {
                let hole_start = lseek(&self.file, position, libc::SEEK_HOLE)?;
                (hole_start.min(end).max(position + 1), 0)
            };
            push_extent(out, first, next - position, flags);
            position = next;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse_file(size: u64) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.path.join("disk.img");
        let file = File::create(&path).unwrap();
        file.set_len(size).unwrap();
        (dir, path)
    }

    mod tempdir {
        pub struct Dir {
            pub path: std::path::PathBuf,
        }
        impl Dir {
            pub fn new() -> Dir {
                Dir::new_in(&std::env::temp_dir()).unwrap()
            }
            pub fn new_in(base: &std::path::Path) -> std::io::Result<Dir> {
                let path = base.join(format!(
                    "nbd-file-test-{}-{}",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_nanos()
                ));
                std::fs::create_dir_all(&path)?;
                Ok(Dir { path })
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.path);
            }
        }
    }

    #[test]
    fn extents_follow_written_data_and_holes() {
        let (_dir, path) = sparse_file(8 << 20);
        let backend = FileBackend::open(&path, false).unwrap();
        assert!(backend.can_extents());
        backend.write_at(&[0xab; 1 << 20], 2 << 20, false).unwrap();
        let mut out = Vec::new();
        backend.extents(0, 8 << 20, 1000, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                Extent {
                    length_bytes: 2 << 20,
                    flags: STATE_HOLE | STATE_ZERO
                },
                Extent {
                    length_bytes: 1 << 20,
                    flags: 0
                },
                Extent {
                    length_bytes: 5 << 20,
                    flags: STATE_HOLE | STATE_ZERO
                },
            ]
        );
    }

    #[test]
    fn write_zeroes_reads_back_zero_and_fast_zero_is_honest() {
        let (_dir, path) = sparse_file(4 << 20);
        let backend = FileBackend::open(&path, false).unwrap();
        backend.write_at(&[0xcd; 1 << 20], 0, false).unwrap();
        backend
            .write_zeroes(
                4096,
                65536,
                ZeroRequest {
                    may_trim: false,
                    fast_only: true,
                    fua: true,
                },
            )
            .unwrap();
        let mut buf = vec![0xffu8; 1 << 20];
        backend.read_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0xcd));
        assert!(buf[4096..4096 + 65536].iter().all(|&b| b == 0));
        assert!(buf[4096 + 65536..].iter().all(|&b| b == 0xcd));
    }

    #[test]
    fn second_writer_is_refused_by_the_lock() {
        let (_dir, path) = sparse_file(1 << 20);
        let _first = FileBackend::open(&path, false).unwrap();
        assert!(matches!(
            FileBackend::open(&path, false),
            Err(OpenError::Locked { .. })
        ));
    }

    #[test]
    fn nowait_read_serves_cached_data() {
        let (_dir, path) = sparse_file(1 << 20);
        let backend = FileBackend::open(&path, false).unwrap();
        backend.write_at(&[7; 4096], 8192, false).unwrap();
        let mut buf = [0u8; 4096];
        assert!(backend.read_at_nowait(&mut buf, 8192).unwrap());
        assert_eq!(buf, [7; 4096]);
    }

    /// tmpfs refuses RWF_NOWAIT (EOPNOTSUPP); its reads never wait for a
    /// device, so they are served at once rather than sent to the pool.
    #[test]
    fn nowait_read_on_tmpfs_is_served_at_once() {
        let Ok(dir) = tempdir::Dir::new_in(Path::new("/dev/shm")) else {
            eprintln!("skipped: no /dev/shm to create a file in");
            return;
        };
        let path = dir.path.join("disk.img");
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let backend = FileBackend::open(&path, false).unwrap();
        if !backend.in_memory {
            eprintln!("skipped: /dev/shm is not tmpfs here");
            return;
        }
        assert!(
            backend.extents_are_slow(),
            "SEEK_HOLE walks tmpfs to its end"
        );
        backend.write_at(&[9; 4096], 4096, false).unwrap();
        let mut buf = [0u8; 8192];
        assert!(backend.read_at_nowait(&mut buf, 0).unwrap());
        assert_eq!(buf[..4096], [0; 4096]);
        assert_eq!(buf[4096..], [9; 4096]);
    }
}
