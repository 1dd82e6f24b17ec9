//! A replica: a raw sparse image file that holds a copy of the source disk
//! as of one checkpoint, and its record `PATH.blockwatch-replica`.
//!
//! The record names the source (the tracker's image id), the sizes, the
//! checkpoint the replica holds and the replica file's size and mtime
//! after the copy. It is one JSON line and a `crc32c HEX` line over it,
//! written aside, synced and renamed over the old one only after the
//! replica's data is synced: that rename is the commit. An interrupted
//! copy leaves the old record, so the next run starts from the old
//! checkpoint again. A replica whose size or mtime differ from its record
//! was changed by someone else, and a replica without a record may hold
//! someone's data: both are refused unless the user asks for a full copy.
//!
//! `PATH.blockwatch-replica.lock` (flock) keeps two copies from writing
//! one replica at once.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::durability::{Step, step};

/// The record's format version.
pub const RECORD_FORMAT: u32 = 1;
/// Longest record file accepted (it is one short JSON line).
const RECORD_BYTES_MAX: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("replica {path}")]
    Io { path: PathBuf, source: io::Error },
    #[error("replica {path} is being written by another copy; try again when it is done")]
    Busy { path: PathBuf },
    #[error(
        "replica {path} is in use (locked): a blockwatch server serves it; stop the server or copy elsewhere"
    )]
    InUse { path: PathBuf },
    #[error("replica record {path} is damaged ({reason}); copy again with --full")]
    DamagedRecord { path: PathBuf, reason: String },
}

/// What a replica holds, as its last committed copy left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub format: u32,
    /// The source's tracker identity (hex).
    pub image_id: String,
    pub source_size_bytes: u64,
    pub granularity_bytes: u64,
    /// The checkpoint whose contents the replica holds.
    pub checkpoint: String,
    pub generation: u64,
    pub copied_unix_seconds: u64,
    /// The replica file after the copy: a different size or mtime later
    /// means someone else wrote it.
    pub replica_size_bytes: u64,
    pub replica_mtime_seconds: i64,
    pub replica_mtime_nanoseconds: i64,
}

impl ReplicaRecord {
    /// Whether the replica file still looks as this record left it.
    pub fn matches_file(&self, metadata: &std::fs::Metadata) -> bool {
        metadata.len() == self.replica_size_bytes
            && metadata.mtime() == self.replica_mtime_seconds
            && metadata.mtime_nsec() == self.replica_mtime_nanoseconds
    }
}

pub fn record_path(replica: &Path) -> PathBuf {
    let mut name = replica.file_name().unwrap_or_default().to_os_string();
    name.push(".blockwatch-replica");
    replica.with_file_name(name)
}

/// The record of `replica`: None when there is none.
pub fn read_record(replica: &Path) -> Result<Option<ReplicaRecord>, ReplicaError> {
    let path = record_path(replica);
    let Some(record) = read_checked::<ReplicaRecord>(&path)? else {
        return Ok(None);
    };
    if record.format != RECORD_FORMAT {
        return Err(ReplicaError::DamagedRecord {
            path,
            reason: format!("format {} is not {RECORD_FORMAT}", record.format),
        });
    }
    Ok(Some(record))
}

/// A JSON line with a `crc32c HEX` line after it: None when the file
/// does not exist.
pub(crate) fn read_checked<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, ReplicaError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ReplicaError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let io_error = |source| ReplicaError::Io {
        path: path.to_path_buf(),
        source,
    };
    let damaged = |reason: String| ReplicaError::DamagedRecord {
        path: path.to_path_buf(),
        reason,
    };
    let length = file.metadata().map_err(io_error)?.len();
    if length > RECORD_BYTES_MAX {
        return Err(damaged(format!("{length} bytes, over {RECORD_BYTES_MAX}")));
    }
    let mut text = String::new();
    io::Read::read_to_string(&mut &file, &mut text).map_err(io_error)?;
    let (body, crc_line) = text
        .trim_end_matches('\n')
        .rsplit_once('\n')
        .ok_or_else(|| damaged("no checksum line".into()))?;
    let crc = crc_line
        .strip_prefix("crc32c ")
        .and_then(|hex| u32::from_str_radix(hex, 16).ok())
        .ok_or_else(|| damaged("no checksum line".into()))?;
    if crc32c::crc32c(body.as_bytes()) != crc {
        return Err(damaged("checksum mismatch".into()));
    }
    serde_json::from_str(body)
        .map(Some)
        .map_err(|error| damaged(error.to_string()))
}

