//! Writing a tape: open for append (a new tape gets its label; a file's
//! unfinished last session is cut off), then one session at a time. Every
//! write is one whole block. A session counts only once `finish` has
//! written its trailer and made it durable (fsync on a file, a filemark on
//! a drive); before that, dropping the `SessionWriter` cuts a file back to
//! where the session began, and a kill -9 leaves a tail the next open cuts.

use std::path::Path;

use super::error::TapeError;
use super::format::{
    BLOCK_HEADER_BYTES, BLOCK_SIZE_DEFAULT, BLOCK_SIZE_MAX, BLOCK_SIZE_MIN, BlockHeader,
    Compression, EXTENT_DATA_BYTES_MAX, FLAG_ZSTD, FORMAT_VERSION, Id, LABEL_BYTES, Label,
    RECORD_HEADER_BYTES, RecordHeader, RecordKind, SessionHeader, SessionTotals,
    block_size_is_valid, encode_files, encode_trailer, seal_block,
};
use super::media::Media;
use super::reader::{Record, SessionStart, TapeReader};
use super::tail::{scan_from_end, unfinished_tail};
use crate::copy::unix_seconds;
use crate::target::Held;

/// The zstd level `--compress` uses: fast, and still most of the gain on
/// disk data.
pub const ZSTD_LEVEL_DEFAULT: i32 = 3;

#[derive(Debug, Clone)]
pub struct TapeOptions {
    /// The block size of a new tape; a tape that has a label keeps its own.
    pub block_size_bytes: u32,
    /// A new tape continues this tape's chain (as its next tape) instead
    /// of starting a chain of its own.
    pub continues: Option<Label>,
    pub zstd_level: i32,
    /// Tests: fail with ENOSPC once this many blocks were written (the
    /// label counts), as a full tape does. Debug builds also read
    /// `BLOCKWATCH_TAPE_ENOSPC_AFTER_BLOCKS`.
    #[doc(hidden)]
    pub enospc_after_blocks: Option<u64>,
}

impl Default for TapeOptions {
    fn default() -> TapeOptions {
        TapeOptions {
            block_size_bytes: BLOCK_SIZE_DEFAULT,
            continues: None,
            zstd_level: ZSTD_LEVEL_DEFAULT,
            enospc_after_blocks: None,
        }
    }
}

/// What a new session will hold; the writer adds its id and time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    pub source_id: String,
    pub source_size_bytes: u64,
    pub granularity_bytes: u64,
    /// None for a full session.
    pub base: Option<Held>,
    pub target: Held,
    /// The session this one applies on top of (the tape's last session,
    /// `TapeWriter::last_session`); None for a full session.
    pub parent: Option<Id>,
    pub compress: bool,
}

/// A tape open for appending sessions.
#[derive(Debug)]
pub struct TapeWriter {
    media: Media,
    label: Label,
    last: Option<SessionHeader>,
    zstd_level: i32,
}

/// What a scan of a tape's sessions found.
#[derive(Debug)]
pub(crate) struct Scan {
    pub last: Option<SessionHeader>,
    /// The block after the last complete session's trailer.
    pub end_block: u64,
    /// The unfinished session that ends the tape, if one does.
    pub torn: Option<TapeError>,
}

