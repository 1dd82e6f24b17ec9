//! What a snapshot export tells besides its bytes: `base:allocation`
//! (holes stay holes in a copy of it) and the dirty bitmaps of the
//! checkpoints before it, so that nbdcopy, qemu-img or our own copier can
//! copy from the snapshot what changed since an older checkpoint.

use std::io;
use std::sync::{Arc, Mutex};

use backend::{Extent, push_extent};
use tracker::tracker::{CONTEXT_PREFIX, EXACT_CONTEXT_PREFIX};

use super::view::Snapshot;

/// Changed byte ranges, sorted and disjoint.
type Ranges = Arc<Vec<(u64, u64)>>;

/// The most one `base:allocation` answer of a snapshot looks at.
const ALLOCATION_QUERY_BYTES_MAX: u64 = 1 << 30;

/// Contexts whose extents a snapshot keeps at once; one more drops the
/// oldest (computed again when asked for again).
const DIRTY_CACHE_MAX: usize = 64;

/// Each dirty-bitmap context's changed ranges, once computed.
#[derive(Debug, Default)]
pub(crate) struct DirtyCache(Mutex<Vec<(String, Ranges)>>);

impl Snapshot {
    /// `base:allocation` of the disk as it was: a region copied out reads
    /// from the store and is reported as data; any other is the live
    /// disk's extents, which are the snapshot's when the region was still
    /// not copied out after they were read (a write is issued only after
    /// its region's copy-out is recorded). Data is never reported as a
    /// hole; a hole may be reported as data (copied, harmlessly).
    pub(crate) fn allocation_extents(
        &self,
        offset: u64,
        length: u64,
        max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        if offset
            .checked_add(length)
            .is_none_or(|end| end > self.size_bytes)
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if length == 0 || max_extents == 0 {
            return Ok(());
        }
        // Extents may cover less than asked: one answer looks at a bounded
        // number of regions (a client may ask for the whole disk).
        let length = length.min(ALLOCATION_QUERY_BYTES_MAX);
        let end = offset + length;
        let run = self.granularity.run_of(offset, length);
        // Released regions read as data (they may have been written
        // since), whatever the live disk says, and stay released: only the
        // kept ones need the live allocation. A copy that narrowed its
        // snapshot to a scattered incremental keeps a few regions of a
        // disk whose allocation takes thousands of seeks to learn.
        let kept = self.store.kept_in(run).unwrap_or_else(|| vec![run]);
        let first = out.len();
        let mut position = offset;
        for kept_run in kept {
            let (kept_start, _) = self.region_bytes(kept_run.first_region);
            let (last_start, last_length) =
                self.region_bytes(kept_run.first_region + kept_run.region_count - 1);
            let kept_start = kept_start.max(offset);
            let kept_end = (last_start + last_length).min(end);
            if position < kept_start {
                push_extent(out, first, kept_start - position, 0);
                if out.len() - first > max_extents {
                    out.pop();
                    return Ok(());
                }
            }
            let full = self.kept_allocation(kept_start, kept_end, max_extents, first, out)?;
            if full {
                return Ok(());
            }
            position = kept_end;
        }
        if position < end {
            push_extent(out, first, end - position, 0);
            if out.len() - first > max_extents {
                out.pop();
            }
        }
        Ok(())
    }

