//! Shared helpers for the end-to-end tests: a temporary directory that
//! removes itself, a `blockwatch serve` process that is stopped with SIGTERM
//! (and must exit 0), running the real NBD clients with readable failures,
//! deterministic pseudo-random data, checks that a client is installed, and
//! an export mounted the way a user without the kernel nbd module mounts
//! one (nbdfuse, then `mount -o loop`), unmounted on drop.
//!
//! Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test, built by cargo for the integration tests.
pub const BLOCKWATCH: &str = env!("CARGO_BIN_EXE_blockwatch");

pub const MIB: u64 = 1024 * 1024;

/// How long a server may take to accept connections or to exit. These bound
/// the waiting only; no test asserts on how long anything took.
const SERVER_START_LIMIT: Duration = Duration::from_secs(20);
const SERVER_STOP_LIMIT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Longest any one client command may run before it counts as hung.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(30);

/// A directory under the system temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "blockwatch-test-{label}-{}-{unique}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A `blockwatch serve -f -U SOCKET ...` process. Dropping it sends SIGTERM
/// and asserts that the server exits 0 (unless the test is already failing).
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    socket: PathBuf,
    stderr_path: PathBuf,
    stdout_path: PathBuf,
}

impl Server {
    /// Serves `images` on a unix socket in `dir` with extra `args` (for
    /// example `["--size", "64M"]` or `["-r"]`), and returns once the socket
    /// accepts connections.
    pub fn start(dir: &Path, images: &[&Path], args: &[&str]) -> Server {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let socket = dir.join(format!("server-{unique}.sock"));
        let stdout_path = dir.join(format!("server-{unique}.stdout"));
        let stderr_path = dir.join(format!("server-{unique}.stderr"));
        let mut command = Command::new(BLOCKWATCH);
        command
            .arg("serve")
            .arg("-f")
            .arg("-U")
            .arg(&socket)
            .args(images)
            .args(args)
            .stdin(Stdio::null())
            .stdout(create_file(&stdout_path))
            .stderr(create_file(&stderr_path));
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BLOCKWATCH}: {e}"));
        let mut server = Server {
            child: Some(child),
            socket,
            stderr_path,
            stdout_path,
        };
        server.wait_until_accepting();
        server
    }

    /// Starts a server on one image, created sparse with `size` if missing.
    pub fn start_with_size(dir: &Path, image: &Path, size: &str) -> Server {
        Server::start(dir, &[image], &["--size", size])
    }

    fn wait_until_accepting(&mut self) {
        let started = Instant::now();
        loop {
            let child = self.child.as_mut().expect("server is running");
            if let Some(status) = child.try_wait().expect("cannot poll the server") {
                self.child = None;
                panic!(
                    "blockwatch serve exited with {status} before accepting connections\n{}",
                    self.logs()
                );
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if started.elapsed() > SERVER_START_LIMIT {
                panic!(
                    "blockwatch serve did not accept on {} within {SERVER_START_LIMIT:?}\n{}",
                    self.socket.display(),
                    self.logs()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// URI of the default export ("").
    pub fn uri(&self) -> String {
        self.uri_for("")
    }

    /// URI of a named export.
    pub fn uri_for(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().expect("cannot poll the server").is_none(),
            None => false,
        }
    }

    /// The server's stdout and stderr so far, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- server stdout ---\n{}--- server stderr ---\n{}",
            std::fs::read_to_string(&self.stdout_path).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
        )
    }

    /// Kills the server with SIGKILL (a crash) and reaps it.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM, waits for the exit and asserts it is 0.
    pub fn stop(mut self) {
        let status = self.terminate();
        assert!(
            status.success(),
            "blockwatch serve exited with {status} after SIGTERM (want 0)\n{}",
            self.logs()
        );
    }

    fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("server is running");
        if let Some(status) = child.try_wait().expect("cannot poll the server") {
            return status;
        }
        signal(child.id(), libc::SIGTERM);
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("cannot poll the server") {
                return status;
            }
            if started.elapsed() > SERVER_STOP_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "blockwatch serve did not exit within {SERVER_STOP_LIMIT:?} of SIGTERM\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        if std::thread::panicking() {
            // The test already failed: clean up without a second panic.
            if let Some(mut child) = self.child.take() {
                signal(child.id(), libc::SIGTERM);
                let started = Instant::now();
                while child.try_wait().ok().flatten().is_none() {
                    if started.elapsed() > SERVER_STOP_LIMIT {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    std::thread::sleep(POLL_INTERVAL);
                }
            }
            return;
        }
        let status = self.terminate();
        assert!(
            status.success(),
            "blockwatch serve exited with {status} after SIGTERM (want 0)\n{}",
            self.logs()
        );
    }
}

