//! The copy-before-write store: the old contents of every region the disk
//! wrote after the snapshot's checkpoint, in one file, and the copy
//! threads that fill it.
//!
//! Layout: `STATE/snapshots/NAME.cbw` holds whole regions (the last region
//! of the image may be shorter) appended in the order they were claimed,
//! with no header; the index (region -> offset in the file, and the
//! crc32c of the region's bytes taken when they were read from the disk)
//! lives in memory only. Every read of the store checks whole regions
//! against their crc32c, so bytes damaged in the file between copy-out
//! and copy fail the copy (and break the snapshot) instead of reaching a
//! backup. Nothing is synced: a server that stops or
//! crashes loses the index, and the next start removes the file (there is
//! nothing to resume, so a copy reading the snapshot fails). See
//! docs/journal.md, "Snapshots (copy-before-write)".
//!
//! A first touch claims the regions nobody copies yet (`Copying`, with
//! their place in the file reserved against the bound), queues them as
//! jobs and waits, at most `copy_out_timeout`, until each region of its run
//! is `Copied`, whoever copies it. A copy thread reads the regions from the
//! live disk, writes them to the file, and only then records them
//! `Copied`. Copying on threads of its own is what makes the wait
//! boundable: a device read that never returns holds a copy thread, never
//! the disk's write, which breaks the snapshot when the bound passes and
//! goes on.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use backend::BlockBackend;
use tracker::regions::{Granularity, RegionRun};

use super::SnapshotLimits;

/// Copy threads per snapshot. Copy-outs wait for the device (a read of the
/// disk, a write to the page cache), not for a core, so a few run at once
/// even on a small machine; more would only queue at the device.
pub(crate) const COPY_THREADS: usize = 4;

/// Largest job one copy thread reads and writes at once (or one region,
/// when regions are larger): bounds each thread's buffer, and splits a
/// large first touch (a big trim) across the threads.
const JOB_BYTES_MAX: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Claimed by a first touch; its place in the file is reserved.
    Copying { store_offset: u64 },
    /// Its old contents are in the file at `store_offset`, with crc32c
    /// `crc`; never changes again while the snapshot lives.
    Copied { store_offset: u64, crc: u32 },
}

/// Consecutive claimed regions, consecutive in the file too.
#[derive(Debug, Clone, Copy)]
struct Job {
    first_region: u64,
    region_count: u64,
    store_offset: u64,
    length_bytes: u64,
}

#[derive(Debug, Default)]
struct State {
    index: HashMap<u64, Slot>,
    /// Bytes of the file handed out to claimed regions (copied or not).
    reserved_bytes: u64,
    copied_bytes: u64,
    copied_regions: u64,
    jobs: VecDeque<Job>,
    broken: Option<String>,
    /// Released (or dropped): copy threads exit, reads are refused.
    closed: bool,
    /// Copy threads between taking a job and recording its end.
    busy_threads: usize,
    /// The regions the snapshot still keeps, as sorted disjoint runs
    /// (`keep_only`); None: all of them. A region outside that is not
    /// copied out is no longer copied out at its first write, and reading
    /// it fails: it may have been written since.
    kept: Option<Vec<RegionRun>>,
}

impl State {
    /// Whether `region` is released: outside the kept runs and not
    /// copied out (a copied-out region keeps its old contents whatever
    /// is released).
    fn is_released(&self, region: u64) -> bool {
        let Some(kept) = &self.kept else {
            return false;
        };
        if matches!(self.index.get(&region), Some(Slot::Copied { .. })) {
            return false;
        }
        let at = kept.partition_point(|run| run.first_region + run.region_count <= region);
        kept.get(at).is_none_or(|run| run.first_region > region)
    }
}

impl State {
    fn refusal(&self) -> Option<Refusal> {
        if self.closed {
            Some(Refusal::Released)
        } else {
            self.broken.clone().map(Refusal::Broken)
        }
    }
}

/// Why the store no longer answers for the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    Broken(String),
    Released,
}

/// Usage figures, for status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) copied_bytes: u64,
    pub(crate) copied_regions: u64,
}

