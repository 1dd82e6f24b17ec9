//! EIO from the journal's storage, injected through the `journal_wrapper`
//! seam on a real journal file: on the append (half the bytes land, as
//! when the file system fills mid-record) and on the `fdatasync`. What
//! must hold, whichever fails:
//!
//! - a first touch (a write to a region not yet marked in the
//!   generation) fails and is never issued; a write to a marked region,
//!   FLUSH and FUA writes go on (the image is fine, only the journal is
//!   not);
//! - `journal_failure` says so, and stays set while the journal's storage
//!   fails; once it works again, the next first touch or flush has the
//!   journal rewritten from memory and tracking goes on, no restart
//!   needed, nothing missed, before or after a later crash;
//! - a checkpoint is refused, changing nothing;
//! - a checkpoint whose *new* journal cannot be written changes nothing
//!   either, and the disk goes on being tracked;
//! - after a stop and a restart every region whose bytes differ from the
//!   checkpoint's copy is reported, and the tracker works normally again.

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use backend::BlockBackend;
use backend::file::FileBackend;
use testkit::{TempDir, create_sparse_file, random_bytes};
use tracker::journal::JournalFile;
use tracker::tracker::{CloseError, JournalWrapper};
use tracker::{CheckpointError, TrackedBackend, Tracker, TrackerOptions};

const IMAGE_BYTES: u64 = 4 << 20;
const REGION_BYTES: u64 = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Half of the append reaches the file, then EIO.
    Write,
    /// The append reaches the page cache; the fdatasync fails with EIO.
    Sync,
}

/// Which operations fail, for every journal file the tracker opens.
#[derive(Debug, Default)]
struct Faults {
    write: AtomicBool,
    sync: AtomicBool,
    /// Only files wrapped at or after this count fail (0: every file).
    from_file: AtomicUsize,
    files_wrapped: AtomicUsize,
}

impl Faults {
    fn arm(&self, fault: Fault) {
        match fault {
            Fault::Write => self.write.store(true, Ordering::SeqCst),
            Fault::Sync => self.sync.store(true, Ordering::SeqCst),
        }
    }

    /// Space freed, the device back: nothing fails any more.
    fn disarm(&self) {
        self.write.store(false, Ordering::SeqCst);
        self.sync.store(false, Ordering::SeqCst);
    }
}

#[derive(Debug)]
struct FaultyJournal {
    file: File,
    faults: Arc<Faults>,
    /// Its number among the files wrapped.
    number: usize,
}

