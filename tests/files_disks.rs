//! File-level changes (`blockwatch changes --files`) on whole disks rather
//! than a bare filesystem: an ext4 inside a GPT partition or an MBR logical
//! partition next to a raw partition, a disk with no ext2/3/4 at all, and
//! the same query answered offline after the server stopped.
//!
//! The live tests serve the image with blockwatch, expose it with nbdfuse
//! and loop-mount the ext4 partition at its offset, the way a user mounts
//! one partition of a disk image. They need root (mount); as another user
//! they print a note and pass. The disk without ext4 needs no root.

mod common;

use std::path::Path;
use std::process::Command;

use common::{
    BLOCKWATCH, LiveFs, Server, change_lines, entry, files, lines, pretty, ranges,
    until_metadata_stays_in_the_journal,
};
use serde_json::{Value, json};
use testkit::{
    MIB, TempDir, create_sparse_file, parse_json, random_bytes, require_tool, run_program,
    run_with_input, skipped_unless_root, write_at,
};

/// The filesystem block size given to mkfs.ext4, and the region size the
/// live tests track at, so only files whose blocks changed are listed.
const BLOCK_BYTES: u64 = 4096;
const SECTOR_BYTES: u64 = 512;
const PARTITIONED_DISK_BYTES: u64 = 256 * MIB;
const WHOLE_DISK_BYTES: u64 = 128 * MIB;
/// The raw (unformatted) partition 1 of the partitioned disks.
const RAW_PARTITION_SCRIPT: &str = "start=2048, size=32768, type=L";
/// Where the raw write lands inside partition 1, and how long it is.
const RAW_WRITE_OFFSET_IN_PARTITION_BYTES: u64 = MIB + 3 * BLOCK_BYTES;
const RAW_WRITE_BYTES: u64 = 3 * BLOCK_BYTES;

/// Why the live tests need root.
const NEEDS_ROOT: &str = "mount -o loop and FUSE";

#[derive(Debug, Clone, Copy)]
enum Table {
    /// The filesystem covers the whole disk (partition 0).
    None,
    /// Partition 1 raw, partition 2 ext4.
    Gpt,
    /// Partition 1 raw, partition 2 extended, logical partition 5 ext4.
    Dos,
}

/// A partition (or the whole disk, number 0) as disk byte offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Place {
    number: u32,
    offset_bytes: u64,
    length_bytes: u64,
}

/// Where the ext4 is, and the raw partition beside it (if any).
#[derive(Debug, Clone, Copy)]
struct Layout {
    filesystem: Place,
    raw: Option<Place>,
}

/// Partitions the image with `sfdisk` (script on stdin).
fn sfdisk(image: &Path, script: &str) {
    run_with_input(Command::new("sfdisk").arg("--quiet").arg(image), script);
}

/// The partitions `sfdisk --json` reads from the image.
fn partitions(image: &Path) -> Vec<Place> {
    let text = run_program("sfdisk", ["--json".as_ref(), image.as_os_str()]);
    let reply = parse_json(&text, "sfdisk --json");
    let table = &reply["partitiontable"];
    let sector_bytes = table["sectorsize"].as_u64().unwrap_or(SECTOR_BYTES);
    let prefix = image.to_str().expect("a UTF-8 temporary path");
    table["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| {
            let node = p["node"].as_str().expect("a node");
            let number = node
                .strip_prefix(prefix)
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("partition node {node} is not {prefix}N"));
            Place {
                number,
                offset_bytes: p["start"].as_u64().expect("start") * sector_bytes,
                length_bytes: p["size"].as_u64().expect("size") * sector_bytes,
            }
        })
        .collect()
}

fn place(places: &[Place], number: u32) -> Place {
    *places
        .iter()
        .find(|p| p.number == number)
        .unwrap_or_else(|| panic!("no partition {number} in {places:?}"))
}

