//! A chain of tape files read at random: one checked pass over the chain
//! indexes every data extent of the sessions a restore would apply (the
//! last full one, then the incrementals up to the checkpoint asked for),
//! newest on top; reads then go straight to the blocks that hold the
//! bytes asked for, each block's crc checked as it is read.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use backend::{BlockBackend, Extent, STATE_HOLE, STATE_ZERO, push_extent};

use super::cache::Lru;
use super::ranges::{RangeMap, Source};
use super::tape_index::{IndexedRecord, IndexedSession, TapeIndex};
use super::{ViewError, damaged, read_only};
use crate::tape::format::{BLOCK_HEADER_BYTES, FLAG_ZSTD, Id, open_block};
use crate::tape::verify::{chain_end_error, check_session_order, check_tape_order};
use crate::tape::{
    ChainReport, PayloadPosition, Record, SessionReport, TapeReader, verify_chain_visiting,
};

/// Blocks kept after a read (256 KiB each by default: 16 MiB).
const BLOCK_CACHE_COUNT: usize = 64;
/// Decompressed extents kept (at most 4 MiB each).
const EXTENT_CACHE_COUNT: usize = 8;

/// Where one data extent of a session is on its tape.
#[derive(Debug, Clone, Copy)]
struct TapeExtent {
    /// Its session's number among the sessions the view applies.
    session: u32,
    tape: u16,
    session_id: Id,
    /// The block holding the session's header (its block 0).
    session_start_block: u64,
    payload: PayloadPosition,
    length_bytes: u64,
    stored_bytes: u32,
    compressed: bool,
    data_crc: u32,
}

#[derive(Debug, Clone, Copy)]
enum Piece {
    /// `within` bytes into extent number `extent`.
    Data {
        extent: u32,
        within: u64,
    },
    Zero,
}

impl Source for Piece {
    fn advanced(self, by_bytes: u64) -> Piece {
        match self {
            Piece::Data { extent, within } => Piece::Data {
                extent,
                within: within + by_bytes,
            },
            Piece::Zero => Piece::Zero,
        }
    }
}

struct Tape {
    path: PathBuf,
    file: File,
    block_size_bytes: u64,
    /// Per block: 0 until a read checked it whole (crc, session,
    /// sequence), then its session's number in the chain << 32 | its used
    /// bytes + 1, so that later reads take just their bytes from it.
    /// Empty for a tape of more than CHECKED_BLOCKS_MAX blocks.
    checked: Vec<AtomicU64>,
}

/// Blocks of one tape whose checks are remembered (8 bytes each: 128 MiB).
const CHECKED_BLOCKS_MAX: u64 = 1 << 24;

/// A tape chain at one of its checkpoints, as a read-only backend.
pub struct TapeView {
    tapes: Vec<Tape>,
    extents: Vec<TapeExtent>,
    map: RangeMap<Piece>,
    size_bytes: u64,
    pub chain: ChainReport,
    blocks: Mutex<Lru<(u16, u64), Vec<u8>>>,
    decoded: Mutex<Lru<u32, Vec<u8>>>,
}

impl std::fmt::Debug for TapeView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapeView")
            .field(
                "tapes",
                &self.tapes.iter().map(|t| &t.path).collect::<Vec<_>>(),
            )
            .field("extents", &self.extents.len())
            .finish_non_exhaustive()
    }
}

