//! The client side of fixed newstyle negotiation (doc/proto.md "Handshake"):
//! greeting and flags, EXTENDED_HEADERS (falling back to STRUCTURED_REPLY),
//! SET_META_CONTEXT, then GO with an NBD_INFO_BLOCK_SIZE request, falling
//! back to EXPORT_NAME only when the server does not know GO. For nbds://
//! URIs STARTTLS comes first, as the spec advises a client that wants TLS
//! to do, and any refusal ends the connection: there is no plaintext
//! fallback for a URI that asked for TLS.
//!
//! Every option reply length is checked against `OPTION_REPLY_LEN_MAX`
//! before its data is read, and the replies to one option are counted
//! against `OPTION_REPLIES_MAX`. When the client gives up on a server that
//! is still talking sense (an unknown export, a missing context) it says
//! goodbye with NBD_OPT_ABORT, the soft disconnect the spec asks for.

use std::io::{self, BufReader, Read, Write};
use std::time::Duration;

use nbd_server::proto::*;

use crate::info::{BlockSizes, ExportInfo};
use crate::reply::READ_BUFFER_BYTES;
use crate::tls::ClientTls;
use crate::transport::Stream;

/// Largest option reply data accepted. The largest legitimate replies are
/// a context name or an error message (each a string of at most
/// `STRING_MAX` bytes) plus a few fixed fields.
pub const OPTION_REPLY_LEN_MAX: u32 = 2 * STRING_MAX as u32;
/// Replies accepted for one option before the server counts as babbling.
pub const OPTION_REPLIES_MAX: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("i/o: {0}")]
    Io(io::Error),
    #[error("no answer within {limit:?} (see ConnectOptions::handshake_timeout)")]
    TimedOut { limit: Duration },
    #[error("the server closed the connection")]
    Closed,
    #[error(
        "the server closed the TLS connection (if it checks client certificates, put client-cert.pem and client-key.pem in the tls-certificates directory)"
    )]
    ClosedAfterTls,
    #[error("the server refused STARTTLS with {}{}; an nbds:// URI never falls back to plaintext",
        reply_name(*reply_type),
        if message.is_empty() { String::new() } else { format!(": {message}") })]
    TlsRefused { reply_type: u32, message: String },
    #[error("the server sent data after its STARTTLS reply, before the TLS handshake")]
    BytesBeforeTls,
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(io::Error),
    #[error("cannot start the TLS relay: {0}")]
    Relay(io::Error),
    #[error("not an NBD server (it greeted with {magic:#018x})")]
    NotNbd { magic: u64 },
    #[error("the server speaks only the oldstyle handshake, which this client does not")]
    Oldstyle,
    #[error("the server does not offer fixed newstyle negotiation, which this client needs")]
    NotFixedNewstyle,
    #[error("{0}")]
    Frame(#[from] ReplyFrameError),
    #[error("a reply to option {} while waiting for {}", option_name(*received), option_name(*sent))]
    WrongOption { sent: u32, received: u32 },
    #[error("a reply of {length_bytes} bytes to {}, larger than {OPTION_REPLY_LEN_MAX}", option_name(*option))]
    ReplyTooLong { option: u32, length_bytes: u32 },
    #[error("more than {OPTION_REPLIES_MAX} replies to {}", option_name(*option))]
    TooManyReplies { option: u32 },
    #[error("malformed reply {reply_type:#x} to {}: {what}", option_name(*option))]
    BadReply {
        option: u32,
        reply_type: u32,
        what: &'static str,
    },
    #[error("the server refused {} with {}{}", option_name(*option), reply_name(*reply_type),
        if message.is_empty() { String::new() } else { format!(": {message}") })]
    Refused {
        option: u32,
        reply_type: u32,
        message: String,
    },
    #[error("the server has no export named {name:?}: {message} (nbdinfo --list shows them)")]
    UnknownExport { name: String, message: String },
    #[error("the server requires TLS (use an nbds:// URI): {message}")]
    TlsRequired { message: String },
    #[error("the server is shutting down: {message}")]
    ServerShutdown { message: String },
    #[error("export {export:?} has no metadata context {context:?}; the server offers {}",
        if available.is_empty() { "none of that kind".to_string() } else { format!("{available:?}") })]
    MissingContext {
        context: String,
        export: String,
        available: Vec<String>,
    },
    #[error("the server has no structured replies, so it cannot report {context:?}")]
    ContextsNeedStructuredReplies { context: String },
    #[error(
        "the server's block sizes (minimum {minimum}, preferred {preferred}, maximum {maximum}) break the spec"
    )]
    BadBlockSizes {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
    #[error("GO succeeded without NBD_INFO_EXPORT (size and flags)")]
    NoExportInfo,
    #[error("the server acknowledged extended headers but does not support GO")]
    GoUnsupportedWithExtendedHeaders,
}