/// A fresh sparse image of `size_bytes`, partitioned as `table`, with
/// ext4 made in its filesystem partition (inode tables and journal written
/// now, so no lazy initialisation runs while the test changes files).
fn make_disk(image: &Path, size_bytes: u64, table: Table) -> Layout {
    create_sparse_file(image, size_bytes);
    let (script, fs_number) = match table {
        Table::None => (None, 0),
        Table::Gpt => (
            Some(format!(
                "label: gpt\n{RAW_PARTITION_SCRIPT}\nstart=34816, type=L\n"
            )),
            2,
        ),
        Table::Dos => (
            Some(format!(
                "label: dos\n{RAW_PARTITION_SCRIPT}\nstart=34816, type=Ex\ntype=L\n"
            )),
            5,
        ),
    };
    let layout = match &script {
        None => Layout {
            filesystem: Place {
                number: 0,
                offset_bytes: 0,
                length_bytes: size_bytes,
            },
            raw: None,
        },
        Some(script) => {
            sfdisk(image, script);
            let places = partitions(image);
            Layout {
                filesystem: place(&places, fs_number),
                raw: Some(place(&places, 1)),
            }
        }
    };
    let filesystem = layout.filesystem;
    run_program(
        "mkfs.ext4",
        [
            "-q".to_string(),
            "-F".to_string(),
            "-b".to_string(),
            BLOCK_BYTES.to_string(),
            "-E".to_string(),
            format!(
                "offset={},lazy_itable_init=0,lazy_journal_init=0",
                filesystem.offset_bytes
            ),
            image.display().to_string(),
            format!("{}k", filesystem.length_bytes / 1024),
        ],
    );
    if script.is_some() {
        let places = partitions(image);
        assert_eq!(
            (place(&places, fs_number), place(&places, 1)),
            (layout.filesystem, layout.raw.expect("a raw partition")),
            "mkfs.ext4 -E offset= changed the partition table"
        );
    }
    layout
}

/// An ext4 on a disk image, served by blockwatch, exposed by nbdfuse and
/// mounted through a loop device at the filesystem's offset (`LiveFs`),
/// with the disk's layout.
struct LiveDisk {
    live: LiveFs,
    layout: Layout,
}

impl std::ops::Deref for LiveDisk {
    type Target = LiveFs;
    fn deref(&self) -> &LiveFs {
        &self.live
    }
}

impl LiveDisk {
    fn start(label: &str, size_bytes: u64, table: Table) -> LiveDisk {
        require_tool("mkfs.ext4", "e2fsprogs");
        require_tool("filefrag", "e2fsprogs");
        require_tool("sfdisk", "fdisk");
        let dir = TempDir::new(label);
        let image = dir.join("disk.img");
        let layout = make_disk(&image, size_bytes, table);
        let options = format!(
            "loop,offset={},sizelimit={}",
            layout.filesystem.offset_bytes, layout.filesystem.length_bytes
        );
        let live = LiveFs::start(
            dir,
            &image,
            &["--granularity", "4K"],
            size_bytes,
            &options,
            layout.filesystem.offset_bytes,
        );
        LiveDisk { live, layout }
    }

    /// Writes `data` at disk byte `offset` through the NBD export (the
    /// nbdfuse file), around the filesystem, and fsyncs it (an NBD FLUSH).
    fn write_raw(&self, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(self.fuse.as_ref().expect("nbdfuse running").file())
            .expect("open the nbdfuse file");
        file.write_all_at(data, offset)
            .expect("write through nbdfuse");
        file.sync_all().expect("fsync the nbdfuse file");
    }

    /// `blockwatch changes IMAGE --files --json ARGS...`.
    fn file_changes(&self, args: &[&str]) -> Value {
        file_changes(&self.image, args)
    }

    /// Physical blocks (relative to the filesystem) of each file's logical
    /// blocks `logical`, from the kernel's extent map (FIEMAP via filefrag).
    fn physical_blocks(&self, relative: &str, logical: std::ops::Range<u64>) -> Vec<u64> {
        let path = self.path(relative);
        let blocks = testkit::physical_blocks(std::slice::from_ref(&path), BLOCK_BYTES)
            .remove(&path)
            .expect("filefrag names every path");
        logical
            .map(|block| {
                *blocks
                    .get(&block)
                    .unwrap_or_else(|| panic!("filefrag did not map block {block} of {relative}"))
            })
            .collect()
    }

    /// Unmounts, stops nbdfuse and the server, each asserting success;
    /// the image and its state stay until the value is dropped.
    fn stop(&mut self) {
        self.live.stop();
    }
}

/// `blockwatch changes IMAGE --files --json ARGS...`, through the server
/// when one runs, offline otherwise.
fn file_changes(image: &Path, args: &[&str]) -> Value {
    let image = image.to_str().expect("a UTF-8 temporary path");
    let mut all = vec!["changes", image, "--files", "--json"];
    all.extend_from_slice(args);
    let text = run_program(BLOCKWATCH, &all);
    parse_json(&text, &format!("blockwatch {}", all.join(" ")))
}