/// Sends `signal` to one process we started.
pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) takes no memory; `pid` is a child this test spawned
    // and has not yet reaped, so the id cannot have been reused.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

fn create_file(path: &Path) -> File {
    File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()))
}

/// Builds a command from a program and arguments.
pub fn command<I, S>(program: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(program);
    command.args(args);
    command
}

/// Runs `command` to completion and returns its output, whatever its
/// status. A client that hangs (for example waiting for a reply the server
/// never sends) is killed after `COMMAND_LIMIT` and the test fails.
pub fn output(command: &mut Command) -> Output {
    output_within(command, COMMAND_LIMIT)
}

/// Like `output`, with an explicit bound on how long the command may run.
pub fn output_within(command: &mut Command, limit: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(command)));
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("cannot poll a child") {
            break Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    let stdout = stdout.join().expect("stdout reader");
    let stderr = stderr.join().expect("stderr reader");
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "{} did not finish within {limit:?} and was killed (a hang: a reply \
             that never came?)\n--- stderr ---\n{}--- stdout ---\n{}",
            describe(command),
            String::from_utf8_lossy(&stderr),
            String::from_utf8_lossy(&stdout)
        ),
    }
}

/// Reads a pipe to its end on a thread, so a chatty child never blocks.
fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

/// Runs `command`, panics with its stderr unless it exits 0, returns stdout.
pub fn run(command: &mut Command) -> String {
    run_within(command, COMMAND_LIMIT)
}

/// Like `run`, with an explicit bound on how long the command may run.
pub fn run_within(command: &mut Command, limit: Duration) -> String {
    let output = output_within(command, limit);
    if !output.status.success() {
        panic!(
            "{} failed with {}\n--- stderr ---\n{}--- stdout ---\n{}",
            describe(command),
            status_text(output.status),
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    String::from_utf8(output.stdout)
        .unwrap_or_else(|e| panic!("{} printed non-UTF-8 output: {e}", describe(command)))
}

/// Runs `program args...` and returns stdout (see `run`).
pub fn run_program<I, S>(program: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(&mut command(program, args))
}

pub fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        let arg = arg.to_string_lossy();
        if arg.contains([' ', '\'', '"', '?', '$']) {
            text.push_str(&format!("'{arg}'"));
        } else {
            text.push_str(&arg);
        }
    }
    text
}

pub fn status_text(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => format!("{status}"),
    }
}

/// Panics, naming the Debian package, unless `tool` is on PATH.
pub fn require_tool(tool: &str, package: &str) {
    if find_in_path(tool).is_none() {
        panic!(
            "{tool} is not installed; these tests need it: apt-get install -y {package} \
             (all the test tools: apt-get install -y libnbd-bin nbdkit nbdfuse qemu-utils fio \
             python3-libnbd e2fsprogs fuse3)"
        );
    }
}

