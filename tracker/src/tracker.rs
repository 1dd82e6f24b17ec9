//! The tracker: state directory, recovery, the write gate, checkpoints and
//! queries. `layer.rs` puts it in front of a backend.
//!
//! State lives in `IMAGE.blockwatch/` (or `--state DIR`): `lock` (flock),
//! `catalog.redb`, `journal`, `control.sock`. Anything that cannot be
//! trusted at open (foreign state, an image changed while no server ran, a
//! corrupt journal or catalog, a lost journal) is reported and the whole
//! current generation is marked changed: tracking may over-report, never
//! under-report.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use roaring::RoaringBitmap;

use crate::alive::{self, Heartbeat};
use crate::catalog::{Catalog, CatalogError, Checkpoint, CleanShutdown, Identity};
use crate::commit::Committer;
use crate::files::{FileMap, FileReport};
use crate::journal::{self, FileHeader, JournalError, JournalFile, JournalWriter, Record};
use crate::regions::{
    AtomicBitmap, GRANULARITY_DEFAULT_BYTES, Granularity, REGION_COUNT_MAX, RegionRun,
    runs_from_sorted,
};
use fsmap::select::Criteria;

pub const CONTEXT_PREFIX: &str = "qemu:dirty-bitmap:";
/// Longest checkpoint name (it becomes part of an NBD context name).
pub const CHECKPOINT_NAME_MAX: usize = 200;
/// Flush samples kept for the histogram.
const FLUSH_SAMPLES_MAX: usize = 65536;
/// A journal past this size is rewritten as a snapshot of the current
/// generation (saved records accumulate at every flush between checkpoints).
pub const JOURNAL_COMPACT_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("state directory {path}")]
    StateDir { path: PathBuf, source: io::Error },
    #[error("state {path} is in use by another blockwatch process")]
    Locked { path: PathBuf },
    #[error(
        "state {path} tracks at {state_bytes}-byte granularity, not {asked_bytes}; drop --granularity or remove the state directory"
    )]
    GranularityMismatch {
        path: PathBuf,
        state_bytes: u64,
        asked_bytes: u64,
    },
    #[error("granularity {0} is not a power of two from 4 KiB to 16 MiB")]
    BadGranularity(u64),
    #[error(
        "the image has {0} regions at this granularity, over the limit {REGION_COUNT_MAX}; use a larger --granularity"
    )]
    TooManyRegions(u64),
    #[error("catalog")]
    Catalog(#[from] CatalogError),
    #[error("journal")]
    Journal(#[from] JournalError),
    #[error("i/o")]
    Io(#[from] io::Error),
    #[error("no checkpoint named {0:?} (see: blockwatch checkpoints)")]
    UnknownCheckpoint(String),
    #[error("a checkpoint named {0:?} exists already")]
    DuplicateCheckpoint(String),
    #[error(
        "checkpoint name {0:?} is not usable: use 1 to {CHECKPOINT_NAME_MAX} printable characters without spaces"
    )]
    BadCheckpointName(String),
    #[error("this server keeps no file map (it was started with --no-files)")]
    NoFileMap,
    #[error("file map: {0}")]
    FileMap(String),
    #[error("checkpoint {until:?} is not after {since:?}")]
    BadRange { since: String, until: String },
}

#[derive(Debug, Clone)]
pub struct TrackerOptions {
    pub image: PathBuf,
    pub state_dir: Option<PathBuf>,
    /// None: what the state already uses, or the default for new state.
    pub granularity_bytes: Option<u64>,
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
    fn wrap(wrapper: Option<&JournalWrapper>, file: File) -> Box<dyn JournalFile> {
        match wrapper {
            Some(wrapper) => (wrapper.0)(file),
            None => Box::new(file),
        }
    }
}

/// Default state directory: `IMAGE.blockwatch` beside the image.
pub fn default_state_dir(image: &Path) -> PathBuf {
    let mut name = image.file_name().unwrap_or_default().to_os_string();
    name.push(".blockwatch");
    image.with_file_name(name)
}

/// One changed extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangedExtent {
    pub offset_bytes: u64,
    pub length_bytes: u64,
    /// The last write to it was flushed.
    pub saved: bool,
}

/// Percentiles of the tracker's own work per flush (device syncs excluded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    pub flush_count: u64,
    pub work_ns_p50: u64,
    pub work_ns_p99: u64,
    pub work_ns_max: u64,
}

/// Lets writes in without a lock; a checkpoint closes it and waits for the
/// writes in flight, so a generation switch falls between requests.
#[derive(Debug, Default)]
struct Gate {
    inflight: AtomicU64,
    closed: AtomicBool,
    lock: Mutex<()>,
    cond: Condvar,
}

impl Gate {
    fn enter(&self) {
        loop {
            if self.closed.load(Ordering::SeqCst) {
                let mut guard = self.lock.lock().expect("gate lock");
                while self.closed.load(Ordering::SeqCst) {
                    guard = self.cond.wait(guard).expect("gate lock");
                }
            }
            self.inflight.fetch_add(1, Ordering::SeqCst);
            if !self.closed.load(Ordering::SeqCst) {
                return;
            }
            self.leave();
        }
    }

