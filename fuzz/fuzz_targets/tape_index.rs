//! Fuzz target: the input is a tape index (`TAPE.blockwatch-index`; byte
//! 0 says whether its crc is recomputed first), decoded and encoded
//! again, which must decode to the same (`copier::fuzzing`). A panic, a
//! hang (-timeout) or an allocation past -rss_limit_mb is a finding.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    copier::fuzzing::tape_index(data);
});
