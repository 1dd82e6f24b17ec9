//! A POSIX pax tar writer, for the files a backup changed: GNU tar (1.34)
//! and bsdtar (libarchive 3.6) extract what it writes, sparse files kept
//! sparse, with xattrs and nanosecond times (docs/tar.md is the format).
//!
//! File data does not come from a `Read` of a real file but from a
//! callback, `read(offset, buf)`, because it comes out of a block-device
//! backup: the entry says which byte ranges hold data, the writer asks
//! for exactly those, in order, and everything else is a hole.
//!
//! ```
//! use copier::tar::{Entry, EntryKind, TarWriter};
//!
//! let mut tar = TarWriter::new(Vec::new());
//! let image = vec![7u8; 8192];
//! let file = Entry {
//!     path: b"var/lib/disk.img".to_vec(),
//!     // 1 GiB, data in its first 8 KiB only: a sparse member.
//!     kind: EntryKind::File { size_bytes: 1 << 30, data: vec![(0, 8192)] },
//!     mode: 0o640,
//!     uid: 0,
//!     gid: 6,
//!     mtime: (1_700_000_000, 123_456_789),
//!     atime: None,
//!     ctime: None,
//!     xattrs: vec![("user.comment".to_string(), b"from the backup".to_vec())],
//! };
//! tar.add(&file, &mut |offset, buf| {
//!     let start = offset as usize;
//!     buf.copy_from_slice(&image[start..start + buf.len()]);
//!     Ok(())
//! })?;
//! tar.add_bytes(b".blockwatch/deleted", b"etc/old.conf\n", (1_700_000_000, 0))?;
//! let archive = tar.finish()?;
//! assert_eq!(archive.len() % 512, 0);
//! # Ok::<(), copier::tar::TarError>(())
//! ```
//!
//! Files and what each owns:
//! - `header.rs`: the ustar header block: fields, octal, checksum, the
//!   prefix/name split, stand-in names for what goes into pax.
//! - `pax.rs`: extended header records (`LEN key=value\n`) and times.
//! - `sparse.rs`: data ranges checked; plain or GNU sparse 1.0 layout and
//!   its map.
//! - `member.rs`: an entry checked and turned into its headers.
//! - `writer.rs`: `TarWriter`: members, data through the callback, the
//!   end of the archive, what a failure leaves.
//! - `error.rs`: `TarError`, naming the entry.

mod error;
mod header;
mod member;
mod pax;
mod sparse;
mod writer;

#[cfg(test)]
mod tests;

pub use error::TarError;
pub use writer::TarWriter;

/// The longest path or link target an entry may have. Linux's own limit
/// (PATH_MAX) is 4 KiB per call, but a path relative to a filesystem's
/// root can be longer; this bounds the pax record and the copies made of it.
pub const PATH_BYTES_MAX: usize = 64 << 10;
/// Linux's limit on an xattr name (XATTR_NAME_MAX).
pub const XATTR_NAME_BYTES_MAX: usize = 255;
/// Linux's limit on an xattr value (XATTR_SIZE_MAX).
pub const XATTR_VALUE_BYTES_MAX: usize = 64 << 10;
/// The largest extended header written: libarchive 3.6 refuses a larger
/// one as "Special header too large" (docs/tar.md).
pub const PAX_HEADER_BYTES_MAX: usize = 1 << 20;
/// The most data ranges one file may have. Its map then takes at most
/// about 40 MiB of the archive; GNU tar holds the whole map in memory
/// while it extracts.
pub const DATA_RANGES_MAX: usize = 1 << 20;
/// The largest file size: readers hold sizes in a signed 64-bit `off_t`.
pub const FILE_BYTES_MAX: u64 = i64::MAX as u64;
/// The most bytes one call of the read callback is asked for.
pub const READ_CHUNK_BYTES_MAX: usize = 1 << 20;

/// What an entry is, and what only that kind has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file of `size_bytes`. `data` lists the byte ranges
    /// `(offset, length)` that hold data: sorted, not overlapping, none
    /// empty, inside the file; every other byte reads as zero (a hole).
    /// Ranges that cover the whole file make a plain member; any hole
    /// makes a GNU sparse file, pax format 1.0, which GNU tar and bsdtar
    /// both extract as a sparse file.
    File {
        size_bytes: u64,
        data: Vec<(u64, u64)>,
    },
    Directory,
    Symlink {
        target: Vec<u8>,
    },
    /// A hard link to `target`, an entry written earlier in this archive
    /// (the writer does not keep a list of paths to check it against).
    HardLink {
        target: Vec<u8>,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// One archive member. Times are `(seconds since 1970, nanoseconds)`,
/// nanoseconds below 10^9; seconds may be negative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative (no leading `/`), without empty or `..` components or NUL
    /// bytes, at most `PATH_BYTES_MAX`; any other bytes, UTF-8 or not.
    /// A directory's may end in `/`; it is written with one either way.
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits with setuid, setgid and sticky: at most 0o7777.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, u32),
    pub atime: Option<(i64, u32)>,
    /// Recorded for listings; no extractor can set a ctime.
    pub ctime: Option<(i64, u32)>,
    /// Full names (`user.comment`, `security.selinux`) and raw values.
    pub xattrs: Vec<(String, Vec<u8>)>,
}
