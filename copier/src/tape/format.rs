//! The tape format's fixed layouts and their codecs (docs/tape.md is the
//! byte-by-byte description). Every integer is little-endian; every
//! length read back is checked against a named `*_MAX` before anything is
//! allocated for it.

use crate::target::Held;

/// The block size a tape gets unless told otherwise (what PBS uses).
pub const BLOCK_SIZE_DEFAULT: u32 = 256 * 1024;
pub const BLOCK_SIZE_MIN: u32 = 4096;
pub const BLOCK_SIZE_MAX: u32 = 4 << 20;
pub const FORMAT_VERSION: u32 = 1;

pub const BLOCK_MAGIC: [u8; 8] = *b"BWTAPEBK";
pub const LABEL_MAGIC: [u8; 8] = *b"BWTAPELB";
pub const RECORD_MAGIC: [u8; 4] = *b"BWTR";

/// magic, session id, sequence, used bytes, crc.
pub const BLOCK_HEADER_BYTES: usize = 40;
const _: () = assert!(BLOCK_HEADER_BYTES == 8 + 16 + 8 + 4 + 4);
/// Where the block crc sits in the block header.
const BLOCK_CRC_AT: usize = 36;
/// magic, version, block size, tape id, chain id, tape sequence,
/// reserved, created, crc.
pub const LABEL_BYTES: usize = 68;
const _: () = assert!(LABEL_BYTES == 8 + 4 + 4 + 16 + 16 + 4 + 4 + 8 + 4);
/// magic, kind, flags, reserved, index, offset, length, stored, data crc,
/// reserved, header crc.
pub const RECORD_HEADER_BYTES: usize = 48;
const _: () = assert!(RECORD_HEADER_BYTES == 4 + 1 + 1 + 2 + 8 + 8 + 8 + 4 + 4 + 4 + 4);
/// session id, extent count, data, zero and stored bytes, file count,
/// record crc, reserved.
pub const TRAILER_BYTES: usize = 64;
const _: () = assert!(TRAILER_BYTES == 16 + 8 + 8 + 8 + 8 + 8 + 4 + 4);
/// The fixed part of a session header, before its three strings.
pub const SESSION_HEADER_FIXED_BYTES: usize = 76;
const _: () = assert!(SESSION_HEADER_FIXED_BYTES == 16 + 16 + 8 + 8 + 8 + 8 + 8 + 1 + 1 + 2);

/// Longest extent data record (uncompressed); writers cut longer data.
pub const EXTENT_DATA_BYTES_MAX: u64 = 4 << 20;
/// Longest session header payload.
pub const SESSION_HEADER_BYTES_MAX: u32 = 4096;
/// Longest source id or checkpoint name.
pub const NAME_BYTES_MAX: usize = 255;
/// Longest files record payload, and the longest path in it.
pub const FILES_BYTES_MAX: u32 = 64 << 20;
pub const PATH_BYTES_MAX: usize = 4096;

/// 128 random bits naming a tape, a chain or a session; never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(pub [u8; 16]);

impl Id {
    pub const NONE: Id = Id([0; 16]);

    /// A fresh id from /dev/urandom.
    pub fn random() -> std::io::Result<Id> {
        let mut bytes = [0u8; 16];
        loop {
            std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
            if bytes != [0; 16] {
                return Ok(Id(bytes));
            }
        }
    }

    pub fn is_none(&self) -> bool {
        self.0 == [0; 16]
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 32 hex digits (what `hex` prints).
    pub fn from_hex(text: &str) -> Option<Id> {
        if text.len() != 32 || !text.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Id(bytes))
    }
}

impl std::fmt::Debug for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

/// A block size is a power of two from 4 KiB to 4 MiB.
pub fn block_size_is_valid(block_size_bytes: u32) -> bool {
    block_size_bytes.is_power_of_two()
        && (BLOCK_SIZE_MIN..=BLOCK_SIZE_MAX).contains(&block_size_bytes)
}

// ---- little-endian helpers ------------------------------------------------

pub(crate) fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes[at..at + 2].try_into().expect("2 bytes"))
}
pub(crate) fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}
pub(crate) fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}
fn id_at(bytes: &[u8], at: usize) -> Id {
    Id(bytes[at..at + 16].try_into().expect("16 bytes"))
}

