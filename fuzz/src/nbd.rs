//! `nbd_handshake` and `nbd_transmission`: nbd-server fed what a client
//! sends, from an in-memory export whose backend asserts that every call
//! reaching it was validated (inside the export, not empty, no write to a
//! read-only export), and with the server's replies parsed back: every
//! reply framed as the spec says, one final reply per request.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};

use backend::{BlockBackend, Extent, ZeroError, ZeroRequest};
use nbd_server::buffers::InBuf;
use nbd_server::handshake::{Haggled, HandshakeError, Session, greet, haggle};
use nbd_server::proto::*;
use nbd_server::socket::{Socket, Stop};
use nbd_server::transmission::transmit;
use nbd_server::{Export, Exports, Limits, TlsMode};

/// The export's size: small, so that reads stay cheap, and not a multiple
/// of the extents' pattern, so that their clipping at the end is tried.
pub const EXPORT_BYTES: u64 = 192 * 1024 + 512;
/// The dirty-bitmap context the writable export serves beside
/// `base:allocation`.
pub const DIRTY_CONTEXT: &str = "qemu:dirty-bitmap:fuzz";
/// Extents the backend reports alternate data and zeroes this long.
const EXTENT_PATTERN_BYTES: u64 = 48 * 1024;
/// Client bytes one transmission input may send: they are written to the
/// socket before the server reads, so they must fit its buffer.
pub const TRANSMISSION_INPUT_MAX: usize = 64 * 1024;

/// An export in memory that checks what the server asks of it.
#[derive(Debug)]
pub struct Memory {
    data: Mutex<Vec<u8>>,
    read_only: bool,
}

impl Memory {
    pub fn new(read_only: bool) -> Memory {
        Memory {
            data: Mutex::new(vec![0; EXPORT_BYTES as usize]),
            read_only,
        }
    }

    /// A validated range: non-empty and inside the export.
    fn range(&self, offset: u64, length: u64) -> std::ops::Range<usize> {
        assert!(length > 0, "an empty request reached the backend");
        let end = offset
            .checked_add(length)
            .expect("a request past 2^64 reached the backend");
        assert!(
            end <= EXPORT_BYTES,
            "a request past the end reached the backend: {offset}+{length}"
        );
        offset as usize..end as usize
    }

    fn writable(&self) {
        assert!(!self.read_only, "a write reached a read-only export");
    }
}

impl BlockBackend for Memory {
    fn size_bytes(&self) -> u64 {
        EXPORT_BYTES
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn can_trim(&self) -> bool {
        true
    }
    fn can_fast_zero(&self) -> bool {
        true
    }
    fn can_extents(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let range = self.range(offset, buf.len() as u64);
        buf.copy_from_slice(&self.data.lock().expect("data")[range]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        self.writable();
        let range = self.range(offset, buf.len() as u64);
        self.data.lock().expect("data")[range].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, length: u64, _fua: bool) -> io::Result<()> {
        self.writable();
        let range = self.range(offset, length);
        self.data.lock().expect("data")[range].fill(0);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, length: u64, _: ZeroRequest) -> Result<(), ZeroError> {
        self.writable();
        let range = self.range(offset, length);
        self.data.lock().expect("data")[range].fill(0);
        Ok(())
    }
    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.range(offset, length);
        Ok(())
    }
    fn extents(
        &self,
        offset: u64,
        length: u64,
        max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        self.pattern(offset, length, max_extents, out, STATE_HOLE | STATE_ZERO);
        Ok(())
    }
    fn meta_contexts(&self) -> Vec<String> {
        if self.read_only {
            Vec::new()
        } else {
            vec![DIRTY_CONTEXT.to_string()]
        }
    }
    fn context_extents(
        &self,
        context: &str,
        offset: u64,
        length: u64,
        max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        assert_eq!(
            context, DIRTY_CONTEXT,
            "an unknown context reached the backend"
        );
        self.pattern(offset, length, max_extents, out, STATE_DIRTY);
        Ok(())
    }
}

impl Memory {
    /// Extents that alternate every `EXTENT_PATTERN_BYTES` between no
    /// flags and `flags`, from `offset` for `length` bytes.
    fn pattern(&self, offset: u64, length: u64, max: usize, out: &mut Vec<Extent>, flags: u32) {
        let range = self.range(offset, length);
        let mut position = range.start as u64;
        while position < range.end as u64 && out.len() < max {
            let piece = position / EXTENT_PATTERN_BYTES;
            let end = ((piece + 1) * EXTENT_PATTERN_BYTES).min(range.end as u64);
            out.push(Extent {
                length_bytes: end - position,
                flags: if piece % 2 == 1 { flags } else { 0 },
            });
            position = end;
        }
    }
}

fn exports() -> &'static Exports {
    static EXPORTS: OnceLock<Exports> = OnceLock::new();
    EXPORTS.get_or_init(|| {
        Exports::new(vec![
            Export {
                name: "disk".into(),
                description: "a fuzzed disk".into(),
                backend: Arc::new(Memory::new(false)),
            },
            Export {
                name: "ro".into(),
                description: String::new(),
                backend: Arc::new(Memory::new(true)),
            },
        ])
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a tokio runtime")
    })
}

