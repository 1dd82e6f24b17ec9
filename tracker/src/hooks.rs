//! The generation-hook seam: what layers built on the tracker (the file
//! map today, the copier's snapshot next) learn about its generations.
//!
//! Hooks are registered before `Tracker::start` and called in this order
//! around a checkpoint: `before_switch` (gate open, requests flowing),
//! `at_switch` (gate closed, nothing in flight, the closed generation
//! committed to the catalog), then the continuation `before_switch`
//! returned (gate open again). `saved` runs on the FLUSH path and
//! `annotate_saved` on the journal thread, so neither may wait for I/O or
//! for a lock a request holds. `before_first_touch` runs on the write path
//! of first touches only (the requests that wait for a journal commit
//! anyway), so a later write to a marked region never calls a hook. The
//! tracker never depends on what a hook does with these calls.

use std::fmt::Debug;

use crate::catalog::Checkpoint;
use crate::regions::RegionRun;

/// Files (partition, inode) that own saved regions, and whether there
/// were more than a record holds.
pub type SavedFiles = (Vec<(u32, u32)>, bool);

/// Runs after a successful switch with the checkpoint it closed.
pub type AfterSwitch<'a> = Box<dyn FnOnce(&Checkpoint) + 'a>;

pub trait GenerationHook: Send + Sync + Debug {
    /// A flush (or a FUA write) made `runs` durable in the current
    /// generation. On the request path: cheap, no I/O.
    fn saved(&self, _runs: &[RegionRun]) {}

    /// After the journal thread wrote the SAVED record of `runs`: what to
    /// record beside it, if this hook can say now without waiting.
    fn annotate_saved(&self, _runs: &[RegionRun]) -> Option<SavedFiles> {
        None
    }

    /// A checkpoint is about to close the current generation. `unflushed`
    /// are the byte ranges written and not yet flushed. What is returned
    /// runs after the switch succeeded, with the gate open again.
    fn before_switch<'a>(&'a self, _unflushed: &[(u64, u64)]) -> Option<AfterSwitch<'a>> {
        None
    }

    /// The switch itself: the gate is closed, no request is in flight,
    /// `closed` is durable in the catalog and the new generation has not
    /// taken a write yet.
    fn at_switch(&self, _closed: &Checkpoint) {}

    /// Regions of `run` not yet marked in the current generation are about
    /// to take their first write (or trim, or zeroing) of it. Called with
    /// the request's gate held, before the region's mark is queued and
    /// before the write is issued; the write waits for the return, and
    /// nothing a hook does can fail it, so a hook that waits bounds its
    /// wait.
    ///
    /// Some regions of `run` may be marked already (the request also
    /// covers regions touched earlier), and two requests may report one
    /// region at once (both found it unmarked): the hook sorts both out
    /// itself. A region's mark is set only after this call returned for
    /// it, so a request that finds the region marked (and calls no hook)
    /// comes after that return. The one exception is a delete of the
    /// newest checkpoint, whose changes join the current generation's
    /// marks without a call (`checkpoint_deleted` follows).
    fn before_first_touch(&self, _run: RegionRun) {}

    /// A checkpoint was deleted (its changes merged into the next one).
    fn checkpoint_deleted(&self, _deleted: &Checkpoint) {}
}
