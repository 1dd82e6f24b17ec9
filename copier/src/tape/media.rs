//! What holds a tape: a regular file, or a tape drive (a character device
//! such as /dev/nst0). Both get whole blocks only; only a drive gets
//! filemarks (MTWEOF) and end-of-data positioning (MTEOM), and only a
//! file can be truncated and re-read from an offset.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use crate::durability::{Step, step};

/// Debug builds only: a writer fails with ENOSPC once it has written this
/// many blocks (the label counts), as a full tape would (tests without a
/// drive).
pub const ENOSPC_AFTER_BLOCKS_ENV: &str = "BLOCKWATCH_TAPE_ENOSPC_AFTER_BLOCKS";

/// How long an append waits for another holder of the tape's lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(10);

#[derive(Debug)]
pub struct Media {
    pub path: PathBuf,
    file: File,
    pub device: bool,
    /// Next byte offset read or written (files only).
    pub position_bytes: u64,
    blocks_written: u64,
    pub(crate) enospc_after_blocks: Option<u64>,
}

/// One read of a block.
#[derive(Debug, PartialEq, Eq)]
pub enum BlockRead {
    Full,
    /// The file ends `n` bytes into the block (a torn write or a cut).
    Short(usize),
    /// End of the file, or a filemark on a drive.
    End,
}

impl Media {
    pub fn open_read(path: &Path) -> io::Result<Media> {
        Media::from_file(path, File::open(path)?)
    }

    /// Opens for reading and writing, creating a regular file if missing.
    pub fn open_write(path: &Path) -> io::Result<Media> {
        let file = step(Step::Create(path), || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
        })?;
        let mut media = Media::from_file(path, file)?;
        if cfg!(debug_assertions) {
            media.enospc_after_blocks = std::env::var(ENOSPC_AFTER_BLOCKS_ENV)
                .ok()
                .and_then(|v| v.parse().ok());
        }
        Ok(media)
    }

    fn from_file(path: &Path, file: File) -> io::Result<Media> {
        let device = file.metadata()?.file_type().is_char_device();
        Ok(Media {
            path: path.to_path_buf(),
            file,
            device,
            position_bytes: 0,
            blocks_written: 0,
            enospc_after_blocks: None,
        })
    }

    /// Keeps a second writer off this tape (flock, released on close),
    /// waiting up to `LOCK_WAIT` for it: a process that forks (to start
    /// a program) holds a copy of every descriptor, and so of a just
    /// closed tape's lock, until its child execs.
    pub fn lock_exclusive(&self) -> io::Result<bool> {
        let started = std::time::Instant::now();
        loop {
            if self.try_lock_exclusive()? {
                return Ok(true);
            }
            if started.elapsed() > LOCK_WAIT {
                return Ok(false);
            }
            std::thread::sleep(LOCK_POLL);
        }
    }

    fn try_lock_exclusive(&self) -> io::Result<bool> {
        // SAFETY: flock on a descriptor we own.
        let result = unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if result == 0 {
            return Ok(true);
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(false);
        }
        Err(error)
    }

    pub fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Reads the next block into `block` (its length is the block size).
    /// A drive returns one block per read; a file is read until the block
    /// is full or the file ends.
    pub fn read_block(&mut self, block: &mut [u8]) -> io::Result<BlockRead> {
        if self.device {
            let count = retry(|| (&self.file).read(block))?;
            return Ok(match count {
                0 => BlockRead::End,
                n if n == block.len() => BlockRead::Full,
                n => BlockRead::Short(n),
            });
        }
        let mut filled = 0;
        while filled < block.len() {
            let count = retry(|| {
                self.file
                    .read_at(&mut block[filled..], self.position_bytes + filled as u64)
            })?;
            if count == 0 {
                break;
            }
            filled += count;
        }
        self.position_bytes += filled as u64;
        Ok(match filled {
            0 => BlockRead::End,
            n if n == block.len() => BlockRead::Full,
            n => BlockRead::Short(n),
        })
    }

    /// Writes one whole block where the tape ends.
    pub fn write_block(&mut self, block: &[u8]) -> io::Result<()> {
        if self
            .enospc_after_blocks
            .is_some_and(|limit| self.blocks_written >= limit)
        {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if self.device {
            // A drive takes a block per write(2): a short write is an error
            // (early end of tape), never half a block to finish later.
            let count = retry(|| (&self.file).write(block))?;
            if count != block.len() {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        } else {
            step(Step::Write(&self.path), || {
                self.file.write_all_at(block, self.position_bytes)
            })?;
            self.position_bytes += block.len() as u64;
        }
        self.blocks_written += 1;
        Ok(())
    }

    /// Makes what was written durable, and on a drive ends the tape file
    /// with a filemark.
    pub fn end_file(&mut self) -> io::Result<()> {
        if self.device {
            return mt_op(&self.file, MTWEOF, 1);
        }
        let sync = Step::Sync {
            path: &self.path,
            all: false,
        };
        step(sync, || self.file.sync_data())
    }

    /// Files: cuts the tape at `length_bytes`, and writes go on there.
    pub fn truncate(&mut self, length_bytes: u64) -> io::Result<()> {
        assert!(!self.device, "a tape drive cannot be truncated");
        step(Step::Write(&self.path), || self.file.set_len(length_bytes))?;
        let sync = Step::Sync {
            path: &self.path,
            all: true,
        };
        step(sync, || self.file.sync_all())?;
        self.position_bytes = length_bytes;
        Ok(())
    }

    /// Drives: rewinds to the label.
    pub fn rewind(&mut self) -> io::Result<()> {
        if self.device {
            return mt_op(&self.file, MTREW, 1);
        }
        self.position_bytes = 0;
        Ok(())
    }

    /// Drives: goes to the end of recorded data, where the next session
    /// is written.
    pub fn seek_end_of_data(&mut self) -> io::Result<()> {
        assert!(self.device, "files are positioned by offset");
        mt_op(&self.file, MTEOM, 1)
    }

    /// Files: the next read or write happens at `position_bytes`.
    pub fn seek(&mut self, position_bytes: u64) -> io::Result<()> {
        if self.device {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a tape drive is read once, front to back: copy the tape to a file (dd bs=BLOCKSIZE) to restore from it",
            ));
        }
        self.position_bytes = position_bytes;
        Ok(())
    }
}

fn retry<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

// linux/mtio.h: struct mtop { short mt_op; int mt_count; }, MTIOCTOP.
#[repr(C)]
struct MtOp {
    op: libc::c_short,
    count: libc::c_int,
}
const _: () = assert!(std::mem::size_of::<MtOp>() == 8);
const MTIOCTOP: libc::c_ulong = 0x4008_6d01; // _IOW('m', 1, struct mtop)
const MTWEOF: libc::c_short = 5;
const MTREW: libc::c_short = 6;
const MTEOM: libc::c_short = 12;

fn mt_op(file: &File, op: libc::c_short, count: libc::c_int) -> io::Result<()> {
    let request = MtOp { op, count };
    // SAFETY: MTIOCTOP reads one struct mtop, which lives across the call;
    // the descriptor is ours.
    let result = unsafe { libc::ioctl(file.as_raw_fd(), MTIOCTOP as _, &request) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
