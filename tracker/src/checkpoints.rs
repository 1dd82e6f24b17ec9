//! Checkpoints: closing a generation under a name (the switch, between
//! requests), deleting one (its changes merge into the next), pins that
//! keep one from being deleted, and `checkpoints.index`, the list of names
//! that outlives a lost catalog.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::MutexGuard;
use std::sync::atomic::Ordering;

use roaring::RoaringBitmap;

use crate::catalog::{Checkpoint, Pin};
use crate::error::{CHECKPOINT_NAME_MAX, CheckpointError, PIN_REASON_MAX};
use crate::journal::{self, FileHeader, Record};
use crate::open::{create_journal, sync_dir, unix_seconds};
use crate::recovery::Findings;
use crate::regions::{REGION_COUNT_MAX, runs_from_sorted};
use crate::tracker::Tracker;

/// `checkpoints.index`: "generation name" lines and a last line with the
/// crc32c of the lines before it. It lets the checkpoint chain outlive a
/// lost catalog (the chain survives, the bitmaps become "everything").
const INDEX_FILE: &str = "checkpoints.index";

impl Tracker {
    pub fn checkpoints(&self) -> Vec<Checkpoint> {
        self.checkpoints.lock().expect("checkpoints lock").clone()
    }

    pub(crate) fn find(&self, name: &str) -> Option<Checkpoint> {
        self.checkpoints
            .lock()
            .expect("checkpoints lock")
            .iter()
            .find(|c| c.name == name)
            .cloned()
    }

