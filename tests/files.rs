//! File-level changes (`blockwatch changes --files`) on a live ext4: the
//! image is served by blockwatch, exposed by nbdfuse, loop-mounted and
//! changed through the mount the way a user changes files, never
//! unmounted before the query. The listing must name exactly the files
//! that changed, with the statuses of `zfs diff`, whether the newest
//! metadata is only in the jbd2 journal (after fsync) or also in place
//! (after syncfs); the copy set must follow the copy criteria; at 64 KiB
//! regions untouched neighbours show as '~' and nothing else does.
//!
//! Needs root (mount); as another user each test prints a note and passes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use common::{
    BLOCKWATCH, LiveFs, entry, files, lines, pretty, ranges, until_metadata_stays_in_the_journal,
};
use serde_json::Value;
use testkit::{
    MIB, TempDir, create_sparse_file, parse_json, require_tool, run_program, skipped_unless_root,
    write_random_file,
};

const IMAGE_SIZE_BYTES: u64 = 128 * MIB;
/// The filesystem block size given to mkfs.ext4, and the region size the
/// exact tests track at.
const BLOCK_BYTES: u64 = 4096;

/// Why the tests here need root.
const NEEDS_ROOT: &str = "mount -o loop and FUSE";

/// What these tests do with an ext4 image served by blockwatch, exposed by
/// nbdfuse and mounted through a loop device.
impl LiveFs {
    /// mkfs.ext4 on a fresh image (inode tables and journal written now,
    /// so no lazy initialisation runs while the test changes files), then
    /// serve it with `server_args` and mount it.
    fn start_ext4(label: &str, server_args: &[&str]) -> LiveFs {
        require_tool("mkfs.ext4", "e2fsprogs");
        require_tool("filefrag", "e2fsprogs");
        require_tool("dd", "coreutils");
        let dir = TempDir::new(label);
        let image = dir.join("disk.img");
        create_sparse_file(&image, IMAGE_SIZE_BYTES);
        run_program(
            "mkfs.ext4",
            [
                "-q".as_ref(),
                "-F".as_ref(),
                "-b".as_ref(),
                "4096".as_ref(),
                "-E".as_ref(),
                "lazy_itable_init=0,lazy_journal_init=0".as_ref(),
                image.as_os_str(),
            ],
        );
        LiveFs::start(dir, &image, server_args, IMAGE_SIZE_BYTES, "loop", 0)
    }

    /// `blockwatch changes IMAGE --files --json ARGS...`.
    fn file_changes(&self, args: &[&str]) -> Value {
        let mut all = vec!["changes", self.image_arg(), "--files", "--json"];
        all.extend_from_slice(args);
        let text = run_program(BLOCKWATCH, &all);
        let reply = parse_json(&text, &format!("blockwatch {}", all.join(" ")));
        // Notes name what the map could not read; here it must read all.
        assert_eq!(
            reply["notes"],
            serde_json::json!([]),
            "blockwatch {}:\n{}",
            all.join(" "),
            pretty(&reply)
        );
        reply
    }

    /// The changed byte ranges (offset, length) of `changes --since NAME`.
    fn changed_ranges(&self, since: &str) -> Vec<(u64, u64)> {
        let text = run_program(
            BLOCKWATCH,
            ["changes", self.image_arg(), "--since", since, "--json"],
        );
        let reply = parse_json(&text, "blockwatch changes --json");
        ranges(&reply["extents"])
    }

    /// Physical blocks of each file (logical block -> physical block), as
    /// the kernel reports them (FIEMAP through filefrag).
    fn physical_blocks(&self, relatives: &[&str]) -> BTreeMap<String, BTreeMap<u64, u64>> {
        let paths: Vec<PathBuf> = relatives.iter().map(|r| self.path(r)).collect();
        let mut by_path = testkit::physical_blocks(&paths, BLOCK_BYTES);
        relatives
            .iter()
            .zip(&paths)
            .map(|(relative, path)| {
                let blocks = by_path.remove(path).expect("filefrag names every path");
                (relative.to_string(), blocks)
            })
            .collect()
    }

    /// Unmounts, stops nbdfuse and the server, each asserting success.
    fn finish(mut self) {
        self.stop();
    }
}

