//! Journal compaction: a journal rewritten as the current generation's
//! snapshot says exactly what the long one said, survives a crash right
//! after, and is small.

use testkit::{TempDir, create_sparse_file};
use tracker::{Tracker, TrackerOptions};

const REGION_BYTES: u64 = 64 * 1024;
const IMAGE_BYTES: u64 = 256 * REGION_BYTES;

/// A sparse image and its options, in a directory that lives as long as
/// the returned `TempDir`.
fn setup(label: &str) -> (TempDir, TrackerOptions) {
    let dir = TempDir::new(&format!("compaction-{label}"));
    let image = dir.join("disk.img");
    create_sparse_file(&image, IMAGE_BYTES);
    let options = TrackerOptions {
        image,
        state_dir: None,
        granularity_bytes: Some(REGION_BYTES),
        precision_bytes: None,
        journal_wrapper: None,
        files: false,
    };
    (dir, options)
}

fn changes(tracker: &Tracker) -> Vec<(u64, u64, bool)> {
    tracker
        .changes("base", None)
        .unwrap()
        .iter()
        .map(|e| (e.offset_bytes, e.length_bytes, e.saved))
        .collect()
}

#[test]
fn a_compacted_journal_recovers_the_same_changes_after_a_crash() {
    let (_dir, options) = setup("crash");
    let tracker = Tracker::open(&options, IMAGE_BYTES).unwrap();
    tracker.start();
    tracker.checkpoint("base").unwrap();
    // Many flushes, each a SAVED record: the journal grows.
    for round in 0..200u64 {
        let offset = (round * 7 % 200) * REGION_BYTES;
        tracker.ensure_marked(offset, 4096).unwrap();
        tracker.note_written(offset, 4096);
        tracker.flush(|| Ok(())).unwrap();
    }
    // Written after the last flush: marked, not saved.
    tracker.ensure_marked(210 * REGION_BYTES, 4096).unwrap();
    tracker.note_written(210 * REGION_BYTES, 4096);
    let before = changes(&tracker);
    let size_before = tracker.journal_bytes();
    tracker.compact_journal().unwrap();
    let size_after = tracker.journal_bytes();
    assert!(
        size_after < size_before / 4,
        "compaction left {size_after} of {size_before} bytes"
    );
    assert_eq!(changes(&tracker), before, "compaction changed the answer");
    // A write after compaction goes to the new journal.
    tracker.ensure_marked(220 * REGION_BYTES, 4096).unwrap();
    tracker.note_written(220 * REGION_BYTES, 4096);
    let expected = changes(&tracker);
    // Crash: no close, no clean marker; the process's state is dropped.
    drop(tracker);
    let reopened = Tracker::open(&options, IMAGE_BYTES).unwrap();
    reopened.start();
    let mut recovered = changes(&reopened);
    recovered.sort_unstable();
    // After a crash, regions written but never flushed are reported as
    // written; everything else keeps its status. The fine record (which
    // 4 KiB of each region) was not durable, so every region counts whole.
    let whole = |extents: Vec<(u64, u64, bool)>| -> Vec<(u64, u64, bool)> {
        let mut regions: Vec<(u64, u64, bool)> = Vec::new();
        for (offset, length, saved) in extents {
            for region in offset / REGION_BYTES..(offset + length).div_ceil(REGION_BYTES) {
                match regions.last_mut() {
                    Some(last) if last.0 + last.1 == region * REGION_BYTES && last.2 == saved => {
                        last.1 += REGION_BYTES;
                    }
                    _ => regions.push((region * REGION_BYTES, REGION_BYTES, saved)),
                }
            }
        }
        regions
    };
    let mut expected = whole(expected);
    expected.sort_unstable();
    assert_eq!(recovered, expected, "recovery after compaction");
    assert!(
        reopened
            .changes("base", None)
            .unwrap()
            .iter()
            .all(|e| !e.exact),
        "after a crash the lost fine record counts whole"
    );
    assert!(
        reopened
            .warnings()
            .iter()
            .all(|w| !w.contains("every region")),
        "{:?}",
        reopened.warnings()
    );
    reopened.close().unwrap();
}
