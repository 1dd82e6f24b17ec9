//! Damaged saved maps never panic, hang or allocate absurdly, and a saved
//! map that loads saves as one that loads again.
//!
//! Real maps: the filesystem maps (`persist::encode`) of `mkfs.ext4 -d`
//! images with 1 KiB and 4 KiB blocks (files, a sparse file of many
//! extents, an htree directory, symlinks, a hard link), and a disk map
//! (`DiskMap::encode`) holding both. Each gets a few thousand seeded
//! mutations: boundary and random values written into the fields the
//! decoder reads (found by walking the format as the decoder does: header,
//! counts, metadata runs, records, extents, mapping runs, directory
//! entries, notes, a disk map's per-filesystem headers), random bytes,
//! truncation, and chunks deleted or repeated. The CRC-32C trailers are
//! then recomputed, as the saved_map fuzz target does, so the damage
//! reaches the decoders.
//!
//! Each case runs `common/map_exercise.rs` under `catch_unwind`, with a
//! counting allocator and a clock (`common/harness.rs`); every failure is
//! reported at the end with its map, case number, seed and mutation.

mod common;
#[path = "common/harness.rs"]
mod harness;
#[path = "common/map_exercise.rs"]
mod map_exercise;

use std::path::Path;
use std::time::Duration;

use common::{index_directories, mkfs_with_files};
use fsmap::disk::DiskMap;
use harness::{FAILURES_SHOWN_MAX, case_seed};
use testkit::{TempDir, Xorshift, random_bytes};

/// Memory one case may hold at once beyond what it started with; the maps
/// are a few KiB, so anything near this was sized from a corrupt field.
const CASE_PEAK_BYTES_MAX: isize = 64 << 20;
/// Time one case may take in a debug build; a healthy one takes a
/// millisecond or two.
const CASE_DURATION_MAX: Duration = Duration::from_secs(2);
const HEADER_BYTES: usize = 64;
const DISK_HEADER_BYTES: usize = 12;
const FILESYSTEM_HEADER_BYTES: usize = 28;

#[global_allocator]
static ALLOCATOR: harness::CountingAllocator = harness::CountingAllocator;

// ---------------------------------------------------------------------------
// The maps.

/// The source tree every image is built from.
fn populate(source: &Path) {
    std::fs::create_dir_all(source.join("dir/a/b")).unwrap();
    std::fs::create_dir_all(source.join("big")).unwrap();
    std::fs::write(source.join("empty"), b"").unwrap();
    std::fs::write(source.join("seventy-k"), random_bytes(7, 70_000)).unwrap();
    std::fs::write(source.join("dir/small.txt"), b"hi\n").unwrap();
    std::fs::write(source.join("dir/a/b/deep.txt"), b"deep\n").unwrap();
    std::fs::hard_link(source.join("dir/small.txt"), source.join("dir/again.txt")).unwrap();
    std::os::unix::fs::symlink("dir/small.txt", source.join("link")).unwrap();
    let long_target = format!("{}/target", "long".repeat(50));
    std::os::unix::fs::symlink(long_target, source.join("long-link")).unwrap();
    // 4 KiB of data every 8 KiB: 12 extents, more than the inode holds.
    let file = std::fs::File::create(source.join("dir/sparse")).unwrap();
    for piece in 0..12u64 {
        let data = random_bytes(piece + 100, 4096);
        std::os::unix::fs::FileExt::write_all_at(&file, &data, piece * 8192).unwrap();
    }
    // Over one 1 KiB block of entries: `e2fsck -D` makes it an htree.
    for index in 0..40 {
        let name = format!("big/entry-with-a-longish-name-{index:03}");
        std::fs::write(source.join(name), format!("{index}\n")).unwrap();
    }
}

/// The disk map of an `mkfs.ext4 -d` image with `block_size`-byte blocks.
fn mapped_image(dir: &Path, source: &Path, block_size: &str) -> DiskMap {
    let image = dir.join(format!("fs-{block_size}.img"));
    mkfs_with_files(
        "mkfs.ext4",
        &["-b", block_size, "-N", "256"],
        source,
        &image,
        "8M",
    );
    index_directories(&image);
    let file = std::fs::File::open(&image).unwrap();
    let size_bytes = file.metadata().unwrap().len();
    let disk = DiskMap::build(&file, size_bytes);
    assert_eq!(disk.filesystems.len(), 1, "{block_size}: {:?}", disk.notes);
    disk
}