impl TapeWriter {
    /// Opens `path` (a file, created if missing, or a tape drive) for
    /// appending sessions.
    pub fn open_append(path: &Path, options: &TapeOptions) -> Result<TapeWriter, TapeError> {
        if !block_size_is_valid(options.block_size_bytes) {
            return Err(TapeError::refused(
                path,
                format!(
                    "block size {} is not a power of two from {BLOCK_SIZE_MIN} to {BLOCK_SIZE_MAX}",
                    options.block_size_bytes
                ),
            ));
        }
        let io_error = |source| TapeError::io(path, source);
        let mut media = Media::open_write(path).map_err(io_error)?;
        if options.enospc_after_blocks.is_some() {
            media.enospc_after_blocks = options.enospc_after_blocks;
        }
        if !media.device && !media.lock_exclusive().map_err(io_error)? {
            return Err(TapeError::refused(
                path,
                "another copy is writing this tape; try again when it is done",
            ));
        }
        let blank = if media.device {
            is_blank_drive(&mut media).map_err(io_error)?
        } else {
            media.len_bytes().map_err(io_error)? == 0
        };
        if blank {
            return TapeWriter::create(media, options);
        }
        let enospc_after_blocks = media.enospc_after_blocks;
        let mut reader = TapeReader::from_media(media)?;
        let scan = quick_scan(&mut reader)?;
        let label = reader.label().clone();
        let block_bytes = reader.block_size_bytes();
        let mut media = reader.into_media();
        media.enospc_after_blocks = enospc_after_blocks;
        if let Some(torn) = &scan.torn {
            if media.device {
                return Err(TapeError::refused(
                    path,
                    format!("{torn}; a drive cannot cut it off: write to a new tape"),
                ));
            }
            tracing::warn!(%torn, "cutting off the unfinished session at the end of the tape");
        }
        if media.device {
            media.seek_end_of_data().map_err(io_error)?;
        } else {
            media
                .truncate(scan.end_block * block_bytes)
                .map_err(io_error)?;
        }
        Ok(TapeWriter {
            media,
            label,
            last: scan.last,
            zstd_level: options.zstd_level,
        })
    }

    fn create(mut media: Media, options: &TapeOptions) -> Result<TapeWriter, TapeError> {
        let io_error = |source| TapeError::io(&media.path, source);
        let label = Label {
            version: FORMAT_VERSION,
            block_size_bytes: options.block_size_bytes,
            tape_id: Id::random().map_err(io_error)?,
            chain_id: match &options.continues {
                Some(previous) => previous.chain_id,
                None => Id::random().map_err(io_error)?,
            },
            tape_sequence: options
                .continues
                .as_ref()
                .map_or(0, |p| p.tape_sequence + 1),
            created_unix_seconds: unix_seconds(),
        };
        let mut block = vec![0u8; label.block_size_bytes as usize];
        block[BLOCK_HEADER_BYTES..BLOCK_HEADER_BYTES + LABEL_BYTES]
            .copy_from_slice(&label.encode());
        let header = BlockHeader {
            session_id: Id::NONE,
            sequence: 0,
            used_bytes: LABEL_BYTES as u32,
        };
        seal_block(&mut block, &header);
        // A new file's name is made durable with its label: a session
        // that counts must not vanish with a directory entry a crash lost.
        let written = media.write_block(&block).and_then(|()| media.end_file());
        let written = match written {
            Ok(()) if !media.device => crate::replica::sync_parent(&media.path),
            other => other,
        };
        if let Err(source) = written {
            if !media.device {
                let _ = media.truncate(0);
            }
            return Err(TapeError::io(&media.path, source));
        }
        Ok(TapeWriter {
            media,
            label,
            last: None,
            zstd_level: options.zstd_level,
        })
    }

    pub fn label(&self) -> &Label {
        &self.label
    }

    /// The header of the tape's last complete session: the checkpoint the
    /// tape holds and the session id a next incremental names as parent.
    pub fn last_session(&self) -> Option<&SessionHeader> {
        self.last.as_ref()
    }

    /// Starts a session; its header record is the first thing written.
    pub fn begin_session(self, new: NewSession) -> Result<SessionWriter, TapeError> {
        let path = self.media.path.clone();
        let header = SessionHeader {
            session_id: Id::random().map_err(|source| TapeError::io(&path, source))?,
            parent: new.parent,
            source_id: new.source_id,
            source_size_bytes: new.source_size_bytes,
            granularity_bytes: new.granularity_bytes,
            base: new.base,
            target: new.target,
            created_unix_seconds: unix_seconds(),
            compression: if new.compress {
                Compression::Zstd
            } else {
                Compression::None
            },
        };
        let payload = header
            .encode()
            .map_err(|reason| TapeError::refused(&path, reason))?;
        let block_bytes = self.label.block_size_bytes as usize;
        let mut session = SessionWriter {
            start_bytes: self.media.position_bytes,
            tape: Some(self),
            header,
            block: vec![0u8; block_bytes],
            used: 0,
            sequence: 0,
            next_record: 0,
            totals: SessionTotals::default(),
            files: None,
            failed: false,
            extent_end_bytes: 0,
        };
        let (length, crc) = (payload.len() as u64, crc32c::crc32c(&payload));
        session.write_record(RecordKind::Header, 0, length, &payload, crc, 0)?;
        Ok(session)
    }
}

