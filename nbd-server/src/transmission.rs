//! The transmission phase: decode -> validate -> execute -> reply.
//!
//! Each connection has a thread of its own (see `socket.rs` for why not a
//! tokio task). It reads whatever the socket has, executes every complete
//! request in it and sends all replies with one write (small ones possibly
//! held a few microseconds to join the next batch: `Cork`). Work that cannot
//! block for long runs right there: READs of cached data (tried with
//! `RWF_NOWAIT`) and plain WRITEs under 256 KiB into the page cache.
//! Larger plain WRITEs go to the pool so that the next payload is received
//! while this one is copied. Everything that waits
//! for the device (cache-missing READs, FUA writes, FLUSH, TRIM,
//! WRITE_ZEROES, CACHE, BLOCK_STATUS) runs on tokio's blocking pool, whose
//! thread sends its reply itself under the connection's send lock, so
//! replies go out of order and a FLUSH never stalls the reads queued behind
//! it.
//!
//! Validation happens before the backend sees a request: a client mistake
//! is answered with the NBD error the spec names and the connection goes on.
//! Only a broken frame (bad magic, a payload over `PAYLOAD_MAX`) ends it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use backend::{BlockBackend, Extent, ZeroError, ZeroRequest};

use crate::buffers::{BufferPool, InBuf, OutBuf, Sink};
use crate::export::BASE_ALLOCATION;
use crate::handshake::Session;
use crate::limits::Limits;
use crate::proto::*;
use crate::socket::{Readiness, Socket, Stop};

/// Replies are sent once this many bytes are waiting, even mid-batch.
const OUT_FLUSH_BYTES: usize = 4 * 1024 * 1024;
/// Reads at least this long look for holes first (and answer them with
/// OFFSET_HOLE chunks); shorter reads are not worth the lseek calls.
const HOLE_SCAN_MIN_BYTES: u64 = 64 * 1024;
/// Holes/data runs looked up for one READ; the rest of the read is sent as data.
const READ_SEGMENTS_MAX: usize = 64;
/// WRITE payloads at least this long that go to the blocking pool are read
/// into a buffer of their own (see `wants_owned_payload`).
const OWNED_PAYLOAD_MIN_BYTES: u64 = 256 * 1024;
/// WRITEs at least this long run on the blocking pool even when they only
/// copy into the page cache: the connection's thread then reads the next
/// request's payload while another core copies this one.
const INLINE_WRITE_MAX_BYTES: u64 = 256 * 1024;
/// Pool replies at least this long give their buffer back to the pool.
const POOLED_REPLY_MIN_BYTES: usize = 64 * 1024;
/// Cached READs at least this long are sent straight from the page cache
/// (`sendfile`) on a unix socket when the backend allows it
/// (`read_through_fd`); shorter ones are cheaper copied and batched with
/// their neighbours.
const ZERO_COPY_MIN_BYTES: u64 = 256 * 1024;
/// Scratch buffer for reading and throwing away a payload that is too large.
const DISCARD_CHUNK_BYTES: usize = 1024 * 1024;
/// Extents in one BLOCK_STATUS chunk (well under the spec's 2^20).
const BLOCK_STATUS_EXTENTS_MAX: usize = 65536;
/// Replies are held back (see `Cork`) only while the client still has at
/// least this many bytes of earlier replies unread...
const CORK_BACKLOG_BYTES: usize = 16 * 1024;
/// ...while fewer than this many bytes of replies are held...
const CORK_HELD_MAX_BYTES: usize = 64 * 1024;
/// ...and for at most this long.
const CORK_HOLD_MAX: Duration = Duration::from_micros(20);

#[derive(Debug, thiserror::Error)]
pub enum TransmitError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(
        "request payload of {0} bytes is larger than the {PAYLOAD_DISCARD_MAX} bytes read to throw away"
    )]
    PayloadTooLarge(u64),
}

/// What the connection thread shares with its requests on the blocking pool.
///
/// Sending: one thread at a time holds `sending` and writes to the socket,
/// waiting for room as long as the client takes. A pool thread that finds
/// it taken leaves its reply in `queued` and goes back to the pool; the
/// holder sends what was queued before it lets go. So a client that stops
/// reading its replies holds at most one pool thread (and its own), never
/// the pool, and the replies it holds up count against its in-flight
/// bounds until they are on the socket.
struct Shared {
    socket: Socket,
    stop: Arc<Stop>,
    buffers: Arc<BufferPool>,
    sending: Mutex<()>,
    queued: Mutex<Vec<Queued>>,
    /// A send failed (the client went away, or read nothing while the
    /// server stopped): later replies are dropped rather than each waiting
    /// for a socket that will not take them.
    send_failed: AtomicBool,
    /// Requests on the blocking pool or with a reply not yet sent, and the
    /// READ/WRITE bytes they hold; `changed` is signalled as each ends.
    in_flight: AtomicUsize,
    bytes_in_flight: AtomicUsize,
    requests_in_flight_max: usize,
    /// `Limits::busy_poll`.
    busy_poll: Duration,
    bytes_in_flight_max: usize,
    wait_lock: Mutex<()>,
    changed: Condvar,
}

/// A pool thread's reply waiting for the sender, with the bytes it holds
/// against `bytes_in_flight`.
struct Queued {
    reply: Vec<u8>,
    held_bytes: usize,
}

