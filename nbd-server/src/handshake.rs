//! Fixed newstyle negotiation: greeting, client flags, then option haggling
//! until EXPORT_NAME or a successful GO (or the client leaves), with
//! STARTTLS in between when TLS is on (`TlsMode`).
//!
//! Every option length is checked against `OPTION_LEN_MAX` before its data is
//! read; malformed option data gets `NBD_REP_ERR_INVALID` and the handshake
//! goes on, as the spec asks. Only a broken frame (bad magic, oversized
//! option, unknown client flags) ends the connection.
//!
//! TLS (doc/proto.md "TLS support"): with `require` every option but
//! STARTTLS and ABORT gets `NBD_REP_ERR_TLS_REQD` until TLS is up, and
//! EXPORT_NAME, which cannot be answered with an error, ends the
//! connection. A STARTTLS that succeeds forgets what was negotiated before
//! it (structured replies, extended headers, meta contexts), as the spec
//! says; the caller runs the TLS handshake and then calls `haggle` again
//! over the encrypted stream.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::buffers::InBuf;
use crate::export::{Export, Exports};
use crate::proto::*;
use crate::tls::TlsMode;

/// What the handshake agreed on, ready for the transmission phase.
#[derive(Debug)]
pub struct Session {
    pub export: Arc<Export>,
    pub mode: ReplyMode,
    pub transmission_flags: u16,
    /// Selected metadata contexts: (id sent to the client, context name).
    pub contexts: Vec<(u32, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("i/o during handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("client sent unknown flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("bad option magic {0:#x}")]
    BadOptionMagic(u64),
    #[error("option {option} of {length} bytes is larger than {OPTION_LEN_MAX}")]
    OptionTooLarge { option: u32, length: u32 },
    #[error("more than {OPTION_COUNT_MAX} options")]
    TooManyOptions,
    #[error("client asked for unknown export {0:?} with EXPORT_NAME")]
    UnknownExport(String),
    #[error("client used EXPORT_NAME after negotiating extended headers")]
    ExportNameWithExtendedHeaders,
    #[error("client used option {0} without fixed newstyle")]
    NotFixedNewstyle(u32),
    #[error("client used EXPORT_NAME without TLS, which this server requires")]
    ExportNameWithoutTls,
    #[error(
        "client sent {length_bytes} bytes after STARTTLS before the TLS handshake (they could be an attacker's)"
    )]
    BytesBeforeTls { length_bytes: usize },
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
}

/// Negotiation state kept between options (and across STARTTLS).
#[derive(Debug, Default)]
pub struct Negotiation {
    no_zeroes: bool,
    fixed: bool,
    structured: bool,
    extended: bool,
    /// Export the last SET_META_CONTEXT named, and what it selected.
    meta_export: Option<Arc<Export>>,
    contexts: Vec<(u32, String)>,
    /// Whether STARTTLS succeeded: the rest runs over TLS.
    tls: bool,
}

impl Negotiation {
    fn mode(&self) -> ReplyMode {
        if self.extended {
            ReplyMode::Extended
        } else if self.structured {
            ReplyMode::Structured
        } else {
            ReplyMode::Simple
        }
    }

    /// Whether the rest of this connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// After STARTTLS: nothing negotiated in plaintext survives (an
    /// attacker could have chosen it); the greeting's flags do.
    fn start_tls(&mut self) {
        *self = Negotiation {
            no_zeroes: self.no_zeroes,
            fixed: self.fixed,
            tls: true,
            ..Negotiation::default()
        };
    }
}

/// How option haggling ended.
#[derive(Debug)]
pub enum Haggled {
    /// The client left cleanly (ABORT or EOF).
    Left,
    Transmit(Session),
    /// STARTTLS was acknowledged: the caller runs the TLS handshake, then
    /// calls `haggle` again over it with the same `Negotiation`.
    StartTls,
}

/// Runs a whole handshake without TLS. `Ok(None)` means the client left
/// cleanly (ABORT or EOF).
pub async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    input: &mut InBuf,
    exports: &Exports,
) -> Result<Option<Session>, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(mut state) = greet(reader, writer, input).await? else {
        return Ok(None);
    };
    match haggle(reader, writer, input, exports, TlsMode::Off, &mut state).await? {
        Haggled::Transmit(session) => Ok(Some(session)),
        Haggled::Left => Ok(None),
        Haggled::StartTls => unreachable!("STARTTLS is refused with TLS off"),
    }
}

