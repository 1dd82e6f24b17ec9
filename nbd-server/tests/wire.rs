//! Byte-level protocol tests: a raw client speaks to an in-process server
//! over a unix socket and checks frames the real clients never send
//! (malformed options, bad magic, oversized payloads) as well as the
//! framing of extended headers, holes and errors.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backend::{BlockBackend, FileBackend};
use nbd_server::proto::*;
use nbd_server::{Export, Exports, Limits, Server, TlsPolicy};
use testkit::{TempDir, create_sparse_file};

struct TestServer {
    socket: PathBuf,
    image: PathBuf,
    server: Arc<Server>,
    runtime: Option<tokio::runtime::Runtime>,
    /// Last, so it is removed after the server has stopped.
    _dir: TempDir,
}

/// How a test server differs from the default one.
struct Setup {
    limits: Limits,
    /// Every READ goes to the blocking pool (as on a disk whose data is not
    /// in the page cache).
    uncached: bool,
    /// Threads of tokio's blocking pool.
    pool_threads: usize,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            limits: Limits::default(),
            uncached: false,
            pool_threads: 512,
        }
    }
}

/// A file whose data never counts as cached.
#[derive(Debug)]
struct Uncached(FileBackend);

impl BlockBackend for Uncached {
    fn next(&self) -> Option<&dyn BlockBackend> {
        Some(&self.0)
    }

    fn read_at_nowait(&self, _buf: &mut [u8], _offset: u64) -> std::io::Result<bool> {
        Ok(false)
    }
}

impl TestServer {
    fn start(size_bytes: u64, read_only: bool) -> TestServer {
        TestServer::with(size_bytes, read_only, Setup::default())
    }

    fn with(size_bytes: u64, read_only: bool, setup: Setup) -> TestServer {
        let dir = TempDir::new("nbd-wire");
        let image = dir.join("disk.img");
        create_sparse_file(&image, size_bytes);
        let socket = dir.join("nbd.sock");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(setup.pool_threads)
            .enable_all()
            .build()
            .unwrap();
        let file = FileBackend::open(&image, read_only).unwrap();
        let backend: Arc<dyn BlockBackend> = if setup.uncached {
            Arc::new(Uncached(file))
        } else {
            Arc::new(file)
        };
        let exports = Exports::new(vec![Export {
            name: "disk".to_string(),
            description: "test disk".to_string(),
            backend,
        }]);
        let server = Server::with_limits(exports, TlsPolicy::off(), setup.limits).unwrap();
        let listener = {
            let _guard = runtime.enter();
            tokio::net::UnixListener::bind(&socket).unwrap()
        };
        runtime.spawn(Arc::clone(&server).serve_unix(listener));
        TestServer {
            socket,
            image,
            server,
            runtime: Some(runtime),
            _dir: dir,
        }
    }

    fn connect(&self) -> Client {
        let stream = UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut client = Client { stream };
        let greeting = client.read_exact(18);
        assert_eq!(be64(&greeting[0..8]), NBDMAGIC);
        assert_eq!(be64(&greeting[8..16]), IHAVEOPT);
        assert_eq!(
            be16(&greeting[16..18]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        client
    }

    /// A client in transmission with the given reply mode, export "disk",
    /// and base:allocation selected when structured.
    fn transmission(&self, mode: ReplyMode) -> Client {
        let mut client = self.connect();
        client.send_u32(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
        match mode {
            ReplyMode::Simple => {}
            ReplyMode::Structured => assert_ack(client.option(OPT_STRUCTURED_REPLY, &[])),
            ReplyMode::Extended => assert_ack(client.option(OPT_EXTENDED_HEADERS, &[])),
        }
        if mode != ReplyMode::Simple {
            let replies = client.option(
                OPT_SET_META_CONTEXT,
                &meta_data("disk", &["base:allocation"]),
            );
            assert_eq!(replies.len(), 2);
            assert_eq!(replies[0].0, REP_META_CONTEXT);
        }
        let replies = client.option(OPT_GO, &info_data("disk", &[]));
        assert_eq!(replies.last().unwrap().0, REP_ACK);
        client
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.server.shutdown();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

struct Client {
    stream: UnixStream,
}

#[derive(Debug)]
struct Chunk {
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    offset: u64,
    payload: Vec<u8>,
}

impl Client {
    fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        self.stream.read_exact(&mut buf).unwrap();
        buf
    }

    fn send_u32(&mut self, value: u32) {
        self.stream.write_all(&value.to_be_bytes()).unwrap();
    }

    fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut frame = IHAVEOPT.to_be_bytes().to_vec();
        frame.extend_from_slice(&option.to_be_bytes());
        frame.extend_from_slice(&(data.len() as u32).to_be_bytes());
        frame.extend_from_slice(data);
        self.stream.write_all(&frame).unwrap();
    }

    fn read_option_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        let header = self.read_exact(20);
        assert_eq!(be64(&header[0..8]), OPTION_REPLY_MAGIC);
        assert_eq!(be32(&header[8..12]), option);
        let reply_type = be32(&header[12..16]);
        let length = be32(&header[16..20]) as usize;
        (reply_type, self.read_exact(length))
    }

    /// Sends an option and reads replies up to the final ACK or error.
    fn option(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.send_option(option, data);
        let mut replies = Vec::new();
        loop {
            let reply = self.read_option_reply(option);
            let done = reply.0 == REP_ACK || reply.0 & (1 << 31) != 0;
            replies.push(reply);
            if done {
                return replies;
            }
        }
    }

    fn request(
        &mut self,
        extended: bool,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u64,
    ) {
        let mut frame = Vec::new();
        RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode(extended, &mut frame);
        self.stream.write_all(&frame).unwrap();
    }

    fn write(&mut self, extended: bool, cookie: u64, offset: u64, data: &[u8]) {
        self.request(extended, CMD_WRITE, 0, cookie, offset, data.len() as u64);
        self.stream.write_all(data).unwrap();
    }

    /// Reads a simple reply: (error, cookie).
    fn simple_reply(&mut self) -> (u32, u64) {
        let header = self.read_exact(16);
        assert_eq!(be32(&header[0..4]), SIMPLE_REPLY_MAGIC);
        (be32(&header[4..8]), be64(&header[8..16]))
    }

    /// Reads one structured or extended chunk, or a simple reply (reported
    /// as a chunk of type NONE with DONE and the error in its payload).
    fn chunk(&mut self) -> Chunk {
        let magic = be32(&self.read_exact(4));
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let rest = self.read_exact(12);
                Chunk {
                    flags: REPLY_FLAG_DONE,
                    chunk_type: REPLY_TYPE_NONE,
                    cookie: be64(&rest[4..12]),
                    offset: 0,
                    payload: rest[0..4].to_vec(),
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let rest = self.read_exact(16);
                let length = be32(&rest[12..16]) as usize;
                Chunk {
                    flags: be16(&rest[0..2]),
                    chunk_type: be16(&rest[2..4]),
                    cookie: be64(&rest[4..12]),
                    offset: 0,
                    payload: self.read_exact(length),
                }
            }
            EXTENDED_REPLY_MAGIC => {
                let rest = self.read_exact(28);
                let length = be64(&rest[20..28]) as usize;
                Chunk {
                    flags: be16(&rest[0..2]),
                    chunk_type: be16(&rest[2..4]),
                    cookie: be64(&rest[4..12]),
                    offset: be64(&rest[12..20]),
                    payload: self.read_exact(length),
                }
            }
            other => panic!("unexpected reply magic {other:#x}"),
        }
    }

    /// Reads chunks until DONE; returns them all.
    fn reply(&mut self) -> Vec<Chunk> {
        let mut chunks = Vec::new();
        loop {
            let chunk = self.chunk();
            let done = chunk.flags & REPLY_FLAG_DONE != 0;
            chunks.push(chunk);
            if done {
                return chunks;
            }
        }
    }

    /// True when the server has closed the connection.
    fn is_closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte), Ok(0) | Err(_))
    }

    /// True when the server closed the connection before the read timed out.
    fn closed_by_server(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(error) => !matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}

fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for request in requests {
        data.extend_from_slice(&request.to_be_bytes());
    }
    data
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        data.extend_from_slice(&(query.len() as u32).to_be_bytes());
        data.extend_from_slice(query.as_bytes());
    }
    data
}

fn assert_ack(replies: Vec<(u32, Vec<u8>)>) {
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0].0, REP_ACK);
}

/// The error code of an ERROR chunk, or of a simple reply.
fn error_of(chunk: &Chunk) -> u32 {
    be32(&chunk.payload[0..4])
}

#[test]
fn export_name_honours_no_zeroes() {
    let server = TestServer::start(1 << 20, false);
    for (client_flags, reply_len) in [
        (CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES, 10),
        (CLIENT_FLAG_FIXED_NEWSTYLE, 134),
    ] {
        let mut client = server.connect();
        client.send_u32(client_flags);
        client.send_option(OPT_EXPORT_NAME, b"disk");
        let reply = client.read_exact(reply_len);
        assert_eq!(be64(&reply[0..8]), 1 << 20);
        let flags = be16(&reply[8..10]);
        assert_ne!(flags & TFLAG_HAS_FLAGS, 0);
        assert_ne!(flags & TFLAG_CAN_MULTI_CONN, 0);
        assert!(reply[10..].iter().all(|&b| b == 0));
        client.request(false, CMD_FLUSH, 0, 1, 0, 0);
        assert_eq!(client.simple_reply(), (0, 1));
    }
}

#[test]
fn unknown_client_flags_end_the_connection() {
    let server = TestServer::start(1 << 20, false);
    let mut client = server.connect();
    client.send_u32(1 << 7 | CLIENT_FLAG_FIXED_NEWSTYLE);
    assert!(client.is_closed());
}

