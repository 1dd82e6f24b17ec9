//! Round trips, cuts at many points, an unfinished session, ENOSPC,
//! broken chains; flipped bytes and hostile lengths in `tests/damage.rs`.

mod damage;

use std::path::{Path, PathBuf};

use testkit::{TempDir, random_bytes};

use super::format::Id;
use super::*;
use crate::target::Held;

const BLOCK: u32 = 4096;
const DISK: u64 = 1 << 20;

fn held(name: &str, generation: u64) -> Held {
    Held {
        checkpoint: name.into(),
        generation,
    }
}

fn options() -> TapeOptions {
    TapeOptions {
        block_size_bytes: BLOCK,
        ..TapeOptions::default()
    }
}

fn new_session(tape: &TapeWriter, name: &str, generation: u64, compress: bool) -> NewSession {
    let last = tape.last_session();
    NewSession {
        source_id: "0123abcd".into(),
        source_size_bytes: DISK,
        granularity_bytes: 65536,
        base: last.map(|h| h.target.clone()),
        target: held(name, generation),
        parent: last.map(|h| h.session_id),
        compress,
    }
}

fn begin(tape: TapeWriter, name: &str, generation: u64, compress: bool) -> SessionWriter {
    let new = new_session(&tape, name, generation, compress);
    tape.begin_session(new).unwrap()
}

/// A full session and two incrementals on one tape (the second
/// compressed); returns what each session's records should read as.
fn three_sessions(path: &Path) -> Vec<Vec<Record>> {
    let mut expected = Vec::new();
    let mut tape = TapeWriter::open_append(path, &options()).unwrap();
    for (round, compress) in [(0u64, false), (1, false), (2, true)] {
        let mut session = begin(tape, &format!("c{round}"), round + 1, compress);
        let data = random_bytes(round, 10_000);
        let text = vec![b'a' + round as u8; 20_000];
        session.write_data(round * 4096, &data).unwrap();
        session.write_zero(100_000, 50_000).unwrap();
        session.write_data(200_000, &text).unwrap();
        let files = vec![format!("/file{round}"), "/dir/other".to_string()];
        session.set_files(files.clone());
        let (next, totals) = session.finish().unwrap();
        tape = next;
        assert_eq!(totals.extent_count, 3);
        assert_eq!(totals.data_bytes, 30_000);
        assert_eq!(totals.zero_bytes, 50_000);
        assert_eq!(totals.file_count, 2);
        if compress {
            assert!(totals.stored_bytes < 30_000, "{totals:?}");
        }
        expected.push(vec![
            Record::Data {
                offset_bytes: round * 4096,
                data,
            },
            Record::Zero {
                offset_bytes: 100_000,
                length_bytes: 50_000,
            },
            Record::Data {
                offset_bytes: 200_000,
                data: text,
            },
            Record::Files(files),
            Record::Trailer(totals),
        ]);
    }
    expected
}

fn read_all(path: &Path) -> Result<Vec<(SessionHeader, Vec<Record>)>, TapeError> {
    let mut reader = TapeReader::open(path)?;
    let mut sessions = Vec::new();
    while let Some(header) = reader.next_session()?.cloned() {
        let mut records = Vec::new();
        while let Some(record) = reader.next_record()? {
            records.push(record);
        }
        sessions.push((header, records));
    }
    Ok(sessions)
}

#[test]
fn sessions_read_back_as_written_and_chain_by_parent() {
    let dir = TempDir::new("tape-round-trip");
    let path = dir.join("t.tape");
    let expected = three_sessions(&path);
    let sessions = read_all(&path).unwrap();
    assert_eq!(sessions.len(), 3);
    for (i, ((header, records), want)) in sessions.iter().zip(&expected).enumerate() {
        assert_eq!(records, want, "session {i}");
        assert_eq!(header.target.checkpoint, format!("c{i}"));
        assert_eq!(header.is_full(), i == 0);
        if i > 0 {
            assert_eq!(header.parent, Some(sessions[i - 1].0.session_id));
            assert_eq!(header.base, Some(sessions[i - 1].0.target.clone()));
        }
    }
    assert_eq!(sessions[2].0.compression, Compression::Zstd);
    let last = last_session(&path).unwrap().unwrap();
    assert_eq!(last, sessions[2].0);
    let report = verify_chain(std::slice::from_ref(&path), None).unwrap();
    assert_eq!(report.sessions.len(), 3);
    assert_eq!(report.data_bytes(), 90_000);
    let until = verify_chain(std::slice::from_ref(&path), Some("c1")).unwrap();
    assert_eq!(until.sessions.len(), 2);
    // A session that found nothing changed still counts, and --until
    // stops at it (virtnbdbackup #270 skipped empty increments).
    let tape = TapeWriter::open_append(&path, &options()).unwrap();
    begin(tape, "empty", 4, false).finish().unwrap();
    let until = verify_chain(std::slice::from_ref(&path), Some("empty")).unwrap();
    assert_eq!(until.sessions.len(), 4);
    assert_eq!(until.sessions[3].totals.extent_count, 0);
}