/// Whether disk bytes `[offset, offset + length)` lie inside one range.
fn covered(ranges: &[(u64, u64)], offset: u64, length: u64) -> bool {
    ranges
        .iter()
        .any(|&(start, size)| start <= offset && offset + length <= start + size)
}

/// The parts of `ranges` outside `[start, start + length)`.
fn outside(ranges: &[(u64, u64)], start: u64, length: u64) -> Vec<(u64, u64)> {
    let end = start + length;
    let mut out = Vec::new();
    for &(offset, size) in ranges {
        if offset < start {
            out.push((offset, (offset + size).min(start) - offset));
        }
        if offset + size > end {
            let from = offset.max(end);
            out.push((from, offset + size - from));
        }
    }
    out
}

/// Small files, a 1 MiB file, and files deleted and renamed after c1.
fn build_baseline(disk: &LiveDisk) {
    for dir in ["/docs", "/src", "/old"] {
        disk.mkdir(dir);
    }
    for index in 0..10 {
        disk.write(
            &format!("/docs/note-{index:02}.txt"),
            index,
            100 + index * 97,
        );
    }
    disk.write("/src/moveme.txt", 100, 700);
    disk.write("/src/keep.rs", 101, 5000);
    disk.write("/old/gone.txt", 102, 20_000);
    disk.write("/big.bin", 103, MIB);
}

/// What `change_baseline` does, as `change_lines` shows it.
const BASELINE_CHANGES: &[&str] = &[
    "M /big.bin",
    "M /docs/",
    "R /docs/moved.txt <- /src/moveme.txt",
    "+ /docs/new.txt",
    "M /docs/note-03.txt",
    "M /old/",
    "- /old/gone.txt",
    "M /src/",
];

/// The files and directories `change_baseline` changed, to fsync.
const BASELINE_CHANGED_PATHS: &[&str] = &[
    "/big.bin",
    "/docs",
    "/docs/moved.txt",
    "/docs/new.txt",
    "/docs/note-03.txt",
    "/old",
    "/src",
];

/// The first of the blocks of /big.bin overwritten in place, and how many.
const BIG_OVERWRITE_FIRST_BLOCK: u64 = 100;
const BIG_OVERWRITE_BLOCKS: u64 = 3;
/// /docs/new.txt is 10 KiB: three blocks.
const NEW_FILE_BYTES: u64 = 10_000;

fn change_baseline(disk: &LiveDisk) {
    disk.append("/docs/note-03.txt", 400, 123);
    // An in-place overwrite, as a database does.
    write_at(
        &disk.path("/big.bin"),
        BIG_OVERWRITE_FIRST_BLOCK * BLOCK_BYTES,
        &random_bytes(401, (BIG_OVERWRITE_BLOCKS * BLOCK_BYTES) as usize),
    );
    disk.write("/docs/new.txt", 402, NEW_FILE_BYTES);
    std::fs::remove_file(disk.path("/old/gone.txt")).expect("remove /old/gone.txt");
    std::fs::rename(disk.path("/src/moveme.txt"), disk.path("/docs/moved.txt"))
        .expect("rename /src/moveme.txt");
}

/// Commits the changes through fsync only, and checks that the newest
/// metadata is then in the journal and not yet in place, so the map has
/// to read it through the journal.
fn commit_through_the_journal(disk: &LiveDisk) -> bool {
    disk.commit_through_the_journal(BASELINE_CHANGED_PATHS, "/docs/new.txt")
}

