//! A copy of any NBD server's export to a replica: everything, or with a
//! bitmap the regions its `qemu:dirty-bitmap:NAME` marks. The user's QEMU
//! checkpoints decide what a bitmap covers; the replica's record names the
//! export and the bitmap copied.

use std::path::PathBuf;
use std::time::Instant;

use backend::BlockBackend;

use super::pieces::{PieceError, run_plan};
use super::{CopyError, Summary};
use crate::nbd_source::NbdSource;
use crate::plan::Plan;
use crate::target::{Held, ReplicaTarget, SourceInfo, Target};

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
    pub progress: std::sync::Arc<dyn super::Progress>,
}

pub fn copy_from_nbd(options: &NbdCopyOptions) -> Result<Summary, CopyError> {
    let started = Instant::now();
    let mut target = ReplicaTarget::lock(&options.replica)?;
    let source_id = format!("nbd:{}", options.uri);
    let bitmap = options.bitmap.as_ref().filter(|_| !options.full);
    let base = if options.full {
        None
    } else {
        target.held(&source_id)?
    };
    if bitmap.is_some() && base.is_none() {
        return Err(CopyError::NeedsFullFirst {
            replica: target.path().to_path_buf(),
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
    let holds = Held {
        checkpoint: bitmap.map_or_else(
            || "(full copy)".to_string(),
            |name| format!("bitmap {name}"),
        ),
        generation: 0,
    };
    let info = SourceInfo {
        id: source_id,
        size_bytes: source.size_bytes(),
        granularity_bytes: 0,
    };
    target.open(&info, &holds, base.as_ref())?;
    options.progress.planned(plan.bytes());
    let outcome = run_plan(
        &source,
        &target,
        &plan,
        options.workers,
        options.progress.as_ref(),
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
