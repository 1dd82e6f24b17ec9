//! The workers: each takes the next piece of the plan, asks the source
//! which of it is data and which reads as zeroes, reads the data and hands
//! both to the target. A target that needs its pieces in plan order (a
//! tape) gets them so: workers read ahead in parallel and write in turn.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use backend::{BlockBackend, Extent, STATE_ZERO};

use super::{CopyError, Progress};
use crate::plan::{PIECE_BYTES_MAX, Plan};
use crate::target::Target;

/// Extents asked of the source per piece (holes and data alternate).
const EXTENTS_PER_PIECE_MAX: usize = 1024;
/// Extents of the source's allocation learnt before the copy, at most
/// (16 bytes each); past them pieces ask the source one by one.
const ALLOCATION_EXTENTS_MAX: usize = 1 << 20;
/// Extents asked per query while learning the allocation.
const ALLOCATION_QUERY_EXTENTS: usize = 4096;
/// Plan ranges closer than this are learnt in one span (the gap's
/// allocation costs less than another round trip).
const LEARN_GAP_BYTES: u64 = 1 << 30;

/// Which parts of the source read as zeroes, learnt in a few large
/// queries before the copy instead of one per piece (which, over NBD,
/// doubled the round trips of an incremental copy of small pieces).
/// Sources never change while copied (an image under the state lock, a
/// snapshot), so the map stays true.
#[derive(Debug, Default)]
struct Allocation {
    /// (start, end, reads as zeroes), sorted and contiguous from the
    /// plan's start up to `covered_end`.
    extents: Vec<(u64, u64, bool)>,
    covered_end: u64,
    /// Gaps between spans: in `extents` to keep them contiguous, but not
    /// learnt (no piece falls there).
    unknown: Vec<(u64, u64)>,
}

impl Allocation {
    /// Learns the allocation of the plan's spans: its ranges grouped
    /// where less than `LEARN_GAP_BYTES` apart, each span in queries of
    /// `ALLOCATION_QUERY_EXTENTS`, up to `ALLOCATION_EXTENTS_MAX` in all.
    fn learn(source: &dyn BlockBackend, plan: &Plan) -> io::Result<Allocation> {
        let mut allocation = Allocation::default();
        if !source.can_extents() {
            return Ok(allocation);
        }
        let mut spans: Vec<(u64, u64)> = Vec::new();
        for &(offset, length) in &plan.ranges {
            match spans.last_mut() {
                Some((_, end)) if offset < *end + LEARN_GAP_BYTES => *end = offset + length,
                _ => spans.push((offset, offset + length)),
            }
        }
        let mut found = Vec::new();
        for (start, end) in spans {
            let mut position = start;
            // Extents between spans are not learnt: mark the gap unknown.
            if allocation
                .extents
                .last()
                .is_some_and(|&(_, e, _)| e < start)
            {
                allocation
                    .extents
                    .push((allocation.covered_end, start, false));
                allocation.unknown.push((allocation.covered_end, start));
            }
            while position < end {
                if allocation.extents.len() >= ALLOCATION_EXTENTS_MAX {
                    return Ok(allocation);
                }
                found.clear();
                source.extents(
                    position,
                    end - position,
                    ALLOCATION_QUERY_EXTENTS,
                    &mut found,
                )?;
                if found.is_empty() {
                    return Ok(allocation);
                }
                for extent in &found {
                    let extent_end = (position + extent.length_bytes).min(end);
                    allocation
                        .extents
                        .push((position, extent_end, extent.flags & STATE_ZERO != 0));
                    position = extent_end;
                    allocation.covered_end = position;
                }
            }
        }
        Ok(allocation)
    }

    /// The parts of `[offset, offset + length)` if the map covers it.
    fn parts(&self, offset: u64, length: u64) -> Option<Vec<Part>> {
        let end = offset + length;
        if end > self.covered_end
            || self
                .extents
                .first()
                .is_none_or(|&(start, _, _)| offset < start)
            || self
                .unknown
                .iter()
                .any(|&(start, stop)| offset < stop && start < end)
        {
            return None;
        }
        let mut index = self.extents.partition_point(|&(_, e, _)| e <= offset);
        let mut parts = Vec::new();
        let mut position = offset;
        while position < end {
            let &(_, extent_end, zero) = self.extents.get(index)?;
            let part_end = extent_end.min(end);
            parts.push(Part {
                length: part_end - position,
                zero,
            });
            position = part_end;
            index += 1;
        }
        Some(parts)
    }
}

/// Why a piece failed: its source read (which the caller explains: a
/// broken snapshot, a lost server) or the target.
pub(crate) enum PieceError {
    Source(io::Error),
    Target(CopyError),
    /// Not written: another piece failed first (that failure is kept).
    Abandoned,
}

