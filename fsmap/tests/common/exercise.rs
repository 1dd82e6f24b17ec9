//! Every read a corrupt image has to survive without a panic, a hang or an
//! absurd allocation: open, every in-use inode's blocks, directory and link
//! target, its full metadata (xattrs, ACLs), data layout and some of its
//! contents, the full file map, its walk, paths and lookups, and an
//! incremental update.
//! Shared by `tests/corrupt_images.rs` and the cargo-fuzz target
//! `fuzz/fuzz_targets/ext4_image.rs`, which includes this file by path.

use fsmap::ext4::{Ext4, FileLayout, Inode};
use fsmap::map::FsMap;
use fsmap::read::ReadAt;

/// Path lookups per image: each one re-reads every directory on its path,
/// so all of them would make one case as slow as hundreds.
const LOOKUPS_MAX: usize = 8;
/// Bytes read from each data segment of a file, and segments read per file.
const SEGMENT_READ_BYTES_MAX: u64 = 16 * 1024;
const SEGMENTS_READ_MAX: usize = 64;

/// How far into the reader a corrupt image got.
#[derive(Debug, Default, Clone, Copy)]
pub struct Reached {
    pub opened: bool,
    pub mapped: bool,
    pub updated: bool,
}

/// Runs every read on `image`. With `earlier` (the map of the image before
/// it was damaged), also updates a copy of that map from the damaged image
/// as if blocks `changed` had been written; without it, updates the new
/// map from the image itself over every block.
pub fn exercise<R: ReadAt>(image: &R, earlier: Option<&FsMap>, changed: &[(u64, u64)]) -> Reached {
    let mut reached = Reached::default();
    let Ok(fs) = Ext4::open(image) else {
        return reached;
    };
    reached.opened = true;
    let _ = fs.metadata_runs();
    let built = FsMap::build(&fs);
    if let Ok(map) = &built {
        reached.mapped = true;
        walk_map(&fs, map, LOOKUPS_MAX);
        let _ = map.owners_of(0, fs.sb.blocks_count);
    }
    // A map that built has read every in-use inode's blocks and every
    // directory already; link targets and inline xattrs are read here, and
    // all of it when the map failed part way.
    for group in 0..fs.sb.group_count {
        if let Ok(inodes) = fs.group_inodes(group) {
            for inode in inodes.iter().flatten() {
                visit(&fs, inode, !reached.mapped);
            }
        }
    }
    let whole = [(0, fs.sb.blocks_count)];
    let (mut updated, changed) = match (earlier, built) {
        (Some(earlier), _) => (earlier.clone(), changed),
        (None, Ok(map)) => (map, &whole[..]),
        (None, Err(_)) => return reached,
    };
    if updated.update(&fs, changed).is_ok() {
        reached.updated = true;
        // Paths again; lookups and the owners of every block (the slow
        // parts) only once, and here only the owners of what changed.
        walk_map(&fs, &updated, 0);
        for &(start, count) in changed {
            let _ = updated.owners_of(start, count);
        }
    }
    reached
}

fn visit<R: ReadAt>(fs: &Ext4<R>, inode: &Inode, with_blocks: bool) {
    if with_blocks {
        let _ = fs.blocks(inode);
        let _ = fs.directory(inode);
    }
    let _ = fs.read_link(inode);
    let _ = inode.inline_xattrs();
    let _ = inode.fast_symlink_target();
    exercise_file(fs, inode);
}

/// What reading one file out of the image does: its metadata, its layout,
/// the start of each of its first segments, its last byte and a read
/// past its end. Returns the layout, if there was one.
pub fn exercise_file<R: ReadAt>(fs: &Ext4<R>, inode: &Inode) -> Option<FileLayout> {
    let _ = fs.file_meta(inode);
    let layout = fs.file_layout(inode).ok()?;
    let _ = layout.data_ranges();
    for segment in layout.segments.iter().take(SEGMENTS_READ_MAX) {
        let length = segment.length_bytes.min(SEGMENT_READ_BYTES_MAX);
        let mut buf = vec![0u8; length as usize];
        let _ = fs.read_file_at(inode, &layout, segment.offset_bytes, &mut buf);
    }
    let mut last = [0u8; 1];
    if layout.size_bytes > 0 {
        let _ = fs.read_file_at(inode, &layout, layout.size_bytes - 1, &mut last);
    }
    assert!(
        fs.read_file_at(inode, &layout, layout.size_bytes, &mut last)
            .is_err(),
        "a read past the end of inode {} succeeded",
        inode.number
    );
    Some(layout)
}

fn walk_map<R: ReadAt>(fs: &Ext4<R>, map: &FsMap, lookups_max: usize) {
    let mut numbers: Vec<u32> = map.inodes.keys().copied().collect();
    numbers.sort_unstable();
    let _ = map.walk().count();
    let mut lookups = 0;
    for number in numbers {
        for path in map.paths(number) {
            if lookups < lookups_max {
                lookups += 1;
                let _ = fs.lookup(&path);
            }
        }
    }
}
