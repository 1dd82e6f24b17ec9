//! Which files own which blocks of a disk: a read-only ext2/3/4 parser of
//! our own over positioned reads, with jbd2 journal replay (so a mounted,
//! live filesystem reads as it really is) and MBR/GPT partition tables.
//!
//! Files and what each owns:
//! - `read.rs`: the `ReadAt` trait, `Slice` (a partition) and `Overlay`
//!   (the filesystem with committed journal blocks replaced).
//! - `partition.rs`: MBR (with extended partitions) and GPT tables.
//! - `ext4/`: the filesystem reader. `mod.rs`: superblock, group
//!   descriptors, where each group's metadata lives, metadata checksums;
//!   `inode.rs`: inodes, extent trees, block maps, inline data, xattr
//!   blocks; `xattr.rs`: extended attributes (body and block, EA inodes,
//!   ACLs); `file.rs`: a file's full metadata, data layout and contents,
//!   symlink targets; `dir.rs`: linear, htree and inline directories, path
//!   lookup.
//! - `jbd2.rs`: journal replay (descriptor, commit, revoke blocks, checksums).
//! - `runs.rs`: runs (start, count) of blocks or bytes and their merging.
//! - `map.rs`: the file map: block -> owner, inode -> paths, the walk of
//!   every path; full build and incremental update.
//! - `diff.rs`: per-file changes between two maps (+ - R M ~).
//! - `select.rs`: copy criteria (globs, sizes) and the copy set.
//! - `persist.rs`: a map saved beside a checkpoint (CRC-checked).
//! - `disk.rs`: a whole disk: partitions, each filesystem read through
//!   its journal, mapped, updated, compared, saved, and opened again
//!   through the same replay to read its files.
//! - `testing.rs`: what the unit tests share (a seeded xorshift).

pub mod diff;
pub mod disk;
pub mod ext4;
pub mod jbd2;
pub mod map;
pub mod partition;
pub mod persist;
pub mod read;
pub mod runs;
pub mod select;
#[cfg(test)]
mod testing;

pub use read::{Bytes, Overlay, ReadAt, Replacement, Slice};