/// The lock that keeps two copies from writing one replica.
#[derive(Debug)]
pub struct ReplicaLock {
    _file: File,
}

impl ReplicaLock {
    /// Takes the lock of `replica` (the file need not exist yet).
    pub fn acquire(replica: &Path) -> Result<ReplicaLock, ReplicaError> {
        let mut lock_name = record_path(replica).into_os_string();
        lock_name.push(".lock");
        ReplicaLock::acquire_file(replica, Path::new(&lock_name))
    }

    /// Takes the lock kept in `lock_name` for the target `target`.
    pub(crate) fn acquire_file(
        target: &Path,
        lock_name: &Path,
    ) -> Result<ReplicaLock, ReplicaError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(lock_name)
            .map_err(|source| ReplicaError::Io {
                path: lock_name.to_path_buf(),
                source,
            })?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(ReplicaError::Busy {
                path: target.to_path_buf(),
            });
        }
        Ok(ReplicaLock { _file: file })
    }
}

/// An open replica, locked against other copies.
#[derive(Debug)]
pub struct Replica {
    path: PathBuf,
    file: File,
    _lock: ReplicaLock,
    writeback: crate::stream_write::Writeback,
}

impl Replica {
    /// Opens (creating when missing) the replica under its lock, sized to
    /// `size_bytes` (a new one is sparse). Check the record before: this
    /// resizes whatever is there.
    pub fn open(path: &Path, size_bytes: u64, lock: ReplicaLock) -> Result<Replica, ReplicaError> {
        let io_error = |source| ReplicaError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = step(Step::Create(path), || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
        })
        .map_err(io_error)?;
        // A server serving the replica locks it (shared when read-only):
        // writing under it would change a disk its clients read.
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(ReplicaError::InUse {
                    path: path.to_path_buf(),
                });
            }
            tracing::debug!(path = %path.display(), %error, "writing the replica without a lock on it");
        }
        let metadata = file.metadata().map_err(io_error)?;
        if metadata.file_type().is_file() && metadata.len() != size_bytes {
            step(Step::Write(path), || file.set_len(size_bytes)).map_err(io_error)?;
        }
        Ok(Replica {
            path: path.to_path_buf(),
            file,
            _lock: lock,
            writeback: Default::default(),
        })
    }

    fn io_error(&self, source: io::Error) -> ReplicaError {
        ReplicaError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Writes `buf` (see `stream_write`: small calls, writeback started
    /// at once and finished behind, dropped from the page cache).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ReplicaError> {
        step(Step::Write(&self.path), || {
            self.writeback.write_at(&self.file, buf, offset)
        })
        .map_err(|error| self.io_error(error))
    }

    /// Makes a range read as zeroes, as a hole where the filesystem can.
    pub fn zero(&self, offset: u64, length: u64) -> Result<(), ReplicaError> {
        let (Ok(offset_signed), Ok(length_signed)) =
            (libc::off_t::try_from(offset), libc::off_t::try_from(length))
        else {
            return Err(self.io_error(io::Error::from(io::ErrorKind::InvalidInput)));
        };
        let punched = step(Step::Write(&self.path), || {
            // SAFETY: fallocate on a descriptor we own; no memory is passed.
            let result = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset_signed,
                    length_signed,
                )
            };
            Ok(result == 0)
        })
        .map_err(|error| self.io_error(error))?;
        if punched {
            return Ok(());
        }
        crate::stream_write::write_zeroes(offset, length, |at, zeroes| self.write_at(zeroes, at))
    }

    /// Makes every write and the file's size durable (not its mtime).
    pub fn sync(&self) -> Result<(), ReplicaError> {
        step(
            Step::Sync {
                path: &self.path,
                all: false,
            },
            || self.file.sync_data(),
        )
        .map_err(|error| self.io_error(error))
    }

    /// Makes every write durable and the file's metadata with it: the
    /// mtime a record names must be the one a crash leaves, and
    /// `fdatasync` need not write an mtime (ext4 and XFS do not when
    /// only the timestamps changed, as when an incremental overwrites
    /// allocated blocks).
    pub fn sync_all(&self) -> Result<(), ReplicaError> {
        step(
            Step::Sync {
                path: &self.path,
                all: true,
            },
            || self.file.sync_all(),
        )
        .map_err(|error| self.io_error(error))
    }

    pub fn metadata(&self) -> Result<std::fs::Metadata, ReplicaError> {
        self.file.metadata().map_err(|error| self.io_error(error))
    }

    /// Commits `record`: after this returns, the replica holds its
    /// checkpoint. Call after `sync_all`.
    pub fn commit(&self, record: &ReplicaRecord) -> Result<(), ReplicaError> {
        write_record(&self.path, record)
    }
}