/// `common::change_line`, after checking that the change's "path" is one
/// of its "paths".
fn change_line(file: &Value) -> String {
    if let Some(paths) = file["paths"].as_array() {
        assert!(
            paths.is_empty() || paths.contains(&file["path"]),
            "\"path\" is not one of \"paths\": {file}"
        );
    }
    common::change_line(file)
}

fn change_lines(reply: &Value) -> BTreeSet<String> {
    files(reply).iter().map(change_line).collect()
}

/// A tree of about 50 small files, a 2 MiB file, and files that are
/// deleted, renamed and linked after the checkpoint.
fn build_baseline(fs: &LiveFs) {
    for dir in ["/docs", "/src", "/data", "/trash", "/dst"] {
        fs.mkdir(dir);
    }
    for index in 0..20 {
        fs.write(
            &format!("/docs/note-{index:02}.txt"),
            index,
            100 + index * 97,
        );
    }
    for index in 0..15 {
        fs.write(
            &format!("/src/code-{index:02}.rs"),
            100 + index,
            300 + index * 211,
        );
    }
    for index in 0..10 {
        fs.write(
            &format!("/data/item-{index:02}.dat"),
            200 + index,
            2000 + index * 1000,
        );
    }
    fs.write("/src/moveme.txt", 300, 700);
    fs.write("/data/linked.txt", 301, 900);
    fs.write("/data/perm.txt", 302, 500);
    fs.write("/trash/old1.txt", 303, 1500);
    fs.write("/trash/old2.txt", 304, 20_000);
    fs.write("/dst/keep.txt", 305, 50);
    fs.write("/big.bin", 306, 2 * MIB);
}

/// What `build_baseline`'s tree becomes after the changes made by
/// `change_baseline`, as `change_lines` shows it.
const BASELINE_CHANGES: &[&str] = &[
    "M /",
    "M /big.bin",
    "R /data/linked.txt /dst/hardlink.txt <- /data/linked.txt",
    "M /data/perm.txt",
    "M /docs/",
    "+ /docs/new.txt",
    "M /docs/note-03.txt",
    "M /dst/",
    "R /dst/moved.txt <- /src/moveme.txt",
    "+ /fresh/",
    "+ /fresh/made.txt",
    "M /src/",
    "M /trash/",
    "- /trash/old1.txt",
    "- /trash/old2.txt",
];

/// What `change_baseline` changed: the files whose data must reach the
/// disk and the directories whose entries changed.
const BASELINE_CHANGED_PATHS: &[&str] = &[
    "/",
    "/big.bin",
    "/data/perm.txt",
    "/docs",
    "/docs/new.txt",
    "/docs/note-03.txt",
    "/dst",
    "/dst/hardlink.txt",
    "/dst/moved.txt",
    "/fresh",
    "/fresh/made.txt",
    "/src",
    "/trash",
];

/// Blocks of /big.bin overwritten in place by `change_baseline`.
const BIG_OVERWRITE_BLOCKS: u64 = 3;

