//! Seeds for every target whose inputs blockwatch's own code writes
//! (`make-corpus --seeds` makes those of the fsmap targets, with mkfs and
//! sfdisk): small inputs, a few KiB each, made by the project's writers
//! and encoders, each with the selector byte its target reads first.
//!
//! It is built as a fuzz target, by the same `cargo fuzz build` as the
//! others: a plain binary in this crate would not link against the
//! coverage instrumentation, and a second, uninstrumented build of every
//! dependency costs minutes. Its libFuzzer init does the work and exits:
//! `MAKE_SEEDS_DIR=seeds target/x86_64-unknown-linux-gnu/release/make_seeds`
//! (`scripts/fuzz --seeds` runs it) writes seeds/TARGET/NAME.

#![no_main]

use std::path::{Path, PathBuf};

use blockwatch_fuzz::nbd::DIRTY_CONTEXT;
use copier::tape::{NewSession, TapeOptions, TapeWriter};
use copier::target::Held;
use libfuzzer_sys::fuzz_target;
use nbd_server::proto::*;
use tracker::journal::{FileHeader, JournalWriter, Record};
use tracker::regions::RegionRun;

fuzz_target!(init: make_seeds_and_exit(), |_data: &[u8]| {});

/// Writes the seeds to `$MAKE_SEEDS_DIR` and ends the process before
/// libFuzzer would start fuzzing.
fn make_seeds_and_exit() {
    let Some(dir) = std::env::var_os("MAKE_SEEDS_DIR") else {
        eprintln!("make_seeds: set MAKE_SEEDS_DIR to the seed directory");
        std::process::exit(2);
    };
    make_seeds(PathBuf::from(dir));
    std::process::exit(0);
}

fn make_seeds(dir: PathBuf) {
    let mut seeds = Seeds { dir, count: 0 };
    tapes(&mut seeds);
    handshakes(&mut seeds);
    transmissions(&mut seeds);
    journals(&mut seeds);
    catalogs(&mut seeds);
    control_lines(&mut seeds);
    for (target, name, bytes) in copier::fuzzing::seeds() {
        seeds.put(target, &name, &bytes);
    }
    println!(
        "make_seeds: {} seeds in {}",
        seeds.count,
        seeds.dir.display()
    );
}

struct Seeds {
    dir: PathBuf,
    count: usize,
}

impl Seeds {
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.dir.join(target);
        std::fs::create_dir_all(&dir).expect("a seed directory");
        std::fs::write(dir.join(name), bytes).expect("a seed");
        self.count += 1;
    }

    fn scratch(&self, name: &str) -> PathBuf {
        let dir = self.dir.join(".scratch");
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        dir.join(name)
    }
}

impl Drop for Seeds {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.dir.join(".scratch"));
    }
}

// ---- tapes ----------------------------------------------------------------

/// `tape_reader`: tapes of one and three sessions, raw and zstd, whole and
/// with the last block cut in half (a torn tail), mode byte 1 (crcs
/// recomputed). `tape_index`: the index a view saves beside the
/// three-session tape.
fn tapes(seeds: &mut Seeds) {
    for sessions in [1usize, 3] {
        for compress in [false, true] {
            let scratch = seeds.scratch("scratch.tape");
            let _ = std::fs::remove_file(&scratch);
            write_tape(&scratch, sessions, compress);
            let mut seed = vec![1u8];
            seed.extend(std::fs::read(&scratch).expect("the tape"));
            let name = format!("tape-{sessions}-{}", if compress { "zstd" } else { "raw" });
            seeds.put("tape_reader", &name, &seed);
            seed.truncate(seed.len() - 2048);
            seeds.put("tape_reader", &format!("{name}-torn"), &seed);
            if sessions == 3 {
                copier::view::TapeView::open(std::slice::from_ref(&scratch), None)
                    .expect("a view of the tape");
                let index = std::fs::read(scratch.with_file_name("scratch.tape.blockwatch-index"))
                    .expect("the view saved an index");
                seeds.put("tape_index", &name, &[&[0u8][..], &index].concat());
            }
        }
    }
}

