//! Errors, one enum per operation: `ConnectError` (URI, socket, handshake),
//! `CommandError` (one command, naming it with its offset and length), and
//! `ConnectionError` with `ProtocolError` for why a connection ended.
//!
//! An error the server reports for one command is a value and the
//! connection goes on; a protocol violation by the server, or a broken
//! socket, ends the connection and fails every request in flight with the
//! same shared `ConnectionError`.

use std::io;
use std::sync::Arc;

use nbd_server::proto::{NbdError, ReplyFrameError};

use crate::handshake::HandshakeError;
use crate::tls::TlsSetupError;
use crate::uri::UriError;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid NBD URI: {0}")]
    Uri(#[from] UriError),
    #[error("invalid connect options: {0}")]
    Options(String),
    #[error("cannot set up TLS: {0}")]
    Tls(Box<TlsSetupError>),
    #[error("cannot connect to {address}: {source}")]
    Connect { address: String, source: io::Error },
    #[error("NBD handshake with {address} failed: {source}")]
    Handshake {
        address: String,
        source: HandshakeError,
    },
}

/// The commands, as errors name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
}

impl Command {
    pub fn wire(self) -> u16 {
        use nbd_server::proto::*;
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disconnect => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
        }
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Read => "READ",
            Command::Write => "WRITE",
            Command::Disconnect => "DISC",
            Command::Flush => "FLUSH",
            Command::Trim => "TRIM",
            Command::WriteZeroes => "WRITE_ZEROES",
            Command::BlockStatus => "BLOCK_STATUS",
        })
    }
}

/// One command failed. For commands split into several requests, the
/// offset and length are those of the request that failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("NBD {command} of {length_bytes} bytes at offset {offset_bytes}: {failure}")]
pub struct CommandError {
    pub command: Command,
    pub offset_bytes: u64,
    pub length_bytes: u64,
    #[source]
    pub failure: CommandFailure,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CommandFailure {
    /// The server answered with an error; the connection goes on.
    #[error("the server answered {} ({code}){}{}", error.name(),
        error_offset_bytes.map(|o| format!(" at offset {o}")).unwrap_or_default(),
        if message.is_empty() { String::new() } else { format!(": {message}") })]
    Server {
        /// The error as the spec names it (unknown values read as EINVAL).
        error: NbdError,
        /// The value on the wire.
        code: u32,
        message: String,
        /// Where the error happened, from an ERROR_OFFSET chunk.
        error_offset_bytes: Option<u64>,
    },
    /// The connection ended before the reply came (or before sending).
    #[error("the connection is gone: {0}")]
    Connection(Arc<ConnectionError>),
    #[error("the export does not support {what}")]
    Unsupported { what: &'static str },
    #[error("the export is read-only")]
    ReadOnly,
    #[error("the request runs past the end of the export ({size_bytes} bytes)")]
    OutOfRange { size_bytes: u64 },
    #[error(
        "offset and length must be multiples of the server's minimum block size ({minimum_bytes} bytes)"
    )]
    Misaligned { minimum_bytes: u64 },
    #[error(
        "one request may cover at most {maximum_bytes} bytes here; read_at, write_at, trim and write_zeroes split larger ranges"
    )]
    TooLarge { maximum_bytes: u64 },
    #[error("flags {flags:#x} are not valid for this command")]
    FlagNotValid { flags: u16 },
    #[error("metadata context {context:?} was not negotiated (see ConnectOptions)")]
    NoContext { context: String },
    #[error("the server is shutting down (ESHUTDOWN): close this client and connect again")]
    ServerShuttingDown,
}

/// Why a connection can carry no more requests.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("i/o error on the socket: {0}")]
    Io(io::Error),
    #[error("the server closed the connection{}", if *mid_reply { " in the middle of a reply" } else { "" })]
    ServerClosed { mid_reply: bool },
    #[error("the server broke the protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the client closed the connection")]
    Closed,
    #[error("the reply reader stopped without answering (a bug in nbd-client)")]
    ReaderLost,
}

