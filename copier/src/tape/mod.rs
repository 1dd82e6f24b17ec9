//! `tape:PATH`: a sequential stream of fixed-size blocks, for a regular
//! file or a tape drive (docs/tape.md is the format, byte by byte, with
//! what each kind of damage does).
//!
//! A label block first, then sessions: a header (whose disk, which
//! checkpoint, on top of which session), extent records (data, maybe zstd
//! compressed, or zeroes), the list of changed files, a trailer with
//! totals. Every block, record header, payload and trailer has its crc32c.
//!
//! Files and what each owns:
//! - `format.rs`: the layouts, their codecs and every `*_MAX`.
//! - `media.rs`: a file or a drive: whole-block reads and writes,
//!   filemarks, truncation; the ENOSPC test hook.
//! - `error.rs`: `TapeError`, naming the tape, block and record kind.
//! - `writer.rs`: `TapeWriter` (open for append, cut an unfinished
//!   session), `SessionWriter`, `last_session`.
//! - `tail.rs`: a file tape's last complete session found from its end.
//! - `reader.rs`: `TapeReader`: sessions and checked records.
//! - `verify.rs`: a chain of tapes checked end to end (`verify_chain`).
//! - `restore.rs`: a chain onto an image file or an NBD export.

mod error;
pub mod format;
mod media;
mod reader;
mod restore;
mod tail;
mod verify;
mod writer;

#[cfg(test)]
mod tests;

pub use error::{Part, TapeError};
pub use format::{
    BLOCK_SIZE_DEFAULT, BLOCK_SIZE_MAX, BLOCK_SIZE_MIN, Compression, Id, Label, SessionHeader,
    SessionTotals, block_size_is_valid,
};
pub use media::ENOSPC_AFTER_BLOCKS_ENV;
pub use reader::{Record, SessionStart, TapeReader};
pub use restore::{RestoreError, RestoreSummary, RestoreTarget, restore};
pub use verify::{ChainReport, SessionReport, verify_chain, verify_chain_until_damage};
pub use writer::{
    NewSession, SessionWriter, TapeOptions, TapeWriter, ZSTD_LEVEL_DEFAULT, last_session,
};
