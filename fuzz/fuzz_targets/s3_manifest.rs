//! Fuzz target: the input is an object-storage session manifest or pack
//! index as opened (byte 0 picks which), decoded with `Manifest::decode`
//! or `decode_index` and encoded again, which must give the same
//! (`copier::fuzzing`). A panic, a hang (-timeout) or an allocation past
//! -rss_limit_mb is a finding.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    copier::fuzzing::manifest_or_index(data);
});
