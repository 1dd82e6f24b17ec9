//! The copy-before-write snapshot on a real tracker: a `Tracker` and its
//! `TrackedBackend` over a `FileBackend` on a temporary image, the
//! snapshot read while writers write.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::{Duration, Instant};

use backend::{BlockBackend, FileBackend, STATE_ZERO};
use copier::snapshot::{
    PIN_HOLDER, ReleaseError, Snapshot, SnapshotLimits, SnapshotManager, TakeError,
};
use testkit::{TempDir, Xorshift, random_bytes, write_random_file};
use tracker::{CheckpointError, TrackedBackend, Tracker, TrackerOptions};

const REGION_BYTES: u64 = 64 << 10;
/// The name the store gives its copy threads; reads on them are copy-outs.
const COPY_THREAD: &str = "snapshot-copy";

/// Storage that can hold the reads of threads of one name until opened,
/// and counts the copy threads' reads.
struct Latched {
    inner: Arc<dyn BlockBackend>,
    held: Mutex<(Option<&'static str>, usize)>,
    changed: Condvar,
    copy_reads: AtomicU64,
}

impl Latched {
    /// Reads on threads named `thread` wait from now until `open`.
    fn hold(&self, thread: &'static str) {
        self.held.lock().unwrap().0 = Some(thread);
    }

    fn open(&self) {
        self.held.lock().unwrap().0 = None;
        self.changed.notify_all();
    }

    /// Returns once `count` reads wait at the latch.
    fn wait_for_held_reads(&self, count: usize) {
        let mut held = self.held.lock().unwrap();
        while held.1 < count {
            held = self.changed.wait(held).unwrap();
        }
    }
}

impl BlockBackend for Latched {
    fn next(&self) -> Option<&dyn BlockBackend> {
        Some(&*self.inner)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or_default();
        if name == COPY_THREAD {
            self.copy_reads.fetch_add(1, Ordering::SeqCst);
        }
        let mut held = self.held.lock().unwrap();
        if held.0 == Some(name) {
            held.1 += 1;
            self.changed.notify_all();
            while held.0 == Some(name) {
                held = self.changed.wait(held).unwrap();
            }
            held.1 -= 1;
        }
        drop(held);
        self.inner.read_at(buf, offset)
    }
}

struct Disk {
    dir: TempDir,
    image: PathBuf,
    image_bytes: u64,
    tracker: Arc<Tracker>,
    manager: Arc<SnapshotManager>,
    storage: Arc<Latched>,
    /// What clients write to: the tracking layer over `storage`.
    disk: Arc<TrackedBackend>,
}

impl Disk {
    /// A served disk of random contents, with a snapshot manager.
    fn new(label: &str, image_bytes: u64) -> Disk {
        let dir = TempDir::new(&format!("snapshot-{label}"));
        let image = dir.join("disk.img");
        write_random_file(&image, 0x5eed, image_bytes as usize);
        Disk::open(dir, image, image_bytes)
    }

    fn open(dir: TempDir, image: PathBuf, image_bytes: u64) -> Disk {
        let options = TrackerOptions {
            image: image.clone(),
            state_dir: None,
            granularity_bytes: Some(REGION_BYTES),
            precision_bytes: None,
            journal_wrapper: None,
            files: false,
        };
        let tracker = Arc::new(Tracker::open(&options, image_bytes).unwrap());
        let file: Arc<dyn BlockBackend> = Arc::new(FileBackend::open(&image, false).unwrap());
        let storage = Arc::new(Latched {
            inner: file,
            held: Mutex::new((None, 0)),
            changed: Condvar::new(),
            copy_reads: AtomicU64::new(0),
        });
        let manager = SnapshotManager::register(&tracker, Arc::clone(&storage) as _).unwrap();
        tracker.start();
        let disk = Arc::new(TrackedBackend::new(
            Arc::clone(&storage) as _,
            Arc::clone(&tracker),
        ));
        Disk {
            dir,
            image,
            image_bytes,
            tracker,
            manager,
            storage,
            disk,
        }
    }

    fn take(&self, name: &str, limits: SnapshotLimits) -> Arc<Snapshot> {
        self.manager.take(&self.tracker, name, limits).unwrap()
    }

