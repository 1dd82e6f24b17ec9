//! Power loss at every step of a copy, for the copier's own records: a
//! replica's record and progress record, a tape's sessions and trailer,
//! and the target's checkpoint and pins in the source's catalog (the
//! model of tracker/tests/crash_consistency.rs and redb's).
//!
//! Every file step and catalog transaction of a copy goes through
//! `copier::durability`, whose hook this test installs: it counts the
//! steps, refuses every one from step k on (the power is gone: nothing
//! more reaches storage, catalog transactions included), and keeps a
//! model of what is durable: a file's bytes as of its last sync, its
//! mtime as of its last fsync (fdatasync need not keep it), the
//! directory's names as of its last sync. The copy is cut after each k
//! in turn, the last k being past its end (a copy that returned Ok), and
//! each cut is laid on disk three ways:
//!
//! - lost: the durable names, each with its durable bytes and mtime;
//! - torn: the same names, each file's unsynced sectors half written
//!   (every other differing 512-byte sector, the size the live one);
//! - names ahead: the names as the copier last left them (a journaled
//!   file system commits renames and new names early) with durable bytes.
//!
//! Each must hold the new checkpoint completely (then the target reads
//! as the disk at it) or still the old one (for a tape: restores to the
//! disk as it was; for a replica, an interrupted copy's progress record
//! may have written past it), never a damaged record; the checkpoint it
//! claims must still be in the catalog; a copy that returned Ok must have
//! left the new one; and a rerun must then finish with the target equal
//! to the disk, its record and the target's pin on the rerun's
//! checkpoint and nothing else of the copy's pinned.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use backend::{BlockBackend, FileBackend};
use copier::durability::{DurabilityHook, Step, set_hook};
use copier::target::TargetSpec;
use copier::{CopyOptions, Summary, copy_offline};
use testkit::{TempDir, Xorshift, create_sparse_file, random_bytes, run_program};
use tracker::{TrackedBackend, Tracker, TrackerOptions};

const DISK_BYTES: u64 = 4 << 20;
const SECTOR_BYTES: usize = 512;
/// Tape blocks small enough that a session of a 4 MiB disk is many.
const TAPE_BLOCK_BYTES: u32 = 64 << 10;

/// The durable state the hook keeps of the target's directory.
#[derive(Debug, Default)]
struct Files {
    /// Name -> inode, as the copier left the directory, and as of its
    /// last sync.
    live: BTreeMap<PathBuf, u64>,
    durable: BTreeMap<PathBuf, u64>,
    /// Per inode: bytes as of its last sync, mtime as of its last fsync.
    bytes: HashMap<u64, Vec<u8>>,
    mtime: HashMap<u64, (i64, i64)>,
    next_inode: u64,
}

fn mtime_of(path: &Path) -> (i64, i64) {
    let metadata = std::fs::metadata(path).unwrap();
    (metadata.mtime(), metadata.mtime_nsec())
}

impl Files {
    /// Everything in `dir` as durable (the last copy finished and synced).
    fn of(dir: &Path) -> Files {
        let mut files = Files::default();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let inode = files.new_inode(&path);
            files.bytes.insert(inode, std::fs::read(&path).unwrap());
            files.durable.insert(path, inode);
        }
        files
    }

    fn new_inode(&mut self, path: &Path) -> u64 {
        let inode = self.next_inode;
        self.next_inode += 1;
        self.live.insert(path.to_path_buf(), inode);
        self.bytes.insert(inode, Vec::new());
        self.mtime.insert(inode, mtime_of(path));
        inode
    }

    fn done(&mut self, step: &Step<'_>) {
        match *step {
            Step::Create(path) => {
                if !self.live.contains_key(path) {
                    self.new_inode(path);
                }
            }
            Step::Write(_) | Step::Catalog(_) => {}
            Step::Sync { path, all } => {
                let inode = self.live[path];
                self.bytes.insert(inode, std::fs::read(path).unwrap());
                if all {
                    self.mtime.insert(inode, mtime_of(path));
                }
            }
            Step::Rename { from, to } => {
                let inode = self.live.remove(from).expect("renamed a known file");
                self.live.insert(to.to_path_buf(), inode);
            }
            Step::Remove(path) => {
                self.live.remove(path);
            }
            Step::SyncDirectory(_) => self.durable = self.live.clone(),
        }
    }
}