    /// Starts an operation on checkpoint `name` that writes the catalog:
    /// refused on a read-only tracker, then the operations lock, held
    /// until the guard drops, and a catalog ready to take the write.
    fn catalog_operation(&self, name: &str) -> Result<MutexGuard<'_, ()>, CheckpointError> {
        if self.read_only {
            return Err(CheckpointError::ReadOnly {
                name: name.to_string(),
            });
        }
        let operation = self.operations.lock().expect("operations lock");
        self.catalog_ready()
            .map_err(|source| CheckpointError::Catalog {
                name: name.to_string(),
                source,
            })?;
        Ok(operation)
    }

    /// Under the operations lock, before an operation writes the catalog:
    /// after a failed commit, the catalog is reopened (`Catalog::reopen`),
    /// and it is trusted again only if it holds the checkpoints this
    /// tracker holds. A commit reported failed may still have reached the
    /// disk (EIO on its sync): then the two differ, and the catalog
    /// refuses writes until a restart, whose recovery reconciles them.
    pub(crate) fn catalog_ready(&self) -> Result<(), crate::catalog::CatalogError> {
        if self.catalog.failure().is_none() {
            return Ok(());
        }
        self.catalog.reopen()?;
        let stored = self.catalog.checkpoints();
        if stored.as_ref().ok() != Some(&*self.checkpoints.lock().expect("checkpoints lock")) {
            let found = match stored {
                Ok(_) => "other checkpoints than the server's".to_string(),
                Err(error) => format!("unreadable checkpoints ({error})"),
            };
            let reason = format!(
                "reopened after a failed commit, the catalog holds {found}: it is not written \
                 again until a restart reconciles it"
            );
            tracing::error!("{reason}");
            self.catalog.refuse_writes(reason.clone());
            return Err(crate::catalog::CatalogError::Database(reason));
        }
        Ok(())
    }

    /// Closes the current generation under `name` and starts the next one,
    /// between requests.
    pub fn checkpoint(&self, name: &str) -> Result<Checkpoint, CheckpointError> {
        validate_name(name).map_err(|()| CheckpointError::BadName {
            name: name.to_string(),
        })?;
        let _operation = self.catalog_operation(name)?;
        if self.find(name).is_some() {
            return Err(CheckpointError::Duplicate {
                name: name.to_string(),
            });
        }
        // Hooks prepare with requests still flowing (the file map is
        // brought up to date: whatever is written after it shows in the
        // next map's inodes or blocks), see the switch with the gate
        // closed, and finish after it reopens.
        let unflushed = self.unflushed_ranges();
        let after: Vec<_> = self
            .hooks()
            .iter()
            .filter_map(|hook| hook.before_switch(&unflushed))
            .collect();
        let checkpoint = {
            let _closed = self.gate.close();
            let checkpoint = self.switch_generation(name)?;
            debug_assert!(self.gate.is_closed_and_idle());
            for hook in self.hooks() {
                hook.at_switch(&checkpoint);
            }
            checkpoint
        };
        for finish in after {
            finish(&checkpoint);
        }
        Ok(checkpoint)
    }

    /// Closes the generation, gate closed. The next generation's journal
    /// is written and synced beside the current one, and the current one
    /// has taken every queued record, before the catalog commit: until
    /// that commit a failure (ENOSPC, EIO, a journal that failed earlier)
    /// changes nothing and the disk goes on in this generation. A
    /// checkpoint committed to the catalog comes back after a restart, and
    /// the journal it leaves behind is then thrown away as older than the
    /// catalog, so past the commit the generation switches in memory
    /// whatever happens, and a journal that cannot be put in place fails
    /// the journal: every later write is a first touch and is refused.
    fn switch_generation(&self, name: &str) -> Result<Checkpoint, CheckpointError> {
        let journal_error = |source| CheckpointError::Journal {
            name: name.to_string(),
            source,
        };
        self.committer().drain().map_err(journal_error)?;
        let generation = self.generation();
        let header = FileHeader {
            generation: generation + 1,
            granularity_shift: self.granularity.shift(),
            image_id: self.image_id,
        };
        let path = self.state_dir.join("journal");
        let new_path = path.with_extension("new");
        let discard = |error| {
            let _ = std::fs::remove_file(&new_path);
            error
        };
        let writer = create_journal(&new_path, &header, self.journal_wrapper.as_ref())
            .map_err(|source| discard(journal_error(source)))?;
        let (changed, saved) = self.current_generation();
        let (exact, fine) = self.fine.current(&changed);
        let checkpoint = Checkpoint {
            name: name.to_string(),
            generation,
            created_unix_seconds: unix_seconds(),
            changed,
            saved,
            exact,
            fine,
        };
        self.catalog.add_checkpoint(&checkpoint).map_err(|source| {
            discard(CheckpointError::Catalog {
                name: name.to_string(),
                source,
            })
        })?;
        let placed = self
            .committer()
            .replace_writer(writer)
            .and_then(|()| std::fs::rename(&new_path, &path))
            .and_then(|()| sync_dir(&path));
        if let Err(error) = placed {
            self.committer().poison(format!(
                "checkpoint {name:?} was taken, but the next journal could not be put in place: {error}"
            ));
        }
        self.marked.clear_all();
        self.saved.clear_all();
        self.fine.clear();
        // Written-but-unflushed regions stay in `written`: the next flush
        // saves them in the new generation's records, where they are not
        // marked; that is harmless (saved is a subset test on marked).
        self.generation.store(generation + 1, Ordering::SeqCst);
        self.checkpoints
            .lock()
            .expect("checkpoints lock")
            .push(checkpoint.clone());
        self.closed_unions.lock().expect("unions lock").clear();
        self.write_index(name)?;
        Ok(checkpoint)
    }

    /// Deletes a checkpoint, merging its changes into the next generation
    /// so that no change is lost for older checkpoints. A pinned
    /// checkpoint is refused, naming its pins.
    pub fn delete_checkpoint(&self, name: &str) -> Result<(), CheckpointError> {
        let _operation = self.catalog_operation(name)?;
        let checkpoints = self.checkpoints();
        let index = checkpoints
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| CheckpointError::Unknown {
                name: name.to_string(),
            })?;
        let deleted = &checkpoints[index];
        let pins = self.pins_of(deleted.generation, name)?;
        if !pins.is_empty() {
            return Err(CheckpointError::Pinned {
                name: name.to_string(),
                pins,
            });
        }
        let catalog_error = |source| CheckpointError::Catalog {
            name: name.to_string(),
            source,
        };
        match checkpoints.get(index + 1) {
            Some(next) => {
                let mut merged = next.clone();
                merged.saved = (&next.saved | &(&deleted.saved - &next.changed))
                    & &(&next.changed | &deleted.changed);
                merged.changed |= &deleted.changed;
                // Exact only where both generations that changed a region
                // recorded it completely.
                let inexact = (&deleted.changed - &deleted.exact) | (&next.changed - &next.exact);
                merged.exact = &merged.changed - &inexact;
                merged.fine |= &deleted.fine;
                self.catalog
                    .replace_checkpoints(&[deleted.generation], Some(&merged))
                    .map_err(catalog_error)?;
                let mut cache = self.checkpoints.lock().expect("checkpoints lock");
                cache.remove(index);
                cache[index] = merged;
            }
            None => {
                self.merge_into_current(deleted, name)?;
                // The current generation stays what it is: a restart must
                // not take it for one lower (the journal's is this one).
                self.catalog
                    .remove_newest_checkpoint(deleted.generation)
                    .map_err(catalog_error)?;
                self.checkpoints
                    .lock()
                    .expect("checkpoints lock")
                    .remove(index);
            }
        }
        self.closed_unions.lock().expect("unions lock").clear();
        self.write_index(name)?;
        for hook in self.hooks() {
            hook.checkpoint_deleted(deleted);
        }
        Ok(())
    }

    /// The newest checkpoint's changes join the current generation,
    /// durably marked before its catalog entry goes.
    fn merge_into_current(&self, deleted: &Checkpoint, name: &str) -> Result<(), CheckpointError> {
        let runs = runs_from_sorted(deleted.changed.iter().map(u64::from));
        if runs.is_empty() {
            return Ok(());
        }
        let _closed = self.gate.close();
        runs.chunks(journal::RUNS_PER_RECORD_MAX)
            .try_for_each(|chunk| {
                let batch = self.committer().enqueue(Record::Mark {
                    runs: chunk.to_vec(),
                })?;
                self.committer().wait_for(batch)
            })
            .map_err(|source| CheckpointError::Journal {
                name: name.to_string(),
                source,
            })?;
        for run in &runs {
            self.marked.set_run(*run);
        }
        self.fine.add_inexact(&(&deleted.changed - &deleted.exact));
        self.fine.add_blocks(&deleted.fine);
        Ok(())
    }

    /// Pins checkpoint `name` for `holder`: it cannot be deleted until
    /// unpinned. Pinning again with the same holder replaces the reason.
    pub fn pin(&self, name: &str, holder: &str, reason: &str) -> Result<Pin, CheckpointError> {
        validate_name(holder).map_err(|()| CheckpointError::BadHolder {
            holder: holder.to_string(),
        })?;
        if reason.len() > PIN_REASON_MAX {
            return Err(CheckpointError::ReasonTooLong);
        }
        let _operation = self.catalog_operation(name)?;
        let checkpoint = self.find(name).ok_or_else(|| CheckpointError::Unknown {
            name: name.to_string(),
        })?;
        let pin = Pin {
            generation: checkpoint.generation,
            holder: holder.to_string(),
            reason: reason.to_string(),
            created_unix_seconds: unix_seconds(),
        };
        self.catalog
            .put_pin(&pin)
            .map_err(|source| CheckpointError::Catalog {
                name: name.to_string(),
                source,
            })?;
        Ok(pin)
    }

    /// Removes `holder`'s pin from checkpoint `name`.
    pub fn unpin(&self, name: &str, holder: &str) -> Result<(), CheckpointError> {
        let _operation = self.catalog_operation(name)?;
        let checkpoint = self.find(name).ok_or_else(|| CheckpointError::Unknown {
            name: name.to_string(),
        })?;
        let removed = self
            .catalog
            .remove_pin(checkpoint.generation, holder)
            .map_err(|source| CheckpointError::Catalog {
                name: name.to_string(),
                source,
            })?;
        if !removed {
            return Err(CheckpointError::UnknownPin {
                name: name.to_string(),
                holder: holder.to_string(),
            });
        }
        Ok(())
    }

    /// Every pin, by checkpoint generation then holder. A damaged pin
    /// record is an error: a checkpoint whose pins cannot be read must not
    /// look unpinned.
    pub fn pins(&self) -> Result<Vec<Pin>, CheckpointError> {
        self.catalog
            .pins()
            .map_err(|source| CheckpointError::Catalog {
                name: String::new(),
                source,
            })
    }

    fn pins_of(&self, generation: u64, name: &str) -> Result<Vec<Pin>, CheckpointError> {
        let pins = self
            .catalog
            .pins()
            .map_err(|source| CheckpointError::Catalog {
                name: name.to_string(),
                source,
            })?;
        Ok(pins
            .into_iter()
            .filter(|pin| pin.generation == generation)
            .collect())
    }

    fn write_index(&self, name: &str) -> Result<(), CheckpointError> {
        let path = self.state_dir.join(INDEX_FILE);
        write_index(&path, &self.checkpoints()).map_err(|source| CheckpointError::Index {
            name: name.to_string(),
            path,
            source,
        })
    }
}