impl Shared {
    /// Sends a batch of the connection thread's own replies (which may
    /// wait for the sender) and whatever pool replies queued meanwhile.
    fn send(&self, bytes: &[u8]) -> std::io::Result<()> {
        let sending = self.sending.lock().expect("send lock");
        let sent = self.send_bytes(bytes);
        self.send_queued(sending);
        sent
    }

    /// Sends `bytes` (the replies batched so far, ending with a READ's
    /// header) and then `length` bytes of `file` at `offset`, its data.
    fn send_with_file(&self, bytes: &[u8], file: std::os::fd::RawFd, offset: u64, length: u64) {
        let sending = self.sending.lock().expect("send lock");
        let sent = self.send_bytes_more(bytes).and_then(|()| {
            let sent = self.socket.send_file(file, offset, length, &self.stop);
            if sent.is_err() {
                self.send_failed.store(true, Ordering::SeqCst);
            }
            sent
        });
        if let Err(error) = sent {
            // The next send fails too and ends the connection.
            tracing::debug!(%error, "READ reply not sent: the connection is gone");
        }
        self.send_queued(sending);
    }

    /// `send_bytes` with more to follow at once (MSG_MORE).
    fn send_bytes_more(&self, bytes: &[u8]) -> std::io::Result<()> {
        if self.send_failed.load(Ordering::SeqCst) {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        let sent = self.socket.send_all_more(bytes, &self.stop);
        if sent.is_err() {
            self.send_failed.store(true, Ordering::SeqCst);
        }
        sent
    }

    /// Sends under the sender lock; after one failure, fails at once.
    fn send_bytes(&self, bytes: &[u8]) -> std::io::Result<()> {
        if self.send_failed.load(Ordering::SeqCst) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "an earlier reply could not be sent",
            ));
        }
        let sent = self.socket.send_all(bytes, &self.stop);
        if sent.is_err() {
            self.send_failed.store(true, Ordering::SeqCst);
        }
        sent
    }

    /// Sends a pool thread's reply, or queues it for the thread sending now.
    fn send_reply(&self, reply: Vec<u8>, held_bytes: usize) {
        let queued = Queued { reply, held_bytes };
        match self.sending.try_lock() {
            Ok(sending) => {
                self.send_one(queued);
                self.send_queued(sending);
            }
            Err(std::sync::TryLockError::WouldBlock) => {
                self.queued.lock().expect("queue lock").push(queued);
                // The holder may have looked at the queue for the last time
                // just before the push: then the sender is free again.
                if let Ok(sending) = self.sending.try_lock() {
                    self.send_queued(sending);
                }
            }
            Err(std::sync::TryLockError::Poisoned(error)) => panic!("send lock: {error}"),
        }
    }

    fn send_one(&self, queued: Queued) {
        if let Err(error) = self.send_bytes(&queued.reply) {
            tracing::debug!(%error, "reply not sent: the connection is gone");
        }
        if queued.reply.len() >= POOLED_REPLY_MIN_BYTES {
            self.buffers.put(queued.reply);
        }
        self.finish_one(queued.held_bytes);
    }

    /// Sends what is queued, and lets go of the sender only once the queue
    /// is empty and stays so (or another thread has taken the sender).
    fn send_queued<'a>(&'a self, mut sending: std::sync::MutexGuard<'a, ()>) {
        loop {
            let batch = std::mem::take(&mut *self.queued.lock().expect("queue lock"));
            if batch.is_empty() {
                drop(sending);
                if self.queued.lock().expect("queue lock").is_empty() {
                    return;
                }
                match self.sending.try_lock() {
                    Ok(again) => sending = again,
                    Err(_) => return,
                }
                continue;
            }
            for queued in batch {
                self.send_one(queued);
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Whether another request may be read: both in-flight bounds have room.
    fn has_room(&self) -> bool {
        self.in_flight() < self.requests_in_flight_max
            && self.bytes_in_flight.load(Ordering::SeqCst) < self.bytes_in_flight_max
    }

    /// Counts a request handed to the pool, holding `bytes`.
    fn start_one(&self, bytes: usize) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.bytes_in_flight.fetch_add(bytes, Ordering::SeqCst);
    }

    /// Waits until another request may be read.
    fn wait_room(&self) {
        let mut guard = self.wait_lock.lock().expect("wait lock");
        while !self.has_room() {
            guard = self.changed.wait(guard).expect("wait lock");
        }
    }

    /// Waits until every request handed to the pool has been answered.
    fn wait_all_answered(&self) {
        let mut guard = self.wait_lock.lock().expect("wait lock");
        while self.in_flight() > 0 {
            guard = self.changed.wait(guard).expect("wait lock");
        }
    }

    fn finish_one(&self, bytes: usize) {
        self.bytes_in_flight.fetch_sub(bytes, Ordering::SeqCst);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        // Taking the lock orders this against a waiter between its check and its wait.
        let _guard = self.wait_lock.lock().expect("wait lock");
        self.changed.notify_all();
    }
}

