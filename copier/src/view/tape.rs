//! A chain of tape files read at random: one checked pass over the chain
//! indexes every data extent of the sessions a restore would apply (the
//! last full one, then the incrementals up to the checkpoint asked for),
//! newest on top; reads then go straight to the blocks that hold the
//! bytes asked for, each block's crc checked as it is read.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use backend::{BlockBackend, Extent, STATE_HOLE, STATE_ZERO, push_extent};

use super::cache::Lru;
use super::ranges::{RangeMap, Source};
use super::{ViewError, damaged, read_only};
use crate::tape::format::{BLOCK_HEADER_BYTES, FLAG_ZSTD, Id, open_block};
use crate::tape::{ChainReport, PayloadPosition, Record, TapeReader, verify_chain_visiting};

/// Blocks kept after a read (256 KiB each by default: 16 MiB).
const BLOCK_CACHE_COUNT: usize = 64;
/// Decompressed extents kept (at most 4 MiB each).
const EXTENT_CACHE_COUNT: usize = 8;

/// Where one data extent of a session is on its tape.
#[derive(Debug, Clone, Copy)]
struct TapeExtent {
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
}

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

/// A data or zero record seen by the indexing pass, with its session.
struct Seen {
    session_id: Id,
    offset_bytes: u64,
    /// None for a zero extent.
    extent: Option<TapeExtent>,
    length_bytes: u64,
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
    /// indexes it. Damage anywhere up to `until` refuses the view, naming
    /// the last checkpoint that is still whole.
    pub fn open(paths: &[PathBuf], until: Option<&str>) -> Result<TapeView, ViewError> {
        let mut tapes = Vec::with_capacity(paths.len());
        for path in paths {
            let file = File::open(path).map_err(|source| ViewError::Io {
                what: path.display().to_string(),
                source,
            })?;
            let metadata = file.metadata().map_err(|source| ViewError::Io {
                what: path.display().to_string(),
                source,
            })?;
            if metadata.file_type().is_char_device() {
                return Err(ViewError::Refused(format!(
                    "{}: a tape drive is read front to back; copy the tape to a file (dd bs=BLOCKSIZE) to read it at random",
                    path.display()
                )));
            }
            tapes.push(Tape {
                path: path.clone(),
                file,
                block_size_bytes: 0,
            });
        }
        let mut seen: Vec<Seen> = Vec::new();
        let mut visit = |reader: &TapeReader, record: &Record| {
            index_record(paths, reader, record, &mut seen);
        };
        let (chain, error) = verify_chain_visiting(paths, until, &mut visit);
        if let Some(error) = error {
            return Err(ViewError::Tape {
                good_until: chain.last_checkpoint().map(str::to_string),
                error,
            });
        }
        for (tape, (_, label)) in tapes.iter_mut().zip(&chain.tapes) {
            tape.block_size_bytes = u64::from(label.block_size_bytes);
        }
        let applied: Vec<Id> = chain
            .restore_sessions()
            .iter()
            .map(|s| s.header.session_id)
            .collect();
        let size_bytes = chain.restore_sessions()[0].header.source_size_bytes;
        let mut map = RangeMap::new();
        let mut extents = Vec::new();
        for record in seen.iter().filter(|s| applied.contains(&s.session_id)) {
            let piece = match record.extent {
                Some(extent) => {
                    extents.push(extent);
                    Piece::Data {
                        extent: (extents.len() - 1) as u32,
                        within: 0,
                    }
                }
                None => Piece::Zero,
            };
            map.insert(record.offset_bytes, record.length_bytes, piece);
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

    fn read_piece(&self, number: u32, within: u64, out: &mut [u8]) -> io::Result<()> {
        let extent = &self.extents[number as usize];
        if extent.compressed {
            let data = self.decoded_extent(number)?;
            out.copy_from_slice(&data[within as usize..within as usize + out.len()]);
            return Ok(());
        }
        let tape = &self.tapes[usize::from(extent.tape)];
        let capacity = tape.block_size_bytes - BLOCK_HEADER_BYTES as u64;
        let mut stream = u64::from(extent.payload.cursor_bytes) + within;
        let mut done = 0usize;
        while done < out.len() {
            let block_index = extent.payload.block_index + stream / capacity;
            let cursor = (stream % capacity) as usize;
            let block = self.block(extent, block_index)?;
            let used = block.len() - BLOCK_HEADER_BYTES;
            let take = (out.len() - done).min(capacity as usize - cursor);
            if cursor + take > used {
                return Err(damaged(
                    &tape.path,
                    block_index,
                    "the block ends before the extent it holds",
                ));
            }
            let at = BLOCK_HEADER_BYTES + cursor;
            out[done..done + take].copy_from_slice(&block[at..at + take]);
            done += take;
            stream += take as u64;
        }
        Ok(())
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
            .put(number, data.clone());
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
        let block = Arc::new(block);
        self.blocks
            .lock()
            .expect("cache lock")
            .put(key, block.clone());
        Ok(block)
    }
}

fn index_record(paths: &[PathBuf], reader: &TapeReader, record: &Record, seen: &mut Vec<Seen>) {
    let (Some(header), Some(start), Some(record_header)) = (
        reader.header(),
        reader.session_start(),
        reader.last_record_header(),
    ) else {
        return;
    };
    let tape = paths
        .iter()
        .position(|path| path == reader.path())
        .expect("the reader reads one of the chain's tapes") as u16;
    let (offset_bytes, length_bytes, extent) = match record {
        Record::Data { offset_bytes, data } => (
            *offset_bytes,
            data.len() as u64,
            Some(TapeExtent {
                tape,
                session_id: header.session_id,
                session_start_block: start.block_index,
                payload: reader.last_payload_position(),
                length_bytes: data.len() as u64,
                stored_bytes: record_header.stored_bytes,
                compressed: record_header.flags & FLAG_ZSTD != 0,
                data_crc: record_header.data_crc,
            }),
        ),
        Record::Zero {
            offset_bytes,
            length_bytes,
        } => (*offset_bytes, *length_bytes, None),
        Record::Files(_) | Record::Trailer(_) => return,
    };
    seen.push(Seen {
        session_id: header.session_id,
        offset_bytes,
        extent,
        length_bytes,
    });
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
        let mut done = 0usize;
        for (_, length, piece) in self.map.pieces(offset, buf.len() as u64) {
            let part = &mut buf[done..done + length as usize];
            match piece {
                Some(Piece::Data { extent, within }) => self.read_piece(extent, within, part)?,
                Some(Piece::Zero) | None => part.fill(0),
            }
            done += length as usize;
        }
        Ok(())
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
