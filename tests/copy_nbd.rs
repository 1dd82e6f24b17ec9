//! Copies to NBD targets (nbdkit's memory plugin, qemu-nbd on a raw file,
//! another blockwatch), full then incremental, each compared byte for byte
//! with the image; the refusals that keep an export's data safe; and a copy
//! interrupted by ENOSPC that a rerun finishes without redoing what it
//! had copied.

mod common;

use std::path::Path;

use common::*;
use testkit::*;

const MIB: u64 = 1 << 20;

fn copy_json(image: &Path, target: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["copy", image.to_str().unwrap(), "--to", target, "--json"];
    args.extend_from_slice(extra);
    let out = output(&mut command(BLOCKWATCH, &args));
    assert!(
        out.status.success(),
        "blockwatch {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_json(&String::from_utf8_lossy(&out.stdout), "copy --json")
}

/// The export at `uri` read out into `file` by nbdcopy.
fn read_out(uri: &str, file: &Path) {
    run_program("nbdcopy", [uri, file.to_str().unwrap()]);
}

/// A full copy then two incrementals of a live disk to `target_uri`, each
/// compared with the image (the disk is idle while compared).
fn chain_to(dir: &Path, target_uri: &str) {
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir, &image, "64M");
    qemu_io(&server.uri(), &["write -P 1 0 4M", "write -P 2 40M 1M"]);
    let full = copy_json(&image, target_uri, &[]);
    assert_eq!(full["kind"], "full", "{full:#}");
    assert!(full["hole_bytes"].as_u64().unwrap() > 32 * MIB, "{full:#}");
    let out = dir.join("out.img");
    read_out(target_uri, &out);
    assert_files_equal(&image, &out);
    for (round, commands) in [
        ["write -P 3 8M 64k", "discard 40M 512k"],
        ["write -P 4 1M 4k", "write -P 5 63M 1M"],
    ]
    .iter()
    .enumerate()
    {
        qemu_io(&server.uri(), commands);
        let summary = copy_json(&image, target_uri, &[]);
        assert_eq!(summary["kind"], "incremental", "round {round}: {summary:#}");
        assert!(
            summary["planned_bytes"].as_u64().unwrap() <= 2 * MIB,
            "{summary:#}"
        );
        read_out(target_uri, &out);
        assert_files_equal(&image, &out);
    }
    // verify reads the export back, through a snapshot of the served disk.
    let verify = |expect: i32| {
        let out = output(&mut command(
            BLOCKWATCH,
            ["verify", image.to_str().unwrap(), target_uri],
        ));
        assert_eq!(out.status.code(), Some(expect), "{out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    verify(0);
    // Damage behind our back, in a region nobody wrote since the copy.
    qemu_io(target_uri, &["write -P 9 20M 4k"]);
    let said = verify(1);
    assert!(said.contains(&format!("differs {} ", 20 * MIB)), "{said}");
    qemu_io(target_uri, &["write -z 20M 4k"]);
    verify(0);
    server.stop();
}

#[test]
fn copies_to_nbdkit_memory_are_incremental_and_exact() {
    require_tool("nbdkit", "nbdkit");
    let dir = TempDir::new("copy-nbdkit");
    let socket = dir.join("nbdkit.sock");
    let _nbdkit = ServerProcess::start(
        "nbdkit",
        &["-f", "-U", socket.to_str().unwrap(), "memory", "64M"],
        &socket,
        &dir.join("nbdkit.log"),
    );
    chain_to(
        dir.path(),
        &format!("nbd+unix:///?socket={}", socket.display()),
    );
}

#[test]
fn copies_to_qemu_nbd_land_in_its_file() {
    require_tool("qemu-nbd", "qemu-utils");
    let dir = TempDir::new("copy-qemu-nbd");
    let target = dir.join("target.img");
    create_sparse_file(&target, 64 * MIB);
    let socket = dir.join("qemu.sock");
    let qemu = ServerProcess::start(
        "qemu-nbd",
        &[
            "-t",
            "-f",
            "raw",
            "--cache=writeback",
            "-k",
            socket.to_str().unwrap(),
            target.to_str().unwrap(),
        ],
        &socket,
        &dir.join("qemu.log"),
    );
    chain_to(
        dir.path(),
        &format!("nbd+unix:///?socket={}", socket.display()),
    );
    drop(qemu);
    assert_files_equal(&dir.join("disk.img"), &target);
}

#[test]
fn an_export_holding_data_is_refused_unless_full_and_a_foreign_one_too() {
    require_tool("nbdkit", "nbdkit");
    let dir = TempDir::new("copy-nbd-refusals");
    let socket = dir.join("nbdkit.sock");
    let _nbdkit = ServerProcess::start(
        "nbdkit",
        &["-f", "-U", socket.to_str().unwrap(), "memory", "32M"],
        &socket,
        &dir.join("nbdkit.log"),
    );
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    qemu_io(&uri, &["write -P 7 1M 64k"]);
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "32M");
    qemu_io(&server.uri(), &["write -P 1 0 1M"]);
    let refused = output(&mut command(
        BLOCKWATCH,
        ["copy", image.to_str().unwrap(), "--to", uri.as_str()],
    ));
    assert_eq!(refused.status.code(), Some(2));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("may hold someone's data"), "{said}");
    let full = copy_json(&image, &uri, &["--full"]);
    assert_eq!(full["kind"], "full");

    // Another disk's copy there is refused: its record says whose it is.
    let other = dir.join("other.img");
    let other_server = Server::start_with_size(dir.path(), &other, "32M");
    let foreign = output(&mut command(
        BLOCKWATCH,
        ["copy", other.to_str().unwrap(), "--to", uri.as_str()],
    ));
    // The other disk has no record of this export: it sees data there.
    assert_eq!(foreign.status.code(), Some(2), "{foreign:?}");
    // A wrong size is refused before anything is written.
    let big = dir.join("big.img");
    let big_server = Server::start_with_size(dir.path(), &big, "48M");
    let sized = output(&mut command(
        BLOCKWATCH,
        [
            "copy",
            big.to_str().unwrap(),
            "--to",
            uri.as_str(),
            "--full",
        ],
    ));
    assert_eq!(sized.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&sized.stderr).contains("bytes"));
    // Nothing of the refused copy is pinned for a resume.
    let listing = parse_json(
        &run_program(BLOCKWATCH, ["checkpoints", big.to_str().unwrap(), "--json"]),
        "checkpoints",
    );
    for checkpoint in listing.as_array().unwrap() {
        assert_eq!(checkpoint["pins"], serde_json::json!([]), "{listing:#}");
    }
    let out = dir.join("out.img");
    read_out(&uri, &out);
    assert_files_equal(&image, &out);
    server.stop();
    other_server.stop();
    big_server.stop();
}

