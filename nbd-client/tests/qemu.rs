//! The client against qemu-nbd serving a qcow2 image with a persistent
//! dirty bitmap: `qemu:dirty-bitmap:NAME` reports exactly the regions
//! written after the bitmap was added, `base:allocation` agrees with
//! `nbdinfo --map`, sparse READ replies (holes) fill the caller's buffer
//! with zeroes, a missing bitmap is a clear error at connect, and a
//! writable export takes writes (split past qemu's 32 MiB maximum), zeroes
//! and trims. Both with extended headers (qemu 10 offers them) and with
//! structured replies.

mod common;

use common::{dirty, map, nbdinfo_extents};
use nbd_client::{
    BASE_ALLOCATION, Client, CommandFailure, ConnectError, ConnectOptions, HandshakeError,
    NbdError, ReplyMode, RequestFlags,
};
use testkit::{MIB, ServerProcess, TempDir, random_bytes, require_tool, run_program};

const BITMAP: &str = "b1";
const GRANULARITY: u64 = 64 * 1024;

/// A qcow2 image whose first MiB was written before the bitmap existed,
/// then these writes after (qemu-io commands and the dirty regions they
/// leave at the bitmap's 64 KiB granularity).
const WRITES: [(&str, u64, u64); 5] = [
    ("write -P 0xab 4M 64k", 4 * MIB, GRANULARITY),
    ("write -P 0xcd 10M 100k", 10 * MIB, 2 * GRANULARITY),
    // 1000 bytes across the 20 MiB boundary dirty the granules on both sides.
    (
        "write -P 0xef 20971000 1000",
        20 * MIB - GRANULARITY,
        2 * GRANULARITY,
    ),
    ("write -z 30M 64k", 30 * MIB, GRANULARITY),
    ("discard 40M 64k", 40 * MIB, GRANULARITY),
];

fn image_with_bitmap(dir: &TempDir) -> String {
    require_tool("qemu-img", "qemu-utils");
    require_tool("qemu-io", "qemu-utils");
    let image = dir.join("disk.qcow2");
    let image = image.to_str().unwrap().to_string();
    run_program("qemu-img", ["create", "-q", "-f", "qcow2", &image, "64M"]);
    run_program(
        "qemu-io",
        ["-f", "qcow2", "-c", "write -P 0x11 0 1M", &image],
    );
    run_program("qemu-img", ["bitmap", "--add", &image, BITMAP]);
    let mut args = vec!["-f", "qcow2"];
    for (command, _, _) in WRITES {
        args.extend(["-c", command]);
    }
    args.push(&image);
    run_program("qemu-io", args);
    image
}

fn qemu_nbd(dir: &TempDir, image: &str) -> ServerProcess {
    require_tool("qemu-nbd", "qemu-utils");
    let socket = dir.join("qemu.sock");
    let socket_text = socket.to_str().unwrap();
    // Read-only, persistent, several clients at once, the bitmap exported.
    let args = [
        "-r",
        "-t",
        "-e",
        "8",
        "-B",
        BITMAP,
        "-k",
        socket_text,
        "-f",
        "qcow2",
        image,
    ];
    ServerProcess::start("qemu-nbd", &args, &socket, &dir.join("qemu-nbd.log"))
}

fn options(extended_headers: bool) -> ConnectOptions {
    ConnectOptions {
        dirty_bitmap: Some(BITMAP.to_string()),
        extended_headers,
        ..ConnectOptions::default()
    }
}

#[test]
fn dirty_bitmap_reports_exactly_the_written_regions_and_allocation_matches_nbdinfo() {
    let dir = TempDir::new("qemu-bitmap");
    let image = image_with_bitmap(&dir);
    let server = qemu_nbd(&dir, &image);
    let context = format!("qemu:dirty-bitmap:{BITMAP}");
    let nbdinfo_allocation = nbdinfo_extents(&server.uri(), BASE_ALLOCATION);
    for (extended, mode) in [(true, ReplyMode::Extended), (false, ReplyMode::Structured)] {
        let client = Client::connect_with(&server.uri(), &options(extended)).unwrap();
        assert_eq!(client.info().reply_mode, mode);
        assert!(client.info().is_read_only());
        let expected: Vec<(u64, u64)> = WRITES.iter().map(|&(_, o, l)| (o, l)).collect();
        assert_eq!(
            dirty(&client, &context),
            expected,
            "{mode:?}: dirty regions"
        );
        assert_eq!(
            map(&client, BASE_ALLOCATION),
            nbdinfo_allocation,
            "{mode:?}"
        );
        client.close().unwrap();
    }
}

