//! The copy-before-write (CBW) snapshot: the disk exactly as it was at a
//! checkpoint's switch, while the disk stays writable.
//!
//! `SnapshotManager::take` closes the current generation with a new
//! checkpoint; the snapshot becomes active in the switch itself
//! (`at_switch`, gate closed), so no write falls between the two. From
//! then on every region first written in a generation (the tracker's first
//! touch, which waits for a journal commit anyway) has its old contents
//! copied to the store before the write is issued, unless the store holds
//! them already; later writes to the region cost nothing. A checkpoint
//! taken while the snapshot is open starts a generation whose first
//! touches call the hook again: regions already copied out are skipped.
//!
//! The store is bounded (`SnapshotLimits`). The disk's writes never fail
//! because of a snapshot and wait at most `copy_out_timeout` for their own
//! regions' copy-out: when the store fills, a copy-out takes too long or
//! its I/O fails, the snapshot is dropped ("broken", with the reason) and
//! its reads fail from then on, as QEMU's `on-cbw-error=break-snapshot`.
//!
//! One snapshot at a time per tracker: enough for one copy pipeline per
//! disk, and it keeps a first touch to one index lookup per region. Its
//! checkpoint is pinned (holder `snapshot`) while it is open. Nothing of
//! it survives the process: a server that starts removes the stores and
//! the `snapshot` pins an earlier one left (`SnapshotManager::register`).
//!
//! Files and what each owns:
//! - `snapshot.rs`: `SnapshotManager` (the generation hook, take,
//!   release), `SnapshotLimits` and their defaults.
//! - `snapshot/error.rs`: `RegisterError`, `TakeError`, `ReleaseError`.
//! - `snapshot/files.rs`: the store's file name and directory, the
//!   free-space check, removing what an earlier process left.
//! - `snapshot/store.rs`: the store file, its in-memory index, the claim
//!   and bounded wait of a first touch, the copy threads.
//! - `snapshot/view.rs`: `Snapshot`, the read-only `BlockBackend`, with
//!   the read path's ordering argument.
//! - `snapshot/metadata.rs`: the snapshot's `base:allocation` extents and
//!   the dirty bitmaps of the checkpoints before it.

mod error;
mod files;
mod metadata;
mod store;
mod view;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use backend::BlockBackend;
use tracker::catalog::Checkpoint;
use tracker::regions::RegionRun;
use tracker::{GenerationHook, Tracker};

pub use error::{RegisterError, ReleaseError, TakeError};
use files::{
    create_private_dir, free_bytes, remove_leftover_pins, remove_leftover_stores, store_file_name,
};
use store::Store;
pub use view::{Snapshot, SnapshotStatus};

/// The pin holder of an open snapshot's checkpoint. Reserved: a server
/// that starts removes every pin of this holder (no snapshot survives a
/// restart).
pub const PIN_HOLDER: &str = "snapshot";

/// Where stores live, under the tracker's state directory.
pub const STORE_DIR: &str = "snapshots";

/// The default store limit, as a share of the image. The store's worst
/// case is the whole image (every region rewritten while the copy runs),
/// and it usually shares the image's file system; a share keeps what a
/// snapshot may cost in proportion to the disk. A tenth holds a copy
/// during which a tenth of the disk is first written; a fixed cap such as
/// 1 GiB would not: at 64 KiB regions, 16384 random 4 KiB writes fill it.
pub const STORE_SHARE_DEFAULT_PERCENT: u64 = 10;

/// The least default limit (unless the image is smaller), so that small
/// disks get a usable store.
pub const STORE_FLOOR_DEFAULT_BYTES: u64 = 64 << 20;

/// How long a write waits for its regions' copy-out before the snapshot
/// breaks and the write goes on. A healthy copy-out is one region read from
/// the disk and written to the page cache, milliseconds; this bound only
/// fires when the disk or the store hangs. It stays well below the
/// kernel NBD client's 30 s request timeout (and the 60 s of virtio-win
/// guests, for which Proxmox sets QEMU's cbw-timeout to 45 s), so the
/// snapshot breaks before a client gives up on its write.
pub const COPY_OUT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// The bounds of one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotLimits {
    /// The store's size at most; the snapshot breaks rather than pass it.
    pub store_bytes_max: u64,
    pub copy_out_timeout: Duration,
}

