//! `Snapshot`: the disk as it was at the snapshot's checkpoint, as a
//! read-only storage `BlockBackend` (so it can be served as an NBD export
//! and read by the copier). A region copied out is read from the store,
//! any other from the live disk.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use backend::{BlockBackend, Extent, ZeroError, ZeroRequest};
use tracker::Tracker;
use tracker::regions::{Granularity, RegionRun};

use super::store::{Refusal, Store};

/// What status reports of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotStatus {
    pub name: String,
    /// The generation the snapshot's checkpoint closed.
    pub generation: u64,
    /// Why the snapshot was dropped, once it was: reads fail from then on.
    pub broken: Option<String>,
    pub released: bool,
    pub store_path: PathBuf,
    /// Old contents copied out so far.
    pub store_bytes: u64,
    pub store_bytes_max: u64,
    pub regions_copied: u64,
}

pub struct Snapshot {
    pub(crate) name: String,
    pub(crate) generation: u64,
    pub(crate) size_bytes: u64,
    pub(crate) granularity: Granularity,
    pub(crate) store: Arc<Store>,
    /// The storage under the tracking layer.
    pub(crate) live: Arc<dyn BlockBackend>,
    /// Weak: the tracker holds the manager (a hook) that holds this.
    pub(crate) tracker: Weak<Tracker>,
    /// The dirty-bitmap contexts' extents, computed once each (what
    /// changed up to the snapshot's checkpoint never changes again).
    pub(crate) dirty: super::metadata::DirtyCache,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("name", &self.name)
            .field("generation", &self.generation)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// Consecutive regions read from one place: the disk, or consecutive
/// bytes of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    first_region: u64,
    region_count: u64,
    store_offset: Option<u64>,
}

impl Snapshot {
    /// The name of the snapshot's checkpoint.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The generation the snapshot's checkpoint closed.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Why the snapshot was dropped (the store's limit, a copy-out past
    /// its bound, an I/O error, its checkpoint deleted), if it was.
    pub fn is_broken(&self) -> Option<String> {
        self.store.broken()
    }

    pub fn is_released(&self) -> bool {
        self.store.refusal() == Some(Refusal::Released)
    }

    pub fn store_path(&self) -> &Path {
        self.store.path()
    }

    pub fn status(&self) -> SnapshotStatus {
        let usage = self.store.usage();
        SnapshotStatus {
            name: self.name.clone(),
            generation: self.generation,
            broken: self.is_broken(),
            released: self.is_released(),
            store_path: self.store.path().to_path_buf(),
            store_bytes: usage.copied_bytes,
            store_bytes_max: self.store.limits().store_bytes_max,
            regions_copied: usage.copied_regions,
        }
    }

    /// Steps 3 of the read path (see `read_at`): where the regions of
    /// `run` are copied out now, given where they were (`before`) when the
    /// caller started reading the live disk. A region not copied out at
    /// either time was not written in between; one the tracker shows
    /// marked and still not copied out ends the snapshot.
    /// A region the snapshot no longer keeps (`Store::keep_only`) may
    /// have been written without a copy-out: with `released_ok` it stays
    /// None (the caller answers for it without its bytes), else the read
    /// fails.
    pub(crate) fn settle(
        &self,
        run: RegionRun,
        before: &[Option<u64>],
        released_ok: bool,
    ) -> io::Result<Vec<Option<u64>>> {
        let tracker = self.tracker.upgrade().ok_or_else(|| {
            io::Error::other(format!("snapshot {:?}: its server stopped", self.name))
        })?;
        // The marks before the index: a copy-out is recorded before its
        // region's mark is set, so a mark seen here set by a first touch
        // comes with its copy-out seen below.
        let marked: Vec<bool> = (run.first_region..)
            .zip(before)
            .map(|(region, before)| {
                let (start, length) = self.region_bytes(region);
                before.is_none() && tracker.is_marked(start, length)
            })
            .collect();
        let after = self
            .store
            .copied_offsets(run)
            .map_err(|r| self.refused(r))?;
        for (region, (marked, after)) in (run.first_region..).zip(marked.iter().zip(&after)) {
            if *marked && after.is_none() {
                if self.store.is_released(region) {
                    if released_ok {
                        continue;
                    }
                    return Err(self.not_kept(region));
                }
                return Err(self.written_unseen(region));
            }
        }
        Ok(after)
    }

