//! `TarError`: what was wrong with an entry, or which read or write
//! failed, naming the entry's path.

use std::io;

/// Why `TarWriter::add` (or `finish`) failed. The errors about the entry
/// itself (everything but `Read`, `Write` and `Broken`) are found before
/// any byte of it is written, so the archive is as it was and may take
/// more entries; after `Read` or `Write` it is not (see `Broken`).
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("tar entry {path}: invalid path: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error(
        "tar entry {path}: {what} of {length_bytes} bytes is longer than the {max_bytes} allowed"
    )]
    TooLong {
        path: String,
        what: &'static str,
        length_bytes: usize,
        max_bytes: usize,
    },
    #[error("tar entry {path}: invalid link target: {reason}")]
    InvalidLinkTarget { path: String, reason: &'static str },
    #[error(
        "tar entry {path}: mode {mode:#o} has bits beyond 0o7777 (pass permission bits only, not the file type)"
    )]
    InvalidMode { path: String, mode: u32 },
    #[error("tar entry {path}: {field} has {nanoseconds} nanoseconds, a second or more")]
    InvalidTime {
        path: String,
        field: &'static str,
        nanoseconds: u32,
    },
    #[error(
        "tar entry {path}: device {major}:{minor} does not fit ustar's devmajor/devminor (at most {max})"
    )]
    DeviceNumberTooLarge {
        path: String,
        major: u32,
        minor: u32,
        max: u64,
    },
    #[error(
        "tar entry {path}: file size {size_bytes} is more than the {max_bytes} bytes tar readers accept"
    )]
    FileTooLarge {
        path: String,
        size_bytes: u64,
        max_bytes: u64,
    },
    #[error("tar entry {path}: data range {index} ({offset_bytes}, {length_bytes}): {reason}")]
    InvalidDataRange {
        path: String,
        index: usize,
        offset_bytes: u64,
        length_bytes: u64,
        reason: &'static str,
    },
    #[error("tar entry {path}: {count} data ranges, more than the {max} allowed")]
    TooManyDataRanges {
        path: String,
        count: usize,
        max: usize,
    },
    #[error("tar entry {path}: xattr {name:?}: {reason}")]
    InvalidXattr {
        path: String,
        name: String,
        reason: &'static str,
    },
    #[error(
        "tar entry {path}: its pax header would take {length_bytes} bytes, more than the {max_bytes} readers accept (fewer or smaller xattrs)"
    )]
    PaxHeaderTooLarge {
        path: String,
        length_bytes: usize,
        max_bytes: usize,
    },
    #[error(
        "tar entry {path}: reading its data at offset {offset_bytes} failed; the archive is incomplete"
    )]
    Read {
        path: String,
        offset_bytes: u64,
        source: io::Error,
    },
    #[error(
        "tar entry {path}: writing the archive failed after {archive_bytes} bytes; the archive is incomplete"
    )]
    Write {
        path: String,
        archive_bytes: u64,
        source: io::Error,
    },
    #[error("the tar archive is incomplete since {first_failure}; remove it and write it again")]
    Broken { first_failure: String },
}

/// A path for messages: UTF-8 as it is, other bytes as `\xNN`, so the
/// bytes that are not text still show.
pub(super) fn display_path(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        text.push_str(chunk.valid());
        for byte in chunk.invalid() {
            text.push_str(&format!("\\x{byte:02x}"));
        }
    }
    text
}
