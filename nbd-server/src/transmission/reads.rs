//! READ replies: holes found with SEEK_HOLE/SEEK_DATA and answered as
//! OFFSET_HOLE chunks, and whether a range is cached (`cachestat`) so it
//! can be sent straight from the page cache.

use super::requests::ReplyTo;
use super::*;

/// Reads at least this long look for holes first (and answer them with
/// OFFSET_HOLE chunks); shorter reads are not worth the lseek calls.
const HOLE_SCAN_MIN_BYTES: u64 = 64 * 1024;
/// Holes/data runs looked up for one READ; the rest of the read is sent as data.
const READ_SEGMENTS_MAX: usize = 64;

/// Builds a READ reply in `out`. With `nowait`, returns `Ok(false)` as soon
/// as some data is not cached (the caller discards what was appended).
pub(super) fn read_reply(
    backend: &dyn BlockBackend,
    reply: ReplyTo,
    length: u64,
    df: bool,
    out: &mut OutBuf,
    nowait: bool,
) -> std::io::Result<bool> {
    let read = |buf: &mut [u8], offset: u64| -> std::io::Result<bool> {
        if nowait {
            backend.read_at_nowait(buf, offset)
        } else {
            backend.read_at(buf, offset).map(|()| true)
        }
    };
    let offset = reply.offset;
    if reply.mode == ReplyMode::Simple {
        put_simple_reply(out, 0, reply.cookie);
        return read(out.append(length as usize), offset);
    }
    let segments = read_segments(backend, offset, length, df)?;
    for (index, &(segment_offset, segment_length, is_hole)) in segments.iter().enumerate() {
        let last = index + 1 == segments.len();
        reply.segment(out, last, segment_offset, segment_length, is_hole);
        if !is_hole && !read(out.append(segment_length as usize), segment_offset)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `cachestat(2)`'s range and answer (include/uapi/linux/mman.h).
#[repr(C)]
struct CachestatRange {
    offset: u64,
    length: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    cached: u64,
    dirty: u64,
    writeback: u64,
    evicted: u64,
    recently_evicted: u64,
}

/// The system call's number, the same on every Linux architecture.
const SYS_CACHESTAT: libc::c_long = 451;

/// Pages of `file` in `offset..offset + length` that are in the page cache
/// (dirty ones too), or None when the kernel cannot tell (before 6.5).
fn cached_pages(file: std::os::fd::RawFd, offset: u64, length: u64) -> Option<u64> {
    let range = CachestatRange { offset, length };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both live and of
    // the layout the kernel defines; flags must be 0.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file,
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    (rc == 0).then_some(stat.cached)
}

/// Whether every page of the range is cached, so `sendfile` will not wait
/// for the device on this thread.
pub(super) fn fully_cached(file: std::os::fd::RawFd, offset: u64, length: u64) -> bool {
    const PAGE_BYTES: u64 = 4096;
    let pages = (offset + length).div_ceil(PAGE_BYTES) - offset / PAGE_BYTES;
    cached_pages(file, offset, length).is_some_and(|cached| cached >= pages)
}

/// Whether this kernel has cachestat (asked once, of a file every process has).
pub(super) fn cachestat_works() -> bool {
    static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WORKS.get_or_init(|| {
        let Ok(file) = std::fs::File::open("/proc/self/exe") else {
            return false;
        };
        cached_pages(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 4096).is_some()
    })
}

/// Splits a read into (offset, length, is_hole) runs.
pub(super) fn read_segments(
    backend: &dyn BlockBackend,
    offset: u64,
    length: u64,
    df: bool,
) -> std::io::Result<Vec<(u64, u64, bool)>> {
    if df || length < HOLE_SCAN_MIN_BYTES || !backend.can_extents() || backend.extents_are_slow() {
        return Ok(split_data(vec![(offset, length, false)]));
    }
    let mut extents = Vec::new();
    backend.extents(offset, length, READ_SEGMENTS_MAX, &mut extents)?;
    let mut segments = Vec::with_capacity(extents.len() + 1);
    let mut position = offset;
    let end = offset + length;
    for extent in extents {
        if position >= end {
            break;
        }
        let run = extent.length_bytes.min(end - position);
        let is_hole = extent.flags & STATE_ZERO != 0;
        match segments.last_mut() {
            Some((_, last_length, last_hole)) if *last_hole == is_hole => *last_length += run,
            _ => segments.push((position, run, is_hole)),
        }
        position += run;
    }
    if position < end {
        match segments.last_mut() {
            Some((_, last_length, false)) => *last_length += end - position,
            _ => segments.push((position, end - position, false)),
        }
    }
    Ok(split_data(segments))
}

/// Cuts data runs longer than `READ_CHUNK_MAX` into chunks of at most that.
fn split_data(segments: Vec<(u64, u64, bool)>) -> Vec<(u64, u64, bool)> {
    if segments
        .iter()
        .all(|&(_, length, is_hole)| is_hole || length <= READ_CHUNK_MAX)
    {
        return segments;
    }
    let mut split = Vec::with_capacity(segments.len() + 2);
    for (offset, length, is_hole) in segments {
        let mut done = 0;
        while done < length {
            let piece = if is_hole {
                length
            } else {
                (length - done).min(READ_CHUNK_MAX)
            };
            split.push((offset + done, piece, is_hole));
            done += piece;
        }
    }
    split
}
