//! The control protocol between `blockwatch` commands and a running
//! server: JSON lines over `STATE_DIR/control.sock` (docs/control.md).
//! Its own crate so that the tracker's operations and the copier's can
//! be served through one socket without either depending on the other.
//!
//! Files and what each owns:
//! - `proto.rs`: `Request` and the typed replies, the legacy keys kept
//!   for one release.
//! - `transport.rs`: the socket server (a `Handler` answers, a `Session`
//!   per connection undoes what it holds when the client goes away), the
//!   client call, and the limits on lines and connections.

pub mod proto;
pub mod transport;

pub use proto::{Reply, Request};
pub use transport::{CallError, ControlServer, Handler, Session};
