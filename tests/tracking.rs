//! Changed-block tracking through real clients: writes made with qemu-io
//! after a checkpoint appear exactly in `blockwatch changes` and in the
//! `qemu:dirty-bitmap:NAME` context read by nbdinfo, python3-libnbd and
//! qemu-img; kill -9 under load loses nothing; damaged or foreign state is
//! reported and treated as all-changed.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;
use testkit::*;

const REGION: u64 = 64 * 1024;

fn blockwatch_json(args: &[&str]) -> serde_json::Value {
    let text = run_program(BLOCKWATCH, args);
    parse_json(&text, &format!("blockwatch {args:?}"))
}

/// The extents of `blockwatch changes --since SINCE --json`.
fn change_extents(image: &Path, since: &str) -> Vec<serde_json::Value> {
    let reply = blockwatch_json(&[
        "changes",
        image.to_str().unwrap(),
        "--since",
        since,
        "--json",
    ]);
    reply["extents"].as_array().unwrap().clone()
}

/// Regions listed by `blockwatch changes --json`.
fn changed_regions(image: &Path, since: &str) -> BTreeSet<u64> {
    change_extents(image, since)
        .iter()
        .flat_map(|e| {
            let offset = e["offset_bytes"].as_u64().unwrap();
            let length = e["length_bytes"].as_u64().unwrap();
            offset / REGION..(offset + length).div_ceil(REGION)
        })
        .collect()
}

/// The dirty extents (offset, length) nbdinfo shows in a metadata context.
fn dirty_extents(uri: &str, context: &str) -> Vec<(u64, u64)> {
    let map = format!("--map={context}");
    let text = run_program("nbdinfo", ["--json", map.as_str(), uri]);
    parse_json(&text, "nbdinfo --map --json")
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64() == Some(1))
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// Regions nbdinfo shows as dirty in `qemu:dirty-bitmap:NAME`.
fn dirty_bitmap_regions(uri: &str, name: &str) -> BTreeSet<u64> {
    dirty_extents(uri, &format!("qemu:dirty-bitmap:{name}"))
        .into_iter()
        .flat_map(|(offset, length)| offset / REGION..(offset + length).div_ceil(REGION))
        .collect()
}

#[test]
fn known_writes_appear_exactly_in_changes_and_the_dirty_bitmap() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
    let dir = TempDir::new("tracking-exact");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");
    let uri = server.uri();
    qemu_io(&uri, &["write -P 1 0 1M"]); // before the checkpoint: not reported
    run_program(
        BLOCKWATCH,
        ["checkpoint", image.to_str().unwrap(), "monday"],
    );
    assert_eq!(changed_regions(&image, "monday"), BTreeSet::new());
    qemu_io(
        &uri,
        &[
            "write -P 2 4M 4k",         // region 64
            "write -P 3 10M 128k",      // regions 160, 161
            "write -P 4 20971000 1000", // crosses 20M: regions 319 and 320
            "write -z 30M 64k",         // region 480
            "discard 40M 64k",          // region 640
        ],
    );
    let expected: BTreeSet<u64> = [64, 160, 161, 319, 320, 480, 640].into_iter().collect();
    assert_eq!(changed_regions(&image, "monday"), expected);
    assert_eq!(dirty_bitmap_regions(&uri, "monday"), expected);

    // A second checkpoint: changes since it start empty, since monday keep growing.
    run_program(
        BLOCKWATCH,
        ["checkpoint", image.to_str().unwrap(), "tuesday"],
    );
    qemu_io(&uri, &["write -P 5 50M 4k"]);
    assert_eq!(
        changed_regions(&image, "tuesday"),
        [800].into_iter().collect()
    );
    let mut both = expected.clone();
    both.insert(800);
    assert_eq!(changed_regions(&image, "monday"), both);
    let until = blockwatch_json(&[
        "changes",
        image.to_str().unwrap(),
        "--since",
        "monday",
        "--until",
        "tuesday",
        "--json",
    ]);
    // Exactly the written 4 KiB blocks: 4k, 128k, 1000 bytes across a
    // block boundary (two blocks), the zeroed 64k and the discarded 64k.
    let exact: Vec<(u64, u64)> = vec![
        (4 << 20, 4096),
        (10 << 20, 128 << 10),
        (20971000 / 4096 * 4096, 8192),
        (30 << 20, 64 << 10),
        (40 << 20, 64 << 10),
    ];
    assert_eq!(ranges(&until["extents"]), exact, "{until:#}");
    assert_eq!(
        until["changed_bytes"].as_u64(),
        Some(exact.iter().map(|&(_, length)| length).sum::<u64>())
    );
    assert!(
        until["extents"]
            .as_array()
            .is_some_and(|extents| extents.iter().all(|e| e["exact"] == true)),
        "{until:#}"
    );

    // The context is listed like QEMU's, and libnbd reads it.
    let list = run_program("nbdinfo", ["--list", uri.as_str()]);
    assert!(list.contains("qemu:dirty-bitmap:monday"), "{list}");
    assert!(list.contains("qemu:dirty-bitmap:tuesday"), "{list}");
    let script = r#"
