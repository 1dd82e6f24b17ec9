//! Where a restore writes: an image file or block device, or an NBD
//! export with requests kept in flight.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use nbd_client::{Client, Pending, RequestFlags};

use super::pipe::Step;
use super::{RestoreError, RestoreTarget};
use crate::stream_write::write_zeroes;

/// Requests kept in flight on an NBD target.
const NBD_IN_FLIGHT: usize = 32;

pub(crate) enum Sink {
    File {
        path: PathBuf,
        file: File,
        writeback: crate::stream_write::Writeback,
        /// Created or empty before the restore: it reads as zeroes, so
        /// zero extents of the first session need no work.
        fresh: bool,
    },
    Nbd(Box<NbdSink>),
}

pub(crate) struct NbdSink {
    uri: String,
    client: Client,
    in_flight: VecDeque<Pending<()>>,
}

impl Sink {
    pub(crate) fn open(target: &RestoreTarget, size_bytes: u64) -> Result<Sink, RestoreError> {
        match target {
            RestoreTarget::File(path) => open_file(path, size_bytes),
            RestoreTarget::Nbd(uri) => Ok(Sink::Nbd(Box::new(NbdSink::connect(uri, size_bytes)?))),
        }
    }

    pub(crate) fn write(&mut self, offset_bytes: u64, data: &[u8]) -> Result<(), RestoreError> {
        match self {
            Sink::File {
                path,
                file,
                writeback,
                ..
            } => writeback
                .write_at(file, data, offset_bytes)
                .map_err(|source| file_error(path, source)),
            Sink::Nbd(nbd) => nbd.write(offset_bytes, data),
        }
    }

    pub(crate) fn zero(
        &mut self,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Result<(), RestoreError> {
        match self {
            Sink::File { fresh: true, .. } => Ok(()),
            Sink::File { path, file, .. } => zero_file(file, offset_bytes, length_bytes)
                .map_err(|source| file_error(path, source)),
            Sink::Nbd(nbd) => nbd.zero(offset_bytes, length_bytes),
        }
    }

    /// Waits for every write in flight: the next session may overwrite
    /// this one's ranges.
    pub(super) fn drain(&mut self) -> Result<(), RestoreError> {
        match self {
            // After the first session the file holds data: later zero
            // extents must really zero.
            Sink::File { fresh, .. } => {
                *fresh = false;
                Ok(())
            }
            Sink::Nbd(nbd) => nbd.drain(),
        }
    }

    /// Makes everything durable.
    pub(crate) fn finish(&mut self) -> Result<(), RestoreError> {
        self.drain()?;
        match self {
            Sink::File { path, file, .. } => {
                file.sync_all().map_err(|source| file_error(path, source))
            }
            Sink::Nbd(nbd) => nbd.flush(),
        }
    }
}

impl NbdSink {
    fn connect(uri: &str, size_bytes: u64) -> Result<NbdSink, RestoreError> {
        let client = Client::connect(uri).map_err(|source| RestoreError::Connect {
            target: uri.to_string(),
            source,
        })?;
        let refuse = |reason: String| RestoreError::TargetRefused {
            target: uri.to_string(),
            reason,
        };
        if client.info().is_read_only() {
            return Err(refuse("the export is read-only".into()));
        }
        if client.size_bytes() < size_bytes {
            return Err(refuse(format!(
                "the export is {} bytes, the backup's disk is {size_bytes}",
                client.size_bytes()
            )));
        }
        Ok(NbdSink {
            uri: uri.to_string(),
            client,
            in_flight: VecDeque::new(),
        })
    }

    fn error(&self, source: nbd_client::CommandError) -> RestoreError {
        RestoreError::Command {
            target: self.uri.clone(),
            source,
        }
    }

    fn write(&mut self, offset_bytes: u64, data: &[u8]) -> Result<(), RestoreError> {
        let piece_bytes = self.client.payload_max_bytes() as usize;
        let mut offset = offset_bytes;
        for piece in data.chunks(piece_bytes) {
            let pending = self
                .client
                .submit_write(piece, offset, RequestFlags::NONE)
                .map_err(|source| self.error(source))?;
            self.queue(pending)?;
            offset += piece.len() as u64;
        }
        Ok(())
    }