// ---- blocks ----------------------------------------------------------------

/// What a block header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    /// `Id::NONE` in the label block.
    pub session_id: Id,
    /// The block's number within its session (0 for the label block).
    pub sequence: u64,
    /// Payload bytes after the header that carry records (or the label).
    pub used_bytes: u32,
}

/// The crc32c of a whole block, its crc field left out.
pub fn block_crc(block: &[u8]) -> u32 {
    let head = crc32c::crc32c(&block[..BLOCK_CRC_AT]);
    crc32c::crc32c_append(head, &block[BLOCK_HEADER_BYTES..])
}

/// Writes `header` and the crc of the whole block (payload already in place).
pub fn seal_block(block: &mut [u8], header: &BlockHeader) {
    block[0..8].copy_from_slice(&BLOCK_MAGIC);
    block[8..24].copy_from_slice(&header.session_id.0);
    block[24..32].copy_from_slice(&header.sequence.to_le_bytes());
    block[32..36].copy_from_slice(&header.used_bytes.to_le_bytes());
    let crc = block_crc(block);
    block[BLOCK_CRC_AT..BLOCK_HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    debug_assert!(open_block(block).is_ok(), "a sealed block opens");
}

/// Checks a whole block's magic, crc and used length.
pub fn open_block(block: &[u8]) -> Result<BlockHeader, String> {
    if block.len() < BLOCK_HEADER_BYTES || block[0..8] != BLOCK_MAGIC {
        return Err("no block magic (not a blockwatch tape block)".into());
    }
    let stored = u32_at(block, BLOCK_CRC_AT);
    let actual = block_crc(block);
    if stored != actual {
        return Err(format!(
            "block checksum mismatch (stored {stored:08x}, computed {actual:08x})"
        ));
    }
    let header = BlockHeader {
        session_id: id_at(block, 8),
        sequence: u64_at(block, 24),
        used_bytes: u32_at(block, 32),
    };
    if header.used_bytes as usize > block.len() - BLOCK_HEADER_BYTES {
        return Err(format!(
            "block claims {} used bytes, more than it holds",
            header.used_bytes
        ));
    }
    Ok(header)
}

// ---- label -----------------------------------------------------------------

/// The first block of every tape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub version: u32,
    pub block_size_bytes: u32,
    pub tape_id: Id,
    /// Tapes of one chain share it; `tape_sequence` orders them.
    pub chain_id: Id,
    /// 0 for the first tape of a chain, then 1, 2, ...
    pub tape_sequence: u32,
    pub created_unix_seconds: u64,
}

impl Label {
    pub fn encode(&self) -> [u8; LABEL_BYTES] {
        let mut out = [0u8; LABEL_BYTES];
        out[0..8].copy_from_slice(&LABEL_MAGIC);
        out[8..12].copy_from_slice(&self.version.to_le_bytes());
        out[12..16].copy_from_slice(&self.block_size_bytes.to_le_bytes());
        out[16..32].copy_from_slice(&self.tape_id.0);
        out[32..48].copy_from_slice(&self.chain_id.0);
        out[48..52].copy_from_slice(&self.tape_sequence.to_le_bytes());
        out[56..64].copy_from_slice(&self.created_unix_seconds.to_le_bytes());
        let crc = crc32c::crc32c(&out[..64]);
        out[64..68].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a label's bytes (the label block's payload), crc first.
    pub fn decode(bytes: &[u8]) -> Result<Label, String> {
        if bytes.len() < LABEL_BYTES || bytes[0..8] != LABEL_MAGIC {
            return Err("no label magic: not a blockwatch tape".into());
        }
        if crc32c::crc32c(&bytes[..64]) != u32_at(bytes, 64) {
            return Err("label checksum mismatch".into());
        }
        let label = Label {
            version: u32_at(bytes, 8),
            block_size_bytes: u32_at(bytes, 12),
            tape_id: id_at(bytes, 16),
            chain_id: id_at(bytes, 32),
            tape_sequence: u32_at(bytes, 48),
            created_unix_seconds: u64_at(bytes, 56),
        };
        if label.version != FORMAT_VERSION {
            return Err(format!(
                "tape format version {} (this blockwatch reads {FORMAT_VERSION})",
                label.version
            ));
        }
        if !block_size_is_valid(label.block_size_bytes) {
            return Err(format!(
                "label block size {} is not a power of two from {BLOCK_SIZE_MIN} to {BLOCK_SIZE_MAX}",
                label.block_size_bytes
            ));
        }
        Ok(label)
    }
}

