//! Any NBD server as a copy target (nbdkit, qemu-nbd, another blockwatch).
//!
//! An export holds only the disk's bytes, so what it holds is recorded on
//! the source's side: `STATE_DIR/targets/HOLDER.blockwatch-replica`, the
//! replica record format, committed after the export's FLUSH. An export
//! with no record is written only if it reads as zeroes everywhere (a new
//! export) or with --full: anything else may be someone's data. What the
//! export's server does behind our back cannot be seen from here (unlike
//! a replica file's size and mtime); `verify` finds it.

use std::path::{Path, PathBuf};

use nbd_client::{BASE_ALLOCATION, Client, ConnectOptions, RequestFlags};

use super::{Held, Partial, SourceInfo, Target, checked_source, load_partial_of};
use crate::copy::{CopyError, unix_seconds};
use crate::replica::{
    RECORD_FORMAT, ReplicaLock, ReplicaRecord, read_record, remove_partial, write_partial,
    write_record,
};

pub struct NbdTarget {
    uri: String,
    /// `STATE_DIR/targets/HOLDER`: its record and lock files sit beside.
    record_key: PathBuf,
    _lock: ReplicaLock,
    client: Client,
    pending: Option<(SourceInfo, Held)>,
}

impl std::fmt::Debug for NbdTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdTarget")
            .field("uri", &self.uri)
            .field("record_key", &self.record_key)
            .finish_non_exhaustive()
    }
}

/// The pin holder of an NBD target: stable per URI.
pub fn nbd_holder(uri: &str) -> String {
    format!("nbd-{:08x}", crc32c::crc32c(uri.as_bytes()))
}

impl NbdTarget {
    /// Connects to `uri` and locks its record in `targets_dir`.
    pub fn connect(uri: &str, targets_dir: &Path) -> Result<NbdTarget, CopyError> {
        let io = |source| CopyError::TargetIo {
            target: uri.to_string(),
            source,
        };
        std::fs::create_dir_all(targets_dir).map_err(io)?;
        let record_key = targets_dir.join(nbd_holder(uri));
        let lock = ReplicaLock::acquire(&record_key)?;
        let client = Client::connect_with(uri, &ConnectOptions::default()).map_err(|source| {
            CopyError::Connect {
                uri: uri.to_string(),
                source,
            }
        })?;
        if client.info().is_read_only() {
            return Err(CopyError::TargetRefused {
                target: uri.to_string(),
                reason: "the export is read-only".into(),
            });
        }
        Ok(NbdTarget {
            uri: uri.to_string(),
            record_key,
            _lock: lock,
            client,
            pending: None,
        })
    }

    /// Whether the whole export reads as zeroes (by its base:allocation).
    fn reads_as_zeroes(&self) -> Result<bool, CopyError> {
        if !self.client.info().has_meta_context(BASE_ALLOCATION) {
            return Ok(false);
        }
        let end = self.client.size_bytes();
        let mut position = 0;
        while position < end {
            let extents = self
                .client
                .block_status(BASE_ALLOCATION, position, end - position)
                .map_err(|error| self.io(error.into()))?;
            if extents.is_empty() {
                return Ok(false);
            }
            for extent in extents {
                if extent.flags & u64::from(backend::STATE_ZERO) == 0 {
                    return Ok(false);
                }
                position = extent.end_bytes();
            }
        }
        Ok(true)
    }

    fn io(&self, source: std::io::Error) -> CopyError {
        CopyError::TargetIo {
            target: self.uri.clone(),
            source,
        }
    }
}

impl Target for NbdTarget {
    fn describe(&self) -> String {
        self.uri.clone()
    }

    fn holder(&self) -> String {
        nbd_holder(&self.uri)
    }

    fn held(&mut self, source_id: &str) -> Result<Option<Held>, CopyError> {
        match read_record(&self.record_key)? {
            Some(record) => {
                checked_source(&self.uri, &record, source_id)?;
                Ok(Some(Held {
                    checkpoint: record.checkpoint,
                    generation: record.generation,
                }))
            }
            // Empty, or written by our own first copy, interrupted.
            None if self
                .load_partial()
                .is_some_and(|p| p.source_id == source_id && p.base.is_none()) =>
            {
                Ok(None)
            }
            None if self.reads_as_zeroes()? => Ok(None),
            None => Err(CopyError::TargetRefused {
                target: self.uri.clone(),
                reason: "it holds data and no copy of this disk: it may hold someone's data; copy with --full to overwrite it".into(),
            }),
        }
    }

    fn open(
        &mut self,
        source: &SourceInfo,
        checkpoint: &Held,
        _base: Option<&Held>,
    ) -> Result<(), CopyError> {
        let size_bytes = self.client.size_bytes();
        if size_bytes != source.size_bytes {
            return Err(CopyError::TargetRefused {
                target: self.uri.clone(),
                reason: format!(
                    "the export is {size_bytes} bytes and the disk {} bytes: make it the disk's size",
                    source.size_bytes
                ),
            });
        }
        self.pending = Some((source.clone(), checkpoint.clone()));
        Ok(())
    }

    fn write_data(&self, offset: u64, data: &[u8]) -> Result<(), CopyError> {
        self.client
            .write_at(data, offset, RequestFlags::NONE)
            .map_err(|error| self.io(error.into()))
    }

    fn write_zero(&self, offset: u64, length: u64) -> Result<(), CopyError> {
        if self.client.info().can_write_zeroes() {
            // Without NO_HOLE the server may punch a hole.
            return self
                .client
                .write_zeroes(offset, length, RequestFlags::NONE)
                .map_err(|error| self.io(error.into()));
        }
        crate::stream_write::write_zeroes(offset, length, |at, zeroes| self.write_data(at, zeroes))
    }

    fn commit(&mut self) -> Result<(), CopyError> {
        let (source, checkpoint) = self.pending.take().expect("opened before committed");
        if self.client.info().can_flush() {
            self.client.flush().map_err(|error| self.io(error.into()))?;
        }
        write_record(
            &self.record_key,
            &ReplicaRecord {
                format: RECORD_FORMAT,
                image_id: source.id,
                source_size_bytes: source.size_bytes,
                granularity_bytes: source.granularity_bytes,
                checkpoint: checkpoint.checkpoint,
                generation: checkpoint.generation,
                copied_unix_seconds: unix_seconds(),
                replica_size_bytes: self.client.size_bytes(),
                replica_mtime_seconds: 0,
                replica_mtime_nanoseconds: 0,
            },
        )?;
        Ok(())
    }

    fn save_partial(&self, partial: &Partial) -> Result<(), CopyError> {
        if self.client.info().can_flush() {
            self.client.flush().map_err(|error| self.io(error.into()))?;
        }
        Ok(write_partial(&self.record_key, partial)?)
    }

    fn load_partial(&self) -> Option<Partial> {
        load_partial_of(&self.record_key)
    }

    fn clear_partial(&self) -> Result<(), CopyError> {
        Ok(remove_partial(&self.record_key)?)
    }
}
