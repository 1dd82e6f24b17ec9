//! Restore: a chain of tapes onto a raw image file (or block device) or
//! an NBD export. Damage, a wrong order, a gap, a foreign or resized
//! session refuse the restore and leave the target as it was:
//! - onto a target that holds something (an image, a device, an export),
//!   the first pass reads and checks every session up to the point in time
//!   asked for (`verify_chain`) before anything is written; the second
//!   reads the same sessions again, from the last full one on, and applies
//!   them in order;
//! - onto a new image (missing, or an empty file) one pass checks and
//!   writes together (`restore_onto_new`), and any failure removes (or
//!   empties) the image again: there was nothing on it to keep.

mod new_image;
mod pipe;
mod sink;

use std::io;
use std::path::PathBuf;

use new_image::{NewImage, restore_onto_new};
use pipe::{Pipe, Step, WriterStopped, with_writer};
pub(crate) use sink::Sink;

use super::error::TapeError;
use super::reader::{Record, TapeReader};
use super::verify::{ChainReport, SessionReport, verify_chain_until_damage};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreTarget {
    /// A raw image file (created sparse if missing) or a block device.
    File(PathBuf),
    /// `nbd://...`, `nbd+unix://...`, or their TLS forms `nbds://...`.
    Nbd(String),
}

impl RestoreTarget {
    /// NBD URIs (any of the four schemes), `file:PATH`, or a plain path;
    /// other URI schemes (`s3://`) are refused, not taken for file names.
    pub fn parse(text: &str) -> Result<RestoreTarget, RestoreError> {
        if nbd_client::is_nbd_uri(text) {
            return Ok(RestoreTarget::Nbd(text.to_string()));
        }
        if let Some(path) = text.strip_prefix("file:") {
            return Ok(RestoreTarget::File(PathBuf::from(path)));
        }
        if text.contains("://") {
            return Err(RestoreError::TargetRefused {
                target: text.to_string(),
                reason: "restore writes an image file, a block device or an NBD export (nbd://, nbd+unix://, nbds://, nbds+unix://)".into(),
            });
        }
        Ok(RestoreTarget::File(PathBuf::from(text)))
    }

    pub fn describe(&self) -> String {
        match self {
            RestoreTarget::File(path) => path.display().to_string(),
            RestoreTarget::Nbd(uri) => uri.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{}; {}{}", .error, .undone.as_deref().unwrap_or("nothing was written to the target"), .good_until.as_ref().map(|c| format!(" (the chain reads well up to checkpoint {c}: restore with --until {c})")).unwrap_or_default())]
    Refused {
        error: TapeError,
        /// The last checkpoint the chain reads well up to, if any.
        good_until: Option<String>,
        /// What became of a new image written before the refusal (None:
        /// nothing was written).
        undone: Option<String>,
    },
    /// A restore onto a new image failed and the image was taken back.
    #[error("the restore onto the new image {target} failed, and the image {undone}")]
    Undone {
        target: String,
        undone: String,
        #[source]
        source: Box<RestoreError>,
    },
    #[error("{source}; the target was partly restored: restore again")]
    Reread { source: TapeError },
    #[error("restore target {target}")]
    TargetIo { target: String, source: io::Error },
    #[error("restore target {target}: {reason}; nothing was written to it")]
    TargetRefused { target: String, reason: String },
    #[error("restore target {target}")]
    Connect {
        target: String,
        source: nbd_client::ConnectError,
    },
    #[error("restore target {target}: the target was partly restored: restore again")]
    Command {
        target: String,
        source: nbd_client::CommandError,
    },
}

/// What a restore applied.
#[derive(Debug, Clone)]
pub struct RestoreSummary {
    pub chain: ChainReport,
    /// Index into `chain.sessions` of the first session applied (the last
    /// full one); every session from there on was applied.
    pub first_applied: usize,
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

/// Restores `tapes` (in order) onto `target`, up to the session whose
/// target checkpoint is `until` (the whole chain when None).
pub fn restore(
    tapes: &[PathBuf],
    target: &RestoreTarget,
    until: Option<&str>,
) -> Result<RestoreSummary, RestoreError> {
    if let RestoreTarget::File(path) = target
        && let Some(image) = NewImage::claim(path)?
    {
        return restore_onto_new(tapes, image, until);
    }
    let chain = match verify_chain_until_damage(tapes, until) {
        (chain, None) => chain,
        (good, Some(error)) => {
            return Err(RestoreError::Refused {
                good_until: good.last_checkpoint().map(str::to_string),
                error,
                undone: None,
            });
        }
    };
    let sessions = chain.restore_sessions();
    let first_applied = chain.sessions.len() - sessions.len();
    let size_bytes = sessions[0].header.source_size_bytes;
    let mut sink = Sink::open(target, size_bytes)?;
    let mut counts = (0, 0);
    let (read, written) = with_writer(&mut sink, Sink::apply, |pipe| {
        read_sessions(&chain, sessions, pipe, &mut counts)
    });
    written?;
    match read {
        Ok(()) => {}
        Err(Halt::Tape(error)) => return Err(reread(error)),
        Err(Halt::Writer) => unreachable!("the writer stops early only on an error"),
    }
    sink.finish()?;
    let (data_bytes, zero_bytes) = counts;
    Ok(RestoreSummary {
        first_applied,
        chain,
        data_bytes,
        zero_bytes,
    })
}

fn reread(source: TapeError) -> RestoreError {
    RestoreError::Reread { source }
}

/// Why the second pass stopped early.
enum Halt {
    Tape(TapeError),
    Writer,
}

impl From<WriterStopped> for Halt {
    fn from(_: WriterStopped) -> Halt {
        Halt::Writer
    }
}

impl From<TapeError> for Halt {
    fn from(error: TapeError) -> Halt {
        Halt::Tape(error)
    }
}

/// The second pass: `sessions` read again, each extent sent to be
/// applied; the data and zero bytes sent, into `counts`.
fn read_sessions(
    chain: &ChainReport,
    sessions: &[SessionReport],
    pipe: &Pipe,
    counts: &mut (u64, u64),
) -> Result<(), Halt> {
    let mut readers: Vec<Option<TapeReader>> = (0..chain.tapes.len()).map(|_| None).collect();
    for (index, session) in sessions.iter().enumerate() {
        let slot = &mut readers[session.tape_index];
        if slot.is_none() {
            *slot = Some(TapeReader::open(&chain.tapes[session.tape_index].0)?);
        }
        let reader = slot.as_mut().expect("opened above");
        reader.seek_session(session.start)?;
        let header = reader.next_session()?.cloned();
        if header.as_ref() != Some(&session.header) {
            let path = reader.path().to_path_buf();
            return Err(Halt::Tape(TapeError::refused(
                &path,
                "the tape changed between the check and the restore",
            )));
        }
        if index > 0 {
            let start = Step::Session {
                full_size_bytes: None,
            };
            pipe.send(reader, start)?;
        }
        while let Some(record) = reader.next_record()? {
            match record {
                Record::Data { offset_bytes, data } => {
                    counts.0 += data.len() as u64;
                    pipe.send(reader, Step::Data { offset_bytes, data })?;
                }
                Record::Zero {
                    offset_bytes,
                    length_bytes,
                } => {
                    counts.1 += length_bytes;
                    let zero = Step::Zero {
                        offset_bytes,
                        length_bytes,
                    };
                    pipe.send(reader, zero)?;
                }
                Record::Files(_) | Record::Trailer(_) => {}
            }
        }
    }
    Ok(())
}