/// Bytes a plan moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Moved {
    pub data_bytes: u64,
    pub hole_bytes: u64,
}

/// How often a copy records how far it got, so that a rerun after a kill
/// does not redo it: after this many bytes of the plan's pieces copied,
/// or this long, whichever comes first. Counted in the plan's bytes, not
/// in the disk's offsets: an incremental of scattered pieces crosses a
/// GiB of offsets every few pieces.
const MARK_EVERY_BYTES: u64 = 1 << 30;
const MARK_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// How often `run_plan` says how far it got (a live copy then lets its
/// snapshot stop preserving what it read): a round trip on a control
/// socket every this many bytes of the plan's pieces copied. Counted in
/// offsets it took a round trip every few pieces of a scattered
/// incremental: 64 calls of 4-10 ms for 655 pieces of 64 KiB.
const PASSED_EVERY_BYTES: u64 = 64 << 20;

/// What `run_plan` did: what it moved, how far every piece was done (the
/// start of the first piece not done; the plan's end when all are), and
/// the first failure.
pub(crate) struct Outcome {
    pub moved: Moved,
    pub done_below: u64,
    pub error: Option<PieceError>,
}

/// Which pieces are done, and the mark below which all are.
struct Marks {
    done: Vec<bool>,
    /// The first piece not done.
    below: usize,
    /// The plan's bytes in the pieces before `below`, when `passed` and
    /// `mark` were last called.
    passed_bytes: u64,
    marked_bytes: u64,
    marked_at: std::time::Instant,
}

/// The turn of in-order targets: the index of the piece to write next.
struct Turn {
    next: Mutex<usize>,
    changed: Condvar,
}

impl Turn {
    fn wait_for(&self, index: usize, failed: &Mutex<Option<PieceError>>) -> bool {
        let mut next = self.next.lock().expect("turn lock");
        while *next != index {
            if failed.lock().expect("failure lock").is_some() {
                return false;
            }
            next = self
                .changed
                .wait_timeout(next, std::time::Duration::from_millis(50))
                .expect("turn lock")
                .0;
        }
        true
    }

    fn done(&self) {
        *self.next.lock().expect("turn lock") += 1;
        self.changed.notify_all();
    }
}

/// Copies the plan with `workers` threads taking pieces in order; calls
/// `mark(done_below)` now and then (see `MARK_EVERY_BYTES`), and
/// `passed(done_below)` every `PASSED_EVERY_BYTES`.
pub(crate) fn run_plan(
    source: &dyn BlockBackend,
    target: &dyn Target,
    plan: &Plan,
    workers: usize,
    progress: &dyn Progress,
    mark: &(dyn Fn(u64) + Sync),
    passed: &(dyn Fn(u64) + Sync),
) -> Outcome {
    let pieces: Vec<(u64, u64)> = plan.pieces().collect();
    let plan_end = plan
        .ranges
        .last()
        .map_or(0, |&(offset, length)| offset + length);
    let below_of = |index: usize| pieces.get(index).map_or(plan_end, |&(offset, _)| offset);
    // The plan's bytes in the pieces before each index.
    let bytes_before: Vec<u64> = std::iter::once(0)
        .chain(pieces.iter().scan(0, |sum, &(_, length)| {
            *sum += length;
            Some(*sum)
        }))
        .collect();
    let marks = Mutex::new(Marks {
        done: vec![false; pieces.len()],
        below: 0,
        passed_bytes: 0,
        marked_bytes: 0,
        marked_at: std::time::Instant::now(),
    });
    let piece_done = |index: usize| {
        let mut marks = marks.lock().expect("marks lock");
        marks.done[index] = true;
        while marks.below < pieces.len() && marks.done[marks.below] {
            marks.below += 1;
        }
        let below = below_of(marks.below);
        let copied = bytes_before[marks.below];
        if copied >= marks.passed_bytes + PASSED_EVERY_BYTES {
            passed(below);
            marks.passed_bytes = copied;
        }
        if copied >= marks.marked_bytes + MARK_EVERY_BYTES
            || (copied > marks.marked_bytes && marks.marked_at.elapsed() >= MARK_EVERY)
        {
            mark(below);
            marks.marked_bytes = copied;
            marks.marked_at = std::time::Instant::now();
        }
    };
    let next = AtomicUsize::new(0);
    let data_bytes = AtomicU64::new(0);
    let hole_bytes = AtomicU64::new(0);
    let failure: Mutex<Option<PieceError>> = Mutex::new(None);
    let turn = Turn {
        next: Mutex::new(0),
        changed: Condvar::new(),
    };
    let in_order = target.in_order();
    let allocation = match Allocation::learn(source, plan) {
        Ok(allocation) => allocation,
        Err(error) => {
            return Outcome {
                moved: Moved::default(),
                done_below: plan.ranges.first().map_or(0, |&(offset, _)| offset),
                error: Some(PieceError::Source(error)),
            };
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..workers.max(1).min(pieces.len().max(1)) {
            scope.spawn(|| {
                let mut buffer = vec![0u8; PIECE_BYTES_MAX as usize];
                let mut extents = Vec::new();
                loop {
                    if failure.lock().expect("failure lock").is_some() {
                        return;
                    }
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(offset, length)) = pieces.get(index) else {
                        return;
                    };
                    let piece = read_piece(
                        source,
                        &allocation,
                        offset,
                        length,
                        &mut buffer,
                        &mut extents,
                    );
                    let written = piece.and_then(|parts| {
                        if in_order && !turn.wait_for(index, &failure) {
                            return Err(PieceError::Abandoned);
                        }
                        let written = write_piece(target, offset, &parts, &buffer);
                        if in_order {
                            turn.done();
                        }
                        written
                    });
                    match written {
                        Ok(moved) => {
                            piece_done(index);
                            progress.copied(length);
                            data_bytes.fetch_add(moved.data_bytes, Ordering::Relaxed);
                            hole_bytes.fetch_add(moved.hole_bytes, Ordering::Relaxed);
                        }
                        Err(error) => {
                            failure.lock().expect("failure lock").get_or_insert(error);
                            turn.changed.notify_all();
                            return;
                        }
                    }
                }
            });
        }
    });
    let done_below = below_of(marks.into_inner().expect("marks lock").below);
    Outcome {
        moved: Moved {
            data_bytes: data_bytes.into_inner(),
            hole_bytes: hole_bytes.into_inner(),
        },
        done_below,
        error: failure.into_inner().expect("failure lock"),
    }
}

