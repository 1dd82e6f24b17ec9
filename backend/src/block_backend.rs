//! The `BlockBackend` trait: what a server (or the copier) needs from storage.
//!
//! Modelled on nbdkit's plugin/filter interface: `can_*` capabilities with
//! conservative defaults, and data operations that take already-validated
//! ranges (the caller checks bounds, flags and read-only before calling in;
//! nbd-server does it in `transmission.rs`). A layer (the tracker, later a
//! cache, ...) wraps another backend and forwards what it does not change.
//!
//! Operations are synchronous. nbd-server runs those that cannot block for
//! long (`read_at_nowait`, and writes that `write_is_cheap` allows) on the
//! connection's own thread, and the rest on tokio's blocking pool.

use std::io;

/// One run of a metadata context's status over the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length_bytes: u64,
    pub flags: u32,
}

/// `base:allocation` flags of an `Extent`, with the values NBD gives them
/// on the wire: the range reads as a hole / as zeroes.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Appends an extent to `out`, merging it into the previous one when the
/// flags match. `first` is where this answer's extents begin in `out`:
/// nothing before it is merged into.
pub fn push_extent(out: &mut Vec<Extent>, first: usize, length_bytes: u64, flags: u32) {
    if out.len() > first
        && let Some(last) = out.last_mut()
        && last.flags == flags
    {
        last.length_bytes += length_bytes;
        return;
    }
    out.push(Extent {
        length_bytes,
        flags,
    });
}

/// How WRITE_ZEROES may be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroRequest {
    /// The client allows a hole (NO_HOLE not set).
    pub may_trim: bool,
    /// FAST_ZERO: fail with `ZeroError::NotFast` rather than write zeroes slowly.
    pub fast_only: bool,
    pub fua: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ZeroError {
    #[error("zeroing this range would be no faster than writing zeroes")]
    NotFast,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Storage behind an export. Offsets and lengths given to the data methods
/// are already checked against `size_bytes()`.
pub trait BlockBackend: Send + Sync + 'static {
    /// Size of the export, fixed for the life of the backend.
    fn size_bytes(&self) -> u64;

    fn is_read_only(&self) -> bool {
        false
    }
    fn is_rotational(&self) -> bool {
        false
    }
    /// FLUSH makes every completed write durable, whichever connection sent it.
    fn can_multi_conn(&self) -> bool {
        false
    }
    fn can_trim(&self) -> bool {
        false
    }
    /// WRITE_ZEROES with FAST_ZERO can succeed at least sometimes.
    fn can_fast_zero(&self) -> bool {
        false
    }
    fn can_cache(&self) -> bool {
        false
    }
    /// The backend knows where its holes are (`base:allocation`, OFFSET_HOLE).
    fn can_extents(&self) -> bool {
        false
    }

    /// Fills `buf` from `offset`. A short read past the end of a sparse file is zeroes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Like `read_at`, but only if it can be done without waiting for the
    /// device (the data is cached). `Ok(false)` means "would block: call
    /// `read_at` on a thread that may block".
    fn read_at_nowait(&self, _buf: &mut [u8], _offset: u64) -> io::Result<bool> {
        Ok(false)
    }

    /// Whether a plain (non-FUA) write of this range can run without
    /// waiting for a device: nbd-server then runs it on the connection's
    /// thread instead of the blocking pool. A tracking layer says no when
    /// the write must first wait for a durable mark.
    fn write_is_cheap(&self, _offset: u64, _length: u64) -> bool {
        true
    }

    /// Writes `buf` at `offset`; with `fua` it is durable before returning.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// Discards a range (a hint: the contents become unspecified).
    fn trim(&self, _offset: u64, _length: u64, _fua: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }

    /// Makes a range read as zeroes. The default writes zero buffers.
    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        request: ZeroRequest,
    ) -> Result<(), ZeroError> {
        if request.fast_only {
            return Err(ZeroError::NotFast);
        }
        write_zero_buffers(self, offset, length, request.fua)?;
        Ok(())
    }

    /// Prefetches a range into the cache.
    fn cache(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }

    /// Appends the `base:allocation` extents that start at `offset` and cover
    /// at least one byte (at most `length` bytes unless the last extent runs
    /// on), at most `max_extents` of them.
    fn extents(
        &self,
        _offset: u64,
        length: u64,
        _max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        out.push(Extent {
            length_bytes: length,
            flags: 0,
        });
        Ok(())
    }

    /// Extra metadata contexts this backend serves besides `base:allocation`
    /// (the tracker adds `qemu:dirty-bitmap:NAME`). Names are full context names.
    fn meta_contexts(&self) -> Vec<String> {
        Vec::new()
    }

    /// Status extents for one of `meta_contexts()`, as `extents` does for
    /// `base:allocation`.
    fn context_extents(
        &self,
        context: &str,
        _offset: u64,
        _length: u64,
        _max_extents: usize,
        _out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no metadata context {context}"),
        ))
    }
}

/// Largest zero buffer written at once by the WRITE_ZEROES fallback.
const ZERO_BUFFER_MAX: u64 = 1024 * 1024;

/// Writes zeroes with plain writes, in bounded pieces.
pub fn write_zero_buffers<B: BlockBackend + ?Sized>(
    backend: &B,
    offset: u64,
    length: u64,
    fua: bool,
) -> io::Result<()> {
    let zeroes = vec![0u8; length.min(ZERO_BUFFER_MAX) as usize];
    let mut done = 0;
    while done < length {
        let piece = (length - done).min(ZERO_BUFFER_MAX) as usize;
        backend.write_at(&zeroes[..piece], offset + done, false)?;
        done += piece as u64;
    }
    if fua { backend.flush() } else { Ok(()) }
}
