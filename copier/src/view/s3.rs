//! One object storage session read at random: its manifest maps the
//! whole disk, so a read finds its extents there and fetches the chunks
//! (a ranged GET each, opened and hashed against the chunk's id before a
//! byte of it is used), keeping the last few.

use std::io;
use std::sync::{Arc, Mutex};

use backend::{BlockBackend, Extent, STATE_HOLE, STATE_ZERO, push_extent};

use super::cache::Lru;
use super::{ViewError, read_only};
use crate::s3::format::{ChunkRef, Extent as ManifestExtent, Manifest};
use crate::s3::lock::RepoLock;
use crate::s3::repo::SessionKey;
use crate::s3::restore::{GROUP_BYTES_MAX, chosen_session, fetch_group};
use crate::s3::{Repository, S3Error, S3Location};

/// Bytes of opened chunks kept after a read.
const CHUNK_CACHE_BYTES: usize = 64 << 20;
/// Chunks fetched ahead of a read with it, in one GET.
const READ_AHEAD_CHUNKS_MAX: usize = 1024;
/// Extents after a read whose chunks may be fetched with it.
const READ_AHEAD_EXTENTS_MAX: usize = 4096;

pub struct S3View {
    /// Held while the view is open, so that prune sweeps nothing it
    /// reads. First, so that it is dropped (removed) while the
    /// repository's runtime still runs.
    _lock: RepoLock,
    repo: Arc<Repository>,
    pub session: String,
    pub manifest: Manifest,
    chunks: Mutex<Lru<u32, Vec<u8>>>,
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
            chunks: Mutex::new(Lru::new(CHUNK_CACHE_BYTES)),
            _lock: lock,
        })
    }

    pub fn checkpoint(&self) -> &str {
        &self.manifest.header.checkpoint.checkpoint
    }

    /// The index of the first extent that ends after `offset`.
    fn first_overlapping(&self, offset: u64) -> usize {
        self.manifest
            .extents
            .partition_point(|e| e.offset_bytes + u64::from(e.length_bytes) <= offset)
    }

    /// The manifest's extents that overlap `[offset, end)`, in order.
    fn overlapping(&self, offset: u64, end: u64) -> &[ManifestExtent] {
        let extents = &self.manifest.extents;
        let first = self.first_overlapping(offset);
        let last = extents.partition_point(|e| e.offset_bytes < end);
        &extents[first..last.max(first)]
    }

    /// The opened chunk extent number `index` reads from. A miss fetches
    /// it with the chunks of the extents after it that lie back to back
    /// in its pack (one GET of at most GROUP_BYTES_MAX): a file's blocks
    /// are mostly read in disk order, and small chunks one GET each
    /// would cost a round trip per 4 KiB.
    fn chunk(&self, index: usize) -> io::Result<Arc<Vec<u8>>> {
        let extents = &self.manifest.extents;
        let number = extents[index].chunk;
        if let Some(plain) = self.chunks.lock().expect("cache lock").get(&number) {
            return Ok(plain);
        }
        let chunks = &self.manifest.chunks;
        let mut numbers = vec![number];
        let mut group = vec![chunks[number as usize]];
        {
            // Chunks of one pack are not always back to back (copies
            // seal several pieces at once): the GET spans the chunks
            // wanted and whatever lies between them, within the bound.
            let cache = self.chunks.lock().expect("cache lock");
            let (mut low, mut high) = span(&group[0]);
            for extent in extents[index + 1..].iter().take(READ_AHEAD_EXTENTS_MAX) {
                if numbers.len() >= READ_AHEAD_CHUNKS_MAX {
                    break;
                }
                let next = chunks[extent.chunk as usize];
                let (start, end) = span(&next);
                if next.pack != group[0].pack
                    || numbers.contains(&extent.chunk)
                    || cache.contains(&extent.chunk)
                    || high.max(end) - low.min(start) > GROUP_BYTES_MAX
                {
                    continue;
                }
                (low, high) = (low.min(start), high.max(end));
                numbers.push(extent.chunk);
                group.push(next);
            }
        }
        let mut order: Vec<usize> = (0..group.len()).collect();
        order.sort_by_key(|&i| group[i].offset_bytes);
        let group: Vec<ChunkRef> = order.iter().map(|&i| group[i]).collect();
        let numbers: Vec<u32> = order.iter().map(|&i| numbers[i]).collect();
        let client = self.repo.client();
        let sealer = self.repo.sealer.clone();
        let plains = self
            .repo
            .block_on(async move { fetch_group(&client, &sealer, &group).await })
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error.to_string()))?;
        let mut cache = self.chunks.lock().expect("cache lock");
        let mut wanted = None;
        for (chunk, plain) in numbers.into_iter().zip(plains) {
            let plain = Arc::new(plain);
            if chunk == number {
                wanted = Some(plain.clone());
            }
            let cost = plain.len();
            cache.put(chunk, plain, cost);
        }
        Ok(wanted.expect("the group holds the chunk asked for"))
    }
}

/// The bytes of its pack a chunk's sealed form takes.
fn span(chunk: &ChunkRef) -> (u64, u64) {
    (
        chunk.offset_bytes,
        chunk.offset_bytes + u64::from(chunk.stored_bytes),
    )
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
        let first = self.first_overlapping(offset);
        for (index, extent) in self.overlapping(offset, end).iter().enumerate() {
            let extent_end = extent.offset_bytes + u64::from(extent.length_bytes);
            let from = extent.offset_bytes.max(offset);
            let to = extent_end.min(end);
            let plain = self.chunk(first + index)?;
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