#[test]
fn reads_return_the_data_and_holes_come_back_as_zeroes() {
    let dir = TempDir::new("qemu-read");
    let image = image_with_bitmap(&dir);
    let server = qemu_nbd(&dir, &image);
    for extended in [true, false] {
        let client = Client::connect_with(&server.uri(), &options(extended)).unwrap();
        let mut first = vec![0; MIB as usize];
        client.read_at(&mut first, 0).unwrap();
        assert!(first.iter().all(|&b| b == 0x11));
        // Data then a hole in one request, into a buffer full of garbage:
        // the hole must be written over, not skipped.
        let pending = client.submit_read(4 * MIB, vec![0xee; 4 * GRANULARITY as usize]);
        let data = pending.unwrap().wait().unwrap();
        let (written, rest) = data.split_at(GRANULARITY as usize);
        assert!(written.iter().all(|&b| b == 0xab), "extended={extended}");
        assert!(
            rest.iter().all(|&b| b == 0),
            "extended={extended}: the hole reads as zeroes"
        );
        let unaligned = client.submit_read(20971000 - 24, vec![0xee; 1048]);
        let data = unaligned.unwrap().wait().unwrap();
        // 24 bytes before the 1000 written, the 1000, and 24 after.
        assert!(data[..24].iter().all(|&b| b == 0));
        assert!(data[24..1024].iter().all(|&b| b == 0xef));
        assert!(data[1024..].iter().all(|&b| b == 0));

        // A read-only export: writes are refused before they are sent.
        let error = client
            .write_at(&[0; 512], 0, RequestFlags::NONE)
            .unwrap_err();
        assert!(matches!(error.failure, CommandFailure::ReadOnly), "{error}");
        client.close().unwrap();
    }
}

#[test]
fn a_missing_dirty_bitmap_is_refused_at_connect_naming_the_ones_there_are() {
    let dir = TempDir::new("qemu-missing");
    let image = image_with_bitmap(&dir);
    let server = qemu_nbd(&dir, &image);
    let options = ConnectOptions {
        dirty_bitmap: Some("nosuch".to_string()),
        ..ConnectOptions::default()
    };
    let error = Client::connect_with(&server.uri(), &options).unwrap_err();
    let ConnectError::Handshake {
        source: HandshakeError::MissingContext {
            context, available, ..
        },
        ..
    } = &error
    else {
        panic!("want MissingContext, got {error}");
    };
    assert_eq!(context, "qemu:dirty-bitmap:nosuch");
    assert_eq!(available, &vec![format!("qemu:dirty-bitmap:{BITMAP}")]);
    assert!(
        error.to_string().contains("qemu:dirty-bitmap:b1"),
        "{error}"
    );
    // The soft disconnect left the server serving.
    Client::connect(&server.uri()).unwrap().close().unwrap();
}

#[test]
fn writes_zeroes_and_trims_go_through_in_both_reply_modes() {
    let dir = TempDir::new("qemu-write");
    require_tool("qemu-img", "qemu-utils");
    require_tool("qemu-nbd", "qemu-utils");
    let image = dir.join("disk.qcow2");
    let image = image.to_str().unwrap().to_string();
    run_program("qemu-img", ["create", "-q", "-f", "qcow2", &image, "64M"]);
    let socket = dir.join("qemu.sock");
    let args = [
        "-t",
        "-e",
        "8",
        "--discard=unmap",
        "-k",
        socket.to_str().unwrap(),
        "-f",
        "qcow2",
        &image,
    ];
    let server = ServerProcess::start("qemu-nbd", &args, &socket, &dir.join("qemu-nbd.log"));
    for (seed, extended) in [(1, true), (2, false)] {
        let options = ConnectOptions {
            extended_headers: extended,
            ..ConnectOptions::default()
        };
        let client = Client::connect_with(&server.uri(), &options).unwrap();
        assert_eq!(client.info().reply_mode == ReplyMode::Extended, extended);
        assert!(client.info().can_trim() && client.info().can_write_zeroes());
        let mut model = vec![0u8; 64 * MIB as usize];
        // 40 MiB: more than qemu's 32 MiB maximum, so split in two.
        let big = random_bytes(seed, 40 * MIB as usize);
        client.write_at(&big, 4096, RequestFlags::NONE).unwrap();
        model[4096..4096 + big.len()].copy_from_slice(&big);
        let small = random_bytes(seed + 10, 70_000);
        client
            .write_at(&small, 50 * MIB, RequestFlags::FUA)
            .unwrap();
        model[50 * MIB as usize..50 * MIB as usize + small.len()].copy_from_slice(&small);
        client
            .write_zeroes(MIB, MIB, RequestFlags::NO_HOLE)
            .unwrap();
        model[MIB as usize..2 * MIB as usize].fill(0);
        // FAST_ZERO may be refused with ENOTSUP; if it is done, it is zero.
        match client.write_zeroes(3 * MIB, MIB, RequestFlags::FAST_ZERO) {
            Ok(()) => model[3 * MIB as usize..4 * MIB as usize].fill(0),
            Err(error) => assert!(
                matches!(
                    error.failure,
                    CommandFailure::Server {
                        error: NbdError::NotSup,
                        ..
                    }
                ),
                "{error}"
            ),
        }
        client.flush().unwrap();
        // After TRIM the contents are undefined: compare around it.
        client.trim(30 * MIB, 2 * MIB, RequestFlags::NONE).unwrap();
        let mut disk = vec![0xee; 64 * MIB as usize];
        client.read_at(&mut disk, 0).unwrap();
        let trimmed = 30 * MIB as usize..32 * MIB as usize;
        assert!(
            disk[..trimmed.start] == model[..trimmed.start],
            "extended={extended}"
        );
        assert!(
            disk[trimmed.end..] == model[trimmed.end..],
            "extended={extended}"
        );
        client.close().unwrap();
    }
}
