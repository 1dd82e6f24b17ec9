//! The data ranges of a file: checked, and laid out as a plain member or
//! as a GNU sparse file, pax format 1.0, whose map is decimal text at the
//! start of the member's data (docs/tar.md).
//!
//! GNU tar reads each stored region of a sparse member in whole 512-byte
//! blocks, libarchive reads exactly the region's length: the two agree on
//! where the next member starts only if every region but the last is a
//! whole number of blocks long. So the regions stored are the caller's
//! data ranges, each run on to the next block boundary (or the end of the
//! file) with zeroes, and ranges that then touch merged into one region.

use super::error::{TarError, display_path};
use super::header::BLOCK_BYTES;
use super::{DATA_RANGES_MAX, FILE_BYTES_MAX};

const BLOCK: u64 = BLOCK_BYTES as u64;

/// How a file's data is stored in its member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Layout {
    /// Every byte of the file, in order.
    Plain,
    /// The map, padded to a block, then the regions back to back.
    Sparse {
        /// The map's text length before padding.
        map_bytes: u64,
    },
}

/// A checked file: its layout and how many bytes its member's data
/// takes (the ustar or pax `size`), the padding after it excluded.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stored {
    pub(super) layout: Layout,
    pub(super) member_bytes: u64,
}

/// One region of a sparse member: the bytes from `offset_bytes` for
/// `length_bytes`, of which the caller's `ranges` hold data and the rest
/// is stored as zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Region<'a> {
    pub(super) offset_bytes: u64,
    pub(super) length_bytes: u64,
    pub(super) ranges: &'a [(u64, u64)],
}

/// Checks the ranges (sorted, not overlapping, not empty, inside the
/// file, at most `DATA_RANGES_MAX`) and chooses the layout: plain when
/// they cover the whole file, sparse otherwise.
pub(super) fn stored(
    path: &[u8],
    size_bytes: u64,
    data: &[(u64, u64)],
) -> Result<Stored, TarError> {
    let too_large = |size_bytes| TarError::FileTooLarge {
        path: display_path(path),
        size_bytes,
        max_bytes: FILE_BYTES_MAX,
    };
    if size_bytes > FILE_BYTES_MAX {
        return Err(too_large(size_bytes));
    }
    if data.len() > DATA_RANGES_MAX {
        return Err(TarError::TooManyDataRanges {
            path: display_path(path),
            count: data.len(),
            max: DATA_RANGES_MAX,
        });
    }
    if check_ranges(path, size_bytes, data)? == size_bytes {
        return Ok(Stored {
            layout: Layout::Plain,
            member_bytes: size_bytes,
        });
    }
    let map_bytes = map_numbers(size_bytes, data)
        .map(|number| decimal_digits(number) + 1)
        .sum();
    let region_bytes: u64 = regions(size_bytes, data).map(|r| r.length_bytes).sum();
    // The regions lie inside the file, so their sum is at most
    // FILE_BYTES_MAX (i64::MAX), and the map takes a few dozen MiB at
    // most: the sum cannot overflow, but may pass FILE_BYTES_MAX.
    let member_bytes = padded(map_bytes) + region_bytes;
    if member_bytes > FILE_BYTES_MAX {
        return Err(too_large(member_bytes));
    }
    Ok(Stored {
        layout: Layout::Sparse { map_bytes },
        member_bytes,
    })
}

/// The sum of the ranges' lengths, once each is checked.
fn check_ranges(path: &[u8], size_bytes: u64, data: &[(u64, u64)]) -> Result<u64, TarError> {
    let mut end_bytes = 0u64;
    let mut data_bytes = 0u64;
    for (index, &(offset_bytes, length_bytes)) in data.iter().enumerate() {
        let reason = if length_bytes == 0 {
            Some("it is empty")
        } else if offset_bytes < end_bytes {
            Some("it starts before the range before it ends (ranges are sorted and do not overlap)")
        } else if offset_bytes
            .checked_add(length_bytes)
            .is_none_or(|end| end > size_bytes)
        {
            Some("it ends past the end of the file")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(TarError::InvalidDataRange {
                path: display_path(path),
                index,
                offset_bytes,
                length_bytes,
                reason,
            });
        }
        end_bytes = offset_bytes + length_bytes;
        data_bytes += length_bytes;
    }
    Ok(data_bytes)
}

/// `length` rounded up to whole blocks.
pub(super) fn padded(length: u64) -> u64 {
    length.div_ceil(BLOCK) * BLOCK
}

/// The regions a sparse member stores, from checked ranges (module doc).
pub(super) fn regions(size_bytes: u64, data: &[(u64, u64)]) -> Regions<'_> {
    Regions { size_bytes, data }
}

#[derive(Debug, Clone)]
pub(super) struct Regions<'a> {
    size_bytes: u64,
    /// The ranges not yet in a region.
    data: &'a [(u64, u64)],
}

impl<'a> Iterator for Regions<'a> {
    type Item = Region<'a>;

    fn next(&mut self) -> Option<Region<'a>> {
        let &(offset_bytes, _) = self.data.first()?;
        let mut taken = 0;
        let mut end_bytes = offset_bytes;
        while let Some(&(offset, length)) = self.data.get(taken) {
            // A range that starts before this region's last block ends
            // would share that block: it joins the region.
            if taken > 0 && offset > offset_bytes + padded(end_bytes - offset_bytes) {
                break;
            }
            end_bytes = offset + length;
            taken += 1;
        }
        let (ranges, rest) = self.data.split_at(taken);
        self.data = rest;
        let length_bytes = padded(end_bytes - offset_bytes).min(self.size_bytes - offset_bytes);
        Some(Region {
            offset_bytes,
            length_bytes,
            ranges,
        })
    }
}

/// The numbers of the map in order, each written as a decimal line: the
/// count of entries, then each region's offset and length, then, for a
/// file that ends in a hole, the entry `(size, 0)`: GNU tar sizes such a
/// file by truncating it where that entry says.
pub(super) fn map_numbers(size_bytes: u64, data: &[(u64, u64)]) -> impl Iterator<Item = u64> + '_ {
    let count = regions(size_bytes, data).count();
    let end_bytes = regions(size_bytes, data)
        .last()
        .map_or(0, |r| r.offset_bytes + r.length_bytes);
    let trailing = (end_bytes < size_bytes).then_some((size_bytes, 0));
    std::iter::once(count as u64 + u64::from(trailing.is_some())).chain(
        regions(size_bytes, data)
            .map(|r| (r.offset_bytes, r.length_bytes))
            .chain(trailing)
            .flat_map(|(offset, length)| [offset, length]),
    )
}

fn decimal_digits(number: u64) -> u64 {
    u64::from(number.checked_ilog10().unwrap_or(0)) + 1
}