/// The maps of the 1 KiB and 4 KiB images, built in a directory of their
/// own (the tests run in parallel).
fn mapped_images(label: &str) -> (DiskMap, DiskMap) {
    let dir = TempDir::new(&format!("corrupt-maps-{label}"));
    let source = dir.join("source");
    populate(&source);
    (
        mapped_image(dir.path(), &source, "1024"),
        mapped_image(dir.path(), &source, "4096"),
    )
}

// ---------------------------------------------------------------------------
// Where the fields are, walking the format as the decoders do.

/// (offset, width in bytes) of every field of the saved map in `bytes`.
fn fields(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    if bytes.starts_with(b"BWDISKM1") {
        let count = le32(bytes, 8) as usize;
        out.push((8, 4));
        let mut at = DISK_HEADER_BYTES;
        for _ in 0..count {
            out.extend([(at, 4), (at + 4, 8), (at + 12, 8), (at + 20, 8)]);
            let length = le64(bytes, at + 20) as usize;
            let map = at + FILESYSTEM_HEADER_BYTES;
            out.extend(
                map_fields(&bytes[map..map + length])
                    .into_iter()
                    .map(|(offset, width)| (map + offset, width)),
            );
            at = map + length;
        }
        notes_fields(bytes, &mut at, &mut out);
    } else {
        out = map_fields(bytes);
    }
    out
}

fn map_fields(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = vec![(8, 4), (12, 4), (16, 8), (24, 8), (32, 8), (40, 4), (44, 4)];
    out.extend([(48, 4), (52, 4), (56, 4), (60, 4)]);
    let (records, directories) = (le32(bytes, 48), le32(bytes, 52));
    let (meta_runs, specials) = (le32(bytes, 56), le32(bytes, 60));
    let mut at = HEADER_BYTES;
    for _ in 0..meta_runs {
        out.extend([(at, 8), (at + 8, 8), (at + 16, 1)]);
        at += 17;
    }
    for _ in 0..specials {
        out.push((at, 4));
        at += 4;
    }
    for _ in 0..records {
        // number .. xattr checksum, then the extent and mapping counts.
        for (offset, width) in [(0, 4), (4, 4), (8, 2), (10, 2), (12, 4), (16, 4), (20, 8)] {
            out.push((at + offset, width));
        }
        for (offset, width) in [(28, 8), (36, 4), (40, 8), (48, 4), (52, 8), (60, 4)] {
            out.push((at + offset, width));
        }
        let (extents, runs) = (le32(bytes, at + 64), le32(bytes, at + 68));
        out.extend([(at + 64, 4), (at + 68, 4)]);
        at += 72;
        for _ in 0..extents {
            out.extend([(at, 8), (at + 8, 8), (at + 16, 4), (at + 20, 1)]);
            at += 21;
        }
        for _ in 0..runs {
            out.extend([(at, 8), (at + 8, 8)]);
            at += 16;
        }
    }
    for _ in 0..directories {
        let entries = le32(bytes, at + 4);
        out.extend([(at, 4), (at + 4, 4)]);
        at += 8;
        for _ in 0..entries {
            out.extend([(at, 4), (at + 4, 2)]);
            at += 6 + usize::from(u16::from_le_bytes([bytes[at + 4], bytes[at + 5]]));
        }
    }
    notes_fields(bytes, &mut at, &mut out);
    out
}

