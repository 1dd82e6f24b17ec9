//! Files and directory trees restored straight from a backup's view, as
//! they were at its checkpoint: contents (holes kept as holes), owner,
//! permissions, times, extended attributes, symlinks, hard links among the
//! files restored, device nodes and fifos. Nothing is mounted; every byte
//! comes through the view, so damage in the backup fails the restore with
//! the damage named instead of writing wrong contents.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use fsmap::disk::{DiskMap, MappedFs};
use fsmap::ext4::{Ext4, Ext4Error};
use fsmap::ext4::{FileKind, FileMeta};
use fsmap::read::{Overlay, Slice};
use serde::Serialize;

use super::lookup;
use crate::view::BackupView;

/// Bytes read from the view per call while copying a file out.
const COPY_CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FileRestoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("{path}: {source}")]
    Backup { path: String, source: Ext4Error },
    #[error("{}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Refused(String),
}

/// What a restore of files wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FileRestoreSummary {
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub hard_links: u64,
    pub special_files: u64,
    pub data_bytes: u64,
    /// Metadata that could not be applied here (an owner without root,
    /// xattrs the target filesystem does not take), each said once.
    pub warnings: Vec<String>,
}

type Fs<'a> = Ext4<Overlay<Slice<&'a BackupView>>>;

/// Restores each of `paths` (a file, or a directory and all it holds)
/// under `to`, at its own path: `/etc/fstab` becomes `TO/etc/fstab`.
/// Existing files are never overwritten.
pub fn restore_files(
    view: &BackupView,
    disk: &DiskMap,
    paths: &[String],
    to: &Path,
) -> Result<FileRestoreSummary, FileRestoreError> {
    let mut summary = FileRestoreSummary::default();
    let mut links: Vec<((u32, u32), PathBuf)> = Vec::new();
    for path in paths {
        let (mapped, number) = lookup(disk, path).map_err(FileRestoreError::NotFound)?;
        let fs = open(mapped, view, path)?;
        let inner = path
            .split_once(':')
            .filter(|(n, _)| n.parse::<u32>().is_ok())
            .map_or(path.as_str(), |(_, p)| p);
        let prefix = format!("/{}", inner.trim_matches('/'));
        let base = to.join(inner.trim_start_matches('/'));
        if let Some(parent) = base.parent() {
            std::fs::create_dir_all(parent).map_err(|source| FileRestoreError::Write {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let mut restorer = Restorer {
            fs: &fs,
            partition: mapped.partition,
            summary: &mut summary,
            links: &mut links,
            directories: Vec::new(),
        };
        if prefix == "/" || mapped.map.children.contains_key(&number) {
            restorer.tree(mapped, &prefix, &base)?;
        } else {
            restorer.one(number, &base, path)?;
        }
        restorer.finish_directories()?;
    }
    Ok(summary)
}

/// Writes the contents of the regular file `path` to `out`; its bytes.
pub fn restore_to_writer(
    view: &BackupView,
    disk: &DiskMap,
    path: &str,
    out: &mut dyn Write,
) -> Result<u64, FileRestoreError> {
    let (mapped, number) = lookup(disk, path).map_err(FileRestoreError::NotFound)?;
    let fs = open(mapped, view, path)?;
    let backup = |source| FileRestoreError::Backup {
        path: path.to_string(),
        source,
    };
    let inode = fs.inode(number).map_err(backup)?;
    if !inode.is_regular() {
        return Err(FileRestoreError::Refused(format!(
            "{path}: not a regular file; restore it into a directory with --to DIR"
        )));
    }
    let layout = fs.file_layout(&inode).map_err(backup)?;
    let mut buf = vec![0u8; COPY_CHUNK_BYTES];
    let mut offset = 0u64;
    while offset < layout.size_bytes {
        let length = (layout.size_bytes - offset).min(COPY_CHUNK_BYTES as u64) as usize;
        fs.read_file_at(&inode, &layout, offset, &mut buf[..length])
            .map_err(backup)?;
        out.write_all(&buf[..length])
            .map_err(|source| FileRestoreError::Write {
                path: PathBuf::from("-"),
                source,
            })?;
        offset += length as u64;
    }
    Ok(layout.size_bytes)
}

fn open<'a>(
    mapped: &MappedFs,
    view: &'a BackupView,
    path: &str,
) -> Result<Fs<'a>, FileRestoreError> {
    mapped
        .open_fs(view)
        .map_err(|source| FileRestoreError::Backup {
            path: path.to_string(),
            source,
        })
}

struct Restorer<'a, 'b> {
    fs: &'a Fs<'b>,
    partition: u32,
    summary: &'a mut FileRestoreSummary,
    /// (partition, inode) -> the first path it was restored at.
    links: &'a mut Vec<((u32, u32), PathBuf)>,
    /// Directories made, to get their metadata once what they hold is in
    /// (writing into a directory changes its mtime).
    directories: Vec<(PathBuf, FileMeta)>,
}

impl Restorer<'_, '_> {
    /// The directory `prefix` (`/` for the whole filesystem) at `base`.
    fn tree(
        &mut self,
        mapped: &MappedFs,
        prefix: &str,
        base: &Path,
    ) -> Result<(), FileRestoreError> {
        let inside = if prefix == "/" {
            String::from("/")
        } else {
            format!("{prefix}/")
        };
        for (path, number) in mapped.map.walk() {
            let path = String::from_utf8_lossy(&path).into_owned();
            let relative = if path == prefix {
                ""
            } else if let Some(rest) = path.strip_prefix(inside.as_str()) {
                rest
            } else {
                continue;
            };
            let target = if relative.is_empty() {
                base.to_path_buf()
            } else {
                base.join(relative)
            };
            self.one(number, &target, &path)?;
        }
        Ok(())
    }

    /// One inode at `target`.
    fn one(&mut self, number: u32, target: &Path, path: &str) -> Result<(), FileRestoreError> {
        let backup = |source| FileRestoreError::Backup {
            path: path.to_string(),
            source,
        };
        let inode = self.fs.inode(number).map_err(backup)?;
        let meta = self.fs.file_meta(&inode).map_err(backup)?;
        let write_error = |source| FileRestoreError::Write {
            path: target.to_path_buf(),
            source,
        };
        if meta.kind != FileKind::Directory
            && let Some((_, first)) = self
                .links
                .iter()
                .find(|(key, _)| *key == (self.partition, number))
        {
            std::fs::hard_link(first, target).map_err(write_error)?;
            self.summary.hard_links += 1;
            return Ok(());
        }
        match meta.kind {
            FileKind::Directory => {
                match std::fs::create_dir(target) {
                    Ok(()) => {}
                    // The restore's own directory, or a parent made for
                    // an earlier --file: its metadata is set all the same.
                    Err(error)
                        if error.kind() == io::ErrorKind::AlreadyExists && target.is_dir() => {}
                    Err(error) => return Err(write_error(error)),
                }
                self.summary.directories += 1;
                self.directories.push((target.to_path_buf(), meta));
                return Ok(());
            }
            FileKind::Regular => {
                let layout = self.fs.file_layout(&inode).map_err(backup)?;
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(target)
                    .map_err(write_error)?;
                let mut buf = vec![0u8; COPY_CHUNK_BYTES];
                for (start, length) in layout.data_ranges() {
                    let mut done = 0u64;
                    while done < length {
                        let piece = (length - done).min(COPY_CHUNK_BYTES as u64) as usize;
                        self.fs
                            .read_file_at(&inode, &layout, start + done, &mut buf[..piece])
                            .map_err(backup)?;
                        file.write_all_at(&buf[..piece], start + done)
                            .map_err(write_error)?;
                        done += piece as u64;
                    }
                }
                file.set_len(layout.size_bytes).map_err(write_error)?;
                self.summary.files += 1;
                self.summary.data_bytes += layout.data_bytes();
                drop::<File>(file);
            }
            FileKind::Symlink => {
                let link = meta.symlink_target.clone().unwrap_or_default();
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&link), target)
                    .map_err(write_error)?;
                self.summary.symlinks += 1;
            }
            FileKind::CharDevice { .. }
            | FileKind::BlockDevice { .. }
            | FileKind::Fifo
            | FileKind::Socket => {
                make_node(target, &meta).map_err(write_error)?;
                self.summary.special_files += 1;
            }
        }
        if meta.links > 1 {
            self.links
                .push(((self.partition, number), target.to_path_buf()));
        }
        self.apply(target, &meta)
    }

    fn finish_directories(&mut self) -> Result<(), FileRestoreError> {
        // Innermost first, so setting a directory's times is the last
        // change made inside its parent.
        while let Some((path, meta)) = self.directories.pop() {
            self.apply(&path, &meta)?;
        }
        Ok(())
    }

    /// Owner, permissions, xattrs, then times (each change above moves
    /// the ctime, which no one can set). What this process may not do
    /// (chown without root, xattrs the filesystem refuses) is a warning.
    fn apply(&mut self, target: &Path, meta: &FileMeta) -> Result<(), FileRestoreError> {
        let write_error = |source| FileRestoreError::Write {
            path: target.to_path_buf(),
            source,
        };
        let name = CString::new(target.as_os_str().as_bytes()).map_err(|_| {
            FileRestoreError::Refused(format!("{}: a NUL in the path", target.display()))
        })?;
        // SAFETY: lchown reads a NUL-terminated path.
        if unsafe { libc::lchown(name.as_ptr(), meta.uid, meta.gid) } != 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EPERM) {
                return Err(write_error(error));
            }
            self.warn("owners not restored (only root may give files away)");
        }
        if meta.kind != FileKind::Symlink {
            // SAFETY: chmod reads a NUL-terminated path.
            if unsafe { libc::chmod(name.as_ptr(), libc::mode_t::from(meta.permissions)) } != 0 {
                return Err(write_error(io::Error::last_os_error()));
            }
        }
        for (key, value) in &meta.xattrs {
            let Ok(key_c) = CString::new(key.as_bytes()) else {
                continue;
            };
            // SAFETY: both strings are NUL-terminated; value and its length match.
            let set = unsafe {
                libc::lsetxattr(
                    name.as_ptr(),
                    key_c.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            };
            if set != 0 {
                let error = io::Error::last_os_error();
                self.warn(&format!(
                    "extended attribute {key} not restored here ({error})"
                ));
            }
        }
        let times = [timespec(meta.atime), timespec(meta.mtime)];
        // SAFETY: the path is NUL-terminated and `times` holds two entries.
        let set = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                name.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if set != 0 {
            return Err(write_error(io::Error::last_os_error()));
        }
        Ok(())
    }

    fn warn(&mut self, text: &str) {
        if !self.summary.warnings.iter().any(|w| w == text) {
            self.summary.warnings.push(text.to_string());
        }
    }
}

fn timespec((seconds, nanoseconds): (i64, u32)) -> libc::timespec {
    libc::timespec {
        tv_sec: seconds as libc::time_t,
        tv_nsec: i64::from(nanoseconds.min(999_999_999)) as _,
    }
}

fn make_node(target: &Path, meta: &FileMeta) -> io::Result<()> {
    let (kind, device) = match meta.kind {
        FileKind::CharDevice { major, minor } => (libc::S_IFCHR, libc::makedev(major, minor)),
        FileKind::BlockDevice { major, minor } => (libc::S_IFBLK, libc::makedev(major, minor)),
        FileKind::Fifo => (libc::S_IFIFO, 0),
        _ => (libc::S_IFSOCK, 0),
    };
    let name = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: mknod reads a NUL-terminated path.
    if unsafe { libc::mknod(name.as_ptr(), kind | 0o600, device) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
