//! What opening the state directory reads before it writes anything: the
//! catalog, the identity, the clean-shutdown marker, the heartbeat and the
//! journal, whose records are applied to the bitmaps. Each reason to
//! distrust the state is a `Distrust`; each one makes every region of the
//! current generation count as changed (tracking may over-report, never
//! under-report). `open.rs` acts on what was found.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use roaring::RoaringBitmap;

use crate::alive;
use crate::catalog::{Catalog, CatalogError, Checkpoint, CleanShutdown, Identity};
use crate::checkpoints::checkpoints_from_index;
use crate::error::{OpenError, error_chain};
use crate::fine::PRECISION_DEFAULT_BYTES;
use crate::journal::{self, FileHeader, Record, Replay};
use crate::open::{lock_state, mtime_ns, random_id, unix_seconds};
use crate::regions::{
    AtomicBitmap, GRANULARITY_DEFAULT_BYTES, Granularity, REGION_COUNT_MAX, RegionRun,
};
use crate::tracker::TrackerOptions;

/// Why recovery distrusted the state. Each one makes every region of the
/// current generation count as changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Distrust {
    /// The catalog could not be read; `kept_as` where a writable open moved it.
    CatalogUnreadable {
        error: String,
        kept_as: Option<PathBuf>,
    },
    IdentityDamaged {
        error: String,
    },
    /// The state belongs to another file, or the image was replaced.
    ForeignState {
        state_dir: PathBuf,
    },
    ImageResized {
        from_bytes: u64,
        to_bytes: u64,
    },
    CleanMarkerDamaged {
        error: String,
    },
    /// The image's mtime is past the last heartbeat of a server that did
    /// not stop cleanly.
    ModifiedAfterCrash {
        seconds_after_last_alive: i128,
    },
    /// The image's mtime or size differs from the clean-shutdown marker's.
    ModifiedWhileStopped,
    JournalDamaged {
        error: String,
    },
    JournalMissing,
    JournalForeign,
    JournalNewerThanCatalog,
    JournalRegionsPastEnd,
}

impl fmt::Display for Distrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const ALL: &str = "every region is treated as changed";
        match self {
            Distrust::CatalogUnreadable {
                error,
                kept_as: Some(kept_as),
            } => write!(
                f,
                "the catalog was unreadable ({error}); kept it as {} and started a new one: {ALL}",
                kept_as.display()
            ),
            Distrust::CatalogUnreadable {
                error,
                kept_as: None,
            } => write!(f, "the catalog is unreadable ({error}): {ALL}"),
            Distrust::IdentityDamaged { error } => {
                write!(
                    f,
                    "the catalog's identity record is damaged ({error}): {ALL}"
                )
            }
            Distrust::ForeignState { state_dir } => write!(
                f,
                "the state in {} belongs to another file (or the image was replaced): {ALL}",
                state_dir.display()
            ),
            Distrust::ImageResized {
                from_bytes,
                to_bytes,
            } => write!(
                f,
                "the image changed size from {from_bytes} to {to_bytes} bytes while no server ran: {ALL}"
            ),
            Distrust::CleanMarkerDamaged { error } => {
                write!(f, "the clean-shutdown marker is damaged ({error}): {ALL}")
            }
            Distrust::ModifiedAfterCrash {
                seconds_after_last_alive,
            } => write!(
                f,
                "the image was modified after the server stopped without a clean shutdown \
                 (last alive {seconds_after_last_alive} s before the image's last change): {ALL}"
            ),
            Distrust::ModifiedWhileStopped => {
                write!(f, "the image was modified while no server ran: {ALL}")
            }
            Distrust::JournalDamaged { error } => {
                write!(f, "the journal is damaged ({error}): {ALL}")
            }
            Distrust::JournalMissing => write!(f, "the journal is missing: {ALL}"),
            Distrust::JournalForeign => write!(f, "the journal belongs to other state: {ALL}"),
            Distrust::JournalNewerThanCatalog => {
                write!(
                    f,
                    "the journal is newer than the catalog's checkpoints: {ALL}"
                )
            }
            Distrust::JournalRegionsPastEnd => write!(
                f,
                "the journal names regions past the end of the image: {ALL}"
            ),
        }
    }
}

/// What recovery found, in the order found: reasons to distrust, and
/// notes that change nothing (a torn tail dropped, names restored).
#[derive(Debug, Default)]
pub(crate) struct Findings {
    pub(crate) warnings: Vec<String>,
    pub(crate) distrust: Vec<Distrust>,
}

impl Findings {
    pub(crate) fn distrust(&mut self, reason: Distrust) {
        self.warnings.push(reason.to_string());
        self.distrust.push(reason);
    }

