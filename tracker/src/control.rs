//! The tracker's side of the control protocol (the `control` crate): it
//! answers checkpoint, delete-checkpoint, pin, unpin, checkpoints, changes
//! and status from a running server's socket, and from the CLI when it
//! opens the state itself (no server running), with the same code.

use control::proto::{
    ByteRange, ChangedExtentInfo, ChangesReply, ChangesRequest, CheckpointInfo, CheckpointReply,
    CheckpointsReply, ExtentStatus, FileChangesReply, FileInfo, FileMapInfo, FilesystemInfo,
    PinInfo, PinReply, StatusInfo, StatusReply,
};
use control::{Handler, Reply, Request};
use fsmap::select::Criteria;

use crate::catalog::{Checkpoint, Pin};
use crate::error::error_chain;
use crate::files::FileReport;
use crate::tracker::Tracker;

impl Handler for Tracker {
    fn handle(&self, request: Request) -> Result<Reply, String> {
        handle(self, request)
    }
}

fn failed(error: impl std::error::Error) -> String {
    error_chain(&error)
}

/// Answers one request.
pub fn handle(tracker: &Tracker, request: Request) -> Result<Reply, String> {
    match request {
        Request::Checkpoint { name } => {
            let checkpoint = tracker.checkpoint(&name).map_err(failed)?;
            Ok(Reply::Checkpoint(CheckpointReply {
                checkpoint: checkpoint_info(tracker, &checkpoint, &[]),
            }))
        }
        Request::DeleteCheckpoint { name } => {
            tracker.delete_checkpoint(&name).map_err(failed)?;
            Ok(Reply::Done)
        }
        Request::Pin {
            name,
            holder,
            reason,
        } => {
            let pin = tracker.pin(&name, &holder, &reason).map_err(failed)?;
            Ok(Reply::Pin(PinReply {
                checkpoint: name,
                pin: pin_info(&pin),
            }))
        }
        Request::Unpin { name, holder } => {
            tracker.unpin(&name, &holder).map_err(failed)?;
            Ok(Reply::Done)
        }
        Request::Checkpoints => {
            let pins = tracker.pins().map_err(failed)?;
            let checkpoints = tracker
                .checkpoints()
                .iter()
                .map(|checkpoint| checkpoint_info(tracker, checkpoint, &pins))
                .collect();
            Ok(Reply::Checkpoints(CheckpointsReply { checkpoints }))
        }
        Request::Changes(changes) if changes.files => file_changes(tracker, changes),
        Request::Changes(changes) => {
            let extents = tracker
                .changes(&changes.since, changes.until.as_deref())
                .map_err(failed)?;
            Ok(Reply::Changes(ChangesReply {
                since: changes.since,
                until: changes.until,
                granularity_bytes: tracker.granularity().bytes(),
                precision_bytes: tracker.precision_bytes(),
                changed_bytes: extents.iter().map(|e| e.length_bytes).sum(),
                extents: extents
                    .iter()
                    .map(|e| ChangedExtentInfo {
                        offset_bytes: e.offset_bytes,
                        length_bytes: e.length_bytes,
                        status: if e.saved {
                            ExtentStatus::Saved
                        } else {
                            ExtentStatus::Written
                        },
                        exact: e.exact,
                    })
                    .collect(),
            }))
        }
        Request::Status => Ok(Reply::Status(Box::new(StatusReply {
            status: status_info(tracker),
            snapshot: None,
        }))),
        Request::Snapshot { .. }
        | Request::ReleaseSnapshot { .. }
        | Request::NarrowSnapshot { .. } => Err(
            "snapshots are served by a running blockwatch serve, not by the tracker alone".into(),
        ),
    }
}

fn file_changes(tracker: &Tracker, changes: ChangesRequest) -> Result<Reply, String> {
    let criteria = Criteria {
        include: changes.include,
        exclude: changes.exclude,
        min_size_bytes: changes.min_size_bytes,
        max_size_bytes: changes.max_size_bytes,
    };
    fsmap::select::validate(&criteria)?;
    let report = tracker
        .file_changes(&changes.since, changes.until.as_deref(), &criteria)
        .map_err(failed)?;
    Ok(Reply::FileChanges(file_report(
        changes.since,
        changes.until,
        &report,
    )))
}

