//! The objects of a repository, as bytes (docs/s3.md has them byte by
//! byte): the config (JSON, the one object not sealed: it says how to open
//! the others), pack indexes and session manifests (binary, little-endian,
//! sealed). Every count read is checked against the bytes that remain
//! before anything is allocated, and every extent against its chunk and
//! the disk.

use serde::{Deserialize, Serialize};

use super::seal::ChunkId;
use crate::target::Held;

pub const CONFIG_FORMAT: u32 = 1;
pub const SESSION_FORMAT: u32 = 1;
const INDEX_MAGIC: [u8; 4] = *b"BWI1";
const MANIFEST_MAGIC: [u8; 4] = *b"BWM1";
/// A manifest's header (JSON, with the list of changed files) at most.
pub const MANIFEST_HEADER_BYTES_MAX: usize = 64 << 20;
/// A whole manifest, opened: a 15 TiB disk in 4 MiB chunks takes ~340 MiB.
pub const MANIFEST_BYTES_MAX: usize = 1 << 30;
/// A pack index, opened.
pub const INDEX_BYTES_MAX: usize = 16 << 20;
const CHUNK_REF_BYTES: usize = 32 + 16 + 8 + 4 + 4;
const EXTENT_BYTES: usize = 8 + 4 + 4 + 4;
const INDEX_ENTRY_BYTES: usize = 32 + 8 + 4 + 4;

/// A pack's name: 16 random bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    pub fn new() -> PackId {
        PackId(super::seal::random_bytes())
    }

    pub fn hex(&self) -> String {
        crate::copy::hex_id(&self.0)
    }

    pub fn parse(hex: &str) -> Option<PackId> {
        parse_hex::<16>(hex).map(PackId)
    }
}

/// Bytes from hex digits (either case); None for anything else.
pub fn parse_hex_bytes(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 || !hex.is_ascii() {
        return None;
    }
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).ok())
        .collect()
}

/// Exactly `N` bytes from hex digits.
pub fn parse_hex<const N: usize>(hex: &str) -> Option<[u8; N]> {
    parse_hex_bytes(hex)?.try_into().ok()
}

/// `PREFIX/config`: how the repository's objects are made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    pub format: u32,
    pub repository_id: String,
    pub created_unix: u64,
    /// None: objects are sealed with a digest only.
    pub encryption: Option<Encryption>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// `aes-256-gcm`.
    pub aead: String,
    /// The repository's 64 bytes of key material (data key, id key),
    /// sealed under the user's key file (hex).
    pub wrapped_keys: String,
}

/// Where a chunk's sealed bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub pack: PackId,
    pub offset_bytes: u64,
    pub stored_bytes: u32,
    /// Its plain length.
    pub raw_bytes: u32,
}

/// A range of the disk read from a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset_bytes: u64,
    pub length_bytes: u32,
    /// Index into the manifest's chunk table.
    pub chunk: u32,
    pub chunk_offset_bytes: u32,
}

/// What a session is, in its manifest's header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionHeader {
    pub format: u32,
    pub session_id: String,
    pub source_id: String,
    pub size_bytes: u64,
    pub granularity_bytes: u64,
    /// The checkpoint the session's copy was taken on top of (None: full).
    pub base: Option<Held>,
    pub checkpoint: Held,
    /// The session whose map this one's started from.
    pub parent: Option<String>,
    pub created_unix: u64,
    /// Bytes of data the copy read from the disk.
    pub data_bytes: u64,
    /// Bytes of those the repository did not hold yet (before zstd).
    pub new_bytes: u64,
    /// Bytes uploaded (sealed packs and indexes).
    pub uploaded_bytes: u64,
    /// The files the copy changed (`STATUS<TAB>PATH`), when a file map
    /// exists.
    pub files: Vec<String>,
}

/// A session: its header and the disk's whole map at its checkpoint
/// (ranges in no extent read as zeroes). A manifest needs no other
/// session to be restored: an incremental's map is its parent's with the
/// changes laid over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub header: SessionHeader,
    pub chunks: Vec<ChunkRef>,
    /// Sorted by offset, not overlapping.
    pub extents: Vec<Extent>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct FormatError(pub String);

fn bad(text: impl Into<String>) -> FormatError {
    FormatError(text.into())
}

struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, length: usize) -> Result<&'a [u8], FormatError> {
        if self.bytes.len() < length {
            return Err(bad("it ends early"));
        }
        let (head, rest) = self.bytes.split_at(length);
        self.bytes = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        Ok(self.take(N)?.try_into().expect("N"))
    }

    /// A count of `each`-byte records, checked against what remains.
    fn count(&mut self, each: usize, what: &str) -> Result<usize, FormatError> {
        let count = self.u32()? as usize;
        if count.saturating_mul(each) > self.bytes.len() {
            return Err(bad(format!(
                "it claims {count} {what}, more than its bytes hold"
            )));
        }
        Ok(count)
    }
}

