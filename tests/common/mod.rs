//! What only blockwatch's end-to-end tests share: a `blockwatch serve`
//! process that is stopped with SIGTERM (and must exit 0), a filesystem
//! on a served image mounted through nbdfuse and a loop device (`LiveFs`),
//! and readers of `blockwatch changes --files --json` replies. What any
//! test could use (temporary directories, running clients, seeded bytes,
//! mounts) is in the `testkit` crate.
//!
//! Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::{
    FuseExport, LoopMount, TempDir, command, create_file, output, random_bytes, require_tool,
    run_program, signal, write_random_file,
};

/// The binary under test, built by cargo for the integration tests.
pub const BLOCKWATCH: &str = env!("CARGO_BIN_EXE_blockwatch");

/// How long a server may take to accept connections or to exit. These bound
/// the waiting only; no test asserts on how long anything took.
const SERVER_START_LIMIT: Duration = Duration::from_secs(20);
const SERVER_STOP_LIMIT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long one probe waits for the greeting before trying again.
const GREETING_LIMIT: Duration = Duration::from_secs(1);

/// Runs `scenario` (which returns None when the kernel wrote the newest
/// metadata in place before the test could look: a global sync by another
/// process, memory pressure) until it leaves that metadata in the jbd2
/// journal only, a few times at most: only then does a run show that the
/// file map reads through the journal.
pub fn until_metadata_stays_in_the_journal<T>(mut scenario: impl FnMut() -> Option<T>) -> T {
    const ATTEMPTS: usize = 4;
    for attempt in 1..=ATTEMPTS {
        if let Some(result) = scenario() {
            return result;
        }
        eprintln!(
            "attempt {attempt}: the kernel wrote the new metadata in place already; starting over"
        );
    }
    panic!(
        "in {ATTEMPTS} attempts the kernel always wrote the new metadata in place before the \
         test could look, so no run showed that the map reads through the journal"
    );
}

/// A chain of copies of a 64 MiB disk, for every kind of target: the
/// disk's first contents, then the qemu-io writes before each copy (none
/// before the full one; data, a discard and writes at either end after).
pub const CHAIN_START: &[&str] = &["write -P 1 0 4M", "write -P 2 40M 1M", "write -z 50M 1M"];
pub const CHAIN_ROUNDS: [&[&str]; 3] = [
    &[],
    &["write -P 3 8M 64k", "discard 40M 512k"],
    &["write -P 4 1M 4k", "write -P 5 63M 1M"],
];

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
    /// example `["--size", "64M"]` or `["-r"]`), and returns once the server
    /// greets a connection (see `greets`).
    pub fn start(dir: &Path, images: &[&Path], args: &[&str]) -> Server {
        Server::start_with_env(dir, images, args, &[])
    }

    /// `start`, with `env` added to the server's environment (an object
    /// storage server's endpoint and credentials).
    pub fn start_with_env(
        dir: &Path,
        images: &[&Path],
        args: &[&str],
        env: &[(String, String)],
    ) -> Server {
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
            .envs(env.iter().map(|(name, value)| (name, value)))
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
            if greets(&self.socket) {
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

    /// `stop`, returning what the server logged, its last words included.
    pub fn stop_and_logs(mut self) -> String {
        let status = self.terminate();
        let logs = self.logs();
        assert!(
            status.success(),
            "blockwatch serve exited with {status} after SIGTERM (want 0)\n{logs}"
        );
        logs
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

/// Whether the server at `socket` sends the NBD greeting on a new
/// connection. A socket accepts connections as soon as it is bound, long
/// before the server can stop cleanly; the greeting comes from its accept
/// loop, which starts after its signal handlers and control sockets.
fn greets(socket: &Path) -> bool {
    use std::io::Read;
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    if stream.set_read_timeout(Some(GREETING_LIMIT)).is_err() {
        return false;
    }
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC"
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
                e["offset_bytes"].as_u64().expect("offset_bytes"),
                e["length_bytes"].as_u64().expect("length_bytes"),
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

/// A filesystem on a served image: blockwatch serves the image, nbdfuse
/// exposes it as a file, and a loop device mounts the filesystem found at
/// `fs_offset_bytes`. Fields drop in declaration order: the mount, then
/// nbdfuse, then the server, then the directory holding it all. The
/// tests' own fixtures wrap it.
pub struct LiveFs {
    pub mount: Option<LoopMount>,
    pub fuse: Option<FuseExport>,
    pub server: Option<Server>,
    pub image: PathBuf,
    /// Where the filesystem starts on the disk (0: the whole disk).
    pub fs_offset_bytes: u64,
    pub dir: TempDir,
}

impl LiveFs {
    /// Serves `image` (of `size_bytes`) from `dir` with `server_args`,
    /// exposes it with nbdfuse and mounts it with `mount_options`.
    pub fn start(
        dir: TempDir,
        image: &Path,
        server_args: &[&str],
        size_bytes: u64,
        mount_options: &str,
        fs_offset_bytes: u64,
    ) -> LiveFs {
        require_tool("nbdfuse", "libnbd-bin (nbdfuse on newer Debian)");
        require_tool("fusermount3", "fuse3");
        require_tool("debugfs", "e2fsprogs");
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
            dir,
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
        file.write_all(&random_bytes(seed, length_bytes as usize))
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

    /// Commits `relatives` through fsync only (`fsync`), and says whether
    /// `created`, a path made since the last sync, is then in the jbd2
    /// journal and not yet in place, so that a map of the disk has to read
    /// it through the journal (false: the kernel wrote it in place already,
    /// and the scenario must start again: `until_metadata_stays_in_the_journal`).
    pub fn commit_through_the_journal(&self, relatives: &[&str], created: &str) -> bool {
        self.fsync(relatives);
        !self.in_place_has(created)
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

/// A small tmpfs mounted in a test's directory (root only), to run a
/// target out of space; unmounted on drop.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    pub fn mount(dir: &Path, name: &str, size: &str) -> Tmpfs {
        let path = dir.join(name);
        std::fs::create_dir(&path).unwrap();
        run_program(
            "mount",
            [
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                path.to_str().unwrap(),
            ],
        );
        Tmpfs { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Gives it more (or less) room; what it holds stays.
    pub fn resize(&self, size: &str) {
        run_program(
            "mount",
            [
                "-o",
                &format!("remount,size={size}"),
                self.path.to_str().unwrap(),
            ],
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}
