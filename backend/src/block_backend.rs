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

/// Storage behind an export, or a layer in front of another backend.
/// Offsets and lengths given to the data methods are already checked
/// against `size_bytes()`.
///
/// Layers forward by default, as an nbdkit filter calls `next`: a layer
/// returns the backend it wraps from `next()`, and the default of every
/// other method asks `next()` first and hands the call on with the same
/// arguments. So a layer implements only what it changes, and a method
/// added to this trait reaches the storage through every layer written
/// before it. Forwarding goes to the next backend, never back into the
/// layer: a layer that changes how data is written overrides `trim` and
/// `write_zeroes` as well as `write_at`.
///
/// A storage backend leaves `next()` at `None`, and the defaults are then
/// the conservative ones nbdkit gives a plugin: no capability, TRIM and
/// CACHE refused with EOPNOTSUPP, WRITE_ZEROES as written zero buffers,
/// the whole range as one data extent, no contexts besides
/// `base:allocation`.
///
/// `size_bytes`, `read_at`, `write_at` and `flush` have no conservative
/// answer. They forward like the rest, so that no layer has to repeat
/// them, and a storage backend must implement all four: one that does not
/// is a bug, and its first call of the missing method panics naming the
/// type and the method (nbdkit, likewise, refuses a plugin without
/// `.get_size` or `.pread`). Keeping them required would catch that when
/// compiling, at the price of four hand-written forwards in every layer;
/// storage backends are few, and each one's tests call all four.
pub trait BlockBackend: Send + Sync + 'static {
    /// The backend this layer wraps, which every method the layer does not
    /// implement is handed on to. `None`, the default, makes this a storage
    /// backend.
    fn next(&self) -> Option<&dyn BlockBackend> {
        None
    }

    /// Size of the export, fixed for the life of the backend.
    fn size_bytes(&self) -> u64 {
        match self.next() {
            Some(next) => next.size_bytes(),
            None => storage_must_implement::<Self>("size_bytes"),
        }
    }

    fn is_read_only(&self) -> bool {
        self.next().is_some_and(|next| next.is_read_only())
    }
    fn is_rotational(&self) -> bool {
        self.next().is_some_and(|next| next.is_rotational())
    }
    /// FLUSH makes every completed write durable, whichever connection sent it.
    fn can_multi_conn(&self) -> bool {
        self.next().is_some_and(|next| next.can_multi_conn())
    }
    fn can_trim(&self) -> bool {
        self.next().is_some_and(|next| next.can_trim())
    }
    /// WRITE_ZEROES with FAST_ZERO can succeed at least sometimes.
    fn can_fast_zero(&self) -> bool {
        self.next().is_some_and(|next| next.can_fast_zero())
    }
    fn can_cache(&self) -> bool {
        self.next().is_some_and(|next| next.can_cache())
    }
    /// The backend knows where its holes are (`base:allocation`, OFFSET_HOLE).
    fn can_extents(&self) -> bool {
        self.next().is_some_and(|next| next.can_extents())
    }
    /// Asking for extents costs time in proportion to the file rather
    /// than the range asked about (tmpfs walks its pages to the end for
    /// `SEEK_HOLE`): a READ then sends its range as data without looking
    /// for holes first. `base:allocation` queries still ask.
    fn extents_are_slow(&self) -> bool {
        self.next().is_some_and(|next| next.extents_are_slow())
    }

    /// Fills `buf` from `offset`. A short read past the end of a sparse file is zeroes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.next() {
            Some(next) => next.read_at(buf, offset),
            None => storage_must_implement::<Self>("read_at"),
        }
    }

    /// Like `read_at`, but only if it can be done without waiting for the
    /// device (the data is cached). `Ok(false)` means "would block: call
    /// `read_at` on a thread that may block".
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        match self.next() {
            Some(next) => next.read_at_nowait(buf, offset),
            None => Ok(false),
        }
    }

    /// A file whose bytes at every offset are exactly what `read_at`
    /// returns, so that a server may send them straight from the page
    /// cache (`sendfile`) instead of reading them into a buffer first.
    /// Unlike every other method this is not handed on by default: a layer
    /// that changes what reads return must never expose its storage's
    /// file, so only a layer that passes reads through unchanged forwards
    /// it, by saying so.
    fn read_through_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// Whether a plain (non-FUA) write of this range can run without
    /// waiting for a device: nbd-server then runs it on the connection's
    /// thread instead of the blocking pool. A tracking layer says no when
    /// the write must first wait for a durable mark.
    fn write_is_cheap(&self, offset: u64, length: u64) -> bool {
        self.next()
            .is_none_or(|next| next.write_is_cheap(offset, length))
    }

    /// Writes `buf` at `offset`; with `fua` it is durable before returning.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        match self.next() {
            Some(next) => next.write_at(buf, offset, fua),
            None => storage_must_implement::<Self>("write_at"),
        }
    }

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()> {
        match self.next() {
            Some(next) => next.flush(),
            None => storage_must_implement::<Self>("flush"),
        }
    }

    /// Discards a range (a hint: the contents become unspecified).
    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        match self.next() {
            Some(next) => next.trim(offset, length, fua),
            None => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        }
    }

    /// Makes a range read as zeroes. A storage backend's default writes
    /// zero buffers with its own `write_at`.
    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        request: ZeroRequest,
    ) -> Result<(), ZeroError> {
        if let Some(next) = self.next() {
            return next.write_zeroes(offset, length, request);
        }
        if request.fast_only {
            return Err(ZeroError::NotFast);
        }
        write_zero_buffers(self, offset, length, request.fua)?;
        Ok(())
    }

    /// Prefetches a range into the cache.
    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        match self.next() {
            Some(next) => next.cache(offset, length),
            None => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        }
    }

    /// Appends the `base:allocation` extents that start at `offset` and cover
    /// at least one byte (at most `length` bytes unless the last extent runs
    /// on), at most `max_extents` of them. A storage backend's default is
    /// one data extent over the whole range.
    fn extents(
        &self,
        offset: u64,
        length: u64,
        max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        if let Some(next) = self.next() {
            return next.extents(offset, length, max_extents, out);
        }
        out.push(Extent {
            length_bytes: length,
            flags: 0,
        });
        Ok(())
    }

    /// Extra metadata contexts this backend serves besides `base:allocation`
    /// (the tracker adds `qemu:dirty-bitmap:NAME`). Names are full context
    /// names. A layer that adds contexts appends its own to `next()`'s.
    fn meta_contexts(&self) -> Vec<String> {
        match self.next() {
            Some(next) => next.meta_contexts(),
            None => Vec::new(),
        }
    }

    /// Status extents for one of `meta_contexts()`, as `extents` does for
    /// `base:allocation`.
    fn context_extents(
        &self,
        context: &str,
        offset: u64,
        length: u64,
        max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        match self.next() {
            Some(next) => next.context_extents(context, offset, length, max_extents, out),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no metadata context {context}"),
            )),
        }
    }
}

/// Where a storage backend lacks one of the four methods without a
/// conservative default: a bug in that backend, not an I/O error to report.
#[cold]
fn storage_must_implement<B: ?Sized>(method: &str) -> ! {
    panic!(
        "{} has no next() backend, so it must implement BlockBackend::{method}",
        std::any::type_name::<B>()
    )
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
