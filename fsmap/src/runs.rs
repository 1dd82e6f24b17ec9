//! Runs `(start, count)` of blocks or bytes, as the map, the diff, the copy
//! set and the disk all pass them around. It lives apart from all of them
//! so that each can merge runs without importing another.

/// Sorts and merges overlapping or touching runs.
pub fn merge_runs(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (start, count) in runs {
        match out.last_mut() {
            Some((last_start, last_count)) if *last_start + *last_count >= start => {
                *last_count = (*last_count).max(start + count - *last_start);
            }
            _ => out.push((start, count)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::merge_runs;

    #[test]
    fn merge_runs_sorts_and_joins_overlapping_and_touching_runs() {
        type Runs = Vec<(u64, u64)>;
        let cases: [(Runs, Runs); 6] = [
            (vec![], vec![]),
            (vec![(5, 2)], vec![(5, 2)]),
            // Touching runs join; a gap of one block keeps them apart.
            (vec![(0, 4), (4, 4), (9, 1)], vec![(0, 8), (9, 1)]),
            (vec![(10, 5), (0, 3)], vec![(0, 3), (10, 5)]),
            // A run inside another adds nothing; an overlap extends.
            (vec![(0, 10), (2, 3), (8, 4)], vec![(0, 12)]),
            (vec![(3, 1), (3, 1)], vec![(3, 1)]),
        ];
        for (input, expected) in cases {
            assert_eq!(merge_runs(input.clone()), expected, "input {input:?}");
        }
    }
}
