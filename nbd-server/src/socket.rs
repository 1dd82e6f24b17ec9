//! The connected socket of one connection in the transmission phase, used
//! with plain blocking system calls from the connection's own thread (reads
//! and its batches of replies) and from blocking-pool threads (their replies).
//!
//! Why not tokio here: an fd registered with epoll makes every client `send`
//! run epoll's wake-up callback, and the server pays an `epoll_wait` per
//! batch. A thread that only sleeps in `poll` when the socket is empty costs
//! the client nothing while the server is busy. On this project's 2-core
//! machine, where fio's nbd engine and the server each hold one core, that
//! was the difference on 4k random reads (docs/bench.md).
//!
//! A TLS connection uses the same socket with its rustls session beside
//! it (`TlsSession`): receiving decrypts what arrived, sending encrypts
//! and flushes. The session is locked only for that CPU work, never while
//! a call waits for the socket, so a sender stalled on a full socket never
//! stops the connection's thread from reading (a client that is still
//! sending requests may not read replies until it is done).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Ciphertext received at once on a TLS connection: rustls takes one
/// record (16 KiB and change) per `read_tls`, so many records per `recv`,
/// handed over from memory, save system calls.
const TLS_RECV_BYTES: usize = 256 * 1024;
/// Largest piece of a file one `sendfile` call is asked for.
const SEND_FILE_PIECE_MAX: u64 = 8 * 1024 * 1024;
/// Once the server stops, how long a send waits for a client that reads
/// nothing before it gives up on it.
const STOP_SEND_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// What `Socket::wait_readable` saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Readiness {
    /// The socket has data, an end of stream or an error: `recv` will say.
    Readable,
    /// The server is stopping.
    Stopping,
}

/// A server-wide stop signal that both a flag test (for a connection that
/// never runs out of input) and `poll` (for one asleep on its socket) see.
#[derive(Debug)]
pub struct Stop {
    stopping: AtomicBool,
    /// An eventfd that becomes readable, and stays so, at `set`.
    event: OwnedFd,
}

