//! A copy of a disk a server is serving: through its control socket the
//! server takes a copy-before-write snapshot (the checkpoint that closes
//! the generation) and serves it as an NBD export; the copy reads that
//! export while the disk stays writable. The snapshot lives as long as the
//! control connection: if the copier dies, the server releases it.

use std::io;
use std::sync::Arc;

use backend::BlockBackend;
use control::Request;
use control::proto::{
    ChangesReply, ChangesRequest, CheckpointsReply, FileChangesReply, PinReply, SnapshotReply,
    StatusReply,
};
use control::transport::Connection;

use super::Narrower;
use super::{CheckpointRow, CopyError, CopyOptions, Summary, TrackedDisk, copy_tracked};
use crate::nbd_source::NbdSource;
use crate::target::{Held, SourceInfo};

/// Copies the served disk `options.image` to its target.
pub fn copy_live(options: &CopyOptions) -> Result<Summary, CopyError> {
    let image = std::path::absolute(&options.image).map_err(|source| CopyError::Source {
        image: options.image.clone(),
        source,
    })?;
    let state_dir = options
        .state_dir
        .clone()
        .unwrap_or_else(|| tracker::tracker::default_state_dir(&image));
    let server = Connection::open(&state_dir)?;
    let mut target = options.target.open(&state_dir)?;
    let mut disk = Live {
        server,
        state_dir,
        snapshot_uri: None,
    };
    copy_tracked(
        &mut disk,
        target.as_mut(),
        options.full,
        options.workers,
        options.progress.as_ref(),
    )
}

/// Connections the copy reads the snapshot export through (it is
/// multi-conn): small scattered pieces are bound by round trips.
const SNAPSHOT_CONNECTIONS: usize = 4;

/// A reply whose fields nobody needs (only its `ok`).
#[derive(Debug, serde::Deserialize)]
struct Ignored {}

struct Live {
    server: Connection,
    state_dir: std::path::PathBuf,
    snapshot_uri: Option<String>,
}

impl TrackedDisk for Live {
    fn info(&mut self) -> Result<SourceInfo, CopyError> {
        let StatusReply { status, .. } = self.server.call(&Request::Status)?;
        Ok(SourceInfo {
            id: status.image_id,
            size_bytes: status.size_bytes,
            granularity_bytes: status.granularity_bytes,
        })
    }

    fn checkpoints(&mut self) -> Result<Vec<CheckpointRow>, CopyError> {
        let CheckpointsReply { checkpoints } = self.server.call(&Request::Checkpoints)?;
        Ok(checkpoints
            .into_iter()
            .map(|c| CheckpointRow {
                holders: c.pins.into_iter().map(|pin| pin.holder).collect(),
                held: Held {
                    checkpoint: c.name,
                    generation: c.generation,
                },
            })
            .collect())
    }

    fn take(&mut self) -> Result<(Held, Arc<dyn BlockBackend>), CopyError> {
        let snapshot: SnapshotReply = self.server.call(&Request::Snapshot {
            name: None,
            max_store_bytes: None,
        })?;
        let client =
            nbd_client::Client::connect_with(&snapshot.uri, &nbd_client::ConnectOptions::default())
                .map_err(|source| CopyError::Connect {
                    uri: snapshot.uri.clone(),
                    source,
                })?;
        self.snapshot_uri = Some(snapshot.uri);
        let held = Held {
            checkpoint: snapshot.checkpoint,
            generation: snapshot.generation,
        };
        let uri = self.snapshot_uri.as_deref().unwrap_or_default();
        let source = NbdSource::with_connections(client, uri, SNAPSHOT_CONNECTIONS);
        Ok((held, Arc::new(source)))
    }

    fn changes(&mut self, since: &str, until: &str) -> Result<Vec<(u64, u64)>, CopyError> {
        let changes: ChangesReply = self.server.call(&Request::Changes(ChangesRequest {
            since: since.to_string(),
            until: Some(until.to_string()),
            ..ChangesRequest::default()
        }))?;
        Ok(changes
            .extents
            .iter()
            .map(|e| (e.offset_bytes, e.length_bytes))
            .collect())
    }

    fn pin(&mut self, name: &str, holder: &str, reason: &str) -> Result<(), CopyError> {
        self.server.call::<PinReply>(&Request::Pin {
            name: name.to_string(),
            holder: holder.to_string(),
            reason: reason.to_string(),
        })?;
        Ok(())
    }

    fn unpin(&mut self, name: &str, holder: &str) -> Result<(), CopyError> {
        self.server.call::<Ignored>(&Request::Unpin {
            name: name.to_string(),
            holder: holder.to_string(),
        })?;
        Ok(())
    }

    fn delete(&mut self, name: &str) -> Result<(), CopyError> {
        self.server.call::<Ignored>(&Request::DeleteCheckpoint {
            name: name.to_string(),
        })?;
        Ok(())
    }

    fn changed_files(&mut self, since: &str, until: &str) -> Option<Vec<String>> {
        let reply: FileChangesReply = self
            .server
            .call(&Request::Changes(ChangesRequest {
                since: since.to_string(),
                until: Some(until.to_string()),
                files: true,
                ..ChangesRequest::default()
            }))
            .ok()?;
        Some(
            reply
                .files
                .iter()
                .filter_map(|file| Some(format!("{}\t{}", file.status, file.path.as_ref()?)))
                .collect(),
        )
    }

    /// Narrows through a control connection of its own, which the copy's
    /// workers share.
    fn narrower(&mut self, taken: &Held) -> Option<Narrower> {
        let server = match Connection::open(&self.state_dir) {
            Ok(server) => std::sync::Mutex::new(server),
            Err(error) => {
                tracing::warn!(%error, "cannot narrow the snapshot: every region stays kept");
                return None;
            }
        };
        let name = taken.checkpoint.clone();
        Some(Box::new(move |extents: &[(u64, u64)]| {
            let request = Request::NarrowSnapshot {
                name: name.clone(),
                extents: extents.to_vec(),
            };
            if let Err(error) = server
                .lock()
                .expect("narrowing connection lock")
                .call::<Ignored>(&request)
            {
                tracing::warn!(%error, "narrowing the snapshot failed: more regions stay kept");
            }
        }))
    }

    fn release(&mut self, taken: &Held) -> Result<(), CopyError> {
        self.server.call::<Ignored>(&Request::ReleaseSnapshot {
            name: taken.checkpoint.clone(),
        })?;
        Ok(())
    }

    /// A read that failed because the snapshot broke says why.
    fn read_failed(&mut self, taken: &Held, error: io::Error) -> CopyError {
        if let Ok(StatusReply {
            snapshot: Some(open),
            ..
        }) = self.server.call::<StatusReply>(&Request::Status)
            && open.checkpoint == taken.checkpoint
            && let Some(reason) = open.broken
        {
            return CopyError::SnapshotBroken {
                checkpoint: open.checkpoint,
                reason,
            };
        }
        CopyError::Remote {
            uri: self.snapshot_uri.clone().unwrap_or_default(),
            source: error,
        }
    }
}