impl FaultyJournal {
    fn failing(&self, flag: &AtomicBool) -> bool {
        flag.load(Ordering::SeqCst) && self.number >= self.faults.from_file.load(Ordering::SeqCst)
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl JournalFile for FaultyJournal {
    fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        if self.failing(&self.faults.write) {
            FileExt::write_all_at(&self.file, &bytes[..bytes.len() / 2], offset)?;
            return Err(eio());
        }
        FileExt::write_all_at(&self.file, bytes, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        if self.failing(&self.faults.sync) {
            return Err(eio());
        }
        self.file.sync_data()
    }
    fn set_len(&self, length: u64) -> io::Result<()> {
        self.file.set_len(length)
    }
}

struct Setup {
    dir: TempDir,
    image: PathBuf,
    faults: Arc<Faults>,
    tracker: Arc<Tracker>,
    backend: TrackedBackend,
    /// The image as of checkpoint "base".
    base: Vec<u8>,
}

fn options(dir: &TempDir, wrapper: Option<JournalWrapper>) -> TrackerOptions {
    TrackerOptions {
        image: dir.join("disk.img"),
        state_dir: Some(dir.join("state")),
        granularity_bytes: Some(REGION_BYTES),
        precision_bytes: None,
        journal_wrapper: wrapper,
        files: false,
    }
}

/// Opens the state (once the tracker before it is gone) and serves the image.
fn serve(options: &TrackerOptions) -> (Arc<Tracker>, TrackedBackend) {
    let tracker = Arc::new(common::open_when_unlocked(options, IMAGE_BYTES));
    tracker.start();
    let file = FileBackend::open(&options.image, false).unwrap();
    let backend = TrackedBackend::new(Arc::new(file), Arc::clone(&tracker));
    (tracker, backend)
}

/// A tracker on a real image and journal behind `Faults`; region 1
/// written before checkpoint "base", region 2 after it.
fn setup(label: &str) -> Setup {
    let dir = TempDir::new(&format!("journal-failure-{label}"));
    let image = dir.join("disk.img");
    create_sparse_file(&image, IMAGE_BYTES);
    let faults = Arc::new(Faults::default());
    let wrapper = {
        let faults = Arc::clone(&faults);
        JournalWrapper(Arc::new(move |file: File| {
            let number = faults.files_wrapped.fetch_add(1, Ordering::SeqCst);
            Box::new(FaultyJournal {
                file,
                faults: Arc::clone(&faults),
                number,
            }) as Box<dyn JournalFile>
        }))
    };
    let (tracker, backend) = serve(&options(&dir, Some(wrapper)));
    write(&backend, 1, 1).unwrap();
    tracker.checkpoint("base").unwrap();
    let base = std::fs::read(&image).unwrap();
    write(&backend, 2, 2).unwrap();
    Setup {
        dir,
        image,
        faults,
        tracker,
        backend,
        base,
    }
}

/// Writes 4 KiB of `seed`'s bytes in the middle of `region`.
fn write(backend: &TrackedBackend, region: u64, seed: u64) -> io::Result<()> {
    let offset = region * REGION_BYTES + REGION_BYTES / 2;
    backend.write_at(&random_bytes(seed, 4096), offset, false)
}

fn write_fua(backend: &TrackedBackend, region: u64, seed: u64) -> io::Result<()> {
    let offset = region * REGION_BYTES;
    backend.write_at(&random_bytes(seed, 4096), offset, true)
}

/// Regions whose bytes differ between the image and `base`.
fn differing_regions(image: &Path, base: &[u8]) -> BTreeSet<u64> {
    let now = std::fs::read(image).unwrap();
    now.chunks(REGION_BYTES as usize)
        .zip(base.chunks(REGION_BYTES as usize))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(region, _)| region as u64)
        .collect()
}

fn reported_regions(tracker: &Tracker, since: &str) -> BTreeSet<u64> {
    tracker
        .changes(since, None)
        .unwrap()
        .iter()
        .flat_map(|e| {
            e.offset_bytes / REGION_BYTES..(e.offset_bytes + e.length_bytes).div_ceil(REGION_BYTES)
        })
        .collect()
}

/// Every region that differs from the base is reported, and nothing
/// outside `touched` (the regions any write was tried on) is.
fn assert_no_under_report(tracker: &Tracker, image: &Path, base: &[u8], touched: &[u64]) {
    let reported = reported_regions(tracker, "base");
    let differing = differing_regions(image, base);
    assert!(
        differing.is_subset(&reported),
        "changed regions {differing:?} not all reported: {reported:?}"
    );
    let touched: BTreeSet<u64> = touched.iter().copied().collect();
    assert!(
        reported.is_subset(&touched),
        "reported {reported:?} beyond the touched {touched:?}"
    );
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    /// `Tracker::close`, as SIGTERM does.
    Clean,
    /// Dropped without a close, as kill -9 leaves it.
    Crash,
}

/// Stops the tracker and opens the state again without faults.
fn restart(setup: Setup, stop: Stop) -> (TempDir, PathBuf, Vec<u8>, Arc<Tracker>, TrackedBackend) {
    let Setup {
        dir,
        image,
        tracker,
        backend,
        base,
        ..
    } = setup;
    if stop == Stop::Clean {
        let closed = tracker.close();
        match tracker.journal_failure() {
            Some(_) => assert!(
                matches!(closed, Err(CloseError::JournalFailed { .. })),
                "a close after a journal failure says so: {closed:?}"
            ),
            None => closed.unwrap(),
        }
    }
    drop(backend);
    drop(tracker);
    let (tracker, backend) = serve(&options(&dir, None));
    (dir, image, base, tracker, backend)
}

fn eio_refuses_first_touches_only(fault: Fault, stop: Stop) {
    let setup = setup(&format!("{fault:?}-{stop:?}"));
    setup.faults.arm(fault);
    let error = write(&setup.backend, 5, 5).expect_err("a first touch with a failing journal");
    assert!(
        error.to_string().contains("journal"),
        "the error names the journal: {error}"
    );
    assert_eq!(
        differing_regions(&setup.image, &setup.base),
        [2].into_iter().collect(),
        "the refused write was not issued"
    );
    let failure = setup.tracker.journal_failure().expect("a journal failure");
    assert!(failure.contains("Input/output error"), "{failure}");

    // The device still failing: the rewrite that each refused first
    // touch asks for (at most once a second) fails too, and changes
    // nothing; writes to marked regions, FLUSH and FUA writes go on.
    std::thread::sleep(tracker::tracker::JOURNAL_RECOVERY_INTERVAL * 2);
    assert!(write(&setup.backend, 6, 6).is_err(), "still refused");
    std::thread::sleep(tracker::tracker::JOURNAL_RECOVERY_INTERVAL / 2);
    write(&setup.backend, 2, 22).expect("a write to a marked region");
    setup
        .backend
        .flush()
        .expect("FLUSH: the image is durable, only the journal is not");
    write_fua(&setup.backend, 2, 23).expect("a FUA write to a marked region");
    assert!(setup.tracker.journal_failure().is_some());
    assert_no_under_report(&setup.tracker, &setup.image, &setup.base, &[2, 5, 6]);

    let refused = setup
        .tracker
        .checkpoint("after")
        .expect_err("a checkpoint with a failed journal");
    assert!(
        refused.to_string().contains("journal"),
        "the refusal names the journal: {refused}"
    );
    assert!(
        setup
            .tracker
            .checkpoints()
            .iter()
            .all(|c| c.name != "after")
    );

    let (_dir, image, base, tracker, backend) = restart(setup, stop);
    assert!(
        !tracker.clean_start(),
        "a failed journal leaves no clean marker"
    );
    assert!(tracker.journal_failure().is_none());
    assert!(
        tracker.checkpoints().iter().all(|c| c.name != "after"),
        "the refused checkpoint does not come back"
    );
    assert_no_under_report(&tracker, &image, &base, &[2, 5, 6]);

    // Normal again: first touches, checkpoints.
    write(&backend, 7, 7).expect("a first touch after the restart");
    assert_no_under_report(&tracker, &image, &base, &[2, 5, 6, 7]);
    tracker.checkpoint("again").unwrap();
    write(&backend, 8, 8).unwrap();
    assert_eq!(
        reported_regions(&tracker, "again"),
        [8].into_iter().collect()
    );
    tracker.close().unwrap();
}

#[test]
fn eio_on_a_journal_append_refuses_first_touches_only_and_a_restart_loses_no_change() {
    eio_refuses_first_touches_only(Fault::Write, Stop::Clean);
    eio_refuses_first_touches_only(Fault::Write, Stop::Crash);
}

#[test]
fn eio_on_a_journal_sync_refuses_first_touches_only_and_a_restart_loses_no_change() {
    eio_refuses_first_touches_only(Fault::Sync, Stop::Clean);
    eio_refuses_first_touches_only(Fault::Sync, Stop::Crash);
}

/// Once the journal's storage works again, tracking comes back without a
/// restart: the journal is rewritten from memory, first touches and
/// checkpoints work, and neither a clean stop nor a crash after it loses
/// a change made before, during or after the failure.
fn a_failed_journal_comes_back_once_its_storage_works(fault: Fault, stop: Stop) {
    let setup = setup(&format!("recovered-{fault:?}-{stop:?}"));
    setup.faults.arm(fault);
    write(&setup.backend, 5, 5).expect_err("a first touch with a failing journal");
    assert!(setup.tracker.journal_failure().is_some());
    setup.faults.disarm();
    testkit::wait_until(
        "a first touch to be taken again",
        std::time::Duration::from_secs(20),
        || write(&setup.backend, 6, 6).is_ok(),
    );
    assert!(
        setup.tracker.journal_failure().is_none(),
        "the failure ends with the rewrite"
    );
    assert_no_under_report(&setup.tracker, &setup.image, &setup.base, &[2, 5, 6]);
    assert!(
        reported_regions(&setup.tracker, "base").contains(&6),
        "the write after the rewrite is tracked"
    );
    setup
        .tracker
        .checkpoint("after")
        .expect("checkpoints work again");
    write(&setup.backend, 7, 7).unwrap();
    assert_eq!(
        reported_regions(&setup.tracker, "after"),
        [7].into_iter().collect()
    );
    let (_dir, image, base, tracker, backend) = restart(setup, stop);
    assert_eq!(tracker.clean_start(), stop == Stop::Clean);
    assert_eq!(
        reported_regions(&tracker, "after"),
        [7].into_iter().collect()
    );
    assert_no_under_report(&tracker, &image, &base, &[2, 5, 6, 7]);
    write(&backend, 8, 8).unwrap();
    tracker.close().unwrap();
}

#[test]
fn a_failed_journal_append_comes_back_without_a_restart() {
    a_failed_journal_comes_back_once_its_storage_works(Fault::Write, Stop::Clean);
    a_failed_journal_comes_back_once_its_storage_works(Fault::Write, Stop::Crash);
}

#[test]
fn a_failed_journal_sync_comes_back_without_a_restart() {
    a_failed_journal_comes_back_once_its_storage_works(Fault::Sync, Stop::Clean);
    a_failed_journal_comes_back_once_its_storage_works(Fault::Sync, Stop::Crash);
}

/// Regression: a checkpoint taken after the journal failed committed its
/// catalog entry, then failed to swap the journal; writes to marked
/// regions went on, and after a restart the checkpoint was back, with
/// those writes missing from its changes.
#[test]
fn a_checkpoint_refused_after_a_journal_failure_leaves_no_checkpoint_behind() {
    for stop in [Stop::Clean, Stop::Crash] {
        let setup = setup(&format!("checkpoint-after-failure-{stop:?}"));
        setup.faults.arm(Fault::Sync);
        assert!(write(&setup.backend, 5, 5).is_err());
        // Still failing: the refused first touch starts a rewrite of the
        // journal on a thread of its own, which would otherwise race the
        // checkpoint (and, if it won, let it through rightly).
        match setup.tracker.checkpoint("after") {
            Err(CheckpointError::Journal { source, .. }) => assert!(
                source.to_string().contains("failed earlier"),
                "refused because the journal failed, before anything is written: {source}"
            ),
            other => panic!("{other:?}"),
        }
        setup.faults.disarm();
        write(&setup.backend, 2, 22).unwrap();
        let (_dir, image, base, tracker, _backend) = restart(setup, stop);
        assert!(tracker.checkpoints().iter().all(|c| c.name != "after"));
        assert_no_under_report(&tracker, &image, &base, &[2, 5]);
        assert!(reported_regions(&tracker, "base").contains(&2));
        tracker.close().unwrap();
    }
}

/// Regression: a checkpoint whose new journal could not be written (ENOSPC
/// or EIO on `journal.new`) had already committed its catalog entry; the
/// disk went on with the old journal, which a restart then threw away as
/// older than the catalog, losing every write after the checkpoint.
#[test]
fn a_checkpoint_whose_new_journal_fails_changes_nothing_and_tracking_goes_on() {
    for (fault, stop) in [
        (Fault::Write, Stop::Clean),
        (Fault::Sync, Stop::Clean),
        (Fault::Write, Stop::Crash),
        (Fault::Sync, Stop::Crash),
    ] {
        let setup = setup(&format!("new-journal-{fault:?}-{stop:?}"));
        // Only the checkpoint's new journal fails, not the current one.
        let next = setup.faults.files_wrapped.load(Ordering::SeqCst);
        setup.faults.from_file.store(next, Ordering::SeqCst);
        setup.faults.arm(fault);
        let refused = setup
            .tracker
            .checkpoint("after")
            .expect_err("a checkpoint whose new journal fails");
        assert!(refused.to_string().contains("journal"), "{refused}");
        assert!(
            setup.tracker.journal_failure().is_none(),
            "{fault:?}: the current journal is fine"
        );
        write(&setup.backend, 2, 22).unwrap();
        write(&setup.backend, 5, 5).expect("a first touch: the current journal works");
        setup.backend.flush().unwrap();
        assert_no_under_report(&setup.tracker, &setup.image, &setup.base, &[2, 5]);
        setup.faults.disarm();
        let (_dir, image, base, tracker, backend) = restart(setup, stop);
        assert!(
            tracker.checkpoints().iter().all(|c| c.name != "after"),
            "{fault:?}: the failed checkpoint does not come back"
        );
        assert_no_under_report(&tracker, &image, &base, &[2, 5]);
        assert!(reported_regions(&tracker, "base").contains(&5));
        tracker.checkpoint("after").unwrap();
        write(&backend, 6, 6).unwrap();
        assert_eq!(
            reported_regions(&tracker, "after"),
            [6].into_iter().collect()
        );
        tracker.close().unwrap();
    }
}

/// A compaction whose new journal cannot be written leaves the old one in
/// place and the tracker as it was.
#[test]
fn a_compaction_whose_new_journal_fails_keeps_the_old_one() {
    let setup = setup("compaction");
    let next = setup.faults.files_wrapped.load(Ordering::SeqCst);
    setup.faults.from_file.store(next, Ordering::SeqCst);
    setup.faults.arm(Fault::Sync);
    assert!(setup.tracker.compact_journal().is_err());
    assert!(setup.tracker.journal_failure().is_none());
    assert!(
        !setup.dir.join("state/journal.new").exists(),
        "the failed compaction's file is removed"
    );
    write(&setup.backend, 5, 5).unwrap();
    setup.faults.disarm();
    let (_dir, image, base, tracker, _backend) = restart(setup, Stop::Clean);
    assert_no_under_report(&tracker, &image, &base, &[2, 5]);
    assert!(reported_regions(&tracker, "base").is_superset(&[2, 5].into_iter().collect()));
    tracker.close().unwrap();
}

/// The checkpoint's catalog commit succeeded, but its new journal cannot
/// be renamed over `journal` (here a directory stands in its place; in
/// life, EIO on the rename or the directory sync). The checkpoint stands,
/// the journal counts as failed, and since the new generation has no
/// marks every write is refused: none can be recorded only in the old
/// journal, which the next open throws away as older than the catalog.
#[test]
fn a_checkpoint_whose_journal_cannot_be_renamed_into_place_refuses_every_write_after_it() {
    let setup = setup("rename");
    let state = setup.dir.join("state");
    let journal = state.join("journal");
    let kept = std::fs::read(&journal).unwrap();
    std::fs::remove_file(&journal).unwrap();
    std::fs::create_dir_all(journal.join("in-the-way")).unwrap();

    let checkpoint = setup.tracker.checkpoint("after").unwrap();
    assert_eq!(checkpoint.name, "after", "the checkpoint stands");
    let failure = setup.tracker.journal_failure().expect("a failed journal");
    assert!(
        failure.contains("checkpoint \"after\" was taken")
            && failure.contains("could not be put in place"),
        "{failure}"
    );
    for region in [2, 5] {
        assert!(
            write(&setup.backend, region, 30 + region).is_err(),
            "region {region}: every write after the checkpoint is refused"
        );
    }
    setup.backend.flush().unwrap();
    assert!(setup.tracker.checkpoint("later").is_err());

    // What the directory would hold after such a failure: the old journal
    // in place, the new one beside it.
    std::fs::remove_dir_all(&journal).unwrap();
    std::fs::write(&journal, kept).unwrap();
    let (_dir, image, base, tracker, backend) = restart(setup, Stop::Crash);
    let names: Vec<String> = tracker
        .checkpoints()
        .iter()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(names, ["base", "after"]);
    assert_eq!(reported_regions(&tracker, "after"), BTreeSet::new());
    assert_eq!(differing_regions(&image, &base), [2].into_iter().collect());
    assert_eq!(
        reported_regions(&tracker, "base"),
        [2].into_iter().collect()
    );
    write(&backend, 6, 6).unwrap();
    assert_eq!(
        reported_regions(&tracker, "after"),
        [6].into_iter().collect()
    );
    tracker.close().unwrap();
}
