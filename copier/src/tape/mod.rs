//! `tape:PATH`: a sequential stream of fixed-size blocks, for a regular
//! file or a tape drive (docs/tape.md is the format, byte by byte, with
//! what each kind of damage does).
//!
//! A label block first, then sessions: a header (whose disk, which
//! checkpoint, on top of which session), extent records (data, maybe zstd
//! compressed, or zeroes), the list of changed files, a trailer with
//! totals. Every block, record header, payload and trailer has its crc32c.
//!
//! ```no_run
//! use copier::tape::{NewSession, TapeOptions, TapeWriter};
//! use copier::target::Held;
//!
//! let options = TapeOptions { block_size_bytes: 256 * 1024, ..TapeOptions::default() };
//! let tape = TapeWriter::open_append("/backup/disk.tape".as_ref(), &options)?;
//! // What the tape holds: the base of an incremental, and its parent.
//! let last = tape.last_session().cloned();
//! let mut session = tape.begin_session(NewSession {
//!     source_id: "9f3c0d...".into(),
//!     source_size_bytes: 64 << 20,
//!     granularity_bytes: 65536,
//!     base: last.as_ref().map(|h| h.target.clone()),
//!     target: Held { checkpoint: "copy-7".into(), generation: 7 },
//!     parent: last.as_ref().map(|h| h.session_id),
//!     compress: true,
//! })?;
//! // Extents in ascending order, not overlapping.
//! session.write_data(0, &[1u8; 4096])?;
//! session.write_zero(4096, 1 << 20)?;
//! session.set_files(vec!["/etc/hosts".into()]);
//! // Trailer, fdatasync (a filemark on a drive): only now does the tape
//! // hold copy-7. Dropping the session instead cuts it off.
//! let (_tape, totals) = session.finish()?;
//! # let _ = totals;
//! # Ok::<(), copier::tape::TapeError>(())
//! ```
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
pub(crate) mod verify;
mod writer;

#[cfg(test)]
mod tests;

pub use error::{Part, TapeError};
pub use format::{
    BLOCK_SIZE_DEFAULT, BLOCK_SIZE_MAX, BLOCK_SIZE_MIN, Compression, Id, Label, SessionHeader,
    SessionTotals, block_size_is_valid,
};
pub use media::ENOSPC_AFTER_BLOCKS_ENV;
pub(crate) use reader::decompress;
pub use reader::{PayloadPosition, Record, SessionStart, TapeReader};
pub(crate) use restore::Sink;
pub use restore::{RestoreError, RestoreSummary, RestoreTarget, restore};
pub use verify::{
    ChainReport, SessionReport, verify_chain, verify_chain_until_damage, verify_chain_visiting,
};
pub use writer::{
    NewSession, SessionWriter, TapeOptions, TapeWriter, ZSTD_LEVEL_DEFAULT, last_session,
};
