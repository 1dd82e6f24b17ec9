//! The journal: an append-only file of checksummed records for the current
//! generation (format in docs/journal.md).
//!
//! Layout: a 64-byte file header, then records. Each record is a 32-byte
//! header and a payload padded to 8 bytes. Integers are little-endian.
//!
//! Replay reads records until the first one that does not check out. If no
//! valid record follows it and its bytes stop short of a whole record (or
//! were never written: zeroes), that is a torn tail (a commit cut short:
//! none of the writes it would have allowed were issued) and it is
//! dropped. A whole record whose checksum fails is damage, not a tear,
//! even at the very end of the file; so is a valid record after a bad one.
//! Damage means the file is corrupt: the caller must treat every region as
//! changed.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::regions::RegionRun;

pub const FILE_MAGIC: [u8; 8] = *b"BWJRNL01";
pub const FILE_HEADER_LEN: usize = 64;
pub const RECORD_MAGIC: u32 = 0x4a52_4342; // "BCRJ" in little-endian bytes
pub const RECORD_HEADER_LEN: usize = 32;

// Fixed layouts (docs/journal.md), checked at compile time: the file
// header is magic 8, generation 8, granularity shift 4, image id 16,
// zeroes, crc32c 4 at its end; a record header is magic 4, kind 2,
// zero 2, payload length 4, crc32c 4, sequence 8, zeroes.
const FILE_HEADER_FIELDS_END: usize = 8 + 8 + 4 + 16;
const _: () = assert!(FILE_HEADER_LEN == 64 && FILE_HEADER_FIELDS_END <= FILE_HEADER_LEN - 4);
const RECORD_HEADER_FIELDS_END: usize = 4 + 2 + 2 + 4 + 4 + 8;
const _: () = assert!(RECORD_HEADER_LEN == 32 && RECORD_HEADER_FIELDS_END <= RECORD_HEADER_LEN);
// Payloads are padded to 8 bytes, so records stay 8-aligned after the header.
const _: () = assert!(FILE_HEADER_LEN % 8 == 0 && RECORD_HEADER_LEN % 8 == 0);
/// Largest record payload; checked before allocating on replay.
pub const RECORD_PAYLOAD_MAX: u32 = 4 * 1024 * 1024;
/// Bytes per run in a payload: u64 first region + u64 region count.
const RUN_LEN: usize = 16;
/// Runs per record: keeps every record under `RECORD_PAYLOAD_MAX`.
pub const RUNS_PER_RECORD_MAX: usize = (RECORD_PAYLOAD_MAX as usize - 16) / RUN_LEN;

/// What a record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// These regions are marked changed in the generation: writes to them may be issued.
    Mark { runs: Vec<RegionRun> },
    /// Every region is changed in this generation (state could not be trusted).
    MarkAll { reason: String },
    /// At flush `epoch`, these regions' writes were made durable.
    Saved { epoch: u64, runs: Vec<RegionRun> },
    /// The files (partition, inode) that own flush `epoch`'s saved
    /// regions, from the file map; `more` when there were more than
    /// `SAVED_FILES_MAX`. Informational: replay never needs it.
    SavedFiles {
        epoch: u64,
        files: Vec<(u32, u32)>,
        more: bool,
    },
}

/// Files one SAVED_FILES record lists.
pub const SAVED_FILES_MAX: usize = 256;

const KIND_MARK: u16 = 1;
const KIND_MARK_ALL: u16 = 2;
const KIND_SAVED: u16 = 3;
const KIND_SAVED_FILES: u16 = 4;

/// The journal file header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    pub generation: u64,
    pub granularity_shift: u32,
    pub image_id: [u8; 16],
}

