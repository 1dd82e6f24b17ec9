//! The file map against e2fsprogs: on images built by `mkfs -d` (ext2,
//! ext3, ext4 with and without metadata_csum and 64bit, inline data, 1 KiB
//! and 4 KiB blocks) every sampled block's owner agrees with `debugfs
//! icheck`, every inode's paths with `debugfs ncheck`, and a map saved and
//! loaded again is the same map.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::{debugfs, index_directories, mkfs_with_files, ncheck};
use fsmap::ext4::{Ext4, MetaKind};
use fsmap::map::{FsMap, Owner};
use testkit::{TempDir, random_bytes};

/// Files, hard links, short and long symlinks, a directory big enough to
/// be indexed (htree), tiny files (inline data where enabled), nesting.
fn populate(source: &Path) {
    std::fs::create_dir_all(source.join("big")).unwrap();
    std::fs::create_dir_all(source.join("a/b/c")).unwrap();
    for index in 0..400 {
        let name = format!("big/entry-with-a-long-name-{index:04}.txt");
        std::fs::write(
            source.join(name),
            random_bytes(index, (index as usize % 7) * 1500 + 1),
        )
        .unwrap();
    }
    for (index, size) in [0usize, 30, 5000, 200_000, 3_000_000].iter().enumerate() {
        std::fs::write(
            source.join(format!("a/b/c/f{index}")),
            random_bytes(index as u64 + 77, *size),
        )
        .unwrap();
    }
    std::fs::hard_link(source.join("a/b/c/f3"), source.join("a/hard-link-to-f3")).unwrap();
    std::os::unix::fs::symlink("f2", source.join("a/b/c/short-link")).unwrap();
    std::os::unix::fs::symlink("x".repeat(200), source.join("a/long-link")).unwrap();
    // A sparse 6 GiB file with 300 separate pieces: logical blocks past
    // 2^20, and more extents than the inode holds (an extent tree).
    let huge = std::fs::File::create(source.join("a/huge-sparse")).unwrap();
    huge.set_len(6 << 30).unwrap();
    for piece in 0..300u64 {
        let at = piece * ((6 << 30) / 300);
        std::os::unix::fs::FileExt::write_all_at(&huge, &random_bytes(piece + 500, 4096), at)
            .unwrap();
    }
}

/// `debugfs icheck` for many blocks at once: block -> inode.
fn icheck(image: &Path, blocks: &[u64]) -> BTreeMap<u64, Option<u32>> {
    let mut out = BTreeMap::new();
    for chunk in blocks.chunks(200) {
        let request = format!(
            "icheck {}",
            chunk
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        );
        for line in debugfs(image, &request).lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(block) = fields.first().and_then(|f| f.parse().ok()) else {
                continue;
            };
            out.insert(block, fields.get(1).and_then(|f| f.parse().ok()));
        }
    }
    out
}