#[test]
fn unknown_options_are_unsupported_and_the_handshake_goes_on() {
    let server = TestServer::start(1 << 20, false);
    let mut client = server.connect();
    client.send_u32(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
    let replies = client.option(99, b"whatever");
    assert_eq!(replies[0].0, REP_ERR_UNSUP);
    let replies = client.option(OPT_STARTTLS, &[]);
    assert_eq!(replies[0].0, REP_ERR_POLICY);
    let replies = client.option(OPT_GO, &info_data("nope", &[]));
    assert_eq!(replies[0].0, REP_ERR_UNKNOWN);
    let mut bad = info_data("disk", &[INFO_NAME]);
    bad.push(0);
    assert_eq!(client.option(OPT_INFO, &bad)[0].0, REP_ERR_INVALID);
    assert_eq!(client.option(OPT_LIST, b"x")[0].0, REP_ERR_INVALID);
    // Meta contexts need structured replies first.
    let replies = client.option(OPT_LIST_META_CONTEXT, &meta_data("disk", &[]));
    assert_eq!(replies[0].0, REP_ERR_INVALID);
    let replies = client.option(
        OPT_INFO,
        &info_data("", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
    );
    let infos: Vec<&Vec<u8>> = replies
        .iter()
        .filter(|r| r.0 == REP_INFO)
        .map(|r| &r.1)
        .collect();
    assert!(
        infos
            .iter()
            .any(|i| be16(i) == INFO_NAME && &i[2..] == b"disk")
    );
    assert!(
        infos
            .iter()
            .any(|i| be16(i) == INFO_DESCRIPTION && &i[2..] == b"test disk")
    );
    let block_size = infos.iter().find(|i| be16(i) == INFO_BLOCK_SIZE).unwrap();
    assert_eq!(
        (
            be32(&block_size[2..]),
            be32(&block_size[6..]),
            be32(&block_size[10..])
        ),
        (1, 4096, 32 << 20)
    );
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    let replies = client.option(OPT_LIST, &[]);
    assert_eq!(replies[0].0, REP_SERVER);
    assert_eq!(&replies[0].1[4..], b"disk");
    assert_eq!(client.option(OPT_ABORT, &[])[0].0, REP_ACK);
    assert!(client.is_closed());
}

#[test]
fn oversized_option_is_refused_and_the_server_lives_on() {
    let server = TestServer::start(1 << 20, false);
    let mut client = server.connect();
    client.send_u32(CLIENT_FLAG_FIXED_NEWSTYLE);
    let mut frame = IHAVEOPT.to_be_bytes().to_vec();
    frame.extend_from_slice(&OPT_GO.to_be_bytes());
    frame.extend_from_slice(&u32::MAX.to_be_bytes());
    client.stream.write_all(&frame).unwrap();
    assert_eq!(client.read_option_reply(OPT_GO).0, REP_ERR_TOO_BIG);
    assert!(client.is_closed());
    let mut next = server.transmission(ReplyMode::Simple);
    next.request(false, CMD_FLUSH, 0, 5, 0, 0);
    assert_eq!(next.simple_reply(), (0, 5));
}

#[test]
fn meta_context_wildcards_list_and_set_selects_exact_names() {
    let server = TestServer::start(1 << 20, false);
    let mut client = server.connect();
    client.send_u32(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
    assert_ack(client.option(OPT_STRUCTURED_REPLY, &[]));
    for queries in [&[][..], &["base:"][..], &["base:allocation", "other:x"][..]] {
        let replies = client.option(OPT_LIST_META_CONTEXT, &meta_data("disk", queries));
        assert_eq!(replies.len(), 2, "{queries:?}");
        assert_eq!(replies[0].0, REP_META_CONTEXT);
        assert_eq!(&replies[0].1[4..], b"base:allocation");
    }
    // SET ignores the wildcard: nothing is selected.
    let replies = client.option(OPT_SET_META_CONTEXT, &meta_data("disk", &["base:"]));
    assert_ack(replies);
    // A truncated query is invalid.
    let mut bad = meta_data("disk", &["base:allocation"]);
    bad.truncate(bad.len() - 3);
    assert_eq!(
        client.option(OPT_SET_META_CONTEXT, &bad)[0].0,
        REP_ERR_INVALID
    );
}

#[test]
fn structured_read_of_a_sparse_range_sends_holes_unless_df() {
    let server = TestServer::start(8 << 20, false);
    let mut client = server.transmission(ReplyMode::Structured);
    client.write(false, 1, 1 << 20, &[0x5a; 4096]);
    assert_eq!(error_of(&client.chunk()), 0);
    client.request(false, CMD_READ, 0, 2, 0, 2 << 20);
    let chunks = client.reply();
    let kinds: Vec<u16> = chunks.iter().map(|c| c.chunk_type).collect();
    assert_eq!(
        kinds,
        [
            REPLY_TYPE_OFFSET_HOLE,
            REPLY_TYPE_OFFSET_DATA,
            REPLY_TYPE_OFFSET_HOLE
        ]
    );
    assert_eq!(be64(&chunks[0].payload), 0);
    assert_eq!(be32(&chunks[0].payload[8..]), 1 << 20);
    assert_eq!(be64(&chunks[1].payload), 1 << 20);
    assert!(chunks[1].payload[8..].iter().all(|&b| b == 0x5a));
    // The filesystem allocates at least the written 4 KiB block.
    assert!(chunks[1].payload.len() - 8 >= 4096);
    client.request(false, CMD_READ, CMD_FLAG_DF, 3, 0, 2 << 20);
    let chunks = client.reply();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].chunk_type, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(chunks[0].payload.len(), 8 + (2 << 20));
    assert_eq!(chunks[0].payload[8 + (1 << 20)], 0x5a);
}

#[test]
fn errors_carry_the_spec_errno_and_the_connection_lives_on() {
    let server = TestServer::start(1 << 20, false);
    let mut client = server.transmission(ReplyMode::Structured);
    let cases: [(u16, u16, u64, u64, u32); 8] = [
        (CMD_READ, 0, 1 << 20, 512, NbdError::Inval as u32),
        (
            CMD_WRITE_ZEROES,
            0,
            (1 << 20) - 512,
            1024,
            NbdError::NoSpc as u32,
        ),
        (CMD_TRIM, 0, u64::MAX - 10, 100, NbdError::Inval as u32),
        (CMD_READ, 0, 0, 0, NbdError::Inval as u32),
        (CMD_READ, CMD_FLAG_REQ_ONE, 0, 512, NbdError::Inval as u32),
        (CMD_READ, 0, 0, (32 << 20) + 1, NbdError::Inval as u32),
        (42, 0, 0, 512, NbdError::Inval as u32),
        (CMD_FLUSH, 0, 4096, 0, NbdError::Inval as u32),
    ];
    for (index, (command, flags, offset, length, errno)) in cases.into_iter().enumerate() {
        let cookie = 100 + index as u64;
        client.request(false, command, flags, cookie, offset, length);
        let chunks = client.reply();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].cookie, cookie);
        assert_eq!(chunks[0].chunk_type, REPLY_TYPE_ERROR, "case {index}");
        assert_eq!(error_of(&chunks[0]), errno, "case {index}");
        let message_len = be16(&chunks[0].payload[4..6]) as usize;
        assert_eq!(chunks[0].payload.len(), 6 + message_len);
        assert!(message_len > 0);
    }
    // Writing past the end: ENOSPC, and the payload is consumed.
    client.write(false, 200, (1 << 20) - 100, &[1; 200]);
    assert_eq!(error_of(&client.reply()[0]), NbdError::NoSpc as u32);
    client.request(false, CMD_READ, 0, 201, 0, 4096);
    let chunks = client.reply();
    assert_eq!(chunks[0].chunk_type, REPLY_TYPE_OFFSET_DATA);
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let server = TestServer::start(1 << 20, true);
    let mut client = server.transmission(ReplyMode::Simple);
    client.write(false, 1, 0, &[1; 512]);
    assert_eq!(client.simple_reply(), (NbdError::Perm as u32, 1));
    client.request(false, CMD_WRITE_ZEROES, 0, 2, 0, 512);
    assert_eq!(client.simple_reply(), (NbdError::Perm as u32, 2));
    client.request(false, CMD_READ, 0, 3, 0, 512);
    assert_eq!(client.simple_reply(), (0, 3));
    assert_eq!(client.read_exact(512), vec![0; 512]);
}