// ---- handshake -----------------------------------------------------------

/// `nbd_handshake`: byte 0 picks the TLS mode (modulo 3: off, on,
/// require); the rest is everything the client sends. After an
/// acknowledged STARTTLS the rest goes on as the plaintext inside TLS, as
/// `server.rs` hands it over. Panics on a wrong answer.
pub fn handshake(data: &[u8]) {
    let Some((&mode, mut client)) = data.split_first() else {
        return;
    };
    let tls = match mode % 3 {
        0 => TlsMode::Off,
        1 => TlsMode::On,
        _ => TlsMode::Require,
    };
    let mut server = Vec::new();
    let outcome = runtime().block_on(negotiate(&mut client, &mut server, tls));
    let ended_with_export_name = check_option_replies(&server);
    match outcome {
        Ok(Some(session)) => check_session(&session),
        Ok(None) | Err(_) => assert!(
            !ended_with_export_name,
            "an EXPORT_NAME reply without transmission"
        ),
    }
}

/// `greet` and `haggle` as `server.rs` runs them, with TLS taken as up
/// as soon as STARTTLS is acknowledged.
async fn negotiate(
    client: &mut &[u8],
    server: &mut Vec<u8>,
    tls: TlsMode,
) -> Result<Option<Session>, HandshakeError> {
    let mut input = InBuf::default();
    let Some(mut state) = greet(client, server, &mut input).await? else {
        return Ok(None);
    };
    let mut started_tls = false;
    loop {
        match haggle(client, server, &mut input, exports(), tls, &mut state).await? {
            Haggled::Left => return Ok(None),
            Haggled::StartTls => {
                assert!(tls != TlsMode::Off, "STARTTLS acknowledged with TLS off");
                assert!(!started_tls, "STARTTLS acknowledged twice");
                assert!(state.is_tls());
                started_tls = true;
            }
            Haggled::Transmit(session) => {
                if tls == TlsMode::Require {
                    assert!(started_tls, "transmission without TLS, which is required");
                }
                return Ok(Some(session));
            }
        }
    }
}

fn check_session(session: &Session) {
    let export = &session.export;
    assert!(exports().find(&export.name).is_some());
    let flags = session.transmission_flags;
    assert!(flags & TFLAG_HAS_FLAGS != 0);
    assert_eq!(flags & TFLAG_READ_ONLY != 0, export.backend.is_read_only());
    let available = export.meta_contexts();
    for (index, (id, name)) in session.contexts.iter().enumerate() {
        assert_eq!(*id, index as u32 + 1, "context ids are 1, 2, ...");
        assert!(available.contains(name), "a context the export lacks");
        assert!(
            session.mode != ReplyMode::Simple,
            "contexts without structured replies"
        );
    }
}

