//! The `Tracker`: its state, the write path (gate, marks, written and
//! saved regions), FLUSH, the journal thread's start and stop, and journal
//! compaction. Opening and recovery are in `open.rs`, checkpoints in
//! `checkpoints.rs`, queries in `query.rs`; `layer.rs` puts the tracker in
//! front of a backend.
//!
//! State lives in `IMAGE.blockwatch/` (or `--state DIR`): `lock` (flock),
//! `catalog.redb`, `journal`, `checkpoints.index`, `maps/`, `control.sock`.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use roaring::RoaringBitmap;

use crate::alive::Heartbeat;
use crate::catalog::{Catalog, Checkpoint, CleanShutdown};
use crate::commit::{Annotator, Committer};
use crate::files::FileMap;
use crate::fine::FineRecord;
use crate::gate::Gate;
use crate::hooks::GenerationHook;
use crate::journal::{self, FileHeader, JournalFile, JournalWriter, Record};
use crate::open::{create_journal, mtime_ns, sync_dir};
use crate::recovery::Distrust;
use crate::regions::{AtomicBitmap, Granularity, RegionRun, runs_from_sorted};

// Kept reachable under `tracker::tracker::` for the callers that name them there.
pub use crate::error::{CHECKPOINT_NAME_MAX, CloseError, CompactError, error_chain};
pub use crate::gate::GateGuard;
pub use crate::open::{default_state_dir, state_is_locked};
pub use crate::query::{ChangedExtent, FlushStats};

pub const CONTEXT_PREFIX: &str = "qemu:dirty-bitmap:";
/// The same bitmaps at the fine record's precision where it is exact
/// (whole regions elsewhere), for clients that want the written blocks.
pub const EXACT_CONTEXT_PREFIX: &str = "blockwatch:exact-dirty-bitmap:";
/// Flush samples kept for the histogram.
const FLUSH_SAMPLES_MAX: usize = 65536;
/// A journal past this size is rewritten as a snapshot of the current
/// generation (saved records accumulate at every flush between checkpoints).
pub const JOURNAL_COMPACT_BYTES: u64 = 64 << 20;

/// How often a failed journal's rewrite is tried, at the first touches
/// and flushes that come along (`Tracker::recover_journal`).
pub const JOURNAL_RECOVERY_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct TrackerOptions {
    pub image: PathBuf,
    pub state_dir: Option<PathBuf>,
    /// None: what the state already uses, or the default for new state.
    pub granularity_bytes: Option<u64>,
    /// Block size of the fine record (`fine.rs`); None: what the state
    /// already uses, or 4 KiB for new state.
    pub precision_bytes: Option<u64>,
    /// Wraps each journal file the tracker writes (crash tests model power
    /// loss with it); None in production.
    pub journal_wrapper: Option<JournalWrapper>,
    /// Keep a file map (ext2/3/4) beside the tracker: per-file changes,
    /// maps saved at checkpoints, flushes attributed to files.
    pub files: bool,
}

/// Turns the opened journal file into what the writer writes to.
#[derive(Clone)]
pub struct JournalWrapper(pub Arc<dyn Fn(File) -> Box<dyn JournalFile> + Send + Sync>);

impl std::fmt::Debug for JournalWrapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JournalWrapper")
    }
}

impl JournalWrapper {
    pub(crate) fn wrap(wrapper: Option<&JournalWrapper>, file: File) -> Box<dyn JournalFile> {
        match wrapper {
            Some(wrapper) => (wrapper.0)(file),
            None => Box::new(file),
        }
    }
}

