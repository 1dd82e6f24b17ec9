//! Errors, one enum per operation (as redb does): each variant carries the
//! context a user needs to act on it (the path, the checkpoint's name).

use std::io;
use std::path::PathBuf;

use crate::catalog::{CatalogError, Pin};
use crate::journal::JournalError;
use crate::regions::REGION_COUNT_MAX;

/// Longest checkpoint name (it becomes part of an NBD context name).
pub const CHECKPOINT_NAME_MAX: usize = 200;

/// Opening the state directory (`Tracker::open`, `Tracker::open_read_only`).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("state directory {path}")]
    StateDir { path: PathBuf, source: io::Error },
    #[error("state {path} is in use by another blockwatch process")]
    Locked { path: PathBuf },
    #[error(
        "state {path} tracks at {state_bytes}-byte granularity, not {asked_bytes}; drop --granularity or remove the state directory"
    )]
    GranularityMismatch {
        path: PathBuf,
        state_bytes: u64,
        asked_bytes: u64,
    },
    #[error("granularity {0} is not a power of two from 4 KiB to 16 MiB")]
    BadGranularity(u64),
    #[error("precision {0} is not a power of two from 4 KiB to 16 MiB")]
    BadPrecision(u64),
    #[error(
        "state {path} records changes at {state_bytes}-byte precision, not {asked_bytes}; drop --precision or remove the state directory"
    )]
    PrecisionMismatch {
        path: PathBuf,
        state_bytes: u64,
        asked_bytes: u64,
    },
    #[error(
        "the image has {region_count} regions at this granularity, over the limit {REGION_COUNT_MAX}; use a larger --granularity"
    )]
    TooManyRegions { region_count: u64 },
    #[error("image {path}")]
    Image { path: PathBuf, source: io::Error },
    #[error("catalog {path}")]
    Catalog { path: PathBuf, source: CatalogError },
    #[error("journal {path}")]
    Journal { path: PathBuf, source: JournalError },
    #[error("journal {path}")]
    JournalIo { path: PathBuf, source: io::Error },
    #[error("{path} holds no tracking state; serve the image with blockwatch serve first")]
    NoState { path: PathBuf },
}

/// Creating, deleting, pinning or unpinning a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "checkpoint name {name:?} is not usable: use 1 to {CHECKPOINT_NAME_MAX} printable characters without spaces"
    )]
    BadName { name: String },
    #[error("a checkpoint named {name:?} exists already")]
    Duplicate { name: String },
    #[error("no checkpoint named {name:?} (see: blockwatch checkpoints)")]
    Unknown { name: String },
    #[error("checkpoint {name:?} is pinned by {}; unpin it first (blockwatch unpin)", describe_pins(.pins))]
    Pinned { name: String, pins: Vec<Pin> },
    #[error("checkpoint {name:?} has no pin held by {holder:?}")]
    UnknownPin { name: String, holder: String },
    #[error(
        "pin holder {holder:?} is not usable: use 1 to {CHECKPOINT_NAME_MAX} printable characters without spaces"
    )]
    BadHolder { holder: String },
    #[error("the pin's reason is longer than {PIN_REASON_MAX} bytes")]
    ReasonTooLong,
    #[error("checkpoint {name:?}: catalog")]
    Catalog { name: String, source: CatalogError },
    #[error("checkpoint {name:?}: journal")]
    Journal { name: String, source: io::Error },
    #[error("checkpoint {name:?}: {path}")]
    Index {
        name: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "checkpoint {name:?}: the state is open read-only (no server runs); this needs a writable open"
    )]
    ReadOnly { name: String },
}

/// Longest reason a pin may carry.
pub const PIN_REASON_MAX: usize = 1024;

fn describe_pins(pins: &[Pin]) -> String {
    pins.iter()
        .map(|pin| format!("{:?} ({})", pin.holder, pin.reason))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Queries: changes, file changes.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("no checkpoint named {name:?} (see: blockwatch checkpoints)")]
    UnknownCheckpoint { name: String },
    #[error("checkpoint {until:?} is not after {since:?}")]
    BadRange { since: String, until: String },
    #[error("this server keeps no file map (it was started with --no-files)")]
    NoFileMap,
    #[error("file map at {checkpoint:?}: {reason}")]
    FileMap { checkpoint: String, reason: String },
}

/// Rewriting the journal (`Tracker::compact_journal`).
#[derive(Debug, thiserror::Error)]
#[error("compacting journal {path}")]
pub struct CompactError {
    pub path: PathBuf,
    pub source: io::Error,
}

/// Stopping cleanly (`Tracker::close`).
#[derive(Debug, thiserror::Error)]
pub enum CloseError {
    #[error("image {path}")]
    Image { path: PathBuf, source: io::Error },
    #[error("catalog {path}: writing the clean-shutdown marker")]
    Catalog { path: PathBuf, source: CatalogError },
    /// Nothing was written: the next open recovers from the journal as
    /// after a crash, which reports every change (docs/journal.md).
    #[error(
        "the tracking journal failed ({reason}); no clean shutdown recorded, so the next start recovers from the journal as after a crash"
    )]
    JournalFailed { reason: String },
}

/// An error with its causes, for messages.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
