//! Damage: a flipped byte anywhere (the block crc), a flipped byte in
//! each record kind behind a resealed block (the record's own checks),
//! hostile lengths with valid crcs.

use std::path::PathBuf;

use testkit::TempDir;

use super::super::format::{
    BLOCK_HEADER_BYTES, BlockHeader, FILES_BYTES_MAX, RECORD_HEADER_BYTES, RecordHeader,
    RecordKind, open_block, seal_block,
};
use super::super::*;
use super::{BLOCK, begin, options, three_sessions};

#[test]
fn every_flipped_byte_is_found_and_located() {
    let dir = TempDir::new("tape-flip-all");
    let path = dir.join("t.tape");
    three_sessions(&path);
    let original = std::fs::read(&path).unwrap();
    let damaged = dir.join("damaged.tape");
    // Every byte of the first blocks, then a stride through the rest.
    let positions = (0..2 * BLOCK as usize).chain((2 * BLOCK as usize..original.len()).step_by(61));
    for at in positions {
        let mut bytes = original.clone();
        bytes[at] ^= 0x10;
        std::fs::write(&damaged, &bytes).unwrap();
        let error = verify_chain(std::slice::from_ref(&damaged), None).unwrap_err();
        assert!(error.is_damage(), "byte {at}: {error}");
        let magic = 0..8;
        let label_magic = BLOCK_HEADER_BYTES..BLOCK_HEADER_BYTES + 8;
        if magic.contains(&at) || label_magic.contains(&at) {
            assert!(
                matches!(error, TapeError::Foreign { .. }),
                "byte {at}: {error}"
            );
            continue;
        }
        let block = at as u64 / u64::from(BLOCK);
        assert_eq!(error.block(), Some(block), "byte {at}: {error}");
        let part = if block == 0 { Part::Label } else { Part::Block };
        assert!(
            matches!(error, TapeError::Damaged { part: p, .. } if p == part),
            "byte {at}: {error}"
        );
    }
}

/// Where each record sits: (kind, block, offset in block) of its header
/// and of its payload's first byte.
/// (block, offset in block)
type Place = (usize, usize);

fn record_positions(bytes: &[u8]) -> Vec<(RecordKind, Place, Option<Place>)> {
    let block_bytes = BLOCK as usize;
    let mut stream = Vec::new();
    let mut places = Vec::new();
    for (index, block) in bytes.chunks(block_bytes).enumerate().skip(1) {
        let header = open_block(block).unwrap();
        for i in 0..header.used_bytes as usize {
            stream.push(block[BLOCK_HEADER_BYTES + i]);
            places.push((index, BLOCK_HEADER_BYTES + i));
        }
    }
    let mut out = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        let head: [u8; RECORD_HEADER_BYTES] =
            stream[at..at + RECORD_HEADER_BYTES].try_into().unwrap();
        let record = RecordHeader::decode(&head).unwrap();
        let payload = (record.stored_bytes > 0).then(|| places[at + RECORD_HEADER_BYTES]);
        out.push((record.kind, places[at], payload));
        at += RECORD_HEADER_BYTES + record.stored_bytes as usize;
    }
    out
}

/// Flips a byte and recomputes its block's crc, as damage the block crc
/// missed (or a writer bug) would look.
fn flip_and_reseal(bytes: &mut [u8], block: usize, offset: usize) {
    let block_bytes = BLOCK as usize;
    let range = block * block_bytes..(block + 1) * block_bytes;
    let header = open_block(&bytes[range.clone()]).unwrap();
    bytes[block * block_bytes + offset] ^= 0x01;
    let header = BlockHeader { ..header };
    seal_block(&mut bytes[range], &header);
}