/// Walks the server's bytes: the greeting, then option replies, each
/// framed (magic, option, type, length, data), then possibly the 10 or
/// 134 bytes that answer EXPORT_NAME. Returns whether they end so.
fn check_option_replies(server: &[u8]) -> bool {
    assert!(server.len() >= 18, "no greeting");
    assert_eq!(be64(&server[0..8]), NBDMAGIC);
    assert_eq!(be64(&server[8..16]), IHAVEOPT);
    let mut rest = &server[18..];
    while rest.len() >= OPTION_REPLY_HEADER_LEN {
        let header: &[u8; OPTION_REPLY_HEADER_LEN] = rest[..OPTION_REPLY_HEADER_LEN]
            .try_into()
            .expect("20 bytes");
        let Ok(reply) = OptionReplyHeader::decode(header) else {
            break;
        };
        let length = reply.length as usize;
        assert!(
            rest.len() >= OPTION_REPLY_HEADER_LEN + length,
            "an option reply longer than what was sent"
        );
        assert!(
            length <= OPTION_LEN_MAX as usize,
            "an option reply of {length} bytes"
        );
        rest = &rest[OPTION_REPLY_HEADER_LEN + length..];
    }
    match rest.len() {
        0 => false,
        10 | 134 => true,
        other => panic!("{other} bytes after the option replies"),
    }
}

// ---- transmission --------------------------------------------------------

/// `nbd_transmission`: byte 0, bits 0-1 the reply mode (0 simple, 1
/// structured, 2-3 extended headers), bit 2 the read-only export, bit 3
/// select `base:allocation` and the dirty-bitmap context (with
/// structured replies or extended headers). A real handshake makes the
/// session; the rest of the input (at most `TRANSMISSION_INPUT_MAX`
/// bytes) is the requests, sent whole on a socket pair before the client
/// side shuts its writing half, with each request's cookie replaced by
/// its number (cookies are opaque to the server; unique ones let the
/// replies be matched). Panics on a wrong answer.
pub fn transmission(data: &[u8]) {
    let Some((&mode, requests)) = data.split_first() else {
        return;
    };
    let extended = mode & 3 >= 2;
    let reply_mode = match mode & 3 {
        0 => ReplyMode::Simple,
        1 => ReplyMode::Structured,
        _ => ReplyMode::Extended,
    };
    let contexts = mode & 8 != 0 && reply_mode != ReplyMode::Simple;
    let session = session(reply_mode, mode & 4 != 0, contexts);
    let mut requests = requests[..requests.len().min(TRANSMISSION_INPUT_MAX)].to_vec();
    let sent = number_requests(&mut requests, extended);
    let (server, client) = socket_pair();
    send_all(&client, &requests);
    // SAFETY: shutdown on a socket we own; no pointers.
    unsafe { libc::shutdown(client.as_raw_fd(), libc::SHUT_WR) };
    let reader = std::thread::spawn(move || receive_all(&client));
    let socket = Socket::new(server).expect("a blocking socket");
    let stop = Arc::new(Stop::new().expect("an eventfd"));
    let result = transmit(
        socket,
        InBuf::default(),
        session,
        &Limits::default(),
        stop,
        runtime().handle().clone(),
    );
    let replies = reader.join().expect("the reader thread");
    // An error (a bad magic, a payload too large, input that ends inside
    // a payload the server reads on its own) ends the connection without
    // the replies it had not sent yet.
    check_replies(&replies, reply_mode, &sent, result.is_ok());
}

