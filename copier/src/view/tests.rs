//! Views of tape chains against an image kept in memory: every
//! checkpoint of a chain over two tapes, compressed and plain sessions,
//! reads at every alignment, and damage found by a read, never returned.

use std::path::{Path, PathBuf};

use backend::{BlockBackend, STATE_HOLE};
use testkit::{TempDir, Xorshift, random_bytes};

use super::TapeView;
use crate::tape::format::Label;
use crate::tape::{NewSession, TapeOptions, TapeWriter};
use crate::target::Held;

const BLOCK: u32 = 4096;
const DISK: u64 = 3 << 20;

fn session(round: u64, compress: bool, last: Option<&crate::tape::SessionHeader>) -> NewSession {
    NewSession {
        source_id: "0123abcd".into(),
        source_size_bytes: DISK,
        granularity_bytes: 65536,
        base: last.map(|h| h.target.clone()),
        target: Held {
            checkpoint: format!("c{round}"),
            generation: round + 1,
        },
        parent: last.map(|h| h.session_id),
        compress,
    }
}

/// Writes five sessions over two tapes (the third and fifth compressed)
/// and returns the disk as each session's checkpoint saw it.
fn chain(dir: &Path) -> (Vec<PathBuf>, Vec<Vec<u8>>) {
    let tapes = vec![dir.join("a.tape"), dir.join("b.tape")];
    let mut image = vec![0u8; DISK as usize];
    let mut images = Vec::new();
    let mut random = Xorshift::new(11);
    let mut label: Option<Label> = None;
    let mut last = None;
    for round in 0..5u64 {
        let path = &tapes[usize::from(round >= 3)];
        let options = TapeOptions {
            block_size_bytes: BLOCK,
            continues: if round >= 3 { label.clone() } else { None },
            ..TapeOptions::default()
        };
        let tape = TapeWriter::open_append(path, &options).unwrap();
        label.get_or_insert_with(|| tape.label().clone());
        let new = session(round, round % 2 == 0 && round > 0, last.as_ref());
        let mut writer = tape.begin_session(new).unwrap();
        let regions = if round == 0 { 1 } else { 6 };
        let mut offset = 0u64;
        for region in 0..regions {
            let (start, length) = if round == 0 {
                (0, DISK - 8192)
            } else {
                let start = offset + random.below(200_000) + 1;
                (start, random.below(300_000) + 1)
            };
            if start + length > DISK {
                break;
            }
            if region % 3 == 2 {
                writer.write_zero(start, length).unwrap();
                image[start as usize..(start + length) as usize].fill(0);
            } else {
                let data = random_bytes(round * 100 + region, length as usize);
                writer.write_data(start, &data).unwrap();
                image[start as usize..(start + length) as usize].copy_from_slice(&data);
            }
            offset = start + length;
        }
        let (_, _) = writer.finish().unwrap();
        last = crate::tape::last_session(path).unwrap();
        images.push(image.clone());
    }
    (tapes, images)
}