impl SnapshotLimits {
    /// The defaults for an image of `image_bytes`.
    pub fn for_image(image_bytes: u64) -> SnapshotLimits {
        SnapshotLimits {
            store_bytes_max: default_store_bytes_max(image_bytes),
            copy_out_timeout: COPY_OUT_TIMEOUT_DEFAULT,
        }
    }
}

/// STORE_SHARE_DEFAULT_PERCENT of the image, at least
/// STORE_FLOOR_DEFAULT_BYTES or the whole image when it is smaller.
pub fn default_store_bytes_max(image_bytes: u64) -> u64 {
    let share = image_bytes / 100 * STORE_SHARE_DEFAULT_PERCENT;
    share.max(STORE_FLOOR_DEFAULT_BYTES.min(image_bytes))
}

#[derive(Debug, Default)]
enum Slot {
    #[default]
    Idle,
    /// A take is creating the store.
    Preparing {
        name: String,
    },
    /// The store is ready; the switch of checkpoint `name` activates it.
    Armed {
        name: String,
        store: Arc<Store>,
        tracker: std::sync::Weak<Tracker>,
    },
    Active(Arc<Snapshot>),
}

impl Slot {
    fn name(&self) -> Option<&str> {
        match self {
            Slot::Idle => None,
            Slot::Preparing { name } | Slot::Armed { name, .. } => Some(name),
            Slot::Active(snapshot) => Some(snapshot.name()),
        }
    }

    /// Stops what the slot held and removes its store file.
    fn discard(self) {
        let store = match self {
            Slot::Armed { store, .. } => store,
            Slot::Active(snapshot) => Arc::clone(&snapshot.store),
            Slot::Idle | Slot::Preparing { .. } => return,
        };
        store.close();
        if let Err(error) = store.remove_file() {
            tracing::warn!(store = %store.path().display(), %error, "cannot remove a snapshot store");
        }
    }
}

/// How often `wait_until_idle` looks.
const IDLE_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// The tracker's snapshot, as a generation hook: at most one open at a time.
pub struct SnapshotManager {
    /// The storage under the tracking layer: old contents are read there.
    live: Arc<dyn BlockBackend>,
    store_dir: PathBuf,
    slot: Mutex<Slot>,
}

