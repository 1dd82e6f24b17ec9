//! The file map beside the tracker: which files own the changed regions.
//!
//! The map (fsmap's `DiskMap`) is built once, in the background when a
//! server starts, then kept current from the regions each flush saves:
//! they queue in `pending` (a short lock) and are applied when someone
//! needs the map (a checkpoint, a `changes --files` query). At a
//! checkpoint the map is brought up to date *before* the generation
//! switches and saved under the closed generation, so a file changed
//! after the saved map shows up either in its inode or in its blocks.
//! After the journal thread writes a flush's SAVED record it asks the map
//! which files own those regions (`attribute`); if the map is busy being
//! updated, that flush goes unattributed rather than waiting.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use fsmap::diff::{FileChange, FsChanges};
use fsmap::disk::DiskMap;
use fsmap::select::{self, Criteria};

use crate::catalog::Checkpoint;
use crate::hooks::{AfterSwitch, GenerationHook, SavedFiles};
use crate::journal::SAVED_FILES_MAX;
use crate::regions::{Granularity, RegionRun};

/// Byte ranges queued before the map is rebuilt whole instead.
const PENDING_RANGES_MAX: usize = 1 << 16;

#[derive(Debug, Default)]
struct Pending {
    ranges: Vec<(u64, u64)>,
    overflowed: bool,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct FileMapStats {
    pub build_ms: u64,
    pub last_update_us: u64,
    pub last_update_inodes: u64,
    pub attributed_flushes: u64,
    pub unattributed_flushes: u64,
}

#[derive(Debug)]
pub struct FileMap {
    image: Arc<File>,
    size_bytes: u64,
    granularity: Granularity,
    maps_dir: PathBuf,
    map: Mutex<Option<DiskMap>>,
    pending: Mutex<Pending>,
    build_ms: AtomicU64,
    last_update_us: AtomicU64,
    last_update_inodes: AtomicU64,
    attributed: AtomicU64,
    unattributed: AtomicU64,
}

impl FileMap {
    /// A map of `image` whose saved maps live in `STATE_DIR/maps`. Only a
    /// `writable` open creates that directory (a read-only query loads
    /// what is there and saves nothing).
    pub fn open(
        image: &Path,
        size_bytes: u64,
        state_dir: &Path,
        granularity: Granularity,
        writable: bool,
    ) -> io::Result<FileMap> {
        let maps_dir = state_dir.join("maps");
        if writable {
            std::fs::create_dir_all(&maps_dir)?;
        }
        Ok(FileMap {
            image: Arc::new(File::open(image)?),
            size_bytes,
            granularity,
            maps_dir,
            map: Mutex::new(None),
            pending: Mutex::new(Pending::default()),
            build_ms: AtomicU64::new(0),
            last_update_us: AtomicU64::new(0),
            last_update_inodes: AtomicU64::new(0),
            attributed: AtomicU64::new(0),
            unattributed: AtomicU64::new(0),
        })
    }

    /// Builds the map on a thread of its own (a server start).
    pub fn build_in_background(self: &Arc<Self>) {
        let this = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("blockwatch-filemap".into())
            .spawn(move || drop(this.current(&[])));
        if let Err(error) = spawned {
            tracing::warn!(%error, "could not start the file map thread; it is built on first use");
        }
    }

    /// Notes regions a flush saved, for the next update of the map (a
    /// short lock; the FLUSH path calls it).
    pub fn note_saved(&self, runs: &[RegionRun]) {
        let mut pending = self.pending.lock().expect("pending lock");
        if pending.ranges.len() + runs.len() > PENDING_RANGES_MAX {
            pending.overflowed = true;
            pending.ranges.clear();
            return;
        }
        pending
            .ranges
            .extend(runs.iter().map(|run| self.granularity.byte_range(*run)));
    }

    /// The files (partition, inode) that own saved regions, at most
    /// SAVED_FILES_MAX, and whether there were more; None when the map is
    /// not built yet or busy (then that flush goes unattributed). Called
    /// by the journal thread after the SAVED record is written.
    pub fn attribute(&self, runs: &[RegionRun]) -> Option<SavedFiles> {
        let ranges: Vec<(u64, u64)> = runs
            .iter()
            .map(|run| self.granularity.byte_range(*run))
            .collect();
        let attributed = match self.map.try_lock() {
            Ok(map) => map
                .as_ref()
                .map(|disk| disk.owners(&ranges, SAVED_FILES_MAX)),
            Err(_) => None,
        };
        let counter = if attributed.is_some() {
            &self.attributed
        } else {
            &self.unattributed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        attributed
    }

    /// The map brought up to date with everything saved so far and with
    /// `unflushed` byte ranges (written, not yet flushed).
    pub fn current(&self, unflushed: &[(u64, u64)]) -> MutexGuard<'_, Option<DiskMap>> {
        let mut map = self.map.lock().expect("file map lock");
        let pending = std::mem::take(&mut *self.pending.lock().expect("pending lock"));
        let started = Instant::now();
        match map.as_mut() {
            Some(disk) if !pending.overflowed => {
                let mut ranges = pending.ranges;
                ranges.extend_from_slice(unflushed);
                if disk.needs_rebuild(&ranges) {
                    *map = Some(self.build());
                    return map;
                }
                match disk.update(Arc::clone(&self.image), &ranges) {
                    Ok(inodes) => {
                        self.last_update_inodes
                            .store(inodes as u64, Ordering::Relaxed);
                        self.last_update_us
                            .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "file map update failed; rebuilding it");
                        *map = Some(self.build());
                    }
                }
            }
            _ => *map = Some(self.build()),
        }
        map
    }