#[test]
fn a_cut_anywhere_drops_only_the_cut_session_and_append_goes_on() {
    let dir = TempDir::new("tape-cut");
    let path = dir.join("t.tape");
    three_sessions(&path);
    let original = std::fs::read(&path).unwrap();
    let ends: Vec<u64> = session_ends(&path);
    let cut = dir.join("cut.tape");
    let block = BLOCK as usize;
    let points = (block..original.len())
        .step_by(1021)
        .chain((block..original.len()).step_by(block));
    let (mut quick_count, mut point_count) = (0, 0);
    for length in points {
        point_count += 1;
        std::fs::write(&cut, &original[..length]).unwrap();
        let complete = ends.iter().filter(|&&end| end <= length as u64).count();
        let verified = verify_chain(std::slice::from_ref(&cut), None);
        if length == block {
            let error = verified.unwrap_err();
            assert!(
                matches!(error, TapeError::Refused { .. }),
                "label only: {error}"
            );
        } else if ends.contains(&(length as u64)) {
            assert_eq!(
                verified.unwrap().sessions.len(),
                complete,
                "cut at {length}"
            );
        } else {
            let error = verified.unwrap_err();
            assert!(error.is_damage(), "cut at {length}: {error}");
        }
        // From the end and from the start, a scan finds the same.
        let mut reader = TapeReader::open(&cut).unwrap();
        let quick = super::tail::scan_from_end(&mut reader, length as u64).unwrap();
        let mut reader = TapeReader::open(&cut).unwrap();
        let full = super::writer::scan(&mut reader).unwrap();
        if let Some(quick) = &quick {
            assert_eq!(quick.last, full.last, "cut at {length}");
            assert_eq!(quick.end_block, full.end_block, "cut at {length}");
            assert_eq!(quick.torn.is_some(), full.torn.is_some(), "cut at {length}");
        }
        quick_count += usize::from(quick.is_some());
        let last = last_session(&cut).unwrap();
        assert_eq!(
            last.map(|h| h.target.checkpoint),
            (complete > 0).then(|| format!("c{}", complete - 1))
        );
        // Appending cuts the unfinished session off and the tape is whole.
        let tape = TapeWriter::open_append(&cut, &options()).unwrap();
        let kept = if complete == 0 {
            u64::from(BLOCK)
        } else {
            ends[complete - 1]
        };
        assert_eq!(
            std::fs::metadata(&cut).unwrap().len(),
            kept,
            "cut at {length}"
        );
        let mut session = begin(tape, "after", 9, false);
        session.write_data(0, b"after the cut").unwrap();
        session.finish().unwrap();
        assert_eq!(
            verify_chain(std::slice::from_ref(&cut), None)
                .unwrap()
                .sessions
                .len(),
            complete + 1
        );
    }
    // A cut leaves at most one unfinished session: the end tells it all.
    assert_eq!(quick_count, point_count, "the quick scan fell back");
}

/// The byte offset where each session's last block ends.
fn session_ends(path: &Path) -> Vec<u64> {
    let mut reader = TapeReader::open(path).unwrap();
    let mut ends = Vec::new();
    while reader.next_session().unwrap().is_some() {
        while reader.next_record().unwrap().is_some() {}
        ends.push(reader.next_block_index() * u64::from(BLOCK));
    }
    ends
}

