//! `s3://BUCKET/PREFIX` as a copy target: each copy makes one session of
//! its disk. Pieces become chunks (a piece is at most 4 MiB and never
//! crosses a 4 MiB boundary, so equal disks cut into equal chunks); a
//! chunk the repository holds already (any session, any disk, or an
//! interrupted copy's packs) is not uploaded again; new ones are sealed
//! into packs of `PACK_BYTES_TARGET`, uploaded a few at once, each
//! followed by its index. The manifest, the disk's whole map at the
//! copy's checkpoint, is uploaded last: until then no session exists.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::format::{
    ChunkRef, Extent, Manifest, PackId, SESSION_FORMAT, SessionHeader, encode_index,
};
use super::lock::RepoLock;
use super::prune::pending_marks;
use super::repo::{
    Client, IndexReads, Repository, S3Location, SessionKey, disk_key, new_session_id,
};
use super::seal::{ChunkId, Sealer};
use super::{S3Error, S3Options};
use crate::copy::CopyError;
use crate::target::{Held, SourceInfo, StoredTotals, Target};

/// A pack is uploaded once it holds this much.
pub const PACK_BYTES_TARGET: usize = 16 << 20;
/// Packs uploading at once (each held in memory until it is stored).
const UPLOADS_IN_FLIGHT: usize = 4;

/// The pin holder of a repository: stable per URL.
pub fn s3_holder(location: &S3Location) -> String {
    format!("s3-{:08x}", crc32c::crc32c(location.url().as_bytes()))
}

/// The AEAD's associated data for a chunk: its id, so a chunk's sealed
/// bytes do not open as another's.
pub fn chunk_kind(id: &ChunkId) -> Vec<u8> {
    [b"chunk".as_slice(), &id.0].concat()
}

pub struct S3Target {
    location: S3Location,
    repo: Arc<Repository>,
    lock: Option<RepoLock>,
    /// Packs prune has marked: never named by a new session.
    excluded: HashSet<PackId>,
    /// A mark could not be read: no stored chunk is reused (any may be
    /// about to be deleted).
    reuse_nothing: bool,
    /// The disk's newest readable session, once `held` looked.
    newest: Option<(SessionKey, Manifest)>,
    building: Option<Building>,
    /// Where this copy's pack indexes came from.
    index_reads: IndexReads,
}

impl std::fmt::Debug for S3Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Target")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// A session being made.
struct Building {
    header: SessionHeader,
    disk: String,
    known: HashMap<ChunkId, ChunkRef>,
    state: Mutex<State>,
    uploads: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    permits: Arc<tokio::sync::Semaphore>,
    failure: Arc<Mutex<Option<S3Error>>>,
    uploaded_bytes: Arc<AtomicU64>,
    client: Client,
    sealer: Arc<Sealer>,
}

/// One range of the map: `length` bytes of `chunk` from `chunk_offset`.
#[derive(Debug, Clone, Copy)]
struct Mapped {
    length: u32,
    chunk: ChunkId,
    chunk_offset: u32,
}

struct State {
    /// The disk at the new checkpoint, by offset: the parent's map with
    /// this copy's pieces laid over it.
    map: BTreeMap<u64, Mapped>,
    /// Where every chunk the map may name is.
    chunks: HashMap<ChunkId, ChunkRef>,
    pack: Pack,
    data_bytes: u64,
    new_bytes: u64,
}

struct Pack {
    id: PackId,
    bytes: Vec<u8>,
    entries: Vec<ChunkRef>,
}

impl Pack {
    fn new() -> Pack {
        Pack {
            id: PackId::new(),
            bytes: Vec::with_capacity(PACK_BYTES_TARGET + (4 << 20)),
            entries: Vec::new(),
        }
    }
}

impl S3Target {
    pub fn open(location: &S3Location, options: &S3Options) -> Result<S3Target, CopyError> {
        let repo = Repository::open(location, options, true)?;
        Ok(S3Target {
            location: location.clone(),
            repo: Arc::new(repo),
            lock: None,
            excluded: HashSet::new(),
            reuse_nothing: false,
            newest: None,
            building: None,
            index_reads: IndexReads::default(),
        })
    }