impl FileHeader {
    pub fn encode(&self) -> [u8; FILE_HEADER_LEN] {
        let mut bytes = [0u8; FILE_HEADER_LEN];
        bytes[0..8].copy_from_slice(&FILE_MAGIC);
        bytes[8..16].copy_from_slice(&self.generation.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.granularity_shift.to_le_bytes());
        bytes[20..FILE_HEADER_FIELDS_END].copy_from_slice(&self.image_id);
        let crc = crc32c::crc32c(&bytes[..60]);
        bytes[60..64].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    pub fn decode(bytes: &[u8; FILE_HEADER_LEN]) -> Result<FileHeader, JournalError> {
        if bytes[0..8] != FILE_MAGIC {
            return Err(JournalError::BadFileHeader("wrong magic"));
        }
        if crc32c::crc32c(&bytes[..60]) != le32(&bytes[60..64]) {
            return Err(JournalError::BadFileHeader("checksum mismatch"));
        }
        Ok(FileHeader {
            generation: le64(&bytes[8..16]),
            granularity_shift: le32(&bytes[16..20]),
            image_id: bytes[20..36].try_into().expect("16 bytes"),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal i/o")]
    Io(#[from] io::Error),
    #[error("journal header is invalid: {0}")]
    BadFileHeader(&'static str),
    #[error("journal is corrupt at byte {offset}: {reason}, and valid records follow it")]
    Corrupt { offset: u64, reason: &'static str },
}

/// Appends `record` with sequence number `sequence` to `out`.
pub fn encode_record(record: &Record, sequence: u64, out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + RECORD_HEADER_LEN, 0);
    let kind = match record {
        Record::Mark { runs } => {
            put_runs(out, runs);
            KIND_MARK
        }
        Record::MarkAll { reason } => {
            let reason = &reason.as_bytes()[..reason.len().min(1024)];
            out.extend_from_slice(&(reason.len() as u64).to_le_bytes());
            out.extend_from_slice(reason);
            KIND_MARK_ALL
        }
        Record::Saved { epoch, runs } => {
            out.extend_from_slice(&epoch.to_le_bytes());
            put_runs(out, runs);
            KIND_SAVED
        }
        Record::SavedFiles { epoch, files, more } => {
            assert!(
                files.len() <= SAVED_FILES_MAX,
                "too many files for one record"
            );
            out.extend_from_slice(&epoch.to_le_bytes());
            out.extend_from_slice(&(files.len() as u32).to_le_bytes());
            out.extend_from_slice(&u32::from(*more).to_le_bytes());
            for (partition, inode) in files {
                out.extend_from_slice(&partition.to_le_bytes());
                out.extend_from_slice(&inode.to_le_bytes());
            }
            KIND_SAVED_FILES
        }
    };
    let payload_len = out.len() - start - RECORD_HEADER_LEN;
    assert!(
        payload_len <= RECORD_PAYLOAD_MAX as usize,
        "record over the payload limit"
    );
    out.resize(
        start + RECORD_HEADER_LEN + payload_len.next_multiple_of(8),
        0,
    );
    let header = &mut out[start..start + RECORD_HEADER_LEN];
    header[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    header[4..6].copy_from_slice(&kind.to_le_bytes());
    header[8..12].copy_from_slice(&(payload_len as u32).to_le_bytes());
    header[16..24].copy_from_slice(&sequence.to_le_bytes());
    let crc = record_crc(
        &out[start..start + RECORD_HEADER_LEN],
        &out[start + RECORD_HEADER_LEN..start + RECORD_HEADER_LEN + payload_len],
    );
    out[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
    debug_assert!(
        decode_record(&out[start..], sequence).is_ok(),
        "record must decode as written"
    );
}

fn put_runs(out: &mut Vec<u8>, runs: &[RegionRun]) {
    assert!(
        runs.len() <= RUNS_PER_RECORD_MAX,
        "too many runs for one record"
    );
    out.extend_from_slice(&(runs.len() as u64).to_le_bytes());
    for run in runs {
        out.extend_from_slice(&run.first_region.to_le_bytes());
        out.extend_from_slice(&run.region_count.to_le_bytes());
    }
}

/// crc32c over the header (with its crc field zeroed) and the payload.
fn record_crc(header: &[u8], payload: &[u8]) -> u32 {
    let mut zeroed = [0u8; RECORD_HEADER_LEN];
    zeroed.copy_from_slice(&header[..RECORD_HEADER_LEN]);
    zeroed[12..16].fill(0);
    crc32c::crc32c_append(crc32c::crc32c(&zeroed), payload)
}

/// Decodes the record at the start of `bytes`; returns it and its total
/// length (header + padded payload).
fn decode_record(bytes: &[u8], expected_sequence: u64) -> Result<(Record, usize), &'static str> {
    if bytes.len() < RECORD_HEADER_LEN {
        return Err("short record header");
    }
    let header = &bytes[..RECORD_HEADER_LEN];
    if le32(&header[0..4]) != RECORD_MAGIC {
        return Err("bad record magic");
    }
    let payload_len = le32(&header[8..12]);
    if payload_len > RECORD_PAYLOAD_MAX {
        return Err("record length over the limit");
    }
    let total = RECORD_HEADER_LEN + (payload_len as usize).next_multiple_of(8);
    if bytes.len() < total {
        return Err("short record payload");
    }
    let payload = &bytes[RECORD_HEADER_LEN..RECORD_HEADER_LEN + payload_len as usize];
    if record_crc(header, payload) != le32(&header[12..16]) {
        return Err("record checksum mismatch");
    }
    if le64(&header[16..24]) != expected_sequence {
        return Err("record out of sequence");
    }
    let record = match le16(&header[4..6]) {
        KIND_MARK => Record::Mark {
            runs: get_runs(payload)?,
        },
        KIND_MARK_ALL => {
            let length = le64(payload.get(0..8).ok_or("short payload")?) as usize;
            // A damaged length may be near 2^64: the end must not overflow.
            let reason = payload
                .get(8..8usize.saturating_add(length))
                .ok_or("short payload")?;
            Record::MarkAll {
                reason: String::from_utf8_lossy(reason).into_owned(),
            }
        }
        KIND_SAVED => Record::Saved {
            epoch: le64(payload.get(0..8).ok_or("short payload")?),
            runs: get_runs(&payload[8..])?,
        },
        KIND_SAVED_FILES => get_saved_files(payload)?,
        _ => return Err("unknown record kind"),
    };
    Ok((record, total))
}

fn get_saved_files(payload: &[u8]) -> Result<Record, &'static str> {
    let head = payload.get(0..16).ok_or("short payload")?;
    let count = le32(&head[8..12]) as usize;
    if count > SAVED_FILES_MAX || payload.len() < 16 + count * 8 {
        return Err("file count does not fit the payload");
    }
    let files = (0..count)
        .map(|i| {
            let at = 16 + i * 8;
            (le32(&payload[at..at + 4]), le32(&payload[at + 4..at + 8]))
        })
        .collect();
    Ok(Record::SavedFiles {
        epoch: le64(&head[0..8]),
        files,
        more: le32(&head[12..16]) != 0,
    })
}

fn get_runs(payload: &[u8]) -> Result<Vec<RegionRun>, &'static str> {
    let count = le64(payload.get(0..8).ok_or("short payload")?) as usize;
    if count > RUNS_PER_RECORD_MAX || payload.len() < 8 + count * RUN_LEN {
        return Err("run count does not fit the payload");
    }
    Ok((0..count)
        .map(|i| {
            let at = 8 + i * RUN_LEN;
            RegionRun {
                first_region: le64(&payload[at..at + 8]),
                region_count: le64(&payload[at + 8..at + 16]),
            }
        })
        .collect())
}

/// What replay found.
#[derive(Debug)]
pub struct Replay {
    pub header: FileHeader,
    pub records: Vec<Record>,
    /// Where the next record goes (the torn tail, if any, starts here).
    pub end_offset: u64,
    pub next_sequence: u64,
    /// Bytes dropped from a torn tail.
    pub torn_bytes: u64,
}

/// Reads the whole journal. The file is small: it is compacted at every checkpoint.
pub fn replay(file: &File) -> Result<Replay, JournalError> {
    let length = file.metadata()?.len();
    let mut bytes = vec![
        0u8;
        usize::try_from(length)
            .map_err(|_| JournalError::BadFileHeader("file too large"))?
    ];
    file.read_exact_at(&mut bytes, 0)?;
    if bytes.len() < FILE_HEADER_LEN {
        return Err(JournalError::BadFileHeader("file shorter than its header"));
    }
    let header = FileHeader::decode(bytes[..FILE_HEADER_LEN].try_into().expect("64 bytes"))?;
    let mut offset = FILE_HEADER_LEN;
    let mut sequence = 1;
    let mut records = Vec::new();
    while offset < bytes.len() {
        match decode_record(&bytes[offset..], sequence) {
            Ok((record, total)) => {
                records.push(record);
                offset += total;
                sequence += 1;
            }
            Err(reason) => {
                if any_valid_record_after(&bytes, offset + 8)
                    || is_whole_damaged_record(&bytes[offset..], sequence)
                {
                    return Err(JournalError::Corrupt {
                        offset: offset as u64,
                        reason,
                    });
                }
                break;
            }
        }
    }
    Ok(Replay {
        header,
        records,
        end_offset: offset as u64,
        next_sequence: sequence,
        torn_bytes: (bytes.len() - offset) as u64,
    })
}

/// Whether `rest`, a record that failed to decode and everything after it
/// to the end of the file, is one whole record with damaged bytes rather
/// than a tear. A tear stops short: the file ends before the record does,
/// or what follows was never written (zeroes). The record is whole when
/// its length field says it ends where the file does, or, should the
/// damage be in its magic or its length, when its checksum matches with
/// them set to what a record ending at the end of the file has.
fn is_whole_damaged_record(rest: &[u8], sequence: u64) -> bool {
    if rest.len() < RECORD_HEADER_LEN || rest.iter().all(|&b| b == 0) {
        return false;
    }
    let declared = le32(&rest[8..12]);
    if declared <= RECORD_PAYLOAD_MAX
        && RECORD_HEADER_LEN + (declared as usize).next_multiple_of(8) == rest.len()
    {
        return true;
    }
    let payload_room = rest.len() - RECORD_HEADER_LEN;
    if payload_room % 8 != 0 || payload_room > RECORD_PAYLOAD_MAX as usize {
        return false;
    }
    let stored_crc = le32(&rest[12..16]);
    let mut header = [0u8; RECORD_HEADER_LEN];
    header.copy_from_slice(&rest[..RECORD_HEADER_LEN]);
    header[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    header[16..24].copy_from_slice(&sequence.to_le_bytes());
    (payload_room.saturating_sub(7)..=payload_room).any(|length| {
        header[8..12].copy_from_slice(&(length as u32).to_le_bytes());
        record_crc(
            &header,
            &rest[RECORD_HEADER_LEN..RECORD_HEADER_LEN + length],
        ) == stored_crc
    })
}

/// Looks for any record with a valid checksum at an 8-byte boundary from `from`.
fn any_valid_record_after(bytes: &[u8], from: usize) -> bool {
    let mut offset = from.next_multiple_of(8);
    while offset + RECORD_HEADER_LEN <= bytes.len() {
        if le32(&bytes[offset..offset + 4]) == RECORD_MAGIC {
            let sequence = le64(&bytes[offset + 16..offset + 24]);
            if decode_record(&bytes[offset..], sequence).is_ok() {
                return true;
            }
        }
        offset += 8;
    }
    false
}

/// Where the writer's bytes go: the journal file, or a test wrapper that
/// models what survives a power loss.
pub trait JournalFile: Send + Sync + std::fmt::Debug {
    fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()>;
    fn sync_data(&self) -> io::Result<()>;
    fn set_len(&self, length: u64) -> io::Result<()>;
}

impl JournalFile for File {
    fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, bytes, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
    fn set_len(&self, length: u64) -> io::Result<()> {
        File::set_len(self, length)
    }
}

/// The writer: appends encoded records and makes them durable.
#[derive(Debug)]
pub struct JournalWriter {
    file: Box<dyn JournalFile>,
    end_offset: u64,
    next_sequence: u64,
}

impl JournalWriter {
    /// Starts a new, empty journal in `file` (truncating it) and syncs it.
    pub fn create(file: Box<dyn JournalFile>, header: FileHeader) -> io::Result<JournalWriter> {
        file.set_len(0)?;
        file.write_all_at(&header.encode(), 0)?;
        file.sync_data()?;
        Ok(JournalWriter {
            file,
            end_offset: FILE_HEADER_LEN as u64,
            next_sequence: 1,
        })
    }

    /// Continues a replayed journal, cutting off a torn tail.
    pub fn resume(file: Box<dyn JournalFile>, replay: &Replay) -> io::Result<JournalWriter> {
        if replay.torn_bytes > 0 {
            file.set_len(replay.end_offset)?;
            file.sync_data()?;
        }
        Ok(JournalWriter {
            file,
            end_offset: replay.end_offset,
            next_sequence: replay.next_sequence,
        })
    }

    /// Encodes records into one buffer and writes it (not yet durable).
    /// A failed write leaves the writer where it was: its offset and its
    /// sequence numbers are those of the records that failed.
    pub fn append(&mut self, records: &[Record]) -> io::Result<()> {
        let mut bytes = Vec::new();
        let mut sequence = self.next_sequence;
        for record in records {
            encode_record(record, sequence, &mut bytes);
            sequence += 1;
        }
        self.file.write_all_at(&bytes, self.end_offset)?;
        self.end_offset += bytes.len() as u64;
        self.next_sequence = sequence;
        Ok(())
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    pub fn size_bytes(&self) -> u64 {
        self.end_offset
    }
}

fn le16(bytes: &[u8]) -> u16 {
    u16::from_le_bytes(bytes[..2].try_into().expect("two bytes"))
}
fn le32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[..4].try_into().expect("four bytes"))
}
fn le64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().expect("eight bytes"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A new empty file for one test, opened for reading and writing.
    pub(crate) fn temp_file(name: &str) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("journal-test-{}-{name}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        (path, file)
    }

    /// Found by the journal_replay fuzz target: `8 + length` overflowed.
    #[test]
    fn a_mark_all_reason_length_near_2_64_is_damage_not_an_overflow() {
        let (path, file) = temp_file("reason-length-overflow");
        let mut bytes = header().encode().to_vec();
        let start = bytes.len();
        let reason = Record::MarkAll { reason: "x".into() };
        encode_record(&reason, 1, &mut bytes);
        let payload = start + RECORD_HEADER_LEN;
        bytes[payload..payload + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let payload_len = le32(&bytes[start + 8..start + 12]) as usize;
        let crc = record_crc(
            &bytes[start..payload],
            &bytes[payload..payload + payload_len],
        );
        bytes[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
        FileExt::write_all_at(&file, &bytes, 0).unwrap();
        assert!(matches!(
            replay(&file),
            Err(JournalError::Corrupt {
                reason: "short payload",
                ..
            })
        ));
        std::fs::remove_file(path).unwrap();
    }

    fn header() -> FileHeader {
        FileHeader {
            generation: 7,
            granularity_shift: 16,
            image_id: [9; 16],
        }
    }

    fn sample_records() -> Vec<Record> {
        vec![
            Record::Mark {
                runs: vec![RegionRun {
                    first_region: 1,
                    region_count: 3,
                }],
            },
            Record::Saved {
                epoch: 1,
                runs: vec![RegionRun {
                    first_region: 2,
                    region_count: 1,
                }],
            },
            Record::MarkAll {
                reason: "test".into(),
            },
        ]
    }

    #[test]
    fn records_round_trip_through_the_file() {
        let (path, file) = temp_file("roundtrip");
        let mut writer =
            JournalWriter::create(Box::new(file.try_clone().unwrap()), header()).unwrap();
        writer.append(&sample_records()).unwrap();
        writer.sync().unwrap();
        let replayed = replay(&file).unwrap();
        assert_eq!(replayed.header, header());
        assert_eq!(replayed.records, sample_records());
        assert_eq!(replayed.next_sequence, 4);
        assert_eq!(replayed.torn_bytes, 0);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_torn_tail_is_dropped_at_every_cut() {
        let (path, file) = temp_file("torn");
        let mut writer =
            JournalWriter::create(Box::new(file.try_clone().unwrap()), header()).unwrap();
        writer.append(&sample_records()).unwrap();
        let full = std::fs::read(&path).unwrap();
        let first_two_end = {
            let mut bytes = Vec::new();
            encode_record(&sample_records()[0], 1, &mut bytes);
            encode_record(&sample_records()[1], 2, &mut bytes);
            FILE_HEADER_LEN + bytes.len()
        };
        for cut in first_two_end..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let file = File::open(&path).unwrap();
            let replayed = replay(&file).unwrap();
            assert_eq!(replayed.records, sample_records()[..2], "cut at {cut}");
            assert_eq!(replayed.end_offset, first_two_end as u64);
        }
        std::fs::remove_file(path).unwrap();
    }

    /// Regression: a flipped byte inside the journal's last record (all of
    /// its bytes present) was taken for a torn tail and the record
    /// dropped, so the write it marked was missed. Every byte of the last
    /// record, and of every record of the last commit, is damage now.
    #[test]
    fn a_damaged_byte_in_the_last_commit_is_damage_not_a_torn_tail() {
        let (path, file) = temp_file("damaged-tail");
        let mut writer =
            JournalWriter::create(Box::new(file.try_clone().unwrap()), header()).unwrap();
        writer.append(&sample_records()[..1]).unwrap();
        writer.sync().unwrap();
        // The last commit: two records in one write.
        writer.append(&sample_records()[1..]).unwrap();
        writer.sync().unwrap();
        let full = std::fs::read(&path).unwrap();
        let first_end = {
            let mut bytes = Vec::new();
            encode_record(&sample_records()[0], 1, &mut bytes);
            FILE_HEADER_LEN + bytes.len()
        };
        for index in first_end..full.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bytes = full.clone();
                bytes[index] ^= flip;
                std::fs::write(&path, &bytes).unwrap();
                let file = File::open(&path).unwrap();
                match replay(&file) {
                    Err(JournalError::Corrupt { .. }) => {}
                    // Padding is not part of a record's contents.
                    Ok(replayed) if replayed.records == sample_records() => {}
                    other => panic!("byte {index} ^ {flip:#x}: {other:?}"),
                }
            }
        }
        // Never-written bytes after a whole record are a tear still.
        let mut bytes = full.clone();
        bytes.extend_from_slice(&[0u8; 4096]);
        std::fs::write(&path, &bytes).unwrap();
        let replayed = replay(&File::open(&path).unwrap()).unwrap();
        assert_eq!(replayed.records, sample_records());
        assert_eq!(replayed.torn_bytes, 4096);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn corruption_before_valid_records_is_reported() {
        let (path, file) = temp_file("corrupt");
        let mut writer =
            JournalWriter::create(Box::new(file.try_clone().unwrap()), header()).unwrap();
        writer.append(&sample_records()).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[FILE_HEADER_LEN + RECORD_HEADER_LEN + 8] ^= 0xff; // first record's payload
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        assert!(matches!(replay(&file), Err(JournalError::Corrupt { .. })));
        bytes[3] ^= 0xff; // and the file header
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        assert!(matches!(replay(&file), Err(JournalError::BadFileHeader(_))));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_huge_length_is_refused_before_allocating() {
        let mut bytes = Vec::new();
        encode_record(&sample_records()[0], 1, &mut bytes);
        bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode_record(&bytes, 1).unwrap_err(),
            "record length over the limit"
        );
    }

    #[test]
    fn saved_files_round_trip_and_more_than_the_maximum_is_refused() {
        let most: Vec<(u32, u32)> = (0..SAVED_FILES_MAX as u32)
            .map(|index| (index % 5, index * 7 + 11))
            .collect();
        let cases = [
            Record::SavedFiles {
                epoch: 0,
                files: vec![],
                more: false,
            },
            Record::SavedFiles {
                epoch: 42,
                files: vec![(0, 2), (1, 12), (128, u32::MAX)],
                more: false,
            },
            Record::SavedFiles {
                epoch: u64::MAX,
                files: most,
                more: true,
            },
        ];
        for (index, record) in cases.iter().enumerate() {
            let sequence = index as u64 + 5;
            let mut bytes = Vec::new();
            encode_record(record, sequence, &mut bytes);
            assert_eq!(bytes.len() % 8, 0, "case {index}: records are padded to 8");
            assert_eq!(
                decode_record(&bytes, sequence),
                Ok((record.clone(), bytes.len())),
                "case {index}"
            );
        }

        // A record that is well formed (checksum, length, sequence) but
        // lists `count` files: built by hand, as encode_record refuses to.
        let saved_files_bytes = |count: usize| {
            let mut payload = Vec::new();
            payload.extend_from_slice(&9u64.to_le_bytes());
            payload.extend_from_slice(&(count as u32).to_le_bytes());
            payload.extend_from_slice(&1u32.to_le_bytes());
            for inode in 0..count as u32 {
                payload.extend_from_slice(&1u32.to_le_bytes());
                payload.extend_from_slice(&(inode + 11).to_le_bytes());
            }
            let mut bytes = vec![0u8; RECORD_HEADER_LEN];
            bytes[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
            bytes[4..6].copy_from_slice(&KIND_SAVED_FILES.to_le_bytes());
            bytes[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
            bytes[16..24].copy_from_slice(&1u64.to_le_bytes());
            let crc = record_crc(&bytes, &payload);
            bytes[12..16].copy_from_slice(&crc.to_le_bytes());
            bytes.extend_from_slice(&payload);
            bytes.resize(bytes.len().next_multiple_of(8), 0);
            bytes
        };
        // The hand-built layout is right: at the maximum it decodes.
        match decode_record(&saved_files_bytes(SAVED_FILES_MAX), 1) {
            Ok((Record::SavedFiles { epoch, files, more }, _)) => {
                assert_eq!((epoch, files.len(), more), (9, SAVED_FILES_MAX, true));
            }
            other => panic!("a hand-built record at the maximum must decode: {other:?}"),
        }
        assert_eq!(
            decode_record(&saved_files_bytes(SAVED_FILES_MAX + 1), 1).unwrap_err(),
            "file count does not fit the payload"
        );
    }
}
