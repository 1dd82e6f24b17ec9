//! An NBD server: the protocol of NetworkBlockDevice doc/proto.md (fixed
//! newstyle, structured replies, extended headers, metadata contexts) over
//! tokio, in front of any `BlockBackend`.
//!
//! Files and what each owns:
//! - `proto.rs`: wire constants, request/reply header codecs, NBD errors.
//! - `buffers.rs`: per-connection input and output buffers, reused.
//! - `handshake.rs`: option haggling up to GO/EXPORT_NAME; meta contexts.
//! - `transmission.rs`: the request loop: decode, validate, execute, reply.
//! - `socket.rs`: the blocking socket a connection's thread serves on.
//! - `backend.rs`: the `BlockBackend` trait with `can_*` capabilities.
//! - `file.rs`: the raw-file/block-device backend.
//! - `export.rs`: `Export`, `Exports` and the `base:allocation` context name.
//! - `server.rs`: unix/TCP listeners, connection lifetime, shutdown.

pub mod backend;
pub mod buffers;
pub mod export;
pub mod file;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod socket;
pub mod transmission;

pub use backend::{BlockBackend, Extent, ZeroError, ZeroRequest};
pub use export::{Export, Exports};
pub use file::{FileBackend, OpenError};
pub use server::Server;
