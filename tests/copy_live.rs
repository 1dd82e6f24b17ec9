//! Copies of a disk while it is served and written: the copy-before-write
//! snapshot as an NBD export (read by nbdcopy and nbdinfo, listed, with
//! its dirty bitmaps), released when its control connection ends (also
//! when the process holding it is killed), dropped by a server restart,
//! broken by a full store while the disk's writes go on; and `blockwatch
//! copy` of a live disk under a python3-libnbd writer, byte-compared with
//! the disk as it was at the copy's checkpoint.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use control::Request;
use control::proto::SnapshotReply;
use control::transport::Connection;
use testkit::*;

const MIB: u64 = 1 << 20;
const WAIT_LIMIT: Duration = Duration::from_secs(30);

fn state_dir(image: &Path) -> PathBuf {
    PathBuf::from(format!("{}.blockwatch", image.display()))
}

fn nbdinfo_list(server: &Server) -> String {
    run_program("nbdinfo", ["--list", "--json", server.uri().as_str()])
}

fn checkpoints(image: &Path) -> serde_json::Value {
    parse_json(
        &run_program(
            BLOCKWATCH,
            ["checkpoints", image.to_str().unwrap(), "--json"],
        ),
        "checkpoints",
    )
}

/// The holders of every pin, over all checkpoints.
fn pin_holders(image: &Path) -> Vec<String> {
    let listing = checkpoints(image);
    let mut holders = Vec::new();
    for checkpoint in listing.as_array().unwrap() {
        for pin in checkpoint["pins"].as_array().unwrap() {
            holders.push(pin["holder"].as_str().unwrap().to_string());
        }
    }
    holders
}

fn nbdcopy_to(uri: &str, file: &Path) -> std::process::Output {
    output(&mut command(
        "nbdcopy",
        [uri, file.to_str().unwrap(), "--flush"],
    ))
}

