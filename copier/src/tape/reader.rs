//! Reading a tape: its label, then its sessions one by one and each
//! session's records, every checksum checked on the way. Nothing read is
//! trusted before its crc: block crc, then record header crc, then the
//! payload's, then the trailer's totals. A payload grows only as its bytes
//! arrive from the tape, and its declared length is bounded first, so a
//! damaged or hostile tape costs at most one block plus one record of
//! memory, never a panic.

use std::io;
use std::path::Path;

use super::error::{Part, TapeError};
use super::format::{
    BLOCK_HEADER_BYTES, BLOCK_MAGIC, BLOCK_SIZE_MAX, BLOCK_SIZE_MIN, BlockHeader, FLAG_ZSTD, Id,
    LABEL_BYTES, LABEL_MAGIC, Label, RECORD_HEADER_BYTES, RecordHeader, RecordKind, SessionHeader,
    SessionTotals, decode_files, decode_trailer, open_block,
};
use super::media::{BlockRead, Media};

/// One record of a session, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Data {
        offset_bytes: u64,
        data: Vec<u8>,
    },
    Zero {
        offset_bytes: u64,
        length_bytes: u64,
    },
    Files(Vec<String>),
    /// The last record: the session is complete.
    Trailer(SessionTotals),
}

/// Where a session starts on its tape, to read it again (files only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionStart {
    pub block_index: u64,
}

#[derive(Debug)]
struct Session {
    header: SessionHeader,
    start: SessionStart,
    next_record: u64,
    files_seen: bool,
    done: bool,
    extent_end_bytes: u64,
    totals: SessionTotals,
}

#[derive(Debug)]
pub struct TapeReader {
    media: Media,
    label: Label,
    block: Vec<u8>,
    /// The tape's block number of `block` (the label is block 0).
    block_index: u64,
    /// Record bytes of `block` taken so far, and how many it has.
    cursor: usize,
    used: usize,
    /// The session whose blocks the record stream is in, and the
    /// sequence number its next block must carry.
    stream_session: Id,
    next_sequence: u64,
    session: Option<Session>,
    /// Where the payload of the record read last begins.
    payload_at: PayloadPosition,
    last_header: Option<RecordHeader>,
    /// Payload buffers handed back (`recycle`), used before new memory.
    spare: Vec<Vec<u8>>,
    /// For compressed extents, made at the first.
    decompressor: Option<Decompressor>,
}

/// zstd's context, kept from one compressed record to the next.
struct Decompressor(zstd::bulk::Decompressor<'static>);

impl std::fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decompressor")
    }
}

/// Buffers `recycle` keeps (each up to one record's payload, 4 MiB).
const SPARE_BUFFERS_MAX: usize = 8;

/// Where a record's payload begins on a tape file: the block (counted
/// from the label, block 0) and the byte within that block's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PayloadPosition {
    pub block_index: u64,
    pub cursor_bytes: u32,
}

impl TapeReader {
    /// Opens a tape and checks its label.
    pub fn open(path: &Path) -> Result<TapeReader, TapeError> {
        let media = Media::open_read(path).map_err(|source| TapeError::io(path, source))?;
        TapeReader::from_media(media)
    }

    /// Reads the label of an open tape (from its start).
    pub(crate) fn from_media(mut media: Media) -> Result<TapeReader, TapeError> {
        media
            .rewind()
            .map_err(|source| TapeError::io(&media.path, source))?;
        let (label, block) = read_label(&mut media)?;
        Ok(TapeReader {
            media,
            label,
            block,
            block_index: 0,
            cursor: 0,
            used: 0,
            stream_session: Id::NONE,
            next_sequence: 0,
            session: None,
            payload_at: PayloadPosition::default(),
            last_header: None,
            spare: Vec::new(),
            decompressor: None,
        })
    }

    pub(crate) fn into_media(self) -> Media {
        self.media
    }

    pub fn label(&self) -> &Label {
        &self.label
    }

    pub fn path(&self) -> &Path {
        &self.media.path
    }

    /// Hands back the buffer of a `Record::Data` read earlier, to hold a
    /// later payload: a reader whose records are written out and returned
    /// touches no fresh memory per record.
    pub fn recycle(&mut self, mut buffer: Vec<u8>) {
        if self.spare.len() < SPARE_BUFFERS_MAX {
            buffer.clear();
            self.spare.push(buffer);
        }
    }

