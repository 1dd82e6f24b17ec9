//! `blockwatch copy` and `verify` with no server running: full and
//! incremental copies to a replica, each compared byte for byte with the
//! image; holes stay holes; a copy that finds nothing changed advances its
//! checkpoint; the refusals that keep someone's data safe; an ENOSPC that
//! leaves the replica's record as it was, then a rerun that finishes.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use testkit::*;

const MIB: u64 = 1 << 20;

fn copy_json(image: &Path, target: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["copy", image.to_str().unwrap(), "--to", target, "--json"];
    args.extend_from_slice(extra);
    parse_json(&run_program(BLOCKWATCH, &args), "blockwatch copy --json")
}

/// Serves `image` just long enough for qemu-io to run `commands`.
fn write_with_server(dir: &Path, image: &Path, commands: &[&str]) {
    let server = Server::start(dir, &[image], &[]);
    qemu_io(&server.uri(), commands);
    server.stop();
}

fn refused(args: &[&str], expect: &str) {
    let out = output(&mut command(BLOCKWATCH, args));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "blockwatch {args:?}: {stderr}");
    assert!(
        stderr.contains(expect),
        "blockwatch {args:?}: {stderr:?} lacks {expect:?}"
    );
}

#[test]
fn full_then_incremental_copies_match_the_image_and_keep_holes() {
    let dir = TempDir::new("copy-chain");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "256M");
    qemu_io(&server.uri(), &["write -P 1 1M 4M", "write -P 2 100M 64k"]);
    server.stop();
    let replica = dir.join("replica.img");
    let target = format!("file:{}", replica.display());

    let full = copy_json(&image, &target, &[]);
    assert_eq!(full["kind"], "full", "{full:#}");
    assert_eq!(full["full_reason"], "the first copy to this replica");
    assert_files_equal(&image, &replica);
    let allocated = std::fs::metadata(&replica).unwrap().blocks() * 512;
    assert!(
        allocated < 16 * MIB,
        "holes were filled: {allocated} bytes allocated"
    );

    for (round, commands) in [
        ["write -P 3 50M 8k", "write -P 4 200M 1M"],
        ["write -P 5 1M 4k", "discard 100M 64k"],
    ]
    .iter()
    .enumerate()
    {
        write_with_server(dir.path(), &image, commands);
        let summary = copy_json(&image, &target, &[]);
        assert_eq!(summary["kind"], "incremental", "round {round}: {summary:#}");
        assert!(
            summary["planned_bytes"].as_u64().unwrap() <= 2 * MIB,
            "round {round}: an incremental copies what changed: {summary:#}"
        );
        assert_files_equal(&image, &replica);
    }
    let verified = output(&mut command(
        BLOCKWATCH,
        ["verify", image.to_str().unwrap(), target.as_str()],
    ));
    assert_eq!(verified.status.code(), Some(0), "{verified:?}");

    // Only the newest copy's checkpoint is left, pinned for the replica.
    let listing = parse_json(
        &run_program(
            BLOCKWATCH,
            ["checkpoints", image.to_str().unwrap(), "--json"],
        ),
        "checkpoints",
    );
    let listing = listing.as_array().unwrap();
    assert_eq!(listing.len(), 1, "{listing:#?}");
    assert!(
        listing[0]["pins"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("replica.img holds it")
    );
}

#[test]
fn a_copy_that_finds_nothing_changed_copies_nothing_and_advances() {
    let dir = TempDir::new("copy-nothing");
    let image = dir.join("disk.img");
    Server::start_with_size(dir.path(), &image, "16M").stop();
    let target = dir.join("r.img").display().to_string();
    let first = copy_json(&image, &target, &[]);
    let second = copy_json(&image, &target, &[]);
    assert_eq!(second["kind"], "incremental");
    assert_eq!(second["planned_bytes"], 0, "{second:#}");
    assert_eq!(second["base_checkpoint"], first["checkpoint"]);
    assert_ne!(second["checkpoint"], first["checkpoint"]);
}

