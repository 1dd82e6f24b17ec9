//! Where a copy goes. A `Target` says what it holds of a source (so the
//! copy knows its base, or refuses what may be someone else's data), takes
//! the pieces, and commits: only a committed copy counts, and an
//! interrupted one leaves the target's claim as it was.
//!
//! `ReplicaTarget`, a raw sparse image file with its record;
//! `NbdTarget` (`target/nbd.rs`), any NBD server's export; `TapeTarget`
//! (`target/tape.rs`), a sequential tape stream of sessions; `S3Target`
//! (`s3/target.rs`), sessions in an object storage repository.

mod nbd;
mod tape;
mod tar;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::copy::{CopyError, unix_seconds};
use crate::replica::{
    RECORD_FORMAT, Replica, ReplicaError, ReplicaLock, ReplicaRecord, partial_path, read_checked,
    read_record, reads_as_zeroes, remove_partial, write_partial,
};

/// A checkpoint as a copy names it: its name and the generation it closed
/// (names may be reused after a delete; the pair may not).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Held {
    pub checkpoint: String,
    pub generation: u64,
}

/// The source disk, as targets record it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceInfo {
    /// The tracker's image id (hex), or `nbd:URI` for an untracked export.
    pub id: String,
    pub size_bytes: u64,
    pub granularity_bytes: u64,
}

/// The progress of a copy that did not finish, kept beside the target's
/// record: everything the plan had below `done_below_bytes` is on the
/// target, durable, as of checkpoint `taken`. A rerun on the same base
/// copies there only what changed since `taken`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Partial {
    pub format: u32,
    pub source_id: String,
    /// The target's checkpoint the interrupted copy built on (None: full).
    pub base: Option<Held>,
    pub taken: Held,
    pub done_below_bytes: u64,
}

pub const PARTIAL_FORMAT: u32 = 1;

/// What a deduplicating target (object storage) stored of a copy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredTotals {
    /// The session the copy made.
    pub session: String,
    /// Bytes of data the target did not hold yet (before compression).
    pub new_bytes: u64,
    /// Bytes sent to the target (compressed, sealed, packed).
    pub uploaded_bytes: u64,
    /// Pack indexes read from this machine's cache, and from the service.
    pub indexes_cached: u64,
    pub indexes_fetched: u64,
}

/// One copy's destination.
pub trait Target: Sync {
    /// `file:PATH`, `tape:PATH`: for summaries and messages.
    fn describe(&self) -> String;
    /// The pin holder of the checkpoint this target holds: no spaces,
    /// stable for the target.
    fn holder(&self) -> String;
    /// What the target holds of `source_id`: None when it holds nothing
    /// yet. Refuses (an error) what may be someone else's data.
    fn held(&mut self, source_id: &str) -> Result<Option<Held>, CopyError>;
    /// Prepares to take a copy of `source` at `checkpoint`, on top of
    /// `base` (None: a full copy).
    fn open(
        &mut self,
        source: &SourceInfo,
        checkpoint: &Held,
        base: Option<&Held>,
    ) -> Result<(), CopyError>;
    fn write_data(&self, offset: u64, data: &[u8]) -> Result<(), CopyError>;
    /// Makes a range read as zeroes (a hole where the target can).
    fn write_zero(&self, offset: u64, length: u64) -> Result<(), CopyError>;
    /// Whether the target keeps the list of files a copy changed (a tape
    /// session does); the copy then asks the file map for it.
    fn wants_files(&self) -> bool {
        false
    }
    /// The files the copy changed (`STATUS<TAB>PATH` lines).
    fn set_files(&mut self, files: Vec<String>) {
        let _ = files;
    }
    /// Whether pieces must arrive in plan order (a sequential stream).
    fn in_order(&self) -> bool {
        false
    }
    /// Makes the copy durable and then claims its checkpoint.
    fn commit(&mut self) -> Result<(), CopyError>;
    /// Makes what was written durable, then records `partial`. Targets
    /// that cannot resume (a tape) record nothing.
    fn save_partial(&self, partial: &Partial) -> Result<(), CopyError> {
        let _ = partial;
        Ok(())
    }
    /// What an interrupted copy left, if anything usable.
    fn load_partial(&self) -> Option<Partial> {
        None
    }
    /// What a deduplicating target stored of the committed copy.
    fn stored(&self) -> Option<StoredTotals> {
        None
    }
    /// Forgets an interrupted copy (after a commit).
    fn clear_partial(&self) -> Result<(), CopyError> {
        Ok(())
    }
    /// A target that takes files rather than pieces (a tar): it reads
    /// what it wants of `source` (the disk at the new checkpoint) itself,
    /// given the byte ranges changed since its base (the whole disk for a
    /// full copy), and returns the data bytes it wrote. None, the
    /// default: a target of pieces.
    fn copy_files(
        &mut self,
        source: &dyn backend::BlockBackend,
        changed: &[(u64, u64)],
    ) -> Option<Result<u64, CopyError>> {
        let _ = (source, changed);
        None
    }
    /// What a tar target's committed copy wrote.
    fn tar_record(&self) -> Option<TarRecord> {
        None
    }
}