    /// An empty buffer for at least `capacity_bytes`: a spare if any.
    fn buffer(&mut self, capacity_bytes: usize) -> Vec<u8> {
        match self.spare.pop() {
            Some(mut buffer) => {
                buffer.reserve(capacity_bytes);
                buffer
            }
            None => Vec::with_capacity(capacity_bytes),
        }
    }

    pub fn block_size_bytes(&self) -> u64 {
        u64::from(self.label.block_size_bytes)
    }

    /// The header of the session being read.
    pub fn header(&self) -> Option<&SessionHeader> {
        self.session.as_ref().map(|s| &s.header)
    }

    /// Where the session being read starts.
    pub fn session_start(&self) -> Option<SessionStart> {
        self.session.as_ref().map(|s| s.start)
    }

    /// The block after the last one read: where a tape of complete
    /// sessions ends once the last trailer has been read.
    pub fn next_block_index(&self) -> u64 {
        self.block_index + 1
    }

    /// Where the payload of the record `next_record` returned last begins
    /// (random access to a data extent by `view::tape`).
    pub fn last_payload_position(&self) -> PayloadPosition {
        self.payload_at
    }

    /// The header of the record `next_record` returned last.
    pub fn last_record_header(&self) -> Option<RecordHeader> {
        self.last_header
    }

    /// Goes back to a session read before, so that `next_session` reads
    /// it again (files only: a drive is read once, front to back).
    pub fn seek_session(&mut self, start: SessionStart) -> Result<(), TapeError> {
        self.media
            .seek(start.block_index * self.block_size_bytes())
            .map_err(|source| TapeError::io(&self.media.path, source))?;
        self.block_index = start.block_index - 1;
        self.cursor = 0;
        self.used = 0;
        self.session = None;
        Ok(())
    }

    /// Files: block `index` read whole, with its header; None when it is
    /// cut short, missing, or fails its crc. Leaves the reader to be
    /// positioned again with `seek_session`.
    pub(crate) fn block_at(
        &mut self,
        index: u64,
    ) -> Result<Option<(BlockHeader, Vec<u8>)>, TapeError> {
        let path = self.media.path.clone();
        let io_error = |source| TapeError::io(&path, source);
        let mut block = vec![0u8; self.block.len()];
        let position = index * self.block_size_bytes();
        self.media.seek(position).map_err(io_error)?;
        if self.media.read_block(&mut block).map_err(io_error)? != BlockRead::Full {
            return Ok(None);
        }
        Ok(open_block(&block).ok().map(|header| (header, block)))
    }

    /// The next session's header, after reading (and checking) whatever is
    /// left of the current one; `None` where the tape ends.
    pub fn next_session(&mut self) -> Result<Option<&SessionHeader>, TapeError> {
        while self.session.as_ref().is_some_and(|s| !s.done) {
            self.next_record()?;
        }
        let mut ends = 0;
        loop {
            match self.read_block(Part::Block) {
                Ok(Some(())) => break,
                // A drive has a filemark after the label and after each
                // session; two in a row (or the end of a file) is the end.
                Ok(None) if self.media.device && ends == 0 => ends += 1,
                Ok(None) => return Ok(None),
                // Linux st answers a read past the last filemark (end of
                // recorded data) with EIO.
                Err(TapeError::Io { source, .. })
                    if self.media.device
                        && ends > 0
                        && source.raw_os_error() == Some(libc::EIO) =>
                {
                    return Ok(None);
                }
                Err(error) => return Err(error),
            }
        }
        let header = open_block(&self.block).map_err(|reason| self.damaged(Part::Block, reason))?;
        if header.session_id.is_none() || header.sequence != 0 {
            return Err(self.damaged(
                Part::Block,
                format!(
                    "a session's first block expected, found block {} of session {}",
                    header.sequence, header.session_id
                ),
            ));
        }
        self.cursor = 0;
        self.used = header.used_bytes as usize;
        self.stream_session = header.session_id;
        self.next_sequence = 1;
        self.session = None;
        let start = SessionStart {
            block_index: self.block_index,
        };
        let (record, payload, _, record_block) = self.read_record_bytes(0)?;
        if record.kind != RecordKind::Header {
            return Err(self.damaged_at(
                record_block,
                Part::SessionHeader,
                "a session starts without a header".into(),
            ));
        }
        let session_header = check_payload(&record, &payload)
            .and_then(|()| SessionHeader::decode(&payload))
            .map_err(|reason| self.damaged_at(record_block, Part::SessionHeader, reason))?;
        if session_header.session_id != header.session_id {
            return Err(self.damaged_at(
                record_block,
                Part::SessionHeader,
                "the header's session id is not its block's".into(),
            ));
        }
        let totals = SessionTotals {
            record_crc: crc_append(0, &record),
            ..SessionTotals::default()
        };
        self.session = Some(Session {
            header: session_header,
            start,
            next_record: 1,
            files_seen: false,
            done: false,
            extent_end_bytes: 0,
            totals,
        });
        Ok(self.header())
    }

