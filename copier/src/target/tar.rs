//! `tar:PATH`: the files changed since the target's last checkpoint that
//! meet the copy criteria, as files in a POSIX pax tar (`crate::tar`),
//! read from the snapshot through our ext4 map, never from a mount.
//!
//! Beside the archive: `PATH.blockwatch-tar`, the record (source, the
//! checkpoint the archive brings a tree up to, the files written and the
//! files deleted since the base), and `PATH.blockwatch-tar-map`, the disk's
//! file map at that checkpoint, which the next copy diffs against to name
//! what changed (renames and deletions included). A new archive is written
//! aside and renamed over PATH, then the map, then the record (the
//! commit); a map that is not the record's checkpoint's is not used, so a
//! copy cut between the two lists more files next time, never fewer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use backend::BlockBackend;
use fsmap::diff::{ChangeKind, FileChange};
use fsmap::disk::{DiskMap, MappedFs};
use fsmap::ext4::{FileKind, FileMeta};
use fsmap::select::Criteria;
use serde::{Deserialize, Serialize};
use tracker::files::FileReport;

use super::{Held, SourceInfo, Target};
use crate::copy::{CopyError, unix_seconds};
use crate::files::lookup_in;
use crate::replica::{ReplicaError, ReplicaLock, read_checked, write_checked};
use crate::tar::{Entry, EntryKind, TarWriter};
use crate::view::BackendReader;

const RECORD_FORMAT: u32 = 1;
/// A saved map larger than this is not read.
const MAP_BYTES_MAX: u64 = 1 << 30;
const MAP_MAGIC: &[u8; 8] = b"BWTARMP1";

/// What a tar target's last copy left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TarRecord {
    pub format: u32,
    pub image_id: String,
    pub checkpoint: Held,
    pub base: Option<Held>,
    pub copied_unix_seconds: u64,
    pub archive_bytes: u64,
    /// Paths written to the archive (files, links, the directories that
    /// hold them).
    pub files: u64,
    pub data_bytes: u64,
    /// Paths deleted since the base checkpoint (`N:` prefixed on a disk of
    /// several filesystems).
    pub deleted: Vec<String>,
    /// What kept the list from being exact, if anything.
    pub notes: Vec<String>,
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

pub fn tar_record_path(archive: &Path) -> PathBuf {
    suffixed(archive, ".blockwatch-tar")
}

fn map_path(archive: &Path) -> PathBuf {
    suffixed(archive, ".blockwatch-tar-map")
}

/// The pin holder for a tar target.
pub fn tar_holder(archive: &Path) -> String {
    let absolute = std::path::absolute(archive).unwrap_or_else(|_| archive.to_path_buf());
    format!(
        "tar:{}",
        absolute.to_string_lossy().replace(char::is_whitespace, "_")
    )
}

/// The record beside `archive`, if any.
pub fn read_tar_record(archive: &Path) -> Result<Option<TarRecord>, ReplicaError> {
    read_checked(&tar_record_path(archive))
}

struct Written {
    record: TarRecord,
    map: Vec<u8>,
    temporary: PathBuf,
}

pub struct TarTarget {
    path: PathBuf,
    criteria: Criteria,
    full: bool,
    record: Option<TarRecord>,
    opened: Option<(SourceInfo, Held, Option<Held>)>,
    written: Option<Written>,
    _lock: ReplicaLock,
}

impl std::fmt::Debug for TarTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TarTarget")
            .field("path", &self.path)
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

impl TarTarget {
    pub fn open(path: &Path, criteria: Criteria, full: bool) -> Result<TarTarget, CopyError> {
        let lock = ReplicaLock::acquire_file(path, &suffixed(path, ".blockwatch-tar.lock"))?;
        let record = read_tar_record(path)?;
        if record.is_none() && path.exists() && !full {
            return Err(CopyError::TargetRefused {
                target: format!("tar:{}", path.display()),
                reason: "it exists and is not a blockwatch tar: it may be someone's file; copy with --full to replace it".into(),
            });
        }
        Ok(TarTarget {
            path: path.to_path_buf(),
            criteria,
            full,
            record,
            opened: None,
            written: None,
            _lock: lock,
        })
    }