/// Checks a `--files` reply for the baseline changes on `layout`'s ext4.
fn check_baseline_reply(disk: &LiveDisk, reply: &Value) {
    let text = pretty(reply);
    let filesystem = disk.layout.filesystem;
    assert_eq!(
        change_lines(reply),
        lines(BASELINE_CHANGES),
        "only the changed files, with exact statuses:\n{text}"
    );
    for file in files(reply) {
        assert_eq!(
            file["partition"], filesystem.number,
            "every file names the partition it is in:\n{file:#}"
        );
    }
    assert_eq!(
        reply["filesystems"]
            .as_array()
            .expect("filesystems")
            .iter()
            .map(|fs| (
                fs["partition"].clone(),
                fs["offset_bytes"].clone(),
                fs["block_size"].clone()
            ))
            .collect::<Vec<_>>(),
        vec![(
            json!(filesystem.number),
            json!(filesystem.offset_bytes),
            json!(BLOCK_BYTES)
        )],
        "one filesystem, at its partition's offset:\n{text}"
    );
    let big = entry(reply, "/big.bin");
    assert_eq!(
        big["changed_bytes"],
        BIG_OVERWRITE_BLOCKS * BLOCK_BYTES,
        "{text}"
    );
    assert_eq!(
        entry(reply, "/docs/new.txt")["changed_bytes"],
        NEW_FILE_BYTES.div_ceil(BLOCK_BYTES) * BLOCK_BYTES,
        "{text}"
    );
    // The copy set must hold the files' changed blocks at their disk
    // offsets: filesystem blocks shifted by the partition's offset.
    let copy_set = ranges(&reply["copy_set"]);
    let written = [
        disk.physical_blocks(
            "/big.bin",
            BIG_OVERWRITE_FIRST_BLOCK..BIG_OVERWRITE_FIRST_BLOCK + BIG_OVERWRITE_BLOCKS,
        ),
        disk.physical_blocks("/docs/new.txt", 0..NEW_FILE_BYTES.div_ceil(BLOCK_BYTES)),
        disk.physical_blocks("/docs/note-03.txt", 0..1),
    ];
    for block in written.iter().flatten() {
        let offset = filesystem.offset_bytes + block * BLOCK_BYTES;
        assert!(
            covered(&copy_set, offset, BLOCK_BYTES),
            "filesystem block {block} (disk byte {offset}) was written but is not in the \
             copy set:\n{text}"
        );
    }
}

fn partitioned_disk_reports_files_per_partition(label: &str, table: Table) {
    if skipped_unless_root(NEEDS_ROOT) {
        return;
    }
    let mut disk = until_metadata_stays_in_the_journal(|| {
        let disk = LiveDisk::start(label, PARTITIONED_DISK_BYTES, table);
        build_baseline(&disk);
        disk.sync();
        disk.checkpoint("c1");
        change_baseline(&disk);
        let raw = disk.layout.raw.expect("a raw partition");
        let raw_offset = raw.offset_bytes + RAW_WRITE_OFFSET_IN_PARTITION_BYTES;
        disk.write_raw(raw_offset, &random_bytes(500, RAW_WRITE_BYTES as usize));
        commit_through_the_journal(&disk).then_some(disk)
    });
    let raw = disk.layout.raw.expect("a raw partition");
    let raw_offset = raw.offset_bytes + RAW_WRITE_OFFSET_IN_PARTITION_BYTES;

    let reply = disk.file_changes(&["--since", "c1"]);
    let text = pretty(&reply);
    check_baseline_reply(&disk, &reply);
    assert_eq!(
        reply["notes"],
        json!([format!(
            "partition {}: not ext2/3/4; its changes are reported by block only",
            raw.number
        )]),
        "the raw partition is named as tracked by block only, and nothing else is noted:\n{text}"
    );
    // Outside the ext4 the copy set is exactly what changed there: the
    // raw write (the partition table and the rest of partition 1 did not
    // change).
    let fs = disk.layout.filesystem;
    assert_eq!(
        outside(
            &ranges(&reply["copy_set"]),
            fs.offset_bytes,
            fs.length_bytes
        ),
        vec![(raw_offset, RAW_WRITE_BYTES)],
        "the copy set outside the ext4 partition must be the raw write in partition {}:\n{text}",
        raw.number
    );
    let copy_bytes: u64 = ranges(&reply["copy_set"]).iter().map(|r| r.1).sum();
    assert_eq!(reply["copy_bytes"], copy_bytes, "{text}");

    // Between two checkpoints the answer comes from the maps saved at
    // them: the same files, and the same note about partition 1.
    disk.checkpoint("c2");
    let until = disk.file_changes(&["--since", "c1", "--until", "c2"]);
    let until_text = pretty(&until);
    assert_eq!(
        until["files"], reply["files"],
        "--since c1 --until c2 must list the files --since c1 did before c2:\n{until_text}"
    );
    assert_eq!(
        until["notes"], reply["notes"],
        "--since c1 --until c2 must say, as --since c1 did, that partition {} is tracked \
         by block only:\n{until_text}",
        raw.number
    );
    disk.stop();
}

