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

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

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

/// A connected stream socket (unix or TCP) in blocking mode.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
}

impl Socket {
    /// Takes a connected socket; puts it in blocking mode for `send_all`.
    pub fn new(fd: OwnedFd) -> io::Result<Socket> {
        // SAFETY: fcntl on an fd we own, no pointers.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket { fd })
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
    /// `Ok(Some(0))` at end of stream.
    pub fn recv_nowait(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
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

    /// Sends all of `bytes`, waiting for room as needed. Callers that share
    /// the socket hold a lock around this so replies never interleave.
    pub fn send_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            // SAFETY: sends from `bytes`, valid for `bytes.len()` bytes.
            // MSG_NOSIGNAL: a client gone away is EPIPE, not SIGPIPE.
            let n = retry_interrupted(|| unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    libc::MSG_NOSIGNAL,
                )
            })?;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// Ends both directions now, so the client sees the close at once even
    /// while a pool thread still holds the socket.
    pub fn shutdown(&self) {
        // SAFETY: shutdown on an fd we own; errors (already closed) do not matter.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
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
        socket.send_all(&big).unwrap();
        socket.shutdown();
        assert_eq!(reader.join().unwrap(), big);
    }
}
