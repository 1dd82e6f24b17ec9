//! Corrupt and truncated images never panic, hang or allocate absurdly.
//!
//! Real images from `mkfs.ext4 -d` and `mkfs.ext2 -d` (1 KiB and 4 KiB
//! blocks, with and without metadata_csum, inline data), holding a sparse
//! file with a depth-2 extent tree, an htree directory (`e2fsck -D` indexes
//! it), fast and slow symlinks and a hard link. Each image then gets
//! thousands of seeded mutations of the structures the reader parses, found
//! through the reader's own API: random and boundary values in the
//! superblock, group descriptors, in-use inodes, bitmaps, directory,
//! extent-tree, indirect and symlink blocks; whole blocks zeroed, filled
//! with 0xFF or overwritten by another metadata block; the image truncated,
//! with and without the superblock shrunk to match. metadata_csum images
//! refuse most damage by checksum (their superblock checksum is recomputed
//! after half of the superblock edits, to get past it); the others let it
//! reach every parser.
//!
//! Each case runs `common/exercise.rs` under `catch_unwind`, with a
//! counting allocator and a clock (`common/harness.rs`), and every failure
//! is reported at the end with its image, case number, seed and mutation.

mod common;
#[path = "common/exercise.rs"]
mod exercise;
#[path = "common/harness.rs"]
mod harness;

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use common::{index_directories, mkfs_with_files};
use fsmap::ext4::{Ext4, MetaKind, crc32c_raw};
use fsmap::map::FsMap;
use fsmap::read::Bytes;
use harness::case_seed;
use testkit::{TempDir, Xorshift};

/// Memory one case may hold at once beyond what it started with; the
/// images are 8-12 MiB, so anything near this is an allocation sized from
/// a corrupt count rather than from the image.
const CASE_PEAK_BYTES_MAX: isize = 64 << 20;
/// Time one case may take in a debug build; a healthy one takes
/// milliseconds, so a case this slow is a hang in all but name.
const CASE_DURATION_MAX: Duration = Duration::from_secs(10);
const SUPERBLOCK_OFFSET: usize = 1024;
const SUPERBLOCK_CHECKSUM_AT: usize = 0x3FC;

#[global_allocator]
static ALLOCATOR: harness::CountingAllocator = harness::CountingAllocator;

// ---------------------------------------------------------------------------
// The images.

/// The source tree every image is built from.
fn populate(source: &Path) {
    let mut random = Xorshift::new(0x5EED);
    std::fs::create_dir_all(source.join("dir/a/b/c")).unwrap();
    std::fs::create_dir_all(source.join("big")).unwrap();
    std::fs::write(source.join("empty"), b"").unwrap();
    for (name, size) in [("one", 1), ("five-k", 5000), ("seventy-k", 70_000)] {
        std::fs::write(source.join(name), random.bytes(size)).unwrap();
    }
    std::fs::write(source.join("dir/small.txt"), b"hi\n").unwrap();
    std::fs::write(source.join("dir/a/b/c/deep.txt"), b"deep\n").unwrap();
    std::fs::hard_link(source.join("dir/small.txt"), source.join("dir/again.txt")).unwrap();
    std::os::unix::fs::symlink("dir/small.txt", source.join("link")).unwrap();
    let long_target = format!("{}/target", "long".repeat(50));
    std::os::unix::fs::symlink(long_target, source.join("long-link")).unwrap();
    // 4 KiB of data every 8 KiB: mkfs copies each piece as its own extent,
    // 400 of them, which takes an extent tree of depth 2 with 1 KiB blocks.
    let mut sparse = Vec::new();
    for _ in 0..400 {
        sparse.extend(random.bytes(4096));
        sparse.extend([0u8; 4096]);
    }
    let file = std::fs::File::create(source.join("dir/sparse")).unwrap();
    for (index, piece) in sparse.chunks(4096).enumerate().step_by(2) {
        std::os::unix::fs::FileExt::write_all_at(&file, piece, index as u64 * 4096).unwrap();
    }
    // Over one block of entries: `e2fsck -D` makes it an htree.
    for index in 0..300 {
        let name = format!("big/entry-with-a-longish-name-{index:03}");
        std::fs::write(source.join(name), format!("{index}\n")).unwrap();
    }
}