/// How to connect; `Default` suits a copier reading allocation status.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Select `base:allocation`. Missing on the server is not an error:
    /// `block_status` on it then fails with `NoContext`.
    pub base_allocation: bool,
    /// Select `qemu:dirty-bitmap:NAME` for this NAME; the connection fails
    /// with `MissingContext` if the server does not have it.
    pub dirty_bitmap: Option<String>,
    /// Ask for extended headers (64-bit lengths), falling back on refusal.
    pub extended_headers: bool,
    /// Ask for structured replies when extended headers are not in use.
    pub structured_replies: bool,
    /// Requests one connection keeps in flight at most (1 to `IN_FLIGHT_MAX`).
    pub in_flight_max: usize,
    /// Bound on waiting for the server during the handshake.
    pub handshake_timeout: Option<Duration>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            base_allocation: true,
            dirty_bitmap: None,
            extended_headers: true,
            structured_replies: true,
            in_flight_max: crate::IN_FLIGHT_DEFAULT,
            handshake_timeout: Some(HANDSHAKE_TIMEOUT_DEFAULT),
        }
    }
}

pub const HANDSHAKE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);

impl ConnectOptions {
    /// The full context name for `dirty_bitmap`.
    pub fn dirty_bitmap_context(&self) -> Option<String> {
        self.dirty_bitmap
            .as_ref()
            .map(|name| format!("{DIRTY_BITMAP_CONTEXT_PREFIX}{name}"))
    }
}

/// The spec's name for an option, for messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => "an unknown option",
    }
}

/// The spec's name for an option reply type, for messages.
pub fn reply_name(reply_type: u32) -> &'static str {
    match reply_type {
        REP_ACK => "ACK",
        REP_SERVER => "SERVER",
        REP_INFO => "INFO",
        REP_META_CONTEXT => "META_CONTEXT",
        REP_ERR_UNSUP => "ERR_UNSUP",
        REP_ERR_POLICY => "ERR_POLICY",
        REP_ERR_INVALID => "ERR_INVALID",
        REP_ERR_PLATFORM => "ERR_PLATFORM",
        REP_ERR_TLS_REQD => "ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "ERR_TOO_BIG",
        REP_ERR_EXT_HEADER_REQD => "ERR_EXT_HEADER_REQD",
        _ if is_option_error(reply_type) => "an unknown error",
        _ => "an unknown reply",
    }
}

/// How an option's replies ended.
enum Final {
    Ack,
    Error { reply_type: u32, message: String },
}

/// What GO settled, or that the server does not know GO.
enum Go {
    Export {
        size_bytes: u64,
        flags: u16,
        block_sizes: BlockSizes,
    },
    Unsupported,
}

struct Negotiation<'a> {
    input: &'a mut BufReader<Stream>,
    output: &'a mut Stream,
    /// Data of the last option reply read.
    data: Vec<u8>,
    timeout: Option<Duration>,
    /// Whether STARTTLS succeeded (the streams are then a relay's).
    tls: bool,
}