/// 1 to CHECKPOINT_NAME_MAX printable characters without spaces (a name
/// becomes part of an NBD context name and a command-line word).
fn validate_name(name: &str) -> Result<(), ()> {
    let usable = !name.is_empty()
        && name.len() <= CHECKPOINT_NAME_MAX
        && name.chars().all(|c| {
            c.is_ascii_graphic() || (!c.is_ascii() && !c.is_whitespace() && !c.is_control())
        });
    if usable { Ok(()) } else { Err(()) }
}

fn write_index(path: &Path, checkpoints: &[Checkpoint]) -> io::Result<()> {
    let mut text = String::new();
    for checkpoint in checkpoints {
        text.push_str(&format!("{} {}\n", checkpoint.generation, checkpoint.name));
    }
    text.push_str(&format!("crc32c {:08x}\n", crc32c::crc32c(text.as_bytes())));
    let new_path = path.with_extension("new");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&new_path)?;
    std::io::Write::write_all(&mut &file, text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&new_path, path)?;
    sync_dir(path)
}

fn read_index(state_dir: &Path) -> Option<Vec<(u64, String)>> {
    let text = std::fs::read_to_string(state_dir.join(INDEX_FILE)).ok()?;
    let (body, last) = text
        .trim_end_matches('\n')
        .rsplit_once('\n')
        .unwrap_or(("", text.trim_end_matches('\n')));
    let body = if body.is_empty() {
        String::new()
    } else {
        format!("{body}\n")
    };
    let crc = u32::from_str_radix(last.strip_prefix("crc32c ")?, 16).ok()?;
    if crc32c::crc32c(body.as_bytes()) != crc {
        return None;
    }
    body.lines()
        .map(|line| {
            let (generation, name) = line.split_once(' ')?;
            Some((generation.parse().ok()?, name.to_string()))
        })
        .collect()
}

