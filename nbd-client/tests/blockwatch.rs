//! The client against blockwatch itself: data round trips, and the
//! `qemu:dirty-bitmap:NAME` context after `blockwatch checkpoint IMAGE
//! NAME` reports exactly what the client wrote since.
//!
//! The binary comes from `cargo build -p blockwatch` in this workspace,
//! which `common::blockwatch()` runs first (a no-op when it is fresh); set
//! `BLOCKWATCH=PATH` to test another build.

mod common;

use common::{blockwatch, dirty, nbdinfo_dirty};
use nbd_client::{BASE_ALLOCATION, Client, ConnectOptions, ReplyMode, RequestFlags};
use testkit::{MIB, ServerProcess, TempDir, random_bytes, run_program};

/// blockwatch tracks changes in regions of 64 KiB.
const REGION: u64 = 64 * 1024;

fn serve(dir: &TempDir, image: &str) -> ServerProcess {
    let binary = blockwatch();
    let socket = dir.join("blockwatch.sock");
    let args = [
        "serve",
        "-f",
        "-U",
        socket.to_str().unwrap(),
        image,
        "--size",
        "64M",
    ];
    ServerProcess::start(binary, &args, &socket, &dir.join("blockwatch.log"))
}

#[test]
fn blockwatch_round_trips_and_reports_the_writes_after_a_checkpoint() {
    let dir = TempDir::new("blockwatch");
    let image = dir.join("disk.img");
    let image = image.to_str().unwrap().to_string();
    let server = serve(&dir, &image);
    let client = Client::connect(&server.uri()).unwrap();
    assert_eq!(client.info().reply_mode, ReplyMode::Extended);
    assert_eq!(client.size_bytes(), 64 * MIB);
    assert!(client.info().has_meta_context(BASE_ALLOCATION));

    let before = random_bytes(1, 3 * MIB as usize);
    client.write_at(&before, 0, RequestFlags::FUA).unwrap();
    let mut back = vec![0; before.len()];
    client.read_at(&mut back, 0).unwrap();
    assert!(back == before, "a write before the checkpoint reads back");
    client.flush().unwrap();

    run_program(blockwatch(), ["checkpoint", &image, "monday"]);
    let options = ConnectOptions {
        dirty_bitmap: Some("monday".to_string()),
        ..ConnectOptions::default()
    };
    let tracked = Client::connect_with(&server.uri(), &options).unwrap();
    let context = "qemu:dirty-bitmap:monday";
    assert_eq!(dirty(&tracked, context), vec![]);

    let small = random_bytes(2, 4096);
    tracked
        .write_at(&small, 4 * MIB, RequestFlags::NONE)
        .unwrap();
    tracked
        .write_at(&random_bytes(3, 128 * 1024), 10 * MIB, RequestFlags::NONE)
        .unwrap();
    // 1000 bytes across the 20 MiB boundary dirty a region on each side.
    tracked
        .write_at(&random_bytes(4, 1000), 20_971_000, RequestFlags::NONE)
        .unwrap();
    tracked
        .write_zeroes(30 * MIB, REGION, RequestFlags::NONE)
        .unwrap();
    tracked.trim(40 * MIB, REGION, RequestFlags::NONE).unwrap();
    let expected = vec![
        (4 * MIB, REGION),
        (10 * MIB, 2 * REGION),
        (20 * MIB - REGION, 2 * REGION),
        (30 * MIB, REGION),
        (40 * MIB, REGION),
    ];
    assert_eq!(dirty(&tracked, context), expected);
    // nbdinfo reads the same context the same way.
    assert_eq!(
        nbdinfo_dirty(&server.uri(), context),
        expected,
        "nbdinfo --map={context}"
    );

    // The other connection sees the new data too.
    let mut back = vec![0; small.len()];
    client.read_at(&mut back, 4 * MIB).unwrap();
    assert_eq!(back, small);

    // Structured replies (no extended headers) give the same answers.
    let compact = ConnectOptions {
        extended_headers: false,
        ..options
    };
    let structured = Client::connect_with(&server.uri(), &compact).unwrap();
    assert_eq!(structured.info().reply_mode, ReplyMode::Structured);
    assert_eq!(dirty(&structured, context), expected);
    structured.close().unwrap();
    tracked.close().unwrap();
    client.close().unwrap();
}
