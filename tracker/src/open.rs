//! Opening the state directory.
//!
//! Recovery (`recovery.rs`) first only reads: the catalog, the identity,
//! the clean-shutdown marker, the heartbeat and the journal, applying the
//! journal's records to the bitmaps and collecting each reason to distrust
//! the state as a `Distrust`. A writable open (`Tracker::open`) then acts on what it
//! found: it keeps damaged files aside, starts a new catalog or journal,
//! records the distrust as a MARK_ALL and clears the clean-shutdown marker.
//! A read-only open (`Tracker::open_read_only`, for queries with no server
//! running) stops after the reading, so a query never changes the state
//! directory and a crash during one costs nothing. Either way, state that
//! cannot be trusted makes every region count as changed.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use roaring::RoaringBitmap;

use crate::error::OpenError;
use crate::files::FileMap;
use crate::fine::FineRecord;
use crate::gate::Gate;
use crate::journal::{FileHeader, JournalWriter, Record};
use crate::recovery::{JournalFound, Mode, Recovered, recover};
use crate::regions::{AtomicBitmap, Granularity};
use crate::tracker::{JournalWrapper, Tracker, TrackerOptions};

impl Tracker {
    /// Opens (creating if needed) the state for `options.image`, whose size
    /// is `size_bytes`, recovering from the journal after a crash.
    pub fn open(options: &TrackerOptions, size_bytes: u64) -> Result<Tracker, OpenError> {
        let image_path = absolute(&options.image)?;
        let state_dir = state_dir_of(options, &image_path);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state_dir)
            .map_err(|source| OpenError::StateDir {
                path: state_dir.clone(),
                source,
            })?;
        let mut found = recover(options, &image_path, &state_dir, size_bytes, Mode::Writable)?;
        let catalog_path = state_dir.join("catalog.redb");
        let catalog_error = |source| OpenError::Catalog {
            path: catalog_path.clone(),
            source,
        };
        if found.catalog_lost {
            for checkpoint in &found.checkpoints {
                found
                    .catalog
                    .add_checkpoint(checkpoint)
                    .map_err(catalog_error)?;
            }
        }
        let journal_path = state_dir.join("journal");
        let journal_error = |source| OpenError::JournalIo {
            path: journal_path.clone(),
            source,
        };
        let wrapper = options.journal_wrapper.as_ref();
        let mut writer =
            match std::mem::replace(&mut found.journal, JournalFound::Replace { damaged: false }) {
                JournalFound::Resume { file, replay } => {
                    JournalWriter::resume(JournalWrapper::wrap(wrapper, file), &replay)
                        .map_err(journal_error)?
                }
                JournalFound::Replace { damaged } => {
                    if damaged {
                        let moved = state_dir.join(format!("journal.corrupt-{}", unix_seconds()));
                        let _ = std::fs::rename(&journal_path, &moved);
                    }
                    create_journal(&journal_path, &found.header, wrapper).map_err(journal_error)?
                }
            };
        found
            .catalog
            .set_identity(&found.identity)
            .map_err(catalog_error)?;
        if !found.precision_stored {
            found
                .catalog
                .set_precision_shift(found.precision.shift())
                .map_err(catalog_error)?;
        }
        // From here on a crash leaves no marker: the journal is the truth.
        found
            .catalog
            .set_clean_shutdown(None)
            .map_err(catalog_error)?;
        if !found.findings.distrust.is_empty() {
            let reason = found.findings.warnings.join("; ");
            writer
                .append(&[Record::MarkAll { reason }])
                .and_then(|()| writer.sync())
                .map_err(journal_error)?;
            found.marked.set_all();
        }
        let files = options
            .files
            .then(|| open_file_map(&image_path, size_bytes, &state_dir, found.granularity, true))
            .flatten();
        let tracker = assemble(
            found, options, image_path, state_dir, size_bytes, files, false,
        );
        *tracker.journal_before_start.lock().expect("journal lock") = Some(writer);
        if let Some(files) = &tracker.files {
            tracker.add_hook(Arc::clone(files) as _);
        }
        Ok(tracker)
    }

    /// Opens existing state for queries without changing anything in the
    /// state directory: no catalog or journal write, no clean-shutdown
    /// marker cleared, no file created or moved. Whatever a writable open
    /// would distrust is distrusted here too (every region counts as
    /// changed), in memory only. A catalog a crash left needing a repair
    /// is `OpenError::Catalog` with `CatalogError::NeedsRepair`: only a
    /// writable open can repair it.
    pub fn open_read_only(options: &TrackerOptions, size_bytes: u64) -> Result<Tracker, OpenError> {
        let image_path = absolute(&options.image)?;
        let state_dir = state_dir_of(options, &image_path);
        if !state_dir.join("catalog.redb").exists() {
            return Err(OpenError::NoState { path: state_dir });
        }
        let found = recover(options, &image_path, &state_dir, size_bytes, Mode::ReadOnly)?;
        if found.no_state {
            return Err(OpenError::NoState { path: state_dir });
        }
        if !found.findings.distrust.is_empty() {
            found.marked.set_all();
        }
        let files = options
            .files
            .then(|| {
                open_file_map(
                    &image_path,
                    size_bytes,
                    &state_dir,
                    found.granularity,
                    false,
                )
            })
            .flatten();
        Ok(assemble(
            found, options, image_path, state_dir, size_bytes, files, true,
        ))
    }
}

