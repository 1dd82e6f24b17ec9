//! MBR (with extended partitions) and GPT partition tables, read so that the
//! map can find the filesystems on a whole-disk export.
//!
//! Sector 0 decides what the disk is:
//! - a protective MBR (any entry of type 0xEE) means GPT; the GPT header is
//!   looked for at LBA 1 with 512-byte and then 4096-byte sectors, and when
//!   the primary copy is corrupt, the backup at the last LBA is used (and
//!   `TableReport::used_backup` says so). No valid GPT under a protective
//!   MBR is an error, not "no table": the disk says it is partitioned.
//! - a DOS MBR whose entries are sane (boot flag 0x00 or 0x80, every used
//!   entry inside the device) is read with its EBR chains. MBR LBAs always
//!   count 512-byte sectors here.
//! - anything else (a bare filesystem, a FAT or NTFS boot sector, which
//!   also ends in 0x55AA) is `Table::None`, unless LBA 1 holds a GPT header
//!   that validates (a GPT whose protective MBR was wiped). A GPT found only
//!   by its backup at the end of the disk is not believed without a
//!   protective MBR: `mkfs` on a former GPT disk leaves that backup behind.
//!
//! Numbers are Linux's: MBR primaries 1-4 by slot, logical partitions from 5
//! in chain order, GPT entries by index + 1. An extended partition (types
//! 0x05, 0x0F, 0x85) is reported under its slot number with its type and
//! its whole extent, as `sfdisk` lists it; `Partition::is_extended` picks it
//! out and it is never `is_linux_data`.
//!
//! Every field read from the disk is checked before it is used, counts are
//! checked against the `*_MAX` constants before anything is allocated, and
//! no input makes this module panic. A table that claims to be there but is
//! broken is `PartitionError::Corrupt`, saying where.

use std::collections::BTreeSet;
use std::io;
use std::ops::Range;

use crate::read::ReadAt;

/// MBR LBAs count 512-byte sectors whatever the device's sector size.
pub const MBR_SECTOR_BYTES: u64 = 512;
/// GPT LBAs count logical sectors; these are the sizes probed, in order.
pub const GPT_SECTOR_SIZES_BYTES: [u64; 2] = [512, 4096];
/// Logical partitions (and so EBRs read) per extended partition; Linux's
/// own limit on partitions per disk is 256, and tools stop well before.
pub const LOGICAL_PARTITIONS_MAX: u32 = 128;
/// GPT entries read from one array: the usual array has 128.
pub const GPT_ENTRIES_MAX: u32 = 4096;
/// Largest GPT entry accepted; with `GPT_ENTRIES_MAX` this bounds the
/// array read into memory at 4 MiB.
pub const GPT_ENTRY_BYTES_MAX: u32 = 1024;
const GPT_ENTRY_BYTES_MIN: u32 = 128;
const GPT_HEADER_BYTES_MIN: u32 = 92;
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
/// Revision 1.0 is 0x00010000; a later minor revision keeps the layout.
const GPT_REVISION_MAJOR: u32 = 1;

const MBR_SIGNATURE: [u8; 2] = [0x55, 0xAA];
const MBR_SIGNATURE_OFFSET: usize = 510;
const MBR_ENTRIES_OFFSET: usize = 446;
const MBR_ENTRY_BYTES: usize = 16;
const MBR_TYPE_PROTECTIVE: u8 = 0xEE;
const MBR_TYPE_LINUX: u8 = 0x83;
const MBR_TYPES_EXTENDED: [u8; 3] = [0x05, 0x0F, 0x85];
const FIRST_LOGICAL_NUMBER: u32 = 5;

