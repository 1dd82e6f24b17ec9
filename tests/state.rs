//! The state directory as users and scripts meet it: offline queries
//! change nothing in it, pins keep checkpoints from being deleted across
//! restarts, and `checkpoints` and `status` print what a newcomer can read.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use testkit::*;

/// Every file of `dir` with its size, modification time and contents'
/// crc, so that any write to the state directory shows.
fn snapshot(dir: &Path) -> BTreeMap<String, (u64, i128, u32)> {
    use std::os::unix::fs::MetadataExt;
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let metadata = entry.metadata().unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if metadata.is_dir() {
            for (inner, value) in snapshot(&entry.path()) {
                files.insert(format!("{name}/{inner}"), value);
            }
            continue;
        }
        let mtime =
            i128::from(metadata.mtime()) * 1_000_000_000 + i128::from(metadata.mtime_nsec());
        let crc = if metadata.file_type().is_file() {
            crc32(&std::fs::read(entry.path()).unwrap())
        } else {
            0
        };
        files.insert(name, (metadata.len(), mtime, crc));
    }
    files
}

/// A plain CRC-32 (IEEE), enough to see that bytes changed.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

fn json(args: &[&str]) -> serde_json::Value {
    let text = run_program(BLOCKWATCH, args);
    parse_json(&text, &format!("blockwatch {args:?}"))
}

#[test]
fn offline_queries_after_a_clean_stop_change_nothing_and_the_next_start_trusts_its_state() {
    require_tool("qemu-io", "qemu-utils");
    let dir = TempDir::new("state-offline");
    let image = dir.join("disk.img");
    let image_arg = image.to_str().unwrap();
    let server = Server::start_with_size(dir.path(), &image, "8M");
    run_program(BLOCKWATCH, ["checkpoint", image_arg, "base"]);
    qemu_io(&server.uri(), &["write -P 7 1M 64k", "flush"]);
    server.stop();

    let state = dir.join("disk.img.blockwatch");
    let before = snapshot(&state);
    let queries: [&[&str]; 6] = [
        &["status", image_arg],
        &["status", image_arg, "--json"],
        &["checkpoints", image_arg],
        &["checkpoints", image_arg, "--json"],
        &["changes", image_arg, "--since", "base", "--json"],
        &["changes", image_arg, "--since", "base", "--files", "--json"],
    ];
    for query in queries {
        let out = output(&mut command(BLOCKWATCH, query));
        assert!(
            out.status.success(),
            "blockwatch {query:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            snapshot(&state),
            before,
            "blockwatch {query:?} with no server running changed the state directory"
        );
    }
    let status = json(&["status", image_arg, "--json"]);
    assert_eq!(status["offline"], true, "{status:#}");
    assert_eq!(status["last_shutdown"], "clean", "{status:#}");

    let server = Server::start(dir.path(), &[&image], &[]);
    let status = json(&["status", image_arg, "--json"]);
    assert_eq!(status["last_shutdown"], "clean", "{status:#}");
    assert_eq!(status["offline"], false, "{status:#}");
    assert_eq!(status["warnings"], serde_json::json!([]), "{status:#}");
    let changes = json(&["changes", image_arg, "--since", "base", "--json"]);
    assert_eq!(
        changes["changed_bytes"], 65536,
        "a trusted start reports exactly the one written region:\n{changes:#}"
    );
    server.stop();
}

#[test]
fn a_pinned_checkpoint_cannot_be_deleted_and_the_pin_outlives_a_restart() {
    let dir = TempDir::new("state-pins");
    let image = dir.join("disk.img");
    let image_arg = image.to_str().unwrap();
    let server = Server::start_with_size(dir.path(), &image, "8M");
    run_program(BLOCKWATCH, ["checkpoint", image_arg, "monday"]);
    run_program(BLOCKWATCH, ["checkpoint", image_arg, "tuesday"]);
    let pinned = run_program(
        BLOCKWATCH,
        [
            "pin",
            image_arg,
            "monday",
            "nightly",
            "--reason",
            "the nightly copy holds it",
        ],
    );
    assert!(pinned.contains("monday pinned by nightly"), "{pinned}");

    let refused = |why: &str| {
        let out = output(&mut command(
            BLOCKWATCH,
            ["checkpoint", image_arg, "--delete", "monday"],
        ));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{why}: {stderr}");
        assert!(
            stderr.contains("pinned by \"nightly\" (the nightly copy holds it)"),
            "{why}: the refusal names the pin: {stderr}"
        );
    };
    refused("with the server running");
    let listing = json(&["checkpoints", image_arg, "--json"]);
    assert_eq!(listing[0]["name"], "monday");
    assert_eq!(listing[0]["pins"][0]["holder"], "nightly", "{listing:#}");
    assert_eq!(listing[0]["pins"][0]["reason"], "the nightly copy holds it");
    assert_eq!(listing[1]["pins"], serde_json::json!([]), "{listing:#}");

    server.stop();
    refused("with no server running");
    let server = Server::start(dir.path(), &[&image], &[]);
    refused("after a restart");
    let table = run_program(BLOCKWATCH, ["checkpoints", image_arg]);
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|line| line.starts_with("monday")
                && line.ends_with("nightly (the nightly copy holds it)")),
        "{table}"
    );

    // The wrong holder is not a pin; the right one releases it.
    let out = output(&mut command(
        BLOCKWATCH,
        ["unpin", image_arg, "monday", "weekly"],
    ));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pin held by \"weekly\""));
    run_program(BLOCKWATCH, ["unpin", image_arg, "monday", "nightly"]);
    run_program(BLOCKWATCH, ["checkpoint", image_arg, "--delete", "monday"]);
    let listing = json(&["checkpoints", image_arg, "--json"]);
    assert_eq!(listing.as_array().map(Vec::len), Some(1), "{listing:#}");
    // Pinning a checkpoint that does not exist is refused.
    let out = output(&mut command(
        BLOCKWATCH,
        ["pin", image_arg, "monday", "nightly"],
    ));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no checkpoint named \"monday\""));
    server.stop();
}

