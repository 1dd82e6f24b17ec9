//! The catalog's unit tests: round trips, damage, the probe in a child
//! process, pins, and the reopen after a failed commit.

use super::*;

#[test]
fn checkpoints_and_markers_round_trip() {
    let path = std::env::temp_dir().join(format!("catalog-test-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let catalog = Catalog::open(&path).unwrap();
    assert_eq!(catalog.identity().unwrap(), None);
    let identity = Identity {
        image_id: [3; 16],
        size_bytes: 1 << 30,
        granularity_shift: 16,
        device: 1,
        inode: 2,
    };
    catalog.set_identity(&identity).unwrap();
    let marker = CleanShutdown {
        image_mtime_ns: 123,
        size_bytes: 1 << 30,
        generation: 4,
    };
    catalog.set_clean_shutdown(Some(&marker)).unwrap();
    let checkpoint = Checkpoint {
        name: "monday".into(),
        generation: 1,
        created_unix_seconds: 99,
        changed: [1u32, 2, 500].into_iter().collect(),
        saved: [2u32].into_iter().collect(),
        exact: [2u32, 500].into_iter().collect(),
        fine: [32u32, 33, 8000].into_iter().collect(),
    };
    catalog.add_checkpoint(&checkpoint).unwrap();
    assert_eq!(catalog.precision_shift().unwrap(), None);
    catalog.set_precision_shift(12).unwrap();
    assert_eq!(catalog.precision_shift().unwrap(), Some(12));
    catalog
        .set_fine_current(5, &checkpoint.exact, &checkpoint.fine)
        .unwrap();
    drop(catalog);
    let catalog = Catalog::open(&path).unwrap();
    assert_eq!(catalog.identity().unwrap(), Some(identity));
    assert_eq!(catalog.clean_shutdown().unwrap(), Some(marker));
    assert_eq!(catalog.checkpoints().unwrap(), vec![checkpoint.clone()]);
    assert_eq!(
        catalog.fine_current().unwrap(),
        Some((5, checkpoint.exact.clone(), checkpoint.fine.clone()))
    );
    catalog.set_clean_shutdown(None).unwrap();
    assert_eq!(catalog.clean_shutdown().unwrap(), None);
    std::fs::remove_file(path).unwrap();
}

/// Flipped bytes all over a real catalog: every open and read either
/// answers or fails with an error, never a panic out of redb (which
/// has `unreachable!`s for damaged pages, "Malformed allocator state"
/// among them, seen from `blockwatch status` before this guard).
#[test]
fn a_damaged_catalog_is_an_error_never_a_panic() {
    // As the binary does (src/catalog_check.rs), with this test binary
    // as the checking process: a release build aborts on some of
    // these pages, which no catch_unwind survives.
    set_probe(probe_in_child);
    let path = std::env::temp_dir().join(format!("catalog-damage-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let catalog = Catalog::open(&path).unwrap();
    for generation in 1..=3u64 {
        let checkpoint = Checkpoint {
            name: format!("c{generation}"),
            generation,
            created_unix_seconds: 99,
            changed: (0..200u32).map(|r| r * generation as u32).collect(),
            saved: [2u32].into_iter().collect(),
            exact: [2u32].into_iter().collect(),
            fine: [32u32, 33].into_iter().collect(),
        };
        catalog.add_checkpoint(&checkpoint).unwrap();
        catalog
            .put_pin(&Pin {
                generation,
                holder: format!("holder{generation}"),
                reason: "test".into(),
                created_unix_seconds: 7,
            })
            .unwrap();
    }
    drop(catalog);
    let original = std::fs::read(&path).unwrap();
    let damaged = path.with_extension("damaged");
    let mut errors = 0;
    // Every page's first bytes (headers, allocator state, btree
    // nodes) and a stride through the rest.
    let offsets = (0..original.len()).filter(|&i| i % 4096 < 64 || i % 127 == 0);
    for offset in offsets {
        let mut bytes = original.clone();
        bytes[offset] ^= 0xff;
        std::fs::write(&damaged, &bytes).unwrap();
        for read_only in [true, false] {
            let opened = if read_only {
                Catalog::open_read_only(&damaged)
            } else {
                Catalog::open(&damaged)
            };
            let answered = opened.and_then(|catalog| {
                catalog.identity()?;
                catalog.checkpoints()?;
                catalog.pins()?;
                catalog.fine_current()
            });
            errors += usize::from(answered.is_err());
        }
    }
    assert!(errors > 0, "no flip was noticed at all");
    let _ = std::fs::remove_file(&damaged);
    std::fs::remove_file(path).unwrap();
}

const PROBE_PATH: &str = "BLOCKWATCH_TEST_CATALOG_PROBE";
const PROBE_READ_ONLY: &str = "BLOCKWATCH_TEST_CATALOG_PROBE_READ_ONLY";

/// The binary's probe, run as this test binary's `probe_child`.
fn probe_in_child(path: &Path, mode: ProbeMode) -> Result<(), String> {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "catalog::tests::probe_child",
            "--test-threads",
            "1",
        ])
        .env(PROBE_PATH, path)
        .env(PROBE_READ_ONLY, (mode == ProbeMode::ReadOnly).to_string())
        .output()
        .unwrap();
    match out.status.code() {
        Some(0) => Ok(()),
        Some(_) => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        None => Err("the check's process was killed".into()),
    }
}

/// The checking process of `probe_in_child`; does nothing in a plain
/// test run.
#[test]
fn probe_child() {
    let Some(path) = std::env::var_os(PROBE_PATH) else {
        return;
    };
    let mode = match std::env::var(PROBE_READ_ONLY).as_deref() {
        Ok("true") => ProbeMode::ReadOnly,
        _ => ProbeMode::Writable,
    };
    match check_file(Path::new(&path), mode) {
        Ok(()) | Err(CatalogError::NeedsRepair) => {}
        Err(error) => {
            eprintln!("{error}");
            std::process::exit(1);
        }
    }
}

#[test]
fn pins_persist_and_a_read_only_open_reads_them_and_writes_nothing() {
    let path = std::env::temp_dir().join(format!("catalog-pins-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let catalog = Catalog::open(&path).unwrap();
    let pin = |generation, holder: &str| Pin {
        generation,
        holder: holder.into(),
        reason: format!("{holder} holds it"),
        created_unix_seconds: 7,
    };
    catalog.put_pin(&pin(2, "nightly")).unwrap();
    catalog.put_pin(&pin(1, "weekly")).unwrap();
    catalog.put_pin(&pin(2, "archive")).unwrap();
    assert!(catalog.remove_pin(1, "weekly").unwrap());
    assert!(!catalog.remove_pin(1, "weekly").unwrap());
    drop(catalog);
    let bytes = std::fs::read(&path).unwrap();
    let read_only = Catalog::open_read_only(&path).unwrap();
    assert_eq!(
        read_only.pins().unwrap(),
        vec![pin(2, "archive"), pin(2, "nightly")]
    );
    assert!(matches!(
        read_only.put_pin(&pin(3, "x")),
        Err(CatalogError::ReadOnly)
    ));
    drop(read_only);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "a read-only open wrote"
    );
    std::fs::remove_file(path).unwrap();
}

/// A file backend whose writes, syncs and resizes fail with ENOSPC
/// while `failing` is set.
#[derive(Debug)]
struct FillingUp {
    file: redb::backends::FileBackend,
    failing: std::sync::Arc<AtomicBool>,
}

impl FillingUp {
    fn check(&self) -> std::io::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }
}

type Range = std::ops::Bound<u64>;

impl redb::StorageBackend for FillingUp {
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.file.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.file.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.check()?;
        self.file.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        self.file.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.file.close()
    }
    fn try_lock_range(&self, start: Range, end: Range) -> Result<bool, redb::BackendError> {
        self.file.try_lock_range(start, end)
    }
    fn try_lock_shared_range(&self, start: Range, end: Range) -> Result<bool, redb::BackendError> {
        self.file.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Range, end: Range) -> Result<(), redb::BackendError> {
        self.file.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Range, end: Range) -> Result<(), redb::BackendError> {
        self.file.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Range, end: Range) -> Result<(), redb::BackendError> {
        self.file.unlock_range(start, end)
    }
}

fn checkpoint(name: &str, generation: u64) -> Checkpoint {
    Checkpoint {
        name: name.into(),
        generation,
        created_unix_seconds: 99,
        changed: [1u32, 2, generation as u32 + 100].into_iter().collect(),
        saved: [2u32].into_iter().collect(),
        exact: [2u32].into_iter().collect(),
        fine: [32u32, 33].into_iter().collect(),
    }
}

/// A commit that fails (the file system full) leaves redb refusing
/// every later write; `reopen` fails and changes nothing while the
/// writes still fail, and once they work it brings the catalog back
/// as of its last commit, taking writes again, with no restart.
#[test]
fn a_failed_commit_is_undone_by_reopen_once_the_file_system_takes_writes() {
    let dir = std::env::temp_dir().join(format!("catalog-reopen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("catalog.redb");
    let failing = std::sync::Arc::new(AtomicBool::new(false));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .unwrap();
    let backend = FillingUp {
        file: redb::backends::FileBackend::new(file).unwrap(),
        failing: failing.clone(),
    };
    let db = redb::Database::builder()
        .create_with_backend(backend)
        .map_err(db_error)
        .and_then(with_tables)
        .unwrap();
    let catalog = Catalog::new(Db::Writable(db), Some(path.clone()));
    let monday = checkpoint("monday", 1);
    catalog.add_checkpoint(&monday).unwrap();
    catalog.reopen().unwrap();
    assert_eq!(catalog.failure(), None, "nothing failed: nothing to do");

    failing.store(true, Ordering::SeqCst);
    let error = catalog
        .add_checkpoint(&checkpoint("tuesday", 2))
        .unwrap_err();
    assert!(error.to_string().contains("No space left"), "{error}");
    let failure = catalog.failure().expect("the failure is kept");
    failing.store(false, Ordering::SeqCst);
    // redb takes no write of this database again.
    assert!(catalog.add_checkpoint(&checkpoint("tuesday", 2)).is_err());
    assert_eq!(catalog.checkpoints().unwrap(), vec![monday.clone()]);

    // The copy cannot be written: nothing changes.
    let copy = path.with_extension("redb.reopen");
    std::fs::create_dir(&copy).unwrap();
    assert!(catalog.reopen().is_err());
    assert_eq!(catalog.failure(), Some(failure));
    assert_eq!(catalog.checkpoints().unwrap(), vec![monday.clone()]);
    std::fs::remove_dir(&copy).unwrap();

    catalog.reopen().unwrap();
    assert_eq!(catalog.failure(), None);
    assert!(!copy.exists());
    assert_eq!(catalog.checkpoints().unwrap(), vec![monday.clone()]);
    let tuesday = checkpoint("tuesday", 2);
    catalog.add_checkpoint(&tuesday).unwrap();
    drop(catalog);
    let catalog = Catalog::open(&path).unwrap();
    assert_eq!(catalog.checkpoints().unwrap(), vec![monday, tuesday]);

    // Refused for good: no reopen until a restart.
    catalog.refuse_writes("held apart".into());
    assert!(catalog.reopen().is_err());
    assert_eq!(catalog.failure().as_deref(), Some("held apart"));
    drop(catalog);
    std::fs::remove_dir_all(dir).unwrap();
}