#[test]
fn a_killed_session_is_cut_off_at_the_next_open() {
    let dir = TempDir::new("tape-killed");
    let path = dir.join("t.tape");
    three_sessions(&path);
    let before = std::fs::read(&path).unwrap();
    let tape = TapeWriter::open_append(&path, &options()).unwrap();
    let mut session = begin(tape, "killed", 7, false);
    session.write_data(0, &random_bytes(9, 100_000)).unwrap();
    // What kill -9 would leave: the session's blocks so far, no trailer
    // (taken before the Drop that cuts them off).
    let torn = std::fs::read(&path).unwrap();
    assert!(torn.len() > before.len());
    drop(session);
    std::fs::write(&path, &torn).unwrap();
    assert_eq!(
        last_session(&path).unwrap().unwrap().target.checkpoint,
        "c2"
    );
    let tape = TapeWriter::open_append(&path, &options()).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(tape.last_session().unwrap().target.checkpoint, "c2");
    // A dropped (failed) session is cut off at once.
    let mut session = begin(tape, "dropped", 8, true);
    session.write_data(0, &random_bytes(10, 100_000)).unwrap();
    drop(session);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn enospc_fails_the_session_and_leaves_the_tape_valid() {
    let dir = TempDir::new("tape-enospc");
    let path = dir.join("t.tape");
    three_sessions(&path);
    let blocks = std::fs::metadata(&path).unwrap().len() / u64::from(BLOCK);
    let full = TapeOptions {
        enospc_after_blocks: Some(3),
        ..options()
    };
    let tape = TapeWriter::open_append(&path, &full).unwrap();
    let mut session = begin(tape, "big", 5, false);
    let error = session
        .write_data(0, &random_bytes(11, 200_000))
        .unwrap_err();
    assert!(
        matches!(&error, TapeError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
        "{error}"
    );
    assert!(
        session.write_zero(300_000, 10).is_err(),
        "a failed session stays failed"
    );
    drop(session);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len() / u64::from(BLOCK),
        blocks
    );
    assert_eq!(
        verify_chain(std::slice::from_ref(&path), None)
            .unwrap()
            .sessions
            .len(),
        3
    );
    // A label that does not fit leaves no tape behind.
    let new = dir.join("new.tape");
    let none = TapeOptions {
        enospc_after_blocks: Some(0),
        ..options()
    };
    assert!(TapeWriter::open_append(&new, &none).is_err());
    assert_eq!(std::fs::metadata(&new).unwrap().len(), 0);
}

#[test]
fn a_foreign_file_and_an_empty_one_are_not_tapes() {
    let dir = TempDir::new("tape-foreign");
    let path = dir.join("foreign");
    std::fs::write(&path, random_bytes(3, 300_000)).unwrap();
    let error = verify_chain(std::slice::from_ref(&path), None).unwrap_err();
    assert!(matches!(error, TapeError::Foreign { .. }), "{error}");
    let error = TapeWriter::open_append(&path, &options()).unwrap_err();
    assert!(matches!(error, TapeError::Foreign { .. }), "{error}");
    assert_eq!(std::fs::read(&path).unwrap(), random_bytes(3, 300_000));
    assert!(last_session(&dir.join("missing")).unwrap().is_none());
}

#[test]
fn broken_chains_are_refused() {
    let dir = TempDir::new("tape-chains");
    let a = dir.join("a.tape");
    three_sessions(&a);
    // A second tape continuing the chain, and one of another chain.
    let label = TapeReader::open(&a).unwrap().label().clone();
    let last = last_session(&a).unwrap().unwrap();
    let b = dir.join("b.tape");
    let continues = TapeOptions {
        continues: Some(label),
        ..options()
    };
    let tape = TapeWriter::open_append(&b, &continues).unwrap();
    let mut new = new_session(&tape, "c3", 4, false);
    new.parent = Some(last.session_id);
    new.base = Some(last.target.clone());
    let mut session = tape.begin_session(new).unwrap();
    session.write_data(0, b"tape b").unwrap();
    session.finish().unwrap();
    assert_eq!(
        verify_chain(&[a.clone(), b.clone()], None)
            .unwrap()
            .sessions
            .len(),
        4
    );
    let refused = |tapes: &[PathBuf], what: &str| {
        let error = verify_chain(tapes, None).unwrap_err();
        assert!(
            matches!(error, TapeError::Refused { .. }),
            "{what}: {error}"
        );
    };
    refused(&[b.clone(), a.clone()], "tapes out of order");
    refused(std::slice::from_ref(&b), "an incremental without its full");
    let other = dir.join("other.tape");
    three_sessions(&other);
    refused(&[other.clone(), b.clone()], "another chain's tape");
    // An incremental whose parent is not the session before it (a gap),
    // one of another disk, one of another size.
    for (what, change) in [("gap", 0), ("foreign disk", 1), ("resized", 2)] {
        let c = dir.join(format!("{what}.tape"));
        std::fs::copy(&a, &c).unwrap();
        let tape = TapeWriter::open_append(&c, &options()).unwrap();
        let mut new = new_session(&tape, "bad", 9, false);
        match change {
            0 => new.parent = Some(Id::random().unwrap()),
            1 => new.source_id = "another".into(),
            _ => new.source_size_bytes = DISK * 2,
        }
        tape.begin_session(new).unwrap().finish().unwrap();
        refused(&[c], what);
    }
}

#[test]
fn writers_refuse_what_the_format_cannot_hold() {
    let dir = TempDir::new("tape-refusals");
    let path = dir.join("t.tape");
    let bad_size = TapeOptions {
        block_size_bytes: 5000,
        ..options()
    };
    assert!(TapeWriter::open_append(&path, &bad_size).is_err());
    let tape = TapeWriter::open_append(&path, &options()).unwrap();
    let mut session = begin(tape, "x", 1, false);
    assert!(
        session.write_data(DISK - 1, b"ab").is_err(),
        "past the disk"
    );
    session.write_data(1000, b"ab").unwrap();
    assert!(
        session.write_zero(500, 10).is_err(),
        "before the previous extent"
    );
    session.write_zero(2000, 10).unwrap();
    let (tape, totals) = session.finish().unwrap();
    assert_eq!(totals.extent_count, 2);
    let second = TapeWriter::open_append(&path, &options());
    assert!(second.is_err(), "a second writer of one tape");
    drop(tape);
}

#[test]
fn data_longer_than_a_record_is_cut_into_records() {
    let dir = TempDir::new("tape-long");
    let path = dir.join("t.tape");
    let tape = TapeWriter::open_append(&path, &TapeOptions::default()).unwrap();
    let mut new = new_session(&tape, "long", 1, true);
    new.source_size_bytes = 16 << 20;
    let mut session = tape.begin_session(new).unwrap();
    let data = random_bytes(5, 9 << 20);
    session.write_data(4096, &data).unwrap();
    let (_, totals) = session.finish().unwrap();
    assert_eq!(totals.extent_count, 3);
    let sessions = read_all(&path).unwrap();
    let mut joined = Vec::new();
    for record in &sessions[0].1 {
        if let Record::Data { data, .. } = record {
            assert!(data.len() as u64 <= super::format::EXTENT_DATA_BYTES_MAX);
            joined.extend_from_slice(data);
        }
    }
    assert_eq!(joined, data);
}

#[test]
fn damage_inside_an_earlier_session_is_never_cut_and_left_for_verify() {
    let dir = TempDir::new("tape-old-damage");
    let path = dir.join("t.tape");
    three_sessions(&path);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = BLOCK as usize + 100;
    bytes[at] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let tape = TapeWriter::open_append(&path, &options()).unwrap();
    assert_eq!(tape.last_session().unwrap().target.checkpoint, "c2");
    let (_, _) = begin(tape, "c3", 4, false).finish().unwrap();
    let after = std::fs::read(&path).unwrap();
    assert_eq!(
        after[..bytes.len()],
        bytes[..],
        "nothing before the append changed"
    );
    let error = verify_chain(std::slice::from_ref(&path), None).unwrap_err();
    assert_eq!(error.block(), Some(1), "{error}");
}

/// A power cut may tear any unsynced block of a session, not only the
/// last: blocks torn before the last one of a session that never
/// finished are still its tail, and an append cuts them off. Damage
/// inside a session that has its trailer stays damage.
#[test]
fn an_unfinished_session_torn_in_several_blocks_is_cut_off_but_a_finished_one_is_not() {
    let dir = TempDir::new("tape-torn-tail");
    let path = dir.join("t.tape");
    three_sessions(&path);
    let before = std::fs::read(&path).unwrap();
    let tape = TapeWriter::open_append(&path, &options()).unwrap();
    let mut session = begin(tape, "cut", 7, false);
    session.write_data(0, &random_bytes(11, 40_000)).unwrap();
    let mut torn = std::fs::read(&path).unwrap();
    drop(session);
    let tail_blocks = (torn.len() - before.len()) / BLOCK as usize;
    assert!(tail_blocks >= 4, "{tail_blocks} blocks");
    for block in [0, 2] {
        torn[before.len() + block * BLOCK as usize + 200] ^= 1;
    }
    std::fs::write(&path, &torn).unwrap();
    let mut reader = TapeReader::open(&path).unwrap();
    let full = super::writer::scan(&mut reader).unwrap();
    assert_eq!(full.last.unwrap().target.checkpoint, "c2");
    assert!(full.torn.is_some());
    let tape = TapeWriter::open_append(&path, &options()).unwrap();
    assert_eq!(tape.last_session().unwrap().target.checkpoint, "c2");
    assert_eq!(std::fs::read(&path).unwrap(), before);

    // The same damage inside the last complete session: the full scan
    // names it rather than cutting a session that finished.
    let ends = session_ends(&path);
    let mut damaged = before.clone();
    damaged[ends[1] as usize + BLOCK as usize + 200] ^= 1;
    std::fs::write(&path, &damaged).unwrap();
    let mut reader = TapeReader::open(&path).unwrap();
    let error = super::writer::scan(&mut reader).unwrap_err();
    assert!(error.is_damage(), "{error}");
}
