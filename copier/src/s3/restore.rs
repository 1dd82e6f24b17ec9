//! Reading sessions back: `restore s3://...[#SESSION] --to IMAGE|nbd://`
//! (one manifest holds the disk's whole map, so one session is enough),
//! `verify s3://...` (every chunk read back, opened and hashed, or a
//! sample of them), and the list of sessions. Chunks are fetched with
//! `IN_FLIGHT` ranged GETs at once; each is checked against its id before
//! a byte of it is written.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use futures::StreamExt;
use serde::Serialize;

use super::S3Error;
use super::format::{ChunkRef, Manifest};
use super::lock::RepoLock;
use super::repo::{Client, IN_FLIGHT, Repository, S3Location, SessionKey};
use super::seal::{ChunkId, Sealer};
use super::target::chunk_kind;
use crate::tape::{RestoreTarget, Sink};

/// A session as `blockwatch sessions` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionRow {
    pub session: String,
    pub disk: String,
    pub source_id: String,
    pub kind: String,
    pub base_checkpoint: Option<String>,
    pub checkpoint: String,
    pub created_unix: u64,
    pub size_bytes: u64,
    /// Bytes of the disk the session's map holds data for.
    pub mapped_bytes: u64,
    pub data_bytes: u64,
    pub new_bytes: u64,
    pub uploaded_bytes: u64,
    pub files: usize,
}

impl SessionRow {
    fn of(key: &SessionKey, manifest: &Manifest) -> SessionRow {
        let header = &manifest.header;
        SessionRow {
            session: key.session.clone(),
            disk: key.disk.clone(),
            source_id: header.source_id.clone(),
            kind: if header.base.is_some() {
                "incremental"
            } else {
                "full"
            }
            .into(),
            base_checkpoint: header.base.as_ref().map(|b| b.checkpoint.clone()),
            checkpoint: header.checkpoint.checkpoint.clone(),
            created_unix: header.created_unix,
            size_bytes: header.size_bytes,
            mapped_bytes: manifest.mapped_bytes(),
            data_bytes: header.data_bytes,
            new_bytes: header.new_bytes,
            uploaded_bytes: header.uploaded_bytes,
            files: header.files.len(),
        }
    }
}

/// Every session of the repository, oldest first per disk.
pub fn list_sessions(repo: &Repository) -> Result<Vec<SessionRow>, S3Error> {
    let mut rows = Vec::new();
    for key in repo.sessions()? {
        let manifest = repo.manifest(&key.key())?;
        rows.push(SessionRow::of(&key, &manifest));
    }
    Ok(rows)
}

/// The session `location` names (`#SESSION`, or a unique prefix of one),
/// or the newest one when the repository holds sessions of one disk.
pub(crate) fn chosen_session(
    repo: &Repository,
    location: &S3Location,
) -> Result<SessionKey, S3Error> {
    let sessions = repo.sessions()?;
    let refuse = |reason: String| S3Error::Refused {
        url: repo.url.clone(),
        reason,
    };
    match &location.session {
        Some(wanted) => {
            let matching: Vec<&SessionKey> = sessions
                .iter()
                .filter(|key| key.session.starts_with(wanted.as_str()))
                .collect();
            match matching.as_slice() {
                [one] => Ok((*one).clone()),
                [] => Err(refuse(format!("it holds no session {wanted:?}"))),
                _ => Err(refuse(format!(
                    "{} sessions start with {wanted:?}: give more of the id",
                    matching.len()
                ))),
            }
        }
        None => {
            let disks: std::collections::BTreeSet<&str> =
                sessions.iter().map(|key| key.disk.as_str()).collect();
            match disks.len() {
                0 => Err(refuse("it holds no sessions".into())),
                1 => Ok(sessions.last().expect("one disk, some sessions").clone()),
                n => Err(refuse(format!(
                    "it holds sessions of {n} disks: name one as s3://BUCKET/PREFIX#SESSION (blockwatch sessions lists them)"
                ))),
            }
        }
    }
}

/// Chunks a restore fetches with one GET at most: neighbours in a pack.
pub(crate) const GROUP_BYTES_MAX: u64 = 8 << 20;

fn pack_key(chunk: &ChunkRef) -> String {
    let hex = chunk.pack.hex();
    format!("packs/{}/{hex}", &hex[..2])
}

/// Bytes `range` of the pack `chunk` is in; a missing pack is damage.
async fn fetch_range(
    client: &Client,
    chunk: &ChunkRef,
    range: std::ops::Range<u64>,
) -> Result<Vec<u8>, S3Error> {
    let key = pack_key(chunk);
    client
        .get_range(&key, range)
        .await
        .map_err(|error| match error {
            S3Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            } => S3Error::Damaged {
                object: format!("{}/{key}", client.url),
                reason: format!("it is missing (chunk {})", chunk.id.hex()),
            },
            other => other,
        })
}

