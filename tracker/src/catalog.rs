//! The catalog (redb): the image's identity, the clean-shutdown marker,
//! the closed checkpoints with their region bitmaps (roaring), and the
//! pins that keep checkpoints from being deleted.
//!
//! Every value carries its own crc32c in front (little-endian u32), checked
//! on every read, so a damaged value is reported rather than trusted.
//! Format: docs/journal.md, "Catalog".

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use roaring::RoaringBitmap;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const CHECKPOINTS: TableDefinition<u64, &[u8]> = TableDefinition::new("checkpoints");
/// Key: generation; the checkpoint's fine record (exact regions and
/// written blocks). A catalog or checkpoint without one counts whole.
const FINE: TableDefinition<u64, &[u8]> = TableDefinition::new("fine");
/// Key: (generation of the pinned checkpoint, holder).
const PINS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("pins");

const KEY_IDENTITY: &str = "identity";
const KEY_CLEAN_SHUTDOWN: &str = "clean_shutdown";
const KEY_PRECISION: &str = "precision";
/// The current generation at least: written when the newest checkpoint is
/// deleted, since the generation after the newest one left would be one
/// lower than the journal's.
const KEY_GENERATION_FLOOR: &str = "generation_floor";
const KEY_FINE_CURRENT: &str = "fine_current";
/// Largest catalog value accepted (a full 2^32-region bitmap serializes to ~512 MiB
/// at worst; real ones are far smaller). Checked before decoding.
const VALUE_MAX_BYTES: usize = 1 << 30;
/// Identity: image id 16, size u64, granularity shift u32, device u64, inode u64.
const IDENTITY_LEN: usize = 16 + 8 + 4 + 8 + 8;
const _: () = assert!(IDENTITY_LEN == 44);
/// Clean-shutdown marker: image mtime i128 (ns), size u64, generation u64.
const CLEAN_SHUTDOWN_LEN: usize = 16 + 8 + 8;
const _: () = assert!(CLEAN_SHUTDOWN_LEN == 32);

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog database error: {0}")]
    Database(String),
    #[error("catalog value {key} fails its checksum")]
    Checksum { key: String },
    #[error("catalog value {key} is malformed: {reason}")]
    Malformed { key: String, reason: &'static str },
    #[error(
        "the catalog was not closed cleanly and needs a repair, which a read-only open cannot make"
    )]
    NeedsRepair,
    #[error("the catalog is open read-only")]
    ReadOnly,
    /// What the catalog's check in another process found (`Probe`).
    #[error("{0}")]
    Checked(String),
}

/// redb panics (`unreachable!`, "Malformed allocator state") on some
/// damaged pages instead of returning an error. A damaged catalog must be
/// reported like any unreadable one, with tracking falling back to every
/// region changed (docs/journal.md), never take the process down: so
/// every public call into redb runs through this.
fn guarded<T>(call: impl FnOnce() -> Result<T, CatalogError>) -> Result<T, CatalogError> {
    quiet_inside_guard();
    let outer = IN_GUARD.replace(true);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(call));
    IN_GUARD.set(outer);
    match result {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|text| text.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".to_string());
            Err(CatalogError::Database(format!(
                "redb gave up on a damaged catalog ({message})"
            )))
        }
    }
}

thread_local! {
    /// This thread is inside `guarded`.
    static IN_GUARD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Keeps the panic hook from printing a panic `guarded` catches (it
/// becomes an error that says the same); every other panic is printed as
/// before.
fn quiet_inside_guard() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_GUARD.get() {
                previous(info);
            }
        }));
    });
}

/// Checks a catalog file in another process before this one opens it:
/// `check_file` run there (the binary's hidden `check-catalog` command).
/// `guarded` turns redb's panics into errors, but not a panic raised while
/// redb unwinds from another (seen on damaged pages in a release build:
/// `panic_in_cleanup` under `WriteTransaction::commit`), which aborts the
/// process; that takes down the check instead of a server. `Err` says
/// why the catalog cannot be opened. Without a probe (library users, unit
/// tests that set none) catalogs are opened with `guarded` alone.
pub type Probe = fn(&Path, ProbeMode) -> Result<(), String>;