impl Stop {
    pub fn new() -> io::Result<Stop> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Stop {
            stopping: AtomicBool::new(false),
            // SAFETY: `fd` was just returned by eventfd and nothing else owns it.
            event: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub fn set(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. A full
        // counter (EAGAIN) still leaves it readable, which is all we need.
        unsafe {
            libc::write(
                self.event.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    pub fn is_set(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// A connected stream socket (unix or TCP) in blocking mode, and its TLS
/// session if STARTTLS set one up.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    tls: Option<Box<TlsSession>>,
}

/// The rustls session of a TLS connection and the ciphertext received
/// but not yet given to it.
#[derive(Debug)]
struct TlsSession {
    connection: Mutex<rustls::ServerConnection>,
    /// Used by the connection's own thread only (the one that receives).
    incoming: Mutex<Ciphertext>,
}

#[derive(Debug)]
struct Ciphertext {
    data: Vec<u8>,
    start: usize,
    end: usize,
    /// The peer closed its side; rustls has been told.
    eof: bool,
}

impl Socket {
    /// Takes a connected socket; puts it in non-blocking mode: every call
    /// that may wait (`send_file` too, which has no MSG_DONTWAIT) waits in
    /// `poll`, where a stop reaches it.
    pub fn new(fd: OwnedFd) -> io::Result<Socket> {
        // SAFETY: fcntl on an fd we own, no pointers.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket { fd, tls: None })
    }

    /// Takes a connected socket whose TLS handshake `connection` finished
    /// (plaintext it decrypted and did not hand out yet is kept).
    pub fn with_tls(fd: OwnedFd, mut connection: rustls::ServerConnection) -> io::Result<Socket> {
        // Bounded by the callers instead: a send queues one batch of
        // replies and waits until it is on the socket.
        connection.set_buffer_limit(None);
        let mut socket = Socket::new(fd)?;
        socket.tls = Some(Box::new(TlsSession {
            connection: Mutex::new(connection),
            incoming: Mutex::new(Ciphertext {
                data: vec![0; TLS_RECV_BYTES],
                start: 0,
                end: 0,
                eof: false,
            }),
        }));
        // Whatever the handshake left queued (session tickets) goes now.
        socket.send_until(&[], None)?;
        Ok(socket)
    }

    /// Bytes this side has sent that the peer has not yet taken: for a
    /// unix stream socket, what sits unread in the peer's receive queue
    /// (counted with the kernel's per-buffer overhead); for TCP, what is
    /// not yet acknowledged. 0 when the kernel cannot tell.
    pub fn unread_by_peer(&self) -> usize {
        let mut bytes: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ's number) writes one int to `bytes`.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TIOCOUTQ, &mut bytes) };
        if rc < 0 { 0 } else { bytes.max(0) as usize }
    }

    /// One `recv` that does not wait: `Ok(None)` when nothing is there yet,
    /// `Ok(Some(0))` at end of stream. On TLS, plaintext: `Ok(None)` then
    /// also means rustls holds nothing decrypted, so `wait_readable` may
    /// sleep on the socket.
    pub fn recv_nowait(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match &self.tls {
            None => self.recv_raw(buf),
            Some(tls) => self.recv_tls(tls, buf),
        }
    }

    fn recv_raw(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: receives into `buf`, which is valid for `buf.len()` bytes.
        let received = retry_interrupted(|| unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        });
        match received {
            Ok(n) => Ok(Some(n)),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Fills `buf` with plaintext as far as what arrived allows, receiving
    /// from the socket only when rustls has nothing left to decrypt.
    fn recv_tls(&self, tls: &TlsSession, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut incoming = tls.incoming.lock().expect("TLS input lock");
        let mut filled = 0;
        loop {
            let mut connection = tls.connection.lock().expect("TLS session lock");
            match connection.reader().read(&mut buf[filled..]) {
                Ok(n) if n > 0 && filled + n < buf.len() => {
                    filled += n;
                    continue;
                }
                // Full, or close_notify (0) after everything decrypted.
                Ok(n) => return Ok(Some(filled + n)),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed without close_notify: end of stream too.
                Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                    return Ok(Some(filled));
                }
                Err(error) => return Err(error),
            }
            if incoming.start < incoming.end {
                let mut pending = &incoming.data[incoming.start..incoming.end];
                let n = connection.read_tls(&mut pending)?;
                // rustls refuses input only while it holds plaintext,
                // and it had none (the read above would have taken it).
                assert!(n > 0, "rustls took no ciphertext");
                incoming.start += n;
                if let Err(error) = connection.process_new_packets() {
                    // Tell the peer why (rustls queued an alert), if it listens.
                    let _ = connection.write_tls(&mut FdWriter(&self.fd));
                    return Err(io::Error::new(io::ErrorKind::InvalidData, error));
                }
                if connection.wants_write() {
                    // A reply rustls owes the peer (a key update).
                    let _ = connection.write_tls(&mut FdWriter(&self.fd));
                }
                continue;
            }
            drop(connection);
            if filled > 0 {
                return Ok(Some(filled));
            }
            if incoming.eof {
                return Ok(Some(0));
            }
            let Ciphertext {
                data,
                start,
                end,
                eof,
            } = &mut *incoming;
            (*start, *end) = (0, 0);
            match self.recv_raw(data)? {
                None => return Ok(None),
                Some(0) => {
                    *eof = true;
                    // An empty read tells rustls the stream ended, so that
                    // it can tell a close_notify from a truncation.
                    let mut connection = tls.connection.lock().expect("TLS session lock");
                    connection.read_tls(&mut &[][..])?;
                }
                Some(n) => *end = n,
            }
        }
    }

    /// Sleeps until the socket is readable or `stop` is set.
    pub fn wait_readable(&self, stop: &Stop) -> io::Result<Readiness> {
        let mut fds = [
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            if stop.is_set() {
                return Ok(Readiness::Stopping);
            }
            // SAFETY: `fds` is a live array of two pollfd.
            retry_interrupted(|| unsafe {
                libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) as isize
            })?;
            if fds[1].revents != 0 {
                return Ok(Readiness::Stopping);
            }
            if fds[0].revents != 0 {
                return Ok(Readiness::Readable);
            }
        }
    }

    /// Fills `buf` from the socket, sleeping as needed. Fails at end of
    /// stream or when the server stops before `buf` is full.
    pub fn recv_exact(&self, mut buf: &mut [u8], stop: &Stop) -> io::Result<()> {
        while !buf.is_empty() {
            match self.recv_nowait(buf)? {
                Some(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Some(n) => buf = &mut buf[n..],
                None => {
                    if self.wait_readable(stop)? == Readiness::Stopping {
                        return Err(io::Error::other(
                            "the server is stopping in the middle of a request",
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Sends all of `bytes`, waiting for room as long as the client takes
    /// to read, or, once `stop` is set, for at most `STOP_SEND_GRACE`.
    /// Callers that share the socket hold a lock around this so replies
    /// never interleave.
    pub fn send_all(&self, bytes: &[u8], stop: &Stop) -> io::Result<()> {
        self.send_until(bytes, Some(stop))
    }

    fn send_until(&self, bytes: &[u8], stop: Option<&Stop>) -> io::Result<()> {
        match &self.tls {
            None => self.send_raw(bytes, stop),
            Some(tls) => self.send_tls(tls, bytes, stop),
        }
    }

    /// Encrypts `bytes` in one go (records of one call never interleave
    /// with another's) and sends what rustls queued, letting go of the
    /// session while the socket is full.
    fn send_tls(&self, tls: &TlsSession, bytes: &[u8], stop: Option<&Stop>) -> io::Result<()> {
        let mut connection = tls.connection.lock().expect("TLS session lock");
        connection.writer().write_all(bytes)?;
        while connection.wants_write() {
            match connection.write_tls(&mut FdWriter(&self.fd)) {
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    drop(connection);
                    self.wait_writable(stop)?;
                    connection = tls.connection.lock().expect("TLS session lock");
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Sleeps until the socket has room. While the server runs that is as
    /// long as the client takes; once it stops, a client that reads
    /// nothing for `STOP_SEND_GRACE` is given up on (`TimedOut`), so that
    /// shutdown is never held by it.
    fn wait_writable(&self, stop: Option<&Stop>) -> io::Result<()> {
        let mut fds = [
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.map_or(-1, |stop| stop.event.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let stopping = stop.is_some_and(Stop::is_set);
        // A negative fd is ignored by poll; once stopping, the eventfd
        // stays readable and is left out so that poll waits for room.
        if stopping {
            fds[1].fd = -1;
        }
        let timeout = if stopping {
            STOP_SEND_GRACE.as_millis() as libc::c_int
        } else {
            -1
        };
        loop {
            // SAFETY: `fds` is a live array of two pollfd.
            let ready = retry_interrupted(|| unsafe {
                libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) as isize
            })?;
            if ready == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client read no reply while the server was stopping",
                ));
            }
            if fds[0].revents != 0 {
                return Ok(());
            }
            if fds[1].revents != 0 {
                // The server began to stop while this waited: wait again,
                // now with the grace period.
                return self.wait_writable(stop);
            }
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether this is a unix socket (not TCP).
    pub fn is_unix(&self) -> bool {
        let mut family: libc::c_int = 0;
        let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `length` bytes into `family`.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_DOMAIN,
                (&mut family as *mut libc::c_int).cast(),
                &mut length,
            )
        };
        rc == 0 && family == libc::AF_UNIX
    }

    /// Sends `length` bytes of `file` from `offset` with `sendfile`: from
    /// the page cache, with no copy through user space (plaintext only).
    /// Bytes past the file's end, if it shrank, are sent as zeroes.
    pub fn send_file(
        &self,
        file: RawFd,
        mut offset: u64,
        mut length: u64,
        stop: &Stop,
    ) -> io::Result<()> {
        assert!(self.tls.is_none(), "sendfile would bypass TLS");
        while length > 0 {
            let mut position = offset as libc::off_t;
            let piece = length.min(SEND_FILE_PIECE_MAX) as usize;
            // SAFETY: sendfile between two fds we hold, with a pointer to
            // a live off_t.
            let sent = retry_interrupted(|| unsafe {
                libc::sendfile(self.fd.as_raw_fd(), file, &mut position, piece) as isize
            });
            match sent {
                Ok(0) => {
                    let zeroes = vec![0; length.min(SEND_FILE_PIECE_MAX) as usize];
                    while length > 0 {
                        let piece = length.min(zeroes.len() as u64) as usize;
                        self.send_raw(&zeroes[..piece], Some(stop))?;
                        length -= piece as u64;
                    }
                }
                Ok(n) => {
                    offset += n as u64;
                    length -= n as u64;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.wait_writable(Some(stop))?;
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Sends all of `bytes` without waiting in the kernel, so that a stop
    /// reaches a sender whose client reads nothing (`wait_writable`).
    fn send_raw(&self, bytes: &[u8], stop: Option<&Stop>) -> io::Result<()> {
        self.send_raw_flags(bytes, stop, 0)
    }

    /// `send_all` for bytes that more will follow at once (a READ reply's
    /// header before `send_file`): MSG_MORE lets TCP put them in one
    /// segment with what follows instead of pushing them out alone.
    pub fn send_all_more(&self, bytes: &[u8], stop: &Stop) -> io::Result<()> {
        assert!(self.tls.is_none(), "MSG_MORE is for plaintext sends");
        self.send_raw_flags(bytes, Some(stop), libc::MSG_MORE)
    }

    fn send_raw_flags(
        &self,
        mut bytes: &[u8],
        stop: Option<&Stop>,
        flags: libc::c_int,
    ) -> io::Result<()> {
        while !bytes.is_empty() {
            // SAFETY: sends from `bytes`, valid for `bytes.len()` bytes.
            // MSG_NOSIGNAL: a client gone away is EPIPE, not SIGPIPE.
            let sent = retry_interrupted(|| unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT | flags,
                )
            });
            match sent {
                Ok(n) => bytes = &bytes[n..],
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.wait_writable(stop)?;
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Ends both directions now, so the client sees the close at once even
    /// while a pool thread still holds the socket; a TLS client first gets
    /// close_notify, if the socket has room for it.
    pub fn shutdown(&self) {
        if let Some(tls) = &self.tls
            && let Ok(mut connection) = tls.connection.lock()
        {
            connection.send_close_notify();
            let _ = connection.write_tls(&mut FdWriter(&self.fd));
        }
        // SAFETY: shutdown on an fd we own; errors (already closed) do not matter.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// The socket as rustls's `write_tls` target: records go out in one
/// `sendmsg` (rustls passes up to 64 at once) that neither waits nor
/// raises SIGPIPE.
struct FdWriter<'a>(&'a OwnedFd);

impl Write for FdWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(bytes)])
    }

    fn write_vectored(&mut self, slices: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        // IoSlice is guaranteed to be ABI-compatible with iovec.
        message.msg_iov = slices.as_ptr() as *mut libc::iovec;
        message.msg_iovlen = slices.len() as _;
        // SAFETY: `message` points at `slices`, live for the call.
        retry_interrupted(|| unsafe {
            libc::sendmsg(
                self.0.as_raw_fd(),
                &message,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs a system call until a signal does not interrupt it: its
/// non-negative result, or the error it set.
fn retry_interrupted(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let result = call();
        if result >= 0 {
            return Ok(result as usize);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn pair() -> (Socket, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        (Socket::new(ours.into()).unwrap(), theirs)
    }

    #[test]
    fn recv_nowait_tells_empty_from_end_of_stream() {
        let (socket, theirs) = pair();
        let mut buf = [0u8; 8];
        assert_eq!(socket.recv_nowait(&mut buf).unwrap(), None);
        std::io::Write::write_all(&mut &theirs, b"abc").unwrap();
        assert_eq!(socket.recv_nowait(&mut buf).unwrap(), Some(3));
        drop(theirs);
        assert_eq!(socket.recv_nowait(&mut buf).unwrap(), Some(0));
    }

    #[test]
    fn stop_wakes_a_sleeping_reader() {
        let (socket, _theirs) = pair();
        let stop = std::sync::Arc::new(Stop::new().unwrap());
        let setter = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                stop.set();
            })
        };
        assert_eq!(socket.wait_readable(&stop).unwrap(), Readiness::Stopping);
        setter.join().unwrap();
        let mut buf = [0u8; 4];
        let error = socket.recv_exact(&mut buf, &stop).unwrap_err();
        assert!(error.to_string().contains("stopping"), "{error}");
    }

    #[test]
    fn recv_exact_gathers_pieces_and_send_all_sends_everything() {
        let (socket, theirs) = pair();
        let stop = Stop::new().unwrap();
        let writer = std::thread::spawn(move || {
            for piece in [&b"he"[..], b"llo ", b"world"] {
                std::io::Write::write_all(&mut &theirs, piece).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            theirs
        });
        let mut buf = [0u8; 11];
        socket.recv_exact(&mut buf, &stop).unwrap();
        assert_eq!(&buf, b"hello world");
        let theirs = writer.join().unwrap();
        let big = vec![7u8; 3 * 1024 * 1024];
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut &theirs, &mut got).unwrap();
            got
        });
        socket.send_all(&big, &stop).unwrap();
        socket.shutdown();
        assert_eq!(reader.join().unwrap(), big);
    }
}