fn absolute(image: &Path) -> Result<PathBuf, OpenError> {
    std::path::absolute(image).map_err(|source| OpenError::Image {
        path: image.to_path_buf(),
        source,
    })
}

fn state_dir_of(options: &TrackerOptions, image_path: &Path) -> PathBuf {
    options
        .state_dir
        .clone()
        .unwrap_or_else(|| default_state_dir(image_path))
}

fn open_file_map(
    image: &Path,
    size_bytes: u64,
    state_dir: &Path,
    granularity: Granularity,
    writable: bool,
) -> Option<Arc<FileMap>> {
    match FileMap::open(image, size_bytes, state_dir, granularity, writable) {
        Ok(files) => Some(Arc::new(files)),
        Err(error) => {
            tracing::warn!(%error, "no file map: changes are reported by block only");
            None
        }
    }
}

fn assemble(
    found: Recovered,
    options: &TrackerOptions,
    image_path: PathBuf,
    state_dir: PathBuf,
    size_bytes: u64,
    files: Option<Arc<FileMap>>,
    read_only: bool,
) -> Tracker {
    for warning in &found.findings.warnings {
        tracing::warn!("{}: {warning}", image_path.display());
    }
    let region_count = found.marked.bit_count();
    let generation = found.header.generation;
    // What the journal marked before this open counts whole unless a clean
    // stop left its fine record.
    let fine = FineRecord::new(found.precision, found.granularity, size_bytes);
    let marked: RoaringBitmap = found
        .marked
        .iter_set()
        .map(|region| region as u32)
        .collect();
    match &found.fine_current {
        Some((exact, blocks)) => {
            fine.add_blocks(blocks);
            fine.add_inexact(&(&marked - exact));
        }
        None => fine.add_inexact(&marked),
    }
    Tracker {
        state_dir,
        image_path,
        image_id: found.identity.image_id,
        size_bytes,
        granularity: found.granularity,
        catalog: found.catalog,
        _lock: found.lock,
        read_only,
        written: AtomicBitmap::new(region_count),
        marked: found.marked,
        saved: found.saved,
        fine,
        gate: Gate::default(),
        committer: OnceLock::new(),
        journal_before_start: Mutex::new(None),
        journal_bytes_at_open: found.journal_bytes,
        generation: AtomicU64::new(generation),
        flush_epoch: AtomicU64::new(0),
        operations: Mutex::new(()),
        checkpoints: Mutex::new(found.checkpoints),
        closed_unions: Mutex::new(HashMap::new()),
        flush_samples: Mutex::default(),
        journal_wrapper: options.journal_wrapper.clone(),
        clean_start: found.clean && found.findings.distrust.is_empty(),
        warnings: found.findings.warnings,
        distrust: found.findings.distrust,
        files,
        hooks_before_start: Mutex::new(Vec::new()),
        hooks: OnceLock::new(),
        heartbeat: Mutex::new(None),
        compacting: AtomicBool::new(false),
        recovery_tried: Mutex::new(None),
    }
}

/// Default state directory: `IMAGE.blockwatch` beside the image.
pub fn default_state_dir(image: &Path) -> PathBuf {
    let mut name = image.file_name().unwrap_or_default().to_os_string();
    name.push(".blockwatch");
    image.with_file_name(name)
}

pub(crate) fn lock_state(state_dir: &Path, mode: Mode) -> Result<File, OpenError> {
    let path = state_dir.join("lock");
    let opened = match mode {
        Mode::Writable => OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path),
        // A lock file that is missing is not created: the query then runs
        // without one, since no server can have started from this state.
        Mode::ReadOnly => File::open(&path).or_else(|_| File::open(state_dir)),
    };
    let file = opened.map_err(|source| OpenError::StateDir {
        path: path.clone(),
        source,
    })?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(OpenError::Locked {
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

pub(crate) fn create_journal(
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

pub(crate) fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

pub(crate) fn random_id() -> io::Result<[u8; 16]> {
    let mut id = [0u8; 16];
    std::io::Read::read_exact(&mut File::open("/dev/urandom")?, &mut id)?;
    Ok(id)
}

pub(crate) fn mtime_ns(metadata: &std::fs::Metadata) -> i128 {
    i128::from(metadata.mtime()) * 1_000_000_000 + i128::from(metadata.mtime_nsec())
}

pub(crate) fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