    fn leave(&self) {
        if self.inflight.fetch_sub(1, Ordering::SeqCst) == 1 && self.closed.load(Ordering::SeqCst) {
            let _guard = self.lock.lock().expect("gate lock");
            self.cond.notify_all();
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let mut guard = self.lock.lock().expect("gate lock");
        while self.inflight.load(Ordering::SeqCst) > 0 {
            guard = self
                .cond
                .wait_timeout(guard, Duration::from_millis(10))
                .expect("gate lock")
                .0;
        }
    }

    fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
        let _guard = self.lock.lock().expect("gate lock");
        self.cond.notify_all();
    }
}

/// Holds the gate for one mutating request.
#[derive(Debug)]
pub struct GateGuard<'a>(&'a Gate);

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

#[derive(Debug)]
pub struct Tracker {
    state_dir: PathBuf,
    image_path: PathBuf,
    image_id: [u8; 16],
    size_bytes: u64,
    granularity: Granularity,
    catalog: Catalog,
    _lock: File,
    /// Regions durably marked in the current generation.
    marked: Arc<AtomicBitmap>,
    /// Regions written since the last flush.
    written: AtomicBitmap,
    /// Regions of the current generation whose writes a flush made durable.
    saved: AtomicBitmap,
    gate: Gate,
    /// Started by `start` (after the server forks: a thread does not survive fork).
    committer: OnceLock<Committer>,
    journal_before_start: Mutex<Option<JournalWriter>>,
    generation: AtomicU64,
    flush_epoch: AtomicU64,
    /// Serializes checkpoint operations.
    operations: Mutex<()>,
    checkpoints: Mutex<Vec<Checkpoint>>,
    /// Union of closed generations after each checkpoint, for BLOCK_STATUS.
    closed_unions: Mutex<HashMap<String, Arc<RoaringBitmap>>>,
    flush_samples: Mutex<FlushSamples>,
    journal_wrapper: Option<JournalWrapper>,
    /// What recovery found that users should know.
    warnings: Vec<String>,
    clean_start: bool,
    files: Option<Arc<FileMap>>,
    heartbeat: Mutex<Option<Heartbeat>>,
    /// A journal compaction is queued or running.
    compacting: AtomicBool,
}

#[derive(Debug, Default)]
struct FlushSamples {
    samples_ns: Vec<u64>,
    next: usize,
    count: u64,
}

