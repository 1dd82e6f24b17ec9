//! Files out of block backups, end to end: a served ext4 disk whose files
//! are created, modified, renamed, hard-linked and deleted across three
//! checkpoints, each copied live to a tape chain and to an object storage
//! repository (s3s-fs on loopback). For every checkpoint:
//! `files --at` lists exactly what the mounted disk held then (paths,
//! kinds, sizes, inodes, mtimes, modes), `restore --file` gives back each
//! file as it was (cmp), a sparse file stays sparse and a file with a
//! deep extent tree reads right; the backup served with `serve -r` mounts,
//! `e2fsck -fn` finds it clean, its tree equals the disk's (diff -r) and
//! writes to it are refused; with `--overlay` writes land in the overlay
//! and the tape chain still verifies.
//!
//! Needs root (mount); as another user each test prints a note and passes.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{BLOCKWATCH, LiveFs, Server};
use testkit::*;

const IMAGE_SIZE_BYTES: u64 = 128 * MIB;
const BUCKET: &str = "backups";

/// What `find` and `stat` say of one path of the mounted disk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    kind: char,
    size_bytes: u64,
    inode: u64,
    mtime_seconds: i64,
    permissions: u32,
}

/// The disk at one checkpoint: its listing and a copy of its tree.
struct AtCheckpoint {
    /// The checkpoints of the tape's session and the repository's (each
    /// copy takes its own, with nothing written between them).
    checkpoint: String,
    s3_checkpoint: String,
    listing: BTreeMap<String, Listed>,
    tree: PathBuf,
}

impl AtCheckpoint {
    /// The checkpoint `target` holds this state as.
    fn at(&self, target: &str) -> &str {
        if target.starts_with("s3://") {
            &self.s3_checkpoint
        } else {
            &self.checkpoint
        }
    }
}

fn kind_of(metadata: &std::fs::Metadata) -> char {
    let kind = metadata.file_type();
    if kind.is_dir() {
        '/'
    } else if kind.is_symlink() {
        '@'
    } else if kind.is_file() {
        'F'
    } else {
        '|'
    }
}

/// Every path under `root` (but `root` itself), as `find` lists them.
fn listing(root: &Path) -> BTreeMap<String, Listed> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let metadata = std::fs::symlink_metadata(&path).unwrap();
            let relative = format!("/{}", path.strip_prefix(root).unwrap().display());
            if metadata.is_dir() {
                stack.push(path.clone());
            }
            out.insert(
                relative,
                Listed {
                    kind: kind_of(&metadata),
                    size_bytes: if metadata.is_dir() { 0 } else { metadata.len() },
                    inode: metadata.ino(),
                    mtime_seconds: metadata.mtime(),
                    permissions: metadata.mode() & 0o7777,
                },
            );
        }
    }
    out
}

/// `files TARGET --at CHECKPOINT --json`, as the same listing.
fn listed_by_blockwatch(
    env: &[(String, String)],
    target: &[&str],
    at: &str,
) -> BTreeMap<String, Listed> {
    let mut args = vec!["files"];
    args.extend_from_slice(target);
    args.extend_from_slice(&["--at", at, "--json"]);
    let reply = parse_json(&run_ok(env, &args), "files --json");
    let mut out = BTreeMap::new();
    for file in reply["files"].as_array().unwrap() {
        let kind = file["kind"].as_str().unwrap().chars().next().unwrap();
        out.insert(
            file["path"].as_str().unwrap().to_string(),
            Listed {
                kind,
                size_bytes: if kind == '/' {
                    0
                } else {
                    file["size_bytes"].as_u64().unwrap()
                },
                inode: file["inode"].as_u64().unwrap(),
                mtime_seconds: file["mtime"].as_i64().unwrap(),
                permissions: file["permissions"].as_u64().unwrap() as u32,
            },
        );
    }
    out
}

fn blockwatch(env: &[(String, String)], args: &[&str]) -> Command {
    let mut command = command(BLOCKWATCH, args);
    for (name, value) in env {
        command.env(name, value);
    }
    command
}