/// Writes the record of `replica` aside, syncs it and renames it over the
/// old one (the commit), then syncs the directory.
pub fn write_record(replica: &Path, record: &ReplicaRecord) -> Result<(), ReplicaError> {
    write_checked(&record_path(replica), record)
}

/// Writes `value` as a JSON line and its `crc32c` line, atomically: aside,
/// synced, renamed over `path`, directory synced.
pub(crate) fn write_checked(path: &Path, value: &impl Serialize) -> Result<(), ReplicaError> {
    let io_error = |source| ReplicaError::Io {
        path: path.to_path_buf(),
        source,
    };
    let body = serde_json::to_string(value).expect("a record serializes");
    let text = format!("{body}\ncrc32c {:08x}\n", crc32c::crc32c(body.as_bytes()));
    write_aside(path, text.as_bytes()).map_err(io_error)
}

/// Writes `bytes` to `path` atomically: aside, synced, renamed over it,
/// directory synced.
fn write_aside(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut temporary = path.as_os_str().to_os_string();
    temporary.push(".new");
    let temporary = PathBuf::from(temporary);
    let mut file = step(Step::Create(&temporary), || {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
    })?;
    step(Step::Write(&temporary), || file.write_all(bytes))?;
    let sync = Step::Sync {
        path: &temporary,
        all: true,
    };
    step(sync, || file.sync_all())?;
    let rename = Step::Rename {
        from: &temporary,
        to: path,
    };
    step(rename, || std::fs::rename(&temporary, path))?;
    sync_parent(path)
}

/// Makes the names in `path`'s directory durable.
pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    let directory = path.parent().filter(|p| !p.as_os_str().is_empty());
    let directory = directory.unwrap_or(Path::new("."));
    step(Step::SyncDirectory(directory), || {
        File::open(directory).and_then(|dir| dir.sync_all())
    })
}

/// Whether the file at `path` reads as zeroes everywhere: its data
/// extents (`SEEK_DATA`; a file system without it shows the whole file
/// as data) hold only zero bytes. Stops at the first byte that is not.
pub(crate) fn reads_as_zeroes(path: &Path) -> io::Result<bool> {
    let file = File::open(path)?;
    let end = file.metadata()?.len();
    let mut buffer = vec![0u8; 1 << 20];
    let mut position = 0u64;
    while position < end {
        let Some(data) = seek(&file, position, libc::SEEK_DATA)? else {
            return Ok(true);
        };
        let data_end = seek(&file, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        let mut offset = data;
        while offset < data_end {
            let piece = (data_end - offset).min(buffer.len() as u64) as usize;
            file.read_exact_at(&mut buffer[..piece], offset)?;
            if buffer[..piece].iter().any(|&byte| byte != 0) {
                return Ok(false);
            }
            offset += piece as u64;
        }
        position = data_end;
    }
    Ok(true)
}

/// `lseek(offset, whence)`: None at ENXIO (no data from there on).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if found >= 0 {
        return Ok(Some(found as u64));
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        _ => Err(error),
    }
}