#[test]
fn bad_magic_and_a_payload_too_large_to_read_end_only_that_connection() {
    let server = TestServer::start(1 << 20, false);
    let mut broken = server.transmission(ReplyMode::Simple);
    broken.stream.write_all(&[0xde; 28]).unwrap();
    assert!(broken.closed_by_server());
    // Extended headers let a length pass 32 bits: not worth reading.
    let mut greedy = server.transmission(ReplyMode::Extended);
    greedy.request(true, CMD_WRITE, 0, 1, 0, 1 << 33);
    assert!(greedy.closed_by_server());
    let mut fine = server.transmission(ReplyMode::Simple);
    fine.write(false, 9, 0, b"still here");
    assert_eq!(fine.simple_reply(), (0, 9));
}

#[test]
fn refused_and_oversized_writes_are_answered_after_their_payload_and_the_connection_lives() {
    let server = TestServer::start(1 << 20, false);
    let mut client = server.transmission(ReplyMode::Simple);
    // Past the end of a 1 MiB export: ENOSPC, after 32 MiB + 1 of payload.
    client.write(false, 1, 0, &vec![7; (32 << 20) + 1]);
    assert_eq!(client.simple_reply(), (NbdError::NoSpc as u32, 1));
    // Over the 64 MiB maximum: EINVAL, its payload read and dropped.
    client.write(false, 2, 0, &vec![7; (64 << 20) + 4096]);
    assert_eq!(client.simple_reply(), (NbdError::Inval as u32, 2));
    client.write(false, 3, 4096, b"after the discarded payloads");
    assert_eq!(client.simple_reply(), (0, 3));
    client.request(false, CMD_READ, 0, 4, 4096, 28);
    assert_eq!(client.simple_reply(), (0, 4));
    assert_eq!(client.read_exact(28), b"after the discarded payloads");
    // Nothing of the refused payloads reached the disk.
    let image = std::fs::read(&server.image).unwrap();
    assert!(image[..4096].iter().all(|&byte| byte == 0));
}

#[test]
fn requests_of_64_mib_are_served_to_a_client_that_never_asked_for_block_sizes() {
    let server = TestServer::start(128 << 20, false);
    let data: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut simple = server.transmission(ReplyMode::Simple);
    simple.write(false, 1, 1 << 20, &data);
    assert_eq!(simple.simple_reply(), (0, 1));
    simple.request(false, CMD_READ, 0, 2, 1 << 20, 64 << 20);
    assert_eq!(simple.simple_reply(), (0, 2));
    assert!(simple.read_exact(64 << 20) == data);
    simple.request(false, CMD_READ, 0, 3, 0, (64 << 20) + 1);
    assert_eq!(simple.simple_reply(), (NbdError::Inval as u32, 3));
    // Structured: no chunk over the advertised 32 MiB; EOVERFLOW past 64.
    let mut structured = server.transmission(ReplyMode::Structured);
    structured.request(false, CMD_READ, CMD_FLAG_DF, 4, 1 << 20, 64 << 20);
    let chunks = structured.reply();
    let mut read = Vec::new();
    for chunk in &chunks {
        assert_eq!(chunk.chunk_type, REPLY_TYPE_OFFSET_DATA);
        assert!(
            chunk.payload.len() <= (32 << 20) + 8,
            "{}",
            chunk.payload.len()
        );
        assert_eq!(be64(&chunk.payload[..8]), (1 << 20) + read.len() as u64);
        read.extend_from_slice(&chunk.payload[8..]);
    }
    assert!(chunks.len() == 2 && read == data);
    structured.request(false, CMD_READ, 0, 5, 0, (64 << 20) + 1);
    let refused = structured.reply();
    assert_eq!(refused[0].chunk_type, REPLY_TYPE_ERROR);
    assert_eq!(error_of(&refused[0]), NbdError::Overflow as u32);
    structured.write(false, 6, 0, b"lives");
    assert_eq!(error_of(&structured.reply()[0]), 0);
}