    pub(crate) fn note(&mut self, note: impl Into<String>) {
        self.warnings.push(note.into());
    }
}

/// What to do with the journal file after replay.
pub(crate) enum JournalFound {
    /// Replayed: a writer continues it.
    Resume { file: File, replay: Replay },
    /// Start a new one; keep the old one aside first when it is damaged.
    Replace { damaged: bool },
}

/// Everything read from the state directory, before anything is written.
pub(crate) struct Recovered {
    pub(crate) lock: File,
    pub(crate) catalog: Catalog,
    /// The checkpoints: the catalog's, or those restored from the index
    /// after a lost catalog (not yet written to a new catalog).
    pub(crate) checkpoints: Vec<Checkpoint>,
    pub(crate) catalog_lost: bool,
    /// The catalog holds no state at all (read-only opens refuse it).
    pub(crate) no_state: bool,
    pub(crate) identity: Identity,
    pub(crate) granularity: Granularity,
    /// The fine record's block size, and whether the catalog has it yet.
    pub(crate) precision: Granularity,
    pub(crate) precision_stored: bool,
    /// The fine record a clean stop left, when it can be trusted.
    pub(crate) fine_current: Option<(RoaringBitmap, RoaringBitmap)>,
    pub(crate) header: FileHeader,
    pub(crate) marked: Arc<AtomicBitmap>,
    pub(crate) saved: AtomicBitmap,
    pub(crate) journal: JournalFound,
    pub(crate) journal_bytes: u64,
    pub(crate) clean: bool,
    pub(crate) findings: Findings,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Writable,
    ReadOnly,
}

/// Reads the state and replays the journal; writes nothing (except that
/// a writable open moves an unreadable catalog aside and starts a new one,
/// which it must do before it can read the rest).
pub(crate) fn recover(
    options: &TrackerOptions,
    image_path: &Path,
    state_dir: &Path,
    size_bytes: u64,
    mode: Mode,
) -> Result<Recovered, OpenError> {
    let lock = lock_state(state_dir, mode)?;
    let mut findings = Findings::default();
    let (catalog, catalog_lost) = open_catalog(state_dir, mode, &mut findings)?;
    let catalog_error = |source| OpenError::Catalog {
        path: state_dir.join("catalog.redb"),
        source,
    };
    let stored_identity = catalog.identity();
    let first_use = !matches!(stored_identity, Ok(Some(_)));
    let no_state = !catalog_lost && matches!(stored_identity, Ok(None));
    let stored_shift = stored_identity
        .as_ref()
        .ok()
        .and_then(|identity| identity.map(|i| i.granularity_shift));
    let granularity_bytes = options
        .granularity_bytes
        .or(stored_shift.map(|shift| 1u64 << shift))
        .unwrap_or(GRANULARITY_DEFAULT_BYTES);
    let granularity =
        Granularity::new(granularity_bytes).ok_or(OpenError::BadGranularity(granularity_bytes))?;
    let region_count = granularity.region_count(size_bytes);
    if region_count > REGION_COUNT_MAX {
        return Err(OpenError::TooManyRegions { region_count });
    }
    let stored_precision = catalog.precision_shift().map_err(catalog_error)?;
    let precision_bytes = options
        .precision_bytes
        .or(stored_precision.map(|shift| 1u64 << shift))
        .unwrap_or(PRECISION_DEFAULT_BYTES);
    let precision =
        Granularity::new(precision_bytes).ok_or(OpenError::BadPrecision(precision_bytes))?;
    if let Some(shift) = stored_precision
        && shift != precision.shift()
    {
        return Err(OpenError::PrecisionMismatch {
            path: state_dir.to_path_buf(),
            state_bytes: 1 << shift,
            asked_bytes: precision.bytes(),
        });
    }
    let checkpoints = if catalog_lost {
        checkpoints_from_index(state_dir, region_count, &mut findings)
    } else {
        catalog.checkpoints().map_err(catalog_error)?
    };
    let image_metadata = std::fs::metadata(image_path).map_err(|source| OpenError::Image {
        path: image_path.to_path_buf(),
        source,
    })?;
    let identity = check_identity(
        stored_identity,
        state_dir,
        granularity,
        size_bytes,
        &image_metadata,
        &mut findings,
    )?;
    let clean = check_clean_shutdown(
        &catalog,
        state_dir,
        first_use,
        size_bytes,
        &image_metadata,
        &mut findings,
    );
    // After the newest checkpoint was deleted, the current generation is
    // above the newest one left: the floor says so. A floor that cannot be
    // read only costs the journal's trust below (everything counts as
    // changed), never a missed change.
    let floor = catalog.generation_floor().ok().flatten().unwrap_or(0);
    let generation = checkpoints
        .last()
        .map_or(1, |c| c.generation + 1)
        .max(floor);
    let header = FileHeader {
        generation,
        granularity_shift: granularity.shift(),
        image_id: identity.image_id,
    };
    let marked = Arc::new(AtomicBitmap::new(region_count));
    let saved = AtomicBitmap::new(region_count);
    let journal_path = state_dir.join("journal");
    let (journal, journal_bytes) = match replay_journal(
        &journal_path,
        &header,
        &marked,
        &saved,
        first_use,
        mode,
        &mut findings,
    ) {
        Ok(found) => found,
        Err(error) => {
            findings.distrust(Distrust::JournalDamaged {
                error: error_chain(&error),
            });
            marked.clear_all();
            saved.clear_all();
            (JournalFound::Replace { damaged: true }, 0)
        }
    };
    // A clean stop's fine record holds only beside its marker, for the
    // generation that stop left and with nothing to distrust.
    let fine_current = match catalog.fine_current() {
        Ok(Some((fine_generation, exact, blocks)))
            if clean.is_some() && fine_generation == generation && findings.distrust.is_empty() =>
        {
            Some((exact, blocks))
        }
        _ => None,
    };
    Ok(Recovered {
        lock,
        catalog,
        checkpoints,
        catalog_lost,
        no_state,
        identity,
        granularity,
        precision,
        precision_stored: stored_precision.is_some(),
        fine_current,
        header,
        marked,
        saved,
        journal,
        journal_bytes,
        clean: clean.is_some(),
        findings,
    })
}