/// How the catalog is about to be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeMode {
    /// As `Catalog::open` (which may repair it, so the check does too).
    Writable,
    /// As `Catalog::open_read_only`, changing nothing.
    ReadOnly,
}

static PROBE: std::sync::OnceLock<Probe> = std::sync::OnceLock::new();

/// Sets the probe every later open of a catalog file runs first (once
/// per process; later calls are ignored).
pub fn set_probe(probe: Probe) {
    let _ = PROBE.set(probe);
}

fn probed(path: &Path, mode: ProbeMode) -> Result<(), CatalogError> {
    let Some(probe) = PROBE.get() else {
        return Ok(());
    };
    // A new catalog has nothing to check.
    if !std::fs::metadata(path).is_ok_and(|metadata| metadata.len() > 0) {
        return Ok(());
    }
    probe(path, mode).map_err(CatalogError::Checked)
}

/// What a probe's process runs: opens the catalog as `mode` says and
/// reads every entry of every table. `NeedsRepair` for a read-only open
/// is not damage: the caller's own open says so and repairs it.
pub fn check_file(path: &Path, mode: ProbeMode) -> Result<(), CatalogError> {
    let catalog = match mode {
        ProbeMode::Writable => Catalog::open_unprobed(path)?,
        ProbeMode::ReadOnly => Catalog::open_read_only_unprobed(path)?,
    };
    guarded(|| {
        let txn = catalog.begin_read()?;
        fn all<K: redb::Key + 'static>(
            txn: &redb::ReadTransaction,
            table: TableDefinition<K, &[u8]>,
        ) -> Result<(), CatalogError> {
            let table = match txn.open_table(table) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
                Err(error) => return Err(db_error(error)),
            };
            for entry in table.iter().map_err(db_error)? {
                let (_key, value) = entry.map_err(db_error)?;
                std::hint::black_box(value.value().len());
            }
            Ok(())
        }
        all(&txn, META)?;
        all(&txn, CHECKPOINTS)?;
        all(&txn, FINE)?;
        all(&txn, PINS)
    })
}

/// Makes sure every table exists, which is the database's first commit.
fn with_tables(db: redb::Database) -> Result<redb::Database, CatalogError> {
    let txn = db.begin_write().map_err(db_error)?;
    txn.open_table(META).map_err(db_error)?;
    txn.open_table(CHECKPOINTS).map_err(db_error)?;
    txn.open_table(PINS).map_err(db_error)?;
    txn.open_table(FINE).map_err(db_error)?;
    txn.commit().map_err(db_error)?;
    Ok(db)
}

fn db_error(error: impl std::fmt::Display) -> CatalogError {
    CatalogError::Database(error.to_string())
}

/// Which image this state belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub image_id: [u8; 16],
    pub size_bytes: u64,
    pub granularity_shift: u32,
    pub device: u64,
    pub inode: u64,
}

/// Written when a server stops cleanly; removed when one starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanShutdown {
    pub image_mtime_ns: i128,
    pub size_bytes: u64,
    pub generation: u64,
}

/// A closed generation and the name of the checkpoint that closed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub name: String,
    pub generation: u64,
    pub created_unix_seconds: u64,
    /// Regions changed during the generation.
    pub changed: RoaringBitmap,
    /// Of those, the ones whose last write was flushed.
    pub saved: RoaringBitmap,
    /// Of the changed regions, those whose fine record is complete: only
    /// the blocks in `fine` changed in them. The others count whole.
    pub exact: RoaringBitmap,
    /// Blocks (at the state's precision) written during the generation,
    /// within the `exact` regions.
    pub fine: RoaringBitmap,
}

/// A checkpoint held by someone (a copy target, an open snapshot): it
/// cannot be deleted while pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The pinned checkpoint's generation.
    pub generation: u64,
    /// Who holds it, unique per checkpoint (`nightly`, `target:/backup/disk.img`).
    pub holder: String,
    pub reason: String,
    pub created_unix_seconds: u64,
}

