//! BLOCK_STATUS results: `Extent`, `BlockStatus`, and the decoders for the
//! compact and extended status chunk payloads.
//!
//! Extents come back with absolute offsets and clipped to the request: a
//! server may describe more than was asked (the last extent may run past
//! the end) or less (a reply that covers only the start); the caller asks
//! again from where the reply stopped.

use nbd_server::proto::{EXTENTS_PER_REPLY_MAX, STATE_DIRTY, STATE_HOLE, STATE_ZERO, be32, be64};

use crate::error::ProtocolError;

/// One run of the export with the same status flags in one context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset_bytes: u64,
    pub length_bytes: u64,
    /// The context's flags (32 bits wide unless extended headers are used).
    pub flags: u64,
}

impl Extent {
    pub fn end_bytes(&self) -> u64 {
        self.offset_bytes + self.length_bytes
    }
    /// `base:allocation`: not allocated in the server's storage.
    pub fn is_hole(&self) -> bool {
        self.flags & u64::from(STATE_HOLE) != 0
    }
    /// `base:allocation`: reads as zeroes.
    pub fn is_zero(&self) -> bool {
        self.flags & u64::from(STATE_ZERO) != 0
    }
    /// `qemu:dirty-bitmap:NAME`: changed since the bitmap started.
    pub fn is_dirty(&self) -> bool {
        self.flags & u64::from(STATE_DIRTY) != 0
    }
}

/// The reply to one BLOCK_STATUS request: extents per selected context.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockStatus {
    contexts: Vec<(String, Vec<Extent>)>,
}

impl BlockStatus {
    pub(crate) fn new(contexts: Vec<(String, Vec<Extent>)>) -> BlockStatus {
        BlockStatus { contexts }
    }

    pub fn extents(&self, context: &str) -> Option<&[Extent]> {
        self.contexts
            .iter()
            .find(|(name, _)| name == context)
            .map(|(_, extents)| extents.as_slice())
    }

    pub fn into_extents(self, context: &str) -> Option<Vec<Extent>> {
        self.contexts
            .into_iter()
            .find(|(name, _)| name == context)
            .map(|(_, extents)| extents)
    }

    pub fn contexts(&self) -> impl Iterator<Item = (&str, &[Extent])> {
        self.contexts
            .iter()
            .map(|(name, extents)| (name.as_str(), extents.as_slice()))
    }
}

/// The context id and descriptors of a compact BLOCK_STATUS chunk payload
/// (u32 id, then u32 length + u32 flags each), clipped to the request
/// `[offset, offset + length)`. The caller has checked the payload length
/// against `EXTENTS_PER_REPLY_MAX` before reading it.
pub(crate) fn decode_compact(
    payload: &[u8],
    offset: u64,
    length: u64,
) -> Result<(u32, Vec<Extent>), ProtocolError> {
    debug_assert!(payload.len() >= 12 && (payload.len() - 4) % 8 == 0);
    let id = be32(&payload[0..4]);
    let descriptors = payload[4..]
        .chunks_exact(8)
        .map(|d| (u64::from(be32(&d[0..4])), u64::from(be32(&d[4..8]))));
    Ok((id, clip(descriptors, offset, length)?))
}

/// The extended form (u32 id, u32 count, then u64 length + u64 flags each).
pub(crate) fn decode_extended(
    payload: &[u8],
    offset: u64,
    length: u64,
) -> Result<(u32, Vec<Extent>), ProtocolError> {
    debug_assert!(payload.len() >= 24 && (payload.len() - 8) % 16 == 0);
    let id = be32(&payload[0..4]);
    let count = be32(&payload[4..8]);
    let carried = (payload.len() as u64 - 8) / 16;
    if u64::from(count) != carried {
        return Err(ProtocolError::DescriptorCountMismatch { count, carried });
    }
    let descriptors = payload[8..]
        .chunks_exact(16)
        .map(|d| (be64(&d[0..8]), be64(&d[8..16])));
    Ok((id, clip(descriptors, offset, length)?))
}