/// Sends the greeting and reads the client's flags. `Ok(None)`: the
/// client left.
pub async fn greet<R, W>(
    reader: &mut R,
    writer: &mut W,
    input: &mut InBuf,
) -> Result<Option<Negotiation>, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    writer.write_all(&greeting).await?;

    if !input.fill(reader, 4).await? {
        return Ok(None);
    }
    let client_flags = be32(input.available());
    input.consume(4);
    if client_flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0 {
        return Err(HandshakeError::UnknownClientFlags(client_flags));
    }
    Ok(Some(Negotiation {
        no_zeroes: client_flags & CLIENT_FLAG_NO_ZEROES != 0,
        fixed: client_flags & CLIENT_FLAG_FIXED_NEWSTYLE != 0,
        ..Negotiation::default()
    }))
}

/// Option haggling until the client leaves, enters transmission, or (with
/// `tls` on or required) STARTTLS is acknowledged.
pub async fn haggle<R, W>(
    reader: &mut R,
    writer: &mut W,
    input: &mut InBuf,
    exports: &Exports,
    tls: TlsMode,
    state: &mut Negotiation,
) -> Result<Haggled, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    for _ in 0..OPTION_COUNT_MAX {
        if !input.fill(reader, 16).await? {
            return Ok(Haggled::Left);
        }
        let header = input.available();
        let magic = be64(&header[0..8]);
        let option = be32(&header[8..12]);
        let length = be32(&header[12..16]);
        input.consume(16);
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        if length > OPTION_LEN_MAX {
            let mut out = Vec::new();
            error_reply(&mut out, option, REP_ERR_TOO_BIG, "option data too large");
            writer.write_all(&out).await?;
            return Err(HandshakeError::OptionTooLarge { option, length });
        }
        if !state.fixed && option != OPT_EXPORT_NAME {
            return Err(HandshakeError::NotFixedNewstyle(option));
        }
        if !input.fill(reader, length as usize).await? {
            return Ok(Haggled::Left);
        }
        let data = input.available()[..length as usize].to_vec();
        input.consume(length as usize);

        let mut out = Vec::new();
        let outcome = handle_option(state, exports, tls, option, &data, &mut out)?;
        writer.write_all(&out).await?;
        // Over TLS the reply may still sit in rustls; the client waits for it.
        writer.flush().await?;
        match outcome {
            Outcome::Continue => {}
            Outcome::Abort => return Ok(Haggled::Left),
            Outcome::StartTls => return Ok(Haggled::StartTls),
            Outcome::Transmit(export) => {
                let contexts = match &state.meta_export {
                    Some(meta) if Arc::ptr_eq(meta, &export) => std::mem::take(&mut state.contexts),
                    _ => Vec::new(),
                };
                return Ok(Haggled::Transmit(Session {
                    transmission_flags: transmission_flags(&export, state),
                    mode: state.mode(),
                    export,
                    contexts,
                }));
            }
        }
    }
    Err(HandshakeError::TooManyOptions)
}

enum Outcome {
    Continue,
    Abort,
    StartTls,
    Transmit(Arc<Export>),
}

fn handle_option(
    state: &mut Negotiation,
    exports: &Exports,
    tls: TlsMode,
    option: u32,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<Outcome, HandshakeError> {
    let tls_required = tls == TlsMode::Require && !state.tls;
    if tls_required && option != OPT_STARTTLS && option != OPT_ABORT {
        if option == OPT_EXPORT_NAME {
            // It has no error reply: the spec says to end the session.
            return Err(HandshakeError::ExportNameWithoutTls);
        }
        error_reply(
            out,
            option,
            REP_ERR_TLS_REQD,
            "this server requires TLS: send NBD_OPT_STARTTLS first (an nbds:// URI)",
        );
        return Ok(Outcome::Continue);
    }
    match option {
        OPT_EXPORT_NAME => {
            if state.extended {
                return Err(HandshakeError::ExportNameWithExtendedHeaders);
            }
            let name = String::from_utf8_lossy(data).into_owned();
            let Some(export) = exports.find(&name) else {
                return Err(HandshakeError::UnknownExport(name));
            };
            out.extend_from_slice(&export.backend.size_bytes().to_be_bytes());
            out.extend_from_slice(&transmission_flags(&export, state).to_be_bytes());
            if !state.no_zeroes {
                out.extend_from_slice(&[0u8; 124]);
            }
            Ok(Outcome::Transmit(export))
        }
        OPT_ABORT => {
            put_option_reply_header(out, option, REP_ACK, 0);
            Ok(Outcome::Abort)
        }
        OPT_LIST => {
            if !data.is_empty() {
                error_reply(out, option, REP_ERR_INVALID, "LIST takes no data");
                return Ok(Outcome::Continue);
            }
            for export in exports.list().iter() {
                let name = export.name.as_bytes();
                put_option_reply_header(out, option, REP_SERVER, 4 + name.len() as u32);
                out.extend_from_slice(&(name.len() as u32).to_be_bytes());
                out.extend_from_slice(name);
            }
            put_option_reply_header(out, option, REP_ACK, 0);
            Ok(Outcome::Continue)
        }
        OPT_STARTTLS => Ok(start_tls(state, tls, data, out)),
        OPT_INFO | OPT_GO => Ok(info_or_go(state, exports, option, data, out)),
        OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                error_reply(
                    out,
                    option,
                    REP_ERR_INVALID,
                    "STRUCTURED_REPLY takes no data",
                );
            } else if state.extended {
                error_reply(
                    out,
                    option,
                    REP_ERR_EXT_HEADER_REQD,
                    "extended headers are already negotiated",
                );
            } else {
                state.structured = true;
                put_option_reply_header(out, option, REP_ACK, 0);
            }
            Ok(Outcome::Continue)
        }
        OPT_EXTENDED_HEADERS => {
            if !data.is_empty() {
                error_reply(
                    out,
                    option,
                    REP_ERR_INVALID,
                    "EXTENDED_HEADERS takes no data",
                );
            } else {
                state.extended = true;
                put_option_reply_header(out, option, REP_ACK, 0);
            }
            Ok(Outcome::Continue)
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            meta_context(state, exports, option, data, out);
            Ok(Outcome::Continue)
        }
        _ => {
            error_reply(out, option, REP_ERR_UNSUP, "option not supported");
            Ok(Outcome::Continue)
        }
    }
}

