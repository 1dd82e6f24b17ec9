//! Storage behind an export, apart from any protocol: the `BlockBackend`
//! trait that the NBD server serves from and the copier reads from, and
//! the raw-file backend. Modelled on nbdkit's plugins and filters: a
//! storage backend answers for itself, a layer names the backend it wraps
//! (`next()`) and every method it does not implement is forwarded there.
//!
//! Files and what each owns:
//! - `block_backend.rs`: the `BlockBackend` trait with its `can_*`
//!   capabilities and forwarding defaults, `Extent` and its
//!   `base:allocation` flags, `ZeroRequest`, and the WRITE_ZEROES fallback
//!   (`write_zero_buffers`).
//! - `file.rs`: `FileBackend`, a regular file (sparse-aware) or a block
//!   device, and `OpenError`.
//!
//! `tests/forwarding.rs` holds the layer contract: a layer that implements
//! nothing reaches its storage with every call unchanged, and a storage
//! backend keeps the conservative defaults.

mod block_backend;
pub mod file;

pub use block_backend::{
    BlockBackend, Extent, STATE_HOLE, STATE_ZERO, ZeroError, ZeroRequest, push_extent,
    write_zero_buffers,
};
pub use file::{FileBackend, OpenError};
