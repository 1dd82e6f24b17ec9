//! The client against an in-process fake server on a socketpair that
//! breaks the protocol on purpose: bad magic, replies for unknown cookies,
//! chunks longer than the request or than any limit, overlapping or
//! missing data, a hang-up mid-reply. Each must end in an error (for every
//! request in flight), never a panic, a hang or a huge allocation; every
//! client call here runs under a time limit. Also what a fake server can
//! show better than a real one: replies out of order and interleaved, the
//! in-flight bound, and the handshake's fallbacks and refusals. Last, 200
//! seeded runs of random frames (a cheap stand-in for a fuzz target).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use nbd_client::{
    Client, CommandError, CommandFailure, ConnectError, ConnectOptions, ConnectionError,
    HandshakeError, NbdError, Pending, ProtocolError, ReplyMode, RequestFlags,
    STATUS_CHUNK_LEN_MAX, Stream,
};
use nbd_server::proto::*;
use testkit::Xorshift;

/// How long any one client call may take before it counts as hung.
const LIMIT: Duration = Duration::from_secs(10);
const EXPORT_BYTES: u64 = 1 << 20;

/// Runs `f` on a thread of its own and waits at most `LIMIT` for it.
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(f());
    });
    match receiver.recv_timeout(LIMIT) {
        Ok(value) => value,
        Err(RecvTimeoutError::Timeout) => panic!("{what} hung for {LIMIT:?}"),
        Err(RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

/// The server end of the socketpair.
struct Fake {
    stream: UnixStream,
    mode: ReplyMode,
}

/// What the fake offers in the handshake.
#[derive(Clone, Copy)]
struct Offer {
    extended_headers: bool,
    go: bool,
}

const STRUCTURED: Offer = Offer {
    extended_headers: false,
    go: true,
};
const EXTENDED: Offer = Offer {
    extended_headers: true,
    go: true,
};

impl Fake {
    fn read(&mut self, length: usize) -> Vec<u8> {
        let mut buf = vec![0; length];
        self.stream
            .read_exact(&mut buf)
            .expect("the fake reads what the client sent");
        buf
    }

    fn send(&mut self, bytes: &[u8]) {
        // The client may already have hung up on a hostile reply.
        let _ = self.stream.write_all(bytes);
    }

    fn option_reply(&mut self, option: u32, reply_type: u32, data: &[u8]) {
        let mut out = Vec::new();
        put_option_reply_header(&mut out, option, reply_type, data.len() as u32);
        out.extend_from_slice(data);
        self.send(&out);
    }

    fn greet(&mut self) {
        let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
        greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
        greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.send(&greeting);
        let flags = be32(&self.read(4));
        assert_eq!(flags, CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
    }

    /// Reads one option; returns (option, data).
    fn option(&mut self) -> (u32, Vec<u8>) {
        let header = self.read(16);
        assert_eq!(be64(&header[0..8]), IHAVEOPT);
        let length = be32(&header[12..16]) as usize;
        (be32(&header[8..12]), self.read(length))
    }

    /// Sends a META_CONTEXT reply to `option` naming context `id`.
    fn meta_context(&mut self, option: u32, id: u32, name: &str) {
        let mut reply = id.to_be_bytes().to_vec();
        reply.extend_from_slice(name.as_bytes());
        self.option_reply(option, REP_META_CONTEXT, &reply);
    }

    /// Greets, then answers every option with `answer` until the client
    /// gives up with ABORT, which is acknowledged as a server must.
    fn answer_until_abort(&mut self, mut answer: impl FnMut(&mut Fake, u32)) {
        self.greet();
        loop {
            let (option, _) = self.option();
            if option == OPT_ABORT {
                return self.option_reply(option, REP_ACK, &[]);
            }
            answer(self, option);
        }
    }

    /// Negotiates like a plain server with `base:allocation` (id 1) and
    /// `qemu:dirty-bitmap:b` (id 2), up to GO or EXPORT_NAME.
    fn handshake(&mut self, offer: Offer) {
        self.greet();
        loop {
            let (option, data) = self.option();
            match option {
                OPT_EXTENDED_HEADERS if offer.extended_headers => {
                    self.mode = ReplyMode::Extended;
                    self.option_reply(option, REP_ACK, &[]);
                }
                OPT_STRUCTURED_REPLY => {
                    self.mode = ReplyMode::Structured;
                    self.option_reply(option, REP_ACK, &[]);
                }
                OPT_SET_META_CONTEXT => {
                    let text = String::from_utf8_lossy(&data).into_owned();
                    for (id, name) in [(1u32, "base:allocation"), (2, "qemu:dirty-bitmap:b")] {
                        if text.contains(name) {
                            self.meta_context(option, id, name);
                        }
                    }
                    self.option_reply(option, REP_ACK, &[]);
                }
                OPT_GO if offer.go => {
                    let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                    info.extend_from_slice(&EXPORT_BYTES.to_be_bytes());
                    let flags =
                        TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM;
                    info.extend_from_slice(&(flags | TFLAG_SEND_WRITE_ZEROES).to_be_bytes());
                    self.option_reply(option, REP_INFO, &info);
                    self.option_reply(option, REP_ACK, &[]);
                    return;
                }
                OPT_EXPORT_NAME => {
                    let mut reply = EXPORT_BYTES.to_be_bytes().to_vec();
                    reply.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH).to_be_bytes());
                    self.send(&reply);
                    return;
                }
                _ => self.option_reply(option, REP_ERR_UNSUP, b"not here"),
            }
        }
    }

    /// Reads one request (and a WRITE's payload, which it drops).
    fn request(&mut self) -> RequestHeader {
        let header = if self.mode == ReplyMode::Extended {
            let bytes = self.read(EXTENDED_REQUEST_LEN);
            RequestHeader::decode_extended(bytes.as_slice().try_into().unwrap()).unwrap()
        } else {
            let bytes = self.read(COMPACT_REQUEST_LEN);
            RequestHeader::decode_compact(bytes.as_slice().try_into().unwrap()).unwrap()
        };
        if header.command == CMD_WRITE {
            self.read(header.length as usize);
        }
        header
    }

    fn chunk(&mut self, request: &RequestHeader, flags: u16, chunk_type: u16, payload: &[u8]) {
        self.chunk_header(request, flags, chunk_type, payload.len());
        self.send(payload);
    }

    fn chunk_header(
        &mut self,
        request: &RequestHeader,
        flags: u16,
        chunk_type: u16,
        length: usize,
    ) {
        let mut out = Vec::new();
        put_chunk_header(
            &mut out,
            self.mode,
            flags,
            chunk_type,
            request.cookie,
            request.offset,
            length,
        );
        self.send(&out);
    }

    /// OFFSET_DATA at `offset` with `data`.
    fn data(&mut self, request: &RequestHeader, flags: u16, offset: u64, data: &[u8]) {
        let mut payload = offset.to_be_bytes().to_vec();
        payload.extend_from_slice(data);
        self.chunk(request, flags, REPLY_TYPE_OFFSET_DATA, &payload);
    }

    fn hole(&mut self, request: &RequestHeader, flags: u16, offset: u64, length: u32) {
        let mut payload = offset.to_be_bytes().to_vec();
        payload.extend_from_slice(&length.to_be_bytes());
        self.chunk(request, flags, REPLY_TYPE_OFFSET_HOLE, &payload);
    }

    fn done(&mut self, request: &RequestHeader) {
        self.chunk(request, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[]);
    }
}

/// A client connected to a fake server running `script` after the
/// handshake on its own thread.
fn connect(
    offer: Offer,
    options: ConnectOptions,
    script: impl FnOnce(&mut Fake) + Send + 'static,
) -> (Arc<Client>, JoinHandle<()>) {
    let (client_end, server_end) = UnixStream::pair().unwrap();
    server_end.set_read_timeout(Some(LIMIT)).unwrap();
    let server = std::thread::spawn(move || {
        let mut fake = Fake {
            stream: server_end,
            mode: ReplyMode::Simple,
        };
        fake.handshake(offer);
        script(&mut fake);
    });
    let client = within("the handshake", move || {
        Client::from_stream(Stream::Unix(client_end), "", &options)
    })
    .unwrap();
    (Arc::new(client), server)
}

fn read_4k(client: &Arc<Client>, offset: u64) -> Result<Vec<u8>, CommandError> {
    let client = Arc::clone(client);
    within("a read", move || {
        let mut buf = vec![0; 4096];
        client.read_at(&mut buf, offset).map(|()| buf)
    })
}

/// The protocol error a failed command carries.
fn protocol_error(error: &CommandError) -> ProtocolError {
    match &error.failure {
        CommandFailure::Connection(connection) => match &**connection {
            ConnectionError::Protocol(protocol) => protocol.clone(),
            other => panic!("want a protocol error, got {other}"),
        },
        other => panic!("want a connection error, got {other}"),
    }
}

/// A READ answered by `reply`, in `offer`'s framing: the client must fail it
/// with the protocol error `expected` picks out.
fn hostile_read(
    offer: Offer,
    reply: impl FnOnce(&mut Fake, &RequestHeader) + Send + 'static,
) -> ProtocolError {
    let (client, server) = connect(offer, ConnectOptions::default(), move |fake| {
        let request = fake.request();
        reply(fake, &request);
    });
    let error = read_4k(&client, 8192).unwrap_err();
    server.join().unwrap();
    // Once the connection failed, later calls fail at once too.
    let again = read_4k(&client, 0).unwrap_err();
    assert!(
        matches!(again.failure, CommandFailure::Connection(_)),
        "{again}"
    );
    protocol_error(&error)
}

#[test]
fn a_reply_with_bad_magic_ends_the_connection() {
    for offer in [STRUCTURED, EXTENDED] {
        let error = hostile_read(offer, |fake, _| {
            fake.send(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0])
        });
        assert_eq!(
            error,
            ProtocolError::Frame(ReplyFrameError::BadReplyMagic(0xdead_beef))
        );
    }
}