struct ImageSpec {
    label: &'static str,
    mkfs: &'static str,
    args: &'static [&'static str],
    size: &'static str,
    cases: usize,
}

/// Builds the image, indexes its large directories, and reads it whole.
fn make_image(spec: &ImageSpec) -> Vec<u8> {
    let dir = TempDir::new(&format!("fsmap-corrupt-{}", spec.label));
    let source = dir.join("source");
    populate(&source);
    let image = dir.join("fs.img");
    // A fixed UUID and directory hash seed: the same image on every run.
    let fixed = [
        "-U",
        "6b1e9a4c-2f0d-4c8e-9b7a-3d5e1f2a4b6c",
        "-E",
        "hash_seed=0c7f3e2a-1b4d-4e6f-8a9b-5c3d2e1f0a7b",
    ];
    let args = [&fixed[..], spec.args].concat();
    mkfs_with_files(spec.mkfs, &args, &source, &image, spec.size);
    index_directories(&image);
    std::fs::read(&image).unwrap()
}

// ---------------------------------------------------------------------------
// Where the structures are, from the reader itself on the undamaged image.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Superblock,
    GroupDescriptors,
    Bitmap,
    Inode,
    Directory,
    MapBlock,
    LinkBlock,
    XattrBlock,
}

#[derive(Debug, Clone, Copy)]
struct Region {
    class: Class,
    offset: usize,
    length: usize,
}

/// The image's structures and the numbers worth writing into them.
struct Structures {
    regions: Vec<Region>,
    block_size: usize,
    blocks_count: u64,
    metadata_csum: bool,
    /// Boundary values and the block and inode numbers of real structures.
    interesting: Vec<u64>,
}

fn structures(image: &Bytes) -> Structures {
    let fs = Ext4::open(image).expect("the undamaged image opens");
    let block_size = fs.sb.block_size as usize;
    let block = |number: u64, class| Region {
        class,
        offset: number as usize * block_size,
        length: block_size,
    };
    let mut regions = vec![Region {
        class: Class::Superblock,
        offset: SUPERBLOCK_OFFSET,
        length: 1024,
    }];
    for run in fs.metadata_runs() {
        let class = match run.kind {
            MetaKind::GroupDescriptors => Class::GroupDescriptors,
            MetaKind::BlockBitmap | MetaKind::InodeBitmap => Class::Bitmap,
            _ => continue,
        };
        regions
            .extend((run.start_block..run.start_block + run.block_count).map(|b| block(b, class)));
    }
    let inode_size = fs.sb.inode_size as usize;
    for group in 0..fs.sb.group_count {
        let table = fs.group(group).unwrap().inode_table as usize * block_size;
        for inode in fs.group_inodes(group).unwrap() {
            let inode = inode.expect("the undamaged image's inodes read");
            let slot = (inode.number - 1) % fs.sb.inodes_per_group;
            regions.push(Region {
                class: Class::Inode,
                offset: table + slot as usize * inode_size,
                length: inode_size,
            });
            let blocks = fs.blocks(&inode).unwrap();
            regions.extend(
                blocks
                    .map
                    .iter()
                    .map(|&(start, _)| block(start, Class::MapBlock)),
            );
            regions.extend(blocks.xattr_block.map(|b| block(b, Class::XattrBlock)));
            let class = if inode.is_directory() {
                Class::Directory
            } else if inode.is_symlink() {
                Class::LinkBlock
            } else {
                continue;
            };
            for extent in &blocks.data {
                let count = extent.block_count.min(16);
                regions.extend((0..count).map(|i| block(extent.physical_block + i, class)));
            }
        }
    }
    let sb = &fs.sb;
    let mut interesting: Vec<u64> = vec![0, 1, 2, 11, 12, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0x8001];
    interesting.extend([0xF30A, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF]);
    interesting.extend([sb.blocks_count - 1, sb.blocks_count, sb.blocks_count + 1]);
    interesting.extend([sb.inodes_count.into(), u64::from(sb.inodes_count) + 1]);
    interesting.extend([block_size as u64, 32768, 65535]);
    interesting.extend(regions.iter().map(|r| (r.offset / block_size) as u64));
    Structures {
        regions,
        block_size,
        blocks_count: sb.blocks_count,
        metadata_csum: sb.metadata_csum(),
        interesting,
    }
}

// ---------------------------------------------------------------------------
// Mutations.

