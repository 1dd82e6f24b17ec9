//! Protocol checks through libnbd's Python bindings (python3-libnbd):
//! option haggling, metadata contexts and block status, the exact error
//! for each invalid request (strict mode off), multi-conn consistency, and
//! raw requests libnbd cannot send. The checks live in
//! tests/libnbd_checks.py; each test starts a server and runs one check.

mod common;

use common::Server;
use std::process::Command;
use testkit::{MIB, TempDir, assert_file_range, create_sparse_file, output, status_text, write_at};

/// python3-libnbd is installed for the system interpreter only.
const PYTHON: &str = "/usr/bin/python3";
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/libnbd_checks.py");

fn require_python_libnbd() {
    let found = Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(
        found,
        "{PYTHON} cannot import nbd; these tests need it: apt-get install -y python3-libnbd"
    );
}

/// Runs one check of libnbd_checks.py and fails with its output unless it
/// passes.
fn run_check(server: &Server, check: &str, args: &[&str]) {
    require_python_libnbd();
    let result = output(Command::new(PYTHON).arg(SCRIPT).arg(check).args(args));
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        result.status.success(),
        "libnbd_checks.py {check} failed with {}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}{}",
        status_text(result.status),
        server.logs()
    );
    // Show the passed steps with --nocapture.
    print!("{stdout}");
}

fn serve_fresh(dir: &TempDir) -> Server {
    let image = dir.join("disk.img");
    Server::start_with_size(dir.path(), &image, "64M")
}

#[test]
fn opt_mode_lists_informs_and_goes() {
    let dir = TempDir::new("libnbd-opt");
    let first = dir.join("a.img");
    let second = dir.join("b.img");
    create_sparse_file(&first, 32 * MIB);
    create_sparse_file(&second, 16 * MIB);
    let server = Server::start(dir.path(), &[&first, &second], &[]);
    let sizes = [(32 * MIB).to_string(), (16 * MIB).to_string()];
    run_check(&server, "opt-mode", &[&server.uri(), &sizes[0], &sizes[1]]);
    server.stop();
}

#[test]
fn block_status_reports_base_allocation_extents() {
    let dir = TempDir::new("libnbd-status");
    let server = serve_fresh(&dir);
    run_check(&server, "block-status", &[&server.uri()]);
    server.stop();
}

#[test]
fn invalid_requests_get_the_exact_errno_and_the_connection_goes_on() {
    let dir = TempDir::new("libnbd-errors");
    let server = serve_fresh(&dir);
    run_check(&server, "errors", &[&server.uri()]);
    server.stop();
}

#[test]
fn requests_of_64_mib_are_served_without_block_size_negotiation() {
    let dir = TempDir::new("libnbd-large");
    let mut server = serve_fresh(&dir);
    run_check(&server, "large-requests", &[&server.uri()]);
    assert!(server.is_running(), "the server died\n{}", server.logs());
    server.stop();
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let dir = TempDir::new("libnbd-ro");
    let image = dir.join("disk.img");
    create_sparse_file(&image, 64 * MIB);
    write_at(&image, 0, &[0x5a; 4096]);
    let server = Server::start(dir.path(), &[&image], &["-r"]);
    run_check(&server, "read-only", &[&server.uri()]);
    server.stop();
    assert_file_range(&image, 0, &[0x5a; 4096]);
}

#[test]
fn multi_conn_flush_on_one_connection_shows_writes_of_another() {
    let dir = TempDir::new("libnbd-multi");
    let server = serve_fresh(&dir);
    run_check(&server, "multi-conn", &[&server.uri()]);
    server.stop();
}

#[test]
fn many_queued_large_reads_all_get_replies() {
    // 64 reads of 256 KiB sent before reading any reply: the replies add
    // up to more than the server sends in one batch.
    let dir = TempDir::new("libnbd-queued");
    let server = serve_fresh(&dir);
    run_check(&server, "queued-reads", &[&server.uri(), "64", "262144"]);
    server.stop();
}

#[test]
fn unknown_command_and_range_errors_over_raw_simple_and_extended_headers() {
    let dir = TempDir::new("libnbd-raw");
    let server = serve_fresh(&dir);
    let socket = server.socket().to_str().expect("UTF-8 path").to_string();
    run_check(&server, "raw", &[&socket, &(64 * MIB).to_string()]);
    server.stop();
}

#[test]
fn sigterm_with_a_client_connected_exits_0_and_keeps_its_writes() {
    use std::io::{BufRead, BufReader};
    require_python_libnbd();
    let dir = TempDir::new("libnbd-sigterm");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");
    let mut client = Command::new(PYTHON)
        .arg(SCRIPT)
        .args(["hold-open", &server.uri()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start libnbd_checks.py");
    let mut stdout = BufReader::new(client.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read from the client");
    if line.trim() != "ready" {
        let _ = client.kill();
        let _ = client.wait();
        panic!("the client did not get ready: {line}\n{}", server.logs());
    }

    // The client is connected and idle with 8 MiB written but not flushed:
    // SIGTERM must close its connection, flush, and exit 0.
    server.stop();
    drop(client.stdin.take());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).expect("read the client output");
    let status = client.wait().expect("wait for the client");
    assert!(
        status.success(),
        "the client failed with {}: {line}{rest}",
        status_text(status)
    );
    print!("{rest}");
    for index in 0..8u8 {
        assert_file_range(
            &image,
            u64::from(index) * MIB,
            &vec![0xa0 + index; MIB as usize],
        );
    }
}
