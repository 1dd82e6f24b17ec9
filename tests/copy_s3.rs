//! `blockwatch copy --to s3://BUCKET/PREFIX` end to end against real S3
//! servers on loopback (s3s-fs in this process, whose objects are files a
//! test can grep and damage, and moto_server): full and incremental
//! sessions of a live disk restored and compared with cmp; deduplication
//! (a second full of an unchanged disk, two disks with common data);
//! encryption (no plaintext in the bucket, a wrong or missing key
//! refused); a copy killed mid-upload leaves no session and its rerun
//! reuses the chunks; prune under a concurrent restore; damaged chunks
//! found by verify and by restore; `sessions` of every kind of target.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use testkit::*;

const BUCKET: &str = "backups";

fn blockwatch(s3: &S3Server, args: &[&str]) -> Command {
    let mut command = command(BLOCKWATCH, args);
    for (name, value) in s3.env() {
        command.env(name, value);
    }
    command
}

fn run_ok(s3: &S3Server, args: &[&str]) -> String {
    let out = output(&mut blockwatch(s3, args));
    assert!(
        out.status.success(),
        "blockwatch {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs blockwatch expecting it to fail (exit 2) with each of `messages`
/// in what it printed on stderr.
fn refused(s3: &S3Server, args: &[&str], messages: &[&str]) {
    let out = output(&mut blockwatch(s3, args));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    for message in messages {
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

fn copied(s3: &S3Server, image: &Path, target: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["copy", image.to_str().unwrap(), "--to", target, "--json"];
    args.extend_from_slice(extra);
    parse_json(&run_ok(s3, &args), "copy --json")
}

fn restore(s3: &S3Server, source: &str, to: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["restore", source, "--to", to.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    parse_json(&run_ok(s3, &args), "restore --json")
}

fn sessions(s3: &S3Server, target: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["sessions", target, "--json"];
    args.extend_from_slice(extra);
    parse_json(&run_ok(s3, &args), "sessions --json")
        .as_array()
        .unwrap()
        .clone()
}

fn uploaded(summary: &serde_json::Value) -> u64 {
    summary["stored"]["uploaded_bytes"].as_u64().unwrap()
}

fn new_bytes(summary: &serde_json::Value) -> u64 {
    summary["stored"]["new_bytes"].as_u64().unwrap()
}

/// Full, then two incrementals of a served disk under qemu-io writes; each
/// session restored equals the disk as it was at its checkpoint.
fn chain_through(s3: &S3Server, dir: &TempDir, extra: &[&str]) {
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");
    qemu_io(&server.uri(), CHAIN_START);
    let target = format!("s3://{BUCKET}/chain");
    let mut states = Vec::new();
    for (round, commands) in CHAIN_ROUNDS.iter().enumerate() {
        qemu_io(&server.uri(), commands);
        let at = dir.join(format!("at-{round}.img"));
        std::fs::copy(&image, &at).unwrap();
        let summary = copied(s3, &image, &target, extra);
        assert_eq!(
            summary["kind"],
            if round == 0 { "full" } else { "incremental" },
            "{summary:#}"
        );
        if round > 0 {
            // Only the changed bytes are new, and the new bytes of an
            // incremental are what its writes wrote (qemu-io's patterns
            // compress, so the upload is smaller still).
            assert!(new_bytes(&summary) <= 2 << 20, "{summary:#}");
            assert!(
                uploaded(&summary) <= new_bytes(&summary) + 4096,
                "{summary:#}"
            );
        }
        states.push((
            summary["stored"]["session"].as_str().unwrap().to_string(),
            at,
        ));
    }
    server.stop();
    let listed = sessions(s3, &target, extra);
    assert_eq!(listed.len(), 3, "{listed:#?}");
    for (session, at) in &states {
        let restored = dir.join(format!("restored-{session}.img"));
        let summary = restore(s3, &format!("{target}#{session}"), &restored, extra);
        assert_eq!(summary["session"], session.as_str());
        assert_files_equal(at, &restored);
    }
    // No session named: the newest, as the repository holds one disk's.
    let newest = dir.join("newest.img");
    restore(s3, &target, &newest, extra);
    assert_files_equal(&states[2].1, &newest);
    let mut verify_args = vec!["verify", target.as_str()];
    verify_args.extend_from_slice(extra);
    let verified = output(&mut blockwatch(s3, &verify_args));
    assert_eq!(verified.status.code(), Some(0), "{verified:?}");
    // The newest session compared with the disk it was copied from.
    let mut verify_args = vec!["verify", image.to_str().unwrap(), target.as_str(), "--json"];
    verify_args.extend_from_slice(extra);
    let verified = output(&mut blockwatch(s3, &verify_args));
    let report = parse_json(&String::from_utf8_lossy(&verified.stdout), "verify --json");
    assert_eq!(verified.status.code(), Some(0), "{verified:?}");
    assert_eq!(report["regions_compared"], (64 << 20) / 65536, "{report:#}");
    assert_eq!(report["regions_differing"], 0, "{report:#}");
    let newest_checkpoint = sessions(s3, &target, extra)
        .iter()
        .find(|row| row["session"] == states[2].0.as_str())
        .map(|row| row["checkpoint"].clone());
    assert_eq!(
        Some(report["checkpoint"].clone()),
        newest_checkpoint,
        "{report:#}"
    );
}

#[test]
fn a_live_disk_copied_to_s3s_fs_restores_each_session() {
    let dir = TempDir::new("copy-s3-chain");
    let s3 = S3Server::s3s_fs(&dir.join("s3"));
    s3.create_bucket(BUCKET);
    chain_through(&s3, &dir, &[]);
    // Nothing but the repository's own objects.
    for key in s3.object_keys(BUCKET) {
        let known = ["config", "packs/", "index/", "sessions/"];
        assert!(
            known
                .iter()
                .any(|prefix| key.starts_with(&format!("chain/{prefix}"))),
            "{key}"
        );
    }
}

#[test]
fn a_live_disk_copied_to_moto_restores_each_session() {
    let dir = TempDir::new("copy-s3-moto");
    let s3 = S3Server::moto(dir.path());
    s3.create_bucket(BUCKET);
    chain_through(&s3, &dir, &[]);
}

/// A 4 KiB block no compressor shrinks, to find in the bucket's bytes.
fn marker(seed: u64) -> Vec<u8> {
    random_bytes(seed, 4096)
}

fn bucket_holds(s3: &S3Server, needle: &[u8]) -> bool {
    s3.object_keys(BUCKET).iter().any(|key| {
        let bytes = std::fs::read(s3.object_path(BUCKET, key)).unwrap();
        bytes.windows(needle.len()).any(|window| window == needle)
    })
}

#[test]
fn an_encrypted_repository_holds_no_plaintext_and_refuses_a_wrong_or_missing_key() {
    let dir = TempDir::new("copy-s3-encrypt");
    let s3 = S3Server::s3s_fs(&dir.join("s3"));
    s3.create_bucket(BUCKET);
    let image = dir.join("disk.img");
    create_sparse_file(&image, 16 << 20);
    let secret = marker(11);
    write_at(&image, 5 << 20, &secret);
    let key = dir.join("key");
    std::fs::write(&key, random_bytes(1, 32)).unwrap();
    let wrong = dir.join("wrong");
    std::fs::write(&wrong, "ab".repeat(32)).unwrap();
    let key_arg = key.to_str().unwrap();
    // Tracking state for an image that was never served.
    run_ok(
        &s3,
        &[
            "serve",
            image.to_str().unwrap(),
            "-U",
            dir.join("s").to_str().unwrap(),
            "--run",
            "true",
        ],
    );
    copied(&s3, &image, "s3://backups/secret", &["--encrypt", key_arg]);
    assert!(
        !bucket_holds(&s3, &secret),
        "the bucket holds the disk's bytes in clear"
    );
    // Without encryption the same bytes are there to see: the grep works.
    copied(&s3, &image, "s3://backups/clear", &["--full"]);
    assert!(bucket_holds(&s3, &secret));

    for (args, message) in [
        (
            vec!["sessions", "s3://backups/secret"],
            "give its key file with --encrypt",
        ),
        (
            vec![
                "sessions",
                "s3://backups/secret",
                "--encrypt",
                wrong.to_str().unwrap(),
            ],
            "does not open",
        ),
        (
            vec![
                "restore",
                "s3://backups/secret",
                "--to",
                dir.join("r.img").to_str().unwrap(),
                "--encrypt",
                wrong.to_str().unwrap(),
            ],
            "does not open",
        ),
        (
            vec![
                "copy",
                image.to_str().unwrap(),
                "--to",
                "s3://backups/clear",
                "--encrypt",
                key_arg,
            ],
            "is not encrypted",
        ),
    ] {
        refused(&s3, &args, &[message]);
    }
    assert!(
        !dir.join("r.img").exists() || std::fs::metadata(dir.join("r.img")).unwrap().len() == 0
    );
    let restored = dir.join("restored.img");
    restore(
        &s3,
        "s3://backups/secret",
        &restored,
        &["--encrypt", key_arg],
    );
    assert_files_equal(&image, &restored);
}

/// Tracking state for an image that is not served (a copy reads it
/// directly).
fn track(s3: &S3Server, dir: &TempDir, image: &Path) {
    let socket = dir.join(format!(
        "{}.sock",
        image.file_name().unwrap().to_str().unwrap()
    ));
    run_ok(
        s3,
        &[
            "serve",
            image.to_str().unwrap(),
            "-U",
            socket.to_str().unwrap(),
            "--run",
            "true",
        ],
    );
}

#[test]
fn a_second_full_uploads_almost_nothing_and_two_disks_share_their_common_chunks() {
    let dir = TempDir::new("copy-s3-dedup");
    let s3 = S3Server::s3s_fs(&dir.join("s3"));
    s3.create_bucket(BUCKET);
    let image = dir.join("a.img");
    create_sparse_file(&image, 64 << 20);
    for (index, offset) in [0u64, 9 << 20, 30 << 20, 47 << 20].iter().enumerate() {
        write_at(&image, *offset, &random_bytes(index as u64 + 1, 3 << 20));
    }
    track(&s3, &dir, &image);
    let target = "s3://backups/repo";
    let first = copied(&s3, &image, target, &[]);
    assert_eq!(new_bytes(&first), 12 << 20, "{first:#}");
    let second = copied(&s3, &image, target, &["--full"]);
    assert_eq!(second["kind"], "full");
    assert_eq!(new_bytes(&second), 0, "{second:#}");
    assert!(uploaded(&second) <= (64 << 20) / 100, "{second:#}");

    // Another disk (its own identity) with the same data but one region.
    let other = dir.join("b.img");
    std::fs::copy(&image, &other).unwrap();
    write_at(&other, 30 << 20, &random_bytes(99, 1 << 20));
    track(&s3, &dir, &other);
    let theirs = copied(&s3, &other, target, &[]);
    assert_eq!(theirs["kind"], "full");
    // The 4 MiB cell the new region fell in is new; the rest is shared.
    assert!(new_bytes(&theirs) <= 4 << 20, "{theirs:#}");
    let listed = sessions(&s3, target, &[]);
    assert_eq!(listed.len(), 3);
    let disks: std::collections::BTreeSet<&str> = listed
        .iter()
        .map(|row| row["disk"].as_str().unwrap())
        .collect();
    assert_eq!(disks.len(), 2, "{listed:#?}");
    // Two disks' sessions: a restore must be told which.
    refused(
        &s3,
        &[
            "restore",
            target,
            "--to",
            dir.join("x.img").to_str().unwrap(),
        ],
        &["2 disks"],
    );
    // B's one session (the listing sorts by disk, then time).
    let row_of = |summary: &serde_json::Value| {
        listed
            .iter()
            .find(|row| row["session"] == summary["stored"]["session"])
            .unwrap()
            .clone()
    };
    assert_ne!(row_of(&theirs)["disk"], row_of(&first)["disk"]);
    let session = row_of(&theirs)["session"].as_str().unwrap().to_string();
    let restored = dir.join("b-restored.img");
    restore(&s3, &format!("{target}#{session}"), &restored, &[]);
    assert_files_equal(&other, &restored);
}

fn keys_under(s3: &S3Server, prefix: &str) -> Vec<String> {
    s3.object_keys(BUCKET)
        .into_iter()
        .filter(|key| key.starts_with(prefix))
        .collect()
}

/// The files of the local pack-index cache, of every repository.
fn cached_indexes(s3: &S3Server) -> Vec<PathBuf> {
    let root = s3.client_cache().join("blockwatch/s3-index");
    let Ok(repositories) = std::fs::read_dir(&root) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = repositories
        .flatten()
        .flat_map(|repository| std::fs::read_dir(repository.path()).unwrap().flatten())
        .map(|entry| entry.path())
        .collect();
    files.sort();
    files
}

fn index_reads(summary: &serde_json::Value) -> (u64, u64) {
    let stored = &summary["stored"];
    (
        stored["indexes_cached"].as_u64().unwrap(),
        stored["indexes_fetched"].as_u64().unwrap(),
    )
}

/// A copy reads from the service only the pack indexes it has not seen
/// (its own uploads, and those it read, are cached) and the rest from the
/// local cache, checked again at each use: a damaged cache file is read
/// from the service instead (deduplication intact), an index the service
/// no longer lists leaves the cache, and `--s3-cache off` reads every
/// index.
#[test]
fn later_copies_read_pack_indexes_from_the_cache_and_never_trust_a_damaged_one() {
    let dir = TempDir::new("copy-s3-index-cache");
    let s3 = S3Server::s3s_fs(&dir.join("s3"));
    s3.create_bucket(BUCKET);
    let image = dir.join("disk.img");
    create_sparse_file(&image, 64 << 20);
    for (index, offset) in [0u64, 20 << 20, 41 << 20].iter().enumerate() {
        write_at(&image, *offset, &random_bytes(index as u64 + 7, 12 << 20));
    }
    track(&s3, &dir, &image);
    let target = "s3://backups/cached";
    let first = copied(&s3, &image, target, &[]);
    assert_eq!(
        index_reads(&first),
        (0, 0),
        "an empty repository: {first:#}"
    );
    let packs = keys_under(&s3, "cached/index/").len() as u64;
    assert!(packs >= 2, "36 MiB of data in 16 MiB packs: {packs}");
    assert_eq!(
        cached_indexes(&s3).len() as u64,
        packs,
        "the indexes a copy uploads are cached"
    );

    let second = copied(&s3, &image, target, &["--full"]);
    assert_eq!(
        index_reads(&second),
        (packs, 0),
        "all from the cache: {second:#}"
    );
    assert_eq!(new_bytes(&second), 0, "{second:#}");

    // A flipped byte in every cached index: none is trusted, each is read
    // from the service again, and nothing is uploaded twice.
    for file in cached_indexes(&s3) {
        let mut bytes = std::fs::read(&file).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x20;
        std::fs::write(&file, bytes).unwrap();
    }
    let damaged = copied(&s3, &image, target, &["--full"]);
    assert_eq!(index_reads(&damaged), (0, packs), "{damaged:#}");
    assert_eq!(new_bytes(&damaged), 0, "{damaged:#}");
    let again = copied(&s3, &image, target, &["--full"]);
    assert_eq!(index_reads(&again), (packs, 0), "cached again: {again:#}");

    // An index the service no longer lists leaves the cache.
    let gone = keys_under(&s3, "cached/index/").remove(0);
    std::fs::remove_file(s3.object_path(BUCKET, &gone)).unwrap();
    let pruned = copied(&s3, &image, target, &["--full"]);
    let (cached, fetched) = index_reads(&pruned);
    assert_eq!((cached, fetched), (packs - 1, 0), "{pruned:#}");
    let gone_name = gone.rsplit('/').next().unwrap();
    assert!(
        cached_indexes(&s3)
            .iter()
            .all(|file| file.file_name().unwrap() != gone_name),
        "the unlisted index is still cached"
    );

    let uncached = copied(&s3, &image, target, &["--full", "--s3-cache", "off"]);
    let listed = keys_under(&s3, "cached/index/").len() as u64;
    assert_eq!(index_reads(&uncached), (0, listed), "{uncached:#}");
}

#[test]
fn a_copy_killed_mid_upload_leaves_no_session_and_its_rerun_reuses_the_uploaded_chunks() {
    let dir = TempDir::new("copy-s3-kill");
    let s3 = S3Server::s3s_fs(&dir.join("s3"));
    s3.create_bucket(BUCKET);
    let image = dir.join("disk.img");
    create_sparse_file(&image, 512 << 20);
    write_at(&image, 0, &random_bytes(5, 400 << 20));
    track(&s3, &dir, &image);
    let target = "s3://backups/killed";
    let mut copy = blockwatch(
        &s3,
        &["copy", image.to_str().unwrap(), "--to", target, "--json"],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    wait_until("a first pack index", Duration::from_secs(60), || {
        !keys_under(&s3, "killed/index/").is_empty()
    });
    signal(copy.id(), libc::SIGKILL);
    let status = copy.wait().unwrap();
    assert!(!status.success(), "the copy finished before it was killed");
    let indexes = keys_under(&s3, "killed/index/").len();
    assert!(keys_under(&s3, "killed/sessions/").is_empty());
    assert!(sessions(&s3, target, &[]).is_empty());
    refused(
        &s3,
        &[
            "restore",
            target,
            "--to",
            dir.join("none.img").to_str().unwrap(),
        ],
        &["no sessions"],
    );

    let rerun = copied(&s3, &image, target, &[]);
    assert_eq!(rerun["kind"], "full");
    let reused = rerun["data_bytes"].as_u64().unwrap() - new_bytes(&rerun);
    assert!(
        reused >= indexes as u64 * (8 << 20),
        "{indexes} packs were uploaded before the kill; the rerun reused {reused} bytes: {rerun:#}"
    );
    let restored = dir.join("restored.img");
    restore(&s3, target, &restored, &[]);
    assert_files_equal(&image, &restored);
}

/// The bytes a served export holds, read by nbdcopy.
fn export_bytes(uri: &str, to: &Path) {
    run_program("nbdcopy", [uri, to.to_str().unwrap()]);
}

#[test]
fn prune_under_a_concurrent_restore_keeps_every_chunk_the_restore_needs() {
    let dir = TempDir::new("copy-s3-prune");
    let s3 = S3Server::s3s_fs(&dir.join("s3"));
    s3.create_bucket(BUCKET);
    let image = dir.join("disk.img");
    create_sparse_file(&image, 32 << 20);
    write_at(&image, 0, &random_bytes(1, 16 << 20));
    track(&s3, &dir, &image);
    let target = "s3://backups/pruned";
    let old = copied(&s3, &image, target, &[]);
    let old_session = old["stored"]["session"].as_str().unwrap().to_string();
    let old_state = dir.join("old.img");
    std::fs::copy(&image, &old_state).unwrap();
    // The next session shares none of the old one's data.
    write_at(&image, 0, &random_bytes(2, 16 << 20));
    copied(&s3, &image, target, &["--full"]);
    let packs_before = keys_under(&s3, "pruned/packs/");

    // A restore of the old session to a slow NBD target (one request at
    // a time, each write waiting 1 s), so that it is still running while
    // prune runs.
    require_tool("nbdkit", "nbdkit");
    let socket = dir.join("slow.sock");
    let nbdkit = ServerProcess::start(
        "nbdkit",
        &[
            "-f",
            "-t",
            "1",
            "-U",
            socket.to_str().unwrap(),
            "--filter=delay",
            "memory",
            "32M",
            "wdelay=1",
        ],
        &socket,
        &dir.join("nbdkit.log"),
    );
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let mut restoring = blockwatch(
        &s3,
        &["restore", &format!("{target}#{old_session}"), "--to", &uri],
    )
    .stdout(std::process::Stdio::null())
    .spawn()
    .unwrap();
    wait_until("the restore's lock", Duration::from_secs(30), || {
        !keys_under(&s3, "pruned/locks/").is_empty()
    });
    std::thread::sleep(Duration::from_millis(300));
    let first = parse_json(
        &run_ok(&s3, &["prune", target, "--keep-last", "1", "--json"]),
        "prune --json",
    );
    assert_eq!(
        first["sessions_removed"].as_array().unwrap().len(),
        1,
        "{first:#}"
    );
    assert!(first["packs_marked"].as_u64().unwrap() > 0, "{first:#}");
    assert_eq!(first["packs_deleted"], 0, "{first:#}");
    assert!(
        first["waiting_for_locks"].as_u64().unwrap() >= 1,
        "{first:#}"
    );
    // A second prune while the restore still runs deletes nothing either.
    let second = parse_json(
        &run_ok(&s3, &["prune", target, "--keep-last", "1", "--json"]),
        "prune --json",
    );
    assert_eq!(second["packs_deleted"], 0, "{second:#}");
    assert_eq!(keys_under(&s3, "pruned/packs/"), packs_before);
    let status = restoring.wait().unwrap();
    assert!(status.success(), "the restore failed: {status:?}");
    let restored = dir.join("restored.img");
    export_bytes(&uri, &restored);
    assert_files_equal(&old_state, &restored);
    drop(nbdkit);

    // With no one else holding a lock, the next prune deletes the packs
    // only the removed session needed; what is left still verifies.
    let third = parse_json(
        &run_ok(&s3, &["prune", target, "--keep-last", "1", "--json"]),
        "prune --json",
    );
    assert_eq!(third["packs_deleted"], first["packs_marked"], "{third:#}");
    assert!(keys_under(&s3, "pruned/packs/").len() < packs_before.len());
    assert!(keys_under(&s3, "pruned/marks/").is_empty());
    let verified = output(&mut blockwatch(&s3, &["verify", target]));
    assert_eq!(verified.status.code(), Some(0), "{verified:?}");
    let newest = dir.join("newest.img");
    restore(&s3, target, &newest, &[]);
    assert_files_equal(&image, &newest);
    // A prune that would keep nothing is refused.
    refused(&s3, &["prune", target], &["keeps nothing"]);
}

#[test]
fn a_damaged_chunk_is_found_by_verify_and_stops_a_restore() {
    let dir = TempDir::new("copy-s3-damage");
    let s3 = S3Server::s3s_fs(&dir.join("s3"));
    s3.create_bucket(BUCKET);
    let image = dir.join("disk.img");
    create_sparse_file(&image, 32 << 20);
    write_at(&image, 0, &random_bytes(3, 24 << 20));
    track(&s3, &dir, &image);
    let target = "s3://backups/damaged";
    copied(&s3, &image, target, &[]);
    let sampled = output(&mut blockwatch(
        &s3,
        &["verify", target, "--sample", "10", "--json"],
    ));
    assert_eq!(sampled.status.code(), Some(0), "{sampled:?}");
    let report = parse_json(&String::from_utf8_lossy(&sampled.stdout), "verify --json");
    assert!(
        report["chunks_checked"].as_u64() < report["chunks_total"].as_u64(),
        "{report:#}"
    );

    let pack = keys_under(&s3, "damaged/packs/").remove(0);
    let path: PathBuf = s3.object_path(BUCKET, &pack);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();

    let verified = output(&mut blockwatch(&s3, &["verify", target]));
    let stdout = String::from_utf8_lossy(&verified.stdout);
    assert_eq!(verified.status.code(), Some(1), "{verified:?}");
    assert!(
        stdout.contains("damaged") && stdout.contains(&pack),
        "{stdout}"
    );
    refused(
        &s3,
        &[
            "restore",
            target,
            "--to",
            dir.join("r.img").to_str().unwrap(),
        ],
        &["damaged", "partly restored"],
    );
}

#[test]
fn sessions_lists_what_a_replica_and_a_tape_hold() {
    let dir = TempDir::new("copy-s3-sessions");
    let s3 = S3Server::s3s_fs(&dir.join("s3"));
    let image = dir.join("disk.img");
    create_sparse_file(&image, 8 << 20);
    write_at(&image, 0, &random_bytes(4, 1 << 20));
    track(&s3, &dir, &image);
    let replica = dir.join("replica.img");
    let tape = format!("tape:{}", dir.join("disk.tape").display());
    let first = copied(&s3, &image, replica.to_str().unwrap(), &[]);
    copied(&s3, &image, &tape, &[]);
    write_at(&image, 0, &random_bytes(5, 4096));
    let second = copied(&s3, &image, &tape, &[]);
    let rows = sessions(&s3, replica.to_str().unwrap(), &[]);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["checkpoint"], first["checkpoint"]);
    let rows = sessions(&s3, &tape, &[]);
    assert_eq!(rows.len(), 2, "{rows:#?}");
    assert_eq!(rows[0]["kind"], "full");
    assert_eq!(rows[1]["kind"], "incremental");
    assert_eq!(rows[1]["checkpoint"], second["checkpoint"]);
}
