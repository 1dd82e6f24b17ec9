//! The index of a tape file, kept beside it (`TAPE.blockwatch-index`), so
//! that a view of a chain finds its extents without reading the tapes
//! again: every session (where it starts, its header and totals) and
//! every extent record (disk range, where its payload is, its length as
//! stored, flags and crc). It is written after a pass that checked the
//! whole tape, and used only while the tape has the same id and length;
//! each block a view then reads is checked by its own crc as ever.
//!
//! Layout, little-endian: magic `BWTIDX01`, tape id (16), tape length
//! (u64), block size (u32), session count (u32); per session: first block
//! (u64), header length (u32) and the session header as on the tape, the
//! trailer as on the tape (64), record count (u32) and records of 40
//! bytes (kind, flags, 2 zero bytes, payload cursor u32, offset u64,
//! length u64, payload block u64, stored length u32, data crc u32); then
//! crc32c of all of it (u32).

use std::path::{Path, PathBuf};

use crate::tape::format::{
    Id, SESSION_HEADER_BYTES_MAX, SessionHeader, TRAILER_BYTES, decode_trailer, encode_trailer,
};
use crate::tape::{PayloadPosition, SessionStart, SessionTotals};

const MAGIC: &[u8; 8] = b"BWTIDX01";
const RECORD_BYTES: usize = 40;
/// An index larger than this is not read (26 million extents).
const INDEX_BYTES_MAX: u64 = 1 << 30;
const KIND_DATA: u8 = 2;
const KIND_ZERO: u8 = 3;

/// One extent record of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexedRecord {
    pub(crate) offset_bytes: u64,
    pub(crate) length_bytes: u64,
    /// Data: where its payload starts, stored length, flags, crc.
    pub(crate) data: Option<(PayloadPosition, u32, u8, u32)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IndexedSession {
    pub(crate) start: SessionStart,
    pub(crate) header: SessionHeader,
    pub(crate) totals: SessionTotals,
    pub(crate) records: Vec<IndexedRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TapeIndex {
    pub(crate) tape_id: Id,
    pub(crate) length_bytes: u64,
    pub(crate) block_size_bytes: u32,
    pub(crate) sessions: Vec<IndexedSession>,
}

pub(crate) fn index_path(tape: &Path) -> PathBuf {
    let mut name = tape.file_name().unwrap_or_default().to_os_string();
    name.push(".blockwatch-index");
    tape.with_file_name(name)
}

impl TapeIndex {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.tape_id.0);
        out.extend_from_slice(&self.length_bytes.to_le_bytes());
        out.extend_from_slice(&self.block_size_bytes.to_le_bytes());
        out.extend_from_slice(&(self.sessions.len() as u32).to_le_bytes());
        for session in &self.sessions {
            out.extend_from_slice(&session.start.block_index.to_le_bytes());
            let header = session.header.encode()?;
            out.extend_from_slice(&(header.len() as u32).to_le_bytes());
            out.extend_from_slice(&header);
            out.extend_from_slice(&encode_trailer(session.header.session_id, &session.totals));
            out.extend_from_slice(&(session.records.len() as u32).to_le_bytes());
            for record in &session.records {
                put_record(&mut out, record);
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<TapeIndex, String> {
        let (body, crc) = bytes
            .split_last_chunk::<4>()
            .ok_or("shorter than its checksum")?;
        if crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
            return Err("checksum mismatch".into());
        }
        let mut cursor = Cursor { bytes: body };
        if cursor.take(8)? != MAGIC {
            return Err("not a blockwatch tape index".into());
        }
        let tape_id = Id(cursor.take(16)?.try_into().expect("16"));
        let length_bytes = cursor.u64()?;
        let block_size_bytes = cursor.u32()?;
        let count = cursor.count(8 + 4 + TRAILER_BYTES + 4)?;
        let mut sessions = Vec::with_capacity(count);
        for _ in 0..count {
            sessions.push(session(&mut cursor)?);
        }
        if !cursor.bytes.is_empty() {
            return Err("bytes after the last session".into());
        }
        Ok(TapeIndex {
            tape_id,
            length_bytes,
            block_size_bytes,
            sessions,
        })
    }

    /// The index beside `tape`, if there is one that decodes; what is
    /// wrong with one that does not is only logged (the tape is read
    /// again instead).
    pub(crate) fn load(tape: &Path) -> Option<TapeIndex> {
        let path = index_path(tape);
        let length = std::fs::metadata(&path).ok()?.len();
        if length > INDEX_BYTES_MAX {
            tracing::warn!(index = %path.display(), length, "tape index too large; reading the tape instead");
            return None;
        }
        let bytes = std::fs::read(&path).ok()?;
        match TapeIndex::decode(&bytes) {
            Ok(index) => Some(index),
            Err(reason) => {
                tracing::warn!(index = %path.display(), %reason, "tape index unreadable; reading the tape instead");
                None
            }
        }
    }

    /// Writes the index beside `tape` (atomically); a tape on read-only
    /// storage just goes without one.
    pub(crate) fn save(&self, tape: &Path) {
        let path = index_path(tape);
        let temporary = path.with_extension("blockwatch-index.new");
        let written = self
            .encode()
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&temporary, bytes))
            .and_then(|()| std::fs::rename(&temporary, &path));
        if let Err(error) = written {
            let _ = std::fs::remove_file(&temporary);
            tracing::info!(index = %path.display(), %error, "tape index not saved");
        }
    }
}

