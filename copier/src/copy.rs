//! A copy of a disk to a replica, with no server running: the state
//! directory is opened for writing (its lock keeps a server from starting)
//! and the image is read directly under a shared lock, so nothing writes
//! the disk while it is copied.
//!
//! Steps: lock the replica; decide full or incremental from its record; a
//! new checkpoint closes the generation; the plan is the tracker's changes
//! since the replica's checkpoint (or everything); workers copy it, data
//! as data and holes as holes; the replica is synced and its record
//! committed; only then is the new checkpoint pinned for this replica, the
//! old one unpinned, and checkpoints the copier made that nothing pins any
//! more deleted (merged into the next). An interrupted copy leaves the old
//! record and the old pin, so the next run copies from the old checkpoint.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use backend::{BlockBackend, FileBackend, STATE_ZERO};
use serde::Serialize;
use tracker::{Tracker, TrackerOptions};

use crate::nbd_source::NbdSource;
use crate::plan::{PIECE_BYTES_MAX, Plan};
use crate::replica::{
    RECORD_FORMAT, Replica, ReplicaError, ReplicaLock, ReplicaRecord, read_record,
};

/// Checkpoints the copier makes start with this; only those does it delete.
pub const CHECKPOINT_PREFIX: &str = "copy-";
/// Workers reading and writing pieces at once.
pub const WORKERS_DEFAULT: usize = 4;
/// Extents asked of the source per piece (holes and data alternate).
const EXTENTS_PER_PIECE_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("tracking state of {image}")]
    Open {
        image: PathBuf,
        source: tracker::OpenError,
    },
    #[error("reading {image}")]
    Source {
        image: PathBuf,
        source: std::io::Error,
    },
    #[error("opening {image}")]
    SourceOpen {
        image: PathBuf,
        source: backend::OpenError,
    },
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("checkpoint")]
    Checkpoint(#[from] tracker::CheckpointError),
    #[error("changes")]
    Query(#[from] tracker::QueryError),
    #[error("closing the tracking state")]
    Close(#[from] tracker::CloseError),
    #[error(
        "{replica} exists and has no blockwatch record: it may hold someone's data; copy with --full to overwrite it"
    )]
    NotAReplica { replica: PathBuf },
    #[error(
        "{replica} is a replica of another disk (image id {theirs}, this one is {ours}); copy with --full to overwrite it"
    )]
    Foreign {
        replica: PathBuf,
        theirs: String,
        ours: String,
    },
    #[error(
        "{replica} was changed since the copy of checkpoint {checkpoint:?} (its size or mtime differ from its record); copy with --full to overwrite it"
    )]
    ChangedBehindOurBack {
        replica: PathBuf,
        checkpoint: String,
    },
    #[error("connecting to {uri}")]
    Connect {
        uri: String,
        source: nbd_client::ConnectError,
    },
    #[error("reading {uri}")]
    Remote { uri: String, source: std::io::Error },
    #[error(
        "{replica} holds no copy of {uri} yet: a copy driven by a dirty bitmap needs a full copy first (run it without --bitmap)"
    )]
    NeedsFullFirst { replica: PathBuf, uri: String },
    #[error("the running server")]
    Control(#[from] control::CallError),
}

/// What to copy where.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    pub image: PathBuf,
    pub state_dir: Option<PathBuf>,
    pub replica: PathBuf,
    /// Copy everything and overwrite whatever the replica holds.
    pub full: bool,
    pub workers: usize,
}

/// What a copy did, for people and scripts (`--json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub target: String,
    /// `full` or `incremental`.
    pub kind: String,
    /// Why a full copy, when it is one.
    pub full_reason: Option<String>,
    pub base_checkpoint: Option<String>,
    pub checkpoint: String,
    pub extents: usize,
    pub planned_bytes: u64,
    /// Bytes read from the source and written (holes excluded).
    pub data_bytes: u64,
    pub hole_bytes: u64,
    pub seconds: f64,
    pub mib_per_second: f64,
}