/// NBD_OPT_STARTTLS: acknowledged once, when TLS is on or required.
fn start_tls(state: &mut Negotiation, tls: TlsMode, data: &[u8], out: &mut Vec<u8>) -> Outcome {
    let refusal = if !data.is_empty() {
        Some((REP_ERR_INVALID, "STARTTLS takes no data"))
    } else if state.tls {
        Some((REP_ERR_INVALID, "TLS is already negotiated"))
    } else if tls == TlsMode::Off {
        // POLICY rather than UNSUP: the server knows the option, its
        // operator turned TLS off (doc/proto.md "NOTLS mode").
        Some((
            REP_ERR_POLICY,
            "TLS is not enabled on this server (serve --tls=on or --tls=require)",
        ))
    } else {
        None
    };
    if let Some((reply_type, message)) = refusal {
        error_reply(out, OPT_STARTTLS, reply_type, message);
        return Outcome::Continue;
    }
    put_option_reply_header(out, OPT_STARTTLS, REP_ACK, 0);
    state.start_tls();
    Outcome::StartTls
}

/// NBD_OPT_INFO and NBD_OPT_GO share their request and reply formats.
fn info_or_go(
    state: &mut Negotiation,
    exports: &Exports,
    option: u32,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Outcome {
    let Some((name, requests)) = parse_info_request(data) else {
        error_reply(out, option, REP_ERR_INVALID, "malformed INFO/GO request");
        return Outcome::Continue;
    };
    let Some(export) = exports.find(&name) else {
        let message = format!("no export named {name:?} (see nbdinfo --list)");
        error_reply(out, option, REP_ERR_UNKNOWN, &message);
        return Outcome::Continue;
    };
    let flags = transmission_flags(&export, state);
    let mut info = Vec::with_capacity(64);
    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&export.backend.size_bytes().to_be_bytes());
    info.extend_from_slice(&flags.to_be_bytes());
    put_info(out, option, &info);
    // Size constraints are always sent: they are the defaults, and telling
    // clients the maximum payload saves them from guessing.
    info.clear();
    info.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    info.extend_from_slice(&BLOCK_SIZE_MIN.to_be_bytes());
    info.extend_from_slice(&BLOCK_SIZE_PREFERRED.to_be_bytes());
    info.extend_from_slice(&PAYLOAD_ADVERTISED.to_be_bytes());
    put_info(out, option, &info);
    if requests.contains(&INFO_NAME) {
        info.clear();
        info.extend_from_slice(&INFO_NAME.to_be_bytes());
        info.extend_from_slice(export.name.as_bytes());
        put_info(out, option, &info);
    }
    if requests.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
        info.clear();
        info.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
        info.extend_from_slice(export.description.as_bytes());
        put_info(out, option, &info);
    }
    put_option_reply_header(out, option, REP_ACK, 0);
    if option == OPT_GO {
        Outcome::Transmit(export)
    } else {
        Outcome::Continue
    }
}

fn put_info(out: &mut Vec<u8>, option: u32, info: &[u8]) {
    put_option_reply_header(out, option, REP_INFO, info.len() as u32);
    out.extend_from_slice(info);
}

/// Parses INFO/GO data: u32 name length, name, u16 count, count x u16.
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut cursor = Cursor { data };
    let name = cursor.string()?;
    let count = cursor.u16()? as usize;
    if cursor.data.len() != count * 2 {
        return None;
    }
    let requests = (0..count)
        .map(|_| cursor.u16())
        .collect::<Option<Vec<u16>>>()?;
    Some((name, requests))
}