#[test]
fn a_copy_cut_short_by_enospc_resumes_without_redoing_what_it_copied() {
    if skipped_unless_root("mount -t tmpfs") {
        return;
    }
    let dir = TempDir::new("copy-resume");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");
    qemu_io(&server.uri(), &["write -P 1 0 1M"]);
    server.stop();
    let small = Tmpfs::mount(dir.path(), "small", "7M");
    let replica = small.join("r.img");
    let replica_arg = replica.to_str().unwrap();
    copy_json(&image, replica_arg, &[]);
    let record = std::fs::read(small.join("r.img.blockwatch-replica")).unwrap();

    // 12 MiB changed; the first two 4 MiB pieces fit, the third does not.
    let server = Server::start(dir.path(), &[&image], &[]);
    qemu_io(&server.uri(), &["write -P 2 8M 12M"]);
    server.stop();
    let cut = output(&mut command(
        BLOCKWATCH,
        [
            "copy",
            image.to_str().unwrap(),
            "--to",
            replica_arg,
            "--workers",
            "1",
        ],
    ));
    assert_eq!(cut.status.code(), Some(2), "{cut:?}");
    assert!(String::from_utf8_lossy(&cut.stderr).contains("No space left"));
    assert_eq!(
        std::fs::read(small.join("r.img.blockwatch-replica")).unwrap(),
        record,
        "a failed copy must not advance the replica's record"
    );
    assert!(small.join("r.img.blockwatch-replica.partial").exists());

    small.resize("64M");
    let rerun = copy_json(&image, replica_arg, &[]);
    assert_eq!(rerun["kind"], "incremental", "{rerun:#}");
    assert!(rerun["resumed_from"].is_string(), "{rerun:#}");
    let data = rerun["data_bytes"].as_u64().unwrap();
    assert!(
        (4 * MIB..=8 * MIB).contains(&data),
        "the rerun copies what the cut copy had not: {rerun:#}"
    );
    assert_files_equal(&image, &replica);
    assert!(!small.join("r.img.blockwatch-replica.partial").exists());
    // Nothing of the interrupted copy is left pinned.
    let listing = parse_json(
        &run_program(
            BLOCKWATCH,
            ["checkpoints", image.to_str().unwrap(), "--json"],
        ),
        "checkpoints",
    );
    assert_eq!(listing.as_array().unwrap().len(), 1, "{listing:#}");
    let verified = output(&mut command(
        BLOCKWATCH,
        ["verify", image.to_str().unwrap(), replica_arg],
    ));
    assert_eq!(verified.status.code(), Some(0), "{verified:?}");
}