/// Opens a chunk's sealed bytes and checks them against its id.
fn open_chunk(
    client: &Client,
    sealer: &Sealer,
    chunk: &ChunkRef,
    sealed: &[u8],
) -> Result<Vec<u8>, S3Error> {
    let damaged = |reason: String| S3Error::Damaged {
        object: format!("{}/{}", client.url, pack_key(chunk)),
        reason: format!(
            "chunk {} at byte {}: {reason}",
            chunk.id.hex(),
            chunk.offset_bytes
        ),
    };
    let plain = sealer
        .open(&chunk_kind(&chunk.id), sealed, chunk.raw_bytes as usize)
        .map_err(|error| damaged(error.to_string()))?;
    if plain.len() != chunk.raw_bytes as usize || sealer.chunk_id(&plain) != chunk.id {
        return Err(damaged("its contents do not hash to its id".into()));
    }
    Ok(plain)
}

/// Fetches, opens and checks one chunk.
pub(crate) async fn fetch_chunk(
    client: &Client,
    sealer: &Sealer,
    chunk: &ChunkRef,
) -> Result<Vec<u8>, S3Error> {
    let range = chunk.offset_bytes..chunk.offset_bytes + u64::from(chunk.stored_bytes);
    let sealed = fetch_range(client, chunk, range).await?;
    open_chunk(client, sealer, chunk, &sealed)
}

/// `chunks`, in order, cut into runs that lie back to back in one pack
/// (a pack's chunks are mostly read in the order they were written).
fn fetch_groups(chunks: Vec<ChunkRef>) -> Vec<Vec<ChunkRef>> {
    let mut groups: Vec<Vec<ChunkRef>> = Vec::new();
    for chunk in chunks {
        if let Some(group) = groups.last_mut() {
            let first = group[0];
            let last = group[group.len() - 1];
            let end = last.offset_bytes + u64::from(last.stored_bytes);
            if last.pack == chunk.pack
                && end == chunk.offset_bytes
                && end + u64::from(chunk.stored_bytes) - first.offset_bytes <= GROUP_BYTES_MAX
            {
                group.push(chunk);
                continue;
            }
        }
        groups.push(vec![chunk]);
    }
    groups
}

/// Fetches a group with one ranged GET and opens each of its chunks.
pub(crate) async fn fetch_group(
    client: &Client,
    sealer: &Sealer,
    group: &[ChunkRef],
) -> Result<Vec<Vec<u8>>, S3Error> {
    let first = group[0];
    let last = group[group.len() - 1];
    let start = first.offset_bytes;
    let sealed = fetch_range(
        client,
        &first,
        start..last.offset_bytes + u64::from(last.stored_bytes),
    )
    .await?;
    group
        .iter()
        .map(|chunk| {
            let at = (chunk.offset_bytes - start) as usize;
            open_chunk(
                client,
                sealer,
                chunk,
                &sealed[at..at + chunk.stored_bytes as usize],
            )
        })
        .collect()
}

/// What a restore wrote.
#[derive(Debug, Clone, Serialize)]
pub struct S3RestoreSummary {
    pub session: String,
    pub checkpoint: String,
    pub size_bytes: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub chunks: usize,
    pub seconds: f64,
    pub mib_per_second: f64,
}

/// Restores one session onto `target`. Nothing is written before the
/// manifest opened and checked; a damaged chunk stops the restore with
/// the target partly written (and says so).
pub fn restore(
    repo: &Repository,
    location: &S3Location,
    target: &RestoreTarget,
) -> Result<S3RestoreSummary, S3Error> {
    let started = Instant::now();
    let _lock = RepoLock::take(repo, "restore", None)?;
    let key = chosen_session(repo, location)?;
    let manifest = repo.manifest(&key.key())?;
    let size_bytes = manifest.header.size_bytes;
    let mut sink = Sink::open(target, size_bytes).map_err(S3Error::Restore)?;
    // Each chunk once, in the order the disk first needs it.
    let mut uses: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    let mut order: Vec<u32> = Vec::new();
    for (index, extent) in manifest.extents.iter().enumerate() {
        let entry = uses.entry(extent.chunk).or_default();
        if entry.is_empty() {
            order.push(extent.chunk);
        }
        entry.push(index);
    }
    let (sender, mut receiver) = tokio::sync::mpsc::channel(IN_FLIGHT);
    let client = repo.client();
    let sealer = repo.sealer.clone();
    let chunks: Vec<ChunkRef> = order.iter().map(|&n| manifest.chunks[n as usize]).collect();
    let fetcher = repo.spawn(async move {
        let mut fetched = futures::stream::iter(fetch_groups(chunks).into_iter().map(|group| {
            let client = client.clone();
            let sealer = sealer.clone();
            async move { fetch_group(&client, &sealer, &group).await }
        }))
        .buffered(IN_FLIGHT);
        while let Some(result) = fetched.next().await {
            let plains = match result {
                Ok(plains) => plains.into_iter().map(Ok).collect(),
                Err(error) => vec![Err(error)],
            };
            for plain in plains {
                if sender.send(plain).await.is_err() {
                    return;
                }
            }
        }
    });
    let mut data_bytes = 0u64;
    let partly = |error: S3Error| S3Error::PartlyRestored {
        target: target.describe(),
        source: Box::new(error),
    };
    for &number in &order {
        let plain = match receiver.blocking_recv() {
            Some(Ok(plain)) => plain,
            Some(Err(error)) => return Err(partly(error)),
            None => {
                return Err(partly(
                    repo.damaged(&key.key(), "the fetches stopped early"),
                ));
            }
        };
        for &index in &uses[&number] {
            let extent = manifest.extents[index];
            let start = extent.chunk_offset_bytes as usize;
            let slice = &plain[start..start + extent.length_bytes as usize];
            sink.write(extent.offset_bytes, slice)
                .map_err(|error| partly(S3Error::Restore(error)))?;
            data_bytes += u64::from(extent.length_bytes);
        }
    }
    let _ = repo.block_on(fetcher);
    let mut zero_bytes = 0u64;
    let mut position = 0u64;
    for extent in manifest
        .extents
        .iter()
        .map(|e| (e.offset_bytes, u64::from(e.length_bytes)))
        .chain([(size_bytes, 0)])
    {
        if extent.0 > position {
            sink.zero(position, extent.0 - position)
                .map_err(|error| partly(S3Error::Restore(error)))?;
            zero_bytes += extent.0 - position;
        }
        position = extent.0 + extent.1;
    }
    sink.finish()
        .map_err(|error| partly(S3Error::Restore(error)))?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(S3RestoreSummary {
        session: key.session,
        checkpoint: manifest.header.checkpoint.checkpoint,
        size_bytes,
        data_bytes,
        zero_bytes,
        chunks: order.len(),
        seconds,
        mib_per_second: data_bytes as f64 / f64::from(1 << 20) / seconds,
    })
}