    /// `allocation_extents` of `[start, end)`, regions the snapshot keeps
    /// (unless narrowed since), appended to the answer that began at
    /// `first`; whether the answer is full (`max_extents`).
    fn kept_allocation(
        &self,
        start: u64,
        end: u64,
        max_extents: usize,
        first: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<bool> {
        let (offset, length) = (start, end - start);
        let run = self.granularity.run_of(offset, length);
        let before = self
            .store
            .copied_offsets(run)
            .map_err(|r| self.refused(r))?;
        let mut live = Vec::new();
        if self.live.can_extents() {
            self.live.extents(offset, length, max_extents, &mut live)?;
        } else {
            live.push(Extent {
                length_bytes: length,
                flags: 0,
            });
        }
        let after = self.settle(run, &before, true)?;
        // Released regions may have been written since: their allocation
        // is not known, so they read as data (never as a hole). Looked at
        // again: the snapshot may have been narrowed since `kept_in`.
        let released = self.store.released_in(run);
        let mut position = offset;
        for extent in &live {
            let mut start = position;
            let end = (position + extent.length_bytes).min(offset + length);
            // Split at the copied-out and released regions, which read
            // as data.
            while start < end {
                let region = start >> self.granularity.shift();
                let (region_start, region_length) = self.region_bytes(region);
                let part_end = (region_start + region_length).min(end);
                let index = (region - run.first_region) as usize;
                let copied = after[index].is_some() || released[index];
                let flags = if copied { 0 } else { extent.flags };
                push_extent(out, first, part_end - start, flags);
                if out.len() - first > max_extents {
                    out.pop();
                    return Ok(true);
                }
                start = part_end;
            }
            position = end;
            if position >= offset + length {
                break;
            }
        }
        // The live extents may cover less than asked (their own bound):
        // the answer ends there.
        Ok(position < offset + length)
    }

    /// `qemu:dirty-bitmap:NAME` (and the exact variant when the tracker
    /// keeps one) for every checkpoint older than the snapshot's: what
    /// changed from NAME up to the snapshot's checkpoint.
    pub(crate) fn dirty_context_names(&self) -> Vec<String> {
        let Some(tracker) = self.tracker.upgrade() else {
            return Vec::new();
        };
        let older: Vec<String> = tracker
            .checkpoints()
            .into_iter()
            .filter(|c| c.generation < self.generation)
            .map(|c| c.name)
            .collect();
        let names: Vec<String> = tracker
            .context_names()
            .into_iter()
            .filter(|context| {
                let name = context
                    .strip_prefix(EXACT_CONTEXT_PREFIX)
                    .or_else(|| context.strip_prefix(CONTEXT_PREFIX));
                name.is_some_and(|name| older.iter().any(|o| o == name))
            })
            .collect();
        names
    }

    pub(crate) fn dirty_extents(
        &self,
        context: &str,
        offset: u64,
        length: u64,
        max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        let ranges = self.dirty_ranges(context)?;
        let end = offset + length;
        let first = out.len();
        let mut position = offset;
        // The first range that ends after `offset`.
        let mut index = ranges.partition_point(|&(start, len)| start + len <= offset);
        while position < end && out.len() - first < max_extents {
            match ranges.get(index) {
                Some(&(start, len)) if start < end => {
                    if start > position {
                        push_extent(out, first, start - position, 0);
                        position = start;
                        if out.len() - first >= max_extents {
                            break;
                        }
                    }
                    let range_end = (start + len).min(end);
                    push_extent(out, first, range_end - position, 1);
                    position = range_end;
                    index += 1;
                }
                _ => {
                    push_extent(out, first, end - position, 0);
                    position = end;
                }
            }
        }
        Ok(())
    }

    /// The changed ranges of a context, from the cache or the tracker.
    fn dirty_ranges(&self, context: &str) -> io::Result<Ranges> {
        let mut cache = self.dirty.0.lock().expect("dirty cache lock");
        if let Some((_, ranges)) = cache.iter().find(|(name, _)| name == context) {
            return Ok(Arc::clone(ranges));
        }
        let (since, exact) = match context.strip_prefix(EXACT_CONTEXT_PREFIX) {
            Some(name) => (name, true),
            None => match context.strip_prefix(CONTEXT_PREFIX) {
                Some(name) => (name, false),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("snapshot {:?} has no context {context:?}", self.name),
                    ));
                }
            },
        };
        let tracker = self.tracker.upgrade().ok_or_else(|| {
            io::Error::other(format!("snapshot {:?}: its server stopped", self.name))
        })?;
        let changes = tracker
            .changes(since, Some(&self.name))
            .map_err(|error| io::Error::new(io::ErrorKind::NotFound, error.to_string()))?;
        let region_bytes = self.granularity.bytes();
        let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(changes.len());
        for change in changes {
            let (mut start, mut end) = (
                change.offset_bytes,
                change.offset_bytes + change.length_bytes,
            );
            if !exact {
                // Whole regions, as every qemu:dirty-bitmap is.
                start = start / region_bytes * region_bytes;
                end = end.div_ceil(region_bytes) * region_bytes;
                end = end.min(self.size_bytes);
            }
            match ranges.last_mut() {
                Some((last_start, last_len)) if *last_start + *last_len >= start => {
                    *last_len = (*last_len).max(end - *last_start);
                }
                _ => ranges.push((start, end - start)),
            }
        }
        let ranges = Arc::new(ranges);
        if cache.len() >= DIRTY_CACHE_MAX {
            cache.remove(0);
        }
        cache.push((context.to_string(), Arc::clone(&ranges)));
        Ok(ranges)
    }
}
