//! Queries: changed extents between checkpoints, the files that own them,
//! the `qemu:dirty-bitmap:` contexts' extents, and status. None of them
//! changes tracking state.

use std::io;
use std::sync::Arc;

use roaring::RoaringBitmap;

use crate::error::QueryError;
use crate::files::FileReport;
use crate::regions::AtomicBitmap;
use crate::tracker::{CONTEXT_PREFIX, ClosedUnion, EXACT_CONTEXT_PREFIX, Tracker};
use fsmap::select::Criteria;

/// One changed extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangedExtent {
    pub offset_bytes: u64,
    pub length_bytes: u64,
    /// The last write to it was flushed.
    pub saved: bool,
    /// Only the written blocks (at the state's precision); false: whole
    /// regions, whose fine record was lost or never kept.
    pub exact: bool,
}

/// One generation's share of a changes query.
struct Generation {
    changed: RoaringBitmap,
    saved: RoaringBitmap,
    exact: RoaringBitmap,
    fine: RoaringBitmap,
}

/// Percentiles of the tracker's own work per flush (device syncs excluded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    pub flush_count: u64,
    pub work_ns_p50: u64,
    pub work_ns_p99: u64,
    pub work_ns_max: u64,
}

fn unknown(name: &str) -> QueryError {
    QueryError::UnknownCheckpoint {
        name: name.to_string(),
    }
}

impl Tracker {
    /// The current generation's changed regions, and those of them whose
    /// newest write is saved (saved and not written since).
    pub(crate) fn current_generation(&self) -> (RoaringBitmap, RoaringBitmap) {
        let as_bitmap = |bitmap: &AtomicBitmap| -> RoaringBitmap {
            bitmap.iter_set().map(|region| region as u32).collect()
        };
        let saved = as_bitmap(&self.saved) - as_bitmap(&self.written);
        (as_bitmap(&self.marked), saved)
    }

    /// Changed extents since checkpoint `since` (up to checkpoint `until`,
    /// or up to now), each with whether its last write was flushed.
    pub fn changes(
        &self,
        since: &str,
        until: Option<&str>,
    ) -> Result<Vec<ChangedExtent>, QueryError> {
        let checkpoints = self.checkpoints();
        let since_generation = checkpoints
            .iter()
            .find(|c| c.name == since)
            .ok_or_else(|| unknown(since))?
            .generation;
        let until_generation = match until {
            Some(until) => {
                let generation = checkpoints
                    .iter()
                    .find(|c| c.name == until)
                    .ok_or_else(|| unknown(until))?
                    .generation;
                if generation <= since_generation {
                    return Err(QueryError::BadRange {
                        since: since.to_string(),
                        until: until.to_string(),
                    });
                }
                Some(generation)
            }
            None => None,
        };
        // Newest generation first: it decides whether a region is saved.
        let mut generations: Vec<Generation> = Vec::new();
        if until_generation.is_none() {
            let (changed, saved) = self.current_generation();
            let (exact, fine) = self.fine.current(&changed);
            generations.push(Generation {
                changed,
                saved,
                exact,
                fine,
            });
        }
        for checkpoint in checkpoints.iter().rev() {
            let in_range = checkpoint.generation > since_generation
                && until_generation.is_none_or(|until| checkpoint.generation <= until);
            if in_range {
                generations.push(Generation {
                    changed: checkpoint.changed.clone(),
                    saved: checkpoint.saved.clone(),
                    exact: checkpoint.exact.clone(),
                    fine: checkpoint.fine.clone(),
                });
            }
        }
        let mut covered = RoaringBitmap::new();
        let mut saved = RoaringBitmap::new();
        // A region is exact only if every generation that changed it
        // recorded it completely.
        let mut inexact = RoaringBitmap::new();
        let mut fine = RoaringBitmap::new();
        for generation in &generations {
            let newly = &generation.changed - &covered;
            saved |= &newly & &generation.saved;
            covered |= &generation.changed;
            inexact |= &generation.changed - &generation.exact;
            fine |= &generation.fine;
        }
        Ok(self.extents_of(&covered, &saved, &inexact, &fine))
    }

