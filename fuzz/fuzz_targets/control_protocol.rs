//! Fuzz target: the input is control socket lines (byte 0: request lines
//! for the server side, or a reply line for the client side), parsed,
//! answered by a real tracker where they are queries, and round-tripped
//! through serde (`src/control.rs`). A panic, a hang (-timeout) or an
//! allocation past -rss_limit_mb is a finding.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockwatch_fuzz::control::exercise(data);
});
