//! A read-only view of any backup at one of its checkpoints: a replica
//! file, a chain of tapes, or an object storage session. Reads of an
//! offset and length come from the newest session of the chain that holds
//! that region, every byte checked against its checksum on the way. The
//! view is a `BlockBackend` (so the server serves it, `serve TARGET -r`)
//! and an `fsmap::ReadAt` (so files are read out of it with no mount).
//!
//! - `ranges.rs`: disk ranges mapped to their sources, newer over older.
//! - `cache.rs`: the few blocks or chunks a view keeps after a read.
//! - `tape.rs`: a tape chain, indexed by one checked pass;
//!   `tape_index.rs` the index kept beside each tape for the next view.
//! - `s3.rs`: an object storage session, through its manifest.
//! - `overlay.rs`: writes over a view kept in a file of their own.

mod cache;
mod overlay;
mod ranges;
mod s3;
mod tape;
pub(crate) mod tape_index;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use backend::{BlockBackend, FileBackend};

pub use overlay::{Overlay, record_path as overlay_record_path};
pub use s3::S3View;
pub use tape::TapeView;

use crate::replica::{ReplicaLock, read_record};
use crate::s3::{Repository, S3Error, S3Location};
use crate::tape::TapeError;

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("{what}")]
    Io { what: String, source: io::Error },
    #[error("{0}")]
    Refused(String),
    #[error("{}", tape_refusal(error, good_until))]
    Tape {
        /// The last checkpoint the chain holds whole before the damage.
        good_until: Option<String>,
        error: TapeError,
    },
    #[error(transparent)]
    S3(Box<S3Error>),
}

fn tape_refusal(error: &TapeError, good_until: &Option<String>) -> String {
    match good_until {
        Some(checkpoint) => {
            format!("{error}; the chain is whole up to checkpoint {checkpoint} (--at {checkpoint})")
        }
        None => error.to_string(),
    }
}

/// What a view shows: a backup, named as the copy command names targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewSpec {
    /// `tape:A [tape:B ...]`, in chain order.
    Tapes(Vec<PathBuf>),
    /// `s3://BUCKET/PREFIX[#SESSION]`.
    S3(String),
    /// A replica file (`file:PATH` or a plain path).
    Replica(PathBuf),
}

impl ViewSpec {
    /// Parses the words naming one backup: one or more `tape:` words, or
    /// one `s3://` or replica word.
    pub fn parse(words: &[String]) -> Result<ViewSpec, ViewError> {
        let refuse = |text: &str| Err(ViewError::Refused(text.to_string()));
        match words {
            [] => refuse("name a backup: tape:PATH..., s3://BUCKET/PREFIX or a replica file"),
            [first, ..] if first.starts_with("tape:") => words
                .iter()
                .map(|word| match word.strip_prefix("tape:") {
                    Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
                    _ => Err(ViewError::Refused(format!(
                        "{word}: a tape chain is given as tape:PATH words only"
                    ))),
                })
                .collect::<Result<_, _>>()
                .map(ViewSpec::Tapes),
            [one] if one.starts_with("s3://") => Ok(ViewSpec::S3(one.clone())),
            [one] if one.starts_with("nbd") => refuse(
                "an NBD target is a live export: read it with nbdcopy or serve it from its own server",
            ),
            [one] => Ok(ViewSpec::Replica(PathBuf::from(
                one.strip_prefix("file:").unwrap_or(one),
            ))),
            _ => refuse("one backup at a time: several words are a tape chain (tape:A tape:B)"),
        }
    }
}

/// A backup at one checkpoint, readable as a disk.
pub struct BackupView {
    /// The backup as the user named it.
    pub description: String,
    pub checkpoint: String,
    /// The checkpoint's generation in the source's tracking state.
    pub generation: u64,
    /// The source disk's tracker identity (hex; `nbd:URI` for a copy
    /// from an untracked export).
    pub source_id: String,
    /// The object storage session, or the tape session, shown.
    pub session: Option<String>,
    storage: Box<dyn BlockBackend>,
    _replica_lock: Option<ReplicaLock>,
}