fn put_record(out: &mut Vec<u8>, record: &IndexedRecord) {
    let (kind, position, stored, flags, crc) = match record.data {
        Some((position, stored, flags, crc)) => (KIND_DATA, position, stored, flags, crc),
        None => (KIND_ZERO, PayloadPosition::default(), 0, 0, 0),
    };
    out.extend_from_slice(&[kind, flags, 0, 0]);
    out.extend_from_slice(&position.cursor_bytes.to_le_bytes());
    out.extend_from_slice(&record.offset_bytes.to_le_bytes());
    out.extend_from_slice(&record.length_bytes.to_le_bytes());
    out.extend_from_slice(&position.block_index.to_le_bytes());
    out.extend_from_slice(&stored.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
}

fn session(cursor: &mut Cursor<'_>) -> Result<IndexedSession, String> {
    let start = SessionStart {
        block_index: cursor.u64()?,
    };
    let header_length = cursor.u32()?;
    if header_length > SESSION_HEADER_BYTES_MAX {
        return Err(format!("a session header of {header_length} bytes"));
    }
    let header = SessionHeader::decode(cursor.take(header_length as usize)?)?;
    let (id, totals) = decode_trailer(cursor.take(TRAILER_BYTES)?)?;
    if id != header.session_id {
        return Err("a trailer of another session".into());
    }
    let count = cursor.count(RECORD_BYTES)?;
    let mut records = Vec::with_capacity(count);
    for _ in 0..count {
        let bytes = cursor.take(RECORD_BYTES)?;
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
        let position = PayloadPosition {
            block_index: u64_at(24),
            cursor_bytes: u32_at(4),
        };
        let data = match bytes[0] {
            KIND_DATA => Some((position, u32_at(32), bytes[1], u32_at(36))),
            KIND_ZERO => None,
            other => return Err(format!("a record of kind {other}")),
        };
        records.push(IndexedRecord {
            offset_bytes: u64_at(8),
            length_bytes: u64_at(16),
            data,
        });
    }
    Ok(IndexedSession {
        start,
        header,
        totals,
        records,
    })
}

struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, length: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < length {
            return Err("it ends early".into());
        }
        let (head, rest) = self.bytes.split_at(length);
        self.bytes = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    /// A count of items of at least `each` bytes, checked against what is left.
    fn count(&mut self, each: usize) -> Result<usize, String> {
        let count = self.u32()? as usize;
        if count.saturating_mul(each) > self.bytes.len() {
            return Err(format!("it claims {count} items, more than its bytes hold"));
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tape::format::Compression;
    use crate::target::Held;

    fn sample() -> TapeIndex {
        let header = SessionHeader {
            session_id: Id([7; 16]),
            parent: None,
            source_id: "abc".into(),
            source_size_bytes: 1 << 20,
            granularity_bytes: 65536,
            base: None,
            target: Held {
                checkpoint: "c1".into(),
                generation: 3,
            },
            created_unix_seconds: 5,
            compression: Compression::Zstd,
        };
        TapeIndex {
            tape_id: Id([1; 16]),
            length_bytes: 123456,
            block_size_bytes: 4096,
            sessions: vec![IndexedSession {
                start: SessionStart { block_index: 1 },
                header,
                totals: SessionTotals {
                    extent_count: 2,
                    data_bytes: 10,
                    ..SessionTotals::default()
                },
                records: vec![
                    IndexedRecord {
                        offset_bytes: 0,
                        length_bytes: 10,
                        data: Some((
                            PayloadPosition {
                                block_index: 1,
                                cursor_bytes: 200,
                            },
                            8,
                            1,
                            99,
                        )),
                    },
                    IndexedRecord {
                        offset_bytes: 4096,
                        length_bytes: 4096,
                        data: None,
                    },
                ],
            }],
        }
    }

    #[test]
    fn an_index_reads_back_and_every_flipped_or_cut_byte_is_caught() {
        let index = sample();
        let bytes = index.encode().unwrap();
        assert_eq!(TapeIndex::decode(&bytes).unwrap(), index);
        for at in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x10;
            assert!(TapeIndex::decode(&flipped).is_err(), "flip at {at}");
            assert!(TapeIndex::decode(&bytes[..at]).is_err(), "cut at {at}");
        }
    }
}