// ---- records -----------------------------------------------------------------

/// The kinds of records in a session's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Header = 1,
    Data = 2,
    Zero = 3,
    Files = 4,
    Trailer = 5,
}

impl RecordKind {
    fn from_byte(byte: u8) -> Option<RecordKind> {
        Some(match byte {
            1 => RecordKind::Header,
            2 => RecordKind::Data,
            3 => RecordKind::Zero,
            4 => RecordKind::Files,
            5 => RecordKind::Trailer,
            _ => return None,
        })
    }
}

/// Record flag: the data payload is one zstd frame.
pub const FLAG_ZSTD: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub flags: u8,
    /// The record's number in its session (the session header is 0).
    pub index: u64,
    pub offset_bytes: u64,
    /// Extents: the range's length; other kinds: the payload's.
    pub length_bytes: u64,
    /// Payload bytes that follow the header on the tape.
    pub stored_bytes: u32,
    /// crc32c of the uncompressed data, or of the payload; 0 for zeroes.
    pub data_crc: u32,
}

impl RecordHeader {
    pub fn encode(&self) -> [u8; RECORD_HEADER_BYTES] {
        let mut out = [0u8; RECORD_HEADER_BYTES];
        out[0..4].copy_from_slice(&RECORD_MAGIC);
        out[4] = self.kind as u8;
        out[5] = self.flags;
        out[8..16].copy_from_slice(&self.index.to_le_bytes());
        out[16..24].copy_from_slice(&self.offset_bytes.to_le_bytes());
        out[24..32].copy_from_slice(&self.length_bytes.to_le_bytes());
        out[32..36].copy_from_slice(&self.stored_bytes.to_le_bytes());
        out[36..40].copy_from_slice(&self.data_crc.to_le_bytes());
        let crc = crc32c::crc32c(&out[..44]);
        out[44..48].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a record header: magic, crc, kind, flags, and
    /// the payload length against its kind's maximum.
    pub fn decode(bytes: &[u8; RECORD_HEADER_BYTES]) -> Result<RecordHeader, String> {
        if bytes[0..4] != RECORD_MAGIC {
            return Err("no record magic".into());
        }
        if crc32c::crc32c(&bytes[..44]) != u32_at(bytes, 44) {
            return Err("record header checksum mismatch".into());
        }
        let kind = RecordKind::from_byte(bytes[4])
            .ok_or_else(|| format!("unknown record kind {}", bytes[4]))?;
        let header = RecordHeader {
            kind,
            flags: bytes[5],
            index: u64_at(bytes, 8),
            offset_bytes: u64_at(bytes, 16),
            length_bytes: u64_at(bytes, 24),
            stored_bytes: u32_at(bytes, 32),
            data_crc: u32_at(bytes, 36),
        };
        header.check()?;
        Ok(header)
    }

    fn check(&self) -> Result<(), String> {
        let stored = u64::from(self.stored_bytes);
        let (max, flags_allowed) = match self.kind {
            RecordKind::Header => (u64::from(SESSION_HEADER_BYTES_MAX), 0),
            RecordKind::Data => (EXTENT_DATA_BYTES_MAX, FLAG_ZSTD),
            RecordKind::Zero => (0, 0),
            RecordKind::Files => (u64::from(FILES_BYTES_MAX), 0),
            RecordKind::Trailer => (TRAILER_BYTES as u64, 0),
        };
        if self.flags & !flags_allowed != 0 {
            return Err(format!("unknown flags {:#x}", self.flags));
        }
        if stored > max {
            return Err(format!("payload of {stored} bytes, over {max}"));
        }
        match self.kind {
            RecordKind::Data if self.length_bytes == 0 || self.length_bytes > max => Err(format!(
                "data extent of {} bytes, not 1 to {max}",
                self.length_bytes
            )),
            RecordKind::Data if self.flags & FLAG_ZSTD == 0 && stored != self.length_bytes => {
                Err("uncompressed data extent whose stored length is not its length".into())
            }
            RecordKind::Zero if self.length_bytes == 0 => Err("empty zero extent".into()),
            RecordKind::Header | RecordKind::Files | RecordKind::Trailer
                if stored != self.length_bytes =>
            {
                Err("stored length is not the record's length".into())
            }
            _ => Ok(()),
        }
    }
}

/// What a session's extents cover, as its trailer records them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SessionTotals {
    pub extent_count: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    /// Extent payload bytes as stored (compressed where it was smaller).
    pub stored_bytes: u64,
    pub file_count: u64,
    /// crc32c over the header crc of every record before the trailer.
    pub record_crc: u32,
}

