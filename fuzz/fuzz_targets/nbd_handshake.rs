//! Fuzz target: the input is everything an NBD client sends during the
//! handshake (byte 0 picks the server's TLS mode: off, on, require),
//! served by nbd-server's `greet` and `haggle` from two in-memory
//! exports; the option replies must be framed as the spec says, the
//! session must match what the export offers, and with TLS required no
//! client gets to transmission without STARTTLS (`src/nbd.rs`). A panic,
//! a hang (-timeout) or an allocation past -rss_limit_mb is a finding.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockwatch_fuzz::nbd::handshake(data);
});
