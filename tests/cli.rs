//! `blockwatch serve` as a user runs it: defaults, clear errors with exit
//! code 2, background mode with a pidfile, captive `--run`, TCP, SIGTERM.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use testkit::*;

fn blockwatch(dir: &Path, args: &[&str]) -> std::process::Output {
    output(command(BLOCKWATCH, args).current_dir(dir))
}

fn assert_fails_with(dir: &Path, args: &[&str], message: &str) {
    let result = blockwatch(dir, args);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(
        stderr.contains(message),
        "{args:?}: stderr {stderr:?} lacks {message:?}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one-line error: {stderr}"
    );
}

#[test]
fn impossible_sizes_and_paths_get_one_line_errors_and_exit_2() {
    let dir = TempDir::new("cli-errors");
    assert_fails_with(
        dir.path(),
        &["serve", "-f", "missing.img"],
        "does not exist; give --size",
    );
    assert_fails_with(
        dir.path(),
        &["serve", "-f", "x.img", "--size", "12Q"],
        "unknown suffix",
    );
    assert_fails_with(dir.path(), &["serve", "-f", "x.img", "--size", "0"], "zero");
    assert_fails_with(
        dir.path(),
        &["serve", "-f", "/nonexistent-dir/x.img", "--size", "1M"],
        "cannot create",
    );
    create_sparse_file(&dir.join("small.img"), 1 << 20);
    assert_fails_with(
        dir.path(),
        &["serve", "-f", "small.img", "--size", "2M"],
        "drop --size",
    );
    std::fs::create_dir(dir.join("adir")).unwrap();
    assert_fails_with(
        dir.path(),
        &["serve", "-f", "adir"],
        "neither a regular file nor a block device",
    );
    std::fs::write(dir.join("not-a-socket"), b"x").unwrap();
    assert_fails_with(
        dir.path(),
        &["serve", "-f", "-U", "not-a-socket", "small.img"],
        "is not a socket",
    );
    assert!(
        !dir.join("x.img").exists(),
        "a failed start must not leave an image behind"
    );
    // verify's words in an order it cannot use.
    assert_fails_with(
        dir.path(),
        &["verify", "s3://bucket/prefix", "tape:a.tape"],
        "compared with the disk named before it",
    );
    assert_fails_with(
        dir.path(),
        &["verify", "tape:a.tape", "--at", "copy-1"],
        "name the disk first",
    );
    assert_fails_with(
        dir.path(),
        &["verify", "small.img", "replica.img", "--at", "copy-1"],
        "a replica or NBD target holds one",
    );
}

/// Asserts that `blockwatch serve ARGS` (run in `dir`) fails with a one-line
/// `message` and exit code 2, and that the start left none of `paths`
/// behind (an image, its state directory, a socket).
fn assert_refused_leaving_nothing(dir: &Path, args: &[&str], message: &str, paths: &[&str]) {
    assert_fails_with(dir, args, message);
    for path in paths {
        assert!(
            !dir.join(path).exists(),
            "{args:?} was refused but left {path} behind"
        );
    }
}

/// What `serve x.img` in a directory would leave there: the image, its
/// state directory and the default socket.
const X_IMG_LEFTOVERS: [&str; 3] = ["x.img", "x.img.blockwatch", "blockwatch.sock"];

#[test]
fn serve_with_a_bad_granularity_creates_no_image() {
    let dir = TempDir::new("cli-granularity");
    for granularity in ["3K", "2K", "32M", "0"] {
        let message = if granularity == "0" {
            "zero"
        } else {
            "is not a power of two from 4K to 16M"
        };
        assert_refused_leaving_nothing(
            dir.path(),
            &[
                "serve",
                "-f",
                "x.img",
                "--size",
                "1G",
                "--granularity",
                granularity,
            ],
            message,
            &X_IMG_LEFTOVERS,
        );
    }
}

#[test]
fn serve_with_a_socket_path_that_is_not_a_socket_creates_no_image() {
    let dir = TempDir::new("cli-not-a-socket");
    std::fs::write(dir.join("not-a-socket"), b"x").unwrap();
    assert_refused_leaving_nothing(
        dir.path(),
        &["serve", "-f", "-U", "not-a-socket", "x.img", "--size", "1M"],
        "is not a socket",
        &X_IMG_LEFTOVERS,
    );
    assert_eq!(
        std::fs::read(dir.join("not-a-socket")).unwrap(),
        b"x",
        "the file at the socket path is left as it was"
    );
}

#[test]
fn serve_with_a_pidfile_in_a_missing_directory_creates_no_image() {
    let dir = TempDir::new("cli-pidfile");
    assert_refused_leaving_nothing(
        dir.path(),
        &[
            "serve",
            "-f",
            "--pidfile",
            "missing/x.pid",
            "x.img",
            "--size",
            "1M",
        ],
        "cannot write pidfile",
        &X_IMG_LEFTOVERS,
    );
}

#[test]
fn serve_with_a_second_image_of_the_wrong_size_creates_neither() {
    let dir = TempDir::new("cli-second-image");
    create_sparse_file(&dir.join("b.img"), 2 << 20);
    assert_refused_leaving_nothing(
        dir.path(),
        &["serve", "-f", "a.img", "b.img", "--size", "1M"],
        "drop --size",
        &[
            "a.img",
            "a.img.blockwatch",
            "b.img.blockwatch",
            "blockwatch.sock",
        ],
    );
}