/// The header of the last complete session of the tape at `path`, without
/// writing anything: None for a missing or empty tape, or one with no
/// complete session. An unfinished session at the end is not counted.
pub fn last_session(path: &Path) -> Result<Option<SessionHeader>, TapeError> {
    match std::fs::metadata(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Ok(metadata) if metadata.is_file() && metadata.len() == 0 => return Ok(None),
        _ => {}
    }
    let mut reader = TapeReader::open(path)?;
    Ok(quick_scan(&mut reader)?.last)
}

/// `scan`, from the end of a file when that is enough (`tail.rs`): an
/// append then costs a few blocks, not a read of the whole tape.
fn quick_scan(reader: &mut TapeReader) -> Result<Scan, TapeError> {
    let file_bytes = match std::fs::metadata(reader.path()) {
        Ok(metadata) if metadata.is_file() => Some(metadata.len()),
        _ => None,
    };
    if let Some(file_bytes) = file_bytes {
        if let Some(found) = scan_from_end(reader, file_bytes)? {
            return Ok(found);
        }
        reader.seek_session(SessionStart { block_index: 1 })?;
    }
    scan(reader)
}

/// Reads every session, checking everything; an unfinished session that
/// runs to the end of the tape (its last block cut or torn, or no trailer)
/// is reported as `torn`, damage anywhere else is an error.
pub(crate) fn scan(reader: &mut TapeReader) -> Result<Scan, TapeError> {
    let mut scan = Scan {
        last: None,
        end_block: 1,
        torn: None,
    };
    let block_bytes = reader.block_size_bytes();
    let file_blocks = match std::fs::metadata(reader.path()) {
        Ok(metadata) if metadata.is_file() => Some(metadata.len().div_ceil(block_bytes)),
        _ => None,
    };
    loop {
        match read_session(reader) {
            Ok(None) => return Ok(scan),
            Ok(Some(header)) => {
                scan.last = Some(header);
                scan.end_block = reader.next_block_index();
            }
            Err(error @ TapeError::Truncated { .. }) => {
                scan.torn = Some(error);
                return Ok(scan);
            }
            Err(error @ TapeError::Damaged { block, .. })
                if file_blocks.is_some_and(|count| block + 1 >= count) =>
            {
                scan.torn = Some(error);
                return Ok(scan);
            }
            Err(TapeError::Damaged {
                block,
                part,
                reason,
                tape,
            }) if file_blocks.is_some()
                && block >= scan.end_block
                && unfinished_tail(reader, scan.end_block, block, file_blocks.unwrap_or(0))? =>
            {
                scan.torn = Some(TapeError::Damaged {
                    tape,
                    block,
                    part,
                    reason: format!("{reason}, in a session that never finished"),
                });
                return Ok(scan);
            }
            Err(error) => return Err(error),
        }
    }
}

fn read_session(reader: &mut TapeReader) -> Result<Option<SessionHeader>, TapeError> {
    let Some(header) = reader.next_session()?.cloned() else {
        return Ok(None);
    };
    while let Some(record) = reader.next_record()? {
        if let Record::Trailer(_) = record {
            return Ok(Some(header));
        }
    }
    unreachable!("next_record returns a trailer before it returns None");
}