    /// The next record of the current session, checked; `None` after its
    /// trailer (or before any session).
    pub fn next_record(&mut self) -> Result<Option<Record>, TapeError> {
        let Some(session) = self.session.as_ref() else {
            return Ok(None);
        };
        if session.done {
            return Ok(None);
        }
        let index = session.next_record;
        let (record, payload, payload_crc, record_block) = self.read_record_bytes(index)?;
        let part = Part::of(record.kind);
        let checked = self.check_record(&record, payload, payload_crc);
        let result = checked.map_err(|reason| self.damaged_at(record_block, part, reason))?;
        let session = self.session.as_mut().expect("a session is being read");
        session.next_record += 1;
        if let Record::Trailer(_) = result {
            session.done = true;
            // Nothing may follow a trailer in its block.
            if self.cursor != self.used {
                return Err(self.damaged_at(record_block, part, "bytes after the trailer".into()));
            }
        } else {
            session.totals.record_crc = crc_append(session.totals.record_crc, &record);
        }
        Ok(Some(result))
    }

    /// A record's header, its payload read across blocks and the payload's
    /// crc32c (taken piece by piece as each is copied, while the block is
    /// still in cache), and the block the record starts in: the header is
    /// checked (crc, kind, bounds) before its payload is read.
    fn read_record_bytes(
        &mut self,
        index: u64,
    ) -> Result<(RecordHeader, Vec<u8>, u32, u64), TapeError> {
        let mut head = [0u8; RECORD_HEADER_BYTES];
        self.take(&mut head, Part::RecordHeader)?;
        let record_block = self.block_index;
        let record = RecordHeader::decode(&head)
            .map_err(|reason| self.damaged_at(record_block, Part::RecordHeader, reason))?;
        let part = Part::of(record.kind);
        if record.index != index {
            return Err(self.damaged_at(
                record_block,
                part,
                format!("record {} found where record {index} belongs (a record is missing or repeated)", record.index),
            ));
        }
        self.last_header = Some(record);
        self.payload_at = if self.cursor == self.used {
            PayloadPosition {
                block_index: self.block_index + 1,
                cursor_bytes: 0,
            }
        } else {
            PayloadPosition {
                block_index: self.block_index,
                cursor_bytes: self.cursor as u32,
            }
        };
        // Bounded by RecordHeader::decode; grown as the bytes arrive.
        let stored = record.stored_bytes as usize;
        let mut payload = self.buffer(stored.min(self.block.len()));
        let mut payload_crc = 0;
        while payload.len() < stored {
            if self.cursor == self.used {
                self.next_block_of(part)?;
            }
            let piece = (stored - payload.len()).min(self.used - self.cursor);
            let at = BLOCK_HEADER_BYTES + self.cursor;
            let bytes = &self.block[at..at + piece];
            payload_crc = crc32c::crc32c_append(payload_crc, bytes);
            payload.extend_from_slice(bytes);
            self.cursor += piece;
        }
        Ok((record, payload, payload_crc, record_block))
    }