fn write_tape(path: &Path, sessions: usize, compress: bool) {
    let options = TapeOptions {
        block_size_bytes: 4096,
        ..TapeOptions::default()
    };
    let mut tape = TapeWriter::open_append(path, &options).expect("a new tape");
    for round in 0..sessions {
        let last = tape.last_session().cloned();
        let new = NewSession {
            source_id: "0123456789abcdef".into(),
            source_size_bytes: 1 << 20,
            granularity_bytes: 65536,
            base: last.as_ref().map(|h| h.target.clone()),
            target: Held {
                checkpoint: format!("c{round}"),
                generation: round as u64 + 1,
            },
            parent: last.as_ref().map(|h| h.session_id),
            compress,
        };
        let mut session = tape.begin_session(new).expect("a session");
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 7 + round as u32) as u8).collect();
        session
            .write_data(round as u64 * 8192, &data)
            .expect("data");
        session.write_zero(100_000, 20_000).expect("zeroes");
        session.set_files(vec![format!("/f{round}"), "/etc/passwd".into()]);
        tape = session.finish().expect("finish").0;
    }
}

// ---- NBD ------------------------------------------------------------------

fn string_field(text: &str) -> Vec<u8> {
    let mut field = (text.len() as u32).to_be_bytes().to_vec();
    field.extend_from_slice(text.as_bytes());
    field
}

fn info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut data = string_field(name);
    data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for request in requests {
        data.extend_from_slice(&request.to_be_bytes());
    }
    data
}

fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = string_field(name);
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        data.extend_from_slice(&string_field(query));
    }
    data
}

/// `nbd_handshake`: what nbdinfo, qemu-nbd and nbd-client send, under
/// each TLS mode (byte 0: 0 off, 1 on, 2 require).
fn handshakes(seeds: &mut Seeds) {
    let flags = (CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES).to_be_bytes();
    let options = |tls: u8, client_flags: &[u8], options: &[(u32, Vec<u8>)]| {
        let mut bytes = vec![tls];
        bytes.extend_from_slice(client_flags);
        for (option, data) in options {
            put_option_request(&mut bytes, *option, data);
        }
        bytes
    };
    let list = options(
        0,
        &flags,
        &[
            (OPT_LIST, Vec::new()),
            (
                OPT_INFO,
                info_request("disk", &[INFO_NAME, INFO_DESCRIPTION]),
            ),
            (OPT_STRUCTURED_REPLY, Vec::new()),
            (
                OPT_LIST_META_CONTEXT,
                meta_request("disk", &["base:", "qemu:"]),
            ),
            (
                OPT_SET_META_CONTEXT,
                meta_request("disk", &[BASE_ALLOCATION, DIRTY_CONTEXT]),
            ),
            (OPT_GO, info_request("disk", &[INFO_BLOCK_SIZE])),
        ],
    );
    seeds.put("nbd_handshake", "list-info-meta-go", &list);
    let zeroes = CLIENT_FLAG_FIXED_NEWSTYLE.to_be_bytes();
    let export_name = options(0, &zeroes, &[(OPT_EXPORT_NAME, b"ro".to_vec())]);
    seeds.put("nbd_handshake", "export-name-zeroes", &export_name);
    let extended = options(
        2,
        &flags,
        &[
            (OPT_INFO, info_request("", &[])),
            (OPT_STARTTLS, Vec::new()),
            (OPT_EXTENDED_HEADERS, Vec::new()),
            (OPT_SET_META_CONTEXT, meta_request("disk", &[DIRTY_CONTEXT])),
            (OPT_GO, info_request("disk", &[])),
        ],
    );
    seeds.put("nbd_handshake", "require-starttls-extended", &extended);
    let tls_on = options(
        1,
        &flags,
        &[
            (OPT_STARTTLS, Vec::new()),
            (OPT_STARTTLS, Vec::new()),
            (OPT_EXPORT_NAME, Vec::new()),
        ],
    );
    seeds.put("nbd_handshake", "on-starttls-export-name", &tls_on);
    let abort = options(
        0,
        &flags,
        &[(99, b"what".to_vec()), (OPT_ABORT, Vec::new())],
    );
    seeds.put("nbd_handshake", "unknown-then-abort", &abort);
}

