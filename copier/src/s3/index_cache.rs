//! A local copy of a repository's pack indexes, so that a copy reads from
//! the service only the indexes it has not seen: without it every copy
//! GETs one `index/PACK` per pack the repository holds (65536 for a 1 TiB
//! repository of 16 MiB packs) before it can deduplicate anything.
//!
//! Packs and their indexes are never rewritten (a pack's id is random and
//! each pack is uploaded once), so an index, once read, stays valid for as
//! long as the service lists it. The cache keeps each index exactly as
//! the service sent it, still sealed: opening it checks its digest or
//! AEAD tag again, so a damaged or altered cache file is found and read
//! from the service instead, never trusted. Entries the listing no longer
//! shows (packs a prune swept) are ignored and removed.
//!
//! Layout: `ROOT/REPOSITORY_ID/PACK` (hex ids), directories mode 0700. A
//! cache that cannot be written is only a slower copy: errors are logged,
//! never returned.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::format::{INDEX_BYTES_MAX, PackId};

/// A sealed index is its plaintext plus the seal's framing, at most.
pub(crate) const SEALED_INDEX_BYTES_MAX: usize = INDEX_BYTES_MAX + 1024;

/// The pack indexes of one repository on this machine.
#[derive(Debug)]
pub(crate) struct IndexCache {
    dir: PathBuf,
}

/// The default root: `$XDG_CACHE_HOME/blockwatch/s3-index`, else
/// `$HOME/.cache/blockwatch/s3-index`; None when neither is set.
pub fn default_root() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            PathBuf::from(std::env::var_os("HOME").filter(|home| !home.is_empty())?).join(".cache")
        }
    };
    Some(base.join("blockwatch").join("s3-index"))
}

impl IndexCache {
    /// The cache of the repository `repository_id` under `root`, made if
    /// missing; None (with a warning) when it cannot be, or when the id
    /// (read from the service) is not a plain hex name.
    pub(crate) fn open(root: &Path, repository_id: &str) -> Option<IndexCache> {
        let plain = !repository_id.is_empty()
            && repository_id.len() <= 128
            && repository_id.bytes().all(|b| b.is_ascii_hexdigit());
        if !plain {
            tracing::warn!(
                repository_id,
                "no index cache for a repository id that is not hex"
            );
            return None;
        }
        let dir = root.join(repository_id);
        match std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
        {
            Ok(()) => Some(IndexCache { dir }),
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "no index cache: cannot make its directory");
                None
            }
        }
    }

    fn path(&self, pack: &PackId) -> PathBuf {
        self.dir.join(pack.hex())
    }

    /// The sealed index of `pack` as cached, if it is and is no larger
    /// than an index can be.
    pub(crate) fn get(&self, pack: &PackId) -> Option<Vec<u8>> {
        let file = std::fs::File::open(self.path(pack)).ok()?;
        let length = file.metadata().ok()?.len();
        if length > SEALED_INDEX_BYTES_MAX as u64 {
            return None;
        }
        let mut sealed = Vec::with_capacity(length as usize);
        file.take(SEALED_INDEX_BYTES_MAX as u64)
            .read_to_end(&mut sealed)
            .ok()?;
        Some(sealed)
    }

    /// Keeps the sealed index of `pack`: written aside, then renamed, so
    /// that a crash leaves the old entry or the new one.
    pub(crate) fn put(&self, pack: &PackId, sealed: &[u8]) {
        let path = self.path(pack);
        let aside = self.dir.join(format!(".{}.new", pack.hex()));
        let result = std::fs::write(&aside, sealed).and_then(|()| std::fs::rename(&aside, &path));
        if let Err(error) = result {
            let _ = std::fs::remove_file(&aside);
            tracing::warn!(path = %path.display(), %error, "cannot cache a pack index");
        }
    }

    /// Forgets the entry of `pack` (one that did not open).
    pub(crate) fn remove(&self, pack: &PackId) {
        let _ = std::fs::remove_file(self.path(pack));
    }

    /// Removes the entries of packs not in `listed` (swept by a prune).
    pub(crate) fn retain(&self, listed: &HashSet<PackId>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let keep = name
                .to_str()
                .and_then(PackId::parse)
                .is_some_and(|pack| listed.contains(&pack));
            if !keep {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}