#[test]
fn a_snapshot_export_shows_the_disk_at_its_checkpoint_while_writes_go_on() {
    let dir = TempDir::new("live-snapshot-export");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");
    qemu_io(&server.uri(), &["write -P 1 0 8M", "write -P 2 32M 1M"]);
    run_program(
        BLOCKWATCH,
        ["checkpoint", image.to_str().unwrap(), "before"],
    );
    qemu_io(&server.uri(), &["write -P 3 4M 128k", "write -P 4 40M 64k"]);

    let mut control = Connection::open(&state_dir(&image)).unwrap();
    let snapshot: SnapshotReply = control
        .call(&Request::Snapshot {
            name: Some("now".into()),
            max_store_bytes: None,
        })
        .unwrap();
    assert_eq!(snapshot.checkpoint, "now");
    assert_eq!(snapshot.export, "disk@now");
    // With no write since the snapshot, the image is the snapshot.
    let expected = dir.join("expected.img");
    std::fs::copy(&image, &expected).unwrap();

    // Overwrite what the snapshot shows, trim some, extend into holes.
    qemu_io(
        &server.uri(),
        &[
            "write -P 9 0 16M",
            "discard 32M 1M",
            "write -P 8 4M 64k",
            "write -P 7 60M 4M",
        ],
    );
    let listed = nbdinfo_list(&server);
    assert!(listed.contains("\"disk@now\""), "{listed}");
    let status = run_program(BLOCKWATCH, ["status", image.to_str().unwrap()]);
    assert!(
        status.contains("snapshot:") && status.contains("export disk@now"),
        "{status}"
    );
    let status = parse_json(
        &run_program(BLOCKWATCH, ["status", image.to_str().unwrap(), "--json"]),
        "status --json",
    );
    assert!(
        status["snapshot"]["store_bytes"].as_u64().unwrap() > 0,
        "{status:#}"
    );

    let read = dir.join("snapshot.img");
    let out = nbdcopy_to(&snapshot.uri, &read);
    assert!(out.status.success(), "nbdcopy: {out:?}\n{}", server.logs());
    assert_files_equal(&expected, &read);

    // Its dirty bitmap: what changed from "before" up to "now", in regions.
    let map = nbdinfo_map(&snapshot.uri, "qemu:dirty-bitmap:before");
    let dirty: Vec<(u64, u64)> = map
        .iter()
        .filter(|(_, _, flags)| flags & 1 != 0)
        .map(|(offset, length, _)| (*offset, *length))
        .collect();
    assert_eq!(dirty, [(4 * MIB, 128 << 10), (40 * MIB, 64 << 10)]);
    // base:allocation keeps the snapshot's holes and its data as data.
    let allocation = nbdinfo_map(&snapshot.uri, "base:allocation");
    let hole_at = |offset: u64| {
        allocation
            .iter()
            .find(|(start, length, _)| *start <= offset && offset < start + length)
            .map(|(_, _, flags)| flags & 2 != 0)
            .unwrap()
    };
    assert!(!hole_at(0) && !hole_at(32 * MIB), "{allocation:?}");
    assert!(hole_at(20 * MIB) && hole_at(50 * MIB), "{allocation:?}");

    // Narrowed to what a copy still reads (as a copy narrows its own):
    // the rest is no longer copied out at a first write, and reading it
    // fails rather than show bytes written after the checkpoint.
    control
        .call::<serde_json::Value>(&Request::NarrowSnapshot {
            name: "now".into(),
            extents: vec![(0, 8 * MIB), (48 * MIB, 64 << 10)],
        })
        .unwrap();
    let store_bytes = || {
        parse_json(
            &run_program(BLOCKWATCH, ["status", image.to_str().unwrap(), "--json"]),
            "status --json",
        )["snapshot"]["store_bytes"]
            .as_u64()
            .unwrap()
    };
    let before = store_bytes();
    qemu_io(&server.uri(), &["write -P 5 24M 64k", "write -P 5 48M 64k"]);
    assert_eq!(store_bytes(), before + (64 << 10), "only 48M is copied out");
    let read_only = |commands: &[&str]| {
        let mut command = qemu_io_command(&snapshot.uri, commands);
        output(command.arg("-r"))
    };
    let kept = read_only(&["read -P 1 0 64k", "read -P 0 48M 64k"]);
    let said =
        String::from_utf8_lossy(&kept.stdout).to_string() + &String::from_utf8_lossy(&kept.stderr);
    assert!(kept.status.success() && !said.contains("fail"), "{said}");
    let released = read_only(&["read 24M 4k"]);
    let said = String::from_utf8_lossy(&released.stdout).to_string()
        + &String::from_utf8_lossy(&released.stderr);
    assert!(said.contains("failed"), "{said}");
    let too_many = control.call::<serde_json::Value>(&Request::NarrowSnapshot {
        name: "now".into(),
        extents: vec![(0, 4096); control::proto::NARROW_EXTENTS_MAX + 1],
    });
    assert!(too_many.is_err(), "{too_many:?}");

    // A write to the snapshot is refused; the disk stays writable.
    let refused = output(&mut qemu_io_command(&snapshot.uri, &["write 0 4k"]));
    let said = String::from_utf8_lossy(&refused.stdout).to_string()
        + &String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() || said.contains("ermission") || said.contains("ead-only"),
        "{said}"
    );
    assert!(pin_holders(&image).contains(&"snapshot".to_string()));

    control
        .call::<serde_json::Value>(&Request::ReleaseSnapshot { name: "now".into() })
        .unwrap();
    assert!(!nbdinfo_list(&server).contains("disk@now"));
    assert!(!pin_holders(&image).contains(&"snapshot".to_string()));
    let gone = nbdcopy_to(&snapshot.uri, &dir.join("after-release.img"));
    assert!(!gone.status.success(), "a released snapshot is not served");
    let stores = std::fs::read_dir(state_dir(&image).join("snapshots")).unwrap();
    assert_eq!(stores.count(), 0, "the store file is removed");
    server.stop();
}

/// A python process that takes a snapshot on the control socket, says its
/// reply on stdout, and holds it until killed.
fn snapshot_holder(image: &Path) -> std::process::Child {
    let socket = control::transport::socket_path(&state_dir(image));
    let script = r#"
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b'{"op": "snapshot", "name": "held"}\n')
reply = b""
while not reply.endswith(b"\n"):
    reply += s.recv(4096)