fn read(view: &TapeView, offset: u64, length: usize) -> Vec<u8> {
    let mut buf = vec![0u8; length];
    view.read_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn every_checkpoint_of_a_chain_reads_as_the_disk_did() {
    let dir = TempDir::new("view-chain");
    let (tapes, images) = chain(dir.path());
    let mut random = Xorshift::new(5);
    for (round, image) in images.iter().enumerate() {
        let view = TapeView::open(&tapes, Some(&format!("c{round}"))).unwrap();
        assert_eq!(view.checkpoint(), format!("c{round}"));
        assert_eq!(view.size_bytes(), DISK);
        assert!(
            read(&view, 0, DISK as usize) == *image,
            "whole disk at c{round}"
        );
        for _ in 0..300 {
            let offset = random.below(DISK);
            let length = random.below((DISK - offset).min(600_000)) as usize + 1;
            let got = read(&view, offset, length);
            assert!(
                got[..] == image[offset as usize..offset as usize + length],
                "c{round}: {length} bytes at {offset}"
            );
            // Read again without waiting: the blocks were checked, so it
            // reads the same (or says it would wait, never other bytes).
            let mut again = vec![0u8; length];
            if view.read_at_nowait(&mut again, offset).unwrap() {
                assert!(again == got, "c{round}: nowait {length} bytes at {offset}");
            }
        }
    }
    let newest = TapeView::open(&tapes, None).unwrap();
    assert_eq!(newest.checkpoint(), "c4");
}

#[test]
fn holes_are_reported_where_no_session_wrote_data() {
    let dir = TempDir::new("view-holes");
    let (tapes, _) = chain(dir.path());
    let view = TapeView::open(&tapes, Some("c0")).unwrap();
    let mut extents = Vec::new();
    view.extents(0, DISK, 1000, &mut extents).unwrap();
    assert_eq!(extents.len(), 2, "{extents:?}");
    assert_eq!(extents[0].length_bytes, DISK - 8192);
    assert_eq!(extents[0].flags & STATE_HOLE, 0);
    assert_ne!(extents[1].flags & STATE_HOLE, 0);
}

#[test]
fn a_damaged_block_fails_the_read_that_needs_it_and_the_next_open() {
    let dir = TempDir::new("view-damage");
    let (tapes, images) = chain(dir.path());
    let view = TapeView::open(&tapes, Some("c0")).unwrap();
    // Block 40 of the first tape lies inside the full session's data.
    let at = 40 * u64::from(BLOCK) + 1000;
    let mut bytes = std::fs::read(&tapes[0]).unwrap();
    bytes[at as usize] ^= 0x40;
    std::fs::write(&tapes[0], &bytes).unwrap();
    let mut buf = vec![0u8; DISK as usize];
    let error = view.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{error}");
    assert!(error.to_string().contains("block 40"), "{error}");
    // What other blocks hold still reads right.
    assert!(read(&view, 0, 4096)[..] == images[0][..4096]);
    let refused = TapeView::open(&tapes, Some("c0")).unwrap_err();
    assert!(
        refused.to_string().contains("damage at block 40"),
        "{refused}"
    );
}

#[test]
fn the_index_beside_the_tapes_serves_the_next_view_until_a_tape_changes() {
    let dir = TempDir::new("view-index");
    let (tapes, images) = chain(dir.path());
    let index_of = |tape: &Path| super::tape_index::index_path(tape);
    TapeView::open(&tapes, None).unwrap();
    for tape in &tapes {
        assert!(index_of(tape).exists(), "{} indexed", tape.display());
    }
    // From the indexes: every checkpoint reads the same.
    for (round, image) in images.iter().enumerate() {
        let view = TapeView::open(&tapes, Some(&format!("c{round}"))).unwrap();
        assert!(
            read(&view, 0, DISK as usize) == *image,
            "c{round} from the index"
        );
    }
    // A damaged index is read around: the tapes are read again.
    let mut index = std::fs::read(index_of(&tapes[0])).unwrap();
    let middle = index.len() / 2;
    index[middle] ^= 1;
    std::fs::write(index_of(&tapes[0]), &index).unwrap();
    let view = TapeView::open(&tapes, Some("c2")).unwrap();
    assert!(read(&view, 0, DISK as usize) == images[2]);
    // Damage in the data is still found by the block's crc when the view
    // comes from the index.
    TapeView::open(&tapes, None).unwrap();
    let mut bytes = std::fs::read(&tapes[1]).unwrap();
    let at = bytes.len() - 3 * BLOCK as usize;
    bytes[at] ^= 0x01;
    std::fs::write(&tapes[1], &bytes).unwrap();
    let view = TapeView::open(&tapes, None).unwrap();
    let mut buf = vec![0u8; DISK as usize];
    let error = view.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{error}");
    // A tape that grew (another session) is indexed again.
    let length = std::fs::metadata(&tapes[1]).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(&tapes[1])
        .unwrap();
    file.set_len(length + u64::from(BLOCK)).unwrap();
    assert!(
        TapeView::open(&tapes, None).is_err(),
        "a cut block at the end"
    );
}