/// LIST_META_CONTEXT and SET_META_CONTEXT: u32 name length, name, u32
/// query count, queries (each u32 length + string).
fn meta_context(
    state: &mut Negotiation,
    exports: &Exports,
    option: u32,
    data: &[u8],
    out: &mut Vec<u8>,
) {
    let is_set = option == OPT_SET_META_CONTEXT;
    if is_set {
        // A SET replaces the previous selection even when it fails.
        state.meta_export = None;
        state.contexts.clear();
    }
    if !state.structured && !state.extended {
        error_reply(
            out,
            option,
            REP_ERR_INVALID,
            "negotiate structured replies or extended headers first",
        );
        return;
    }
    let Some((name, queries)) = parse_meta_request(data) else {
        error_reply(
            out,
            option,
            REP_ERR_INVALID,
            "malformed meta context request",
        );
        return;
    };
    let Some(export) = exports.find(&name) else {
        let message = format!("no export named {name:?}");
        error_reply(out, option, REP_ERR_UNKNOWN, &message);
        return;
    };
    let available = export.meta_contexts();
    let mut selected: Vec<&String> = Vec::new();
    if queries.is_empty() && !is_set {
        selected.extend(available.iter());
    }
    for query in &queries {
        for context in &available {
            let matches = context == query
                || (!is_set && query.ends_with(':') && context.starts_with(query.as_str()));
            if matches && !selected.contains(&context) {
                selected.push(context);
            }
        }
    }
    for (index, context) in selected.iter().enumerate() {
        let id = if is_set { index as u32 + 1 } else { 0 };
        put_option_reply_header(out, option, REP_META_CONTEXT, 4 + context.len() as u32);
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(context.as_bytes());
        if is_set {
            state.contexts.push((id, (*context).clone()));
        }
    }
    if is_set {
        state.meta_export = Some(export);
    }
    put_option_reply_header(out, option, REP_ACK, 0);
}

fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut cursor = Cursor { data };
    let name = cursor.string()?;
    let count = cursor.u32()?;
    if count > META_QUERY_COUNT_MAX {
        return None;
    }
    let queries = (0..count)
        .map(|_| cursor.string())
        .collect::<Option<Vec<String>>>()?;
    if !cursor.data.is_empty() {
        return None;
    }
    Some((name, queries))
}

/// Reads big-endian fields from option data; `None` when it runs short.
struct Cursor<'a> {
    data: &'a [u8],
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.data.len() < n {
            return None;
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(be16)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(be32)
    }
    /// A u32-length-prefixed UTF-8 string of at most `STRING_MAX` bytes.
    fn string(&mut self) -> Option<String> {
        let length = self.u32()? as usize;
        if length > STRING_MAX {
            return None;
        }
        String::from_utf8(self.take(length)?.to_vec()).ok()
    }
}

fn error_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    put_option_reply_header(out, option, reply_type, message.len() as u32);
    out.extend_from_slice(message.as_bytes());
}

/// Transmission flags for `export`, given what the client negotiated.
fn transmission_flags(export: &Export, state: &Negotiation) -> u16 {
    let backend = &export.backend;
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_CACHE;
    if backend.is_read_only() {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_WRITE_ZEROES;
        if backend.can_trim() {
            flags |= TFLAG_SEND_TRIM;
        }
        if backend.can_fast_zero() {
            flags |= TFLAG_SEND_FAST_ZERO;
        }
    }
    if backend.is_rotational() {
        flags |= TFLAG_ROTATIONAL;
    }
    if backend.can_multi_conn() {
        flags |= TFLAG_CAN_MULTI_CONN;
    }
    if state.structured || state.extended {
        flags |= TFLAG_SEND_DF;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for request in requests {
            data.extend_from_slice(&request.to_be_bytes());
        }
        data
    }

    #[test]
    fn info_request_parses_name_and_requests() {
        let data = info_data("disk", &[INFO_NAME, INFO_BLOCK_SIZE]);
        assert_eq!(
            parse_info_request(&data),
            Some(("disk".to_string(), vec![INFO_NAME, INFO_BLOCK_SIZE]))
        );
    }

    #[test]
    fn info_request_with_name_past_the_end_is_invalid() {
        let mut data = info_data("disk", &[]);
        data[3] = 200;
        assert_eq!(parse_info_request(&data), None);
    }

    #[test]
    fn info_request_with_trailing_bytes_is_invalid() {
        let mut data = info_data("", &[INFO_NAME]);
        data.push(0);
        assert_eq!(parse_info_request(&data), None);
    }

    #[test]
    fn meta_request_refuses_too_many_queries_before_allocating() {
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_request(&data), None);
    }
}
