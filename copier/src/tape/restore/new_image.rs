//! A restore onto a new image (missing, or an empty file) in one pass:
//! each record is written as soon as it is checked, and any failure takes
//! the image back to nothing, which loses nothing.

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

use super::pipe::{Step, WriterStopped, with_writer};
use super::sink::{Sink, file_error, lock_image};
use super::{RestoreError, RestoreSummary};
use crate::tape::verify::{Stop, walk_chain};
use crate::tape::{Record, TapeReader};

/// An image file that held nothing before the restore: missing (created
/// here) or empty. It needs no first pass: whatever fails, taking it back
/// to nothing loses nothing.
pub(super) struct NewImage {
    path: PathBuf,
    /// Always `Sink::File`, of `path`.
    sink: Sink,
    created: bool,
}

impl NewImage {
    /// The image at `path` if it is new; None for anything that holds or
    /// may hold data (a file with bytes, a device, a dangling link).
    pub(super) fn claim(path: &Path) -> Result<Option<NewImage>, RestoreError> {
        let (file, created) = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(file) => (file, true),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                match OpenOptions::new().read(true).write(true).open(path) {
                    Ok(file) => (file, false),
                    Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(source) => return Err(file_error(path, source)),
                }
            }
            Err(source) => return Err(file_error(path, source)),
        };
        if let Err(refused) = lock_image(&file, path) {
            if created {
                let _ = std::fs::remove_file(path);
            }
            return Err(refused);
        }
        let metadata = file.metadata().map_err(|source| file_error(path, source))?;
        let empty_file = metadata.file_type().is_file() && metadata.len() == 0;
        if !(created || empty_file) {
            return Ok(None);
        }
        let sink = Sink::File {
            path: path.to_path_buf(),
            file,
            writeback: Default::default(),
            fresh: true,
        };
        Ok(Some(NewImage {
            path: path.to_path_buf(),
            sink,
            created,
        }))
    }

    /// A step of the restore: a full session starts the image over.
    pub(super) fn apply(&mut self, step: &Step) -> Result<(), RestoreError> {
        match step {
            Step::Session {
                full_size_bytes: Some(size_bytes),
            } => self.start_over(*size_bytes),
            step => self.sink.apply(step),
        }
    }

    /// Makes the image `size_bytes` of zeroes again, as if new: a full
    /// session writes every byte of the disk on top of nothing.
    fn start_over(&mut self, size_bytes: u64) -> Result<(), RestoreError> {
        let Sink::File {
            path, file, fresh, ..
        } = &mut self.sink
        else {
            unreachable!("a new image is a file");
        };
        file.set_len(0)
            .and_then(|()| file.set_len(size_bytes))
            .map_err(|source| file_error(path, source))?;
        *fresh = true;
        Ok(())
    }

    /// Takes the image back to what it was before the restore; what was
    /// done, for the error that caused it.
    fn undo(self) -> String {
        let Sink::File { file, .. } = self.sink else {
            unreachable!("a new image is a file");
        };
        if self.created {
            drop(file);
            return match std::fs::remove_file(&self.path) {
                Ok(()) => "was removed again".into(),
                Err(error) => format!("could not be removed: {error}"),
            };
        }
        match file.set_len(0).and_then(|()| file.sync_all()) {
            Ok(()) => "was emptied again".into(),
            Err(error) => format!("could not be emptied again: {error}"),
        }
    }
}

/// What a one-pass restore has sent to be applied.
#[derive(Default)]
struct Applied {
    /// Whether the next record starts a session (none seen yet, or a
    /// trailer just ended one).
    between_sessions: bool,
    sessions: usize,
    /// The session the image was last started over at (the last full one).
    first_applied: usize,
    data_bytes: u64,
    zero_bytes: u64,
}

impl Applied {
    /// The step for `record` (none for a file list or a trailer), and a
    /// session's start before its first record.
    fn steps(&mut self, reader: &TapeReader, record: Record) -> [Option<Step>; 2] {
        let mut start = None;
        if self.between_sessions {
            self.between_sessions = false;
            self.sessions += 1;
            let header = reader.header().expect("a record is of a session");
            let full_size_bytes = header.is_full().then_some(header.source_size_bytes);
            if full_size_bytes.is_some() {
                self.first_applied = self.sessions - 1;
                (self.data_bytes, self.zero_bytes) = (0, 0);
            }
            start = Some(Step::Session { full_size_bytes });
        }
        let step = match record {
            Record::Data { offset_bytes, data } => {
                self.data_bytes += data.len() as u64;
                Some(Step::Data { offset_bytes, data })
            }
            Record::Zero {
                offset_bytes,
                length_bytes,
            } => {
                self.zero_bytes += length_bytes;
                Some(Step::Zero {
                    offset_bytes,
                    length_bytes,
                })
            }
            Record::Files(_) => None,
            Record::Trailer(_) => {
                self.between_sessions = true;
                None
            }
        };
        [start, step]
    }
}

/// Restores onto a new image in one pass: each record is written as soon
/// as it is checked, by a thread of its own while the next ones are read,
/// and the walk checks the chain as the first pass would. A full session
/// starts the image over; a failure of any kind takes the image back to
/// nothing.
pub(super) fn restore_onto_new(
    tapes: &[PathBuf],
    mut image: NewImage,
    until: Option<&str>,
) -> Result<RestoreSummary, RestoreError> {
    let mut applied = Applied {
        between_sessions: true,
        ..Applied::default()
    };
    let ((chain, stop), written) = with_writer(&mut image, NewImage::apply, |pipe| {
        let mut visit = |reader: &mut TapeReader, record: Record| -> Result<(), WriterStopped> {
            for step in applied.steps(reader, record).into_iter().flatten() {
                pipe.send(reader, step)?;
            }
            Ok(())
        };
        walk_chain(tapes, until, &mut visit)
    });
    let target = image.path.display().to_string();
    // Made durable only once the whole chain read well.
    let written = written.and_then(|()| match stop {
        None => image.sink.finish(),
        Some(_) => Ok(()),
    });
    match (stop, written) {
        (None, Ok(())) => Ok(RestoreSummary {
            first_applied: applied.first_applied,
            chain,
            data_bytes: applied.data_bytes,
            zero_bytes: applied.zero_bytes,
        }),
        (Some(Stop::Tape(error)), _) => Err(RestoreError::Refused {
            good_until: chain.last_checkpoint().map(str::to_string),
            error,
            undone: Some(format!("the new image {target} {}", image.undo())),
        }),
        (_, Err(error)) => Err(RestoreError::Undone {
            target,
            undone: image.undo(),
            source: Box::new(error),
        }),
        (Some(Stop::Visitor(WriterStopped)), Ok(())) => {
            unreachable!("the writer stops early only on an error")
        }
    }
}
