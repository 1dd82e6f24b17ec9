//! What the `tape_reader` target runs: the input is a tape file, byte 0
//! a mode (bit 0: recompute the crcs of the rest first, as far as its
//! framing can be followed).

use std::path::Path;

use copier::tape::{
    NewSession, Record, SessionStart, TapeOptions, TapeReader, TapeWriter, last_session,
    verify_chain,
};
use copier::target::Held;

/// Records read per session at most, so that a tape of tiny records
/// cannot make one input run for long.
const RECORDS_MAX: usize = 100_000;

/// Byte 0, bit 0: recompute the label, record header, payload and block
/// crcs of the rest before reading it.
pub fn exercise(data: &[u8]) {
    let Some((&mode, tape)) = data.split_first() else {
        return;
    };
    let tape = if mode & 1 == 1 {
        with_checksums(tape)
    } else {
        tape.to_vec()
    };
    let path = crate::scratch_path("tape");
    std::fs::write(&path, &tape).expect("scratch file");
    read_everything(&path);
    let _ = verify_chain(std::slice::from_ref(&path), None);
    let _ = last_session(&path);
    append_and_reread(&path);
    let _ = std::fs::remove_file(&path);
}

fn read_everything(path: &Path) {
    let Ok(mut reader) = TapeReader::open(path) else {
        return;
    };
    loop {
        match reader.next_session() {
            Ok(Some(_)) => {}
            _ => return,
        }
        for _ in 0..RECORDS_MAX {
            match reader.next_record() {
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    }
}

/// An append that succeeds leaves its session readable whole after what
/// the tape kept (damage before it is left for verify to report: an
/// append reads the tape from its end).
fn append_and_reread(path: &Path) {
    let options = TapeOptions {
        block_size_bytes: 4096,
        ..TapeOptions::default()
    };
    let Ok(writer) = TapeWriter::open_append(path, &options) else {
        return;
    };
    let block_bytes = u64::from(writer.label().block_size_bytes);
    let kept_bytes = std::fs::metadata(path).expect("the tape").len();
    assert_eq!(
        kept_bytes % block_bytes,
        0,
        "an append starts on a block boundary"
    );
    let new = NewSession {
        source_id: "fuzz".into(),
        source_size_bytes: 1 << 20,
        granularity_bytes: 65536,
        base: None,
        target: Held {
            checkpoint: "fuzz".into(),
            generation: 1,
        },
        parent: None,
        compress: true,
    };
    let mut session = writer
        .begin_session(new)
        .expect("a session begins on an opened tape");
    session
        .write_data(4096, &[7u8; 10_000])
        .expect("a data extent is written");
    session
        .write_zero(65536, 4096)
        .expect("a zero extent is written");
    let (_, totals) = session.finish().expect("a session finishes");
    let mut reader = TapeReader::open(path).expect("the appended tape opens");
    let start = SessionStart {
        block_index: kept_bytes / block_bytes,
    };
    reader.seek_session(start).expect("seek");
    let header = reader.next_session().expect("the appended session reads");
    assert_eq!(
        header.map(|h| h.target.checkpoint.clone()),
        Some("fuzz".to_string())
    );
    loop {
        match reader.next_record() {
            Ok(Some(Record::Trailer(read))) => {
                assert_eq!(read, totals);
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("the appended session reads back damaged: {other:?}"),
        }
    }
    assert_eq!(
        last_session(path)
            .expect("last session")
            .map(|h| h.target.checkpoint),
        Some("fuzz".into())
    );
}

// ---- checksums ------------------------------------------------------------

const BLOCK_HEADER: usize = 40;
const LABEL: usize = 68;
const RECORD_HEADER: usize = 48;

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// The tape with every crc recomputed, as far as its framing can be
/// followed: the label's, each record header's, each payload's (but
/// compressed data, whose crc is of the decompressed bytes), each block's.
pub fn with_checksums(tape: &[u8]) -> Vec<u8> {
    let mut out = tape.to_vec();
    if out.len() < BLOCK_HEADER + LABEL {
        return out;
    }
    let label = BLOCK_HEADER;
    let crc = crc32c::crc32c(&out[label..label + 64]);
    out[label + 64..label + 68].copy_from_slice(&crc.to_le_bytes());
    let block_bytes = u32_at(&out, label + 12) as usize;
    if !block_bytes.is_power_of_two() || !(4096..=4 << 20).contains(&block_bytes) {
        return out;
    }
    // The record stream: where each byte of every block's used payload is.
    let mut places = Vec::new();
    for (index, block) in out.chunks(block_bytes).enumerate().skip(1) {
        if block.len() < BLOCK_HEADER {
            break;
        }
        let used = (u32_at(block, 32) as usize).min(block.len() - BLOCK_HEADER);
        places.extend((0..used).map(|i| index * block_bytes + BLOCK_HEADER + i));
    }
    let mut at = 0;
    while at + RECORD_HEADER <= places.len() {
        let mut head: Vec<u8> = places[at..at + RECORD_HEADER]
            .iter()
            .map(|&p| out[p])
            .collect();
        let stored = u32_at(&head, 32) as usize;
        let end = (at + RECORD_HEADER)
            .saturating_add(stored)
            .min(places.len());
        let payload: Vec<u8> = places[at + RECORD_HEADER..end]
            .iter()
            .map(|&p| out[p])
            .collect();
        let (kind, flags) = (head[4], head[5]);
        if kind != 3 && !(kind == 2 && flags & 1 == 1) {
            head[36..40].copy_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        }
        let crc = crc32c::crc32c(&head[..44]);
        head[44..48].copy_from_slice(&crc.to_le_bytes());
        for (i, &p) in places[at..at + RECORD_HEADER].iter().enumerate() {
            out[p] = head[i];
        }
        at = end;
    }
    for block in out.chunks_mut(block_bytes) {
        if block.len() == block_bytes {
            let head = crc32c::crc32c(&block[..36]);
            let crc = crc32c::crc32c_append(head, &block[BLOCK_HEADER..]);
            block[36..40].copy_from_slice(&crc.to_le_bytes());
        }
    }
    out
}