#[test]
fn a_reply_for_an_unknown_cookie_ends_the_connection() {
    let error = hostile_read(STRUCTURED, |fake, request| {
        let mut out = Vec::new();
        put_simple_reply(&mut out, 0, request.cookie + 1000);
        fake.send(&out);
    });
    assert!(
        matches!(error, ProtocolError::UnknownCookie { .. }),
        "{error}"
    );
}

#[test]
fn data_chunks_longer_than_the_request_or_outside_it_end_the_connection() {
    for offer in [STRUCTURED, EXTENDED] {
        let error = hostile_read(offer, |fake, request| {
            fake.data(request, REPLY_FLAG_DONE, request.offset, &[7; 8192]);
        });
        assert!(
            matches!(
                error,
                ProtocolError::ChunkTooLong {
                    length_bytes: 8200,
                    limit_bytes: 4104,
                    ..
                }
            ),
            "{error}"
        );
        let error = hostile_read(offer, |fake, request| {
            fake.data(request, REPLY_FLAG_DONE, request.offset + 512, &[7; 4096]);
        });
        assert!(
            matches!(error, ProtocolError::ChunkOutsideRequest { .. }),
            "{error}"
        );
        let error = hostile_read(offer, |fake, request| {
            fake.hole(request, REPLY_FLAG_DONE, request.offset - 4096, 4096);
        });
        assert!(
            matches!(error, ProtocolError::ChunkOutsideRequest { .. }),
            "{error}"
        );
    }
}

