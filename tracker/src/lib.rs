//! Changed-block tracking: which regions of the disk changed, crash-safely.
//!
//! Files and what each owns:
//! - `regions.rs`: region arithmetic and the lock-free region bitmap.
//! - `journal.rs`: the append-only, checksummed journal of marks and saved records.
//!
//! The tracker layer (a `BlockBackend` that wraps the storage backend),
//! checkpoints and the catalog are being built on these; see ARCHITECTURE.md.

pub mod journal;
pub mod regions;