impl Tracker {
    /// Opens (creating if needed) the state for `options.image`, whose size
    /// is `size_bytes`, recovering from the journal after a crash.
    pub fn open(options: &TrackerOptions, size_bytes: u64) -> Result<Tracker, TrackerError> {
        let image_path = std::path::absolute(&options.image)?;
        let state_dir = match &options.state_dir {
            Some(dir) => dir.clone(),
            None => default_state_dir(&image_path),
        };
        let state_error = |source| TrackerError::StateDir {
            path: state_dir.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state_dir)
            .map_err(state_error)?;
        let lock = lock_state(&state_dir)?;
        let mut warnings = Vec::new();

        let catalog_path = state_dir.join("catalog.redb");
        let mut catalog_lost = false;
        let catalog = match Catalog::open(&catalog_path).and_then(|c| c.checkpoints().map(|_| c)) {
            Ok(catalog) => catalog,
            Err(error) => {
                catalog_lost = true;
                let moved = state_dir.join(format!("catalog.redb.corrupt-{}", unix_seconds()));
                let _ = std::fs::rename(&catalog_path, &moved);
                warnings.push(format!(
                    "the catalog was unreadable ({error}); kept it as {} and started a new one: every region is treated as changed",
                    moved.display()
                ));
                Catalog::open(&catalog_path)?
            }
        };
        let stored_identity = catalog.identity();
        let first_use = !matches!(stored_identity, Ok(Some(_)));
        let stored_shift = stored_identity
            .as_ref()
            .ok()
            .and_then(|identity| identity.map(|i| i.granularity_shift));
        let granularity_bytes = options
            .granularity_bytes
            .or(stored_shift.map(|shift| 1u64 << shift))
            .unwrap_or(GRANULARITY_DEFAULT_BYTES);
        let granularity = Granularity::new(granularity_bytes)
            .ok_or(TrackerError::BadGranularity(granularity_bytes))?;
        let region_count = granularity.region_count(size_bytes);
        if region_count > REGION_COUNT_MAX {
            return Err(TrackerError::TooManyRegions(region_count));
        }
        if catalog_lost {
            rebuild_from_index(&state_dir, &catalog, region_count, &mut warnings)?;
        }
        let image_metadata = std::fs::metadata(&image_path)?;
        let mut suspect = !warnings.is_empty();
        let identity = match stored_identity {
            Ok(Some(identity)) => {
                if identity.granularity_shift != granularity.shift() {
                    return Err(TrackerError::GranularityMismatch {
                        path: state_dir,
                        state_bytes: 1 << identity.granularity_shift,
                        asked_bytes: granularity.bytes(),
                    });
                }
                if identity.device != image_metadata.dev() || identity.inode != image_metadata.ino()
                {
                    warnings.push(format!("the state in {} belongs to another file (or the image was replaced): every region is treated as changed", state_dir.display()));
                    suspect = true;
                } else if identity.size_bytes != size_bytes {
                    warnings.push(format!("the image changed size from {} to {size_bytes} bytes while no server ran: every region is treated as changed", identity.size_bytes));
                    suspect = true;
                }
                identity
            }
            Ok(None) => Identity {
                image_id: random_id()?,
                size_bytes,
                granularity_shift: granularity.shift(),
                device: image_metadata.dev(),
                inode: image_metadata.ino(),
            },
            Err(error) => {
                warnings.push(format!("the catalog's identity record is damaged ({error}): every region is treated as changed"));
                suspect = true;
                Identity {
                    image_id: random_id()?,
                    size_bytes,
                    granularity_shift: granularity.shift(),
                    device: image_metadata.dev(),
                    inode: image_metadata.ino(),
                }
            }
        };
        let new_identity = Identity {
            size_bytes,
            device: image_metadata.dev(),
            inode: image_metadata.ino(),
            ..identity
        };
        let clean = match catalog.clean_shutdown() {
            Ok(marker) => marker,
            Err(error) => {
                warnings.push(format!("the clean-shutdown marker is damaged ({error}): every region is treated as changed"));
                suspect = true;
                None
            }
        };
        if clean.is_none()
            && !first_use
            && let Some(heartbeat_ns) = alive::last(&state_dir)
            && mtime_ns(&image_metadata)
                > i128::from(heartbeat_ns) + alive::SLACK.as_nanos() as i128
        {
            warnings.push(format!(
                "the image was modified after the server stopped without a clean shutdown \
                 (last alive {} s before the image's last change): every region is treated as changed",
                (mtime_ns(&image_metadata) - i128::from(heartbeat_ns)) / 1_000_000_000
            ));
            suspect = true;
        }
        if let Some(marker) = &clean
            && (marker.image_mtime_ns != mtime_ns(&image_metadata)
                || marker.size_bytes != size_bytes)
        {
            warnings.push(
                "the image was modified while no server ran: every region is treated as changed"
                    .into(),
            );
            suspect = true;
        }
        let checkpoints = catalog.checkpoints()?;
        let generation = checkpoints.last().map_or(1, |c| c.generation + 1);
        let marked = Arc::new(AtomicBitmap::new(region_count));
        let saved = AtomicBitmap::new(region_count);

        let journal_path = state_dir.join("journal");
        let header = FileHeader {
            generation,
            granularity_shift: granularity.shift(),
            image_id: new_identity.image_id,
        };
        let wrapper = options.journal_wrapper.as_ref();
        let mut writer = match open_journal(
            &journal_path,
            &header,
            region_count,
            &marked,
            &saved,
            first_use,
            wrapper,
        ) {
            Ok((writer, journal_warnings, journal_suspect)) => {
                warnings.extend(journal_warnings);
                suspect |= journal_suspect;
                writer
            }
            Err(error) => {
                warnings.push(format!(
                    "the journal is damaged ({}): every region is treated as changed",
                    error_chain(&error)
                ));
                suspect = true;
                let moved = state_dir.join(format!("journal.corrupt-{}", unix_seconds()));
                let _ = std::fs::rename(&journal_path, &moved);
                marked.clear_all();
                saved.clear_all();
                create_journal(&journal_path, &header, wrapper)?
            }
        };
        catalog.set_identity(&new_identity)?;
        // From here on a crash leaves no marker: the journal is the truth.
        catalog.set_clean_shutdown(None)?;
        if suspect {
            let reason = warnings.join("; ");
            writer.append(&[Record::MarkAll { reason }])?;
            writer.sync()?;
            marked.set_all();
        }
        for warning in &warnings {
            tracing::warn!("{}: {warning}", image_path.display());
        }
        let files = if options.files {
            match FileMap::open(&image_path, size_bytes, &state_dir, granularity) {
                Ok(files) => Some(Arc::new(files)),
                Err(error) => {
                    tracing::warn!(%error, "no file map: changes are reported by block only");
                    None
                }
            }
        } else {
            None
        };
        Ok(Tracker {
            state_dir,
            image_path,
            image_id: new_identity.image_id,
            size_bytes,
            granularity,
            catalog,
            _lock: lock,
            written: AtomicBitmap::new(region_count),
            marked,
            saved,
            gate: Gate::default(),
            committer: OnceLock::new(),
            journal_before_start: Mutex::new(Some(writer)),
            generation: AtomicU64::new(generation),
            flush_epoch: AtomicU64::new(0),
            operations: Mutex::new(()),
            checkpoints: Mutex::new(checkpoints),
            closed_unions: Mutex::new(HashMap::new()),
            flush_samples: Mutex::new(FlushSamples::default()),
            journal_wrapper: options.journal_wrapper.clone(),
            clean_start: clean.is_some() && !suspect,
            warnings,
            files,
            heartbeat: Mutex::new(None),
            compacting: AtomicBool::new(false),
        })
    }