/// One case's damage: byte writes, then maybe a truncation.
#[derive(Debug, Default)]
struct Mutation {
    what: String,
    writes: Vec<(usize, Vec<u8>)>,
    truncate_to: Option<usize>,
}

impl Mutation {
    /// Blocks the damage touched, as an incremental update would be told.
    fn changed_blocks(&self, block_size: usize, blocks_count: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = self
            .writes
            .iter()
            .map(|(offset, bytes)| {
                let first = offset / block_size;
                let last = (offset + bytes.len().max(1) - 1) / block_size;
                (first as u64, (last - first + 1) as u64)
            })
            .collect();
        if let Some(length) = self.truncate_to {
            let first = (length / block_size) as u64;
            out.push((first, blocks_count.saturating_sub(first)));
        }
        out
    }
}

fn pick_region<'a>(random: &mut Xorshift, layout: &'a Structures) -> &'a Region {
    // Every class equally often, whatever its number of regions.
    let classes: Vec<Class> = {
        let mut seen = Vec::new();
        for region in &layout.regions {
            if !seen.contains(&region.class) {
                seen.push(region.class);
            }
        }
        seen
    };
    let class = classes[random.index(classes.len())];
    let of_class: Vec<&Region> = layout.regions.iter().filter(|r| r.class == class).collect();
    of_class[random.index(of_class.len())]
}

/// One to four edits inside one structure: a random byte, or a boundary value
/// as a little-endian 16- or 32-bit field.
fn edit_region(random: &mut Xorshift, layout: &Structures, mutation: &mut Mutation) {
    let region = *pick_region(random, layout);
    for _ in 0..1 + random.below(4) {
        let value = layout.interesting[random.index(layout.interesting.len())];
        let (width, bytes) = match random.below(4) {
            0 | 1 => (1, vec![random.next() as u8]),
            2 => (2, (value as u16).to_le_bytes().to_vec()),
            _ => (4, (value as u32).to_le_bytes().to_vec()),
        };
        let slot = random.index(region.length / width) * width;
        mutation.writes.push((region.offset + slot, bytes));
    }
    let _ = write!(
        mutation.what,
        "edits in {:?} at {}; ",
        region.class, region.offset
    );
}

fn fill_block(random: &mut Xorshift, layout: &Structures, image: &[u8], mutation: &mut Mutation) {
    let region = *pick_region(random, layout);
    let start = region.offset / layout.block_size * layout.block_size;
    let end = (start + layout.block_size).min(image.len());
    let (contents, how) = match random.below(3) {
        0 => (vec![0u8; end - start], "zeroed".to_string()),
        1 => (vec![0xFFu8; end - start], "filled with 0xFF".to_string()),
        _ => {
            let other = *pick_region(random, layout);
            let from = other.offset / layout.block_size * layout.block_size;
            let copy = image[from..from + (end - start)].to_vec();
            (
                copy,
                format!("overwritten by the {:?} block at {from}", other.class),
            )
        }
    };
    mutation.writes.push((start, contents));
    let _ = write!(mutation.what, "{:?} block at {start} {how}; ", region.class);
}

/// Truncates the image; with `shrink`, also sets the superblock's block
/// count to what is left, so the reader gets past its size check.
fn truncate(
    random: &mut Xorshift,
    layout: &Structures,
    image: &[u8],
    shrink: bool,
    mutation: &mut Mutation,
) {
    let length = if random.chance(50) {
        random.index(image.len())
    } else {
        let region = pick_region(random, layout);
        (region.offset + random.index(region.length + 1)).min(image.len() - 1)
    };
    mutation.truncate_to = Some(length);
    let _ = write!(mutation.what, "truncated to {length} bytes; ");
    if shrink {
        let blocks = (length / layout.block_size) as u32;
        mutation
            .writes
            .push((SUPERBLOCK_OFFSET + 4, blocks.to_le_bytes().to_vec()));
        let _ = write!(mutation.what, "block count set to {blocks}; ");
    }
}

