//! What every object of a repository is sealed with before it leaves the
//! machine: zstd (when it makes the object smaller), then either
//! AES-256-GCM under the repository's data key (the storage provider sees
//! no data, and a changed byte fails the tag) or, in a repository without
//! encryption, a blake3 digest (a changed byte is still detected).
//!
//! A sealed object (docs/s3.md):
//!
//! ```text
//! "BWS1" | flags u8 (1: encrypted, 2: zstd) | body
//! encrypted:   nonce[12] | AES-256-GCM(payload, aad = kind | flags) incl. tag[16]
//! unencrypted: payload | blake3(kind | flags | payload)[32]
//! ```
//!
//! `kind` names what the object is (a chunk of a given id, a pack index,
//! a manifest), so a sealed object moved to another name does not open.
//! Chunk ids are blake3 of the plain data, keyed with the repository's id
//! key when it is encrypted (so equal data in two repositories, or a
//! guess at a chunk's contents, cannot be confirmed from its name).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};

pub const SEAL_MAGIC: [u8; 4] = *b"BWS1";
const FLAG_ENCRYPTED: u8 = 1;
const FLAG_ZSTD: u8 = 2;
const HEADER_BYTES: usize = 5;
pub const NONCE_BYTES: usize = 12;
const TAG_BYTES: usize = 16;
const DIGEST_BYTES: usize = 32;
/// zstd's level for everything sealed: fast, and most of the gain.
const ZSTD_LEVEL: i32 = 1;
/// A key file holds 32 bytes, or 64 hex digits: never more than this.
const KEY_FILE_BYTES_MAX: u64 = 4096;

/// A chunk's name: blake3 of its plain bytes (keyed in an encrypted
/// repository).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn hex(&self) -> String {
        crate::copy::hex_id(&self.0)
    }
}

impl std::fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkId({})", &self.hex()[..16])
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("it is not a blockwatch object (no BWS1 header)")]
    NotSealed,
    #[error("it is encrypted and no key was given (--encrypt KEYFILE)")]
    NeedsKey,
    #[error("it is not encrypted but the repository is: someone else wrote it")]
    NotEncrypted,
    #[error("its checksum does not match: the object is damaged")]
    Damaged,
    #[error("it holds more than {limit_bytes} bytes once decompressed")]
    TooLarge { limit_bytes: usize },
}

/// The keys of an encrypted repository: one for data, one for chunk ids.
pub struct Keys {
    cipher: Aes256Gcm,
    id_key: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    /// From 64 bytes of key material: the data key, then the id key.
    pub fn from_material(material: &[u8; 64]) -> Keys {
        let (data, id) = material.split_at(32);
        Keys {
            cipher: Aes256Gcm::new_from_slice(data).expect("32-byte key"),
            id_key: id.try_into().expect("32-byte key"),
        }
    }
}

/// Seals and opens a repository's objects.
#[derive(Debug)]
pub struct Sealer {
    keys: Option<Keys>,
}

impl Sealer {
    pub fn new(keys: Option<Keys>) -> Sealer {
        Sealer { keys }
    }