#[derive(Debug)]
pub struct Tracker {
    pub(crate) state_dir: PathBuf,
    pub(crate) image_path: PathBuf,
    pub(crate) image_id: [u8; 16],
    pub(crate) size_bytes: u64,
    pub(crate) granularity: Granularity,
    pub(crate) catalog: Catalog,
    pub(crate) _lock: File,
    /// Opened by `open_read_only`: nothing in the state directory changes.
    pub(crate) read_only: bool,
    /// Regions durably marked in the current generation.
    pub(crate) marked: Arc<AtomicBitmap>,
    /// Regions written since the last flush.
    pub(crate) written: AtomicBitmap,
    /// Regions of the current generation whose writes a flush made durable.
    pub(crate) saved: AtomicBitmap,
    /// The blocks written in the current generation, below the granularity.
    pub(crate) fine: FineRecord,
    pub(crate) gate: Gate,
    /// Started by `start` (after the server forks: a thread does not survive fork).
    pub(crate) committer: OnceLock<Committer>,
    pub(crate) journal_before_start: Mutex<Option<JournalWriter>>,
    /// The journal's size when opened read-only (no writer then).
    pub(crate) journal_bytes_at_open: u64,
    pub(crate) generation: AtomicU64,
    pub(crate) flush_epoch: AtomicU64,
    /// Serializes operations that close the gate or change checkpoints.
    pub(crate) operations: Mutex<()>,
    pub(crate) checkpoints: Mutex<Vec<Checkpoint>>,
    /// Union of closed generations after each checkpoint, for BLOCK_STATUS.
    pub(crate) closed_unions: Mutex<HashMap<String, Arc<ClosedUnion>>>,
    pub(crate) flush_samples: Mutex<FlushSamples>,
    pub(crate) journal_wrapper: Option<JournalWrapper>,
    /// What recovery found that users should know, in the order found.
    pub(crate) warnings: Vec<String>,
    /// Why recovery distrusted the state (empty: it trusted it).
    pub(crate) distrust: Vec<Distrust>,
    pub(crate) clean_start: bool,
    pub(crate) files: Option<Arc<FileMap>>,
    /// Registered before `start`; frozen by it.
    pub(crate) hooks_before_start: Mutex<Vec<Arc<dyn GenerationHook>>>,
    pub(crate) hooks: OnceLock<Vec<Arc<dyn GenerationHook>>>,
    pub(crate) heartbeat: Mutex<Option<Heartbeat>>,
    /// A journal compaction or recovery is queued or running.
    pub(crate) compacting: AtomicBool,
    /// When a failed journal's rewrite was last tried.
    pub(crate) recovery_tried: Mutex<Option<Instant>>,
}

/// What the generations closed after a checkpoint changed, together.
#[derive(Debug, Default)]
pub(crate) struct ClosedUnion {
    pub(crate) changed: RoaringBitmap,
    /// Changed regions that count whole.
    pub(crate) inexact: RoaringBitmap,
    pub(crate) fine: RoaringBitmap,
}

#[derive(Debug, Default)]
pub(crate) struct FlushSamples {
    samples_ns: Vec<u64>,
    next: usize,
    count: u64,
}

impl Tracker {
    /// Registers a hook for generation events (see `hooks.rs`). Call
    /// before `start`.
    pub fn add_hook(&self, hook: Arc<dyn GenerationHook>) {
        assert!(
            self.hooks.get().is_none(),
            "hooks are registered before Tracker::start"
        );
        self.hooks_before_start
            .lock()
            .expect("hooks lock")
            .push(hook);
    }

    pub(crate) fn hooks(&self) -> &[Arc<dyn GenerationHook>] {
        self.hooks.get().map_or(&[], Vec::as_slice)
    }