fn file_report(since: String, until: Option<String>, report: &FileReport) -> FileChangesReply {
    let files = report
        .listed()
        .map(|(fs, change)| FileInfo {
            status: change.kind.symbol().to_string(),
            path: change.paths.first().cloned(),
            paths: change.paths.clone(),
            old_paths: change.old_paths.clone(),
            inode: change.inode,
            partition: fs.partition,
            directory: change.is_directory,
            size_bytes: change.size_bytes,
            changed_bytes: change.changed_bytes,
            changed_ranges: change
                .changed_file_ranges
                .iter()
                .copied()
                .map(ByteRange::from)
                .collect(),
            content_changed: change.content_changed,
            selected: report.criteria.selects(change),
        })
        .collect();
    let filesystems = report
        .filesystems
        .iter()
        .map(|fs| FilesystemInfo {
            partition: fs.partition,
            offset_bytes: fs.start_bytes,
            block_size_bytes: fs.block_size,
            metadata_bytes: fs
                .changes
                .metadata_blocks
                .iter()
                .map(|(kind, blocks)| (kind.to_string(), blocks * fs.block_size))
                .collect(),
            unowned_bytes: fs.changes.unowned_blocks * fs.block_size,
        })
        .collect();
    FileChangesReply {
        since,
        until,
        files,
        filesystems,
        copy_set: report
            .copy_ranges
            .iter()
            .copied()
            .map(ByteRange::from)
            .collect(),
        copy_bytes: report.copy_ranges.iter().map(|&(_, length)| length).sum(),
        notes: report.notes.clone(),
    }
}

fn pin_info(pin: &Pin) -> PinInfo {
    PinInfo {
        holder: pin.holder.clone(),
        reason: pin.reason.clone(),
        created_unix_seconds: pin.created_unix_seconds,
    }
}

fn checkpoint_info(tracker: &Tracker, checkpoint: &Checkpoint, pins: &[Pin]) -> CheckpointInfo {
    CheckpointInfo {
        name: checkpoint.name.clone(),
        generation: checkpoint.generation,
        created_unix_seconds: checkpoint.created_unix_seconds,
        changed_bytes: tracker.changed_bytes_of(checkpoint),
        pins: pins
            .iter()
            .filter(|pin| pin.generation == checkpoint.generation)
            .map(pin_info)
            .collect(),
    }
}

/// What recovery found, and what failed since.
fn status_warnings(tracker: &Tracker) -> Vec<String> {
    let mut warnings = tracker.warnings().to_vec();
    if let Some(failure) = tracker.catalog_failure() {
        warnings.push(format!(
            "writing the catalog failed ({failure}): checkpoints (so copies), pins and the \
             clean-shutdown marker fail until it takes writes again; writes and tracking go on \
             and every change stays reported. Free space or fix the device: the next \
             checkpoint, pin or stop opens the catalog again"
        ));
    }
    warnings
}

fn status_info(tracker: &Tracker) -> StatusInfo {
    let flush = tracker.flush_stats();
    let us = |nanos: u64| nanos as f64 / 1000.0;
    StatusInfo {
        image: tracker.image_path().to_path_buf(),
        image_id: tracker
            .image_id()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect(),
        state_dir: tracker.state_dir().to_path_buf(),
        generation: tracker.generation(),
        granularity_bytes: tracker.granularity().bytes(),
        precision_bytes: tracker.precision_bytes(),
        size_bytes: tracker.size_bytes(),
        dirty_bytes: tracker.dirty_bytes(),
        unsaved_bytes: tracker.unsaved_bytes(),
        journal_bytes: tracker.journal_bytes(),
        checkpoint_count: tracker.checkpoints().len(),
        flush_count: flush.flush_count,
        flush_work_us_p50: us(flush.work_ns_p50),
        flush_work_us_p99: us(flush.work_ns_p99),
        flush_work_us_max: us(flush.work_ns_max),
        last_shutdown: if tracker.clean_start() {
            "clean"
        } else {
            "unclean or first start"
        }
        .to_string(),
        offline: tracker.is_read_only(),
        warnings: status_warnings(tracker),
        journal_failure: tracker.journal_failure(),
        file_map: tracker.files().map(|files| {
            let stats = files.stats();
            FileMapInfo {
                build_ms: stats.build_ms,
                last_update_us: stats.last_update_us,
                last_update_inodes: stats.last_update_inodes,
                attributed_flushes: stats.attributed_flushes,
                unattributed_flushes: stats.unattributed_flushes,
            }
        }),
    }
}