pub fn find_in_path(tool: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Deterministic bytes from `seed` (splitmix64), so a failure reproduces.
pub fn pseudo_random_bytes(seed: u64, length: usize) -> Vec<u8> {
    let mut state = seed;
    let mut bytes = Vec::with_capacity(length + 8);
    while bytes.len() < length {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        bytes.extend_from_slice(&z.to_le_bytes());
    }
    bytes.truncate(length);
    bytes
}

/// Writes `length` pseudo-random bytes to a new file at `path`.
pub fn write_random_file(path: &Path, seed: u64, length: usize) -> Vec<u8> {
    let data = pseudo_random_bytes(seed, length);
    std::fs::write(path, &data).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    data
}

/// Creates a sparse file of `size_bytes` (all holes).
pub fn create_sparse_file(path: &Path, size_bytes: u64) {
    let file = create_file(path);
    file.set_len(size_bytes)
        .unwrap_or_else(|e| panic!("cannot size {}: {e}", path.display()));
}

/// Writes `data` at `offset` into an existing file.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    file.write_all_at(data, offset)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Asserts two files have the same length and bytes, like `cmp`, naming
/// the first differing offset.
pub fn assert_files_equal(left: &Path, right: &Path) {
    let mut left_file =
        File::open(left).unwrap_or_else(|e| panic!("cannot open {}: {e}", left.display()));
    let mut right_file =
        File::open(right).unwrap_or_else(|e| panic!("cannot open {}: {e}", right.display()));
    let left_len = left_file.metadata().expect("metadata").len();
    let right_len = right_file.metadata().expect("metadata").len();
    assert_eq!(
        left_len,
        right_len,
        "{} and {} differ in size",
        left.display(),
        right.display()
    );
    let mut left_buf = vec![0u8; MIB as usize];
    let mut right_buf = vec![0u8; MIB as usize];
    let mut offset = 0u64;
    while offset < left_len {
        let piece = (left_len - offset).min(MIB) as usize;
        left_file.read_exact(&mut left_buf[..piece]).expect("read");
        right_file
            .read_exact(&mut right_buf[..piece])
            .expect("read");
        if left_buf[..piece] != right_buf[..piece] {
            let at = (0..piece)
                .find(|&i| left_buf[i] != right_buf[i])
                .expect("a differing byte");
            panic!(
                "{} and {} differ at byte {} ({:#04x} != {:#04x})",
                left.display(),
                right.display(),
                offset + at as u64,
                left_buf[at],
                right_buf[at]
            );
        }
        offset += piece as u64;
    }
}

/// Asserts that the file at `path` holds `expected` from `offset`.
pub fn assert_file_range(path: &Path, offset: u64, expected: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut actual = vec![0u8; expected.len()];
    file.read_exact_at(&mut actual, offset)
        .unwrap_or_else(|e| panic!("cannot read {} at {offset}: {e}", path.display()));
    if actual != expected {
        let at = (0..expected.len())
            .find(|&i| actual[i] != expected[i])
            .expect("a differing byte");
        panic!(
            "{} differs from what was written at byte {} ({:#04x} != {:#04x} expected)",
            path.display(),
            offset + at as u64,
            actual[at],
            expected[at]
        );
    }
}

/// Parses JSON output of a client, showing the text when it is not JSON.
pub fn parse_json(text: &str, what: &str) -> serde_json::Value {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("{what} did not print valid JSON ({e}):\n{text}"))
}

// ---------------------------------------------------------------------------
// Replies of `blockwatch changes --files --json`.

/// (offset, length) of each range in a JSON array of ranges.
pub fn ranges(extents: &Value) -> Vec<(u64, u64)> {
    extents
        .as_array()
        .expect("an array of ranges")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().expect("offset"),
                e["length"].as_u64().expect("length"),
            )
        })
        .collect()
}

/// The listed changes of a reply.
pub fn files(reply: &Value) -> &Vec<Value> {
    reply["files"].as_array().expect("\"files\" is an array")
}

/// One line per listed change, readable in a failed assertion: status,
/// every current path (directories end in '/'), and "<- old paths" when
/// there are any.
pub fn change_line(file: &Value) -> String {
    let strings = |key: &str| -> Vec<String> {
        let mut items: Vec<String> = file[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} is not an array in {file}"))
            .iter()
            .map(|p| p.as_str().expect("a path").to_string())
            .collect();
        items.sort();
        items
    };
    let mut paths = strings("paths");
    if paths.is_empty() {
        // Shown as such so a wrong listing still compares whole.
        paths.push(format!("(no path: inode {})", file["inode"]));
    }
    if file["directory"] == true {
        for path in paths.iter_mut().filter(|p| *p != "/") {
            path.push('/');
        }
    }
    let status = file["status"].as_str().expect("a status");
    let mut line = format!("{status} {}", paths.join(" "));
    let old_paths = strings("old_paths");
    if !old_paths.is_empty() {
        line.push_str(&format!(" <- {}", old_paths.join(" ")));
    }
    line
}

/// `change_line` of every listed change.
pub fn change_lines(reply: &Value) -> BTreeSet<String> {
    files(reply).iter().map(change_line).collect()
}

/// Expected change lines, to compare with `change_lines`.
pub fn lines(expected: &[&str]) -> BTreeSet<String> {
    expected.iter().map(|line| line.to_string()).collect()
}

/// The listed change whose paths include `path`.
pub fn entry<'a>(reply: &'a Value, path: &str) -> &'a Value {
    files(reply)
        .iter()
        .find(|f| {
            f["paths"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p == path))
        })
        .unwrap_or_else(|| panic!("{path} is not listed:\n{reply:#}"))
}

pub fn pretty(reply: &Value) -> String {
    serde_json::to_string_pretty(reply).expect("JSON")
}

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

/// `mount -o loop FILE DIR`; dropping it unmounts DIR if still mounted.
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

fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().ok().flatten() {
            return Some(status);
        }
        if started.elapsed() > limit {
            return None;
        }
        std::thread::sleep(MOUNT_POLL_INTERVAL);
    }
}