/// Counts steps and refuses every one from `cut_at` on.
struct PowerCut {
    dir: PathBuf,
    steps: AtomicU64,
    cut_at: u64,
    files: Mutex<Files>,
    trace: Mutex<Vec<String>>,
}

impl DurabilityHook for PowerCut {
    fn before(&self, step: &Step<'_>) -> io::Result<()> {
        let path = match *step {
            Step::Create(path) | Step::Write(path) | Step::Remove(path) => Some(path),
            Step::Sync { path, .. } | Step::Rename { to: path, .. } => Some(path),
            Step::SyncDirectory(path) => Some(path),
            Step::Catalog(_) => None,
        };
        if let Some(path) = path {
            assert!(
                path.starts_with(&self.dir),
                "a step outside the target's directory, which the model does not keep: {step:?}"
            );
        }
        let number = self.steps.fetch_add(1, Ordering::SeqCst);
        if number >= self.cut_at {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.trace
            .lock()
            .unwrap()
            .push(format!("{number}: {step:?}"));
        Ok(())
    }

    fn after(&self, step: &Step<'_>) {
        self.files.lock().unwrap().done(step);
    }
}

/// How a cut is laid on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Lost,
    Torn,
    NamesAhead,
}

/// The files of the target's directory after a cut, laid out as `layout`
/// says: name -> (bytes, mtime).
fn after_the_cut(
    files: &Files,
    live_bytes: &HashMap<u64, Vec<u8>>,
    layout: Layout,
) -> BTreeMap<PathBuf, (Vec<u8>, (i64, i64))> {
    let names = match layout {
        Layout::NamesAhead => &files.live,
        Layout::Lost | Layout::Torn => &files.durable,
    };
    names
        .iter()
        .map(|(name, inode)| {
            let durable = &files.bytes[inode];
            let bytes = match (layout, live_bytes.get(inode)) {
                (Layout::Torn, Some(live)) => torn(durable, live),
                _ => durable.clone(),
            };
            (name.clone(), (bytes, files.mtime[inode]))
        })
        .collect()
}

/// `durable` with every other 512-byte sector that differs in `live`
/// taken from `live`, at `live`'s size.
fn torn(durable: &[u8], live: &[u8]) -> Vec<u8> {
    let mut bytes = durable.to_vec();
    bytes.resize(live.len(), 0);
    let mut take = true;
    for start in (0..live.len()).step_by(SECTOR_BYTES) {
        let end = (start + SECTOR_BYTES).min(live.len());
        if durable.get(start..end) != Some(&live[start..end]) {
            if take {
                bytes[start..end].copy_from_slice(&live[start..end]);
            }
            take = !take;
        }
    }
    bytes
}

fn set_mtime(path: &Path, (seconds, nanoseconds): (i64, i64)) {
    let time = libc::timespec {
        tv_sec: seconds,
        tv_nsec: nanoseconds,
    };
    let times = [time, time];
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path and two timespecs that outlive the call.
    let result = unsafe { libc::utimensat(libc::AT_FDCWD, name.as_ptr(), times.as_ptr(), 0) };
    assert_eq!(result, 0, "utimensat {}", path.display());
}

/// Replaces what is in `dir` with `files`.
fn lay_out(dir: &Path, files: &BTreeMap<PathBuf, (Vec<u8>, (i64, i64))>) {
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::create_dir(dir).unwrap();
    for (name, (bytes, mtime)) in files {
        std::fs::write(name, bytes).unwrap();
        set_mtime(name, *mtime);
    }
}

/// A copy of `dir`'s tree at `to` (times kept: a replica's record checks
/// its file's mtime).
fn copy_tree(dir: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    run_program("cp", ["-a".as_ref(), dir.as_os_str(), to.as_os_str()]);
}

/// What a copy goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Replica,
    Tape,
}