sys.stdout.write(reply.decode())
sys.stdout.flush()
time.sleep(600)
"#;
    std::process::Command::new("python3")
        .args(["-c", script, socket.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_snapshot_is_released_when_the_process_holding_it_is_killed() {
    let dir = TempDir::new("live-snapshot-killed");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "32M");
    qemu_io(&server.uri(), &["write -P 1 0 1M"]);
    let mut holder = snapshot_holder(&image);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let reply = parse_json(&line, "snapshot reply");
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(nbdinfo_list(&server).contains("disk@held"));
    qemu_io(&server.uri(), &["write -P 2 0 1M"]);

    holder.kill().unwrap();
    holder.wait().unwrap();
    wait_until("the snapshot's release", WAIT_LIMIT, || {
        !nbdinfo_list(&server).contains("disk@held")
    });
    wait_until("its pin to go", WAIT_LIMIT, || {
        !pin_holders(&image).contains(&"snapshot".to_string())
    });
    let stores = std::fs::read_dir(state_dir(&image).join("snapshots")).unwrap();
    assert_eq!(stores.count(), 0);
    // The next snapshot is not refused as "already open".
    let mut control = Connection::open(&state_dir(&image)).unwrap();
    control
        .call::<SnapshotReply>(&Request::Snapshot {
            name: None,
            max_store_bytes: None,
        })
        .unwrap();
    drop(control);
    server.stop();
}

#[test]
fn a_server_restart_discards_a_snapshot_and_its_store() {
    let dir = TempDir::new("live-snapshot-restart");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "32M");
    qemu_io(&server.uri(), &["write -P 1 0 2M"]);
    let mut control = Connection::open(&state_dir(&image)).unwrap();
    let snapshot: SnapshotReply = control
        .call(&Request::Snapshot {
            name: Some("s".into()),
            max_store_bytes: None,
        })
        .unwrap();
    qemu_io(&server.uri(), &["write -P 2 0 1M"]);
    let store_dir = state_dir(&image).join("snapshots");
    assert_eq!(std::fs::read_dir(&store_dir).unwrap().count(), 1);
    server.kill();

    let server = Server::start(dir.path(), &[&image], &[]);
    assert_eq!(std::fs::read_dir(&store_dir).unwrap().count(), 0);
    assert!(!pin_holders(&image).contains(&"snapshot".to_string()));
    assert!(!nbdinfo_list(&server).contains("disk@s"));
    let read = output(&mut command(
        "nbdcopy",
        [
            server.uri_for(&snapshot.export).as_str(),
            dir.join("x.img").to_str().unwrap(),
        ],
    ));
    assert!(!read.status.success());
    assert!(
        control.call::<serde_json::Value>(&Request::Status).is_err(),
        "the old control connection ended with the old server"
    );
    server.stop();
}

#[test]
fn a_full_snapshot_store_breaks_the_snapshot_not_the_disks_writes() {
    let dir = TempDir::new("live-snapshot-full");
    let image = dir.join("disk.img");
    let server = Server::start(
        dir.path(),
        &[&image],
        &["--size", "64M", "--snapshot-max", "1M"],
    );
    qemu_io(&server.uri(), &["write -P 1 0 16M"]);
    let mut control = Connection::open(&state_dir(&image)).unwrap();
    let snapshot: SnapshotReply = control
        .call(&Request::Snapshot {
            name: Some("small".into()),
            max_store_bytes: None,
        })
        .unwrap();
    assert_eq!(snapshot.max_store_bytes, MIB);
    // 4 MiB of first writes: four times what the store may hold.
    qemu_io(&server.uri(), &["write -P 2 0 4M", "flush"]);
    let mut expected = vec![2u8; 4 * MIB as usize];
    expected.extend(vec![1u8; 12 * MIB as usize]);
    assert_file_range(&image, 0, &expected);

    let copy = output(&mut command(
        BLOCKWATCH,
        [
            "copy",
            "--from",
            snapshot.uri.as_str(),
            "--to",
            dir.join("replica.img").to_str().unwrap(),
        ],
    ));
    assert_eq!(copy.status.code(), Some(2), "{copy:?}");
    assert!(
        server.logs().contains("snapshot broken"),
        "{}",
        server.logs()
    );
    let status = control.call::<serde_json::Value>(&Request::Status).unwrap();
    let reason = status["snapshot"]["broken"].as_str().unwrap_or_default();
    assert!(reason.contains("store"), "{status:#}");
    assert!(
        !dir.join("replica.img.blockwatch-replica").exists(),
        "a failed copy records nothing"
    );
    control
        .call::<serde_json::Value>(&Request::ReleaseSnapshot {
            name: "small".into(),
        })
        .unwrap();
    server.stop();
}

