//! The TLS relay: one thread per TLS connection that owns the rustls
//! session and the network socket, and moves plaintext to and from one end
//! of a unix socketpair. The other end is what the client reads and
//! writes, so its reader thread and senders work on TLS connections
//! unchanged, without a lock around the session.
//!
//! The server does without one (`nbd_server::socket` keeps the session
//! beside its socket): for it the relay's extra hop through the
//! socketpair cost 8% on 1M reads (docs/bench.md). A copier's client
//! spends most of its time waiting on the server, where that hop matters
//! less than keeping `Client` simple.
//!
//! The loop is level-triggered over two non-blocking descriptors: it does
//! every step that can make progress, and only when none can does it sleep
//! in `poll` on what it waits for. Every buffer has a fixed bound, so a
//! side that stops reading stops the relay from reading the other side
//! (the kernel's socket buffers then push back on the sender).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

/// Ciphertext read from the network at once. rustls takes at most one
/// record (16 KiB and change) per `read_tls`, so reading many records per
/// `recv` and handing them over from memory saves system calls.
const NET_READ_BYTES: usize = 1024 * 1024;
/// Plaintext read from the local end at once: a whole 1 MiB reply (plus
/// its header) is encrypted and sent in one go.
const LOCAL_READ_BYTES: usize = 1024 * 1024 + 4096;
/// Decrypted plaintext held for the local end.
const PLAIN_OUT_BYTES: usize = 1024 * 1024;
/// Socket buffer asked for on the socketpair, so a 1 MiB reply or WRITE
/// crosses it in one call (the kernel caps it at net.core.wmem_max).
const SOCKETPAIR_BUFFER_BYTES: libc::c_int = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

fn io_error(what: &'static str) -> impl FnOnce(io::Error) -> RelayError {
    move |source| RelayError::Io { what, source }
}

/// Starts a relay for `conn`, whose handshake is complete, over `net`.
/// Returns the local end of the socketpair (blocking) and the thread; the
/// thread ends once the local end is closed and what it sent is flushed,
/// or when either side fails.
pub(crate) fn spawn(
    net: OwnedFd,
    conn: rustls::Connection,
) -> io::Result<(UnixStream, JoinHandle<()>)> {
    let (ours, theirs) = UnixStream::pair()?;
    for end in [&ours, &theirs] {
        set_buffer(end, libc::SO_SNDBUF);
        set_buffer(end, libc::SO_RCVBUF);
    }
    theirs.set_nonblocking(true)?;
    set_nonblocking(&net)?;
    let mut relay = Relay::new(net, theirs.into(), conn);
    let thread = std::thread::Builder::new()
        .name("nbd-tls".to_string())
        .spawn(move || {
            // Either way the socketpair closes, and the connection's reader
            // reports the end (the TLS side's cause is not kept).
            let _ = relay.run();
        })?;
    Ok((ours, thread))
}

/// Bytes between `start` and `end` are waiting to move on.
struct Buffer {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buffer {
    fn new(bytes: usize) -> Buffer {
        Buffer {
            data: vec![0; bytes],
            start: 0,
            end: 0,
        }
    }
    fn is_empty(&self) -> bool {
        self.start == self.end
    }
    fn pending(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
    fn spare(&mut self) -> &mut [u8] {
        &mut self.data[self.end..]
    }
    fn filled(&mut self, n: usize) {
        self.end += n;
    }
}

struct Relay {
    net: OwnedFd,
    local: OwnedFd,
    conn: rustls::Connection,
    /// Ciphertext from the network not yet given to rustls.
    cipher_in: Buffer,
    /// Plaintext rustls decrypted, not yet sent to the local end.
    plain_out: Buffer,
    /// Plaintext from the local end, read here before rustls encrypts it.
    plain_in: Vec<u8>,
    /// Decrypted bytes rustls holds that `plain_out` had no room for.
    rustls_plaintext_bytes: usize,
    /// The network sent its last byte (EOF).
    net_eof: bool,
    /// Nothing more will come from the network (EOF or close_notify, and
    /// rustls has handed over all it decrypted).
    net_done: bool,
    /// The local end's write side is shut, so its reader sees EOF.
    local_shut: bool,
    /// The local end closed: send close_notify, flush, finish.
    local_eof: bool,
}

impl Relay {
    fn new(net: OwnedFd, local: OwnedFd, mut conn: rustls::Connection) -> Relay {
        // What rustls buffers is bounded here instead: the local end is
        // read only when everything encrypted before has been sent.
        conn.set_buffer_limit(None);
        Relay {
            net,
            local,
            conn,
            cipher_in: Buffer::new(NET_READ_BYTES),
            plain_out: Buffer::new(PLAIN_OUT_BYTES),
            plain_in: vec![0; LOCAL_READ_BYTES],
            // The handshake may have left decrypted data in rustls.
            rustls_plaintext_bytes: usize::MAX,
            net_eof: false,
            net_done: false,
            local_shut: false,
            local_eof: false,
        }
    }