    /// Starts the journal thread. Call once, in the process that serves.
    pub fn start(&self) {
        let writer = self
            .journal_before_start
            .lock()
            .expect("journal lock")
            .take()
            .expect("Tracker::start is called once");
        let annotator: Option<crate::commit::Annotator> = self.files.clone().map(|files| {
            Arc::new(move |runs: &[RegionRun]| files.attribute(runs)) as crate::commit::Annotator
        });
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

    fn committer(&self) -> &Committer {
        self.committer.get().expect("Tracker::start was called")
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
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

    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Enters the gate for a mutating request (write, trim, zero, flush).
    pub fn enter(&self) -> GateGuard<'_> {
        self.gate.enter();
        GateGuard(&self.gate)
    }

    /// True when every region of the byte range is already marked.
    pub fn is_marked(&self, offset_bytes: u64, length_bytes: u64) -> bool {
        length_bytes == 0
            || self
                .marked
                .all_set(self.granularity.run_of(offset_bytes, length_bytes))
    }

    /// Returns once every region of the range is durably marked.
    pub fn ensure_marked(&self, offset_bytes: u64, length_bytes: u64) -> io::Result<()> {
        if length_bytes == 0 {
            return Ok(());
        }
        let run = self.granularity.run_of(offset_bytes, length_bytes);
        if self.marked.all_set(run) {
            return Ok(());
        }
        self.committer().mark(run)
    }

    /// After a write completed: its regions are written, not yet saved.
    pub fn note_written(&self, offset_bytes: u64, length_bytes: u64) {
        if length_bytes > 0 {
            self.written
                .set_run(self.granularity.run_of(offset_bytes, length_bytes));
        }
    }

    /// After a FUA write: its regions are saved, unless an earlier write to
    /// them still waits for a flush (then the region as a whole is not).
    pub fn note_written_durably(&self, offset_bytes: u64, length_bytes: u64) -> io::Result<()> {
        if length_bytes == 0 {
            return Ok(());
        }
        let run = self.granularity.run_of(offset_bytes, length_bytes);
        let runs: Vec<RegionRun> = runs_from_sorted(
            (run.first_region..run.first_region + run.region_count)
                .filter(|&region| !self.written.get(region)),
        );
        if runs.is_empty() {
            return Ok(());
        }
        self.record_saved(runs)
    }

    /// Marks regions saved and queues their (lazy) SAVED record.
    fn record_saved(&self, runs: Vec<RegionRun>) -> io::Result<()> {
        for run in &runs {
            self.saved.set_run(*run);
        }
        let epoch = self.flush_epoch.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(files) = &self.files {
            files.note_saved(&runs);
        }
        self.committer().enqueue_lazy(Record::Saved { epoch, runs })
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
        let mut queued = Ok(());
        if !runs.is_empty() {
            queued = self.record_saved(runs);
        }
        work += started.elapsed();
        self.record_flush_work(work);
        queued
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

    pub fn checkpoints(&self) -> Vec<Checkpoint> {
        self.checkpoints.lock().expect("checkpoints lock").clone()
    }

    /// The current generation's changed regions, and those of them whose
    /// newest write is saved (saved and not written since).
    fn current_generation(&self) -> (RoaringBitmap, RoaringBitmap) {
        let as_bitmap = |bitmap: &AtomicBitmap| -> RoaringBitmap {
            bitmap.iter_set().map(|region| region as u32).collect()
        };
        let saved = as_bitmap(&self.saved) - as_bitmap(&self.written);
        (as_bitmap(&self.marked), saved)
    }

    /// Closes the current generation under `name` and starts the next one,
    /// between requests.
    pub fn checkpoint(&self, name: &str) -> Result<Checkpoint, TrackerError> {
        validate_name(name)?;
        let _operation = self.operations.lock().expect("operations lock");
        if self.find(name).is_some() {
            return Err(TrackerError::DuplicateCheckpoint(name.to_string()));
        }
        // The file map is brought up to date before the switch: whatever
        // is written after it shows in the next map's inodes or blocks.
        let map = self
            .files
            .as_ref()
            .map(|files| (files, files.current(&self.unflushed_ranges())));
        self.gate.close();
        let result = self.switch_generation(name);
        self.gate.open();
        if let (Ok(checkpoint), Some((files, map))) = (&result, map)
            && let Some(disk) = map.as_ref()
            && let Err(error) = files.save(checkpoint.generation, disk)
        {
            tracing::warn!(%error, "could not save the file map at checkpoint {name}");
        }
        result
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
    pub fn compact_journal(&self) -> Result<(), TrackerError> {
        let _operation = self.operations.lock().expect("operations lock");
        self.gate.close();
        let result = self.write_compacted_journal();
        self.gate.open();
        self.compacting.store(false, Ordering::SeqCst);
        result
    }

    fn write_compacted_journal(&self) -> Result<(), TrackerError> {
        let path = self.state_dir.join("journal");
        let new_path = path.with_extension("new");
        let header = FileHeader {
            generation: self.generation(),
            granularity_shift: self.granularity.shift(),
            image_id: self.image_id,
        };
        let mut writer = create_journal(&new_path, &header, self.journal_wrapper.as_ref())?;
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
        self.committer().replace_writer(writer)?;
        std::fs::rename(&new_path, &path)?;
        sync_dir(&path)?;
        Ok(())
    }

    /// Regions written and not yet flushed, as byte ranges.
    fn unflushed_ranges(&self) -> Vec<(u64, u64)> {
        runs_from_sorted(self.written.iter_set())
            .into_iter()
            .map(|run| self.granularity.byte_range(run))
            .collect()
    }

    pub fn files(&self) -> Option<&Arc<FileMap>> {
        self.files.as_ref()
    }

    fn switch_generation(&self, name: &str) -> Result<Checkpoint, TrackerError> {
        let generation = self.generation();
        let (changed, saved) = self.current_generation();
        let checkpoint = Checkpoint {
            name: name.to_string(),
            generation,
            created_unix_seconds: unix_seconds(),
            changed,
            saved,
        };
        self.catalog.add_checkpoint(&checkpoint)?;
        let header = FileHeader {
            generation: generation + 1,
            granularity_shift: self.granularity.shift(),
            image_id: self.image_id,
        };
        let writer = replace_journal(
            &self.state_dir.join("journal"),
            &header,
            self.journal_wrapper.as_ref(),
        )?;
        self.committer().replace_writer(writer)?;
        self.marked.clear_all();
        self.saved.clear_all();
        // Written-but-unflushed regions stay in `written`: the next flush
        // saves them in the new generation's records, where they are not
        // marked; that is harmless (saved is a subset test on marked).
        self.generation.store(generation + 1, Ordering::SeqCst);
        self.checkpoints
            .lock()
            .expect("checkpoints lock")
            .push(checkpoint.clone());
        self.closed_unions.lock().expect("unions lock").clear();
        write_index(&self.state_dir, &self.checkpoints())?;
        Ok(checkpoint)
    }

    /// Deletes a checkpoint, merging its changes into the next generation
    /// so that no change is lost for older checkpoints.
    pub fn delete_checkpoint(&self, name: &str) -> Result<(), TrackerError> {
        let _operation = self.operations.lock().expect("operations lock");
        let checkpoints = self.checkpoints();
        let index = checkpoints
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| TrackerError::UnknownCheckpoint(name.to_string()))?;
        let deleted = &checkpoints[index];
        if let Some(files) = &self.files {
            files.remove(deleted.generation);
        }
        match checkpoints.get(index + 1) {
            Some(next) => {
                let mut merged = next.clone();
                merged.saved = (&next.saved | &(&deleted.saved - &next.changed))
                    & &(&next.changed | &deleted.changed);
                merged.changed |= &deleted.changed;
                self.catalog
                    .replace_checkpoints(&[deleted.generation], Some(&merged))?;
                let mut cache = self.checkpoints.lock().expect("checkpoints lock");
                cache.remove(index);
                cache[index] = merged;
            }
            None => {
                // The newest: its changes join the current generation, durably first.
                let runs = runs_from_sorted(deleted.changed.iter().map(u64::from));
                if !runs.is_empty() {
                    self.gate.close();
                    let result = runs
                        .chunks(journal::RUNS_PER_RECORD_MAX)
                        .try_for_each(|chunk| {
                            let batch = self.committer().enqueue(Record::Mark {
                                runs: chunk.to_vec(),
                            })?;
                            self.committer().wait_for(batch)
                        });
                    if result.is_ok() {
                        for run in &runs {
                            self.marked.set_run(*run);
                        }
                    }
                    self.gate.open();
                    result?;
                }
                self.catalog
                    .replace_checkpoints(&[deleted.generation], None)?;
                self.checkpoints
                    .lock()
                    .expect("checkpoints lock")
                    .remove(index);
            }
        }
        self.closed_unions.lock().expect("unions lock").clear();
        write_index(&self.state_dir, &self.checkpoints())?;
        Ok(())
    }

    fn find(&self, name: &str) -> Option<Checkpoint> {
        self.checkpoints
            .lock()
            .expect("checkpoints lock")
            .iter()
            .find(|c| c.name == name)
            .cloned()
    }

    /// Changed extents since checkpoint `since` (up to checkpoint `until`,
    /// or up to now), each with whether its last write was flushed.
    pub fn changes(
        &self,
        since: &str,
        until: Option<&str>,
    ) -> Result<Vec<ChangedExtent>, TrackerError> {
        let checkpoints = self.checkpoints();
        let since_generation = checkpoints
            .iter()
            .find(|c| c.name == since)
            .ok_or_else(|| TrackerError::UnknownCheckpoint(since.to_string()))?
            .generation;
        let until_generation = match until {
            Some(until) => {
                let generation = checkpoints
                    .iter()
                    .find(|c| c.name == until)
                    .ok_or_else(|| TrackerError::UnknownCheckpoint(until.to_string()))?
                    .generation;
                if generation <= since_generation {
                    return Err(TrackerError::BadRange {
                        since: since.to_string(),
                        until: until.to_string(),
                    });
                }
                Some(generation)
            }
            None => None,
        };
        // Newest generation first: it decides whether a region is saved.
        let mut generations: Vec<(RoaringBitmap, RoaringBitmap)> = Vec::new();
        if until_generation.is_none() {
            generations.push(self.current_generation());
        }
        for checkpoint in checkpoints.iter().rev() {
            let in_range = checkpoint.generation > since_generation
                && until_generation.is_none_or(|until| checkpoint.generation <= until);
            if in_range {
                generations.push((checkpoint.changed.clone(), checkpoint.saved.clone()));
            }
        }
        let mut covered = RoaringBitmap::new();
        let mut saved = RoaringBitmap::new();
        for (changed, generation_saved) in &generations {
            let newly = changed - &covered;
            saved |= &newly & generation_saved;
            covered |= changed;
        }
        Ok(self.extents_of(&covered, &saved))
    }

    /// Which files changed since checkpoint `since` (up to `until`, or
    /// now): the maps saved at the checkpoints (or the current map)
    /// compared, with the changed regions as evidence.
    pub fn file_changes(
        &self,
        since: &str,
        until: Option<&str>,
        criteria: &Criteria,
    ) -> Result<FileReport, TrackerError> {
        let extents = self.changes(since, until)?;
        let files = self.files.as_ref().ok_or(TrackerError::NoFileMap)?;
        let generation_of = |name: &str| self.find(name).map(|c| c.generation).unwrap_or_default();
        let changed: Vec<(u64, u64)> = extents
            .iter()
            .map(|e| (e.offset_bytes, e.length_bytes))
            .collect();
        let mut notes = Vec::new();
        let old = files.load(generation_of(since)).unwrap_or_else(|error| {
            notes.push(format!(
                "the file map saved at {since:?} is damaged ({error})"
            ));
            None
        });
        if old.is_none() && notes.is_empty() {
            notes.push(format!("no file map was saved at {since:?}: files are listed from their changed blocks only (no +, -, R)"));
        }
        let loaded;
        let guard;
        let new = match until {
            Some(until) => {
                loaded = files
                    .load(generation_of(until))
                    .map_err(TrackerError::FileMap)?
                    .ok_or_else(|| {
                        TrackerError::FileMap(format!("no file map was saved at {until:?}"))
                    })?;
                &loaded
            }
            None => {
                guard = files.current(&self.unflushed_ranges());
                guard.as_ref().expect("current() leaves a map")
            }
        };
        notes.extend(new.all_notes());
        Ok(FileReport::new(
            new,
            old.as_ref(),
            &changed,
            criteria,
            notes,
        ))
    }

    /// Turns region sets into byte extents, merging neighbours of equal status.
    fn extents_of(&self, changed: &RoaringBitmap, saved: &RoaringBitmap) -> Vec<ChangedExtent> {
        let region_bytes = self.granularity.bytes();
        let mut extents: Vec<ChangedExtent> = Vec::new();
        for region in changed.iter() {
            let offset_bytes = u64::from(region) * region_bytes;
            let length_bytes = region_bytes.min(self.size_bytes.saturating_sub(offset_bytes));
            if length_bytes == 0 {
                continue;
            }
            let is_saved = saved.contains(region);
            match extents.last_mut() {
                Some(last)
                    if last.offset_bytes + last.length_bytes == offset_bytes
                        && last.saved == is_saved =>
                {
                    last.length_bytes += length_bytes;
                }
                _ => extents.push(ChangedExtent {
                    offset_bytes,
                    length_bytes,
                    saved: is_saved,
                }),
            }
        }
        extents
    }

    /// NBD contexts: one `qemu:dirty-bitmap:NAME` per checkpoint.
    pub fn context_names(&self) -> Vec<String> {
        self.checkpoints()
            .iter()
            .map(|c| format!("{CONTEXT_PREFIX}{}", c.name))
            .collect()
    }

    /// Dirty-bitmap extents for a context: flag 1 where changed since NAME.
    pub fn dirty_extents(
        &self,
        context: &str,
        offset_bytes: u64,
        length_bytes: u64,
        max_extents: usize,
        out: &mut Vec<nbd_server::Extent>,
    ) -> io::Result<()> {
        let name = context.strip_prefix(CONTEXT_PREFIX).unwrap_or(context);
        let closed = self.closed_union(name).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no checkpoint named {name:?}"),
            )
        })?;
        let end = offset_bytes + length_bytes;
        let mut position = offset_bytes;
        let first = out.len();
        while position < end && out.len() - first < max_extents {
            let region = position >> self.granularity.shift();
            let region_end = ((region + 1) << self.granularity.shift()).min(end);
            let dirty = closed.contains(region as u32) || self.marked.get(region);
            let flags = u32::from(dirty);
            nbd_server::file::push_extent(out, first, region_end - position, flags);
            position = region_end;
        }
        Ok(())
    }

    fn closed_union(&self, name: &str) -> Option<Arc<RoaringBitmap>> {
        if let Some(union) = self.closed_unions.lock().expect("unions lock").get(name) {
            return Some(Arc::clone(union));
        }
        let checkpoints = self.checkpoints();
        let since = checkpoints.iter().find(|c| c.name == name)?.generation;
        let mut union = RoaringBitmap::new();
        for checkpoint in checkpoints.iter().filter(|c| c.generation > since) {
            union |= &checkpoint.changed;
        }
        let union = Arc::new(union);
        self.closed_unions
            .lock()
            .expect("unions lock")
            .insert(name.to_string(), Arc::clone(&union));
        Some(union)
    }

    pub fn status(&self) -> Status {
        let region_bytes = self.granularity.bytes();
        Status {
            image: self.image_path.clone(),
            state_dir: self.state_dir.clone(),
            generation: self.generation(),
            granularity_bytes: region_bytes,
            size_bytes: self.size_bytes,
            dirty_bytes: (self.marked.count_set() * region_bytes).min(self.size_bytes),
            unsaved_bytes: (self.written.count_set() * region_bytes).min(self.size_bytes),
            journal_bytes: self.committer().journal_size_bytes(),
            checkpoint_count: self.checkpoints().len(),
            flush: self.flush_stats(),
            clean_start: self.clean_start,
            warnings: self.warnings.clone(),
            journal_failure: self.committer().failure(),
        }
    }

    /// Stops tracking cleanly: commits what is queued and records the
    /// image's mtime so an offline change is noticed next time.
    pub fn close(&self) -> Result<(), TrackerError> {
        self.gate.close();
        if let Some(mut heartbeat) = self.heartbeat.lock().expect("heartbeat lock").take() {
            heartbeat.stop();
        }
        if let Some(committer) = self.committer.get() {
            committer.stop();
            if committer.failure().is_some() {
                return Ok(()); // no clean marker: the next open distrusts the state
            }
        }
        let metadata = std::fs::metadata(&self.image_path)?;
        self.catalog.set_clean_shutdown(Some(&CleanShutdown {
            image_mtime_ns: mtime_ns(&metadata),
            size_bytes: self.size_bytes,
            generation: self.generation(),
        }))?;
        Ok(())
    }
}