import nbd, sys
h = nbd.NBD()
h.add_meta_context("qemu:dirty-bitmap:tuesday")
h.connect_uri(sys.argv[1])
assert h.can_meta_context("qemu:dirty-bitmap:tuesday")
dirty = []
def cb(context, offset, entries, err):
    pos = offset
    for i in range(0, len(entries), 2):
        if entries[i + 1] & 1:
            dirty.append((pos, entries[i]))
        pos += entries[i]
h.block_status(64 * 1024 * 1024, 0, cb)
print(dirty)
"#;
    let out = run_program("/usr/bin/python3", ["-c", script, uri.as_str()]);
    assert_eq!(out.trim(), format!("[({}, {})]", 800 * REGION, REGION));

    // Deleting monday merges nothing away: tuesday still reports its change.
    run_program(
        BLOCKWATCH,
        ["checkpoint", image.to_str().unwrap(), "--delete", "monday"],
    );
    assert_eq!(
        changed_regions(&image, "tuesday"),
        [800].into_iter().collect()
    );
    let status = blockwatch_json(&["status", image.to_str().unwrap(), "--json"]);
    assert_eq!(status["checkpoints"], 1);
    assert!(
        status["flush_count"].as_u64().unwrap() > 0,
        "qemu-io flushes at exit: {status}"
    );
    server.stop();

    // Offline, the same answers come from the state directory.
    assert_eq!(
        changed_regions(&image, "tuesday"),
        [800].into_iter().collect()
    );
    let quiet = output(&mut command(
        BLOCKWATCH,
        [
            "changes",
            image.to_str().unwrap(),
            "--since",
            "tuesday",
            "--quiet",
        ],
    ));
    assert_eq!(quiet.status.code(), Some(0));
    run_program(
        BLOCKWATCH,
        ["checkpoint", image.to_str().unwrap(), "wednesday"],
    );
    let quiet = output(&mut command(
        BLOCKWATCH,
        [
            "changes",
            image.to_str().unwrap(),
            "--since",
            "wednesday",
            "--quiet",
        ],
    ));
    assert_eq!(
        quiet.status.code(),
        Some(1),
        "--quiet exits 1 when nothing changed"
    );
}

#[test]
fn qemu_img_reads_the_dirty_bitmap_as_it_reads_qemus() {
    require_tool("qemu-img", "qemu-utils");
    let dir = TempDir::new("tracking-qemu-img");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "16M");
    run_program(BLOCKWATCH, ["checkpoint", image.to_str().unwrap(), "base"]);
    qemu_io(&server.uri(), &["write -P 9 1M 64k"]);
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:base",
        server.socket().display()
    );
    let text = run_program(
        "qemu-img",
        ["map", "--output=json", "--image-opts", opts.as_str()],
    );
    let map = parse_json(&text, "qemu-img map");
    // qemu-img shows dirty areas as data=false (the bitmap is read in place of allocation).
    let dirty: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(dirty, [(1 << 20, REGION)]);
    server.stop();
}