pub(crate) struct Store {
    path: PathBuf,
    file: File,
    /// The storage under the tracking layer: reads of it see the disk as
    /// its writes left it, and never enter the tracker's gate.
    live: Arc<dyn BlockBackend>,
    size_bytes: u64,
    granularity: Granularity,
    limits: SnapshotLimits,
    state: Mutex<State>,
    /// A job finished, or the store broke or closed: first touches re-check.
    copied: Condvar,
    /// A job was queued, or the store broke or closed: copy threads look.
    work: Condvar,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Creates (or truncates: one snapshot at a time, so a file of that
    /// name is a leftover) the store file and starts its copy threads.
    pub(crate) fn create(
        path: PathBuf,
        live: Arc<dyn BlockBackend>,
        granularity: Granularity,
        limits: SnapshotLimits,
    ) -> io::Result<Arc<Store>> {
        use std::os::unix::fs::OpenOptionsExt;
        // The store holds disk contents: only the owner reads it.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)?;
        let store = Arc::new(Store {
            path,
            file,
            size_bytes: live.size_bytes(),
            live,
            granularity,
            limits,
            state: Mutex::new(State::default()),
            copied: Condvar::new(),
            work: Condvar::new(),
            threads: Mutex::new(Vec::with_capacity(COPY_THREADS)),
        });
        for _ in 0..COPY_THREADS {
            let worker = Arc::clone(&store);
            let spawned = std::thread::Builder::new()
                .name("snapshot-copy".into())
                .spawn(move || worker.run_copy_thread());
            match spawned {
                Ok(thread) => store
                    .threads
                    .lock()
                    .expect("copy threads lock")
                    .push(thread),
                Err(error) => {
                    store.close();
                    let _ = std::fs::remove_file(&store.path);
                    return Err(error);
                }
            }
        }
        Ok(store)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn granularity(&self) -> Granularity {
        self.granularity
    }

    pub(crate) fn limits(&self) -> SnapshotLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("snapshot store lock")
    }

    /// Bytes of `region`: a whole region, or what is left of the image.
    fn region_length(&self, region: u64) -> u64 {
        let (start, length) = self.granularity.byte_range(RegionRun {
            first_region: region,
            region_count: 1,
        });
        length.min(self.size_bytes - start)
    }

    /// Before the first write of `run` in a generation: returns once every
    /// region of it is copied out, or the snapshot broke (the bound, the
    /// store's limit, an I/O error) or closed. Never fails: the write goes
    /// on whatever happens here.
    pub(crate) fn copy_out(&self, run: RegionRun) {
        let deadline = Instant::now() + self.limits.copy_out_timeout;
        let mut state = self.lock();
        if state.refusal().is_some() {
            return;
        }
        let Some(mut awaited) = self.claim(&mut state, run) else {
            return;
        };
        loop {
            awaited.retain(|region| !matches!(state.index.get(region), Some(Slot::Copied { .. })));
            if awaited.is_empty() || state.refusal().is_some() {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                let (start, length) = self.granularity.byte_range(RegionRun {
                    first_region: awaited[0],
                    region_count: 1,
                });
                let reason = format!(
                    "the copy-out of region {} (bytes {start}..{}) did not finish within {:?}; the disk's write went on",
                    awaited[0],
                    start + length,
                    self.limits.copy_out_timeout
                );
                self.break_locked(&mut state, reason);
                return;
            }
            state = self
                .copied
                .wait_timeout(state, deadline - now)
                .expect("snapshot store lock")
                .0;
        }
    }

    /// Claims the regions of `run` nobody copies yet and queues them;
    /// returns the regions to wait for (claimed here or by another first
    /// touch), or None when the store's limit broke the snapshot.
    fn claim(&self, state: &mut State, run: RegionRun) -> Option<Vec<u64>> {
        let mut awaited = Vec::new();
        let mut job: Option<Job> = None;
        for region in run.first_region..run.first_region + run.region_count {
            if state.is_released(region) {
                state.jobs.extend(job.take());
                continue;
            }
            match state.index.get(&region) {
                Some(Slot::Copied { .. }) => {
                    state.jobs.extend(job.take());
                }
                Some(Slot::Copying { .. }) => {
                    state.jobs.extend(job.take());
                    awaited.push(region);
                }
                None => {
                    let length_bytes = self.region_length(region);
                    if state.reserved_bytes + length_bytes > self.limits.store_bytes_max {
                        let reason = format!(
                            "the copy-before-write store reached its limit of {} bytes ({} regions copied out); take the snapshot again with a larger store limit",
                            self.limits.store_bytes_max, state.copied_regions
                        );
                        self.break_locked(state, reason);
                        return None;
                    }
                    let store_offset = state.reserved_bytes;
                    state.reserved_bytes += length_bytes;
                    state.index.insert(region, Slot::Copying { store_offset });
                    awaited.push(region);
                    job = match job {
                        Some(mut growing)
                            if growing.length_bytes + length_bytes <= JOB_BYTES_MAX =>
                        {
                            debug_assert_eq!(growing.first_region + growing.region_count, region);
                            debug_assert_eq!(
                                growing.store_offset + growing.length_bytes,
                                store_offset
                            );
                            growing.region_count += 1;
                            growing.length_bytes += length_bytes;
                            Some(growing)
                        }
                        full => {
                            state.jobs.extend(full);
                            Some(Job {
                                first_region: region,
                                region_count: 1,
                                store_offset,
                                length_bytes,
                            })
                        }
                    };
                }
            }
        }
        state.jobs.extend(job);
        if !state.jobs.is_empty() {
            self.work.notify_all();
        }
        Some(awaited)
    }

    /// From now on the snapshot keeps only the regions of `runs` (and
    /// those already copied out): the others are no longer copied out at
    /// their first write, and reading them fails. Only narrows: a region
    /// released once may have been written since, so a later call cannot
    /// keep it again. Returns how many regions the kept runs hold.
    pub(crate) fn keep_only(&self, runs: &[RegionRun]) -> u64 {
        let mut wanted: Vec<RegionRun> = runs
            .iter()
            .copied()
            .filter(|run| run.region_count > 0)
            .collect();
        wanted.sort_by_key(|run| run.first_region);
        let mut merged: Vec<RegionRun> = Vec::with_capacity(wanted.len());
        for run in wanted {
            match merged.last_mut() {
                Some(last) if run.first_region <= last.first_region + last.region_count => {
                    let end = (last.first_region + last.region_count)
                        .max(run.first_region + run.region_count);
                    last.region_count = end - last.first_region;
                }
                _ => merged.push(run),
            }
        }
        let mut state = self.lock();
        let kept = match &state.kept {
            None => merged,
            Some(old) => intersect(old, &merged),
        };
        let count = kept.iter().map(|run| run.region_count).sum();
        state.kept = Some(kept);
        count
    }

    pub(crate) fn is_released(&self, region: u64) -> bool {
        self.lock().is_released(region)
    }

    /// The kept runs (`keep_only`) within `run`, sorted; None when the
    /// snapshot keeps every region. Regions outside them are released
    /// for good, or copied out.
    pub(crate) fn kept_in(&self, run: RegionRun) -> Option<Vec<RegionRun>> {
        let state = self.lock();
        let kept = state.kept.as_ref()?;
        Some(intersect(kept, &[run]))
    }

    /// For each region of `run`: whether the snapshot released it.
    pub(crate) fn released_in(&self, run: RegionRun) -> Vec<bool> {
        let state = self.lock();
        (run.first_region..run.first_region + run.region_count)
            .map(|region| state.is_released(region))
            .collect()
    }

    /// Breaks the snapshot (the first reason stays): queued jobs are
    /// dropped and everyone waiting goes on.
    pub(crate) fn break_with(&self, reason: String) {
        let mut state = self.lock();
        self.break_locked(&mut state, reason);
    }

    fn break_locked(&self, state: &mut State, reason: String) {
        if state.broken.is_none() && !state.closed {
            tracing::warn!(store = %self.path.display(), %reason, "snapshot broken");
            state.broken = Some(reason);
        }
        state.jobs.clear();
        self.copied.notify_all();
        self.work.notify_all();
    }

    /// Release: first touches go on, reads are refused, copy threads
    /// exit. When none is in the middle of a job they are joined (so the
    /// disk's backend is let go of by the time this returns); a thread in
    /// a job may be stuck in a device read, so then nobody waits for them
    /// and each exits once its I/O returns.
    pub(crate) fn close(&self) {
        let idle = {
            let mut state = self.lock();
            state.closed = true;
            state.jobs.clear();
            self.copied.notify_all();
            self.work.notify_all();
            // Closed with none busy: no thread takes a job again, so the
            // joins below wait for no I/O.
            state.busy_threads == 0
        };
        let threads = std::mem::take(&mut *self.threads.lock().expect("copy threads lock"));
        if idle {
            for thread in threads {
                if thread.join().is_err() {
                    tracing::warn!(store = %self.path.display(), "a snapshot copy thread panicked");
                }
            }
        }
    }

    pub(crate) fn remove_file(&self) -> io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            result => result,
        }
    }

    fn run_copy_thread(&self) {
        let mut buffer = Vec::new();
        while let Some(job) = self.next_job() {
            buffer.resize(job.length_bytes as usize, 0);
            let result = self.copy(&job, &mut buffer);
            self.finish(&job, result);
        }
    }

    /// The crc32c of each region of `job`, whose bytes `buffer` holds.
    fn region_crcs(&self, job: &Job, buffer: &[u8]) -> Vec<u32> {
        let mut crcs = Vec::with_capacity(job.region_count as usize);
        let mut start = 0;
        for region in job.first_region..job.first_region + job.region_count {
            let end = start + self.region_length(region) as usize;
            crcs.push(crc32c::crc32c(&buffer[start..end]));
            start = end;
        }
        crcs
    }

    /// The next queued job, or None once the store is closed.
    fn next_job(&self) -> Option<Job> {
        let mut state = self.lock();
        loop {
            if state.closed {
                return None;
            }
            if let Some(job) = state.jobs.pop_front() {
                state.busy_threads += 1;
                return Some(job);
            }
            state = self.work.wait(state).expect("snapshot store lock");
        }
    }

    fn copy(&self, job: &Job, buffer: &mut [u8]) -> Result<Vec<u32>, String> {
        let (disk_offset, _) = self.granularity.byte_range(RegionRun {
            first_region: job.first_region,
            region_count: job.region_count,
        });
        let end = disk_offset + job.length_bytes;
        self.live.read_at(buffer, disk_offset).map_err(|error| {
            format!("reading bytes {disk_offset}..{end} of the disk for copy-out: {error}")
        })?;
        let crcs = self.region_crcs(job, buffer);
        self.file
            .write_all_at(buffer, job.store_offset)
            .map_err(|error| {
                format!(
                    "writing bytes {disk_offset}..{end} to the copy-before-write store {}: {error}",
                    self.path.display()
                )
            })?;
        Ok(crcs)
    }

    fn finish(&self, job: &Job, result: Result<Vec<u32>, String>) {
        let mut state = self.lock();
        state.busy_threads -= 1;
        match result {
            Ok(crcs) => {
                let mut store_offset = job.store_offset;
                for (region, crc) in (job.first_region..).zip(crcs) {
                    let slot = state.index.get_mut(&region);
                    assert_eq!(
                        slot.as_deref(),
                        Some(&Slot::Copying { store_offset }),
                        "region {region} of a copy job"
                    );
                    if let Some(slot) = slot {
                        *slot = Slot::Copied { store_offset, crc };
                    }
                    store_offset += self.region_length(region);
                }
                state.copied_bytes += job.length_bytes;
                state.copied_regions += job.region_count;
                self.copied.notify_all();
            }
            Err(reason) => self.break_locked(&mut state, reason),
        }
    }

    /// For each region of `run`: where the file holds its old contents, or
    /// None (read it from the disk). Refused once broken or released.
    pub(crate) fn copied_offsets(&self, run: RegionRun) -> Result<Vec<Option<u64>>, Refusal> {
        let state = self.lock();
        if let Some(refusal) = state.refusal() {
            return Err(refusal);
        }
        Ok((run.first_region..run.first_region + run.region_count)
            .map(|region| match state.index.get(&region) {
                Some(Slot::Copied { store_offset, .. }) => Some(*store_offset),
                Some(Slot::Copying { .. }) | None => None,
            })
            .collect())
    }

    /// Reads bytes of the `Copied` regions `run` (consecutive in the file
    /// too) into `target`, which starts `skip` bytes into the run. Each
    /// region is checked against its crc32c, whole: one the target covers
    /// only in part is read whole into a scratch buffer first. A mismatch
    /// breaks the snapshot and fails the read with InvalidData.
    pub(crate) fn read_copied(
        &self,
        target: &mut [u8],
        run: RegionRun,
        skip: u64,
    ) -> io::Result<()> {
        let slots: Vec<(u64, u64, u32)> = {
            let state = self.lock();
            (run.first_region..run.first_region + run.region_count)
                .map(|region| match state.index.get(&region) {
                    Some(Slot::Copied { store_offset, crc }) => {
                        Ok((*store_offset, self.region_length(region), *crc))
                    }
                    _ => Err(io::Error::other(format!(
                        "snapshot store {}: region {region} is not copied out",
                        self.path.display()
                    ))),
                })
                .collect::<io::Result<_>>()?
        };
        let wanted = skip..skip + target.len() as u64;
        let mut region_start = 0;
        let mut scratch = Vec::new();
        for ((store_offset, length, crc), region) in slots.into_iter().zip(run.first_region..) {
            let region_end = region_start + length;
            let (from, to) = (wanted.start.max(region_start), wanted.end.min(region_end));
            if from < to {
                let into = (from - wanted.start) as usize..(to - wanted.start) as usize;
                let whole = from == region_start && to == region_end;
                let bytes = if whole {
                    &mut target[into.clone()]
                } else {
                    scratch.resize(length as usize, 0);
                    &mut scratch[..]
                };
                self.file.read_exact_at(bytes, store_offset)?;
                if crc32c::crc32c(bytes) != crc {
                    return Err(self.damaged(region));
                }
                if !whole {
                    let part = (from - region_start) as usize..(to - region_start) as usize;
                    target[into].copy_from_slice(&scratch[part]);
                }
            }
            region_start = region_end;
        }
        Ok(())
    }

    /// A region whose stored bytes no longer match their crc32c.
    fn damaged(&self, region: u64) -> io::Error {
        let reason = format!(
            "the copy-before-write store {} was damaged: region {region}'s old contents no longer match the checksum taken at copy-out",
            self.path.display()
        );
        self.break_with(reason.clone());
        io::Error::new(io::ErrorKind::InvalidData, reason)
    }

    pub(crate) fn refusal(&self) -> Option<Refusal> {
        self.lock().refusal()
    }

    pub(crate) fn broken(&self) -> Option<String> {
        self.lock().broken.clone()
    }

    pub(crate) fn usage(&self) -> Usage {
        let state = self.lock();
        Usage {
            copied_bytes: state.copied_bytes,
            copied_regions: state.copied_regions,
        }
    }
}