fn notes_fields(bytes: &[u8], at: &mut usize, out: &mut Vec<(usize, usize)>) {
    let notes = le32(bytes, *at);
    out.push((*at, 4));
    *at += 4;
    for _ in 0..notes {
        out.extend([(*at, 4), (*at + 4, 2)]);
        *at += 6 + usize::from(u16::from_le_bytes([bytes[*at + 4], bytes[*at + 5]]));
    }
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

// ---------------------------------------------------------------------------
// Mutations.

/// Values at the edges of what the fields hold, and some of the map's own.
fn interesting(random: &mut Xorshift, bytes: &[u8]) -> u64 {
    let values = [
        0,
        1,
        2,
        11,
        0x7F,
        0x80,
        0xFF,
        0x100,
        0xFFFF,
        0x1_0000,
        0x7FFF_FFFF,
        0x8000_0000,
        0xFFFF_FFFF,
        1 << 32,
        1 << 48,
        1 << 63,
        u64::MAX,
        u64::MAX - 1,
    ];
    match random.index(values.len() + 3) {
        index if index < values.len() => values[index],
        index if index == values.len() => random.next(),
        // A value that is already somewhere in the map.
        _ => {
            let at = random.index(bytes.len().saturating_sub(8));
            le64(bytes, at) >> (8 * random.below(8))
        }
    }
}

/// Applies one to three changes to `bytes`; returns what they were.
fn mutate(random: &mut Xorshift, bytes: &mut Vec<u8>, fields: &[(usize, usize)]) -> String {
    let mut what = String::new();
    for _ in 0..1 + random.below(3) {
        match random.below(10) {
            0..6 => {
                let (offset, width) = fields[random.index(fields.len())];
                if offset >= bytes.len() {
                    continue;
                }
                let value = interesting(random, bytes) & (u64::MAX >> (64 - 8 * width));
                let end = (offset + width).min(bytes.len());
                let value_bytes = value.to_le_bytes();
                bytes[offset..end].copy_from_slice(&value_bytes[..end - offset]);
                what.push_str(&format!("field at {offset} ({width} bytes) = {value:#x}; "));
            }
            6 => {
                let at = random.index(bytes.len());
                bytes[at] = random.next() as u8;
                what.push_str(&format!("byte at {at} = {:#x}; ", bytes[at]));
            }
            7 => {
                let length = random.index(bytes.len());
                bytes.truncate(length);
                what.push_str(&format!("truncated to {length}; "));
            }
            8 => {
                let from = random.index(bytes.len());
                let to = from + random.index((bytes.len() - from).min(64) + 1);
                bytes.drain(from..to);
                what.push_str(&format!("bytes {from}..{to} deleted; "));
            }
            _ => {
                let from = random.index(bytes.len());
                let to = from + random.index((bytes.len() - from).min(64) + 1);
                let chunk = bytes[from..to].to_vec();
                bytes.splice(to..to, chunk);
                what.push_str(&format!("bytes {from}..{to} repeated; "));
            }
        }
        if bytes.len() < 8 {
            break;
        }
    }
    what
}

// ---------------------------------------------------------------------------
// The runs.

/// Damages `pristine` `cases` times and runs each case; fails listing
/// every case that panicked, held too much memory or took too long.
fn check_saved_map(label: &str, pristine: &[u8], cases: usize) {
    harness::install_panic_capture();
    let healthy = map_exercise::exercise(pristine);
    assert!(
        healthy.filesystem_map || healthy.disk_map,
        "{label}: the undamaged map does not decode"
    );
    let fields = fields(pristine);
    let mut failures = Vec::new();
    let mut decoded = 0;
    for index in 0..cases {
        let seed = case_seed(label, index);
        let mut bytes = pristine.to_vec();
        let what = mutate(&mut Xorshift::new(seed), &mut bytes, &fields);
        let with_checksums = map_exercise::with_checksums(&bytes);
        let outcome = harness::run_case(|| map_exercise::exercise(&with_checksums));
        if let Some(failure) = outcome.failure(CASE_PEAK_BYTES_MAX, CASE_DURATION_MAX) {
            failures.push(format!(
                "{label} case {index} (seed {seed:#x}): {what}{failure}"
            ));
        } else if let Ok(result) = &outcome.result {
            decoded += usize::from(result.filesystem_map || result.disk_map);
        }
    }
    harness::assert_no_failures(&failures, || {
        format!(
            "{} of {cases} damaged {label}s failed; the first {FAILURES_SHOWN_MAX}",
            failures.len()
        )
    });
    // The mutations must reach past the decoders' first checks, or this
    // test would pass without testing anything.
    assert!(
        decoded >= cases / 10,
        "{label}: only {decoded} of {cases} damaged maps decoded"
    );
}

#[test]
fn damaged_filesystem_maps_with_1k_blocks_are_refused_or_used_safely() {
    let (small, _) = mapped_images("1k");
    let bytes = fsmap::persist::encode(&small.filesystems[0].map);
    check_saved_map("1 KiB filesystem map", &bytes, 1000);
}

#[test]
fn damaged_filesystem_maps_with_4k_blocks_are_refused_or_used_safely() {
    let (_, large) = mapped_images("4k");
    let bytes = fsmap::persist::encode(&large.filesystems[0].map);
    check_saved_map("4 KiB filesystem map", &bytes, 1000);
}

#[test]
fn damaged_disk_maps_of_two_filesystems_are_refused_or_used_safely() {
    let (small, large) = mapped_images("disk");
    let mut second = large.filesystems[0].clone();
    second.partition = 2;
    second.start_bytes = 8 << 20;
    let disk = DiskMap {
        filesystems: vec![small.filesystems[0].clone(), second],
        partitions: Vec::new(),
        notes: vec!["partition 3: not ext2/3/4; its changes are reported by block only".into()],
    };
    check_saved_map("disk map", &disk.encode(), 800);
}