    fn build(&self) -> DiskMap {
        let started = Instant::now();
        let disk = DiskMap::build(Arc::clone(&self.image), self.size_bytes);
        self.build_ms
            .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        for note in &disk.notes {
            tracing::info!("file map: {note}");
        }
        disk
    }

    fn path_of(&self, generation: u64) -> PathBuf {
        self.maps_dir.join(format!("{generation:016}.map"))
    }

    /// Saves `disk` as the map at the checkpoint closing `generation`
    /// (written aside, synced, renamed: a crash leaves the old or the new).
    pub fn save(&self, generation: u64, disk: &DiskMap) -> io::Result<()> {
        let path = self.path_of(generation);
        let temporary = path.with_extension("tmp");
        let mut file = File::create(&temporary)?;
        file.write_all(&disk.encode())?;
        file.sync_all()?;
        std::fs::rename(&temporary, &path)?;
        File::open(&self.maps_dir)?.sync_all()
    }

    /// The map saved at the checkpoint closing `generation`: None when no
    /// map was saved then, an error when the saved one is damaged.
    pub fn load(&self, generation: u64) -> Result<Option<DiskMap>, String> {
        let bytes = match std::fs::read(self.path_of(generation)) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(format!("reading the saved file map: {error}")),
        };
        DiskMap::decode(&bytes)
            .map(Some)
            .map_err(|error| error.to_string())
    }

    pub fn remove(&self, generation: u64) {
        let _ = std::fs::remove_file(self.path_of(generation));
    }

    pub fn stats(&self) -> FileMapStats {
        FileMapStats {
            build_ms: self.build_ms.load(Ordering::Relaxed),
            last_update_us: self.last_update_us.load(Ordering::Relaxed),
            last_update_inodes: self.last_update_inodes.load(Ordering::Relaxed),
            attributed_flushes: self.attributed.load(Ordering::Relaxed),
            unattributed_flushes: self.unattributed.load(Ordering::Relaxed),
        }
    }
}

/// The file map follows the tracker's generations: saved regions queue
/// for its next update, the journal thread asks it for owners, a
/// checkpoint brings it current before the switch and saves it after,
/// and a deleted checkpoint's saved map goes with it.
impl GenerationHook for FileMap {
    fn saved(&self, runs: &[RegionRun]) {
        self.note_saved(runs);
    }

    fn annotate_saved(&self, runs: &[RegionRun]) -> Option<SavedFiles> {
        self.attribute(runs)
    }

    fn before_switch<'a>(&'a self, unflushed: &[(u64, u64)]) -> Option<AfterSwitch<'a>> {
        let map = self.current(unflushed);
        Some(Box::new(move |checkpoint: &Checkpoint| {
            if let Some(disk) = map.as_ref()
                && let Err(error) = self.save(checkpoint.generation, disk)
            {
                tracing::warn!(%error, "could not save the file map at checkpoint {}", checkpoint.name);
            }
        }))
    }

    fn checkpoint_deleted(&self, deleted: &Checkpoint) {
        self.remove(deleted.generation);
    }
}

/// Per-file changes of one filesystem on the disk.
#[derive(Debug, Clone)]
pub struct FilesystemChanges {
    pub partition: u32,
    pub start_bytes: u64,
    pub block_size: u64,
    pub changes: FsChanges,
}

/// What `changes --files` answers.
#[derive(Debug, Clone)]
pub struct FileReport {
    pub filesystems: Vec<FilesystemChanges>,
    /// Disk byte ranges a copy under the criteria takes: the selected
    /// files' changed blocks, every changed metadata block, and every
    /// changed byte outside the mapped filesystems.
    pub copy_ranges: Vec<(u64, u64)>,
    pub criteria: Criteria,
    pub notes: Vec<String>,
}

impl FileReport {
    pub fn new(
        new: &DiskMap,
        old: Option<&DiskMap>,
        changed: &[(u64, u64)],
        criteria: &Criteria,
        notes: Vec<String>,
    ) -> FileReport {
        let mut copy_ranges = outside_filesystems(new, changed);
        let mut filesystems = Vec::new();
        for (mapped, changes) in new.diff(old, changed) {
            for (start, count) in select::copy_blocks(&changes, criteria) {
                copy_ranges.push(mapped.bytes_of(start, count));
            }
            filesystems.push(FilesystemChanges {
                partition: mapped.partition,
                start_bytes: mapped.start_bytes,
                block_size: mapped.map.block_size,
                changes,
            });
        }
        FileReport {
            filesystems,
            copy_ranges: fsmap::diff::merge_runs(copy_ranges),
            criteria: criteria.clone(),
            notes,
        }
    }

    /// The changes to list: all of them, or those whose paths and size
    /// meet the criteria.
    pub fn listed(&self) -> impl Iterator<Item = (&FilesystemChanges, &FileChange)> {
        self.filesystems.iter().flat_map(move |fs| {
            fs.changes
                .files
                .iter()
                .filter(move |change| self.criteria.is_empty() || self.criteria.matches(change))
                .map(move |change| (fs, change))
        })
    }
}

/// The parts of `changed` that no mapped filesystem covers.
fn outside_filesystems(disk: &DiskMap, changed: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(offset, length) in changed {
        let mut pieces = vec![(offset, offset + length)];
        for mapped in &disk.filesystems {
            let (fs_start, fs_end) = (mapped.start_bytes, mapped.start_bytes + mapped.length_bytes);
            pieces = pieces
                .into_iter()
                .flat_map(|(start, end)| {
                    let mut kept = Vec::new();
                    if start < fs_start.min(end) {
                        kept.push((start, fs_start.min(end)));
                    }
                    if end > fs_end.max(start) {
                        kept.push((fs_end.max(start), end));
                    }
                    kept
                })
                .collect();
        }
        out.extend(pieces.into_iter().map(|(start, end)| (start, end - start)));
    }
    out
}