fn is_blank_drive(media: &mut Media) -> std::io::Result<bool> {
    media.rewind()?;
    let mut probe = vec![0u8; BLOCK_SIZE_MAX as usize];
    let blank = match media.read_block(&mut probe) {
        Ok(read) => read == super::media::BlockRead::End,
        // A blank tape answers a read with EIO (no data) on Linux st.
        Err(error) if error.raw_os_error() == Some(libc::EIO) => true,
        Err(error) => return Err(error),
    };
    media.rewind()?;
    Ok(blank)
}

/// One session being written. Extents may come in any order; each must
/// lie inside the source disk.
#[derive(Debug)]
pub struct SessionWriter {
    tape: Option<TapeWriter>,
    header: SessionHeader,
    /// Where the session's first block went (files): an abandoned session
    /// is cut off there.
    start_bytes: u64,
    block: Vec<u8>,
    used: usize,
    sequence: u64,
    next_record: u64,
    totals: SessionTotals,
    files: Option<Vec<String>>,
    failed: bool,
    /// Where the last extent ended: extents come in ascending order and
    /// do not overlap, so a restore may keep many writes in flight.
    extent_end_bytes: u64,
}

impl SessionWriter {
    pub fn header(&self) -> &SessionHeader {
        &self.header
    }

    pub fn totals(&self) -> &SessionTotals {
        &self.totals
    }

    /// Records `data` at `offset_bytes` (cut into records of at most
    /// EXTENT_DATA_BYTES_MAX, each compressed if the session is and that
    /// makes it smaller).
    pub fn write_data(&mut self, offset_bytes: u64, data: &[u8]) -> Result<(), TapeError> {
        self.check_extent(offset_bytes, data.len() as u64)?;
        let mut offset = offset_bytes;
        for chunk in data.chunks(EXTENT_DATA_BYTES_MAX as usize) {
            let crc = crc32c::crc32c(chunk);
            let compressed = match self.header.compression {
                Compression::Zstd => zstd::bulk::compress(chunk, self.tape().zstd_level)
                    .ok()
                    .filter(|c| c.len() < chunk.len()),
                Compression::None => None,
            };
            let length = chunk.len() as u64;
            match compressed {
                Some(c) => {
                    self.write_record(RecordKind::Data, offset, length, &c, crc, FLAG_ZSTD)?
                }
                None => self.write_record(RecordKind::Data, offset, length, chunk, crc, 0)?,
            }
            self.totals.extent_count += 1;
            self.totals.data_bytes += length;
            offset += length;
        }
        Ok(())
    }

    /// Records that `length_bytes` at `offset_bytes` read as zeroes.
    pub fn write_zero(&mut self, offset_bytes: u64, length_bytes: u64) -> Result<(), TapeError> {
        self.check_extent(offset_bytes, length_bytes)?;
        if length_bytes == 0 {
            return Ok(());
        }
        self.write_record(RecordKind::Zero, offset_bytes, length_bytes, &[], 0, 0)?;
        self.totals.extent_count += 1;
        self.totals.zero_bytes += length_bytes;
        Ok(())
    }

    /// The changed files' paths, written after the extents.
    pub fn set_files(&mut self, paths: Vec<String>) {
        self.files = Some(paths);
    }

    /// Writes the file list and the trailer, makes the session durable,
    /// and hands the tape back for the next session.
    pub fn finish(mut self) -> Result<(TapeWriter, SessionTotals), TapeError> {
        if let Some(paths) = self.files.take() {
            let payload = encode_files(&paths).map_err(|reason| self.refused(reason))?;
            let crc = crc32c::crc32c(&payload);
            self.write_record(RecordKind::Files, 0, payload.len() as u64, &payload, crc, 0)?;
            self.totals.file_count = paths.len() as u64;
        }
        let trailer = encode_trailer(self.header.session_id, &self.totals);
        let crc = crc32c::crc32c(&trailer);
        self.write_record(
            RecordKind::Trailer,
            0,
            trailer.len() as u64,
            &trailer,
            crc,
            0,
        )?;
        if self.used > 0 {
            self.emit_block()?;
        }
        let totals = self.totals;
        let header = self.header.clone();
        let mut tape = self.tape.take().expect("a session is finished once");
        if let Err(source) = tape.media.end_file() {
            self.tape = Some(tape);
            self.failed = true;
            return Err(TapeError::io(&header_path(&self), source));
        }
        tape.last = Some(header);
        Ok((tape, totals))
    }

