//! Regions (the tracking unit) and a lock-free bitmap over them.
//!
//! Bytes, regions and region counts are kept apart by name: a region is
//! `granularity_bytes` long and region `n` covers bytes
//! `[n * granularity, (n + 1) * granularity)`.

use std::sync::atomic::{AtomicU64, Ordering};

pub const GRANULARITY_MIN_BYTES: u64 = 4 * 1024;
pub const GRANULARITY_MAX_BYTES: u64 = 16 * 1024 * 1024;
pub const GRANULARITY_DEFAULT_BYTES: u64 = 64 * 1024;
/// Regions one image may have (a 16 TiB image at 4 KiB): bounds the bitmap.
pub const REGION_COUNT_MAX: u64 = 1 << 32;

/// A run of consecutive regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionRun {
    pub first_region: u64,
    pub region_count: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granularity {
    shift: u32,
}

impl Granularity {
    /// A power of two between 4 KiB and 16 MiB.
    pub fn new(bytes: u64) -> Option<Granularity> {
        (bytes.is_power_of_two()
            && (GRANULARITY_MIN_BYTES..=GRANULARITY_MAX_BYTES).contains(&bytes))
        .then(|| Granularity {
            shift: bytes.trailing_zeros(),
        })
    }

    pub fn bytes(self) -> u64 {
        1 << self.shift
    }

    pub fn shift(self) -> u32 {
        self.shift
    }

    /// Regions needed to cover `size_bytes`.
    pub fn region_count(self, size_bytes: u64) -> u64 {
        size_bytes.div_ceil(self.bytes())
    }

    /// The byte range (offset, length) a run of regions covers.
    pub fn byte_range(self, run: RegionRun) -> (u64, u64) {
        (
            run.first_region << self.shift,
            run.region_count << self.shift,
        )
    }

    /// The regions a byte range touches. `length_bytes` must be non-zero.
    pub fn run_of(self, offset_bytes: u64, length_bytes: u64) -> RegionRun {
        debug_assert!(length_bytes > 0);
        let first_region = offset_bytes >> self.shift;
        let last_region = (offset_bytes + length_bytes - 1) >> self.shift;
        RegionRun {
            first_region,
            region_count: last_region - first_region + 1,
        }
    }
}

/// A fixed-size bitmap whose bits are set and tested without locks.
///
/// A summary bitmap (one bit per 64-bit word) lets `take_runs` visit only
/// the words that may hold set bits, so a flush costs what was written, not
/// the size of the disk. Setters write the word before the summary and the
/// taker clears the summary before the word, so no set bit is ever lost.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    summary: Vec<AtomicU64>,
    bit_count: u64,
}

impl AtomicBitmap {
    pub fn new(bit_count: u64) -> AtomicBitmap {
        assert!(
            bit_count <= REGION_COUNT_MAX,
            "bitmap of {bit_count} bits is over the limit"
        );
        let word_count = bit_count.div_ceil(64);
        let words = zeroed_words(word_count as usize);
        let summary = zeroed_words(word_count.div_ceil(64) as usize);
        AtomicBitmap {
            words,
            summary,
            bit_count,
        }
    }

    pub fn bit_count(&self) -> u64 {
        self.bit_count
    }

    pub fn get(&self, bit: u64) -> bool {
        self.words[(bit / 64) as usize].load(Ordering::Acquire) & (1 << (bit % 64)) != 0
    }

    /// Sets every bit of the run (Release: a reader that sees a bit also
    /// sees what was made durable before it was set).
    pub fn set_run(&self, run: RegionRun) {
        for_each_word(run, |word, mask| {
            // SeqCst on this store and the summary load below (and on the
            // taker's two swaps): a store then a load of another location
            // needs it for the no-lost-bit argument above to hold.
            self.words[word].fetch_or(mask, Ordering::SeqCst);
            let summary = &self.summary[word / 64];
            let summary_bit = 1u64 << (word % 64);
            // Check first: the summary word is shared by 64 words, and an
            // unconditional fetch_or would make every writer contend on it.
            if summary.load(Ordering::SeqCst) & summary_bit == 0 {
                summary.fetch_or(summary_bit, Ordering::AcqRel);
            }
        });
    }

    /// True when every bit of the run is set.
    pub fn all_set(&self, run: RegionRun) -> bool {
        let mut all = true;
        for_each_word(run, |word, mask| {
            all &= self.words[word].load(Ordering::Acquire) & mask == mask;
        });
        all
    }

    pub fn set_all(&self) {
        self.set_run(RegionRun {
            first_region: 0,
            region_count: self.bit_count,
        });
    }

    /// Clears every bit. Visits only the words the summary says may hold
    /// set bits: call it with no setter running (a generation switch,
    /// gate closed), when every set bit's summary bit is set too.
    pub fn clear_all(&self) {
        for (summary_index, summary) in self.summary.iter().enumerate() {
            let mut words = summary.swap(0, Ordering::AcqRel);
            while words != 0 {
                let index = summary_index * 64 + words.trailing_zeros() as usize;
                words &= words - 1;
                self.words[index].store(0, Ordering::Release);
            }
        }
    }

