//! The fine record: which blocks (at the state's precision, 4 KiB by
//! default) were written in the current generation, beside the coarse,
//! crash-safe marks.
//!
//! Marks stay coarse (a region costs one journal commit on its first write,
//! which keeps first touches cheap), but what users read and copies take
//! need not be: a write also sets its blocks here, lock-free and with no
//! I/O. The record becomes durable with each checkpoint (the catalog's
//! `fine` table) and at a clean stop (`fine_current`). After a crash the
//! record of the current generation is gone, and every region marked
//! before it counts whole (`inexact`): nothing is ever missed, the
//! regions first written after the restart are exact again.
//!
//! Block indexes are u32 like region indexes (roaring's), so the precision
//! is coarsened for images over 16 TiB until the block count fits.

use std::sync::Mutex;

use roaring::RoaringBitmap;

use crate::regions::{AtomicBitmap, Granularity, REGION_COUNT_MAX, RegionRun};

/// The default precision: the common filesystem block size.
pub const PRECISION_DEFAULT_BYTES: u64 = 4096;

#[derive(Debug)]
pub(crate) struct FineRecord {
    /// Block size of the record; equal to the granularity when no record is
    /// kept (then every region counts whole, as before).
    precision: Granularity,
    /// log2 of blocks per region.
    blocks_per_region_shift: u32,
    /// Blocks written in the current generation.
    written: AtomicBitmap,
    /// Regions of the current generation whose record is incomplete.
    inexact: Mutex<RoaringBitmap>,
}

impl FineRecord {
    /// A record at `precision` (at most `granularity`, coarsened until the
    /// block count of `size_bytes` fits a u32).
    pub(crate) fn new(
        precision: Granularity,
        granularity: Granularity,
        size_bytes: u64,
    ) -> FineRecord {
        let precision = precision_for(precision, granularity, size_bytes);
        let enabled = precision.shift() < granularity.shift();
        FineRecord {
            precision,
            blocks_per_region_shift: granularity.shift() - precision.shift(),
            written: AtomicBitmap::new(if enabled {
                precision.region_count(size_bytes)
            } else {
                0
            }),
            inexact: Mutex::new(RoaringBitmap::new()),
        }
    }

    /// Whether blocks finer than regions are recorded at all.
    pub(crate) fn is_enabled(&self) -> bool {
        self.blocks_per_region_shift > 0
    }

    pub(crate) fn precision(&self) -> Granularity {
        self.precision
    }

    /// A write (or trim, or zeroing) of this byte range is about to be
    /// issued: its blocks, rounded outward, are written.
    pub(crate) fn note(&self, offset_bytes: u64, length_bytes: u64) {
        if self.is_enabled() && length_bytes > 0 {
            self.written
                .set_run(self.precision.run_of(offset_bytes, length_bytes));
        }
    }

    /// Regions whose record is incomplete (recovered after a crash, or
    /// merged in from a checkpoint without one) count whole.
    pub(crate) fn add_inexact(&self, regions: &RoaringBitmap) {
        *self.inexact.lock().expect("inexact lock") |= regions;
    }

    /// Adds the blocks of a deleted checkpoint merged into this generation.
    pub(crate) fn add_blocks(&self, blocks: &RoaringBitmap) {
        if !self.is_enabled() {
            return;
        }
        for block in blocks {
            if u64::from(block) < self.written.bit_count() {
                self.written.set_run(RegionRun {
                    first_region: u64::from(block),
                    region_count: 1,
                });
            }
        }
    }

    /// The current generation's record: of the `marked` regions, those
    /// that are exact, and the written blocks.
    pub(crate) fn current(&self, marked: &RoaringBitmap) -> (RoaringBitmap, RoaringBitmap) {
        if !self.is_enabled() {
            return (RoaringBitmap::new(), RoaringBitmap::new());
        }
        let exact = marked - &*self.inexact.lock().expect("inexact lock");
        let blocks = self.written.iter_set().map(|block| block as u32).collect();
        (exact, blocks)
    }

    /// Whether `region` of the current generation counts whole.
    pub(crate) fn is_inexact(&self, region: u32) -> bool {
        !self.is_enabled() || self.inexact.lock().expect("inexact lock").contains(region)
    }