    fn tape(&self) -> &TapeWriter {
        self.tape.as_ref().expect("the session is open")
    }

    fn refused(&self, reason: String) -> TapeError {
        TapeError::refused(&self.tape().media.path, reason)
    }

    fn check_extent(&mut self, offset_bytes: u64, length_bytes: u64) -> Result<(), TapeError> {
        if offset_bytes < self.extent_end_bytes {
            return Err(self.refused(format!(
                "extent at {offset_bytes} comes before the end of the previous one ({}): extents go in ascending order",
                self.extent_end_bytes
            )));
        }
        let size = self.header.source_size_bytes;
        match offset_bytes.checked_add(length_bytes) {
            Some(end) if end <= size => {
                self.extent_end_bytes = end;
                Ok(())
            }
            _ => Err(self.refused(format!(
                "extent {offset_bytes}+{length_bytes} is outside the {size}-byte disk"
            ))),
        }
    }

    fn write_record(
        &mut self,
        kind: RecordKind,
        offset_bytes: u64,
        length_bytes: u64,
        payload: &[u8],
        data_crc: u32,
        flags: u8,
    ) -> Result<(), TapeError> {
        if self.failed {
            return Err(self.refused("an earlier write of this session failed".into()));
        }
        let record = RecordHeader {
            kind,
            flags,
            index: self.next_record,
            offset_bytes,
            length_bytes,
            stored_bytes: payload.len() as u32,
            data_crc,
        };
        let head = record.encode();
        debug_assert_eq!(
            RecordHeader::decode(&head),
            Ok(record),
            "a record decodes as written"
        );
        if kind != RecordKind::Trailer {
            let header_crc = &head[RECORD_HEADER_BYTES - 4..];
            self.totals.record_crc = crc32c::crc32c_append(self.totals.record_crc, header_crc);
        }
        if kind == RecordKind::Data {
            self.totals.stored_bytes += payload.len() as u64;
        }
        self.next_record += 1;
        self.push(&head)?;
        self.push(payload)
    }

    fn push(&mut self, mut bytes: &[u8]) -> Result<(), TapeError> {
        let capacity = self.block.len() - BLOCK_HEADER_BYTES;
        while !bytes.is_empty() {
            let piece = bytes.len().min(capacity - self.used);
            let at = BLOCK_HEADER_BYTES + self.used;
            self.block[at..at + piece].copy_from_slice(&bytes[..piece]);
            self.used += piece;
            bytes = &bytes[piece..];
            if self.used == capacity {
                self.emit_block()?;
            }
        }
        Ok(())
    }

    fn emit_block(&mut self) -> Result<(), TapeError> {
        let header = BlockHeader {
            session_id: self.header.session_id,
            sequence: self.sequence,
            used_bytes: self.used as u32,
        };
        // The rest of a last block is zeroes, so that its crc is of what
        // the reader sees.
        self.block[BLOCK_HEADER_BYTES + self.used..].fill(0);
        seal_block(&mut self.block, &header);
        let tape = self.tape.as_mut().expect("the session is open");
        if let Err(source) = tape.media.write_block(&self.block) {
            self.failed = true;
            return Err(TapeError::io(&header_path(self), source));
        }
        self.sequence += 1;
        self.used = 0;
        Ok(())
    }
}

fn header_path(session: &SessionWriter) -> std::path::PathBuf {
    session.tape().media.path.clone()
}

impl Drop for SessionWriter {
    /// An unfinished session on a file is cut off, so the tape ends with
    /// its last complete session again (best effort: the next open cuts
    /// it otherwise).
    fn drop(&mut self) {
        if let Some(tape) = self.tape.as_mut() {
            if !tape.media.device {
                let _ = tape.media.truncate(self.start_bytes);
            }
        }
    }
}