/// Negotiates `export_name` on a fresh connection, first TLS when `tls`
/// says so. On success the stream is in the transmission phase (any bytes
/// read ahead stay in `input`); after TLS both streams are replaced by
/// the relay's plaintext end.
pub(crate) fn negotiate(
    input: &mut BufReader<Stream>,
    output: &mut Stream,
    export_name: &str,
    options: &ConnectOptions,
    tls: Option<&ClientTls>,
) -> Result<ExportInfo, HandshakeError> {
    set_timeout(input.get_ref(), options.handshake_timeout)?;
    let mut negotiation = Negotiation {
        input,
        output,
        data: Vec::new(),
        timeout: options.handshake_timeout,
        tls: false,
    };
    let no_zeroes = negotiation.greeting()?;
    let result = match tls {
        Some(tls) => negotiation.start_tls(tls),
        None => Ok(()),
    };
    let result = result.and_then(|()| negotiation.options(export_name, options, no_zeroes));
    if result
        .as_ref()
        .is_err_and(HandshakeError::leaves_the_stream_in_step)
    {
        negotiation.abort();
    }
    let info = result?;
    set_timeout(negotiation.input.get_ref(), None)?;
    Ok(info)
}

fn set_timeout(stream: &Stream, timeout: Option<Duration>) -> Result<(), HandshakeError> {
    let result = match stream {
        Stream::Unix(stream) => stream.set_read_timeout(timeout),
        Stream::Tcp(stream) => stream.set_read_timeout(timeout),
    };
    result.map_err(HandshakeError::Io)
}

impl HandshakeError {
    /// Whether the server is still in step, so that ABORT means something.
    fn leaves_the_stream_in_step(&self) -> bool {
        matches!(
            self,
            HandshakeError::Refused { .. }
                | HandshakeError::TlsRefused { .. }
                | HandshakeError::UnknownExport { .. }
                | HandshakeError::TlsRequired { .. }
                | HandshakeError::MissingContext { .. }
                | HandshakeError::ContextsNeedStructuredReplies { .. }
        )
    }
}

