//! Writing a large file the way a backup should: write calls of at most
//! 256 KiB, writeback started at once, and 64 MiB behind, waited for and
//! dropped from the page cache (as nbdcopy does). A copy or restore of a
//! whole disk then neither evicts everything else cached nor makes the
//! kernel find fresh pages for all of it.
//!
//! Measured on this project's VMs (ext4, Linux 6.18): each 256 KiB write
//! into fresh page cache took 769 us against nbdcopy's 63 us (strace -c,
//! a 4 GiB copy), and 4 MiB write calls were slower still (dd of 2 GiB:
//! 0.8 s at bs=256K, 2.8-7.7 s at bs=4M). A live full copy of a 4 GiB
//! image went from 3.90 s to 1.90 s (nbdcopy --flush: 1.85-1.96 s).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

/// Zeroes written at once where a target can neither punch a hole nor
/// zero a range.
const ZERO_BUFFER_BYTES: u64 = 1 << 20;

/// Makes `length` bytes at `offset` read as zeroes by writing them, a
/// buffer of `ZERO_BUFFER_BYTES` at a time, through `write(offset, zeroes)`.
pub(crate) fn write_zeroes<E>(
    offset: u64,
    length: u64,
    mut write: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let zeroes = vec![0u8; ZERO_BUFFER_BYTES.min(length) as usize];
    let mut done = 0;
    while done < length {
        let piece = ZERO_BUFFER_BYTES.min(length - done);
        write(offset + done, &zeroes[..piece as usize])?;
        done += piece;
    }
    Ok(())
}

/// The largest write call.
const WRITE_CALL_BYTES: usize = 256 * 1024;

/// Bytes written whose writeback may still be under way before the
/// oldest ranges are waited for and dropped from the page cache. A copy
/// of scattered small ranges below it waits for none of them one by one;
/// its final fdatasync writes them together.
const WRITEBACK_BEHIND_BYTES: u64 = 64 << 20;

/// The ranges written and sent to writeback, oldest first, with their
/// bytes. Durability still comes from the caller's fsync/fdatasync: the
/// calls here are page-cache hints only, and their failure (a file system
/// without them, a pipe) changes nothing.
#[derive(Debug, Default)]
pub(crate) struct Writeback(Mutex<(VecDeque<(u64, u64)>, u64)>);

impl Writeback {
    /// Writes `buf` at `offset` of `file` as the module comment says.
    pub(crate) fn write_at(&self, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        for (index, chunk) in buf.chunks(WRITE_CALL_BYTES).enumerate() {
            file.write_all_at(chunk, offset + (index * WRITE_CALL_BYTES) as u64)?;
        }
        let length = buf.len() as u64;
        sync_range(file, offset, length, libc::SYNC_FILE_RANGE_WRITE);
        let mut oldest = Vec::new();
        {
            let mut behind = self.0.lock().expect("writeback lock");
            let (ranges, bytes) = &mut *behind;
            ranges.push_back((offset, length));
            *bytes += length;
            while *bytes > WRITEBACK_BEHIND_BYTES {
                let Some(range) = ranges.pop_front() else {
                    break;
                };
                *bytes -= range.1;
                oldest.push(range);
            }
        }
        for (offset, length) in oldest {
            sync_range(
                file,
                offset,
                length,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            );
            drop_cached(file, offset, length);
        }
        Ok(())
    }
}

fn sync_range(file: &File, offset: u64, length: u64, flags: libc::c_uint) {
    let (Ok(offset), Ok(length)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(length),
    ) else {
        return;
    };
    // SAFETY: a syscall on a descriptor the caller owns; no memory passed.
    unsafe { libc::sync_file_range(file.as_raw_fd(), offset, length, flags) };
}

fn drop_cached(file: &File, offset: u64, length: u64) {
    let (Ok(offset), Ok(length)) = (libc::off_t::try_from(offset), libc::off_t::try_from(length))
    else {
        return;
    };
    // SAFETY: as above; advice only.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, length, libc::POSIX_FADV_DONTNEED) };
}
