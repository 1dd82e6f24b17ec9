//! A map of disk byte ranges to where their contents are, newer ranges
//! laid over older ones (a chain's sessions, newest last).

use std::collections::BTreeMap;

/// What a range maps to; `advanced(n)` is the same source `n` bytes on.
pub(crate) trait Source: Copy {
    fn advanced(self, by_bytes: u64) -> Self;
}

#[derive(Debug, Clone, Default)]
pub(crate) struct RangeMap<T> {
    /// Start -> (length, source). Ranges never overlap and are never empty.
    ranges: BTreeMap<u64, (u64, T)>,
}

impl<T: Source> RangeMap<T> {
    pub(crate) fn new() -> RangeMap<T> {
        RangeMap {
            ranges: BTreeMap::new(),
        }
    }

    /// Maps `[start, start + length)` to `source`, replacing whatever was
    /// mapped there.
    pub(crate) fn insert(&mut self, start: u64, length: u64, source: T) {
        if length == 0 {
            return;
        }
        let end = start + length;
        if let Some((&before, &(before_length, before_source))) =
            self.ranges.range(..start).next_back()
        {
            let before_end = before + before_length;
            if before_end > start {
                self.ranges.insert(before, (start - before, before_source));
                if before_end > end {
                    self.ranges.insert(
                        end,
                        (before_end - end, before_source.advanced(end - before)),
                    );
                }
            }
        }
        let inside: Vec<u64> = self.ranges.range(start..end).map(|(&at, _)| at).collect();
        for at in inside {
            let (old_length, old_source) = self.ranges.remove(&at).expect("listed above");
            if at + old_length > end {
                self.ranges
                    .insert(end, (at + old_length - end, old_source.advanced(end - at)));
            }
        }
        self.ranges.insert(start, (length, source));
    }

    /// The pieces of `[offset, offset + length)` in order: (offset,
    /// length, source), `None` where nothing is mapped.
    pub(crate) fn pieces(&self, offset: u64, length: u64) -> Vec<(u64, u64, Option<T>)> {
        let end = offset + length;
        let mut out = Vec::new();
        let mut position = offset;
        let first = self
            .ranges
            .range(..=offset)
            .next_back()
            .filter(|(at, (len, _))| *at + len > offset)
            .map(|(&at, _)| at)
            .unwrap_or(offset);
        for (&at, &(range_length, source)) in self.ranges.range(first..end) {
            if at > position {
                out.push((position, at - position, None));
                position = at;
            }
            let range_end = (at + range_length).min(end);
            out.push((
                position,
                range_end - position,
                Some(source.advanced(position - at)),
            ));
            position = range_end;
        }
        if position < end {
            out.push((position, end - position, None));
        }
        out
    }

    pub(crate) fn len(&self) -> usize {
        self.ranges.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct At(u32, u64);
    impl Source for At {
        fn advanced(self, by_bytes: u64) -> At {
            At(self.0, self.1 + by_bytes)
        }
    }

    /// A byte-per-byte model: which source and offset each byte reads.
    fn model(map: &RangeMap<At>, size: u64) -> Vec<Option<At>> {
        let mut out = Vec::new();
        for (_, length, source) in map.pieces(0, size) {
            for i in 0..length {
                out.push(source.map(|s| s.advanced(i)));
            }
        }
        out
    }

    #[test]
    fn newer_ranges_replace_older_ones_byte_for_byte() {
        let size = 64u64;
        let mut map = RangeMap::new();
        let mut expected: Vec<Option<At>> = vec![None; size as usize];
        let mut seed = 7u64;
        for id in 0..400u32 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let start = seed % size;
            let length = (seed >> 8) % (size - start) + 1;
            map.insert(start, length, At(id, 1000));
            for i in 0..length {
                expected[(start + i) as usize] = Some(At(id, 1000 + i));
            }
            assert_eq!(model(&map, size), expected, "after insert {id}");
        }
        assert!(map.len() <= size as usize);
    }

    #[test]
    fn pieces_of_a_window_start_inside_a_range() {
        let mut map = RangeMap::new();
        map.insert(10, 10, At(1, 0));
        map.insert(30, 5, At(2, 0));
        assert_eq!(
            map.pieces(15, 30),
            vec![
                (15, 5, Some(At(1, 5))),
                (20, 10, None),
                (30, 5, Some(At(2, 0))),
                (35, 10, None)
            ]
        );
        assert_eq!(map.pieces(0, 5), vec![(0, 5, None)]);
    }
}