    fn run(&mut self) -> Result<(), RelayError> {
        let result = self.relay();
        if let Err(RelayError::Tls(_)) = &result {
            // Tell the peer why (rustls queued an alert), if it listens.
            let _ = self.conn.write_tls(&mut FdWriter(&self.net));
        }
        result
    }

    fn relay(&mut self) -> Result<(), RelayError> {
        loop {
            let mut progress = self.decrypt()?;
            progress |= self.send_local()?;
            progress |= self.recv_net()?;
            progress |= self.recv_local()?;
            progress |= self.send_net()?;
            if self.local_eof && !self.conn.wants_write() {
                // Shutting our write side tells the peer we are done
                // even if it keeps the connection open.
                // SAFETY: shutdown on a socket we own; errors do not matter.
                unsafe { libc::shutdown(self.net.as_raw_fd(), libc::SHUT_WR) };
                return Ok(());
            }
            if !progress {
                self.wait()?;
            }
        }
    }

    /// Gives buffered ciphertext to rustls and takes the plaintext out, as
    /// far as `plain_out` has room.
    fn decrypt(&mut self) -> Result<bool, RelayError> {
        let mut progress = false;
        loop {
            progress |= self.take_plaintext()?;
            if self.rustls_plaintext_bytes > 0 || self.cipher_in.is_empty() {
                return Ok(progress);
            }
            let mut pending = self.cipher_in.pending();
            let n = self
                .conn
                .read_tls(&mut pending)
                .map_err(io_error("handing ciphertext to rustls"))?;
            self.cipher_in.consume(n);
            let state = self.conn.process_new_packets()?;
            self.rustls_plaintext_bytes = state.plaintext_bytes_to_read();
            progress = true;
        }
    }

    /// Moves what rustls decrypted into `plain_out`.
    fn take_plaintext(&mut self) -> Result<bool, RelayError> {
        let mut progress = false;
        while self.rustls_plaintext_bytes > 0 && !self.net_done {
            let spare = self.plain_out.spare();
            if spare.is_empty() {
                break;
            }
            match self.conn.reader().read(spare) {
                Ok(0) => self.net_done = true, // close_notify
                Ok(n) => {
                    self.plain_out.filled(n);
                    self.rustls_plaintext_bytes = self.rustls_plaintext_bytes.saturating_sub(n);
                    progress = true;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.rustls_plaintext_bytes = 0;
                    if self.net_eof && self.cipher_in.is_empty() {
                        self.net_done = true;
                    }
                }
                // The peer closed the socket without close_notify: a
                // truncation attack or a crashed client. What was
                // decrypted is still delivered, then EOF.
                Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => self.net_done = true,
                Err(error) => return Err(io_error("reading decrypted data")(error)),
            }
        }
        Ok(progress)
    }

    fn send_local(&mut self) -> Result<bool, RelayError> {
        if !self.plain_out.is_empty() {
            let sent = send_nowait(&self.local, self.plain_out.pending())
                .map_err(io_error("sending to the local end"))?;
            return Ok(match sent {
                Some(n) => {
                    self.plain_out.consume(n);
                    true
                }
                None => false,
            });
        }
        if self.net_done && !self.local_shut {
            // SAFETY: shutdown on a socket we own; errors do not matter.
            unsafe { libc::shutdown(self.local.as_raw_fd(), libc::SHUT_WR) };
            self.local_shut = true;
            return Ok(true);
        }
        Ok(false)
    }

    fn wants_net_read(&self) -> bool {
        !self.net_eof && self.cipher_in.is_empty() && self.rustls_plaintext_bytes == 0
    }