fn put_chunk_ref(out: &mut Vec<u8>, chunk: &ChunkRef) {
    out.extend_from_slice(&chunk.id.0);
    out.extend_from_slice(&chunk.pack.0);
    out.extend_from_slice(&chunk.offset_bytes.to_le_bytes());
    out.extend_from_slice(&chunk.stored_bytes.to_le_bytes());
    out.extend_from_slice(&chunk.raw_bytes.to_le_bytes());
}

fn chunk_ref(cursor: &mut Cursor<'_>) -> Result<ChunkRef, FormatError> {
    Ok(ChunkRef {
        id: ChunkId(cursor.array()?),
        pack: PackId(cursor.array()?),
        offset_bytes: cursor.u64()?,
        stored_bytes: cursor.u32()?,
        raw_bytes: cursor.u32()?,
    })
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&self.header).expect("a header serializes");
        let mut out = Vec::with_capacity(
            16 + header.len()
                + self.chunks.len() * CHUNK_REF_BYTES
                + self.extents.len() * EXTENT_BYTES,
        );
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for chunk in &self.chunks {
            put_chunk_ref(&mut out, chunk);
        }
        out.extend_from_slice(&(self.extents.len() as u32).to_le_bytes());
        for extent in &self.extents {
            out.extend_from_slice(&extent.offset_bytes.to_le_bytes());
            out.extend_from_slice(&extent.length_bytes.to_le_bytes());
            out.extend_from_slice(&extent.chunk.to_le_bytes());
            out.extend_from_slice(&extent.chunk_offset_bytes.to_le_bytes());
        }
        let decoded = Manifest::decode(&out).expect("a manifest decodes as it was encoded");
        assert!(decoded == *self, "a manifest reads back as it was made");
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Manifest, FormatError> {
        let mut cursor = Cursor { bytes };
        if cursor.take(4)? != MANIFEST_MAGIC {
            return Err(bad("it is not a session manifest"));
        }
        let header_bytes = cursor.u32()? as usize;
        if header_bytes > MANIFEST_HEADER_BYTES_MAX {
            return Err(bad(format!("its header claims {header_bytes} bytes")));
        }
        let header: SessionHeader = serde_json::from_slice(cursor.take(header_bytes)?)
            .map_err(|error| bad(format!("its header: {error}")))?;
        if header.format != SESSION_FORMAT {
            return Err(bad(format!(
                "it is of format {}, this blockwatch reads {SESSION_FORMAT}",
                header.format
            )));
        }
        let chunk_count = cursor.count(CHUNK_REF_BYTES, "chunks")?;
        let mut chunks = Vec::with_capacity(chunk_count);
        for _ in 0..chunk_count {
            chunks.push(chunk_ref(&mut cursor)?);
        }
        let extent_count = cursor.count(EXTENT_BYTES, "extents")?;
        let mut extents = Vec::with_capacity(extent_count);
        for _ in 0..extent_count {
            extents.push(Extent {
                offset_bytes: cursor.u64()?,
                length_bytes: cursor.u32()?,
                chunk: cursor.u32()?,
                chunk_offset_bytes: cursor.u32()?,
            });
        }
        if !cursor.bytes.is_empty() {
            return Err(bad("it has bytes after its extents"));
        }
        let manifest = Manifest {
            header,
            chunks,
            extents,
        };
        manifest.check()?;
        Ok(manifest)
    }

    /// Every extent lies in the disk, in order, inside its chunk.
    fn check(&self) -> Result<(), FormatError> {
        let mut end = 0u64;
        for extent in &self.extents {
            let chunk = self
                .chunks
                .get(extent.chunk as usize)
                .ok_or_else(|| bad(format!("an extent names chunk {}", extent.chunk)))?;
            let extent_end = extent
                .offset_bytes
                .checked_add(u64::from(extent.length_bytes));
            let inside = u64::from(extent.chunk_offset_bytes) + u64::from(extent.length_bytes)
                <= u64::from(chunk.raw_bytes);
            match extent_end {
                Some(extent_end)
                    if extent.offset_bytes >= end
                        && extent.length_bytes > 0
                        && extent_end <= self.header.size_bytes
                        && inside =>
                {
                    end = extent_end;
                }
                _ => {
                    return Err(bad(format!(
                        "its extent at byte {} is out of order, outside the disk or its chunk",
                        extent.offset_bytes
                    )));
                }
            }
        }
        Ok(())
    }

    /// Bytes of the disk the map holds data for.
    pub fn mapped_bytes(&self) -> u64 {
        self.extents.iter().map(|e| u64::from(e.length_bytes)).sum()
    }
}

