//! Retention: `blockwatch prune s3://... --keep-last N --keep-daily N
//! --keep-weekly N --keep-monthly N` removes each disk's sessions the
//! policy does not keep, then the packs no session names, in two phases
//! so that nothing another process may still need is deleted:
//!
//! 1. mark: the packs no session names now are listed in `marks/MARK`;
//!    a copy that starts after the mark never makes a session name them
//!    (it uploads such chunks again);
//! 2. sweep: a mark's packs that still no session names are deleted once
//!    no copy, restore or verify holds a lock (one taken before the mark
//!    may still read or reuse them; one taken after it reads only
//!    sessions that exist, whose packs are never marked). A lock not
//!    refreshed for `LOCK_STALE` belongs to a process that died.
//!
//! Each prune sweeps the marks it can, forgets sessions, marks, and
//! sweeps its own mark at once when nothing else holds a lock. A pack
//! partly needed stays whole (no repacking).

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::S3Error;
use super::format::PackId;
use super::lock::RepoLock;
use super::repo::{Repository, SessionKey};

/// What to keep of each disk's sessions; a session any rule keeps stays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub keep_last: usize,
    pub keep_daily: usize,
    pub keep_weekly: usize,
    pub keep_monthly: usize,
}

impl Retention {
    pub fn keeps_nothing(&self) -> bool {
        self.keep_last + self.keep_daily + self.keep_weekly + self.keep_monthly == 0
    }

    /// Which of `times` (seconds since 1970, of one disk's sessions) to
    /// keep: the newest `keep_last`, and the newest of each of the last
    /// `keep_daily` days (weeks, months) that have sessions.
    pub fn keep(&self, times: &[u64]) -> Vec<bool> {
        let mut order: Vec<usize> = (0..times.len()).collect();
        order.sort_by(|a, b| times[*b].cmp(&times[*a]));
        let mut kept = vec![false; times.len()];
        for (rank, &index) in order.iter().enumerate() {
            if rank < self.keep_last {
                kept[index] = true;
            }
        }
        type BucketOf = fn(u64) -> i64;
        let buckets: [(usize, BucketOf); 3] = [
            (self.keep_daily, |t| (t / 86400) as i64),
            // 1970-01-01 was a Thursday: weeks start on Mondays.
            (self.keep_weekly, |t| ((t / 86400) as i64 + 3).div_euclid(7)),
            (self.keep_monthly, |t| {
                let (year, month, _) = civil_from_days((t / 86400) as i64);
                year * 12 + i64::from(month)
            }),
        ];
        for (count, bucket_of) in buckets {
            let mut last_bucket = None;
            let mut taken = 0;
            for &index in &order {
                if taken == count {
                    break;
                }
                let bucket = bucket_of(times[index]);
                if last_bucket != Some(bucket) {
                    kept[index] = true;
                    last_bucket = Some(bucket);
                    taken += 1;
                }
            }
        }
        kept
    }
}

/// The calendar date of a day counted from 1970-01-01 (proleptic
/// Gregorian; Howard Hinnant's algorithm).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[derive(Debug, Serialize, Deserialize)]
struct Mark {
    packs: Vec<String>,
}

/// What a prune did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneSummary {
    pub sessions_kept: usize,
    pub sessions_removed: Vec<String>,
    pub packs_marked: usize,
    pub packs_deleted: usize,
    pub bytes_deleted: u64,
    /// Locks of other processes that kept marked packs from being
    /// deleted (a later prune deletes them).
    pub waiting_for_locks: usize,
}

/// Every pack a pending mark lists.
pub fn pending_marks(repo: &Repository) -> Result<HashSet<PackId>, S3Error> {
    let mut packs = HashSet::new();
    for listed in repo.list("marks/")? {
        packs.extend(read_mark(repo, &listed.key)?);
    }
    Ok(packs)
}

fn read_mark(repo: &Repository, key: &str) -> Result<Vec<PackId>, S3Error> {
    let mark: Mark = repo.small_json(key)?;
    mark.packs
        .iter()
        .map(|hex| {
            PackId::parse(hex).ok_or_else(|| repo.damaged(key, format!("it names pack {hex:?}")))
        })
        .collect()
}