impl BackupView {
    /// Opens `spec` at `at` (the newest checkpoint it holds when None).
    /// `repository` opens an object storage repository (the caller holds
    /// the endpoint and key options).
    pub fn open(
        spec: &ViewSpec,
        at: Option<&str>,
        repository: &dyn Fn(&S3Location) -> Result<Repository, S3Error>,
    ) -> Result<BackupView, ViewError> {
        match spec {
            ViewSpec::Tapes(paths) => {
                let view = TapeView::open(paths, at)?;
                let shown = &view
                    .chain
                    .sessions
                    .last()
                    .expect("a view's chain holds a session")
                    .header;
                let (session, generation, source_id) = (
                    Some(shown.session_id.hex()),
                    shown.target.generation,
                    shown.source_id.clone(),
                );
                Ok(BackupView {
                    description: paths
                        .iter()
                        .map(|p| format!("tape:{}", p.display()))
                        .collect::<Vec<_>>()
                        .join(" "),
                    checkpoint: view.checkpoint().to_string(),
                    generation,
                    source_id,
                    session,
                    storage: Box::new(view),
                    _replica_lock: None,
                })
            }
            ViewSpec::S3(word) => {
                let location = S3Location::parse(word)?;
                let repo = Arc::new(repository(&location)?);
                let view = S3View::open(repo, &location, at)?;
                Ok(BackupView {
                    description: location.url(),
                    checkpoint: view.checkpoint().to_string(),
                    generation: view.manifest.header.checkpoint.generation,
                    source_id: view.manifest.header.source_id.clone(),
                    session: Some(view.session.clone()),
                    storage: Box::new(view),
                    _replica_lock: None,
                })
            }
            ViewSpec::Replica(path) => open_replica(path, at),
        }
    }
}

/// A replica holds one checkpoint, the one its record names; it is
/// locked against copies while it is viewed.
fn open_replica(path: &Path, at: Option<&str>) -> Result<BackupView, ViewError> {
    let what = |error: &dyn std::fmt::Display| format!("replica {}: {error}", path.display());
    let lock = ReplicaLock::acquire(path).map_err(|error| ViewError::Refused(what(&error)))?;
    let record = read_record(path)
        .map_err(|error| ViewError::Refused(what(&error)))?
        .ok_or_else(|| {
            ViewError::Refused(what(
                &"it has no replica record (not a finished blockwatch copy)",
            ))
        })?;
    let metadata = std::fs::metadata(path).map_err(|source| ViewError::Io {
        what: format!("replica {}", path.display()),
        source,
    })?;
    if !record.matches_file(&metadata) {
        return Err(ViewError::Refused(what(
            &"it changed after its last copy, so it no longer holds the checkpoint its record names",
        )));
    }
    if let Some(wanted) = at
        && wanted != record.checkpoint
    {
        return Err(ViewError::Refused(what(&format!(
            "a replica holds one checkpoint, {}, not {wanted}",
            record.checkpoint
        ))));
    }
    let file = FileBackend::open(path, true).map_err(|error| ViewError::Refused(what(&error)))?;
    Ok(BackupView {
        description: path.display().to_string(),
        checkpoint: record.checkpoint,
        generation: record.generation,
        source_id: record.image_id,
        session: None,
        storage: Box::new(file),
        _replica_lock: Some(lock),
    })
}

impl std::fmt::Debug for BackupView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupView")
            .field("description", &self.description)
            .field("checkpoint", &self.checkpoint)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl BlockBackend for BackupView {
    fn next(&self) -> Option<&dyn BlockBackend> {
        Some(&*self.storage)
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> io::Result<()> {
        Err(read_only())
    }
    fn trim(&self, _offset: u64, _length: u64, _fua: bool) -> io::Result<()> {
        Err(read_only())
    }
    fn write_zeroes(
        &self,
        _offset: u64,
        _length: u64,
        _request: backend::ZeroRequest,
    ) -> Result<(), backend::ZeroError> {
        Err(read_only().into())
    }
}

impl fsmap::ReadAt for BackupView {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        BackendReader(self).read_exact_at(buf, offset)
    }
}

/// Any backend (a view, a snapshot) as what the ext4 map reads: reads
/// past its end fail, as a file's would.
#[derive(Clone, Copy)]
pub struct BackendReader<'a>(pub &'a dyn BlockBackend);

impl std::fmt::Debug for BackendReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackendReader({} bytes)", self.0.size_bytes())
    }
}

impl fsmap::ReadAt for BackendReader<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        if end > self.0.size_bytes() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.0.read_at(buf, offset)
    }
}

/// The error a write to a backup gets (NBD_EPERM on the wire).
pub(crate) fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

/// A read that found damage: never a silent wrong answer.
pub(crate) fn damaged(tape: &Path, block: u64, reason: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{} block {block} is damaged: {reason}", tape.display()),
    )
}
