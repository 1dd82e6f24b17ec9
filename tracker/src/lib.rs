//! Changed-block tracking: which regions of the disk changed, crash-safely.
//!
//! Files and what each owns:
//! - `regions.rs`: region arithmetic and the lock-free region bitmap.
//! - `journal.rs`: the append-only, checksummed journal of marks and saved records.
//! - `commit.rs`: group commit of journal records on a dedicated thread.
//! - `catalog.rs`: the redb catalog: identity, clean-shutdown marker, checkpoints.
//! - `alive.rs`: the heartbeat that lets recovery notice an image written
//!   after a crash.
//! - `tracker.rs`: state directory, recovery, the write gate, checkpoints, queries.
//! - `layer.rs`: `TrackedBackend`, the tracker as a `BlockBackend` layer.
//! - `files.rs`: the file map beside the tracker (fsmap): kept current
//!   from saved regions, saved at checkpoints, used to attribute flushes.
//! - `control.rs`: the control socket protocol (JSON lines) and its server.

pub mod alive;
pub mod catalog;
pub mod commit;
pub mod control;
pub mod files;
pub mod journal;
pub mod layer;
pub mod regions;
pub mod tracker;

pub use layer::TrackedBackend;
pub use tracker::{ChangedExtent, Status, Tracker, TrackerError, TrackerOptions};