impl TapeView {
    /// Checks the chain `paths` up to `until` (its end when None) and
    /// indexes it: from the indexes beside the tapes when each still
    /// describes its tape, or by one checked pass over the tapes, whose
    /// indexes are then saved. Damage anywhere up to `until` refuses the
    /// view, naming the last checkpoint that is still whole.
    pub fn open(paths: &[PathBuf], until: Option<&str>) -> Result<TapeView, ViewError> {
        let mut tapes = Vec::with_capacity(paths.len());
        for path in paths {
            tapes.push(open_tape(path)?);
        }
        let (chain, sessions) = match from_indexes(paths, until)? {
            Some(found) => found,
            None => by_reading(paths, until)?,
        };
        for (tape, (_, label)) in tapes.iter_mut().zip(&chain.tapes) {
            tape.block_size_bytes = u64::from(label.block_size_bytes);
            let blocks = tape.file.metadata().map_or(0, |m| m.len()) / tape.block_size_bytes;
            if blocks <= CHECKED_BLOCKS_MAX {
                tape.checked = (0..blocks).map(|_| AtomicU64::new(0)).collect();
            }
        }
        let applied = chain.restore_sessions();
        let size_bytes = applied[0].header.source_size_bytes;
        let first = chain.sessions.len() - applied.len();
        let mut map = RangeMap::new();
        let mut extents = Vec::new();
        for (session_number, (report, session)) in chain.sessions[first..]
            .iter()
            .zip(&sessions[first..])
            .enumerate()
        {
            for record in &session.records {
                let piece = match record.data {
                    Some((payload, stored_bytes, flags, data_crc)) => {
                        extents.push(TapeExtent {
                            session: session_number as u32,
                            tape: report.tape_index as u16,
                            session_id: report.header.session_id,
                            session_start_block: report.start.block_index,
                            payload,
                            length_bytes: record.length_bytes,
                            stored_bytes,
                            compressed: flags & FLAG_ZSTD != 0,
                            data_crc,
                        });
                        Piece::Data {
                            extent: (extents.len() - 1) as u32,
                            within: 0,
                        }
                    }
                    None => Piece::Zero,
                };
                map.insert(record.offset_bytes, record.length_bytes, piece);
            }
        }
        Ok(TapeView {
            tapes,
            extents,
            map,
            size_bytes,
            chain,
            blocks: Mutex::new(Lru::new(BLOCK_CACHE_COUNT)),
            decoded: Mutex::new(Lru::new(EXTENT_CACHE_COUNT)),
        })
    }

    /// The checkpoint the view shows.
    pub fn checkpoint(&self) -> &str {
        self.chain.last_checkpoint().unwrap_or_default()
    }

    /// Data extents indexed (after newer sessions replaced older ones).
    pub fn extent_count(&self) -> usize {
        self.map.len()
    }

    /// Fills `out` from extent `number`, `within` bytes in. With
    /// `nowait`, only from what needs no wait (a decompressed extent in
    /// the cache, blocks checked before whose bytes are in the page
    /// cache): false when the read must be done by `read_at` instead.
    fn read_piece(
        &self,
        number: u32,
        within: u64,
        out: &mut [u8],
        nowait: bool,
    ) -> io::Result<bool> {
        let extent = &self.extents[number as usize];
        if extent.compressed {
            let data = if nowait {
                match self.decoded.lock().expect("cache lock").get(&number) {
                    Some(data) => data,
                    None => return Ok(false),
                }
            } else {
                self.decoded_extent(number)?
            };
            out.copy_from_slice(&data[within as usize..within as usize + out.len()]);
            return Ok(true);
        }
        let tape = &self.tapes[usize::from(extent.tape)];
        let capacity = tape.block_size_bytes - BLOCK_HEADER_BYTES as u64;
        let mut stream = u64::from(extent.payload.cursor_bytes) + within;
        let mut done = 0usize;
        while done < out.len() {
            let block_index = extent.payload.block_index + stream / capacity;
            let cursor = (stream % capacity) as usize;
            let take = (out.len() - done).min(capacity as usize - cursor);
            let part = &mut out[done..done + take];
            // A block checked whole before: only the bytes asked for.
            let checked = tape
                .checked
                .get(block_index as usize)
                .map_or(0, |c| c.load(Ordering::Acquire));
            if checked >> 32 == u64::from(extent.session)
                && cursor + take < (checked & 0xFFFF_FFFF) as usize
            {
                let at = block_index * tape.block_size_bytes + (BLOCK_HEADER_BYTES + cursor) as u64;
                if !read_file_at(tape, part, at, nowait, block_index)? {
                    return Ok(false);
                }
            } else if nowait {
                return Ok(false);
            } else {
                let block = self.block(extent, block_index)?;
                let used = block.len() - BLOCK_HEADER_BYTES;
                if cursor + take > used {
                    return Err(damaged(
                        &tape.path,
                        block_index,
                        "the block ends before the extent it holds",
                    ));
                }
                let at = BLOCK_HEADER_BYTES + cursor;
                part.copy_from_slice(&block[at..at + take]);
            }
            done += take;
            stream += take as u64;
        }
        Ok(true)
    }