#[test]
fn chunk_lengths_over_the_limits_are_refused_before_anything_is_allocated() {
    // A 1 TiB OFFSET_DATA header in extended mode: refused from the header.
    let error = hostile_read(EXTENDED, |fake, request| {
        fake.chunk_header(request, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1 << 40);
    });
    assert!(
        matches!(error, ProtocolError::ChunkTooLong { .. }),
        "{error}"
    );
    // An error chunk of 4 GiB (its message may be 4096 bytes at most).
    let error = hostile_read(STRUCTURED, |fake, request| {
        fake.chunk_header(
            request,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            u32::MAX as usize,
        );
    });
    assert!(
        matches!(error, ProtocolError::ChunkTooLong { .. }),
        "{error}"
    );

    // A status chunk longer than 2^20 descriptors.
    let (client, server) = connect(STRUCTURED, ConnectOptions::default(), |fake| {
        let request = fake.request();
        let length = STATUS_CHUNK_LEN_MAX as usize + 8;
        fake.chunk_header(&request, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, length);
    });
    let error = within("block status", move || {
        client.block_status("base:allocation", 0, 4096)
    })
    .unwrap_err();
    server.join().unwrap();
    assert!(
        matches!(protocol_error(&error), ProtocolError::ChunkTooLong { .. }),
        "{error}"
    );
}

