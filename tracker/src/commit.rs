//! Group commit of journal records on a dedicated thread.
//!
//! Writers that touch unmarked regions queue their runs and wait; the
//! committer takes everything queued, appends it as records, syncs once,
//! sets the regions' in-memory marked bits and only then wakes the waiters.
//! While one commit syncs, the next batch fills: many first touches share
//! one `fdatasync` (as dm-era does). A failed commit poisons the journal:
//! nothing more is written to it, what was queued behind it is refused
//! with it, and every later first touch fails, so no write is ever
//! issued unmarked. `poison` does the same for a journal that could not
//! be put in place; `drain` lets a checkpoint find out before it commits.
//! `revive` hands a failed committer a new, complete journal (written
//! from memory by `Tracker::recover_journal`): first touches work again,
//! and no batch that failed can ever count as committed.
//!
//! After a batch is written and its waiters woken, the thread asks the
//! optional annotator which files own each SAVED record's regions and
//! queues the answers as lazy SAVED_FILES records: the file map's work
//! never runs on a FLUSH or delays a first touch.

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::journal::{JournalWriter, RUNS_PER_RECORD_MAX, Record};
use crate::regions::{AtomicBitmap, RegionRun};

/// How long lazy records may stay queued (unwritten) when nothing else
/// comes along to write and sync them.
pub const LAZY_SYNC_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Lazy records queued before the thread is woken to write them.
const LAZY_RECORDS_MAX: usize = 4096;

/// Runs queued before a writer waits for the current commit to finish
/// instead of adding more (bounds the pending queue).
const PENDING_RUNS_MAX: usize = 1 << 20;

#[derive(Debug)]
struct State {
    pending_marks: Vec<RegionRun>,
    pending_records: Vec<Record>,
    /// The batch the pending work will be committed in.
    next_batch: u64,
    committed_batch: u64,
    busy: bool,
    failed: Option<String>,
    /// Batches that were queued or failing when a failed journal was
    /// replaced: their waiters were refused, and stay refused.
    refused: std::ops::Range<u64>,
    stop: bool,
    /// A queued record's writer waits for it: write the batch now.
    sync_required: bool,
    writer: Option<JournalWriter>,
}

/// Names the files (partition, inode) that own saved regions, at most
/// SAVED_FILES_MAX, and whether there were more; None when it cannot say
/// now (no map yet, or the map is busy).
pub type Annotator = Arc<dyn Fn(&[RegionRun]) -> Option<(Vec<(u32, u32)>, bool)> + Send + Sync>;

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    done: Condvar,
    marked: Arc<AtomicBitmap>,
    annotator: Option<Annotator>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("state", &self.state)
            .field("annotated", &self.annotator.is_some())
            .finish()
    }
}

