//! The control socket of a served disk: the tracker's requests, plus the
//! copy-before-write snapshots only a running server can give. A snapshot
//! is served as the read-only export `NAME@CHECKPOINT` (listed by
//! NBD_OPT_LIST, with the dirty bitmaps of the checkpoints before it) and
//! belongs to the control connection that asked for it: released by
//! `release-snapshot`, or when that connection ends for any reason (the
//! copier finished, failed, or was killed).

use std::sync::Arc;

use backend::BlockBackend;
use control::proto::{SnapshotInfo, SnapshotReply};
use control::transport::{Handler, Session};
use control::{Reply, Request};
use copier::snapshot::{SnapshotLimits, SnapshotManager};
use nbd_server::{Export, Exports};
use tracker::Tracker;

use super::Endpoints;

/// How long a snapshot request waits for the one open to be released
/// before it is refused (one snapshot at a time per disk).
const SNAPSHOT_OPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// One served disk's control handler.
pub(crate) struct ServeHandler {
    pub(crate) tracker: Arc<Tracker>,
    pub(crate) snapshots: Arc<SnapshotManager>,
    pub(crate) exports: Exports,
    /// The disk's export name, before `@` in a snapshot's.
    pub(crate) disk_name: String,
    pub(crate) endpoints: Endpoints,
    /// The store bound of a snapshot whose request names none.
    pub(crate) store_bytes_max: u64,
}

/// Store bounds a request may ask for: at least one region, and no more
/// than the image (its worst case is every region copied out once).
fn checked_store_bytes(tracker: &Tracker, asked: u64) -> Result<u64, String> {
    let region_bytes = tracker.granularity().bytes().min(tracker.size_bytes());
    if asked < region_bytes {
        return Err(format!(
            "max_store_bytes {asked} is below one region ({region_bytes} bytes)"
        ));
    }
    Ok(asked.min(tracker.size_bytes().max(region_bytes)))
}

impl ServeHandler {
    fn snapshot_export_name(&self, checkpoint: &str) -> String {
        format!("{}@{checkpoint}", self.disk_name)
    }

    fn take(
        &self,
        name: Option<String>,
        max_store_bytes: Option<u64>,
        session: &mut Session,
    ) -> Result<Reply, String> {
        // A snapshot whose holder died is released once its connection's
        // end is seen, which can come after a rerun asks: wait for that
        // (bounded) before choosing a name, so the name is not the one the
        // dying holder's checkpoint is about to take.
        self.snapshots.wait_until_idle(SNAPSHOT_OPEN_WAIT);
        let name = name.unwrap_or_else(|| copier::copy::new_checkpoint_name(&self.tracker));
        let store_bytes_max = match max_store_bytes {
            Some(asked) => checked_store_bytes(&self.tracker, asked)?,
            None => self.store_bytes_max,
        };
        let limits = SnapshotLimits {
            store_bytes_max,
            ..SnapshotLimits::for_image(self.tracker.size_bytes())
        };
        let snapshot = self
            .snapshots
            .take(&self.tracker, &name, limits)
            .map_err(|error| tracker::tracker::error_chain(&error))?;
        let export_name = self.snapshot_export_name(&name);
        let added = self.exports.add(Export {
            name: export_name.clone(),
            description: format!(
                "blockwatch: snapshot of {} at checkpoint {name}",
                self.tracker.image_path().display()
            ),
            backend: Arc::clone(&snapshot) as Arc<dyn BlockBackend>,
        });
        if let Err(refusal) = added {
            let _ = self.snapshots.release(&self.tracker, &name);
            return Err(format!("cannot serve the snapshot: {refusal}"));
        }
        tracing::info!(checkpoint = %name, export = %export_name, "snapshot taken");
        let (tracker, snapshots, exports) = (
            Arc::clone(&self.tracker),
            Arc::clone(&self.snapshots),
            self.exports.clone(),
        );
        let (checkpoint, export) = (name.clone(), export_name.clone());
        session.on_close(move || {
            // Already released by request: nothing left to do.
            if exports.remove(&export).is_some() {
                match snapshots.release(&tracker, &checkpoint) {
                    Ok(()) => tracing::info!(%checkpoint, "snapshot released: its control connection ended"),
                    Err(error) => tracing::warn!(%checkpoint, error = %tracker::tracker::error_chain(&error), "releasing a snapshot"),
                }
            }
        });
        Ok(Reply::Snapshot(SnapshotReply {
            checkpoint: name,
            generation: snapshot.generation(),
            uri: self.endpoints.uri(&export_name),
            export: export_name,
            max_store_bytes: store_bytes_max,
        }))
    }

    fn narrow(&self, name: &str, extents: &[(u64, u64)]) -> Result<Reply, String> {
        if extents.len() > control::proto::NARROW_EXTENTS_MAX {
            return Err(format!(
                "{} ranges: a narrow-snapshot request names at most {}",
                extents.len(),
                control::proto::NARROW_EXTENTS_MAX
            ));
        }
        let snapshot = self
            .snapshots
            .active()
            .filter(|snapshot| snapshot.name() == name)
            .ok_or_else(|| format!("no snapshot {name:?} is open"))?;
        let kept = snapshot
            .keep_only(extents)
            .map_err(|error| format!("snapshot {name:?}: {error}"))?;
        tracing::debug!(checkpoint = %name, regions = kept, "snapshot narrowed");
        Ok(Reply::Done)
    }

    fn release(&self, name: &str) -> Result<Reply, String> {
        let export = self.snapshot_export_name(name);
        // Connections reading it keep their export until they end; their
        // reads fail from the release on.
        self.exports.remove(&export);
        self.snapshots
            .release(&self.tracker, name)
            .map_err(|error| tracker::tracker::error_chain(&error))?;
        tracing::info!(checkpoint = %name, "snapshot released");
        Ok(Reply::Done)
    }
}

impl Handler for ServeHandler {
    fn handle(&self, request: Request) -> Result<Reply, String> {
        match request {
            Request::Snapshot { .. } => {
                Err("a snapshot belongs to a control connection; ask on one".into())
            }
            Request::ReleaseSnapshot { name } => self.release(&name),
            Request::NarrowSnapshot { name, extents } => self.narrow(&name, &extents),
            Request::Status => {
                let mut reply = tracker::control::handle(&self.tracker, Request::Status)?;
                if let Reply::Status(status) = &mut reply {
                    status.snapshot = self.snapshots.active().map(|open| {
                        let state = open.status();
                        SnapshotInfo {
                            export: self.snapshot_export_name(&state.name),
                            checkpoint: state.name,
                            generation: state.generation,
                            broken: state.broken,
                            store_bytes: state.store_bytes,
                            max_store_bytes: state.store_bytes_max,
                            regions_copied: state.regions_copied,
                        }
                    });
                }
                Ok(reply)
            }
            other => tracker::control::handle(&self.tracker, other),
        }
    }

    fn handle_in(&self, request: Request, session: &mut Session) -> Result<Reply, String> {
        match request {
            Request::Snapshot {
                name,
                max_store_bytes,
            } => self.take(name, max_store_bytes, session),
            other => self.handle(other),
        }
    }
}