pub fn encode_trailer(session_id: Id, totals: &SessionTotals) -> [u8; TRAILER_BYTES] {
    let mut out = [0u8; TRAILER_BYTES];
    out[0..16].copy_from_slice(&session_id.0);
    out[16..24].copy_from_slice(&totals.extent_count.to_le_bytes());
    out[24..32].copy_from_slice(&totals.data_bytes.to_le_bytes());
    out[32..40].copy_from_slice(&totals.zero_bytes.to_le_bytes());
    out[40..48].copy_from_slice(&totals.stored_bytes.to_le_bytes());
    out[48..56].copy_from_slice(&totals.file_count.to_le_bytes());
    out[56..60].copy_from_slice(&totals.record_crc.to_le_bytes());
    out
}

pub fn decode_trailer(bytes: &[u8]) -> Result<(Id, SessionTotals), String> {
    if bytes.len() != TRAILER_BYTES {
        return Err(format!(
            "trailer of {} bytes, not {TRAILER_BYTES}",
            bytes.len()
        ));
    }
    Ok((
        id_at(bytes, 0),
        SessionTotals {
            extent_count: u64_at(bytes, 16),
            data_bytes: u64_at(bytes, 24),
            zero_bytes: u64_at(bytes, 32),
            stored_bytes: u64_at(bytes, 40),
            file_count: u64_at(bytes, 48),
            record_crc: u32_at(bytes, 56),
        },
    ))
}

// ---- session header ------------------------------------------------------------

/// How a session's extent data is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None = 0,
    Zstd = 1,
}

/// What a session holds: whose disk, which checkpoint, on top of what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionHeader {
    pub session_id: Id,
    /// The session this one applies on top of; `None` for a full session.
    pub parent: Option<Id>,
    /// The tracker's image id (hex) of the source disk.
    pub source_id: String,
    pub source_size_bytes: u64,
    pub granularity_bytes: u64,
    /// The checkpoint the changes are counted from; `None` for a full.
    pub base: Option<Held>,
    /// The checkpoint whose contents the session brings the disk to.
    pub target: Held,
    pub created_unix_seconds: u64,
    pub compression: Compression,
}

impl SessionHeader {
    pub fn is_full(&self) -> bool {
        self.parent.is_none()
    }

