//! A real filesystem on a blockwatch export, the way a user mounts one
//! without the kernel nbd module: nbdfuse exposes the export as a file,
//! ext4 goes on it through a loop device, files are written, everything is
//! unmounted, the server stops, `e2fsck -fn` must find the image clean, and
//! after serving it again every file must still match its checksum.
//!
//! Needs root (mount); as another user the test prints a note and passes.

mod common;

use common::{
    Server, TempDir, command, create_sparse_file, describe, is_root, output, pseudo_random_bytes,
    require_tool, run, run_program, status_text,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const IMAGE_SIZE_BYTES: u64 = 64 * 1024 * 1024;
/// Bounds on waiting for nbdfuse; no test asserts on timing.
const NBDFUSE_START_LIMIT: Duration = Duration::from_secs(20);
const UNMOUNT_LIMIT: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// `nbdfuse DIR URI` running in the background: DIR/nbd is the export.
/// Dropping it unmounts DIR (if still mounted) and reaps nbdfuse.
struct FuseExport {
    dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl FuseExport {
    fn start(dir: &Path, uri: &str, log: &Path) -> FuseExport {
        std::fs::create_dir_all(dir).expect("create the nbdfuse directory");
        let log_file = std::fs::File::create(log).expect("create the nbdfuse log");
        let child = Command::new("nbdfuse")
            .arg(dir)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nbdfuse: {e}"));
        let mut export = FuseExport {
            dir: dir.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        };
        export.wait_for_file();
        export
    }

    fn file(&self) -> PathBuf {
        self.dir.join("nbd")
    }

    fn wait_for_file(&mut self) {
        let started = Instant::now();
        loop {
            let child = self.child.as_mut().expect("nbdfuse is running");
            if let Some(status) = child.try_wait().expect("poll nbdfuse") {
                self.child = None;
                panic!(
                    "nbdfuse exited with {} before {} appeared:\n{}",
                    status_text(status),
                    self.file().display(),
                    self.log_text()
                );
            }
            if std::fs::metadata(self.file()).is_ok_and(|m| m.len() == IMAGE_SIZE_BYTES) {
                return;
            }
            assert!(
                started.elapsed() < NBDFUSE_START_LIMIT,
                "{} did not appear within {NBDFUSE_START_LIMIT:?}:\n{}",
                self.file().display(),
                self.log_text()
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Unmounts and asserts that nbdfuse then exits 0.
    fn unmount(mut self) {
        let mut child = self.child.take().expect("nbdfuse is running");
        unmount_with_retries(&mut fusermount_command(&self.dir));
        let status = wait_bounded(&mut child, UNMOUNT_LIMIT)
            .unwrap_or_else(|| panic!("nbdfuse did not exit after unmount:\n{}", self.log_text()));
        assert!(
            status.success(),
            "nbdfuse exited with {} after unmount:\n{}",
            status_text(status),
            self.log_text()
        );
    }
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Cleanup after a failure: best effort, never a second panic.
            let _ = output(&mut fusermount_command(&self.dir));
            if wait_bounded(&mut child, UNMOUNT_LIMIT).is_none() {
                let _ = output(Command::new("umount").arg("-l").arg(&self.dir));
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn fusermount_command(dir: &Path) -> Command {
    let mut command = Command::new("fusermount3");
    command.arg("-u").arg(dir);
    command
}

/// `mount -o loop FILE DIR`; dropping it unmounts DIR if still mounted.
struct LoopMount {
    dir: PathBuf,
    mounted: bool,
}

impl LoopMount {
    fn mount(file: &Path, dir: &Path) -> LoopMount {
        std::fs::create_dir_all(dir).expect("create the mount point");
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(file)
            .arg(dir));
        LoopMount {
            dir: dir.to_owned(),
            mounted: true,
        }
    }

    fn unmount(mut self) {
        unmount_with_retries(Command::new("umount").arg(&self.dir));
        self.mounted = false;
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if self.mounted {
            let unmounted = output(Command::new("umount").arg(&self.dir));
            if !unmounted.status.success() {
                let _ = output(Command::new("umount").arg("-l").arg(&self.dir));
            }
        }
    }
}

/// Unmounting can briefly fail with EBUSY while the kernel lets go of a
/// loop device; retry for a bounded time, then fail with the last error.
fn unmount_with_retries(command: &mut Command) {
    let started = Instant::now();
    loop {
        let result = output(command);
        if result.status.success() {
            return;
        }
        assert!(
            started.elapsed() < UNMOUNT_LIMIT,
            "{} kept failing ({}): {}",
            describe(command),
            status_text(result.status),
            String::from_utf8_lossy(&result.stderr)
        );
        std::thread::sleep(POLL_INTERVAL);
    }
}

fn wait_bounded(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().ok().flatten() {
            return Some(status);
        }
        if started.elapsed() > limit {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

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
        std::fs::write(&path, pseudo_random_bytes(100 + seed as u64, *length))
            .expect("write a source file");
    }
    files.into_iter().map(|(name, _)| name).collect()
}

#[test]
fn ext4_on_nbdfuse_is_clean_after_unmount_and_keeps_every_file() {
    if !is_root() {
        println!("skipped: needs root (mount -o loop and FUSE)");
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
    let fuse = FuseExport::start(&fuse_dir, &server.uri(), &dir.join("nbdfuse-1.log"));
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
    common::assert_files_equal(&source.join("big-7m.bin"), &dumped);

    // Serve it again and check every file by checksum.
    let server = Server::start(dir.path(), &[&image], &[]);
    let fuse = FuseExport::start(&fuse_dir, &server.uri(), &dir.join("nbdfuse-2.log"));
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
