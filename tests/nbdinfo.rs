//! What `nbdinfo` (libnbd-bin) sees of a blockwatch server: export size,
//! capability flags, block sizes, metadata contexts, read-only mode, the
//! export list with several images, and the allocation map.

mod common;

use common::Server;
use serde_json::Value;
use testkit::{MIB, TempDir, create_sparse_file, parse_json, require_tool, run_program};

const SIZE_BYTES: u64 = 64 * MIB;

fn nbdinfo_json(uri: &str) -> Value {
    parse_json(&run_program("nbdinfo", ["--json", uri]), "nbdinfo --json")
}

/// The only export of `nbdinfo --json` output.
fn single_export(info: &Value) -> &Value {
    let exports = info["exports"].as_array().expect("exports is an array");
    assert_eq!(exports.len(), 1, "one export expected: {info:#}");
    &exports[0]
}

fn assert_flag(export: &Value, name: &str, expected: bool) {
    assert_eq!(
        export[name].as_bool(),
        Some(expected),
        "{name} should be {expected} in {export:#}"
    );
}

fn contexts(export: &Value) -> Vec<&str> {
    export["contexts"]
        .as_array()
        .unwrap_or_else(|| panic!("no contexts in {export:#}"))
        .iter()
        .map(|context| context.as_str().expect("context names are strings"))
        .collect()
}

#[test]
fn json_reports_size_capabilities_block_sizes_and_base_allocation() {
    require_tool("nbdinfo", "libnbd-bin");
    let dir = TempDir::new("nbdinfo-json");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");

    let info = nbdinfo_json(&server.uri());
    assert_eq!(info["protocol"], "newstyle-fixed", "{info:#}");
    assert_eq!(info["structured"], true, "{info:#}");
    let export = single_export(&info);
    assert_eq!(export["export-name"], "", "{export:#}");
    assert_eq!(
        export["export-size"].as_u64(),
        Some(SIZE_BYTES),
        "{export:#}"
    );
    assert_flag(export, "is_read_only", false);
    assert_flag(export, "is_rotational", false);
    for flag in [
        "can_cache",
        "can_df",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
    ] {
        assert_flag(export, flag, true);
    }
    assert_eq!(export["block_size_minimum"].as_u64(), Some(1), "{export:#}");
    assert_eq!(
        export["block_size_preferred"].as_u64(),
        Some(4096),
        "{export:#}"
    );
    assert_eq!(
        export["block_size_maximum"].as_u64(),
        Some(32 * MIB),
        "{export:#}"
    );
    assert!(
        contexts(export).contains(&"base:allocation"),
        "base:allocation missing from {export:#}"
    );
    server.stop();
}

#[test]
fn json_shows_read_only_and_no_write_capabilities_with_r() {
    require_tool("nbdinfo", "libnbd-bin");
    let dir = TempDir::new("nbdinfo-ro");
    let image = dir.join("disk.img");
    create_sparse_file(&image, SIZE_BYTES);
    let server = Server::start(dir.path(), &[&image], &["-r"]);

    let info = nbdinfo_json(&server.uri());
    let export = single_export(&info);
    assert_eq!(
        export["export-size"].as_u64(),
        Some(SIZE_BYTES),
        "{export:#}"
    );
    assert_flag(export, "is_read_only", true);
    // Commands that would change the image are not advertised on a
    // read-only export; reads, caching and block status still are.
    assert_flag(export, "can_trim", false);
    assert_flag(export, "can_zero", false);
    assert_flag(export, "can_fast_zero", false);
    assert_flag(export, "can_cache", true);
    assert!(
        contexts(export).contains(&"base:allocation"),
        "base:allocation missing from {export:#}"
    );
    server.stop();
}

