//! Fuzz target: the input is a tape file (byte 0 says whether its
//! checksums are recomputed first, so that changes get past them), read
//! as every reader of tapes reads it: every session and record, the
//! chain check, the last session's header, and an append (open, cut an
//! unfinished tail, one session, finish) whose session must then read
//! back whole and be the tape's last. A panic, a hang (-timeout), an
//! allocation past -rss_limit_mb or an appended session that does not
//! read back is a finding.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    blockwatch_fuzz::tape::exercise(data);
});