fn mutation(random: &mut Xorshift, layout: &Structures, image: &[u8]) -> Mutation {
    let mut mutation = Mutation::default();
    let choice = random.below(100);
    match choice {
        0..50 => edit_region(random, layout, &mut mutation),
        50..62 => {
            edit_region(random, layout, &mut mutation);
            edit_region(random, layout, &mut mutation);
        }
        62..80 => fill_block(random, layout, image, &mut mutation),
        80..88 => truncate(random, layout, image, false, &mut mutation),
        _ => truncate(random, layout, image, true, &mut mutation),
    }
    let touches_superblock = mutation.writes.iter().any(|(offset, bytes)| {
        *offset < SUPERBLOCK_OFFSET + 1024 && offset + bytes.len() > SUPERBLOCK_OFFSET
    });
    if layout.metadata_csum && touches_superblock && (choice >= 88 || random.chance(50)) {
        mutation.what.push_str("superblock checksum recomputed; ");
        mutation
            .writes
            .push((SUPERBLOCK_OFFSET + SUPERBLOCK_CHECKSUM_AT, Vec::new()));
    }
    mutation
}

/// Applies `mutation` to `work` (a copy of `pristine`). An empty write at
/// the superblock checksum means "recompute it".
fn apply(work: &mut Vec<u8>, mutation: &Mutation) {
    for (offset, bytes) in &mutation.writes {
        if bytes.is_empty() && *offset == SUPERBLOCK_OFFSET + SUPERBLOCK_CHECKSUM_AT {
            let sb = &work[SUPERBLOCK_OFFSET..SUPERBLOCK_OFFSET + SUPERBLOCK_CHECKSUM_AT];
            let checksum = crc32c_raw(!0, sb).to_le_bytes();
            work[*offset..*offset + 4].copy_from_slice(&checksum);
        } else {
            work[*offset..*offset + bytes.len()].copy_from_slice(bytes);
        }
    }
    if let Some(length) = mutation.truncate_to {
        work.truncate(length);
    }
}

/// Puts `work` back to `pristine` where `mutation` changed it.
fn undo(work: &mut Vec<u8>, pristine: &[u8], mutation: &Mutation) {
    if mutation.truncate_to.is_some() {
        let length = work.len();
        work.extend_from_slice(&pristine[length..]);
    }
    for (offset, bytes) in &mutation.writes {
        // An empty write is the 4-byte superblock checksum.
        let end = offset + if bytes.is_empty() { 4 } else { bytes.len() };
        work[*offset..end].copy_from_slice(&pristine[*offset..end]);
    }
}

// ---------------------------------------------------------------------------
// The runs.

#[derive(Debug, Default)]
struct Tally {
    opened: usize,
    mapped: usize,
    updated: usize,
    peak_bytes_max: isize,
    duration_max: Duration,
    failures: Vec<String>,
}

fn check_image(spec: &ImageSpec) -> Tally {
    harness::install_panic_capture();
    let pristine = make_image(spec);
    let layout = structures(&Bytes(pristine.clone()));
    let earlier = FsMap::build(&Ext4::open(Bytes(pristine.clone())).unwrap()).unwrap();
    let healthy = exercise::exercise(&Bytes(pristine.clone()), Some(&earlier), &[]);
    assert!(
        healthy.mapped && healthy.updated,
        "{}: the undamaged image does not map",
        spec.label
    );
    let mut work = Bytes(pristine.clone());
    let mut tally = Tally::default();
    for index in 0..spec.cases {
        let seed = case_seed(spec.label, index);
        let mutation = mutation(&mut Xorshift::new(seed), &layout, &pristine);
        apply(&mut work.0, &mutation);
        let changed = mutation.changed_blocks(layout.block_size, layout.blocks_count);
        let outcome = harness::run_case(|| exercise::exercise(&work, Some(&earlier), &changed));
        undo(&mut work.0, &pristine, &mutation);
        let failure = outcome.failure(CASE_PEAK_BYTES_MAX, CASE_DURATION_MAX);
        if let Some(failure) = failure {
            let what = &mutation.what;
            let writes: Vec<(usize, &[u8])> = mutation
                .writes
                .iter()
                .map(|(o, b)| (*o, &b[..b.len().min(8)]))
                .collect();
            tally.failures.push(format!(
                "{} case {index} (seed {seed:#x}): {what}writes {writes:?}: {failure}",
                spec.label
            ));
        }
        let reached = outcome.result.unwrap_or_default();
        tally.opened += usize::from(reached.opened);
        tally.mapped += usize::from(reached.mapped);
        tally.updated += usize::from(reached.updated);
        tally.peak_bytes_max = tally.peak_bytes_max.max(outcome.peak_bytes);
        tally.duration_max = tally.duration_max.max(outcome.duration);
    }
    assert!(
        work.0 == pristine,
        "{}: undo left the image changed",
        spec.label
    );
    report(spec, &tally);
    tally
}

