//! Tapes end to end: chains written with the copier's tape writer (a full
//! session read from an image, then incrementals of the regions changed
//! since), restored by `blockwatch restore` onto a file, nbdkit's memory
//! plugin and qemu-nbd, each compared with `cmp` against the image as it
//! was at that checkpoint; `--until`; refusals (tapes out of order, a gap,
//! a foreign session, a flipped byte, a cut tape) that leave the target
//! byte for byte as it was; `blockwatch verify tape:...` exit codes.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{BLOCKWATCH, Tmpfs};
use copier::tape::{NewSession, TapeOptions, TapeReader, TapeWriter};
use copier::target::Held;
use testkit::*;

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;
const SOURCE_ID: &str = "5eed0000000000000000000000000001";

/// Copies `regions` of `image` (everything when None) into a new session
/// of the tape at `tape`: data as data, all-zero pieces as zero extents.
fn write_session(
    tape: &Path,
    options: &TapeOptions,
    image: &Path,
    name: &str,
    regions: Option<&[(u64, u64)]>,
    compress: bool,
) {
    let writer = TapeWriter::open_append(tape, options).unwrap();
    let previous = writer.last_session().cloned();
    let generation = previous.as_ref().map_or(1, |h| h.target.generation + 1);
    let new = NewSession {
        source_id: SOURCE_ID.into(),
        source_size_bytes: DISK,
        granularity_bytes: 65536,
        base: previous.as_ref().map(|h| h.target.clone()),
        target: Held {
            checkpoint: name.into(),
            generation,
        },
        parent: previous.as_ref().map(|h| h.session_id),
        compress,
    };
    let mut session = writer.begin_session(new).unwrap();
    let file = std::fs::File::open(image).unwrap();
    let whole = [(0, DISK)];
    let mut buffer = vec![0u8; MIB as usize];
    for &(start, length) in regions.unwrap_or(&whole) {
        let mut offset = start;
        while offset < start + length {
            let piece = (start + length - offset).min(MIB) as usize;
            file.read_exact_at(&mut buffer[..piece], offset).unwrap();
            if buffer[..piece].iter().all(|&b| b == 0) {
                session.write_zero(offset, piece as u64).unwrap();
            } else {
                session.write_data(offset, &buffer[..piece]).unwrap();
            }
            offset += piece as u64;
        }
    }
    session.set_files(vec![format!("/changed-by-{name}")]);
    session.finish().unwrap();
}

fn small_blocks() -> TapeOptions {
    TapeOptions {
        block_size_bytes: 64 * 1024,
        ..TapeOptions::default()
    }
}

/// The image at three checkpoints (copies kept as `c0.img`...) and the
/// regions each incremental changed.
struct History {
    at: Vec<PathBuf>,
    changes: Vec<Vec<(u64, u64)>>,
}

fn make_history(dir: &TempDir) -> History {
    let image = dir.join("disk.img");
    create_sparse_file(&image, DISK);
    write_at(&image, 0, &random_bytes(1, 3 * MIB as usize));
    write_at(&image, 40 * MIB, &random_bytes(2, MIB as usize));
    write_at(&image, 63 * MIB, &vec![7u8; MIB as usize]);
    let mut at = vec![dir.join("c0.img")];
    std::fs::copy(&image, &at[0]).unwrap();
    // c1: new data in a hole, data overwritten, a range zeroed.
    write_at(&image, 8 * MIB, &random_bytes(3, 64 * 1024));
    write_at(&image, MIB, &random_bytes(4, 4096));
    write_at(&image, 40 * MIB, &vec![0u8; 512 * 1024]);
    let changes1 = vec![(MIB, 4096), (8 * MIB, 64 * 1024), (40 * MIB, 512 * 1024)];
    at.push(dir.join("c1.img"));
    std::fs::copy(&image, &at[1]).unwrap();
    // c2: text-like data (compressible), and the last byte of the disk.
    write_at(&image, 20 * MIB, &vec![b'x'; 2 * MIB as usize]);
    write_at(&image, DISK - 4096, &random_bytes(5, 4096));
    let changes2 = vec![(20 * MIB, 2 * MIB), (DISK - 4096, 4096)];
    at.push(dir.join("c2.img"));
    std::fs::copy(&image, &at[2]).unwrap();
    History {
        at,
        changes: vec![changes1, changes2],
    }
}