impl Negotiation<'_> {
    fn options(
        &mut self,
        export_name: &str,
        options: &ConnectOptions,
        no_zeroes: bool,
    ) -> Result<ExportInfo, HandshakeError> {
        let mut mode = ReplyMode::Simple;
        if options.extended_headers && self.switch(OPT_EXTENDED_HEADERS)? {
            mode = ReplyMode::Extended;
        } else if options.structured_replies && self.switch(OPT_STRUCTURED_REPLY)? {
            mode = ReplyMode::Structured;
        }
        let meta_contexts = self.meta_contexts(export_name, options, mode)?;
        let (size_bytes, flags, block_sizes) = match self.go(export_name)? {
            Go::Export {
                size_bytes,
                flags,
                block_sizes,
            } => (size_bytes, flags, block_sizes),
            Go::Unsupported if mode == ReplyMode::Extended => {
                return Err(HandshakeError::GoUnsupportedWithExtendedHeaders);
            }
            Go::Unsupported => {
                let (size_bytes, flags) = self.export_name(export_name, no_zeroes)?;
                (size_bytes, flags, BlockSizes::default())
            }
        };
        Ok(ExportInfo {
            export_name: export_name.to_string(),
            size_bytes,
            transmission_flags: flags,
            block_sizes,
            reply_mode: mode,
            meta_contexts,
        })
    }

    /// Reads the greeting and answers with our flags; returns NO_ZEROES.
    fn greeting(&mut self) -> Result<bool, HandshakeError> {
        let mut greeting = [0u8; 18];
        self.read_exact(&mut greeting)?;
        let magic = be64(&greeting[0..8]);
        if magic != NBDMAGIC {
            return Err(HandshakeError::NotNbd { magic });
        }
        match be64(&greeting[8..16]) {
            IHAVEOPT => {}
            OLDSTYLE_MAGIC => return Err(HandshakeError::Oldstyle),
            magic => return Err(HandshakeError::NotNbd { magic }),
        }
        let server_flags = be16(&greeting[16..18]);
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(HandshakeError::NotFixedNewstyle);
        }
        let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
        let mut client_flags = CLIENT_FLAG_FIXED_NEWSTYLE;
        if no_zeroes {
            client_flags |= CLIENT_FLAG_NO_ZEROES;
        }
        self.write(&client_flags.to_be_bytes())?;
        Ok(no_zeroes)
    }

    /// STARTTLS, the TLS handshake, and the relay that carries the rest.
    fn start_tls(&mut self, tls: &ClientTls) -> Result<(), HandshakeError> {
        self.send(OPT_STARTTLS, &[])?;
        let only_ack = |_: &[u8], reply_type, option| {
            Err(HandshakeError::BadReply {
                option,
                reply_type,
                what: "only ACK or an error is expected",
            })
        };
        if let Final::Error {
            reply_type,
            message,
        } = self.replies(OPT_STARTTLS, only_ack)?
        {
            return Err(HandshakeError::TlsRefused {
                reply_type,
                message,
            });
        }
        // Plaintext read ahead of the TLS hello would be taken as if it
        // came over TLS: an attacker's way to inject replies.
        if !self.input.buffer().is_empty() {
            return Err(HandshakeError::BytesBeforeTls);
        }
        let mut connection = tls
            .connection()
            .map_err(|error| HandshakeError::TlsHandshake(io::Error::other(error)))?;
        while connection.is_handshaking() {
            connection
                .complete_io(self.input.get_mut())
                .map_err(|error| match error.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => match self.timeout {
                        Some(limit) => HandshakeError::TimedOut { limit },
                        None => HandshakeError::TlsHandshake(error),
                    },
                    io::ErrorKind::UnexpectedEof => HandshakeError::Closed,
                    _ => HandshakeError::TlsHandshake(error),
                })?;
        }
        let net = self
            .input
            .get_ref()
            .try_clone()
            .map_err(HandshakeError::Io)?;
        let connection = rustls::Connection::Client(connection);
        let (local, _thread) =
            crate::relay::spawn(net.into_fd(), connection).map_err(HandshakeError::Relay)?;
        let reader = local.try_clone().map_err(HandshakeError::Relay)?;
        *self.input = BufReader::with_capacity(READ_BUFFER_BYTES, Stream::Unix(reader));
        *self.output = Stream::Unix(local);
        self.tls = true;
        set_timeout(self.input.get_ref(), self.timeout)
    }

    /// An option without data that the server either acknowledges or not.
    fn switch(&mut self, option: u32) -> Result<bool, HandshakeError> {
        self.send(option, &[])?;
        match self.replies(option, |_, reply_type, _| {
            Err(HandshakeError::BadReply {
                option,
                reply_type,
                what: "only ACK or an error is expected",
            })
        })? {
            Final::Ack => Ok(true),
            Final::Error {
                reply_type: REP_ERR_SHUTDOWN,
                message,
            } => Err(HandshakeError::ServerShutdown { message }),
            // A server that insists on TLS refuses every option with this.
            Final::Error {
                reply_type: REP_ERR_TLS_REQD,
                message,
            } => Err(HandshakeError::TlsRequired { message }),
            // UNSUP is the usual refusal; any other leaves the feature off too.
            Final::Error { .. } => Ok(false),
        }
    }

    /// Selects the contexts `options` asks for; checks that a requested
    /// dirty bitmap is among those the server selected.
    fn meta_contexts(
        &mut self,
        export_name: &str,
        options: &ConnectOptions,
        mode: ReplyMode,
    ) -> Result<Vec<(u32, String)>, HandshakeError> {
        let bitmap = options.dirty_bitmap_context();
        let mut queries: Vec<String> = Vec::new();
        if options.base_allocation {
            queries.push(BASE_ALLOCATION.to_string());
        }
        queries.extend(bitmap.clone());
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        if mode == ReplyMode::Simple {
            return match bitmap {
                Some(context) => Err(HandshakeError::ContextsNeedStructuredReplies { context }),
                None => Ok(Vec::new()),
            };
        }
        self.send(
            OPT_SET_META_CONTEXT,
            &meta_context_data(export_name, &queries),
        )?;
        let mut selected: Vec<(u32, String)> = Vec::new();
        let outcome = self.replies(OPT_SET_META_CONTEXT, |data, reply_type, option| {
            let (id, name) = parse_meta_context(option, reply_type, data)?;
            if selected.iter().any(|(known, _)| *known == id) {
                return Err(HandshakeError::BadReply {
                    option,
                    reply_type,
                    what: "two contexts with the same id",
                });
            }
            selected.push((id, name));
            Ok(())
        })?;
        if let Final::Error {
            reply_type,
            message,
        } = outcome
        {
            match reply_type {
                REP_ERR_SHUTDOWN => return Err(HandshakeError::ServerShutdown { message }),
                REP_ERR_TLS_REQD => return Err(HandshakeError::TlsRequired { message }),
                _ => {}
            }
            // The spec says to disregard contexts sent before an error.
            selected.clear();
        }
        let missing = bitmap.filter(|context| !selected.iter().any(|(_, name)| name == context));
        if let Some(context) = missing {
            let available = self.list_dirty_bitmaps(export_name);
            return Err(HandshakeError::MissingContext {
                context,
                export: export_name.to_string(),
                available,
            });
        }
        Ok(selected)
    }

    /// The dirty bitmaps the server lists for the export, for an error
    /// message; empty if it lists none or cannot list.
    fn list_dirty_bitmaps(&mut self, export_name: &str) -> Vec<String> {
        let query = [DIRTY_BITMAP_CONTEXT_PREFIX.to_string()];
        if self
            .send(
                OPT_LIST_META_CONTEXT,
                &meta_context_data(export_name, &query),
            )
            .is_err()
        {
            return Vec::new();
        }
        let mut names = Vec::new();
        let outcome = self.replies(OPT_LIST_META_CONTEXT, |data, reply_type, option| {
            names.push(parse_meta_context(option, reply_type, data)?.1);
            Ok(())
        });
        match outcome {
            Ok(Final::Ack) => names,
            _ => Vec::new(),
        }
    }

    fn go(&mut self, export_name: &str) -> Result<Go, HandshakeError> {
        let mut data = Vec::with_capacity(export_name.len() + 8);
        data.extend_from_slice(&(export_name.len() as u32).to_be_bytes());
        data.extend_from_slice(export_name.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send(OPT_GO, &data)?;
        let mut export = None;
        let mut block_sizes = BlockSizes::default();
        let outcome = self.replies(OPT_GO, |data, reply_type, option| {
            match parse_info(option, reply_type, data)? {
                Info::Export { size_bytes, flags } => export = Some((size_bytes, flags)),
                Info::BlockSizes(sizes) => block_sizes = sizes,
                Info::Other => {}
            }
            Ok(())
        })?;
        match outcome {
            Final::Ack => {
                let (size_bytes, flags) = export.ok_or(HandshakeError::NoExportInfo)?;
                Ok(Go::Export {
                    size_bytes,
                    flags,
                    block_sizes,
                })
            }
            Final::Error {
                reply_type,
                message,
            } => match reply_type {
                REP_ERR_UNSUP => Ok(Go::Unsupported),
                REP_ERR_UNKNOWN => Err(HandshakeError::UnknownExport {
                    name: export_name.to_string(),
                    message,
                }),
                REP_ERR_TLS_REQD => Err(HandshakeError::TlsRequired { message }),
                REP_ERR_SHUTDOWN => Err(HandshakeError::ServerShutdown { message }),
                _ => Err(HandshakeError::Refused {
                    option: OPT_GO,
                    reply_type,
                    message,
                }),
            },
        }
    }

    /// The old way in, for servers without GO: no errors, no block sizes.
    fn export_name(
        &mut self,
        export_name: &str,
        no_zeroes: bool,
    ) -> Result<(u64, u16), HandshakeError> {
        self.send(OPT_EXPORT_NAME, export_name.as_bytes())?;
        let mut reply = [0u8; 10 + 124];
        let length = if no_zeroes { 10 } else { reply.len() };
        match self.read_exact(&mut reply[..length]) {
            // The server closes the connection for an export it does not have.
            Err(HandshakeError::Closed | HandshakeError::ClosedAfterTls) => {
                Err(HandshakeError::UnknownExport {
                    name: export_name.to_string(),
                    message: "the server hung up after EXPORT_NAME".to_string(),
                })
            }
            Err(error) => Err(error),
            Ok(()) => Ok((be64(&reply[0..8]), be16(&reply[8..10]))),
        }
    }

    /// Soft disconnect: ABORT and its ACK, both best effort.
    fn abort(&mut self) {
        if self.send(OPT_ABORT, &[]).is_ok() {
            let _ = self.replies(OPT_ABORT, |_, _, _| Ok(()));
        }
    }

    fn send(&mut self, option: u32, data: &[u8]) -> Result<(), HandshakeError> {
        let mut out = Vec::with_capacity(OPTION_REQUEST_HEADER_LEN + data.len());
        put_option_request(&mut out, option, data);
        self.write(&out)
    }

    /// Reads the replies to `option` up to the final ACK or error, handing
    /// each other reply (data, type, option) to `each`.
    fn replies(
        &mut self,
        option: u32,
        mut each: impl FnMut(&[u8], u32, u32) -> Result<(), HandshakeError>,
    ) -> Result<Final, HandshakeError> {
        for _ in 0..OPTION_REPLIES_MAX {
            let mut header = [0u8; OPTION_REPLY_HEADER_LEN];
            self.read_exact(&mut header)?;
            let header = OptionReplyHeader::decode(&header)?;
            if header.option != option {
                return Err(HandshakeError::WrongOption {
                    sent: option,
                    received: header.option,
                });
            }
            if header.length > OPTION_REPLY_LEN_MAX {
                return Err(HandshakeError::ReplyTooLong {
                    option,
                    length_bytes: header.length,
                });
            }
            let mut data = std::mem::take(&mut self.data);
            data.resize(header.length as usize, 0);
            let read = self.read_exact(&mut data);
            self.data = data;
            read?;
            if header.reply_type == REP_ACK {
                return Ok(Final::Ack);
            }
            if is_option_error(header.reply_type) {
                let message = String::from_utf8_lossy(&self.data).into_owned();
                return Ok(Final::Error {
                    reply_type: header.reply_type,
                    message,
                });
            }
            each(&self.data, header.reply_type, option)?;
        }
        Err(HandshakeError::TooManyReplies { option })
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), HandshakeError> {
        self.input
            .read_exact(buf)
            .map_err(|error| match error.kind() {
                io::ErrorKind::UnexpectedEof if self.tls => HandshakeError::ClosedAfterTls,
                io::ErrorKind::UnexpectedEof => HandshakeError::Closed,
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => match self.timeout {
                    Some(limit) => HandshakeError::TimedOut { limit },
                    None => HandshakeError::Io(error),
                },
                _ => HandshakeError::Io(error),
            })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), HandshakeError> {
        self.output.write_all(bytes).map_err(HandshakeError::Io)
    }
}

