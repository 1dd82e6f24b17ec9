//! A copy with no server running: the state directory is opened for
//! writing (its lock keeps a server from starting) and the image is read
//! directly under a shared lock, so nothing writes the disk meanwhile.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use backend::{BlockBackend, FileBackend};
use tracker::{Tracker, TrackerOptions};

use super::{
    CheckpointRow, CopyError, CopyOptions, Summary, TrackedDisk, copy_tracked, hex_id,
    new_checkpoint_name,
};
use crate::target::{Held, SourceInfo};

/// Copies `options.image` to its target; see the module comment.
pub fn copy_offline(options: &CopyOptions) -> Result<Summary, CopyError> {
    let source =
        FileBackend::open(&options.image, true).map_err(|source| CopyError::SourceOpen {
            image: options.image.clone(),
            source,
        })?;
    let tracker = Tracker::open(
        &TrackerOptions {
            image: options.image.clone(),
            state_dir: options.state_dir.clone(),
            granularity_bytes: None,
            precision_bytes: None,
            journal_wrapper: None,
            files: true,
        },
        source.size_bytes(),
    )
    .map_err(|source| CopyError::Open {
        image: options.image.clone(),
        source,
    })?;
    tracker.start();
    let result = options
        .target
        .open(tracker.state_dir())
        .and_then(|mut target| {
            let mut disk = Offline {
                tracker: &tracker,
                image: options.image.clone(),
                source: Arc::new(source),
            };
            copy_tracked(
                &mut disk,
                target.as_mut(),
                options.full,
                options.workers,
                options.progress.as_ref(),
            )
        });
    let closed = tracker.close();
    let summary = result?;
    closed?;
    Ok(summary)
}

struct Offline<'a> {
    tracker: &'a Tracker,
    image: PathBuf,
    source: Arc<FileBackend>,
}

impl TrackedDisk for Offline<'_> {
    fn info(&mut self) -> Result<SourceInfo, CopyError> {
        Ok(SourceInfo {
            id: hex_id(&self.tracker.image_id()),
            size_bytes: self.tracker.size_bytes(),
            granularity_bytes: self.tracker.granularity().bytes(),
        })
    }

    fn checkpoints(&mut self) -> Result<Vec<CheckpointRow>, CopyError> {
        let pins = self.tracker.pins()?;
        Ok(self
            .tracker
            .checkpoints()
            .into_iter()
            .map(|c| CheckpointRow {
                holders: pins
                    .iter()
                    .filter(|pin| pin.generation == c.generation)
                    .map(|pin| pin.holder.clone())
                    .collect(),
                held: Held {
                    checkpoint: c.name,
                    generation: c.generation,
                },
            })
            .collect())
    }

    fn take(&mut self) -> Result<(Held, Arc<dyn BlockBackend>), CopyError> {
        let checkpoint = self
            .tracker
            .checkpoint(&new_checkpoint_name(self.tracker))?;
        let held = Held {
            checkpoint: checkpoint.name,
            generation: checkpoint.generation,
        };
        Ok((held, Arc::clone(&self.source) as Arc<dyn BlockBackend>))
    }

    fn changes(&mut self, since: &str, until: &str) -> Result<Vec<(u64, u64)>, CopyError> {
        Ok(self
            .tracker
            .changes(since, Some(until))?
            .iter()
            .map(|e| (e.offset_bytes, e.length_bytes))
            .collect())
    }

    fn pin(&mut self, name: &str, holder: &str, reason: &str) -> Result<(), CopyError> {
        self.tracker.pin(name, holder, reason)?;
        Ok(())
    }

    fn unpin(&mut self, name: &str, holder: &str) -> Result<(), CopyError> {
        self.tracker.unpin(name, holder)?;
        Ok(())
    }

    fn delete(&mut self, name: &str) -> Result<(), CopyError> {
        self.tracker.delete_checkpoint(name)?;
        Ok(())
    }

    fn changed_files(&mut self, since: &str, until: &str) -> Option<Vec<String>> {
        let report = self
            .tracker
            .file_changes(since, Some(until), &Default::default())
            .ok()?;
        Some(
            report
                .listed()
                .filter_map(|(_, change)| {
                    let path = change.paths.first()?;
                    Some(format!("{}\t{path}", change.kind.symbol()))
                })
                .collect(),
        )
    }

    fn release(&mut self, _taken: &Held) -> Result<(), CopyError> {
        Ok(())
    }

    fn read_failed(&mut self, _taken: &Held, error: io::Error) -> CopyError {
        CopyError::Source {
            image: self.image.clone(),
            source: error,
        }
    }
}