#[test]
fn a_status_chunk_for_a_context_that_was_not_negotiated_ends_the_connection() {
    let (client, server) = connect(STRUCTURED, ConnectOptions::default(), |fake| {
        let request = fake.request();
        let mut payload = 9u32.to_be_bytes().to_vec();
        payload.extend_from_slice(&4096u32.to_be_bytes());
        payload.extend_from_slice(&0u32.to_be_bytes());
        fake.chunk(&request, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, &payload);
    });
    let error = within("block status", move || {
        client.block_status("base:allocation", 0, 4096)
    })
    .unwrap_err();
    server.join().unwrap();
    assert_eq!(
        protocol_error(&error),
        ProtocolError::UnknownContext { id: 9 }
    );
}

#[test]
fn overlapping_or_incomplete_read_replies_end_the_connection() {
    let error = hostile_read(STRUCTURED, |fake, request| {
        fake.data(request, 0, request.offset, &[1; 2048]);
        fake.hole(request, REPLY_FLAG_DONE, request.offset + 1024, 3072);
    });
    assert!(
        matches!(error, ProtocolError::OverlappingChunk { .. }),
        "{error}"
    );
    let error = hostile_read(STRUCTURED, |fake, request| {
        fake.data(request, REPLY_FLAG_DONE, request.offset, &[1; 2048]);
    });
    assert_eq!(
        error,
        ProtocolError::IncompleteRead {
            covered_bytes: 2048,
            length_bytes: 4096
        }
    );
    let error = hostile_read(EXTENDED, |fake, request| {
        let mut out = Vec::new();
        put_simple_reply(&mut out, 0, request.cookie);
        fake.send(&out);
    });
    assert_eq!(error, ProtocolError::SimpleReplyWithExtendedHeaders);
    let error = hostile_read(STRUCTURED, |fake, request| {
        let mut out = Vec::new();
        put_simple_reply(&mut out, 0, request.cookie);
        fake.send(&out);
    });
    assert_eq!(error, ProtocolError::SimpleReplyToStructuredRead);
}

#[test]
fn the_server_hanging_up_mid_reply_fails_every_request_in_flight() {
    let (client, server) = connect(STRUCTURED, ConnectOptions::default(), |fake| {
        let requests = [fake.request(), fake.request(), fake.request()];
        // One answered properly, then half of a data chunk, then goodbye.
        fake.data(
            &requests[1],
            REPLY_FLAG_DONE,
            requests[1].offset,
            &[5; 4096],
        );
        fake.chunk_header(
            &requests[0],
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            8 + 4096,
        );
        fake.send(&requests[0].offset.to_be_bytes());
        fake.send(&[0; 100]);
    });
    let results = within("three reads", move || {
        let pending: Vec<_> = (0..3)
            .map(|index| client.submit_read(index * 4096, vec![0; 4096]).unwrap())
            .collect();
        pending.into_iter().map(|p| p.wait()).collect::<Vec<_>>()
    });
    server.join().unwrap();
    assert_eq!(results[1].as_ref().unwrap(), &vec![5; 4096]);
    let errors: Vec<_> = [&results[0], &results[2]]
        .iter()
        .map(|result| match &result.as_ref().unwrap_err().failure {
            CommandFailure::Connection(error) => Arc::clone(error),
            other => panic!("want a connection error, got {other}"),
        })
        .collect();
    assert!(
        matches!(
            *errors[0],
            ConnectionError::ServerClosed { mid_reply: true }
        ),
        "{}",
        errors[0]
    );
    assert!(
        Arc::ptr_eq(&errors[0], &errors[1]),
        "one shared error for all"
    );
}

#[test]
fn the_server_hanging_up_between_replies_is_an_error_not_a_hang() {
    let (client, server) = connect(EXTENDED, ConnectOptions::default(), |fake| {
        fake.request();
    });
    let error = read_4k(&client, 0).unwrap_err();
    server.join().unwrap();
    assert!(
        matches!(&error.failure, CommandFailure::Connection(e)
            if matches!(**e, ConnectionError::ServerClosed { mid_reply: false })),
        "{error}"
    );
}

