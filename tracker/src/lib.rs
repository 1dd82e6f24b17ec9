//! Changed-block tracking: which regions of the disk changed, crash-safely.
//!
//! Files and what each owns:
//! - `regions.rs`: region arithmetic and the lock-free region bitmap.
//! - `journal.rs`: the append-only, checksummed journal of marks and saved records.
//! - `commit.rs`: group commit of journal records on a dedicated thread.
//! - `catalog.rs`: the redb catalog: identity, clean-shutdown marker,
//!   checkpoints, pins.
//! - `alive.rs`: the heartbeat that lets recovery notice an image written
//!   after a crash.
//! - `tracker.rs`: the `Tracker`: write path, FLUSH, start and stop,
//!   journal compaction.
//! - `open.rs`: opening the state directory, writable or read-only.
//! - `recovery.rs`: what opening reads and replays, and each typed reason
//!   (`Distrust`) to treat every region as changed.
//! - `gate.rs`: the write gate and its RAII guards.
//! - `checkpoints.rs`: checkpoints, deletes that merge, pins,
//!   `checkpoints.index`.
//! - `query.rs`: changes, file changes, dirty-bitmap extents, status.
//! - `hooks.rs`: the generation-hook seam (`GenerationHook`).
//! - `error.rs`: one error enum per operation.
//! - `layer.rs`: `TrackedBackend`, the tracker as a `BlockBackend` layer.
//! - `fine.rs`: the fine record: blocks written below the granularity,
//!   exact where it is complete, whole regions where it is not.
//! - `files.rs`: the file map beside the tracker (fsmap), the first
//!   generation hook: kept current from saved regions, saved at
//!   checkpoints, used to attribute flushes.
//! - `control.rs`: the control socket protocol (JSON lines) and its server.
//! - `fuzzing.rs` (feature `fuzzing`, for `fuzz/` only): the catalog's
//!   value codecs, for the fuzz targets.

pub mod alive;
pub mod catalog;
mod checkpoints;
pub mod commit;
pub mod control;
pub mod error;
pub mod files;
mod fine;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod gate;
pub mod hooks;
pub mod journal;
pub mod layer;
mod open;
mod query;
pub mod recovery;
pub mod regions;
pub mod tracker;

pub use catalog::Pin;
pub use error::{CheckpointError, CloseError, CompactError, OpenError, QueryError};
pub use hooks::GenerationHook;
pub use layer::TrackedBackend;
pub use recovery::Distrust;
pub use tracker::{ChangedExtent, Tracker, TrackerOptions};