    /// The header record's payload; `None` when a string is too long.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let base_name = self.base.as_ref().map_or("", |b| b.checkpoint.as_str());
        let strings = [
            self.source_id.as_str(),
            base_name,
            self.target.checkpoint.as_str(),
        ];
        if let Some(long) = strings.iter().find(|s| s.len() > NAME_BYTES_MAX) {
            return Err(format!("{long:?} is over {NAME_BYTES_MAX} bytes"));
        }
        let mut out = Vec::with_capacity(SESSION_HEADER_FIXED_BYTES + 3 * (2 + NAME_BYTES_MAX));
        out.extend_from_slice(&self.session_id.0);
        out.extend_from_slice(&self.parent.unwrap_or(Id::NONE).0);
        out.extend_from_slice(&self.source_size_bytes.to_le_bytes());
        out.extend_from_slice(&self.granularity_bytes.to_le_bytes());
        out.extend_from_slice(&self.created_unix_seconds.to_le_bytes());
        out.extend_from_slice(&self.base.as_ref().map_or(0, |b| b.generation).to_le_bytes());
        out.extend_from_slice(&self.target.generation.to_le_bytes());
        out.push(self.compression as u8);
        out.push(u8::from(self.base.is_some()));
        out.extend_from_slice(&[0, 0]);
        for string in strings {
            out.extend_from_slice(&(string.len() as u16).to_le_bytes());
            out.extend_from_slice(string.as_bytes());
        }
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<SessionHeader, String> {
        if bytes.len() < SESSION_HEADER_FIXED_BYTES {
            return Err(format!("session header of {} bytes", bytes.len()));
        }
        let compression = match bytes[72] {
            0 => Compression::None,
            1 => Compression::Zstd,
            other => return Err(format!("unknown compression {other}")),
        };
        let has_base = match bytes[73] {
            0 => false,
            1 => true,
            other => return Err(format!("unknown session flags {other:#x}")),
        };
        let mut at = SESSION_HEADER_FIXED_BYTES;
        let mut strings = Vec::with_capacity(3);
        for _ in 0..3 {
            let length = bytes
                .get(at..at + 2)
                .map(|b| usize::from(u16_at(b, 0)))
                .ok_or("session header ends inside a string")?;
            at += 2;
            if length > NAME_BYTES_MAX {
                return Err(format!("string of {length} bytes, over {NAME_BYTES_MAX}"));
            }
            let text = bytes
                .get(at..at + length)
                .ok_or("session header ends inside a string")?;
            strings.push(String::from_utf8(text.to_vec()).map_err(|_| "a string is not UTF-8")?);
            at += length;
        }
        if at != bytes.len() {
            return Err("bytes after the session header's strings".into());
        }
        let session_id = id_at(bytes, 0);
        let parent = id_at(bytes, 16);
        if session_id.is_none() {
            return Err("session id is zero".into());
        }
        let target_name = strings.pop().expect("three strings");
        let base_name = strings.pop().expect("three strings");
        let source_id = strings.pop().expect("three strings");
        Ok(SessionHeader {
            session_id,
            parent: (!parent.is_none()).then_some(parent),
            source_id,
            source_size_bytes: u64_at(bytes, 32),
            granularity_bytes: u64_at(bytes, 40),
            created_unix_seconds: u64_at(bytes, 48),
            base: has_base.then(|| Held {
                checkpoint: base_name,
                generation: u64_at(bytes, 56),
            }),
            target: Held {
                checkpoint: target_name,
                generation: u64_at(bytes, 64),
            },
            compression,
        })
    }
}

// ---- files ---------------------------------------------------------------------

/// The files record's payload; an error when it would be over the limits.
pub fn encode_files(paths: &[String]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    out.extend_from_slice(&(paths.len() as u64).to_le_bytes());
    for path in paths {
        if path.len() > PATH_BYTES_MAX {
            return Err(format!(
                "a path of {} bytes, over {PATH_BYTES_MAX}",
                path.len()
            ));
        }
        out.extend_from_slice(&(path.len() as u16).to_le_bytes());
        out.extend_from_slice(path.as_bytes());
    }
    if out.len() > FILES_BYTES_MAX as usize {
        return Err(format!("the file list is over {FILES_BYTES_MAX} bytes"));
    }
    Ok(out)
}

pub fn decode_files(bytes: &[u8]) -> Result<Vec<String>, String> {
    let count = bytes
        .get(0..8)
        .map(|b| u64_at(b, 0))
        .ok_or("short files record")?;
    // Each path takes at least its 2-byte length, so the payload bounds
    // the count before anything is allocated for it.
    if count > (bytes.len() as u64 - 8) / 2 {
        return Err(format!("{count} paths cannot fit in {} bytes", bytes.len()));
    }
    let mut paths = Vec::with_capacity(count as usize);
    let mut at = 8;
    for _ in 0..count {
        let length = bytes
            .get(at..at + 2)
            .map(|b| usize::from(u16_at(b, 0)))
            .ok_or("files record ends inside a path")?;
        at += 2;
        if length > PATH_BYTES_MAX {
            return Err(format!("a path of {length} bytes, over {PATH_BYTES_MAX}"));
        }
        let text = bytes
            .get(at..at + length)
            .ok_or("files record ends inside a path")?;
        paths.push(String::from_utf8(text.to_vec()).map_err(|_| "a path is not UTF-8")?);
        at += length;
    }
    if at != bytes.len() {
        return Err("bytes after the last path".into());
    }
    Ok(paths)
}
