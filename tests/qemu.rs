//! QEMU's NBD client (qemu-utils: `qemu-io`, `qemu-img`). QEMU 10 negotiates
//! extended headers, so these tests cover that reply format, while the
//! libnbd-based tests cover structured replies.

mod common;

use common::Server;
use serde_json::Value;
use testkit::{
    MIB, TempDir, assert_file_range, assert_files_equal, command, create_sparse_file, output,
    parse_json, qemu_io, qemu_io_command, random_bytes, require_tool, run_program, status_text,
    write_at,
};

const SIZE_BYTES: u64 = 64 * MIB;
const KIB: u64 = 1024;

fn pattern(byte: u8, length: u64) -> Vec<u8> {
    vec![byte; length as usize]
}

/// `(start, length, data, zero)` runs of `qemu-img map --output=json`,
/// with neighbours of the same kind merged.
fn qemu_img_map(uri: &str) -> Vec<(u64, u64, bool, bool)> {
    let text = run_program("qemu-img", ["map", "-f", "raw", "--output=json", uri]);
    let entries = parse_json(&text, "qemu-img map --output=json");
    let mut runs: Vec<(u64, u64, bool, bool)> = Vec::new();
    for entry in entries.as_array().expect("qemu-img map prints an array") {
        let start = entry["start"].as_u64().expect("start");
        let length = entry["length"].as_u64().expect("length");
        let data = entry["data"].as_bool().expect("data");
        let zero = entry["zero"].as_bool().expect("zero");
        match runs.last_mut() {
            Some(last) if last.2 == data && last.3 == zero && last.0 + last.1 == start => {
                last.1 += length;
            }
            _ => runs.push((start, length, data, zero)),
        }
    }
    runs
}

#[test]
fn qemu_io_patterns_read_back_and_a_wrong_pattern_fails() {
    require_tool("qemu-io", "qemu-utils");
    let dir = TempDir::new("qemu-pattern");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");
    let uri = server.uri();

    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 1M 512k",
            "write -P 0x12 5000 3000",
            "write -P 0xef 63M 1M",
        ],
    );
    qemu_io(
        &uri,
        &[
            "read -P 0xab 0 5000",
            "read -P 0x12 5000 3000",
            "read -P 0xab 8000 1040576",
            "read -P 0xcd 1M 512k",
            "read -P 0 1536k 1536k",
            "read -P 0xef 63M 1M",
        ],
    );

    // The check itself must be able to fail: a wrong pattern exits 1.
    let wrong = output(&mut qemu_io_command(&uri, &["read -P 0xac 0 1M"]));
    let stdout = String::from_utf8_lossy(&wrong.stdout);
    assert_eq!(
        wrong.status.code(),
        Some(1),
        "qemu-io read with a wrong pattern should exit 1, got {}:\n{stdout}",
        status_text(wrong.status)
    );
    assert!(
        stdout.contains("Pattern verification failed"),
        "qemu-io should report the mismatch:\n{stdout}"
    );

    server.stop();
    let mut start = pattern(0xab, MIB);
    start[5000..8000].fill(0x12);
    assert_file_range(&image, 0, &start);
    assert_file_range(&image, MIB, &pattern(0xcd, 512 * KIB));
    assert_file_range(&image, 63 * MIB, &pattern(0xef, MIB));
}

#[test]
fn qemu_io_write_zeroes_with_and_without_unmap() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("qemu-img", "qemu-utils");
    let dir = TempDir::new("qemu-zero");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");
    let uri = server.uri();

    qemu_io(&uri, &["write -P 0x55 0 8M"]);
    // Without -u qemu sends NO_HOLE; with -u the server may punch a hole.
    qemu_io(&uri, &["write -z 1M 512k", "write -z -u 4M 1M"]);
    qemu_io(
        &uri,
        &[
            "read -P 0x55 0 1M",
            "read -P 0 1M 512k",
            "read -P 0x55 1536k 2560k",
            "read -P 0 4M 1M",
            "read -P 0x55 5M 3M",
        ],
    );
    let map = qemu_img_map(&uri);
    let unmapped = map
        .iter()
        .find(|run| run.0 <= 4 * MIB && run.0 + run.1 >= 5 * MIB)
        .unwrap_or_else(|| panic!("no single run covers 4M..5M in {map:?}"));
    assert!(
        !unmapped.2 && unmapped.3,
        "write -z -u should leave 4M..5M reading as an unallocated zero run: {map:?}"
    );

    server.stop();
    assert_file_range(&image, 0, &pattern(0x55, MIB));
    assert_file_range(&image, MIB, &pattern(0, 512 * KIB));
    assert_file_range(&image, 1536 * KIB, &pattern(0x55, 2560 * KIB));
    assert_file_range(&image, 4 * MIB, &pattern(0, MIB));
    assert_file_range(&image, 5 * MIB, &pattern(0x55, 3 * MIB));
}