#[test]
fn a_flipped_byte_in_each_record_kind_is_named_by_its_kind() {
    let dir = TempDir::new("tape-flip-kinds");
    let path = dir.join("t.tape");
    three_sessions(&path);
    let original = std::fs::read(&path).unwrap();
    let damaged = dir.join("damaged.tape");
    let positions = record_positions(&original);
    let mut kinds_seen = Vec::new();
    for (kind, head, payload) in positions {
        let part = Part::of(kind);
        let mut cases = vec![(head, Part::RecordHeader)];
        if let Some(payload) = payload {
            cases.push((payload, part));
        }
        for ((block, offset), want) in cases {
            let mut bytes = original.clone();
            flip_and_reseal(&mut bytes, block, offset);
            std::fs::write(&damaged, &bytes).unwrap();
            let error = verify_chain(std::slice::from_ref(&damaged), None).unwrap_err();
            match &error {
                TapeError::Damaged { part, block: b, .. } => {
                    assert_eq!(*part, want, "{kind:?} at {block}+{offset}: {error}");
                    assert!(*b <= block as u64, "{error}");
                }
                other => panic!("{kind:?} at {block}+{offset}: {other}"),
            }
        }
        kinds_seen.push(kind);
    }
    for kind in [
        RecordKind::Header,
        RecordKind::Data,
        RecordKind::Zero,
        RecordKind::Files,
        RecordKind::Trailer,
    ] {
        assert!(kinds_seen.contains(&kind), "{kind:?} not on the tape");
    }
}

/// A record header with a valid crc that declares `stored` bytes, in a
/// session's second block.
fn hostile_tape(dir: &TempDir, kind: RecordKind, length: u64, stored: u32) -> PathBuf {
    let path = dir.join(format!("hostile-{kind:?}-{length}.tape"));
    let tape = TapeWriter::open_append(&path, &options()).unwrap();
    let session = begin(tape, "h", 1, false);
    let (_, _) = session.finish().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let block = BLOCK as usize;
    let first = open_block(&bytes[block..2 * block]).unwrap();
    // Replace the trailer (the record after the header) with the hostile one.
    let header_len = RECORD_HEADER_BYTES + positions_payload(&bytes[block..2 * block]);
    let record = RecordHeader {
        kind,
        flags: 0,
        index: 1,
        offset_bytes: 0,
        length_bytes: length,
        stored_bytes: stored,
        data_crc: 0,
    };
    let at = block + BLOCK_HEADER_BYTES + header_len;
    bytes[at..at + RECORD_HEADER_BYTES].copy_from_slice(&record.encode());
    let used = (header_len + RECORD_HEADER_BYTES) as u32;
    bytes[at + RECORD_HEADER_BYTES..2 * block].fill(0);
    seal_block(
        &mut bytes[block..2 * block],
        &BlockHeader {
            used_bytes: used,
            ..first
        },
    );
    std::fs::write(&path, &bytes).unwrap();
    path
}

fn positions_payload(block: &[u8]) -> usize {
    let head: [u8; RECORD_HEADER_BYTES] = block
        [BLOCK_HEADER_BYTES..BLOCK_HEADER_BYTES + RECORD_HEADER_BYTES]
        .try_into()
        .unwrap();
    RecordHeader::decode(&head).unwrap().stored_bytes as usize
}

#[test]
fn huge_declared_lengths_are_refused_before_allocating() {
    let dir = TempDir::new("tape-hostile");
    for (kind, length, stored) in [
        (RecordKind::Data, u64::MAX, u32::MAX),
        (RecordKind::Data, 1 << 40, 4096),
        (RecordKind::Files, u64::from(u32::MAX), u32::MAX),
        (RecordKind::Header, 1 << 20, 1 << 20),
        (RecordKind::Trailer, 1 << 30, 1 << 30),
        (RecordKind::Zero, u64::MAX, 0),
    ] {
        let path = hostile_tape(&dir, kind, length, stored);
        let error = verify_chain(&[path], None).unwrap_err();
        assert!(error.is_damage(), "{kind:?}: {error}");
    }
    // Within the limit but longer than the tape: read only as far as it
    // goes, then reported as cut.
    let path = hostile_tape(
        &dir,
        RecordKind::Files,
        u64::from(FILES_BYTES_MAX),
        FILES_BYTES_MAX,
    );
    let error = verify_chain(&[path], None).unwrap_err();
    assert!(
        matches!(
            error,
            TapeError::Truncated {
                part: Part::Files,
                ..
            }
        ),
        "{error}"
    );
}