fn change_baseline(fs: &LiveFs) {
    fs.append("/docs/note-03.txt", 400, 123);
    // Overwrite blocks 100..103 of the big file in place, as a database does.
    let patch = fs.dir.join("patch.bin");
    write_random_file(&patch, 401, (BIG_OVERWRITE_BLOCKS * BLOCK_BYTES) as usize);
    run_program(
        "dd",
        [
            format!("if={}", patch.display()),
            format!("of={}", fs.path("/big.bin").display()),
            format!("bs={BLOCK_BYTES}"),
            "seek=100".to_string(),
            "conv=notrunc".to_string(),
            "status=none".to_string(),
        ],
    );
    fs.write("/docs/new.txt", 402, 3000);
    fs.mkdir("/fresh");
    fs.write("/fresh/made.txt", 403, 10_000);
    fs.remove("/trash/old1.txt");
    fs.remove("/trash/old2.txt");
    fs.rename("/src/moveme.txt", "/dst/moved.txt");
    std::fs::hard_link(fs.path("/data/linked.txt"), fs.path("/dst/hardlink.txt"))
        .expect("create a hard link");
    std::fs::set_permissions(
        fs.path("/data/perm.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
}

/// Per-entry facts beyond the status: what changed in each, and that with
/// no criteria every file that still exists is selected.
fn check_baseline_details(reply: &Value) {
    let text = pretty(reply);
    for file in files(reply) {
        let deleted = file["status"] == "-";
        let directory = file["directory"] == true;
        assert_eq!(
            file["selected"],
            !deleted && !directory,
            "with no criteria every changed file that exists is selected:\n{file:#}"
        );
        assert_eq!(file["partition"], 0, "{file:#}");
    }
    let big = entry(reply, "/big.bin");
    assert_eq!(
        big["changed_bytes"],
        BIG_OVERWRITE_BLOCKS * BLOCK_BYTES,
        "{text}"
    );
    assert_eq!(big["size_bytes"], 2 * MIB, "{text}");
    assert_eq!(big["content_changed"], true, "{text}");
    // Where in the file: blocks 100..103, as byte ranges of the file.
    assert_eq!(
        big["changed_ranges"],
        serde_json::json!([{
            "offset_bytes": 100 * BLOCK_BYTES, "length_bytes": BIG_OVERWRITE_BLOCKS * BLOCK_BYTES,
            // The first release's keys, kept for one release.
            "offset": 100 * BLOCK_BYTES, "length": BIG_OVERWRITE_BLOCKS * BLOCK_BYTES,
        }]),
        "{text}"
    );
    let appended = entry(reply, "/docs/note-03.txt");
    assert_eq!(appended["changed_bytes"], BLOCK_BYTES, "{text}");
    assert_eq!(appended["size_bytes"], 100 + 3 * 97 + 123, "{text}");
    let chmodded = entry(reply, "/data/perm.txt");
    assert_eq!(
        chmodded["changed_bytes"], 0,
        "chmod writes no data:\n{text}"
    );
    assert_eq!(chmodded["content_changed"], true, "{text}");
    for renamed in ["/dst/moved.txt", "/data/linked.txt"] {
        let file = entry(reply, renamed);
        assert_eq!(file["content_changed"], false, "{text}");
        assert_eq!(file["changed_bytes"], 0, "{text}");
    }
    assert_eq!(
        entry(reply, "/fresh/made.txt")["changed_bytes"],
        3 * BLOCK_BYTES,
        "{text}"
    );
    assert_eq!(
        entry(reply, "/trash/old2.txt")["size_bytes"],
        20_000,
        "{text}"
    );
    let filesystems = reply["filesystems"].as_array().expect("filesystems");
    assert_eq!(filesystems.len(), 1, "{text}");
    assert_eq!(filesystems[0]["offset_bytes"], 0, "{text}");
    assert_eq!(filesystems[0]["block_size"], BLOCK_BYTES, "{text}");
}

#[test]
fn files_changed_on_a_live_mounted_ext4_are_reported_exactly() {
    if skipped_unless_root(NEEDS_ROOT) {
        return;
    }
    let fs = until_metadata_stays_in_the_journal(|| {
        let fs = LiveFs::start_ext4("files-exact", &["--granularity", "4K"]);
        build_baseline(&fs);
        fs.sync();
        fs.checkpoint("c1");
        change_baseline(&fs);
        // No unmount and no syncfs: the map must read the newest metadata
        // through the jbd2 journal, as it lies on the disk now.
        fs.commit_through_the_journal(BASELINE_CHANGED_PATHS, "/fresh/made.txt")
            .then_some(fs)
    });

    let first = fs.file_changes(&["--since", "c1"]);
    assert_eq!(
        change_lines(&first),
        lines(BASELINE_CHANGES),
        "changes --since c1 --files at 4K regions: only the changed files, no '~':\n{}",
        pretty(&first)
    );
    check_baseline_details(&first);

    // c2 saves the map; a later change must not alter what c1..c2 says.
    fs.checkpoint("c2");
    fs.append("/docs/note-07.txt", 500, 10);
    fs.fsync(&["/docs/note-07.txt"]);
    let until = fs.file_changes(&["--since", "c1", "--until", "c2"]);
    assert_eq!(
        until["files"],
        first["files"],
        "--since c1 --until c2 must answer as --since c1 did before c2:\n{}",
        pretty(&until)
    );
    let since_c2 = fs.file_changes(&["--since", "c2"]);
    assert_eq!(
        change_lines(&since_c2),
        lines(&["M /docs/note-07.txt"]),
        "{}",
        pretty(&since_c2)
    );
    let since_c1 = fs.file_changes(&["--since", "c1"]);
    let mut both = lines(BASELINE_CHANGES);
    both.insert("M /docs/note-07.txt".to_string());
    assert_eq!(change_lines(&since_c1), both, "{}", pretty(&since_c1));
    fs.finish();
}

/// Whether the byte range of `block` lies inside one of `ranges`.
fn covered(ranges: &[(u64, u64)], fs_offset: u64, block: u64) -> bool {
    let start = fs_offset + block * BLOCK_BYTES;
    ranges
        .iter()
        .any(|&(offset, length)| offset <= start && start + BLOCK_BYTES <= offset + length)
}

#[test]
fn copy_criteria_select_files_and_keep_metadata() {
    if skipped_unless_root(NEEDS_ROOT) {
        return;
    }
    let fs = LiveFs::start_ext4("files-criteria", &["--granularity", "4K"]);
    for dir in ["/logs", "/skip", "/data"] {
        fs.mkdir(dir);
    }
    // (path, size before, bytes appended after c1)
    let appended: [(&str, u64, u64); 5] = [
        ("/logs/app.log", 1000, 200),           // too small for --min-size 4K
        ("/logs/big.log", MIB, 5000),           // selected
        ("/logs/huge.log", 3 * MIB, 5000),      // too large for --max-size 2M
        ("/skip/skipped.log", 64 * 1024, 5000), // excluded by '/skip/**'
        ("/data/notes.txt", 64 * 1024, 5000),   // not '*.log'
    ];
    for (seed, (path, size, _)) in appended.iter().enumerate() {
        fs.write(path, seed as u64, *size);
    }
    fs.write("/logs/gone.log", 10, 8192);
    fs.write("/logs/tiny-gone.log", 11, 100);
    fs.sync();
    fs.checkpoint("c1");
    for (seed, (path, _, extra)) in appended.iter().enumerate() {
        fs.append(path, 20 + seed as u64, *extra);
    }
    fs.write("/logs/new.log", 30, 10 * 1024);
    fs.remove("/logs/gone.log");
    fs.remove("/logs/tiny-gone.log");
    fs.sync();

    let criteria = [
        "--since",
        "c1",
        "--include",
        "*.log",
        "--exclude",
        "/skip/**",
        "--min-size",
        "4K",
        "--max-size",
        "2M",
    ];
    let reply = fs.file_changes(&criteria);
    let text = pretty(&reply);
    assert_eq!(
        change_lines(&reply),
        lines(&["M /logs/big.log", "- /logs/gone.log", "+ /logs/new.log"]),
        "only changes matching the criteria are listed:\n{text}"
    );
    let selected: BTreeMap<String, bool> = files(&reply)
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                f["selected"] == true,
            )
        })
        .collect();
    let expected: BTreeMap<String, bool> = [
        ("/logs/big.log", true),
        ("/logs/gone.log", false),
        ("/logs/new.log", true),
    ]
    .into_iter()
    .map(|(path, chosen)| (path.to_string(), chosen))
    .collect();
    assert_eq!(
        selected, expected,
        "a deleted file has nothing to copy:\n{text}"
    );

    let written = written_blocks(&fs, &appended, "/logs/new.log");
    assert_eq!(written["/logs/new.log"].len(), 3, "10 KiB in 4 KiB blocks");
    let fs_offset = reply["filesystems"][0]["offset_bytes"]
        .as_u64()
        .expect("offset_bytes");
    let copy_set = ranges(&reply["copy_set"]);
    let copy_bytes: u64 = copy_set.iter().map(|&(_, length)| length).sum();
    assert_eq!(reply["copy_bytes"], copy_bytes, "{text}");
    for (path, blocks) in &written {
        let wanted = matches!(*path, "/logs/big.log" | "/logs/new.log");
        for &block in blocks {
            let copied = covered(&copy_set, fs_offset, block);
            assert_eq!(
                copied, wanted,
                "block {block} written to {path}: in the copy set {copied}, selected {wanted}:\n{text}"
            );
        }
    }
    check_metadata_copied(&fs, &written, &copy_set, fs_offset);
    fs.finish();
}