/// A python3-libnbd writer: connects, waits for `go`, then writes 64 KiB
/// blocks of changing patterns at random offsets until `stop` exists, and
/// prints how many it wrote.
fn writer(uri: &str, go: &Path, stop: &Path) -> std::process::Child {
    let script = r#"
import nbd, os, random, sys, time
uri, go, stop = sys.argv[1:4]
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
while not os.path.exists(go):
    time.sleep(0.002)
rng = random.Random(11)
n = 0
while not os.path.exists(stop):
    h.pwrite(bytes([n % 250 + 3]) * 65536, rng.randrange(size // 65536) * 65536)
    n += 1
h.flush()
h.shutdown()
print(n)
"#;
    std::process::Command::new("/usr/bin/python3")
        .args([
            "-c",
            script,
            uri,
            go.to_str().unwrap(),
            stop.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn copy_checkpoints(image: &Path) -> Vec<String> {
    checkpoints(image)
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .filter(|name| name.starts_with("copy-"))
        .collect()
}

#[test]
fn a_live_copy_holds_the_disk_as_it_was_at_its_checkpoint_under_writes() {
    let dir = TempDir::new("live-copy");
    let image = dir.join("disk.img");
    // The writer may rewrite most of the disk while a (debug build) copy
    // runs: a store as large as the disk never fills.
    // The narrowing of each copy's snapshot is logged at debug.
    let server = Server::start_with_env(
        dir.path(),
        &[&image],
        &["--size", "128M", "--snapshot-max", "128M"],
        &[(
            "RUST_LOG".to_string(),
            "warn,blockwatch::serve::snapshots=debug".to_string(),
        )],
    );
    qemu_io(&server.uri(), &["write -P 1 0 96M"]);
    let replica = dir.join("replica.img");
    let target = format!("file:{}", replica.display());

    for round in 0..2 {
        let (go, stop) = (
            dir.join(format!("go-{round}")),
            dir.join(format!("stop-{round}")),
        );
        let writes = writer(&server.uri(), &go, &stop);
        // Nothing writes until the copy's checkpoint exists: the image
        // now is the disk at that checkpoint.
        let expected = dir.join("expected.img");
        std::fs::copy(&image, &expected).unwrap();
        let before = copy_checkpoints(&image);
        let copy = command(
            BLOCKWATCH,
            [
                "copy",
                image.to_str().unwrap(),
                "--to",
                target.as_str(),
                "--json",
            ],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
        wait_until("the copy's checkpoint", WAIT_LIMIT, || {
            copy_checkpoints(&image) != before
        });
        std::fs::write(&go, b"").unwrap();
        let copied = copy.wait_with_output().unwrap();
        std::fs::write(&stop, b"").unwrap();
        let written = writes.wait_with_output().unwrap();
        assert!(
            copied.status.success(),
            "round {round}: {copied:?}\n{}",
            server.logs()
        );
        let count: u64 = String::from_utf8_lossy(&written.stdout)
            .trim()
            .parse()
            .unwrap();
        assert!(count > 0, "the writer wrote during the copy");
        let summary = parse_json(&String::from_utf8_lossy(&copied.stdout), "copy --json");
        assert_eq!(
            summary["kind"],
            if round == 0 { "full" } else { "incremental" },
            "{summary:#}"
        );
        assert_files_equal(&expected, &replica);
        // The writes went to the disk, after the checkpoint the replica holds.
        let changes = run_program(
            BLOCKWATCH,
            [
                "changes",
                image.to_str().unwrap(),
                "--since",
                summary["checkpoint"].as_str().unwrap(),
            ],
        );
        assert!(
            !changes.trim().is_empty(),
            "round {round}: no change recorded since"
        );
        assert!(
            !nbdinfo_list(&server).contains('@'),
            "the snapshot was released"
        );
    }
    assert!(!pin_holders(&image).contains(&"snapshot".to_string()));
    // Each copy narrowed its snapshot to its plan, then as it went: the
    // replicas above equal the disk at each checkpoint all the same, with
    // the writer rewriting regions the snapshots had released.
    let narrowed = server.logs().matches("snapshot narrowed").count();
    assert!(narrowed >= 4, "{narrowed} narrowings\n{}", server.logs());
    // Only the newest copy's checkpoint is kept, pinned for the replica.
    assert_eq!(copy_checkpoints(&image).len(), 1);

    // Verify while served: through a snapshot of its own, which it drops.
    let verify = |expect: i32| {
        let out = output(&mut command(
            BLOCKWATCH,
            ["verify", image.to_str().unwrap(), target.as_str()],
        ));
        assert_eq!(
            out.status.code(),
            Some(expect),
            "{out:?}\n{}",
            server.logs()
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    verify(0);
    assert_eq!(
        copy_checkpoints(&image).len(),
        1,
        "verify leaves no checkpoint"
    );
    // A region nobody wrote since the copy, damaged in the replica: found.
    let changed = run_program(
        BLOCKWATCH,
        [
            "changes",
            image.to_str().unwrap(),
            "--since",
            copy_checkpoints(&image)[0].as_str(),
        ],
    );
    let written: Vec<(u64, u64)> = changed
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
        })
        .collect();
    // A whole 64 KiB region that no change touches.
    let untouched = (0..2048u64)
        .map(|n| n * 65536)
        .find(|&region| {
            !written
                .iter()
                .any(|&(offset, length)| offset < region + 65536 && region < offset + length)
        })
        .unwrap();
    write_at(&replica, untouched + 100, b"damage");
    let said = verify(1);
    assert!(said.contains(&format!("differs {untouched} ")), "{said}");
    server.stop();
    let verified = output(&mut command(
        BLOCKWATCH,
        ["verify", image.to_str().unwrap(), target.as_str()],
    ));
    // Offline too; the disk moved on after the copy: those regions are
    // skipped, and the damage is still found.
    assert_eq!(verified.status.code(), Some(1), "{verified:?}");
}

/// Starts `blockwatch copy IMAGE --to REPLICA` and returns once it has
/// begun writing (its progress record exists), the copy still running.
fn copy_under_way(image: &Path, replica: &Path) -> std::process::Child {
    let partial = PathBuf::from(format!("{}.blockwatch-replica.partial", replica.display()));
    let mut copy = command(
        BLOCKWATCH,
        [
            "copy",
            image.to_str().unwrap(),
            "--to",
            replica.to_str().unwrap(),
            "--workers",
            "1",
        ],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let started = Instant::now();
    while !partial.exists() {
        if let Some(status) = copy.try_wait().unwrap() {
            panic!("the copy ended ({status}) before it was under way");
        }
        assert!(started.elapsed() < WAIT_LIMIT, "the copy did not start");
        std::thread::sleep(Duration::from_millis(2));
    }
    copy
}

#[test]
fn a_killed_copier_releases_its_snapshot_and_a_rerun_finishes_the_copy() {
    let dir = TempDir::new("live-copy-killed");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "512M");
    qemu_io(&server.uri(), &["write -P 1 0 448M"]);
    let replica = dir.join("replica.img");
    let mut copy = copy_under_way(&image, &replica);
    copy.kill().unwrap();
    let status = copy.wait().unwrap();
    assert!(!status.success(), "killed before it finished: {status}");
    wait_until(
        "the killed copy's snapshot to be released",
        WAIT_LIMIT,
        || {
            !nbdinfo_list(&server).contains('@')
                && !pin_holders(&image).contains(&"snapshot".into())
        },
    );
    assert!(!dir.join("replica.img.blockwatch-replica").exists());

    let rerun = output(&mut command(
        BLOCKWATCH,
        [
            "copy",
            image.to_str().unwrap(),
            "--to",
            replica.to_str().unwrap(),
            "--json",
        ],
    ));
    assert!(rerun.status.success(), "{rerun:?}");
    let summary = parse_json(&String::from_utf8_lossy(&rerun.stdout), "copy --json");
    assert_eq!(summary["kind"], "full", "{summary:#}");
    assert!(summary["resumed_from"].is_string(), "{summary:#}");
    assert_files_equal(&image, &replica);
    // The killed copy's checkpoint is merged away, its pin gone.
    assert_eq!(copy_checkpoints(&image).len(), 1);
    assert_eq!(pin_holders(&image).len(), 1, "{:?}", pin_holders(&image));
    server.stop();
}

#[test]
fn a_copy_whose_server_is_killed_fails_and_a_rerun_after_the_restart_finishes() {
    let dir = TempDir::new("live-copy-server-killed");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "512M");
    qemu_io(&server.uri(), &["write -P 1 0 448M"]);
    let replica = dir.join("replica.img");
    let copy = copy_under_way(&image, &replica);
    server.kill();
    let failed = copy.wait_with_output().unwrap();
    assert_eq!(failed.status.code(), Some(2), "{failed:?}");
    assert!(!dir.join("replica.img.blockwatch-replica").exists());

    let server = Server::start(dir.path(), &[&image], &[]);
    qemu_io(&server.uri(), &["write -P 2 100M 1M"]);
    let rerun = output(&mut command(
        BLOCKWATCH,
        [
            "copy",
            image.to_str().unwrap(),
            "--to",
            replica.to_str().unwrap(),
            "--json",
        ],
    ));
    assert!(rerun.status.success(), "{rerun:?}\n{}", server.logs());
    assert_files_equal(&image, &replica);
    server.stop();
}
