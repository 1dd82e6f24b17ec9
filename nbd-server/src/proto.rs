//! Wire constants and byte-exact encoders/decoders for the NBD protocol
//! (NetworkBlockDevice doc/proto.md, including the EXTENDED_HEADERS extension).
//!
//! Everything on the wire is big-endian. Decoders take fixed-size arrays so
//! that a short buffer is a compile-time impossibility, and every length read
//! from the wire is checked against a named `*_MAX` before anything is
//! allocated for it.
//!
//! The server uses the request decoders and the reply encoders; the
//! `nbd-client` crate uses the other half (option requests, reply decoders),
//! so that both ends read and write the same bytes through one module.

use crate::buffers::Sink;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The oldstyle handshake's second word (`cliserv_magic`), where newstyle
/// servers send `IHAVEOPT`; clients only recognise it to name it in errors.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERROR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERROR_BIT | 1;
pub const REP_ERR_POLICY: u32 = REP_ERROR_BIT | 2;
pub const REP_ERR_INVALID: u32 = REP_ERROR_BIT | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERROR_BIT | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERROR_BIT | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERROR_BIT | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERROR_BIT | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERROR_BIT | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERROR_BIT | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERROR_BIT | 10;

/// Whether an option reply type is an error (bit 31 set), known or not.
pub fn is_option_error(reply_type: u32) -> bool {
    reply_type & REP_ERROR_BIT != 0
}

// NBD_INFO types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// Whether a chunk type is an error chunk (bit 15 set), known or not: the
/// spec lets a client treat an unknown error chunk as an error and go on.
pub fn is_error_chunk(chunk_type: u16) -> bool {
    chunk_type & (1 << 15) != 0
}

// base:allocation flags: the backend's `Extent` flags go on the wire as they are.
/// The context every server with metadata contexts offers.
pub use crate::export::BASE_ALLOCATION;
pub use backend::{STATE_HOLE, STATE_ZERO};
/// QEMU's dirty-bitmap contexts (qemu docs/interop/nbd.rst): the prefix
/// before a bitmap's name, and the one flag they define.
pub const DIRTY_BITMAP_CONTEXT_PREFIX: &str = "qemu:dirty-bitmap:";
pub const STATE_DIRTY: u32 = 1 << 0;

/// Largest string the protocol allows (export names, context names, queries).
pub const STRING_MAX: usize = 4096;
/// Largest option payload we accept. SET_META_CONTEXT with many queries is
/// the biggest legitimate option; anything larger is refused with TOO_BIG.
pub const OPTION_LEN_MAX: u32 = 64 * 1024;
/// Options one client may send before the handshake is abandoned.
pub const OPTION_COUNT_MAX: u32 = 4096;
/// Meta-context queries accepted in one LIST/SET_META_CONTEXT option.
pub const META_QUERY_COUNT_MAX: u32 = 256;
/// Largest READ/WRITE payload advertised in NBD_INFO_BLOCK_SIZE: the
/// spec's default, which every client expects.
pub const PAYLOAD_ADVERTISED: u32 = 32 * 1024 * 1024;
/// Largest READ/WRITE payload served. A client that never asked for block
/// sizes (NBD_OPT_EXPORT_NAME, or GO without NBD_INFO_BLOCK_SIZE) may send
/// up to 64 MiB, as nbdkit and the reference nbd-server serve; larger
/// READs get an error and larger WRITEs have their payload read and
/// thrown away (`PAYLOAD_DISCARD_MAX`) before theirs.
pub const PAYLOAD_MAX: u32 = 64 * 1024 * 1024;
/// Largest payload read and thrown away to keep a connection whose client
/// sent too large a WRITE (a compact header's length can say no more);
/// beyond it, with extended headers, the connection ends.
pub const PAYLOAD_DISCARD_MAX: u64 = u32::MAX as u64;
/// One data chunk of a structured READ reply carries at most this much,
/// so that a 64 MiB read never sends a chunk over the advertised maximum.
pub const READ_CHUNK_MAX: u64 = PAYLOAD_ADVERTISED as u64;
pub const BLOCK_SIZE_MIN: u32 = 1;
pub const BLOCK_SIZE_PREFERRED: u32 = 4096;
/// Extents in one BLOCK_STATUS chunk (the spec asks for at most 2^20).
pub const EXTENTS_PER_REPLY_MAX: usize = 1 << 20;

