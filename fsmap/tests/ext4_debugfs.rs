//! The ext4 reader against e2fsprogs' own answers: images built with
//! `mkfs.ext4 -d` (1 KiB and 4 KiB blocks, with and without metadata_csum,
//! a file big enough for a deep extent tree), every file's inode compared
//! with `debugfs stat` and its extents with `debugfs ex`.

mod common;

use std::path::Path;

use common::{debugfs, debugfs_extents, mkfs_with_files};
use testkit::{TempDir, random_bytes};

use fsmap::ext4::Ext4;

/// A source tree: small files, a nested directory, a sparse file with many
/// separate extents (enough for an extent tree of depth >= 1).
fn populate(source: &Path) -> Vec<String> {
    let mut files = Vec::new();
    std::fs::create_dir_all(source.join("dir/sub")).unwrap();
    for (index, size) in [1usize, 4095, 4096, 70_000, 1_500_000].iter().enumerate() {
        let name = format!("file{index}.bin");
        std::fs::write(source.join(&name), random_bytes(index as u64 + 1, *size)).unwrap();
        files.push(format!("/{name}"));
    }
    for index in 0..40 {
        let name = format!("dir/sub/n{index}.txt");
        std::fs::write(
            source.join(&name),
            format!("note {index}\n").repeat(index * 50 + 1),
        )
        .unwrap();
        files.push(format!("/{name}"));
    }
    // Data every other 64 KiB: mkfs copies it as separate extents.
    let sparse = source.join("dir/sparse.img");
    let file = std::fs::File::create(&sparse).unwrap();
    for chunk in 0..400u64 {
        std::os::unix::fs::FileExt::write_all_at(
            &file,
            &random_bytes(chunk + 99, 4096),
            chunk * 131_072,
        )
        .unwrap();
    }
    files.push("/dir/sparse.img".into());
    files
}

fn check_image(label: &str, mkfs_args: &[&str], size: &str) {
    let dir = TempDir::new(&format!("ext4-{label}"));
    let source = dir.join("source");
    let files = populate(&source);
    let image = dir.join("fs.img");
    mkfs_with_files("mkfs.ext4", mkfs_args, &source, &image, size);
    let fs = Ext4::open(std::fs::File::open(&image).unwrap()).unwrap();
    let mut deepest = 0;
    for path in &files {
        let number = fs.lookup(path).unwrap();
        let stat = debugfs(&image, &format!("stat {path}"));
        assert!(
            stat.starts_with(&format!("Inode: {number} ")),
            "{label}: {path}: we found inode {number}, debugfs says {}",
            stat.lines().next().unwrap_or_default()
        );
        let inode = fs.inode(number).unwrap();
        assert!(inode.is_regular());
        let ours = fs.extents(&inode).unwrap();
        let theirs = debugfs_extents(&image, path);
        assert_eq!(ours, theirs, "{label}: extents of {path}");
        let header = debugfs(&image, &format!("ex {path}"));
        if let Some(line) = header.lines().nth(1) {
            let depth: u32 = line
                .split('/')
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            deepest = deepest.max(depth);
        }
        let names = debugfs(&image, &format!("ncheck {number}"));
        assert!(
            names.contains(&format!("/{}", path.trim_start_matches('/'))),
            "{label}: ncheck {number}: {names}"
        );
    }
    assert!(
        deepest >= 1,
        "{label}: no file had an extent tree deeper than the inode"
    );
}

#[test]
fn extents_match_debugfs_with_1k_blocks_and_metadata_csum() {
    check_image("1k", &["-b", "1024", "-O", "metadata_csum,64bit"], "64M");
}

#[test]
fn extents_match_debugfs_with_4k_blocks_without_metadata_csum() {
    check_image("4k", &["-b", "4096", "-O", "^metadata_csum,^64bit"], "128M");
}
