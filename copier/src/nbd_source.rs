//! Any NBD server as a copy source, through our client: its data, its
//! `base:allocation` holes, and the regions its `qemu:dirty-bitmap:NAME`
//! marks (qemu-nbd `-B`, qemu-storage-daemon), so QEMU users get the same
//! incremental copies from QEMU's own bitmaps.

use std::io;

use backend::{BlockBackend, Extent, STATE_HOLE, STATE_ZERO, push_extent};
use nbd_client::{BASE_ALLOCATION, Client, DIRTY_BITMAP_CONTEXT_PREFIX};

use crate::plan::Plan;

/// An NBD export read through `Client`, as a read-only backend; reads
/// are spread over extra connections when the export allows several
/// (NBD_FLAG_CAN_MULTI_CONN).
#[derive(Debug)]
pub struct NbdSource {
    client: Client,
    extra: Vec<Client>,
    next: std::sync::atomic::AtomicUsize,
}

impl NbdSource {
    pub fn new(client: Client) -> NbdSource {
        NbdSource {
            client,
            extra: Vec::new(),
            next: Default::default(),
        }
    }

    /// Opens up to `connections - 1` more connections to `uri` when the
    /// export says they see the same data; one that fails is left out.
    pub fn with_connections(client: Client, uri: &str, connections: usize) -> NbdSource {
        let mut source = NbdSource::new(client);
        if source.client.info().can_multi_conn() {
            for _ in 1..connections {
                match Client::connect_with(uri, &nbd_client::ConnectOptions::default()) {
                    Ok(client) => source.extra.push(client),
                    Err(error) => {
                        tracing::debug!(%error, "reading through fewer connections");
                        break;
                    }
                }
            }
        }
        source
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The connection for the next request, in turn.
    fn any(&self) -> &Client {
        let index =
            self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % (self.extra.len() + 1);
        if index == 0 {
            &self.client
        } else {
            &self.extra[index - 1]
        }
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
        Ok(self.any().read_at(buf, offset)?)
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
