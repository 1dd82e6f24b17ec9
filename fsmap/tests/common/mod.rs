//! What the fsmap integration tests share beyond `testkit`: making a
//! filesystem that holds a copy of a directory, indexing its directories,
//! and asking debugfs about it (all e2fsprogs).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use fsmap::ext4::FileExtent;
use testkit::{output, run, status_text, tool};

/// `MKFS -q -F ARGS -d SOURCE IMAGE SIZE` (`mkfs` is `mkfs.ext4`, `mke2fs`
/// or another e2fsprogs mkfs), which must succeed: a filesystem of `size`
/// on `image` holding a copy of `source`.
pub fn mkfs_with_files(mkfs: &str, args: &[&str], source: &Path, image: &Path, size: &str) {
    run(Command::new(tool(mkfs, "e2fsprogs"))
        .args(["-q", "-F"])
        .args(args)
        .arg("-d")
        .arg(source)
        .arg(image)
        .arg(size));
}

/// `e2fsck -fyD IMAGE`: checks the filesystem and indexes (htree) every
/// directory of more than one block, which `mkfs -d` writes linear. Exit
/// code 0 (clean) or 1 (directories were optimised) is success.
pub fn index_directories(image: &Path) {
    let result = output(
        Command::new(tool("e2fsck", "e2fsprogs"))
            .arg("-fyD")
            .arg(image),
    );
    assert!(
        matches!(result.status.code(), Some(0 | 1)),
        "e2fsck -fyD {} failed with {}:\n{}{}",
        image.display(),
        status_text(result.status),
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
}

/// `debugfs -R REQUEST IMAGE`, which must succeed; returns what it printed.
pub fn debugfs(image: &Path, request: &str) -> String {
    run(Command::new(tool("debugfs", "e2fsprogs"))
        .args(["-R", request])
        .arg(image))
}

/// `debugfs -w -f SCRIPT IMAGE`: runs `commands` in one debugfs, which must
/// report no error. debugfs exits 0 whatever its commands did, and says
/// what failed on stderr, where otherwise only its banner goes.
pub fn debugfs_write(image: &Path, commands: &[String]) {
    let script = image.with_extension("debugfs");
    std::fs::write(&script, commands.join("\n") + "\n").unwrap();
    let result = output(
        Command::new(tool("debugfs", "e2fsprogs"))
            .arg("-w")
            .arg("-f")
            .arg(&script)
            .arg(image),
    );
    let stderr = String::from_utf8_lossy(&result.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.starts_with("debugfs ") && !line.trim().is_empty())
        .collect();
    assert!(
        result.status.success() && errors.is_empty(),
        "debugfs -w on {} failed ({}):\n{}\n--- script ---\n{}",
        image.display(),
        status_text(result.status),
        errors.join("\n"),
        commands.join("\n")
    );
}

/// `debugfs ncheck` for many inodes: inode -> paths.
pub fn ncheck(image: &Path, inodes: &[u32]) -> BTreeMap<u32, BTreeSet<String>> {
    let mut out: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    for chunk in inodes.chunks(200) {
        let request = format!(
            "ncheck {}",
            chunk
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        );
        for line in debugfs(image, &request).lines().skip(1) {
            let Some((number, path)) = line.split_once('\t') else {
                continue;
            };
            let Ok(number) = number.trim().parse() else {
                continue;
            };
            // debugfs prints "/a/b" and, for the root's entries, "//x" on
            // some versions; normalise.
            let path = format!("/{}", path.trim_start_matches('/'));
            out.entry(number).or_default().insert(path);
        }
    }
    out
}

/// Leaf extents from `debugfs ex`: lines whose level equals the tree depth.
pub fn debugfs_extents(image: &Path, path: &str) -> Vec<FileExtent> {
    let text = debugfs(image, &format!("ex {path}"));
    let mut extents = Vec::new();
    for line in text.lines().skip(1) {
        // " 0/ 0   1/  1     0 -  1953  4679 -  6632   1954 Uninit"
        let fields: Vec<&str> = line.split_whitespace().collect();
        let joined = line.replace('/', " / ");
        let level: Vec<&str> = joined.split_whitespace().collect();
        if level.len() < 3 || level[0] != level[2] {
            continue; // an index node line
        }
        let numbers: Vec<u64> = fields.iter().filter_map(|f| f.parse().ok()).collect();
        // level, depth, entry, entries, logical start, logical end, physical start, physical end, length
        let dash_split: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(
            dash_split.len() >= 9,
            "unexpected debugfs line {line:?} ({numbers:?})"
        );
        extents.push(FileExtent {
            logical_block: dash_split[4],
            physical_block: dash_split[6],
            block_count: dash_split[8],
            uninitialized: line.contains("Uninit"),
        });
    }
    extents
}