    pub fn encrypted(&self) -> bool {
        self.keys.is_some()
    }

    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        ChunkId(match &self.keys {
            Some(keys) => *blake3::keyed_hash(&keys.id_key, data).as_bytes(),
            None => *blake3::hash(data).as_bytes(),
        })
    }

    /// Seals `plain` as an object of `kind`.
    pub fn seal(&self, kind: &[u8], plain: &[u8]) -> Vec<u8> {
        let compressed = zstd::bulk::compress(plain, ZSTD_LEVEL).ok();
        let (mut flags, payload) = match &compressed {
            Some(small) if small.len() < plain.len() => (FLAG_ZSTD, small.as_slice()),
            _ => (0, plain),
        };
        let mut sealed = Vec::with_capacity(payload.len() + HEADER_BYTES + 48);
        sealed.extend_from_slice(&SEAL_MAGIC);
        match &self.keys {
            Some(keys) => {
                flags |= FLAG_ENCRYPTED;
                sealed.push(flags);
                let nonce = random_bytes::<NONCE_BYTES>();
                let aad = [kind, &[flags]].concat();
                let ciphertext = keys
                    .cipher
                    .encrypt(
                        Nonce::from_slice(&nonce),
                        Payload {
                            msg: payload,
                            aad: &aad,
                        },
                    )
                    .expect("AES-GCM encrypts any length a chunk has");
                sealed.extend_from_slice(&nonce);
                sealed.extend_from_slice(&ciphertext);
            }
            None => {
                sealed.push(flags);
                sealed.extend_from_slice(payload);
                sealed.extend_from_slice(&digest(kind, flags, payload));
            }
        }
        sealed
    }

    /// Opens an object sealed as `kind`, refusing one that would be more
    /// than `plain_max_bytes` once decompressed.
    pub fn open(
        &self,
        kind: &[u8],
        sealed: &[u8],
        plain_max_bytes: usize,
    ) -> Result<Vec<u8>, SealError> {
        if sealed.len() < HEADER_BYTES || sealed[..4] != SEAL_MAGIC {
            return Err(SealError::NotSealed);
        }
        let flags = sealed[4];
        if flags & !(FLAG_ENCRYPTED | FLAG_ZSTD) != 0 {
            return Err(SealError::Damaged);
        }
        let body = &sealed[HEADER_BYTES..];
        let opened;
        let payload: &[u8] = match (&self.keys, flags & FLAG_ENCRYPTED != 0) {
            (None, true) => return Err(SealError::NeedsKey),
            (Some(_), false) => return Err(SealError::NotEncrypted),
            (Some(keys), true) => {
                if body.len() < NONCE_BYTES + TAG_BYTES {
                    return Err(SealError::Damaged);
                }
                let (nonce, ciphertext) = body.split_at(NONCE_BYTES);
                let aad = [kind, &[flags]].concat();
                opened = keys
                    .cipher
                    .decrypt(
                        Nonce::from_slice(nonce),
                        Payload {
                            msg: ciphertext,
                            aad: &aad,
                        },
                    )
                    .map_err(|_| SealError::Damaged)?;
                &opened
            }
            (None, false) => {
                if body.len() < DIGEST_BYTES {
                    return Err(SealError::Damaged);
                }
                let (payload, stored) = body.split_at(body.len() - DIGEST_BYTES);
                if digest(kind, flags, payload) != stored {
                    return Err(SealError::Damaged);
                }
                payload
            }
        };
        if flags & FLAG_ZSTD == 0 {
            if payload.len() > plain_max_bytes {
                return Err(SealError::TooLarge {
                    limit_bytes: plain_max_bytes,
                });
            }
            return Ok(payload.to_vec());
        }
        // The frame's declared size is checked before the buffer is made.
        match zstd::zstd_safe::get_frame_content_size(payload) {
            Ok(Some(size)) if size <= plain_max_bytes as u64 => {}
            Ok(Some(_)) => {
                return Err(SealError::TooLarge {
                    limit_bytes: plain_max_bytes,
                });
            }
            _ => return Err(SealError::Damaged),
        }
        zstd::bulk::decompress(payload, plain_max_bytes).map_err(|_| SealError::Damaged)
    }

    /// Wraps key material under a user's key (the repository's config
    /// keeps it so; the user's key never leaves their machine).
    pub fn wrap(user_key: &[u8; 32], material: &[u8; 64]) -> Vec<u8> {
        let cipher = Aes256Gcm::new_from_slice(user_key).expect("32-byte key");
        let nonce = random_bytes::<NONCE_BYTES>();
        let mut wrapped = nonce.to_vec();
        wrapped.extend(
            cipher
                .encrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: material,
                        aad: WRAP_AAD,
                    },
                )
                .expect("AES-GCM encrypts 64 bytes"),
        );
        wrapped
    }

    /// The key material `wrap` sealed; None for a wrong key (or a damaged
    /// config: the two cannot be told apart, by design of the AEAD).
    pub fn unwrap(user_key: &[u8; 32], wrapped: &[u8]) -> Option<[u8; 64]> {
        if wrapped.len() != NONCE_BYTES + 64 + TAG_BYTES {
            return None;
        }
        let cipher = Aes256Gcm::new_from_slice(user_key).expect("32-byte key");
        let (nonce, ciphertext) = wrapped.split_at(NONCE_BYTES);
        let material = cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: WRAP_AAD,
                },
            )
            .ok()?;
        material.try_into().ok()
    }
}

const WRAP_AAD: &[u8] = b"blockwatch repository keys";

fn digest(kind: &[u8], flags: u8, payload: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(kind);
    hasher.update(&[flags]);
    hasher.update(payload);
    *hasher.finalize().as_bytes()
}

