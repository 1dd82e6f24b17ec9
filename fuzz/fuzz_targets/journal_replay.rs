//! Fuzz target: the input is a tracker journal file (byte 0 says whether
//! its crcs are recomputed first), replayed with `tracker::journal::replay`;
//! it must report damage or give records that are consistent and replay
//! the same once encoded again (`src/journal.rs`). A panic, a hang
//! (-timeout) or an allocation past -rss_limit_mb is a finding.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockwatch_fuzz::journal::exercise(data);
});