/// A tracked 4 MiB disk and a target in its own directory.
struct Fixture {
    dir: TempDir,
    kind: Kind,
    image: PathBuf,
}

impl Fixture {
    fn new(label: &str, kind: Kind) -> Fixture {
        let dir = TempDir::new(label);
        let image = dir.join("disk.img");
        create_sparse_file(&image, DISK_BYTES);
        std::fs::create_dir(dir.join("target")).unwrap();
        Fixture { dir, kind, image }
    }

    fn state(&self) -> PathBuf {
        self.dir.join("disk.img.blockwatch")
    }

    fn target_dir(&self) -> PathBuf {
        self.dir.join("target")
    }

    fn target_file(&self) -> PathBuf {
        match self.kind {
            Kind::Replica => self.target_dir().join("replica.img"),
            Kind::Tape => self.target_dir().join("disk.tape"),
        }
    }

    fn options(&self) -> CopyOptions {
        let target = match self.kind {
            Kind::Replica => TargetSpec::File(self.target_file()),
            Kind::Tape => TargetSpec::Tape {
                path: self.target_file(),
                block_size_bytes: TAPE_BLOCK_BYTES,
                compress: false,
            },
        };
        CopyOptions {
            image: self.image.clone(),
            state_dir: None,
            target,
            full: false,
            // One worker: the steps come in the same order on every run.
            workers: 1,
            progress: Arc::new(copier::copy::Quiet),
        }
    }

    fn tracker_options(&self) -> TrackerOptions {
        TrackerOptions {
            image: self.image.clone(),
            state_dir: None,
            granularity_bytes: None,
            precision_bytes: None,
            journal_wrapper: None,
            files: false,
        }
    }

    /// Writes through the tracker, as a served disk is written: `count`
    /// writes of up to 256 KiB, flushed.
    fn write(&self, seed: u64, count: usize) {
        let tracker = Arc::new(Tracker::open(&self.tracker_options(), DISK_BYTES).unwrap());
        tracker.start();
        let file = FileBackend::open(&self.image, false).unwrap();
        let backend = TrackedBackend::new(Arc::new(file), Arc::clone(&tracker));
        let mut random = Xorshift::new(seed);
        for _ in 0..count {
            let length = 1 + random.below(256 << 10);
            let offset = random.below(DISK_BYTES - length);
            let bytes = random_bytes(random.next(), length as usize);
            backend.write_at(&bytes, offset, false).unwrap();
        }
        backend.flush().unwrap();
        drop(backend);
        tracker.close().unwrap();
    }

    fn copy(&self) -> Summary {
        copy_offline(&self.options())
            .unwrap_or_else(|error| panic!("copy: {}", tracker::tracker::error_chain(&error)))
    }
}

/// What the target says it holds: its checkpoint's name, None when it
/// holds nothing of the disk yet. Panics on a damaged record.
fn held(fixture: &Fixture, context: &str) -> Option<String> {
    match fixture.kind {
        Kind::Replica => copier::replica::read_record(&fixture.target_file())
            .unwrap_or_else(|error| panic!("{context}: the replica's record: {error}"))
            .map(|record| record.checkpoint),
        Kind::Tape => copier::tape::last_session(&fixture.target_file())
            .unwrap_or_else(|error| panic!("{context}: the tape: {error}"))
            .map(|session| session.target.checkpoint),
    }
}

/// The disk as the target holds it at `until` (a tape's chain restored
/// up to that checkpoint: a restore refuses an unfinished session at the
/// end, which the next append cuts off; None: the whole chain).
fn held_bytes(fixture: &Fixture, until: Option<&str>) -> Vec<u8> {
    match fixture.kind {
        Kind::Replica => std::fs::read(fixture.target_file()).unwrap(),
        Kind::Tape => {
            let restored = fixture.dir.join("restored.img");
            let _ = std::fs::remove_file(&restored);
            copier::tape::restore(
                &[fixture.target_file()],
                &copier::tape::RestoreTarget::File(restored.clone()),
                until,
            )
            .unwrap();
            std::fs::read(restored).unwrap()
        }
    }
}