/// What an interrupted copy left beside a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Interrupted {
    /// Nothing: no copy of ours was cut short since the last commit.
    None,
    /// Its progress record.
    Copy(Partial),
    /// A progress record that fails its checksum: a power cut tore its
    /// overwrite in place. Only our copies write it, so a copy of ours was
    /// under way; on which base and how far is unknown.
    Torn,
}

/// The progress record kept for `key` (a replica path), as far as it
/// tells of a copy of `source_id`.
pub(crate) fn interrupted_of(key: &Path, source_id: &str) -> Interrupted {
    match read_checked::<Partial>(&partial_path(key)) {
        Ok(Some(partial)) if partial.format == PARTIAL_FORMAT && partial.source_id == source_id => {
            Interrupted::Copy(partial)
        }
        Ok(_) => Interrupted::None,
        Err(ReplicaError::DamagedRecord { .. }) => Interrupted::Torn,
        Err(error) => {
            tracing::warn!(%error, "ignoring the progress record of an interrupted copy");
            Interrupted::None
        }
    }
}

/// The partial record kept for `key` (a replica path, or an NBD target's
/// record key); a damaged one is not resumed from (the copy then starts
/// over from the target's record).
pub(crate) fn load_partial_of(key: &Path) -> Option<Partial> {
    match read_checked::<Partial>(&partial_path(key)) {
        Ok(partial) => partial.filter(|p| p.format == PARTIAL_FORMAT),
        Err(error) => {
            tracing::warn!(%error, "ignoring the progress record of an interrupted copy");
            None
        }
    }
}

pub use nbd::{NbdTarget, nbd_holder};
pub use tape::{TapeTarget, tape_holder};
pub use tar::{TarRecord, TarTarget, read_tar_record, tar_holder, tar_record_path};

/// A target as the command line names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    /// `file:PATH` or a plain path: a raw sparse replica.
    File(PathBuf),
    /// `nbd://...`, `nbd+unix://...`: an NBD export.
    Nbd(String),
    /// `tape:PATH`: a tape stream (a file or a drive), one session per
    /// copy, in blocks of `block_size_bytes`, zstd on extent data when
    /// `compress`.
    Tape {
        path: PathBuf,
        block_size_bytes: u32,
        compress: bool,
    },
    /// `s3://BUCKET/PREFIX`: a repository in object storage, one session
    /// per copy.
    S3 {
        location: crate::s3::S3Location,
        options: crate::s3::S3Options,
    },
    /// `tar:PATH`: the changed files that meet `criteria`, as a pax tar
    /// (`full`: every file that meets them, and PATH replaced whatever it
    /// holds).
    Tar {
        path: PathBuf,
        criteria: fsmap::select::Criteria,
        full: bool,
    },
}

impl TargetSpec {
    /// The target as the command line names it.
    pub fn describe(&self) -> String {
        match self {
            TargetSpec::File(path) => format!("file:{}", path.display()),
            TargetSpec::Nbd(uri) => uri.clone(),
            TargetSpec::Tape { path, .. } => format!("tape:{}", path.display()),
            TargetSpec::S3 { location, .. } => location.url(),
            TargetSpec::Tar { path, .. } => format!("tar:{}", path.display()),
        }
    }