/// `nbd_transmission`: every command, in each reply mode (byte 0: bits
/// 0-1 mode, bit 2 read-only, bit 3 contexts), with some refused ones.
fn transmissions(seeds: &mut Seeds) {
    for (name, mode) in [
        ("simple", 0u8),
        ("structured-contexts", 1 | 8),
        ("extended-contexts", 2 | 8),
        ("read-only-structured", 1 | 4 | 8),
    ] {
        let extended = mode & 3 >= 2;
        let mut bytes = vec![mode];
        let mut request = |command: u16, flags: u16, offset: u64, length: u64, data: &[u8]| {
            let header = RequestHeader {
                flags,
                command,
                cookie: 0,
                offset,
                length,
            };
            header.encode(extended, &mut bytes);
            bytes.extend_from_slice(data);
        };
        let data = vec![0xa5u8; 4096];
        request(CMD_WRITE, 0, 4096, 4096, &data);
        request(CMD_WRITE, CMD_FLAG_FUA, 65536, 512, &data[..512]);
        request(CMD_READ, 0, 0, 8192, &[]);
        request(CMD_READ, CMD_FLAG_DF, 60_000, 70_000, &[]);
        request(CMD_FLUSH, 0, 0, 0, &[]);
        request(CMD_TRIM, 0, 8192, 4096, &[]);
        request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 12288, 4096, &[]);
        request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 4096, &[]);
        request(CMD_CACHE, 0, 0, 65536, &[]);
        request(CMD_BLOCK_STATUS, 0, 0, 196_608, &[]);
        request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 50_000, 100, &[]);
        request(CMD_READ, 0, 196_608, 4096, &[]);
        request(99, 0, 0, 1, &[]);
        request(CMD_DISC, 0, 0, 0, &[]);
        seeds.put("nbd_transmission", name, &bytes);
    }
}

// ---- tracker --------------------------------------------------------------

/// `journal_replay`: journals written by `JournalWriter`, mode byte 0
/// (their crcs are right), whole and with a torn last record.
fn journals(seeds: &mut Seeds) {
    let path = seeds.scratch("journal");
    let header = FileHeader {
        generation: 3,
        granularity_shift: 16,
        image_id: [7; 16],
    };
    let file = std::fs::File::create(&path).expect("a journal");
    let mut writer = JournalWriter::create(Box::new(file), header).expect("a journal");
    let run = |first_region, region_count| RegionRun {
        first_region,
        region_count,
    };
    writer
        .append(&[
            Record::Mark {
                runs: vec![run(0, 1), run(10, 3)],
            },
            Record::Saved {
                epoch: 1,
                runs: vec![run(10, 2)],
            },
            Record::SavedFiles {
                epoch: 1,
                files: vec![(1, 12), (1, 2)],
                more: false,
            },
        ])
        .expect("records");
    writer
        .append(&[Record::MarkAll {
            reason: "the image changed while no server ran".into(),
        }])
        .expect("records");
    let bytes = std::fs::read(&path).expect("the journal");
    seeds.put("journal_replay", "written", &[&[0u8][..], &bytes].concat());
    let torn = &bytes[..bytes.len() - 20];
    seeds.put("journal_replay", "torn", &[&[1u8][..], torn].concat());
    let empty = &bytes[..tracker::journal::FILE_HEADER_LEN];
    seeds.put("journal_replay", "empty", &[&[0u8][..], empty].concat());
}

/// `catalog_value`: each value the catalog stores. (A whole catalog file
/// is not fuzzed: redb panics on damaged pages, docs/fuzzing.md.)
fn catalogs(seeds: &mut Seeds) {
    for (name, bytes) in tracker::fuzzing::catalog_value_seeds() {
        seeds.put("catalog_value", &name, &bytes);
    }
}

/// `control_protocol`: request lines as `blockwatch` sends them (mode 0)
/// and, for the client side, the tracker's replies to them (mode 1).
fn control_lines(seeds: &mut Seeds) {
    let requests = [
        r#"{"op":"status"}"#,
        r#"{"op":"checkpoints"}"#,
        r#"{"op":"changes","since":"base"}"#,
        r#"{"op":"changes","since":"base","until":"second","files":true,"include":["/etc/**"],"exclude":["*.tmp"],"min_size_bytes":1,"max_size":4096}"#,
        r#"{"op":"pin","name":"base","holder":"nightly","reason":"copy"}"#,
        r#"{"op":"unpin","name":"base","holder":"nightly"}"#,
        r#"{"op":"snapshot","name":null,"max_store_bytes":1048576}"#,
        r#"{"op":"checkpoint","name":"third"}"#,
        r#"{"op":"nothing"}"#,
    ];
    let mut lines = vec![0u8];
    lines.extend_from_slice(requests.join("\n").as_bytes());
    seeds.put("control_protocol", "requests", &lines);
    for (index, line) in requests[..4].iter().enumerate() {
        let reply = blockwatch_fuzz::control::answer_line(line);
        let seed = [&[1u8][..], reply.as_bytes()].concat();
        seeds.put("control_protocol", &format!("reply-{index}"), &seed);
    }
}