/// What `blockwatch status` shows.
#[derive(Debug, Clone)]
pub struct Status {
    pub image: PathBuf,
    pub state_dir: PathBuf,
    pub generation: u64,
    pub granularity_bytes: u64,
    pub size_bytes: u64,
    pub dirty_bytes: u64,
    pub unsaved_bytes: u64,
    pub journal_bytes: u64,
    pub checkpoint_count: usize,
    pub flush: FlushStats,
    pub clean_start: bool,
    pub warnings: Vec<String>,
    pub journal_failure: Option<String>,
}

fn validate_name(name: &str) -> Result<(), TrackerError> {
    let usable = !name.is_empty()
        && name.len() <= CHECKPOINT_NAME_MAX
        && name.chars().all(|c| {
            c.is_ascii_graphic() || (!c.is_ascii() && !c.is_whitespace() && !c.is_control())
        });
    if usable {
        Ok(())
    } else {
        Err(TrackerError::BadCheckpointName(name.to_string()))
    }
}

/// `checkpoints.index`: "generation name" lines and a last line with the
/// crc32c of the lines before it. It lets the checkpoint chain outlive a
/// lost catalog (the chain survives, the bitmaps become "everything").
const INDEX_FILE: &str = "checkpoints.index";

fn write_index(state_dir: &Path, checkpoints: &[Checkpoint]) -> io::Result<()> {
    let mut text = String::new();
    for checkpoint in checkpoints {
        text.push_str(&format!("{} {}\n", checkpoint.generation, checkpoint.name));
    }
    text.push_str(&format!("crc32c {:08x}\n", crc32c::crc32c(text.as_bytes())));
    let path = state_dir.join(INDEX_FILE);
    let new_path = path.with_extension("new");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&new_path)?;
    std::io::Write::write_all(&mut &file, text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&new_path, &path)?;
    sync_dir(&path)
}