#[derive(Debug)]
pub struct Committer {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Committer {
    pub fn start(
        writer: JournalWriter,
        marked: Arc<AtomicBitmap>,
        annotator: Option<Annotator>,
    ) -> Committer {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending_marks: Vec::new(),
                pending_records: Vec::new(),
                next_batch: 1,
                committed_batch: 0,
                busy: false,
                failed: None,
                refused: 0..0,
                stop: false,
                sync_required: false,
                writer: Some(writer),
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            marked,
            annotator,
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("journal-commit".into())
            .spawn(move || commit_loop(&thread_shared))
            .expect("spawning the journal thread");
        Committer {
            shared,
            thread: Mutex::new(Some(thread)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().expect("journal state lock")
    }

    /// Queues a mark and returns once it is durable and its bits are set.
    pub fn mark(&self, run: RegionRun) -> io::Result<()> {
        let batch = {
            let mut state = self.lock();
            while state.pending_marks.len() >= PENDING_RUNS_MAX && state.failed.is_none() {
                state = self.shared.done.wait(state).expect("journal state lock");
            }
            check_failed(&state)?;
            state.pending_marks.push(run);
            state.next_batch
        };
        self.shared.work.notify_one();
        self.wait_for(batch)
    }

    /// Queues a record that will be synced with its batch; returns the
    /// batch to wait for.
    pub fn enqueue(&self, record: Record) -> io::Result<u64> {
        self.queue(record, true)
    }

    /// Queues a record that is written and made durable with the next sync
    /// (a mark commit, a checkpoint, a stop, or after `LAZY_SYNC_DELAY`).
    /// For records whose loss in a crash errs on the safe side.
    pub fn enqueue_lazy(&self, record: Record) -> io::Result<()> {
        self.queue(record, false).map(|_| ())
    }

    fn queue(&self, record: Record, sync: bool) -> io::Result<u64> {
        let (batch, wake) = {
            let mut state = self.lock();
            check_failed(&state)?;
            state.pending_records.push(record);
            state.sync_required |= sync;
            let queued = state.pending_records.len();
            (
                state.next_batch,
                sync || queued == 1 || queued >= LAZY_RECORDS_MAX,
            )
        };
        // A lazy record wakes the thread only when it is the first one
        // queued (so the thread arms its timer) or the queue is long: not a
        // context switch per FLUSH. It goes out with the next commit or the
        // delay.
        if wake {
            self.shared.work.notify_one();
        }
        Ok(batch)
    }

    /// Waits until `batch` is durable.
    pub fn wait_for(&self, batch: u64) -> io::Result<()> {
        let mut state = self.lock();
        loop {
            if state.refused.contains(&batch) {
                return Err(io::Error::other(
                    "the tracking journal failed while this write waited for its mark; the write was not issued",
                ));
            }
            if state.committed_batch >= batch {
                break;
            }
            check_failed(&state)?;
            state = self.shared.done.wait(state).expect("journal state lock");
        }
        Ok(())
    }

    /// Waits until everything queued is written and synced and the thread
    /// is idle; an error when the journal failed (before or on the way).
    /// Lazy records queued then are written at once: they belong to the
    /// journal in use.
    pub fn drain(&self) -> io::Result<()> {
        self.drained().map(drop)
    }

    fn drained(&self) -> io::Result<MutexGuard<'_, State>> {
        let mut state = self.lock();
        loop {
            check_failed(&state)?;
            if !state.busy && state.pending_marks.is_empty() && state.pending_records.is_empty() {
                return Ok(state);
            }
            if !state.pending_records.is_empty() && !state.sync_required {
                // Including the annotations of the commit just made.
                state.sync_required = true;
                self.shared.work.notify_one();
            }
            state = self.shared.done.wait(state).expect("journal state lock");
        }
    }

    /// Waits for the committer to go idle, then swaps in a new journal
    /// (at a checkpoint or a compaction, while writes are held at the
    /// gate). Refused when the journal failed: what the failed journal
    /// holds is not known, so it is not swapped for one that looks whole.
    pub fn replace_writer(&self, writer: JournalWriter) -> io::Result<()> {
        self.drained()?.writer = Some(writer);
        Ok(())
    }

    /// Fails the journal from outside (a new journal that could not be
    /// put in place): from now on first touches are refused, as after a
    /// failed commit. An earlier failure's reason is kept.
    pub fn poison(&self, reason: String) {
        tracing::error!(%reason, "tracking refuses new first touches");
        self.lock().failed.get_or_insert(reason);
        self.shared.done.notify_all();
    }

    /// Ends a failure with `writer`, a complete journal already in place
    /// (at `Tracker::recover_journal`, while writes are held at the gate).
    /// Every batch not committed so far is refused for good, including
    /// the one being filled: a waiter for any of them wakes with an error
    /// rather than with a later batch's success.
    pub fn revive(&self, writer: JournalWriter) {
        let mut state = self.lock();
        debug_assert!(!state.busy, "a failed committer is idle");
        state.pending_marks.clear();
        state.pending_records.clear();
        state.sync_required = false;
        state.refused = state.committed_batch + 1..state.next_batch + 1;
        state.next_batch += 1;
        state.failed = None;
        state.writer = Some(writer);
        drop(state);
        self.shared.done.notify_all();
    }

    pub fn journal_size_bytes(&self) -> u64 {
        self.lock()
            .writer
            .as_ref()
            .map_or(0, JournalWriter::size_bytes)
    }

    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// Commits what is queued and stops the thread.
    pub fn stop(&self) {
        self.lock().stop = true;
        self.shared.work.notify_one();
        if let Some(thread) = self.thread.lock().expect("thread lock").take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn check_failed(state: &State) -> io::Result<()> {
    match &state.failed {
        Some(message) => Err(io::Error::other(format!(
            "the tracking journal failed earlier ({message}); writes to regions not yet written in this generation, and checkpoints, are refused until the journal can be rewritten (tried again every second) or the server restarts"
        ))),
        None => Ok(()),
    }
}

fn commit_loop(shared: &Shared) {
    loop {
        let mut state = shared.state.lock().expect("journal state lock");
        // Lazy records wait for company (a mark or a waited-for record), a
        // long queue, a stop, or the delay counted from the first of them.
        let mut deadline = None;
        while state.pending_marks.is_empty()
            && !state.sync_required
            && !state.stop
            && state.pending_records.len() < LAZY_RECORDS_MAX
        {
            if state.pending_records.is_empty() {
                deadline = None;
                state = shared.work.wait(state).expect("journal state lock");
                continue;
            }
            let due = *deadline.get_or_insert_with(|| Instant::now() + LAZY_SYNC_DELAY);
            let now = Instant::now();
            if now >= due {
                break;
            }
            state = shared
                .work
                .wait_timeout(state, due - now)
                .expect("journal state lock")
                .0;
        }
        if state.failed.is_some() {
            // A failed journal takes nothing more. What was queued before
            // the failure was refused to its waiters (they woke with the
            // error); committing it now would set bits for writes that
            // were refused, and its record, written after a torn append,
            // may not survive the next replay.
            state.pending_marks.clear();
            state.pending_records.clear();
            state.sync_required = false;
            if state.stop {
                return;
            }
            drop(state);
            shared.done.notify_all();
            continue;
        }
        if state.pending_marks.is_empty() && state.pending_records.is_empty() {
            return; // stopping, nothing left
        }
        let marks = std::mem::take(&mut state.pending_marks);
        let mut records = std::mem::take(&mut state.pending_records);
        state.sync_required = false;
        let batch = state.next_batch;
        state.next_batch += 1;
        state.busy = true;
        let mut writer = state
            .writer
            .take()
            .expect("journal writer present when idle");
        drop(state);

        for chunk in marks.chunks(RUNS_PER_RECORD_MAX) {
            records.push(Record::Mark {
                runs: chunk.to_vec(),
            });
        }
        let result = writer
            .append(&records)
            .map_err(|error| format!("writing the journal failed: {error}"))
            .and_then(|()| {
                writer
                    .sync()
                    .map_err(|error| format!("syncing the journal failed: {error}"))
            });
        if result.is_ok() {
            for run in &marks {
                shared.marked.set_run(*run);
            }
            // Post-condition: every first touch of this batch may now be
            // issued, so every region it asked for must read as marked.
            assert!(
                marks.iter().all(|run| shared.marked.all_set(*run)),
                "a committed batch leaves every requested region marked"
            );
        }
        let mut state = shared.state.lock().expect("journal state lock");
        state.writer = Some(writer);
        match result {
            Ok(()) => state.committed_batch = batch,
            Err(error) => {
                tracing::error!(%error, "journal commit failed: tracking refuses new first touches");
                state.failed = Some(error);
            }
        }
        // Waiters go on at once; a journal swap (`replace_writer`) waits
        // until this commit's annotations are queued, so they land in the
        // journal that holds their SAVED records.
        let annotating = state.failed.is_none() && shared.annotator.is_some();
        state.busy = annotating;
        drop(state);
        shared.done.notify_all();
        if annotating {
            let annotations = annotations(shared, &records);
            let mut state = shared.state.lock().expect("journal state lock");
            state.pending_records.extend(annotations);
            state.busy = false;
            drop(state);
            shared.done.notify_all();
        }
    }
}

/// A SAVED_FILES record for each SAVED record just written, to be queued
/// as lazy records for the next commit.
fn annotations(shared: &Shared, records: &[Record]) -> Vec<Record> {
    let Some(annotator) = &shared.annotator else {
        return Vec::new();
    };
    records
        .iter()
        .filter_map(|record| match record {
            Record::Saved { epoch, runs } => annotator(runs)
                .filter(|(files, _)| !files.is_empty())
                .map(|(files, more)| Record::SavedFiles {
                    epoch: *epoch,
                    files,
                    more,
                }),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{FileHeader, JournalFile, replay};
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    fn journal(name: &str) -> (PathBuf, JournalWriter) {
        let (path, file) = crate::journal::tests::temp_file(&format!("commit-{name}"));
        let header = FileHeader {
            generation: 1,
            granularity_shift: 16,
            image_id: [3; 16],
        };
        (path, JournalWriter::create(Box::new(file), header).unwrap())
    }

    fn saved_files_epochs(path: &PathBuf) -> Vec<u64> {
        replay(&File::open(path).unwrap())
            .unwrap()
            .records
            .iter()
            .filter_map(|record| match record {
                Record::SavedFiles { epoch, .. } => Some(*epoch),
                _ => None,
            })
            .collect()
    }

    /// A checkpoint swaps the journal right after a commit, while the
    /// journal thread is still asking the file map about that commit's
    /// SAVED record: the answer belongs to the old journal, beside it.
    #[test]
    fn a_journal_swap_waits_for_the_annotations_of_the_last_commit() {
        let (old_path, old_writer) = journal("old");
        let (new_path, new_writer) = journal("new");
        let annotator: Annotator = Arc::new(|_runs: &[RegionRun]| {
            std::thread::sleep(std::time::Duration::from_millis(200));
            Some((vec![(0, 12)], false))
        });
        let committer =
            Committer::start(old_writer, Arc::new(AtomicBitmap::new(64)), Some(annotator));
        let runs = vec![RegionRun {
            first_region: 2,
            region_count: 3,
        }];
        let batch = committer.enqueue(Record::Saved { epoch: 5, runs }).unwrap();
        committer.wait_for(batch).unwrap();
        committer.replace_writer(new_writer).unwrap();
        committer.stop();
        assert_eq!(saved_files_epochs(&old_path), vec![5]);
        assert_eq!(saved_files_epochs(&new_path), Vec::<u64>::new());
        let _ = std::fs::remove_file(old_path);
        let _ = std::fs::remove_file(new_path);
    }

    /// A journal file whose `fail_call`-th write waits for `release`,
    /// then lands all but its last 8 bytes and fails with EIO, as a file
    /// system filling up in the middle of a commit does.
    #[derive(Debug)]
    struct HalfWrite {
        file: File,
        calls: AtomicUsize,
        fail_call: usize,
        entered: AtomicBool,
        release: Mutex<bool>,
        released: Condvar,
    }

    impl JournalFile for Arc<HalfWrite> {
        fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
            if self.calls.fetch_add(1, Ordering::SeqCst) != self.fail_call {
                return FileExt::write_all_at(&self.file, bytes, offset);
            }
            self.entered.store(true, Ordering::SeqCst);
            let mut released = self.release.lock().unwrap();
            while !*released {
                released = self.released.wait(released).unwrap();
            }
            FileExt::write_all_at(&self.file, &bytes[..bytes.len() - 8], offset)?;
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
        fn sync_data(&self) -> io::Result<()> {
            self.file.sync_data()
        }
        fn set_len(&self, length: u64) -> io::Result<()> {
            self.file.set_len(length)
        }
    }

    fn run(first_region: u64, region_count: u64) -> RegionRun {
        RegionRun {
            first_region,
            region_count,
        }
    }

    /// Regression: marks queued while a commit was failing were committed
    /// by the next turn of the loop, after the failure: their bits were
    /// set (so a retried write took the fast path and was issued), while
    /// their record, written at the failed append's offset with sequence
    /// numbers that skipped it, was cut off as a torn tail by the next
    /// open. That write was then missing from every change report.
    #[test]
    fn marks_queued_before_a_journal_failure_are_not_committed_after_it() {
        let (path, file) = crate::journal::tests::temp_file("commit-failure");
        let half = Arc::new(HalfWrite {
            file,
            calls: AtomicUsize::new(0),
            // Call 0 writes the header; call 1 is the first commit.
            fail_call: 1,
            entered: AtomicBool::new(false),
            release: Mutex::new(false),
            released: Condvar::new(),
        });
        let header = FileHeader {
            generation: 1,
            granularity_shift: 16,
            image_id: [4; 16],
        };
        let writer = JournalWriter::create(Box::new(Arc::clone(&half)), header).unwrap();
        let marked = Arc::new(AtomicBitmap::new(64));
        let committer = Arc::new(Committer::start(writer, Arc::clone(&marked), None));
        // A commit held inside its write.
        let failing = {
            let committer = Arc::clone(&committer);
            std::thread::spawn(move || committer.mark(run(1, 1)))
        };
        while !half.entered.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        // A first touch queued while that commit is under way.
        let queued = {
            let committer = Arc::clone(&committer);
            std::thread::spawn(move || committer.mark(run(9, 1)))
        };
        while committer.lock().pending_marks.is_empty() {
            std::thread::yield_now();
        }
        *half.release.lock().unwrap() = true;
        half.released.notify_all();
        assert!(failing.join().unwrap().is_err());
        assert!(
            queued.join().unwrap().is_err(),
            "the queued first touch is refused"
        );
        committer.stop();
        assert!(
            !marked.get(9),
            "a region whose first touch was refused must not read as marked"
        );
        // What the file holds replays to nothing but the header.
        let replayed = replay(&File::open(&path).unwrap()).unwrap();
        assert!(replayed.records.is_empty(), "{:?}", replayed.records);
        let _ = std::fs::remove_file(path);
    }
}