/// Copies `options.image` to its replica; see the module comment.
pub fn copy_offline(options: &CopyOptions) -> Result<Summary, CopyError> {
    let started = Instant::now();
    let replica_path = absolute_replica(&options.replica)?;
    let source =
        FileBackend::open(&options.image, true).map_err(|source| CopyError::SourceOpen {
            image: options.image.clone(),
            source,
        })?;
    let size_bytes = source.size_bytes();
    let tracker = Tracker::open(
        &TrackerOptions {
            image: options.image.clone(),
            state_dir: options.state_dir.clone(),
            granularity_bytes: None,
            precision_bytes: None,
            journal_wrapper: None,
            files: true,
        },
        size_bytes,
    )
    .map_err(|source| CopyError::Open {
        image: options.image.clone(),
        source,
    })?;
    tracker.start();
    let result = copy_with(&tracker, &source, &replica_path, options);
    let closed = tracker.close();
    let mut summary = result?;
    closed?;
    summary.seconds = started.elapsed().as_secs_f64();
    summary.mib_per_second = summary.data_bytes as f64 / (1 << 20) as f64 / summary.seconds;
    Ok(summary)
}

/// The replica's path made absolute (its record and pin name it so).
fn absolute_replica(replica: &Path) -> Result<PathBuf, CopyError> {
    std::path::absolute(replica).map_err(|source| {
        CopyError::Replica(ReplicaError::Io {
            path: replica.to_path_buf(),
            source,
        })
    })
}

