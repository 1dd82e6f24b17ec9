//! Locks: `locks/ID`, one per copy, restore, verify or prune under way,
//! rewritten while its process runs. Prune sweeps nothing while another
//! process holds a live one (prune.rs says why that is enough); a copy
//! refuses to run beside another copy of the same disk.

use std::path::Path;
use std::time::Duration;

use super::S3Error;
use super::repo::{Client, Repository};
use super::seal::random_bytes;

/// A lock not refreshed for this long belongs to a process that died.
pub const LOCK_STALE: Duration = Duration::from_secs(30 * 60);
const LOCK_REFRESH: Duration = Duration::from_secs(5 * 60);

/// A copy, restore or verify under way, as `locks/ID`: prune deletes
/// nothing a process that held a lock when it marked may still need.
/// Refreshed while held; deleted on drop.
#[derive(Debug)]
pub struct RepoLock {
    pub key: String,
    client: Client,
    refresher: tokio::task::JoinHandle<()>,
    handle: tokio::runtime::Handle,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LockRecord {
    pub kind: String,
    /// The disk a copy copies.
    #[serde(default)]
    pub disk: Option<String>,
    pub host: String,
    pub pid: u32,
    pub started_unix: u64,
}

impl RepoLock {
    pub fn take(repo: &Repository, kind: &str, disk: Option<&str>) -> Result<RepoLock, S3Error> {
        let key = format!("locks/{}", crate::copy::hex_id(&random_bytes::<16>()));
        let record = LockRecord {
            kind: kind.to_string(),
            disk: disk.map(str::to_string),
            host: hostname(),
            pid: std::process::id(),
            started_unix: crate::copy::unix_seconds(),
        };
        let bytes = serde_json::to_vec(&record).expect("a lock serializes");
        repo.put(&key, bytes.clone())?;
        let client = repo.client();
        let refresher = {
            let client = client.clone();
            let key = key.clone();
            repo.spawn(async move {
                loop {
                    tokio::time::sleep(LOCK_REFRESH).await;
                    if let Err(error) = client.put(&key, bytes.clone()).await {
                        tracing::warn!(%error, "refreshing a repository lock");
                    }
                }
            })
        };
        Ok(RepoLock {
            key,
            client,
            refresher,
            handle: repo.handle(),
        })
    }
}

impl RepoLock {
    /// The locks of other processes that are alive: rewritten within
    /// `LOCK_STALE` by the server's clock (read off this lock's own
    /// Last-Modified). Stale ones are removed.
    pub fn others(&self, repo: &Repository) -> Result<Vec<(String, LockRecord)>, S3Error> {
        let locks = repo.list("locks/")?;
        let now = locks
            .iter()
            .find(|listed| listed.key == self.key)
            .map(|listed| listed.modified_unix)
            .ok_or_else(|| repo.damaged(&self.key, "our own lock is not listed"))?;
        let mut live = Vec::new();
        for listed in locks {
            if listed.key == self.key {
                continue;
            }
            if now - listed.modified_unix > LOCK_STALE.as_secs() as i64 {
                tracing::warn!(lock = %listed.key, "removing a stale lock (its process stopped refreshing it)");
                repo.delete(&listed.key)?;
                continue;
            }
            // Gone since the listing: its process ended.
            let Some(bytes) = repo.get_optional(&listed.key, 4096)? else {
                continue;
            };
            // A lock this blockwatch cannot read still counts, as a copy.
            let record = serde_json::from_slice(&bytes).unwrap_or(LockRecord {
                kind: "copy".into(),
                disk: None,
                host: String::new(),
                pid: 0,
                started_unix: 0,
            });
            // A process of this host that is gone (killed) holds nothing.
            if record.pid != 0
                && record.host == hostname()
                && !Path::new(&format!("/proc/{}", record.pid)).exists()
            {
                tracing::warn!(lock = %listed.key, pid = record.pid, "removing the lock of a process that ended");
                repo.delete(&listed.key)?;
                continue;
            }
            live.push((listed.key, record));
        }
        Ok(live)
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        self.refresher.abort();
        let delete = || self.handle.block_on(self.client.delete(&self.key));
        let result = if tokio::runtime::Handle::try_current().is_ok() {
            // Dropped inside a runtime: a server's worker thread that let
            // go of the last export of a backup view holding this lock,
            // where block_on panics (exit 101 at SIGTERM, the lock left
            // behind). The delete gets a thread of its own.
            std::thread::scope(|scope| scope.spawn(delete).join()).unwrap_or_else(|_| {
                tracing::warn!(key = %self.key, "the thread removing a repository lock panicked");
                Ok(())
            })
        } else {
            delete()
        };
        if let Err(error) = result {
            tracing::warn!(%error, key = %self.key, "removing a repository lock");
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_default()
}
