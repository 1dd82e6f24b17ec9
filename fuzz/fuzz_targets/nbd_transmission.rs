//! Fuzz target: the input is the requests an NBD client sends in the
//! transmission phase (byte 0 picks simple, structured or extended
//! replies, the read-only export and metadata contexts), served by
//! nbd-server's `transmit` over a socket pair from an in-memory export
//! that asserts that only validated requests reach it; every reply is
//! parsed back and matched with its request (`src/nbd.rs`). A panic, a
//! hang (-timeout) or an allocation past -rss_limit_mb is a finding.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockwatch_fuzz::nbd::transmission(data);
});