    /// Starts the journal thread. Call once, in the process that serves.
    pub fn start(&self) {
        assert!(!self.read_only, "a read-only tracker is never started");
        let writer = self
            .journal_before_start
            .lock()
            .expect("journal lock")
            .take()
            .expect("Tracker::start is called once");
        let hooks = std::mem::take(&mut *self.hooks_before_start.lock().expect("hooks lock"));
        let annotating: Vec<Arc<dyn GenerationHook>> = hooks.clone();
        let annotator: Annotator = Arc::new(move |runs: &[RegionRun]| {
            annotating.iter().find_map(|hook| hook.annotate_saved(runs))
        });
        let annotator = (!hooks.is_empty()).then_some(annotator);
        assert!(
            self.hooks.set(hooks).is_ok(),
            "Tracker::start is called once"
        );
        let committer = Committer::start(writer, Arc::clone(&self.marked), annotator);
        assert!(
            self.committer.set(committer).is_ok(),
            "Tracker::start is called once"
        );
        match Heartbeat::start(&self.state_dir) {
            Ok(heartbeat) => *self.heartbeat.lock().expect("heartbeat lock") = Some(heartbeat),
            // Without it a crash followed by an offline change goes
            // unnoticed; say so, keep serving.
            Err(error) => tracing::warn!(%error, "cannot start the heartbeat"),
        }
    }