/// (checkpoint names, (checkpoint, holder) of every pin) in the catalog.
fn catalog(fixture: &Fixture) -> (BTreeSet<String>, Vec<(String, String)>) {
    let tracker = Tracker::open_read_only(&fixture.tracker_options(), DISK_BYTES).unwrap();
    let checkpoints = tracker.checkpoints();
    let names = checkpoints.iter().map(|c| c.name.clone()).collect();
    let pins = tracker
        .pins()
        .unwrap()
        .into_iter()
        .map(|pin| {
            let name = checkpoints
                .iter()
                .find(|c| c.generation == pin.generation)
                .map_or_else(
                    || format!("generation {}", pin.generation),
                    |c| c.name.clone(),
                );
            (name, pin.holder)
        })
        .collect();
    (names, pins)
}

/// One copy cut at every step: the disk, what the target held before it
/// (None: it is the first), and that state kept aside to start each cut
/// from.
struct Scenario {
    fixture: Fixture,
    old: Option<String>,
    /// The disk as of `old`, and as of the copy being cut (the image,
    /// which no write touches after).
    old_bytes: Option<Vec<u8>>,
    new_bytes: Vec<u8>,
}

impl Scenario {
    fn new(label: &str, kind: Kind, first: bool) -> Scenario {
        let fixture = Fixture::new(label, kind);
        fixture.write(1, 8);
        let (old, old_bytes) = if first {
            (None, None)
        } else {
            let summary = fixture.copy();
            let bytes = std::fs::read(&fixture.image).unwrap();
            fixture.write(2, 8);
            (Some(summary.checkpoint), Some(bytes))
        };
        copy_tree(&fixture.state(), &fixture.dir.join("pristine-state"));
        copy_tree(&fixture.target_dir(), &fixture.dir.join("pristine-target"));
        let new_bytes = std::fs::read(&fixture.image).unwrap();
        Scenario {
            fixture,
            old,
            old_bytes,
            new_bytes,
        }
    }

    /// Runs the copy with the power cut before step `cut_at` (u64::MAX:
    /// never) from the kept state; the hook and the copy's result.
    fn run(&self, cut_at: u64) -> (Arc<PowerCut>, Option<Summary>) {
        let fixture = &self.fixture;
        copy_tree(&fixture.dir.join("pristine-state"), &fixture.state());
        copy_tree(&fixture.dir.join("pristine-target"), &fixture.target_dir());
        let hook = Arc::new(PowerCut {
            dir: fixture.target_dir(),
            steps: AtomicU64::new(0),
            cut_at,
            files: Mutex::new(Files::of(&fixture.target_dir())),
            trace: Mutex::new(Vec::new()),
        });
        set_hook(Some(Arc::clone(&hook) as Arc<dyn DurabilityHook>));
        let result = copy_offline(&fixture.options());
        set_hook(None);
        (hook, result.ok())
    }

    /// Cuts after every step in turn; returns the number of steps.
    fn every_cut(&self) -> u64 {
        let (hook, summary) = self.run(u64::MAX);
        assert!(summary.is_some(), "the copy fails without a cut");
        let total = hook.steps.load(Ordering::SeqCst);
        let mut layouts = 0;
        for cut_at in 0..=total {
            let (hook, summary) = self.run(cut_at);
            assert_eq!(
                summary.is_some(),
                cut_at == total,
                "a copy cut before step {cut_at} of {total} must fail, and only then"
            );
            layouts += self.check_layouts(&hook, summary.as_ref(), cut_at, total);
        }
        eprintln!(
            "{:?} copy: cut before each of its {total} steps and after the last, {layouts} layouts checked",
            self.fixture.kind
        );
        total
    }

    /// Cuts once, before the first step whose description contains
    /// `pattern` (None: after the last step, a copy that returned Ok).
    fn cut_before(&self, pattern: Option<&str>) {
        let (hook, _) = self.run(u64::MAX);
        let total = hook.steps.load(Ordering::SeqCst);
        let trace = hook.trace.lock().unwrap().clone();
        let cut_at = match pattern {
            None => total,
            Some(pattern) => trace
                .iter()
                .position(|step| step.contains(pattern))
                .unwrap_or_else(|| panic!("no step {pattern:?} in {trace:#?}"))
                as u64,
        };
        let (hook, summary) = self.run(cut_at);
        self.check_layouts(&hook, summary.as_ref(), cut_at, total);
    }