/// Where an interrupted copy to `replica` left its progress.
pub fn partial_path(replica: &Path) -> PathBuf {
    let mut name = record_path(replica).into_os_string();
    name.push(".partial");
    PathBuf::from(name)
}

/// Bytes a progress record takes: reserved by its first write, then
/// overwritten in place, so that a copy stopped by a full file system can
/// still record how far it got.
const PARTIAL_RECORD_BYTES: usize = 4096;

/// Writes a progress record (JSON, its `crc32c` line, newlines up to
/// `PARTIAL_RECORD_BYTES`), the first one aside and renamed, later ones
/// in place, and syncs it. An overwrite torn by a crash fails its
/// checksum: the next copy then starts over, a full one
/// (`target::Interrupted::Torn`).
pub(crate) fn write_partial(replica: &Path, value: &impl Serialize) -> Result<(), ReplicaError> {
    let path = partial_path(replica);
    let io_error = |source| ReplicaError::Io {
        path: path.clone(),
        source,
    };
    let body = serde_json::to_string(value).expect("a record serializes");
    let mut text = format!("{body}\ncrc32c {:08x}\n", crc32c::crc32c(body.as_bytes())).into_bytes();
    if text.len() > PARTIAL_RECORD_BYTES {
        return Err(io_error(io::Error::other("a progress record over 4 KiB")));
    }
    text.resize(PARTIAL_RECORD_BYTES, b'\n');
    // The first one is written aside and renamed, so that it is never
    // seen torn: a progress record that fails its checksum is then an
    // overwrite a power cut tore, after the copy wrote the replica.
    if !path.exists() {
        return write_aside(&path, &text).map_err(io_error);
    }
    let file = OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(io_error)?;
    step(Step::Write(&path), || file.write_all_at(&text, 0)).map_err(io_error)?;
    let sync = Step::Sync {
        path: &path,
        all: true,
    };
    step(sync, || file.sync_all()).map_err(io_error)
}

/// Removes the progress of an interrupted copy (the copy finished).
pub(crate) fn remove_partial(replica: &Path) -> Result<(), ReplicaError> {
    let path = partial_path(replica);
    match step(Step::Remove(&path), || std::fs::remove_file(&path)) {
        Ok(()) => sync_parent(&path).map_err(|source| ReplicaError::Io { path, source }),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ReplicaError::Io { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ReplicaRecord {
        ReplicaRecord {
            format: RECORD_FORMAT,
            image_id: "00ff".into(),
            source_size_bytes: 1 << 20,
            granularity_bytes: 65536,
            checkpoint: "copy-1".into(),
            generation: 3,
            copied_unix_seconds: 9,
            replica_size_bytes: 1 << 20,
            replica_mtime_seconds: 1,
            replica_mtime_nanoseconds: 2,
        }
    }

    #[test]
    fn a_committed_record_reads_back_and_a_flipped_byte_is_refused() {
        let dir = std::env::temp_dir().join(format!("replica-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("copy.img");
        assert_eq!(read_record(&path).unwrap(), None);
        let replica = Replica::open(&path, 1 << 20, ReplicaLock::acquire(&path).unwrap()).unwrap();
        assert!(matches!(
            ReplicaLock::acquire(&path),
            Err(ReplicaError::Busy { .. })
        ));
        replica.commit(&record()).unwrap();
        assert_eq!(read_record(&path).unwrap(), Some(record()));
        let mut bytes = std::fs::read(record_path(&path)).unwrap();
        bytes[10] ^= 1;
        std::fs::write(record_path(&path), &bytes).unwrap();
        assert!(matches!(
            read_record(&path),
            Err(ReplicaError::DamagedRecord { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