/// A session as the handshake makes it for `mode`, on the writable export
/// ("disk") or the read-only one ("ro").
fn session(mode: ReplyMode, read_only: bool, contexts: bool) -> Session {
    let name = if read_only { "ro" } else { "disk" };
    let mut client = Vec::new();
    client.extend_from_slice(&CLIENT_FLAG_FIXED_NEWSTYLE.to_be_bytes());
    match mode {
        ReplyMode::Simple => {}
        ReplyMode::Structured => put_option_request(&mut client, OPT_STRUCTURED_REPLY, &[]),
        ReplyMode::Extended => put_option_request(&mut client, OPT_EXTENDED_HEADERS, &[]),
    }
    if contexts {
        let mut query = string_field(name);
        let names = [BASE_ALLOCATION, DIRTY_CONTEXT];
        query.extend_from_slice(&(names.len() as u32).to_be_bytes());
        for context in names {
            query.extend_from_slice(&string_field(context));
        }
        put_option_request(&mut client, OPT_SET_META_CONTEXT, &query);
    }
    let mut go = string_field(name);
    go.extend_from_slice(&0u16.to_be_bytes());
    put_option_request(&mut client, OPT_GO, &go);
    let mut server = Vec::new();
    let session = runtime()
        .block_on(negotiate(&mut client.as_slice(), &mut server, TlsMode::Off))
        .expect("the handshake")
        .expect("a session");
    assert_eq!(session.mode, mode);
    session
}

fn string_field(text: &str) -> Vec<u8> {
    let mut field = (text.len() as u32).to_be_bytes().to_vec();
    field.extend_from_slice(text.as_bytes());
    field
}

/// A request as sent: its command and, for the replies' checks, its range.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub command: u16,
    pub flags: u16,
    pub offset: u64,
    pub length: u64,
    /// Its payload is all there and within `PAYLOAD_MAX`. The last request
    /// may be cut short or carry more than the server reads: the server may
    /// refuse it (an error reply, then the connection ends while it
    /// discards the payload) or end the connection without a reply.
    pub whole: bool,
}

/// Frames `requests` as the server will and gives request `i` cookie
/// `i + 1`. Stops where the server would end the connection (a bad magic,
/// a payload over `PAYLOAD_MAX`), at DISC, or where the bytes run out; a
/// request whose payload is too large or cut short is the last, not whole.
fn number_requests(requests: &mut [u8], extended: bool) -> Vec<Sent> {
    let header_len = if extended {
        EXTENDED_REQUEST_LEN
    } else {
        COMPACT_REQUEST_LEN
    };
    let mut sent = Vec::new();
    let mut at = 0;
    while at + header_len <= requests.len() {
        let bytes = &requests[at..at + header_len];
        let decoded = if extended {
            RequestHeader::decode_extended(bytes.try_into().expect("32 bytes"))
        } else {
            RequestHeader::decode_compact(bytes.try_into().expect("28 bytes"))
        };
        let Ok(header) = decoded else {
            break;
        };
        let mut encoded = Vec::new();
        header.encode(extended, &mut encoded);
        assert_eq!(encoded, bytes, "a request header has one encoding");
        let cookie = sent.len() as u64 + 1;
        requests[at + 8..at + 16].copy_from_slice(&cookie.to_be_bytes());
        if header.command == CMD_DISC {
            break;
        }
        let has_payload =
            header.command == CMD_WRITE || (extended && header.flags & CMD_FLAG_PAYLOAD_LEN != 0);
        let payload = if has_payload { header.length } else { 0 };
        let end = ((at + header_len) as u64).saturating_add(payload);
        let whole = payload <= u64::from(PAYLOAD_MAX) && end <= requests.len() as u64;
        sent.push(Sent {
            command: header.command,
            flags: header.flags,
            offset: header.offset,
            length: header.length,
            whole,
        });
        if !whole {
            break;
        }
        at = end as usize;
    }
    sent
}

fn socket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array we pass.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair: {}", io::Error::last_os_error());
    // SAFETY: both fds were just made and nothing else owns them.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn send_all(fd: &OwnedFd, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: writes from a live slice to a socket we own.
        let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        assert!(n > 0, "write: {}", io::Error::last_os_error());
        bytes = &bytes[n as usize..];
    }
}