    /// The lock first, then prune's marks: a prune that marks after the
    /// lock waits for this copy; one that marked before is seen. One copy
    /// of a disk to a repository at a time.
    fn prepare(&mut self, disk: &str) -> Result<(), S3Error> {
        if self.lock.is_none() {
            let lock = RepoLock::take(&self.repo, "copy", Some(disk))?;
            if let Some((key, record)) = lock
                .others(&self.repo)?
                .into_iter()
                .find(|(_, record)| record.kind == "copy" && record.disk.as_deref() == Some(disk))
            {
                return Err(S3Error::Refused {
                    url: self.repo.url.clone(),
                    reason: format!(
                        "another copy of this disk to it is running (pid {} on {:?}, {key})",
                        record.pid, record.host
                    ),
                });
            }
            self.lock = Some(lock);
            match pending_marks(&self.repo) {
                Ok(excluded) => self.excluded = excluded,
                Err(S3Error::Damaged { object, reason }) => {
                    tracing::warn!(%object, %reason, "a prune mark is damaged: this copy uploads every chunk again");
                    self.reuse_nothing = true;
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// The newest session of `disk` whose manifest opens.
    fn newest_session(&self, disk: &str) -> Result<Option<(SessionKey, Manifest)>, S3Error> {
        let mut sessions: Vec<SessionKey> = self
            .repo
            .sessions()?
            .into_iter()
            .filter(|key| key.disk == disk)
            .collect();
        while let Some(key) = sessions.pop() {
            match self.repo.manifest(&key.key()) {
                Ok(manifest) => return Ok(Some((key, manifest))),
                Err(S3Error::Damaged { object, reason }) => {
                    tracing::warn!(%object, %reason, "skipping a damaged session manifest");
                }
                Err(error) => return Err(error),
            }
        }
        Ok(None)
    }

    fn building(&self) -> &Building {
        self.building
            .as_ref()
            .expect("an s3 target is opened before it is written")
    }
}

impl Target for S3Target {
    fn describe(&self) -> String {
        self.location.url()
    }

    fn holder(&self) -> String {
        s3_holder(&self.location)
    }

    fn held(&mut self, source_id: &str) -> Result<Option<Held>, CopyError> {
        self.prepare(&disk_key(source_id))?;
        self.newest = self.newest_session(&disk_key(source_id))?;
        Ok(self.newest.as_ref().and_then(|(_, manifest)| {
            (manifest.header.source_id == source_id).then(|| manifest.header.checkpoint.clone())
        }))
    }

    fn open(
        &mut self,
        source: &SourceInfo,
        checkpoint: &Held,
        base: Option<&Held>,
    ) -> Result<(), CopyError> {
        self.prepare(&disk_key(&source.id))?;
        let parent = match base {
            None => None,
            Some(base) => match &self.newest {
                Some((key, manifest)) if manifest.header.checkpoint == *base => {
                    if manifest.header.size_bytes != source.size_bytes {
                        return Err(CopyError::TargetRefused {
                            target: self.describe(),
                            reason: format!(
                                "its sessions of this disk are of {} bytes and the disk is {} bytes: copy with --full",
                                manifest.header.size_bytes, source.size_bytes
                            ),
                        });
                    }
                    Some((key.session.clone(), manifest))
                }
                _ => {
                    return Err(CopyError::TargetRefused {
                        target: self.describe(),
                        reason: "its newest session of this disk does not hold the copy's base"
                            .into(),
                    });
                }
            },
        };
        let known = if self.reuse_nothing {
            HashMap::new()
        } else {
            let (known, reads) = self.repo.chunk_index(&self.excluded)?;
            self.index_reads = reads;
            known
        };
        let mut state = State {
            map: BTreeMap::new(),
            chunks: HashMap::new(),
            pack: Pack::new(),
            data_bytes: 0,
            new_bytes: 0,
        };
        if let Some((_, manifest)) = &parent {
            for extent in &manifest.extents {
                let chunk = manifest.chunks[extent.chunk as usize];
                state.chunks.insert(chunk.id, chunk);
                state.map.insert(
                    extent.offset_bytes,
                    Mapped {
                        length: extent.length_bytes,
                        chunk: chunk.id,
                        chunk_offset: extent.chunk_offset_bytes,
                    },
                );
            }
        }
        tracing::info!(known_chunks = known.len(), parent = ?parent.as_ref().map(|p| &p.0), "s3 session begins");
        self.building = Some(Building {
            header: SessionHeader {
                format: SESSION_FORMAT,
                session_id: new_session_id(),
                source_id: source.id.clone(),
                size_bytes: source.size_bytes,
                granularity_bytes: source.granularity_bytes,
                base: base.cloned(),
                checkpoint: checkpoint.clone(),
                parent: parent.map(|(session, _)| session),
                created_unix: crate::copy::unix_seconds(),
                data_bytes: 0,
                new_bytes: 0,
                uploaded_bytes: 0,
                files: Vec::new(),
            },
            disk: disk_key(&source.id),
            known,
            state: Mutex::new(state),
            uploads: Mutex::new(Vec::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(UPLOADS_IN_FLIGHT)),
            failure: Arc::new(Mutex::new(None)),
            uploaded_bytes: Arc::new(AtomicU64::new(0)),
            client: self.repo.client(),
            sealer: self.repo.sealer.clone(),
        });
        Ok(())
    }

    /// A piece's runs of non-zero 4 KiB blocks become its chunks, its
    /// zero blocks holes: so the chunks of equal contents are equal
    /// whether the source reported their zeroes as holes or as data.
    fn write_data(&self, offset: u64, data: &[u8]) -> Result<(), CopyError> {
        self.building().check_failure()?;
        assert!(
            data.len() <= crate::plan::PIECE_BYTES_MAX as usize,
            "pieces are at most 4 MiB"
        );
        for (start, end, zero) in zero_runs(offset, data) {
            if zero {
                self.write_zero(offset + start as u64, (end - start) as u64)?;
            } else {
                self.store_chunk(offset + start as u64, &data[start..end]);
            }
        }
        Ok(())
    }

    fn write_zero(&self, offset: u64, length: u64) -> Result<(), CopyError> {
        let building = self.building();
        let mut state = building.state.lock().expect("s3 state lock");
        let mut position = offset;
        // The map's lengths are u32: a long zero range is laid in parts.
        while position < offset + length {
            let end = (offset + length).min(position + (1 << 30));
            overlay_clear(&mut state.map, position, end);
            position = end;
        }
        Ok(())
    }

    fn wants_files(&self) -> bool {
        true
    }

    fn set_files(&mut self, files: Vec<String>) {
        if let Some(building) = self.building.as_mut() {
            building.header.files = files;
        }
    }

    fn commit(&mut self) -> Result<(), CopyError> {
        self.commit_session()
    }

    fn stored(&self) -> Option<StoredTotals> {
        let (_, manifest) = self.newest.as_ref()?;
        Some(StoredTotals {
            session: manifest.header.session_id.clone(),
            new_bytes: manifest.header.new_bytes,
            uploaded_bytes: manifest.header.uploaded_bytes,
            indexes_cached: self.index_reads.cached,
            indexes_fetched: self.index_reads.fetched,
        })
    }
}

impl S3Target {
    /// Maps `data` at `offset` as one chunk, uploading it (in a pack)
    /// unless the repository holds it.
    fn store_chunk(&self, offset: u64, data: &[u8]) {
        let building = self.building();
        let id = building.sealer.chunk_id(data);
        let mapped = Mapped {
            length: data.len() as u32,
            chunk: id,
            chunk_offset: 0,
        };
        if building.reuse(offset, mapped) {
            return;
        }
        let sealed = building.sealer.seal(&chunk_kind(&id), data);
        let full_pack = {
            let mut state = building.state.lock().expect("s3 state lock");
            state.data_bytes += data.len() as u64;
            if !state.chunks.contains_key(&id) {
                let entry = ChunkRef {
                    id,
                    pack: state.pack.id,
                    offset_bytes: state.pack.bytes.len() as u64,
                    stored_bytes: sealed.len() as u32,
                    raw_bytes: data.len() as u32,
                };
                state.pack.bytes.extend_from_slice(&sealed);
                state.pack.entries.push(entry);
                state.chunks.insert(id, entry);
                state.new_bytes += data.len() as u64;
            }
            overlay(&mut state.map, offset, Some(mapped));
            (state.pack.bytes.len() >= PACK_BYTES_TARGET)
                .then(|| std::mem::replace(&mut state.pack, Pack::new()))
        };
        if let Some(pack) = full_pack {
            building.upload(&self.repo, pack);
        }
    }

    fn commit_session(&mut self) -> Result<(), CopyError> {
        let building = self
            .building
            .take()
            .expect("an s3 target is opened before it is committed");
        let last_pack = {
            let mut state = building.state.lock().expect("s3 state lock");
            std::mem::replace(&mut state.pack, Pack::new())
        };
        if !last_pack.entries.is_empty() {
            building.upload(&self.repo, last_pack);
        }
        let uploads = std::mem::take(&mut *building.uploads.lock().expect("uploads lock"));
        for upload in uploads {
            let _ = self.repo.block_on(upload);
        }
        building.check_failure()?;
        let manifest = building.manifest();
        let key = SessionKey {
            disk: building.disk.clone(),
            session: manifest.header.session_id.clone(),
        };
        let sealed = self.repo.sealer.seal(b"manifest", &manifest.encode());
        let manifest_bytes = sealed.len() as u64;
        // The commit: until this upload, the session does not exist.
        self.repo.put(&key.key(), sealed)?;
        tracing::info!(session = %key.session, new_bytes = manifest.header.new_bytes, uploaded_bytes = manifest.header.uploaded_bytes + manifest_bytes, "s3 session committed");
        self.newest = Some((key, manifest));
        self.lock = None;
        Ok(())
    }
}

impl Building {
    fn check_failure(&self) -> Result<(), CopyError> {
        match self.failure.lock().expect("failure lock").take() {
            Some(error) => Err(error.into()),
            None => Ok(()),
        }
    }

    /// Maps `mapped` at `offset` if its chunk is stored (by this session
    /// or any before it): then nothing is uploaded.
    fn reuse(&self, offset: u64, mapped: Mapped) -> bool {
        let mut state = self.state.lock().expect("s3 state lock");
        if let std::collections::hash_map::Entry::Vacant(entry) = state.chunks.entry(mapped.chunk) {
            match self.known.get(&mapped.chunk) {
                Some(known) => {
                    entry.insert(*known);
                }
                None => return false,
            }
        }
        state.data_bytes += u64::from(mapped.length);
        overlay(&mut state.map, offset, Some(mapped));
        true
    }

    /// Uploads `pack`, then its index, on the runtime; waits first while
    /// `UPLOADS_IN_FLIGHT` packs are on their way.
    fn upload(&self, repo: &Repository, pack: Pack) {
        let permit = repo
            .block_on(self.permits.clone().acquire_owned())
            .expect("the semaphore is never closed");
        let client = self.client.clone();
        let failure = self.failure.clone();
        let uploaded = self.uploaded_bytes.clone();
        let index = self.sealer.seal(b"index", &encode_index(&pack.entries));
        // Kept before the upload: the cache serves only indexes the
        // service lists, so one whose upload fails is never used.
        repo.cache_index(&pack.id, &index);
        let handle = repo.spawn(async move {
            let _permit = permit;
            let id = pack.id.hex();
            let bytes = (pack.bytes.len() + index.len()) as u64;
            let result = async {
                client
                    .put(&format!("packs/{}/{id}", &id[..2]), pack.bytes)
                    .await?;
                // After its pack: an index never names a missing pack.
                client.put(&format!("index/{id}"), index).await
            }
            .await;
            match result {
                Ok(()) => {
                    uploaded.fetch_add(bytes, Ordering::Relaxed);
                }
                Err(error) => {
                    failure.lock().expect("failure lock").get_or_insert(error);
                }
            }
        });
        self.uploads.lock().expect("uploads lock").push(handle);
    }

    /// The session's manifest: the map, with the chunks it names.
    fn manifest(&self) -> Manifest {
        let state = self.state.lock().expect("s3 state lock");
        let mut chunks: Vec<ChunkRef> = Vec::new();
        let mut numbers: HashMap<ChunkId, u32> = HashMap::new();
        let mut extents: Vec<Extent> = Vec::with_capacity(state.map.len());
        for (&offset, mapped) in &state.map {
            let chunk = *numbers.entry(mapped.chunk).or_insert_with(|| {
                chunks.push(state.chunks[&mapped.chunk]);
                (chunks.len() - 1) as u32
            });
            if let Some(last) = extents.last_mut()
                && last.chunk == chunk
                && last.offset_bytes + u64::from(last.length_bytes) == offset
                && last.chunk_offset_bytes + last.length_bytes == mapped.chunk_offset
            {
                last.length_bytes += mapped.length;
                continue;
            }
            extents.push(Extent {
                offset_bytes: offset,
                length_bytes: mapped.length,
                chunk,
                chunk_offset_bytes: mapped.chunk_offset,
            });
        }
        let mut header = self.header.clone();
        header.data_bytes = state.data_bytes;
        header.new_bytes = state.new_bytes;
        header.uploaded_bytes = self.uploaded_bytes.load(Ordering::Relaxed);
        Manifest {
            header,
            chunks,
            extents,
        }
    }
}

/// Lays `mapped` over the map at `offset` (or, for None, nothing: the
/// range reads as zeroes).
fn overlay(map: &mut BTreeMap<u64, Mapped>, offset: u64, mapped: Option<Mapped>) {
    let length = mapped.map_or(0, |m| u64::from(m.length));
    overlay_clear(map, offset, offset + length);
    if let Some(mapped) = mapped {
        map.insert(offset, mapped);
    }
}

/// Removes `start..end` from the map, trimming the entries it cuts.
fn overlay_clear(map: &mut BTreeMap<u64, Mapped>, start: u64, end: u64) {
    let cut: Vec<(u64, Mapped)> = map
        .range(..end)
        .rev()
        .take_while(|(offset, mapped)| **offset + u64::from(mapped.length) > start)
        .map(|(offset, mapped)| (*offset, *mapped))
        .collect();
    for (offset, mapped) in cut {
        map.remove(&offset);
        let entry_end = offset + u64::from(mapped.length);
        if offset < start {
            map.insert(
                offset,
                Mapped {
                    length: (start - offset) as u32,
                    ..mapped
                },
            );
        }
        if entry_end > end {
            map.insert(
                end,
                Mapped {
                    length: (entry_end - end) as u32,
                    chunk: mapped.chunk,
                    chunk_offset: mapped.chunk_offset + (end - offset) as u32,
                },
            );
        }
    }
}

/// Blocks whose zeroes are cut out of chunks.
const ZERO_BLOCK_BYTES: u64 = 4096;

/// `data` (at disk offset `offset`) as runs `(start, end, all zero)`, cut
/// at 4 KiB boundaries of the disk.
fn zero_runs(offset: u64, data: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut start = 0usize;
    while start < data.len() {
        let to_boundary = ZERO_BLOCK_BYTES - (offset + start as u64) % ZERO_BLOCK_BYTES;
        let end = (start + to_boundary as usize).min(data.len());
        let zero = is_zero(&data[start..end]);
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 = end,
            _ => runs.push((start, end, zero)),
        }
        start = end;
    }
    runs
}

/// Whether every byte is zero.
fn is_zero(data: &[u8]) -> bool {
    data.iter().fold(0u8, |acc, &b| acc | b) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(n: u8, length: u32) -> Mapped {
        Mapped {
            length,
            chunk: ChunkId([n; 32]),
            chunk_offset: 0,
        }
    }

    fn ranges(map: &BTreeMap<u64, Mapped>) -> Vec<(u64, u32, u8, u32)> {
        map.iter()
            .map(|(o, m)| (*o, m.length, m.chunk.0[0], m.chunk_offset))
            .collect()
    }

    #[test]
    fn an_overlay_trims_what_it_covers_and_keeps_the_rest_reading_the_same_bytes() {
        let mut map = BTreeMap::new();
        overlay(&mut map, 0, Some(mapped(1, 1000)));
        overlay(&mut map, 1000, Some(mapped(2, 1000)));
        overlay(&mut map, 500, Some(mapped(3, 1000)));
        assert_eq!(
            ranges(&map),
            vec![(0, 500, 1, 0), (500, 1000, 3, 0), (1500, 500, 2, 500)]
        );
        overlay_clear(&mut map, 600, 700);
        assert_eq!(
            ranges(&map),
            vec![
                (0, 500, 1, 0),
                (500, 100, 3, 0),
                (700, 800, 3, 200),
                (1500, 500, 2, 500)
            ]
        );
        overlay_clear(&mut map, 0, 10_000);
        assert!(map.is_empty());
    }

    #[test]
    fn zero_blocks_are_cut_out_at_disk_block_boundaries() {
        let mut data = vec![0u8; 5 * 4096];
        assert_eq!(zero_runs(0, &data), vec![(0, 5 * 4096, true)]);
        data[4096] = 1;
        data[3 * 4096 + 100] = 1;
        assert_eq!(
            zero_runs(0, &data),
            vec![
                (0, 4096, true),
                (4096, 2 * 4096, false),
                (2 * 4096, 3 * 4096, true),
                (3 * 4096, 4 * 4096, false),
                (4 * 4096, 5 * 4096, true)
            ]
        );
        // At an offset that is not block-aligned, the first block is short.
        assert_eq!(zero_runs(4000, &data[..200]), vec![(0, 200, true)]);
        let mut tail = vec![0u8; 200];
        tail[150] = 7;
        assert_eq!(
            zero_runs(4000, &tail),
            vec![(0, 96, true), (96, 200, false)]
        );
    }
}
