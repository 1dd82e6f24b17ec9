//! `TrackedBackend`: the tracker as a `BlockBackend` layer.
//!
//! WRITE, TRIM and WRITE_ZEROES enter the gate, wait until their regions
//! are durably marked (free when they already are), then go to the inner
//! backend and note their regions as written. FLUSH runs the tracker's
//! saved record beside the device flush, and `qemu:dirty-bitmap:*` contexts
//! join the inner backend's. Nothing else is implemented here: size,
//! capabilities, reads, CACHE and `base:allocation` reach the inner backend
//! through `next()`, the trait's forwarding default, and the tracker never
//! reads block contents.

use std::io;
use std::sync::Arc;

use backend::{BlockBackend, Extent, ZeroError, ZeroRequest};

use crate::tracker::{CONTEXT_PREFIX, EXACT_CONTEXT_PREFIX, Tracker};

pub struct TrackedBackend {
    inner: Arc<dyn BlockBackend>,
    tracker: Arc<Tracker>,
}

impl std::fmt::Debug for TrackedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedBackend")
            .field("tracker", &self.tracker.state_dir())
            .finish()
    }
}

impl TrackedBackend {
    pub fn new(inner: Arc<dyn BlockBackend>, tracker: Arc<Tracker>) -> TrackedBackend {
        TrackedBackend { inner, tracker }
    }

    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    /// Marks, runs `op`, notes the range written.
    fn tracked<T, E: From<io::Error>>(
        &self,
        offset: u64,
        length: u64,
        op: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let _gate = self.tracker.enter();
        self.marked(offset, length)?;
        let result = op()?;
        self.tracker.note_written(offset, length);
        Ok(result)
    }

    /// The range's regions durably marked; when the journal has failed,
    /// also asks for its rewrite, so that tracking comes back by itself
    /// once the state's file system takes writes again.
    fn marked(&self, offset: u64, length: u64) -> io::Result<()> {
        let marked = self.tracker.ensure_marked(offset, length);
        if marked.is_err() {
            self.rewrite_journal_if_wanted();
        }
        marked
    }

    /// Starts a journal compaction or a failed journal's rewrite when
    /// the tracker wants one. Off the request path: it closes the gate,
    /// so it must not run on a thread that holds it.
    fn rewrite_journal_if_wanted(&self) {
        // A failed journal cannot be compacted: its rewrite comes first.
        let recover = self.tracker.journal_wants_recovery();
        if !recover && !self.tracker.journal_wants_compaction() {
            return;
        }
        let tracker = Arc::clone(&self.tracker);
        let spawned = std::thread::Builder::new()
            .name("blockwatch-journal".into())
            .spawn(move || {
                let result = if recover {
                    tracker.recover_journal().map(drop)
                } else {
                    tracker.compact_journal()
                };
                if let Err(error) = result {
                    tracing::warn!(error = %crate::tracker::error_chain(&error), "journal rewrite failed");
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "could not start a journal rewrite");
            self.tracker.cancel_compaction();
        }
    }
}

impl BlockBackend for TrackedBackend {
    fn next(&self) -> Option<&dyn BlockBackend> {
        Some(&*self.inner)
    }
    /// Tracking changes writes only: reads are the storage's own.
    fn read_through_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.read_through_fd()
    }
    fn write_is_cheap(&self, offset: u64, length: u64) -> bool {
        self.tracker.is_marked(offset, length) && self.inner.write_is_cheap(offset, length)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let length = buf.len() as u64;
        if !fua {
            return self.tracked(offset, length, || self.inner.write_at(buf, offset, false));
        }
        let _gate = self.tracker.enter();
        self.marked(offset, length)?;
        self.inner.write_at(buf, offset, true)?;
        self.tracker.note_written_durably(offset, length);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let result = {
            let _gate = self.tracker.enter();
            self.tracker.flush(|| self.inner.flush())
        };
        self.rewrite_journal_if_wanted();
        result
    }
    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.tracked(offset, length, || self.inner.trim(offset, length, fua))
    }
    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        request: ZeroRequest,
    ) -> Result<(), ZeroError> {
        self.tracked(offset, length, || {
            self.inner.write_zeroes(offset, length, request)
        })
    }
    fn meta_contexts(&self) -> Vec<String> {
        let mut contexts = self.inner.meta_contexts();
        contexts.extend(self.tracker.context_names());
        contexts
    }
    fn context_extents(
        &self,
        context: &str,
        offset: u64,
        length: u64,
        max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        if context.starts_with(CONTEXT_PREFIX) || context.starts_with(EXACT_CONTEXT_PREFIX) {
            self.tracker
                .dirty_extents(context, offset, length, max_extents, out)
        } else {
            self.inner
                .context_extents(context, offset, length, max_extents, out)
        }
    }
}
