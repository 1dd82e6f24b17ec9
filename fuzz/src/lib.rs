//! What the fuzz targets run, apart from the libFuzzer glue, so that
//! `make_seeds` and the targets share it. One module per family of
//! targets; the targets in `fuzz_targets/` are one line each where a
//! module (or a crate's `fuzzing` feature) holds the work.
//!
//! - `tape.rs`: `tape_reader` (the copier's tape reader, and an append).
//! - `nbd.rs`: `nbd_handshake` and `nbd_transmission` (nbd-server's
//!   option haggling, request decoding, validation and replies), with
//!   the in-memory export they serve.
//! - `journal.rs`: `journal_replay` (the tracker's journal).
//! - `control.rs`: `control_protocol` (request lines, the tracker's
//!   answers, the client's reading of replies).

pub mod control;
pub mod journal;
pub mod nbd;
pub mod tape;

use std::path::{Path, PathBuf};

/// A scratch file for this process's runs (in /dev/shm where there is
/// one: the readers under test read files).
pub fn scratch_path(label: &str) -> PathBuf {
    let dir = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("blockwatch-fuzz-{label}-{}", std::process::id()))
}
