//! Helpers for the tests against real servers: a temporary directory that
//! removes itself, a server process on a unix socket that is stopped on
//! drop, checks that a tool is installed (naming its Debian package), the
//! `blockwatch` binary, running commands with a bound, and a small
//! deterministic random generator.
//!
//! Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1024 * 1024;

/// How long a server may take to accept connections or to exit, and a
/// command to run. These bound waiting only; nothing asserts on timing.
const SERVER_START_LIMIT: Duration = Duration::from_secs(20);
const SERVER_STOP_LIMIT: Duration = Duration::from_secs(20);
pub const COMMAND_LIMIT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

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
            "nbd-client-test-{label}-{}-{unique}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A server process listening on `socket`, sent SIGTERM and reaped on drop.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    socket: PathBuf,
    name: String,
    log: PathBuf,
}

impl ServerProcess {
    /// Runs `program args...` (which must listen on `socket`) and returns
    /// once the socket accepts connections.
    pub fn start(program: &str, args: &[&str], socket: &Path, log: &Path) -> ServerProcess {
        let log_file = std::fs::File::create(log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let mut server = ServerProcess {
            child,
            socket: socket.to_path_buf(),
            name: format!("{program} {}", args.join(" ")),
            log: log.to_path_buf(),
        };
        server.wait_until_accepting();
        server
    }

    fn wait_until_accepting(&mut self) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("cannot poll a server") {
                panic!(
                    "{} exited with {status} before accepting connections\n{}",
                    self.name,
                    self.logs()
                );
            }
            // Probing connects are harmless: the servers used here serve
            // several clients and just see one go away.
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if started.elapsed() > SERVER_START_LIMIT {
                panic!(
                    "{} did not accept on {} within {SERVER_START_LIMIT:?}\n{}",
                    self.name,
                    self.socket.display(),
                    self.logs()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    pub fn uri(&self) -> String {
        self.uri_for("")
    }

    pub fn uri_for(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        signal(self.child.id(), libc::SIGTERM);
        let started = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if started.elapsed() > SERVER_STOP_LIMIT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

/// Sends `signal` to one process this test started.
fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) takes no memory; `pid` is a child this test spawned
    // and has not yet reaped, so the id cannot have been reused.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Panics, naming the Debian package, unless `tool` is on PATH.
pub fn require_tool(tool: &str, package: &str) {
    if find_in_path(tool).is_none() {
        panic!(
            "{tool} is not installed; these tests need it: apt-get install -y {package} \
             (all the tools for nbd-client's tests: apt-get install -y nbdkit libnbd-bin qemu-utils)"
        );
    }
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// Starts `nbdkit PLUGIN ARGS...` on a socket in `dir`.
pub fn nbdkit(dir: &TempDir, args: &[&str]) -> ServerProcess {
    require_tool("nbdkit", "nbdkit");
    let socket = dir.join("nbdkit.sock");
    let socket_text = socket.to_str().expect("UTF-8 temp path").to_string();
    let mut all = vec!["--foreground", "--exit-with-parent", "-U", &socket_text];
    all.extend_from_slice(args);
    ServerProcess::start("nbdkit", &all, &socket, &dir.join("nbdkit.log"))
}

/// Runs a command to completion within `COMMAND_LIMIT`, panicking with its
/// output unless it exits 0; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = output(program, args);
    if !output.status.success() {
        panic!(
            "{program} {} failed with {}\n--- stderr ---\n{}--- stdout ---\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

pub fn output(program: &str, args: &[&str]) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let started = Instant::now();
    while child.try_wait().expect("cannot poll a child").is_none() {
        if started.elapsed() > COMMAND_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{program} {} did not finish within {COMMAND_LIMIT:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    child.wait_with_output().expect("child output")
}

/// `nbdinfo --json --map[=CONTEXT] URI` as (offset, length, type) triples.
pub fn nbdinfo_map(uri: &str, context: &str) -> Vec<(u64, u64, u64)> {
    require_tool("nbdinfo", "libnbd-bin");
    let map = format!("--map={context}");
    let text = run("nbdinfo", &["--json", &map, uri]);
    let value: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("nbdinfo --json: {e}\n{text}"));
    value
        .as_array()
        .expect("nbdinfo --map --json prints an array")
        .iter()
        .map(|extent| {
            (
                extent["offset"].as_u64().expect("offset"),
                extent["length"].as_u64().expect("length"),
                extent["type"].as_u64().expect("type"),
            )
        })
        .collect()
}

/// The `blockwatch` binary of this workspace, built by `cargo build -p
/// blockwatch` (run here if it is missing, with the cargo that runs the
/// tests). `BLOCKWATCH` in the environment overrides the path.
pub fn blockwatch() -> PathBuf {
    if let Some(path) = std::env::var_os("BLOCKWATCH") {
        return PathBuf::from(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("nbd-client sits in the workspace");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let binary = target.join("debug").join("blockwatch");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let status = Command::new(&cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "blockwatch",
            "--bin",
            "blockwatch",
        ])
        .current_dir(workspace)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cargo} build -p blockwatch: {e}"));
    assert!(
        status.success(),
        "cargo build -p blockwatch failed ({status})"
    );
    assert!(
        binary.is_file(),
        "{} is missing after cargo build -p blockwatch (set BLOCKWATCH=PATH)",
        binary.display()
    );
    binary
}

/// splitmix64: deterministic, so a failure replays with the same seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// A buffer of `length` bytes whose content depends on `seed`.
pub fn pattern(seed: u64, length: usize) -> Vec<u8> {
    let mut buf = vec![0; length];
    Rng::new(seed).fill(&mut buf);
    buf
}
