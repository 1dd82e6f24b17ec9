//! Point-in-time copies of a tracked disk's changed blocks to other
//! storage, with verify. Today: replicas (raw sparse image files) copied
//! with no server running; live copies through a copy-before-write
//! snapshot, NBD targets and tape streams come next.
//!
//! Files and what each owns:
//! - `plan.rs`: the byte ranges a copy moves, from the tracker's changes,
//!   coalesced and cut into pieces.
//! - `replica.rs`: a replica file, its lock, and its record (the commit).
//! - `copy.rs`: the copy itself: full or incremental, workers, the commit
//!   order, pins, merging away checkpoints nothing needs.
//! - `nbd_source.rs`: any NBD server as a source, with its holes and its
//!   `qemu:dirty-bitmap:NAME` as the plan.
//! - `snapshot.rs` (and `snapshot/`): the copy-before-write snapshot, the
//!   disk as it was at a checkpoint while it stays writable, readable as a
//!   `BlockBackend` (not yet served by the server).
//! - `verify.rs`: a replica compared region by region with its source.

pub mod copy;
pub mod nbd_source;
pub mod plan;
pub mod replica;
pub mod snapshot;
pub mod verify;

pub use copy::{CopyError, CopyOptions, Summary, copy_offline};