/// Writes the history's three sessions: the full on `tapes[0]`, the
/// incrementals on the last tape (a second tape continues the chain).
fn write_chain(history: &History, tapes: &[PathBuf]) {
    // Sessions are written from the checkpoint copies, as a copier reads
    // the disk as it was at each checkpoint.
    write_session(
        &tapes[0],
        &small_blocks(),
        &history.at[0],
        "c0",
        None,
        false,
    );
    let last = tapes.last().unwrap();
    if tapes.len() > 1 {
        let label = TapeReader::open(&tapes[0]).unwrap().label().clone();
        let continues = TapeOptions {
            continues: Some(label),
            ..small_blocks()
        };
        // The chain's last session lives on the first tape: the next
        // tape's first session names it as parent.
        let previous = copier::tape::last_session(&tapes[0]).unwrap().unwrap();
        write_continuing(last, &continues, history, previous);
        return;
    }
    for (i, changes) in history.changes.iter().enumerate() {
        let name = format!("c{}", i + 1);
        write_session(
            last,
            &small_blocks(),
            &history.at[i + 1],
            &name,
            Some(changes),
            i == 1,
        );
    }
}

fn write_continuing(
    tape: &Path,
    options: &TapeOptions,
    history: &History,
    previous: copier::tape::SessionHeader,
) {
    let mut parent = previous;
    for (i, changes) in history.changes.iter().enumerate() {
        let writer = TapeWriter::open_append(tape, options).unwrap();
        let new = NewSession {
            source_id: SOURCE_ID.into(),
            source_size_bytes: DISK,
            granularity_bytes: 65536,
            base: Some(parent.target.clone()),
            target: Held {
                checkpoint: format!("c{}", i + 1),
                generation: parent.target.generation + 1,
            },
            parent: Some(parent.session_id),
            compress: i == 1,
        };
        let mut session = writer.begin_session(new).unwrap();
        let image = std::fs::read(&history.at[i + 1]).unwrap();
        for &(offset, length) in changes {
            let piece = &image[offset as usize..(offset + length) as usize];
            session.write_data(offset, piece).unwrap();
        }
        let (writer, _) = session.finish().unwrap();
        parent = writer.last_session().unwrap().clone();
    }
}

fn tape_args(tapes: &[PathBuf]) -> Vec<String> {
    tapes
        .iter()
        .map(|t| format!("tape:{}", t.display()))
        .collect()
}

