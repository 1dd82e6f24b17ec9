//! Fuzz target: the input is a saved map, either one filesystem's
//! (`fsmap::persist`, magic BWFSMAP1) or a whole disk's
//! (`fsmap::disk::DiskMap`, BWDISKM1), with its CRC-32C trailers
//! recomputed so that changes get past them, then decoded with both
//! decoders and used as the tracker uses a loaded map: every call
//! `fsmap/tests/common/map_exercise.rs` makes, and a round trip through encode.
//! A panic, a hang (-timeout), an allocation past -rss_limit_mb or a
//! broken round trip is a finding.

#![no_main]

#[path = "../../fsmap/tests/common/map_exercise.rs"]
mod map_exercise;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = map_exercise::exercise(&map_exercise::with_checksums(data));
});