    pub(crate) fn committer(&self) -> &Committer {
        self.committer.get().expect("Tracker::start was called")
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The identity of the tracked disk: random, fixed when the state was
    /// made, so a replica can tell its source from any other disk.
    pub fn image_id(&self) -> [u8; 16] {
        self.image_id
    }

    pub fn image_path(&self) -> &Path {
        &self.image_path
    }

    pub fn granularity(&self) -> Granularity {
        self.granularity
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// What recovery found, as sentences, in the order found.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Why recovery distrusted the state; empty when it trusted it.
    pub fn distrust(&self) -> &[Distrust] {
        &self.distrust
    }

    /// The last stop was clean and nothing since casts doubt on the state.
    pub fn clean_start(&self) -> bool {
        self.clean_start
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub fn files(&self) -> Option<&Arc<FileMap>> {
        self.files.as_ref()
    }

    /// Enters the gate for a mutating request (write, trim, zero, flush).
    pub fn enter(&self) -> GateGuard<'_> {
        self.gate.enter()
    }

    /// True when every region of the byte range is already marked.
    pub fn is_marked(&self, offset_bytes: u64, length_bytes: u64) -> bool {
        length_bytes == 0 || self.marked.all_set(self.run_of(offset_bytes, length_bytes))
    }

    /// The regions of a byte range the layer above checked against the size.
    fn run_of(&self, offset_bytes: u64, length_bytes: u64) -> RegionRun {
        debug_assert!(
            offset_bytes
                .checked_add(length_bytes)
                .is_some_and(|end| end <= self.size_bytes),
            "range {offset_bytes}+{length_bytes} past the image's {} bytes",
            self.size_bytes
        );
        let run = self.granularity.run_of(offset_bytes, length_bytes);
        debug_assert!(run.first_region + run.region_count <= self.marked.bit_count());
        run
    }

    /// Returns once every region of the range is durably marked. The
    /// caller issues its write next: the range's blocks count as written
    /// from here on, whether the write succeeds or not.
    ///
    /// A first touch (some region not yet marked) tells each hook
    /// (`before_first_touch`) before the mark is queued: the copier's
    /// snapshot copies the old contents out there. The hooks return before
    /// the mark and the mark's bit is set after the commit, so a request
    /// that takes the fast path below comes after the hooks returned for
    /// its regions. The fast path calls nothing.
    pub fn ensure_marked(&self, offset_bytes: u64, length_bytes: u64) -> io::Result<()> {
        if length_bytes == 0 {
            return Ok(());
        }
        let run = self.run_of(offset_bytes, length_bytes);
        self.fine.note(offset_bytes, length_bytes);
        if self.marked.all_set(run) {
            return Ok(());
        }
        for hook in self.hooks() {
            hook.before_first_touch(run);
        }
        self.committer().mark(run)?;
        debug_assert!(self.marked.all_set(run), "a committed mark sets its bits");
        Ok(())
    }

    /// After a write completed: its regions are written, not yet saved.
    pub fn note_written(&self, offset_bytes: u64, length_bytes: u64) {
        if length_bytes > 0 {
            self.written
                .set_run(self.run_of(offset_bytes, length_bytes));
        }
    }

    /// After a FUA write: its regions are saved, unless an earlier write to
    /// them still waits for a flush (then the region as a whole is not).
    pub fn note_written_durably(&self, offset_bytes: u64, length_bytes: u64) {
        if length_bytes == 0 {
            return;
        }
        let run = self.run_of(offset_bytes, length_bytes);
        let runs: Vec<RegionRun> = runs_from_sorted(
            (run.first_region..run.first_region + run.region_count)
                .filter(|&region| !self.written.get(region)),
        );
        if !runs.is_empty() {
            self.record_saved(runs);
        }
    }

    /// Marks regions saved and queues their (lazy) SAVED record. A journal
    /// that failed takes no record: the regions are saved all the same
    /// (the image's flush succeeded), and a SAVED record missing after a
    /// restart only shows them as written, the safe side. So neither a
    /// FLUSH nor a FUA write fails because of the journal.
    fn record_saved(&self, runs: Vec<RegionRun>) {
        for run in &runs {
            self.saved.set_run(*run);
        }
        let epoch = self.flush_epoch.fetch_add(1, Ordering::SeqCst) + 1;
        for hook in self.hooks() {
            hook.saved(&runs);
        }
        if let Err(error) = self.committer().enqueue_lazy(Record::Saved { epoch, runs }) {
            tracing::debug!(%error, "no SAVED record for this flush");
        }
    }

    /// Around a device flush: takes the regions written since the last one,
    /// runs `device_flush`, marks them saved and appends their saved record.
    ///
    /// The record is made durable lazily (by the next journal sync, within
    /// `LAZY_SYNC_DELAY`): losing it in a crash only shows those regions as
    /// "written" instead of "saved", never hides a change, and it keeps a
    /// second device sync off every FLUSH.
    pub fn flush(&self, device_flush: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let started = Instant::now();
        let runs = self.written.take_runs();
        let mut work = started.elapsed();
        if let Err(error) = device_flush() {
            // Not durable after all: they stay "written".
            for run in runs {
                self.written.set_run(run);
            }
            return Err(error);
        }
        let started = Instant::now();
        if !runs.is_empty() {
            self.record_saved(runs);
        }
        work += started.elapsed();
        self.record_flush_work(work);
        Ok(())
    }

    fn record_flush_work(&self, work: Duration) {
        let mut samples = self.flush_samples.lock().expect("flush samples lock");
        let nanos = work.as_nanos() as u64;
        if samples.samples_ns.len() < FLUSH_SAMPLES_MAX {
            samples.samples_ns.push(nanos);
        } else {
            let next = samples.next;
            samples.samples_ns[next] = nanos;
        }
        samples.next = (samples.next + 1) % FLUSH_SAMPLES_MAX;
        samples.count += 1;
    }

    pub fn flush_stats(&self) -> FlushStats {
        let samples = self.flush_samples.lock().expect("flush samples lock");
        let mut sorted = samples.samples_ns.clone();
        let count = samples.count;
        drop(samples);
        sorted.sort_unstable();
        let percentile = |p: usize| {
            if sorted.is_empty() {
                0
            } else {
                sorted[((sorted.len() - 1) * p) / 100]
            }
        };
        FlushStats {
            flush_count: count,
            work_ns_p50: percentile(50),
            work_ns_p99: percentile(99),
            work_ns_max: sorted.last().copied().unwrap_or(0),
        }
    }

    /// Regions written and not yet flushed, as byte ranges.
    pub(crate) fn unflushed_ranges(&self) -> Vec<(u64, u64)> {
        runs_from_sorted(self.written.iter_set())
            .into_iter()
            .map(|run| self.granularity.byte_range(run))
            .collect()
    }

    pub(crate) fn journal_size_bytes(&self) -> u64 {
        self.committer
            .get()
            .map_or(self.journal_bytes_at_open, Committer::journal_size_bytes)
    }

    /// Whether the journal has grown past JOURNAL_COMPACT_BYTES; the caller
    /// then runs `compact_journal` off the request path.
    pub fn journal_wants_compaction(&self) -> bool {
        self.committer
            .get()
            .is_some_and(|c| c.journal_size_bytes() > JOURNAL_COMPACT_BYTES)
            && !self.compacting.swap(true, Ordering::SeqCst)
    }

    /// Clears the queued-compaction flag when the compaction could not be
    /// started, so a later flush asks again.
    pub fn cancel_compaction(&self) {
        self.compacting.store(false, Ordering::SeqCst);
    }

    /// Rewrites the journal as the current generation's snapshot (its
    /// marked and saved regions), between requests. The new file is
    /// complete and synced before the writer switches to it, and renamed
    /// over the old one only after the old one took every queued record:
    /// a crash at any point leaves one whole journal saying at least as
    /// much as before.
    pub fn compact_journal(&self) -> Result<(), CompactError> {
        self.rewriting_journal((), |path| self.write_compacted_journal(path))
    }

    /// Runs a rewrite of the journal at `path` (a compaction, a failed
    /// journal's recovery) under the operations lock with the gate closed,
    /// then clears the queued-rewrite flag. After a stop it runs nothing
    /// and returns `stopped`: the journal is as the stop left it.
    fn rewriting_journal<T>(
        &self,
        stopped: T,
        rewrite: impl FnOnce(&Path) -> io::Result<T>,
    ) -> Result<T, CompactError> {
        let path = self.state_dir.join("journal");
        let result = {
            let _operation = self.operations.lock().expect("operations lock");
            match self.gate.close_unless_stopped() {
                Some(_closed) => rewrite(&path),
                None => Ok(stopped),
            }
        };
        self.compacting.store(false, Ordering::SeqCst);
        result.map_err(|source| CompactError { path, source })
    }

    fn write_compacted_journal(&self, path: &Path) -> io::Result<()> {
        let new_path = path.with_extension("new");
        if let Err(error) = self.swap_in_compacted_journal(&new_path) {
            // Nothing changed: the old journal stays in use and in place.
            let _ = std::fs::remove_file(&new_path);
            return Err(error);
        }
        // The committer writes to the new file from here on: one that is
        // not in place would lose later marks in a crash, so a failure
        // now fails the journal (first touches refused, as after a failed
        // commit). The old journal holds everything marked until now.
        let placed = std::fs::rename(&new_path, path).and_then(|()| sync_dir(path));
        if let Err(error) = &placed {
            self.committer().poison(format!(
                "putting the compacted journal in place failed: {error}"
            ));
        }
        placed
    }

    /// Writes `new_path` as the generation's marks and saved regions,
    /// syncs it and hands it to the journal thread.
    fn swap_in_compacted_journal(&self, new_path: &Path) -> io::Result<()> {
        let writer = self.write_journal_from_memory(new_path)?;
        self.committer().replace_writer(writer)
    }

    /// A new journal at `new_path` holding the generation's marks and
    /// saved regions as memory has them, synced.
    fn write_journal_from_memory(&self, new_path: &Path) -> io::Result<JournalWriter> {
        let header = FileHeader {
            generation: self.generation(),
            granularity_shift: self.granularity.shift(),
            image_id: self.image_id,
        };
        let mut writer = create_journal(new_path, &header, self.journal_wrapper.as_ref())?;
        let marked = runs_from_sorted(self.marked.iter_set());
        let saved = runs_from_sorted(self.saved.iter_set());
        let epoch = self.flush_epoch.load(Ordering::SeqCst);
        let mut records: Vec<Record> = marked
            .chunks(journal::RUNS_PER_RECORD_MAX)
            .map(|chunk| Record::Mark {
                runs: chunk.to_vec(),
            })
            .collect();
        records.extend(
            saved
                .chunks(journal::RUNS_PER_RECORD_MAX)
                .map(|chunk| Record::Saved {
                    epoch,
                    runs: chunk.to_vec(),
                }),
        );
        writer.append(&records)?;
        writer.sync()?;
        Ok(writer)
    }

    /// Whether the journal failed and a rewrite may be tried now (at most
    /// once every JOURNAL_RECOVERY_INTERVAL); the caller then runs
    /// `recover_journal` off the request path.
    pub fn journal_wants_recovery(&self) -> bool {
        let Some(committer) = self.committer.get() else {
            return false;
        };
        if committer.failure().is_none() {
            return false;
        }
        let mut tried = self.recovery_tried.lock().expect("recovery lock");
        if tried.is_some_and(|at| at.elapsed() < JOURNAL_RECOVERY_INTERVAL) {
            return false;
        }
        if self.compacting.swap(true, Ordering::SeqCst) {
            return false;
        }
        *tried = Some(Instant::now());
        true
    }

    /// Ends a journal failure without a restart, once the state's file
    /// system takes writes again: writes a new journal from memory (every
    /// region marked in the generation, each mark made durable before its
    /// write was issued, so memory says at least what the failed journal
    /// holds of issued writes), syncs it, renames it over the failed one
    /// and syncs the directory, all while writes are held at the gate;
    /// only then does the journal thread take it. A failure on the way
    /// changes nothing: the journal stays failed, the old file in place.
    /// Ok(false): the journal had not failed.
    pub fn recover_journal(&self) -> Result<bool, CompactError> {
        self.rewriting_journal(false, |path| match self.committer().failure() {
            None => Ok(false),
            Some(reason) => self.rewrite_failed_journal(path).map(|()| {
                tracing::warn!(
                    failure = %reason,
                    "tracking journal rewritten from memory: first touches and checkpoints work again"
                );
                true
            }),
        })
    }

    fn rewrite_failed_journal(&self, path: &Path) -> io::Result<()> {
        let new_path = path.with_extension("new");
        let placed = self
            .write_journal_from_memory(&new_path)
            .and_then(|writer| {
                std::fs::rename(&new_path, path)?;
                // Until the rename is durable a crash may bring back the old
                // journal, which would not hold the marks of writes issued
                // after the revival: the journal stays failed until then.
                sync_dir(path)?;
                Ok(writer)
            });
        match placed {
            Ok(writer) => {
                self.committer().revive(writer);
                Ok(())
            }
            Err(error) => {
                let _ = std::fs::remove_file(&new_path);
                Err(error)
            }
        }
    }

    /// Stops tracking cleanly: commits what is queued and records the
    /// image's mtime so an offline change is noticed next time. A
    /// read-only tracker has nothing to stop and writes nothing.
    pub fn close(&self) -> Result<(), CloseError> {
        if self.read_only {
            return Ok(());
        }
        {
            let _operation = self.operations.lock().expect("operations lock");
            self.gate.close_forever();
        }
        if let Some(mut heartbeat) = self.heartbeat.lock().expect("heartbeat lock").take() {
            heartbeat.stop();
        }
        if let Some(committer) = self.committer.get() {
            committer.stop();
            if let Some(reason) = committer.failure() {
                // No clean marker: the next open replays the journal, which
                // holds a durable mark for every write that was issued.
                return Err(CloseError::JournalFailed { reason });
            }
        }
        let metadata = std::fs::metadata(&self.image_path).map_err(|source| CloseError::Image {
            path: self.image_path.clone(),
            source,
        })?;
        let catalog_error = |source| CloseError::Catalog {
            path: self.state_dir.join("catalog.redb"),
            source,
        };
        self.catalog_ready().map_err(catalog_error)?;
        // The fine record first: it is trusted only beside the marker.
        let marked = self.marked.iter_set().map(|region| region as u32).collect();
        let (exact, blocks) = self.fine.current(&marked);
        self.catalog
            .set_fine_current(self.generation(), &exact, &blocks)
            .map_err(catalog_error)?;
        self.catalog
            .set_clean_shutdown(Some(&CleanShutdown {
                image_mtime_ns: mtime_ns(&metadata),
                size_bytes: self.size_bytes,
                generation: self.generation(),
            }))
            .map_err(catalog_error)
    }
}
