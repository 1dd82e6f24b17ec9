//! An NBD server: the protocol of NetworkBlockDevice doc/proto.md (fixed
//! newstyle, structured replies, extended headers, metadata contexts) in
//! front of any `BlockBackend` (the `backend` crate). Listeners and the
//! handshake run on tokio; each connection then moves to a thread of its
//! own for the transmission phase, and requests that wait for the device
//! go to tokio's blocking pool.
//!
//! Files and what each owns:
//! - `proto.rs`: wire constants, request/reply header codecs, NBD errors.
//! - `buffers.rs`: per-connection input and output buffers, reused.
//! - `handshake.rs`: option haggling up to GO/EXPORT_NAME; meta contexts;
//!   what STARTTLS and the other options get under each TLS mode.
//! - `transmission.rs`: the request loop on the connection's thread:
//!   decode, validate, execute (inline or on the blocking pool), reply.
//! - `socket.rs`: the blocking socket a connection's thread serves on, and
//!   its rustls session after STARTTLS.
//! - `export.rs`: `Export`, `Exports` and the `base:allocation` context name.
//! - `server.rs`: unix/TCP listeners, the handshake task (and the TLS
//!   handshake after STARTTLS) and the hand-over to the connection's
//!   thread, shutdown.
//! - `limits.rs`: `Limits` (connections, handshake time, requests and
//!   bytes in flight per connection) and the connection count.
//! - `tls.rs`: `TlsMode`, `TlsPolicy`, certificates with nbdkit's file
//!   names, the PEM loading the client crate shares.

pub mod buffers;
pub mod export;
pub mod handshake;
pub mod limits;
pub mod proto;
pub mod server;
pub mod socket;
pub mod tls;
pub mod transmission;

pub use export::{Export, Exports};
pub use limits::Limits;
pub use server::Server;
pub use tls::{TlsMode, TlsPolicy};
