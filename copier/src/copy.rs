//! A copy of a tracked disk to a target, the same steps whether the disk
//! is served or not (`TrackedDisk` says how each step is done):
//!
//! 1. the target is locked and says what it holds of this disk (or is
//!    refused: another disk's, changed behind our back, not ours at all);
//! 2. a new checkpoint closes the generation and gives the source to read
//!    the disk as it was then: the image itself with no server running
//!    (`offline.rs`: the state lock keeps a server from starting), the
//!    server's copy-before-write snapshot export otherwise (`live.rs`);
//! 3. the plan is the tracker's changes from the target's checkpoint to
//!    the new one (or everything, and the summary says why);
//! 4. workers copy it, data as data and holes as holes (`pieces.rs`);
//! 5. the target commits (synced first): only now does it hold the new
//!    checkpoint; then that checkpoint is pinned for the target, the old
//!    one unpinned, and checkpoints the copier made that nothing pins any
//!    more deleted (merged into the next).
//!
//! An interrupted copy leaves the target's claim and the old pin, so the
//! next run copies from the old checkpoint. `nbd.rs` copies any NBD
//! server's export to any of these targets but a tar, optionally by its
//! `qemu:dirty-bitmap`.

mod live;
mod nbd;
mod offline;
mod pieces;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use backend::BlockBackend;
use serde::Serialize;
use tracker::Tracker;

use control::proto::NARROW_EXTENTS_MAX;

use crate::plan::Plan;
use crate::replica::ReplicaError;
use crate::target::{Held, PARTIAL_FORMAT, Partial, SourceInfo, Target};
use pieces::{PieceError, run_plan};

pub use live::copy_live;
pub use nbd::{NbdCopyOptions, copy_from_nbd};
pub use offline::copy_offline;

/// Checkpoints the copier makes start with this; only those does it delete.
pub const CHECKPOINT_PREFIX: &str = "copy-";
/// Added to a target's pin holder for the checkpoint of a copy under way
/// (kept when it is interrupted, so a rerun can resume from it).
pub const PARTIAL_HOLDER_SUFFIX: &str = "-partial";
/// Workers reading and writing pieces at once.
pub const WORKERS_DEFAULT: usize = 4;

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
        "the snapshot at checkpoint {checkpoint:?} was dropped while the copy read it: {reason}; the replica was not advanced (a larger --snapshot-max on the server, or a copy at a quieter time, lets it finish)"
    )]
    SnapshotBroken { checkpoint: String, reason: String },
    #[error(
        "{target} holds no copy of {uri} yet: a copy driven by a dirty bitmap needs a full copy first (run it without --bitmap)"
    )]
    NeedsFullFirst { target: String, uri: String },
    #[error("{target}")]
    TargetIo {
        target: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tape(#[from] crate::tape::TapeError),
    /// Boxed: object_store's errors are large, and every copy result
    /// carries this enum.
    #[error(transparent)]
    S3(Box<crate::s3::S3Error>),
    #[error("{target} is refused as a target: {reason}")]
    TargetRefused { target: String, reason: String },
    #[error("{path}: {reason}")]
    Files { path: String, reason: String },
    #[error("the running server")]
    Control(#[from] control::CallError),
}

impl From<crate::s3::S3Error> for CopyError {
    fn from(error: crate::s3::S3Error) -> CopyError {
        CopyError::S3(Box::new(error))
    }
}

/// Told how a copy advances (a progress bar on a terminal).
pub trait Progress: Send + Sync {
    /// The plan's size, once known.
    fn planned(&self, total_bytes: u64);
    /// Another piece is done (data and holes).
    fn copied(&self, bytes: u64);
}

impl std::fmt::Debug for dyn Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}

/// Shows nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quiet;

impl Progress for Quiet {
    fn planned(&self, _total_bytes: u64) {}
    fn copied(&self, _bytes: u64) {}
}

/// What to copy where.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    pub image: PathBuf,
    pub state_dir: Option<PathBuf>,
    pub target: crate::target::TargetSpec,
    /// Copy everything and overwrite whatever the target holds.
    pub full: bool,
    pub workers: usize,
    pub progress: Arc<dyn Progress>,
}

/// What a copy did, for people and scripts (`--json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub target: String,
    /// `full` or `incremental`.
    pub kind: String,
    /// Why a full copy, when it is one.
    pub full_reason: Option<String>,
    /// The checkpoint of an interrupted copy this one finished: what that
    /// one copied and nothing wrote since was not copied again.
    pub resumed_from: Option<String>,
    pub base_checkpoint: Option<String>,
    pub checkpoint: String,
    pub extents: usize,
    pub planned_bytes: u64,
    /// Bytes read from the source and written (holes excluded).
    pub data_bytes: u64,
    pub hole_bytes: u64,
    /// From the start to the plan being ready (target checked, checkpoint
    /// taken, changes queried).
    pub plan_seconds: f64,
    pub seconds: f64,
    pub mib_per_second: f64,
    /// What a deduplicating target stored (object storage).
    pub stored: Option<crate::target::StoredTotals>,
    /// What a tar target wrote: its files, and the files deleted since.
    pub archive: Option<crate::target::TarRecord>,
}

