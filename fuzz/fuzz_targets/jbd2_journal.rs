//! Fuzz target: the input is a jbd2 journal (the contents of an ext4
//! journal inode, as `debugfs -R 'cat <8>'` dumps it) behind a 3-byte
//! header, replayed with `fsmap::jbd2::replay`; every block the replay
//! replaced is then read back through `fsmap::read::Overlay`.
//!
//! The header:
//! - byte 0: bit 0 picks the block size (0: 1024, 1: 4096 bytes); bits
//!   1-2 how many extents map the journal (0: one, 1: two, 2-3: three);
//!   bit 3 recomputes the journal superblock's v2/v3 checksum, so that
//!   changes to the superblock get past it.
//! - bytes 1 and 2: where the journal is split into extents, as fractions
//!   (n/256) of its blocks.
//!
//! The journal is zero-padded to the length its superblock claims (at most
//! JOURNAL_BYTES_MAX), so a seed can be a journal with its trailing zeros
//! cut off; the padding is never in memory. Its pieces lie on the device
//! in reverse order, so that every read goes through the extent lookup. A panic, a hang (-timeout), an
//! allocation past -rss_limit_mb or a broken assertion below is a finding.

#![no_main]

use std::collections::BTreeMap;
use std::io;

use fsmap::ext4::{FileExtent, crc32c_raw};
use fsmap::jbd2::{self, Replay};
use fsmap::read::{JBD2_MAGIC, Overlay, ReadAt};
use libfuzzer_sys::fuzz_target;

/// Largest journal an input is padded to: 4096 blocks of 4 KiB.
const JOURNAL_BYTES_MAX: u64 = 16 << 20;
const SUPERBLOCK_BYTES: usize = 1024;
const SUPERBLOCK_MAXLEN_OFFSET: usize = 0x10;
const SUPERBLOCK_INCOMPAT_OFFSET: usize = 0x28;
const SUPERBLOCK_CHECKSUM_OFFSET: usize = 0xFC;
const INCOMPAT_CSUM_V2_OR_V3: u32 = 0x8 | 0x10;

fuzz_target!(|data: &[u8]| {
    let Some((&[selector, split_a, split_b], journal)) = data.split_first_chunk() else {
        return;
    };
    let block_size_bytes: u64 = if selector & 1 == 0 { 1024 } else { 4096 };
    let mut journal = journal.to_vec();
    if selector & 8 != 0 {
        fix_superblock_checksum(&mut journal);
    }
    let extent_count = match (selector >> 1) & 3 {
        0 => 1,
        1 => 2,
        _ => 3,
    };
    let block_count = padded_bytes(&journal, block_size_bytes) / block_size_bytes;
    let device = Device::new(
        journal,
        block_size_bytes,
        &pieces(block_count, extent_count, [split_a, split_b]),
    );
    if let Ok(replay) = jbd2::replay(&device, block_size_bytes, &device.extents) {
        check_overlay(device, block_size_bytes, replay);
    }
});

/// The journal's length: a whole number of blocks, as long as its
/// superblock claims, at most JOURNAL_BYTES_MAX.
fn padded_bytes(journal: &[u8], block_size_bytes: u64) -> u64 {
    let claimed = journal
        .get(SUPERBLOCK_MAXLEN_OFFSET..SUPERBLOCK_MAXLEN_OFFSET + 4)
        .map(|field| u32::from_be_bytes(field.try_into().unwrap_or_default()))
        .map_or(0, |blocks| u64::from(blocks) * block_size_bytes)
        .min(JOURNAL_BYTES_MAX);
    claimed
        .max(journal.len() as u64)
        .max(1)
        .next_multiple_of(block_size_bytes)
}

/// A device holding the journal's pieces in reverse order, and reading
/// as zeros past the input (so padding costs nothing). `extents` map
/// journal blocks to where each piece landed.
struct Device {
    journal: Vec<u8>,
    block_size_bytes: u64,
    length_bytes: u64,
    extents: Vec<FileExtent>,
}

impl Device {
    fn new(journal: Vec<u8>, block_size_bytes: u64, pieces: &[(u64, u64)]) -> Device {
        let mut extents = Vec::new();
        let mut physical_block = 0;
        for &(logical_block, block_count) in pieces.iter().rev() {
            extents.push(FileExtent {
                logical_block,
                physical_block,
                block_count,
                uninitialized: false,
            });
            physical_block += block_count;
        }
        Device {
            journal,
            block_size_bytes,
            length_bytes: physical_block * block_size_bytes,
            extents,
        }
    }
}