    /// The map the record's checkpoint saw, when it was saved whole.
    fn base_map(&self, base: &Held, notes: &mut Vec<String>) -> Option<DiskMap> {
        let path = map_path(&self.path);
        let length = std::fs::metadata(&path).ok()?.len();
        let fallback = |notes: &mut Vec<String>, why: &str| {
            notes.push(format!(
                "the file map of checkpoint {} {why}: files are listed by the changed blocks they own, and deletions cannot be named",
                base.checkpoint
            ));
            None
        };
        if length > MAP_BYTES_MAX {
            return fallback(notes, "is too large to read");
        }
        let bytes = std::fs::read(&path).ok()?;
        let expected = map_header(base);
        let Some(body) = bytes.strip_prefix(expected.as_slice()) else {
            return fallback(notes, "was not saved by the copy that made it");
        };
        match DiskMap::decode(body) {
            Ok(map) => Some(map),
            Err(error) => fallback(notes, &format!("is damaged ({error})")),
        }
    }

    /// Writes the archive of what changed from `base` to the checkpoint
    /// `source` shows, aside; `commit` puts it in place.
    fn write_archive(
        &mut self,
        source: &dyn BlockBackend,
        changed: &[(u64, u64)],
    ) -> Result<u64, CopyError> {
        let (info, taken, base) = self.opened.clone().expect("opened before the copy");
        let reader = BackendReader(source);
        let new_map = DiskMap::build(reader, source.size_bytes());
        let mut notes = new_map.all_notes();
        let old_map = base
            .as_ref()
            .and_then(|base| self.base_map(base, &mut notes));
        let (chosen, deleted) = match &base {
            // A full archive: the whole tree, or the files the criteria take.
            None => (every_file(&new_map, &self.criteria), Vec::new()),
            Some(_) => {
                let report = FileReport::new(
                    &new_map,
                    old_map.as_ref(),
                    changed,
                    &self.criteria,
                    Vec::new(),
                );
                let deleted = old_map
                    .as_ref()
                    .map(|old| deleted_paths(old, &new_map, &self.criteria))
                    .unwrap_or_default();
                let (chosen, shared) = changed_files(&report);
                if shared > 0 {
                    notes.push(format!(
                        "{shared} files own blocks in changed regions but their inodes say they did not change (a neighbour's write in the same region): left out"
                    ));
                }
                (chosen, deleted)
            }
        };
        let several = new_map.filesystems.len() > 1;
        let temporary = suffixed(&self.path, ".partial");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(|source| io_error(&temporary, source))?;
        let mut archive = Archive {
            writer: TarWriter::new(BufWriter::with_capacity(1 << 20, file)),
            written_paths: HashSet::new(),
            links: HashMap::new(),
            files: 0,
            data_bytes: 0,
            several,
        };
        for ((partition, path), inode) in &chosen {
            let mapped = new_map
                .filesystems
                .iter()
                .find(|fs| fs.partition == *partition)
                .expect("a listed change is of a mapped filesystem");
            archive.add_path(mapped, reader, path, *inode)?;
        }
        let files = archive.files;
        let data_bytes = archive.data_bytes;
        let out = archive
            .writer
            .finish()
            .map_err(|error| tar_error(&temporary, error))?;
        let file = out
            .into_inner()
            .map_err(|error| io_error(&temporary, error.into_error()))?;
        file.sync_all()
            .map_err(|source| io_error(&temporary, source))?;
        let archive_bytes = file
            .metadata()
            .map_err(|source| io_error(&temporary, source))?
            .len();
        let mut map = map_header(&taken);
        map.extend_from_slice(&new_map.encode());
        self.written = Some(Written {
            record: TarRecord {
                format: RECORD_FORMAT,
                image_id: info.id,
                checkpoint: taken,
                base,
                copied_unix_seconds: unix_seconds(),
                archive_bytes,
                files,
                data_bytes,
                deleted,
                notes,
            },
            map,
            temporary,
        });
        Ok(data_bytes)
    }
}

