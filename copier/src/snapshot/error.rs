//! The snapshot's errors, one enum per operation, each naming the
//! snapshot and what to do.

use std::io;
use std::path::PathBuf;

use tracker::CheckpointError;

use super::PIN_HOLDER;

/// Registering the manager (`SnapshotManager::register`).
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(
        "the storage backend is {storage_bytes} bytes but the tracker tracks {tracker_bytes}; give the manager the backend under the tracker"
    )]
    SizeMismatch {
        storage_bytes: u64,
        tracker_bytes: u64,
    },
    #[error("removing leftover snapshot stores in {path}")]
    Leftovers { path: PathBuf, source: io::Error },
    #[error("removing the pins of leftover snapshots")]
    Pins { source: CheckpointError },
}

/// Taking a snapshot (`SnapshotManager::take`).
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    #[error(
        "snapshot {name:?}: snapshot {open:?} is open; release it first (one snapshot at a time per disk)"
    )]
    AlreadyOpen { name: String, open: String },
    #[error(
        "snapshot {name:?}: a store of {store_bytes_max} bytes cannot hold one {region_bytes}-byte region; allow at least that"
    )]
    StoreTooSmall {
        name: String,
        store_bytes_max: u64,
        region_bytes: u64,
    },
    #[error(
        "snapshot {name:?}: {path} has {free_bytes} bytes free, less than the store's limit of {store_bytes_max} bytes; free space or ask for a smaller store"
    )]
    NoSpace {
        name: String,
        path: PathBuf,
        free_bytes: u64,
        store_bytes_max: u64,
    },
    #[error("snapshot {name:?}: creating its copy-before-write store {path}")]
    Store {
        name: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("snapshot {name:?}: taking its checkpoint")]
    Checkpoint {
        name: String,
        source: CheckpointError,
    },
    #[error(
        "snapshot {name:?}: checkpoint {name:?} was taken, but this manager did not see its switch; register the manager with this tracker before Tracker::start"
    )]
    NotActivated { name: String },
    #[error(
        "snapshot {name:?}: pinning its checkpoint (the checkpoint stays; the snapshot was dropped)"
    )]
    Pin {
        name: String,
        source: CheckpointError,
    },
}

/// Releasing a snapshot (`SnapshotManager::release`). Past `NotOpen` the
/// snapshot is gone whatever the error says; the error names what was left.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("no snapshot {name:?} is open{}", open.as_ref().map(|open| format!(" (snapshot {open:?} is)")).unwrap_or_default())]
    NotOpen { name: String, open: Option<String> },
    #[error("snapshot {name:?} released, but its store {path} could not be removed")]
    RemoveStore {
        name: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "snapshot {name:?} released, but its checkpoint could not be unpinned (blockwatch unpin {name} {PIN_HOLDER})"
    )]
    Unpin {
        name: String,
        source: CheckpointError,
    },
}