impl std::fmt::Debug for SnapshotManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotManager")
            .field("store_dir", &self.store_dir)
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl SnapshotManager {
    /// Removes what an earlier server left (stores, `snapshot` pins:
    /// nothing to resume) and registers a manager with `tracker`. Call
    /// before `Tracker::start`. `live` is the storage backend under the
    /// tracker's `TrackedBackend` (its writes would go through the tracker).
    pub fn register(
        tracker: &Tracker,
        live: Arc<dyn BlockBackend>,
    ) -> Result<Arc<SnapshotManager>, RegisterError> {
        if live.size_bytes() != tracker.size_bytes() {
            return Err(RegisterError::SizeMismatch {
                storage_bytes: live.size_bytes(),
                tracker_bytes: tracker.size_bytes(),
            });
        }
        let store_dir = tracker.state_dir().join(STORE_DIR);
        remove_leftover_stores(&store_dir).map_err(|source| RegisterError::Leftovers {
            path: store_dir.clone(),
            source,
        })?;
        remove_leftover_pins(tracker).map_err(|source| RegisterError::Pins { source })?;
        let manager = Arc::new(SnapshotManager {
            live,
            store_dir,
            slot: Mutex::new(Slot::Idle),
        });
        tracker.add_hook(Arc::clone(&manager) as Arc<dyn GenerationHook>);
        Ok(manager)
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().expect("snapshot slot lock")
    }

    /// The open snapshot, if any (also when broken, until released).
    pub fn active(&self) -> Option<Arc<Snapshot>> {
        match &*self.lock() {
            Slot::Active(snapshot) => Some(Arc::clone(snapshot)),
            _ => None,
        }
    }

    /// Waits up to `limit` for no snapshot to be open (polling: every
    /// path back to idle would otherwise have to signal); whether none is.
    /// A killed copier's snapshot is released only once its server sees
    /// the control connection end, which can come after the rerun asks
    /// for one: a take should wait for that rather than fail the rerun.
    pub fn wait_until_idle(&self, limit: std::time::Duration) -> bool {
        let started = std::time::Instant::now();
        loop {
            if self.lock().name().is_none() {
                return true;
            }
            if started.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(IDLE_POLL);
        }
    }

    /// Takes checkpoint `name` and returns the snapshot of the disk at its
    /// switch, pinned until `release`. Refused while another is open.
    pub fn take(
        &self,
        tracker: &Arc<Tracker>,
        name: &str,
        limits: SnapshotLimits,
    ) -> Result<Arc<Snapshot>, TakeError> {
        let region_bytes = tracker.granularity().bytes().min(tracker.size_bytes());
        if limits.store_bytes_max < region_bytes {
            return Err(TakeError::StoreTooSmall {
                name: name.to_string(),
                store_bytes_max: limits.store_bytes_max,
                region_bytes,
            });
        }
        {
            let mut slot = self.lock();
            if let Some(open) = slot.name() {
                return Err(TakeError::AlreadyOpen {
                    name: name.to_string(),
                    open: open.to_string(),
                });
            }
            *slot = Slot::Preparing {
                name: name.to_string(),
            };
        }
        let store = match self.create_store(name, tracker, limits) {
            Ok(store) => store,
            Err(error) => {
                *self.lock() = Slot::Idle;
                return Err(error);
            }
        };
        *self.lock() = Slot::Armed {
            name: name.to_string(),
            store: Arc::clone(&store),
            tracker: Arc::downgrade(tracker),
        };
        let snapshot = self.activate_and_pin(tracker, name);
        if snapshot.is_err() {
            let mut slot = self.lock();
            let ours = match &*slot {
                Slot::Armed { store: armed, .. } => Arc::ptr_eq(armed, &store),
                Slot::Active(snapshot) => Arc::ptr_eq(&snapshot.store, &store),
                Slot::Idle | Slot::Preparing { .. } => false,
            };
            if ours {
                std::mem::take(&mut *slot).discard();
            } else {
                drop(slot);
                Slot::Armed {
                    name: name.to_string(),
                    store,
                    tracker: Arc::downgrade(tracker),
                }
                .discard();
            }
        }
        snapshot
    }

    /// Takes the checkpoint (whose switch activates the armed store) and
    /// pins it.
    fn activate_and_pin(&self, tracker: &Tracker, name: &str) -> Result<Arc<Snapshot>, TakeError> {
        let checkpoint = tracker
            .checkpoint(name)
            .map_err(|source| TakeError::Checkpoint {
                name: name.to_string(),
                source,
            })?;
        let snapshot = match &*self.lock() {
            Slot::Active(snapshot) if snapshot.generation() == checkpoint.generation => {
                Arc::clone(snapshot)
            }
            _ => {
                return Err(TakeError::NotActivated {
                    name: name.to_string(),
                });
            }
        };
        let reason = format!(
            "copy-before-write snapshot open (store {})",
            snapshot.store_path().display()
        );
        tracker
            .pin(name, PIN_HOLDER, &reason)
            .map_err(|source| TakeError::Pin {
                name: name.to_string(),
                source,
            })?;
        Ok(snapshot)
    }

    fn create_store(
        &self,
        name: &str,
        tracker: &Tracker,
        limits: SnapshotLimits,
    ) -> Result<Arc<Store>, TakeError> {
        let store_error = |path: &Path, source| TakeError::Store {
            name: name.to_string(),
            path: path.to_path_buf(),
            source,
        };
        create_private_dir(&self.store_dir).map_err(|e| store_error(&self.store_dir, e))?;
        let free_bytes =
            free_bytes(&self.store_dir).map_err(|e| store_error(&self.store_dir, e))?;
        if free_bytes < limits.store_bytes_max {
            return Err(TakeError::NoSpace {
                name: name.to_string(),
                path: self.store_dir.clone(),
                free_bytes,
                store_bytes_max: limits.store_bytes_max,
            });
        }
        let path = self.store_dir.join(store_file_name(name));
        Store::create(
            path.clone(),
            Arc::clone(&self.live),
            tracker.granularity(),
            limits,
        )
        .map_err(|e| store_error(&path, e))
    }

    /// Drops snapshot `name`: first touches stop copying, its reads fail,
    /// its store file goes and its checkpoint is unpinned.
    pub fn release(&self, tracker: &Tracker, name: &str) -> Result<(), ReleaseError> {
        let snapshot = {
            let mut slot = self.lock();
            match &*slot {
                Slot::Active(snapshot) if snapshot.name() == name => {
                    let snapshot = Arc::clone(snapshot);
                    *slot = Slot::Idle;
                    snapshot
                }
                other => {
                    return Err(ReleaseError::NotOpen {
                        name: name.to_string(),
                        open: other.name().map(str::to_string),
                    });
                }
            }
        };
        snapshot.store.close();
        let removed = snapshot.store.remove_file();
        let unpinned = tracker.unpin(name, PIN_HOLDER);
        removed.map_err(|source| ReleaseError::RemoveStore {
            name: name.to_string(),
            path: snapshot.store_path().to_path_buf(),
            source,
        })?;
        unpinned.map_err(|source| ReleaseError::Unpin {
            name: name.to_string(),
            source,
        })
    }
}