fn report(spec: &ImageSpec, tally: &Tally) {
    eprintln!(
        "{}: {} cases, {} opened, {} mapped, {} updated; at most {} KiB held and {:?} taken by one case",
        spec.label,
        spec.cases,
        tally.opened,
        tally.mapped,
        tally.updated,
        tally.peak_bytes_max >> 10,
        tally.duration_max
    );
    harness::assert_no_failures(&tally.failures, || {
        format!(
            "{} of {} damaged {} images failed",
            tally.failures.len(),
            spec.cases,
            spec.label
        )
    });
}

/// Mutations must reach past the checks at open into the parsers, or the
/// test proves little: at least `percent` of the cases must map.
fn assert_deep(spec: &ImageSpec, tally: &Tally, percent: usize) {
    assert!(
        tally.mapped * 100 >= spec.cases * percent,
        "{}: only {} of {} damaged images got as far as a file map",
        spec.label,
        tally.mapped,
        spec.cases
    );
}

const EXT4_1K_CSUM: ImageSpec = ImageSpec {
    label: "ext4-1k-csum",
    mkfs: "mkfs.ext4",
    args: &["-b", "1024", "-g", "2048", "-O", "metadata_csum,64bit"],
    size: "8M",
    cases: 500,
};

const EXT4_4K_CSUM: ImageSpec = ImageSpec {
    label: "ext4-4k-csum",
    mkfs: "mkfs.ext4",
    args: &["-b", "4096", "-g", "1024", "-O", "metadata_csum,64bit"],
    size: "12M",
    cases: 300,
};

const EXT4_1K: ImageSpec = ImageSpec {
    label: "ext4-1k",
    mkfs: "mkfs.ext4",
    args: &["-b", "1024", "-g", "2048", "-O", "^metadata_csum,64bit"],
    size: "8M",
    cases: 900,
};

const EXT4_4K: ImageSpec = ImageSpec {
    label: "ext4-4k",
    mkfs: "mkfs.ext4",
    args: &["-b", "4096", "-g", "1024", "-O", "^metadata_csum,^64bit"],
    size: "12M",
    cases: 700,
};

const EXT2_1K: ImageSpec = ImageSpec {
    label: "ext2-1k",
    mkfs: "mkfs.ext2",
    args: &["-b", "1024", "-g", "2048"],
    size: "8M",
    cases: 900,
};

const EXT4_INLINE: ImageSpec = ImageSpec {
    label: "ext4-inline",
    mkfs: "mkfs.ext4",
    args: &[
        "-b",
        "1024",
        "-g",
        "2048",
        "-O",
        "inline_data,^metadata_csum",
    ],
    size: "8M",
    cases: 700,
};

#[test]
fn ext4_with_1k_blocks_and_metadata_csum_survives_damage() {
    let tally = check_image(&EXT4_1K_CSUM);
    assert_deep(&EXT4_1K_CSUM, &tally, 10);
}

#[test]
fn ext4_with_4k_blocks_and_metadata_csum_survives_damage() {
    let tally = check_image(&EXT4_4K_CSUM);
    assert_deep(&EXT4_4K_CSUM, &tally, 10);
}

#[test]
fn ext4_with_1k_blocks_without_metadata_csum_survives_damage() {
    let tally = check_image(&EXT4_1K);
    assert_deep(&EXT4_1K, &tally, 40);
}

#[test]
fn ext4_with_4k_blocks_without_metadata_csum_survives_damage() {
    let tally = check_image(&EXT4_4K);
    assert_deep(&EXT4_4K, &tally, 40);
}

#[test]
fn ext2_with_block_maps_survives_damage() {
    let tally = check_image(&EXT2_1K);
    assert_deep(&EXT2_1K, &tally, 40);
}

#[test]
fn ext4_with_inline_data_survives_damage() {
    let tally = check_image(&EXT4_INLINE);
    assert_deep(&EXT4_INLINE, &tally, 40);
}

