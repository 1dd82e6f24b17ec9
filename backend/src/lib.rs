//! Storage behind an export, apart from any protocol: the `BlockBackend`
//! trait that the NBD server serves from and the copier reads from, and
//! the raw-file backend. Modelled on nbdkit's plugins and filters.
//!
//! Files and what each owns:
//! - `block_backend.rs`: the `BlockBackend` trait with its `can_*`
//!   capabilities, `Extent` and its `base:allocation` flags, `ZeroRequest`,
//!   and the WRITE_ZEROES fallback (`write_zero_buffers`).
//! - `file.rs`: `FileBackend`, a regular file (sparse-aware) or a block
//!   device, and `OpenError`.

mod block_backend;
pub mod file;

pub use block_backend::{
    BlockBackend, Extent, STATE_HOLE, STATE_ZERO, ZeroError, ZeroRequest, push_extent,
    write_zero_buffers,
};
pub use file::{FileBackend, OpenError};
