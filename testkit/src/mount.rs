//! A filesystem mounted the way a user without the kernel nbd module mounts
//! an export: nbdfuse exposes it as a file, `mount -o loop` mounts that.
//! Both are undone on drop, so a failing test leaves no mount behind. And
//! the kernel's own answer to where a mounted file's blocks lie.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{describe, output, run, run_program, status_text, wait_bounded};

/// Bounds on waiting for nbdfuse and for unmounts; no test asserts on timing.
const NBDFUSE_START_LIMIT: Duration = Duration::from_secs(20);
const UNMOUNT_LIMIT: Duration = Duration::from_secs(20);
const MOUNT_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// `nbdfuse DIR URI` running in the background: DIR/nbd is the export.
/// Dropping it unmounts DIR (if still mounted) and reaps nbdfuse.
#[derive(Debug)]
pub struct FuseExport {
    dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl FuseExport {
    /// Starts nbdfuse and returns once DIR/nbd has the export's size.
    pub fn start(dir: &Path, uri: &str, log: &Path, size_bytes: u64) -> FuseExport {
        std::fs::create_dir_all(dir).expect("create the nbdfuse directory");
        let log_file = File::create(log).expect("create the nbdfuse log");
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
        export.wait_for_file(size_bytes);
        export
    }

    pub fn file(&self) -> PathBuf {
        self.dir.join("nbd")
    }

    fn wait_for_file(&mut self, size_bytes: u64) {
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
            if std::fs::metadata(self.file()).is_ok_and(|m| m.len() == size_bytes) {
                return;
            }
            assert!(
                started.elapsed() < NBDFUSE_START_LIMIT,
                "{} did not appear within {NBDFUSE_START_LIMIT:?}:\n{}",
                self.file().display(),
                self.log_text()
            );
            std::thread::sleep(MOUNT_POLL_INTERVAL);
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Unmounts and asserts that nbdfuse then exits 0.
    pub fn unmount(mut self) {
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

/// `mount -o loop FILE DIR`; dropping it unmounts DIR if still mounted
/// (lazily if it stays busy).
#[derive(Debug)]
pub struct LoopMount {
    dir: PathBuf,
    mounted: bool,
}

impl LoopMount {
    pub fn mount(file: &Path, dir: &Path) -> LoopMount {
        LoopMount::mount_with_options(file, dir, "loop")
    }

    /// `mount -o OPTIONS FILE DIR`, for example
    /// `loop,offset=BYTES,sizelimit=BYTES` for a filesystem inside one
    /// partition of a whole-disk image.
    pub fn mount_with_options(file: &Path, dir: &Path, options: &str) -> LoopMount {
        std::fs::create_dir_all(dir).expect("create the mount point");
        run(Command::new("mount")
            .args(["-o", options])
            .arg(file)
            .arg(dir));
        LoopMount {
            dir: dir.to_owned(),
            mounted: true,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn unmount(mut self) {
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
        std::thread::sleep(MOUNT_POLL_INTERVAL);
    }
}

/// Where each of `paths` lies, as the kernel says (FIEMAP through
/// `filefrag -v`, e2fsprogs): for each path, logical block -> physical
/// block of the filesystem, in blocks of `block_bytes`. Holes are absent.
pub fn physical_blocks(
    paths: &[PathBuf],
    block_bytes: u64,
) -> BTreeMap<PathBuf, BTreeMap<u64, u64>> {
    let mut args = vec!["-v".to_string(), format!("-b{block_bytes}")];
    args.extend(paths.iter().map(|path| path.display().to_string()));
    let text = run_program("filefrag", &args);
    let mut out: BTreeMap<PathBuf, BTreeMap<u64, u64>> = BTreeMap::new();
    let mut current: Option<PathBuf> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("File size of ") {
            let path = PathBuf::from(rest.split(" is ").next().expect("a path"));
            out.insert(path.clone(), BTreeMap::new());
            current = Some(path);
            continue;
        }
        let fields: Vec<&str> = line.split(':').map(str::trim).collect();
        if fields.len() < 4 || fields[0].parse::<u64>().is_err() {
            continue;
        }
        let span = |field: &str| -> (u64, u64) {
            let (start, end) = field.split_once("..").expect("start..end");
            let number = |text: &str| text.trim().parse::<u64>().expect("a block number");
            (number(start), number(end))
        };
        let (logical_start, logical_end) = span(fields[1]);
        let (physical_start, _) = span(fields[2]);
        let blocks = out
            .get_mut(current.as_ref().expect("an extent after a file name"))
            .expect("the current file");
        for logical in logical_start..=logical_end {
            blocks.insert(logical, physical_start + (logical - logical_start));
        }
    }
    for path in paths {
        assert!(
            out.contains_key(path),
            "filefrag said nothing of {}:\n{text}",
            path.display()
        );
    }
    out
}
