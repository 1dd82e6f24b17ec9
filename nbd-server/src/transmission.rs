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
//!
//! This file holds the loop (receiving, batching, corking, the send queue);
//! `requests.rs` one request's validation, execution and reply;
//! `reads.rs` READ replies.

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

mod reads;
mod requests;

use requests::Connection;

/// Replies are sent once this many bytes are waiting, even mid-batch.
const OUT_FLUSH_BYTES: usize = 4 * 1024 * 1024;
/// Pool replies at least this long give their buffer back to the pool.
const POOLED_REPLY_MIN_BYTES: usize = 64 * 1024;
/// Scratch buffer for reading and throwing away a payload that is too large.
const DISCARD_CHUNK_BYTES: usize = 1024 * 1024;
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
