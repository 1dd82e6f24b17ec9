//! `verify`: a replica compared, region by region (crc32c), with its
//! source as of the checkpoint the replica holds. With no server running
//! the source is the image itself; with one, a copy-before-write snapshot
//! the server takes for the verify (its checkpoint is deleted again, its
//! changes merging into the next). Regions written since the replica's
//! checkpoint cannot be compared and are skipped and counted.

use std::path::{Path, PathBuf};
use std::time::Instant;

use backend::{BlockBackend, FileBackend};
use serde::Serialize;
use tracker::catalog::CatalogError;
use tracker::{OpenError, Tracker, TrackerOptions};

use crate::plan::PIECE_BYTES_MAX;
use crate::replica::{ReplicaError, read_record};
use crate::view::BackupView;

/// What a verify compares with the source.
#[derive(Debug)]
pub enum VerifyTarget {
    /// A replica file, its record beside it.
    File(PathBuf),
    /// An NBD export a copy went to, its record in the source's state
    /// directory (`targets/`).
    Nbd(String),
    /// A tape chain or an object storage session, at the checkpoint its
    /// view shows (every byte read checked against its own checksum too).
    Backup(Box<BackupView>),
}

/// What a target holds: the source's identity, and its checkpoint.
#[derive(Debug)]
struct Holding {
    image_id: String,
    checkpoint: String,
    generation: u64,
}

/// A target opened for reading.
enum Opened<'a> {
    Owned(Box<dyn BlockBackend>),
    Borrowed(&'a dyn BlockBackend),
}

impl Opened<'_> {
    fn backend(&self) -> &dyn BlockBackend {
        match self {
            Opened::Owned(backend) => backend.as_ref(),
            Opened::Borrowed(backend) => *backend,
        }
    }
}

impl VerifyTarget {
    /// The name errors and reports use.
    fn label(&self) -> PathBuf {
        match self {
            VerifyTarget::File(path) => path.clone(),
            VerifyTarget::Nbd(uri) => PathBuf::from(uri),
            VerifyTarget::Backup(view) => PathBuf::from(&view.description),
        }
    }

    fn describe(&self) -> String {
        match self {
            VerifyTarget::File(path) => format!("file:{}", path.display()),
            VerifyTarget::Nbd(uri) => uri.clone(),
            VerifyTarget::Backup(view) => match &view.session {
                Some(session) => format!("{} (session {session})", view.description),
                None => view.description.clone(),
            },
        }
    }

    /// What it holds, from its record (NoRecord without one) or, for a
    /// backup, from the session its view shows.
    fn holding(&self, state_dir: &Path) -> Result<Holding, VerifyError> {
        let key = match self {
            VerifyTarget::File(path) => path.clone(),
            VerifyTarget::Nbd(uri) => state_dir
                .join(crate::target::TARGETS_DIR)
                .join(crate::target::nbd_holder(uri)),
            VerifyTarget::Backup(view) => {
                return Ok(Holding {
                    image_id: view.source_id.clone(),
                    checkpoint: view.checkpoint.clone(),
                    generation: view.generation,
                });
            }
        };
        let record = read_record(&key)?.ok_or_else(|| VerifyError::NoRecord {
            replica: self.label(),
        })?;
        Ok(Holding {
            image_id: record.image_id,
            checkpoint: record.checkpoint,
            generation: record.generation,
        })
    }

    fn open(&self) -> Result<Opened<'_>, VerifyError> {
        match self {
            VerifyTarget::File(path) => Ok(Opened::Owned(Box::new(
                FileBackend::open(path, true).map_err(|source| VerifyError::SourceOpen {
                    image: path.clone(),
                    source,
                })?,
            ))),
            VerifyTarget::Nbd(uri) => {
                let client =
                    nbd_client::Client::connect(uri).map_err(|source| VerifyError::Connect {
                        uri: uri.clone(),
                        source,
                    })?;
                Ok(Opened::Owned(Box::new(crate::nbd_source::NbdSource::new(
                    client,
                ))))
            }
            VerifyTarget::Backup(view) => Ok(Opened::Borrowed(view.as_ref())),
        }
    }
}

fn state_dir_of(image: &Path, state_dir: Option<&Path>) -> Result<PathBuf, VerifyError> {
    let image = std::path::absolute(image).map_err(|source| VerifyError::Read {
        path: image.to_path_buf(),
        source,
    })?;
    Ok(state_dir.map_or_else(
        || tracker::tracker::default_state_dir(&image),
        Path::to_path_buf,
    ))
}