enum Db {
    Writable(redb::Database),
    ReadOnly(redb::ReadOnlyDatabase),
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Db::Writable(_) => "Db::Writable",
            Db::ReadOnly(_) => "Db::ReadOnly",
        })
    }
}

#[derive(Debug)]
pub struct Catalog {
    /// Some but while `Drop` closes it; replaced by `reopen`.
    db: std::sync::RwLock<Option<Db>>,
    /// The file of a writable catalog (`reopen` opens it again).
    path: Option<PathBuf>,
    /// Why a write transaction failed to commit, once one did. redb
    /// refuses every later write of the database after an I/O error
    /// ("close and re-open the database"): it stays said until `reopen`
    /// succeeds.
    failed: std::sync::Mutex<Option<String>>,
    /// Set by `refuse_writes`: `reopen` is not tried again.
    refusing: AtomicBool,
}

/// Closing a writable redb database commits its allocator state, which
/// panics too on a damaged file: the close is guarded like the calls.
fn close(db: Db) {
    if let Err(error) = guarded(|| {
        drop(db);
        Ok(())
    }) {
        tracing::warn!(%error, "closing the catalog failed");
    }
}

impl Drop for Catalog {
    fn drop(&mut self) {
        let db = self
            .db
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(db) = db.take() {
            close(db);
        }
    }
}

impl Catalog {
    pub fn open(path: &Path) -> Result<Catalog, CatalogError> {
        probed(path, ProbeMode::Writable)?;
        Catalog::open_unprobed(path)
    }

    fn open_unprobed(path: &Path) -> Result<Catalog, CatalogError> {
        let db = guarded(|| with_tables(redb::Database::create(path).map_err(db_error)?))?;
        Ok(Catalog::new(Db::Writable(db), Some(path.to_path_buf())))
    }

    fn new(db: Db, path: Option<PathBuf>) -> Catalog {
        Catalog {
            db: std::sync::RwLock::new(Some(db)),
            path,
            failed: std::sync::Mutex::new(None),
            refusing: AtomicBool::new(false),
        }
    }

    /// After a failed commit, makes the catalog take writes again without
    /// a restart, as a restart would: the file is opened anew, which
    /// repairs it back to its last commit. A copy is opened (and checked,
    /// with the probe) first, so nothing changes unless the reopened
    /// catalog took its first commit: while the file system is still full
    /// or failing, the old database stays, refusing writes and serving
    /// reads as before. The caller checks that the catalog holds what it
    /// believes (a commit that failed on its sync may have reached the
    /// disk all the same). Does nothing when no write failed.
    pub fn reopen(&self) -> Result<(), CatalogError> {
        let Some(failure) = self.failure() else {
            return Ok(());
        };
        let Some(path) = self
            .path
            .as_ref()
            .filter(|_| !self.refusing.load(Ordering::SeqCst))
        else {
            return Err(CatalogError::Database(failure));
        };
        let copy = path.with_extension("redb.reopen");
        let reopened = (|| {
            std::fs::copy(path, &copy)
                .and_then(|_| std::fs::File::open(&copy)?.sync_all())
                .map_err(|error| {
                    CatalogError::Database(format!("copying the catalog to reopen it: {error}"))
                })?;
            probed(&copy, ProbeMode::Writable)?;
            let db = guarded(|| with_tables(redb::Database::create(&copy).map_err(db_error)?))?;
            let placed = std::fs::rename(&copy, path).and_then(|()| crate::open::sync_dir(path));
            if let Err(error) = placed {
                close(Db::Writable(db));
                return Err(CatalogError::Database(format!(
                    "putting the reopened catalog in place: {error}"
                )));
            }
            Ok(db)
        })();
        let db = match reopened {
            Ok(db) => db,
            Err(error) => {
                let _ = std::fs::remove_file(&copy);
                return Err(error);
            }
        };
        let old = self
            .db
            .write()
            .expect("catalog lock")
            .replace(Db::Writable(db));
        if let Some(old) = old {
            close(old);
        }
        *self.failed.lock().expect("catalog failure lock") = None;
        tracing::warn!(
            %failure,
            "the catalog takes writes again, reopened after a failed commit: checkpoints and pins work again"
        );
        Ok(())
    }