    /// Keeps only the regions of the byte ranges `extents` (and those
    /// copied out already): see `Store::keep_only`. Returns how many
    /// regions are kept.
    pub fn keep_only(&self, extents: &[(u64, u64)]) -> io::Result<u64> {
        let mut runs = Vec::with_capacity(extents.len());
        for &(offset, length) in extents {
            if offset
                .checked_add(length)
                .is_none_or(|end| end > self.size_bytes)
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "bytes {offset}+{length} are past the end of the {}-byte disk",
                        self.size_bytes
                    ),
                ));
            }
            if length > 0 {
                runs.push(self.granularity.run_of(offset, length));
            }
        }
        Ok(self.store.keep_only(&runs))
    }

    /// A read of a region the snapshot no longer keeps.
    fn not_kept(&self, region: u64) -> io::Error {
        let (start, length) = self.region_bytes(region);
        io::Error::other(format!(
            "snapshot {:?} no longer keeps region {region} (bytes {start}..{}): the copy that holds it does not read it, so its old contents were not preserved",
            self.name,
            start + length
        ))
    }

    pub(crate) fn refused(&self, refusal: Refusal) -> io::Error {
        io::Error::other(match refusal {
            Refusal::Broken(reason) => format!(
                "snapshot {:?} is broken: {reason}; a copy from it cannot go on",
                self.name
            ),
            Refusal::Released => format!("snapshot {:?} was released", self.name),
        })
    }

    /// A region marked in the current generation but never copied out:
    /// it may have been written, so the snapshot is over.
    fn written_unseen(&self, region: u64) -> io::Error {
        let (start, length) = self.region_bytes(region);
        self.store.break_with(format!(
            "region {region} (bytes {start}..{}) was written without a copy-out: checkpoint {:?} was deleted while the snapshot was open",
            start + length,
            self.name
        ));
        self.refused(self.store.refusal().unwrap_or(Refusal::Released))
    }

    /// The byte range of a region, cut at the end of the image.
    pub(crate) fn region_bytes(&self, region: u64) -> (u64, u64) {
        let (start, length) = self.granularity.byte_range(RegionRun {
            first_region: region,
            region_count: 1,
        });
        (start, length.min(self.size_bytes - start))
    }

    /// The regions of `run` grouped by where they are read from.
    fn pieces(&self, run: RegionRun, sources: &[Option<u64>]) -> Vec<Piece> {
        let mut pieces: Vec<Piece> = Vec::new();
        for (region, source) in (run.first_region..).zip(sources) {
            if let Some(last) = pieces.last_mut() {
                let follows = match (last.store_offset, source) {
                    (None, None) => true,
                    // Only the image's last region is shorter, and nothing
                    // follows it: whole regions before.
                    (Some(first), Some(next)) => {
                        *next == first + last.region_count * self.granularity.bytes()
                    }
                    _ => false,
                };
                if follows {
                    last.region_count += 1;
                    continue;
                }
            }
            pieces.push(Piece {
                first_region: region,
                region_count: 1,
                store_offset: *source,
            });
        }
        pieces
    }

    /// Fills the part of `buf` (which starts at `offset`) that `piece` covers.
    fn read_piece(&self, buf: &mut [u8], offset: u64, piece: Piece) -> io::Result<()> {
        let (piece_start, piece_length) = self.granularity.byte_range(RegionRun {
            first_region: piece.first_region,
            region_count: piece.region_count,
        });
        let start = piece_start.max(offset);
        let end = (piece_start + piece_length).min(offset + buf.len() as u64);
        let target = &mut buf[(start - offset) as usize..(end - offset) as usize];
        match piece.store_offset {
            None => self.live.read_at(target, start),
            Some(_) => self
                .store
                .read_copied(
                    target,
                    RegionRun {
                        first_region: piece.first_region,
                        region_count: piece.region_count,
                    },
                    start - piece_start,
                )
                .map_err(|error| {
                    io::Error::new(
                        error.kind(),
                        format!(
                            "snapshot {:?}: reading its store {}: {error}",
                            self.name,
                            self.store.path().display()
                        ),
                    )
                }),
        }
    }
}