impl ReadAt for Device {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.length_bytes)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        let mut at = offset;
        while at < end {
            let block = at / self.block_size_bytes;
            let extent = self
                .extents
                .iter()
                .find(|e| (e.physical_block..e.physical_block + e.block_count).contains(&block))
                .expect("the extents cover the device");
            let extent_end = (extent.physical_block + extent.block_count) * self.block_size_bytes;
            let take = (end.min(extent_end) - at) as usize;
            let from = extent.logical_block * self.block_size_bytes
                + (at - extent.physical_block * self.block_size_bytes);
            let done = (at - offset) as usize;
            for (index, byte) in buf[done..done + take].iter_mut().enumerate() {
                *byte = self
                    .journal
                    .get(from as usize + index)
                    .copied()
                    .unwrap_or(0);
            }
            at += take as u64;
        }
        Ok(())
    }
}

/// The checksum a v2/v3 journal superblock should have: crc32c of its
/// 1024 bytes with the checksum field zeroed, big-endian.
fn fix_superblock_checksum(journal: &mut [u8]) {
    let Some(superblock) = journal.get_mut(..SUPERBLOCK_BYTES) else {
        return;
    };
    let incompat = u32::from_be_bytes(
        superblock[SUPERBLOCK_INCOMPAT_OFFSET..SUPERBLOCK_INCOMPAT_OFFSET + 4]
            .try_into()
            .unwrap_or_default(),
    );
    if incompat & INCOMPAT_CSUM_V2_OR_V3 == 0 {
        return;
    }
    let hole = SUPERBLOCK_CHECKSUM_OFFSET..SUPERBLOCK_CHECKSUM_OFFSET + 4;
    superblock[hole.clone()].fill(0);
    let checksum = crc32c_raw(!0, superblock);
    superblock[hole].copy_from_slice(&checksum.to_be_bytes());
}

/// `extent_count` runs (first journal block, block count) covering
/// `block_count` blocks, split where the two fractions say; empty runs are
/// dropped.
fn pieces(block_count: u64, extent_count: usize, splits: [u8; 2]) -> Vec<(u64, u64)> {
    let mut cuts: Vec<u64> = splits[..extent_count - 1]
        .iter()
        .map(|&fraction| block_count * u64::from(fraction) / 256)
        .collect();
    cuts.sort_unstable();
    let mut bounds = vec![0];
    bounds.extend(cuts);
    bounds.push(block_count);
    bounds
        .windows(2)
        .filter(|pair| pair[1] > pair[0])
        .map(|pair| (pair[0], pair[1] - pair[0]))
        .collect()
}

/// Every replaced block reads, through the overlay, as its copy in the
/// journal with the jbd2 magic put back where it was escaped; a read
/// straddling two replaced blocks agrees with the two whole reads.
fn check_overlay(device: Device, block_size_bytes: u64, replay: Replay) {
    let copies = replay.replaced.clone();
    let overlay = Overlay {
        inner: device,
        block_size: block_size_bytes,
        replaced: replay.replaced,
    };
    let mut read_blocks = BTreeMap::new();
    for (&block, copy) in &copies {
        assert_eq!(copy.offset_bytes % block_size_bytes, 0, "block {block}");
        let mut expected = vec![0u8; block_size_bytes as usize];
        overlay
            .inner
            .read_exact_at(&mut expected, copy.offset_bytes)
            .expect("a replaced block's copy lies on the device");
        if copy.escaped {
            expected[..4].copy_from_slice(&JBD2_MAGIC.to_be_bytes());
        }
        // A block past 2^64 bytes cannot be asked for.
        let Some(offset_bytes) = block.checked_mul(block_size_bytes) else {
            continue;
        };
        let mut buf = vec![0u8; block_size_bytes as usize];
        overlay
            .read_exact_at(&mut buf, offset_bytes)
            .expect("a replaced block reads from its copy");
        assert_eq!(buf, expected, "block {block}");
        read_blocks.insert(block, buf);
    }
    // The last 2 bytes of one replaced block and the first 6 of the next.
    for (&block, data) in &read_blocks {
        let Some(next) = read_blocks.get(&(block + 1)) else {
            continue;
        };
        let mut buf = [0u8; 8];
        let offset_bytes = (block + 1) * block_size_bytes - 2;
        overlay
            .read_exact_at(&mut buf, offset_bytes)
            .expect("two replaced blocks read");
        assert_eq!(buf[..2], data[data.len() - 2..], "block {block}");
        assert_eq!(buf[2..], next[..6], "block {}", block + 1);
    }
}