/// What a verify found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct S3VerifyReport {
    pub sessions: usize,
    pub chunks_total: usize,
    pub chunks_checked: usize,
    pub bytes_read: u64,
    /// Damaged objects (manifests, chunks), with what is wrong and which
    /// sessions need them.
    pub damaged: Vec<Damage>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Damage {
    pub object: String,
    pub reason: String,
    pub sessions: Vec<String>,
}

/// Reads back the chunks of every session (or the one `location`
/// names): all of them, or about `sample_percent` of them picked at
/// random each run.
pub fn verify(
    repo: &Repository,
    location: &S3Location,
    sample_percent: f64,
) -> Result<S3VerifyReport, S3Error> {
    let started = Instant::now();
    let _lock = RepoLock::take(repo, "verify", None)?;
    let keys = match &location.session {
        Some(_) => vec![chosen_session(repo, location)?],
        None => repo.sessions()?,
    };
    let mut report = S3VerifyReport {
        sessions: keys.len(),
        ..Default::default()
    };
    let mut needed: HashMap<(ChunkId, super::format::PackId), (ChunkRef, Vec<String>)> =
        HashMap::new();
    for key in &keys {
        match repo.manifest(&key.key()) {
            Ok(manifest) => {
                for chunk in &manifest.chunks {
                    needed
                        .entry((chunk.id, chunk.pack))
                        .or_insert_with(|| (*chunk, Vec::new()))
                        .1
                        .push(key.session.clone());
                }
            }
            Err(S3Error::Damaged { object, reason }) => report.damaged.push(Damage {
                object,
                reason,
                sessions: vec![key.session.clone()],
            }),
            Err(error) => return Err(error),
        }
    }
    report.chunks_total = needed.len();
    let sample_key: [u8; 32] = super::seal::random_bytes();
    let threshold = (sample_percent.clamp(0.0, 100.0) / 100.0 * u64::MAX as f64) as u64;
    let mut picked: Vec<(ChunkRef, Vec<String>)> = needed
        .into_values()
        .filter(|(chunk, _)| {
            sample_percent >= 100.0 || {
                let hash = blake3::keyed_hash(&sample_key, &chunk.id.0);
                u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8")) < threshold
            }
        })
        .collect();
    picked.sort_by_key(|(chunk, _)| (chunk.pack, chunk.offset_bytes));
    report.chunks_checked = picked.len();
    report.bytes_read = picked.iter().map(|(c, _)| u64::from(c.stored_bytes)).sum();
    let client = repo.client();
    let sealer = repo.sealer.clone();
    // Each chunk's bytes are dropped once checked: only the outcome stays.
    let results: Vec<(Vec<String>, Result<(), S3Error>)> = repo.block_on(
        futures::stream::iter(picked.into_iter().map(|(chunk, sessions)| {
            let client = client.clone();
            let sealer = sealer.clone();
            async move {
                let checked = fetch_chunk(&client, &sealer, &chunk).await.map(drop);
                (sessions, checked)
            }
        }))
        .buffer_unordered(IN_FLIGHT)
        .collect(),
    );
    for (sessions, result) in results {
        match result {
            Ok(()) => {}
            Err(S3Error::Damaged { object, reason }) => report.damaged.push(Damage {
                object,
                reason,
                sessions,
            }),
            Err(error) => return Err(error),
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