    /// Opens (locks, connects to) the target. An NBD target's record
    /// lives in the source's state directory, `targets/`.
    pub fn open(&self, state_dir: &Path) -> Result<Box<dyn Target>, CopyError> {
        Ok(match self {
            TargetSpec::File(path) => Box::new(ReplicaTarget::lock(path)?),
            TargetSpec::Nbd(uri) => {
                Box::new(NbdTarget::connect(uri, &state_dir.join(TARGETS_DIR))?)
            }
            TargetSpec::Tape {
                path,
                block_size_bytes,
                compress,
            } => Box::new(TapeTarget::open(path, *block_size_bytes, *compress)?),
            TargetSpec::S3 { location, options } => {
                Box::new(crate::s3::S3Target::open(location, options)?)
            }
            TargetSpec::Tar {
                path,
                criteria,
                full,
            } => Box::new(TarTarget::open(path, criteria.clone(), *full)?),
        })
    }
}

/// Where NBD targets' records live, under the source's state directory.
pub const TARGETS_DIR: &str = "targets";

/// Refuses a record of another source.
fn checked_source(target: &str, record: &ReplicaRecord, source_id: &str) -> Result<(), CopyError> {
    if record.image_id != source_id {
        return Err(CopyError::TargetRefused {
            target: target.to_string(),
            reason: format!(
                "it holds a copy of another disk (image id {}, this one is {source_id}); copy with --full to overwrite it",
                record.image_id
            ),
        });
    }
    Ok(())
}

/// The pin holder for a replica path.
pub fn replica_holder(replica: &Path) -> String {
    let path = replica.as_os_str().as_encoded_bytes();
    format!("replica-{:08x}", crc32c::crc32c(path))
}

/// A raw sparse replica file; its record (`PATH.blockwatch-replica`) says
/// which disk and checkpoint it holds.
#[derive(Debug)]
pub struct ReplicaTarget {
    path: PathBuf,
    /// Until `open` moves it into the replica.
    lock: Option<ReplicaLock>,
    replica: Option<Replica>,
    pending: Option<(SourceInfo, Held)>,
    /// The replica was an empty (or new) regular file when opened: it
    /// reads as zeroes everywhere, so zero ranges need no hole punched.
    fresh: bool,
}

