//! A real filesystem on a blockwatch export, the way a user mounts one
//! without the kernel nbd module: nbdfuse exposes the export as a file,
//! ext4 goes on it through a loop device, files are written, everything is
//! unmounted, the server stops, `e2fsck -fn` must find the image clean, and
//! after serving it again every file must still match its checksum.
//!
//! Needs root (mount); as another user the test prints a note and passes.

mod common;

use common::Server;
use std::path::Path;
use std::process::Command;
use testkit::{
    FuseExport, LoopMount, TempDir, assert_files_equal, command, create_sparse_file, output,
    random_bytes, require_tool, run, run_program, skipped_unless_root, status_text,
};

const IMAGE_SIZE_BYTES: u64 = 64 * 1024 * 1024;

/// Files to copy onto the filesystem: two of several MiB, a directory tree
/// of small files of odd sizes, and an empty file. Returns their paths
/// relative to `root`.
fn build_source_tree(root: &Path) -> Vec<String> {
    let mut files = vec![
        ("big-3m.bin".to_string(), 3 * 1024 * 1024 + 17),
        ("big-7m.bin".to_string(), 7 * 1024 * 1024),
        ("empty".to_string(), 0),
    ];
    for depth in 0..4 {
        let dir: Vec<String> = (0..=depth).map(|level| format!("level{level}")).collect();
        let dir = dir.join("/");
        for index in 0..5 {
            files.push((
                format!("tree/{dir}/file-{index}.dat"),
                1 + index * 40_961 + depth * 777,
            ));
        }
    }
    for (seed, (name, length)) in files.iter().enumerate() {
        let path = root.join(name);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("create directories");
        std::fs::write(&path, random_bytes(100 + seed as u64, *length))
            .expect("write a source file");
    }
    files.into_iter().map(|(name, _)| name).collect()
}

#[test]
fn ext4_on_nbdfuse_is_clean_after_unmount_and_keeps_every_file() {
    if skipped_unless_root("mount -o loop and FUSE") {
        return;
    }
    require_tool("nbdfuse", "libnbd-bin (nbdfuse on newer Debian)");
    require_tool("fusermount3", "fuse3");
    require_tool("mkfs.ext4", "e2fsprogs");
    require_tool("e2fsck", "e2fsprogs");
    require_tool("debugfs", "e2fsprogs");
    let dir = TempDir::new("mount");
    let image = dir.join("disk.img");
    let source = dir.join("source");
    let fuse_dir = dir.join("fuse");
    let mount_dir = dir.join("mnt");
    let files = build_source_tree(&source);
    let manifest = run(command("sha256sum", &files).current_dir(&source));
    std::fs::write(dir.join("manifest"), &manifest).expect("write the manifest");

    create_sparse_file(&image, IMAGE_SIZE_BYTES);
    let server = Server::start(dir.path(), &[&image], &[]);
    let fuse = FuseExport::start(
        &fuse_dir,
        &server.uri(),
        &dir.join("nbdfuse-1.log"),
        IMAGE_SIZE_BYTES,
    );
    run_program("mkfs.ext4", [fuse.file().as_os_str(), "-q".as_ref()]);
    let mounted = LoopMount::mount(&fuse.file(), &mount_dir);
    run(Command::new("cp")
        .arg("-a")
        .arg(source.join("."))
        .arg(&mount_dir));
    run_program("sync", [&mount_dir]);
    mounted.unmount();
    fuse.unmount();
    server.stop();

    // The image alone, with the server gone, holds a clean filesystem with
    // the data in it.
    let fsck = output(&mut command("e2fsck", ["-fn".as_ref(), image.as_os_str()]));
    assert!(
        fsck.status.success(),
        "e2fsck -fn found problems ({}):\n{}{}",
        status_text(fsck.status),
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let dumped = dir.join("dumped-big-7m.bin");
    run_program(
        "debugfs",
        [
            "-R".as_ref(),
            format!("dump /big-7m.bin {}", dumped.display()).as_ref(),
            image.as_os_str(),
        ],
    );
    assert_files_equal(&source.join("big-7m.bin"), &dumped);

    // Serve it again and check every file by checksum.
    let server = Server::start(dir.path(), &[&image], &[]);
    let fuse = FuseExport::start(
        &fuse_dir,
        &server.uri(),
        &dir.join("nbdfuse-2.log"),
        IMAGE_SIZE_BYTES,
    );
    let mounted = LoopMount::mount(&fuse.file(), &mount_dir);
    let checked = run(Command::new("sha256sum")
        .arg("--strict")
        .arg("-c")
        .arg(dir.join("manifest"))
        .current_dir(&mount_dir));
    assert_eq!(
        checked
            .lines()
            .filter(|line| line.ends_with(": OK"))
            .count(),
        files.len(),
        "sha256sum -c should confirm every file:\n{checked}"
    );
    mounted.unmount();
    fuse.unmount();
    server.stop();
}