/// `blockwatch restore TAPES --to TARGET EXTRA...`: its output.
fn restore(tapes: &[PathBuf], target: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["restore".to_string()];
    args.extend(tape_args(tapes));
    args.extend(["--to".to_string(), target.to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    output(&mut command(BLOCKWATCH, &args))
}

fn restored(tapes: &[PathBuf], target: &str, extra: &[&str]) -> serde_json::Value {
    let mut extra = extra.to_vec();
    extra.push("--json");
    let out = restore(tapes, target, &extra);
    assert!(
        out.status.success(),
        "restore {tapes:?} --to {target} {extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_json(&String::from_utf8_lossy(&out.stdout), "restore --json")
}

fn cmp(left: &Path, right: &Path) {
    let out = output(&mut command("cmp", [left, right]));
    assert!(
        out.status.success(),
        "cmp {} {}: {}",
        left.display(),
        right.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn restores_of_a_full_and_two_incrementals_match_the_image_at_each_checkpoint() {
    let dir = TempDir::new("tape-restore");
    let history = make_history(&dir);
    let tape = dir.join("chain.tape");
    write_chain(&history, std::slice::from_ref(&tape));
    let tapes = [tape];
    for (i, until) in [Some("c0"), Some("c1"), Some("c2"), None]
        .iter()
        .enumerate()
    {
        let target = dir.join(format!("restored-{i}.img"));
        let extra: Vec<&str> = until.iter().flat_map(|u| ["--until", *u]).collect();
        let summary = restored(&tapes, target.to_str().unwrap(), &extra);
        let want = until.map_or(2, |u| u[1..].parse::<usize>().unwrap());
        assert_eq!(summary["checkpoint"], format!("c{want}"), "{summary:#}");
        assert_eq!(summary["sessions"].as_array().unwrap().len(), want + 1);
        cmp(&history.at[want], &target);
    }
    // Restoring again over a restored image (same size) gives the same.
    let target = dir.join("restored-0.img");
    restored(&tapes, target.to_str().unwrap(), &[]);
    cmp(&history.at[2], &target);
    // A point in time the chain does not reach: refused, nothing written.
    let fresh = dir.join("never.img");
    let out = restore(&tapes, fresh.to_str().unwrap(), &["--until", "c9"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("c9"));
    assert!(!fresh.exists() || std::fs::metadata(&fresh).unwrap().len() == 0);
}

#[test]
fn a_chain_continued_on_a_second_tape_restores_and_needs_its_order() {
    let dir = TempDir::new("tape-two");
    let history = make_history(&dir);
    let tapes = [dir.join("a.tape"), dir.join("b.tape")];
    write_chain(&history, &tapes);
    let target = dir.join("restored.img");
    restored(&tapes, target.to_str().unwrap(), &[]);
    cmp(&history.at[2], &target);
    let before = std::fs::read(&target).unwrap();
    let swapped = [tapes[1].clone(), tapes[0].clone()];
    let out = restore(&swapped, target.to_str().unwrap(), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing was written"));
    assert_eq!(std::fs::read(&target).unwrap(), before);
}

#[test]
fn restores_to_nbdkit_memory_and_qemu_nbd_are_exact() {
    require_tool("nbdkit", "nbdkit");
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("qemu-nbd", "qemu-utils");
    let dir = TempDir::new("tape-nbd");
    let history = make_history(&dir);
    let tapes = [dir.join("chain.tape")];
    write_chain(&history, &tapes);

    let socket = dir.join("nbdkit.sock");
    let nbdkit = ServerProcess::start(
        "nbdkit",
        &["-f", "-U", socket.to_str().unwrap(), "memory", "64M"],
        &socket,
        &dir.join("nbdkit.log"),
    );
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    restored(&tapes, &uri, &["--until", "c1"]);
    let out = dir.join("nbdkit-out.img");
    run_program("nbdcopy", [uri.as_str(), out.to_str().unwrap()]);
    cmp(&history.at[1], &out);
    drop(nbdkit);

    let backing = dir.join("qemu.img");
    create_sparse_file(&backing, DISK);
    let socket = dir.join("qemu.sock");
    let qemu = ServerProcess::start(
        "qemu-nbd",
        &[
            "-t",
            "-f",
            "raw",
            "-k",
            socket.to_str().unwrap(),
            backing.to_str().unwrap(),
        ],
        &socket,
        &dir.join("qemu.log"),
    );
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    restored(&tapes, &uri, &[]);
    drop(qemu);
    cmp(&history.at[2], &backing);
}

/// A copy of `tape` with `damage` applied.
fn damaged_copy(
    dir: &TempDir,
    tape: &Path,
    name: &str,
    damage: impl FnOnce(&mut Vec<u8>),
) -> PathBuf {
    let mut bytes = std::fs::read(tape).unwrap();
    damage(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A tape with an incremental session whose parent is `parent`, of
/// `source`: after a copy of `after`'s sessions, or alone on a new tape.
fn incremental(
    dir: &TempDir,
    name: &str,
    after: Option<&Path>,
    parent: copier::tape::Id,
    source: &str,
) -> PathBuf {
    let path = dir.join(name);
    if let Some(after) = after {
        std::fs::copy(after, &path).unwrap();
    }
    let writer = TapeWriter::open_append(&path, &small_blocks()).unwrap();
    let new = NewSession {
        source_id: source.into(),
        source_size_bytes: DISK,
        granularity_bytes: 65536,
        base: Some(Held {
            checkpoint: "c0".into(),
            generation: 1,
        }),
        target: Held {
            checkpoint: "stray".into(),
            generation: 2,
        },
        parent: Some(parent),
        compress: false,
    };
    let mut session = writer.begin_session(new).unwrap();
    session.write_data(0, &random_bytes(9, 4096)).unwrap();
    session.finish().unwrap();
    path
}

/// Chains a restore must refuse, each with what is wrong with it; the
/// good chain they are made from is `tape`.
fn refusals<'a>(dir: &TempDir, history: &History, tape: &Path) -> Vec<(&'a str, Vec<PathBuf>)> {
    write_chain(history, &[tape.to_path_buf()]);
    let full = dir.join("full.tape");
    write_session(&full, &small_blocks(), &history.at[0], "c0", None, false);
    let full_id = copier::tape::last_session(&full)
        .unwrap()
        .unwrap()
        .session_id;
    let length = std::fs::metadata(tape).unwrap().len() as usize;
    vec![
        (
            "a flipped byte",
            vec![damaged_copy(dir, tape, "flip.tape", |b| b[length / 2] ^= 1)],
        ),
        (
            "a flipped byte in the last block",
            vec![damaged_copy(dir, tape, "flip-end.tape", |b| {
                b[length - 100] ^= 1
            })],
        ),
        (
            "a cut tape",
            vec![damaged_copy(dir, tape, "cut.tape", |b| {
                b.truncate(length * 2 / 3)
            })],
        ),
        (
            "a cut in the label",
            vec![damaged_copy(dir, tape, "label.tape", |b| b.truncate(1000))],
        ),
        (
            "out of order",
            vec![
                incremental(dir, "inc.tape", None, full_id, SOURCE_ID),
                full.clone(),
            ],
        ),
        (
            "a gap",
            vec![incremental(
                dir,
                "gap.tape",
                Some(&full),
                copier::tape::Id([9; 16]),
                SOURCE_ID,
            )],
        ),
        (
            "a foreign session",
            vec![incremental(
                dir,
                "foreign.tape",
                Some(&full),
                full_id,
                "another-disk",
            )],
        ),
        ("not a tape", vec![history.at[0].clone()]),
    ]
}

#[test]
fn refused_restores_leave_the_target_as_it_was() {
    let dir = TempDir::new("tape-refusals");
    let history = make_history(&dir);
    let tape = dir.join("chain.tape");
    let cases = refusals(&dir, &history, &tape);
    let length = std::fs::metadata(&tape).unwrap().len() as usize;
    // The target holds something else entirely before each attempt.
    let target = dir.join("target.img");
    std::fs::copy(&history.at[1], &target).unwrap();
    let before = std::fs::read(&target).unwrap();
    for (what, tapes) in cases {
        let out = restore(&tapes, target.to_str().unwrap(), &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert!(stderr.contains("nothing was written"), "{what}: {stderr}");
        assert!(
            std::fs::read(&target).unwrap() == before,
            "{what}: the target changed"
        );
    }
    // A damaged incremental names the checkpoint the chain reads well to.
    let flipped = damaged_copy(&dir, &tape, "flip-last.tape", |b| b[length - 100] ^= 1);
    let out = restore(&[flipped], target.to_str().unwrap(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--until c1"), "{stderr}");
}

#[test]
fn refused_restores_onto_a_new_image_take_it_back() {
    let dir = TempDir::new("tape-refusals-new");
    let history = make_history(&dir);
    let tape = dir.join("chain.tape");
    let cases = refusals(&dir, &history, &tape);
    let length = std::fs::metadata(&tape).unwrap().len() as usize;
    // Restores onto a new image write as they check: whatever was written
    // before the refusal goes again, a created image with it.
    let missing = dir.join("new.img");
    let empty = dir.join("empty.img");
    for (what, tapes) in cases {
        let out = restore(&tapes, missing.to_str().unwrap(), &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert!(!missing.exists(), "{what}: the new image is left: {stderr}");
        std::fs::write(&empty, b"").unwrap();
        let out = restore(&tapes, empty.to_str().unwrap(), &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert_eq!(
            std::fs::metadata(&empty).unwrap().len(),
            0,
            "{what}: {stderr}"
        );
    }
    // Damage in the last session: the full and the first incremental were
    // written by then, and go.
    let flipped = damaged_copy(&dir, &tape, "flip-last.tape", |b| b[length - 100] ^= 1);
    let out = restore(&[flipped], missing.to_str().unwrap(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "the new image {} was removed again",
            missing.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("--until c1"), "{stderr}");
    assert!(!missing.exists());
}

#[test]
fn a_restore_onto_a_new_image_that_runs_out_of_space_removes_it() {
    if skipped_unless_root("mount -t tmpfs") {
        return;
    }
    let dir = TempDir::new("tape-enospc");
    let history = make_history(&dir);
    let tape = dir.join("chain.tape");
    write_chain(&history, std::slice::from_ref(&tape));
    // The chain's data is 5 MiB.
    let small = Tmpfs::mount(dir.path(), "small", "2M");
    let target = small.join("r.img");
    let out = restore(std::slice::from_ref(&tape), target.to_str().unwrap(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("No space left"), "{stderr}");
    assert!(stderr.contains("the image was removed again"), "{stderr}");
    assert!(!target.exists());
    // With room, the same restore is exact.
    small.resize("80M");
    restored(&[tape], target.to_str().unwrap(), &[]);
    cmp(&history.at[2], &target);
}

#[test]
fn a_restore_onto_a_served_image_is_refused() {
    let dir = TempDir::new("tape-served");
    let history = make_history(&dir);
    let tape = dir.join("chain.tape");
    write_chain(&history, std::slice::from_ref(&tape));
    // The image a running server serves (and locks): a restore over it
    // would change a disk under its users.
    let image = dir.join("served.img");
    std::fs::copy(&history.at[1], &image).unwrap();
    let server = common::Server::start_with_size(dir.path(), &image, "64M");
    let before = std::fs::read(&image).unwrap();
    let out = restore(std::slice::from_ref(&tape), image.to_str().unwrap(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
    server.stop();
    assert!(
        std::fs::read(&image).unwrap() == before,
        "the served image changed"
    );
    // Once it is no longer served, the same restore goes.
    restored(&[tape], image.to_str().unwrap(), &[]);
    cmp(&history.at[2], &image);
}

#[test]
fn a_full_session_later_in_the_chain_starts_the_restore_over() {
    let dir = TempDir::new("tape-second-full");
    let history = make_history(&dir);
    let tape = dir.join("chain.tape");
    write_session(&tape, &small_blocks(), &history.at[0], "c0", None, false);
    let changes = Some(history.changes[0].as_slice());
    write_session(&tape, &small_blocks(), &history.at[1], "c1", changes, false);
    // A full session again (a copy that could not prove continuity),
    // then an incremental on top of it.
    let writer = TapeWriter::open_append(&tape, &small_blocks()).unwrap();
    let previous = writer.last_session().unwrap().clone();
    let new = NewSession {
        source_id: SOURCE_ID.into(),
        source_size_bytes: DISK,
        granularity_bytes: 65536,
        base: None,
        target: Held {
            checkpoint: "c2".into(),
            generation: previous.target.generation + 1,
        },
        parent: None,
        compress: false,
    };
    let mut session = writer.begin_session(new).unwrap();
    // c2 with its first 2 MiB zeroed: data the first full wrote there
    // must not show through.
    let c2 = dir.join("c2-zeroed.img");
    std::fs::copy(&history.at[2], &c2).unwrap();
    write_at(&c2, 0, &vec![0u8; 2 * MIB as usize]);
    let image = std::fs::read(&c2).unwrap();
    // Only what it holds as data, no zero extents: a new image reads as
    // zeroes wherever the full session writes nothing.
    for offset in (0..DISK).step_by(MIB as usize) {
        let piece = &image[offset as usize..(offset + MIB) as usize];
        if piece.iter().any(|&b| b != 0) {
            session.write_data(offset, piece).unwrap();
        }
    }
    session.finish().unwrap();
    let tapes = [tape];
    for target in [dir.join("new.img"), dir.join("old.img")] {
        if target.ends_with("old.img") {
            // An image that holds other data throughout.
            std::fs::write(&target, vec![0x5a; DISK as usize]).unwrap();
        }
        let summary = restored(&tapes, target.to_str().unwrap(), &[]);
        assert_eq!(summary["checkpoint"], "c2", "{summary:#}");
        assert_eq!(summary["sessions_skipped"], 2, "{summary:#}");
        assert_eq!(summary["sessions"].as_array().unwrap().len(), 1);
        if target.ends_with("new.img") {
            cmp(&c2, &target);
        }
    }
    // Up to c1 the second full is not reached.
    let until = dir.join("until.img");
    restored(&tapes, until.to_str().unwrap(), &["--until", "c1"]);
    cmp(&history.at[1], &until);
}

fn verify(tapes: &[PathBuf], json: bool) -> (Option<i32>, String) {
    let mut args = vec!["verify".to_string()];
    args.extend(tape_args(tapes));
    if json {
        args.push("--json".into());
    }
    let out = output(&mut command(BLOCKWATCH, &args));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn verify_of_tapes_exits_0_good_1_damaged_2_unreadable() {
    let dir = TempDir::new("tape-verify");
    let history = make_history(&dir);
    let tapes = [dir.join("a.tape"), dir.join("b.tape")];
    write_chain(&history, &tapes);
    let (code, text) = verify(&tapes, false);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("all checksums good: 3 session(s) on 2 tape(s)"),
        "{text}"
    );
    let (code, text) = verify(&tapes, true);
    assert_eq!(code, Some(0), "{text}");
    let report = parse_json(&text, "verify --json");
    assert_eq!(
        report["sessions"].as_array().unwrap().len(),
        3,
        "{report:#}"
    );
    assert_eq!(report["sessions"][2]["checkpoint"], "c2");

    let length = std::fs::metadata(&tapes[1]).unwrap().len() as usize;
    let flipped = damaged_copy(&dir, &tapes[1], "b-flipped.tape", |b| b[length / 2] ^= 0x40);
    let block = (length / 2) / (64 * 1024);
    let (code, text) = verify(&[tapes[0].clone(), flipped.clone()], false);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains(&format!("damage at block {block}")), "{text}");
    let (code, text) = verify(&[tapes[0].clone(), flipped], true);
    assert_eq!(code, Some(1), "{text}");
    let report = parse_json(&text, "verify --json");
    assert_eq!(report["damage"]["block"], block as u64, "{report:#}");
    assert_eq!(
        report["sessions_good"].as_array().unwrap().len(),
        1,
        "{report:#}"
    );

    let (code, text) = verify(&[tapes[1].clone(), tapes[0].clone()], false);
    assert_eq!(code, Some(1), "out of order: {text}");
    let (code, text) = verify(&[dir.join("missing.tape")], false);
    assert_eq!(code, Some(2), "missing: {text}");
}