#[test]
fn copies_refuse_what_may_be_someone_elses_data_unless_full() {
    let dir = TempDir::new("copy-refusals");
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    Server::start_with_size(dir.path(), &a, "16M").stop();
    Server::start_with_size(dir.path(), &b, "16M").stop();
    let (a_arg, b_arg) = (a.to_str().unwrap(), b.to_str().unwrap());

    // A file that is no replica.
    let stranger = dir.join("stranger.img");
    std::fs::write(&stranger, b"someone's data").unwrap();
    let stranger_arg = stranger.to_str().unwrap();
    refused(
        &["copy", a_arg, "--to", stranger_arg],
        "may hold someone's data",
    );
    assert_eq!(std::fs::read(&stranger).unwrap(), b"someone's data");

    // A replica of another disk.
    let replica = dir.join("replica.img");
    let replica_arg = replica.to_str().unwrap();
    copy_json(&a, replica_arg, &[]);
    refused(
        &["copy", b_arg, "--to", replica_arg],
        "is a replica of another disk",
    );

    // A replica written behind our back.
    write_at(&replica, 4096, b"tampered");
    refused(
        &["copy", a_arg, "--to", replica_arg],
        "was changed since the copy",
    );
    let verified = output(&mut command(BLOCKWATCH, ["verify", a_arg, replica_arg]));
    assert_eq!(
        verified.status.code(),
        Some(1),
        "verify finds the tampered region"
    );
    assert!(String::from_utf8_lossy(&verified.stdout).contains("differs 0 65536"));

    // --full takes over, says why, and leaves an exact copy.
    let full = copy_json(&b, replica_arg, &["--full"]);
    assert_eq!(full["kind"], "full");
    assert_eq!(full["full_reason"], "--full was given");
    assert_files_equal(&b, &replica);
    let full = copy_json(&a, stranger_arg, &["--full"]);
    assert_eq!(full["kind"], "full");
    assert_files_equal(&a, &stranger);
}

#[test]
fn a_replica_whose_checkpoint_is_gone_gets_a_full_copy_and_says_why() {
    let dir = TempDir::new("copy-base-gone");
    let image = dir.join("disk.img");
    Server::start_with_size(dir.path(), &image, "16M").stop();
    let image_arg = image.to_str().unwrap();
    let replica = dir.join("r.img");
    let first = copy_json(&image, replica.to_str().unwrap(), &[]);
    let name = first["checkpoint"].as_str().unwrap();
    let listing = parse_json(
        &run_program(BLOCKWATCH, ["checkpoints", image_arg, "--json"]),
        "checkpoints",
    );
    let holder = listing[0]["pins"][0]["holder"]
        .as_str()
        .unwrap()
        .to_string();
    refused(&["checkpoint", image_arg, "--delete", name], "is pinned by");
    run_program(BLOCKWATCH, ["unpin", image_arg, name, &holder]);
    run_program(BLOCKWATCH, ["checkpoint", image_arg, "--delete", name]);
    write_with_server(dir.path(), &image, &["write -P 9 4M 4k"]);
    let again = copy_json(&image, replica.to_str().unwrap(), &[]);
    assert_eq!(again["kind"], "full", "{again:#}");
    assert!(
        again["full_reason"].as_str().unwrap().contains("is gone"),
        "{again:#}"
    );
    assert_files_equal(&image, &replica);
}