    /// Refuses every later write until a restart (`reopen` included):
    /// the catalog cannot be trusted to hold what this process believes.
    pub fn refuse_writes(&self, reason: String) {
        self.refusing.store(true, Ordering::SeqCst);
        *self.failed.lock().expect("catalog failure lock") = Some(reason);
    }

    /// An empty catalog in memory: what a read-only open works with when
    /// the real one is unreadable (nothing is written to disk).
    pub fn open_in_memory() -> Result<Catalog, CatalogError> {
        let db = redb::Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(db_error)?;
        Ok(Catalog::new(Db::Writable(with_tables(db)?), None))
    }

    /// Opens an existing catalog without changing a byte of it. A catalog
    /// that a crash left needing a repair is `NeedsRepair`.
    pub fn open_read_only(path: &Path) -> Result<Catalog, CatalogError> {
        probed(path, ProbeMode::ReadOnly)?;
        Catalog::open_read_only_unprobed(path)
    }

    fn open_read_only_unprobed(path: &Path) -> Result<Catalog, CatalogError> {
        guarded(|| match redb::ReadOnlyDatabase::open(path) {
            Ok(db) => Ok(Catalog::new(Db::ReadOnly(db), None)),
            Err(redb::DatabaseError::RepairAborted) => Err(CatalogError::NeedsRepair),
            Err(error) => Err(db_error(error)),
        })
    }

    /// Commits `txn`; a failure is remembered for `failure`.
    fn commit(&self, txn: redb::WriteTransaction) -> Result<(), CatalogError> {
        txn.commit().map_err(|error| {
            let error = db_error(error);
            self.failed
                .lock()
                .expect("catalog failure lock")
                .get_or_insert_with(|| error.to_string());
            error
        })
    }

