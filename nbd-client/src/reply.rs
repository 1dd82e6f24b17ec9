//! The reader thread: decodes reply frames, matches them to requests by
//! cookie, reassembles READ data and block status, and completes requests.
//!
//! Every length in a frame is checked before anything is read or allocated
//! for it: READ data goes straight into the request's own buffer once the
//! chunk is known to lie inside the request; status and error payloads go
//! into one scratch buffer after their length passed a named maximum. Any
//! violation ends the connection (doc/proto.md: a client MUST hang up on an
//! unknown or inconsistent chunk); errors the server reports are values.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufReader, Read};
use std::sync::Arc;

use nbd_server::proto::*;

use crate::error::{Command, CommandFailure, ConnectionError, ProtocolError};
use crate::inflight::{Expect, Outcome, Reply, Request, Shared};
use crate::info::ExportInfo;
use crate::status::{self, BlockStatus, Extent};
use crate::transport::Stream;

/// Bytes the reader buffers from the socket: many small replies per read;
/// large READ data bypasses the buffer into the request's own.
pub const READ_BUFFER_BYTES: usize = 256 * 1024;
/// Separate pieces one READ reply may arrive in before the client calls the
/// server hostile. Chunks sent in order merge into one piece, so only a
/// server scattering small chunks in random order comes near this.
pub const READ_FRAGMENTS_MAX: usize = 4096;
/// An error chunk: error, message length, a message of at most `STRING_MAX`
/// bytes, and an offset for ERROR_OFFSET.
pub const ERROR_CHUNK_LEN_MAX: u64 = 6 + STRING_MAX as u64 + 8;
/// Status chunks: id (and count when extended), then at most the spec's
/// `EXTENTS_PER_REPLY_MAX` descriptors.
pub const STATUS_CHUNK_LEN_MAX: u64 = 4 + 8 * EXTENTS_PER_REPLY_MAX as u64;
pub const STATUS_EXT_CHUNK_LEN_MAX: u64 = 8 + 16 * EXTENTS_PER_REPLY_MAX as u64;
/// A scratch buffer grown past this by a large status chunk is let go.
const SCRATCH_KEEP_BYTES: usize = 1024 * 1024;

/// Which parts of a READ the reply has filled, to refuse overlaps and to
/// check that a successful reply covered everything.
#[derive(Debug, Default)]
struct Coverage {
    /// Disjoint, non-adjacent runs: start -> end, relative to the request.
    runs: BTreeMap<u64, u64>,
    covered_bytes: u64,
}

impl Coverage {
    fn insert(&mut self, start: u64, end: u64) -> Result<(), ProtocolError> {
        debug_assert!(start < end);
        let overlap = ProtocolError::OverlappingChunk {
            offset_bytes: start,
        };
        let before = self.runs.range(..=start).next_back().map(|(&s, &e)| (s, e));
        if before.is_some_and(|(_, before_end)| before_end > start) {
            return Err(overlap);
        }
        if self.runs.range(start..end).next().is_some() {
            return Err(overlap);
        }
        let mut merged_start = start;
        if let Some((before_start, before_end)) = before {
            if before_end == start {
                self.runs.remove(&before_start);
                merged_start = before_start;
            }
        }
        let merged_end = self.runs.remove(&end).unwrap_or(end);
        if self.runs.len() >= READ_FRAGMENTS_MAX {
            return Err(ProtocolError::TooFragmented {
                limit: READ_FRAGMENTS_MAX,
            });
        }
        self.runs.insert(merged_start, merged_end);
        self.covered_bytes += end - start;
        Ok(())
    }
}

/// A request the reader has claimed: replies have started arriving.
#[derive(Debug)]
struct Claimed {
    request: Request,
    progress: Progress,
    /// The first error the server reported; later chunks are still read.
    error: Option<CommandFailure>,
    /// A chunk without DONE has arrived (so a simple reply cannot follow).
    chunks_seen: bool,
}

#[derive(Debug)]
enum Progress {
    Read { buffer: Vec<u8>, coverage: Coverage },
    Status(Vec<(u32, Vec<Extent>)>),
    Plain,
}

#[derive(Debug)]
pub(crate) struct Reader {
    input: BufReader<Stream>,
    mode: ReplyMode,
    contexts: Vec<(u32, String)>,
    shared: Arc<Shared>,
    claimed: HashMap<u64, Claimed>,
    scratch: Vec<u8>,
}

impl Reader {
    pub fn new(input: BufReader<Stream>, info: &ExportInfo, shared: Arc<Shared>) -> Reader {
        Reader {
            input,
            mode: info.reply_mode,
            contexts: info.meta_contexts.clone(),
            shared,
            claimed: HashMap::new(),
            scratch: Vec::new(),
        }
    }