/// Serves requests on the calling thread until the client disconnects or
/// `stop` is set; replies of requests still on the pool are sent before the
/// socket is closed. `runtime` runs the blocking pool.
pub fn transmit(
    socket: Socket,
    input: InBuf,
    session: Session,
    limits: &Limits,
    stop: Arc<Stop>,
    runtime: tokio::runtime::Handle,
) -> Result<(), TransmitError> {
    let shared = Arc::new(Shared {
        socket,
        stop,
        buffers: Arc::default(),
        sending: Mutex::new(()),
        queued: Mutex::new(Vec::new()),
        send_failed: AtomicBool::new(false),
        in_flight: AtomicUsize::new(0),
        bytes_in_flight: AtomicUsize::new(0),
        requests_in_flight_max: limits.requests_in_flight_max.max(1),
        busy_poll: limits.busy_poll,
        bytes_in_flight_max: limits.bytes_in_flight_max.max(1),
        wait_lock: Mutex::new(()),
        changed: Condvar::new(),
    });
    let result = serve_requests(&shared, input, session, runtime);
    shared.wait_all_answered();
    shared.socket.shutdown();
    result
}

fn serve_requests(
    shared: &Arc<Shared>,
    mut input: InBuf,
    session: Session,
    runtime: tokio::runtime::Handle,
) -> Result<(), TransmitError> {
    let mut conn = Connection::new(session, Arc::clone(shared), runtime);
    let mut out = OutBuf::default();
    let header_len = if conn.mode == ReplyMode::Extended {
        EXTENDED_REQUEST_LEN
    } else {
        COMPACT_REQUEST_LEN
    };
    let mut reading = !shared.stop.is_set();
    let mut cork = Cork::default();
    let mut busy = BusyPoll::new(shared.busy_poll);
    // Set after a WRITE whose payload was read into a buffer of its own:
    // the next receive takes only the next request's header, so that when
    // it is another such WRITE none of its payload lands in `input` to be
    // copied out (a quarter of every 1 MiB payload, with `input`'s 256 KiB).
    let mut header_first = false;
    loop {
        let mut starved = false;
        let mut owned_write = None;
        let mut discard = 0;
        while shared.has_room() && out.len() < OUT_FLUSH_BYTES {
            let available = input.available();
            if available.len() < header_len {
                starved = true;
                break;
            }
            header_first = false;
            let header = if header_len == EXTENDED_REQUEST_LEN {
                RequestHeader::decode_extended(
                    available[..header_len].try_into().expect("32 bytes"),
                )?
            } else {
                RequestHeader::decode_compact(
                    available[..header_len].try_into().expect("28 bytes"),
                )?
            };
            if header.command == CMD_DISC {
                // No reply, whatever its flags, and a payload it claims
                // (PAYLOAD_LEN under extended headers) is never read.
                if !out.is_empty() {
                    shared.send(out.as_slice())?;
                }
                return Ok(());
            }
            let payload = conn.payload_len(&header)?;
            if conn.throws_away_payload(&header, payload) {
                // Answered now; its payload is read into a scratch buffer
                // and dropped, so the next request is found after it.
                conn.reject_write(&header, &mut out);
                let buffered = (available.len() - header_len).min(payload as usize);
                input.consume(header_len + buffered);
                discard = payload - buffered as u64;
                break;
            }
            let total = header_len + payload as usize;
            if available.len() < total {
                if conn.wants_owned_payload(&header) {
                    owned_write = Some(header);
                    break;
                }
                input.make_room(total);
                starved = true;
                break;
            }
            conn.handle(&header, &available[header_len..total], &mut out);
            input.consume(total);
        }
        if !out.is_empty() {
            let may_hold = starved && reading && owned_write.is_none() && discard == 0;
            if !(may_hold && cork.holds(&shared.socket, out.len())) {
                shared.send(out.as_slice())?;
                out.clear();
                cork.release();
            }
        }
        if discard > 0 {
            discard_payload(shared, discard)?;
            continue;
        }
        if let Some(header) = owned_write {
            // A large write bound for the blocking pool: its payload is read
            // straight into a buffer of its own rather than into `input` and
            // then copied out.
            let mut data = shared.buffers.take();
            let length = header.length as usize;
            data.resize(length, 0);
            let buffered = input.len() - header_len;
            data[..buffered].copy_from_slice(&input.available()[header_len..]);
            input.consume(input.len());
            shared
                .socket
                .recv_exact(&mut data[buffered..], &shared.stop)?;
            conn.write_owned(&header, data);
            header_first = true;
            continue;
        }
        if !starved {
            // The batch stopped at an in-flight bound or because enough
            // replies were waiting: the requests still buffered need no new
            // input. (Waiting on the socket here deadlocks against a client
            // that has sent all it will send until it gets replies.)
            shared.wait_room();
            continue;
        }
        if !reading {
            return Ok(());
        }
        if shared.stop.is_set() {
            reading = false;
            continue;
        }
        let window = receive_window(&mut input, header_first, header_len);
        match shared.socket.recv_nowait(window)? {
            Some(0) => reading = false,
            Some(n) => input.filled(n),
            // Replies are held: look for more requests, without sleeping,
            // until the cork lets go of them.
            None if !out.is_empty() => std::hint::spin_loop(),
            None => {
                // Not while a request of this connection is on the pool:
                // the client then waits for its reply rather than about
                // to send, and the spin would take a CPU from the thread
                // serving it (a FLUSH's fsync at queue depth 1).
                if busy.spins()
                    && shared.in_flight() == 0
                    && spin_for_input(shared, &mut input, header_first, header_len, &mut reading)?
                {
                    continue;
                }
                let slept = Instant::now();
                if shared.socket.wait_readable(&shared.stop)? == Readiness::Stopping {
                    reading = false;
                }
                busy.slept(slept.elapsed());
            }
        }
    }
}