/// NBD error values (doc/proto.md "Error values").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdError {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl NbdError {
    /// Maps an OS error to the closest NBD error, as the spec recommends
    /// (EDQUOT and EFBIG become ENOSPC, EROFS becomes EPERM).
    pub fn from_io(error: &std::io::Error) -> NbdError {
        match error.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES) => NbdError::Perm,
            Some(libc::ENOMEM) => NbdError::NoMem,
            Some(libc::EINVAL) => NbdError::Inval,
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => NbdError::NoSpc,
            Some(libc::EOVERFLOW) => NbdError::Overflow,
            Some(libc::EOPNOTSUPP) => NbdError::NotSup,
            Some(libc::ESHUTDOWN) => NbdError::Shutdown,
            _ => NbdError::Io,
        }
    }

    /// Reads an error value from the wire. The spec asks clients to treat
    /// values it does not define as EINVAL; `None` means zero (no error).
    pub fn from_wire(code: u32) -> Option<NbdError> {
        Some(match code {
            0 => return None,
            1 => NbdError::Perm,
            5 => NbdError::Io,
            12 => NbdError::NoMem,
            22 => NbdError::Inval,
            28 => NbdError::NoSpc,
            75 => NbdError::Overflow,
            95 => NbdError::NotSup,
            108 => NbdError::Shutdown,
            _ => NbdError::Inval,
        })
    }

    /// The spec's name for the error, as in "NBD_EPERM" without the prefix.
    pub fn name(self) -> &'static str {
        match self {
            NbdError::Perm => "EPERM",
            NbdError::Io => "EIO",
            NbdError::NoMem => "ENOMEM",
            NbdError::Inval => "EINVAL",
            NbdError::NoSpc => "ENOSPC",
            NbdError::Overflow => "EOVERFLOW",
            NbdError::NotSup => "ENOTSUP",
            NbdError::Shutdown => "ESHUTDOWN",
        }
    }
}

/// A transmission-phase request header, compact (28 bytes) or extended (32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    /// Payload length for WRITE (and PAYLOAD_LEN requests), effect length otherwise.
    pub length: u64,
}

pub const COMPACT_REQUEST_LEN: usize = 28;
pub const EXTENDED_REQUEST_LEN: usize = 32;

/// Why a request header could not be decoded: the connection cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
}

