//! One request answered: its validation (the NBD error the spec names for
//! a client mistake), its execution on the connection's thread or the
//! blocking pool, and its reply framed for the connection's reply mode;
//! BLOCK_STATUS's chunks.

use super::reads::{cachestat_works, fully_cached, read_reply, read_segments};
use super::*;

/// WRITE payloads at least this long that go to the blocking pool are read
/// into a buffer of their own (see `wants_owned_payload`).
const OWNED_PAYLOAD_MIN_BYTES: u64 = 256 * 1024;
/// WRITEs at least this long run on the blocking pool even when they only
/// copy into the page cache: the connection's thread then reads the next
/// request's payload while another core copies this one.
const INLINE_WRITE_MAX_BYTES: u64 = 256 * 1024;
/// Cached READs at least this long are sent straight from the page cache
/// (`sendfile`) on a unix socket when the backend allows it
/// (`read_through_fd`); shorter ones are cheaper copied and batched with
/// their neighbours.
const ZERO_COPY_MIN_BYTES: u64 = 256 * 1024;
/// Extents in one BLOCK_STATUS chunk (well under the spec's 2^20).
const BLOCK_STATUS_EXTENTS_MAX: usize = 65536;

/// A client mistake, answered with an NBD error.
struct Reject {
    error: NbdError,
    message: &'static str,
}

fn reject(error: NbdError, message: &'static str) -> Reject {
    Reject { error, message }
}

pub(super) struct Connection {
    backend: Arc<dyn BlockBackend>,
    /// The backend's file, when cached READs may be sent from it directly.
    zero_copy: Option<std::os::fd::RawFd>,
    pub(super) mode: ReplyMode,
    transmission_flags: u16,
    contexts: Arc<[(u32, String)]>,
    size_bytes: u64,
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
}

impl Connection {
    pub(super) fn new(
        session: Session,
        shared: Arc<Shared>,
        runtime: tokio::runtime::Handle,
    ) -> Connection {
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
    pub(super) fn payload_len(&self, header: &RequestHeader) -> Result<u64, TransmitError> {
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
    pub(super) fn throws_away_payload(&self, header: &RequestHeader, payload: u64) -> bool {
        payload > u64::from(PAYLOAD_MAX)
            || (payload >= OWNED_PAYLOAD_MIN_BYTES && self.validate(header).is_err())
    }

    /// The error reply to a request whose payload is thrown away.
    pub(super) fn reject_write(&self, header: &RequestHeader, out: &mut OutBuf) {
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
    pub(super) fn handle(&mut self, header: &RequestHeader, payload: &[u8], out: &mut OutBuf) {
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
    pub(super) fn wants_owned_payload(&self, header: &RequestHeader) -> bool {
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
    pub(super) fn write_owned(&mut self, header: &RequestHeader, data: Vec<u8>) {
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
pub(super) struct ReplyTo {
    pub(super) mode: ReplyMode,
    pub(super) cookie: u64,
    pub(super) offset: u64,
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
    pub(super) fn segment<S: Sink + ?Sized>(
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
