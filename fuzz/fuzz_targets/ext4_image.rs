//! Fuzz target: the input is an ext2/3/4 image, zero-padded to the size its
//! superblock claims (so a seed can be an image with its trailing zeros cut
//! off), run through every read `fsmap/tests/common/exercise.rs` makes: open,
//! every inode's blocks, directory, link target, metadata (xattrs, ACLs),
//! layout and contents, the file map, its walk, paths, lookups and an
//! update over every block. A panic, a hang (-timeout) or
//! an allocation past -rss_limit_mb is a finding.

#![no_main]

// The survey test reads fields this target does not.
#[allow(dead_code)]
#[path = "../../fsmap/tests/common/exercise.rs"]
mod exercise;

use fsmap::read::Bytes;
use libfuzzer_sys::fuzz_target;

/// Largest image an input is padded to. A superblock claiming more makes
/// the image truncated, which is a case worth running too.
const IMAGE_BYTES_MAX: usize = 16 << 20;
const SUPERBLOCK_OFFSET: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let _ = exercise::exercise(&padded(data), None, &[]);
});

/// The input with zeros appended up to blocks_count * block_size as its
/// superblock says, at most IMAGE_BYTES_MAX.
fn padded(data: &[u8]) -> Bytes {
    let claimed = claimed_bytes(data).unwrap_or(0).min(IMAGE_BYTES_MAX);
    let mut image = vec![0u8; claimed.max(data.len())];
    image[..data.len()].copy_from_slice(data);
    Bytes(image)
}

fn claimed_bytes(data: &[u8]) -> Option<usize> {
    let sb = data.get(SUPERBLOCK_OFFSET..SUPERBLOCK_OFFSET + 0x1C)?;
    let blocks_count = u32::from_le_bytes(sb[0x04..0x08].try_into().ok()?);
    let log_block_size = u32::from_le_bytes(sb[0x18..0x1C].try_into().ok()?);
    let block_size = 1024usize.checked_shl(log_block_size)?;
    (blocks_count as usize).checked_mul(block_size)
}
