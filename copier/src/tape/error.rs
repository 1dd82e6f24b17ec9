//! The errors of tape operations: each names the tape and, for damage,
//! the block and the kind of record where it was found.

use std::io;
use std::path::{Path, PathBuf};

use super::format::RecordKind;

/// What was being read where damage was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Label,
    Block,
    RecordHeader,
    SessionHeader,
    DataExtent,
    ZeroExtent,
    Files,
    Trailer,
}

impl Part {
    pub fn of(kind: RecordKind) -> Part {
        match kind {
            RecordKind::Header => Part::SessionHeader,
            RecordKind::Data => Part::DataExtent,
            RecordKind::Zero => Part::ZeroExtent,
            RecordKind::Files => Part::Files,
            RecordKind::Trailer => Part::Trailer,
        }
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Part::Label => "label",
            Part::Block => "block header",
            Part::RecordHeader => "record header",
            Part::SessionHeader => "session header",
            Part::DataExtent => "data extent",
            Part::ZeroExtent => "zero extent",
            Part::Files => "file list",
            Part::Trailer => "session trailer",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TapeError {
    #[error("tape {tape}")]
    Io { tape: PathBuf, source: io::Error },
    #[error("tape {tape} is not a blockwatch tape: {reason}")]
    Foreign { tape: PathBuf, reason: String },
    #[error("tape {tape}: damage at block {block}, in the {part}: {reason}")]
    Damaged {
        tape: PathBuf,
        block: u64,
        part: Part,
        reason: String,
    },
    #[error(
        "tape {tape} ends at block {block}, inside the {part}: the tape was cut short, or its last session never finished"
    )]
    Truncated {
        tape: PathBuf,
        block: u64,
        part: Part,
    },
    /// A restore or verify chain that does not hold together, or a writer
    /// asked for what the format cannot hold.
    #[error("tape {tape}: {reason}")]
    Refused { tape: PathBuf, reason: String },
}

impl TapeError {
    pub(crate) fn io(tape: &Path, source: io::Error) -> TapeError {
        TapeError::Io {
            tape: tape.to_path_buf(),
            source,
        }
    }

    pub(crate) fn refused(tape: &Path, reason: impl Into<String>) -> TapeError {
        TapeError::Refused {
            tape: tape.to_path_buf(),
            reason: reason.into(),
        }
    }

    /// Whether this is damage to the tape's contents (as opposed to an I/O
    /// error or a refusal): what verify reports with exit 1.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            TapeError::Damaged { .. } | TapeError::Truncated { .. } | TapeError::Foreign { .. }
        )
    }

    /// The block where damage was found, if any.
    pub fn block(&self) -> Option<u64> {
        match self {
            TapeError::Damaged { block, .. } | TapeError::Truncated { block, .. } => Some(*block),
            _ => None,
        }
    }
}