#[test]
fn serve_on_a_port_in_use_leaves_no_image_behind() {
    let dir = TempDir::new("cli-port-in-use");
    // Held for the whole test, so the port stays taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    assert_refused_leaving_nothing(
        dir.path(),
        &["serve", "-f", "-p", &port, "x.img", "--size", "1M"],
        "cannot listen on 127.0.0.1:",
        &["x.img", "x.img.blockwatch"],
    );
}

#[test]
fn default_serve_creates_a_sparse_gigabyte_image_and_a_private_socket() {
    require_tool("nbdinfo", "libnbd-bin");
    let dir = TempDir::new("cli-defaults");
    let mut child = command(BLOCKWATCH, ["serve", "-f"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let socket = dir.join("blockwatch.sock");
    let started = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let metadata = std::fs::metadata(&socket).unwrap();
    assert!(metadata.file_type().is_socket());
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
    let image = std::fs::metadata(dir.join("blockwatch.img")).unwrap();
    assert_eq!(image.len(), 1 << 30);
    use std::os::unix::fs::MetadataExt;
    assert!(image.blocks() < 64, "the default image must be sparse");
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    assert_eq!(
        run_program("nbdinfo", ["--size", &uri]).trim(),
        "1073741824"
    );
    signal(child.id(), libc::SIGTERM);
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM must end the server with 0, got {status}"
    );
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    assert!(stdout.contains(&uri), "banner names the URI: {stdout}");
    assert!(
        stdout.contains("nbdfuse"),
        "banner says how to mount: {stdout}"
    );
    assert!(!socket.exists(), "the socket is removed at exit");
}

#[test]
fn a_second_server_on_the_same_image_or_socket_is_refused() {
    let dir = TempDir::new("cli-twice");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "8M");
    let socket = server.socket().to_str().unwrap().to_string();
    assert_fails_with(
        dir.path(),
        &["serve", "-f", "-U", "other.sock", "disk.img"],
        "in use by another process",
    );
    create_sparse_file(&dir.join("other.img"), 1 << 20);
    assert_fails_with(
        dir.path(),
        &["serve", "-f", "-U", &socket, "other.img"],
        "already listening",
    );
    server.stop();
}

/// A server stopped at once after it was seen ready used to die of the
/// SIGTERM half the time: its socket accepted connections before it caught
/// the signal. Ready now means it sent a greeting, and it catches SIGTERM
/// before it accepts; each start here is stopped the moment it is ready.
#[test]
fn sigterm_right_after_the_server_is_ready_exits_0() {
    let dir = TempDir::new("cli-early-sigterm");
    let image = dir.join("disk.img");
    create_sparse_file(&image, 1 << 20);
    for _ in 0..20 {
        // Server::stop asserts the exit code is 0.
        Server::start(dir.path(), &[&image], &[]).stop();
    }
}

#[test]
fn background_mode_writes_a_pidfile_and_stops_on_sigterm() {
    require_tool("nbdinfo", "libnbd-bin");
    let dir = TempDir::new("cli-background");
    let pidfile = dir.join("server.pid");
    let socket = dir.join("bg.sock");
    let result = blockwatch(
        dir.path(),
        &[
            "serve",
            "--pidfile",
            pidfile.to_str().unwrap(),
            "-U",
            socket.to_str().unwrap(),
            "bg.img",
            "--size",
            "16M",
        ],
    );
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(stdout.contains("in the background"), "{stdout}");
    let started = Instant::now();
    let pid: i32 = loop {
        if let Ok(text) = std::fs::read_to_string(&pidfile)
            && let Ok(pid) = text.trim().parse()
        {
            break pid;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no pidfile");
        std::thread::sleep(Duration::from_millis(20));
    };
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    assert_eq!(run_program("nbdinfo", ["--size", &uri]).trim(), "16777216");
    // SAFETY: kill(2) takes no memory; the pid is the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let started = Instant::now();
    while pidfile.exists() || socket.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "daemon did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a captive `blockwatch serve --run ...`, asserts success, returns stdout.
fn captive_stdout(dir: &Path, args: &[&str]) -> String {
    let result = blockwatch(dir, args);
    let stdout = String::from_utf8_lossy(&result.stdout).into_owned();
    assert!(
        result.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&result.stderr)
    );
    stdout
}

#[test]
fn captive_run_passes_the_uri_and_returns_the_command_status() {
    require_tool("nbdinfo", "libnbd-bin");
    let dir = TempDir::new("cli-run");
    create_sparse_file(&dir.join("disk.img"), 4 << 20);
    let stdout = captive_stdout(
        dir.path(),
        &[
            "serve",
            "--run",
            "nbdinfo --size \"$uri\"; echo \"export=[$exportname]\"",
            "disk.img",
        ],
    );
    assert!(stdout.contains("4194304"), "{stdout}");
    assert!(stdout.contains("export=[]"), "{stdout}");
    let result = blockwatch(dir.path(), &["serve", "--run", "exit 3", "disk.img"]);
    assert_eq!(result.status.code(), Some(3));
    // TCP on a port the kernel picks; $uri and $port name the real one.
    let stdout = captive_stdout(
        dir.path(),
        &[
            "serve",
            "-p",
            "0",
            "-e",
            "tcpdisk",
            "--run",
            "nbdinfo --size \"$uri\" && echo \"port=$port uri=$uri\"",
            "disk.img",
        ],
    );
    assert!(stdout.contains("4194304"), "{stdout}");
    assert!(stdout.contains("uri=nbd://127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("/tcpdisk"), "{stdout}");
    assert!(!stdout.contains("port=0 "), "{stdout}");
}