    /// Bytes changed in the generation `checkpoint` closed: its written
    /// blocks where its record is exact, whole regions elsewhere.
    pub fn changed_bytes_of(&self, checkpoint: &crate::catalog::Checkpoint) -> u64 {
        let inexact = &checkpoint.changed - &checkpoint.exact;
        self.extents_of(
            &checkpoint.changed,
            &checkpoint.saved,
            &inexact,
            &checkpoint.fine,
        )
        .iter()
        .map(|extent| extent.length_bytes)
        .sum()
    }

    /// Which files changed since checkpoint `since` (up to `until`, or
    /// now): the maps saved at the checkpoints (or the current map)
    /// compared, with the changed regions as evidence.
    pub fn file_changes(
        &self,
        since: &str,
        until: Option<&str>,
        criteria: &Criteria,
    ) -> Result<FileReport, QueryError> {
        let extents = self.changes(since, until)?;
        let files = self.files.as_ref().ok_or(QueryError::NoFileMap)?;
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
                let file_map_error = |reason| QueryError::FileMap {
                    checkpoint: until.to_string(),
                    reason,
                };
                loaded = files
                    .load(generation_of(until))
                    .map_err(file_map_error)?
                    .ok_or_else(|| file_map_error("no file map was saved there".to_string()))?;
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

    /// Turns region sets into byte extents, merging neighbours of equal
    /// status: the written blocks of exact regions, whole inexact ones.
    fn extents_of(
        &self,
        changed: &RoaringBitmap,
        saved: &RoaringBitmap,
        inexact: &RoaringBitmap,
        fine: &RoaringBitmap,
    ) -> Vec<ChangedExtent> {
        let region_bytes = self.granularity.bytes();
        let mut extents: Vec<ChangedExtent> = Vec::new();
        let mut push = |offset_bytes: u64, length_bytes: u64, saved: bool, exact: bool| {
            let length_bytes = length_bytes.min(self.size_bytes.saturating_sub(offset_bytes));
            if length_bytes == 0 {
                return;
            }
            match extents.last_mut() {
                Some(last)
                    if last.offset_bytes + last.length_bytes == offset_bytes
                        && last.saved == saved
                        && last.exact == exact =>
                {
                    last.length_bytes += length_bytes;
                }
                _ => extents.push(ChangedExtent {
                    offset_bytes,
                    length_bytes,
                    saved,
                    exact,
                }),
            }
        };
        for region in changed.iter() {
            let is_saved = saved.contains(region);
            let blocks = (!inexact.contains(region))
                .then(|| self.fine.blocks_in(fine, region))
                .flatten();
            match blocks {
                Some(blocks) => {
                    for (offset_bytes, length_bytes) in blocks {
                        push(offset_bytes, length_bytes, is_saved, true);
                    }
                }
                None => push(
                    u64::from(region) * region_bytes,
                    region_bytes,
                    is_saved,
                    false,
                ),
            }
        }
        extents
    }

    /// NBD contexts: one `qemu:dirty-bitmap:NAME` per checkpoint, and
    /// with a fine record one `blockwatch:exact-dirty-bitmap:NAME`.
    pub fn context_names(&self) -> Vec<String> {
        let checkpoints = self.checkpoints();
        let mut names: Vec<String> = checkpoints
            .iter()
            .map(|c| format!("{CONTEXT_PREFIX}{}", c.name))
            .collect();
        if self.fine.is_enabled() {
            names.extend(
                checkpoints
                    .iter()
                    .map(|c| format!("{EXACT_CONTEXT_PREFIX}{}", c.name)),
            );
        }
        names
    }

    /// Dirty-bitmap extents for a context: flag 1 where changed since
    /// NAME, per region (`qemu:dirty-bitmap:`) or per written block where
    /// the fine record is exact (`blockwatch:exact-dirty-bitmap:`).
    pub fn dirty_extents(
        &self,
        context: &str,
        offset_bytes: u64,
        length_bytes: u64,
        max_extents: usize,
        out: &mut Vec<backend::Extent>,
    ) -> io::Result<()> {
        let (name, exact) = match context.strip_prefix(EXACT_CONTEXT_PREFIX) {
            Some(name) => (name, true),
            None => (
                context.strip_prefix(CONTEXT_PREFIX).unwrap_or(context),
                false,
            ),
        };
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
            let dirty = closed.changed.contains(region as u32) || self.marked.get(region);
            if dirty && exact && self.region_is_exact(&closed, region) {
                self.push_block_extents(&closed, position, region_end, first, out);
            } else {
                backend::push_extent(out, first, region_end - position, u32::from(dirty));
            }
            position = region_end;
        }
        Ok(())
    }