fn read_index(state_dir: &Path) -> Option<Vec<(u64, String)>> {
    let text = std::fs::read_to_string(state_dir.join(INDEX_FILE)).ok()?;
    let (body, last) = text
        .trim_end_matches('\n')
        .rsplit_once('\n')
        .unwrap_or(("", text.trim_end_matches('\n')));
    let body = if body.is_empty() {
        String::new()
    } else {
        format!("{body}\n")
    };
    let crc = u32::from_str_radix(last.strip_prefix("crc32c ")?, 16).ok()?;
    if crc32c::crc32c(body.as_bytes()) != crc {
        return None;
    }
    body.lines()
        .map(|line| {
            let (generation, name) = line.split_once(' ')?;
            Some((generation.parse().ok()?, name.to_string()))
        })
        .collect()
}

/// After the catalog was lost: the checkpoints named in the index come
/// back with every region changed, so no query can miss a change.
fn rebuild_from_index(
    state_dir: &Path,
    catalog: &Catalog,
    region_count: u64,
    warnings: &mut Vec<String>,
) -> Result<(), TrackerError> {
    let Some(entries) = read_index(state_dir) else {
        warnings.push("no usable checkpoints.index: the checkpoints are gone; take a new checkpoint and a full copy".into());
        return Ok(());
    };
    let everything: RoaringBitmap = (0..region_count as u32).collect();
    for (generation, name) in &entries {
        catalog.add_checkpoint(&Checkpoint {
            name: name.clone(),
            generation: *generation,
            created_unix_seconds: unix_seconds(),
            changed: everything.clone(),
            saved: RoaringBitmap::new(),
        })?;
    }
    warnings.push(format!(
        "restored {} checkpoint names from checkpoints.index; each counts every region as changed",
        entries.len()
    ));
    Ok(())
}