/// Turns (length, flags) descriptors into extents from `offset`, ending at
/// `offset + length` at the latest.
fn clip(
    descriptors: impl Iterator<Item = (u64, u64)>,
    offset: u64,
    length: u64,
) -> Result<Vec<Extent>, ProtocolError> {
    let end = offset + length;
    let mut extents = Vec::new();
    let mut position = offset;
    for (extent_length, flags) in descriptors {
        if extent_length == 0 {
            return Err(ProtocolError::EmptyExtent);
        }
        if position >= end {
            // The spec lets only the last extent run past the request, but a
            // longer description is still true; the surplus is dropped.
            break;
        }
        let run = extent_length.min(end - position);
        extents.push(Extent {
            offset_bytes: position,
            length_bytes: run,
            flags,
        });
        position += run;
    }
    debug_assert!(extents.len() <= EXTENTS_PER_REPLY_MAX);
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(id: u32, descriptors: &[(u32, u32)]) -> Vec<u8> {
        let mut out = id.to_be_bytes().to_vec();
        for (length, flags) in descriptors {
            out.extend_from_slice(&length.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
        out
    }

    fn extended(id: u32, count: u32, descriptors: &[(u64, u64)]) -> Vec<u8> {
        let mut out = id.to_be_bytes().to_vec();
        out.extend_from_slice(&count.to_be_bytes());
        for (length, flags) in descriptors {
            out.extend_from_slice(&length.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
        out
    }

    fn extent(offset_bytes: u64, length_bytes: u64, flags: u64) -> Extent {
        Extent {
            offset_bytes,
            length_bytes,
            flags,
        }
    }

    #[test]
    fn compact_descriptors_become_absolute_extents_clipped_to_the_request() {
        // (descriptors, request offset, request length, extents)
        type Case = (&'static [(u32, u32)], u64, u64, Vec<Extent>);
        let cases: [Case; 4] = [
            // Exactly the request.
            (
                &[(4096, 3), (8192, 0)],
                1 << 20,
                12288,
                vec![extent(1 << 20, 4096, 3), extent((1 << 20) + 4096, 8192, 0)],
            ),
            // The last extent runs past the end: cut.
            (&[(65536, 1)], 0, 4096, vec![extent(0, 4096, 1)]),
            // Less than asked: the caller continues at 4096.
            (&[(4096, 2)], 0, 1 << 20, vec![extent(0, 4096, 2)]),
            // Extents after the end are dropped.
            (&[(4096, 0), (4096, 1)], 0, 4096, vec![extent(0, 4096, 0)]),
        ];
        for (descriptors, offset, length, expected) in cases {
            let (id, extents) = decode_compact(&compact(7, descriptors), offset, length).unwrap();
            assert_eq!(id, 7);
            assert_eq!(extents, expected, "{descriptors:?}");
        }
    }

    #[test]
    fn extended_descriptors_carry_64_bit_lengths_and_check_their_count() {
        let payload = extended(2, 2, &[(5 << 32, 1), (1 << 32, 0)]);
        let (id, extents) = decode_extended(&payload, 0, 6 << 32).unwrap();
        assert_eq!(id, 2);
        assert_eq!(
            extents,
            vec![extent(0, 5 << 32, 1), extent(5 << 32, 1 << 32, 0)]
        );
        let payload = extended(2, 3, &[(4096, 1), (4096, 0)]);
        assert_eq!(
            decode_extended(&payload, 0, 8192),
            Err(ProtocolError::DescriptorCountMismatch {
                count: 3,
                carried: 2
            })
        );
    }

    #[test]
    fn zero_length_descriptors_are_a_protocol_error() {
        assert_eq!(
            decode_compact(&compact(1, &[(0, 0)]), 0, 4096),
            Err(ProtocolError::EmptyExtent)
        );
    }

    #[test]
    fn status_is_looked_up_by_context_name() {
        let status = BlockStatus::new(vec![
            ("base:allocation".into(), vec![extent(0, 1, 3)]),
            ("qemu:dirty-bitmap:b".into(), vec![extent(0, 1, 1)]),
        ]);
        assert!(status.extents("base:allocation").unwrap()[0].is_zero());
        assert!(status.extents("qemu:dirty-bitmap:b").unwrap()[0].is_dirty());
        assert_eq!(status.extents("qemu:dirty-bitmap:c"), None);
        assert_eq!(status.contexts().count(), 2);
    }
}
