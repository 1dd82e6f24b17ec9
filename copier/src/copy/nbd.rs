//! A copy of any NBD server's export to any target of pieces (a replica,
//! an NBD export, a tape, object storage): everything, or with a bitmap
//! the regions its `qemu:dirty-bitmap:NAME` marks. The user's QEMU
//! checkpoints decide what a bitmap covers; the target records the export
//! as its source, and each copy as a checkpoint of its own
//! (`copy-UNIXTIME`, numbered in sequence), so that a tape chain or a
//! repository of such copies names every session apart.

use std::path::PathBuf;
use std::time::Instant;

use backend::BlockBackend;

use super::pieces::{PieceError, run_plan};
use super::{CopyError, Summary};
use crate::nbd_source::NbdSource;
use crate::plan::Plan;
use crate::target::{Held, SourceInfo, Target, TargetSpec};

/// What to copy from an NBD server.
#[derive(Debug, Clone)]
pub struct NbdCopyOptions {
    pub uri: String,
    /// Copy only what the server's `qemu:dirty-bitmap:NAME` marks, onto a
    /// target that holds an earlier copy of the same export.
    pub bitmap: Option<String>,
    /// Any target but a tar (which takes files from a tracked disk's map).
    pub target: TargetSpec,
    /// Where an NBD target's record lives (`targets/` under it): the
    /// source has no state directory of its own.
    pub state_dir: Option<PathBuf>,
    pub full: bool,
    pub workers: usize,
    pub progress: std::sync::Arc<dyn super::Progress>,
}

pub fn copy_from_nbd(options: &NbdCopyOptions) -> Result<Summary, CopyError> {
    let started = Instant::now();
    let mut target = open_target(options)?;
    let source_id = format!("nbd:{}", options.uri);
    let bitmap = options.bitmap.as_ref().filter(|_| !options.full);
    let base = if options.full {
        None
    } else {
        target.held(&source_id)?
    };
    if bitmap.is_some() && base.is_none() {
        return Err(CopyError::NeedsFullFirst {
            target: target.describe(),
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
    let plan_seconds = started.elapsed().as_secs_f64();
    let holds = next_held(base.as_ref());
    let info = SourceInfo {
        id: source_id,
        size_bytes: source.size_bytes(),
        granularity_bytes: 0,
    };
    target.open(&info, &holds, base.as_ref())?;
    options.progress.planned(plan.bytes());
    let outcome = run_plan(
        &source,
        &*target,
        &plan,
        options.workers,
        options.progress.as_ref(),
        &|_| {},
        &|_| {},
    );
    if let Some(error) = outcome.error {
        return Err(match error {
            PieceError::Source(error) => remote(error),
            PieceError::Target(error) => error,
            PieceError::Abandoned => unreachable!("the first failure is kept"),
        });
    }
    let moved = outcome.moved;
    drop(source); // sends NBD_CMD_DISC
    target.commit()?;
    let _ = target.clear_partial();
    let seconds = started.elapsed().as_secs_f64();
    Ok(Summary {
        target: target.describe(),
        kind: if bitmap.is_some() {
            "incremental"
        } else {
            "full"
        }
        .to_string(),
        resumed_from: None,
        full_reason: bitmap.is_none().then(|| {
            if options.full {
                "--full was given"
            } else {
                "no --bitmap"
            }
            .to_string()
        }),
        base_checkpoint: base.map(|base| base.checkpoint),
        checkpoint: holds.checkpoint,
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

/// Opens the target of a copy from an NBD server.
fn open_target(options: &NbdCopyOptions) -> Result<Box<dyn Target>, CopyError> {
    let refused = |reason: &str| CopyError::TargetRefused {
        target: options.target.describe(),
        reason: reason.to_string(),
    };
    match (&options.target, &options.state_dir) {
        (TargetSpec::Tar { .. }, _) => Err(refused(
            "a tar target takes files from a tracked disk's file map: copy IMAGE --to tar:PATH",
        )),
        (TargetSpec::Nbd(_), None) => Err(refused(
            "the record of what an NBD target holds lives in a state directory, and an NBD source has none: give --state DIR (the same one each time)",
        )),
        // NbdTarget::connect creates the directory.
        (TargetSpec::Nbd(_), Some(dir)) => options.target.open(dir),
        (spec, _) => spec.open(std::path::Path::new("")),
    }
}

/// The checkpoint a copy on top of `base` (None: a full copy) holds: the
/// next in the target's sequence, named `copy-UNIXTIME` (with the
/// sequence number appended if the base took that name in the same second).
fn next_held(base: Option<&Held>) -> Held {
    let generation = base.map_or(1, |base| base.generation + 1);
    let mut checkpoint = format!("{}{}", super::CHECKPOINT_PREFIX, super::unix_seconds());
    if base.is_some_and(|base| base.checkpoint.starts_with(&checkpoint)) {
        checkpoint = format!("{checkpoint}-{generation}");
    }
    Held {
        checkpoint,
        generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_copy_from_a_server_holds_a_checkpoint_of_its_own() {
        let full = next_held(None);
        assert_eq!(full.generation, 1);
        assert!(full.checkpoint.starts_with("copy-"), "{full:?}");
        let next = next_held(Some(&full));
        assert_eq!(next.generation, 2);
        assert_ne!(next.checkpoint, full.checkpoint);
        let after = next_held(Some(&next));
        assert_ne!(after.checkpoint, next.checkpoint);
        // A replica written before copies were numbered held generation 0.
        let old = Held {
            checkpoint: "bitmap b".into(),
            generation: 0,
        };
        assert_eq!(next_held(Some(&old)).generation, 1);
    }
}