    /// Reads replies until the connection ends, then fails whatever is
    /// still in flight with the reason.
    pub fn run(mut self) {
        let error = loop {
            match self.frame() {
                Ok(true) => {}
                Ok(false) if self.shared.is_closing() => break ConnectionError::Closed,
                Ok(false) => break ConnectionError::ServerClosed { mid_reply: false },
                Err(error) => break error,
            }
        };
        let claimed = self.claimed.drain().map(|(_, c)| c.request).collect();
        self.shared.fail(error, claimed);
    }

    /// Reads and handles one frame; `Ok(false)` at a clean end of stream.
    fn frame(&mut self) -> Result<bool, ConnectionError> {
        match self.mode {
            ReplyMode::Simple => {
                let mut header = [0u8; SIMPLE_REPLY_LEN];
                if !self.read_start(&mut header)? {
                    return Ok(false);
                }
                let reply = SimpleReply::decode(&header).map_err(ProtocolError::from)?;
                self.simple(reply)?;
            }
            ReplyMode::Structured => {
                let mut header = [0u8; STRUCTURED_CHUNK_HEADER_LEN];
                if !self.read_start(&mut header[..4])? {
                    return Ok(false);
                }
                match be32(&header[..4]) {
                    SIMPLE_REPLY_MAGIC => {
                        let mut simple = [0u8; SIMPLE_REPLY_LEN];
                        simple[..4].copy_from_slice(&header[..4]);
                        self.fill(&mut simple[4..])?;
                        let reply = SimpleReply::decode(&simple).map_err(ProtocolError::from)?;
                        self.simple(reply)?;
                    }
                    STRUCTURED_REPLY_MAGIC => {
                        self.fill(&mut header[4..])?;
                        let chunk =
                            ChunkHeader::decode_structured(&header).map_err(ProtocolError::from)?;
                        self.chunk(chunk)?;
                    }
                    magic => {
                        return Err(
                            ProtocolError::from(ReplyFrameError::BadReplyMagic(magic)).into()
                        );
                    }
                }
            }
            ReplyMode::Extended => {
                let mut header = [0u8; EXTENDED_CHUNK_HEADER_LEN];
                if !self.read_start(&mut header[..4])? {
                    return Ok(false);
                }
                let magic = be32(&header[..4]);
                if magic != EXTENDED_REPLY_MAGIC {
                    let error = match magic {
                        SIMPLE_REPLY_MAGIC => ProtocolError::SimpleReplyWithExtendedHeaders,
                        _ => ReplyFrameError::BadReplyMagic(magic).into(),
                    };
                    return Err(error.into());
                }
                self.fill(&mut header[4..])?;
                let chunk = ChunkHeader::decode_extended(&header).map_err(ProtocolError::from)?;
                self.chunk(chunk)?;
            }
        }
        Ok(true)
    }

    /// Finds the request a frame is for: claimed earlier, or claimed now.
    fn claim(&mut self, cookie: u64) -> Result<Claimed, ProtocolError> {
        if let Some(claimed) = self.claimed.remove(&cookie) {
            return Ok(claimed);
        }
        let mut request = self
            .shared
            .take_submitted(cookie)
            .ok_or(ProtocolError::UnknownCookie { cookie })?;
        let progress = match std::mem::replace(&mut request.expect, Expect::Plain) {
            Expect::Read(buffer) => Progress::Read {
                buffer,
                coverage: Coverage::default(),
            },
            Expect::Status => Progress::Status(Vec::new()),
            Expect::Plain => Progress::Plain,
        };
        Ok(Claimed {
            request,
            progress,
            error: None,
            chunks_seen: false,
        })
    }

    fn simple(&mut self, reply: SimpleReply) -> Result<(), ConnectionError> {
        let mut claimed = self.claim(reply.cookie)?;
        match self.simple_outcome(&mut claimed, reply) {
            Ok(outcome) => {
                self.shared.complete(claimed.request.done, outcome);
                Ok(())
            }
            Err(error) => {
                self.claimed.insert(reply.cookie, claimed);
                Err(error)
            }
        }
    }

