//! Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`,
//! off in every other build): the object-storage formats (`s3/format.rs`:
//! manifests and pack indexes; `s3/seal.rs`: sealed objects) and the tape
//! index (`view/tape_index.rs`), all private to this crate, driven with
//! untrusted bytes. What decodes is encoded again and must decode to the
//! same value (or to the same bytes, where the format has one encoding),
//! so that a target finds wrong answers as well as panics.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};

use crate::s3::format::{Manifest, PackId, decode_index, encode_index};
use crate::s3::seal::{Keys, NONCE_BYTES, SEAL_MAGIC, Sealer};
use crate::view::tape_index::TapeIndex;

/// Byte 0, bit 0: the rest is a pack index rather than a manifest.
/// Panics when what decodes does not encode back to the same.
pub fn manifest_or_index(data: &[u8]) {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    if selector & 1 == 1 {
        let pack = PackId([9; 16]);
        if let Ok(entries) = decode_index(pack, bytes) {
            assert!(entries.iter().all(|entry| entry.pack == pack));
            assert_eq!(encode_index(&entries), bytes, "an index has one encoding");
        }
        return;
    }
    if let Ok(manifest) = Manifest::decode(bytes) {
        // `encode` itself asserts that its bytes decode to `manifest`.
        let again = manifest.encode();
        assert_eq!(Manifest::decode(&again).as_ref(), Ok(&manifest));
        assert!(manifest.mapped_bytes() <= manifest.header.size_bytes);
    }
}

/// The repository keys the seal target opens encrypted objects with.
const MATERIAL: [u8; 64] = [0x5a; 64];
/// Largest object the seal target opens (once decompressed).
const PLAIN_MAX_BYTES: usize = 1 << 20;
const KINDS: [&[u8]; 4] = [b"chunk", b"index", b"manifest", b"record"];

/// Byte 0: bit 0, the repository is encrypted (`MATERIAL`); bit 1, the
/// rest is `flags | payload` to be framed as a sealed object with a
/// correct digest or AES-GCM tag (so that mutations reach zstd), else the
/// rest is the sealed object itself; bits 2-3, its kind. Also unwraps the
/// rest as a config's wrapped keys. Panics on a wrong answer.
pub fn sealed_object(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let encrypted = selector & 1 == 1;
    let kind = KINDS[usize::from(selector >> 2) & 3];
    let sealed = if selector & 2 == 2 {
        frame(encrypted, kind, rest)
    } else {
        rest.to_vec()
    };
    let sealer = sealer(encrypted);
    if let Ok(plain) = sealer.open(kind, &sealed, PLAIN_MAX_BYTES) {
        assert!(plain.len() <= PLAIN_MAX_BYTES, "opened past the limit");
        let again = sealer.seal(kind, &plain);
        assert_eq!(sealer.open(kind, &again, PLAIN_MAX_BYTES), Ok(plain));
        let other_kind = KINDS[(usize::from(selector >> 2) + 1) & 3];
        assert!(
            sealer.open(other_kind, &sealed, PLAIN_MAX_BYTES).is_err(),
            "an object opened as another kind"
        );
        assert!(
            self::sealer(!encrypted)
                .open(kind, &sealed, PLAIN_MAX_BYTES)
                .is_err(),
            "an object opened both with and without the key"
        );
    }
    let user_key = [0x33; 32];
    if let Some(material) = Sealer::unwrap(&user_key, rest) {
        let wrapped = Sealer::wrap(&user_key, &material);
        assert_eq!(Sealer::unwrap(&user_key, &wrapped), Some(material));
    }
}

fn sealer(encrypted: bool) -> Sealer {
    Sealer::new(encrypted.then(|| Keys::from_material(&MATERIAL)))
}

