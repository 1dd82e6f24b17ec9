//! Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`,
//! off in every other build): the catalog's value codecs, private to
//! `catalog.rs`, driven with untrusted bytes. Each decoded value is
//! encoded again and must decode to the same value (or, where the format
//! has one encoding, to the same bytes), so that a target finds wrong
//! answers as well as panics.

use crate::catalog::{
    checked_value, decode_checkpoint, decode_clean_shutdown, decode_fine, decode_fine_current,
    decode_identity, decode_pin, encode_checkpoint, encode_clean_shutdown, encode_fine,
    encode_fine_current, encode_identity, encode_pin, with_checksum,
};

/// The value kinds byte 0 of an input picks from (modulo this).
pub const CATALOG_VALUE_KINDS: u8 = 6;
/// Byte 0, this bit: the rest is a stored value, its crc32c in front, as
/// redb holds it. Clear: the rest is the payload, and gets a correct crc
/// put in front of it, so that mutations get past the checksum.
pub const CATALOG_VALUE_STORED: u8 = 0x80;

/// Decodes the rest of `data` as the catalog value byte 0 names:
/// 0 identity, 1 clean-shutdown marker, 2 current fine record, 3
/// checkpoint, 4 a checkpoint's fine record, 5 pin. Panics on a wrong
/// answer.
pub fn catalog_value(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let stored = if selector & CATALOG_VALUE_STORED != 0 {
        rest.to_vec()
    } else {
        with_checksum(rest)
    };
    let Ok(payload) = checked_value(&stored, "fuzz") else {
        assert!(
            selector & CATALOG_VALUE_STORED != 0,
            "a value with its checksum put in front passes the checksum"
        );
        return;
    };
    match selector % CATALOG_VALUE_KINDS {
        0 => {
            if let Ok(identity) = decode_identity(payload) {
                assert_eq!(encode_identity(&identity), payload, "identity bytes");
            }
        }
        1 => {
            if let Ok(marker) = decode_clean_shutdown(payload) {
                assert_eq!(encode_clean_shutdown(&marker), payload, "marker bytes");
            }
        }
        2 => {
            if let Ok((generation, exact, fine)) = decode_fine_current(payload) {
                let again = encode_fine_current(generation, &exact, &fine);
                let decoded = decode_fine_current(&again).expect("a fine record reads back");
                assert_eq!(decoded, (generation, exact, fine), "fine record");
            }
        }
        3 => {
            if let Ok(checkpoint) = decode_checkpoint(7, payload, "fuzz") {
                let again = encode_checkpoint(&checkpoint);
                let decoded =
                    decode_checkpoint(7, &again, "fuzz").expect("a checkpoint reads back");
                assert_eq!(decoded, checkpoint, "checkpoint");
            }
        }
        4 => {
            let malformed = |reason| crate::catalog::CatalogError::Malformed {
                key: "fuzz".into(),
                reason,
            };
            if let Ok((exact, fine)) = decode_fine(payload, malformed) {
                let mut again = Vec::new();
                encode_fine(&exact, &fine, &mut again);
                let decoded = decode_fine(&again, malformed).expect("a fine record reads back");
                assert_eq!(decoded, (exact, fine), "checkpoint fine record");
            }
        }
        _ => {
            if let Ok(pin) = decode_pin(7, "holder", payload, "fuzz") {
                assert_eq!(encode_pin(&pin), payload, "pin bytes");
            }
        }
    }
}

/// Seeds for `catalog_value`, made by the catalog's own encoders: (name,
/// input with its selector byte; payloads, the target puts their crc in
/// front).
pub fn catalog_value_seeds() -> Vec<(String, Vec<u8>)> {
    use crate::catalog::{Checkpoint, CleanShutdown, Identity, Pin};
    use roaring::RoaringBitmap;

    let bitmap = |values: &[u32]| values.iter().copied().collect::<RoaringBitmap>();
    let mut runs = RoaringBitmap::new();
    runs.insert_range(1000..5000);
    let identity = encode_identity(&Identity {
        image_id: [3; 16],
        size_bytes: 1 << 30,
        granularity_shift: 16,
        device: 2049,
        inode: 12,
    });
    let marker = encode_clean_shutdown(&CleanShutdown {
        image_mtime_ns: 1_700_000_000_123_456_789,
        size_bytes: 1 << 30,
        generation: 4,
    });
    let fine_current = encode_fine_current(3, &bitmap(&[1, 5]), &bitmap(&[16, 17, 80]));
    let checkpoint = encode_checkpoint(&Checkpoint {
        name: "nightly".into(),
        generation: 7,
        created_unix_seconds: 1_700_000_000,
        changed: bitmap(&[0, 1, 2, 70_000]),
        saved: runs.clone(),
        exact: RoaringBitmap::new(),
        fine: RoaringBitmap::new(),
    });
    let mut fine = Vec::new();
    encode_fine(&bitmap(&[2]), &runs, &mut fine);
    let pin = encode_pin(&Pin {
        generation: 7,
        holder: "holder".into(),
        reason: "target:/backup/disk.img".into(),
        created_unix_seconds: 1_700_000_001,
    });
    let values = [
        ("identity", identity),
        ("clean-shutdown", marker),
        ("fine-current", fine_current),
        ("checkpoint", checkpoint),
        ("fine", fine),
        ("pin", pin),
    ];
    let mut seeds = Vec::new();
    for (kind, (name, payload)) in values.into_iter().enumerate() {
        seeds.push((name.to_string(), [&[kind as u8][..], &payload].concat()));
        let stored = with_checksum(&payload);
        let selector = kind as u8 | CATALOG_VALUE_STORED;
        seeds.push((
            format!("{name}-stored"),
            [&[selector][..], &stored].concat(),
        ));
    }
    seeds
}