    /// Clears the bitmap and returns the bits that were set, as sorted runs.
    pub fn take_runs(&self) -> Vec<RegionRun> {
        let mut bits = Vec::new();
        for (summary_index, summary) in self.summary.iter().enumerate() {
            let mut words = summary.swap(0, Ordering::SeqCst);
            while words != 0 {
                let index = summary_index * 64 + words.trailing_zeros() as usize;
                words &= words - 1;
                let mut value = self.words[index].swap(0, Ordering::SeqCst);
                while value != 0 {
                    bits.push(index as u64 * 64 + u64::from(value.trailing_zeros()));
                    value &= value - 1;
                }
            }
        }
        runs_from_sorted(bits.into_iter())
    }

    /// The set bits, in order, visiting only the words the summary marks
    /// (a bit whose setter is still between its word and its summary may
    /// be missed: its write is not issued yet).
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.summary
            .iter()
            .enumerate()
            .flat_map(|(summary_index, summary)| {
                let mut words = summary.load(Ordering::SeqCst);
                std::iter::from_fn(move || {
                    if words == 0 {
                        return None;
                    }
                    let index = summary_index * 64 + words.trailing_zeros() as usize;
                    words &= words - 1;
                    Some(index)
                })
            })
            .flat_map(|index| {
                let mut value = self.words[index].load(Ordering::Acquire);
                std::iter::from_fn(move || {
                    if value == 0 {
                        return None;
                    }
                    let bit = value.trailing_zeros() as u64;
                    value &= value - 1;
                    Some(index as u64 * 64 + bit)
                })
            })
    }

    pub fn count_set(&self) -> u64 {
        let mut count = 0;
        for (summary_index, summary) in self.summary.iter().enumerate() {
            let mut words = summary.load(Ordering::SeqCst);
            while words != 0 {
                let index = summary_index * 64 + words.trailing_zeros() as usize;
                words &= words - 1;
                count += u64::from(self.words[index].load(Ordering::Acquire).count_ones());
            }
        }
        count
    }
}

/// `count` zeroed atomic words, from a zeroed allocation: the kernel maps
/// its pages lazily, so a large bitmap (a 15 TiB disk's 4 KiB fine record
/// is 512 MiB) costs memory only where bits get set.
fn zeroed_words(count: usize) -> Vec<AtomicU64> {
    let mut words = std::mem::ManuallyDrop::new(vec![0u64; count]);
    let (pointer, length, capacity) = (words.as_mut_ptr(), words.len(), words.capacity());
    // SAFETY: AtomicU64 has the same size, alignment and bit validity as
    // u64 (its documentation says so), the allocation is the Vec's own,
    // and ManuallyDrop keeps it from being freed twice.
    unsafe { Vec::from_raw_parts(pointer.cast::<AtomicU64>(), length, capacity) }
}

/// Calls `f(word_index, mask)` for each 64-bit word the run covers.
fn for_each_word(run: RegionRun, mut f: impl FnMut(usize, u64)) {
    let mut bit = run.first_region;
    let end = run.first_region + run.region_count;
    while bit < end {
        let word = bit / 64;
        let start_in_word = bit % 64;
        let bits_here = (64 - start_in_word).min(end - bit);
        let mask = if bits_here == 64 {
            u64::MAX
        } else {
            ((1u64 << bits_here) - 1) << start_in_word
        };
        f(word as usize, mask);
        bit += bits_here;
    }
}

/// Groups sorted, distinct region numbers into runs.
pub fn runs_from_sorted(regions: impl Iterator<Item = u64>) -> Vec<RegionRun> {
    let mut runs: Vec<RegionRun> = Vec::new();
    for region in regions {
        match runs.last_mut() {
            Some(last) if last.first_region + last.region_count == region => last.region_count += 1,
            _ => runs.push(RegionRun {
                first_region: region,
                region_count: 1,
            }),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granularity_must_be_a_power_of_two_in_range() {
        assert!(Granularity::new(64 * 1024).is_some());
        assert!(Granularity::new(4096).is_some());
        assert!(Granularity::new(16 << 20).is_some());
        for bad in [0, 2048, 3 * 4096, 32 << 20] {
            assert!(Granularity::new(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn byte_ranges_map_to_the_regions_they_touch() {
        let g = Granularity::new(65536).unwrap();
        assert_eq!(
            g.run_of(0, 1),
            RegionRun {
                first_region: 0,
                region_count: 1
            }
        );
        assert_eq!(
            g.run_of(65535, 2),
            RegionRun {
                first_region: 0,
                region_count: 2
            }
        );
        assert_eq!(
            g.run_of(65536, 65536),
            RegionRun {
                first_region: 1,
                region_count: 1
            }
        );
        assert_eq!(g.region_count(65537), 2);
    }

    #[test]
    fn bitmap_runs_cross_word_boundaries() {
        let bitmap = AtomicBitmap::new(300);
        let run = RegionRun {
            first_region: 60,
            region_count: 130,
        };
        assert!(!bitmap.all_set(run));
        bitmap.set_run(run);
        assert!(bitmap.all_set(run));
        assert!(!bitmap.get(59));
        assert!(bitmap.get(189));
        assert!(!bitmap.get(190));
        assert_eq!(bitmap.count_set(), 130);
        bitmap.set_run(RegionRun {
            first_region: 299,
            region_count: 1,
        });
        assert_eq!(bitmap.iter_set().last(), Some(299));
        assert_eq!(
            bitmap.take_runs(),
            vec![
                run,
                RegionRun {
                    first_region: 299,
                    region_count: 1
                }
            ]
        );
        assert_eq!(bitmap.count_set(), 0);
    }
}
