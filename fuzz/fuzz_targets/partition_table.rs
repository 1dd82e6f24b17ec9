//! Fuzz target: the input is the two ends of a disk, read with
//! `fsmap::partition::read_table_report`.
//!
//! The first HEAD_BYTES of the input are the start of the disk, the rest
//! (if any) its end: the disk is as large as its tables claim (the MBR
//! entries' ends, the GPT headers' backup LBA), at least the input and at
//! least HEAD_BYTES, at most DISK_BYTES_MAX, and reads as zeros in between.
//! So a seed can be the first and last 64 KiB of a large partitioned
//! image, and the backup GPT at its last LBA is where a real one would be.
//!
//! Each input is read twice: as it is, and with the CRC32s of every GPT
//! header and entry array recomputed, so that changes to a GPT get past its
//! checksums. A panic, a hang (-timeout), an allocation past -rss_limit_mb
//! or a partition outside the disk is a finding.

#![no_main]

use std::io;

use fsmap::partition::{self, Table};
use fsmap::read::ReadAt;
use libfuzzer_sys::fuzz_target;

/// The start of the disk an input holds; anything past it is the end.
const HEAD_BYTES: usize = 64 << 10;
/// Largest disk an input stands for (its middle is never in memory).
const DISK_BYTES_MAX: u64 = 1 << 44;
const MBR_SECTOR_BYTES: u64 = 512;
const MBR_ENTRIES_OFFSET: usize = 446;
const GPT_SECTOR_SIZES_BYTES: [u64; 2] = [512, 4096];
const GPT_ALTERNATE_LBA_OFFSET: usize = 32;
const GPT_HEADER_BYTES_MIN: usize = 92;
/// Largest entry array whose CRC is recomputed: what the reader accepts.
const GPT_ENTRIES_BYTES_MAX: u64 = 4096 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut disk = Disk::new(data);
    check(&disk);
    disk.fix_gpt_checksums();
    check(&disk);
});

fn check(disk: &Disk) {
    let Ok(report) = partition::read_table_report(disk, disk.size_bytes) else {
        return;
    };
    let partitions = match &report.table {
        Table::None => return,
        Table::Mbr(partitions) | Table::Gpt(partitions) => partitions,
    };
    for partition in partitions {
        let end = partition.start_bytes.checked_add(partition.length_bytes);
        assert!(
            end.is_some_and(|end| end <= disk.size_bytes),
            "partition {} at {}+{} on a disk of {} bytes",
            partition.number,
            partition.start_bytes,
            partition.length_bytes,
            disk.size_bytes
        );
        let _ = (partition.is_linux_data(), partition.is_extended());
    }
}

/// A disk of `size_bytes` holding `head` at its start and `tail` at its
/// end, zeros in between.
struct Disk {
    head: Vec<u8>,
    tail: Vec<u8>,
    size_bytes: u64,
}

impl Disk {
    fn new(data: &[u8]) -> Disk {
        let (head, tail) = data.split_at(data.len().min(HEAD_BYTES));
        let input_bytes = data.len() as u64;
        let size_bytes = claimed_bytes(head)
            .min(DISK_BYTES_MAX)
            .max(input_bytes)
            .max(HEAD_BYTES as u64);
        Disk {
            head: head.to_vec(),
            tail: tail.to_vec(),
            size_bytes,
        }
    }

    fn tail_start(&self) -> u64 {
        self.size_bytes - self.tail.len() as u64
    }

    /// Writes `bytes` at `offset` where the head or the tail holds them;
    /// bytes falling in the zeros between are dropped.
    fn write_at(&mut self, bytes: &[u8], offset: u64) {
        let tail_start = self.tail_start();
        for (index, &byte) in bytes.iter().enumerate() {
            let at = offset + index as u64;
            if let Some(slot) = usize::try_from(at)
                .ok()
                .and_then(|at| self.head.get_mut(at))
            {
                *slot = byte;
            } else if at >= tail_start
                && let Some(slot) = self.tail.get_mut((at - tail_start) as usize)
            {
                *slot = byte;
            }
        }
    }

    /// For each sector size and each of LBA 1 and the last LBA holding a
    /// GPT signature: the entry array's CRC32, then the header's.
    fn fix_gpt_checksums(&mut self) {
        for sector_bytes in GPT_SECTOR_SIZES_BYTES {
            let sectors = self.size_bytes / sector_bytes;
            if sectors < 3 {
                continue;
            }
            for lba in [1, sectors - 1] {
                self.fix_gpt_header(lba * sector_bytes, sector_bytes as usize);
            }
        }
    }

    fn fix_gpt_header(&mut self, offset: u64, sector_bytes: usize) {
        let mut header = vec![0u8; sector_bytes];
        if self.read_exact_at(&mut header, offset).is_err() || !header.starts_with(b"EFI PART") {
            return;
        }
        let header_bytes = (le32(&header, 12) as usize).clamp(GPT_HEADER_BYTES_MIN, sector_bytes);
        let entries_offset = le64(&header, 72).checked_mul(sector_bytes as u64);
        let entries_bytes = u64::from(le32(&header, 80)) * u64::from(le32(&header, 84));
        if let Some(entries_offset) = entries_offset
            && entries_bytes <= GPT_ENTRIES_BYTES_MAX
        {
            let mut entries = vec![0u8; entries_bytes as usize];
            if self.read_exact_at(&mut entries, entries_offset).is_ok() {
                header[88..92].copy_from_slice(&partition::crc32(&entries).to_le_bytes());
            }
        }
        header[16..20].fill(0);
        let crc = partition::crc32(&header[..header_bytes]);
        header[16..20].copy_from_slice(&crc.to_le_bytes());
        self.write_at(&header[..GPT_HEADER_BYTES_MIN.max(header_bytes)], offset);
    }
}

impl ReadAt for Disk {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.size_bytes)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.fill(0);
        let head_end = self.head.len() as u64;
        if offset < head_end {
            let take = (end.min(head_end) - offset) as usize;
            buf[..take].copy_from_slice(&self.head[offset as usize..offset as usize + take]);
        }
        let tail_start = self.tail_start();
        if end > tail_start {
            let from = offset.max(tail_start);
            let at = (from - offset) as usize;
            let in_tail = (from - tail_start) as usize;
            let take = (end - from) as usize;
            buf[at..at + take].copy_from_slice(&self.tail[in_tail..in_tail + take]);
        }
        Ok(())
    }
}

/// The disk size the tables in `head` claim: the furthest end of an MBR
/// entry (a protective one covers the disk), and the sector after each
/// GPT header's backup LBA.
fn claimed_bytes(head: &[u8]) -> u64 {
    let mut claimed = 0u64;
    if let Some(entries) = head.get(MBR_ENTRIES_OFFSET..MBR_ENTRIES_OFFSET + 64) {
        for entry in entries.chunks_exact(16) {
            let end_sectors = u64::from(le32(entry, 8)) + u64::from(le32(entry, 12));
            claimed = claimed.max(end_sectors * MBR_SECTOR_BYTES);
        }
    }
    for sector_bytes in GPT_SECTOR_SIZES_BYTES {
        let at = sector_bytes as usize;
        if let Some(header) = head.get(at..at + GPT_HEADER_BYTES_MIN)
            && header.starts_with(b"EFI PART")
        {
            let alternate = le64(header, GPT_ALTERNATE_LBA_OFFSET);
            let end = alternate.saturating_add(1).saturating_mul(sector_bytes);
            claimed = claimed.max(end);
        }
    }
    claimed
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default())
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default())
}