impl ReplicaTarget {
    /// Locks the replica at `path` (made absolute: its record and pin name
    /// it so) against other copies.
    pub fn lock(path: &Path) -> Result<ReplicaTarget, CopyError> {
        let path = std::path::absolute(path).map_err(|source| {
            CopyError::Replica(ReplicaError::Io {
                path: path.to_path_buf(),
                source,
            })
        })?;
        let lock = ReplicaLock::acquire(&path)?;
        Ok(ReplicaTarget {
            path,
            lock: Some(lock),
            replica: None,
            pending: None,
            fresh: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn replica(&self) -> &Replica {
        self.replica
            .as_ref()
            .expect("a replica target is opened before it is written")
    }
}

impl Target for ReplicaTarget {
    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }

    fn holder(&self) -> String {
        replica_holder(&self.path)
    }

    fn held(&mut self, source_id: &str) -> Result<Option<Held>, CopyError> {
        // A copy of ours that was interrupted wrote the replica after its
        // record: its progress record accounts for the new mtime.
        let interrupted = interrupted_of(&self.path, source_id);
        let record = checked_record(&self.path, source_id, &interrupted)?;
        Ok(record.map(|record| Held {
            checkpoint: record.checkpoint,
            generation: record.generation,
        }))
    }

    fn open(
        &mut self,
        source: &SourceInfo,
        checkpoint: &Held,
        _base: Option<&Held>,
    ) -> Result<(), CopyError> {
        let lock = self.lock.take().expect("a replica target is opened once");
        self.fresh = match std::fs::metadata(&self.path) {
            Ok(metadata) => metadata.file_type().is_file() && metadata.len() == 0,
            Err(error) => error.kind() == std::io::ErrorKind::NotFound,
        };
        self.replica = Some(Replica::open(&self.path, source.size_bytes, lock)?);
        self.pending = Some((source.clone(), checkpoint.clone()));
        Ok(())
    }

    fn write_data(&self, offset: u64, data: &[u8]) -> Result<(), CopyError> {
        Ok(self.replica().write_at(data, offset)?)
    }

    fn write_zero(&self, offset: u64, length: u64) -> Result<(), CopyError> {
        if self.fresh {
            return Ok(());
        }
        Ok(self.replica().zero(offset, length)?)
    }

    fn commit(&mut self) -> Result<(), CopyError> {
        let (source, checkpoint) = self.pending.take().expect("opened before committed");
        let replica = self.replica();
        replica.sync_all()?;
        let metadata = replica.metadata()?;
        replica.commit(&ReplicaRecord {
            format: RECORD_FORMAT,
            image_id: source.id,
            source_size_bytes: source.size_bytes,
            granularity_bytes: source.granularity_bytes,
            checkpoint: checkpoint.checkpoint,
            generation: checkpoint.generation,
            copied_unix_seconds: unix_seconds(),
            replica_size_bytes: metadata.len(),
            replica_mtime_seconds: metadata.mtime(),
            replica_mtime_nanoseconds: metadata.mtime_nsec(),
        })?;
        Ok(())
    }

    fn save_partial(&self, partial: &Partial) -> Result<(), CopyError> {
        self.replica().sync()?;
        Ok(write_partial(&self.path, partial)?)
    }

    fn load_partial(&self) -> Option<Partial> {
        load_partial_of(&self.path)
    }

    fn clear_partial(&self) -> Result<(), CopyError> {
        Ok(remove_partial(&self.path)?)
    }
}

/// The replica's record when it is a replica of `source_id` and nobody
/// changed it since (but our own `interrupted` copy on top of that
/// record); None when there is no replica yet (or an empty file).
pub(crate) fn checked_record(
    replica: &Path,
    source_id: &str,
    interrupted: &Interrupted,
) -> Result<Option<ReplicaRecord>, CopyError> {
    let metadata = std::fs::metadata(replica).ok();
    let record = match read_record(replica)? {
        Some(record) => record,
        // Our own first copy, interrupted, wrote it.
        None if matches!(interrupted, Interrupted::Copy(partial) if partial.base.is_none())
            || *interrupted == Interrupted::Torn =>
        {
            return Ok(None);
        }
        // A file that reads as zeroes holds nobody's data: a new one, or
        // ours from a first copy cut before its progress record was
        // durable (it is created and sized first).
        None if metadata.as_ref().is_some_and(|m| m.len() > 0)
            && !reads_as_zeroes(replica).map_err(|source| ReplicaError::Io {
                path: replica.to_path_buf(),
                source,
            })? =>
        {
            return Err(CopyError::NotAReplica {
                replica: replica.to_path_buf(),
            });
        }
        None => return Ok(None),
    };
    if record.image_id != source_id {
        return Err(CopyError::Foreign {
            replica: replica.to_path_buf(),
            theirs: record.image_id,
            ours: source_id.to_string(),
        });
    }
    // A copy of ours wrote the replica after the record, on a base the
    // torn progress record no longer says (a --full one wrote anywhere):
    // only a full copy is sure to leave the disk.
    if *interrupted == Interrupted::Torn {
        tracing::warn!(
            replica = %replica.display(),
            "the progress record of an interrupted copy is torn (a power cut): copying everything"
        );
        return Ok(None);
    }
    let ours_since = matches!(interrupted, Interrupted::Copy(partial)
    if partial.base.as_ref().is_some_and(|base| {
        base.checkpoint == record.checkpoint && base.generation == record.generation
    }));
    if !ours_since && !metadata.as_ref().is_some_and(|m| record.matches_file(m)) {
        return Err(CopyError::ChangedBehindOurBack {
            replica: replica.to_path_buf(),
            checkpoint: record.checkpoint,
        });
    }
    Ok(Some(record))
}