#[test]
fn a_copy_that_runs_out_of_space_leaves_the_record_and_a_rerun_finishes() {
    if skipped_unless_root("mount -t tmpfs") {
        return;
    }
    let dir = TempDir::new("copy-enospc");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");
    qemu_io(&server.uri(), &["write -P 1 0 1M"]);
    server.stop();
    let small = dir.join("small");
    std::fs::create_dir(&small).unwrap();
    run_program(
        "mount",
        [
            "-t",
            "tmpfs",
            "-o",
            "size=4M",
            "tmpfs",
            small.to_str().unwrap(),
        ],
    );
    let unmount = Unmount(small.clone());
    let replica = small.join("r.img");
    let replica_arg = replica.to_str().unwrap();
    let first = copy_json(&image, replica_arg, &[]);
    let record = std::fs::read(small.join("r.img.blockwatch-replica")).unwrap();

    write_with_server(dir.path(), &image, &["write -P 2 8M 8M"]);
    refused(
        &["copy", image.to_str().unwrap(), "--to", replica_arg],
        "No space left",
    );
    assert_eq!(
        std::fs::read(small.join("r.img.blockwatch-replica")).unwrap(),
        record,
        "a failed copy must not advance the replica's record"
    );
    // The replica holds a half-written copy now, so its mtime moved: only
    // --full may write it again, or more space and the same base.
    run_program("mount", ["-o", "remount,size=64M", small.to_str().unwrap()]);
    let rerun = copy_json(&image, replica_arg, &["--full"]);
    assert_eq!(rerun["kind"], "full");
    assert_ne!(rerun["checkpoint"], first["checkpoint"]);
    assert_files_equal(&image, &replica);
    drop(unmount);
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// qemu-nbd serving `qcow2` read-only (with `-B bitmap` when given) on a
/// socket in `dir`, stopped on drop.
struct QemuNbd(std::process::Child);

impl QemuNbd {
    fn start(dir: &Path, qcow2: &Path, bitmap: Option<&str>) -> (QemuNbd, String) {
        require_tool("qemu-nbd", "qemu-utils");
        let socket = dir.join("qemu-nbd.sock");
        let _ = std::fs::remove_file(&socket);
        let mut command = std::process::Command::new("qemu-nbd");
        command.args(["-r", "-t", "-f", "qcow2", "-k"]).arg(&socket);
        if let Some(bitmap) = bitmap {
            command.args(["-B", bitmap]);
        }
        let child = command
            .arg(qcow2)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start qemu-nbd");
        let started = std::time::Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(started.elapsed().as_secs() < 20, "qemu-nbd did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        (
            QemuNbd(child),
            format!("nbd+unix:///?socket={}", socket.display()),
        )
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_io_qcow2(qcow2: &Path, commands: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for each in commands {
        args.extend(["-c", each]);
    }
    args.push(qcow2.to_str().unwrap());
    run_program("qemu-io", &args);
}

/// The qcow2's contents as a raw image, to compare a replica with.
fn raw_of(qcow2: &Path, raw: &Path) {
    let _ = std::fs::remove_file(raw);
    run_program(
        "qemu-img",
        [
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            qcow2.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
}

#[test]
fn a_copy_from_qemu_nbd_follows_qemus_own_dirty_bitmap() {
    require_tool("qemu-img", "qemu-utils");
    let dir = TempDir::new("copy-from-qemu");
    let qcow2 = dir.join("vm.qcow2");
    let qcow2_arg = qcow2.to_str().unwrap();
    run_program(
        "qemu-img",
        ["create", "-q", "-f", "qcow2", qcow2_arg, "64M"],
    );
    qemu_io_qcow2(&qcow2, &["write -P 1 0 2M", "write -P 2 40M 1M"]);
    let replica = dir.join("replica.img");
    let replica_arg = replica.to_str().unwrap();
    let raw = dir.join("expected.raw");

    // A full copy first (no bitmap), then QEMU starts tracking.
    let (server, uri) = QemuNbd::start(dir.path(), &qcow2, None);
    let mut args = vec![
        "copy",
        "--from",
        uri.as_str(),
        "--to",
        replica_arg,
        "--json",
    ];
    let full = parse_json(&run_program(BLOCKWATCH, &args), "copy --from");
    drop(server);
    assert_eq!(full["kind"], "full", "{full:#}");
    raw_of(&qcow2, &raw);
    assert_files_equal(&raw, &replica);
    let allocated = std::fs::metadata(&replica).unwrap().blocks() * 512;
    assert!(allocated < 8 * MIB, "holes were filled: {allocated} bytes");

    run_program("qemu-img", ["bitmap", "--add", qcow2_arg, "since-full"]);
    qemu_io_qcow2(&qcow2, &["write -P 3 1M 64k", "write -P 4 60M 128k"]);
    let (server, uri) = QemuNbd::start(dir.path(), &qcow2, Some("since-full"));
    args[2] = uri.as_str();
    args.extend(["--bitmap", "since-full"]);
    let incremental = parse_json(&run_program(BLOCKWATCH, &args), "copy --bitmap");
    drop(server);
    assert_eq!(incremental["kind"], "incremental", "{incremental:#}");
    assert_eq!(
        incremental["planned_bytes"],
        (64 + 128) * 1024,
        "exactly the regions QEMU's bitmap marks: {incremental:#}"
    );
    raw_of(&qcow2, &raw);
    assert_files_equal(&raw, &replica);

    // A bitmap copy onto a replica that holds nothing of this export is refused.
    let empty = dir.join("empty.img");
    let (_server, uri) = QemuNbd::start(dir.path(), &qcow2, Some("since-full"));
    refused(
        &[
            "copy",
            "--from",
            &uri,
            "--bitmap",
            "since-full",
            "--to",
            empty.to_str().unwrap(),
        ],
        "needs a full copy first",
    );
}

/// A python3-libnbd writer on the served disk: random 4 KiB..256 KiB
/// writes of seeded data while `DIR/run` exists; while `DIR/pause` exists
/// it flushes, says so in `DIR/paused`, and waits.
const WRITER: &str = r#"
import nbd, os, random, sys, time
uri, control = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
rng = random.Random(7)
writes = 0
while os.path.exists(os.path.join(control, "run")):
    if os.path.exists(os.path.join(control, "pause")):
        h.flush()
        open(os.path.join(control, "paused"), "w").close()
        while os.path.exists(os.path.join(control, "pause")):
            time.sleep(0.005)
        os.remove(os.path.join(control, "paused"))
        continue
    length = rng.choice([4096, 8192, 65536, 262144])
    offset = rng.randrange(0, size - length) // 4096 * 4096
    h.pwrite(bytes([rng.randrange(256)]) * length, offset)
    writes += 1
h.flush()
h.shutdown()
print(writes)
"#;

struct Writer {
    control: std::path::PathBuf,
    child: std::process::Child,
}

impl Writer {
    fn start(uri: &str, control: &Path) -> Writer {
        std::fs::create_dir_all(control).unwrap();
        std::fs::write(control.join("run"), b"").unwrap();
        let child = std::process::Command::new("/usr/bin/python3")
            .args(["-c", WRITER, uri, control.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the python3-libnbd writer");
        Writer {
            control: control.to_path_buf(),
            child,
        }
    }

    /// Returns once the writer has flushed and stopped writing.
    fn pause(&self) {
        std::fs::write(self.control.join("pause"), b"").unwrap();
        let started = std::time::Instant::now();
        while !self.control.join("paused").exists() {
            assert!(started.elapsed().as_secs() < 30, "the writer never paused");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    fn resume(&self) {
        std::fs::remove_file(self.control.join("pause")).unwrap();
    }

    /// Stops it and returns how many writes it made.
    fn stop(mut self) -> u64 {
        let _ = std::fs::remove_file(self.control.join("pause"));
        std::fs::remove_file(self.control.join("run")).unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the writer failed: {status}");
        let mut text = String::new();
        std::io::Read::read_to_string(self.child.stdout.as_mut().unwrap(), &mut text).unwrap();
        text.trim().parse().unwrap()
    }
}

/// The names of the `copy-*` checkpoints.
fn copy_checkpoints(image: &Path) -> Vec<String> {
    let listing = parse_json(
        &run_program(BLOCKWATCH, ["checkpoints", image.to_str().unwrap(), "--json"]),
        "checkpoints",
    );
    listing
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str().filter(|n| n.starts_with("copy-")))
        .map(String::from)
        .collect()
}

/// One live copy under writes: the writer pauses (flushed) while the copy's
/// snapshot is taken, so the image file copied then is exactly what the
/// snapshot must show; it writes on while the copy reads.
fn live_copy_under_writes(dir: &Path, image: &Path, uri: &str, replica: &Path) -> serde_json::Value {
    let expected = dir.join("expected.img");
    let writer = Writer::start(uri, &dir.join("writer"));
    std::thread::sleep(std::time::Duration::from_millis(300));
    writer.pause();
    std::fs::copy(image, &expected).unwrap();
    let before = copy_checkpoints(image);
    let copy = std::process::Command::new(BLOCKWATCH)
        .args(["copy", image.to_str().unwrap(), "--to", replica.to_str().unwrap(), "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Resume as soon as the snapshot's checkpoint exists.
    let started = std::time::Instant::now();
    while copy_checkpoints(image) == before {
        assert!(started.elapsed().as_secs() < 30, "the copy took no snapshot");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    writer.resume();
    let output = copy.wait_with_output().unwrap();
    let writes = writer.stop();
    assert!(output.status.success(), "the live copy failed");
    assert!(writes > 0, "the writer wrote nothing");
    assert_files_equal(&expected, replica);
    parse_json(&String::from_utf8_lossy(&output.stdout), "copy --json")
}

#[test]
fn live_copies_under_writes_hold_the_disk_as_it_was_at_their_checkpoint() {
    let dir = TempDir::new("copy-live");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");
    qemu_io(&server.uri(), &["write -P 1 0 8M", "write -P 2 32M 8M"]);
    let replica = dir.join("replica.img");
    let full = live_copy_under_writes(dir.path(), &image, &server.uri(), &replica);
    assert_eq!(full["kind"], "full", "{full:#}");
    let incremental = live_copy_under_writes(dir.path(), &image, &server.uri(), &replica);
    assert_eq!(incremental["kind"], "incremental", "{incremental:#}");
    assert_eq!(incremental["base_checkpoint"], full["checkpoint"]);
    // The snapshot is gone once the copy ends: no NAME@CHECKPOINT export.
    let list = run_program("nbdinfo", ["--list", server.uri().as_str()]);
    assert!(!list.contains('@'), "a snapshot export outlived its copy:\n{list}");
    server.stop();
}
