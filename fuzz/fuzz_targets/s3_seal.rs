//! Fuzz target: the input is a sealed object-storage object (byte 0: an
//! encrypted repository or not, its kind, and whether the rest is framed
//! with a correct digest or AES-GCM tag first so that mutations reach
//! zstd), opened with `Sealer::open`; what opens must be within the
//! limit, seal and open again to the same, and open neither as another
//! kind nor with the other key (`copier::fuzzing`). A panic, a hang
//! (-timeout) or an allocation past -rss_limit_mb is a finding.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    copier::fuzzing::sealed_object(data);
});
