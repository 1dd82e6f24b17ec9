//! Incremental update against a full rebuild: an image is changed with
//! `debugfs -w` (files written, removed, renamed, linked, directories made
//! and removed), the changed blocks are found by comparing the image
//! before and after, and the old map updated from only those blocks must
//! equal a map built from scratch. Then the diff of the two maps must
//! name exactly the files the commands touched.

mod common;

use std::path::Path;
use std::process::Command;

use common::mkfs_with_files;
use fsmap::diff::{self, ChangeKind};
use fsmap::ext4::Ext4;
use fsmap::map::FsMap;
use testkit::{TempDir, output, random_bytes, tool};

fn debugfs_write(image: &Path, commands: &str) {
    let script = image.with_extension("cmds");
    std::fs::write(&script, commands).unwrap();
    let output = output(
        Command::new(tool("debugfs", "e2fsprogs"))
            .args(["-w", "-f"])
            .arg(&script)
            .arg(image),
    );
    assert!(
        output.status.success(),
        "debugfs -w failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let errors = String::from_utf8_lossy(&output.stderr);
    assert!(!errors.contains("rror"), "debugfs -w: {errors}");
}

/// Blocks (start, count) whose bytes differ between two images.
fn changed_blocks(before: &[u8], after: &[u8], block_size: usize) -> Vec<(u64, u64)> {
    let runs: Vec<(u64, u64)> = before
        .chunks(block_size)
        .zip(after.chunks(block_size))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(index, _)| (index as u64, 1))
        .collect();
    diff::merge_runs(runs)
}

fn check(label: &str, mkfs_args: &[&str]) {
    let dir = TempDir::new(&format!("update-{label}"));
    let source = dir.join("source");
    std::fs::create_dir_all(source.join("keep/deep")).unwrap();
    std::fs::create_dir_all(source.join("gone")).unwrap();
    for index in 0..120 {
        std::fs::write(
            source.join(format!("keep/f{index}")),
            random_bytes(index, 3000),
        )
        .unwrap();
    }
    std::fs::write(source.join("keep/deep/rename-me"), b"moving").unwrap();
    std::fs::write(source.join("gone/remove-me"), random_bytes(9, 50_000)).unwrap();
    std::fs::write(source.join("link-target"), b"linked").unwrap();
    let image = dir.join("fs.img");
    mkfs_with_files("mke2fs", mkfs_args, &source, &image, "64M");
    let before = std::fs::read(&image).unwrap();
    let fs = Ext4::open(std::fs::File::open(&image).unwrap()).unwrap();
    let mut map = FsMap::build(&fs).unwrap();
    let old = map.clone();
    let block_size = fs.sb.block_size as usize;

    let new_file = dir.join("new-file");
    std::fs::write(&new_file, random_bytes(5, 70_000)).unwrap();
    debugfs_write(
        &image,
        &format!(
            "write {} keep/new-file\nrm gone/remove-me\nrmdir gone\nmkdir made\n\
             ln link-target made/second-name\nsif link-target links_count 2\n\
             ln keep/deep/rename-me made/renamed\nunlink keep/deep/rename-me\nsif keep/f7 mtime 20200101\nea_set keep/f9 user.note hello\n",
            new_file.display()
        ),
    );
    let after = std::fs::read(&image).unwrap();
    let changed = changed_blocks(&before, &after, block_size);
    let fs = Ext4::open(std::fs::File::open(&image).unwrap()).unwrap();
    let reread = map.update(&fs, &changed).unwrap();
    let rebuilt = FsMap::build(&fs).unwrap();
    assert_eq!(
        map.inodes, rebuilt.inodes,
        "{label}: records after the update"
    );
    assert_eq!(
        map.children, rebuilt.children,
        "{label}: directories after the update"
    );
    assert!(
        reread < rebuilt.inodes.len() / 2,
        "{label}: the update re-read {reread} of {} inodes",
        rebuilt.inodes.len()
    );
    for &(start, count) in &changed {
        assert_eq!(
            map.owners_of(start, count),
            rebuilt.owners_of(start, count),
            "{label}: owners of {start}+{count}"
        );
    }

    let changes = diff::diff(&old, &map, &changed);
    let listed: Vec<(char, String)> = changes
        .files
        .iter()
        .filter(|c| !c.is_directory)
        .map(|c| {
            (
                c.kind.symbol(),
                c.paths.first().cloned().unwrap_or_default(),
            )
        })
        .collect();
    let expected = [
        ('M', "/keep/f7"),
        // An extended attribute stored in the inode body: the inode's
        // other fields do not change, its xattr area does.
        ('M', "/keep/f9"),
        ('+', "/keep/new-file"),
        ('-', "/gone/remove-me"),
        ('R', "/link-target"),
        ('R', "/made/renamed"),
    ];
    for (symbol, path) in expected {
        assert!(
            listed.iter().any(|(s, p)| *s == symbol && p == path),
            "{label}: expected {symbol} {path} in {listed:?}"
        );
    }
    let unexpected: Vec<_> = listed
        .iter()
        .filter(|(s, p)| !expected.iter().any(|(es, ep)| es == s && ep == p) && *s != '~')
        .collect();
    assert!(
        unexpected.is_empty(),
        "{label}: unexpected changes {unexpected:?}"
    );
    let renamed = changes
        .files
        .iter()
        .find(|c| c.kind == ChangeKind::Renamed && c.paths == ["/made/renamed"])
        .unwrap();
    assert_eq!(renamed.old_paths, ["/keep/deep/rename-me"]);
    let directories: Vec<&str> = changes
        .files
        .iter()
        .filter(|c| c.is_directory)
        .map(|c| c.paths.first().map(String::as_str).unwrap_or(""))
        .collect();
    for directory in ["/keep", "/made", "/keep/deep", "/"] {
        assert!(
            directories.contains(&directory),
            "{label}: directory {directory} not listed: {directories:?}"
        );
    }
}

#[test]
fn an_updated_map_equals_a_rebuilt_one_on_ext4() {
    check("ext4", &["-t", "ext4", "-b", "4096"]);
}

#[test]
fn an_updated_map_equals_a_rebuilt_one_on_ext4_with_metadata_csum_1k() {
    check(
        "ext4-1k",
        &["-t", "ext4", "-b", "1024", "-O", "metadata_csum"],
    );
}

#[test]
fn an_updated_map_equals_a_rebuilt_one_on_ext2() {
    check("ext2", &["-t", "ext2"]);
}