/// A sleep shorter than this many times `Limits::busy_poll` counts as
/// "the next request came soon" and lets the connection spin again.
const BUSY_POLL_SOON: u32 = 8;

/// Spins up to `busy_poll` for input; true when some arrived (or the
/// stream ended, which clears `reading`).
fn spin_for_input(
    shared: &Shared,
    input: &mut InBuf,
    header_first: bool,
    header_len: usize,
    reading: &mut bool,
) -> Result<bool, TransmitError> {
    let start = Instant::now();
    loop {
        let window = receive_window(input, header_first, header_len);
        match shared.socket.recv_nowait(window)? {
            Some(0) => {
                *reading = false;
                return Ok(true);
            }
            Some(n) => {
                input.filled(n);
                return Ok(true);
            }
            None if shared.stop.is_set() || start.elapsed() >= shared.busy_poll => {
                return Ok(false);
            }
            // Yielding, not only spinning: a thread this CPU should run
            // (the client itself, or a pool thread) runs at once instead
            // of waiting for the spin to end.
            // SAFETY: sched_yield takes no arguments.
            None => unsafe {
                libc::sched_yield();
            },
        }
    }
}

/// Where the next receive goes: all of `input`'s room, or with
/// `header_first` only what the next request's header still lacks.
fn receive_window(input: &mut InBuf, header_first: bool, header_len: usize) -> &mut [u8] {
    let lacking = header_len.saturating_sub(input.len());
    let spare = input.spare();
    if header_first && lacking > 0 {
        let window = lacking.min(spare.len());
        &mut spare[..window]
    } else {
        spare
    }
}

/// Whether a connection whose input ran dry spins for its next request
/// rather than sleeping at once (`Limits::busy_poll`). A thread asleep on
/// one CPU, woken by a client on the other, costs tens of microseconds on
/// a VM (tens more for a vCPU the host has descheduled): at queue depth 1
/// that is most of a 4 KiB read's latency. So once a sleep ended soon
/// (within `BUSY_POLL_SOON` times `busy_poll`: the next request came
/// soon), the thread spins up to `busy_poll` before it sleeps again; a
/// longer sleep (an idle client, or one that thinks between requests)
/// ends the spinning until requests come that close again.
/// The CPU a connection spends spinning is thus at most `busy_poll` a
/// request, and nothing while it is idle or while one of its requests is
/// on the blocking pool.
#[derive(Debug)]
struct BusyPoll {
    budget: Duration,
    /// The last sleep was short enough that a spin would have caught it.
    close: bool,
}

impl BusyPoll {
    fn new(budget: Duration) -> BusyPoll {
        BusyPoll {
            budget,
            close: false,
        }
    }

    fn spins(&self) -> bool {
        self.close && !self.budget.is_zero()
    }

    /// The thread slept this long (after a spin that found nothing, or
    /// none) before input came. The time includes the thread's own
    /// wake-up, tens of microseconds of it, so "soon" is taken loosely.
    fn slept(&mut self, slept: Duration) {
        self.close = slept < self.budget * BUSY_POLL_SOON;
    }
}

/// Reads `length` bytes of a payload nobody will use.
fn discard_payload(shared: &Shared, mut length: u64) -> Result<(), TransmitError> {
    let mut scratch = vec![0; DISCARD_CHUNK_BYTES.min(length as usize)];
    while length > 0 {
        let piece = scratch.len().min(length as usize);
        shared
            .socket
            .recv_exact(&mut scratch[..piece], &shared.stop)?;
        length -= piece as u64;
    }
    Ok(())
}

/// Autocorking, as TCP does it (`tcp_autocorking`): when the input has
/// run dry and the client has not yet read our earlier replies, the new
/// ones wait a little so that several leave in one `send`.
///
/// Why: a client such as fio's nbd engine, which takes one core on 4k
/// reads, pays in its `recv` for every buffer the kernel frees, and a lone
/// 4 KiB reply is one page-backed buffer of its own. Sent together, eight
/// replies share one. While the client still has `CORK_BACKLOG_BYTES`
/// unread it is busy anyway, so holding costs it nothing; a client that
/// waits for us (queue depth 1, or a drained pipeline) sees no backlog and
/// gets its reply at once. The hold ends when the backlog falls below that
/// mark, when `CORK_HELD_MAX_BYTES` are held, or after `CORK_HOLD_MAX`;
/// the connection's thread does not sleep while it holds replies.
#[derive(Debug, Default)]
struct Cork {
    /// When the replies now held were first held back.
    since: Option<Instant>,
}

impl Cork {
    /// Whether `held` bytes of ready replies should wait a little longer.
    fn holds(&mut self, socket: &Socket, held: usize) -> bool {
        if held >= CORK_HELD_MAX_BYTES {
            return false;
        }
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        now.duration_since(since) < CORK_HOLD_MAX && socket.unread_by_peer() >= CORK_BACKLOG_BYTES
    }