#[test]
fn connections_past_the_limit_are_closed_at_once_and_their_slots_come_back() {
    let limits = Limits {
        connections_max: 3,
        ..Limits::default()
    };
    let server = TestServer::with(
        1 << 20,
        false,
        Setup {
            limits,
            ..Setup::default()
        },
    );
    let mut held: Vec<Client> = (0..3).map(|_| server.connect()).collect();
    let mut over = UnixStream::connect(&server.socket).unwrap();
    over.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(
        over.read(&mut byte).unwrap(),
        0,
        "no greeting past the limit"
    );
    assert_eq!(server.server.connections(), 3);
    held.pop();
    // The slot is given back when the server sees the close.
    let mut fine = loop {
        let stream = UnixStream::connect(&server.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut greeting = [0u8; 18];
        if (&stream).read_exact(&mut greeting).is_ok() {
            let mut client = Client { stream };
            client.send_u32(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
            break client;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let replies = fine.option(OPT_GO, &info_data("disk", &[]));
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    fine.write(false, 1, 0, b"in");
    assert_eq!(fine.simple_reply(), (0, 1));
}

#[test]
fn a_client_stalled_in_the_handshake_is_dropped_after_the_handshake_timeout() {
    let limits = Limits {
        handshake_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let server = TestServer::with(
        1 << 20,
        false,
        Setup {
            limits,
            ..Setup::default()
        },
    );
    let mut silent = server.connect();
    assert!(silent.closed_by_server());
    let mut halfway = server.connect();
    halfway.send_u32(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
    halfway.stream.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    assert!(halfway.closed_by_server());
    wait_for_connections(&server, 0);
}

/// A client that sends `count` 1 MiB READs (of a 16 MiB export) from a
/// thread of its own and never reads a reply; returned once the server
/// had 300 ms to take what it will.
fn stalled_reader(server: &TestServer, count: u64) -> (Client, std::thread::JoinHandle<()>) {
    let stalled = server.transmission(ReplyMode::Simple);
    let mut requests = Vec::new();
    for cookie in 0..count {
        RequestHeader {
            flags: 0,
            command: CMD_READ,
            cookie,
            offset: (cookie % 16) << 20,
            length: 1 << 20,
        }
        .encode(false, &mut requests);
    }
    let mut stream = stalled.stream.try_clone().unwrap();
    // Stops once the server stops reading (its in-flight bounds).
    let sender = std::thread::spawn(move || {
        let _ = stream.write_all(&requests);
    });
    std::thread::sleep(Duration::from_millis(300));
    (stalled, sender)
}

/// Waits until the server counts `count` connections (it sees a close a
/// little after the client does).
fn wait_for_connections(server: &TestServer, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while server.server.connections() != count && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.server.connections(), count);
}

/// A client that sends READs and never reads a reply must not hold the
/// blocking pool: with only 4 pool threads, another client's requests
/// (which all need the pool here) are still answered, and once the stalled
/// client goes away its connection ends.
#[test]
fn a_client_that_reads_no_replies_holds_one_pool_thread_not_the_pool() {
    let setup = Setup {
        uncached: true,
        pool_threads: 4,
        ..Setup::default()
    };
    let server = TestServer::with(16 << 20, false, setup);
    // 256 MiB of replies: far more than the socket buffers and the
    // 64 MiB in-flight bound.
    let (stalled, sender) = stalled_reader(&server, 256);
    let mut other = server.transmission(ReplyMode::Simple);
    for cookie in 0..32u64 {
        other.request(false, CMD_READ, 0, cookie, cookie << 12, 4096);
        assert_eq!(other.simple_reply(), (0, cookie));
        other.read_exact(4096);
        other.request(false, CMD_FLUSH, 0, cookie, 0, 0);
        assert_eq!(other.simple_reply(), (0, cookie));
    }
    stalled.stream.shutdown(std::net::Shutdown::Both).unwrap();
    drop(stalled);
    sender.join().unwrap();
    wait_for_connections(&server, 1);
}

#[test]
fn extended_headers_frame_every_reply_and_echo_the_offset() {
    let server = TestServer::start(16 << 20, false);
    let mut client = server.transmission(ReplyMode::Extended);
    client.request(true, CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 1, 4096, 4096);
    client.stream.write_all(&[0x77; 4096]).unwrap();
    let chunk = client.chunk();
    assert_eq!(
        (chunk.chunk_type, chunk.flags, chunk.cookie, chunk.offset),
        (REPLY_TYPE_NONE, REPLY_FLAG_DONE, 1, 4096)
    );
    client.request(true, CMD_READ, 0, 2, 4096, 4096);
    let chunks = client.reply();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].offset, 4096);
    assert_eq!(be64(&chunks[0].payload), 4096);
    assert!(chunks[0].payload[8..].iter().all(|&b| b == 0x77));
    // A 64-bit effect length past the end is refused, not truncated.
    client.request(true, CMD_WRITE_ZEROES, 0, 3, 0, 1 << 40);
    assert_eq!(error_of(&client.reply()[0]), NbdError::NoSpc as u32);
    // An unexpected payload is consumed before EINVAL.
    client.request(true, CMD_FLUSH, CMD_FLAG_PAYLOAD_LEN, 4, 0, 8);
    client.stream.write_all(&[0; 8]).unwrap();
    assert_eq!(error_of(&client.reply()[0]), NbdError::Inval as u32);
    client.request(true, CMD_BLOCK_STATUS, 0, 5, 0, 16 << 20);
    let chunks = client.reply();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].chunk_type, REPLY_TYPE_BLOCK_STATUS_EXT);
    let payload = &chunks[0].payload;
    let count = be32(&payload[4..8]) as usize;
    assert_eq!(payload.len(), 8 + 16 * count);
    assert_eq!(be32(&payload[0..4]), 1, "context id from SET_META_CONTEXT");
    let extents: Vec<(u64, u64)> = (0..count)
        .map(|i| (be64(&payload[8 + 16 * i..]), be64(&payload[16 + 16 * i..])))
        .collect();
    assert_eq!(extents[0], (4096, 3));
    assert_eq!(extents[1].1, 0);
    assert_eq!(extents.iter().map(|e| e.0).sum::<u64>(), 16 << 20);
}

#[test]
fn block_status_req_one_returns_one_clipped_extent() {
    let server = TestServer::start(16 << 20, false);
    let mut client = server.transmission(ReplyMode::Structured);
    client.request(false, CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 1, 0, 65536);
    let chunks = client.reply();
    assert_eq!(chunks[0].chunk_type, REPLY_TYPE_BLOCK_STATUS);
    assert_eq!(chunks[0].payload.len(), 12);
    assert_eq!(be32(&chunks[0].payload[4..]), 65536);
    assert_eq!(be32(&chunks[0].payload[8..]), STATE_HOLE | STATE_ZERO);
}

#[test]
fn disconnect_finishes_in_flight_requests_first() {
    let server = TestServer::start(4 << 20, false);
    let mut client = server.transmission(ReplyMode::Simple);
    // Pipelined: a FUA write and a flush (both run on the blocking pool),
    // then DISC. Both replies must arrive before the server closes.
    let mut frame = Vec::new();
    RequestHeader {
        flags: CMD_FLAG_FUA,
        command: CMD_WRITE,
        cookie: 1,
        offset: 0,
        length: 65536,
    }
    .encode(false, &mut frame);
    frame.extend_from_slice(&[0x33; 65536]);
    RequestHeader {
        flags: 0,
        command: CMD_FLUSH,
        cookie: 2,
        offset: 0,
        length: 0,
    }
    .encode(false, &mut frame);
    RequestHeader {
        flags: 0,
        command: CMD_DISC,
        cookie: 3,
        offset: 0,
        length: 0,
    }
    .encode(false, &mut frame);
    client.stream.write_all(&frame).unwrap();
    let mut cookies = vec![client.simple_reply(), client.simple_reply()];
    cookies.sort();
    assert_eq!(cookies, [(0, 1), (0, 2)]);
    assert!(client.is_closed());
    let on_disk = std::fs::read(&server.image).unwrap();
    assert!(on_disk[..65536].iter().all(|&b| b == 0x33));
}

/// DISC ends the connection without a reply whatever it carries: flags it
/// may not have, and a payload it claims under extended headers (which is
/// never read). The fuzzer found the server refusing such a DISC with an
/// error reply while it discarded the payload.
#[test]
fn disconnect_with_flags_and_a_claimed_payload_gets_no_reply() {
    let server = TestServer::start(4 << 20, false);
    let mut client = server.transmission(ReplyMode::Extended);
    client.request(true, CMD_FLUSH, 0, 1, 0, 0);
    assert_eq!(client.chunk().cookie, 1);
    client.request(true, CMD_DISC, CMD_FLAG_PAYLOAD_LEN | 0x40, 2, 0, 16 << 20);
    assert!(
        client.closed_by_server(),
        "a reply to DISC, or the server waits for its payload"
    );
}

#[test]
fn fast_zero_is_honest_and_no_hole_allocates() {
    let server = TestServer::start(4 << 20, false);
    let mut client = server.transmission(ReplyMode::Structured);
    client.write(false, 1, 0, &[0xee; 1 << 20]);
    assert_eq!(error_of(&client.chunk()), 0);
    client.request(false, CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 2, 0, 65536);
    assert_eq!(error_of(&client.chunk()), 0);
    client.request(false, CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 3, 65536, 65536);
    assert_eq!(error_of(&client.chunk()), 0);
    client.request(false, CMD_BLOCK_STATUS, 0, 4, 0, 1 << 20);
    let chunks = client.reply();
    let payload = &chunks[0].payload;
    // First 64 KiB punched (hole, zero); the NO_HOLE range stays allocated.
    assert_eq!(
        (be32(&payload[4..]), be32(&payload[8..])),
        (65536, STATE_HOLE | STATE_ZERO)
    );
    assert_eq!(be32(&payload[16..]), 0);
    client.request(false, CMD_READ, 0, 5, 0, 1 << 20);
    let chunks = client.reply();
    let mut data = vec![0xffu8; 1 << 20];
    for chunk in &chunks {
        let offset = be64(&chunk.payload) as usize;
        match chunk.chunk_type {
            REPLY_TYPE_OFFSET_DATA => {
                data[offset..offset + chunk.payload.len() - 8].copy_from_slice(&chunk.payload[8..])
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let length = be32(&chunk.payload[8..]) as usize;
                data[offset..offset + length].fill(0);
            }
            other => panic!("unexpected chunk {other}"),
        }
    }
    assert!(data[..131072].iter().all(|&b| b == 0));
    assert!(data[131072..].iter().all(|&b| b == 0xee));
}

/// A batch used to stop once 4 MiB of replies were waiting, then wait for
/// socket input before looking at the requests it still held: a client
/// that had sent all its reads (fio, 1 MiB reads at queue depth 24) and
/// waited for replies hung forever.
#[test]
fn pipelined_large_reads_beyond_the_reply_batch_all_get_replies() {
    let server = TestServer::start(64 << 20, false);
    for mode in [ReplyMode::Simple, ReplyMode::Structured] {
        let mut client = server.transmission(mode);
        client.write(false, 1, 0, &vec![0x42; 24 << 20]);
        let _ = client.chunk();
        let mut frame = Vec::new();
        for cookie in 0..24u64 {
            RequestHeader {
                flags: 0,
                command: CMD_READ,
                cookie,
                offset: cookie << 20,
                length: 1 << 20,
            }
            .encode(false, &mut frame);
        }
        client.stream.write_all(&frame).unwrap();
        let mut seen = Vec::new();
        for _ in 0..24 {
            if mode == ReplyMode::Simple {
                let (error, cookie) = client.simple_reply();
                assert_eq!(error, 0);
                assert!(client.read_exact(1 << 20).iter().all(|&b| b == 0x42));
                seen.push(cookie);
            } else {
                let chunks = client.reply();
                seen.push(chunks[0].cookie);
            }
        }
        seen.sort();
        assert_eq!(seen, (0..24).collect::<Vec<u64>>());
    }
}

/// Replies may be held back a little while the client has earlier replies
/// still unread (transmission.rs, `Cork`), but never past a short bound:
/// a client that reads nothing must still find every reply in its socket.
#[test]
fn held_back_replies_leave_within_the_bound_while_the_client_reads_nothing() {
    const READ_BYTES: u64 = 4096;
    const REPLY_BYTES: usize = STRUCTURED_CHUNK_HEADER_LEN + 8 + READ_BYTES as usize;
    let server = TestServer::start(8 << 20, false);
    let mut client = server.transmission(ReplyMode::Structured);
    let read = |cookie: u64, frame: &mut Vec<u8>| {
        RequestHeader {
            flags: 0,
            command: CMD_READ,
            cookie,
            offset: cookie * READ_BYTES,
            length: READ_BYTES,
        }
        .encode(false, frame)
    };
    let unread = |client: &Client| {
        let mut bytes: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        let rc = unsafe { libc::ioctl(client.stream.as_raw_fd(), libc::FIONREAD, &mut bytes) };
        assert_eq!(rc, 0);
        bytes as usize
    };
    // A backlog: 16 replies (66 KB) the client leaves unread.
    let mut frame = Vec::new();
    for cookie in 0..16 {
        read(cookie, &mut frame);
    }
    client.stream.write_all(&frame).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(unread(&client), 16 * REPLY_BYTES);
    // One more read: its reply is a candidate for holding, yet must come.
    let mut frame = Vec::new();
    read(16, &mut frame);
    client.stream.write_all(&frame).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while unread(&client) < 17 * REPLY_BYTES && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(unread(&client), 17 * REPLY_BYTES);
    let mut seen: Vec<u64> = (0..17).map(|_| client.reply()[0].cookie).collect();
    seen.sort();
    assert_eq!(seen, (0..17).collect::<Vec<u64>>());
}

/// Large FUA writes are read into a buffer of their own; the payload may
/// arrive in pieces, and requests pipelined behind it must still be served.
#[test]
fn large_fua_write_arriving_in_pieces_lands_whole() {
    let server = TestServer::start(8 << 20, false);
    let mut client = server.transmission(ReplyMode::Structured);
    let data: Vec<u8> = (0..(3 << 20) / 2).map(|i| (i % 251) as u8).collect();
    let mut frame = Vec::new();
    RequestHeader {
        flags: CMD_FLAG_FUA,
        command: CMD_WRITE,
        cookie: 1,
        offset: 4096,
        length: data.len() as u64,
    }
    .encode(false, &mut frame);
    client.stream.write_all(&frame).unwrap();
    for piece in data.chunks(100_000) {
        client.stream.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    client.request(false, CMD_READ, 0, 2, 4096, 4096);
    let mut replies = [client.reply(), client.reply()];
    replies.sort_by_key(|r| r[0].cookie);
    assert_eq!(replies[0][0].cookie, 1);
    assert_eq!(error_of(&replies[0][0]), 0);
    let on_disk = std::fs::read(&server.image).unwrap();
    assert_eq!(&on_disk[4096..4096 + data.len()], &data[..]);
}

/// Every option with its valid data cut at every length, and with bytes
/// added after it: each gets NBD_REP_ERR_INVALID, never a transmission or
/// a closed connection, and the handshake goes on.
#[test]
fn every_option_with_truncated_or_oversized_data_is_refused_and_the_handshake_goes_on() {
    let server = TestServer::start(1 << 20, false);
    let mut client = server.connect();
    client.send_u32(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
    assert_ack(client.option(OPT_STRUCTURED_REPLY, &[]));
    let valid: Vec<(u32, Vec<u8>)> = vec![
        (OPT_LIST, vec![]),
        (OPT_STARTTLS, vec![]),
        (OPT_INFO, info_data("disk", &[INFO_NAME, INFO_BLOCK_SIZE])),
        (OPT_GO, info_data("disk", &[INFO_DESCRIPTION])),
        (OPT_STRUCTURED_REPLY, vec![]),
        (
            OPT_LIST_META_CONTEXT,
            meta_data("disk", &["base:allocation"]),
        ),
        (
            OPT_SET_META_CONTEXT,
            meta_data("disk", &["base:allocation", "qemu:"]),
        ),
        (OPT_EXTENDED_HEADERS, vec![]),
    ];
    let mut answers = Vec::new();
    for (option, data) in &valid {
        let mut cases: Vec<Vec<u8>> = (0..data.len()).map(|n| data[..n].to_vec()).collect();
        let mut longer = data.clone();
        longer.extend_from_slice(b"junk");
        cases.push(longer);
        for case in cases {
            let replies = client.option(*option, &case);
            let last = replies.last().unwrap().0;
            answers.push((*option, case.len(), last));
            // The handshake goes on: LIST still answers.
            let listed = client.option(OPT_LIST, &[]);
            assert_eq!(
                listed[0].0,
                REP_SERVER,
                "after option {option} with {} bytes",
                case.len()
            );
        }
    }
    let wrong: Vec<_> = answers
        .iter()
        .filter(|(_, _, reply)| *reply != REP_ERR_INVALID)
        .collect();
    assert!(
        wrong.is_empty(),
        "(option, data bytes, reply) not refused as expected: {wrong:x?}"
    );
    // And the session is still good for a GO.
    let replies = client.option(OPT_GO, &info_data("disk", &[]));
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    client.write(false, 1, 0, b"ok");
    assert_eq!(error_of(&client.reply()[0]), 0);
}

/// Options in orders the spec forbids or leaves odd: each gets the answer
/// the spec names, and the state they leave is the one it says.
#[test]
fn options_out_of_order_get_the_spec_answer() {
    let server = TestServer::start(1 << 20, false);
    let mut client = server.connect();
    client.send_u32(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
    // Meta contexts before structured replies: invalid.
    let replies = client.option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    );
    assert_eq!(replies[0].0, REP_ERR_INVALID);
    // Extended headers, then structured replies: refused with
    // EXT_HEADER_REQD (the spec's answer), extended headers stay.
    assert_ack(client.option(OPT_EXTENDED_HEADERS, &[]));
    let replies = client.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(replies[0].0, REP_ERR_EXT_HEADER_REQD, "{replies:?}");
    // Asked twice: acknowledged again, nothing changes.
    assert_ack(client.option(OPT_EXTENDED_HEADERS, &[]));
    let replies = client.option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    );
    assert_eq!(replies[0].0, REP_META_CONTEXT);
    // INFO does not end the handshake; GO after it still works, and the
    // contexts set before it hold.
    let replies = client.option(OPT_INFO, &info_data("disk", &[]));
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    let replies = client.option(OPT_GO, &info_data("disk", &[]));
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    client.request(true, CMD_BLOCK_STATUS, 0, 5, 0, 4096);
    let chunks = client.reply();
    assert_eq!(
        chunks[0].chunk_type, REPLY_TYPE_BLOCK_STATUS_EXT,
        "{chunks:?}"
    );
}

/// Requests no client should send, each answered as the spec says, on one
/// connection that serves a normal READ after all of them.
#[test]
fn unknown_commands_flags_and_misaligned_or_out_of_range_requests_get_errors() {
    let server = TestServer::start(1 << 20, false);
    let mut client = server.transmission(ReplyMode::Structured);
    let cases: &[(&str, u16, u16, u64, u64, NbdError)] = &[
        ("unknown command 42", 42, 0, 0, 4096, NbdError::Inval),
        (
            "unknown command 0xffff",
            0xffff,
            0,
            0,
            4096,
            NbdError::Inval,
        ),
        (
            "READ with flag bit 13",
            CMD_READ,
            1 << 13,
            0,
            4096,
            NbdError::Inval,
        ),
        (
            "WRITE_ZEROES with DF",
            CMD_WRITE_ZEROES,
            CMD_FLAG_DF,
            0,
            4096,
            NbdError::Inval,
        ),
        (
            "READ at the very end + 1",
            CMD_READ,
            0,
            1 << 20,
            1,
            NbdError::Inval,
        ),
        (
            "READ with offset u64::MAX",
            CMD_READ,
            0,
            u64::MAX,
            1,
            NbdError::Inval,
        ),
        (
            "TRIM past the end",
            CMD_TRIM,
            0,
            (1 << 20) - 512,
            1024,
            NbdError::Inval,
        ),
        (
            "WRITE_ZEROES past the end",
            CMD_WRITE_ZEROES,
            0,
            1 << 20,
            512,
            NbdError::NoSpc,
        ),
        (
            "FLUSH with a length",
            CMD_FLUSH,
            0,
            0,
            4096,
            NbdError::Inval,
        ),
        (
            "BLOCK_STATUS with REQ_ONE and FUA",
            CMD_BLOCK_STATUS,
            CMD_FLAG_REQ_ONE | CMD_FLAG_DF,
            0,
            4096,
            NbdError::Inval,
        ),
    ];
    for (cookie, (what, command, flags, offset, length, error)) in cases.iter().enumerate() {
        client.request(false, *command, *flags, cookie as u64, *offset, *length);
        let chunks = client.reply();
        assert_eq!(chunks[0].cookie, cookie as u64, "{what}");
        assert_eq!(error_of(&chunks[0]), *error as u32, "{what}: {chunks:?}");
    }
    // Misaligned requests are served: the minimum block size is 1.
    client.write(false, 100, 3, b"odd");
    assert_eq!(error_of(&client.reply()[0]), 0);
    client.request(false, CMD_READ, CMD_FLAG_DF, 101, 3, 3);
    let chunks = client.reply();
    assert_eq!(&chunks[0].payload[8..], b"odd");
}

/// Shutdown is not held by a client that reads nothing: its pending
/// replies are given up on after one grace period, not one each.
#[test]
fn shutdown_gives_up_on_a_client_that_reads_no_replies() {
    let setup = Setup {
        uncached: true,
        ..Setup::default()
    };
    let server = TestServer::with(16 << 20, false, setup);
    let (stalled, sender) = stalled_reader(&server, 128);
    server.server.shutdown();
    let runtime = server.runtime.as_ref().unwrap();
    // A hang detector, not a speed check: one 5 s grace period is expected.
    let idle = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), server.server.wait_idle()).await
    });
    assert!(
        idle.is_ok(),
        "shutdown waited on the stalled client's replies"
    );
    stalled.stream.shutdown(std::net::Shutdown::Both).unwrap();
    sender.join().unwrap();
}

