//! A blocking NBD client (NetworkBlockDevice doc/proto.md), built for the
//! copier: fixed newstyle handshake with extended headers or structured
//! replies, `base:allocation` and `qemu:dirty-bitmap:NAME` block status,
//! and many requests in flight on one connection from many threads.
//!
//! ```no_run
//! use nbd_client::{Client, ConnectOptions, RequestFlags};
//! let options = ConnectOptions { dirty_bitmap: Some("monday".into()), ..Default::default() };
//! let client = Client::connect_with("nbd+unix:///?socket=/run/disk.sock", &options)?;
//! let changed = client.block_status("qemu:dirty-bitmap:monday", 0, client.size_bytes())?;
//! let mut block = vec![0; 65536];
//! client.read_at(&mut block, 0)?;
//! client.write_at(&block, 65536, RequestFlags::FUA)?;
//! client.close()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! How requests flow: a caller's thread checks a request against what the
//! handshake learned, takes one of `in_flight_max` slots (waiting while all
//! are taken), registers it under a fresh cookie and writes it to the
//! socket under the writer lock. One reader thread per connection reads
//! replies in whatever order the server sends them, finds each request by
//! cookie, and completes it through a channel of its own; the caller waits
//! on that (`Pending::wait`). The wire codecs are the server's
//! (`nbd_server::proto`), shared rather than copied.
//!
//! Files and what each owns:
//! - `uri.rs`: NBD URIs (doc/uri.md): `nbd://`, `nbd+unix://`, and the
//!   TLS forms `nbds://`, `nbds+unix://` with `tls-certificates=DIR`.
//! - `transport.rs`: the unix or TCP socket under a connection (after
//!   STARTTLS, the plaintext end of a relay's socketpair).
//! - `tls.rs`: the client's TLS configuration from a certificate directory
//!   (libnbd's file names) and the server name to check.
//! - `relay.rs`: the thread that owns a TLS session and passes plaintext
//!   to the connection through a socketpair.
//! - `handshake.rs`: option haggling up to GO (or EXPORT_NAME); `ConnectOptions`.
//! - `info.rs`: `ExportInfo` (size, flags, block sizes, contexts) and the
//!   request limits derived from it.
//! - `inflight.rs`: the table of requests in flight, slots, `Pending`.
//! - `reply.rs`: the reader thread: reply frames, READ reassembly, checks.
//! - `status.rs`: `Extent`, `BlockStatus` and the status chunk decoders.
//! - `client.rs`: `Client`: checks, `submit_*`, and the synchronous calls
//!   that split ranges and pipeline them.
//! - `error.rs`: `ConnectError`, `CommandError`, `ConnectionError`, `ProtocolError`.
//!
//! Tests: unit tests beside the parsers; `tests/nbdkit.rs`, `tests/qemu.rs`
//! and `tests/blockwatch.rs` start real servers on unix sockets in temp
//! directories (apt-get install nbdkit libnbd-bin qemu-utils; blockwatch is
//! built with `cargo build -p blockwatch`, or named by `BLOCKWATCH=PATH`);
//! `tests/hostile.rs` runs a lying server in-process on a socketpair.
//! TLS is tested end to end through the copier in the workspace's
//! `tests/tls.rs` (against blockwatch and `nbdkit --tls=require`).

mod client;
mod error;
mod handshake;
mod inflight;
mod info;
mod relay;
mod reply;
mod status;
mod tls;
mod transport;
mod uri;

pub use client::{Client, RequestFlags};
pub use error::{
    Command, CommandError, CommandFailure, ConnectError, ConnectionError, ProtocolError,
};
pub use handshake::{
    ConnectOptions, HANDSHAKE_TIMEOUT_DEFAULT, HandshakeError, OPTION_REPLIES_MAX,
    OPTION_REPLY_LEN_MAX,
};
pub use inflight::Pending;
pub use info::{BlockSizes, ExportInfo, REQUEST_PAYLOAD_MAX_BYTES};
pub use nbd_server::proto::{BASE_ALLOCATION, DIRTY_BITMAP_CONTEXT_PREFIX, NbdError, ReplyMode};
pub use reply::{ERROR_CHUNK_LEN_MAX, READ_FRAGMENTS_MAX, STATUS_CHUNK_LEN_MAX};
pub use status::{BlockStatus, Extent};
pub use tls::{CLIENT_CERT_FILE, CLIENT_KEY_FILE, TlsSetupError};
pub use transport::Stream;
pub use uri::{Address, DEFAULT_PORT, Uri, UriError, UriTls, is_nbd_uri};

/// Requests one connection keeps in flight unless told otherwise: what
/// nbdcopy uses per connection.
pub const IN_FLIGHT_DEFAULT: usize = 64;
/// The most `ConnectOptions::in_flight_max` may ask for. Each request in
/// flight can pin up to `REQUEST_PAYLOAD_MAX_BYTES` of buffer.
pub const IN_FLIGHT_MAX: usize = 1024;
/// Bytes of READ buffers `Client::read_at` keeps in flight for one call.
pub const READ_AT_WINDOW_BYTES: usize = 64 * 1024 * 1024;
