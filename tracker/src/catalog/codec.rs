//! The catalog's values, encoded and decoded: its whole format (docs/
//! journal.md, "Catalog"). Every value carries its crc32c in front;
//! `fuzzing.rs` (feature `fuzzing`) drives each decoder with untrusted
//! bytes.

use roaring::RoaringBitmap;

use super::*;

pub(crate) fn encode_identity(identity: &Identity) -> Vec<u8> {
    let mut bytes = identity.image_id.to_vec();
    bytes.extend_from_slice(&identity.size_bytes.to_le_bytes());
    bytes.extend_from_slice(&identity.granularity_shift.to_le_bytes());
    bytes.extend_from_slice(&identity.device.to_le_bytes());
    bytes.extend_from_slice(&identity.inode.to_le_bytes());
    assert_eq!(bytes.len(), IDENTITY_LEN);
    bytes
}

pub(crate) fn decode_identity(bytes: &[u8]) -> Result<Identity, CatalogError> {
    if bytes.len() != IDENTITY_LEN {
        return Err(CatalogError::Malformed {
            key: KEY_IDENTITY.into(),
            reason: "wrong length",
        });
    }
    Ok(Identity {
        image_id: bytes[0..16].try_into().expect("16 bytes"),
        size_bytes: le64(&bytes[16..24]),
        granularity_shift: u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes")),
        device: le64(&bytes[28..36]),
        inode: le64(&bytes[36..44]),
    })
}

pub(crate) fn encode_clean_shutdown(marker: &CleanShutdown) -> Vec<u8> {
    let mut bytes = marker.image_mtime_ns.to_le_bytes().to_vec();
    bytes.extend_from_slice(&marker.size_bytes.to_le_bytes());
    bytes.extend_from_slice(&marker.generation.to_le_bytes());
    assert_eq!(bytes.len(), CLEAN_SHUTDOWN_LEN);
    bytes
}

pub(crate) fn decode_clean_shutdown(bytes: &[u8]) -> Result<CleanShutdown, CatalogError> {
    if bytes.len() != CLEAN_SHUTDOWN_LEN {
        return Err(CatalogError::Malformed {
            key: KEY_CLEAN_SHUTDOWN.into(),
            reason: "wrong length",
        });
    }
    Ok(CleanShutdown {
        image_mtime_ns: i128::from_le_bytes(bytes[0..16].try_into().expect("16 bytes")),
        size_bytes: le64(&bytes[16..24]),
        generation: le64(&bytes[24..32]),
    })
}

/// generation u64, then a fine record (`encode_fine`).
pub(crate) fn encode_fine_current(
    generation: u64,
    exact: &RoaringBitmap,
    fine: &RoaringBitmap,
) -> Vec<u8> {
    let mut bytes = generation.to_le_bytes().to_vec();
    encode_fine(exact, fine, &mut bytes);
    bytes
}

/// What `fine_current` returns: (generation, exact regions, written blocks).
pub type FineCurrent = (u64, RoaringBitmap, RoaringBitmap);

pub(crate) fn decode_fine_current(bytes: &[u8]) -> Result<FineCurrent, CatalogError> {
    let malformed = |reason| CatalogError::Malformed {
        key: KEY_FINE_CURRENT.into(),
        reason,
    };
    let generation = le64(bytes.get(0..8).ok_or(malformed("short"))?);
    let (exact, fine) = decode_fine(&bytes[8..], malformed)?;
    Ok((generation, exact, fine))
}

pub(crate) fn with_checksum(payload: &[u8]) -> Vec<u8> {
    let mut value = crc32c::crc32c(payload).to_le_bytes().to_vec();
    value.extend_from_slice(payload);
    value
}

pub(crate) fn checked_value<'a>(value: &'a [u8], key: &str) -> Result<&'a [u8], CatalogError> {
    if value.len() < 4 || value.len() > VALUE_MAX_BYTES {
        return Err(CatalogError::Malformed {
            key: key.into(),
            reason: "bad length",
        });
    }
    let payload = &value[4..];
    if crc32c::crc32c(payload) != u32::from_le_bytes(value[0..4].try_into().expect("4 bytes")) {
        return Err(CatalogError::Checksum { key: key.into() });
    }
    Ok(payload)
}