/// Differing regions listed in a report (the count is always exact).
pub const DIFFERING_LISTED_MAX: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{replica} has no blockwatch record: nothing says what it should hold")]
    NoRecord { replica: PathBuf },
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("tracking state of {image}")]
    Open { image: PathBuf, source: OpenError },
    #[error("opening {image}")]
    SourceOpen {
        image: PathBuf,
        source: backend::OpenError,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{replica} is a copy of another disk")]
    Foreign { replica: PathBuf },
    #[error(
        "{replica} holds checkpoint {checkpoint:?}, which the tracking state no longer has: the source as of then is unknown"
    )]
    CheckpointGone {
        replica: PathBuf,
        checkpoint: String,
    },
    #[error("{replica} is {replica_bytes} bytes, the source {source_bytes}")]
    SizeMismatch {
        replica: PathBuf,
        replica_bytes: u64,
        source_bytes: u64,
    },
    #[error("changes")]
    Query(#[from] tracker::QueryError),
    #[error("the running server")]
    Control(#[from] control::CallError),
    #[error("connecting to {uri}")]
    Connect {
        uri: String,
        source: nbd_client::ConnectError,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyReport {
    pub target: String,
    pub checkpoint: String,
    pub granularity_bytes: u64,
    pub regions_compared: u64,
    /// Written since the checkpoint: not comparable.
    pub regions_skipped: u64,
    pub regions_differing: u64,
    /// (offset, length) of differing regions, at most DIFFERING_LISTED_MAX.
    pub differing: Vec<(u64, u64)>,
    pub seconds: f64,
}

/// Opens the state for a query: read-only, or writable when a crash left
/// the catalog needing a repair (then there was no clean marker to lose).
fn open_for_query(options: &TrackerOptions, size_bytes: u64) -> Result<Tracker, OpenError> {
    match Tracker::open_read_only(options, size_bytes) {
        Err(OpenError::Catalog {
            source: CatalogError::NeedsRepair,
            ..
        }) => {
            let tracker = Tracker::open(options, size_bytes)?;
            tracker.start();
            Ok(tracker)
        }
        other => other,
    }
}

pub fn verify_offline(
    image: &Path,
    state_dir: Option<&Path>,
    target: &VerifyTarget,
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let record = target.holding(&state_dir_of(image, state_dir)?)?;
    let replica = target.label();
    let replica = replica.as_path();
    let source = FileBackend::open(image, true).map_err(|source| VerifyError::SourceOpen {
        image: image.to_path_buf(),
        source,
    })?;
    let options = TrackerOptions {
        image: image.to_path_buf(),
        state_dir: state_dir.map(Path::to_path_buf),
        granularity_bytes: None,
        precision_bytes: None,
        journal_wrapper: None,
        files: false,
    };
    let tracker =
        open_for_query(&options, source.size_bytes()).map_err(|source| VerifyError::Open {
            image: image.to_path_buf(),
            source,
        })?;
    let report = if crate::copy::hex_id(&tracker.image_id()) == record.image_id {
        let known = tracker
            .checkpoints()
            .iter()
            .any(|c| c.name == record.checkpoint && c.generation == record.generation);
        if known {
            tracker
                .changes(&record.checkpoint, None)
                .map_err(VerifyError::from)
                .and_then(|changes| {
                    let written: Vec<(u64, u64)> = changes
                        .iter()
                        .map(|e| (e.offset_bytes, e.length_bytes))
                        .collect();
                    compare(
                        &source,
                        tracker.image_path(),
                        target,
                        &record.checkpoint,
                        tracker.granularity().bytes(),
                        &written,
                    )
                })
        } else {
            Err(VerifyError::CheckpointGone {
                replica: replica.to_path_buf(),
                checkpoint: record.checkpoint.clone(),
            })
        }
    } else {
        Err(VerifyError::Foreign {
            replica: replica.to_path_buf(),
        })
    };
    if !tracker.is_read_only() {
        let _ = tracker.close();
    }
    let mut report = report?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Compares `replica` with `source` region by region, skipping the
/// regions `written` (since the replica's checkpoint) touches.
fn compare(
    source: &dyn BlockBackend,
    source_path: &Path,
    target: &VerifyTarget,
    checkpoint: &str,
    region_bytes: u64,
    written: &[(u64, u64)],
) -> Result<VerifyReport, VerifyError> {
    let read_error = |path: &Path, source| VerifyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let replica = target.label();
    let replica = replica.as_path();
    let opened = target.open()?;
    let file = opened.backend();
    let replica_bytes = file.size_bytes();
    let size_bytes = source.size_bytes();
    if replica_bytes != size_bytes {
        return Err(VerifyError::SizeMismatch {
            replica: replica.to_path_buf(),
            replica_bytes,
            source_bytes: size_bytes,
        });
    }
    let region_count = size_bytes.div_ceil(region_bytes);
    let mut skipped = vec![false; region_count as usize];
    for &(offset, length) in written {
        let first = (offset / region_bytes).min(region_count);
        let end = (offset + length).div_ceil(region_bytes).min(region_count);
        skipped[first as usize..end as usize].fill(true);
    }
    let chunk_bytes = PIECE_BYTES_MAX.max(region_bytes);
    let mut ours = vec![0u8; chunk_bytes as usize];
    let mut theirs = vec![0u8; chunk_bytes as usize];
    let mut report = VerifyReport {
        target: target.describe(),
        checkpoint: checkpoint.to_string(),
        granularity_bytes: region_bytes,
        regions_compared: 0,
        regions_skipped: skipped.iter().filter(|&&s| s).count() as u64,
        regions_differing: 0,
        differing: Vec::new(),
        seconds: 0.0,
    };
    let mut offset = 0;
    while offset < size_bytes {
        let length = chunk_bytes.min(size_bytes - offset);
        let (ours, theirs) = (&mut ours[..length as usize], &mut theirs[..length as usize]);
        source
            .read_at(ours, offset)
            .map_err(|e| read_error(source_path, e))?;
        file.read_at(theirs, offset)
            .map_err(|e| read_error(replica, e))?;
        for (index, (a, b)) in ours
            .chunks(region_bytes as usize)
            .zip(theirs.chunks(region_bytes as usize))
            .enumerate()
        {
            let region = offset / region_bytes + index as u64;
            if skipped[region as usize] {
                continue;
            }
            report.regions_compared += 1;
            if crc32c::crc32c(a) != crc32c::crc32c(b) {
                report.regions_differing += 1;
                if report.differing.len() < DIFFERING_LISTED_MAX {
                    report
                        .differing
                        .push((region * region_bytes, a.len() as u64));
                }
            }
        }
        offset += length;
    }
    Ok(report)
}

/// Verifies a replica of a served disk against a snapshot the server
/// takes for it; see the module comment.
pub fn verify_live(
    image: &Path,
    state_dir: Option<&Path>,
    target: &VerifyTarget,
) -> Result<VerifyReport, VerifyError> {
    use control::Request;
    use control::proto::{
        ChangesReply, ChangesRequest, CheckpointsReply, SnapshotReply, StatusReply,
    };
    let started = Instant::now();
    let state_dir = state_dir_of(image, state_dir)?;
    let record = target.holding(&state_dir)?;
    let replica = target.label();
    let replica = replica.as_path();
    let mut server = control::transport::Connection::open(&state_dir)?;
    let StatusReply { status, .. } = server.call(&Request::Status)?;
    if status.image_id != record.image_id {
        return Err(VerifyError::Foreign {
            replica: replica.to_path_buf(),
        });
    }
    let CheckpointsReply { checkpoints } = server.call(&Request::Checkpoints)?;
    if !checkpoints
        .iter()
        .any(|c| c.name == record.checkpoint && c.generation == record.generation)
    {
        return Err(VerifyError::CheckpointGone {
            replica: replica.to_path_buf(),
            checkpoint: record.checkpoint,
        });
    }
    let snapshot: SnapshotReply = server.call(&Request::Snapshot {
        name: None,
        max_store_bytes: None,
    })?;
    let result = (|| {
        let changes: ChangesReply = server.call(&Request::Changes(ChangesRequest {
            since: record.checkpoint.clone(),
            until: Some(snapshot.checkpoint.clone()),
            ..ChangesRequest::default()
        }))?;
        let written: Vec<(u64, u64)> = changes
            .extents
            .iter()
            .map(|e| (e.offset_bytes, e.length_bytes))
            .collect();
        let client =
            nbd_client::Client::connect(&snapshot.uri).map_err(|source| VerifyError::Connect {
                uri: snapshot.uri.clone(),
                source,
            })?;
        let source = crate::nbd_source::NbdSource::new(client);
        compare(
            &source,
            Path::new(&snapshot.uri),
            target,
            &record.checkpoint,
            status.granularity_bytes,
            &written,
        )
    })();
    // The verify's own checkpoint goes again: its changes merge into the
    // next generation, so nobody's answers change.
    let _ = server.call::<serde_json::Value>(&Request::ReleaseSnapshot {
        name: snapshot.checkpoint.clone(),
    });
    let _ = server.call::<serde_json::Value>(&Request::DeleteCheckpoint {
        name: snapshot.checkpoint,
    });
    let mut report = result?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