/// Removes what `retention` does not keep (see the module comment).
pub fn prune(repo: &Repository, retention: &Retention) -> Result<PruneSummary, S3Error> {
    if retention.keeps_nothing() {
        return Err(S3Error::Refused {
            url: repo.url.clone(),
            reason: "a prune that keeps nothing would remove every session: give --keep-last, --keep-daily, --keep-weekly or --keep-monthly".into(),
        });
    }
    let lock = RepoLock::take(repo, "prune", None)?;
    let mut summary = PruneSummary::default();
    sweep_marks(repo, &lock, &mut summary)?;
    let mut manifests = BTreeMap::new();
    for key in repo.sessions()? {
        manifests.insert(key.clone(), repo.manifest(&key.key())?);
    }
    let mut by_disk: BTreeMap<&str, Vec<&SessionKey>> = BTreeMap::new();
    for key in manifests.keys() {
        by_disk.entry(key.disk.as_str()).or_default().push(key);
    }
    let mut forgotten = Vec::new();
    for keys in by_disk.values() {
        let times: Vec<u64> = keys
            .iter()
            .map(|key| manifests[*key].header.created_unix)
            .collect();
        for (key, kept) in keys.iter().zip(retention.keep(&times)) {
            if !kept {
                forgotten.push((*key).clone());
            }
        }
    }
    for key in &forgotten {
        repo.delete(&key.key())?;
        manifests.remove(key);
        summary.sessions_removed.push(key.session.clone());
    }
    summary.sessions_kept = manifests.len();
    let referenced: HashSet<PackId> = manifests
        .values()
        .flat_map(|manifest| manifest.chunks.iter().map(|chunk| chunk.pack))
        .collect();
    let already = pending_marks(repo)?;
    let unreferenced: Vec<PackId> = stored_packs(repo)?
        .into_keys()
        .filter(|pack| !referenced.contains(pack) && !already.contains(pack))
        .collect();
    summary.packs_marked = unreferenced.len();
    if !unreferenced.is_empty() {
        let key = format!("marks/{}", super::repo::new_session_id());
        let mark = Mark {
            packs: unreferenced.iter().map(PackId::hex).collect(),
        };
        repo.put_small_json(&key, &mark)?;
        sweep_marks(repo, &lock, &mut summary)?;
    }
    drop(lock);
    Ok(summary)
}

/// Every pack stored (with or without its index), with its size.
fn stored_packs(repo: &Repository) -> Result<BTreeMap<PackId, u64>, S3Error> {
    let mut packs = BTreeMap::new();
    for listed in repo.list("packs/")? {
        if let Some(pack) = listed.key.rsplit('/').next().and_then(PackId::parse) {
            packs.insert(pack, listed.size_bytes);
        }
    }
    for listed in repo.list("index/")? {
        if let Some(pack) = listed.key.strip_prefix("index/").and_then(PackId::parse) {
            packs.entry(pack).or_insert(0);
        }
    }
    Ok(packs)
}

/// Locks of other processes that are alive; another prune's refuses
/// this one.
fn live_locks(repo: &Repository, own: &RepoLock) -> Result<Vec<String>, S3Error> {
    let live = own.others(repo)?;
    if let Some((key, _)) = live.iter().find(|(_, record)| record.kind == "prune") {
        return Err(S3Error::Refused {
            url: repo.url.clone(),
            reason: format!("another prune is running ({key})"),
        });
    }
    Ok(live.into_iter().map(|(key, _)| key).collect())
}

/// Deletes the packs of every mark that no session names, when no other
/// process holds a lock.
fn sweep_marks(
    repo: &Repository,
    own: &RepoLock,
    summary: &mut PruneSummary,
) -> Result<(), S3Error> {
    let marks = repo.list("marks/")?;
    if marks.is_empty() {
        return Ok(());
    }
    let live = live_locks(repo, own)?;
    if !live.is_empty() {
        summary.waiting_for_locks = live.len();
        return Ok(());
    }
    let mut referenced = HashSet::new();
    for key in repo.sessions()? {
        referenced.extend(repo.manifest(&key.key())?.chunks.iter().map(|c| c.pack));
    }
    let sizes = stored_packs(repo)?;
    for mark in marks {
        for pack in read_mark(repo, &mark.key)? {
            if referenced.contains(&pack) {
                continue;
            }
            let hex = pack.hex();
            // The index first: no copy finds a chunk in a pack half gone.
            repo.delete(&format!("index/{hex}"))?;
            repo.delete(&format!("packs/{}/{hex}", &hex[..2]))?;
            summary.packs_deleted += 1;
            summary.bytes_deleted += sizes.get(&pack).copied().unwrap_or(0);
        }
        repo.delete(&mark.key)?;
    }
    summary.waiting_for_locks = 0;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11016), (2000, 2, 29));
        // 2026-12-02 is day 20789.
        assert_eq!(civil_from_days(20789), (2026, 12, 2));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn retention_keeps_the_newest_of_each_period_and_the_last_n() {
        let day = 86400;
        // Two sessions a day for ten days, starting on a Monday
        // (1970-01-05).
        let times: Vec<u64> = (0..20)
            .map(|i| 4 * day + i / 2 * day + i % 2 * 3600)
            .collect();
        let kept = |policy: Retention| -> Vec<usize> {
            policy
                .keep(&times)
                .iter()
                .enumerate()
                .filter(|(_, k)| **k)
                .map(|(i, _)| i)
                .collect()
        };
        let last = Retention {
            keep_last: 3,
            ..Default::default()
        };
        assert_eq!(kept(last), vec![17, 18, 19]);
        let daily = Retention {
            keep_daily: 3,
            ..Default::default()
        };
        // The newest of each of the last three days.
        assert_eq!(kept(daily), vec![15, 17, 19]);
        let weekly = Retention {
            keep_weekly: 5,
            ..Default::default()
        };
        // Days 0-6 are one week (newest: session 13), days 7-9 the next.
        assert_eq!(kept(weekly), vec![13, 19]);
        let monthly = Retention {
            keep_monthly: 1,
            keep_last: 1,
            ..Default::default()
        };
        assert_eq!(kept(monthly), vec![19]);
        assert!(Retention::default().keeps_nothing());
    }
}