impl GenerationHook for SnapshotManager {
    fn before_first_touch(&self, run: RegionRun) {
        let snapshot = match &*self.lock() {
            Slot::Active(snapshot) => Arc::clone(snapshot),
            _ => return,
        };
        snapshot.store.copy_out(run);
    }

    /// The gate is closed: the disk now is the snapshot, and the next
    /// write is a first touch of the new generation.
    fn at_switch(&self, closed: &Checkpoint) {
        let mut slot = self.lock();
        let Slot::Armed {
            name,
            store,
            tracker,
        } = &*slot
        else {
            return;
        };
        if *name != closed.name {
            return; // someone else's checkpoint came first; ours follows
        }
        let snapshot = Snapshot {
            name: name.clone(),
            generation: closed.generation,
            size_bytes: self.live.size_bytes(),
            granularity: store.granularity(),
            store: Arc::clone(store),
            live: Arc::clone(&self.live),
            tracker: tracker.clone(),
            dirty: Default::default(),
        };
        *slot = Slot::Active(Arc::new(snapshot));
    }

    /// The pin keeps the snapshot's checkpoint; a delete means someone
    /// removed the pin by hand, and its changes may now reach the disk
    /// without a copy-out.
    fn checkpoint_deleted(&self, deleted: &Checkpoint) {
        if let Slot::Active(snapshot) = &*self.lock()
            && snapshot.generation() == deleted.generation
        {
            snapshot.store.break_with(format!(
                "its checkpoint {:?} was deleted while the snapshot was open",
                deleted.name
            ));
        }
    }
}

impl Drop for SnapshotManager {
    /// A server that stops drops its snapshot with it (the pin stays until
    /// the next start removes it).
    fn drop(&mut self) {
        std::mem::take(&mut *self.lock()).discard();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_store_limit_is_a_tenth_of_the_image_with_a_floor() {
        const GIB: u64 = 1 << 30;
        let cases = [
            (100 * GIB, 10 * GIB),
            (GIB, GIB / 100 * 10),
            (256 << 20, STORE_FLOOR_DEFAULT_BYTES),
            (16 << 20, 16 << 20),
            (0, 0),
        ];
        for (image_bytes, limit_bytes) in cases {
            assert_eq!(
                default_store_bytes_max(image_bytes),
                limit_bytes,
                "{image_bytes}"
            );
        }
    }
}
