//! `TarWriter`: members written one after the other, file data pulled
//! through the caller's read callback in bounded chunks.

use std::io::{self, Write};

use super::error::{TarError, display_path};
use super::header::BLOCK_BYTES;
use super::member::{self, Member};
use super::sparse::{self, Layout, Region, Stored};
use super::{Entry, EntryKind, PATH_BYTES_MAX, READ_CHUNK_BYTES_MAX};

/// How much map text is gathered before it is written.
const MAP_CHUNK_BYTES: usize = 64 << 10;

/// The end of an archive: two zero blocks.
const END_BYTES: u64 = 2 * BLOCK_BYTES as u64;

/// Writes a pax tar archive to `out` (module doc). Pass a buffered
/// writer: headers are written a block or a few at a time.
pub struct TarWriter<W: Write> {
    sink: Sink<W>,
    /// Reused for every read callback; grows to at most
    /// `READ_CHUNK_BYTES_MAX`.
    buffer: Vec<u8>,
    /// Set by the first failed read or write: what failed. The archive
    /// then ends inside a member, so nothing more is written to it.
    broken: Option<String>,
}

impl<W: Write> std::fmt::Debug for TarWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TarWriter")
            .field("bytes_written", &self.sink.bytes_written)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// The output and how many bytes reached it.
struct Sink<W> {
    out: W,
    bytes_written: u64,
}

impl<W: Write> Sink<W> {
    fn write(&mut self, path: &[u8], bytes: &[u8]) -> Result<(), TarError> {
        self.out
            .write_all(bytes)
            .map_err(|source| TarError::Write {
                path: display_path(path),
                archive_bytes: self.bytes_written,
                source,
            })?;
        self.bytes_written += bytes.len() as u64;
        Ok(())
    }

