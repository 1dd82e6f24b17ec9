//! Point-in-time copies of changed blocks to replicas, tape streams and
//! other NBD servers, with restore and verify.
//!
//! Files and what each owns:
//! - `snapshot.rs` (and `snapshot/`): the copy-before-write snapshot, the
//!   disk as it was at a checkpoint while it stays writable, readable as a
//!   `BlockBackend`.

pub mod snapshot;