    /// Whether `block` was written in the current generation.
    pub(crate) fn is_written(&self, block: u64) -> bool {
        self.is_enabled() && block < self.written.bit_count() && self.written.get(block)
    }

    pub(crate) fn blocks_per_region_shift(&self) -> u32 {
        self.blocks_per_region_shift
    }

    /// A new generation starts: nothing written, nothing inexact.
    pub(crate) fn clear(&self) {
        self.written.clear_all();
        self.inexact.lock().expect("inexact lock").clear();
    }

    /// The byte extents that changed in `region`: its written blocks when
    /// the region is exact and has any, else the whole region (None).
    pub(crate) fn blocks_in(
        &self,
        blocks: &RoaringBitmap,
        region: u32,
    ) -> Option<impl Iterator<Item = (u64, u64)> + '_> {
        if !self.is_enabled() {
            return None;
        }
        let shift = self.blocks_per_region_shift;
        let first = u64::from(region) << shift;
        let end = first + (1 << shift);
        let first_block = u32::try_from(first).ok()?;
        let in_region: Vec<u64> = blocks
            .range(first_block..=u32::try_from(end - 1).unwrap_or(u32::MAX))
            .map(u64::from)
            .collect();
        if in_region.is_empty() {
            // Marked, yet no block recorded: count it whole, never as nothing.
            return None;
        }
        let block_bytes = self.precision.bytes();
        Some(
            crate::regions::runs_from_sorted(in_region.into_iter())
                .into_iter()
                .map(move |run| {
                    (
                        run.first_region * block_bytes,
                        run.region_count * block_bytes,
                    )
                }),
        )
    }
}

/// The precision a record of `size_bytes` uses: the one asked for, at most
/// the granularity, coarsened until the block count fits a u32.
fn precision_for(precision: Granularity, granularity: Granularity, size_bytes: u64) -> Granularity {
    let mut shift = precision.shift().min(granularity.shift());
    while shift < granularity.shift() && size_bytes.div_ceil(1 << shift) > REGION_COUNT_MAX {
        shift += 1;
    }
    Granularity::new(1 << shift).expect("between 4 KiB and the granularity")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn granularity(bytes: u64) -> Granularity {
        Granularity::new(bytes).unwrap()
    }

    #[test]
    fn writes_round_out_to_blocks_and_stay_inside_their_region() {
        let record = FineRecord::new(granularity(4096), granularity(65536), 1 << 20);
        record.note(4096 + 100, 10); // block 1
        record.note(65536 * 2 + 8192, 8192); // blocks 34, 35
        let marked: RoaringBitmap = [0u32, 2].into_iter().collect();
        let (exact, blocks) = record.current(&marked);
        assert_eq!(exact, marked);
        assert_eq!(blocks.iter().collect::<Vec<_>>(), vec![1, 34, 35]);
        let extents: Vec<_> = record.blocks_in(&blocks, 2).unwrap().collect();
        assert_eq!(extents, vec![(65536 * 2 + 8192, 8192)]);
        assert!(record.blocks_in(&blocks, 1).is_none(), "no block: whole");
    }

    #[test]
    fn inexact_regions_are_not_exact_until_the_next_generation() {
        let record = FineRecord::new(granularity(4096), granularity(65536), 1 << 20);
        let marked: RoaringBitmap = [0u32, 1, 2].into_iter().collect();
        record.add_inexact(&[1u32].into_iter().collect());
        let (exact, _) = record.current(&marked);
        assert_eq!(exact.iter().collect::<Vec<_>>(), vec![0, 2]);
        record.clear();
        assert_eq!(record.current(&marked).0, marked);
    }

    #[test]
    fn precision_is_coarsened_until_blocks_fit_u32_and_off_at_the_granularity() {
        let huge = 64u64 << 40; // 64 TiB: 4 KiB blocks would be 2^34
        let precision = precision_for(granularity(4096), granularity(1 << 20), huge);
        assert_eq!(precision.bytes(), 16384);
        let exactly = precision_for(granularity(4096), granularity(1 << 20), 16 << 40);
        assert_eq!(exactly.bytes(), 4096, "2^32 blocks of 4 KiB fit");
        let off = FineRecord::new(granularity(65536), granularity(65536), 1 << 30);
        assert!(!off.is_enabled());
        assert_eq!(off.current(&[0u32].into_iter().collect()).0.len(), 0);
    }
}