    /// Zeroes written a block at a time: a gap inside a region is less
    /// than a block, and padding is too.
    fn write_zeroes(&mut self, path: &[u8], length_bytes: u64) -> Result<(), TarError> {
        const ZEROES: [u8; BLOCK_BYTES] = [0; BLOCK_BYTES];
        let mut left_bytes = length_bytes;
        while left_bytes > 0 {
            let now = left_bytes.min(BLOCK_BYTES as u64) as usize;
            self.write(path, &ZEROES[..now])?;
            left_bytes -= now as u64;
        }
        Ok(())
    }
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W) -> Self {
        TarWriter {
            sink: Sink {
                out,
                bytes_written: 0,
            },
            buffer: Vec::new(),
            broken: None,
        }
    }

    /// Appends `entry`. For a file, `read(offset, buf)` must fill `buf`
    /// with the file's bytes at `offset`; it is called only inside the
    /// entry's data ranges, in ascending order, with at most
    /// `READ_CHUNK_BYTES_MAX` bytes at a time. Other kinds never call it.
    ///
    /// An entry this format cannot hold is refused before anything is
    /// written (the archive stays usable). A failed `read` or write
    /// leaves the archive ending inside this member: the error is
    /// returned, and every later `add` and `finish` returns
    /// `TarError::Broken`, so an incomplete archive is never closed as if
    /// it were whole.
    pub fn add(
        &mut self,
        entry: &Entry,
        read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> Result<(), TarError> {
        self.check_whole()?;
        let member = member::build(entry)?;
        let written = self.write_member(entry, &member, read);
        if let Err(error) = &written {
            self.broken = Some(error.to_string());
        }
        written
    }

    /// Appends a small regular file held in memory (a session record such
    /// as `.blockwatch/deleted`): mode 0644, owned by 0:0.
    pub fn add_bytes(
        &mut self,
        path: &[u8],
        bytes: &[u8],
        mtime: (i64, u32),
    ) -> Result<(), TarError> {
        if path.len() > PATH_BYTES_MAX {
            return Err(TarError::TooLong {
                path: format!("{}...", display_path(&path[..256])),
                what: "path",
                length_bytes: path.len(),
                max_bytes: PATH_BYTES_MAX,
            });
        }
        let size_bytes = bytes.len() as u64;
        let entry = Entry {
            path: path.to_vec(),
            kind: EntryKind::File {
                size_bytes,
                data: if bytes.is_empty() {
                    Vec::new()
                } else {
                    vec![(0, size_bytes)]
                },
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime,
            atime: None,
            ctime: None,
            xattrs: Vec::new(),
        };
        self.add(&entry, &mut |offset, buf| {
            let start = offset as usize;
            buf.copy_from_slice(&bytes[start..start + buf.len()]);
            Ok(())
        })
    }

    /// Ends the archive with its two zero blocks, flushes, and returns
    /// the output.
    pub fn finish(mut self) -> Result<W, TarError> {
        self.check_whole()?;
        self.sink.write_zeroes(b"(end of archive)", END_BYTES)?;
        self.sink.out.flush().map_err(|source| TarError::Write {
            path: "(end of archive)".to_string(),
            archive_bytes: self.sink.bytes_written,
            source,
        })?;
        Ok(self.sink.out)
    }

    /// Bytes written to the output so far, headers and padding included.
    pub fn bytes_written(&self) -> u64 {
        self.sink.bytes_written
    }

    fn check_whole(&self) -> Result<(), TarError> {
        match &self.broken {
            Some(first_failure) => Err(TarError::Broken {
                first_failure: first_failure.clone(),
            }),
            None => Ok(()),
        }
    }

    fn write_member(
        &mut self,
        entry: &Entry,
        member: &Member,
        read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> Result<(), TarError> {
        self.sink.write(&entry.path, &member.headers)?;
        let (EntryKind::File { size_bytes, data }, Some(stored)) = (&entry.kind, member.stored)
        else {
            return Ok(());
        };
        match stored.layout {
            Layout::Plain => self.copy_range(&entry.path, (0, *size_bytes), read)?,
            Layout::Sparse { map_bytes } => {
                self.write_map(&entry.path, *size_bytes, data, map_bytes)?;
                for region in sparse::regions(*size_bytes, data) {
                    self.write_region(&entry.path, region, read)?;
                }
            }
        }
        self.pad(&entry.path, stored)
    }

    /// The sparse map: decimal lines, then zeroes to the block's end.
    fn write_map(
        &mut self,
        path: &[u8],
        size_bytes: u64,
        data: &[(u64, u64)],
        map_bytes: u64,
    ) -> Result<(), TarError> {
        let mut text = Vec::with_capacity(MAP_CHUNK_BYTES + 24);
        let mut written = 0u64;
        for number in sparse::map_numbers(size_bytes, data) {
            text.extend_from_slice(number.to_string().as_bytes());
            text.push(b'\n');
            if text.len() >= MAP_CHUNK_BYTES {
                self.sink.write(path, &text)?;
                written += text.len() as u64;
                text.clear();
            }
        }
        self.sink.write(path, &text)?;
        written += text.len() as u64;
        // The header's size was computed from the map's length; a map of
        // another length would shift every member after it.
        assert_eq!(written, map_bytes, "sparse map length");
        let padding = sparse::padded(map_bytes) - map_bytes;
        self.sink.write_zeroes(path, padding)
    }

    /// A region's data ranges through `read`, the gaps between them and
    /// the run-on to its end as zeroes.
    fn write_region(
        &mut self,
        path: &[u8],
        region: Region<'_>,
        read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> Result<(), TarError> {
        let mut at_bytes = region.offset_bytes;
        for &(offset_bytes, length_bytes) in region.ranges {
            self.sink.write_zeroes(path, offset_bytes - at_bytes)?;
            self.copy_range(path, (offset_bytes, length_bytes), read)?;
            at_bytes = offset_bytes + length_bytes;
        }
        self.sink
            .write_zeroes(path, region.offset_bytes + region.length_bytes - at_bytes)
    }

    /// `read` through the reused buffer, chunk by chunk, into the output.
    fn copy_range(
        &mut self,
        path: &[u8],
        (offset_bytes, length_bytes): (u64, u64),
        read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> Result<(), TarError> {
        let chunk_bytes = length_bytes.min(READ_CHUNK_BYTES_MAX as u64) as usize;
        if self.buffer.len() < chunk_bytes {
            self.buffer.resize(chunk_bytes, 0);
        }
        let mut done_bytes = 0u64;
        while done_bytes < length_bytes {
            let now = (length_bytes - done_bytes).min(chunk_bytes as u64) as usize;
            let buffer = &mut self.buffer[..now];
            // A callback that leaves part of the buffer untouched must not
            // leak the previous chunk (perhaps another file's) into this one.
            buffer.fill(0);
            let at = offset_bytes + done_bytes;
            read(at, buffer).map_err(|source| TarError::Read {
                path: display_path(path),
                offset_bytes: at,
                source,
            })?;
            self.sink.write(path, buffer)?;
            done_bytes += now as u64;
        }
        Ok(())
    }

    fn pad(&mut self, path: &[u8], stored: Stored) -> Result<(), TarError> {
        let padding = sparse::padded(stored.member_bytes) - stored.member_bytes;
        self.sink.write_zeroes(path, padding)
    }
}