fn receive_all(fd: &OwnedFd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        // SAFETY: reads into a live buffer from a socket we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        assert!(n >= 0, "read: {}", io::Error::last_os_error());
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
}

/// Parses every reply and checks it against its request: framing, one
/// final reply per request (each one answered when the connection ended
/// cleanly), reads that cover their range, errors that say why.
fn check_replies(mut replies: &[u8], mode: ReplyMode, sent: &[Sent], clean_end: bool) {
    let mut done = vec![false; sent.len()];
    let mut read_bytes = vec![0u64; sent.len()];
    while !replies.is_empty() {
        let reply = next_reply(&mut replies, mode, sent);
        let index = reply.cookie.checked_sub(1).expect("cookie 0") as usize;
        let request = sent.get(index).expect("a reply to no request");
        assert!(
            !done[index],
            "a reply after the final one, cookie {}",
            reply.cookie
        );
        read_bytes[index] += reply.read_bytes;
        if let Some((offset, length)) = reply.read_range {
            assert!(
                offset >= request.offset && offset + length <= request.offset + request.length,
                "read data outside the request"
            );
        }
        assert!(
            request.whole || reply.error != 0,
            "a request cut short or over PAYLOAD_MAX was not refused: {request:?}"
        );
        if reply.done {
            done[index] = true;
            if request.command == CMD_READ && reply.error == 0 {
                assert_eq!(read_bytes[index], request.length, "a read's bytes");
            }
        }
    }
    if clean_end {
        let unanswered = (0..sent.len()).find(|&i| sent[i].whole && !done[i]);
        if let Some(unanswered) = unanswered {
            panic!(
                "request {unanswered} ({:?}) got no final reply",
                sent[unanswered]
            );
        }
    }
}

struct Reply {
    cookie: u64,
    done: bool,
    error: u32,
    /// Bytes of the request's range this reply covers (data or hole).
    read_bytes: u64,
    read_range: Option<(u64, u64)>,
}

fn take<'a>(replies: &mut &'a [u8], n: usize) -> &'a [u8] {
    assert!(replies.len() >= n, "a reply cut short");
    let (head, rest) = replies.split_at(n);
    *replies = rest;
    head
}

fn next_reply(replies: &mut &[u8], mode: ReplyMode, sent: &[Sent]) -> Reply {
    let magic = be32(replies.get(..4).expect("a reply cut short"));
    if magic == SIMPLE_REPLY_MAGIC {
        return simple_reply(replies, mode, sent);
    }
    let chunk = match mode {
        ReplyMode::Structured => ChunkHeader::decode_structured(
            take(replies, STRUCTURED_CHUNK_HEADER_LEN)
                .try_into()
                .expect("20"),
        ),
        ReplyMode::Extended => ChunkHeader::decode_extended(
            take(replies, EXTENDED_CHUNK_HEADER_LEN)
                .try_into()
                .expect("32"),
        ),
        ReplyMode::Simple => panic!("a reply of magic {magic:#x} without structured replies"),
    }
    .expect("a chunk header");
    let payload = take(
        replies,
        usize::try_from(chunk.length).expect("a chunk length"),
    );
    let request = *sent
        .get(chunk.cookie.wrapping_sub(1) as usize)
        .expect("a chunk for no request");
    if mode == ReplyMode::Extended {
        assert_eq!(
            chunk.offset, request.offset,
            "extended chunks echo the offset"
        );
    }
    let mut reply = Reply {
        cookie: chunk.cookie,
        done: chunk.is_done(),
        error: 0,
        read_bytes: 0,
        read_range: None,
    };
    check_chunk(&chunk, payload, request, &mut reply);
    reply
}