#[test]
fn partitioned_disk_reports_files_per_partition_and_raw_changes_by_block() {
    partitioned_disk_reports_files_per_partition("disks-gpt", Table::Gpt);
}

#[test]
fn mbr_disk_with_ext4_in_a_logical_partition_reports_files_per_partition() {
    partitioned_disk_reports_files_per_partition("disks-mbr", Table::Dos);
}

#[test]
fn a_disk_without_ext4_gets_block_only_answers_with_a_clear_note() {
    require_tool("qemu-io", "qemu-utils");
    let dir = TempDir::new("disks-raw");
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, "64M");
    let image_arg = image.to_str().expect("a UTF-8 temporary path");
    run_program(BLOCKWATCH, ["checkpoint", image_arg, "c1"]);
    let written = run_program(
        "qemu-io",
        ["-f", "raw", "-c", "write -P 1 0 64k", &server.uri()],
    );
    assert!(
        !written.contains("failed") && !written.contains("error"),
        "qemu-io reported a failure:\n{written}"
    );

    let block_only = |reply: &Value, query: &str| {
        let text = pretty(reply);
        assert_eq!(reply["files"], json!([]), "{query}: no files:\n{text}");
        assert_eq!(
            reply["filesystems"],
            json!([]),
            "{query}: no filesystem:\n{text}"
        );
        let notes = reply["notes"].as_array().expect("notes");
        assert!(
            notes.len() == 1
                && notes[0].as_str().is_some_and(|note| {
                    note.contains("no ext2/3/4") && note.contains("reported by block only")
                }),
            "{query}: one note saying there is no ext2/3/4 and changes are reported by \
             block only:\n{text}"
        );
        assert_eq!(
            ranges(&reply["copy_set"]),
            vec![(0, 64 * 1024)],
            "{query}: the copy set is the written range:\n{text}"
        );
    };
    let reply = file_changes(&image, &["--since", "c1"]);
    block_only(&reply, "changes --since c1 --files");

    // The plain block listing still shows the write.
    let listing = run_program(BLOCKWATCH, ["changes", image_arg, "--since", "c1"]);
    let extents: Vec<Vec<&str>> = listing
        .lines()
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(
        extents,
        vec![vec!["0", "65536", "saved", "exact"]],
        "changes --since c1 lists the written extent:\n{listing}"
    );

    // Between two checkpoints the answer comes from the saved maps; it
    // must say the same.
    run_program(BLOCKWATCH, ["checkpoint", image_arg, "c2"]);
    let until = file_changes(&image, &["--since", "c1", "--until", "c2"]);
    block_only(&until, "changes --since c1 --until c2 --files");
    server.stop();
}

#[test]
fn files_query_works_offline_after_the_server_stopped() {
    if skipped_unless_root(NEEDS_ROOT) {
        return;
    }
    let mut disk = until_metadata_stays_in_the_journal(|| {
        let disk = LiveDisk::start("disks-offline", WHOLE_DISK_BYTES, Table::None);
        build_baseline(&disk);
        disk.sync();
        disk.checkpoint("c1");
        change_baseline(&disk);
        commit_through_the_journal(&disk).then_some(disk)
    });
    disk.checkpoint("c2");
    let query = ["--since", "c1", "--until", "c2"];
    let online = disk.file_changes(&query);
    check_baseline_reply(&disk, &online);
    assert_eq!(online["notes"], json!([]), "{}", pretty(&online));
    disk.stop();
    // No server now: the query opens the state directory itself.
    let offline = disk.file_changes(&query);
    assert_eq!(
        offline,
        online,
        "offline (no server) changes --since c1 --until c2 --files must answer as the \
         server did:\n--- offline ---\n{}\n--- online ---\n{}",
        pretty(&offline),
        pretty(&online)
    );
    // Up to now, offline: the map is read from the image (unmounted now,
    // everything in place) and compared with the one saved at c1.
    let since_c1 = disk.file_changes(&["--since", "c1"]);
    assert_eq!(
        (change_lines(&since_c1), &since_c1["notes"]),
        (lines(BASELINE_CHANGES), &json!([])),
        "offline changes --since c1 --files:\n{}",
        pretty(&since_c1)
    );
}