/// An image id as the replica record writes it.
pub(crate) fn hex_id(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The pin holder for a replica: a name without spaces, stable per path.
pub fn holder_of(replica: &Path) -> String {
    let path = replica.as_os_str().as_encoded_bytes();
    format!("replica-{:08x}", crc32c::crc32c(path))
}

/// The base checkpoint of an incremental copy, or why it must be full.
fn base_of(
    tracker: &Tracker,
    replica: &Path,
    full: bool,
) -> Result<(Option<String>, Option<String>), CopyError> {
    if full {
        return Ok((None, Some("--full was given".into())));
    }
    let Some(record) = checked_record(replica, &hex_id(&tracker.image_id()))? else {
        return Ok((None, Some("the first copy to this replica".into())));
    };
    let base = tracker
        .checkpoints()
        .into_iter()
        .find(|c| c.name == record.checkpoint && c.generation == record.generation);
    Ok(match base {
        Some(base) => (Some(base.name), None),
        None => (
            None,
            Some(format!(
                "the replica's checkpoint {:?} is gone (deleted, or tracking state that could not be trusted)",
                record.checkpoint
            )),
        ),
    })
}

/// The replica's record when it is a replica of `source_id` and nobody
/// changed it since; None when there is no replica yet (or an empty file).
fn checked_record(replica: &Path, source_id: &str) -> Result<Option<ReplicaRecord>, CopyError> {
    let metadata = std::fs::metadata(replica).ok();
    let record = match read_record(replica)? {
        Some(record) => record,
        None if metadata.as_ref().is_some_and(|m| m.len() > 0) => {
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
    if !metadata.as_ref().is_some_and(|m| record.matches_file(m)) {
        return Err(CopyError::ChangedBehindOurBack {
            replica: replica.to_path_buf(),
            checkpoint: record.checkpoint,
        });
    }
    Ok(Some(record))
}

/// The record a committed copy leaves: what `replica` now holds.
fn new_record(
    replica: &Replica,
    source_id: String,
    source_size_bytes: u64,
    granularity_bytes: u64,
    checkpoint: &str,
    generation: u64,
) -> Result<ReplicaRecord, CopyError> {
    use std::os::unix::fs::MetadataExt;
    let metadata = replica.metadata()?;
    Ok(ReplicaRecord {
        format: RECORD_FORMAT,
        image_id: source_id,
        source_size_bytes,
        granularity_bytes,
        checkpoint: checkpoint.to_string(),
        generation,
        copied_unix_seconds: unix_seconds(),
        replica_size_bytes: metadata.len(),
        replica_mtime_seconds: metadata.mtime(),
        replica_mtime_nanoseconds: metadata.mtime_nsec(),
    })
}

fn new_checkpoint_name(tracker: &Tracker) -> String {
    let stem = format!("{CHECKPOINT_PREFIX}{}", unix_seconds());
    let names: Vec<String> = tracker.checkpoints().into_iter().map(|c| c.name).collect();
    (0..)
        .map(|n| {
            if n == 0 {
                stem.clone()
            } else {
                format!("{stem}-{n}")
            }
        })
        .find(|name| !names.contains(name))
        .expect("some suffix is free")
}

fn copy_with(
    tracker: &Tracker,
    source: &FileBackend,
    replica_path: &Path,
    options: &CopyOptions,
) -> Result<Summary, CopyError> {
    // The replica's lock first, then its record: nothing of it is touched
    // before the copy knows it may.
    let lock = ReplicaLock::acquire(replica_path)?;
    let (base, full_reason) = base_of(tracker, replica_path, options.full)?;
    let replica = Replica::open(replica_path, source.size_bytes(), lock)?;
    let checkpoint = tracker.checkpoint(&new_checkpoint_name(tracker))?;
    let plan = match &base {
        Some(base) => Plan::from_changes(&tracker.changes(base, Some(&checkpoint.name))?),
        None => Plan::full(source.size_bytes()),
    };
    let (data_bytes, hole_bytes) = run_plan(source, &replica, &plan, options.workers.max(1))
        .map_err(|error| match error {
            PieceError::Source(source) => CopyError::Source {
                image: options.image.clone(),
                source,
            },
            PieceError::Replica(error) => CopyError::Replica(error),
        })?;
    replica.sync()?;
    replica.commit(&new_record(
        &replica,
        hex_id(&tracker.image_id()),
        source.size_bytes(),
        tracker.granularity().bytes(),
        &checkpoint.name,
        checkpoint.generation,
    )?)?;
    let holder = holder_of(replica_path);
    let reason = format!("the replica {} holds it", replica_path.display());
    tracker.pin(&checkpoint.name, &holder, &reason)?;
    if let Some(base) = &base {
        // Its pin may be gone already if an earlier run stopped after its
        // commit; either way nothing of ours holds it now.
        let _ = tracker.unpin(base, &holder);
    }
    merge_away_unneeded(tracker, &checkpoint.name)?;
    Ok(Summary {
        target: format!("file:{}", replica_path.display()),
        kind: if base.is_some() {
            "incremental"
        } else {
            "full"
        }
        .to_string(),
        full_reason,
        base_checkpoint: base,
        checkpoint: checkpoint.name,
        extents: plan.ranges.len(),
        planned_bytes: plan.bytes(),
        data_bytes,
        hole_bytes,
        seconds: 0.0,
        mib_per_second: 0.0,
    })
}

/// What to copy from an NBD server.
#[derive(Debug, Clone)]
pub struct NbdCopyOptions {
    pub uri: String,
    /// Copy only what the server's `qemu:dirty-bitmap:NAME` marks, onto a
    /// replica that holds an earlier copy of the same export.
    pub bitmap: Option<String>,
    pub replica: PathBuf,
    pub full: bool,
    pub workers: usize,
}

/// Copies an NBD export to a replica: everything, or with a bitmap the
/// regions it marks. The user's QEMU checkpoints decide what a bitmap
/// covers; the replica's record names the export and the bitmap copied.
pub fn copy_from_nbd(options: &NbdCopyOptions) -> Result<Summary, CopyError> {
    let started = Instant::now();
    let replica_path = absolute_replica(&options.replica)?;
    let source_id = format!("nbd:{}", options.uri);
    let lock = ReplicaLock::acquire(&replica_path)?;
    let bitmap = options.bitmap.as_ref().filter(|_| !options.full);
    let record = if options.full {
        None
    } else {
        checked_record(&replica_path, &source_id)?
    };
    if bitmap.is_some() && record.is_none() {
        return Err(CopyError::NeedsFullFirst {
            replica: replica_path,
            uri: options.uri.clone(),
        });
    }
    let connect_options = nbd_client::ConnectOptions {
        dirty_bitmap: bitmap.cloned(),
        ..Default::default()
    };
    let client =
        nbd_client::Client::connect_with(&options.uri, &connect_options).map_err(|source| {
            CopyError::Connect {
                uri: options.uri.clone(),
                source,
            }
        })?;
    let source = NbdSource::new(client);
    let remote = |source| CopyError::Remote {
        uri: options.uri.clone(),
        source,
    };
    let plan = match bitmap {
        Some(name) => source.dirty_plan(name).map_err(remote)?,
        None => Plan::full(source.size_bytes()),
    };
    let replica = Replica::open(&replica_path, source.size_bytes(), lock)?;
    let (data_bytes, hole_bytes) = run_plan(&source, &replica, &plan, options.workers.max(1))
        .map_err(|error| match error {
            PieceError::Source(error) => remote(error),
            PieceError::Replica(error) => CopyError::Replica(error),
        })?;
    replica.sync()?;
    let holds = bitmap.map_or_else(
        || "(full copy)".to_string(),
        |name| format!("bitmap {name}"),
    );
    replica.commit(&new_record(
        &replica,
        source_id,
        source.size_bytes(),
        0,
        &holds,
        0,
    )?)?;
    drop(source); // sends NBD_CMD_DISC
    let seconds = started.elapsed().as_secs_f64();
    Ok(Summary {
        target: format!("file:{}", replica_path.display()),
        kind: if bitmap.is_some() {
            "incremental"
        } else {
            "full"
        }
        .to_string(),
        full_reason: bitmap.is_none().then(|| {
            if options.full {
                "--full was given"
            } else {
                "no --bitmap"
            }
            .to_string()
        }),
        base_checkpoint: record.map(|record| record.checkpoint),
        checkpoint: holds,
        extents: plan.ranges.len(),
        planned_bytes: plan.bytes(),
        data_bytes,
        hole_bytes,
        seconds,
        mib_per_second: data_bytes as f64 / (1 << 20) as f64 / seconds,
    })
}

/// A copy of a disk a server is serving: through its control socket the
/// server takes a copy-before-write snapshot (the checkpoint that closes
/// the generation) and serves it as an NBD export; the copy reads that
/// export while the disk stays writable, then commits, pins and releases.
/// If the copier dies, its control connection closes and the server
/// releases the snapshot.
pub fn copy_live(options: &CopyOptions) -> Result<Summary, CopyError> {
    use control::Request;
    use control::proto::{
        ChangesReply, ChangesRequest, CheckpointsReply, SnapshotReply, StatusReply,
    };
    let started = Instant::now();
    let replica_path = absolute_replica(&options.replica)?;
    let image = std::path::absolute(&options.image).map_err(|source| CopyError::Source {
        image: options.image.clone(),
        source,
    })?;
    let state_dir = options
        .state_dir
        .clone()
        .unwrap_or_else(|| tracker::tracker::default_state_dir(&image));
    let mut server = control::transport::Connection::open(&state_dir)?;
    let StatusReply { status } = server.call(&Request::Status)?;
    let lock = ReplicaLock::acquire(&replica_path)?;
    let record = if options.full {
        None
    } else {
        checked_record(&replica_path, &status.image_id)?
    };
    let CheckpointsReply { checkpoints } = server.call(&Request::Checkpoints)?;
    let base = record.as_ref().and_then(|record| {
        checkpoints
            .iter()
            .find(|c| c.name == record.checkpoint && c.generation == record.generation)
            .map(|c| c.name.clone())
    });
    let full_reason = match (&record, &base) {
        _ if options.full => Some("--full was given".to_string()),
        (None, _) => Some("the first copy to this replica".to_string()),
        (Some(record), None) => Some(format!(
            "the replica's checkpoint {:?} is gone (deleted, or tracking state that could not be trusted)",
            record.checkpoint
        )),
        (Some(_), Some(_)) => None,
    };
    let snapshot: SnapshotReply = server.call(&Request::Snapshot {
        name: None,
        max_store_bytes: None,
    })?;
    let plan = match &base {
        Some(base) => {
            let changes: ChangesReply = server.call(&Request::Changes(ChangesRequest {
                since: base.clone(),
                until: Some(snapshot.checkpoint.clone()),
                ..ChangesRequest::default()
            }))?;
            Plan::from_ranges(
                changes
                    .extents
                    .iter()
                    .map(|e| (e.offset_bytes, e.length_bytes)),
            )
        }
        None => Plan::full(status.size_bytes),
    };
    let client =
        nbd_client::Client::connect_with(&snapshot.uri, &nbd_client::ConnectOptions::default())
            .map_err(|source| CopyError::Connect {
                uri: snapshot.uri.clone(),
                source,
            })?;
    let source = NbdSource::new(client);
    let replica = Replica::open(&replica_path, source.size_bytes(), lock)?;
    let remote = |source| CopyError::Remote {
        uri: snapshot.uri.clone(),
        source,
    };
    let (data_bytes, hole_bytes) = run_plan(&source, &replica, &plan, options.workers.max(1))
        .map_err(|error| match error {
            PieceError::Source(error) => remote(error),
            PieceError::Replica(error) => CopyError::Replica(error),
        })?;
    drop(source);
    replica.sync()?;
    replica.commit(&new_record(
        &replica,
        status.image_id.clone(),
        status.size_bytes,
        status.granularity_bytes,
        &snapshot.checkpoint,
        snapshot.generation,
    )?)?;
    let holder = holder_of(&replica_path);
    server.call::<control::proto::PinReply>(&Request::Pin {
        name: snapshot.checkpoint.clone(),
        holder: holder.clone(),
        reason: format!("the replica {} holds it", replica_path.display()),
    })?;
    if let Some(base) = &base {
        let _ = server.call::<Ignored>(&Request::Unpin {
            name: base.clone(),
            holder,
        });
    }
    server.call::<Ignored>(&Request::ReleaseSnapshot {
        name: snapshot.checkpoint.clone(),
    })?;
    let CheckpointsReply { checkpoints } = server.call(&Request::Checkpoints)?;
    for checkpoint in checkpoints {
        if checkpoint.name != snapshot.checkpoint
            && checkpoint.name.starts_with(CHECKPOINT_PREFIX)
            && checkpoint.pins.is_empty()
        {
            server.call::<Ignored>(&Request::DeleteCheckpoint {
                name: checkpoint.name,
            })?;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Summary {
        target: format!("file:{}", replica_path.display()),
        kind: if base.is_some() {
            "incremental"
        } else {
            "full"
        }
        .to_string(),
        full_reason,
        base_checkpoint: base,
        checkpoint: snapshot.checkpoint,
        extents: plan.ranges.len(),
        planned_bytes: plan.bytes(),
        data_bytes,
        hole_bytes,
        seconds,
        mib_per_second: data_bytes as f64 / (1 << 20) as f64 / seconds,
    })
}

/// A reply whose fields nobody needs (only its `ok`).
#[derive(Debug, serde::Deserialize)]
struct Ignored {}

/// Deletes the checkpoints the copier made that no pin holds any more,
/// except `keep` (the one just made): their changes merge into the next,
/// so no other checkpoint's answer changes.
fn merge_away_unneeded(tracker: &Tracker, keep: &str) -> Result<(), CopyError> {
    let pinned: Vec<u64> = tracker.pins()?.iter().map(|pin| pin.generation).collect();
    for checkpoint in tracker.checkpoints() {
        if checkpoint.name != keep
            && checkpoint.name.starts_with(CHECKPOINT_PREFIX)
            && !pinned.contains(&checkpoint.generation)
        {
            tracker.delete_checkpoint(&checkpoint.name)?;
        }
    }
    Ok(())
}

enum PieceError {
    Source(std::io::Error),
    Replica(ReplicaError),
}

/// Copies the plan with `workers` threads taking pieces in order. Returns
/// (data bytes, hole bytes).
fn run_plan(
    source: &dyn BlockBackend,
    replica: &Replica,
    plan: &Plan,
    workers: usize,
) -> Result<(u64, u64), PieceError> {
    let pieces: Vec<(u64, u64)> = plan.pieces().collect();
    let next = AtomicUsize::new(0);
    let data_bytes = AtomicU64::new(0);
    let hole_bytes = AtomicU64::new(0);
    let failure: Mutex<Option<PieceError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..workers.min(pieces.len().max(1)) {
            scope.spawn(|| {
                let mut buffer = vec![0u8; PIECE_BYTES_MAX as usize];
                let mut extents = Vec::new();
                loop {
                    if failure.lock().expect("failure lock").is_some() {
                        return;
                    }
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(offset, length)) = pieces.get(index) else {
                        return;
                    };
                    match copy_piece(source, replica, offset, length, &mut buffer, &mut extents) {
                        Ok((data, holes)) => {
                            data_bytes.fetch_add(data, Ordering::Relaxed);
                            hole_bytes.fetch_add(holes, Ordering::Relaxed);
                        }
                        Err(error) => {
                            failure.lock().expect("failure lock").get_or_insert(error);
                            return;
                        }
                    }
                }
            });
        }
    });
    match failure.into_inner().expect("failure lock") {
        Some(error) => Err(error),
        None => Ok((data_bytes.into_inner(), hole_bytes.into_inner())),
    }
}

/// One piece: its data read and written, its holes made holes.
fn copy_piece(
    source: &dyn BlockBackend,
    replica: &Replica,
    offset: u64,
    length: u64,
    buffer: &mut [u8],
    extents: &mut Vec<backend::Extent>,
) -> Result<(u64, u64), PieceError> {
    extents.clear();
    if source.can_extents() {
        source
            .extents(offset, length, EXTENTS_PER_PIECE_MAX, extents)
            .map_err(PieceError::Source)?;
    }
    let (mut data, mut holes) = (0, 0);
    let mut position = offset;
    let end = offset + length;
    for extent in extents.iter() {
        if position >= end {
            break;
        }
        let part = extent.length_bytes.min(end - position);
        // What reads as zeroes is made zero (a hole) on the replica.
        if extent.flags & STATE_ZERO != 0 {
            replica.zero(position, part).map_err(PieceError::Replica)?;
            holes += part;
        } else {
            copy_data(source, replica, position, part, buffer)?;
            data += part;
        }
        position += part;
    }
    // Whatever the extents did not describe is copied as data.
    if position < end {
        copy_data(source, replica, position, end - position, buffer)?;
        data += end - position;
    }
    Ok((data, holes))
}

fn copy_data(
    source: &dyn BlockBackend,
    replica: &Replica,
    offset: u64,
    length: u64,
    buffer: &mut [u8],
) -> Result<(), PieceError> {
    debug_assert!(length <= buffer.len() as u64);
    let piece = &mut buffer[..length as usize];
    source.read_at(piece, offset).map_err(PieceError::Source)?;
    replica.write_at(piece, offset).map_err(PieceError::Replica)
}