/// The information in one INFO reply this client uses.
#[derive(Debug, PartialEq, Eq)]
enum Info {
    Export {
        size_bytes: u64,
        flags: u16,
    },
    BlockSizes(BlockSizes),
    /// A type the client does not use, which the spec says to ignore.
    Other,
}

/// An INFO reply to GO: u16 type, then the type's fixed-size payload.
fn parse_info(option: u32, reply_type: u32, data: &[u8]) -> Result<Info, HandshakeError> {
    let bad = |what| HandshakeError::BadReply {
        option,
        reply_type,
        what,
    };
    if reply_type != REP_INFO {
        return Err(bad("only INFO, ACK or an error is expected"));
    }
    if data.len() < 2 {
        return Err(bad("an INFO reply without its type"));
    }
    match be16(&data[0..2]) {
        INFO_EXPORT if data.len() == 12 => Ok(Info::Export {
            size_bytes: be64(&data[2..10]),
            flags: be16(&data[10..12]),
        }),
        INFO_EXPORT => Err(bad("NBD_INFO_EXPORT must be 12 bytes")),
        INFO_BLOCK_SIZE if data.len() == 14 => {
            let (minimum, preferred, maximum) =
                (be32(&data[2..6]), be32(&data[6..10]), be32(&data[10..14]));
            BlockSizes::from_server(minimum, preferred, maximum)
                .map(Info::BlockSizes)
                .ok_or(HandshakeError::BadBlockSizes {
                    minimum,
                    preferred,
                    maximum,
                })
        }
        INFO_BLOCK_SIZE => Err(bad("NBD_INFO_BLOCK_SIZE must be 14 bytes")),
        _ => Ok(Info::Other),
    }
}