impl RequestHeader {
    pub fn decode_compact(bytes: &[u8; COMPACT_REQUEST_LEN]) -> Result<Self, FrameError> {
        let magic = be32(&bytes[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        Ok(RequestHeader {
            flags: be16(&bytes[4..6]),
            command: be16(&bytes[6..8]),
            cookie: be64(&bytes[8..16]),
            offset: be64(&bytes[16..24]),
            length: u64::from(be32(&bytes[24..28])),
        })
    }

    pub fn decode_extended(bytes: &[u8; EXTENDED_REQUEST_LEN]) -> Result<Self, FrameError> {
        let magic = be32(&bytes[0..4]);
        if magic != EXTENDED_REQUEST_MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        Ok(RequestHeader {
            flags: be16(&bytes[4..6]),
            command: be16(&bytes[6..8]),
            cookie: be64(&bytes[8..16]),
            offset: be64(&bytes[16..24]),
            length: be64(&bytes[24..32]),
        })
    }

    /// Encodes the header as a client would (used by tests and tools).
    pub fn encode(&self, extended: bool, out: &mut Vec<u8>) {
        if extended {
            out.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        } else {
            out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.command.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        if extended {
            out.extend_from_slice(&self.length.to_be_bytes());
        } else {
            let length = u32::try_from(self.length).expect("compact request length fits 32 bits");
            out.extend_from_slice(&length.to_be_bytes());
        }
    }
}

/// How replies are framed on one connection, fixed by the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    Simple,
    Structured,
    Extended,
}

pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_CHUNK_HEADER_LEN: usize = 20;
pub const EXTENDED_CHUNK_HEADER_LEN: usize = 32;

impl ReplyMode {
    pub fn chunk_header_len(self) -> usize {
        match self {
            ReplyMode::Simple => SIMPLE_REPLY_LEN,
            ReplyMode::Structured => STRUCTURED_CHUNK_HEADER_LEN,
            ReplyMode::Extended => EXTENDED_CHUNK_HEADER_LEN,
        }
    }
}

pub fn put_simple_reply<S: Sink + ?Sized>(out: &mut S, error: u32, cookie: u64) {
    out.put(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.put(&error.to_be_bytes());
    out.put(&cookie.to_be_bytes());
}

/// Appends a structured (20-byte) or extended (32-byte) chunk header.
/// `request_offset` is only written in extended mode, where it must echo the
/// request's offset.
pub fn put_chunk_header<S: Sink + ?Sized>(
    out: &mut S,
    mode: ReplyMode,
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    request_offset: u64,
    payload_len: usize,
) {
    match mode {
        ReplyMode::Structured => {
            let len = u32::try_from(payload_len).expect("structured chunk payload fits 32 bits");
            out.put(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            out.put(&flags.to_be_bytes());
            out.put(&chunk_type.to_be_bytes());
            out.put(&cookie.to_be_bytes());
            out.put(&len.to_be_bytes());
        }
        ReplyMode::Extended => {
            out.put(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            out.put(&flags.to_be_bytes());
            out.put(&chunk_type.to_be_bytes());
            out.put(&cookie.to_be_bytes());
            out.put(&request_offset.to_be_bytes());
            out.put(&(payload_len as u64).to_be_bytes());
        }
        ReplyMode::Simple => unreachable!("chunk headers need structured or extended replies"),
    }
}

/// Appends an option reply header (the 20-byte prefix of every option reply).
pub fn put_option_reply_header<S: Sink + ?Sized>(
    out: &mut S,
    option: u32,
    reply_type: u32,
    len: u32,
) {
    out.put(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.put(&option.to_be_bytes());
    out.put(&reply_type.to_be_bytes());
    out.put(&len.to_be_bytes());
}

pub const OPTION_REQUEST_HEADER_LEN: usize = 16;
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// Appends an option request as a client sends it: IHAVEOPT, option, data
/// length, data. Option data never comes near 4 GiB (strings are at most
/// `STRING_MAX` bytes), so a longer `data` is a caller's bug.
pub fn put_option_request<S: Sink + ?Sized>(out: &mut S, option: u32, data: &[u8]) {
    let len = u32::try_from(data.len()).expect("option data fits 32 bits");
    out.put(&IHAVEOPT.to_be_bytes());
    out.put(&option.to_be_bytes());
    out.put(&len.to_be_bytes());
    out.put(data);
}

/// Why a reply header (option or transmission phase) could not be decoded:
/// the client cannot find the next frame, so the connection cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyFrameError {
    #[error("bad option reply magic {0:#018x}")]
    BadOptionReplyMagic(u64),
    #[error("bad reply magic {0:#010x}")]
    BadReplyMagic(u32),
}

/// The 20-byte prefix of every option reply; `length` bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub fn decode(bytes: &[u8; OPTION_REPLY_HEADER_LEN]) -> Result<Self, ReplyFrameError> {
        let magic = be64(&bytes[0..8]);
        if magic != OPTION_REPLY_MAGIC {
            return Err(ReplyFrameError::BadOptionReplyMagic(magic));
        }
        Ok(OptionReplyHeader {
            option: be32(&bytes[8..12]),
            reply_type: be32(&bytes[12..16]),
            length: be32(&bytes[16..20]),
        })
    }
}

/// A simple reply (16 bytes); a READ's data follows it on success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub fn decode(bytes: &[u8; SIMPLE_REPLY_LEN]) -> Result<Self, ReplyFrameError> {
        let magic = be32(&bytes[0..4]);
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(ReplyFrameError::BadReplyMagic(magic));
        }
        Ok(SimpleReply {
            error: be32(&bytes[4..8]),
            cookie: be64(&bytes[8..16]),
        })
    }
}

/// A structured (20-byte) or extended (32-byte) reply chunk header;
/// `length` bytes of payload follow. `offset` echoes the request's offset in
/// extended mode and is 0 for structured chunks, which do not carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub chunk_type: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl ChunkHeader {
    pub fn decode_structured(
        bytes: &[u8; STRUCTURED_CHUNK_HEADER_LEN],
    ) -> Result<Self, ReplyFrameError> {
        let magic = be32(&bytes[0..4]);
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(ReplyFrameError::BadReplyMagic(magic));
        }
        Ok(ChunkHeader {
            flags: be16(&bytes[4..6]),
            chunk_type: be16(&bytes[6..8]),
            cookie: be64(&bytes[8..16]),
            offset: 0,
            length: u64::from(be32(&bytes[16..20])),
        })
    }

    pub fn decode_extended(
        bytes: &[u8; EXTENDED_CHUNK_HEADER_LEN],
    ) -> Result<Self, ReplyFrameError> {
        let magic = be32(&bytes[0..4]);
        if magic != EXTENDED_REPLY_MAGIC {
            return Err(ReplyFrameError::BadReplyMagic(magic));
        }
        Ok(ChunkHeader {
            flags: be16(&bytes[4..6]),
            chunk_type: be16(&bytes[6..8]),
            cookie: be64(&bytes[8..16]),
            offset: be64(&bytes[16..24]),
            length: be64(&bytes[24..32]),
        })
    }

    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