/// Large cached READs go out by sendfile (two here, cookies 4 and 6, as
/// strace shows): data and holes that are cached (read once, as zero
/// pages), in simple and structured replies, pipelined with small READs,
/// all byte-exact; then a file shorter than it was.
#[test]
fn large_cached_reads_sent_from_the_page_cache_are_exact() {
    let server = TestServer::start(4 << 20, false);
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 % 253) as u8).collect();
    let mut client = server.transmission(ReplyMode::Simple);
    client.write(false, 1, 0, &data[..128 << 10]);
    assert_eq!(client.simple_reply(), (0, 1));
    // Everything read once (the hole at 128K..1M too), so it is cached.
    client.request(false, CMD_READ, 0, 2, 0, 1 << 20);
    assert_eq!(client.simple_reply(), (0, 2));
    let first = client.read_exact(1 << 20);
    assert!(first[..128 << 10] == data[..128 << 10] && first[128 << 10..].iter().all(|&b| b == 0));
    // Pipelined: small, large, small; replies in order on one connection.
    let mut frames = Vec::new();
    for (cookie, offset, length) in [(3u64, 4096u64, 512u64), (4, 0, 1 << 20), (5, 8192, 512)] {
        RequestHeader {
            flags: 0,
            command: CMD_READ,
            cookie,
            offset,
            length,
        }
        .encode(false, &mut frames);
    }
    client.stream.write_all(&frames).unwrap();
    for (cookie, offset, length) in [(3u64, 4096usize, 512usize), (4, 0, 1 << 20), (5, 8192, 512)] {
        assert_eq!(client.simple_reply(), (0, cookie));
        assert!(
            client.read_exact(length) == first[offset..offset + length],
            "cookie {cookie}"
        );
    }
    let mut structured = server.transmission(ReplyMode::Structured);
    structured.request(false, CMD_READ, 0, 6, 0, 1 << 20);
    let chunks = structured.reply();
    let mut image = vec![0xffu8; 1 << 20];
    for chunk in &chunks {
        let offset = be64(&chunk.payload[..8]) as usize;
        match chunk.chunk_type {
            REPLY_TYPE_OFFSET_DATA => {
                let bytes = &chunk.payload[8..];
                image[offset..offset + bytes.len()].copy_from_slice(bytes);
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let length = be32(&chunk.payload[8..12]) as usize;
                image[offset..offset + length].fill(0);
            }
            other => panic!("chunk type {other}"),
        }
    }
    assert!(
        image == first,
        "structured reply reassembles the same bytes"
    );
    assert!(
        chunks
            .iter()
            .any(|c| c.chunk_type == REPLY_TYPE_OFFSET_HOLE),
        "{} chunks",
        chunks.len()
    );
    // The file shrinks under the server: what is gone reads as zeroes
    // (uncached past the end, so this READ takes the copying path).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&server.image)
        .unwrap()
        .set_len(64 << 10)
        .unwrap();
    client.request(false, CMD_READ, 0, 7, 0, 512 << 10);
    assert_eq!(client.simple_reply(), (0, 7));
    let shrunk = client.read_exact(512 << 10);
    assert!(shrunk[..64 << 10] == data[..64 << 10] && shrunk[64 << 10..].iter().all(|&b| b == 0));
}