    fn read_pieces(&self, buf: &mut [u8], offset: u64, nowait: bool) -> io::Result<bool> {
        let mut done = 0usize;
        for (_, length, piece) in self.map.pieces(offset, buf.len() as u64) {
            let part = &mut buf[done..done + length as usize];
            match piece {
                Some(Piece::Data { extent, within }) => {
                    if !self.read_piece(extent, within, part, nowait)? {
                        return Ok(false);
                    }
                }
                Some(Piece::Zero) | None => part.fill(0),
            }
            done += length as usize;
        }
        Ok(true)
    }

    /// A compressed extent's data, read whole, decompressed and checked.
    fn decoded_extent(&self, number: u32) -> io::Result<Arc<Vec<u8>>> {
        if let Some(data) = self.decoded.lock().expect("cache lock").get(&number) {
            return Ok(data);
        }
        let extent = self.extents[number as usize];
        let tape = &self.tapes[usize::from(extent.tape)];
        let stored = extent.stored_bytes as usize;
        let mut payload = Vec::with_capacity(stored);
        let capacity = tape.block_size_bytes - BLOCK_HEADER_BYTES as u64;
        let mut stream = u64::from(extent.payload.cursor_bytes);
        while payload.len() < stored {
            let block_index = extent.payload.block_index + stream / capacity;
            let cursor = (stream % capacity) as usize;
            let block = self.block(&extent, block_index)?;
            let used = block.len() - BLOCK_HEADER_BYTES;
            let take = (stored - payload.len()).min(used.saturating_sub(cursor));
            if take == 0 {
                return Err(damaged(&tape.path, block_index, "an extent ends early"));
            }
            let at = BLOCK_HEADER_BYTES + cursor;
            payload.extend_from_slice(&block[at..at + take]);
            stream += take as u64;
        }
        let data = crate::tape::decompress(&payload, extent.length_bytes as usize)
            .map_err(|reason| damaged(&tape.path, extent.payload.block_index, &reason))?;
        if crc32c::crc32c(&data) != extent.data_crc {
            return Err(damaged(
                &tape.path,
                extent.payload.block_index,
                "data checksum mismatch",
            ));
        }
        let data = Arc::new(data);
        self.decoded
            .lock()
            .expect("cache lock")
            .put(number, data.clone(), 1);
        Ok(data)
    }

    /// Block `block_index` of the extent's tape, checked to be whole and
    /// to be the block of its session the index says; its used bytes only.
    fn block(&self, extent: &TapeExtent, block_index: u64) -> io::Result<Arc<Vec<u8>>> {
        let key = (extent.tape, block_index);
        if let Some(block) = self.blocks.lock().expect("cache lock").get(&key) {
            return Ok(block);
        }
        let tape = &self.tapes[usize::from(extent.tape)];
        let mut block = vec![0u8; tape.block_size_bytes as usize];
        tape.file
            .read_exact_at(&mut block, block_index * tape.block_size_bytes)
            .map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("{} block {block_index}: {error}", tape.path.display()),
                )
            })?;
        let header =
            open_block(&block).map_err(|reason| damaged(&tape.path, block_index, &reason))?;
        let sequence = block_index - extent.session_start_block;
        if header.session_id != extent.session_id || header.sequence != sequence {
            return Err(damaged(
                &tape.path,
                block_index,
                &format!(
                    "block {sequence} of session {} expected, found block {} of session {} (the tape changed since it was indexed)",
                    extent.session_id, header.sequence, header.session_id
                ),
            ));
        }
        block.truncate(BLOCK_HEADER_BYTES + header.used_bytes as usize);
        if let Some(checked) = tape.checked.get(block_index as usize) {
            let used = u64::from(header.used_bytes) + 1;
            checked.store(u64::from(extent.session) << 32 | used, Ordering::Release);
        }
        let block = Arc::new(block);
        self.blocks
            .lock()
            .expect("cache lock")
            .put(key, block.clone(), 1);
        Ok(block)
    }
}