    /// Why a write to the catalog failed in this process, if one did.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().expect("catalog failure lock").clone()
    }

    fn begin_read(&self) -> Result<redb::ReadTransaction, CatalogError> {
        match self.db.read().expect("catalog lock").as_ref() {
            Some(Db::Writable(db)) => db.begin_read(),
            Some(Db::ReadOnly(db)) => db.begin_read(),
            None => unreachable!("the catalog is used while it is dropped"),
        }
        .map_err(db_error)
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, CatalogError> {
        match self.db.read().expect("catalog lock").as_ref() {
            Some(Db::Writable(db)) => db.begin_write().map_err(db_error),
            Some(Db::ReadOnly(_)) => Err(CatalogError::ReadOnly),
            None => unreachable!("the catalog is used while it is dropped"),
        }
    }

    pub fn identity(&self) -> Result<Option<Identity>, CatalogError> {
        guarded(|| {
            let Some(bytes) = self.get_meta(KEY_IDENTITY)? else {
                return Ok(None);
            };
            decode_identity(&bytes).map(Some)
        })
    }

    pub fn set_identity(&self, identity: &Identity) -> Result<(), CatalogError> {
        guarded(|| self.put_meta(KEY_IDENTITY, Some(&encode_identity(identity))))
    }

    pub fn clean_shutdown(&self) -> Result<Option<CleanShutdown>, CatalogError> {
        guarded(|| {
            let Some(bytes) = self.get_meta(KEY_CLEAN_SHUTDOWN)? else {
                return Ok(None);
            };
            decode_clean_shutdown(&bytes).map(Some)
        })
    }

    pub fn set_clean_shutdown(&self, marker: Option<&CleanShutdown>) -> Result<(), CatalogError> {
        guarded(|| {
            let bytes = marker.map(encode_clean_shutdown);
            self.put_meta(KEY_CLEAN_SHUTDOWN, bytes.as_deref())
        })
    }

    /// The state's precision (fine-record block size) as a shift; None
    /// for state from before fine records.
    pub fn precision_shift(&self) -> Result<Option<u32>, CatalogError> {
        guarded(|| Ok(self.get_meta_fixed(KEY_PRECISION)?.map(u32::from_le_bytes)))
    }

    pub fn set_precision_shift(&self, shift: u32) -> Result<(), CatalogError> {
        guarded(|| self.put_meta(KEY_PRECISION, Some(&shift.to_le_bytes())))
    }

    /// The current generation's fine record as a clean stop left it:
    /// (generation, exact regions, written blocks). Trusted only beside a
    /// valid clean-shutdown marker of the same generation.
    pub fn fine_current(&self) -> Result<Option<FineCurrent>, CatalogError> {
        guarded(|| {
            let Some(bytes) = self.get_meta(KEY_FINE_CURRENT)? else {
                return Ok(None);
            };
            decode_fine_current(&bytes).map(Some)
        })
    }

    pub fn set_fine_current(
        &self,
        generation: u64,
        exact: &RoaringBitmap,
        fine: &RoaringBitmap,
    ) -> Result<(), CatalogError> {
        guarded(|| {
            let bytes = encode_fine_current(generation, exact, fine);
            self.put_meta(KEY_FINE_CURRENT, Some(&bytes))
        })
    }

    /// All checkpoints, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>, CatalogError> {
        guarded(|| {
            let txn = self.begin_read()?;
            let table = txn.open_table(CHECKPOINTS).map_err(db_error)?;
            let mut checkpoints = Vec::new();
            for entry in table.iter().map_err(db_error)? {
                let (key, value) = entry.map_err(db_error)?;
                let key_text = format!("checkpoint {}", key.value());
                let payload = checked_value(value.value(), &key_text)?;
                checkpoints.push(decode_checkpoint(key.value(), payload, &key_text)?);
            }
            let fine = match txn.open_table(FINE) {
                Ok(table) => Some(table),
                // A catalog from before fine records: every region counts whole.
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(error) => return Err(db_error(error)),
            };
            if let Some(fine) = fine {
                for checkpoint in &mut checkpoints {
                    let Some(value) = fine.get(checkpoint.generation).map_err(db_error)? else {
                        continue;
                    };
                    let key_text = format!("fine record {}", checkpoint.generation);
                    let payload = checked_value(value.value(), &key_text)?;
                    let (exact, blocks) = decode_fine(payload, |reason| CatalogError::Malformed {
                        key: key_text.clone(),
                        reason,
                    })?;
                    checkpoint.exact = exact;
                    checkpoint.fine = blocks;
                }
            }
            Ok(checkpoints)
        })
    }

    /// Every pin, by generation then holder.
    pub fn pins(&self) -> Result<Vec<Pin>, CatalogError> {
        guarded(|| {
            let txn = self.begin_read()?;
            let table = match txn.open_table(PINS) {
                Ok(table) => table,
                // A catalog written before pins existed has no such table.
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(error) => return Err(db_error(error)),
            };
            let mut pins = Vec::new();
            for entry in table.iter().map_err(db_error)? {
                let (key, value) = entry.map_err(db_error)?;
                let (generation, holder) = key.value();
                let key_text = format!("pin {generation} {holder}");
                let payload = checked_value(value.value(), &key_text)?;
                pins.push(decode_pin(generation, holder, payload, &key_text)?);
            }
            Ok(pins)
        })
    }

    /// Adds or replaces a pin, durably.
    pub fn put_pin(&self, pin: &Pin) -> Result<(), CatalogError> {
        guarded(|| {
            let txn = self.begin_write()?;
            {
                let mut table = txn.open_table(PINS).map_err(db_error)?;
                let value = with_checksum(&encode_pin(pin));
                table
                    .insert((pin.generation, pin.holder.as_str()), value.as_slice())
                    .map_err(db_error)?;
            }
            self.commit(txn)
        })
    }

    /// Removes a pin, durably; false when there was none.
    pub fn remove_pin(&self, generation: u64, holder: &str) -> Result<bool, CatalogError> {
        guarded(|| {
            let txn = self.begin_write()?;
            let removed = {
                let mut table = txn.open_table(PINS).map_err(db_error)?;
                table
                    .remove((generation, holder))
                    .map_err(db_error)?
                    .is_some()
            };
            self.commit(txn)?;
            Ok(removed)
        })
    }

    /// Adds a checkpoint, durably.
    pub fn add_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), CatalogError> {
        guarded(|| self.replace_checkpoints(&[], Some(checkpoint)))
    }

    /// In one durable transaction: removes the checkpoints of `remove`
    /// (generations) and writes `upsert`.
    pub fn replace_checkpoints(
        &self,
        remove: &[u64],
        upsert: Option<&Checkpoint>,
    ) -> Result<(), CatalogError> {
        guarded(|| {
            let txn = self.begin_write()?;
            {
                let mut table = txn.open_table(CHECKPOINTS).map_err(db_error)?;
                let mut fine = txn.open_table(FINE).map_err(db_error)?;
                for generation in remove {
                    table.remove(generation).map_err(db_error)?;
                    fine.remove(generation).map_err(db_error)?;
                }
                if let Some(checkpoint) = upsert {
                    let value = with_checksum(&encode_checkpoint(checkpoint));
                    table
                        .insert(checkpoint.generation, value.as_slice())
                        .map_err(db_error)?;
                    let mut record = Vec::new();
                    encode_fine(&checkpoint.exact, &checkpoint.fine, &mut record);
                    fine.insert(checkpoint.generation, with_checksum(&record).as_slice())
                        .map_err(db_error)?;
                }
            }
            self.commit(txn)
        })
    }

    /// The lowest the current generation can be (see KEY_GENERATION_FLOOR).
    pub fn generation_floor(&self) -> Result<Option<u64>, CatalogError> {
        guarded(|| {
            Ok(self
                .get_meta_fixed(KEY_GENERATION_FLOOR)?
                .map(u64::from_le_bytes))
        })
    }

    /// In one durable transaction: removes the newest checkpoint (of
    /// `generation`) and records that the current generation stays
    /// `generation + 1`.
    pub fn remove_newest_checkpoint(&self, generation: u64) -> Result<(), CatalogError> {
        guarded(|| {
            let txn = self.begin_write()?;
            {
                let mut table = txn.open_table(CHECKPOINTS).map_err(db_error)?;
                let mut fine = txn.open_table(FINE).map_err(db_error)?;
                table.remove(generation).map_err(db_error)?;
                fine.remove(generation).map_err(db_error)?;
                let mut meta = txn.open_table(META).map_err(db_error)?;
                let floor = (generation + 1).to_le_bytes();
                meta.insert(KEY_GENERATION_FLOOR, with_checksum(&floor).as_slice())
                    .map_err(db_error)?;
            }
            self.commit(txn)
        })
    }

    /// A meta value of exactly `N` bytes; another length is Malformed.
    fn get_meta_fixed<const N: usize>(&self, key: &str) -> Result<Option<[u8; N]>, CatalogError> {
        let Some(bytes) = self.get_meta(key)? else {
            return Ok(None);
        };
        let bytes: [u8; N] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| CatalogError::Malformed {
                key: key.into(),
                reason: "wrong length",
            })?;
        Ok(Some(bytes))
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, CatalogError> {
        let txn = self.begin_read()?;
        let table = txn.open_table(META).map_err(db_error)?;
        let Some(value) = table.get(key).map_err(db_error)? else {
            return Ok(None);
        };
        Ok(Some(checked_value(value.value(), key)?.to_vec()))
    }

    fn put_meta(&self, key: &str, value: Option<&[u8]>) -> Result<(), CatalogError> {
        let txn = self.begin_write()?;
        {
            let mut table = txn.open_table(META).map_err(db_error)?;
            match value {
                Some(value) => {
                    table
                        .insert(key, with_checksum(value).as_slice())
                        .map_err(db_error)?;
                }
                None => {
                    table.remove(key).map_err(db_error)?;
                }
            }
        }
        self.commit(txn)
    }
}

mod codec;

pub(crate) use codec::*;

#[cfg(test)]
mod tests;