    /// `payload_crc` is the crc32c of `payload` as stored.
    fn check_record(
        &mut self,
        record: &RecordHeader,
        payload: Vec<u8>,
        payload_crc: u32,
    ) -> Result<Record, String> {
        let compressed = record.kind == RecordKind::Data && record.flags & FLAG_ZSTD != 0;
        let data_crc = |data: &[u8]| {
            if compressed {
                crc32c::crc32c(data)
            } else {
                payload_crc
            }
        };
        let payload = if compressed {
            let mut data = self.buffer(record.length_bytes as usize);
            let decompressor = match &mut self.decompressor {
                Some(decompressor) => decompressor,
                empty => empty.insert(new_decompressor()?),
            };
            decompress_into(
                decompressor,
                &payload,
                record.length_bytes as usize,
                &mut data,
            )?;
            self.recycle(payload);
            data
        } else {
            payload
        };
        let session = self.session.as_mut().expect("a session is being read");
        let size = session.header.source_size_bytes;
        let totals = &mut session.totals;
        match record.kind {
            RecordKind::Header => Err("a second session header".into()),
            RecordKind::Data | RecordKind::Zero if session.files_seen => {
                Err("an extent after the file list".into())
            }
            RecordKind::Data => {
                session.extent_end_bytes = check_extent(record, size, session.extent_end_bytes)?;
                let data = payload;
                if data_crc(&data) != record.data_crc {
                    return Err("data checksum mismatch".into());
                }
                totals.extent_count += 1;
                totals.data_bytes += record.length_bytes;
                totals.stored_bytes += u64::from(record.stored_bytes);
                Ok(Record::Data {
                    offset_bytes: record.offset_bytes,
                    data,
                })
            }
            RecordKind::Zero => {
                session.extent_end_bytes = check_extent(record, size, session.extent_end_bytes)?;
                totals.extent_count += 1;
                totals.zero_bytes += record.length_bytes;
                Ok(Record::Zero {
                    offset_bytes: record.offset_bytes,
                    length_bytes: record.length_bytes,
                })
            }
            RecordKind::Files if session.files_seen => Err("a second file list".into()),
            RecordKind::Files => {
                check_payload(record, &payload)?;
                let paths = decode_files(&payload)?;
                session.files_seen = true;
                totals.file_count = paths.len() as u64;
                Ok(Record::Files(paths))
            }
            RecordKind::Trailer => {
                check_payload(record, &payload)?;
                let (id, recorded) = decode_trailer(&payload)?;
                if id != session.header.session_id {
                    return Err("the trailer's session id is not its session's".into());
                }
                if recorded != *totals {
                    return Err(format!(
                        "the trailer's totals {recorded:?} are not what the session holds {totals:?}"
                    ));
                }
                Ok(Record::Trailer(recorded))
            }
        }
    }

    /// Fills `out` from the record stream of session `session_id`.
    fn take(&mut self, out: &mut [u8], part: Part) -> Result<(), TapeError> {
        let mut filled = 0;
        while filled < out.len() {
            if self.cursor == self.used {
                self.next_block_of(part)?;
            }
            let piece = (out.len() - filled).min(self.used - self.cursor);
            let at = BLOCK_HEADER_BYTES + self.cursor;
            out[filled..filled + piece].copy_from_slice(&self.block[at..at + piece]);
            self.cursor += piece;
            filled += piece;
        }
        Ok(())
    }

    /// Loads the session's next block, which must follow the last one.
    fn next_block_of(&mut self, part: Part) -> Result<(), TapeError> {
        if self.read_block(part)?.is_none() {
            return Err(TapeError::Truncated {
                tape: self.media.path.clone(),
                block: self.block_index + 1,
                part,
            });
        }
        let header = open_block(&self.block).map_err(|reason| self.damaged(Part::Block, reason))?;
        let (session_id, expected) = (self.stream_session, self.next_sequence);
        if header.session_id != session_id || header.sequence != expected {
            return Err(self.damaged(
                Part::Block,
                format!(
                    "block {expected} of session {session_id} expected, found block {} of session {} (a block is missing, repeated, or another session's)",
                    header.sequence, header.session_id
                ),
            ));
        }
        self.next_sequence += 1;
        self.cursor = 0;
        self.used = header.used_bytes as usize;
        if self.used == 0 {
            return Err(self.damaged(Part::Block, "a session block with no records".into()));
        }
        Ok(())
    }

    /// Reads the next block whole; `None` at the end of the file or at a
    /// filemark. A cut block is reported as the end of the tape inside
    /// `part`.
    fn read_block(&mut self, part: Part) -> Result<Option<()>, TapeError> {
        let read = self
            .media
            .read_block(&mut self.block)
            .map_err(|source| TapeError::io(&self.media.path, source))?;
        match read {
            BlockRead::End => Ok(None),
            BlockRead::Full => {
                self.block_index += 1;
                Ok(Some(()))
            }
            BlockRead::Short(_) => Err(TapeError::Truncated {
                tape: self.media.path.clone(),
                block: self.block_index + 1,
                part,
            }),
        }
    }

    fn damaged(&self, part: Part, reason: String) -> TapeError {
        self.damaged_at(self.block_index, part, reason)
    }

    fn damaged_at(&self, block: u64, part: Part, reason: String) -> TapeError {
        TapeError::Damaged {
            tape: self.media.path.clone(),
            block,
            part,
            reason,
        }
    }
}

fn crc_append(crc: u32, record: &RecordHeader) -> u32 {
    let header_crc = u32::from_le_bytes(record.encode()[44..48].try_into().expect("4 bytes"));
    crc32c::crc32c_append(crc, &header_crc.to_le_bytes())
}

fn check_payload(record: &RecordHeader, payload: &[u8]) -> Result<(), String> {
    if crc32c::crc32c(payload) != record.data_crc {
        return Err("payload checksum mismatch".into());
    }
    Ok(())
}