// ---------------------------------------------------------------------------
// Regression tests: each is damage that once made the reader panic or
// work without bound, named after what broke.

fn put16(image: &mut [u8], offset: usize, value: u16) {
    image[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
}

fn put32(image: &mut [u8], offset: usize, value: u32) {
    image[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

/// The byte offset of the inode at `path`, and the filesystem's last block.
fn inode_offset(image: &[u8], path: &str) -> (usize, usize) {
    let fs = Ext4::open(Bytes(image.to_vec())).unwrap();
    let number = fs.lookup(path).unwrap();
    let per_group = fs.sb.inodes_per_group;
    let table = fs
        .group(u64::from((number - 1) / per_group))
        .unwrap()
        .inode_table;
    let offset = table * fs.sb.block_size + u64::from((number - 1) % per_group) * fs.sb.inode_size;
    (offset as usize, fs.sb.blocks_count as usize - 1)
}

/// Clears an extent-tree node and writes its header (no checksum: the
/// images that use this have no metadata_csum).
fn put_extent_header(node: &mut [u8], entries: u16, max: u16, depth: u16) {
    node.fill(0);
    put16(node, 0, 0xF30A);
    put16(node, 2, entries);
    put16(node, 4, max);
    put16(node, 6, depth);
}

/// An image `length_bytes` long whose bytes past `head` read as zeros: a
/// large filesystem without the memory.
struct ZeroPadded {
    head: Vec<u8>,
    length_bytes: u64,
}

impl fsmap::read::ReadAt for ZeroPadded {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.length_bytes)
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.fill(0);
        let head_length = self.head.len() as u64;
        if offset < head_length {
            let take = (end.min(head_length) - offset) as usize;
            buf[..take].copy_from_slice(&self.head[offset as usize..offset as usize + take]);
        }
        Ok(())
    }
}

#[test]
fn an_inode_table_near_2_pow_64_is_corrupt_not_an_overflow() {
    // ext4-1k case 631: group 0's 64-byte descriptor (block 2) filled with
    // 0xFF made `inode_table + table_blocks` overflow.
    let mut image = make_image(&EXT4_1K);
    image[2048..2048 + 64].fill(0xFF);
    assert!(!exercise::exercise(&Bytes(image), None, &[]).opened);
}

#[test]
fn more_inodes_per_group_than_a_bitmap_block_tracks_is_corrupt() {
    // One group whose 8200 inodes need 1025 bytes of a 1024-byte inode
    // bitmap: reading the group indexed past the end of the bitmap.
    let spec = ImageSpec {
        label: "ext2-1k-one-group",
        mkfs: "mkfs.ext2",
        args: &["-b", "1024", "-g", "8192"],
        size: "8M",
        cases: 0,
    };
    let mut image = make_image(&spec);
    put32(&mut image, SUPERBLOCK_OFFSET, 8200); // inodes count
    put32(&mut image, SUPERBLOCK_OFFSET + 0x28, 8200); // inodes per group
    assert!(!exercise::exercise(&Bytes(image), None, &[]).opened);
}

#[test]
fn groups_holding_more_inodes_than_the_superblock_counts_are_corrupt() {
    // 8194 groups of 2^19 inodes with 64 KiB blocks: inode numbers of group
    // 8192 onwards do not fit in u32, and computing them overflowed.
    let block_size = 65536;
    let group_count = 8194u32;
    let mut head = vec![0u8; block_size + group_count as usize * 32];
    let sb = SUPERBLOCK_OFFSET;
    put32(&mut head, sb, u32::MAX); // inodes count
    put32(&mut head, sb + 0x04, group_count); // blocks count
    put32(&mut head, sb + 0x18, 6); // 1024 << 6 bytes a block
    put32(&mut head, sb + 0x20, 1); // blocks per group
    put32(&mut head, sb + 0x28, 1 << 19); // inodes per group: one full bitmap
    put16(&mut head, sb + 0x38, 0xEF53);
    put32(&mut head, sb + 0x4C, 1); // revision
    put32(&mut head, sb + 0x54, 11); // first inode
    put16(&mut head, sb + 0x58, 128); // inode size
    for group in 0..8192 {
        put16(&mut head, block_size + group * 32 + 0x12, 1); // inodes uninitialised
    }
    let image = ZeroPadded {
        head,
        length_bytes: u64::from(group_count) * block_size as u64,
    };
    assert!(!exercise::exercise(&image, None, &[]).opened);
}

#[test]
fn an_indirect_block_naming_itself_is_corrupt_not_65536_extents() {
    // A double-indirect block whose every pointer is itself, and an i_blocks
    // that allows it: the walk made an extent of each of 256 * 256 steps
    // (with 4 KiB blocks and the triple-indirect slot, 2^30 of them).
    let mut image = make_image(&EXT2_1K);
    let (inode, last_block) = inode_offset(&image, "/five-k");
    let block = last_block;
    for word in 0..256 {
        put32(&mut image, block * 1024 + word * 4, block as u32);
    }
    put32(&mut image, inode + 0x28 + 13 * 4, block as u32); // double indirect
    put32(&mut image, inode + 0x1C, u32::MAX); // i_blocks
    let fs = Ext4::open(Bytes(image)).unwrap();
    let number = fs.lookup("/five-k").unwrap();
    let blocks = fs.blocks(&fs.inode(number).unwrap());
    assert!(
        blocks.is_err(),
        "{:?} extents",
        blocks.map(|b| b.data.len())
    );
}

#[test]
fn extent_index_nodes_sharing_a_child_are_corrupt() {
    // A depth-2 tree whose 4 root entries name one index block, whose 340
    // entries name one leaf: 1364 reads for 2 blocks and 462400 extents
    // (at depth 5, more than memory holds).
    let mut image = make_image(&EXT4_4K);
    let (inode, last_block) = inode_offset(&image, "/seventy-k");
    let (index, leaf) = (last_block, last_block - 1);
    let root = &mut image[inode + 0x28..inode + 0x28 + 60];
    put_extent_header(root, 4, 4, 2);
    for entry in 0..4 {
        put32(root, 12 + entry * 12 + 4, index as u32);
    }
    let node = &mut image[index * 4096..(index + 1) * 4096];
    put_extent_header(node, 340, 340, 1);
    for entry in 0..340 {
        put32(node, 12 + entry * 12 + 4, leaf as u32);
    }
    let node = &mut image[leaf * 4096..(leaf + 1) * 4096];
    put_extent_header(node, 340, 340, 0);
    for entry in 0..340 {
        put32(node, 12 + entry * 12, entry as u32); // logical block
        put16(node, 12 + entry * 12 + 4, 1); // length
        put32(node, 12 + entry * 12 + 8, 100); // physical block
    }
    put32(&mut image, inode + 0x1C, u32::MAX); // i_blocks
    let fs = Ext4::open(Bytes(image)).unwrap();
    let number = fs.lookup("/seventy-k").unwrap();
    let blocks = fs.blocks(&fs.inode(number).unwrap());
    assert!(
        blocks.is_err(),
        "{:?} extents",
        blocks.map(|b| b.data.len())
    );
}

#[test]
fn a_directory_whose_extents_overlap_is_corrupt_not_read_over_and_over() {
    // A 64-block directory whose one leaf holds 340 extents of the same 64
    // blocks: 21760 block reads (with 32768-block extents, 11 million).
    let mut image = make_image(&EXT4_4K);
    let (inode, last_block) = inode_offset(&image, "/big");
    let (leaf, first_data) = (last_block, last_block - 100);
    for block in first_data..first_data + 64 {
        let entry = block * 4096;
        image[entry..entry + 4096].fill(0);
        put16(&mut image, entry + 4, 4096); // one empty entry spans the block
    }
    let root = &mut image[inode + 0x28..inode + 0x28 + 60];
    put_extent_header(root, 1, 4, 1);
    put32(root, 12 + 4, leaf as u32);
    let node = &mut image[leaf * 4096..(leaf + 1) * 4096];
    put_extent_header(node, 340, 340, 0);
    for entry in 0..340 {
        put16(node, 12 + entry * 12 + 4, 64); // length; logical block 0
        put32(node, 12 + entry * 12 + 8, first_data as u32);
    }
    put32(&mut image, inode + 0x04, 64 * 4096); // size
    let fs = Ext4::open(Bytes(image)).unwrap();
    let number = fs.lookup("/big").unwrap();
    let entries = fs.directory(&fs.inode(number).unwrap());
    assert!(entries.is_err(), "{:?} entries", entries.map(|e| e.len()));
}