    /// Checks each distinct layout of one cut; how many there were.
    fn check_layouts(
        &self,
        hook: &PowerCut,
        summary: Option<&Summary>,
        cut_at: u64,
        total: u64,
    ) -> usize {
        let fixture = &self.fixture;
        let files = hook.files.lock().unwrap();
        let live_bytes: HashMap<u64, Vec<u8>> = files
            .live
            .iter()
            .map(|(name, inode)| (*inode, std::fs::read(name).unwrap()))
            .collect();
        let state_after = fixture.dir.join("state-after-cut");
        copy_tree(&fixture.state(), &state_after);
        let trace = hook.trace.lock().unwrap().join("\n  ");
        let mut laid_out = Vec::new();
        for layout in [Layout::Lost, Layout::Torn, Layout::NamesAhead] {
            let files = after_the_cut(&files, &live_bytes, layout);
            if laid_out.contains(&files) {
                continue;
            }
            copy_tree(&state_after, &fixture.state());
            lay_out(&fixture.target_dir(), &files);
            laid_out.push(files);
            let context = format!(
                "{:?} copy cut before step {cut_at} of {total}, laid out {layout:?}; the steps done:\n  {trace}\n",
                fixture.kind
            );
            self.check_cut(summary, &context);
        }
        laid_out.len()
    }

    /// The target holds the old checkpoint or the new one whole, the
    /// catalog still has it, and a rerun finishes.
    fn check_cut(&self, summary: Option<&Summary>, context: &str) {
        let fixture = &self.fixture;
        let claims = held(fixture, context);
        if let Some(summary) = summary {
            assert_eq!(
                claims.as_deref(),
                Some(summary.checkpoint.as_str()),
                "{context}: the copy returned Ok, so its checkpoint must survive"
            );
        }
        if claims.is_some() && claims != self.old {
            assert!(
                held_bytes(fixture, claims.as_deref()) == self.new_bytes,
                "{context}: the target claims the new checkpoint {claims:?} but does not hold it"
            );
        } else if claims.is_none() {
            assert_eq!(self.old, None, "{context}: the target lost its checkpoint");
        } else if fixture.kind == Kind::Tape {
            assert!(
                Some(held_bytes(fixture, claims.as_deref())) == self.old_bytes,
                "{context}: the tape claims the old checkpoint but does not restore to it"
            );
        }
        let (names, _) = catalog(fixture);
        if let Some(claimed) = &claims {
            assert!(
                names.contains(claimed),
                "{context}: the target claims {claimed}, which the catalog no longer has: {names:?}"
            );
        }
        let rerun = copy_offline(&fixture.options()).unwrap_or_else(|error| {
            panic!(
                "{context}: the rerun failed: {}",
                tracker::tracker::error_chain(&error)
            )
        });
        if claims.is_some() {
            assert_eq!(rerun.kind, "incremental", "{context}: {rerun:?}");
        }
        assert!(
            held_bytes(fixture, None) == self.new_bytes,
            "{context}: after the rerun the target differs from the disk"
        );
        assert_eq!(
            held(fixture, context).as_deref(),
            Some(rerun.checkpoint.as_str()),
            "{context}: after the rerun"
        );
        let (_, pins) = catalog(fixture);
        assert!(
            pins.len() == 1 && pins[0].0 == rerun.checkpoint && !pins[0].1.ends_with("-partial"),
            "{context}: only the target's pin on {} may stay: {pins:?}",
            rerun.checkpoint
        );
    }
}

/// The hook is the process's: one scenario at a time.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn a_first_copy_to_a_replica_survives_power_loss_at_every_step() {
    let _serial = one_at_a_time();
    let total = Scenario::new("power-replica-first", Kind::Replica, true).every_cut();
    assert!(total > 10, "the copy took only {total} steps");
}