/// Something the server sent that the spec does not allow. The client
/// cannot trust the stream after one, so it hangs up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("{0}")]
    Frame(#[from] ReplyFrameError),
    #[error("a reply for cookie {cookie:#x}, which no request in flight has")]
    UnknownCookie { cookie: u64 },
    #[error("a simple reply where extended headers were negotiated")]
    SimpleReplyWithExtendedHeaders,
    #[error("a successful simple reply to READ although structured replies were negotiated")]
    SimpleReplyToStructuredRead,
    #[error("a simple reply after structured chunks for the same request (cookie {cookie:#x})")]
    SimpleReplyAfterChunks { cookie: u64 },
    #[error("a simple reply to BLOCK_STATUS, which needs status chunks")]
    SimpleReplyToBlockStatus,
    #[error("chunk type {chunk_type} in reply to {command}, which it is not valid for")]
    UnexpectedChunk { chunk_type: u16, command: Command },
    #[error(
        "chunk type {chunk_type} with {length_bytes} bytes of payload, which its type does not allow"
    )]
    BadChunkLength { chunk_type: u16, length_bytes: u64 },
    #[error(
        "chunk type {chunk_type} with {length_bytes} bytes of payload; at most {limit_bytes} are allowed"
    )]
    ChunkTooLong {
        chunk_type: u16,
        length_bytes: u64,
        limit_bytes: u64,
    },
    #[error("an extended reply header echoes offset {echoed} for a request at offset {requested}")]
    OffsetNotEchoed { echoed: u64, requested: u64 },
    #[error("a NONE chunk without the DONE flag")]
    NoneWithoutDone,
    #[error(
        "chunk covers {length_bytes} bytes at offset {offset_bytes}, outside the request's {request_length_bytes} bytes at {request_offset_bytes}"
    )]
    ChunkOutsideRequest {
        offset_bytes: u64,
        length_bytes: u64,
        request_offset_bytes: u64,
        request_length_bytes: u64,
    },
    #[error("chunk at offset {offset_bytes} overlaps data already sent for the same READ")]
    OverlappingChunk { offset_bytes: u64 },
    #[error("a READ reply in more than {limit} separate pieces")]
    TooFragmented { limit: usize },
    #[error("a hole of zero bytes")]
    EmptyHole,
    #[error("READ reply ended after {covered_bytes} of {length_bytes} bytes, without an error")]
    IncompleteRead {
        covered_bytes: u64,
        length_bytes: u64,
    },
    #[error("status for metadata context id {id}, which was not negotiated")]
    UnknownContext { id: u32 },
    #[error("two status chunks for metadata context id {id} in one reply")]
    RepeatedContext { id: u32 },
    #[error("BLOCK_STATUS reply without status for metadata context {context:?}")]
    MissingContext { context: String },
    #[error("a block status descriptor with length zero")]
    EmptyExtent,
    #[error("a BLOCK_STATUS_EXT chunk says {count} descriptors but carries {carried}")]
    DescriptorCountMismatch { count: u32, carried: u64 },
    #[error("an error chunk with error value zero")]
    ErrorChunkWithoutError,
    #[error(
        "an error chunk whose message ({message_bytes} bytes) does not fit its {length_bytes} bytes"
    )]
    ErrorMessageTooLong {
        message_bytes: usize,
        length_bytes: u64,
    },
}

impl From<CommandError> for io::Error {
    /// For callers that speak `io::Error`: the kind follows the NBD error
    /// (ENOSPC is `StorageFull`, EPERM `PermissionDenied`, ...), and the
    /// `CommandError` stays inside with the full context.
    fn from(error: CommandError) -> io::Error {
        let kind = match &error.failure {
            CommandFailure::Server { error, .. } => match error {
                NbdError::Perm => io::ErrorKind::PermissionDenied,
                NbdError::Io => io::ErrorKind::Other,
                NbdError::NoMem => io::ErrorKind::OutOfMemory,
                NbdError::Inval | NbdError::Overflow => io::ErrorKind::InvalidInput,
                NbdError::NoSpc => io::ErrorKind::StorageFull,
                NbdError::NotSup => io::ErrorKind::Unsupported,
                NbdError::Shutdown => io::ErrorKind::ConnectionAborted,
            },
            CommandFailure::Connection(connection) => match &**connection {
                ConnectionError::Io(io) => io.kind(),
                ConnectionError::ServerClosed { .. } => io::ErrorKind::ConnectionReset,
                ConnectionError::Protocol(_) => io::ErrorKind::InvalidData,
                ConnectionError::Closed | ConnectionError::ReaderLost => {
                    io::ErrorKind::NotConnected
                }
            },
            CommandFailure::Unsupported { .. } => io::ErrorKind::Unsupported,
            CommandFailure::ReadOnly => io::ErrorKind::ReadOnlyFilesystem,
            CommandFailure::OutOfRange { .. }
            | CommandFailure::Misaligned { .. }
            | CommandFailure::TooLarge { .. }
            | CommandFailure::FlagNotValid { .. }
            | CommandFailure::NoContext { .. } => io::ErrorKind::InvalidInput,
            CommandFailure::ServerShuttingDown => io::ErrorKind::ConnectionAborted,
        };
        io::Error::new(kind, error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command_error(failure: CommandFailure) -> CommandError {
        CommandError {
            command: Command::Write,
            offset_bytes: 4096,
            length_bytes: 512,
            failure,
        }
    }

    #[test]
    fn server_errors_name_the_command_offset_length_and_message() {
        let error = command_error(CommandFailure::Server {
            error: NbdError::NoSpc,
            code: 28,
            message: "disk full".into(),
            error_offset_bytes: Some(4200),
        });
        assert_eq!(
            error.to_string(),
            "NBD WRITE of 512 bytes at offset 4096: the server answered ENOSPC (28) at offset 4200: disk full"
        );
        assert_eq!(io::Error::from(error).kind(), io::ErrorKind::StorageFull);
    }

    #[test]
    fn io_error_kinds_follow_the_failure() {
        let cases = [
            (CommandFailure::ReadOnly, io::ErrorKind::ReadOnlyFilesystem),
            (
                CommandFailure::Unsupported { what: "TRIM" },
                io::ErrorKind::Unsupported,
            ),
            (
                CommandFailure::Connection(Arc::new(ConnectionError::Protocol(
                    ProtocolError::EmptyHole,
                ))),
                io::ErrorKind::InvalidData,
            ),
            (
                CommandFailure::Server {
                    error: NbdError::Perm,
                    code: 1,
                    message: String::new(),
                    error_offset_bytes: None,
                },
                io::ErrorKind::PermissionDenied,
            ),
        ];
        for (failure, kind) in cases {
            let error = io::Error::from(command_error(failure));
            assert_eq!(error.kind(), kind, "{error}");
        }
    }
}
