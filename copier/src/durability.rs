//! The durability seam: every file operation a copy's outcome depends on
//! (a replica's data, size and syncs, its record's write, sync and rename,
//! the progress record, a tape's blocks, syncs and cuts, the directory
//! syncs) and every catalog transaction the copy makes (pins, unpins,
//! deletes) goes through `step`, so that a test can watch each one and
//! cut the power before any of them (copier/tests/power_loss.rs, the
//! model of the tracker's `JournalFile` seam and redb's
//! crash_consistency.rs).
//!
//! With no hook installed, `step` costs one relaxed atomic load before a
//! system call. The hook is process-wide: the power-loss test is its only
//! user, and it runs its cases one at a time.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One operation whose effect a crash may keep or lose.
#[derive(Debug, Clone, Copy)]
pub enum Step<'a> {
    /// Opens `path`, creating it if it is missing (a new name in its
    /// directory, durable only once the directory is synced).
    Create(&'a Path),
    /// Changes the bytes or the size of `path` (write, hole punch,
    /// truncate): lost, kept or torn by a crash until synced.
    Write(&'a Path),
    /// `fdatasync` (`all: false`: data and size, not the mtime) or `fsync`
    /// (`all: true`) of `path`.
    Sync {
        path: &'a Path,
        all: bool,
    },
    Rename {
        from: &'a Path,
        to: &'a Path,
    },
    Remove(&'a Path),
    /// `fsync` of a directory: its names as they are now become durable.
    SyncDirectory(&'a Path),
    /// A transaction on the source's catalog (`pin`, `unpin`, `delete`),
    /// atomic by redb's own commit.
    Catalog(&'a str),
}

/// Told of every step; `before` may refuse one (the power is gone), and
/// the step then fails with that error without being done.
pub trait DurabilityHook: Send + Sync {
    fn before(&self, step: &Step<'_>) -> io::Result<()>;
    /// The step was done.
    fn after(&self, step: &Step<'_>);
}

static INSTALLED: AtomicBool = AtomicBool::new(false);
static HOOK: Mutex<Option<Arc<dyn DurabilityHook>>> = Mutex::new(None);

/// Installs (or with None removes) the process's hook. Tests only.
#[doc(hidden)]
pub fn set_hook(hook: Option<Arc<dyn DurabilityHook>>) {
    let mut installed = HOOK.lock().expect("durability hook lock");
    INSTALLED.store(hook.is_some(), Ordering::SeqCst);
    *installed = hook;
}

/// Does `operation` as `step`, telling the hook before and after.
pub(crate) fn step<T>(step: Step<'_>, operation: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    if !INSTALLED.load(Ordering::Relaxed) {
        return operation();
    }
    let hook = HOOK.lock().expect("durability hook lock").clone();
    let Some(hook) = hook else {
        return operation();
    };
    hook.before(&step)?;
    let result = operation();
    if result.is_ok() {
        hook.after(&step);
    }
    result
}