/// The regions in both sorted, disjoint run lists.
fn intersect(a: &[RegionRun], b: &[RegionRun]) -> Vec<RegionRun> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (a_end, b_end) = (
            a[i].first_region + a[i].region_count,
            b[j].first_region + b[j].region_count,
        );
        let start = a[i].first_region.max(b[j].first_region);
        let end = a_end.min(b_end);
        if start < end {
            out.push(RegionRun {
                first_region: start,
                region_count: end - start,
            });
        }
        if a_end <= b_end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(pairs: &[(u64, u64)]) -> Vec<RegionRun> {
        pairs
            .iter()
            .map(|&(first_region, region_count)| RegionRun {
                first_region,
                region_count,
            })
            .collect()
    }

    #[test]
    fn kept_runs_only_narrow() {
        let kept = intersect(&runs(&[(0, 10), (20, 5)]), &runs(&[(5, 20)]));
        assert_eq!(kept, runs(&[(5, 5), (20, 5)]));
        assert_eq!(intersect(&kept, &runs(&[(0, 100)])), kept);
        assert_eq!(intersect(&kept, &runs(&[(10, 10)])), runs(&[]));
        let mut state = State {
            kept: Some(runs(&[(5, 5), (20, 5)])),
            ..State::default()
        };
        let released: Vec<u64> = (0..30).filter(|&r| state.is_released(r)).collect();
        let expected: Vec<u64> = (0..5).chain(10..20).chain(25..30).collect();
        assert_eq!(released, expected);
        state.index.insert(
            12,
            Slot::Copied {
                store_offset: 0,
                crc: 0,
            },
        );
        assert!(!state.is_released(12), "copied out: its old contents stay");
    }
}