fn cycles() -> u32 {
    std::env::var("BLOCKWATCH_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// Regions whose bytes differ between two image files.
fn differing_regions(left: &Path, right: &Path) -> BTreeSet<u64> {
    let left = std::fs::read(left).unwrap();
    let right = std::fs::read(right).unwrap();
    assert_eq!(left.len(), right.len());
    left.chunks(REGION as usize)
        .zip(right.chunks(REGION as usize))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(index, _)| index as u64)
        .collect()
}

#[test]
fn kill_9_under_random_writes_loses_no_change() {
    require_tool("fio", "fio");
    let dir = TempDir::new("tracking-kill");
    let image = dir.join("disk.img");
    let copy = dir.join("checkpoint.img");
    let mut server = Server::start_with_size(dir.path(), &image, "64M");
    for cycle in 0..cycles() {
        let name = format!("cycle{cycle}");
        run_program(BLOCKWATCH, ["checkpoint", image.to_str().unwrap(), &name]);
        // The image as of the checkpoint (no writes run between the two).
        std::fs::copy(&image, &copy).unwrap();
        let uri = server.uri();
        // The load stays inside one 16 MiB window, so an exact recovery
        // reports nothing outside it (a fallback to "all" would).
        let window_start = u64::from(cycle % 4) * (16 << 20);
        let mut load = command(
            "fio",
            [
                "--name=crash",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                &format!("--offset={window_start}"),
                "--size=16M",
                "--time_based",
                "--runtime=30",
                &format!("--randseed={}", 1000 + cycle),
            ],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
        // The kill lands a while after the first write reached the image
        // (fio's start takes longer than any fixed sleep on a loaded
        // machine; a cycle that killed before it was a failure of the
        // test, not of tracking).
        wait_until(
            "the load's first write",
            std::time::Duration::from_secs(60),
            || !differing_regions(&copy, &image).is_empty(),
        );
        std::thread::sleep(std::time::Duration::from_millis(
            100 + 300 * u64::from(cycle % 10),
        ));
        server.kill();
        let _ = load.wait();
        let changed = differing_regions(&copy, &image);
        assert!(
            !changed.is_empty(),
            "cycle {cycle}: the load wrote nothing before the kill"
        );
        let reported = changed_regions(&image, &name);
        let missed: Vec<&u64> = changed.difference(&reported).collect();
        assert!(
            missed.is_empty(),
            "cycle {cycle}: regions changed but not reported: {missed:?}"
        );
        // Crash recovery is exact, not a fallback to everything.
        assert!(
            reported.len() < 1024,
            "cycle {cycle}: {} regions reported of 1024",
            reported.len()
        );
        server = Server::start(dir.path(), &[&image], &[]);
    }
    server.stop();
}

/// Damaged state must be reported and make every region count as changed.
fn assert_all_changed_after(setup: impl FnOnce(&Path, &Path), expect: &str) {
    assert_all_changed_after_stop(false, setup, expect);
}

/// The same after the server stops cleanly, or is killed (`crash`).
fn assert_all_changed_after_stop(crash: bool, setup: impl FnOnce(&Path, &Path), expect: &str) {
    let dir = TempDir::new("tracking-damage");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "8M");
    run_program(BLOCKWATCH, ["checkpoint", image.to_str().unwrap(), "base"]);
    qemu_io(&server.uri(), &["write -P 1 0 4k"]);
    if crash {
        server.kill();
    } else {
        server.stop();
    }
    let state = dir.join("disk.img.blockwatch");
    setup(&image, &state);
    let out = output(&mut command(
        BLOCKWATCH,
        [
            "changes",
            image.to_str().unwrap(),
            "--since",
            "base",
            "--json",
        ],
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(expect),
        "stderr {stderr:?} lacks {expect:?}"
    );
    let reply = parse_json(&String::from_utf8_lossy(&out.stdout), "changes");
    assert_eq!(reply["changed_bytes"].as_u64(), Some(8 << 20), "{reply}");
}

#[test]
fn corrupt_journal_is_reported_and_everything_counts_as_changed() {
    require_tool("qemu-io", "qemu-utils");
    assert_all_changed_after(
        |_, state| {
            let path = state.join("journal");
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[10] ^= 0xff; // inside the header's checksummed bytes
            std::fs::write(&path, bytes).unwrap();
        },
        "journal is damaged",
    );
}

/// Regression: after a kill -9, a flipped byte inside the journal's last
/// record (all of its bytes present) was dropped as "a torn journal tail"
/// and the write that record marked was missed. Each of the last record's
/// checksummed bytes (its header, its payload) is damage.
#[test]
fn a_flipped_byte_in_the_last_journal_record_after_a_crash_counts_everything() {
    require_tool("qemu-io", "qemu-utils");
    for (field, at) in [
        ("magic", 0),
        ("length", 8),
        ("crc", 13),
        ("sequence", 16),
        ("payload", 40),
    ] {
        assert_all_changed_after_stop(
            true,
            |_, state| {
                let path = state.join("journal");
                let mut bytes = std::fs::read(&path).unwrap();
                // The records after the 64-byte file header: a 32-byte
                // header (payload length at 8..12), payload padded to 8.
                let mut last = 64;
                let mut offset = 64;
                while offset + 32 <= bytes.len() {
                    last = offset;
                    let length =
                        u32::from_le_bytes(bytes[offset + 8..offset + 12].try_into().unwrap());
                    offset += 32 + (length as usize).next_multiple_of(8);
                }
                assert_eq!(offset, bytes.len(), "the journal ends with a whole record");
                assert!(
                    last + at < bytes.len(),
                    "{field}: the last record is shorter"
                );
                bytes[last + at] ^= 0x04;
                std::fs::write(&path, bytes).unwrap();
            },
            "journal is damaged",
        );
    }
}

#[test]
fn corrupt_catalog_is_reported_and_everything_counts_as_changed() {
    require_tool("qemu-io", "qemu-utils");
    assert_all_changed_after(
        |_, state| std::fs::write(state.join("catalog.redb"), vec![0x5a; 4096]).unwrap(),
        "catalog",
    );
}

#[test]
fn image_changed_offline_is_reported_and_everything_counts_as_changed() {
    require_tool("qemu-io", "qemu-utils");
    assert_all_changed_after(
        |image, _| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            write_at(image, 1 << 20, b"changed behind the tracker's back");
        },
        "modified while no server ran",
    );
}

#[test]
fn image_changed_after_a_crash_is_reported_and_everything_counts_as_changed() {
    require_tool("qemu-io", "qemu-utils");
    assert_all_changed_after_stop(
        true,
        |image, _| {
            write_at(image, 1 << 20, b"changed behind the tracker's back");
            // As if written a minute after the crash (no sleep in tests):
            // later than the last heartbeat plus its slack.
            let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
            std::fs::File::options()
                .write(true)
                .open(image)
                .unwrap()
                .set_modified(later)
                .unwrap();
        },
        "modified after the server stopped",
    );
}

#[test]
fn foreign_state_is_reported_and_everything_counts_as_changed() {
    require_tool("qemu-io", "qemu-utils");
    assert_all_changed_after(
        |image, _| {
            // The image is replaced by a copy: same path, another file.
            let copy = image.with_extension("copy");
            std::fs::copy(image, &copy).unwrap();
            std::fs::rename(&copy, image).unwrap();
        },
        "belongs to another file",
    );
}

/// Status of each changed extent: (offset, status).
fn change_statuses(image: &Path, since: &str) -> Vec<(u64, String)> {
    change_extents(image, since)
        .iter()
        .map(|e| {
            (
                e["offset_bytes"].as_u64().unwrap(),
                e["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn writes_become_saved_at_flush_or_with_fua() {
    let dir = TempDir::new("tracking-saved");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "16M");
    run_program(BLOCKWATCH, ["checkpoint", image.to_str().unwrap(), "base"]);
    // One libnbd connection kept open: plain write (written), FUA write
    // (saved), then a flush makes the first one saved too.
    let script = r#"
import nbd, sys, subprocess
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"a" * 4096, 0)
h.pwrite(b"b" * 4096, 1 << 20, nbd.CMD_FLAG_FUA)
print(subprocess.run(sys.argv[2:], capture_output=True, text=True, check=True).stdout, end="")
print("---")
h.flush()
print(subprocess.run(sys.argv[2:], capture_output=True, text=True, check=True).stdout, end="")
h.shutdown()
"#;
    let uri = server.uri();
    let out = run_program(
        "/usr/bin/python3",
        [
            "-c",
            script,
            uri.as_str(),
            BLOCKWATCH,
            "changes",
            image.to_str().unwrap(),
            "--since",
            "base",
        ],
    );
    let (before, after) = out.split_once("---\n").expect("two listings");
    let lines = |text: &str| -> Vec<Vec<String>> {
        text.lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect()
    };
    // Each 4 KiB write is listed as itself (exact), not as its region.
    assert_eq!(
        lines(before),
        [
            ["0", "4096", "written", "exact"],
            ["1048576", "4096", "saved", "exact"]
        ],
        "{out}"
    );
    assert_eq!(
        lines(after),
        [
            ["0", "4096", "saved", "exact"],
            ["1048576", "4096", "saved", "exact"]
        ],
        "{out}"
    );
    assert_eq!(
        change_statuses(&image, "base"),
        [(0, "saved".to_string()), (1 << 20, "saved".to_string())]
    );
    server.stop();
}

#[test]
fn sigterm_stops_the_server_even_when_its_control_socket_file_was_removed() {
    // Someone cleaning up the state directory must not leave a server that
    // can no longer be stopped: the control thread is woken without the path.
    let dir = TempDir::new("control-socket-removed");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "16M");
    let socket = dir.join("disk.img.blockwatch").join("control.sock");
    assert!(socket.exists(), "no control socket at {}", socket.display());
    std::fs::remove_file(&socket).expect("remove the control socket");
    // Another listener at the same path, as a second server would make.
    let _squatter = std::os::unix::net::UnixListener::bind(&socket).expect("bind the path");
    server.stop();
}

/// Writes 4 KiB of `byte` at each offset through python3-libnbd, then
/// flushes when `flush`.
fn pwrite_4k(uri: &str, offsets: &[u64], byte: u8, flush: bool) {
    let script = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
data = bytes([int(sys.argv[2])]) * 4096
for offset in sys.argv[4:]:
    h.pwrite(data, int(offset))
if sys.argv[3] == "1":
    h.flush()
h.shutdown()
"#;
    let mut args = vec![
        "-c".to_string(),
        script.to_string(),
        uri.to_string(),
        byte.to_string(),
        if flush { "1" } else { "0" }.to_string(),
    ];
    args.extend(offsets.iter().map(u64::to_string));
    run_program("/usr/bin/python3", &args);
}

/// Whether every 4 KiB block at `offsets` lies inside the extents.
fn all_covered(extents: &[serde_json::Value], offsets: &[u64]) -> bool {
    let ranges: Vec<(u64, u64)> = extents
        .iter()
        .map(|e| {
            (
                e["offset_bytes"].as_u64().unwrap(),
                e["length_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    offsets.iter().all(|&offset| {
        ranges
            .iter()
            .any(|&(start, length)| start <= offset && offset + 4096 <= start + length)
    })
}

#[test]
fn scattered_4k_writes_are_reported_within_a_tenth_of_the_written_bytes() {
    let dir = TempDir::new("tracking-fine");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "256M");
    run_program(BLOCKWATCH, ["checkpoint", image.to_str().unwrap(), "base"]);
    // 1000 blocks spread over the disk, each in a 64 KiB region of its own
    // or sharing one with a neighbour.
    let mut random = Xorshift::new(16);
    let mut offsets: Vec<u64> = (0..1000)
        .map(|_| random.below((256 << 20) / 4096) * 4096)
        .collect();
    offsets.sort_unstable();
    offsets.dedup();
    pwrite_4k(&server.uri(), &offsets, 9, true);
    let written_bytes = offsets.len() as u64 * 4096;
    let reply = blockwatch_json(&[
        "changes",
        image.to_str().unwrap(),
        "--since",
        "base",
        "--json",
    ]);
    let changed_bytes = reply["changed_bytes"].as_u64().unwrap();
    let extents = reply["extents"].as_array().unwrap();
    assert!(all_covered(extents, &offsets), "a written block is missing");
    assert!(
        changed_bytes * 10 <= written_bytes * 11,
        "{changed_bytes} bytes reported for {written_bytes} written (want <= 1.1x)"
    );
    assert!(extents.iter().all(|e| e["exact"] == true), "{reply:#}");
    assert_eq!(reply["precision_bytes"], 4096);
    let regions: BTreeSet<u64> = offsets.iter().map(|offset| offset / REGION).collect();
    eprintln!(
        "{written_bytes} bytes written in {} blocks: {changed_bytes} reported ({:.3}x); whole regions would be {} ({:.1}x)",
        offsets.len(),
        changed_bytes as f64 / written_bytes as f64,
        regions.len() as u64 * REGION,
        (regions.len() as u64 * REGION) as f64 / written_bytes as f64
    );
    // The dirty bitmap stays at region granularity, as QEMU's readers expect.
    assert_eq!(dirty_bitmap_regions(&server.uri(), "base"), regions);
    // The exact context names the written blocks themselves.
    let dirty_blocks: Vec<u64> = dirty_extents(&server.uri(), "blockwatch:exact-dirty-bitmap:base")
        .into_iter()
        .flat_map(|(offset, length)| offset / 4096..(offset + length) / 4096)
        .map(|block| block * 4096)
        .collect();
    assert_eq!(dirty_blocks, offsets, "blockwatch:exact-dirty-bitmap:base");
    let list = run_program("nbdinfo", ["--list", server.uri().as_str()]);
    assert!(
        list.contains("blockwatch:exact-dirty-bitmap:base"),
        "{list}"
    );
    server.stop();
}

#[test]
fn after_kill_9_the_regions_whose_fine_record_was_lost_count_whole() {
    let dir = TempDir::new("tracking-fine-crash");
    let image = dir.join("disk.img");
    let image_arg = image.to_str().unwrap();
    let changes = |since: &str| -> serde_json::Value {
        blockwatch_json(&["changes", image_arg, "--since", since, "--json"])
    };
    let server = Server::start_with_size(dir.path(), &image, "64M");
    run_program(BLOCKWATCH, ["checkpoint", image_arg, "base"]);
    let flushed = [0, 5 * REGION + 8192, 40 * REGION];
    pwrite_4k(&server.uri(), &flushed, 1, true);
    server.stop();

    // A clean stop keeps the fine record: exact after the restart, and
    // offline too.
    let offline = changes("base");
    assert_eq!(offline["changed_bytes"], 3 * 4096, "{offline:#}");
    let server = Server::start(dir.path(), &[&image], &[]);
    assert_eq!(changes("base")["changed_bytes"], 3 * 4096);

    // Unflushed writes, some in regions already written, then kill -9.
    let unflushed = [4096, 5 * REGION, 90 * REGION + 4096];
    pwrite_4k(&server.uri(), &unflushed, 2, false);
    server.kill();
    let server = Server::start(dir.path(), &[&image], &[]);
    let reply = changes("base");
    let extents = reply["extents"].as_array().unwrap();
    let all: Vec<u64> = flushed.iter().chain(&unflushed).copied().collect();
    assert!(all_covered(extents, &all), "a write is missing:\n{reply:#}");
    let whole: BTreeSet<u64> = extents
        .iter()
        .map(|e| {
            assert_eq!(e["exact"], false, "{reply:#}");
            assert_eq!(e["length_bytes"].as_u64().unwrap() % REGION, 0, "{reply:#}");
            e["offset_bytes"].as_u64().unwrap() / REGION
        })
        .collect();
    assert_eq!(whole, [0, 5, 40, 90].into_iter().collect(), "{reply:#}");

    // A region first written after the restart is exact again.
    pwrite_4k(&server.uri(), &[60 * REGION + 12288], 3, true);
    let reply = changes("base");
    let fresh: Vec<&serde_json::Value> = reply["extents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["offset_bytes"].as_u64().unwrap() / REGION == 60)
        .collect();
    assert_eq!(fresh.len(), 1, "{reply:#}");
    assert_eq!(fresh[0]["exact"], true);
    assert_eq!(fresh[0]["offset_bytes"], 60 * REGION + 12288);
    assert_eq!(fresh[0]["length_bytes"], 4096);
    // The next generation starts exact.
    run_program(BLOCKWATCH, ["checkpoint", image_arg, "after"]);
    pwrite_4k(&server.uri(), &[5 * REGION + 8192], 4, true);
    let reply = changes("after");
    assert_eq!(
        ranges(&reply["extents"]),
        [(5 * REGION + 8192, 4096)],
        "{reply:#}"
    );
    server.stop();
}