/// GPT type 0FC63DAF-8483-4772-8E79-3D69D8477DE4 ("Linux filesystem") as
/// stored on disk: the first three fields little-endian, the rest as is.
pub const LINUX_FILESYSTEM_GUID: [u8; 16] = [
    0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D, 0xE4,
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based, as Linux numbers them (MBR logical partitions start at 5).
    pub number: u32,
    pub start_bytes: u64,
    pub length_bytes: u64,
    pub kind: PartitionKind,
    /// GPT partition name (UTF-16LE decoded); empty for MBR.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionKind {
    Mbr {
        type_byte: u8,
    },
    /// Both GUIDs in their on-disk (mixed-endian) byte order; `guid_string`
    /// gives the text form.
    Gpt {
        type_guid: [u8; 16],
        unique_guid: [u8; 16],
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Table {
    None,
    Mbr(Vec<Partition>),
    Gpt(Vec<Partition>),
}

/// What `read_table_report` found, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableReport {
    pub table: Table,
    /// What the table's LBAs count: 512, or 4096 for a GPT written for a
    /// 4096-byte-sector disk. 512 when there is no table.
    pub sector_size_bytes: u64,
    /// The primary GPT header or its entry array was corrupt, and the
    /// partitions come from the backup header at the last LBA. The caller
    /// should say so: the next write of the table should repair it.
    pub used_backup: bool,
    /// Why the primary GPT was rejected; `Some` exactly when `used_backup`.
    pub primary_problem: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("reading the partition table")]
    Io(#[from] io::Error),
    #[error("corrupt partition table: {0}")]
    Corrupt(String),
}

fn corrupt(what: impl Into<String>) -> PartitionError {
    PartitionError::Corrupt(what.into())
}

impl Partition {
    /// Holds a Linux filesystem by its type: MBR 0x83 or GPT "Linux
    /// filesystem". Other types (swap, LVM, RAID, ESP) are not looked into.
    pub fn is_linux_data(&self) -> bool {
        match &self.kind {
            PartitionKind::Mbr { type_byte } => *type_byte == MBR_TYPE_LINUX,
            PartitionKind::Gpt { type_guid, .. } => *type_guid == LINUX_FILESYSTEM_GUID,
        }
    }

    /// The MBR container of logical partitions, not a filesystem.
    pub fn is_extended(&self) -> bool {
        matches!(self.kind, PartitionKind::Mbr { type_byte } if MBR_TYPES_EXTENDED.contains(&type_byte))
    }
}

/// The canonical text form of a GUID stored in GPT's mixed-endian layout,
/// in upper case as the UEFI specification and `sfdisk` write it.
pub fn guid_string(guid: &[u8; 16]) -> String {
    // The first three fields are little-endian on disk, the last two are
    // bytes in text order.
    let time_low = u32::from_le_bytes([guid[0], guid[1], guid[2], guid[3]]);
    let time_mid = u16::from_le_bytes([guid[4], guid[5]]);
    let time_high = u16::from_le_bytes([guid[6], guid[7]]);
    let tail: String = guid[8..].iter().map(|byte| format!("{byte:02X}")).collect();
    format!(
        "{time_low:08X}-{time_mid:04X}-{time_high:04X}-{}-{}",
        &tail[..4],
        &tail[4..]
    )
}

/// The partition table of a device of `device_size_bytes`, or `Table::None`
/// when it has none. See the module comment for how the kind is decided.
pub fn read_table<R: ReadAt>(device: &R, device_size_bytes: u64) -> Result<Table, PartitionError> {
    read_table_report(device, device_size_bytes).map(|report| report.table)
}

/// `read_table`, also saying which sector size the table counts in and
/// whether a corrupt primary GPT was passed over for its backup.
pub fn read_table_report<R: ReadAt>(
    device: &R,
    device_size_bytes: u64,
) -> Result<TableReport, PartitionError> {
    let no_table = TableReport {
        table: Table::None,
        sector_size_bytes: MBR_SECTOR_BYTES,
        used_backup: false,
        primary_problem: None,
    };
    if device_size_bytes < MBR_SECTOR_BYTES {
        return Ok(no_table);
    }
    let mut sector = [0u8; MBR_SECTOR_BYTES as usize];
    device.read_exact_at(&mut sector, 0)?;
    let device_sectors = device_size_bytes / MBR_SECTOR_BYTES;
    match classify_sector_zero(&sector, device_sectors) {
        SectorZero::Protective => read_gpt(device, device_size_bytes, false)?.ok_or_else(|| {
            corrupt(
                "protective MBR (type 0xEE) but no GPT header at LBA 1 or at the last LBA \
                 for 512- or 4096-byte sectors",
            )
        }),
        SectorZero::Dos(entries) => Ok(TableReport {
            table: Table::Mbr(read_mbr(device, &entries, device_sectors)?),
            ..no_table
        }),
        // Without a protective MBR a GPT is only believed if its primary
        // copy validates: a broken one is more likely stale bytes than a
        // table.
        SectorZero::Other => match read_gpt(device, device_size_bytes, true) {
            Ok(Some(report)) => Ok(report),
            Ok(None) | Err(PartitionError::Corrupt(_)) => Ok(no_table),
            Err(error) => Err(error),
        },
    }
}

// ---------------------------------------------------------------- MBR

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MbrEntry {
    boot_flag: u8,
    type_byte: u8,
    /// Relative to whatever the table's rules say (0, the EBR, or the
    /// extended partition).
    start_sectors: u64,
    length_sectors: u64,
}

impl MbrEntry {
    fn is_used(&self) -> bool {
        self.type_byte != 0
    }
    fn is_extended(&self) -> bool {
        MBR_TYPES_EXTENDED.contains(&self.type_byte)
    }
}

fn mbr_entries(sector: &[u8; MBR_SECTOR_BYTES as usize]) -> [MbrEntry; 4] {
    std::array::from_fn(|slot| {
        let entry = &sector[MBR_ENTRIES_OFFSET + slot * MBR_ENTRY_BYTES..][..MBR_ENTRY_BYTES];
        MbrEntry {
            boot_flag: entry[0],
            type_byte: entry[4],
            start_sectors: u64::from(le32(entry, 8)),
            length_sectors: u64::from(le32(entry, 12)),
        }
    })
}

fn has_mbr_signature(sector: &[u8]) -> bool {
    sector.get(MBR_SIGNATURE_OFFSET..MBR_SIGNATURE_OFFSET + 2) == Some(&MBR_SIGNATURE[..])
}

enum SectorZero {
    Protective,
    Dos([MbrEntry; 4]),
    Other,
}

fn classify_sector_zero(
    sector: &[u8; MBR_SECTOR_BYTES as usize],
    device_sectors: u64,
) -> SectorZero {
    if !has_mbr_signature(sector) {
        return SectorZero::Other;
    }
    let entries = mbr_entries(sector);
    // Checked before sanity: a protective entry covers min(disk, 2 TiB) and
    // may legitimately claim more than a small image holds.
    if entries
        .iter()
        .any(|entry| entry.type_byte == MBR_TYPE_PROTECTIVE)
    {
        return SectorZero::Protective;
    }
    if is_filesystem_boot_sector(sector) {
        return SectorZero::Other;
    }
    let sane = entries.iter().all(|entry| {
        let boot_flag_valid = entry.boot_flag == 0x00 || entry.boot_flag == 0x80;
        let inside_device = !entry.is_used()
            || (entry.start_sectors >= 1
                && entry.length_sectors >= 1
                && entry.start_sectors + entry.length_sectors <= device_sectors);
        boot_flag_valid && inside_device
    });
    if sane {
        SectorZero::Dos(entries)
    } else {
        SectorZero::Other
    }
}

/// A FAT or NTFS boot sector also ends in 0x55AA, and its boot code sits
/// where the partition entries would be. These are the names `mkfs.fat`,
/// `mkfs.exfat` and `mkntfs` always write, after an x86 jump.
fn is_filesystem_boot_sector(sector: &[u8; MBR_SECTOR_BYTES as usize]) -> bool {
    let jump = (sector[0] == 0xEB && sector[2] == 0x90) || sector[0] == 0xE9;
    let named = &sector[3..11] == b"NTFS    "
        || &sector[3..11] == b"EXFAT   "
        || &sector[54..59] == b"FAT12"
        || &sector[54..59] == b"FAT16"
        || &sector[82..87] == b"FAT32";
    jump && named
}

fn read_mbr<R: ReadAt>(
    device: &R,
    entries: &[MbrEntry; 4],
    device_sectors: u64,
) -> Result<Vec<Partition>, PartitionError> {
    let mut partitions = Vec::new();
    let mut next_logical_number = FIRST_LOGICAL_NUMBER;
    for (slot, entry) in (1u32..).zip(entries) {
        if !entry.is_used() {
            continue;
        }
        partitions.push(mbr_partition(
            slot,
            entry.type_byte,
            entry.start_sectors,
            entry.length_sectors,
        ));
        if entry.is_extended() {
            read_logical_partitions(
                device,
                entry,
                device_sectors,
                &mut next_logical_number,
                &mut partitions,
            )?;
        }
    }
    // Numbers in order, as Linux and `sfdisk` list them: logical
    // partitions after the fourth slot.
    partitions.sort_by_key(|partition| partition.number);
    Ok(partitions)
}

fn mbr_partition(number: u32, type_byte: u8, start_sectors: u64, length_sectors: u64) -> Partition {
    // Both are below 2^33 (a u32 plus a u32), so the products fit.
    Partition {
        number,
        start_bytes: start_sectors * MBR_SECTOR_BYTES,
        length_bytes: length_sectors * MBR_SECTOR_BYTES,
        kind: PartitionKind::Mbr { type_byte },
        name: String::new(),
    }
}

/// Follows the EBR chain of `extended` (already checked to lie inside the
/// device). Each EBR's first entry is a logical partition relative to that
/// EBR; its second entry links to the next EBR relative to the start of
/// the extended partition. The chain is bounded and a loop is an error.
fn read_logical_partitions<R: ReadAt>(
    device: &R,
    extended: &MbrEntry,
    device_sectors: u64,
    next_number: &mut u32,
    partitions: &mut Vec<Partition>,
) -> Result<(), PartitionError> {
    let extended_sectors = extended.start_sectors..extended.start_sectors + extended.length_sectors;
    assert!(
        extended_sectors.end <= device_sectors,
        "checked by classify_sector_zero"
    );
    let mut visited = BTreeSet::new();
    let mut ebr_sector = extended_sectors.start;
    for ebr_index in 0..LOGICAL_PARTITIONS_MAX {
        if !visited.insert(ebr_sector) {
            return Err(corrupt(format!(
                "EBR chain loops back to sector {ebr_sector}"
            )));
        }
        let mut sector = [0u8; MBR_SECTOR_BYTES as usize];
        device.read_exact_at(&mut sector, ebr_sector * MBR_SECTOR_BYTES)?;
        if !has_mbr_signature(&sector) {
            // An extended partition nobody has put a logical partition in
            // may start with anything; a linked EBR must be one.
            if ebr_index == 0 {
                return Ok(());
            }
            return Err(corrupt(format!(
                "EBR at sector {ebr_sector} has no 0x55AA signature"
            )));
        }
        let [logical, link, ..] = mbr_entries(&sector);
        if logical.is_used() {
            let partition =
                logical_partition(*next_number, ebr_sector, &logical, &extended_sectors)?;
            partitions.push(partition);
            *next_number += 1;
        }
        match next_ebr_sector(ebr_sector, &link, &extended_sectors)? {
            Some(next) => ebr_sector = next,
            None => return Ok(()),
        }
    }
    Err(corrupt(format!(
        "EBR chain of the extended partition at sector {} is longer than \
         {LOGICAL_PARTITIONS_MAX} (LOGICAL_PARTITIONS_MAX)",
        extended_sectors.start
    )))
}

/// The logical partition in the EBR at `ebr_sector`, which must lie inside
/// the extended partition and after its EBR.
fn logical_partition(
    number: u32,
    ebr_sector: u64,
    logical: &MbrEntry,
    extended_sectors: &Range<u64>,
) -> Result<Partition, PartitionError> {
    // Sectors are u32 + u32 + u32 at most: no overflow.
    let start_sectors = ebr_sector + logical.start_sectors;
    let end_sectors = start_sectors + logical.length_sectors;
    if logical.is_extended()
        || logical.start_sectors == 0
        || logical.length_sectors == 0
        || end_sectors > extended_sectors.end
    {
        return Err(corrupt(format!(
            "logical partition in the EBR at sector {ebr_sector}: type 0x{:02X}, \
             sectors {start_sectors}..{end_sectors} outside the extended partition \
             {extended_sectors:?} or empty",
            logical.type_byte
        )));
    }
    Ok(mbr_partition(
        number,
        logical.type_byte,
        start_sectors,
        logical.length_sectors,
    ))
}

/// Where the EBR at `ebr_sector` links to, or `None` at the end of the chain.
fn next_ebr_sector(
    ebr_sector: u64,
    link: &MbrEntry,
    extended_sectors: &Range<u64>,
) -> Result<Option<u64>, PartitionError> {
    if !link.is_used() {
        return Ok(None);
    }
    let next = extended_sectors.start + link.start_sectors;
    if !link.is_extended() || link.start_sectors == 0 || !extended_sectors.contains(&next) {
        return Err(corrupt(format!(
            "EBR at sector {ebr_sector} links to type 0x{:02X} at sector {next}, \
             not to an EBR inside the extended partition {extended_sectors:?}",
            link.type_byte
        )));
    }
    Ok(Some(next))
}

// ---------------------------------------------------------------- GPT

/// The fields of a GPT header used after validation.
#[derive(Debug, Clone, Copy)]
struct GptHeader {
    first_usable_lba: u64,
    last_usable_lba: u64,
    entries_lba: u64,
    entry_count: u32,
    entry_bytes: u32,
    entries_crc32: u32,
}

/// Looks for a GPT with each sector size in turn. `Ok(None)` when no
/// header signature is where one would be. With `primary_only`, only the
/// header at LBA 1 is looked at and believed.
fn read_gpt<R: ReadAt>(
    device: &R,
    device_size_bytes: u64,
    primary_only: bool,
) -> Result<Option<TableReport>, PartitionError> {
    let mut first_error = None;
    for sector_size_bytes in GPT_SECTOR_SIZES_BYTES {
        match read_gpt_with_sector_size(device, device_size_bytes, sector_size_bytes, primary_only)
        {
            Ok(Some(report)) => return Ok(Some(report)),
            Ok(None) => {}
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(None),
    }
}

fn read_gpt_with_sector_size<R: ReadAt>(
    device: &R,
    device_size_bytes: u64,
    sector_size_bytes: u64,
    primary_only: bool,
) -> Result<Option<TableReport>, PartitionError> {
    let device_sectors = device_size_bytes / sector_size_bytes;
    // Protective MBR, header and at least one sector of entries.
    if device_sectors < 3 {
        return Ok(None);
    }
    let last_lba = device_sectors - 1;
    let primary = read_sector(device, sector_size_bytes, 1)?;
    let primary_signed = primary.starts_with(GPT_SIGNATURE);
    if !primary_signed && primary_only {
        return Ok(None);
    }
    let primary_problem =
        match read_gpt_copy(device, &primary, 1, sector_size_bytes, device_sectors) {
            Ok(partitions) => return Ok(Some(gpt_report(partitions, sector_size_bytes, None))),
            Err(problem) if !primary_only => problem,
            Err(problem) => return Err(problem),
        };
    // Read only now: a good primary needs nothing from the end of the disk.
    let backup = read_sector(device, sector_size_bytes, last_lba)?;
    if !primary_signed && !backup.starts_with(GPT_SIGNATURE) {
        return Ok(None);
    }
    let backup_problem =
        match read_gpt_copy(device, &backup, last_lba, sector_size_bytes, device_sectors) {
            Ok(partitions) => {
                let problem = problem_text(&primary_problem);
                return Ok(Some(gpt_report(
                    partitions,
                    sector_size_bytes,
                    Some(problem),
                )));
            }
            Err(problem) => problem,
        };
    match (primary_problem, backup_problem) {
        // An I/O error is the operator's to fix first; "corrupt" would mislead.
        (PartitionError::Io(error), _) | (_, PartitionError::Io(error)) => {
            Err(PartitionError::Io(error))
        }
        (primary_problem, backup_problem) => Err(corrupt(format!(
            "GPT with {sector_size_bytes}-byte sectors: primary header at LBA 1: {}; \
             backup header at LBA {last_lba}: {}",
            problem_text(&primary_problem),
            problem_text(&backup_problem)
        ))),
    }
}

/// The detail of a problem with one GPT copy, without the error's prefix,
/// so that two of them read as one sentence.
fn problem_text(problem: &PartitionError) -> String {
    match problem {
        PartitionError::Io(error) => format!("reading it: {error}"),
        PartitionError::Corrupt(detail) => detail.clone(),
    }
}

fn gpt_report(
    partitions: Vec<Partition>,
    sector_size_bytes: u64,
    primary_problem: Option<String>,
) -> TableReport {
    TableReport {
        table: Table::Gpt(partitions),
        sector_size_bytes,
        used_backup: primary_problem.is_some(),
        primary_problem,
    }
}

fn read_sector<R: ReadAt>(
    device: &R,
    sector_size_bytes: u64,
    lba: u64,
) -> Result<Vec<u8>, PartitionError> {
    // The caller checked `lba` is below the device's sector count, so the
    // offset fits; the size is one of ours, not the disk's.
    let mut sector = vec![0u8; sector_size_bytes as usize];
    device.read_exact_at(&mut sector, lba * sector_size_bytes)?;
    Ok(sector)
}

/// One copy of the GPT: the header in `sector`, read from `header_lba`,
/// and the entry array it points to.
fn read_gpt_copy<R: ReadAt>(
    device: &R,
    sector: &[u8],
    header_lba: u64,
    sector_size_bytes: u64,
    device_sectors: u64,
) -> Result<Vec<Partition>, PartitionError> {
    let header =
        parse_gpt_header(sector, header_lba, sector_size_bytes, device_sectors).map_err(corrupt)?;
    // Bounded by GPT_ENTRIES_MAX * GPT_ENTRY_BYTES_MAX, checked above.
    let entries_bytes = u64::from(header.entry_count) * u64::from(header.entry_bytes);
    let mut entries = vec![0u8; entries_bytes as usize];
    device.read_exact_at(&mut entries, header.entries_lba * sector_size_bytes)?;
    let actual_crc32 = crc32(&entries);
    if actual_crc32 != header.entries_crc32 {
        return Err(corrupt(format!(
            "entry array at LBA {} has CRC32 {actual_crc32:08X}, header says {:08X}",
            header.entries_lba, header.entries_crc32
        )));
    }
    let mut partitions = Vec::new();
    for (number, entry) in (1u32..).zip(entries.chunks_exact(header.entry_bytes as usize)) {
        if let Some(partition) = parse_gpt_entry(entry, number, &header, sector_size_bytes)? {
            partitions.push(partition);
        }
    }
    Ok(partitions)
}

/// Checks every header field this module relies on; the error says which.
fn parse_gpt_header(
    sector: &[u8],
    header_lba: u64,
    sector_size_bytes: u64,
    device_sectors: u64,
) -> Result<GptHeader, String> {
    if !sector.starts_with(GPT_SIGNATURE) {
        return Err("no \"EFI PART\" signature".into());
    }
    let revision = le32(sector, 8);
    if revision >> 16 != GPT_REVISION_MAJOR {
        return Err(format!("revision {revision:08X}, expected 0001xxxx"));
    }
    let header_bytes = le32(sector, 12);
    if header_bytes < GPT_HEADER_BYTES_MIN || header_bytes as usize > sector.len() {
        return Err(format!(
            "header size {header_bytes} bytes outside {GPT_HEADER_BYTES_MIN}..={}",
            sector.len()
        ));
    }
    let mut zeroed = sector[..header_bytes as usize].to_vec();
    zeroed[16..20].fill(0);
    let (stored_crc32, actual_crc32) = (le32(sector, 16), crc32(&zeroed));
    if stored_crc32 != actual_crc32 {
        return Err(format!(
            "header CRC32 {actual_crc32:08X}, header says {stored_crc32:08X}"
        ));
    }
    let my_lba = le64(sector, 24);
    if my_lba != header_lba {
        return Err(format!(
            "header says it is at LBA {my_lba}, was read from LBA {header_lba}"
        ));
    }
    let header = GptHeader {
        first_usable_lba: le64(sector, 40),
        last_usable_lba: le64(sector, 48),
        entries_lba: le64(sector, 72),
        entry_count: le32(sector, 80),
        entry_bytes: le32(sector, 84),
        entries_crc32: le32(sector, 88),
    };
    check_gpt_layout(&header, header_lba, sector_size_bytes, device_sectors)?;
    Ok(header)
}

/// The usable range, the entry size and count, and where the entry array
/// lies: inside the device, clear of the header and of the usable range.
fn check_gpt_layout(
    header: &GptHeader,
    header_lba: u64,
    sector_size_bytes: u64,
    device_sectors: u64,
) -> Result<(), String> {
    let (first, last) = (header.first_usable_lba, header.last_usable_lba);
    if first == 0 || first > last || last >= device_sectors || (first..=last).contains(&header_lba)
    {
        return Err(format!(
            "usable LBAs {first}..={last} outside the device's {device_sectors} sectors \
             or over the header"
        ));
    }
    let entry_bytes = header.entry_bytes;
    if entry_bytes < GPT_ENTRY_BYTES_MIN
        || entry_bytes % 8 != 0
        || entry_bytes > GPT_ENTRY_BYTES_MAX
    {
        return Err(format!(
            "entry size {entry_bytes} bytes: not a multiple of 8 in \
             {GPT_ENTRY_BYTES_MIN}..={GPT_ENTRY_BYTES_MAX} (GPT_ENTRY_BYTES_MAX)"
        ));
    }
    if header.entry_count > GPT_ENTRIES_MAX {
        return Err(format!(
            "{} entries, more than {GPT_ENTRIES_MAX} (GPT_ENTRIES_MAX)",
            header.entry_count
        ));
    }
    // At most 4 MiB by the two limits above: no overflow.
    let entries_bytes = u64::from(header.entry_count) * u64::from(entry_bytes);
    let entries_start = header.entries_lba;
    let entries_end = entries_start.saturating_add(entries_bytes.div_ceil(sector_size_bytes));
    let entries = entries_start..entries_end;
    let overlaps_usable = !entries.is_empty() && entries_start <= last && first < entries_end;
    if entries_start == 0
        || entries_end > device_sectors
        || entries.contains(&header_lba)
        || overlaps_usable
    {
        return Err(format!(
            "entry array at LBAs {entries_start}..{entries_end} outside the device's \
             {device_sectors} sectors or over the header or the usable LBAs {first}..={last}"
        ));
    }
    Ok(())
}

fn parse_gpt_entry(
    entry: &[u8],
    number: u32,
    header: &GptHeader,
    sector_size_bytes: u64,
) -> Result<Option<Partition>, PartitionError> {
    let type_guid: [u8; 16] = entry[0..16]
        .try_into()
        .expect("an entry is at least 128 bytes");
    if type_guid == [0; 16] {
        return Ok(None);
    }
    let unique_guid: [u8; 16] = entry[16..32]
        .try_into()
        .expect("an entry is at least 128 bytes");
    let (first_lba, last_lba) = (le64(entry, 32), le64(entry, 40));
    if first_lba > last_lba
        || first_lba < header.first_usable_lba
        || last_lba > header.last_usable_lba
    {
        return Err(corrupt(format!(
            "GPT entry {number}: LBAs {first_lba}..={last_lba} outside the usable {}..={}",
            header.first_usable_lba, header.last_usable_lba
        )));
    }
    let name_units: Vec<u16> = entry[56..128]
        .chunks_exact(2)
        .map(|unit| u16::from_le_bytes([unit[0], unit[1]]))
        .take_while(|&unit| unit != 0)
        .collect();
    // last_usable_lba < device_sectors, so these fit in the device's size.
    Ok(Some(Partition {
        number,
        start_bytes: first_lba * sector_size_bytes,
        length_bytes: (last_lba - first_lba + 1) * sector_size_bytes,
        kind: PartitionKind::Gpt {
            type_guid,
            unique_guid,
        },
        name: String::from_utf16_lossy(&name_units),
    }))
}

// ---------------------------------------------------------------- bytes

/// IEEE CRC-32 (reflected polynomial 0xEDB88320), as GPT uses; not the
/// CRC-32C the ext4 metadata checksums use. Public so tools that build or
/// repair GPTs (the fuzz target) use the same one.
pub fn crc32(bytes: &[u8]) -> u32 {
    !bytes.iter().fold(!0u32, |crc, &byte| {
        CRC32_TABLE[((crc ^ u32::from(byte)) & 0xFF) as usize] ^ (crc >> 8)
    })
}

const CRC32_TABLE: [u32; 256] = crc32_table();

const fn crc32_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut index = 0;
    while index < 256 {
        let mut value = index as u32;
        let mut bit = 0;
        while bit < 8 {
            value = if value & 1 == 1 {
                (value >> 1) ^ 0xEDB8_8320
            } else {
                value >> 1
            };
            bit += 1;
        }
        table[index] = value;
        index += 1;
    }
    table
}

// Offsets are this module's constants inside buffers of a fixed size, so
// the slicing cannot fail on any input.
fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    let mut array = [0u8; 8];
    array.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(array)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::read::Bytes;
    use crate::testing::Random;

    const EFI_SYSTEM_GUID: [u8; 16] = [
        0x28, 0x73, 0x2A, 0xC1, 0x1F, 0xF8, 0xD2, 0x11, 0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9,
        0x3B,
    ];
    /// Entries per array and bytes per entry in the images built here, as
    /// every common tool writes them.
    const ENTRY_COUNT: u32 = 128;
    const ENTRY_BYTES: usize = 128;

    /// Damages a test image in one way.
    type Break = fn(&mut Vec<u8>);

    fn put_mbr_entry(sector: &mut [u8], slot: usize, boot_flag: u8, entry: (u8, u32, u32)) {
        let (type_byte, start_sectors, length_sectors) = entry;
        let at = MBR_ENTRIES_OFFSET + slot * MBR_ENTRY_BYTES;
        sector[at] = boot_flag;
        sector[at + 4] = type_byte;
        sector[at + 8..at + 12].copy_from_slice(&start_sectors.to_le_bytes());
        sector[at + 12..at + 16].copy_from_slice(&length_sectors.to_le_bytes());
        sector[MBR_SIGNATURE_OFFSET..MBR_SIGNATURE_OFFSET + 2].copy_from_slice(&MBR_SIGNATURE);
    }

    /// An EBR at `ebr_sector`: a logical partition (relative to the EBR)
    /// and a link (relative to `extended_start`), either absent.
    fn put_ebr(
        image: &mut [u8],
        ebr_sector: u64,
        logical: Option<(u8, u32, u32)>,
        link: Option<(u32, u32)>,
    ) {
        let at = (ebr_sector * MBR_SECTOR_BYTES) as usize;
        let sector = &mut image[at..at + 512];
        sector[MBR_ENTRIES_OFFSET..MBR_SIGNATURE_OFFSET].fill(0);
        sector[MBR_SIGNATURE_OFFSET..].copy_from_slice(&MBR_SIGNATURE);
        if let Some(logical) = logical {
            put_mbr_entry(sector, 0, 0, logical);
        }
        if let Some((start, length)) = link {
            put_mbr_entry(sector, 1, 0, (0x05, start, length));
        }
    }

    fn mbr(number: u32, type_byte: u8, start_sectors: u64, length_sectors: u64) -> Partition {
        mbr_partition(number, type_byte, start_sectors, length_sectors)
    }

    fn report(image: &[u8]) -> Result<TableReport, PartitionError> {
        read_table_report(&Bytes(image.to_vec()), image.len() as u64)
    }

    fn corrupt_message(result: Result<TableReport, PartitionError>) -> String {
        match result {
            Err(PartitionError::Corrupt(message)) => message,
            other => panic!("expected a corrupt table, got {other:?}"),
        }
    }

    /// Primaries in slots 1, 3 (extended) and 4 with slot 2 empty, and two
    /// logical partitions in the extended one.
    fn mbr_image() -> Vec<u8> {
        let mut image = vec![0u8; 8192 * 512];
        put_mbr_entry(&mut image, 0, 0x80, (0x83, 2048, 1000));
        put_mbr_entry(&mut image, 2, 0, (0x0F, 4096, 2048));
        put_mbr_entry(&mut image, 3, 0, (0x07, 6144, 2048));
        put_ebr(&mut image, 4096, Some((0x83, 63, 100)), Some((1000, 200)));
        put_ebr(&mut image, 5096, Some((0x82, 50, 150)), None);
        image
    }

    #[test]
    fn crc32_is_the_ieee_one() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn guids_read_in_their_mixed_endian_order() {
        assert_eq!(
            guid_string(&LINUX_FILESYSTEM_GUID),
            "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
        );
        assert_eq!(
            guid_string(&EFI_SYSTEM_GUID),
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
        );
    }

    #[test]
    fn an_mbr_lists_primaries_by_slot_then_logical_partitions_from_5() {
        let found = report(&mbr_image()).unwrap();
        let expected = vec![
            mbr(1, 0x83, 2048, 1000),
            mbr(3, 0x0F, 4096, 2048),
            mbr(4, 0x07, 6144, 2048),
            mbr(5, 0x83, 4096 + 63, 100),
            mbr(6, 0x82, 5096 + 50, 150),
        ];
        assert_eq!(found.table, Table::Mbr(expected));
        assert_eq!(found.sector_size_bytes, 512);
        assert!(!found.used_backup);
        let Table::Mbr(partitions) = found.table else {
            unreachable!()
        };
        let linux: Vec<u32> = partitions
            .iter()
            .filter(|partition| partition.is_linux_data())
            .map(|partition| partition.number)
            .collect();
        assert_eq!(linux, [1, 5]);
        assert!(partitions[1].is_extended() && !partitions[1].is_linux_data());
    }

    #[test]
    fn an_extended_partition_without_logical_partitions_is_listed_alone() {
        let mut image = vec![0u8; 8192 * 512];
        put_mbr_entry(&mut image, 0, 0, (0x83, 2048, 1000));
        put_mbr_entry(&mut image, 1, 0, (0x05, 4096, 2048));
        let expected = Table::Mbr(vec![mbr(1, 0x83, 2048, 1000), mbr(2, 0x05, 4096, 2048)]);
        // Both what sfdisk writes (an EBR with only a signature) and what
        // some tools leave (nothing at all).
        assert_eq!(report(&image).unwrap().table, expected);
        put_ebr(&mut image, 4096, None, None);
        assert_eq!(report(&image).unwrap().table, expected);
    }

    #[test]
    fn an_ebr_loop_is_corrupt() {
        let mut image = mbr_image();
        // EBR 2 (at 5096) links to EBR 3 (at 5196), which links back.
        put_ebr(&mut image, 5096, Some((0x82, 50, 40)), Some((1100, 100)));
        put_ebr(&mut image, 5196, Some((0x83, 10, 40)), Some((1000, 200)));
        let message = corrupt_message(report(&image));
        assert!(message.contains("loops back to sector 5096"), "{message}");
    }

    #[test]
    fn an_ebr_chain_longer_than_the_limit_is_corrupt() {
        let chain_length = LOGICAL_PARTITIONS_MAX + 1;
        let mut image = vec![0u8; 4096 * 512];
        put_mbr_entry(&mut image, 0, 0, (0x05, 2048, 2048));
        for index in 0..chain_length {
            let link = (index + 1 < chain_length).then_some(((index + 1) * 2, 2));
            put_ebr(
                &mut image,
                2048 + u64::from(index) * 2,
                Some((0x83, 1, 1)),
                link,
            );
        }
        let message = corrupt_message(report(&image));
        assert!(message.contains("LOGICAL_PARTITIONS_MAX"), "{message}");
        // One fewer fits.
        put_ebr(
            &mut image,
            2048 + u64::from(chain_length - 2) * 2,
            Some((0x83, 1, 1)),
            None,
        );
        let Table::Mbr(partitions) = report(&image).unwrap().table else {
            panic!("not an MBR")
        };
        assert_eq!(partitions.len() as u32, 1 + LOGICAL_PARTITIONS_MAX);
        assert_eq!(
            partitions.last().unwrap().number,
            4 + LOGICAL_PARTITIONS_MAX
        );
    }

    #[test]
    fn broken_ebrs_are_corrupt() {
        let cases: [(&str, Break); 4] = [
            ("logical partition past the extended partition", |image| {
                put_ebr(image, 5096, Some((0x82, 50, 5000)), None)
            }),
            ("link outside the extended partition", |image| {
                put_ebr(image, 4096, Some((0x83, 63, 100)), Some((2048, 1)))
            }),
            ("link to a type that is not extended", |image| {
                put_mbr_entry(&mut image[4096 * 512..4097 * 512], 1, 0, (0x83, 1000, 200))
            }),
            ("linked EBR without a signature", |image| {
                image[5096 * 512 + 510] = 0
            }),
        ];
        for (what, break_it) in cases {
            let mut image = mbr_image();
            break_it(&mut image);
            assert!(
                matches!(report(&image), Err(PartitionError::Corrupt(_))),
                "{what}"
            );
        }
    }

    #[test]
    fn sectors_that_only_look_like_an_mbr_are_no_table() {
        let mut fat = vec![0u8; 8192 * 512];
        fat[0..3].copy_from_slice(&[0xEB, 0x3C, 0x90]);
        fat[3..11].copy_from_slice(b"mkfs.fat");
        fat[11..13].copy_from_slice(&512u16.to_le_bytes());
        fat[54..62].copy_from_slice(b"FAT16   ");
        fat[510..512].copy_from_slice(&MBR_SIGNATURE);
        // Boot code where the entries would be that happens to look sane.
        put_mbr_entry(&mut fat, 0, 0, (0x0E, 1, 1));
        let mut bad_boot_flag = mbr_image();
        bad_boot_flag[MBR_ENTRIES_OFFSET + 16] = 0x12;
        let mut past_the_end = mbr_image();
        put_mbr_entry(&mut past_the_end, 1, 0, (0x83, 8000, 193));
        let mut starts_at_zero = mbr_image();
        put_mbr_entry(&mut starts_at_zero, 1, 0, (0x83, 0, 10));
        let mut bare_ext4 = vec![0u8; 8192 * 512];
        bare_ext4[1024 + 0x38..1024 + 0x3A].copy_from_slice(&0xEF53u16.to_le_bytes());
        for (what, image) in [
            ("FAT boot sector", fat),
            ("boot flag 0x12", bad_boot_flag),
            ("entry past the device", past_the_end),
            ("entry at sector 0", starts_at_zero),
            ("bare ext4", bare_ext4),
            ("zeros", vec![0u8; 4096]),
            ("shorter than a sector", vec![0x55; 100]),
        ] {
            assert_eq!(report(&image).unwrap().table, Table::None, "{what}");
        }
    }

    #[test]
    fn an_mbr_with_only_a_signature_is_an_empty_table() {
        let mut image = vec![0u8; 4096];
        image[510..512].copy_from_slice(&MBR_SIGNATURE);
        assert_eq!(report(&image).unwrap().table, Table::Mbr(Vec::new()));
    }

    // ------------------------------------------------------------ GPT

    struct EntrySpec {
        index: usize,
        type_guid: [u8; 16],
        first_lba: u64,
        last_lba: u64,
        name: &'static str,
    }

    fn entries_sectors(sector_size_bytes: usize) -> u64 {
        (ENTRY_COUNT as usize * ENTRY_BYTES).div_ceil(sector_size_bytes) as u64
    }

    /// A protective MBR, both GPT headers and both entry arrays, laid out
    /// as `sfdisk` lays them out.
    fn gpt_image(sector_size_bytes: usize, sectors: u64, specs: &[EntrySpec]) -> Vec<u8> {
        let mut image = vec![0u8; sector_size_bytes * sectors as usize];
        let protective_sectors = (image.len() as u64 / 512 - 1).min(u64::from(u32::MAX)) as u32;
        put_mbr_entry(
            &mut image,
            0,
            0,
            (MBR_TYPE_PROTECTIVE, 1, protective_sectors),
        );
        let mut entries = vec![0u8; ENTRY_COUNT as usize * ENTRY_BYTES];
        for spec in specs {
            let entry = &mut entries[spec.index * ENTRY_BYTES..][..ENTRY_BYTES];
            entry[0..16].copy_from_slice(&spec.type_guid);
            entry[16..32].fill(spec.index as u8 + 1);
            entry[32..40].copy_from_slice(&spec.first_lba.to_le_bytes());
            entry[40..48].copy_from_slice(&spec.last_lba.to_le_bytes());
            for (unit, chunk) in spec
                .name
                .encode_utf16()
                .zip(entry[56..].chunks_exact_mut(2))
            {
                chunk.copy_from_slice(&unit.to_le_bytes());
            }
        }
        let last_lba = sectors - 1;
        let array_sectors = entries_sectors(sector_size_bytes);
        let usable = (2 + array_sectors, last_lba - 1 - array_sectors);
        for (header_lba, alternate_lba, entries_lba) in
            [(1, last_lba, 2), (last_lba, 1, last_lba - array_sectors)]
        {
            let at = entries_lba as usize * sector_size_bytes;
            image[at..at + entries.len()].copy_from_slice(&entries);
            let header = &mut image[header_lba as usize * sector_size_bytes..][..92];
            header[0..8].copy_from_slice(GPT_SIGNATURE);
            header[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            header[12..16].copy_from_slice(&92u32.to_le_bytes());
            header[24..32].copy_from_slice(&header_lba.to_le_bytes());
            header[32..40].copy_from_slice(&alternate_lba.to_le_bytes());
            header[40..48].copy_from_slice(&usable.0.to_le_bytes());
            header[48..56].copy_from_slice(&usable.1.to_le_bytes());
            header[56..72].fill(0xD1);
            header[72..80].copy_from_slice(&entries_lba.to_le_bytes());
            header[80..84].copy_from_slice(&ENTRY_COUNT.to_le_bytes());
            header[84..88].copy_from_slice(&(ENTRY_BYTES as u32).to_le_bytes());
            header[88..92].copy_from_slice(&crc32(&entries).to_le_bytes());
            seal_header(&mut image, sector_size_bytes, header_lba);
        }
        image
    }

    /// Recomputes a header's CRC after a test changed it, so that the
    /// checks behind the CRC are the ones exercised. Any header size works.
    fn seal_header(image: &mut [u8], sector_size_bytes: usize, header_lba: u64) {
        let sector = &mut image[header_lba as usize * sector_size_bytes..][..sector_size_bytes];
        let header_bytes = (le32(sector, 12) as usize).clamp(20, sector_size_bytes);
        sector[16..20].fill(0);
        let crc = crc32(&sector[..header_bytes]);
        sector[16..20].copy_from_slice(&crc.to_le_bytes());
    }

    fn specs() -> Vec<EntrySpec> {
        vec![
            EntrySpec {
                index: 0,
                type_guid: LINUX_FILESYSTEM_GUID,
                first_lba: 40,
                last_lba: 59,
                name: "root fs",
            },
            // A gap at index 1: numbers follow the index, as Linux's do.
            EntrySpec {
                index: 2,
                type_guid: EFI_SYSTEM_GUID,
                first_lba: 60,
                last_lba: 90,
                name: "données ✓",
            },
        ]
    }

    fn expected_gpt(sector_size_bytes: u64) -> Table {
        let partition = |number: u32, spec: &EntrySpec| Partition {
            number,
            start_bytes: spec.first_lba * sector_size_bytes,
            length_bytes: (spec.last_lba - spec.first_lba + 1) * sector_size_bytes,
            kind: PartitionKind::Gpt {
                type_guid: spec.type_guid,
                unique_guid: [number as u8; 16],
            },
            name: spec.name.to_string(),
        };
        let specs = specs();
        Table::Gpt(vec![partition(1, &specs[0]), partition(3, &specs[1])])
    }

    #[test]
    fn a_gpt_with_512_byte_sectors_is_read_from_its_primary_header() {
        let image = gpt_image(512, 128, &specs());
        let found = report(&image).unwrap();
        assert_eq!(found.table, expected_gpt(512));
        assert_eq!(found.sector_size_bytes, 512);
        assert!(!found.used_backup && found.primary_problem.is_none());
        let Table::Gpt(partitions) = found.table else {
            unreachable!()
        };
        assert!(partitions[0].is_linux_data() && !partitions[1].is_linux_data());
    }

    #[test]
    fn a_gpt_with_4096_byte_sectors_is_found_too() {
        let image = gpt_image(4096, 128, &specs());
        let found = report(&image).unwrap();
        assert_eq!(found.table, expected_gpt(4096));
        assert_eq!(found.sector_size_bytes, 4096);
        assert!(!found.used_backup);
    }

    #[test]
    fn a_gpt_without_its_protective_mbr_is_read_if_it_validates() {
        let mut image = gpt_image(512, 128, &specs());
        image[..512].fill(0);
        assert_eq!(report(&image).unwrap().table, expected_gpt(512));
        // Without the protective MBR, a broken primary is not a table, and
        // a lone backup (mkfs over a former GPT disk) is not either.
        image[512 + 20] ^= 1;
        assert_eq!(report(&image).unwrap().table, Table::None);
        image[512..1024].fill(0);
        assert_eq!(report(&image).unwrap().table, Table::None);
    }

    /// A change to the primary GPT (header at byte 512, entries from 1024).
    #[derive(Clone, Copy)]
    enum Damage {
        /// Flip a bit, leaving the CRCs as they were.
        Flip(usize),
        /// Set a header field and recompute the header CRC, so that the
        /// checks behind the CRC are the ones reached.
        Field32(usize, u32),
        Field64(usize, u64),
    }

    /// Each way the primary copy can be wrong, with what the report says.
    #[test]
    fn a_corrupt_primary_gpt_falls_back_to_the_backup() {
        use Damage::{Field32, Field64, Flip};
        let cases = [
            ("header CRC", Flip(20), "header CRC32"),
            ("entry array", Flip(512 + 130), "entry array at LBA 2"),
            ("signature", Flip(0), "signature"),
            ("revision", Field32(8, 0x0002_0000), "revision"),
            ("header too small", Field32(12, 91), "header size"),
            ("header too big", Field32(12, 513), "header size"),
            ("my LBA", Field64(24, 2), "read from LBA 1"),
            ("usable past end", Field64(48, 128), "usable LBAs"),
            ("usable from 0", Field64(40, 0), "usable LBAs"),
            ("entry size odd", Field32(84, 130), "entry size"),
            ("entry size small", Field32(84, 64), "entry size"),
            ("entry size huge", Field32(84, 1 << 20), "entry size"),
            ("entry count", Field32(80, u32::MAX), "GPT_ENTRIES_MAX"),
            ("entries past end", Field64(72, 120), "entry array at LBAs"),
            ("entries on usable", Field64(72, 40), "entry array at LBAs"),
            ("entries on header", Field64(72, 1), "entry array at LBAs"),
            ("entries at LBA 0", Field64(72, 0), "entry array at LBAs"),
        ];
        for (what, damage, says) in cases {
            let mut image = gpt_image(512, 128, &specs());
            let header = &mut image[512..];
            match damage {
                Flip(at) => header[at] ^= 1,
                Field32(at, value) => header[at..at + 4].copy_from_slice(&value.to_le_bytes()),
                Field64(at, value) => header[at..at + 8].copy_from_slice(&value.to_le_bytes()),
            }
            if !matches!(damage, Flip(_)) {
                seal_header(&mut image, 512, 1);
            }
            let found = report(&image).unwrap_or_else(|error| panic!("{what}: {error}"));
            assert_eq!(found.table, expected_gpt(512), "{what}");
            assert!(found.used_backup, "{what}");
            let problem = found.primary_problem.unwrap();
            assert!(problem.contains(says), "{what}: {problem}");
        }
    }

    #[test]
    fn a_gpt_with_both_copies_corrupt_is_an_error_naming_both() {
        let mut image = gpt_image(512, 128, &specs());
        image[512 + 20] ^= 1;
        image[127 * 512 + 20] ^= 1;
        let message = corrupt_message(report(&image));
        assert!(
            message.contains("LBA 1: header CRC32") && message.contains("LBA 127: header CRC32"),
            "{message}"
        );
    }

    #[test]
    fn a_protective_mbr_without_a_gpt_is_an_error() {
        let mut image = vec![0u8; 128 * 512];
        put_mbr_entry(&mut image, 0, 0, (MBR_TYPE_PROTECTIVE, 1, u32::MAX));
        let message = corrupt_message(report(&image));
        assert!(message.contains("protective MBR"), "{message}");
    }

    #[test]
    fn a_gpt_entry_outside_the_usable_lbas_is_corrupt() {
        for (first_lba, last_lba) in [(10, 50), (40, 100), (60, 50)] {
            let mut specs = specs();
            specs[0].first_lba = first_lba;
            specs[0].last_lba = last_lba;
            let message = corrupt_message(report(&gpt_image(512, 128, &specs)));
            assert!(message.contains("GPT entry 1"), "{message}");
        }
    }

    // ------------------------------------------------------ garbage

    /// Whatever the input, no panic, and whatever is reported lies inside
    /// the device.
    fn check_survives(image: &[u8]) {
        let device_size_bytes = image.len() as u64;
        if let Ok(found) = read_table_report(&Bytes(image.to_vec()), device_size_bytes) {
            if let Table::Mbr(partitions) | Table::Gpt(partitions) = found.table {
                for partition in partitions {
                    let end = partition.start_bytes + partition.length_bytes;
                    assert!(partition.length_bytes > 0 && end <= device_size_bytes);
                }
            }
        }
    }

    /// An MBR-shaped sector with entries of the given scale: mostly valid
    /// boot flags, extended types often, the protective type rarely.
    fn random_mbr_sector(random: &mut Random, sector: &mut [u8], scale_sectors: u64) {
        const TYPES: [u8; 10] = [0, 0, 0, 0x83, 0x07, 0x82, 0x05, 0x0F, 0x85, 0xEE];
        for slot in 0..4 {
            let mut type_byte = TYPES[random.below(TYPES.len() as u64) as usize];
            if type_byte == MBR_TYPE_PROTECTIVE && random.below(8) != 0 {
                type_byte = 0x83;
            }
            let start = random.below(scale_sectors) as u32;
            let length = random.below(scale_sectors) as u32;
            let boot_flag =
                [0x00, 0x80, 0x00, 0x80, 0x00, 0x80, 0x00, 0x01][random.below(8) as usize];
            put_mbr_entry(sector, slot, boot_flag, (type_byte, start, length));
        }
    }

    /// An EBR with a logical partition and a link a few sectors away,
    /// each sometimes absent or of the wrong type.
    fn random_ebr(random: &mut Random, sector: &mut [u8]) {
        let logical_type = [0, 0x83, 0x82, 0x05][random.below(4) as usize];
        let logical = (
            logical_type,
            1 + random.below(4) as u32,
            1 + random.below(8) as u32,
        );
        put_mbr_entry(sector, 0, 0, logical);
        let link_type = [0x05, 0x05, 0x0F, 0x85, 0, 0x83][random.below(6) as usize];
        let link = (
            link_type,
            random.below(16) as u32,
            1 + random.below(16) as u32,
        );
        put_mbr_entry(sector, 1, 0, link);
    }

    #[test]
    fn random_sectors_never_panic() {
        let mut random = Random(0x5EED_0F7A_B1E5);
        let sectors = 256u64;
        for _ in 0..3000 {
            let mut image = vec![0u8; sectors as usize * 512];
            random_mbr_sector(&mut random, &mut image[..512], sectors / 2);
            // An extended partition with EBRs packed at its start, linking
            // to each other with small offsets: chains, loops, overruns.
            let extended_start = 1 + random.below(64);
            let extended_length = 1 + random.below(sectors - extended_start);
            let slot = random.below(4) as usize;
            put_mbr_entry(
                &mut image,
                slot,
                0,
                (0x05, extended_start as u32, extended_length as u32),
            );
            for _ in 0..8 {
                let at = (extended_start + random.below(16)) as usize * 512;
                if random.below(8) == 0 {
                    for byte in &mut image[at..at + 512] {
                        *byte = random.next() as u8;
                    }
                } else {
                    random_ebr(&mut random, &mut image[at..at + 512]);
                }
            }
            check_survives(&image);
        }
    }

    #[test]
    fn mutated_tables_never_panic() {
        let mut random = Random(0xC0FF_EE00_D15C);
        let originals = [
            (gpt_image(512, 128, &specs()), 512usize),
            (gpt_image(4096, 64, &specs()), 4096),
            (mbr_image(), 512),
        ];
        for round in 0..4000 {
            let (original, sector_size_bytes) = &originals[round % originals.len()];
            let mut image = original.clone();
            for _ in 0..1 + random.below(6) {
                // Mostly the interesting sectors: 0, 1 and the EBRs.
                let at = match random.below(4) {
                    0 => random.below(image.len() as u64),
                    1 => random.below(1024),
                    2 => *sector_size_bytes as u64 + random.below(96),
                    _ => 4096 * 512 + random.below(1024 * 512 + 1024),
                } as usize;
                if let Some(byte) = image.get_mut(at) {
                    *byte = random.next() as u8;
                }
            }
            if random.below(2) == 0 && *sector_size_bytes == 512 && image.len() > 1024 {
                seal_header(&mut image, 512, 1);
            }
            check_survives(&image);
            // Also as if the device were shorter than the table says.
            let shorter = image.len() - random.below(image.len() as u64) as usize;
            check_survives(&image[..shorter]);
        }
    }
}