/// (filesystem, path) -> inode of every entry a tar takes, in tar order.
type Chosen = BTreeMap<(u32, String), u32>;

/// Every file of the disk the criteria take; with no criteria, every
/// directory too (an empty one is part of the tree).
fn every_file(disk: &DiskMap, criteria: &Criteria) -> Chosen {
    let mut chosen = Chosen::new();
    for mapped in &disk.filesystems {
        for (path, number) in mapped.map.walk().skip(1) {
            let Some(record) = mapped.map.inodes.get(&number) else {
                continue;
            };
            let path = String::from_utf8_lossy(&path).into_owned();
            let change = FileChange {
                kind: ChangeKind::Created,
                inode: number,
                paths: vec![path.clone()],
                old_paths: Vec::new(),
                content_changed: true,
                is_directory: record.is_directory(),
                size_bytes: record.size_bytes,
                changed_bytes: 0,
                changed_blocks: Vec::new(),
                changed_file_ranges: Vec::new(),
            };
            let taken = if criteria.is_empty() {
                true
            } else {
                criteria.selects(&change)
            };
            if taken {
                chosen.insert((mapped.partition, path), number);
            }
        }
    }
    chosen
}

/// What an incremental archive takes of `report`: files that changed and
/// new directories; and how many files it left out because only their
/// blocks lie in changed regions while their inodes (size, mtime, ctime)
/// say the filesystem did not change them (a neighbour's write in the
/// same region: the filesystem cannot change a file without its ctime).
fn changed_files(report: &FileReport) -> (Chosen, u64) {
    let mut chosen = Chosen::new();
    let mut shared = 0;
    for (fs, change) in report.listed() {
        match change.kind {
            ChangeKind::Deleted => {}
            ChangeKind::Shared => shared += u64::from(!change.is_directory),
            // A directory is written as the parent of what changed in it,
            // or when it is new (an empty one must still appear).
            _ if change.is_directory && change.kind != ChangeKind::Created => {}
            _ => {
                for path in &change.paths {
                    chosen.insert((fs.partition, path.clone()), change.inode);
                }
            }
        }
    }
    (chosen, shared)
}

/// The paths `old` had and `new` has not (a file deleted, or one name of
/// a hard-linked one, or the old name of a renamed one) that the criteria
/// take; `N:` before each on a disk of several filesystems.
fn deleted_paths(old: &DiskMap, new: &DiskMap, criteria: &Criteria) -> Vec<String> {
    let several = new.filesystems.len() > 1 || old.filesystems.len() > 1;
    let mut deleted = Vec::new();
    for old_fs in &old.filesystems {
        let now: HashSet<Vec<u8>> = new
            .filesystems
            .iter()
            .find(|fs| fs.partition == old_fs.partition)
            .map(|fs| fs.map.walk().map(|(path, _)| path).collect())
            .unwrap_or_default();
        for (path, number) in old_fs.map.walk().skip(1) {
            if now.contains(&path) {
                continue;
            }
            let path = String::from_utf8_lossy(&path).into_owned();
            let record = old_fs.map.inodes.get(&number);
            let change = FileChange {
                kind: ChangeKind::Deleted,
                inode: number,
                paths: vec![path.clone()],
                old_paths: Vec::new(),
                content_changed: true,
                is_directory: record.is_some_and(|r| r.is_directory()),
                size_bytes: record.map_or(0, |r| r.size_bytes),
                changed_bytes: 0,
                changed_blocks: Vec::new(),
                changed_file_ranges: Vec::new(),
            };
            if criteria.is_empty() || criteria.matches(&change) {
                deleted.push(if several {
                    format!("{}:{path}", old_fs.partition)
                } else {
                    path
                });
            }
        }
    }
    deleted
}