/// The physical blocks each change wrote, from the kernel's own extent
/// map: the appended tail of each `(path, size before, bytes appended)`
/// and every block of the file `created`.
fn written_blocks<'a>(
    fs: &LiveFs,
    appended: &[(&'a str, u64, u64)],
    created: &'a str,
) -> BTreeMap<&'a str, Vec<u64>> {
    let mut paths: Vec<&str> = appended.iter().map(|(path, _, _)| *path).collect();
    paths.push(created);
    let physical = fs.physical_blocks(&paths);
    let mut written: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for &(path, size, extra) in appended {
        let blocks = (size / BLOCK_BYTES..(size + extra).div_ceil(BLOCK_BYTES))
            .map(|logical| physical[path][&logical])
            .collect();
        written.insert(path, blocks);
    }
    written.insert(created, physical[created].values().copied().collect());
    written
}

/// Without criteria the copy set holds every block written (which shows
/// `written` is right) and the changed metadata; with criteria
/// (`copy_set`) that metadata is still all there.
fn check_metadata_copied(
    fs: &LiveFs,
    written: &BTreeMap<&str, Vec<u64>>,
    copy_set: &[(u64, u64)],
    fs_offset: u64,
) {
    let everything = fs.file_changes(&["--since", "c1"]);
    let text = pretty(&everything);
    let all_copy_set = ranges(&everything["copy_set"]);
    for (path, blocks) in written {
        for &block in blocks {
            assert!(
                covered(&all_copy_set, fs_offset, block),
                "block {block} written to {path} is missing from the unfiltered copy set:\n{text}"
            );
        }
    }
    let data_blocks: BTreeSet<u64> = written.values().flatten().copied().collect();
    let metadata_blocks: Vec<u64> = all_copy_set
        .iter()
        .flat_map(|&(offset, length)| {
            (offset - fs_offset) / BLOCK_BYTES..(offset - fs_offset + length) / BLOCK_BYTES
        })
        .filter(|block| !data_blocks.contains(block))
        .collect();
    assert!(!metadata_blocks.is_empty(), "no metadata changed?\n{text}");
    for block in metadata_blocks {
        assert!(
            covered(copy_set, fs_offset, block),
            "changed metadata block {block} is missing from the filtered copy set {copy_set:?}"
        );
    }
}

