//! `blockwatch copy --to tape:PATH` end to end: a full and two incremental
//! sessions of a live disk (with and without --compress), restored by
//! `blockwatch restore` to a file at each checkpoint (`--until`) and
//! compared with cmp against the disk as it was; `verify tape:`; a tape of
//! another disk refused; a copy cut short by a full tape (ENOSPC after N
//! blocks) leaves the tape's last session as it was, and a rerun appends
//! a whole session.

mod common;

use std::path::Path;

use common::*;
use testkit::*;

fn copy_to(image: &Path, target: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["copy", image.to_str().unwrap(), "--to", target, "--json"];
    args.extend_from_slice(extra);
    output(&mut command(BLOCKWATCH, &args))
}

fn copied(image: &Path, target: &str, extra: &[&str]) -> serde_json::Value {
    let out = copy_to(image, target, extra);
    assert!(
        out.status.success(),
        "copy to {target}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_json(&String::from_utf8_lossy(&out.stdout), "copy --json")
}

fn restore(tape: &Path, to: &Path, extra: &[&str]) {
    let tape_arg = format!("tape:{}", tape.display());
    let mut args = vec!["restore", tape_arg.as_str(), "--to", to.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = output(&mut command(BLOCKWATCH, &args));
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn chain_through_a_tape(compress: bool) {
    let dir = TempDir::new(if compress { "copy-tape-z" } else { "copy-tape" });
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");
    qemu_io(&server.uri(), CHAIN_START);
    let tape = dir.join("disk.tape");
    let target = format!("tape:{}", tape.display());
    let extra: &[&str] = if compress {
        &["--compress", "--block-size", "64K"]
    } else {
        &[]
    };
    let mut states = Vec::new();
    for (round, commands) in CHAIN_ROUNDS.iter().enumerate() {
        qemu_io(&server.uri(), commands);
        let at = dir.join(format!("at-{round}.img"));
        std::fs::copy(&image, &at).unwrap();
        let summary = copied(&image, &target, extra);
        assert_eq!(
            summary["kind"],
            if round == 0 { "full" } else { "incremental" },
            "{summary:#}"
        );
        if round > 0 {
            assert!(
                summary["planned_bytes"].as_u64().unwrap() <= 2 << 20,
                "{summary:#}"
            );
        }
        states.push((summary["checkpoint"].as_str().unwrap().to_string(), at));
    }
    server.stop();
    // The whole chain, then each point in time.
    let restored = dir.join("restored.img");
    restore(&tape, &restored, &[]);
    assert_files_equal(&states[2].1, &restored);
    for (checkpoint, at) in &states[..2] {
        let until = dir.join(format!("until-{checkpoint}.img"));
        restore(&tape, &until, &["--until", checkpoint]);
        assert_files_equal(at, &until);
    }
    let verified = output(&mut command(BLOCKWATCH, ["verify", target.as_str()]));
    assert_eq!(verified.status.code(), Some(0), "{verified:?}");
    // Only the newest copy's checkpoint is kept, pinned for the tape.
    let listing = parse_json(
        &run_program(
            BLOCKWATCH,
            ["checkpoints", image.to_str().unwrap(), "--json"],
        ),
        "checkpoints",
    );
    let listing = listing.as_array().unwrap();
    assert_eq!(listing.len(), 1, "{listing:#?}");
    assert_eq!(listing[0]["name"], states[2].0.as_str());
}

#[test]
fn a_live_disk_copied_to_a_tape_restores_to_each_checkpoint() {
    chain_through_a_tape(false);
}

#[test]
fn a_compressed_tape_with_small_blocks_restores_the_same() {
    chain_through_a_tape(true);
}

#[test]
fn a_tape_of_another_disk_is_refused_and_a_full_tape_keeps_its_last_session() {
    let dir = TempDir::new("copy-tape-refusals");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "32M");
    qemu_io(&server.uri(), &["write -P 1 0 8M"]);
    let tape = dir.join("disk.tape");
    let target = format!("tape:{}", tape.display());
    copied(&image, &target, &[]);
    let first = dir.join("first.img");
    std::fs::copy(&image, &first).unwrap();

    let other = dir.join("other.img");
    let other_server = Server::start_with_size(dir.path(), &other, "32M");
    let refused = copy_to(&other, &target, &[]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("another disk"),
        "{refused:?}"
    );
    other_server.stop();

    // A tape that fills after 20 more blocks (of 256 KiB): the session is
    // cut, the tape still holds the first copy, and the rerun appends.
    qemu_io(&server.uri(), &["write -P 2 0 16M"]);
    let length_before = std::fs::metadata(&tape).unwrap().len();
    let label_and_first = length_before / (256 << 10);
    let mut full = command(
        BLOCKWATCH,
        ["copy", image.to_str().unwrap(), "--to", target.as_str()],
    );
    full.env(
        "BLOCKWATCH_TAPE_ENOSPC_AFTER_BLOCKS",
        (label_and_first + 20).to_string(),
    );
    let cut = output(&mut full);
    assert_eq!(cut.status.code(), Some(2), "{cut:?}");
    assert!(
        String::from_utf8_lossy(&cut.stderr).contains("No space left"),
        "{cut:?}"
    );
    let restored = dir.join("restored.img");
    restore(&tape, &restored, &[]);
    assert_files_equal(&first, &restored);

    let rerun = copied(&image, &target, &[]);
    assert_eq!(rerun["kind"], "incremental", "{rerun:#}");
    server.stop();
    let restored = dir.join("restored-2.img");
    restore(&tape, &restored, &[]);
    assert_files_equal(&image, &restored);
}

#[test]
fn an_incremental_session_of_an_ext4_disk_lists_the_files_it_changed() {
    if skipped_unless_root("mount -o loop and FUSE") {
        return;
    }
    let dir = TempDir::new("copy-tape-files");
    let image = dir.join("disk.img");
    create_sparse_file(&image, 64 << 20);
    run_program(
        "mkfs.ext4",
        [
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            image.to_str().unwrap(),
        ],
    );
    let tape = dir.path().join("disk.tape");
    let target = format!("tape:{}", tape.display());
    let image_arg = image.clone();
    let mut fs = LiveFs::start(dir, &image, &[], 64 << 20, "loop", 0);
    fs.mkdir("/docs");
    fs.write("/docs/a.txt", 1, 10_000);
    fs.sync();
    copied(&image_arg, &target, &[]);
    fs.write("/docs/b.txt", 2, 20_000);
    fs.append("/docs/a.txt", 3, 5_000);
    fs.sync();
    let summary = copied(&image_arg, &target, &[]);
    assert_eq!(summary["kind"], "incremental", "{summary:#}");
    fs.stop();

    let mut reader = copier::tape::TapeReader::open(&tape).unwrap();
    let mut lists = Vec::new();
    while reader.next_session().unwrap().is_some() {
        let mut files = None;
        while let Some(record) = reader.next_record().unwrap() {
            if let copier::tape::Record::Files(paths) = record {
                files = Some(paths);
            }
        }
        lists.push(files);
    }
    assert_eq!(lists.len(), 2);
    assert_eq!(lists[0], None, "a full session lists no files");
    let files = lists[1].clone().expect("the incremental lists its files");
    assert!(files.contains(&"+\t/docs/b.txt".to_string()), "{files:?}");
    assert!(files.contains(&"M\t/docs/a.txt".to_string()), "{files:?}");
}

fn verify_json(image: &Path, target: &str, extra: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut args = vec!["verify", image.to_str().unwrap(), target, "--json"];
    args.extend_from_slice(extra);
    let out = output(&mut command(BLOCKWATCH, &args));
    let report = parse_json(&String::from_utf8_lossy(&out.stdout), "verify --json");
    (out.status.code(), report)
}

/// `verify IMAGE tape:...`: the chain at its newest checkpoint compared
/// with the disk as of that checkpoint, live (regions written since are
/// skipped and counted) and offline; a checkpoint tracking no longer has
/// is refused; and a change tracking could not see (written behind its
/// back with the image's mtime put back) is found.
#[test]
fn a_tape_chain_is_verified_against_its_disk() {
    let dir = TempDir::new("copy-tape-verify");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "32M");
    qemu_io(&server.uri(), &["write -P 1 0 8M"]);
    let tape = dir.join("disk.tape");
    let target = format!("tape:{}", tape.display());
    let first = copied(&image, &target, &[]);
    qemu_io(&server.uri(), &["write -P 2 4M 1M"]);
    let second = copied(&image, &target, &[]);
    let regions = (32 << 20) / 65536;

    let (code, report) = verify_json(&image, &target, &[]);
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["checkpoint"], second["checkpoint"], "{report:#}");
    assert_eq!(report["regions_compared"], regions, "{report:#}");
    assert_eq!(report["regions_differing"], 0, "{report:#}");

    qemu_io(&server.uri(), &["write -P 3 16M 128K"]);
    let (code, report) = verify_json(&image, &target, &[]);
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["regions_skipped"], 2, "{report:#}");
    assert_eq!(report["regions_compared"], regions - 2, "{report:#}");

    // Only the newest copy's checkpoint is kept: the first one's state of
    // the disk is unknown, which is said, not guessed.
    let at_first = output(&mut command(
        BLOCKWATCH,
        [
            "verify",
            image.to_str().unwrap(),
            target.as_str(),
            "--at",
            first["checkpoint"].as_str().unwrap(),
        ],
    ));
    assert_eq!(at_first.status.code(), Some(2), "{at_first:?}");
    assert!(
        String::from_utf8_lossy(&at_first.stderr).contains("no longer has"),
        "{at_first:?}"
    );
    // --at names a point of the chain to compare with a disk.
    let alone = output(&mut command(
        BLOCKWATCH,
        ["verify", target.as_str(), "--at", "x"],
    ));
    assert_eq!(alone.status.code(), Some(2), "{alone:?}");
    assert!(
        String::from_utf8_lossy(&alone.stderr).contains("name the disk first"),
        "{alone:?}"
    );
    server.stop();

    let (code, report) = verify_json(&image, &target, &[]);
    assert_eq!(code, Some(0), "offline: {report:#}");
    assert_eq!(report["regions_skipped"], 2, "{report:#}");

    let mtime = std::fs::metadata(&image).unwrap().modified().unwrap();
    write_at(&image, 20 << 20, b"unseen");
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let verified = output(&mut command(
        BLOCKWATCH,
        ["verify", image.to_str().unwrap(), target.as_str()],
    ));
    assert_eq!(verified.status.code(), Some(1), "{verified:?}");
    let said = String::from_utf8_lossy(&verified.stdout);
    assert!(
        said.contains(&format!("differs {} 65536", 20 << 20)),
        "{said}"
    );
}