    fn simple_outcome(
        &mut self,
        claimed: &mut Claimed,
        reply: SimpleReply,
    ) -> Result<Outcome, ConnectionError> {
        if claimed.chunks_seen {
            return Err(ProtocolError::SimpleReplyAfterChunks {
                cookie: reply.cookie,
            }
            .into());
        }
        if let Some(error) = NbdError::from_wire(reply.error) {
            // A READ's simple error reply carries no data, in every mode.
            return Ok(Err(self.server_error(
                error,
                reply.error,
                String::new(),
                None,
            )));
        }
        match &mut claimed.progress {
            Progress::Read { buffer, .. } => {
                if self.mode != ReplyMode::Simple {
                    return Err(ProtocolError::SimpleReplyToStructuredRead.into());
                }
                fill(&mut self.input, buffer, &self.shared)?;
                Ok(Ok(Reply::Read(std::mem::take(buffer))))
            }
            Progress::Status(_) => Err(ProtocolError::SimpleReplyToBlockStatus.into()),
            Progress::Plain => Ok(Ok(Reply::Done)),
        }
    }

    fn chunk(&mut self, header: ChunkHeader) -> Result<(), ConnectionError> {
        let cookie = header.cookie;
        let mut claimed = self.claim(cookie)?;
        let mut result = self.take_chunk(&mut claimed, &header);
        if result.is_ok() && header.is_done() {
            match self.finish(&mut claimed) {
                Ok(outcome) => {
                    self.shared.complete(claimed.request.done, outcome);
                    return Ok(());
                }
                Err(error) => result = Err(error),
            }
        }
        claimed.chunks_seen = true;
        self.claimed.insert(cookie, claimed);
        result
    }

