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
fn a_copy_onto_a_replica_a_server_serves_is_refused() {
    let dir = TempDir::new("copy-served-replica");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");
    qemu_io(&server.uri(), &["write -P 1 1M 1M"]);
    server.stop();
    let replica = dir.join("replica.img");
    let replica_arg = replica.to_str().unwrap();
    copy_json(&image, replica_arg, &[]);
    // Someone looks at the replica through a read-only server: a copy
    // writing under it would change the disk its clients read.
    let served = Server::start(dir.path(), &[replica.as_path()], &["-r"]);
    write_with_server(dir.path(), &image, &["write -P 2 8M 64k"]);
    let before = std::fs::read(&replica).unwrap();
    refused(
        &["copy", image.to_str().unwrap(), "--to", replica_arg],
        "in use",
    );
    assert!(
        std::fs::read(&replica).unwrap() == before,
        "the replica changed"
    );
    served.stop();
    let again = copy_json(&image, replica_arg, &[]);
    assert_eq!(again["kind"], "incremental", "{again:#}");
    assert_files_equal(&image, &replica);
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
    assert_eq!(full["full_reason"], "the first copy to this target");
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
    let small = Tmpfs::mount(dir.path(), "small", "4M");
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
    // The replica holds a half-written copy now; --full starts over (a
    // rerun without it resumes: tests/copy_nbd.rs).
    small.resize("64M");
    let rerun = copy_json(&image, replica_arg, &["--full"]);
    assert_eq!(rerun["kind"], "full");
    assert_ne!(rerun["checkpoint"], first["checkpoint"]);
    assert_files_equal(&image, &replica);
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

/// A 64 MiB qcow2 `vm.qcow2` in `dir` with 2 MiB at 0 and 1 MiB at 40 MiB
/// written.
fn qcow2_with_data(dir: &Path) -> std::path::PathBuf {
    let qcow2 = dir.join("vm.qcow2");
    run_program(
        "qemu-img",
        [
            "create",
            "-q",
            "-f",
            "qcow2",
            qcow2.to_str().unwrap(),
            "64M",
        ],
    );
    qemu_io_qcow2(&qcow2, &["write -P 1 0 2M", "write -P 2 40M 1M"]);
    qcow2
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
    let qcow2 = qcow2_with_data(dir.path());
    let qcow2_arg = qcow2.to_str().unwrap();
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

/// Runs blockwatch with `s3`'s endpoint and credentials, expecting success.
fn run_with_s3(s3: &S3Server, args: &[&str]) -> String {
    let mut command = command(BLOCKWATCH, args);
    for (name, value) in s3.env() {
        command.env(name, value);
    }
    let out = output(&mut command);
    assert!(
        out.status.success(),
        "blockwatch {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Copies from qemu-nbd (everything, then what QEMU's bitmaps mark, a new
/// bitmap after each copy as a QEMU user checkpoints) go to every kind of
/// target of pieces: a tape chain, object storage and an NBD export; each
/// checkpoint of the chain and each session restores to the disk as QEMU
/// had it then.
#[test]
fn copies_from_qemu_nbd_go_to_tapes_object_storage_and_nbd_exports() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("nbdkit", "nbdkit");
    let dir = TempDir::new("copy-from-qemu-anywhere");
    let qcow2 = qcow2_with_data(dir.path());
    let qcow2_arg = qcow2.to_str().unwrap();
    let s3 = S3Server::s3s_fs(&dir.join("s3"));
    s3.create_bucket("backups");
    let nbdkit_socket = dir.join("nbdkit.sock");
    let _nbdkit = ServerProcess::start(
        "nbdkit",
        &["-f", "-U", nbdkit_socket.to_str().unwrap(), "memory", "64M"],
        &nbdkit_socket,
        &dir.join("nbdkit.log"),
    );
    let nbd_target = format!("nbd+unix:///?socket={}", nbdkit_socket.display());
    let state = dir.join("state");
    let tape = format!("tape:{}", dir.join("vm.tape").display());
    let repository = "s3://backups/vm";
    let targets = [tape.as_str(), repository, nbd_target.as_str()];

    // (checkpoint on the tape, session in the repository, the disk then).
    let mut states: Vec<(String, String, std::path::PathBuf)> = Vec::new();
    for round in 0..3 {
        let bitmap = format!("b{round}");
        let (server, uri) = QemuNbd::start(
            dir.path(),
            &qcow2,
            (round > 0).then_some(format!("b{}", round - 1)).as_deref(),
        );
        let mut copies = Vec::new();
        for target in targets {
            let mut args = vec!["copy", "--from", &uri, "--to", target, "--json"];
            args.extend(["--state", state.to_str().unwrap()]);
            let previous = format!("b{}", round.max(1) - 1);
            if round > 0 {
                args.extend(["--bitmap", previous.as_str()]);
            }
            let summary = parse_json(&run_with_s3(&s3, &args), "copy --from");
            let kind = if round == 0 { "full" } else { "incremental" };
            assert_eq!(summary["kind"], kind, "{target}: {summary:#}");
            if round > 0 {
                assert_eq!(
                    summary["planned_bytes"],
                    (64 + 128) * 1024,
                    "{target}: what the bitmap marks: {summary:#}"
                );
            }
            copies.push(summary);
        }
        drop(server);
        let raw = dir.join(format!("raw-{round}.img"));
        raw_of(&qcow2, &raw);
        // The NBD target holds the newest state.
        let out = dir.join("out.img");
        let _ = std::fs::remove_file(&out);
        run_program("nbdcopy", [nbd_target.as_str(), out.to_str().unwrap()]);
        assert_files_equal(&raw, &out);
        states.push((
            copies[0]["checkpoint"].as_str().unwrap().to_string(),
            copies[1]["stored"]["session"].as_str().unwrap().to_string(),
            raw,
        ));
        // QEMU checkpoints: a new bitmap from here on, then the guest writes.
        run_program("qemu-img", ["bitmap", "--add", qcow2_arg, &bitmap]);
        let at = 8 * (round + 1);
        qemu_io_qcow2(
            &qcow2,
            &[
                &format!("write -P {} {at}M 64k", round + 5),
                &format!("write -P {} {}M 128k", round + 6, at + 20),
            ],
        );
        // Every copy names a checkpoint of its own; a second in between
        // keeps the names apart without their sequence suffix too.
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    let checkpoints: std::collections::BTreeSet<&String> = states.iter().map(|s| &s.0).collect();
    assert_eq!(checkpoints.len(), 3, "{states:?}");
    for (round, (checkpoint, session, raw)) in states.iter().enumerate() {
        let from_tape = dir.join(format!("tape-{round}.img"));
        run_with_s3(
            &s3,
            &[
                "restore",
                &tape,
                "--until",
                checkpoint,
                "--to",
                from_tape.to_str().unwrap(),
            ],
        );
        assert_files_equal(raw, &from_tape);
        let from_s3 = dir.join(format!("s3-{round}.img"));
        run_with_s3(
            &s3,
            &[
                "restore",
                &format!("{repository}#{session}"),
                "--to",
                from_s3.to_str().unwrap(),
            ],
        );
        assert_files_equal(raw, &from_s3);
    }
    // Without --state, an NBD target has nowhere to keep its record.
    let (_server, uri) = QemuNbd::start(dir.path(), &qcow2, None);
    refused(
        &["copy", "--from", &uri, "--to", &nbd_target],
        "give --state DIR",
    );
}
