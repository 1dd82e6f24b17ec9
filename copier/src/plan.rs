//! The plan: which byte ranges a copy moves, from the tracker's own record
//! of what changed (never one request per region), coalesced into large
//! extents and cut into pieces the workers take one at a time.

/// Extents closer than this are merged: reading a little unchanged data
/// costs less than another request and seek.
pub const COALESCE_GAP_BYTES: u64 = 64 * 1024;
/// The largest piece one worker reads and writes at once.
pub const PIECE_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Byte ranges to copy, sorted, disjoint, inside the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub ranges: Vec<(u64, u64)>,
}

impl Plan {
    /// Everything: a full copy.
    pub fn full(size_bytes: u64) -> Plan {
        Plan {
            ranges: if size_bytes == 0 {
                Vec::new()
            } else {
                vec![(0, size_bytes)]
            },
        }
    }

    /// Sorted byte ranges, merged where closer than `COALESCE_GAP_BYTES`.
    pub fn from_ranges(sorted: impl IntoIterator<Item = (u64, u64)>) -> Plan {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (offset, length) in sorted {
            match ranges.last_mut() {
                Some((last_offset, last_length))
                    if offset <= *last_offset + *last_length + COALESCE_GAP_BYTES =>
                {
                    let end = (offset + length).max(*last_offset + *last_length);
                    *last_length = end - *last_offset;
                }
                _ => ranges.push((offset, length)),
            }
        }
        Plan { ranges }
    }

    /// The plan of a copy resuming one that was interrupted: below
    /// `done_below` the target holds the disk as of the interrupted copy's
    /// checkpoint, so only what changed since then (`since_interrupted`)
    /// is copied there; from `done_below` on, what the target's own base
    /// needs (`since_base`, or everything for a full copy). Both sorted.
    pub fn resumed(
        since_interrupted: &[(u64, u64)],
        since_base: &[(u64, u64)],
        done_below: u64,
    ) -> Plan {
        let below = since_interrupted.iter().filter_map(|&(offset, length)| {
            let end = (offset + length).min(done_below);
            (offset < end).then(|| (offset, end - offset))
        });
        Plan::from_ranges(below.chain(from_offset(since_base, done_below)))
    }

    /// The ranges a copy of this plan still reads once every piece
    /// below `done_below` is done, in at most `max` ranges: past that,
    /// the nearest ones are merged (over the smallest gaps), which only
    /// says more is still read.
    pub fn still_read(&self, done_below: u64, max: usize) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = from_offset(&self.ranges, done_below).collect();
        if ranges.len() > max.max(1) {
            let mut gaps: Vec<u64> = ranges
                .windows(2)
                .map(|pair| pair[1].0 - (pair[0].0 + pair[0].1))
                .collect();
            let excess = ranges.len() - max.max(1);
            gaps.sort_unstable();
            // Merging every gap up to the excess-th smallest leaves at
            // most `max` ranges (ties merge a few more).
            let widest_merged = gaps[excess - 1];
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(max);
            for (offset, length) in ranges {
                match merged.last_mut() {
                    Some((last_offset, last_length))
                        if offset - (*last_offset + *last_length) <= widest_merged =>
                    {
                        *last_length = offset + length - *last_offset;
                    }
                    _ => merged.push((offset, length)),
                }
            }
            ranges = merged;
        }
        ranges
    }

    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|&(_, length)| length).sum()
    }

    /// The ranges cut into pieces of at most `PIECE_BYTES_MAX`, aligned to
    /// that size so neighbouring copies line up.
    pub fn pieces(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().flat_map(|&(offset, length)| {
            let end = offset + length;
            let mut position = offset;
            std::iter::from_fn(move || {
                if position >= end {
                    return None;
                }
                let boundary = (position / PIECE_BYTES_MAX + 1) * PIECE_BYTES_MAX;
                let piece_end = boundary.min(end);
                let piece = (position, piece_end - position);
                position = piece_end;
                Some(piece)
            })
        })
    }
}

/// The parts of sorted byte ranges at or after `from`.
fn from_offset(ranges: &[(u64, u64)], from: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    ranges.iter().filter_map(move |&(offset, length)| {
        let start = offset.max(from);
        let end = offset + length;
        (start < end).then(|| (start, end - start))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_still_read_covers_every_piece_not_done_in_few_ranges() {
        let plan = Plan {
            ranges: vec![(0, 10), (100, 10), (130, 10), (1000, 10), (1012, 4)],
        };
        assert_eq!(plan.still_read(0, 10), plan.ranges);
        assert_eq!(
            plan.still_read(105, 10),
            vec![(105, 5), (130, 10), (1000, 10), (1012, 4)]
        );
        // Two ranges at most: the gaps of 2 and 20 merge, not the 860.
        assert_eq!(plan.still_read(105, 2), vec![(105, 35), (1000, 16)]);
        assert_eq!(plan.still_read(0, 1), vec![(0, 1016)]);
        assert_eq!(plan.still_read(2000, 4), Vec::<(u64, u64)>::new());
        // Whatever the bound, every byte not yet done stays covered.
        for max in 1..6 {
            for done_below in [0, 5, 100, 135, 1013] {
                let kept = plan.still_read(done_below, max);
                assert!(kept.len() <= max);
                for &(offset, length) in &plan.ranges {
                    for byte in offset.max(done_below)..offset + length {
                        assert!(
                            kept.iter().any(|&(o, l)| o <= byte && byte < o + l),
                            "byte {byte} of max {max} done_below {done_below}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn near_extents_merge_and_far_ones_stay_apart() {
        let plan = Plan::from_ranges([
            (0, 4096),
            (8192, 4096),
            (8192 + 4096 + COALESCE_GAP_BYTES, 4096),
            (10 << 20, 4096),
        ]);
        assert_eq!(
            plan.ranges,
            vec![
                (0, 8192 + 4096 + COALESCE_GAP_BYTES + 4096),
                (10 << 20, 4096)
            ]
        );
    }

    #[test]
    fn a_resumed_plan_takes_new_changes_below_the_mark_and_the_base_plan_above() {
        let mb = 1 << 20;
        let since_interrupted = [(mb, 4096), (10 * mb, 4096), (30 * mb, 4096)];
        let since_base = [(0, 8 * mb), (10 * mb, 4096), (12 * mb, 20 * mb)];
        let plan = Plan::resumed(&since_interrupted, &since_base, 16 * mb);
        assert_eq!(
            plan.ranges,
            [(mb, 4096), (10 * mb, 4096), (16 * mb, 16 * mb)],
            "below 16M only what changed since; above it the rest of the base plan"
        );
        assert_eq!(
            Plan::resumed(&[], &since_base, 0).ranges,
            Plan::from_ranges(since_base).ranges
        );
    }

    #[test]
    fn pieces_cover_the_plan_exactly_and_stay_below_the_maximum() {
        let plan = Plan {
            ranges: vec![(1000, 9 << 20), (20 << 20, 4096)],
        };
        let pieces: Vec<(u64, u64)> = plan.pieces().collect();
        assert_eq!(pieces.iter().map(|p| p.1).sum::<u64>(), plan.bytes());
        assert!(pieces.iter().all(|&(_, length)| length <= PIECE_BYTES_MAX));
        assert_eq!(pieces[0], (1000, PIECE_BYTES_MAX - 1000));
        for pair in pieces.windows(2).take(2) {
            assert_eq!(pair[0].0 + pair[0].1, pair[1].0);
        }
        assert_eq!(Plan::full(0).pieces().count(), 0);
    }
}