    fn recv_net(&mut self) -> Result<bool, RelayError> {
        if !self.wants_net_read() {
            return Ok(false);
        }
        match recv_nowait(&self.net, self.cipher_in.spare())
            .map_err(io_error("receiving from the network"))?
        {
            None => Ok(false),
            Some(0) => {
                self.net_eof = true;
                // An empty read tells rustls the stream ended, so that it
                // can tell a close_notify from a truncation.
                let n = self.conn.read_tls(&mut &[][..]);
                debug_assert!(matches!(n, Ok(0)));
                self.rustls_plaintext_bytes = usize::MAX;
                Ok(true)
            }
            Some(n) => {
                self.cipher_in.filled(n);
                Ok(true)
            }
        }
    }

    fn wants_local_read(&self) -> bool {
        !self.local_eof && !self.conn.wants_write()
    }

    fn recv_local(&mut self) -> Result<bool, RelayError> {
        if !self.wants_local_read() {
            return Ok(false);
        }
        match recv_nowait(&self.local, &mut self.plain_in)
            .map_err(io_error("receiving from the local end"))?
        {
            None => Ok(false),
            Some(0) => {
                self.local_eof = true;
                self.conn.send_close_notify();
                Ok(true)
            }
            Some(n) => {
                self.conn
                    .writer()
                    .write_all(&self.plain_in[..n])
                    .map_err(io_error("encrypting"))?;
                Ok(true)
            }
        }
    }

    fn send_net(&mut self) -> Result<bool, RelayError> {
        let mut progress = false;
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut FdWriter(&self.net)) {
                Ok(_) => progress = true,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(io_error("sending to the network")(error)),
            }
        }
        Ok(progress)
    }

    /// Sleeps until a descriptor is ready for what the relay waits on. A
    /// descriptor it waits on for nothing is left out, so a hang-up there
    /// cannot wake it over and over.
    fn wait(&self) -> Result<(), RelayError> {
        let mut net_events = 0;
        if self.wants_net_read() {
            net_events |= libc::POLLIN;
        }
        if self.conn.wants_write() {
            net_events |= libc::POLLOUT;
        }
        let mut local_events = 0;
        if self.wants_local_read() {
            local_events |= libc::POLLIN;
        }
        if !self.plain_out.is_empty() {
            local_events |= libc::POLLOUT;
        }
        assert!(
            net_events != 0 || local_events != 0,
            "the TLS relay waits for nothing"
        );
        let entry = |fd: &OwnedFd, events| libc::pollfd {
            fd: if events == 0 { -1 } else { fd.as_raw_fd() },
            events,
            revents: 0,
        };
        let mut fds = [
            entry(&self.net, net_events),
            entry(&self.local, local_events),
        ];
        loop {
            // SAFETY: `fds` is a live array of two pollfd.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if rc >= 0 {
                return Ok(());
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(io_error("waiting in poll")(error));
            }
        }
    }
}

/// `send` that neither waits nor raises SIGPIPE: `Ok(None)` when the
/// socket has no room.
fn send_nowait(fd: &OwnedFd, bytes: &[u8]) -> io::Result<Option<usize>> {
    // SAFETY: sends from `bytes`, valid for `bytes.len()` bytes.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    would_block_is_none(n)
}

/// `recv` that does not wait: `Ok(None)` when nothing is there yet.
fn recv_nowait(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: receives into `buf`, which is valid for `buf.len()` bytes.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    would_block_is_none(n)
}

fn would_block_is_none(result: isize) -> io::Result<Option<usize>> {
    if result >= 0 {
        return Ok(Some(result as usize));
    }
    let error = io::Error::last_os_error();
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
        _ => Err(error),
    }
}

/// The network socket as rustls's `write_tls` target: records go out in
/// one `sendmsg` (rustls passes up to 64 at once), without SIGPIPE.
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
        let n = unsafe {
            libc::sendmsg(
                self.0.as_raw_fd(),
                &message,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        match would_block_is_none(n)? {
            Some(n) => Ok(n),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, no pointers.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_buffer(socket: &UnixStream, option: libc::c_int) {
    // SAFETY: setsockopt on a socket we own, with a pointer to a live
    // c_int and its exact size. A refusal only costs speed.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&SOCKETPAIR_BUFFER_BYTES as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}