#[test]
fn default_granularity_lists_exactly_the_changed_files_and_no_untouched_neighbour() {
    // The default region of 64 KiB holds 16 blocks, but the fine record
    // knows which 4 KiB blocks were written: no neighbour is listed as '~'.
    neighbours_of_changed_files(&[], false);
}

#[test]
fn without_a_fine_record_untouched_neighbours_are_listed_as_shared_not_modified() {
    // --precision equal to the granularity keeps no fine record: a small
    // file's write marks its neighbours' blocks changed too, and they are
    // listed as '~' so that nothing is ever missed.
    neighbours_of_changed_files(&["--precision", "64K"], true);
}

/// Hundreds of small files, a few of them changed, at 64 KiB regions:
/// the changed ones get their exact status, and the untouched ones with a
/// block in a changed region are listed as '~' exactly when `shared_expected`.
fn neighbours_of_changed_files(serve_args: &[&str], shared_expected: bool) {
    if skipped_unless_root(NEEDS_ROOT) {
        return;
    }
    let fs = LiveFs::start_ext4("files-shared", serve_args);
    fs.mkdir("/small");
    fs.mkdir("/other");
    let names: Vec<String> = (0..200)
        .map(|index| format!("/small/f-{index:02}.txt"))
        .collect();
    for (seed, name) in names.iter().enumerate() {
        fs.write(name, seed as u64, 300);
    }
    fs.write("/other/keep.txt", 100, 300);
    fs.sync();
    fs.checkpoint("c1");
    fs.append("/small/f-10.txt", 200, 50);
    fs.write("/small/new.txt", 201, 300);
    fs.remove("/small/f-20.txt");
    fs.rename("/small/f-30.txt", "/other/f-30.txt");
    fs.sync();

    let reply = fs.file_changes(&["--since", "c1"]);
    let text = pretty(&reply);
    let (shared, exact): (Vec<&Value>, Vec<&Value>) =
        files(&reply).iter().partition(|f| f["status"] == "~");
    let exact: BTreeSet<String> = exact.into_iter().map(change_line).collect();
    assert_eq!(
        exact,
        lines(&[
            "M /other/",
            "R /other/f-30.txt <- /small/f-30.txt",
            "M /small/",
            "M /small/f-10.txt",
            "- /small/f-20.txt",
            "+ /small/new.txt",
        ]),
        "the files that changed keep their exact status at 64K regions:\n{text}"
    );

    // '~' is exactly the untouched files with a block in a changed region.
    let untouched: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|name| !["/small/f-10.txt", "/small/f-20.txt", "/small/f-30.txt"].contains(name))
        .chain(["/other/keep.txt"])
        .collect();
    let physical = fs.physical_blocks(&untouched);
    let changed = fs.changed_ranges("c1");
    let fs_offset = reply["filesystems"][0]["offset_bytes"]
        .as_u64()
        .expect("offset_bytes");
    let expected_shared: BTreeSet<String> = untouched
        .iter()
        .filter(|name| {
            physical[**name]
                .values()
                .any(|&block| covered(&changed, fs_offset, block))
        })
        .map(|name| format!("~ {name}"))
        .collect();
    let listed_shared: BTreeSet<String> = shared.iter().map(|f| change_line(f)).collect();
    if !shared_expected {
        // Checked against the kernel's own block map (filefrag): no
        // reported change touches an untouched file's blocks.
        assert_eq!(
            expected_shared,
            BTreeSet::new(),
            "exact changes {changed:?} cover untouched files' blocks ({physical:?})"
        );
        assert_eq!(
            listed_shared,
            BTreeSet::new(),
            "no untouched file may be listed when the changed blocks are known exactly:\n{text}"
        );
        fs.finish();
        return;
    }
    assert!(
        !expected_shared.is_empty(),
        "no untouched file shares a changed 64K region (layout: {physical:?}, changed: {changed:?})"
    );
    assert_eq!(
        listed_shared, expected_shared,
        "'~' must list the untouched files in changed regions, and only them:\n{text}"
    );
    for file in shared {
        assert_eq!(file["content_changed"], false, "{file:#}");
        assert!(
            file["changed_bytes"].as_u64().is_some_and(|b| b > 0),
            "{file:#}"
        );
    }
    fs.finish();
}