/// `flags | payload` sealed as `seal` would (docs/s3.md), whatever the
/// flags and payload are: magic, flags, then the AES-GCM body under
/// `MATERIAL`'s data key or the blake3 digest.
fn frame(encrypted: bool, kind: &[u8], rest: &[u8]) -> Vec<u8> {
    let Some((&flags, payload)) = rest.split_first() else {
        return SEAL_MAGIC.to_vec();
    };
    let mut sealed = SEAL_MAGIC.to_vec();
    sealed.push(flags);
    let aad = [kind, &[flags]].concat();
    if encrypted {
        let cipher = Aes256Gcm::new_from_slice(&MATERIAL[..32]).expect("32-byte key");
        let nonce = [1u8; NONCE_BYTES];
        let body = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: payload,
                    aad: &aad,
                },
            )
            .expect("AES-GCM encrypts any length an input has");
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&body);
    } else {
        sealed.extend_from_slice(payload);
        let mut hasher = blake3::Hasher::new();
        hasher.update(&aad);
        hasher.update(payload);
        sealed.extend_from_slice(hasher.finalize().as_bytes());
    }
    sealed
}

/// Byte 0, bit 0: recompute the index's trailing crc32c first, so that
/// mutations get past it. Panics when what decodes does not encode back
/// to the same.
pub fn tape_index(data: &[u8]) {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let mut bytes = bytes.to_vec();
    if selector & 1 == 1 && bytes.len() >= 4 {
        let body = bytes.len() - 4;
        let crc = crc32c::crc32c(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
    }
    if let Ok(index) = TapeIndex::decode(&bytes) {
        let again = index.encode().expect("an index that decodes encodes again");
        assert_eq!(TapeIndex::decode(&again).as_ref(), Ok(&index));
    }
}

/// Seeds for the targets above, made by this crate's own encoders:
/// (target, name, input with its selector byte).
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let selected = |selector: u8, bytes: &[u8]| [&[selector], bytes].concat();
    let encoded = sample_manifest().encode();
    let index = encode_index(&[sample_chunk(1), sample_chunk(2), sample_chunk(3)]);
    let mut seeds = vec![
        ("s3_manifest", "manifest".into(), selected(0, &encoded)),
        ("s3_manifest", "index".into(), selected(1, &index)),
    ];
    let compressible = vec![b'z'; 5000];
    for encrypted in [false, true] {
        let sealer = sealer(encrypted);
        let key = if encrypted { "encrypted" } else { "plain" };
        for (kind_index, kind) in KINDS.iter().enumerate() {
            let plain = match kind_index {
                0 => compressible.as_slice(),
                1 => index.as_slice(),
                _ => encoded.as_slice(),
            };
            let selector = u8::from(encrypted) | (kind_index as u8) << 2;
            let name = format!("{key}-{}", String::from_utf8_lossy(kind));
            seeds.push((
                "s3_seal",
                name,
                selected(selector, &sealer.seal(kind, plain)),
            ));
        }
        // Framed by the target: a zstd frame as the payload, flags 2.
        let frame = zstd::bulk::compress(&compressible, 1).expect("zstd compresses");
        let framed = [&[2u8][..], &frame].concat();
        seeds.push((
            "s3_seal",
            format!("{key}-framed-zstd"),
            selected(u8::from(encrypted) | 2, &framed),
        ));
    }
    seeds
}

fn sample_chunk(n: u8) -> crate::s3::format::ChunkRef {
    crate::s3::format::ChunkRef {
        id: crate::s3::seal::ChunkId([n; 32]),
        pack: PackId([9; 16]),
        offset_bytes: u64::from(n) * 1000,
        stored_bytes: 900,
        raw_bytes: 65536,
    }
}

/// An incremental session's manifest: two chunks, two extents, a file.
fn sample_manifest() -> Manifest {
    use crate::s3::format::{Extent, SESSION_FORMAT, SessionHeader};
    use crate::target::Held;

    Manifest {
        header: SessionHeader {
            format: SESSION_FORMAT,
            session_id: "20261202T120000Z-0011aabb".into(),
            source_id: "ab".repeat(16),
            size_bytes: 1 << 30,
            granularity_bytes: 65536,
            base: Some(Held {
                checkpoint: "copy-0".into(),
                generation: 1,
            }),
            checkpoint: Held {
                checkpoint: "copy-1".into(),
                generation: 2,
            },
            parent: Some("20261201T120000Z-00112233".into()),
            created_unix: 1_700_000_000,
            data_bytes: 131072,
            new_bytes: 65536,
            uploaded_bytes: 2000,
            files: vec!["M\t/etc/passwd".into(), "A\t/home/a b".into()],
        },
        chunks: vec![sample_chunk(1), sample_chunk(2)],
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
