//! One object storage session read at random: its manifest maps the
//! whole disk, so a read finds its extents there and fetches the chunks
//! (a ranged GET each, opened and hashed against the chunk's id before a
//! byte of it is used), keeping the last few.

use std::io;
use std::sync::{Arc, Mutex};

use backend::{BlockBackend, Extent, STATE_HOLE, STATE_ZERO, push_extent};

use super::cache::Lru;
use super::{ViewError, read_only};
use crate::s3::format::{Extent as ManifestExtent, Manifest};
use crate::s3::lock::RepoLock;
use crate::s3::repo::SessionKey;
use crate::s3::restore::{chosen_session, fetch_chunk};
use crate::s3::{Repository, S3Error, S3Location};

/// Chunks kept after a read (at most 4 MiB each: 64 MiB).
const CHUNK_CACHE_COUNT: usize = 16;

pub struct S3View {
    repo: Arc<Repository>,
    pub session: String,
    pub manifest: Manifest,
    chunks: Mutex<Lru<u32, Vec<u8>>>,
    /// Held while the view is open, so that prune sweeps nothing it reads.
    _lock: RepoLock,
}

impl std::fmt::Debug for S3View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3View")
            .field("repository", &self.repo.url)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl S3View {
    /// The session `location` names, or with `at` the session of that
    /// checkpoint (among those `location` could name).
    pub fn open(
        repo: Arc<Repository>,
        location: &S3Location,
        at: Option<&str>,
    ) -> Result<S3View, ViewError> {
        let lock = RepoLock::take(&repo, "view", None)?;
        let (key, manifest) = match at {
            None => {
                let key = chosen_session(&repo, location)?;
                let manifest = repo.manifest(&key.key())?;
                (key, manifest)
            }
            Some(checkpoint) => session_at(&repo, location, checkpoint)?,
        };
        Ok(S3View {
            repo,
            session: key.session,
            manifest,
            chunks: Mutex::new(Lru::new(CHUNK_CACHE_COUNT)),
            _lock: lock,
        })
    }

    pub fn checkpoint(&self) -> &str {
        &self.manifest.header.checkpoint.checkpoint
    }

    /// The manifest's extents that overlap `[offset, end)`, in order.
    fn overlapping(&self, offset: u64, end: u64) -> &[ManifestExtent] {
        let extents = &self.manifest.extents;
        let first =
            extents.partition_point(|e| e.offset_bytes + u64::from(e.length_bytes) <= offset);
        let last = extents.partition_point(|e| e.offset_bytes < end);
        &extents[first..last.max(first)]
    }

    fn chunk(&self, number: u32) -> io::Result<Arc<Vec<u8>>> {
        if let Some(plain) = self.chunks.lock().expect("cache lock").get(&number) {
            return Ok(plain);
        }
        let chunk = self.manifest.chunks[number as usize];
        let client = self.repo.client();
        let sealer = self.repo.sealer.clone();
        let plain = self
            .repo
            .block_on(async move { fetch_chunk(&client, &sealer, &chunk).await })
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error.to_string()))?;
        let plain = Arc::new(plain);
        self.chunks
            .lock()
            .expect("cache lock")
            .put(number, plain.clone());
        Ok(plain)
    }
}

/// The session of `checkpoint`, of the disk `location` names (or of the
/// one disk the repository holds).
fn session_at(
    repo: &Repository,
    location: &S3Location,
    checkpoint: &str,
) -> Result<(SessionKey, Manifest), ViewError> {
    let mut found: Vec<(SessionKey, Manifest)> = Vec::new();
    for key in repo.sessions()? {
        if location
            .session
            .as_ref()
            .is_some_and(|wanted| !key.session.starts_with(wanted.as_str()))
        {
            continue;
        }
        let manifest = repo.manifest(&key.key())?;
        if manifest.header.checkpoint.checkpoint == checkpoint {
            found.push((key, manifest));
        }
    }
    match found.len() {
        1 => Ok(found.pop().expect("one")),
        0 => Err(ViewError::Refused(format!(
            "{}: no session holds checkpoint {checkpoint:?} (blockwatch sessions lists them)",
            repo.url
        ))),
        n => Err(ViewError::Refused(format!(
            "{}: {n} sessions hold a checkpoint named {checkpoint:?} (of different disks): name one as s3://BUCKET/PREFIX#SESSION",
            repo.url
        ))),
    }
}

impl From<S3Error> for ViewError {
    fn from(error: S3Error) -> ViewError {
        ViewError::S3(Box::new(error))
    }
}

impl BlockBackend for S3View {
    fn size_bytes(&self) -> u64 {
        self.manifest.header.size_bytes
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn can_extents(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        buf.fill(0);
        for extent in self.overlapping(offset, end) {
            let extent_end = extent.offset_bytes + u64::from(extent.length_bytes);
            let from = extent.offset_bytes.max(offset);
            let to = extent_end.min(end);
            let plain = self.chunk(extent.chunk)?;
            let within =
                (u64::from(extent.chunk_offset_bytes) + from - extent.offset_bytes) as usize;
            let length = (to - from) as usize;
            let source = plain.get(within..within + length).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: an extent reads past the end of its chunk",
                        self.repo.url
                    ),
                )
            })?;
            let at = (from - offset) as usize;
            buf[at..at + length].copy_from_slice(source);
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> io::Result<()> {
        Err(read_only())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn extents(
        &self,
        offset: u64,
        length: u64,
        max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        let first = out.len();
        let end = offset + length;
        let mut position = offset;
        for extent in self.overlapping(offset, end) {
            let from = extent.offset_bytes.max(offset);
            let to = (extent.offset_bytes + u64::from(extent.length_bytes)).min(end);
            if from > position {
                push_extent(out, first, from - position, STATE_HOLE | STATE_ZERO);
            }
            push_extent(out, first, to - from, 0);
            position = to;
            if out.len() - first >= max_extents {
                return Ok(());
            }
        }
        if position < end {
            push_extent(out, first, end - position, STATE_HOLE | STATE_ZERO);
        }
        Ok(())
    }
}
