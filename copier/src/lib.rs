//! Point-in-time copies of a tracked disk's changed blocks to other
//! storage, with verify. Today: replicas (raw sparse image files) of a
//! disk with or without its server running (then through a
//! copy-before-write snapshot), and of any NBD export; NBD targets; tape
//! streams (`tape/`: written by copies, verified, restored).
//!
//! Files and what each owns:
//! - `plan.rs`: the byte ranges a copy moves, from the tracker's changes,
//!   coalesced and cut into pieces.
//! - `replica.rs`: a replica file, its lock, and its record (the commit).
//! - `durability.rs`: the seam every durable file step and catalog
//!   transaction of a copy goes through, where a test cuts the power.
//! - `copy.rs` (and `copy/`): the copy itself, one sequence of steps for
//!   every source (`offline.rs`, `live.rs`; `nbd.rs` for untracked NBD
//!   exports): full or incremental, workers (`pieces.rs`), the commit
//!   order, pins, merging away checkpoints nothing needs.
//! - `stream_write.rs`: large file writes that spare the page cache.
//! - `target.rs` (and `target/`): where a copy goes: what it holds, its
//!   pieces, its commit (replica file, NBD export, tape).
//! - `nbd_source.rs`: any NBD server as a source, with its holes and its
//!   `qemu:dirty-bitmap:NAME` as the plan.
//! - `snapshot.rs` (and `snapshot/`): the copy-before-write snapshot, the
//!   disk as it was at a checkpoint while it stays writable, readable as a
//!   `BlockBackend`, which the server serves as `DISK@CHECKPOINT`.
//! - `verify.rs`: a replica compared region by region with its source.
//! - `s3/`: `s3://BUCKET/PREFIX` repositories in object storage
//!   (deduplicated chunks in packs, manifests, encryption, restore,
//!   verify, prune).
//! - `tape/`: `tape:PATH` streams (format, writer, reader, verify of a
//!   chain of tapes, restore onto an image or an NBD export).
//! - `files.rs`: the files a backup holds (its view's ext4 map): lists,
//!   lookups.
//! - `view.rs` (and `view/`): any backup at one of its checkpoints as a
//!   read-only disk (a replica, a tape chain, an object storage session).
//! - `fuzzing.rs` (feature `fuzzing`, for `fuzz/` only): the object
//!   storage formats and the tape index, for the fuzz targets.

pub mod copy;
pub mod durability;
pub mod files;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod nbd_source;
pub mod plan;
pub mod replica;
pub mod s3;
pub mod snapshot;
mod stream_write;
pub mod tape;
pub mod tar;
pub mod target;
pub mod verify;
pub mod view;

pub use copy::{CopyError, CopyOptions, Summary, copy_offline};