/// A catalog transaction of the copy (`operation`: pin, unpin, delete)
/// as a durability step, which a test may cut the power before.
fn catalog_step(
    operation: &str,
    call: impl FnOnce() -> Result<(), CopyError>,
) -> Result<(), CopyError> {
    let mut outcome = None;
    crate::durability::step(crate::durability::Step::Catalog(operation), || {
        outcome = Some(call());
        Ok(())
    })
    .map_err(|source| CopyError::TargetIo {
        target: format!("the catalog ({operation})"),
        source,
    })?;
    outcome.expect("a step that was not refused ran")
}

/// An image id as the replica record writes it.
pub(crate) fn hex_id(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

pub(crate) fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A checkpoint name for a copy: `copy-UNIXTIME`, with a suffix when
/// another copy took that name in the same second.
pub fn new_checkpoint_name(tracker: &Tracker) -> String {
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

/// A checkpoint as the copy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CheckpointRow {
    pub held: Held,
    /// The holders of its pins.
    pub holders: Vec<String>,
}

/// A tracked disk as the copy drives it: directly (offline) or through
/// the running server's control socket (live).
pub(crate) trait TrackedDisk {
    fn info(&mut self) -> Result<SourceInfo, CopyError>;
    fn checkpoints(&mut self) -> Result<Vec<CheckpointRow>, CopyError>;
    /// Closes the generation with a new checkpoint and returns it with
    /// the source that reads the disk as it was then.
    fn take(&mut self) -> Result<(Held, Arc<dyn BlockBackend>), CopyError>;
    /// The changed byte ranges from `since` up to `until`, sorted.
    fn changes(&mut self, since: &str, until: &str) -> Result<Vec<(u64, u64)>, CopyError>;
    fn pin(&mut self, name: &str, holder: &str, reason: &str) -> Result<(), CopyError>;
    fn unpin(&mut self, name: &str, holder: &str) -> Result<(), CopyError>;
    fn delete(&mut self, name: &str) -> Result<(), CopyError>;
    /// The files changed from `since` up to `until`, one line each
    /// (`STATUS<TAB>PATH`, status as `blockwatch changes --files` prints
    /// it), or None when the disk has no file map or it cannot say.
    fn changed_files(&mut self, since: &str, until: &str) -> Option<Vec<String>>;
    /// What tells the source of `take` which byte ranges the copy will
    /// still read, so a snapshot stops preserving the rest; None (the
    /// default) when the source is the disk itself.
    fn narrower(&mut self, taken: &Held) -> Option<Narrower> {
        let _ = taken;
        None
    }
    /// Lets go of what `take` holds beyond the checkpoint (a snapshot).
    fn release(&mut self, taken: &Held) -> Result<(), CopyError>;
    /// The error to report for a source read that failed.
    fn read_failed(&mut self, taken: &Held, error: io::Error) -> CopyError;
}

/// Tells a snapshot the byte ranges a copy still reads (`TrackedDisk::
/// narrower`); called by the copy's workers.
pub(crate) type Narrower = Box<dyn Fn(&[(u64, u64)]) + Send + Sync>;

/// The steps of the module comment, for any tracked disk and target.
pub(crate) fn copy_tracked(
    disk: &mut dyn TrackedDisk,
    target: &mut dyn Target,
    full: bool,
    workers: usize,
    progress: &dyn Progress,
) -> Result<Summary, CopyError> {
    let started = Instant::now();
    let info = disk.info()?;
    let checkpoints = disk.checkpoints()?;
    let (base, full_reason) = if full {
        (None, Some("--full was given".to_string()))
    } else {
        match target.held(&info.id)? {
            None => (None, Some("the first copy to this target".to_string())),
            Some(held) => {
                let exists = checkpoints.iter().any(|c| c.held == held);
                if exists {
                    (Some(held), None)
                } else {
                    let reason = format!(
                        "the target's checkpoint {:?} is gone (deleted, or tracking state that could not be trusted)",
                        held.checkpoint
                    );
                    (None, Some(reason))
                }
            }
        }
    };
    // An interrupted copy on the same base whose checkpoint still exists:
    // what it finished is not copied again.
    let interrupted = target.load_partial().filter(|partial| {
        partial.source_id == info.id
            && partial.base == base
            && checkpoints.iter().any(|c| c.held == partial.taken)
    });
    let (taken, source) = disk.take()?;
    let since_base = match &base {
        Some(base) => disk.changes(&base.checkpoint, &taken.checkpoint)?,
        None => Plan::full(info.size_bytes).ranges,
    };
    let plan = match &interrupted {
        Some(partial) => Plan::resumed(
            &disk.changes(&partial.taken.checkpoint, &taken.checkpoint)?,
            &since_base,
            partial.done_below_bytes,
        ),
        None => Plan::from_ranges(since_base),
    };
    let plan_seconds = started.elapsed().as_secs_f64();
    let holder = target.holder();
    let partial_holder = format!("{holder}{PARTIAL_HOLDER_SUFFIX}");
    // A target that refuses to open (a wrong size) has nothing of this
    // copy: then nothing is pinned for a resume either.
    target.open(&info, &taken, base.as_ref())?;
    // Kept if this copy is interrupted, so that a rerun can resume from it.
    let reason = format!(
        "an interrupted copy to {} resumes from it",
        target.describe()
    );
    catalog_step("pin", || {
        disk.pin(&taken.checkpoint, &partial_holder, &reason)
    })?;
    if let Some(base) = base.as_ref().filter(|_| target.wants_files())
        && let Some(files) = disk.changed_files(&base.checkpoint, &taken.checkpoint)
    {
        target.set_files(files);
    }
    progress.planned(plan.bytes());
    let partial = |done_below_bytes| Partial {
        format: PARTIAL_FORMAT,
        source_id: info.id.clone(),
        base: base.clone(),
        taken: taken.clone(),
        done_below_bytes,
    };
    // Before anything is written: it reserves the record's space, and
    // tells a rerun that the target's changes since its commit are ours.
    target.save_partial(&partial(0))?;
    let files_copied = target
        .copy_files(source.as_ref(), &plan.ranges)
        .map(|result| files_outcome(result, progress));
    let save = |done_below| {
        if let Err(error) = target.save_partial(&partial(done_below)) {
            tracing::warn!(error = %tracker::tracker::error_chain(&error), "cannot record how far the copy got");
        }
    };
    let outcome = match files_copied {
        Some(outcome) => outcome,
        None => {
            // A copy of pieces reads nothing but the plan, and nothing
            // below the offset all its pieces are done below: the snapshot
            // needs to preserve no more (fewer copy-outs slow the disk's
            // writes while the copy runs).
            let narrower = disk.narrower(&taken);
            let still_read = |done_below: u64| {
                if let Some(narrow) = &narrower {
                    narrow(&plan.still_read(done_below, NARROW_EXTENTS_MAX));
                }
            };
            still_read(0);
            run_plan(
                source.as_ref(),
                &*target,
                &plan,
                workers,
                progress,
                &save,
                &still_read,
            )
        }
    };
    drop(source);
    if let Some(error) = outcome.error {
        save(outcome.done_below);
        return Err(match error {
            PieceError::Source(error) => disk.read_failed(&taken, error),
            PieceError::Target(error) => error,
            PieceError::Abandoned => unreachable!("the first failure is kept"),
        });
    }
    let moved = outcome.moved;
    target.commit()?;
    let _ = target.clear_partial();
    let reason = format!("{} holds it", target.describe());
    catalog_step("pin", || disk.pin(&taken.checkpoint, &holder, &reason))?;
    disk.release(&taken)?;
    // Nothing of this target's holds an older checkpoint now (its base,
    // interrupted copies), nor the new one as a copy under way.
    for checkpoint in disk.checkpoints()? {
        let mut holders = checkpoint.holders;
        let name = &checkpoint.held.checkpoint;
        if holders.contains(&partial_holder) {
            catalog_step("unpin", || disk.unpin(name, &partial_holder))?;
            holders.retain(|h| *h != partial_holder);
        }
        if checkpoint.held != taken && holders.contains(&holder) {
            catalog_step("unpin", || disk.unpin(name, &holder))?;
            holders.retain(|h| *h != holder);
        }
        if checkpoint.held != taken && name.starts_with(CHECKPOINT_PREFIX) && holders.is_empty() {
            catalog_step("delete", || disk.delete(name))?;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Summary {
        target: target.describe(),
        kind: if base.is_some() {
            "incremental"
        } else {
            "full"
        }
        .to_string(),
        full_reason,
        resumed_from: interrupted.map(|partial| partial.taken.checkpoint),
        base_checkpoint: base.map(|base| base.checkpoint),
        checkpoint: taken.checkpoint,
        extents: plan.ranges.len(),
        planned_bytes: plan.bytes(),
        data_bytes: moved.data_bytes,
        hole_bytes: moved.hole_bytes,
        plan_seconds,
        seconds,
        mib_per_second: moved.data_bytes as f64 / (1 << 20) as f64 / seconds,
        stored: target.stored(),
        archive: target.tar_record(),
    })
}

/// A copy of files as the pieces' outcome: all or nothing (a tar cannot
/// be resumed).
fn files_outcome(result: Result<u64, CopyError>, progress: &dyn Progress) -> pieces::Outcome {
    match result {
        Ok(data_bytes) => {
            progress.copied(data_bytes);
            pieces::Outcome {
                moved: pieces::Moved {
                    data_bytes,
                    hole_bytes: 0,
                },
                done_below: 0,
                error: None,
            }
        }
        Err(error) => pieces::Outcome {
            moved: pieces::Moved::default(),
            done_below: 0,
            error: Some(PieceError::Target(error)),
        },
    }
}