#[test]
fn an_incremental_copy_to_a_replica_survives_power_loss_at_every_step() {
    let _serial = one_at_a_time();
    let total = Scenario::new("power-replica-incremental", Kind::Replica, false).every_cut();
    assert!(total > 10, "the copy took only {total} steps");
}

#[test]
fn a_first_copy_to_a_tape_survives_power_loss_at_every_step() {
    let _serial = one_at_a_time();
    let total = Scenario::new("power-tape-first", Kind::Tape, true).every_cut();
    assert!(total > 10, "the copy took only {total} steps");
}

#[test]
fn an_incremental_copy_to_a_tape_survives_power_loss_at_every_step() {
    let _serial = one_at_a_time();
    let total = Scenario::new("power-tape-incremental", Kind::Tape, false).every_cut();
    assert!(total > 10, "the copy took only {total} steps");
}

/// A first copy creates and sizes the replica before its progress record
/// is durable; cut there, the file has no record, and the rerun refused
/// it as a file that "may hold someone's data" though it held nothing.
#[test]
fn a_first_copy_cut_before_its_progress_record_is_durable_is_not_refused_as_a_stranger() {
    let _serial = one_at_a_time();
    Scenario::new("power-replica-unrecorded", Kind::Replica, true)
        .cut_before(Some(".blockwatch-replica.partial\")"));
}

/// The record names the replica's mtime, but the commit only
/// fdatasync'ed the replica, which need not make an mtime durable: after
/// a power loss the record disagreed with the file and every later copy
/// was refused as "changed since the copy".
#[test]
fn a_committed_replica_keeps_the_mtime_its_record_names_through_power_loss() {
    let _serial = one_at_a_time();
    Scenario::new("power-replica-mtime", Kind::Replica, false).cut_before(None);
}

/// A new tape file's name was never synced into its directory, so a
/// power loss after a copy that returned Ok could take the whole tape.
#[test]
fn a_new_tape_file_survives_power_loss_after_its_first_session() {
    let _serial = one_at_a_time();
    Scenario::new("power-tape-name", Kind::Tape, true).cut_before(None);
}

/// Unsynced blocks of a session may be torn anywhere, not only the last
/// one; an append then took the torn block before the last for damage
/// in the middle and refused to write.
#[test]
fn a_tape_whose_unfinished_session_tore_in_several_blocks_is_appended_to() {
    let _serial = one_at_a_time();
    Scenario::new("power-tape-torn", Kind::Tape, false).cut_before(Some("all: false"));
}

/// A power cut may tear the progress record's overwrite in place; the
/// replica, written after its record by that copy, was then refused as
/// "changed since the copy" although only our copy had written it (the
/// docs said the copy would start over).
#[test]
fn a_progress_record_torn_by_a_power_cut_makes_the_rerun_copy_everything() {
    let _serial = one_at_a_time();
    let scenario = Scenario::new("power-replica-torn-progress", Kind::Replica, false);
    let fixture = &scenario.fixture;
    let (hook, _) = scenario.run(u64::MAX);
    let trace = hook.trace.lock().unwrap().clone();
    // Cut at the commit's fsync: the pieces are written, the record old.
    let cut_at = trace
        .iter()
        .position(|step| step.contains("replica.img\", all: true"))
        .unwrap_or_else(|| panic!("no fsync of the replica in {trace:#?}"));
    let (_, summary) = scenario.run(cut_at as u64);
    assert!(summary.is_none());
    let partial = fixture
        .target_dir()
        .join("replica.img.blockwatch-replica.partial");
    let mut bytes = std::fs::read(&partial).unwrap();
    bytes[..SECTOR_BYTES].fill(b'#');
    std::fs::write(&partial, &bytes).unwrap();
    let rerun = fixture.copy();
    assert_eq!(rerun.kind, "full", "{rerun:?}");
    assert!(held_bytes(fixture, None) == scenario.new_bytes);
    assert_eq!(held(fixture, "rerun"), Some(rerun.checkpoint));
}
