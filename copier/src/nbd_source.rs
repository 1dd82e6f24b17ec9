//! Any NBD server as a copy source, through our client: its data, its
//! `base:allocation` holes, and the regions its `qemu:dirty-bitmap:NAME`
//! marks (qemu-nbd `-B`, qemu-storage-daemon), so QEMU users get the same
//! incremental copies from QEMU's own bitmaps.

use std::io;

use backend::{BlockBackend, Extent, STATE_HOLE, STATE_ZERO, push_extent};
use nbd_client::{BASE_ALLOCATION, Client, DIRTY_BITMAP_CONTEXT_PREFIX};

use crate::plan::Plan;

/// An NBD export read through `Client`, as a read-only backend.
#[derive(Debug)]
pub struct NbdSource {
    client: Client,
}

impl NbdSource {
    pub fn new(client: Client) -> NbdSource {
        NbdSource { client }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The plan of a copy driven by the server's dirty bitmap `name`: the
    /// regions it marks, coalesced.
    pub fn dirty_plan(&self, name: &str) -> io::Result<Plan> {
        let context = format!("{DIRTY_BITMAP_CONTEXT_PREFIX}{name}");
        let end = self.client.size_bytes();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut position = 0;
        while position < end {
            let extents = self
                .client
                .block_status(&context, position, end - position)?;
            let Some(last) = extents.last() else {
                return Err(io::Error::other(format!(
                    "{context}: an empty BLOCK_STATUS reply at byte {position}"
                )));
            };
            let next = last.end_bytes();
            for extent in extents.iter().filter(|extent| extent.is_dirty()) {
                ranges.push((
                    extent.offset_bytes,
                    extent.length_bytes.min(end - extent.offset_bytes),
                ));
            }
            if next <= position {
                return Err(io::Error::other(format!(
                    "{context}: BLOCK_STATUS made no progress at byte {position}"
                )));
            }
            position = next;
        }
        Ok(Plan::from_ranges(ranges))
    }
}

impl BlockBackend for NbdSource {
    fn size_bytes(&self) -> u64 {
        self.client.size_bytes()
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn can_extents(&self) -> bool {
        self.client.info().has_meta_context(BASE_ALLOCATION)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        Ok(self.client.read_at(buf, offset)?)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn extents(
        &self,
        offset: u64,
        length: u64,
        max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        let first = out.len();
        for extent in self.client.block_status(BASE_ALLOCATION, offset, length)? {
            if out.len() - first >= max_extents {
                break;
            }
            // Only ZERO says the range reads as zeroes; a HOLE alone may not.
            let flags = if extent.is_hole() { STATE_HOLE } else { 0 }
                | if extent.is_zero() { STATE_ZERO } else { 0 };
            push_extent(out, first, extent.length_bytes, flags);
        }
        Ok(())
    }
}