#[test]
fn files_in_a_directory_grown_into_an_htree_keep_their_paths() {
    if skipped_unless_root(NEEDS_ROOT) {
        return;
    }
    require_tool("lsattr", "e2fsprogs");
    let fs = LiveFs::start_ext4("files-htree", &["--granularity", "4K"]);
    fs.mkdir("/many");
    fs.mkdir("/other");
    let name = |index: u32| format!("/many/entry-with-a-fairly-long-name-{index:03}.txt");
    // About 50 entries fill a 4 KiB block; past one block ext4 turns the
    // directory into an htree whose root keeps the old block's bytes.
    for index in 0..300 {
        fs.write(&name(index), u64::from(index), 100);
    }
    fs.sync();
    let attributes = run_program("lsattr", ["-d".as_ref(), fs.path("/many").as_os_str()]);
    assert!(
        attributes
            .split_whitespace()
            .next()
            .is_some_and(|flags| flags.contains('I')),
        "/many should be an indexed (htree) directory: {attributes}"
    );
    fs.checkpoint("c1");
    fs.append(&name(10), 1000, 50);
    fs.rename(&name(20), "/many/renamed.txt");
    fs.rename(&name(30), "/other/moved.txt");
    fs.remove(&name(40));
    fs.sync();

    let reply = fs.file_changes(&["--since", "c1"]);
    let expected = [
        format!("M {}", name(10)),
        format!("- {}", name(40)),
        "M /many/".to_string(),
        format!("R /many/renamed.txt <- {}", name(20)),
        "M /other/".to_string(),
        format!("R /other/moved.txt <- {}", name(30)),
    ];
    assert_eq!(
        change_lines(&reply),
        expected.into_iter().collect::<BTreeSet<String>>(),
        "files in an htree directory are listed by path like any other:\n{}",
        pretty(&reply)
    );
    fs.finish();
}