    fn limits(&self) -> SnapshotLimits {
        SnapshotLimits {
            store_bytes_max: self.image_bytes,
            copy_out_timeout: Duration::from_secs(30),
        }
    }

    fn image(&self) -> Vec<u8> {
        std::fs::read(&self.image).unwrap()
    }

    fn write_region(&self, region: u64, seed: u64) {
        let data = random_bytes(seed, 4096);
        self.disk
            .write_at(&data, region * REGION_BYTES, false)
            .unwrap();
    }

    fn store_dir(&self) -> PathBuf {
        self.tracker.state_dir().join("snapshots")
    }
}

/// Reads `snapshot` in full, in pieces of varied length and alignment,
/// and compares it with `expected`.
fn assert_snapshot_reads(snapshot: &Snapshot, expected: &[u8], random: &mut Xorshift) {
    let mut offset = 0usize;
    while offset < expected.len() {
        let length = (1 + random.index(300 << 10)).min(expected.len() - offset);
        let mut buf = vec![0u8; length];
        snapshot.read_at(&mut buf, offset as u64).unwrap();
        if buf != expected[offset..offset + length] {
            let first = (0..length)
                .find(|&i| buf[i] != expected[offset + i])
                .unwrap();
            panic!(
                "snapshot byte {} differs from the image at the snapshot (read {offset}+{length})",
                offset + first
            );
        }
        offset += length;
    }
}

#[test]
fn a_snapshot_reads_the_image_as_it_was_while_writers_write() {
    let disk = Disk::new("concurrent", 32 << 20);
    let snapshot = disk.take("snap", disk.limits());
    let expected = disk.image();
    let writing = Arc::new(AtomicU64::new(3));
    let writers: Vec<_> = (0..3u64)
        .map(|writer| {
            let (backend, writing) = (Arc::clone(&disk.disk), Arc::clone(&writing));
            let image_bytes = disk.image_bytes;
            std::thread::spawn(move || {
                let mut random = Xorshift::new(100 + writer);
                let mut data = random.bytes(1 << 20);
                for write in 0..60u64 {
                    let length = 4096 + random.index((1 << 20) - 4096 + 1);
                    let offset = random.below(image_bytes - length as u64 + 1);
                    data[..8].copy_from_slice(&(writer << 32 | write).to_le_bytes());
                    backend.write_at(&data[..length], offset, false).unwrap();
                    if random.chance(10) {
                        backend.flush().unwrap();
                    }
                }
                writing.fetch_sub(1, Ordering::SeqCst);
            })
        })
        .collect();
    let mut random = Xorshift::new(7);
    let mut passes_during_writes = 0;
    while writing.load(Ordering::SeqCst) > 0 {
        assert_snapshot_reads(&snapshot, &expected, &mut random);
        passes_during_writes += 1;
    }
    for writer in writers {
        writer.join().unwrap();
    }
    assert_snapshot_reads(&snapshot, &expected, &mut random);
    assert_ne!(disk.image(), expected, "the writers changed the disk");
    let status = snapshot.status();
    assert_eq!(status.broken, None);
    assert!(status.regions_copied > 0);
    eprintln!(
        "{passes_during_writes} full reads during the writes; {} regions ({} bytes) copied out",
        status.regions_copied, status.store_bytes
    );
    disk.manager.release(&disk.tracker, "snap").unwrap();
}

#[test]
fn a_read_racing_the_first_write_of_its_region_returns_the_old_contents() {
    // The reader's live read is held until the region's first write is
    // done: it then reads the new bytes, and only the re-check (the region
    // was copied out meanwhile) brings back the old ones.
    let disk = Disk::new("race", 4 << 20);
    let snapshot = disk.take("snap", disk.limits());
    let expected = disk.image();
    disk.write_region(4, 1); // copied out before the read: read from the store
    disk.storage.hold("snapshot-reader");
    let (start, end) = (4 * REGION_BYTES + 100, 7 * REGION_BYTES - 100);
    let reader = {
        let snapshot = Arc::clone(&snapshot);
        std::thread::Builder::new()
            .name("snapshot-reader".into())
            .spawn(move || {
                let mut buf = vec![0u8; (end - start) as usize];
                snapshot.read_at(&mut buf, start).unwrap();
                buf
            })
            .unwrap()
    };
    disk.storage.wait_for_held_reads(1);
    let new = random_bytes(2, 2 * REGION_BYTES as usize);
    disk.disk.write_at(&new, 5 * REGION_BYTES, false).unwrap();
    disk.storage.open();
    let read = reader.join().unwrap();
    assert_eq!(
        disk.image()[(5 * REGION_BYTES) as usize..][..new.len()],
        new[..],
        "the write reached the disk"
    );
    assert!(
        read == expected[start as usize..end as usize],
        "the snapshot read returned bytes written after the snapshot"
    );
    assert_eq!(snapshot.status().regions_copied, 3);
}

#[test]
fn regions_are_copied_out_once_even_across_checkpoints() {
    let disk = Disk::new("once", 4 << 20);
    let snapshot = disk.take("snap", disk.limits());
    let expected = disk.image();
    let copied = || snapshot.status().regions_copied;
    let copy_reads = || disk.storage.copy_reads.load(Ordering::SeqCst);
    disk.write_region(3, 1);
    assert_eq!((copied(), copy_reads()), (1, 1), "first touch of region 3");
    disk.write_region(3, 2);
    assert_eq!((copied(), copy_reads()), (1, 1), "region 3 again");
    let across = random_bytes(3, 8192);
    disk.disk
        .write_at(&across, 4 * REGION_BYTES - 4096, false)
        .unwrap();
    assert_eq!(copied(), 2, "regions 3 and 4: only 4 is new");
    disk.tracker.checkpoint("second").unwrap();
    disk.write_region(3, 4);
    disk.write_region(4, 5);
    assert_eq!(
        (copied(), copy_reads()),
        (2, 2),
        "a new generation's first touches of copied regions copy nothing"
    );
    disk.write_region(10, 6);
    assert_eq!(
        copied(),
        3,
        "a region first written after the second checkpoint"
    );
    let store_bytes = std::fs::metadata(snapshot.store_path()).unwrap().len();
    assert_eq!(store_bytes, 3 * REGION_BYTES);
    assert_snapshot_reads(&snapshot, &expected, &mut Xorshift::new(1));
    disk.manager.release(&disk.tracker, "snap").unwrap();
}

/// Bytes of the store damaged after copy-out: whole and partial reads of
/// the region fail naming the damage, the snapshot breaks, and a region
/// still intact read before the damage was found reads right.
#[test]
fn a_damaged_store_fails_the_read_and_breaks_the_snapshot() {
    use std::os::unix::fs::FileExt;
    let disk = Disk::new("damaged-store", 4 << 20);
    let snapshot = disk.take("snap", disk.limits());
    let expected = disk.image();
    disk.write_region(2, 1);
    disk.write_region(5, 2);
    let mut region = vec![0u8; REGION_BYTES as usize];
    snapshot.read_at(&mut region, 5 * REGION_BYTES).unwrap();
    assert!(region[..] == expected[5 * REGION_BYTES as usize..6 * REGION_BYTES as usize]);
    // Region 2 was copied out first: it is the store's first region.
    let store = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(snapshot.store_path())
        .unwrap();
    let mut byte = [0u8; 1];
    store.read_exact_at(&mut byte, 1000).unwrap();
    store.write_all_at(&[byte[0] ^ 0x10], 1000).unwrap();
    let mut part = vec![0u8; 4096];
    let error = snapshot
        .read_at(&mut part, 2 * REGION_BYTES + 8192)
        .unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
    assert!(error.to_string().contains("was damaged"), "{error}");
    assert!(error.to_string().contains("region 2"), "{error}");
    let broken = snapshot.status().broken.expect("the snapshot is broken");
    assert!(broken.contains("damaged"), "{broken}");
    let error = snapshot.read_at(&mut region, 5 * REGION_BYTES).unwrap_err();
    assert!(error.to_string().contains("broken"), "{error}");
    disk.manager.release(&disk.tracker, "snap").unwrap();
}

#[test]
fn concurrent_first_writes_of_one_region_copy_it_once() {
    let disk = Disk::new("same-region", 4 << 20);
    let snapshot = disk.take("snap", disk.limits());
    let expected = disk.image();
    let barrier = Arc::new(Barrier::new(8));
    let writers: Vec<_> = (0..8u64)
        .map(|writer| {
            let (backend, barrier) = (Arc::clone(&disk.disk), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let data = random_bytes(writer, 4096);
                barrier.wait();
                backend
                    .write_at(&data, 9 * REGION_BYTES + writer * 4096, false)
                    .unwrap();
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    assert_eq!(snapshot.status().regions_copied, 1);
    assert_eq!(disk.storage.copy_reads.load(Ordering::SeqCst), 1);
    assert_snapshot_reads(&snapshot, &expected, &mut Xorshift::new(2));
}

#[test]
fn a_full_store_breaks_the_snapshot_and_never_a_write() {
    let disk = Disk::new("full", 4 << 20);
    let limits = SnapshotLimits {
        store_bytes_max: 4 * REGION_BYTES,
        copy_out_timeout: Duration::from_secs(30),
    };
    let snapshot = disk.take("snap", limits);
    for region in 0..10 {
        disk.write_region(region * 3, region);
    }
    let reason = snapshot
        .is_broken()
        .expect("a store past its limit breaks the snapshot");
    assert!(
        reason.contains(&format!("limit of {} bytes", 4 * REGION_BYTES)),
        "{reason}"
    );
    let mut buf = vec![0u8; 4096];
    let error = snapshot.read_at(&mut buf, 0).unwrap_err();
    assert!(
        error.to_string().contains("snapshot \"snap\" is broken")
            && error.to_string().contains("limit"),
        "{error}"
    );
    let store = snapshot.store_path().to_path_buf();
    assert!(store.exists());
    disk.manager.release(&disk.tracker, "snap").unwrap();
    assert!(!store.exists(), "release removes the store");
    assert!(disk.tracker.pins().unwrap().is_empty());
}

#[test]
fn a_copy_out_that_cannot_finish_breaks_the_snapshot_after_the_bound() {
    let disk = Disk::new("stuck", 4 << 20);
    let bound = Duration::from_millis(300);
    let limits = SnapshotLimits {
        store_bytes_max: disk.image_bytes,
        copy_out_timeout: bound,
    };
    let snapshot = disk.take("snap", limits);
    disk.storage.hold(COPY_THREAD);
    // Two writers of one fresh region: one claims the copy-out, the other
    // waits for it; neither waits past the bound.
    let started = Instant::now();
    let writers: Vec<_> = (0..2u64)
        .map(|writer| {
            let backend = Arc::clone(&disk.disk);
            std::thread::spawn(move || {
                let data = random_bytes(writer, 4096);
                backend
                    .write_at(&data, 7 * REGION_BYTES + writer * 4096, false)
                    .map(|()| started.elapsed())
            })
        })
        .collect();
    for writer in writers {
        let waited = writer.join().unwrap().expect("the disk's write succeeds");
        assert!(
            waited >= bound,
            "a write went on after {waited:?}, before the bound"
        );
    }
    let reason = snapshot
        .is_broken()
        .expect("a stuck copy-out breaks the snapshot");
    assert!(reason.contains("did not finish within 300ms"), "{reason}");
    // Broken: later first touches copy nothing and do not wait.
    disk.write_region(20, 3);
    disk.storage.open();
    assert!(snapshot.read_at(&mut [0u8; 512], 0).is_err());
    disk.manager.release(&disk.tracker, "snap").unwrap();
    assert_eq!(
        disk.storage.copy_reads.load(Ordering::SeqCst),
        1,
        "only the stuck copy-out read the disk"
    );
}

#[test]
fn release_unpins_the_checkpoint_and_removes_the_store_and_one_snapshot_is_open_at_a_time() {
    let disk = Disk::new("release", 4 << 20);
    let snapshot = disk.take("one", disk.limits());
    disk.write_region(2, 1);
    let store = snapshot.store_path().to_path_buf();
    assert!(store.starts_with(disk.store_dir()) && store.exists());
    let pins = disk.tracker.pins().unwrap();
    assert_eq!(pins.len(), 1);
    assert_eq!(pins[0].holder, PIN_HOLDER);
    assert!(matches!(
        disk.tracker.delete_checkpoint("one"),
        Err(CheckpointError::Pinned { .. })
    ));

    let second = disk.manager.take(&disk.tracker, "two", disk.limits());
    let Err(error @ TakeError::AlreadyOpen { .. }) = second else {
        panic!("a second take while one is open: {second:?}");
    };
    assert!(
        error.to_string().contains("snapshot \"one\" is open"),
        "{error}"
    );
    assert!(
        disk.tracker.checkpoints().iter().all(|c| c.name != "two"),
        "a refused take takes no checkpoint"
    );

    let wrong = disk.manager.release(&disk.tracker, "two");
    assert!(
        matches!(wrong, Err(ReleaseError::NotOpen { .. })),
        "{wrong:?}"
    );
    disk.manager.release(&disk.tracker, "one").unwrap();
    assert!(!store.exists(), "release removes the store");
    assert!(disk.tracker.pins().unwrap().is_empty());
    disk.tracker.delete_checkpoint("one").unwrap();
    let error = snapshot.read_at(&mut [0u8; 512], 0).unwrap_err();
    assert!(error.to_string().contains("was released"), "{error}");
    assert!(disk.manager.active().is_none());
    // Released: first touches copy nothing; a new snapshot may be taken.
    disk.write_region(3, 2);
    assert_eq!(snapshot.status().regions_copied, 1);
    let again = disk.take("two", disk.limits());
    assert_eq!(disk.manager.active().unwrap().name(), "two");
    disk.manager.release(&disk.tracker, again.name()).unwrap();
}

#[test]
fn a_restarted_server_discards_the_store_and_the_pin_it_left() {
    let disk = Disk::new("restart", 4 << 20);
    let snapshot = disk.take("left", disk.limits());
    disk.write_region(1, 1);
    assert!(snapshot.store_path().exists());
    // What a crash leaves: the store file (a stop removes its own) and
    // the pin in the catalog.
    let leftover = disk.store_dir().join("crashed.cbw");
    std::fs::write(&leftover, b"old contents").unwrap();
    let Disk {
        dir,
        image,
        image_bytes,
        tracker,
        manager,
        storage,
        disk: backend,
    } = disk;
    drop((backend, storage, manager, snapshot));
    tracker.close().unwrap();
    drop(tracker);
    let disk = Disk::open(dir, image, image_bytes);
    assert!(!leftover.exists(), "a start removes leftover stores");
    assert_eq!(std::fs::read_dir(disk.store_dir()).unwrap().count(), 0);
    assert!(disk.tracker.pins().unwrap().is_empty(), "and their pins");
    disk.tracker.delete_checkpoint("left").unwrap();
}

/// The allocation of a narrowed snapshot: what it keeps answers with the
/// disk's holes as of the checkpoint (a copied-out region as data); what
/// it released answers as data, never as a hole, whatever the disk holds.
#[test]
fn a_narrowed_snapshot_reports_holes_only_where_it_keeps_them() {
    let dir = TempDir::new("snapshot-narrowed-holes");
    let image = dir.join("disk.img");
    let image_bytes = 32 * REGION_BYTES;
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(image_bytes).unwrap();
    use std::os::unix::fs::FileExt;
    for r in [0, 1, 2, 3, 4, 10, 20] {
        file.write_all_at(&random_bytes(r, REGION_BYTES as usize), r * REGION_BYTES)
            .unwrap();
    }
    drop(file);
    let disk = Disk::open(dir, image, image_bytes);
    let snapshot = disk.take("snap", disk.limits());
    // Keep regions 2..=12 (the range ends inside region 12).
    snapshot
        .keep_only(&[(2 * REGION_BYTES, 10 * REGION_BYTES + 5)])
        .unwrap();
    disk.write_region(11, 1); // kept, a hole: copied out, reads as data
    disk.write_region(0, 2); // released
    disk.write_region(25, 3); // released, a hole at the checkpoint
    let answer = |offset: u64, length: u64, max: usize| {
        let mut extents = Vec::new();
        snapshot.extents(offset, length, max, &mut extents).unwrap();
        let mut position = offset;
        extents
            .iter()
            .map(|e| {
                let start = position;
                position += e.length_bytes;
                (start, e.length_bytes, e.flags & STATE_ZERO != 0)
            })
            .collect::<Vec<_>>()
    };
    let r = REGION_BYTES;
    assert_eq!(
        answer(0, image_bytes, 1000),
        vec![
            (0, 5 * r, false),
            (5 * r, 5 * r, true),
            (10 * r, 2 * r, false),
            (12 * r, r, true),
            (13 * r, 19 * r, false),
        ]
    );
    // The same through a bounded answer, and from inside regions.
    assert_eq!(
        answer(0, image_bytes, 2),
        vec![(0, 5 * r, false), (5 * r, 5 * r, true)]
    );
    assert_eq!(
        answer(5 * r + 512, 7 * r, 1000),
        vec![
            (5 * r + 512, 5 * r - 512, true),
            (10 * r, 2 * r, false),
            (12 * r, 512, true),
        ]
    );
    // Narrowed again: region 12 is released now and answers as data.
    snapshot
        .keep_only(&[(2 * REGION_BYTES, 10 * REGION_BYTES)])
        .unwrap();
    assert_eq!(answer(10 * r, 4 * r, 1000), vec![(10 * r, 4 * r, false)]);
    disk.manager.release(&disk.tracker, "snap").unwrap();
}

#[test]
fn deleting_the_snapshots_checkpoint_by_hand_breaks_it() {
    let disk = Disk::new("deleted", 4 << 20);
    disk.write_region(6, 1); // changed in the snapshot's generation
    let snapshot = disk.take("snap", disk.limits());
    disk.write_region(1, 2);
    disk.tracker.unpin("snap", PIN_HOLDER).unwrap();
    // The newest checkpoint: its changes (region 6) join the current
    // generation's marks without the hook, so the next write of region 6
    // takes the fast path and copies nothing out.
    disk.tracker.delete_checkpoint("snap").unwrap();
    disk.write_region(6, 3);
    let mut buf = vec![0u8; REGION_BYTES as usize];
    let error = snapshot.read_at(&mut buf, 6 * REGION_BYTES).unwrap_err();
    assert!(error.to_string().contains("broken"), "{error}");
    let reason = snapshot
        .is_broken()
        .expect("a deleted checkpoint breaks the snapshot");
    assert!(reason.contains("deleted"), "{reason}");
    let released = disk.manager.release(&disk.tracker, "snap");
    assert!(
        matches!(released, Err(ReleaseError::Unpin { .. })),
        "the pin is gone already: {released:?}"
    );
    assert!(disk.manager.active().is_none());
}

#[test]
fn first_touch_cost_with_and_without_a_snapshot() {
    // A rough figure, printed: N first-touch 4 KiB writes on fresh
    // regions after a plain checkpoint, then after a snapshot (each one
    // copies its region out), then rewrites of the same regions.
    const WRITES: u64 = 200;
    let disk = Disk::new("cost", 256 * REGION_BYTES);
    let time_writes = |seed: u64| {
        let data = random_bytes(seed, 4096);
        let started = Instant::now();
        for region in 0..WRITES {
            disk.disk
                .write_at(&data, region * REGION_BYTES, false)
                .unwrap();
        }
        started.elapsed()
    };
    disk.tracker.checkpoint("plain").unwrap();
    let plain = time_writes(1000);
    let snapshot = disk.take("snap", disk.limits());
    let with_snapshot = time_writes(2000);
    let rewrites = time_writes(3000);
    assert_eq!(snapshot.status().regions_copied, WRITES);
    let per_write = |total: Duration| total.as_secs_f64() * 1e6 / WRITES as f64;
    eprintln!(
        "{WRITES} first-touch 4 KiB writes, {} KiB regions: {:.0} us each without a snapshot, {:.0} us with one ({:.2}x); rewrites with the snapshot open: {:.1} us each",
        REGION_BYTES >> 10,
        per_write(plain),
        per_write(with_snapshot),
        with_snapshot.as_secs_f64() / plain.as_secs_f64(),
        per_write(rewrites),
    );
    disk.manager.release(&disk.tracker, "snap").unwrap();
}

/// A killed copier's snapshot is released only when its server sees the
/// control connection end, which can come after the rerun asks for one:
/// the rerun failed with "snapshot ... is open" (tests/crash_loop.rs
/// found it). A request waits for the open one to go, within a bound.
#[test]
fn a_snapshot_released_while_a_take_waits_lets_the_take_go_on() {
    let disk = Disk::new("release-wait", 4 << 20);
    disk.take("dying", disk.limits());
    assert!(
        !disk.manager.wait_until_idle(Duration::from_millis(50)),
        "open, and nobody releases it"
    );
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            disk.manager.release(&disk.tracker, "dying").unwrap();
        });
        assert!(disk.manager.wait_until_idle(Duration::from_secs(30)));
    });
    disk.take("rerun", disk.limits());
    disk.manager.release(&disk.tracker, "rerun").unwrap();
}

