//! Finding a file tape's last complete session from its end, so that an
//! append reads a few blocks rather than the whole tape: the last block
//! names its session and its sequence number (so where the session
//! starts), and the session is complete if its record stream ends with a
//! trailer of that session whose crcs hold. An unfinished session there
//! (no trailer, a cut or torn last block) is stepped over once, and the
//! session before it must then be complete. Anything else that does not
//! add up returns None, and the caller reads the whole tape instead
//! (`writer::scan`), which names the damage exactly.
//!
//! Damage inside earlier sessions is not looked for here: an append does
//! not make it worse, and verify finds it.

use super::error::{Part, TapeError};
use super::format::{
    BLOCK_HEADER_BYTES, RECORD_HEADER_BYTES, RecordHeader, RecordKind, TRAILER_BYTES,
    decode_trailer,
};
use super::reader::{SessionStart, TapeReader};
use super::writer::Scan;

/// The bytes a trailer record takes at the end of a session's stream.
const TRAILER_RECORD_BYTES: usize = RECORD_HEADER_BYTES + TRAILER_BYTES;

/// What `writer::scan` would find on a file of `file_bytes`, or None when
/// only reading it all can tell.
pub(crate) fn scan_from_end(
    reader: &mut TapeReader,
    file_bytes: u64,
) -> Result<Option<Scan>, TapeError> {
    let block_bytes = reader.block_size_bytes();
    let mut end = file_bytes / block_bytes;
    let mut torn = (file_bytes % block_bytes != 0).then(|| TapeError::Truncated {
        tape: reader.path().to_path_buf(),
        block: end,
        part: Part::Block,
    });
    let mut may_step_over = true;
    loop {
        if end <= 1 {
            return Ok(Some(Scan {
                last: None,
                end_block: 1,
                torn,
            }));
        }
        let last = end - 1;
        let Some((header, block)) = reader.block_at(last)? else {
            // A torn last block: the unfinished session it belongs to is
            // stepped over below, from the block before it.
            if !may_step_over || torn.is_some() {
                return Ok(None);
            }
            torn = Some(TapeError::Damaged {
                tape: reader.path().to_path_buf(),
                block: last,
                part: Part::Block,
                reason: "the last block is torn".into(),
            });
            end = last;
            continue;
        };
        if header.session_id.is_none() || header.sequence >= last {
            return Ok(None);
        }
        let first = last - header.sequence;
        if ends_with_trailer(reader, last, header.sequence, &block, header.session_id)? {
            reader.seek_session(SessionStart { block_index: first })?;
            let Ok(Some(session)) = reader.next_session().map(|h| h.cloned()) else {
                return Ok(None);
            };
            if session.session_id != header.session_id {
                return Ok(None);
            }
            return Ok(Some(Scan {
                last: Some(session),
                end_block: end,
                torn,
            }));
        }
        if !may_step_over {
            return Ok(None);
        }
        may_step_over = false;
        torn.get_or_insert(TapeError::Truncated {
            tape: reader.path().to_path_buf(),
            block: end,
            part: Part::Trailer,
        });
        end = first;
    }
}

/// Whether the blocks from `damaged` to the end of a file of
/// `file_blocks` are what a power cut leaves of one session that began
/// at block `start` (where the last complete session ended) and never
/// finished: every block after the damage that reads well is a block of
/// one session at the place its sequence number says, and the last of
/// them does not end with that session's trailer. Unsynced blocks of a
/// file may be torn anywhere, not only the last one; a complete session,
/// or a block of another, after the damage makes it damage in the middle.
pub(crate) fn unfinished_tail(
    reader: &mut TapeReader,
    start: u64,
    damaged: u64,
    file_blocks: u64,
) -> Result<bool, TapeError> {
    let mut session = None;
    let mut last_good = None;
    for index in damaged + 1..file_blocks {
        let Some((header, block)) = reader.block_at(index)? else {
            continue;
        };
        if header.session_id.is_none()
            || header.sequence.checked_add(start) != Some(index)
            || session.is_some_and(|id| id != header.session_id)
        {
            return Ok(false);
        }
        session = Some(header.session_id);
        last_good = Some((index, header, block));
    }
    match last_good {
        None => Ok(true),
        Some((index, header, block)) => Ok(!ends_with_trailer(
            reader,
            index,
            header.sequence,
            &block,
            header.session_id,
        )?),
    }
}

/// Whether the record stream of the session ending in block `last` (of
/// sequence `sequence`) ends with that session's trailer.
fn ends_with_trailer(
    reader: &mut TapeReader,
    last: u64,
    sequence: u64,
    block: &[u8],
    session_id: super::format::Id,
) -> Result<bool, TapeError> {
    let used = super::format::u32_at(block, 32) as usize;
    let mut tail = Vec::with_capacity(TRAILER_RECORD_BYTES);
    if used < TRAILER_RECORD_BYTES {
        // The trailer starts in the block before.
        if sequence == 0 {
            return Ok(false);
        }
        let Some((previous, bytes)) = reader.block_at(last - 1)? else {
            return Ok(false);
        };
        let previous_used = previous.used_bytes as usize;
        let wanted = TRAILER_RECORD_BYTES - used;
        if previous.session_id != session_id
            || previous.sequence + 1 != sequence
            || previous_used < wanted
        {
            return Ok(false);
        }
        let at = BLOCK_HEADER_BYTES + previous_used - wanted;
        tail.extend_from_slice(&bytes[at..at + wanted]);
        tail.extend_from_slice(&block[BLOCK_HEADER_BYTES..BLOCK_HEADER_BYTES + used]);
    } else {
        let at = BLOCK_HEADER_BYTES + used - TRAILER_RECORD_BYTES;
        tail.extend_from_slice(&block[at..at + TRAILER_RECORD_BYTES]);
    }
    let head: [u8; RECORD_HEADER_BYTES] = tail[..RECORD_HEADER_BYTES].try_into().expect("48 bytes");
    let Ok(record) = RecordHeader::decode(&head) else {
        return Ok(false);
    };
    let payload = &tail[RECORD_HEADER_BYTES..];
    if record.kind != RecordKind::Trailer || crc32c::crc32c(payload) != record.data_crc {
        return Ok(false);
    }
    Ok(decode_trailer(payload).is_ok_and(|(id, _)| id == session_id))
}