/// A simple reply (16 bytes), and a READ's data after it in simple mode.
fn simple_reply(replies: &mut &[u8], mode: ReplyMode, sent: &[Sent]) -> Reply {
    assert!(
        mode != ReplyMode::Extended,
        "a simple reply under extended headers"
    );
    let bytes = take(replies, SIMPLE_REPLY_LEN);
    let reply = SimpleReply::decode(bytes.try_into().expect("16")).expect("simple");
    let request = sent.get(reply.cookie.wrapping_sub(1) as usize);
    let mut read_bytes = 0;
    if let Some(request) = request
        && request.command == CMD_READ
        && reply.error == 0
    {
        assert!(mode == ReplyMode::Simple, "a simple reply with data");
        take(replies, request.length as usize);
        read_bytes = request.length;
    }
    if reply.error != 0 {
        assert_known_error(reply.error);
    }
    Reply {
        cookie: reply.cookie,
        done: true,
        error: reply.error,
        read_bytes,
        read_range: None,
    }
}

/// A chunk's payload, as its type says it is, for the request it answers.
fn check_chunk(chunk: &ChunkHeader, payload: &[u8], request: Sent, reply: &mut Reply) {
    match chunk.chunk_type {
        REPLY_TYPE_NONE => assert!(payload.is_empty() && chunk.is_done()),
        REPLY_TYPE_OFFSET_DATA => {
            assert_eq!(request.command, CMD_READ);
            let offset = be64(&payload[..8]);
            let length = payload.len() as u64 - 8;
            reply.read_bytes = length;
            reply.read_range = Some((offset, length));
        }
        REPLY_TYPE_OFFSET_HOLE => {
            assert_eq!(request.command, CMD_READ);
            assert!(
                request.flags & CMD_FLAG_DF == 0,
                "a hole chunk for a DF read"
            );
            assert_eq!(payload.len(), 12);
            let length = u64::from(be32(&payload[8..12]));
            reply.read_bytes = length;
            reply.read_range = Some((be64(&payload[..8]), length));
        }
        REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT => {
            assert_eq!(request.command, CMD_BLOCK_STATUS);
            check_block_status(payload, chunk.chunk_type, request);
        }
        REPLY_TYPE_ERROR => {
            assert!(payload.len() >= 6);
            reply.error = be32(&payload[..4]);
            assert_known_error(reply.error);
            let message = usize::from(be16(&payload[4..6]));
            assert_eq!(
                payload.len(),
                6 + message,
                "an error chunk's message length"
            );
        }
        other => panic!("a chunk of type {other}"),
    }
}

fn assert_known_error(error: u32) {
    assert_eq!(
        NbdError::from_wire(error).map(|known| known as u32),
        Some(error),
        "an error value the spec does not define"
    );
}

fn check_block_status(payload: &[u8], chunk_type: u16, request: Sent) {
    let id = be32(&payload[..4]);
    assert!(id == 1 || id == 2, "block status for context {id}");
    let (descriptors, each) = if chunk_type == REPLY_TYPE_BLOCK_STATUS_EXT {
        let count = be32(&payload[4..8]) as usize;
        assert_eq!(payload.len(), 8 + 16 * count);
        (&payload[8..], 16)
    } else {
        assert_eq!((payload.len() - 4) % 8, 0);
        (&payload[4..], 8)
    };
    assert!(!descriptors.is_empty(), "block status without extents");
    if request.flags & CMD_FLAG_REQ_ONE != 0 {
        assert_eq!(
            descriptors.len(),
            each,
            "REQ_ONE answered with more than one"
        );
    }
    let mut total = 0u64;
    for descriptor in descriptors.chunks(each) {
        let length = if each == 16 {
            be64(&descriptor[..8])
        } else {
            u64::from(be32(&descriptor[..4]))
        };
        assert!(length > 0, "an empty extent");
        total += length;
    }
    // Only the last extent may run past the request.
    let last = if each == 16 {
        be64(&descriptors[descriptors.len() - 16..])
    } else {
        u64::from(be32(&descriptors[descriptors.len() - 8..]))
    };
    assert!(total - last < request.length, "extents past the request");
}
