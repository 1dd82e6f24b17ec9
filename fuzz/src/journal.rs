//! `journal_replay`: the tracker's journal (`tracker/src/journal.rs`,
//! docs/journal.md) replayed from a file of untrusted bytes. Replay must
//! either report damage or give records; what it gives must be
//! consistent (ends on a record boundary, the torn tail is the rest, one
//! sequence number per record) and must replay the same once written
//! again by the journal's own encoder.

use std::fs::File;

use tracker::journal::{
    FILE_HEADER_LEN, FileHeader, JournalError, RECORD_HEADER_LEN, RECORD_MAGIC, RECORD_PAYLOAD_MAX,
    Record, encode_record, replay,
};

/// Longest MARK_ALL reason the encoder keeps.
const REASON_BYTES_MAX: usize = 1024;

/// Byte 0, bit 0: recompute the file header's and every record's crc32c
/// first, as far as the records' framing can be followed, so that
/// mutations get past them. Panics on a wrong answer.
pub fn exercise(data: &[u8]) {
    let Some((&mode, journal)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 1 {
        with_checksums(journal)
    } else {
        journal.to_vec()
    };
    if let Some(header) = bytes.first_chunk::<FILE_HEADER_LEN>()
        && let Ok(decoded) = FileHeader::decode(header)
    {
        assert_eq!(FileHeader::decode(&decoded.encode()).ok(), Some(decoded));
    }
    let path = crate::scratch_path("journal");
    let Some(found) = replay_bytes(&path, &bytes) else {
        let _ = std::fs::remove_file(&path);
        return;
    };
    assert!(found.end_offset >= FILE_HEADER_LEN as u64);
    assert_eq!(found.end_offset % 8, 0, "records end 8-aligned");
    assert_eq!(found.end_offset + found.torn_bytes, bytes.len() as u64);
    assert_eq!(found.next_sequence, found.records.len() as u64 + 1);
    // Written again by the encoder, the records replay the same.
    let mut again = found.header.encode().to_vec();
    for (index, record) in found.records.iter().enumerate() {
        encode_record(record, index as u64 + 1, &mut again);
    }
    let reread = replay_bytes(&path, &again).expect("a re-encoded journal replays");
    let _ = std::fs::remove_file(&path);
    assert_eq!(reread.header, found.header);
    assert_eq!(reread.torn_bytes, 0);
    let expected: Vec<Record> = found.records.iter().map(as_encoded).collect();
    assert_eq!(reread.records, expected);
}

/// Replays `bytes` written to `path`; None when replay reports damage.
fn replay_bytes(path: &std::path::Path, bytes: &[u8]) -> Option<tracker::journal::Replay> {
    std::fs::write(path, bytes).expect("scratch file");
    let file = File::open(path).expect("scratch file");
    match replay(&file) {
        Ok(found) => Some(found),
        Err(JournalError::Io(error)) => panic!("i/o error replaying a scratch file: {error}"),
        Err(JournalError::BadFileHeader(_) | JournalError::Corrupt { .. }) => None,
    }
}

/// `record` as it reads back after `encode_record`, which keeps the
/// first `REASON_BYTES_MAX` bytes of a MARK_ALL reason.
fn as_encoded(record: &Record) -> Record {
    match record {
        Record::MarkAll { reason } if reason.len() > REASON_BYTES_MAX => Record::MarkAll {
            reason: String::from_utf8_lossy(&reason.as_bytes()[..REASON_BYTES_MAX]).into_owned(),
        },
        other => other.clone(),
    }
}

fn le32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"))
}

/// The journal with its crcs recomputed (docs/journal.md): the file
/// header's over its first 60 bytes; each record's over its header (crc
/// field zeroed) and payload, while records with the right magic and a
/// length that fits follow one another.
pub fn with_checksums(journal: &[u8]) -> Vec<u8> {
    let mut out = journal.to_vec();
    if out.len() < FILE_HEADER_LEN {
        return out;
    }
    let crc = crc32c::crc32c(&out[..60]);
    out[60..64].copy_from_slice(&crc.to_le_bytes());
    let mut at = FILE_HEADER_LEN;
    while at + RECORD_HEADER_LEN <= out.len() {
        if le32(&out[at..]) != RECORD_MAGIC {
            break;
        }
        let payload_len = le32(&out[at + 8..]);
        if payload_len > RECORD_PAYLOAD_MAX {
            break;
        }
        let payload_len = payload_len as usize;
        let total = RECORD_HEADER_LEN + payload_len.next_multiple_of(8);
        if at + total > out.len() {
            break;
        }
        let mut header = [0u8; RECORD_HEADER_LEN];
        header.copy_from_slice(&out[at..at + RECORD_HEADER_LEN]);
        header[12..16].fill(0);
        let payload = &out[at + RECORD_HEADER_LEN..at + RECORD_HEADER_LEN + payload_len];
        let crc = crc32c::crc32c_append(crc32c::crc32c(&header), payload);
        out[at + 12..at + 16].copy_from_slice(&crc.to_le_bytes());
        at += total;
    }
    out
}