fn run_ok(env: &[(String, String)], args: &[&str]) -> String {
    let out = output(&mut blockwatch(env, args));
    assert!(
        out.status.success(),
        "blockwatch {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A file of `extent_count` 4 KiB extents with a hole after each: more
/// extents than one tree block holds, so its extent tree is deep.
fn write_fragmented(path: &Path, extent_count: u64, seed: u64) {
    let file = std::fs::File::create(path).unwrap();
    let data = random_bytes(seed, (extent_count * 4096) as usize);
    for index in 0..extent_count {
        let block = &data[(index * 4096) as usize..((index + 1) * 4096) as usize];
        file.write_all_at(block, index * 8192).unwrap();
    }
    file.sync_all().unwrap();
}

/// Three rounds of changes, each copied to the tape and the repository;
/// the disk as each checkpoint saw it.
fn three_checkpoints(
    fs: &LiveFs,
    env: &[(String, String)],
    tape: &str,
    s3: &str,
) -> Vec<AtCheckpoint> {
    let mut out = Vec::new();
    for round in 0..3u64 {
        match round {
            0 => {
                fs.mkdir("/docs/deep/er");
                fs.write("/docs/a.txt", 1, 10_000);
                fs.write("/docs/deep/er/b.bin", 2, 300_000);
                fs.write("/big", 3, 3 * MIB);
                let sparse = fs.path("/sparse");
                create_sparse_file(&sparse, 64 * MIB);
                for (seed, offset) in [(4u64, 0u64), (5, 8 * MIB), (6, 40 * MIB + 4096)] {
                    write_at(&sparse, offset, &random_bytes(seed, 8192));
                }
                write_fragmented(&fs.path("/frag"), 1500, 7);
                std::fs::hard_link(fs.path("/docs/a.txt"), fs.path("/docs/hard")).unwrap();
                std::os::unix::fs::symlink("docs/a.txt", fs.path("/link")).unwrap();
                std::os::unix::fs::symlink("x".repeat(200), fs.path("/long-link")).unwrap();
            }
            1 => {
                fs.append("/docs/a.txt", 8, 5_000);
                fs.rename("/big", "/docs/big-renamed");
                fs.write("/new.bin", 9, 100_000);
                std::fs::set_permissions(
                    fs.path("/docs/deep/er/b.bin"),
                    std::os::unix::fs::PermissionsExt::from_mode(0o640),
                )
                .unwrap();
            }
            _ => {
                fs.remove("/docs/hard");
                fs.remove("/new.bin");
                write_at(&fs.path("/frag"), 100 * 8192, &random_bytes(10, 4096));
                write_at(&fs.path("/sparse"), 20 * MIB, &random_bytes(11, 4096));
            }
        }
        fs.sync();
        let tree = fs.dir.join(format!("tree-{round}"));
        run_program(
            "cp",
            [
                "-a".as_ref(),
                fs.mount_dir().join(".").as_os_str(),
                tree.as_os_str(),
            ],
        );
        let image = fs.image_arg();
        let summary = parse_json(
            &run_ok(env, &["copy", image, "--to", tape, "--json"]),
            "copy --json",
        );
        for (target, name) in [("changes.tar", "all"), ("bins.tar", "bins")] {
            let tar_target = format!("tar:{}", fs.dir.join(target).display());
            let mut args = vec!["copy", image, "--to", tar_target.as_str(), "--json"];
            if name == "bins" {
                args.extend_from_slice(&["--include", "*.bin"]);
            }
            let copied = parse_json(&run_ok(env, &args), "copy --json");
            std::fs::write(
                fs.dir.join(format!("{name}-{round}.deleted")),
                copied["archive"]["deleted"].to_string(),
            )
            .unwrap();
            std::fs::rename(
                fs.dir.join(target),
                fs.dir.join(format!("{name}-{round}.tar")),
            )
            .unwrap();
        }
        let s3_summary = parse_json(
            &run_ok(env, &["copy", image, "--to", s3, "--json"]),
            "copy --json",
        );
        out.push(AtCheckpoint {
            checkpoint: summary["checkpoint"].as_str().unwrap().to_string(),
            s3_checkpoint: s3_summary["checkpoint"].as_str().unwrap().to_string(),
            listing: listing(fs.mount_dir()),
            tree,
        });
    }
    out
}

fn start_ext4(dir: TempDir) -> LiveFs {
    let image = dir.join("disk.img");
    create_sparse_file(&image, IMAGE_SIZE_BYTES);
    run_program(
        "mkfs.ext4",
        [
            "-q",
            "-F",
            "-b",
            "4096",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            image.to_str().unwrap(),
        ],
    );
    LiveFs::start(dir, &image, &[], IMAGE_SIZE_BYTES, "loop", 0)
}

/// Blocks (512 bytes) a file takes.
fn allocated_sectors(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks()
}

/// Single files, a directory tree and stdout, restored from `target` at
/// each checkpoint, equal the disk's files then.
fn check_file_restores(
    env: &[(String, String)],
    dir: &Path,
    target: &[&str],
    states: &[AtCheckpoint],
) {
    for (round, state) in states.iter().enumerate() {
        let to = dir.join(format!(
            "restored-{}-{round}",
            target[0].split(':').next().unwrap()
        ));
        let mut args = vec!["restore"];
        args.extend_from_slice(target);
        args.extend_from_slice(&["--at", state.at(target[0]), "--to", to.to_str().unwrap()]);
        let regular: Vec<&String> = state
            .listing
            .iter()
            .filter(|(_, listed)| listed.kind == 'F')
            .map(|(path, _)| path)
            .collect();
        for path in &regular {
            args.extend_from_slice(&["--file", path]);
        }
        run_ok(env, &args);
        for path in &regular {
            let relative = path.trim_start_matches('/');
            assert_files_equal(&state.tree.join(relative), &to.join(relative));
            let restored = std::fs::metadata(to.join(relative)).unwrap();
            let listed = &state.listing[*path];
            assert_eq!(
                restored.mode() & 0o7777,
                listed.permissions,
                "{path} at {round}"
            );
            assert_eq!(restored.mtime(), listed.mtime_seconds, "{path} at {round}");
        }
        // The sparse file's 64 MiB hold a few blocks of data.
        assert!(
            allocated_sectors(&to.join("sparse")) < 2 * 1024 * 2,
            "sparse at {round}"
        );
        // A directory comes back whole, symlinks and all.
        let tree_to = dir.join(format!(
            "tree-restored-{}-{round}",
            target[0].split(':').next().unwrap()
        ));
        let mut args = vec!["restore"];
        args.extend_from_slice(target);
        args.extend_from_slice(&[
            "--at",
            state.at(target[0]),
            "--file",
            "/",
            "--to",
            tree_to.to_str().unwrap(),
        ]);
        run_ok(env, &args);
        run_program(
            "diff",
            [
                "-r",
                "--no-dereference",
                state.tree.to_str().unwrap(),
                tree_to.to_str().unwrap(),
            ],
        );
        assert_eq!(
            std::fs::read_link(tree_to.join("link")).unwrap(),
            Path::new("docs/a.txt")
        );
        // One file to stdout.
        let mut args = vec!["restore"];
        args.extend_from_slice(target);
        args.extend_from_slice(&[
            "--at",
            state.at(target[0]),
            "--file",
            "/docs/a.txt",
            "--to",
            "-",
        ]);
        let out = output(&mut blockwatch(env, &args));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == std::fs::read(state.tree.join("docs/a.txt")).unwrap());
    }
}

/// `serve TARGET@CHECKPOINT -r`: mounts read-only, e2fsck finds it clean,
/// its tree is the disk's, and writes are refused.
fn check_served(dir: &Path, words: &[&str], state: &AtCheckpoint, env: &[(String, String)]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut args: Vec<&str> = words.to_vec();
    args.extend_from_slice(&["--at", state.at(words[0]), "-r"]);
    let server = Server::start_with_env(dir, &[], &args, env);
    let refused = output(&mut command(
        "qemu-io",
        ["-f", "raw", "-c", "write 0 4k", &server.uri()],
    ));
    let said = String::from_utf8_lossy(&refused.stderr).to_string()
        + &String::from_utf8_lossy(&refused.stdout);
    assert!(
        !refused.status.success() || said.contains("not permitted") || said.contains("denied"),
        "a write to a backup: {said}"
    );
    let fuse = FuseExport::start(
        &dir.join("fuse"),
        &server.uri(),
        &dir.join("fuse.log"),
        IMAGE_SIZE_BYTES,
    );
    let fsck = output(&mut command(
        "e2fsck",
        ["-fn", fuse.file().to_str().unwrap()],
    ));
    assert_eq!(
        fsck.status.code(),
        Some(0),
        "e2fsck -fn: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let mount = LoopMount::mount_with_options(&fuse.file(), &dir.join("mnt"), "loop,ro,noload");
    run_program(
        "diff",
        [
            "-r",
            "--no-dereference",
            state.tree.to_str().unwrap(),
            mount.dir().to_str().unwrap(),
        ],
    );
    assert_eq!(listing(mount.dir()), state.listing);
    mount.unmount();
    fuse.unmount();
    server.stop();
}

#[test]
fn files_come_out_of_tape_and_object_storage_backups_at_every_checkpoint() {
    if skipped_unless_root("mount -o loop and FUSE") {
        return;
    }
    require_tool("mkfs.ext4", "e2fsprogs");
    require_tool("qemu-io", "qemu-utils");
    let dir = TempDir::new("backup-files");
    let s3_server = S3Server::s3s_fs(&dir.join("s3"));
    s3_server.create_bucket(BUCKET);
    let env = s3_server.env();
    let tape = format!("tape:{}", dir.join("disk.tape").display());
    let s3 = format!("s3://{BUCKET}/files");
    let mut fs = start_ext4(TempDir::new("backup-files-disk"));
    let states = three_checkpoints(&fs, &env, &tape, &s3);
    fs.stop();
    for state in &states {
        assert_eq!(
            listed_by_blockwatch(&env, &[&tape], &state.checkpoint),
            state.listing
        );
        assert_eq!(
            listed_by_blockwatch(&env, &[&s3], &state.s3_checkpoint),
            state.listing
        );
    }
    check_tars(fs.dir.path(), &states);
    check_file_restores(&env, dir.path(), &[&tape], &states);
    check_file_restores(&env, dir.path(), &[&s3], &states);
    check_served(&dir.join("serve-tape"), &[&tape], &states[1], &env);
    check_served(&dir.join("serve-s3"), &[&s3], &states[2], &env);
}

/// What GNU tar extracts of `archive`: every path but directories.
fn extracted(archive: &Path, into: &Path) -> BTreeMap<String, Listed> {
    std::fs::create_dir_all(into).unwrap();
    run_program(
        "tar",
        [
            "-x".as_ref(),
            "-p".as_ref(),
            "--xattrs".as_ref(),
            "--xattrs-include=*".as_ref(),
            "--numeric-owner".as_ref(),
            "-f".as_ref(),
            archive.as_os_str(),
            "-C".as_ref(),
            into.as_os_str(),
        ],
    );
    listing(into)
        .into_iter()
        .filter(|(_, listed)| listed.kind != '/')
        .collect()
}

/// Each session's tar holds exactly the files that changed in it (those
/// the criteria take), each as the disk had it then, metadata included;
/// the record lists the files deleted.
fn check_tars(dir: &Path, states: &[AtCheckpoint]) {
    let changed: [&[&str]; 3] = [
        &[],
        &[
            "/docs/a.txt",
            "/docs/hard",
            "/docs/big-renamed",
            "/new.bin",
            "/docs/deep/er/b.bin",
        ],
        &["/docs/a.txt", "/frag", "/sparse"],
    ];
    // Paths gone since the session before: deleted, or renamed away.
    let deleted: [&[&str]; 3] = [&[], &["/big"], &["/docs/hard", "/new.bin"]];
    for (round, state) in states.iter().enumerate() {
        for name in ["all", "bins"] {
            let out = dir.join(format!("extracted-{name}-{round}"));
            let got = extracted(&dir.join(format!("{name}-{round}.tar")), &out);
            let chosen = |path: &&str| name == "all" || path.ends_with(".bin");
            let expected: Vec<&str> = if round == 0 {
                state
                    .listing
                    .iter()
                    .filter(|(path, listed)| listed.kind != '/' && chosen(&path.as_str()))
                    .map(|(path, _)| path.as_str())
                    .collect()
            } else {
                changed[round].iter().copied().filter(chosen).collect()
            };
            let got_paths: Vec<&str> = got.keys().map(String::as_str).collect();
            let mut expected_sorted = expected.clone();
            expected_sorted.sort();
            assert_eq!(got_paths, expected_sorted, "{name}-{round}.tar");
            for (path, listed) in &got {
                let relative = path.trim_start_matches('/');
                let mut want = state.listing[path].clone();
                // An extracted file is a new inode.
                want.inode = listed.inode;
                assert_eq!(*listed, want, "{path} in {name}-{round}.tar");
                if listed.kind == 'F' {
                    assert_files_equal(&state.tree.join(relative), &out.join(relative));
                    let a = std::fs::metadata(state.tree.join(relative)).unwrap();
                    let b = std::fs::metadata(out.join(relative)).unwrap();
                    assert_eq!(a.mtime_nsec(), b.mtime_nsec(), "{path} mtime");
                    assert_eq!((a.uid(), a.gid()), (b.uid(), b.gid()), "{path} owner");
                }
            }
            if got.contains_key("/sparse") {
                assert!(
                    allocated_sectors(&out.join("sparse")) < 2 * 1024 * 2,
                    "sparse stays sparse"
                );
            }
            let listed_deleted: Vec<String> = serde_json::from_str(
                &std::fs::read_to_string(dir.join(format!("{name}-{round}.deleted"))).unwrap(),
            )
            .unwrap();
            let want_deleted: Vec<String> = deleted[round]
                .iter()
                .filter(|p| chosen(p))
                .map(|p| p.to_string())
                .collect();
            assert_eq!(listed_deleted, want_deleted, "deleted in {name}-{round}");
        }
    }
    // Hard links stay links.
    let out = dir.join("extracted-all-1");
    assert_eq!(
        std::fs::metadata(out.join("docs/a.txt")).unwrap().ino(),
        std::fs::metadata(out.join("docs/hard")).unwrap().ino()
    );
}

#[test]
fn an_overlay_takes_writes_and_leaves_the_backup_as_it_was() {
    let dir = TempDir::new("backup-overlay");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");
    qemu_io(&server.uri(), &["write -P 7 0 8M", "write -P 8 32M 1M"]);
    let tape = format!("tape:{}", dir.join("disk.tape").display());
    let first = parse_json(
        &run_ok(
            &[],
            &["copy", image.to_str().unwrap(), "--to", &tape, "--json"],
        ),
        "copy --json",
    );
    let first = first["checkpoint"].as_str().unwrap().to_string();
    qemu_io(&server.uri(), &["write -P 11 40M 1M"]);
    run_ok(&[], &["copy", image.to_str().unwrap(), "--to", &tape]);
    server.stop();
    let overlay = dir.join("overlay.img");
    let overlay_arg = overlay.to_str().unwrap();
    let at_first = ["--at", first.as_str(), "--overlay", overlay_arg];
    let served = Server::start(dir.path(), &[Path::new(&tape)], &at_first);
    // Whole blocks, a part of a block, and reads across both.
    qemu_io(
        &served.uri(),
        &[
            "write -P 9 4k 8k",
            "write -P 10 1048577 100",
            "read -P 7 0 4k",
            "read -P 9 4k 8k",
            "read -P 7 12k 4k",
            "read -P 7 1048576 1",
            "read -P 10 1048577 100",
            "read -P 7 1048677 3995",
            "read -P 8 32M 1M",
            "read -P 0 40M 1M",
            "flush",
        ],
    );
    served.stop();
    // The tape is as it was; the overlay keeps the writes for next time.
    let verified = output(&mut command(BLOCKWATCH, ["verify", tape.as_str()]));
    assert_eq!(verified.status.code(), Some(0), "{verified:?}");
    let again = Server::start(dir.path(), &[Path::new(&tape)], &at_first);
    qemu_io(
        &again.uri(),
        &[
            "read -P 9 4k 8k",
            "read -P 10 1048577 100",
            "read -P 7 12k 4k",
        ],
    );
    again.stop();
    let plain = Server::start(dir.path(), &[Path::new(&tape)], &["-r"]);
    let uri = plain.uri();
    let read_only = [
        "-r",
        "-f",
        "raw",
        "-c",
        "read -P 7 0 16k",
        "-c",
        "read -P 11 40M 1M",
        &uri,
    ];
    let said = run_program("qemu-io", read_only);
    assert!(!said.contains("Pattern verification failed"), "{said}");
    plain.stop();
    // An overlay is never laid over another checkpoint.
    let socket = dir.join("refused.sock");
    let out = output(&mut command(
        BLOCKWATCH,
        [
            "serve",
            "-f",
            "-U",
            socket.to_str().unwrap(),
            tape.as_str(),
            "--overlay",
            overlay_arg,
        ],
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("was made over another backup or checkpoint"),
        "{stderr}"
    );
    // Nor is a backup served writable without one.
    let out = output(&mut command(
        BLOCKWATCH,
        ["serve", "-f", "-U", socket.to_str().unwrap(), tape.as_str()],
    ));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("add -r"),
        "{out:?}"
    );
}

/// A flipped byte in the tape block that holds a file's data: restoring
/// that file fails naming the damage, never writes other bytes; the
/// files around it still come back.
#[test]
fn a_damaged_tape_block_fails_the_file_it_holds_and_only_that() {
    require_tool("mkfs.ext4", "e2fsprogs");
    let dir = TempDir::new("backup-damage");
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let big = write_random_file(&tree.join("big"), 21, 8 << 20);
    write_random_file(&tree.join("small"), 22, 5000);
    let image = dir.join("disk.img");
    create_sparse_file(&image, 64 * MIB);
    run_program(
        "mkfs.ext4",
        [
            "-q",
            "-F",
            "-b",
            "4096",
            "-d",
            tree.to_str().unwrap(),
            image.to_str().unwrap(),
        ],
    );
    let tape_path = dir.join("disk.tape");
    let tape = format!("tape:{}", tape_path.display());
    run_ok(&[], &["copy", image.to_str().unwrap(), "--to", &tape]);
    run_ok(&[], &["files", &tape]);
    // The big file's bytes are somewhere in the tape: flip one of them.
    let mut bytes = std::fs::read(&tape_path).unwrap();
    let probe = &big[4 << 20..(4 << 20) + 64];
    let at = bytes
        .windows(probe.len())
        .position(|window| window == probe)
        .expect("the file's data is on the tape uncompressed");
    bytes[at + 10] ^= 0x20;
    std::fs::write(&tape_path, &bytes).unwrap();
    let to = dir.join("restored");
    let out = output(&mut command(
        BLOCKWATCH,
        [
            "restore",
            &tape,
            "--file",
            "/big",
            "--to",
            to.to_str().unwrap(),
        ],
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("damage") || stderr.contains("damaged"),
        "{stderr}"
    );
    let small_to = dir.join("restored-small");
    run_ok(
        &[],
        &[
            "restore",
            &tape,
            "--file",
            "/small",
            "--to",
            small_to.to_str().unwrap(),
        ],
    );
    assert_files_equal(&tree.join("small"), &small_to.join("small"));
    // With the index from the first view the block's crc still catches it;
    // without it, the pass over the tape refuses the chain outright.
    std::fs::remove_file(dir.join("disk.tape.blockwatch-index")).ok();
    let out = output(&mut command(BLOCKWATCH, ["files", &tape]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("damage"),
        "{out:?}"
    );
}