/// The saved map starts with the checkpoint it belongs to.
fn map_header(checkpoint: &Held) -> Vec<u8> {
    let mut out = MAP_MAGIC.to_vec();
    out.extend_from_slice(&checkpoint.generation.to_le_bytes());
    out.extend_from_slice(&(checkpoint.checkpoint.len() as u32).to_le_bytes());
    out.extend_from_slice(checkpoint.checkpoint.as_bytes());
    out
}

fn io_error(path: &Path, source: std::io::Error) -> CopyError {
    CopyError::Replica(ReplicaError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn tar_error(path: &Path, error: crate::tar::TarError) -> CopyError {
    io_error(path, std::io::Error::other(error.to_string()))
}

type Reader<'a> = BackendReader<'a>;

/// The archive being written, and what it holds so far.
struct Archive<W: Write> {
    writer: TarWriter<W>,
    /// Paths written, so each parent directory is written once.
    written_paths: HashSet<(u32, String)>,
    /// (filesystem, inode) -> the archive path it was first written at.
    links: HashMap<(u32, u32), Vec<u8>>,
    files: u64,
    data_bytes: u64,
    several: bool,
}

impl<W: Write> Archive<W> {
    fn member_path(&self, partition: u32, path: &str) -> Vec<u8> {
        let inner = path.trim_start_matches('/');
        if self.several {
            format!("partition-{partition}/{inner}").into_bytes()
        } else {
            inner.as_bytes().to_vec()
        }
    }

    /// Writes `path`'s parents (with their metadata), then `path`.
    fn add_path(
        &mut self,
        mapped: &MappedFs,
        reader: Reader<'_>,
        path: &str,
        inode: u32,
    ) -> Result<(), CopyError> {
        let fs = mapped
            .open_fs(reader)
            .map_err(|error| read_error(path, error))?;
        let mut parent = String::new();
        let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        for component in &components[..components.len().saturating_sub(1)] {
            parent.push('/');
            parent.push_str(component);
            if self
                .written_paths
                .contains(&(mapped.partition, parent.clone()))
            {
                continue;
            }
            let number =
                lookup_in(mapped, &parent).map_err(|reason| read_error_text(&parent, reason))?;
            self.add_one(&fs, mapped.partition, &parent, number)?;
        }
        if !self
            .written_paths
            .contains(&(mapped.partition, path.to_string()))
        {
            self.add_one(&fs, mapped.partition, path, inode)?;
        }
        Ok(())
    }

    fn add_one<R: fsmap::ReadAt>(
        &mut self,
        fs: &fsmap::ext4::Ext4<R>,
        partition: u32,
        path: &str,
        number: u32,
    ) -> Result<(), CopyError> {
        let error = |e| read_error(path, e);
        let inode = fs.inode(number).map_err(error)?;
        let meta = fs.file_meta(&inode).map_err(error)?;
        let member = self.member_path(partition, path);
        self.written_paths.insert((partition, path.to_string()));
        let kind = match meta.kind {
            _ if meta.kind != FileKind::Directory
                && self.links.contains_key(&(partition, number)) =>
            {
                EntryKind::HardLink {
                    target: self.links[&(partition, number)].clone(),
                }
            }
            FileKind::Regular => {
                let layout = fs.file_layout(&inode).map_err(error)?;
                self.data_bytes += layout.data_bytes();
                let kind = EntryKind::File {
                    size_bytes: layout.size_bytes,
                    data: layout.data_ranges(),
                };
                let entry = entry(member.clone(), kind, &meta);
                let mut read = |offset: u64, buf: &mut [u8]| {
                    fs.read_file_at(&inode, &layout, offset, buf).map_err(|e| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
                    })
                };
                self.writer
                    .add(&entry, &mut read)
                    .map_err(|e| read_error_text(path, e.to_string()))?;
                self.finish_entry(partition, number, member, &meta);
                return Ok(());
            }
            FileKind::Directory => EntryKind::Directory,
            FileKind::Symlink => EntryKind::Symlink {
                target: meta.symlink_target.clone().unwrap_or_default(),
            },
            FileKind::CharDevice { major, minor } => EntryKind::CharDevice { major, minor },
            FileKind::BlockDevice { major, minor } => EntryKind::BlockDevice { major, minor },
            FileKind::Fifo => EntryKind::Fifo,
            // A socket is made by whoever listens on it; tar has no kind for it.
            FileKind::Socket => return Ok(()),
        };
        let entry = entry(member.clone(), kind, &meta);
        self.writer
            .add(&entry, &mut |_, _| Ok(()))
            .map_err(|e| read_error_text(path, e.to_string()))?;
        self.finish_entry(partition, number, member, &meta);
        Ok(())
    }

    fn finish_entry(&mut self, partition: u32, number: u32, member: Vec<u8>, meta: &FileMeta) {
        self.files += 1;
        if meta.kind != FileKind::Directory && meta.links > 1 {
            self.links.entry((partition, number)).or_insert(member);
        }
    }
}

fn entry(path: Vec<u8>, kind: EntryKind, meta: &FileMeta) -> Entry {
    Entry {
        path,
        kind,
        mode: u32::from(meta.permissions),
        uid: meta.uid,
        gid: meta.gid,
        mtime: meta.mtime,
        atime: Some(meta.atime),
        ctime: Some(meta.ctime),
        xattrs: meta.xattrs.clone(),
    }
}

fn read_error(path: &str, error: fsmap::ext4::Ext4Error) -> CopyError {
    read_error_text(path, error.to_string())
}

fn read_error_text(path: &str, reason: String) -> CopyError {
    CopyError::Files {
        path: path.to_string(),
        reason,
    }
}

impl Target for TarTarget {
    fn describe(&self) -> String {
        format!("tar:{}", self.path.display())
    }

    fn holder(&self) -> String {
        tar_holder(&self.path)
    }

    fn held(&mut self, source_id: &str) -> Result<Option<Held>, CopyError> {
        match &self.record {
            None => Ok(None),
            Some(_) if self.full => Ok(None),
            Some(record) if record.image_id != source_id => Err(CopyError::TargetRefused {
                target: self.describe(),
                reason: format!(
                    "its record is of another disk (image id {}, this one is {source_id}); copy with --full to start it over",
                    record.image_id
                ),
            }),
            Some(record) => Ok(Some(record.checkpoint.clone())),
        }
    }

    fn open(
        &mut self,
        source: &SourceInfo,
        checkpoint: &Held,
        base: Option<&Held>,
    ) -> Result<(), CopyError> {
        self.opened = Some((source.clone(), checkpoint.clone(), base.cloned()));
        Ok(())
    }

    fn write_data(&self, _offset: u64, _data: &[u8]) -> Result<(), CopyError> {
        unreachable!("a tar target copies files, not pieces")
    }

    fn write_zero(&self, _offset: u64, _length: u64) -> Result<(), CopyError> {
        unreachable!("a tar target copies files, not pieces")
    }

    fn copy_files(
        &mut self,
        source: &dyn BlockBackend,
        changed: &[(u64, u64)],
    ) -> Option<Result<u64, CopyError>> {
        Some(self.write_archive(source, changed))
    }

    fn commit(&mut self) -> Result<(), CopyError> {
        let written = self.written.take().expect("an archive was written");
        std::fs::rename(&written.temporary, &self.path)
            .map_err(|source| io_error(&self.path, source))?;
        let map = map_path(&self.path);
        let aside = suffixed(&map, ".new");
        let saved = File::create(&aside)
            .and_then(|mut file| {
                file.write_all(&written.map)?;
                file.sync_all()
            })
            .and_then(|()| std::fs::rename(&aside, &map));
        if let Err(error) = saved {
            // The next copy then lists by changed blocks: more, never fewer.
            tracing::warn!(map = %map.display(), %error, "cannot save the tar target's file map");
            let _ = std::fs::remove_file(&map);
        }
        write_checked(&tar_record_path(&self.path), &written.record)?;
        self.record = Some(written.record);
        Ok(())
    }

    fn tar_record(&self) -> Option<TarRecord> {
        self.record.clone()
    }
}