    fn release(&mut self) {
        self.since = None;
    }
}

/// A client mistake, answered with an NBD error.
struct Reject {
    error: NbdError,
    message: &'static str,
}

fn reject(error: NbdError, message: &'static str) -> Reject {
    Reject { error, message }
}

struct Connection {
    backend: Arc<dyn BlockBackend>,
    /// The backend's file, when cached READs may be sent from it directly.
    zero_copy: Option<std::os::fd::RawFd>,
    mode: ReplyMode,
    transmission_flags: u16,
    contexts: Arc<[(u32, String)]>,
    size_bytes: u64,
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
}

impl Connection {
    fn new(session: Session, shared: Arc<Shared>, runtime: tokio::runtime::Handle) -> Connection {
        let backend = Arc::clone(&session.export.backend);
        // Unix sockets only. Over TCP loopback the copy saved on this side
        // moves the delivery (softirq) work into the client's recv, and a
        // client that holds a core of its own, as fio does, got 20% less:
        // 1300-1340 against 1630-1710 MiB/s on 1M reads, with a third of
        // the server's CPU per GiB (docs/bench.md).
        let zero_copy = if shared.socket.is_tls() || !shared.socket.is_unix() || !cachestat_works()
        {
            None
        } else {
            backend.read_through_fd()
        };
        Connection {
            zero_copy,
            size_bytes: backend.size_bytes(),
            backend,
            mode: session.mode,
            transmission_flags: session.transmission_flags,
            contexts: session.contexts.into(),
            shared,
            runtime,
        }
    }

    /// Bytes of payload that follow `header` on the wire. Only a payload
    /// too large even to read and throw away ends the connection.
    fn payload_len(&self, header: &RequestHeader) -> Result<u64, TransmitError> {
        // WRITE always carries its data. Under extended headers other
        // commands carry a payload only with PAYLOAD_LEN; the spec asks
        // WRITE to set that flag too, but qemu's client does not, so WRITE
        // is accepted either way.
        let has_payload = header.command == CMD_WRITE
            || (self.mode == ReplyMode::Extended && header.flags & CMD_FLAG_PAYLOAD_LEN != 0);
        if !has_payload {
            return Ok(0);
        }
        if header.length > PAYLOAD_DISCARD_MAX {
            return Err(TransmitError::PayloadTooLarge(header.length));
        }
        Ok(header.length)
    }

    /// Whether a request's payload is read only to be thrown away: one
    /// over `PAYLOAD_MAX`, or a large WRITE that is refused anyway (so
    /// that neither is gathered into memory first).
    fn throws_away_payload(&self, header: &RequestHeader, payload: u64) -> bool {
        payload > u64::from(PAYLOAD_MAX)
            || (payload >= OWNED_PAYLOAD_MIN_BYTES && self.validate(header).is_err())
    }

    /// The error reply to a request whose payload is thrown away.
    fn reject_write(&self, header: &RequestHeader, out: &mut OutBuf) {
        let reply = ReplyTo::new(self.mode, header);
        match self.validate(header) {
            Err(Reject { error, message }) => reply.error(out, error, message),
            Ok(()) => reply.error(
                out,
                NbdError::Inval,
                "write payload larger than the 64 MiB maximum",
            ),
        }
    }

    /// Answers one request (DISC is taken care of before its payload).
    fn handle(&mut self, header: &RequestHeader, payload: &[u8], out: &mut OutBuf) {
        debug_assert_ne!(header.command, CMD_DISC, "DISC ends the loop first");
        let reply = ReplyTo::new(self.mode, header);
        if let Err(Reject { error, message }) = self.validate(header) {
            reply.error(out, error, message);
            return;
        }
        let fua = header.flags & CMD_FLAG_FUA != 0;
        let (offset, length) = (header.offset, header.length);
        match header.command {
            CMD_READ => self.read(reply, header, out),
            CMD_WRITE if self.runs_inline(header) => {
                match self.backend.write_at(payload, offset, false) {
                    Ok(()) => reply.ok(out),
                    Err(e) => reply.io_error(out, &e),
                }
            }
            CMD_WRITE => self.write_owned(header, payload.to_vec()),
            CMD_FLUSH => self.spawn(move |backend, out| match backend.flush() {
                Ok(()) => reply.ok(out),
                Err(e) => reply.io_error(out, &e),
            }),
            CMD_TRIM => self.spawn(
                move |backend, out| match backend.trim(offset, length, fua) {
                    Ok(()) => reply.ok(out),
                    Err(e) => reply.io_error(out, &e),
                },
            ),
            CMD_CACHE => self.spawn(move |backend, out| match backend.cache(offset, length) {
                Ok(()) => reply.ok(out),
                Err(e) => reply.io_error(out, &e),
            }),
            CMD_WRITE_ZEROES => {
                let request = ZeroRequest {
                    may_trim: header.flags & CMD_FLAG_NO_HOLE == 0,
                    fast_only: header.flags & CMD_FLAG_FAST_ZERO != 0,
                    fua,
                };
                self.spawn(move |backend, out| {
                    match backend.write_zeroes(offset, length, request) {
                        Ok(()) => reply.ok(out),
                        Err(ZeroError::NotFast) => reply.error(
                            out,
                            NbdError::NotSup,
                            "zeroing here is not faster than writing",
                        ),
                        Err(ZeroError::Io(e)) => reply.io_error(out, &e),
                    }
                });
            }
            CMD_BLOCK_STATUS => {
                let contexts = Arc::clone(&self.contexts);
                let req_one = header.flags & CMD_FLAG_REQ_ONE != 0;
                self.spawn(move |backend, out| {
                    block_status(backend, reply, length, &contexts, req_one, out)
                });
            }
            _ => unreachable!("validate admits only known commands"),
        }
    }