fn check(label: &str, args: &[&str], size: &str) {
    let dir = TempDir::new(&format!("map-{label}"));
    let source = dir.join("source");
    populate(&source);
    let image = dir.join("fs.img");
    mkfs_with_files("mke2fs", args, &source, &image, size);
    if !args.contains(&"ext2") {
        index_directories(&image);
        let htree = debugfs(&image, "htree /big");
        assert!(
            htree.contains("Root node dump"),
            "{label}: /big is not indexed: {htree}"
        );
    }
    let fs = Ext4::open(std::fs::File::open(&image).unwrap()).unwrap();
    let map = FsMap::build(&fs).unwrap();
    assert!(map.problems.is_empty(), "{label}: {:?}", map.problems);
    assert!(
        map.inodes.len() > 400,
        "{label}: only {} inodes",
        map.inodes.len()
    );

    // Blocks: every 7th block of the filesystem, plus every block of the
    // files debugfs knows about.
    let mut sample: Vec<u64> = (0..fs.sb.blocks_count).step_by(7).collect();
    for record in map.inodes.values() {
        for extent in &record.extents {
            sample.push(extent.physical_block + extent.block_count / 2);
        }
        sample.extend(record.map_blocks.iter().map(|&(start, _)| start));
    }
    sample.sort_unstable();
    sample.dedup();
    let theirs = icheck(&image, &sample);
    let mut compared = 0;
    for block in &sample {
        let ours: Vec<Owner> = map
            .owners_of(*block, 1)
            .into_iter()
            .map(|(o, _)| o)
            .collect();
        match theirs.get(block).copied().flatten() {
            Some(inode) => {
                let agrees = ours.iter().any(|owner| match owner {
                    Owner::Inode(number, _) => *number == inode,
                    Owner::Meta(MetaKind::Journal) => inode == fs.sb.journal_inode,
                    Owner::Meta(MetaKind::SpecialInode | MetaKind::ReservedGdt) => {
                        inode < fs.sb.first_inode
                    }
                    Owner::Meta(_) => false,
                });
                assert!(
                    agrees,
                    "{label}: block {block}: debugfs says inode {inode}, we say {ours:?}"
                );
                compared += 1;
            }
            None => assert!(
                ours.iter().all(|owner| matches!(owner, Owner::Meta(_))),
                "{label}: block {block} belongs to no inode, we say {ours:?}"
            ),
        }
    }
    assert!(
        compared > 400,
        "{label}: only {compared} owned blocks compared"
    );

    // Paths of every user inode.
    let numbers: Vec<u32> = map
        .inodes
        .keys()
        .copied()
        .filter(|&n| !map.is_special(n))
        .collect();
    let names = ncheck(&image, &numbers);
    for number in &numbers {
        let ours: BTreeSet<String> = map.paths(*number).into_iter().collect();
        if *number == 2 {
            assert_eq!(ours, BTreeSet::from(["/".to_string()]));
            continue;
        }
        let expected = names.get(number).cloned().unwrap_or_default();
        assert_eq!(ours, expected, "{label}: paths of inode {number}");
    }
    let hard = fs.lookup("/a/hard-link-to-f3").unwrap();
    assert_eq!(
        map.paths(hard),
        vec!["/a/b/c/f3".to_string(), "/a/hard-link-to-f3".to_string()]
    );

    // Saved and loaded: the same records, directories and owners.
    let loaded = fsmap::persist::decode(&fsmap::persist::encode(&map)).unwrap();
    assert_eq!(
        loaded.inodes, map.inodes,
        "{label}: records after a round trip"
    );
    assert_eq!(
        loaded.children, map.children,
        "{label}: directories after a round trip"
    );
    for block in sample.iter().step_by(5) {
        assert_eq!(
            loaded.owners_of(*block, 1),
            map.owners_of(*block, 1),
            "{label}: block {block}"
        );
    }
    let mut damaged = fsmap::persist::encode(&map);
    let middle = damaged.len() / 2;
    damaged[middle] ^= 1;
    assert!(
        fsmap::persist::decode(&damaged).is_err(),
        "{label}: a flipped bit went unnoticed"
    );
}

#[test]
fn map_matches_debugfs_on_ext4_with_metadata_csum_and_1k_blocks() {
    check(
        "ext4-1k-csum",
        &["-t", "ext4", "-b", "1024", "-O", "metadata_csum,64bit"],
        "64M",
    );
}

#[test]
fn map_matches_debugfs_on_ext4_4k_without_metadata_csum() {
    check(
        "ext4-4k",
        &["-t", "ext4", "-b", "4096", "-O", "^metadata_csum,^64bit"],
        "128M",
    );
}

#[test]
fn map_matches_debugfs_on_a_2g_64bit_ext4_with_flex_groups() {
    check(
        "ext4-2g",
        &["-t", "ext4", "-O", "64bit,metadata_csum", "-G", "4"],
        "2G",
    );
}

#[test]
fn map_matches_debugfs_on_ext4_with_inline_data() {
    check(
        "ext4-inline",
        &["-t", "ext4", "-O", "inline_data", "-I", "256"],
        "64M",
    );
}

#[test]
fn map_matches_debugfs_on_ext2_block_maps() {
    check("ext2", &["-t", "ext2", "-b", "1024"], "64M");
}

#[test]
fn map_matches_debugfs_on_ext3_block_maps_with_a_journal() {
    check("ext3", &["-t", "ext3", "-b", "4096"], "128M");
}