#[test]
fn qemu_io_fua_discard_flush_and_aio_writes() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("qemu-img", "qemu-utils");
    let dir = TempDir::new("qemu-fua");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");
    let uri = server.uri();

    qemu_io(
        &uri,
        &[
            "write -f -P 0x61 0 1M",
            "discard 256k 256k",
            "flush",
            "aio_write -P 0x62 2M 1M",
            "aio_write -P 0x63 3M 1M",
            "aio_write -f -P 0x64 6M 64k",
            "aio_flush",
        ],
    );
    qemu_io(
        &uri,
        &[
            "read -P 0x61 0 256k",
            "read -P 0x61 512k 512k",
            "read -P 0x62 2M 1M",
            "read -P 0x63 3M 1M",
            "read -P 0x64 6M 64k",
        ],
    );
    // The file backend punches a hole for a discard, so it reads as zeroes
    // and block status says so.
    qemu_io(&uri, &["read -P 0 256k 256k"]);
    let map = qemu_img_map(&uri);
    assert!(
        map.contains(&(0, 256 * KIB, true, false))
            && map.contains(&(256 * KIB, 256 * KIB, false, true))
            && map.contains(&(512 * KIB, 512 * KIB, true, false)),
        "the discarded range should be a hole between two data runs: {map:?}"
    );

    server.stop();
    assert_file_range(&image, 0, &pattern(0x61, 256 * KIB));
    assert_file_range(&image, 256 * KIB, &pattern(0, 256 * KIB));
    assert_file_range(&image, 512 * KIB, &pattern(0x61, 512 * KIB));
    assert_file_range(&image, 2 * MIB, &pattern(0x62, MIB));
    assert_file_range(&image, 3 * MIB, &pattern(0x63, MIB));
    assert_file_range(&image, 6 * MIB, &pattern(0x64, 64 * KIB));
}

#[test]
fn qemu_img_info_reports_the_virtual_size() {
    require_tool("qemu-img", "qemu-utils");
    let dir = TempDir::new("qemu-info");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");

    let text = run_program(
        "qemu-img",
        ["info", "-f", "raw", "--output=json", &server.uri()],
    );
    let info: Value = parse_json(&text, "qemu-img info --output=json");
    assert_eq!(info["virtual-size"].as_u64(), Some(SIZE_BYTES), "{info:#}");
    assert_eq!(info["format"], "raw", "{info:#}");
    server.stop();
}

#[test]
fn qemu_img_map_matches_the_written_layout() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("qemu-img", "qemu-utils");
    let dir = TempDir::new("qemu-map");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");
    let uri = server.uri();

    assert_eq!(
        qemu_img_map(&uri),
        [(0, SIZE_BYTES, false, true)],
        "a fresh sparse image maps as one zero run"
    );
    qemu_io(
        &uri,
        &[
            "write -P 0x01 0 64k",
            "write -P 0x02 2M 2M",
            "write -P 0x03 20M 1M",
            "write -P 0x04 60M 4M",
        ],
    );
    assert_eq!(
        qemu_img_map(&uri),
        [
            (0, 64 * KIB, true, false),
            (64 * KIB, 2 * MIB - 64 * KIB, false, true),
            (2 * MIB, 2 * MIB, true, false),
            (4 * MIB, 16 * MIB, false, true),
            (20 * MIB, MIB, true, false),
            (21 * MIB, 39 * MIB, false, true),
            (60 * MIB, 4 * MIB, true, false),
        ],
        "qemu-img map after writes at known offsets"
    );
    server.stop();
}

/// A 64 MiB image of random data with a 16 MiB hole in the middle.
fn random_image_with_hole(path: &std::path::Path) {
    create_sparse_file(path, SIZE_BYTES);
    write_at(path, 0, &random_bytes(21, (16 * MIB) as usize));
    write_at(path, 32 * MIB, &random_bytes(22, (32 * MIB) as usize));
}

#[test]
fn qemu_img_convert_and_compare_match_the_image() {
    require_tool("qemu-img", "qemu-utils");
    let dir = TempDir::new("qemu-convert");
    let image = dir.join("disk.img");
    random_image_with_hole(&image);
    let server = Server::start(dir.path(), &[&image], &[]);
    let uri = server.uri();

    let converted = dir.join("converted.raw");
    run_program(
        "qemu-img",
        [
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            converted.to_str().expect("UTF-8 path"),
        ],
    );
    assert_files_equal(&image, &converted);

    let image_arg = image.to_str().expect("UTF-8 path");
    let same = run_program(
        "qemu-img",
        ["compare", "-f", "raw", "-F", "raw", &uri, image_arg],
    );
    assert!(same.contains("Images are identical"), "{same}");

    // compare must notice one changed byte, at the right offset.
    let changed = dir.join("changed.raw");
    std::fs::copy(&image, &changed).expect("copy the image");
    write_at(&changed, 40 * MIB + 12345, &[0x5a]);
    let differs = output(&mut command(
        "qemu-img",
        [
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &uri,
            changed.to_str().expect("UTF-8 path"),
        ],
    ));
    let stdout = String::from_utf8_lossy(&differs.stdout);
    assert_eq!(differs.status.code(), Some(1), "qemu-img compare: {stdout}");
    // qemu-img compare names the 512-byte sector that holds the change.
    let sector_start = (40 * MIB + 12345) / 512 * 512;
    assert!(
        stdout.contains(&format!("Content mismatch at offset {sector_start}!")),
        "qemu-img compare should name the changed sector at {sector_start}: {stdout}"
    );
    server.stop();
}

#[test]
fn qemu_img_convert_with_16_parallel_requests_matches_the_image() {
    require_tool("qemu-img", "qemu-utils");
    let dir = TempDir::new("qemu-convert-m16");
    let image = dir.join("disk.img");
    random_image_with_hole(&image);
    let server = Server::start(dir.path(), &[&image], &[]);

    // -m 16 -W keeps up to 16 reads of 2 MiB queued on one connection.
    let converted = dir.join("converted.raw");
    run_program(
        "qemu-img",
        [
            "convert",
            "-m",
            "16",
            "-W",
            "-f",
            "raw",
            "-O",
            "raw",
            &server.uri(),
            converted.to_str().expect("UTF-8 path"),
        ],
    );
    assert_files_equal(&image, &converted);
    server.stop();
}