fn open_catalog(
    state_dir: &Path,
    mode: Mode,
    findings: &mut Findings,
) -> Result<(Catalog, bool), OpenError> {
    let path = state_dir.join("catalog.redb");
    let opened = match mode {
        Mode::Writable => Catalog::open(&path),
        Mode::ReadOnly => Catalog::open_read_only(&path),
    };
    let error = match opened.and_then(|c| c.checkpoints().map(|_| c)) {
        Ok(catalog) => return Ok((catalog, false)),
        Err(CatalogError::NeedsRepair) => {
            return Err(OpenError::Catalog {
                path,
                source: CatalogError::NeedsRepair,
            });
        }
        Err(error) => error,
    };
    let catalog = match mode {
        Mode::Writable => {
            let moved = state_dir.join(format!("catalog.redb.corrupt-{}", unix_seconds()));
            let _ = std::fs::rename(&path, &moved);
            findings.distrust(Distrust::CatalogUnreadable {
                error: error.to_string(),
                kept_as: Some(moved),
            });
            Catalog::open(&path)
        }
        Mode::ReadOnly => {
            findings.distrust(Distrust::CatalogUnreadable {
                error: error.to_string(),
                kept_as: None,
            });
            // An empty catalog in memory stands in for the unreadable one.
            Catalog::open_in_memory()
        }
    }
    .map_err(|source| OpenError::Catalog {
        path: path.clone(),
        source,
    })?;
    Ok((catalog, true))
}

/// The identity to keep: the stored one brought up to date, or a new one.
fn check_identity(
    stored: Result<Option<Identity>, CatalogError>,
    state_dir: &Path,
    granularity: Granularity,
    size_bytes: u64,
    image: &std::fs::Metadata,
    findings: &mut Findings,
) -> Result<Identity, OpenError> {
    let identity = match stored {
        Ok(Some(identity)) => {
            if identity.granularity_shift != granularity.shift() {
                return Err(OpenError::GranularityMismatch {
                    path: state_dir.to_path_buf(),
                    state_bytes: 1 << identity.granularity_shift,
                    asked_bytes: granularity.bytes(),
                });
            }
            if identity.device != image.dev() || identity.inode != image.ino() {
                findings.distrust(Distrust::ForeignState {
                    state_dir: state_dir.to_path_buf(),
                });
            } else if identity.size_bytes != size_bytes {
                findings.distrust(Distrust::ImageResized {
                    from_bytes: identity.size_bytes,
                    to_bytes: size_bytes,
                });
            }
            identity
        }
        Ok(None) => new_identity(granularity, size_bytes, image, state_dir)?,
        Err(error) => {
            findings.distrust(Distrust::IdentityDamaged {
                error: error.to_string(),
            });
            new_identity(granularity, size_bytes, image, state_dir)?
        }
    };
    Ok(Identity {
        size_bytes,
        device: image.dev(),
        inode: image.ino(),
        ..identity
    })
}