/// `index/PACK`: where each chunk of a pack is.
pub fn encode_index(entries: &[ChunkRef]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + entries.len() * INDEX_ENTRY_BYTES);
    out.extend_from_slice(&INDEX_MAGIC);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for entry in entries {
        out.extend_from_slice(&entry.id.0);
        out.extend_from_slice(&entry.offset_bytes.to_le_bytes());
        out.extend_from_slice(&entry.stored_bytes.to_le_bytes());
        out.extend_from_slice(&entry.raw_bytes.to_le_bytes());
    }
    out
}

pub fn decode_index(pack: PackId, bytes: &[u8]) -> Result<Vec<ChunkRef>, FormatError> {
    let mut cursor = Cursor { bytes };
    if cursor.take(4)? != INDEX_MAGIC {
        return Err(bad("it is not a pack index"));
    }
    let count = cursor.count(INDEX_ENTRY_BYTES, "chunks")?;
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        entries.push(ChunkRef {
            id: ChunkId(cursor.array()?),
            pack,
            offset_bytes: cursor.u64()?,
            stored_bytes: cursor.u32()?,
            raw_bytes: cursor.u32()?,
        });
    }
    if !cursor.bytes.is_empty() {
        return Err(bad("it has bytes after its entries"));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        let chunk = |n: u8| ChunkRef {
            id: ChunkId([n; 32]),
            pack: PackId([n; 16]),
            offset_bytes: u64::from(n) * 1000,
            stored_bytes: 900,
            raw_bytes: 65536,
        };
        Manifest {
            header: SessionHeader {
                format: SESSION_FORMAT,
                session_id: "20261202T120000Z-0011aabb".into(),
                source_id: "ab".repeat(16),
                size_bytes: 1 << 30,
                granularity_bytes: 65536,
                base: None,
                checkpoint: Held {
                    checkpoint: "copy-1".into(),
                    generation: 2,
                },
                parent: None,
                created_unix: 1_700_000_000,
                data_bytes: 131072,
                new_bytes: 131072,
                uploaded_bytes: 2000,
                files: vec!["M\t/etc/passwd".into()],
            },
            chunks: vec![chunk(1), chunk(2)],
            extents: vec![
                Extent {
                    offset_bytes: 0,
                    length_bytes: 65536,
                    chunk: 0,
                    chunk_offset_bytes: 0,
                },
                Extent {
                    offset_bytes: 1 << 20,
                    length_bytes: 4096,
                    chunk: 1,
                    chunk_offset_bytes: 61440,
                },
            ],
        }
    }

    #[test]
    fn a_manifest_reads_back_as_written_and_every_truncation_is_refused() {
        let manifest = manifest();
        let bytes = manifest.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), manifest);
        for length in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..length]).is_err(), "{length}");
        }
    }

    #[test]
    fn extents_outside_their_chunk_the_disk_or_order_are_refused() {
        let cases: [fn(&mut Manifest); 5] = [
            |m| m.extents[1].chunk = 2,
            |m| m.extents[1].chunk_offset_bytes = 61441,
            |m| m.extents[1].offset_bytes = (1 << 30) - 100,
            |m| m.extents[1].offset_bytes = 100,
            |m| m.extents[0].length_bytes = 0,
        ];
        for (index, damage) in cases.iter().enumerate() {
            let mut manifest = manifest();
            damage(&mut manifest);
            let mut bytes = MANIFEST_MAGIC.to_vec();
            let header = serde_json::to_vec(&manifest.header).unwrap();
            bytes.extend((header.len() as u32).to_le_bytes());
            bytes.extend(header);
            bytes.extend((manifest.chunks.len() as u32).to_le_bytes());
            for chunk in &manifest.chunks {
                put_chunk_ref(&mut bytes, chunk);
            }
            bytes.extend((manifest.extents.len() as u32).to_le_bytes());
            for e in &manifest.extents {
                bytes.extend(e.offset_bytes.to_le_bytes());
                bytes.extend(e.length_bytes.to_le_bytes());
                bytes.extend(e.chunk.to_le_bytes());
                bytes.extend(e.chunk_offset_bytes.to_le_bytes());
            }
            assert!(Manifest::decode(&bytes).is_err(), "case {index}");
        }
    }

    #[test]
    fn a_count_larger_than_the_bytes_is_refused_before_allocating() {
        let mut bytes = INDEX_MAGIC.to_vec();
        bytes.extend(u32::MAX.to_le_bytes());
        let error = decode_index(PackId([0; 16]), &bytes).unwrap_err();
        assert!(error.0.contains("more than its bytes hold"), "{error}");
        let entries = manifest().chunks;
        let pack = entries[0].pack;
        let entries: Vec<ChunkRef> = entries
            .into_iter()
            .map(|c| ChunkRef { pack, ..c })
            .collect();
        assert_eq!(
            decode_index(pack, &encode_index(&entries)).unwrap(),
            entries
        );
    }
}