/// SET/LIST_META_CONTEXT data: export name, then the queries, each a
/// u32-length-prefixed string.
fn meta_context_data(export_name: &str, queries: &[String]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&(export_name.len() as u32).to_be_bytes());
    data.extend_from_slice(export_name.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        data.extend_from_slice(&(query.len() as u32).to_be_bytes());
        data.extend_from_slice(query.as_bytes());
    }
    data
}

/// A META_CONTEXT reply: u32 id, then the name filling the rest.
fn parse_meta_context(
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> Result<(u32, String), HandshakeError> {
    let bad = |what| HandshakeError::BadReply {
        option,
        reply_type,
        what,
    };
    if reply_type != REP_META_CONTEXT {
        return Err(bad("only META_CONTEXT, ACK or an error is expected"));
    }
    if data.len() < 4 || data.len() - 4 > STRING_MAX {
        return Err(bad(
            "a META_CONTEXT reply needs an id and a name of at most 4096 bytes",
        ));
    }
    let name = String::from_utf8(data[4..].to_vec())
        .map_err(|_| bad("a context name that is not UTF-8"))?;
    Ok((be32(&data[0..4]), name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_context_data_is_byte_exact() {
        let data = meta_context_data("d", &["base:allocation".to_string()]);
        let mut expected = vec![0, 0, 0, 1, b'd', 0, 0, 0, 1, 0, 0, 0, 15];
        expected.extend_from_slice(b"base:allocation");
        assert_eq!(data, expected);
    }

    #[test]
    fn meta_context_replies_are_checked() {
        let mut data = 5u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"qemu:dirty-bitmap:b");
        assert_eq!(
            parse_meta_context(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &data).unwrap(),
            (5, "qemu:dirty-bitmap:b".to_string())
        );
        for (reply_type, data) in [
            (REP_META_CONTEXT, vec![0u8, 0, 1]),
            (REP_META_CONTEXT, vec![0, 0, 0, 1, 0xff]),
            (REP_INFO, vec![0, 0, 0, 1, b'x']),
        ] {
            assert!(
                matches!(
                    parse_meta_context(OPT_SET_META_CONTEXT, reply_type, &data),
                    Err(HandshakeError::BadReply { .. })
                ),
                "{data:?}"
            );
        }
    }

    #[test]
    fn info_replies_are_parsed_and_checked() {
        let export = [0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x03];
        assert_eq!(
            parse_info(OPT_GO, REP_INFO, &export).unwrap(),
            Info::Export {
                size_bytes: 4096,
                flags: 3
            }
        );
        let sizes = [0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0, 0x20, 0, 0];
        assert_eq!(
            parse_info(OPT_GO, REP_INFO, &sizes).unwrap(),
            Info::BlockSizes(BlockSizes::from_server(512, 4096, 2 << 20).unwrap())
        );
        assert_eq!(
            parse_info(OPT_GO, REP_INFO, &[0, 2, b'h', b'i']).unwrap(),
            Info::Other
        );
        let cases: [(u32, &[u8]); 5] = [
            (REP_INFO, &[0]),
            (REP_INFO, &export[..11]),
            (REP_INFO, &sizes[..13]),
            (REP_META_CONTEXT, &export),
            // A minimum block size that is not a power of two.
            (REP_INFO, &[0, 3, 0, 0, 2, 1, 0, 0, 0x10, 0, 0, 0x20, 0, 0]),
        ];
        for (reply_type, data) in cases {
            assert!(parse_info(OPT_GO, reply_type, data).is_err(), "{data:?}");
        }
    }

    #[test]
    fn refusals_name_the_option_and_reply() {
        let error = HandshakeError::Refused {
            option: OPT_GO,
            reply_type: REP_ERR_POLICY,
            message: "go away".into(),
        };
        assert_eq!(
            error.to_string(),
            "the server refused GO with ERR_POLICY: go away"
        );
        assert_eq!(reply_name(0x8000_00ff), "an unknown error");
    }
}