pub fn be16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes(bytes[..2].try_into().expect("two bytes"))
}

pub fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[..4].try_into().expect("four bytes"))
}

pub fn be64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[..8].try_into().expect("eight bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_request_decodes_byte_exact() {
        let bytes: [u8; 28] = [
            0x25, 0x60, 0x95, 0x13, // magic
            0x00, 0x01, // flags: FUA
            0x00, 0x01, // WRITE
            1, 2, 3, 4, 5, 6, 7, 8, // cookie
            0, 0, 0, 0, 0, 0, 0x10, 0x00, // offset 4096
            0, 0, 0x02, 0x00, // length 512
        ];
        let header = RequestHeader::decode_compact(&bytes).unwrap();
        assert_eq!(
            header,
            RequestHeader {
                flags: CMD_FLAG_FUA,
                command: CMD_WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                length: 512
            }
        );
        let mut encoded = Vec::new();
        header.encode(false, &mut encoded);
        assert_eq!(encoded, bytes);
    }

    #[test]
    fn extended_request_decodes_64_bit_length() {
        let header = RequestHeader {
            flags: 0,
            command: CMD_WRITE_ZEROES,
            cookie: 7,
            offset: 1 << 40,
            length: 5 << 32,
        };
        let mut encoded = Vec::new();
        header.encode(true, &mut encoded);
        assert_eq!(encoded.len(), EXTENDED_REQUEST_LEN);
        assert_eq!(&encoded[0..4], &[0x21, 0xe4, 0x1c, 0x71]);
        let decoded = RequestHeader::decode_extended(encoded.as_slice().try_into().unwrap());
        assert_eq!(decoded, Ok(header));
    }

    #[test]
    fn bad_magic_is_a_frame_error() {
        let mut bytes = [0u8; 28];
        bytes[0] = 0xde;
        assert_eq!(
            RequestHeader::decode_compact(&bytes),
            Err(FrameError::BadMagic(0xde00_0000))
        );
    }

    #[test]
    fn simple_reply_is_byte_exact() {
        let mut out = Vec::new();
        put_simple_reply(&mut out, 22, 0xaabb);
        assert_eq!(
            out,
            [
                0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0xaa, 0xbb
            ]
        );
    }

    #[test]
    fn structured_chunk_header_is_byte_exact() {
        let mut out = Vec::new();
        put_chunk_header(
            &mut out,
            ReplyMode::Structured,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            9,
            0,
            4104,
        );
        assert_eq!(
            out,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0x10, 0x08
            ]
        );
    }

    #[test]
    fn extended_chunk_header_echoes_offset() {
        let mut out = Vec::new();
        put_chunk_header(
            &mut out,
            ReplyMode::Extended,
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            3,
            0x1000,
            0,
        );
        assert_eq!(out.len(), EXTENDED_CHUNK_HEADER_LEN);
        assert_eq!(&out[0..4], &[0x6e, 0x8a, 0x27, 0x8c]);
        assert_eq!(be64(&out[16..24]), 0x1000);
        assert_eq!(be64(&out[24..32]), 0);
    }

    #[test]
    fn option_reply_header_is_byte_exact() {
        let mut out = Vec::new();
        put_option_reply_header(&mut out, OPT_GO, REP_ERR_UNKNOWN, 0);
        assert_eq!(
            out,
            [
                0, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0x80, 0, 0, 6, 0, 0, 0, 0
            ]
        );
    }

    #[test]
    fn option_request_is_byte_exact() {
        let mut out = Vec::new();
        put_option_request(&mut out, OPT_STRUCTURED_REPLY, b"ab");
        assert_eq!(
            out,
            [
                0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 0, 0, 8, 0, 0, 0, 2, b'a', b'b'
            ]
        );
    }

    #[test]
    fn option_reply_header_round_trips_and_checks_magic() {
        let mut out = Vec::new();
        put_option_reply_header(&mut out, OPT_GO, REP_INFO, 12);
        let bytes: &[u8; OPTION_REPLY_HEADER_LEN] = out.as_slice().try_into().unwrap();
        assert_eq!(
            OptionReplyHeader::decode(bytes),
            Ok(OptionReplyHeader {
                option: OPT_GO,
                reply_type: REP_INFO,
                length: 12
            })
        );
        out[0] = 0xff;
        let bytes: &[u8; OPTION_REPLY_HEADER_LEN] = out.as_slice().try_into().unwrap();
        assert_eq!(
            OptionReplyHeader::decode(bytes),
            Err(ReplyFrameError::BadOptionReplyMagic(0xff03_e889_0455_65a9))
        );
    }

    #[test]
    fn simple_reply_round_trips_and_checks_magic() {
        let mut out = Vec::new();
        put_simple_reply(&mut out, 5, 0x1234);
        let bytes: &[u8; SIMPLE_REPLY_LEN] = out.as_slice().try_into().unwrap();
        assert_eq!(
            SimpleReply::decode(bytes),
            Ok(SimpleReply {
                error: 5,
                cookie: 0x1234
            })
        );
        out[3] = 0;
        let bytes: &[u8; SIMPLE_REPLY_LEN] = out.as_slice().try_into().unwrap();
        assert_eq!(
            SimpleReply::decode(bytes),
            Err(ReplyFrameError::BadReplyMagic(0x6744_6600))
        );
    }

    #[test]
    fn chunk_headers_round_trip_in_both_modes() {
        let mut out = Vec::new();
        put_chunk_header(
            &mut out,
            ReplyMode::Structured,
            0,
            REPLY_TYPE_OFFSET_HOLE,
            7,
            99,
            12,
        );
        let bytes: &[u8; STRUCTURED_CHUNK_HEADER_LEN] = out.as_slice().try_into().unwrap();
        let header = ChunkHeader::decode_structured(bytes).unwrap();
        assert_eq!(
            header,
            ChunkHeader {
                flags: 0,
                chunk_type: REPLY_TYPE_OFFSET_HOLE,
                cookie: 7,
                offset: 0,
                length: 12
            }
        );
        assert!(!header.is_done());

        out.clear();
        put_chunk_header(
            &mut out,
            ReplyMode::Extended,
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            8,
            99,
            0,
        );
        let bytes: &[u8; EXTENDED_CHUNK_HEADER_LEN] = out.as_slice().try_into().unwrap();
        let header = ChunkHeader::decode_extended(bytes).unwrap();
        assert_eq!((header.cookie, header.offset, header.length), (8, 99, 0));
        assert!(header.is_done());
        // A structured magic where an extended header belongs is a frame error.
        out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let bytes: &[u8; EXTENDED_CHUNK_HEADER_LEN] = out.as_slice().try_into().unwrap();
        assert_eq!(
            ChunkHeader::decode_extended(bytes),
            Err(ReplyFrameError::BadReplyMagic(STRUCTURED_REPLY_MAGIC))
        );
    }

    #[test]
    fn wire_errors_decode_with_unknown_values_as_einval() {
        assert_eq!(NbdError::from_wire(0), None);
        for error in [
            NbdError::Perm,
            NbdError::Io,
            NbdError::NoMem,
            NbdError::Inval,
            NbdError::NoSpc,
            NbdError::Overflow,
            NbdError::NotSup,
            NbdError::Shutdown,
        ] {
            assert_eq!(NbdError::from_wire(error as u32), Some(error));
        }
        assert_eq!(NbdError::from_wire(4242), Some(NbdError::Inval));
        assert_eq!(NbdError::NoSpc.name(), "ENOSPC");
    }

    #[test]
    fn error_bits_are_recognised_for_unknown_types() {
        assert!(is_option_error(REP_ERR_UNSUP));
        assert!(is_option_error(REP_ERROR_BIT | 200));
        assert!(!is_option_error(REP_META_CONTEXT));
        assert!(is_error_chunk(REPLY_TYPE_ERROR_OFFSET));
        assert!(is_error_chunk((1 << 15) + 77));
        assert!(!is_error_chunk(REPLY_TYPE_BLOCK_STATUS_EXT));
    }

    #[test]
    fn io_errors_map_to_nbd_errors() {
        let map = |errno| NbdError::from_io(&std::io::Error::from_raw_os_error(errno));
        assert_eq!(map(libc::EDQUOT), NbdError::NoSpc);
        assert_eq!(map(libc::EFBIG), NbdError::NoSpc);
        assert_eq!(map(libc::EROFS), NbdError::Perm);
        assert_eq!(map(libc::EBADF), NbdError::Io);
    }
}