/// name length u32, name, created u64, changed length u64, changed (roaring), saved (roaring).
pub(crate) fn encode_checkpoint(checkpoint: &Checkpoint) -> Vec<u8> {
    let mut bytes = (checkpoint.name.len() as u32).to_le_bytes().to_vec();
    bytes.extend_from_slice(checkpoint.name.as_bytes());
    bytes.extend_from_slice(&checkpoint.created_unix_seconds.to_le_bytes());
    let mut changed = Vec::new();
    checkpoint
        .changed
        .serialize_into(&mut changed)
        .expect("serializing into a Vec");
    bytes.extend_from_slice(&(changed.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&changed);
    checkpoint
        .saved
        .serialize_into(&mut bytes)
        .expect("serializing into a Vec");
    bytes
}

/// exact length u64, exact regions (roaring), fine blocks (roaring).
pub(crate) fn encode_fine(exact: &RoaringBitmap, fine: &RoaringBitmap, bytes: &mut Vec<u8>) {
    let mut exact_bytes = Vec::new();
    exact
        .serialize_into(&mut exact_bytes)
        .expect("serializing into a Vec");
    bytes.extend_from_slice(&(exact_bytes.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&exact_bytes);
    fine.serialize_into(bytes).expect("serializing into a Vec");
}

pub(crate) fn decode_fine(
    bytes: &[u8],
    malformed: impl Fn(&'static str) -> CatalogError,
) -> Result<(RoaringBitmap, RoaringBitmap), CatalogError> {
    let exact_len = le64(bytes.get(0..8).ok_or(malformed("short fine record"))?) as usize;
    let exact = bytes
        .get(8..8usize.saturating_add(exact_len))
        .ok_or(malformed("short exact bitmap"))?;
    let exact = RoaringBitmap::deserialize_from(exact).map_err(|_| malformed("bad bitmap"))?;
    let fine = RoaringBitmap::deserialize_from(&bytes[8 + exact_len..])
        .map_err(|_| malformed("bad bitmap"))?;
    Ok((exact, fine))
}

pub(crate) fn decode_checkpoint(
    generation: u64,
    bytes: &[u8],
    key: &str,
) -> Result<Checkpoint, CatalogError> {
    let malformed = |reason| CatalogError::Malformed {
        key: key.into(),
        reason,
    };
    let name_len = u32::from_le_bytes(
        bytes
            .get(0..4)
            .ok_or(malformed("short"))?
            .try_into()
            .expect("4"),
    ) as usize;
    let name = bytes.get(4..4 + name_len).ok_or(malformed("short name"))?;
    let name = String::from_utf8(name.to_vec()).map_err(|_| malformed("name is not UTF-8"))?;
    let rest = &bytes[4 + name_len..];
    let created_unix_seconds = le64(rest.get(0..8).ok_or(malformed("short"))?);
    let changed_len = le64(rest.get(8..16).ok_or(malformed("short"))?) as usize;
    let changed = rest
        .get(16..16usize.saturating_add(changed_len))
        .ok_or(malformed("short bitmap"))?;
    let changed = RoaringBitmap::deserialize_from(changed).map_err(|_| malformed("bad bitmap"))?;
    let saved = RoaringBitmap::deserialize_from(&rest[16 + changed_len..])
        .map_err(|_| malformed("bad bitmap"))?;
    Ok(Checkpoint {
        name,
        generation,
        created_unix_seconds,
        changed,
        saved,
        // Filled from the `fine` table by `checkpoints`.
        exact: RoaringBitmap::new(),
        fine: RoaringBitmap::new(),
    })
}

/// created u64, reason (the rest, UTF-8).
pub(crate) fn encode_pin(pin: &Pin) -> Vec<u8> {
    let mut bytes = pin.created_unix_seconds.to_le_bytes().to_vec();
    bytes.extend_from_slice(pin.reason.as_bytes());
    bytes
}

pub(crate) fn decode_pin(
    generation: u64,
    holder: &str,
    bytes: &[u8],
    key: &str,
) -> Result<Pin, CatalogError> {
    let malformed = |reason| CatalogError::Malformed {
        key: key.into(),
        reason,
    };
    let created = bytes.get(0..8).ok_or(malformed("short"))?;
    let reason =
        String::from_utf8(bytes[8..].to_vec()).map_err(|_| malformed("reason is not UTF-8"))?;
    Ok(Pin {
        generation,
        holder: holder.to_string(),
        reason,
        created_unix_seconds: le64(created),
    })
}

fn le64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().expect("eight bytes"))
}