/// Checks that an extent lies inside the disk and after the previous one
/// (which ended at `previous_end_bytes`); returns where it ends.
fn check_extent(
    record: &RecordHeader,
    source_size_bytes: u64,
    previous_end_bytes: u64,
) -> Result<u64, String> {
    if record.offset_bytes < previous_end_bytes {
        return Err(format!(
            "extent at {} overlaps or precedes the previous one, which ends at {previous_end_bytes}",
            record.offset_bytes
        ));
    }
    match record.offset_bytes.checked_add(record.length_bytes) {
        Some(end) if end <= source_size_bytes => Ok(end),
        _ => Err(format!(
            "extent {}+{} is outside the {source_size_bytes}-byte disk",
            record.offset_bytes, record.length_bytes
        )),
    }
}

/// One zstd frame into exactly `length_bytes` (at most
/// EXTENT_DATA_BYTES_MAX, checked by the record header).
pub(crate) fn decompress(payload: &[u8], length_bytes: usize) -> Result<Vec<u8>, String> {
    let mut data = Vec::with_capacity(length_bytes);
    decompress_into(&mut new_decompressor()?, payload, length_bytes, &mut data)?;
    Ok(data)
}

fn new_decompressor() -> Result<Decompressor, String> {
    zstd::bulk::Decompressor::new()
        .map(Decompressor)
        .map_err(|error| format!("zstd: {error}"))
}

/// `decompress` into `data` (emptied first; its capacity is used, no
/// more), with a decompressor kept from one record to the next.
fn decompress_into(
    decompressor: &mut Decompressor,
    payload: &[u8],
    length_bytes: usize,
    data: &mut Vec<u8>,
) -> Result<(), String> {
    data.clear();
    data.reserve_exact(length_bytes);
    let count = decompressor
        .0
        .decompress_to_buffer(payload, data)
        .map_err(|error| format!("compressed data does not decompress: {error}"))?;
    if count != length_bytes || data.len() != length_bytes {
        return Err(format!(
            "compressed data holds {count} bytes, not {length_bytes}"
        ));
    }
    Ok(())
}

/// The label block: read a little first to learn the block size (a
/// drive hands over a whole block per read, whatever it is).
fn read_label(media: &mut Media) -> Result<(Label, Vec<u8>), TapeError> {
    let tape = media.path.clone();
    let io_error = |source: io::Error| TapeError::io(&tape, source);
    let foreign = |reason: &str| TapeError::Foreign {
        tape: tape.clone(),
        reason: reason.to_string(),
    };
    let damaged = |reason: String| TapeError::Damaged {
        tape: tape.clone(),
        block: 0,
        part: Part::Label,
        reason,
    };
    let probe_bytes = if media.device {
        BLOCK_SIZE_MAX
    } else {
        BLOCK_SIZE_MIN
    };
    let mut probe = vec![0u8; probe_bytes as usize];
    let got = match media.read_block(&mut probe).map_err(io_error)? {
        BlockRead::End => return Err(foreign("it is empty")),
        BlockRead::Full => probe.len(),
        BlockRead::Short(count) => count,
    };
    if got < BLOCK_HEADER_BYTES + LABEL_BYTES
        || probe[..8] != BLOCK_MAGIC
        || probe[BLOCK_HEADER_BYTES..BLOCK_HEADER_BYTES + 8] != LABEL_MAGIC
    {
        return Err(foreign("no tape label at its start"));
    }
    let label = Label::decode(&probe[BLOCK_HEADER_BYTES..got]).map_err(damaged)?;
    let block_bytes = label.block_size_bytes as usize;
    let mut block = vec![0u8; block_bytes];
    if media.device {
        if got != block_bytes {
            return Err(damaged(format!(
                "the label block is {got} bytes, the label says {block_bytes}"
            )));
        }
        block.copy_from_slice(&probe[..got]);
    } else {
        block[..got].copy_from_slice(&probe[..got]);
        if got < block_bytes
            && media.read_block(&mut block[got..]).map_err(io_error)? != BlockRead::Full
        {
            return Err(TapeError::Truncated {
                tape: tape.clone(),
                block: 0,
                part: Part::Label,
            });
        }
    }
    let header = open_block(&block).map_err(damaged)?;
    if !header.session_id.is_none()
        || header.sequence != 0
        || header.used_bytes as usize != LABEL_BYTES
    {
        return Err(damaged("the label block's header is not a label's".into()));
    }
    Ok((label, block))
}
