//! Data integrity under load with fio's nbd engine (libnbd inside fio):
//! many writes in flight, then every block read back and its crc32c checked.

mod common;

use common::Server;
use serde_json::Value;
use std::time::Duration;
use testkit::{TempDir, command, output_within, parse_json, require_tool, status_text};

/// A fio job runs a few seconds; this only bounds a hang.
const FIO_LIMIT: Duration = Duration::from_secs(60);

/// Runs one fio job against `uri` and returns the job's JSON, after checking
/// that fio exited 0 and reported neither a job error nor a verify failure.
fn fio_job(dir: &TempDir, uri: &str, name: &str, job_args: &[&str]) -> Value {
    let mut fio = command(
        "fio",
        [
            format!("--name={name}"),
            "--ioengine=nbd".to_string(),
            format!("--uri={uri}"),
            "--output-format=json".to_string(),
            "--verify=crc32c".to_string(),
            "--verify_fatal=1".to_string(),
        ],
    );
    // fio saves verify state files in its working directory.
    fio.args(job_args).current_dir(dir.path());
    let result = output_within(&mut fio, FIO_LIMIT);
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        result.status.success(),
        "fio job {name} failed with {}\n--- stderr ---\n{stderr}--- stdout ---\n{stdout}",
        status_text(result.status)
    );
    assert!(
        !stderr.contains("verify"),
        "fio job {name} reported verify problems:\n{stderr}"
    );
    // The nbd engine prints "fio: connected to NBD server" before the JSON.
    let json_start = stdout
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in fio output:\n{stdout}"));
    let report = parse_json(&stdout[json_start..], "fio --output-format=json");
    let jobs = report["jobs"].as_array().expect("fio JSON has jobs");
    assert_eq!(jobs.len(), 1, "one fio job expected: {report:#}");
    let job = jobs[0].clone();
    assert_eq!(
        job["error"].as_i64(),
        Some(0),
        "fio job {name} has an error: {job:#}"
    );
    job
}

fn io_bytes(job: &Value, direction: &str) -> u64 {
    job[direction]["io_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no {direction}.io_bytes in {job:#}"))
}

#[test]
fn random_4k_writes_at_depth_16_verify_with_crc32c() {
    require_tool("fio", "fio");
    let dir = TempDir::new("fio-rand");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");

    let job = fio_job(
        &dir,
        &server.uri(),
        "randwrite-verify",
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--time_based",
            "--runtime=3",
        ],
    );
    // With verify, the bytes written are read back and checked.
    let written = io_bytes(&job, "write");
    let verified = io_bytes(&job, "read");
    assert!(written >= 32 << 20, "wrote only {written} bytes: {job:#}");
    assert!(verified > 0, "nothing was read back to verify: {job:#}");
    server.stop();
}

#[test]
fn sequential_1m_writes_at_depth_16_verify_with_crc32c() {
    require_tool("fio", "fio");
    let dir = TempDir::new("fio-seq");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");

    let job = fio_job(
        &dir,
        &server.uri(),
        "seqwrite-verify",
        &["--rw=write", "--bs=1M", "--iodepth=16", "--size=32M"],
    );
    assert_eq!(io_bytes(&job, "write"), 32 << 20, "{job:#}");
    assert_eq!(io_bytes(&job, "read"), 32 << 20, "{job:#}");
    server.stop();
}

#[test]
fn mixed_size_random_writes_interleave_inline_and_pool_replies_and_verify() {
    // Untracked, every plain write is a page-cache copy: those under 256 KiB
    // are answered by the connection's thread, larger ones by pool threads,
    // so their replies interleave on one socket under the send lock.
    require_tool("fio", "fio");
    let dir = TempDir::new("fio-mixed");
    let image = dir.join("disk.img");
    let server = Server::start(dir.path(), &[&image], &["--size", "64M", "--no-track"]);

    let job = fio_job(
        &dir,
        &server.uri(),
        "mixed-verify",
        &[
            "--rw=randwrite",
            "--bssplit=4k/60:64k/15:512k/10:1m/15",
            "--iodepth=32",
            "--size=48M",
        ],
    );
    assert!(io_bytes(&job, "write") >= 48 << 20, "{job:#}");
    assert!(io_bytes(&job, "read") >= 48 << 20, "{job:#}");
    server.stop();
}
