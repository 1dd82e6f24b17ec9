//! Connection buffers, reused across requests.
//!
//! `InBuf` holds bytes read from the socket: requests are parsed and WRITE
//! payloads handed to the backend straight from it. `OutBuf` collects replies
//! for one socket write; its memory stays initialised between uses so that a
//! READ can `pread` into it without zero-filling first.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Buffer size a connection starts with and shrinks back to when idle.
pub const BUFFER_INITIAL_BYTES: usize = 256 * 1024;
/// An idle input buffer larger than this is shrunk back to `BUFFER_INITIAL_BYTES`.
const BUFFER_KEEP_MAX_BYTES: usize = 4 * 1024 * 1024;
/// The same for a reply buffer, which is emptied after every send: it must
/// keep a whole batch (the transmission loop sends at 4 MiB, plus the READ
/// that passed that mark), or every batch of 1 MiB READs grows it again
/// from 256 KiB, zeroing what it adds (10% of the connection thread's time
/// in a perf profile of 1M reads over TCP).
const OUT_KEEP_MAX_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug)]
pub struct InBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Default for InBuf {
    fn default() -> Self {
        InBuf {
            buf: vec![0; BUFFER_INITIAL_BYTES],
            start: 0,
            end: 0,
        }
    }
}

impl InBuf {
    pub fn available(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn consume(&mut self, n: usize) {
        assert!(n <= self.len(), "consumed more than was buffered");
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > BUFFER_KEEP_MAX_BYTES {
                self.buf = vec![0; BUFFER_INITIAL_BYTES];
            }
        }
    }

    /// Makes room so that `total` bytes (counted from the unconsumed start)
    /// fit. Callers bound `total` by the protocol's maxima first.
    pub fn make_room(&mut self, total: usize) {
        if self.start + total <= self.buf.len() {
            return;
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        if total > self.buf.len() {
            self.buf.resize(total, 0);
        }
    }

    /// The free space after the buffered bytes (made first if there is
    /// none), for one read; then `filled` says how much arrived.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.end == self.buf.len() {
            self.make_room(self.len() + 1);
        }
        &mut self.buf[self.end..]
    }

    pub fn filled(&mut self, n: usize) {
        assert!(
            self.end + n <= self.buf.len(),
            "filled past the spare space"
        );
        self.end += n;
    }

    /// One read from `reader` into the free space. Returns the byte count
    /// (0 at end of stream).
    pub async fn read_some<R: AsyncRead + Unpin>(&mut self, reader: &mut R) -> io::Result<usize> {
        let n = reader.read(self.spare()).await?;
        self.filled(n);
        Ok(n)
    }

    /// Reads until at least `n` bytes are buffered. Returns false at end of stream.
    pub async fn fill<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        n: usize,
    ) -> io::Result<bool> {
        self.make_room(n);
        while self.len() < n {
            if self.read_some(reader).await? == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Reply bytes waiting for one socket write.
#[derive(Debug)]
pub struct OutBuf {
    buf: Vec<u8>,
    filled: usize,
}

impl Default for OutBuf {
    fn default() -> Self {
        OutBuf {
            buf: vec![0; BUFFER_INITIAL_BYTES],
            filled: 0,
        }
    }
}

impl OutBuf {
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..self.filled]
    }

    /// Reuses `buf` (its length is kept initialised, grown to `bytes`).
    pub fn from_vec(mut buf: Vec<u8>, bytes: usize) -> OutBuf {
        if buf.len() < bytes {
            buf.resize(bytes, 0);
        }
        OutBuf { buf, filled: 0 }
    }

    /// The filled bytes as a `Vec`, without copying them.
    pub fn into_vec(mut self) -> Vec<u8> {
        self.buf.truncate(self.filled);
        self.buf
    }

    pub fn len(&self) -> usize {
        self.filled
    }

    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    pub fn clear(&mut self) {
        self.filled = 0;
        if self.buf.len() > OUT_KEEP_MAX_BYTES {
            self.buf = vec![0; BUFFER_INITIAL_BYTES];
        }
    }

    /// Forgets everything after `len` (undoes a reply that failed half way).
    pub fn truncate(&mut self, len: usize) {
        assert!(len <= self.filled);
        self.filled = len;
    }

    /// Appends `n` bytes and returns them for the caller to fill. They hold
    /// stale data until written.
    pub fn append(&mut self, n: usize) -> &mut [u8] {
        let end = self.filled + n;
        if end > self.buf.len() {
            self.buf.resize(end.max(self.buf.len() * 2), 0);
        }
        let slice = &mut self.buf[self.filled..end];
        self.filled = end;
        slice
    }
}

/// Large reply buffers, recycled between pool reads so that a 1 MiB read
/// does not map, fault in and unmap fresh memory every time.
#[derive(Debug, Default)]
pub struct BufferPool {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
}

/// Buffers a pool keeps; more are dropped.
const POOLED_BUFFERS_MAX: usize = 16;

impl BufferPool {
    pub fn take(&self) -> Vec<u8> {
        self.free
            .lock()
            .expect("buffer pool lock")
            .pop()
            .unwrap_or_default()
    }

    pub fn put(&self, mut buf: Vec<u8>) {
        let mut free = self.free.lock().expect("buffer pool lock");
        if free.len() < POOLED_BUFFERS_MAX && buf.capacity() <= 64 * 1024 * 1024 {
            // Keep the initialised length: OutBuf::from_vec relies on it.
            buf.resize(buf.capacity(), 0);
            free.push(buf);
        }
    }
}

/// Where encoders put bytes: a plain `Vec` or an `OutBuf`.
pub trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl Sink for OutBuf {
    fn put(&mut self, bytes: &[u8]) {
        self.append(bytes.len()).copy_from_slice(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbuf_truncate_undoes_an_append() {
        let mut out = OutBuf::default();
        out.put(b"abc");
        let mark = out.len();
        out.append(10).fill(1);
        out.truncate(mark);
        out.put(b"d");
        assert_eq!(out.as_slice(), b"abcd");
    }

    #[test]
    fn inbuf_make_room_keeps_unconsumed_bytes() {
        let mut input = InBuf::default();
        input.buf[..4].copy_from_slice(b"wxyz");
        input.end = 4;
        input.consume(2);
        input.make_room(BUFFER_INITIAL_BYTES * 2);
        assert_eq!(input.available(), b"yz");
        assert!(input.buf.len() >= BUFFER_INITIAL_BYTES * 2);
    }
}
