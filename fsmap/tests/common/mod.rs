//! What the fsmap integration tests share beyond `testkit`: making a
//! filesystem that holds a copy of a directory, indexing its directories,
//! and asking debugfs about it (all e2fsprogs).
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

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