    fn take_chunk(
        &mut self,
        claimed: &mut Claimed,
        header: &ChunkHeader,
    ) -> Result<(), ConnectionError> {
        let request = &claimed.request;
        if self.mode == ReplyMode::Extended && header.offset != request.offset {
            return Err(ProtocolError::OffsetNotEchoed {
                echoed: header.offset,
                requested: request.offset,
            }
            .into());
        }
        let unexpected = ProtocolError::UnexpectedChunk {
            chunk_type: header.chunk_type,
            command: request.command,
        };
        match header.chunk_type {
            REPLY_TYPE_NONE if header.length != 0 => Err(bad_length(header).into()),
            REPLY_TYPE_NONE if !header.is_done() => Err(ProtocolError::NoneWithoutDone.into()),
            REPLY_TYPE_NONE => Ok(()),
            REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                let Progress::Read { buffer, coverage } = &mut claimed.progress else {
                    return Err(unexpected.into());
                };
                let (offset, length) = (request.offset, request.length);
                let mut content = Content {
                    input: &mut self.input,
                    shared: &self.shared,
                    offset,
                    length,
                    buffer,
                    coverage,
                };
                if header.chunk_type == REPLY_TYPE_OFFSET_DATA {
                    content.data(header)
                } else {
                    content.hole(header)
                }
            }
            REPLY_TYPE_BLOCK_STATUS if self.mode != ReplyMode::Extended => {
                self.status(claimed, header, false)
            }
            REPLY_TYPE_BLOCK_STATUS_EXT if self.mode == ReplyMode::Extended => {
                self.status(claimed, header, true)
            }
            chunk_type if is_error_chunk(chunk_type) => self.error_chunk(claimed, header),
            _ => Err(unexpected.into()),
        }
    }

    fn status(
        &mut self,
        claimed: &mut Claimed,
        header: &ChunkHeader,
        extended: bool,
    ) -> Result<(), ConnectionError> {
        let request = &claimed.request;
        let Progress::Status(chunks) = &mut claimed.progress else {
            return Err(ProtocolError::UnexpectedChunk {
                chunk_type: header.chunk_type,
                command: request.command,
            }
            .into());
        };
        // (fixed part, descriptor size, largest chunk)
        let (fixed, unit, limit) = if extended {
            (8, 16, STATUS_EXT_CHUNK_LEN_MAX)
        } else {
            (4, 8, STATUS_CHUNK_LEN_MAX)
        };
        if header.length > limit {
            return Err(too_long(header, limit).into());
        }
        if header.length < fixed + unit || (header.length - fixed) % unit != 0 {
            return Err(bad_length(header).into());
        }
        self.read_scratch(header.length)?;
        let decoded = if extended {
            status::decode_extended(&self.scratch, request.offset, request.length)
        } else {
            status::decode_compact(&self.scratch, request.offset, request.length)
        };
        let (id, extents) = decoded?;
        if !self.contexts.iter().any(|(known, _)| *known == id) {
            return Err(ProtocolError::UnknownContext { id }.into());
        }
        if chunks.iter().any(|(seen, _)| *seen == id) {
            return Err(ProtocolError::RepeatedContext { id }.into());
        }
        chunks.push((id, extents));
        Ok(())
    }

    fn error_chunk(
        &mut self,
        claimed: &mut Claimed,
        header: &ChunkHeader,
    ) -> Result<(), ConnectionError> {
        let with_offset = header.chunk_type == REPLY_TYPE_ERROR_OFFSET;
        let fixed: u64 = if with_offset { 14 } else { 6 };
        if header.length > ERROR_CHUNK_LEN_MAX {
            return Err(too_long(header, ERROR_CHUNK_LEN_MAX).into());
        }
        if header.length < fixed {
            return Err(bad_length(header).into());
        }
        self.read_scratch(header.length)?;
        let code = be32(&self.scratch[0..4]);
        let message_bytes = usize::from(be16(&self.scratch[4..6]));
        if message_bytes as u64 > header.length - fixed {
            return Err(ProtocolError::ErrorMessageTooLong {
                message_bytes,
                length_bytes: header.length,
            }
            .into());
        }
        let Some(error) = NbdError::from_wire(code) else {
            return Err(ProtocolError::ErrorChunkWithoutError.into());
        };
        let message = String::from_utf8_lossy(&self.scratch[6..6 + message_bytes]).into_owned();
        let request = &claimed.request;
        let error_offset = if with_offset {
            let offset = be64(&self.scratch[6 + message_bytes..14 + message_bytes]);
            let inside = offset
                .checked_sub(request.offset)
                .is_some_and(|relative| relative < request.length);
            if request.command == Command::Flush || !inside {
                return Err(ProtocolError::ChunkOutsideRequest {
                    offset_bytes: offset,
                    length_bytes: 0,
                    request_offset_bytes: request.offset,
                    request_length_bytes: request.length,
                }
                .into());
            }
            Some(offset)
        } else {
            None
        };
        let failure = self.server_error(error, code, message, error_offset);
        claimed.error.get_or_insert(failure);
        Ok(())
    }

    /// The outcome of a request whose last chunk has arrived.
    fn finish(&mut self, claimed: &mut Claimed) -> Result<Outcome, ConnectionError> {
        if let Some(failure) = claimed.error.take() {
            return Ok(Err(failure));
        }
        match std::mem::replace(&mut claimed.progress, Progress::Plain) {
            Progress::Read { buffer, coverage } => {
                if coverage.covered_bytes != claimed.request.length {
                    return Err(ProtocolError::IncompleteRead {
                        covered_bytes: coverage.covered_bytes,
                        length_bytes: claimed.request.length,
                    }
                    .into());
                }
                Ok(Ok(Reply::Read(buffer)))
            }
            Progress::Status(mut chunks) => {
                let mut contexts = Vec::with_capacity(self.contexts.len());
                for (id, name) in &self.contexts {
                    let Some(index) = chunks.iter().position(|(seen, _)| seen == id) else {
                        return Err(ProtocolError::MissingContext {
                            context: name.clone(),
                        }
                        .into());
                    };
                    contexts.push((name.clone(), chunks.swap_remove(index).1));
                }
                Ok(Ok(Reply::Status(BlockStatus::new(contexts))))
            }
            Progress::Plain => Ok(Ok(Reply::Done)),
        }
    }

    fn server_error(
        &self,
        error: NbdError,
        code: u32,
        message: String,
        error_offset_bytes: Option<u64>,
    ) -> CommandFailure {
        if error == NbdError::Shutdown {
            // The spec: on ESHUTDOWN the client must disconnect; new
            // requests are refused until the owner closes and reconnects.
            self.shared.mark_shutting_down();
        }
        CommandFailure::Server {
            error,
            code,
            message,
            error_offset_bytes,
        }
    }

    /// Reads a payload whose length the caller bounded into `scratch`.
    fn read_scratch(&mut self, length: u64) -> Result<(), ConnectionError> {
        if self.scratch.capacity() > SCRATCH_KEEP_BYTES {
            self.scratch = Vec::new();
        }
        self.scratch.resize(length as usize, 0);
        fill(&mut self.input, &mut self.scratch, &self.shared)
    }

    /// Reads the start of a frame; `Ok(false)` if the stream ended cleanly
    /// before its first byte.
    fn read_start(&mut self, buf: &mut [u8]) -> Result<bool, ConnectionError> {
        loop {
            match self.input.read(buf) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.fill(&mut buf[n..])?;
                    return Ok(true);
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(stream_error(error, &self.shared)),
            }
        }
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), ConnectionError> {
        fill(&mut self.input, buf, &self.shared)
    }
}

/// The READ content chunks, with the pieces of the reader they need.
struct Content<'a> {
    input: &'a mut BufReader<Stream>,
    shared: &'a Shared,
    offset: u64,
    length: u64,
    buffer: &'a mut Vec<u8>,
    coverage: &'a mut Coverage,
}

