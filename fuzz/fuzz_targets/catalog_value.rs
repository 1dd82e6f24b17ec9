//! Fuzz target: the input is one value of the tracker's catalog (byte 0
//! picks which: identity, clean-shutdown marker, fine records,
//! checkpoint, pin; and whether its crc is recomputed), decoded with the
//! catalog's own decoders (`tracker::fuzzing`) and encoded again, which
//! must decode to the same. A panic, a hang (-timeout) or an allocation
//! past -rss_limit_mb is a finding.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tracker::fuzzing::catalog_value(data);
});