    /// Whether this request is a valid large WRITE that will run on the
    /// blocking pool (FUA, or its regions wait for a tracking mark).
    fn wants_owned_payload(&self, header: &RequestHeader) -> bool {
        header.command == CMD_WRITE
            && header.length >= OWNED_PAYLOAD_MIN_BYTES
            && self.validate(header).is_ok()
            && !self.runs_inline(header)
    }

    /// Whether a WRITE runs on the connection's thread: a plain write into
    /// the page cache, short enough that handing it to another thread costs
    /// more than it saves.
    fn runs_inline(&self, header: &RequestHeader) -> bool {
        header.flags & CMD_FLAG_FUA == 0
            && header.length < INLINE_WRITE_MAX_BYTES
            && self.backend.write_is_cheap(header.offset, header.length)
    }

    /// Runs a (validated) WRITE whose payload it owns on the blocking pool.
    fn write_owned(&mut self, header: &RequestHeader, data: Vec<u8>) {
        let reply = ReplyTo::new(self.mode, header);
        let (offset, fua) = (header.offset, header.flags & CMD_FLAG_FUA != 0);
        let pool = Arc::clone(&self.shared.buffers);
        self.spawn_holding(data.len(), move |backend, out| {
            match backend.write_at(&data, offset, fua) {
                Ok(()) => reply.ok(out),
                Err(e) => reply.io_error(out, &e),
            }
            pool.put(data);
        });
    }

    /// Checks a request against the spec and what was advertised.
    fn validate(&self, header: &RequestHeader) -> Result<(), Reject> {
        let flags = self.transmission_flags;
        let read_only = flags & TFLAG_READ_ONLY != 0;
        let mut allowed = 0;
        if flags & TFLAG_SEND_FUA != 0 {
            allowed |= CMD_FLAG_FUA;
        }
        match header.command {
            CMD_READ if self.mode != ReplyMode::Simple => allowed |= CMD_FLAG_DF,
            CMD_WRITE if self.mode == ReplyMode::Extended => allowed |= CMD_FLAG_PAYLOAD_LEN,
            CMD_WRITE_ZEROES => {
                allowed |= CMD_FLAG_NO_HOLE;
                if flags & TFLAG_SEND_FAST_ZERO != 0 {
                    allowed |= CMD_FLAG_FAST_ZERO;
                }
            }
            CMD_BLOCK_STATUS => allowed |= CMD_FLAG_REQ_ONE,
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => {}
            _ => return Err(reject(NbdError::Inval, "unknown command")),
        }
        if header.flags & !allowed != 0 {
            return Err(reject(
                NbdError::Inval,
                "command flags not valid for this command",
            ));
        }
        match header.command {
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if read_only => {
                return Err(reject(NbdError::Perm, "the export is read-only"));
            }
            CMD_TRIM if flags & TFLAG_SEND_TRIM == 0 => {
                return Err(reject(
                    NbdError::Inval,
                    "TRIM is not supported by this export",
                ));
            }
            CMD_FLUSH if flags & TFLAG_SEND_FLUSH == 0 => {
                return Err(reject(
                    NbdError::Inval,
                    "FLUSH is not supported by this export",
                ));
            }
            CMD_FLUSH if header.offset != 0 || header.length != 0 => {
                return Err(reject(
                    NbdError::Inval,
                    "FLUSH must have zero offset and length",
                ));
            }
            CMD_FLUSH => return Ok(()),
            CMD_BLOCK_STATUS if self.contexts.is_empty() => {
                return Err(reject(NbdError::Inval, "no metadata context was selected"));
            }
            _ => {}
        }
        if header.length == 0 {
            return Err(reject(NbdError::Inval, "zero-length request"));
        }
        if header.command == CMD_READ && header.length > u64::from(PAYLOAD_MAX) {
            // EOVERFLOW tells a client to split its read, but only clients
            // of structured replies know it.
            let error = match self.mode {
                ReplyMode::Simple => NbdError::Inval,
                ReplyMode::Structured | ReplyMode::Extended => NbdError::Overflow,
            };
            return Err(reject(error, "read larger than the 64 MiB maximum"));
        }
        if header.command == CMD_WRITE && header.length > u64::from(PAYLOAD_MAX) {
            return Err(reject(
                NbdError::Inval,
                "write payload larger than the 64 MiB maximum",
            ));
        }
        let end = header.offset.checked_add(header.length);
        if end.is_none_or(|end| end > self.size_bytes) {
            let error = match header.command {
                CMD_WRITE | CMD_WRITE_ZEROES => NbdError::NoSpc,
                _ => NbdError::Inval,
            };
            return Err(reject(error, "request runs past the end of the export"));
        }
        Ok(())
    }