#[test]
fn list_shows_every_image_named_after_its_file_stem() {
    require_tool("nbdinfo", "libnbd-bin");
    let dir = TempDir::new("nbdinfo-list");
    let first = dir.join("a.img");
    let second = dir.join("b.img");
    create_sparse_file(&first, 32 * MIB);
    create_sparse_file(&second, 16 * MIB);
    let server = Server::start(dir.path(), &[&first, &second], &[]);

    let info = parse_json(
        &run_program("nbdinfo", ["--list", "--json", &server.uri()]),
        "nbdinfo --list --json",
    );
    let exports = info["exports"].as_array().expect("exports is an array");
    let listed: Vec<(&str, u64)> = exports
        .iter()
        .map(|export| {
            (
                export["export-name"].as_str().expect("export-name"),
                export["export-size"].as_u64().expect("export-size"),
            )
        })
        .collect();
    assert_eq!(listed, [("a", 32 * MIB), ("b", 16 * MIB)], "{info:#}");

    // The plain listing names both exports too.
    let text = run_program("nbdinfo", ["--list", &server.uri()]);
    assert!(
        text.contains("export=\"a\"") && text.contains("export=\"b\""),
        "nbdinfo --list does not name both exports:\n{text}"
    );

    // Each name reaches its own image; "" reaches the first.
    for (uri, size) in [
        (server.uri_for("a"), 32 * MIB),
        (server.uri_for("b"), 16 * MIB),
        (server.uri(), 32 * MIB),
    ] {
        let printed = run_program("nbdinfo", ["--size", &uri]);
        assert_eq!(printed.trim(), size.to_string(), "nbdinfo --size {uri}");
    }
    server.stop();
}

/// One line of `nbdinfo --map`: offset, length, type and description.
#[derive(Debug, PartialEq, Eq)]
struct MapEntry {
    offset: u64,
    length: u64,
    kind: u32,
    description: String,
}

fn parse_map(text: &str) -> Vec<MapEntry> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(fields.len(), 4, "unexpected nbdinfo --map line {line:?}");
            MapEntry {
                offset: fields[0].parse().expect("offset"),
                length: fields[1].parse().expect("length"),
                kind: fields[2].parse().expect("type"),
                description: fields[3].to_string(),
            }
        })
        .collect()
}

fn data(offset: u64, length: u64) -> MapEntry {
    MapEntry {
        offset,
        length,
        kind: 0,
        description: "data".to_string(),
    }
}

fn hole(offset: u64, length: u64) -> MapEntry {
    MapEntry {
        offset,
        length,
        kind: 3,
        description: "hole,zero".to_string(),
    }
}

#[test]
fn map_shows_exactly_the_written_extents_and_holes_elsewhere() {
    require_tool("nbdinfo", "libnbd-bin");
    require_tool("qemu-io", "qemu-utils");
    let dir = TempDir::new("nbdinfo-map");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");
    let uri = server.uri();

    let fresh = parse_map(&run_program("nbdinfo", ["--map", &uri]));
    assert_eq!(
        fresh,
        [hole(0, SIZE_BYTES)],
        "a fresh sparse image is one hole"
    );

    // Data at the start, in the middle (two touching writes) and at the
    // very end of the disk.
    run_program(
        "qemu-io",
        [
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -P 0x22 1M 128k",
            "-c",
            "write -P 0x33 10M 1M",
            "-c",
            "write -P 0x44 11M 1M",
            "-c",
            "write -P 0x55 63M 1M",
            &uri,
        ],
    );
    let map = parse_map(&run_program("nbdinfo", ["--map", &uri]));
    assert_eq!(
        map,
        [
            data(0, 64 * 1024),
            hole(64 * 1024, MIB - 64 * 1024),
            data(MIB, 128 * 1024),
            hole(MIB + 128 * 1024, 9 * MIB - 128 * 1024),
            data(10 * MIB, 2 * MIB),
            hole(12 * MIB, 51 * MIB),
            data(63 * MIB, MIB),
        ],
        "nbdinfo --map after writing at known offsets"
    );

    // --totals adds the data extents up.
    let totals = run_program("nbdinfo", ["--map", "--totals", &uri]);
    let data_bytes = 64 * 1024 + 128 * 1024 + 3 * MIB;
    let expected_data = format!("{data_bytes}");
    assert!(
        totals.lines().any(
            |line| line.split_whitespace().next() == Some(expected_data.as_str())
                && line.contains("data")
        ),
        "nbdinfo --map --totals should count {data_bytes} bytes of data:\n{totals}"
    );
    server.stop();
}