/// Bytes from the operating system's generator.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the operating system's random generator");
    bytes
}

/// Reads a key file: 32 bytes, or 64 hex digits (whitespace around them
/// allowed). `head -c 32 /dev/urandom > FILE` makes one.
pub fn read_key_file(path: &std::path::Path) -> Result<[u8; 32], String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|error| format!("{error}"))?;
    let mut bytes = Vec::new();
    file.take(KEY_FILE_BYTES_MAX)
        .read_to_end(&mut bytes)
        .map_err(|error| format!("{error}"))?;
    if let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice()) {
        return Ok(key);
    }
    let text = String::from_utf8_lossy(&bytes);
    if let Some(key) = super::format::parse_hex::<32>(text.trim()) {
        return Ok(key);
    }
    Err(format!(
        "it holds {} bytes; a key file holds 32 bytes or 64 hex digits (make one with: head -c 32 /dev/urandom > FILE)",
        bytes.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealers() -> [Sealer; 2] {
        [
            Sealer::new(None),
            Sealer::new(Some(Keys::from_material(&[7u8; 64]))),
        ]
    }

    #[test]
    fn sealed_objects_open_to_what_was_sealed_compressible_or_not() {
        let compressible = vec![b'a'; 100_000];
        let random: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for sealer in sealers() {
            for plain in [&compressible, &random, &Vec::new()] {
                let sealed = sealer.seal(b"chunk", plain);
                assert_eq!(sealer.open(b"chunk", &sealed, 1 << 20).unwrap(), *plain);
            }
            assert!(sealer.seal(b"chunk", &compressible).len() < 1000);
        }
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_detected() {
        for sealer in sealers() {
            let sealed = sealer.seal(b"manifest", b"a manifest's bytes, some of them");
            for index in 0..sealed.len() {
                let mut damaged = sealed.clone();
                damaged[index] ^= 0x10;
                assert!(
                    sealer.open(b"manifest", &damaged, 1 << 20).is_err(),
                    "{index}"
                );
            }
            for length in 0..sealed.len() {
                assert!(
                    sealer
                        .open(b"manifest", &sealed[..length], 1 << 20)
                        .is_err()
                );
            }
            // Moved to another name (kind), it does not open either.
            assert_eq!(
                sealer.open(b"index", &sealed, 1 << 20),
                Err(SealError::Damaged)
            );
        }
    }

    #[test]
    fn a_wrong_key_or_no_key_is_refused_never_garbage() {
        let [plain, encrypted] = sealers();
        let other = Sealer::new(Some(Keys::from_material(&[8u8; 64])));
        let sealed = encrypted.seal(b"chunk", b"secret data");
        assert_eq!(other.open(b"chunk", &sealed, 100), Err(SealError::Damaged));
        assert_eq!(plain.open(b"chunk", &sealed, 100), Err(SealError::NeedsKey));
        let clear = plain.seal(b"chunk", b"data");
        assert_eq!(
            encrypted.open(b"chunk", &clear, 100),
            Err(SealError::NotEncrypted)
        );
        let wrapped = Sealer::wrap(&[1u8; 32], &[9u8; 64]);
        assert_eq!(Sealer::unwrap(&[1u8; 32], &wrapped), Some([9u8; 64]));
        assert_eq!(Sealer::unwrap(&[2u8; 32], &wrapped), None);
    }

    #[test]
    fn encrypted_objects_hold_no_plaintext_and_keyed_ids_differ() {
        let [plain, encrypted] = sealers();
        let data = b"KNOWN-PATTERN-KNOWN-PATTERN".repeat(100);
        let sealed = encrypted.seal(b"chunk", &data);
        assert!(!sealed.windows(13).any(|w| w == b"KNOWN-PATTERN"));
        assert_ne!(plain.chunk_id(&data), encrypted.chunk_id(&data));
        assert_eq!(plain.chunk_id(&data).0, *blake3::hash(&data).as_bytes());
    }

    #[test]
    fn a_decompression_bomb_is_refused_before_its_buffer_is_made() {
        let sealer = Sealer::new(None);
        let sealed = sealer.seal(b"index", &vec![0u8; 1 << 20]);
        assert_eq!(
            sealer.open(b"index", &sealed, 4096),
            Err(SealError::TooLarge { limit_bytes: 4096 })
        );
    }
}