/// A part of a piece: `length` bytes that are data (read into the buffer
/// at the part's place) or read as zeroes.
struct Part {
    length: u64,
    zero: bool,
}

/// Reads one piece's data into `buffer` (at the piece's own offsets) and
/// says which parts are data and which zeroes.
fn read_piece(
    source: &dyn BlockBackend,
    allocation: &Allocation,
    offset: u64,
    length: u64,
    buffer: &mut [u8],
    extents: &mut Vec<Extent>,
) -> Result<Vec<Part>, PieceError> {
    debug_assert!(length <= buffer.len() as u64);
    let parts = match allocation.parts(offset, length) {
        Some(parts) => parts,
        None => parts_asked(source, offset, length, extents)?,
    };
    let mut position = 0;
    for part in &parts {
        if !part.zero {
            let range = position as usize..(position + part.length) as usize;
            source
                .read_at(&mut buffer[range], offset + position)
                .map_err(PieceError::Source)?;
        }
        position += part.length;
    }
    Ok(parts)
}

/// The parts of one piece, asked of the source.
fn parts_asked(
    source: &dyn BlockBackend,
    offset: u64,
    length: u64,
    extents: &mut Vec<Extent>,
) -> Result<Vec<Part>, PieceError> {
    extents.clear();
    if source.can_extents() {
        source
            .extents(offset, length, EXTENTS_PER_PIECE_MAX, extents)
            .map_err(PieceError::Source)?;
    }
    let mut parts: Vec<Part> = Vec::new();
    let mut covered = 0;
    for extent in extents.iter() {
        if covered >= length {
            break;
        }
        let part = extent.length_bytes.min(length - covered);
        parts.push(Part {
            length: part,
            zero: extent.flags & STATE_ZERO != 0,
        });
        covered += part;
    }
    // Whatever the extents did not describe is copied as data.
    if covered < length {
        parts.push(Part {
            length: length - covered,
            zero: false,
        });
    }
    Ok(parts)
}

fn write_piece(
    target: &dyn Target,
    offset: u64,
    parts: &[Part],
    buffer: &[u8],
) -> Result<Moved, PieceError> {
    let mut moved = Moved::default();
    let mut position = 0;
    for part in parts {
        if part.zero {
            target
                .write_zero(offset + position, part.length)
                .map_err(PieceError::Target)?;
            moved.hole_bytes += part.length;
        } else {
            let range = position as usize..(position + part.length) as usize;
            target
                .write_data(offset + position, &buffer[range])
                .map_err(PieceError::Target)?;
            moved.data_bytes += part.length;
        }
        position += part.length;
    }
    Ok(moved)
}