fn new_identity(
    granularity: Granularity,
    size_bytes: u64,
    image: &std::fs::Metadata,
    state_dir: &Path,
) -> Result<Identity, OpenError> {
    Ok(Identity {
        image_id: random_id().map_err(|source| OpenError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?,
        size_bytes,
        granularity_shift: granularity.shift(),
        device: image.dev(),
        inode: image.ino(),
    })
}

/// The clean-shutdown marker, if there is one that the image agrees with;
/// distrust when the image changed behind the tracker's back.
fn check_clean_shutdown(
    catalog: &Catalog,
    state_dir: &Path,
    first_use: bool,
    size_bytes: u64,
    image: &std::fs::Metadata,
    findings: &mut Findings,
) -> Option<CleanShutdown> {
    let clean = match catalog.clean_shutdown() {
        Ok(marker) => marker,
        Err(error) => {
            findings.distrust(Distrust::CleanMarkerDamaged {
                error: error.to_string(),
            });
            None
        }
    };
    if clean.is_none()
        && !first_use
        && let Some(heartbeat_ns) = alive::last(state_dir)
        && mtime_ns(image) > i128::from(heartbeat_ns) + alive::SLACK.as_nanos() as i128
    {
        findings.distrust(Distrust::ModifiedAfterCrash {
            seconds_after_last_alive: (mtime_ns(image) - i128::from(heartbeat_ns)) / 1_000_000_000,
        });
    }
    if let Some(marker) = &clean
        && (marker.image_mtime_ns != mtime_ns(image) || marker.size_bytes != size_bytes)
    {
        findings.distrust(Distrust::ModifiedWhileStopped);
    }
    clean
}

/// Replays the journal into the bitmaps. Returns what to do with the file
/// and its size; an error means it is damaged.
fn replay_journal(
    path: &Path,
    header: &FileHeader,
    marked: &AtomicBitmap,
    saved: &AtomicBitmap,
    first_use: bool,
    mode: Mode,
    findings: &mut Findings,
) -> Result<(JournalFound, u64), OpenError> {
    let journal_error = |source| OpenError::JournalIo {
        path: path.to_path_buf(),
        source,
    };
    let opened = match mode {
        Mode::Writable => OpenOptions::new().read(true).write(true).open(path),
        Mode::ReadOnly => File::open(path),
    };
    let file = match opened {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            if !first_use {
                findings.distrust(Distrust::JournalMissing);
            }
            return Ok((JournalFound::Replace { damaged: false }, 0));
        }
        Err(error) => return Err(journal_error(error)),
    };
    let size_bytes = file.metadata().map_err(journal_error)?.len();
    let replay = journal::replay(&file).map_err(|source| OpenError::Journal {
        path: path.to_path_buf(),
        source,
    })?;
    let replace = Ok((JournalFound::Replace { damaged: false }, size_bytes));
    if replay.header.image_id != header.image_id
        || replay.header.granularity_shift != header.granularity_shift
    {
        findings.distrust(Distrust::JournalForeign);
        return replace;
    }
    if replay.header.generation < header.generation {
        // A checkpoint committed its catalog entry but the new journal was
        // not in place yet; no write ran in between, so nothing is lost.
        return replace;
    }
    if replay.header.generation > header.generation {
        findings.distrust(Distrust::JournalNewerThanCatalog);
        return replace;
    }
    if replay.torn_bytes > 0 {
        findings.note(format!(
            "dropped a torn journal tail of {} bytes (an interrupted commit)",
            replay.torn_bytes
        ));
    }
    if !apply_records(&replay.records, marked, saved) {
        findings.distrust(Distrust::JournalRegionsPastEnd);
    }
    Ok((JournalFound::Resume { file, replay }, size_bytes))
}

/// Sets the bitmaps from replayed records; false when a MARK names
/// regions past the image's end (the state cannot be trusted then).
fn apply_records(records: &[Record], marked: &AtomicBitmap, saved: &AtomicBitmap) -> bool {
    let region_count = marked.bit_count();
    let fits = |run: &RegionRun| run.first_region.saturating_add(run.region_count) <= region_count;
    let mut all_fit = true;
    for record in records {
        match record {
            Record::Mark { runs } => {
                for run in runs {
                    if fits(run) {
                        marked.set_run(*run);
                    } else {
                        all_fit = false;
                    }
                }
            }
            Record::MarkAll { .. } => marked.set_all(),
            Record::Saved { runs, .. } => {
                for run in runs.iter().filter(|run| fits(run)) {
                    saved.set_run(*run);
                }
            }
            // Which files a flush saved is history for users, not state.
            Record::SavedFiles { .. } => {}
        }
    }
    all_fit
}