/// A filesystem on a served image: blockwatch serves the image, nbdfuse
/// exposes it as a file, and a loop device mounts the filesystem found at
/// `fs_offset_bytes`. Fields drop in declaration order: the mount, then
/// nbdfuse, then the server. The tests' own fixtures wrap it.
pub struct LiveFs {
    pub mount: Option<LoopMount>,
    pub fuse: Option<FuseExport>,
    pub server: Option<Server>,
    pub image: PathBuf,
    /// Where the filesystem starts on the disk (0: the whole disk).
    pub fs_offset_bytes: u64,
}

impl LiveFs {
    /// Serves `image` (of `size_bytes`) from `dir` with `server_args`,
    /// exposes it with nbdfuse and mounts it with `mount_options`.
    pub fn start(
        dir: &TempDir,
        image: &Path,
        server_args: &[&str],
        size_bytes: u64,
        mount_options: &str,
        fs_offset_bytes: u64,
    ) -> LiveFs {
        let server = Server::start(dir.path(), &[image], server_args);
        let fuse = FuseExport::start(
            &dir.join("fuse"),
            &server.uri(),
            &dir.join("nbdfuse.log"),
            size_bytes,
        );
        let mount = LoopMount::mount_with_options(&fuse.file(), &dir.join("mnt"), mount_options);
        LiveFs {
            mount: Some(mount),
            fuse: Some(fuse),
            server: Some(server),
            image: image.to_path_buf(),
            fs_offset_bytes,
        }
    }

    pub fn mount_dir(&self) -> &Path {
        self.mount.as_ref().expect("mounted").dir()
    }

    /// `relative` ("/docs/a.txt") inside the mounted filesystem.
    pub fn path(&self, relative: &str) -> PathBuf {
        self.mount_dir().join(relative.trim_start_matches('/'))
    }

    pub fn mkdir(&self, relative: &str) {
        std::fs::create_dir_all(self.path(relative)).expect("create a directory");
    }

    pub fn write(&self, relative: &str, seed: u64, length_bytes: u64) {
        write_random_file(&self.path(relative), seed, length_bytes as usize);
    }

    pub fn append(&self, relative: &str, seed: u64, length_bytes: u64) {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(self.path(relative))
            .unwrap_or_else(|e| panic!("cannot open {relative} to append: {e}"));
        file.write_all(&pseudo_random_bytes(seed, length_bytes as usize))
            .unwrap_or_else(|e| panic!("cannot append to {relative}: {e}"));
    }

    pub fn remove(&self, relative: &str) {
        std::fs::remove_file(self.path(relative))
            .unwrap_or_else(|e| panic!("cannot remove {relative}: {e}"));
    }

    pub fn rename(&self, from: &str, to: &str) {
        std::fs::rename(self.path(from), self.path(to))
            .unwrap_or_else(|e| panic!("cannot rename {from} to {to}: {e}"));
    }

    /// syncfs(2): every dirty page written and the journal committed, all
    /// the way through the loop device and nbdfuse to the server. It also
    /// writes the committed metadata to its place on the disk.
    pub fn sync(&self) {
        run_program("sync", ["-f".as_ref(), self.mount_dir().as_os_str()]);
    }

    /// fsync(2) of each path: its data written and the journal committed,
    /// while the metadata blocks themselves stay dirty in the kernel for
    /// about 30 s (dirty_expire_centisecs), so on the disk the newest
    /// inodes and directory blocks are only in the jbd2 journal.
    pub fn fsync(&self, relatives: &[&str]) {
        let paths: Vec<PathBuf> = relatives.iter().map(|r| self.path(r)).collect();
        run_program("sync", &paths);
    }

    /// Whether debugfs, which reads the filesystem as it lies on the disk
    /// without replaying the journal, finds `relative`.
    pub fn in_place_has(&self, relative: &str) -> bool {
        let request = format!("stat {relative}");
        let device = if self.fs_offset_bytes == 0 {
            self.image.display().to_string()
        } else {
            format!("{}?offset={}", self.image.display(), self.fs_offset_bytes)
        };
        let result = output(&mut command("debugfs", ["-c", "-R", &request, &device]));
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(
            result.status.success(),
            "debugfs -c -R '{request}' {device} failed: {stderr}"
        );
        !stderr.contains("File not found")
    }

    pub fn checkpoint(&self, name: &str) {
        run_program(BLOCKWATCH, ["checkpoint", self.image_arg(), name]);
    }

    pub fn image_arg(&self) -> &str {
        self.image.to_str().expect("a UTF-8 temporary path")
    }

    /// Unmounts, stops nbdfuse and the server, each asserting success.
    pub fn stop(&mut self) {
        self.mount.take().expect("mounted").unmount();
        self.fuse.take().expect("nbdfuse running").unmount();
        self.server.take().expect("server running").stop();
    }
}