#[test]
fn replies_out_of_order_and_interleaved_are_reassembled() {
    for offer in [STRUCTURED, EXTENDED] {
        let (client, server) = connect(offer, ConnectOptions::default(), |fake| {
            let [a, b, c] = [fake.request(), fake.request(), fake.request()];
            // c's second half, a whole, b as two chunks around c's first half.
            fake.data(&c, 0, c.offset + 2048, &[3; 2048]);
            fake.data(&a, REPLY_FLAG_DONE, a.offset, &[1; 4096]);
            fake.hole(&b, 0, b.offset + 1024, 3072);
            fake.hole(&c, 0, c.offset, 2048);
            fake.data(&b, REPLY_FLAG_DONE, b.offset, &[2; 1024]);
            fake.done(&c);
            // A server error is a value: the connection goes on.
            let d = fake.request();
            let mut payload = (NbdError::Io as u32).to_be_bytes().to_vec();
            payload.extend_from_slice(&4u16.to_be_bytes());
            payload.extend_from_slice(b"oops");
            payload.extend_from_slice(&(d.offset + 512).to_be_bytes());
            fake.chunk(&d, REPLY_FLAG_DONE, REPLY_TYPE_ERROR_OFFSET, &payload);
            let e = fake.request();
            fake.data(&e, REPLY_FLAG_DONE, e.offset, &[9; 4096]);
        });
        let worker = Arc::clone(&client);
        let results = within("out-of-order reads", move || {
            let pending: Vec<_> = (0..3)
                .map(|index| worker.submit_read(index * 4096, vec![0xee; 4096]).unwrap())
                .collect();
            pending
                .into_iter()
                .map(|p| p.wait().unwrap())
                .collect::<Vec<_>>()
        });
        assert_eq!(results[0], vec![1; 4096]);
        let mut b = vec![2; 1024];
        b.resize(4096, 0);
        assert_eq!(results[1], b);
        let mut c = vec![0; 2048];
        c.resize(4096, 3);
        assert_eq!(results[2], c);

        let error = read_4k(&client, 12288).unwrap_err();
        let CommandFailure::Server {
            error: nbd_error,
            message,
            error_offset_bytes,
            ..
        } = &error.failure
        else {
            panic!("want a server error, got {error}");
        };
        assert_eq!((*nbd_error, message.as_str()), (NbdError::Io, "oops"));
        assert_eq!(*error_offset_bytes, Some(12288 + 512));
        assert_eq!(read_4k(&client, 16384).unwrap(), vec![9; 4096]);
        server.join().unwrap();
    }
}