    /// Answers a READ from the page cache if it can, else on the blocking pool.
    /// (Handing cached 1 MiB reads to the pool to copy on another core was
    /// measured slower, 2.0-2.8 GiB/s against 4.1-4.5 GiB/s inline.)
    fn read(&mut self, reply: ReplyTo, header: &RequestHeader, out: &mut OutBuf) {
        let df = header.flags & CMD_FLAG_DF != 0;
        if let Some(file) = self
            .zero_copy
            .filter(|_| header.length >= ZERO_COPY_MIN_BYTES)
        {
            match self.read_zero_copy(file, reply, header.length, df, out) {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    reply.io_error(out, &e);
                    return;
                }
            }
        }
        let mark = out.len();
        match read_reply(&*self.backend, reply, header.length, df, out, true) {
            Ok(true) => return,
            Ok(false) => out.truncate(mark),
            Err(e) => {
                out.truncate(mark);
                reply.io_error(out, &e);
                return;
            }
        }
        let length = header.length;
        let pool = Arc::clone(&self.shared.buffers);
        self.spawn_holding(length as usize, move |backend, out| {
            let mut buffer = OutBuf::from_vec(pool.take(), length as usize + 64);
            match read_reply(backend, reply, length, df, &mut buffer, false) {
                Ok(_) => *out = buffer.into_vec(),
                Err(e) => reply.io_error(out, &e),
            }
        });
    }

    /// Sends a READ whose whole range is in the page cache straight from
    /// the backend's file: each data chunk's header goes out with the
    /// replies batched before it, then its bytes by `sendfile`. `Ok(false)`
    /// when some of the range is not cached (holes are not either): the
    /// caller reads it the usual way.
    fn read_zero_copy(
        &mut self,
        file: std::os::fd::RawFd,
        reply: ReplyTo,
        length: u64,
        df: bool,
        out: &mut OutBuf,
    ) -> std::io::Result<bool> {
        if !fully_cached(file, reply.offset, length) {
            return Ok(false);
        }
        let segments = if reply.mode == ReplyMode::Simple {
            vec![(reply.offset, length, false)]
        } else {
            read_segments(&*self.backend, reply.offset, length, df)?
        };
        if reply.mode == ReplyMode::Simple {
            put_simple_reply(out, 0, reply.cookie);
        }
        for (index, &(segment_offset, segment_length, is_hole)) in segments.iter().enumerate() {
            if reply.mode != ReplyMode::Simple {
                let last = index + 1 == segments.len();
                reply.segment(out, last, segment_offset, segment_length, is_hole);
            }
            if is_hole {
                continue;
            }
            self.shared
                .send_with_file(out.as_slice(), file, segment_offset, segment_length);
            out.clear();
        }
        Ok(true)
    }

    /// Runs `op` on the blocking pool; that thread sends the reply itself
    /// (or queues it for the thread sending now).
    fn spawn<F>(&mut self, op: F)
    where
        F: FnOnce(&dyn BlockBackend, &mut Vec<u8>) + Send + 'static,
    {
        self.spawn_holding(0, op);
    }

    /// `spawn` for a request holding `bytes` of buffer (a READ's reply, a
    /// WRITE's payload) until its reply is sent.
    fn spawn_holding<F>(&mut self, bytes: usize, op: F)
    where
        F: FnOnce(&dyn BlockBackend, &mut Vec<u8>) + Send + 'static,
    {
        let backend = Arc::clone(&self.backend);
        let shared = Arc::clone(&self.shared);
        shared.start_one(bytes);
        self.runtime.spawn_blocking(move || {
            let mut out = Vec::new();
            op(&*backend, &mut out);
            shared.send_reply(out, bytes);
        });
    }
}

/// Everything needed to frame the reply to one request.
#[derive(Debug, Clone, Copy)]
struct ReplyTo {
    mode: ReplyMode,
    cookie: u64,
    offset: u64,
}

impl ReplyTo {
    fn new(mode: ReplyMode, header: &RequestHeader) -> ReplyTo {
        ReplyTo {
            mode,
            cookie: header.cookie,
            offset: header.offset,
        }
    }

    fn chunk<S: Sink + ?Sized>(
        &self,
        out: &mut S,
        flags: u16,
        chunk_type: u16,
        payload_len: usize,
    ) {
        put_chunk_header(
            out,
            self.mode,
            flags,
            chunk_type,
            self.cookie,
            self.offset,
            payload_len,
        );
    }

    fn ok<S: Sink + ?Sized>(&self, out: &mut S) {
        match self.mode {
            // Structured replies allow a simple reply for success without payload.
            ReplyMode::Simple | ReplyMode::Structured => put_simple_reply(out, 0, self.cookie),
            ReplyMode::Extended => self.chunk(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0),
        }
    }

    fn error<S: Sink + ?Sized>(&self, out: &mut S, error: NbdError, message: &str) {
        match self.mode {
            ReplyMode::Simple => put_simple_reply(out, error as u32, self.cookie),
            ReplyMode::Structured | ReplyMode::Extended => {
                let message = &message.as_bytes()[..message.len().min(STRING_MAX)];
                self.chunk(out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + message.len());
                out.put(&(error as u32).to_be_bytes());
                out.put(&(message.len() as u16).to_be_bytes());
                out.put(message);
            }
        }
    }

