//! An NBD server: the protocol of NetworkBlockDevice doc/proto.md (fixed
//! newstyle, structured replies, extended headers, metadata contexts) over
//! tokio, in front of any `BlockBackend` (the `backend` crate).
//!
//! Files and what each owns:
//! - `proto.rs`: wire constants, request/reply header codecs, NBD errors.
//! - `buffers.rs`: per-connection input and output buffers, reused.
//! - `handshake.rs`: option haggling up to GO/EXPORT_NAME; meta contexts.
//! - `transmission.rs`: the request loop: decode, validate, execute, reply.
//! - `socket.rs`: the blocking socket a connection's thread serves on.
//! - `export.rs`: `Export`, `Exports` and the `base:allocation` context name.
//! - `server.rs`: unix/TCP listeners, connection lifetime, shutdown.

pub mod buffers;
pub mod export;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod socket;
pub mod transmission;

pub use export::{Export, Exports};
pub use server::Server;

// The backends live in the `backend` crate. These re-exports keep the
// paths that code outside this crate has named them by.
pub use backend::{BlockBackend, Extent, FileBackend, OpenError, ZeroError, ZeroRequest};

/// `nbd_server::file::push_extent`, as the tracker names it.
pub mod file {
    pub use backend::push_extent;
}