/// A snapshot told which ranges its copy still reads (`keep_only`) copies
/// out only those at a first write; the others read as an error, never as
/// bytes written after the checkpoint, and their allocation as data; the
/// kept ones read the checkpoint's bytes under writes. A later call only
/// narrows: a region released once stays released.
#[test]
fn a_narrowed_snapshot_copies_out_and_reads_only_what_it_keeps() {
    let disk = Disk::new("narrowed", 4 << 20);
    let snapshot = disk.take("snap", disk.limits());
    let expected = disk.image();
    let copied = || snapshot.status().regions_copied;
    let region = |r: u64| (r * REGION_BYTES) as usize..((r + 1) * REGION_BYTES) as usize;
    disk.write_region(1, 1);
    assert_eq!(
        copied(),
        1,
        "before narrowing, every first touch copies out"
    );
    // Keep regions 1..=3 (a range ending inside region 3) and region 9.
    let kept = snapshot
        .keep_only(&[
            (REGION_BYTES + 100, 2 * REGION_BYTES),
            (9 * REGION_BYTES, 10),
        ])
        .unwrap();
    assert_eq!(kept, 4);
    for r in [0, 2, 3, 4, 9, 20] {
        disk.write_region(r, 10 + r);
    }
    assert_eq!(
        copied(),
        4,
        "regions 2, 3 and 9 copied out; 0, 4 and 20 not"
    );
    for r in [1, 2, 3, 9] {
        let mut buf = vec![0; REGION_BYTES as usize];
        snapshot.read_at(&mut buf, r * REGION_BYTES).unwrap();
        assert!(
            buf == expected[region(r)],
            "region {r} as of the checkpoint"
        );
    }
    for r in [0, 4, 5, 20] {
        let mut buf = vec![0; 4096];
        let error = snapshot
            .read_at(&mut buf, r * REGION_BYTES + 8192)
            .unwrap_err();
        assert!(error.to_string().contains("no longer keeps"), "{error}");
    }
    let mut across = vec![0; 2 * REGION_BYTES as usize];
    assert!(snapshot.read_at(&mut across, 3 * REGION_BYTES).is_err());
    // Allocation over released regions answers, as data.
    let mut extents = Vec::new();
    snapshot
        .extents(0, 32 * REGION_BYTES, 1000, &mut extents)
        .unwrap();
    assert_eq!(
        extents.iter().map(|e| e.length_bytes).sum::<u64>(),
        32 * REGION_BYTES
    );
    assert!(extents.iter().all(|e| e.flags == 0), "{extents:?}");
    // Widening keeps nothing released before; what stays kept still
    // reads right, and copied-out regions keep their bytes.
    snapshot.keep_only(&[(0, 16 * REGION_BYTES)]).unwrap();
    disk.write_region(5, 30);
    assert_eq!(copied(), 4, "region 5 was released: no copy-out");
    snapshot
        .keep_only(&[(9 * REGION_BYTES, REGION_BYTES)])
        .unwrap();
    disk.write_region(1, 31);
    let mut buf = vec![0; REGION_BYTES as usize];
    snapshot.read_at(&mut buf, REGION_BYTES).unwrap();
    assert!(
        buf == expected[region(1)],
        "region 1 was copied out: it stays"
    );
    snapshot.read_at(&mut buf, 9 * REGION_BYTES).unwrap();
    assert!(buf == expected[region(9)]);
    assert!(snapshot.is_broken().is_none(), "narrowing breaks nothing");
    assert!(snapshot.keep_only(&[(4 << 20, 1)]).is_err(), "past the end");
    disk.manager.release(&disk.tracker, "snap").unwrap();
}