#[test]
fn checkpoints_prints_aligned_columns_with_local_iso_times() {
    let dir = TempDir::new("state-columns");
    let image = dir.join("disk.img");
    let image_arg = image.to_str().unwrap();
    let server = Server::start_with_size(dir.path(), &image, "8M");
    for name in ["a", "a-much-longer-checkpoint-name-than-usual"] {
        run_program(BLOCKWATCH, ["checkpoint", image_arg, name]);
    }
    let table = run_program(BLOCKWATCH, ["checkpoints", image_arg]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    // Each column starts where its header starts (text) or ends where it
    // ends (numbers).
    let header = lines[0];
    let created = header.find("CREATED").expect("a CREATED column");
    let generation_end = header.find("GENERATION").unwrap() + "GENERATION".len();
    for line in &lines[1..] {
        let time = &line[created..created + 25];
        let iso = time.len() == 25
            && time.as_bytes()[4] == b'-'
            && time.as_bytes()[10] == b'T'
            && time.as_bytes()[13] == b':'
            && matches!(time.as_bytes()[19], b'+' | b'-')
            && time.as_bytes()[22] == b':';
        assert!(
            iso,
            "not an ISO-8601 local time under CREATED: {time:?}\n{table}"
        );
        assert!(
            line[..generation_end].ends_with(|c: char| c.is_ascii_digit()),
            "generation not right-aligned under its header:\n{table}"
        );
    }
    let listing = json(&["checkpoints", image_arg, "--json"]);
    assert!(listing[0]["created_unix_seconds"].is_u64(), "{listing:#}");
    server.stop();
}

#[test]
fn status_text_is_key_value_lines_without_json() {
    let dir = TempDir::new("state-status");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "8M");
    let text = run_program(BLOCKWATCH, ["status", image.to_str().unwrap()]);
    for line in text.lines() {
        let (key, value) = line.split_once(": ").unwrap_or_else(|| panic!("{line:?}"));
        assert!(
            !key.trim().is_empty() && !value.trim().is_empty(),
            "{line:?}"
        );
        assert!(
            !line.contains('{') && !line.contains('['),
            "embedded JSON: {line:?}"
        );
    }
    for key in ["generation:", "granularity:", "file map:", "last shutdown:"] {
        assert!(
            text.lines().any(|line| line.starts_with(key)),
            "no {key} in\n{text}"
        );
    }
    server.stop();
}

#[test]
fn deleting_the_newest_checkpoint_keeps_the_next_start_trusting_its_state() {
    // The generation after the newest checkpoint left is one lower than the
    // journal's; the start must not take that for a newer journal and count
    // every region as changed.
    let dir = TempDir::new("state-delete-newest");
    let image = dir.join("disk.img");
    let image_arg = image.to_str().unwrap();
    let server = Server::start_with_size(dir.path(), &image, "8M");
    run_program(BLOCKWATCH, ["checkpoint", image_arg, "base"]);
    qemu_io(&server.uri(), &["write -P 1 0 4k"]);
    run_program(BLOCKWATCH, ["checkpoint", image_arg, "newest"]);
    qemu_io(&server.uri(), &["write -P 2 1M 4k"]);
    run_program(BLOCKWATCH, ["checkpoint", image_arg, "--delete", "newest"]);
    server.stop();
    for round in 0..2 {
        let status = json(&["status", image_arg, "--json"]);
        assert_eq!(
            status["warnings"],
            serde_json::json!([]),
            "round {round}: {status:#}"
        );
        let changes = json(&["changes", image_arg, "--since", "base", "--json"]);
        assert_eq!(
            changes["changed_bytes"], 8192,
            "round {round}: both writes, exactly:\n{changes:#}"
        );
        // A served restart trusts it too, and a checkpoint after it works.
        let server = Server::start(dir.path(), &[&image], &[]);
        assert!(!server.logs().contains("every region"), "{}", server.logs());
        server.stop();
    }
}