#[test]
fn no_more_requests_than_the_bound_are_ever_in_flight() {
    let options = ConnectOptions {
        in_flight_max: 4,
        ..ConnectOptions::default()
    };
    let (seen, observed) = mpsc::channel();
    let (client, server) = connect(STRUCTURED, options, move |fake| {
        let mut waiting: Vec<RequestHeader> = (0..4).map(|_| fake.request()).collect();
        // With four unanswered, a fifth must not arrive.
        fake.stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut byte = [0u8; 1];
        let fifth_arrived = fake.stream.read(&mut byte).is_ok();
        seen.send(fifth_arrived).unwrap();
        if fifth_arrived {
            return;
        }
        fake.stream.set_read_timeout(Some(LIMIT)).unwrap();
        // Answer one at a time; each answer lets exactly one more in.
        for _ in 0..8 {
            let request = waiting.remove(0);
            fake.data(&request, REPLY_FLAG_DONE, request.offset, &[1; 512]);
            if waiting.len() < 4 {
                waiting.push(fake.request());
            }
        }
        for request in waiting {
            fake.data(&request, REPLY_FLAG_DONE, request.offset, &[1; 512]);
        }
    });
    let results = within("twelve reads from three threads", move || {
        std::thread::scope(|scope| {
            let threads: Vec<_> = (0..3u64)
                .map(|thread| {
                    let client = &client;
                    scope.spawn(move || {
                        (0..4u64)
                            .map(|index| {
                                let offset = (thread * 4 + index) * 512;
                                client.submit_read(offset, vec![0; 512])
                            })
                            .collect::<Vec<_>>()
                            .into_iter()
                            .map(|pending| pending.and_then(Pending::wait))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let results = threads.into_iter().flat_map(|t| t.join().unwrap());
            results.collect::<Vec<_>>()
        })
    });
    let fifth_arrived = observed.recv().unwrap();
    assert!(
        !fifth_arrived,
        "a fifth request arrived with four in flight"
    );
    assert_eq!(results.len(), 12);
    for result in results {
        assert_eq!(result.unwrap(), vec![1; 512]);
    }
    server.join().unwrap();
}

#[test]
fn handshake_falls_back_to_structured_replies_and_export_name() {
    let offer = Offer {
        extended_headers: false,
        go: false,
    };
    let (client, server) = connect(offer, ConnectOptions::default(), |fake| {
        let request = fake.request();
        assert_eq!(request.command, CMD_FLUSH);
        let mut out = Vec::new();
        put_simple_reply(&mut out, 0, request.cookie);
        fake.send(&out);
    });
    assert_eq!(client.info().reply_mode, ReplyMode::Structured);
    assert_eq!(client.size_bytes(), EXPORT_BYTES);
    assert!(!client.info().block_sizes.advertised);
    let worker = Arc::clone(&client);
    within("a flush", move || worker.flush()).unwrap();
    // EXPORT_NAME gave only FLUSH: the rest is refused without asking.
    let error = client.trim(0, 4096, RequestFlags::NONE).unwrap_err();
    assert!(
        matches!(error.failure, CommandFailure::Unsupported { what: "TRIM" }),
        "{error}"
    );
    server.join().unwrap();
}

/// Runs a handshake against `server` (which gets the stream after the
/// greeting) and returns the client's error.
fn refused(server: impl FnOnce(&mut Fake) + Send + 'static) -> HandshakeError {
    let (client_end, server_end) = UnixStream::pair().unwrap();
    server_end.set_read_timeout(Some(LIMIT)).unwrap();
    let fake = std::thread::spawn(move || {
        let mut fake = Fake {
            stream: server_end,
            mode: ReplyMode::Simple,
        };
        server(&mut fake);
    });
    let options = ConnectOptions {
        dirty_bitmap: Some("b".to_string()),
        ..ConnectOptions::default()
    };
    let error = within("a refused handshake", move || {
        Client::from_stream(Stream::Unix(client_end), "disk", &options)
    })
    .unwrap_err();
    fake.join().unwrap();
    match error {
        ConnectError::Handshake { source, .. } => source,
        other => panic!("want a handshake error, got {other}"),
    }
}

#[test]
fn handshake_refusals_and_nonsense_are_clear_errors() {
    let error = refused(|fake| fake.send(b"HTTP/1.1 400 Bad Request\r\n\r\n"));
    assert!(matches!(error, HandshakeError::NotNbd { .. }), "{error}");
    let error = refused(|fake| {
        let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
        greeting.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        greeting.extend_from_slice(&[0; 2]);
        fake.send(&greeting);
    });
    assert!(matches!(error, HandshakeError::Oldstyle), "{error}");

    // Unknown export: the client says goodbye with ABORT.
    let error = refused(|fake| {
        fake.answer_until_abort(|fake, option| match option {
            OPT_GO => fake.option_reply(option, REP_ERR_UNKNOWN, b"no such disk"),
            OPT_SET_META_CONTEXT => {
                fake.meta_context(option, 2, "qemu:dirty-bitmap:b");
                fake.option_reply(option, REP_ACK, &[]);
            }
            _ => fake.option_reply(option, REP_ACK, &[]),
        })
    });
    assert!(
        matches!(&error, HandshakeError::UnknownExport { name, message }
            if name == "disk" && message == "no such disk"),
        "{error}"
    );

    // The dirty bitmap is not there: the error lists what is.
    let error = refused(|fake| {
        fake.answer_until_abort(|fake, option| {
            if option == OPT_LIST_META_CONTEXT {
                fake.meta_context(option, 0, "qemu:dirty-bitmap:other");
            }
            fake.option_reply(option, REP_ACK, &[]);
        })
    });
    assert!(
        matches!(&error, HandshakeError::MissingContext { available, .. }
            if available == &["qemu:dirty-bitmap:other".to_string()]),
        "{error}"
    );

    // An option reply longer than any legitimate one is refused unread.
    let error = refused(|fake| {
        fake.greet();
        let (option, _) = fake.option();
        let mut out = Vec::new();
        put_option_reply_header(&mut out, option, REP_ACK, 1 << 30);
        fake.send(&out);
    });
    assert!(
        matches!(error, HandshakeError::ReplyTooLong { .. }),
        "{error}"
    );

    // TLS required.
    let error = refused(|fake| {
        fake.answer_until_abort(|fake, option| {
            fake.option_reply(option, REP_ERR_TLS_REQD, b"use TLS")
        })
    });
    assert!(
        matches!(error, HandshakeError::TlsRequired { .. }),
        "{error}"
    );
}

/// A plausible-looking but random reply frame for one of `requests`.
fn random_frame(rng: &mut Xorshift, fake: &Fake, requests: &[RequestHeader]) -> Vec<u8> {
    let request = rng.pick(requests);
    let stray = rng.next();
    let cookie = rng.pick(&[request.cookie, request.cookie, stray]);
    let chunk_type = rng.pick(&[
        REPLY_TYPE_NONE,
        REPLY_TYPE_OFFSET_DATA,
        REPLY_TYPE_OFFSET_HOLE,
        REPLY_TYPE_BLOCK_STATUS,
        REPLY_TYPE_BLOCK_STATUS_EXT,
        REPLY_TYPE_ERROR,
        REPLY_TYPE_ERROR_OFFSET,
        (1 << 15) + 9,
        77,
    ]);
    let length = rng.pick(&[0, 4, 6, 12, 14, 24, 100, 4104, 1 << 20, u32::MAX as u64]);
    let flags = rng.pick(&[0, REPLY_FLAG_DONE]);
    let mut out = Vec::new();
    if rng.below(8) == 0 {
        put_simple_reply(&mut out, rng.pick(&[0, 5, 22, 108, 9999]), cookie);
    } else {
        let stray = rng.next();
        let offset = rng.pick(&[request.offset, stray]);
        let header = ChunkHeader {
            flags,
            chunk_type,
            cookie,
            offset,
            length,
        };
        let mut framed = Vec::new();
        put_chunk_header(
            &mut framed,
            fake.mode,
            header.flags,
            header.chunk_type,
            header.cookie,
            header.offset,
            0,
        );
        // Patch the real (possibly absurd) length into the header.
        match fake.mode {
            ReplyMode::Extended => framed[24..32].copy_from_slice(&length.to_be_bytes()),
            _ => framed[16..20].copy_from_slice(&(length as u32).to_be_bytes()),
        }
        out.extend_from_slice(&framed);
    }
    // Some payload, rarely as long as the header claims.
    let payload = rng.index(64);
    for _ in 0..payload {
        out.push(rng.pick(&[0u8, 1, 0x10, 0xff]));
    }
    out
}

#[test]
fn random_replies_end_in_errors_or_answers_never_in_a_panic_or_a_hang() {
    for seed in 0..200u64 {
        let offer = if seed % 2 == 0 { STRUCTURED } else { EXTENDED };
        let (client, server) = connect(offer, ConnectOptions::default(), move |fake| {
            let mut rng = Xorshift::new(seed);
            let requests = [fake.request(), fake.request()];
            for _ in 0..1 + rng.below(6) {
                let frame = random_frame(&mut rng, fake, &requests);
                fake.send(&frame);
            }
        });
        let worker = Arc::clone(&client);
        let results = within(&format!("seed {seed}"), move || {
            let read = worker.submit_read(8192, vec![0; 4096]).unwrap();
            let status = worker.submit_block_status(0, 65536).unwrap();
            (read.wait().err(), status.wait().err())
        });
        server.join().unwrap();
        for error in [results.0, results.1].into_iter().flatten() {
            if let CommandFailure::Connection(connection) = &error.failure {
                assert!(
                    !matches!(**connection, ConnectionError::ReaderLost),
                    "seed {seed}: the reader thread died: {error}"
                );
            }
        }
        drop(client);
    }
}
