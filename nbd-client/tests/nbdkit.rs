//! The client against nbdkit (memory and file plugins, with filters that
//! change the protocol: no structured replies, block size constraints,
//! injected errors): data round trips, zeroing, trimming, flushing, block
//! status against `nbdinfo --map`, and many requests in flight from
//! several threads checked against a model of the disk.

mod common;

use std::collections::HashSet;

use common::{map, nbdinfo_extents, nbdkit};
use nbd_client::{
    BASE_ALLOCATION, Client, CommandFailure, ConnectOptions, NbdError, Pending, ReplyMode,
    RequestFlags,
};
use testkit::{MIB, TempDir, Xorshift, random_bytes};

fn read(client: &Client, offset: u64, length: usize) -> Vec<u8> {
    let mut buf = vec![0xee; length];
    client.read_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn memory_export_round_trips_patterns_zeroes_and_trims() {
    let dir = TempDir::new("memory");
    let server = nbdkit(&dir, &["memory", "64M"]);
    let client = Client::connect(&server.uri()).unwrap();
    let info = client.info().clone();
    assert_eq!(info.size_bytes, 64 * MIB);
    assert!(!info.is_read_only());
    assert!(info.can_trim() && info.can_write_zeroes() && info.can_fast_zero());
    assert!(info.can_flush() && info.can_fua() && info.can_multi_conn());
    assert_ne!(
        info.reply_mode,
        ReplyMode::Simple,
        "nbdkit has structured replies"
    );
    assert!(info.has_meta_context(BASE_ALLOCATION));

    // Offsets and lengths of every shape, one larger than the 32 MiB that
    // one request may carry (so write_at and read_at must split it).
    let writes: [(u64, usize, RequestFlags); 5] = [
        (0, 4096, RequestFlags::NONE),
        (3 * 4096 + 17, 1000, RequestFlags::FUA),
        (MIB, 40 * MIB as usize, RequestFlags::NONE),
        (63 * MIB, MIB as usize, RequestFlags::FUA),
        (64 * MIB - 1, 1, RequestFlags::NONE),
    ];
    let mut model = vec![0u8; 64 * MIB as usize];
    for (seed, &(offset, length, flags)) in writes.iter().enumerate() {
        let data = random_bytes(seed as u64, length);
        client.write_at(&data, offset, flags).unwrap();
        model[offset as usize..offset as usize + length].copy_from_slice(&data);
        assert_eq!(
            read(&client, offset, length),
            data,
            "write {seed} reads back"
        );
    }
    client.flush().unwrap();

    client
        .write_zeroes(2 * MIB, 3 * MIB + 5, RequestFlags::NONE)
        .unwrap();
    model[2 * MIB as usize..(5 * MIB + 5) as usize].fill(0);
    client
        .write_zeroes(8 * MIB, MIB, RequestFlags::NO_HOLE | RequestFlags::FUA)
        .unwrap();
    model[8 * MIB as usize..9 * MIB as usize].fill(0);
    // nbdkit's memory plugin reads trimmed bytes back as zeroes (the spec
    // promises nothing after TRIM; this checks the request reached it).
    client.trim(20 * MIB, 4 * MIB, RequestFlags::NONE).unwrap();
    model[20 * MIB as usize..24 * MIB as usize].fill(0);
    client.flush().unwrap();
    assert!(
        read(&client, 0, 64 * MIB as usize) == model,
        "the disk matches the model"
    );

    // Never written: a hole of zeroes. Written: data.
    let hole = client.block_status(BASE_ALLOCATION, 45 * MIB, MIB).unwrap();
    assert!(hole.iter().all(|e| e.is_hole() && e.is_zero()), "{hole:?}");
    let data = client.block_status(BASE_ALLOCATION, 30 * MIB, MIB).unwrap();
    assert!(
        data.iter().all(|e| !e.is_hole() && !e.is_zero()),
        "{data:?}"
    );
    assert_eq!(
        map(&client, BASE_ALLOCATION),
        nbdinfo_extents(&server.uri(), BASE_ALLOCATION)
    );
    client.close().unwrap();
}

/// One thread's share of the disk: slots `slot % threads == thread`.
const SLOT_BYTES: u64 = 64 * 1024;

#[test]
fn many_requests_in_flight_from_several_threads_match_a_model() {
    let dir = TempDir::new("threads");
    let server = nbdkit(&dir, &["memory", "64M"]);
    // Fewer slots than the threads submit at once, so submitters wait.
    let options = ConnectOptions {
        in_flight_max: 16,
        ..ConnectOptions::default()
    };
    let client = Client::connect_with(&server.uri(), &options).unwrap();
    let threads = 4;
    let slots = 64 * MIB / SLOT_BYTES;
    let models: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|thread| {
                let client = &client;
                scope.spawn(move || worker(client, thread, threads, slots))
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    // Each thread's model is right for its own slots; together, the disk.
    let disk = read(&client, 0, 64 * MIB as usize);
    for slot in 0..slots as usize {
        let range = slot * SLOT_BYTES as usize..(slot + 1) * SLOT_BYTES as usize;
        let owner = &models[slot % threads as usize];
        assert!(disk[range.clone()] == owner[range], "slot {slot} differs");
    }
    client.close().unwrap();
}

/// Rounds of up to 48 requests on distinct slots of this thread's share
/// (writes, zeroes, and reads checked against the model), all in flight
/// together; returns the model.
fn worker(client: &Client, thread: u64, threads: u64, slots: u64) -> Vec<u8> {
    let mut model = vec![0u8; (slots * SLOT_BYTES) as usize];
    let mut rng = Xorshift::new(0x5eed + thread);
    for round in 0..24 {
        let mut used = HashSet::new();
        let mut reads: Vec<(usize, Pending<Vec<u8>>)> = Vec::new();
        let mut writes: Vec<Pending<()>> = Vec::new();
        for _ in 0..48 {
            let slot = rng.below(slots / threads) * threads + thread;
            if !used.insert(slot) {
                continue;
            }
            let offset = slot * SLOT_BYTES + rng.below(SLOT_BYTES / 2);
            let length = 1 + rng.below(SLOT_BYTES / 2) as usize;
            let range = offset as usize..offset as usize + length;
            match rng.below(4) {
                0 | 1 => {
                    let data = random_bytes(rng.next(), length);
                    writes.push(
                        client
                            .submit_write(&data, offset, RequestFlags::NONE)
                            .unwrap(),
                    );
                    model[range].copy_from_slice(&data);
                }
                2 => {
                    let zeroes =
                        client.submit_write_zeroes(offset, length as u64, RequestFlags::NONE);
                    writes.push(zeroes.unwrap());
                    model[range].fill(0);
                }
                _ => reads.push((
                    offset as usize,
                    client.submit_read(offset, vec![0xee; length]).unwrap(),
                )),
            }
        }
        for pending in writes {
            pending.wait().unwrap();
        }
        for (offset, pending) in reads {
            let data = pending.wait().unwrap();
            assert!(
                data[..] == model[offset..offset + data.len()],
                "thread {thread} round {round}: read at {offset} differs from the model"
            );
        }
    }
    model
}

#[test]
fn file_export_writes_reach_the_file_and_allocation_agrees_with_nbdinfo() {
    let dir = TempDir::new("file");
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let server = nbdkit(&dir, &["file", image.to_str().unwrap()]);
    let client = Client::connect(&server.uri()).unwrap();
    let first = random_bytes(1, 3 * MIB as usize);
    let second = random_bytes(2, 100_000);
    client.write_at(&first, MIB, RequestFlags::NONE).unwrap();
    client
        .write_at(&second, 10 * MIB + 4096, RequestFlags::FUA)
        .unwrap();
    client.trim(2 * MIB, MIB, RequestFlags::NONE).unwrap();
    client
        .write_zeroes(10 * MIB + 8192, 8192, RequestFlags::NONE)
        .unwrap();
    client.flush().unwrap();

    let mut expected = vec![0u8; 16 * MIB as usize];
    expected[MIB as usize..4 * MIB as usize].copy_from_slice(&first);
    expected[2 * MIB as usize..3 * MIB as usize].fill(0);
    let start = (10 * MIB + 4096) as usize;
    expected[start..start + second.len()].copy_from_slice(&second);
    expected[start + 4096..start + 4096 + 8192].fill(0);
    assert!(
        read(&client, 0, 16 * MIB as usize) == expected,
        "read back through NBD"
    );
    assert_eq!(
        map(&client, BASE_ALLOCATION),
        nbdinfo_extents(&server.uri(), BASE_ALLOCATION)
    );
    client.close().unwrap();
    assert!(
        std::fs::read(&image).unwrap() == expected,
        "the file holds the writes"
    );
}

#[test]
fn a_server_without_structured_replies_gets_simple_requests() {
    let dir = TempDir::new("simple");
    let server = nbdkit(&dir, &["--no-sr", "memory", "8M"]);
    let client = Client::connect(&server.uri()).unwrap();
    assert_eq!(client.info().reply_mode, ReplyMode::Simple);
    assert!(client.info().meta_contexts.is_empty());
    let data = random_bytes(9, 5 * MIB as usize);
    client.write_at(&data, 4096, RequestFlags::NONE).unwrap();
    assert_eq!(read(&client, 4096, data.len()), data);
    let error = client.block_status(BASE_ALLOCATION, 0, 4096).unwrap_err();
    assert!(
        matches!(error.failure, CommandFailure::NoContext { .. }),
        "{error}"
    );

    // Asking for a dirty bitmap there is refused at connect, clearly.
    let options = ConnectOptions {
        dirty_bitmap: Some("b".into()),
        ..ConnectOptions::default()
    };
    let error = Client::connect_with(&server.uri(), &options).unwrap_err();
    assert!(
        error.to_string().contains("no structured replies"),
        "{error}"
    );
    client.close().unwrap();
}

#[test]
fn block_size_constraints_are_honoured_and_requests_split_at_the_maximum() {
    let dir = TempDir::new("blocksize");
    let server = nbdkit(
        &dir,
        &[
            "--filter=blocksize-policy",
            "memory",
            "16M",
            "blocksize-minimum=512",
            "blocksize-preferred=4096",
            "blocksize-maximum=1M",
            // The server refuses anything outside the constraints.
            "blocksize-error-policy=error",
        ],
    );
    let client = Client::connect(&server.uri()).unwrap();
    let sizes = client.info().block_sizes;
    assert_eq!(
        (
            sizes.minimum_bytes,
            sizes.preferred_bytes,
            sizes.maximum_bytes,
            sizes.advertised
        ),
        (512, 4096, MIB as u32, true)
    );
    assert_eq!(client.payload_max_bytes(), MIB);
    let data = random_bytes(3, 5 * MIB as usize + 512);
    client.write_at(&data, 512, RequestFlags::NONE).unwrap();
    assert_eq!(read(&client, 512, data.len()), data);
    client
        .write_zeroes(512, 3 * MIB, RequestFlags::NONE)
        .unwrap();
    assert!(read(&client, 512, 3 * MIB as usize).iter().all(|&b| b == 0));

    // What the server would refuse is refused before it is sent.
    let error = client
        .write_at(&data[..100], 512, RequestFlags::NONE)
        .unwrap_err();
    assert!(
        matches!(
            error.failure,
            CommandFailure::Misaligned { minimum_bytes: 512 }
        ),
        "{error}"
    );
    let error = client
        .submit_write(&data[..2 * MIB as usize], 0, RequestFlags::NONE)
        .unwrap_err();
    assert!(
        matches!(error.failure, CommandFailure::TooLarge { .. }),
        "{error}"
    );
    let error = client
        .write_at(&data[..512], 16 * MIB, RequestFlags::NONE)
        .unwrap_err();
    assert!(
        matches!(error.failure, CommandFailure::OutOfRange { .. }),
        "{error}"
    );
    client.close().unwrap();
}

#[test]
fn server_errors_are_values_and_the_connection_goes_on() {
    for extra in [&[][..], &["--no-sr"][..]] {
        let dir = TempDir::new("errors");
        let mut args = extra.to_vec();
        args.extend([
            "--filter=error",
            "memory",
            "8M",
            "error-pwrite=ENOSPC",
            "error-pwrite-rate=100%",
        ]);
        let server = nbdkit(&dir, &args);
        let client = Client::connect(&server.uri()).unwrap();
        let error = client
            .write_at(&[1; 4096], 8192, RequestFlags::NONE)
            .unwrap_err();
        let CommandFailure::Server {
            error: nbd_error,
            code,
            ..
        } = &error.failure
        else {
            panic!("{extra:?}: want a server error, got {error}");
        };
        assert_eq!((*nbd_error, *code), (NbdError::NoSpc, 28), "{error}");
        assert_eq!((error.offset_bytes, error.length_bytes), (8192, 4096));
        assert_eq!(
            std::io::Error::from(error).kind(),
            std::io::ErrorKind::StorageFull
        );
        // The connection is still good.
        client.write_zeroes(0, 4096, RequestFlags::NONE).unwrap();
        assert_eq!(read(&client, 0, 4096), vec![0; 4096]);
        client.close().unwrap();
    }
}

#[test]
fn eshutdown_stops_new_requests_until_the_client_reconnects() {
    let dir = TempDir::new("shutdown");
    let server = nbdkit(
        &dir,
        &[
            "--filter=error",
            "memory",
            "8M",
            "error-pwrite=ESHUTDOWN",
            "error-pwrite-rate=100%",
        ],
    );
    let client = Client::connect(&server.uri()).unwrap();
    let error = client
        .write_at(&[1; 512], 0, RequestFlags::NONE)
        .unwrap_err();
    assert!(
        matches!(
            error.failure,
            CommandFailure::Server {
                error: NbdError::Shutdown,
                ..
            }
        ),
        "{error}"
    );
    let error = client.read_at(&mut [0; 512], 0).unwrap_err();
    assert!(
        matches!(error.failure, CommandFailure::ServerShuttingDown),
        "{error}"
    );
    client.close().unwrap();
    let again = Client::connect(&server.uri()).unwrap();
    assert_eq!(read(&again, 0, 512), vec![0; 512]);
    again.close().unwrap();
}