/// Every region of an image of `region_count` regions. Region indexes are
/// u32 (roaring's), so REGION_COUNT_MAX is 2^32: the last index is
/// u32::MAX, and the range is built inclusive so that a count of exactly
/// 2^32 does not wrap to an empty set.
pub(crate) fn all_regions(region_count: u64) -> RoaringBitmap {
    assert!(region_count <= REGION_COUNT_MAX);
    let mut regions = RoaringBitmap::new();
    if region_count > 0 {
        let last = u32::try_from(region_count - 1).expect("region_count <= 2^32");
        regions.insert_range(0..=last);
    }
    debug_assert_eq!(regions.len(), region_count);
    regions
}

/// After the catalog was lost: the checkpoints named in the index come
/// back with every region changed, so no query can miss a change.
pub(crate) fn checkpoints_from_index(
    state_dir: &Path,
    region_count: u64,
    findings: &mut Findings,
) -> Vec<Checkpoint> {
    let Some(entries) = read_index(state_dir) else {
        findings.note("no usable checkpoints.index: the checkpoints are gone; take a new checkpoint and a full copy");
        return Vec::new();
    };
    let everything = all_regions(region_count);
    let checkpoints: Vec<Checkpoint> = entries
        .into_iter()
        .map(|(generation, name)| Checkpoint {
            name,
            generation,
            created_unix_seconds: unix_seconds(),
            changed: everything.clone(),
            saved: RoaringBitmap::new(),
            exact: RoaringBitmap::new(),
            fine: RoaringBitmap::new(),
        })
        .collect();
    findings.note(format!(
        "restored {} checkpoint names from checkpoints.index; each counts every region as changed",
        checkpoints.len()
    ));
    checkpoints
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuild_from_index_of_exactly_2_pow_32_regions_counts_every_region() {
        // 2^32 regions is 16 TiB at 4 KiB granularity, the largest image
        // the tracker accepts. `(0..region_count as u32)` was an empty
        // range there: after a lost catalog every checkpoint would have
        // reported nothing changed.
        let dir = std::env::temp_dir().join(format!("bw-index-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let checkpoints = [("monday", 1u64), ("tuesday", 2)].map(|(name, generation)| Checkpoint {
            name: name.into(),
            generation,
            created_unix_seconds: 0,
            changed: RoaringBitmap::new(),
            saved: RoaringBitmap::new(),
            exact: RoaringBitmap::new(),
            fine: RoaringBitmap::new(),
        });
        write_index(&dir.join(INDEX_FILE), &checkpoints).unwrap();
        let mut findings = Findings::default();
        let rebuilt = checkpoints_from_index(&dir, REGION_COUNT_MAX, &mut findings);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(rebuilt.len(), 2);
        for checkpoint in &rebuilt {
            assert_eq!(checkpoint.changed.len(), REGION_COUNT_MAX);
            assert!(checkpoint.changed.contains(0) && checkpoint.changed.contains(u32::MAX));
        }
        assert_eq!(rebuilt[1].name, "tuesday");
    }

    #[test]
    fn all_regions_counts_exactly() {
        for count in [0, 1, 2, 65535, 65536, 65537, (1 << 32) - 1, 1 << 32] {
            assert_eq!(all_regions(count).len(), count, "{count} regions");
        }
    }

    #[test]
    fn a_damaged_index_restores_nothing() {
        let dir = std::env::temp_dir().join(format!("bw-index-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(INDEX_FILE), "1 monday\ncrc32c 00000000\n").unwrap();
        let mut findings = Findings::default();
        assert!(checkpoints_from_index(&dir, 16, &mut findings).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(findings.warnings[0].contains("no usable checkpoints.index"));
    }
}