impl BlockBackend for Snapshot {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn is_read_only(&self) -> bool {
        true
    }

    /// Every connection reads the same snapshot.
    fn can_multi_conn(&self) -> bool {
        true
    }

    /// The snapshot's bytes, race-free against first writes of the disk
    /// (seqlock style):
    ///
    /// 1. under the store's lock, note which regions are copied out;
    /// 2. read those from the store, the others from the live disk;
    /// 3. under the lock again, re-check the regions read live: any copied
    ///    out meanwhile is read again from the store.
    ///
    /// Why a region read live and still not copied out at step 3 read the
    /// snapshot's bytes: a write to it is issued only after its copy-out
    /// was recorded under this lock (the tracker calls the hook before the
    /// mark, the mark before the write), so that write comes after our
    /// step 3, which comes after our live read returned. A region copied
    /// out is never written in the store again, so what steps 2 and 3 read
    /// there stays right. A broken or released snapshot fails the read at
    /// step 3 as at step 1: after a break, writes go on without copy-out.
    ///
    /// One more check before step 3 catches a write that reached a region
    /// without any copy-out: the only way is the snapshot's own checkpoint
    /// deleted while open (its pin removed by hand), which merges its
    /// changes into the current generation's marks without calling the
    /// hook. A region read live that the tracker showed marked before step
    /// 3 and that step 3 finds not copied out breaks the snapshot (a first
    /// touch records its copy-out before its mark is set, so it never
    /// looks like this). Until the delete's own `checkpoint_deleted`
    /// breaks the snapshot, no checkpoint can clear those marks (the
    /// delete holds the tracker's operations lock).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let length_bytes = buf.len() as u64;
        if offset
            .checked_add(length_bytes)
            .is_none_or(|end| end > self.size_bytes)
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if length_bytes == 0 {
            return self
                .store
                .refusal()
                .map_or(Ok(()), |r| Err(self.refused(r)));
        }
        let run = self.granularity.run_of(offset, length_bytes);
        if let Some(index) = self.store.released_in(run).iter().position(|&r| r) {
            return Err(self.not_kept(run.first_region + index as u64));
        }
        let before = self
            .store
            .copied_offsets(run)
            .map_err(|r| self.refused(r))?;
        for piece in self.pieces(run, &before) {
            self.read_piece(buf, offset, piece)?;
        }
        if before.iter().all(Option::is_some) {
            return Ok(());
        }
        let after = self.settle(run, &before, false)?;
        for (index, region) in (run.first_region..run.first_region + run.region_count).enumerate() {
            match (before[index], after[index]) {
                (Some(_), _) => {}
                (None, Some(store_offset)) => {
                    let piece = Piece {
                        first_region: region,
                        region_count: 1,
                        store_offset: Some(store_offset),
                    };
                    self.read_piece(buf, offset, piece)?;
                }
                (None, None) => {}
            }
        }
        Ok(())
    }

    fn can_extents(&self) -> bool {
        self.live.can_extents()
    }

    fn extents(
        &self,
        offset: u64,
        length: u64,
        max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        self.allocation_extents(offset, length, max_extents, out)
    }

    fn meta_contexts(&self) -> Vec<String> {
        self.dirty_context_names()
    }

    fn context_extents(
        &self,
        context: &str,
        offset: u64,
        length: u64,
        max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        self.dirty_extents(context, offset, length, max_extents, out)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    /// Nothing is ever written, so nothing waits to be made durable.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, _offset: u64, _length: u64, _fua: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    fn write_zeroes(
        &self,
        _offset: u64,
        _length: u64,
        _request: ZeroRequest,
    ) -> Result<(), ZeroError> {
        Err(ZeroError::Io(io::Error::from_raw_os_error(libc::EPERM)))
    }
}