/// Bytes of a tape file at `at`; with `nowait` only from the page cache
/// (false when that would wait).
fn read_file_at(
    tape: &Tape,
    part: &mut [u8],
    at: u64,
    nowait: bool,
    block_index: u64,
) -> io::Result<bool> {
    let failed = |error: io::Error| {
        io::Error::new(
            error.kind(),
            format!("{} block {block_index}: {error}", tape.path.display()),
        )
    };
    if !nowait {
        tape.file.read_exact_at(part, at).map_err(failed)?;
        return Ok(true);
    }
    let mut done = 0;
    while done < part.len() {
        let rest = &mut part[done..];
        let iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        // SAFETY: one iovec over `rest`, which outlives the call.
        let count = unsafe {
            libc::preadv2(
                std::os::fd::AsRawFd::as_raw_fd(&tape.file),
                &iov,
                1,
                (at + done as u64) as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if count > 0 {
            done += count as usize;
            continue;
        }
        let error = io::Error::last_os_error();
        match (count, error.raw_os_error()) {
            (0, _) => return Err(failed(io::ErrorKind::UnexpectedEof.into())),
            (_, Some(libc::EINTR)) => {}
            (_, Some(libc::EAGAIN | libc::EOPNOTSUPP)) => return Ok(false),
            _ => return Err(failed(error)),
        }
    }
    Ok(true)
}

fn open_tape(path: &Path) -> Result<Tape, ViewError> {
    let io = |source| ViewError::Io {
        what: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    if file.metadata().map_err(io)?.file_type().is_char_device() {
        return Err(ViewError::Refused(format!(
            "{}: a tape drive is read front to back; copy the tape to a file (dd bs=BLOCKSIZE) to read it at random",
            path.display()
        )));
    }
    Ok(Tape {
        path: path.to_path_buf(),
        file,
        block_size_bytes: 0,
        checked: Vec::new(),
    })
}

type Indexed = (ChainReport, Vec<IndexedSession>);

/// The chain from the indexes beside its tapes, checked for order as a
/// pass over the tapes checks it; None when a tape has no index that
/// still describes it (another id, block size or length).
fn from_indexes(paths: &[PathBuf], until: Option<&str>) -> Result<Option<Indexed>, ViewError> {
    let mut indexes = Vec::with_capacity(paths.len());
    for path in paths {
        let Some(index) = TapeIndex::load(path) else {
            return Ok(None);
        };
        let label = TapeReader::open(path)
            .map_err(|error| ViewError::Tape {
                good_until: None,
                error,
            })?
            .label()
            .clone();
        let length = std::fs::metadata(path).map_or(0, |m| m.len());
        if index.tape_id != label.tape_id
            || index.length_bytes != length
            || index.block_size_bytes != label.block_size_bytes
        {
            return Ok(None);
        }
        indexes.push((label, index));
    }
    let mut chain = ChainReport {
        tapes: Vec::new(),
        sessions: Vec::new(),
    };
    let mut sessions = Vec::new();
    let refused = |chain: &ChainReport, error| ViewError::Tape {
        good_until: chain.last_checkpoint().map(str::to_string),
        error,
    };
    for (tape_index, ((label, index), path)) in indexes.into_iter().zip(paths).enumerate() {
        check_tape_order(&chain, path, &label).map_err(|e| refused(&chain, e))?;
        chain.tapes.push((path.clone(), label));
        for session in index.sessions {
            check_session_order(&chain, path, &session.header).map_err(|e| refused(&chain, e))?;
            let reached = until == Some(session.header.target.checkpoint.as_str());
            chain.sessions.push(SessionReport {
                tape_index,
                start: session.start,
                header: session.header.clone(),
                totals: session.totals,
            });
            sessions.push(session);
            if reached {
                return Ok(Some((chain, sessions)));
            }
        }
    }
    if until.is_some() || chain.sessions.is_empty() {
        let error = chain_end_error(paths, until, &chain);
        return Err(refused(&chain, error));
    }
    Ok(Some((chain, sessions)))
}

/// The chain by one checked pass over its tapes, indexing each extent;
/// the index of each tape read to its end is saved beside it.
fn by_reading(paths: &[PathBuf], until: Option<&str>) -> Result<Indexed, ViewError> {
    let mut seen: Vec<(Id, IndexedRecord)> = Vec::new();
    let mut visit = |reader: &TapeReader, record: &Record| {
        if let Some(indexed) = index_record(reader, record) {
            seen.push(indexed);
        }
    };
    let (chain, error) = verify_chain_visiting(paths, until, &mut visit);
    if let Some(error) = error {
        return Err(ViewError::Tape {
            good_until: chain.last_checkpoint().map(str::to_string),
            error,
        });
    }
    let mut sessions: Vec<IndexedSession> = chain
        .sessions
        .iter()
        .map(|report| IndexedSession {
            start: report.start,
            header: report.header.clone(),
            totals: report.totals,
            records: Vec::new(),
        })
        .collect();
    for (session_id, record) in seen {
        if let Some(session) = sessions
            .iter_mut()
            .rev()
            .find(|s| s.header.session_id == session_id)
        {
            session.records.push(record);
        }
    }
    save_indexes(&chain, &sessions, until.is_some());
    Ok((chain, sessions))
}

/// Saves the index of each tape the pass read to its end: all of them,
/// unless `until` stopped it on the last one it read.
fn save_indexes(chain: &ChainReport, sessions: &[IndexedSession], stopped: bool) {
    let last_tape = chain.sessions.last().map_or(0, |s| s.tape_index);
    for (tape_index, (path, label)) in chain.tapes.iter().enumerate() {
        if stopped && tape_index >= last_tape {
            break;
        }
        let index = TapeIndex {
            tape_id: label.tape_id,
            length_bytes: std::fs::metadata(path).map_or(0, |m| m.len()),
            block_size_bytes: label.block_size_bytes,
            sessions: chain
                .sessions
                .iter()
                .zip(sessions)
                .filter(|(report, _)| report.tape_index == tape_index)
                .map(|(_, session)| session.clone())
                .collect(),
        };
        index.save(path);
    }
}

/// A data or zero record as the index keeps it, with its session.
fn index_record(reader: &TapeReader, record: &Record) -> Option<(Id, IndexedRecord)> {
    let header = reader.header()?;
    let record_header = reader.last_record_header()?;
    let indexed = match record {
        Record::Data { offset_bytes, data } => IndexedRecord {
            offset_bytes: *offset_bytes,
            length_bytes: data.len() as u64,
            data: Some((
                reader.last_payload_position(),
                record_header.stored_bytes,
                record_header.flags,
                record_header.data_crc,
            )),
        },
        Record::Zero {
            offset_bytes,
            length_bytes,
        } => IndexedRecord {
            offset_bytes: *offset_bytes,
            length_bytes: *length_bytes,
            data: None,
        },
        Record::Files(_) | Record::Trailer(_) => return None,
    };
    Some((header.session_id, indexed))
}

impl BlockBackend for TapeView {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn can_extents(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_pieces(buf, offset, false).map(|_| ())
    }

    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        self.read_pieces(buf, offset, true)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> io::Result<()> {
        Err(read_only())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn extents(
        &self,
        offset: u64,
        length: u64,
        max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        let first = out.len();
        for (_, piece_length, piece) in self.map.pieces(offset, length) {
            let flags = match piece {
                Some(Piece::Data { .. }) => 0,
                Some(Piece::Zero) | None => STATE_HOLE | STATE_ZERO,
            };
            push_extent(out, first, piece_length, flags);
            if out.len() - first >= max_extents {
                break;
            }
        }
        Ok(())
    }
}