    fn zero(&mut self, offset_bytes: u64, length_bytes: u64) -> Result<(), RestoreError> {
        if !self.client.info().can_write_zeroes() {
            return write_zeroes(offset_bytes, length_bytes, |at, zeroes| {
                self.write(at, zeroes)
            });
        }
        if length_bytes > self.client.effect_max_bytes() {
            // Longer than one request may be: the client splits it.
            return self
                .client
                .write_zeroes(offset_bytes, length_bytes, RequestFlags::NONE)
                .map_err(|source| self.error(source));
        }
        let pending = self
            .client
            .submit_write_zeroes(offset_bytes, length_bytes, RequestFlags::NONE)
            .map_err(|source| self.error(source))?;
        self.queue(pending)
    }

    fn queue(&mut self, pending: Pending<()>) -> Result<(), RestoreError> {
        self.in_flight.push_back(pending);
        if self.in_flight.len() >= NBD_IN_FLIGHT {
            let oldest = self.in_flight.pop_front().expect("one in flight");
            oldest.wait().map_err(|source| self.error(source))?;
        }
        Ok(())
    }

    pub(super) fn drain(&mut self) -> Result<(), RestoreError> {
        while let Some(pending) = self.in_flight.pop_front() {
            pending.wait().map_err(|source| self.error(source))?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), RestoreError> {
        if self.client.info().can_flush() {
            self.client.flush().map_err(|source| self.error(source))?;
        }
        Ok(())
    }
}

pub(super) fn file_error(path: &Path, source: io::Error) -> RestoreError {
    RestoreError::TargetIo {
        target: path.display().to_string(),
        source,
    }
}

/// Opens (creating it sparse if missing) the image a restore writes. An
/// existing regular file must be empty or of the disk's size, a block
/// device at least that large: anything else is likely the wrong file.
fn open_file(path: &Path, size_bytes: u64) -> Result<Sink, RestoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| file_error(path, source))?;
    lock_image(&file, path)?;
    let metadata = file.metadata().map_err(|source| file_error(path, source))?;
    let refuse = |reason: String| RestoreError::TargetRefused {
        target: path.display().to_string(),
        reason,
    };
    let mut fresh = false;
    if metadata.file_type().is_block_device() {
        let device_bytes = io::Seek::seek(&mut &file, io::SeekFrom::End(0))
            .map_err(|source| file_error(path, source))?;
        if device_bytes < size_bytes {
            return Err(refuse(format!(
                "the device is {device_bytes} bytes, the backup's disk is {size_bytes}"
            )));
        }
    } else if metadata.len() == 0 {
        file.set_len(size_bytes)
            .map_err(|source| file_error(path, source))?;
        fresh = true;
    } else if metadata.len() != size_bytes {
        return Err(refuse(format!(
            "it is {} bytes, the backup's disk is {size_bytes}: restore to a new file or one of that size",
            metadata.len()
        )));
    }
    Ok(Sink::File {
        writeback: Default::default(),
        path: path.to_path_buf(),
        file,
        fresh,
    })
}

/// Keeps the image a restore writes from anyone else who locks it: the
/// `blockwatch serve` that serves it (its flock, shared or exclusive), or
/// another restore. Released when the file closes. A file system without
/// flock (some network ones) restores unlocked.
pub(super) fn lock_image(file: &File, path: &Path) -> Result<(), RestoreError> {
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(RestoreError::TargetRefused {
            target: path.display().to_string(),
            reason:
                "it is in use (locked): a blockwatch server serves it, or another restore writes it"
                    .into(),
        });
    }
    tracing::debug!(path = %path.display(), %error, "restoring without a lock on the image");
    Ok(())
}

/// Makes a range of a file read as zeroes: a hole where the file system
/// can punch one, written zeroes elsewhere.
fn zero_file(file: &File, offset_bytes: u64, length_bytes: u64) -> io::Result<()> {
    if let (Ok(offset), Ok(length)) = (
        libc::off_t::try_from(offset_bytes),
        libc::off_t::try_from(length_bytes),
    ) {
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let punched = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                length,
            )
        } == 0;
        if punched {
            return Ok(());
        }
    }
    write_zeroes(offset_bytes, length_bytes, |at, zeroes| {
        file.write_all_at(zeroes, at)
    })
}

impl Sink {
    /// A session's start waits for the writes of the one before it (which
    /// it may overwrite); a target that holds something is never started
    /// over, as a full session writes all of it.
    pub(super) fn apply(&mut self, step: &Step) -> Result<(), RestoreError> {
        match step {
            Step::Session { .. } => self.drain(),
            Step::Data { offset_bytes, data } => self.write(*offset_bytes, data),
            Step::Zero {
                offset_bytes,
                length_bytes,
            } => self.zero(*offset_bytes, *length_bytes),
        }
    }
}