fn lock_state(state_dir: &Path) -> Result<File, TrackerError> {
    let path = state_dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| TrackerError::StateDir {
            path: path.clone(),
            source,
        })?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(TrackerError::Locked {
            path: state_dir.to_owned(),
        });
    }
    Ok(file)
}

/// Whether some process holds the state lock (a server is running).
pub fn state_is_locked(state_dir: &Path) -> bool {
    let Ok(file) = File::open(state_dir.join("lock")) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let free = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    !free
}

/// Opens and replays the journal, applying it to the bitmaps. Returns the
/// writer, warnings, and whether the state must be distrusted.
fn open_journal(
    path: &Path,
    header: &FileHeader,
    region_count: u64,
    marked: &AtomicBitmap,
    saved: &AtomicBitmap,
    first_use: bool,
    wrapper: Option<&JournalWrapper>,
) -> Result<(JournalWriter, Vec<String>, bool), TrackerError> {
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let mut warnings = Vec::new();
            if !first_use {
                warnings
                    .push("the journal is missing: every region is treated as changed".to_string());
            }
            return Ok((create_journal(path, header, wrapper)?, warnings, !first_use));
        }
        Err(error) => return Err(error.into()),
    };
    let replay = journal::replay(&file)?;
    let mut warnings = Vec::new();
    if replay.header.image_id != header.image_id
        || replay.header.granularity_shift != header.granularity_shift
    {
        warnings.push(
            "the journal belongs to other state: every region is treated as changed".to_string(),
        );
        return Ok((create_journal(path, header, wrapper)?, warnings, true));
    }
    if replay.header.generation < header.generation {
        // A checkpoint committed its catalog entry but the new journal was
        // not in place yet; no write ran in between, so nothing is lost.
        return Ok((create_journal(path, header, wrapper)?, warnings, false));
    }
    if replay.header.generation > header.generation {
        warnings.push("the journal is newer than the catalog's checkpoints: every region is treated as changed".to_string());
        return Ok((create_journal(path, header, wrapper)?, warnings, true));
    }
    if replay.torn_bytes > 0 {
        warnings.push(format!(
            "dropped a torn journal tail of {} bytes (an interrupted commit)",
            replay.torn_bytes
        ));
    }
    let mut suspect = false;
    for record in &replay.records {
        match record {
            Record::Mark { runs } => {
                for run in runs {
                    if run.first_region.saturating_add(run.region_count) > region_count {
                        suspect = true;
                    } else {
                        marked.set_run(*run);
                    }
                }
            }
            Record::MarkAll { .. } => marked.set_all(),
            Record::Saved { runs, .. } => {
                for run in runs
                    .iter()
                    .filter(|r| r.first_region + r.region_count <= region_count)
                {
                    saved.set_run(*run);
                }
            }
            // Which files a flush saved is history for users, not state.
            Record::SavedFiles { .. } => {}
        }
    }
    if suspect {
        warnings.push("the journal names regions past the end of the image: every region is treated as changed".to_string());
    }
    Ok((
        JournalWriter::resume(JournalWrapper::wrap(wrapper, file), &replay)?,
        warnings,
        suspect,
    ))
}

fn create_journal(
    path: &Path,
    header: &FileHeader,
    wrapper: Option<&JournalWrapper>,
) -> io::Result<JournalWriter> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    let writer = JournalWriter::create(JournalWrapper::wrap(wrapper, file), *header)?;
    sync_dir(path)?;
    Ok(writer)
}

/// Writes a fresh journal beside the old one and renames it into place.
fn replace_journal(
    path: &Path,
    header: &FileHeader,
    wrapper: Option<&JournalWrapper>,
) -> io::Result<JournalWriter> {
    let new_path = path.with_extension("new");
    let writer = create_journal(&new_path, header, wrapper)?;
    std::fs::rename(&new_path, path)?;
    sync_dir(path)?;
    Ok(writer)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

fn random_id() -> io::Result<[u8; 16]> {
    let mut id = [0u8; 16];
    std::io::Read::read_exact(&mut File::open("/dev/urandom")?, &mut id)?;
    Ok(id)
}

fn mtime_ns(metadata: &std::fs::Metadata) -> i128 {
    i128::from(metadata.mtime()) * 1_000_000_000 + i128::from(metadata.mtime_nsec())
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An error with its causes, for messages.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