    /// A changed region whose written blocks are known, and some are.
    fn region_is_exact(&self, closed: &ClosedUnion, region: u64) -> bool {
        let region32 = region as u32;
        if closed.inexact.contains(region32)
            || (self.marked.get(region) && self.fine.is_inexact(region32))
        {
            return false;
        }
        let shift = self.fine.blocks_per_region_shift();
        let blocks = (region << shift)..((region + 1) << shift);
        blocks.clone().any(|block| self.fine.is_written(block))
            || closed
                .fine
                .range(blocks.start as u32..=(blocks.end - 1) as u32)
                .next()
                .is_some()
    }

    /// Extents of `[position, region_end)` block by block: 1 where written.
    fn push_block_extents(
        &self,
        closed: &ClosedUnion,
        mut position: u64,
        region_end: u64,
        first: usize,
        out: &mut Vec<backend::Extent>,
    ) {
        let shift = self.fine.precision().shift();
        while position < region_end {
            let block = position >> shift;
            let block_end = ((block + 1) << shift).min(region_end);
            let written = self.fine.is_written(block) || closed.fine.contains(block as u32);
            backend::push_extent(out, first, block_end - position, u32::from(written));
            position = block_end;
        }
    }

    fn closed_union(&self, name: &str) -> Option<Arc<ClosedUnion>> {
        if let Some(union) = self.closed_unions.lock().expect("unions lock").get(name) {
            return Some(Arc::clone(union));
        }
        let checkpoints = self.checkpoints();
        let since = checkpoints.iter().find(|c| c.name == name)?.generation;
        let mut union = ClosedUnion::default();
        for checkpoint in checkpoints.iter().filter(|c| c.generation > since) {
            union.changed |= &checkpoint.changed;
            union.inexact |= &checkpoint.changed - &checkpoint.exact;
            union.fine |= &checkpoint.fine;
        }
        let union = Arc::new(union);
        self.closed_unions
            .lock()
            .expect("unions lock")
            .insert(name.to_string(), Arc::clone(&union));
        Some(union)
    }

    /// The block size of exact changes (the granularity when no fine
    /// record is kept).
    pub fn precision_bytes(&self) -> u64 {
        if self.fine.is_enabled() {
            self.fine.precision().bytes()
        } else {
            self.granularity.bytes()
        }
    }

    /// Bytes of the regions changed in the current generation.
    pub fn dirty_bytes(&self) -> u64 {
        (self.marked.count_set() * self.granularity.bytes()).min(self.size_bytes)
    }

    /// Bytes of the regions written since the last flush.
    pub fn unsaved_bytes(&self) -> u64 {
        (self.written.count_set() * self.granularity.bytes()).min(self.size_bytes)
    }

    pub fn journal_bytes(&self) -> u64 {
        self.journal_size_bytes()
    }

    /// Why the journal refuses new first touches, if it failed.
    pub fn journal_failure(&self) -> Option<String> {
        self.committer.get().and_then(|c| c.failure())
    }

    /// Why a catalog write failed in this process (ENOSPC, EIO), if one
    /// did: redb takes no more writes until the database is opened again.
    pub fn catalog_failure(&self) -> Option<String> {
        self.catalog.failure()
    }
}