    /// A structured READ reply's chunk for one segment: a whole hole
    /// chunk, or a data chunk's header and offset (its bytes follow).
    fn segment<S: Sink + ?Sized>(
        &self,
        out: &mut S,
        last: bool,
        offset: u64,
        length: u64,
        is_hole: bool,
    ) {
        let flags = if last { REPLY_FLAG_DONE } else { 0 };
        if is_hole {
            self.chunk(out, flags, REPLY_TYPE_OFFSET_HOLE, 12);
            out.put(&offset.to_be_bytes());
            out.put(&(length as u32).to_be_bytes());
        } else {
            self.chunk(out, flags, REPLY_TYPE_OFFSET_DATA, 8 + length as usize);
            out.put(&offset.to_be_bytes());
        }
    }

    fn io_error<S: Sink + ?Sized>(&self, out: &mut S, error: &std::io::Error) {
        tracing::warn!(offset = self.offset, %error, "backend error");
        self.error(out, NbdError::from_io(error), &error.to_string());
    }
}

/// Builds a READ reply in `out`. With `nowait`, returns `Ok(false)` as soon
/// as some data is not cached (the caller discards what was appended).
fn read_reply(
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
fn fully_cached(file: std::os::fd::RawFd, offset: u64, length: u64) -> bool {
    const PAGE_BYTES: u64 = 4096;
    let pages = (offset + length).div_ceil(PAGE_BYTES) - offset / PAGE_BYTES;
    cached_pages(file, offset, length).is_some_and(|cached| cached >= pages)
}

/// Whether this kernel has cachestat (asked once, of a file every process has).
fn cachestat_works() -> bool {
    static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WORKS.get_or_init(|| {
        let Ok(file) = std::fs::File::open("/proc/self/exe") else {
            return false;
        };
        cached_pages(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 4096).is_some()
    })
}

/// Splits a read into (offset, length, is_hole) runs.
fn read_segments(
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

/// One status chunk per selected context.
fn block_status(
    backend: &dyn BlockBackend,
    reply: ReplyTo,
    length: u64,
    contexts: &[(u32, String)],
    req_one: bool,
    out: &mut Vec<u8>,
) {
    let max_extents = if req_one { 1 } else { BLOCK_STATUS_EXTENTS_MAX };
    let mut chunks = Vec::new();
    let mut extents = Vec::new();
    for (index, (id, name)) in contexts.iter().enumerate() {
        extents.clear();
        let result = if name == BASE_ALLOCATION {
            backend.extents(reply.offset, length, max_extents, &mut extents)
        } else {
            backend.context_extents(name, reply.offset, length, max_extents, &mut extents)
        };
        if let Err(e) = result {
            reply.io_error(out, &e);
            return;
        }
        clip_extents(&mut extents, length, req_one, reply.mode);
        let flags = if index + 1 == contexts.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        if reply.mode == ReplyMode::Extended {
            reply.chunk(
                &mut chunks,
                flags,
                REPLY_TYPE_BLOCK_STATUS_EXT,
                8 + 16 * extents.len(),
            );
            chunks.put(&id.to_be_bytes());
            chunks.put(&(extents.len() as u32).to_be_bytes());
            for extent in &extents {
                chunks.put(&extent.length_bytes.to_be_bytes());
                chunks.put(&u64::from(extent.flags).to_be_bytes());
            }
        } else {
            reply.chunk(
                &mut chunks,
                flags,
                REPLY_TYPE_BLOCK_STATUS,
                4 + 8 * extents.len(),
            );
            chunks.put(&id.to_be_bytes());
            for extent in &extents {
                chunks.put(&(extent.length_bytes as u32).to_be_bytes());
                chunks.put(&extent.flags.to_be_bytes());
            }
        }
    }
    out.extend_from_slice(&chunks);
}

/// Makes extents fit the request and the reply format: at least one, none
/// empty, none past what REQ_ONE allows, each within 32 bits when compact.
fn clip_extents(extents: &mut Vec<Extent>, length: u64, req_one: bool, mode: ReplyMode) {
    extents.retain(|extent| extent.length_bytes > 0);
    if extents.is_empty() {
        extents.push(Extent {
            length_bytes: length,
            flags: 0,
        });
    }
    if req_one {
        extents.truncate(1);
        extents[0].length_bytes = extents[0].length_bytes.min(length);
    }
    if mode != ReplyMode::Extended {
        // Keep 4 KiB alignment when cutting an extent to fit 32 bits.
        let max = u64::from(u32::MAX) & !4095;
        if let Some(cut) = extents.iter().position(|extent| extent.length_bytes > max) {
            extents.truncate(cut + 1);
            extents[cut].length_bytes = max;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_poll_spins_only_while_requests_come_soon_and_never_when_off() {
        let budget = Duration::from_micros(50);
        let mut busy = BusyPoll::new(budget);
        assert!(!busy.spins(), "a new connection sleeps first");
        busy.slept(Duration::from_micros(120));
        assert!(busy.spins(), "a request soon after running dry");
        busy.slept(budget * BUSY_POLL_SOON);
        assert!(!busy.spins(), "an idle spell ends the spinning");
        let mut off = BusyPoll::new(Duration::ZERO);
        off.slept(Duration::ZERO);
        assert!(!off.spins());
    }
}