impl Content<'_> {
    /// OFFSET_DATA: u64 offset, then data, read straight into the buffer
    /// once it is known to lie inside the request.
    fn data(&mut self, header: &ChunkHeader) -> Result<(), ConnectionError> {
        if header.length < 9 {
            return Err(bad_length(header).into());
        }
        if header.length - 8 > self.length {
            return Err(too_long(header, self.length + 8).into());
        }
        let mut offset = [0u8; 8];
        fill(self.input, &mut offset, self.shared)?;
        let (start, end) = self.place(u64::from_be_bytes(offset), header.length - 8)?;
        fill(self.input, &mut self.buffer[start..end], self.shared)
    }

    /// OFFSET_HOLE: u64 offset, u32 length of zeroes.
    fn hole(&mut self, header: &ChunkHeader) -> Result<(), ConnectionError> {
        if header.length != 12 {
            return Err(bad_length(header).into());
        }
        let mut payload = [0u8; 12];
        fill(self.input, &mut payload, self.shared)?;
        let hole_length = u64::from(be32(&payload[8..12]));
        if hole_length == 0 {
            return Err(ProtocolError::EmptyHole.into());
        }
        let (start, end) = self.place(be64(&payload[0..8]), hole_length)?;
        self.buffer[start..end].fill(0);
        Ok(())
    }

    /// Where `[offset, offset + length)` lies in the buffer, if inside the
    /// request and not yet covered.
    fn place(&mut self, offset: u64, length: u64) -> Result<(usize, usize), ConnectionError> {
        let outside = ProtocolError::ChunkOutsideRequest {
            offset_bytes: offset,
            length_bytes: length,
            request_offset_bytes: self.offset,
            request_length_bytes: self.length,
        };
        let start = offset.checked_sub(self.offset).ok_or(outside.clone())?;
        let end = start
            .checked_add(length)
            .filter(|&end| end <= self.length)
            .ok_or(outside)?;
        self.coverage.insert(start, end)?;
        // Both fit: the buffer is the request's length, at most 32 MiB.
        Ok((start as usize, end as usize))
    }
}

fn bad_length(header: &ChunkHeader) -> ProtocolError {
    ProtocolError::BadChunkLength {
        chunk_type: header.chunk_type,
        length_bytes: header.length,
    }
}

fn too_long(header: &ChunkHeader, limit_bytes: u64) -> ProtocolError {
    ProtocolError::ChunkTooLong {
        chunk_type: header.chunk_type,
        length_bytes: header.length,
        limit_bytes,
    }
}

fn fill(
    input: &mut BufReader<Stream>,
    buf: &mut [u8],
    shared: &Shared,
) -> Result<(), ConnectionError> {
    input.read_exact(buf).map_err(|error| match error.kind() {
        io::ErrorKind::UnexpectedEof if !shared.is_closing() => {
            ConnectionError::ServerClosed { mid_reply: true }
        }
        _ => stream_error(error, shared),
    })
}

fn stream_error(error: io::Error, shared: &Shared) -> ConnectionError {
    // After close() shut the socket down, a failed read is the goodbye.
    if shared.is_closing() {
        ConnectionError::Closed
    } else {
        ConnectionError::Io(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_merges_neighbours_and_refuses_overlaps() {
        let mut coverage = Coverage::default();
        coverage.insert(4096, 8192).unwrap();
        coverage.insert(0, 4096).unwrap();
        coverage.insert(8192, 12288).unwrap();
        assert_eq!(coverage.runs.len(), 1);
        assert_eq!(coverage.covered_bytes, 12288);
        coverage.insert(20000, 20001).unwrap();
        assert_eq!(coverage.runs.len(), 2);
        for (start, end) in [
            (0, 1),
            (12287, 12289),
            (19999, 20001),
            (100, 30000),
            (20000, 20001),
        ] {
            assert!(
                matches!(
                    coverage.insert(start, end),
                    Err(ProtocolError::OverlappingChunk { .. })
                ),
                "{start}..{end}"
            );
        }
        // The gap between the runs still fits exactly.
        coverage.insert(12288, 20000).unwrap();
        assert_eq!(coverage.runs.len(), 1);
        assert_eq!(coverage.covered_bytes, 20001);
    }

    #[test]
    fn coverage_refuses_a_reply_scattered_into_too_many_pieces() {
        let mut coverage = Coverage::default();
        let mut result = Ok(());
        for index in 0..=READ_FRAGMENTS_MAX as u64 {
            result = coverage.insert(index * 2, index * 2 + 1);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(
            result,
            Err(ProtocolError::TooFragmented {
                limit: READ_FRAGMENTS_MAX
            })
        );
    }
}
