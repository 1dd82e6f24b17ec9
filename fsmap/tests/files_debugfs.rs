//! Reading files out of images (`file_meta`, `file_layout`, `read_file_at`,
//! `FsMap::walk`, `MappedFs::open_fs`) against e2fsprogs' own answers.
//! The images are made by `mkfs -d` from a populated directory, then given
//! with `debugfs -w` what `mkfs -d` cannot express: xattrs small and
//! large, ACLs, device nodes and a fifo, owners past 16 bits, times with
//! epoch bits and nanoseconds, a preallocated (uninitialised) extent, a
//! size shorter than the data. For every file the walk reaches:
//! - contents, byte for byte, against `debugfs rdump`;
//! - data ranges against the extent or block list of `debugfs stat`
//!   (holes, uninitialised extents and blocks past i_size left out);
//! - type, permissions, owner, size, links, times and device numbers
//!   against `debugfs stat`; symlink targets against the source tree;
//! - xattr names against `debugfs stat`, values against `debugfs ea_get`;
//! - the walk itself against `debugfs ncheck`, in tar order.
//!
//! The images: ext4 with 4 KiB blocks and metadata_csum, with 1 KiB blocks
//! (a depth-2 extent tree), with 128-byte inodes (no extra time fields),
//! with inline data, with EA inodes, and ext2 (block maps up to the
//! triple-indirect block). Then a filesystem read through a journal that
//! `debugfs jw` wrote, and damaged xattr and extent blocks, which must
//! give errors and never a panic.

mod common;
#[path = "common/exercise.rs"]
mod exercise;
#[path = "common/harness.rs"]
mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{debugfs, debugfs_write, mkfs_with_files, ncheck};
use fsmap::disk::DiskMap;
use fsmap::ext4::{Ext4, Ext4Error, FileKind, FileMeta, Inode};
use fsmap::map::FsMap;
use fsmap::read::{Bytes, ReadAt};
use testkit::{MIB, TempDir, Xorshift, random_bytes, run, tool};

#[global_allocator]
static ALLOCATOR: harness::CountingAllocator = harness::CountingAllocator;

/// The file with a triple-indirect block on ext2 with 1 KiB blocks: past
/// 12 direct, 256 single and 65536 double-indirect blocks.
const FAR_OFFSET_BYTES: u64 = 66 * MIB;
/// The times `sif` gives /timed: (raw seconds, extra word) each, and what
/// they mean. Epoch bits 1 and 2 put mtime and ctime past 2038 and 2106.
const TIMED_ATIME: (&str, u32, (i64, u32)) = (
    "@1600000000",
    123_456_789 << 2,
    (1_600_000_000, 123_456_789),
);
const TIMED_MTIME: (&str, u32, (i64, u32)) =
    ("@-5", 1 | (999_999_999 << 2), ((1 << 32) - 5, 999_999_999));
const TIMED_CTIME: (&str, u32, (i64, u32)) = ("@2000000000", 2, (2_000_000_000 + (2 << 32), 0));
const TIMED_CRTIME: (&str, u32, (i64, u32)) = ("@1000", 3 | (5 << 2), (1000 + (3 << 32), 5));
/// u::rw-, u:1000:r--, g::r--, m::r--, o::--- as the VFS spells it (what
/// `getfattr -e hex` shows on any Linux filesystem).
const ACCESS_ACL: &[(u16, u16, u32)] = &[
    (0x01, 6, u32::MAX),
    (0x02, 4, 1000),
    (0x04, 4, u32::MAX),
    (0x10, 4, u32::MAX),
    (0x20, 0, u32::MAX),
];
/// d:u::rwx, d:g::r-x, d:o::r-x
const DEFAULT_ACL: &[(u16, u16, u32)] = &[
    (0x01, 7, u32::MAX),
    (0x04, 5, u32::MAX),
    (0x20, 5, u32::MAX),
];
const SELINUX_LABEL: &[u8] = b"system_u:object_r:etc_t:s0\0";

// ---------------------------------------------------------------------------
// The images.

/// What an image is made with and what its filesystem can hold.
struct Spec {
    label: &'static str,
    mkfs: &'static str,
    args: &'static [&'static str],
    size: &'static str,
    block_size: u64,
    /// Extents and no inline data: `debugfs fallocate` can preallocate.
    preallocate: bool,
    /// Inodes with room for extra time fields.
    large_inodes: bool,
    /// Values too large for the block go to EA inodes.
    ea_inode: bool,
    /// A file reaching past the double-indirect blocks of 1 KiB ext2.
    far: bool,
}

const SPEC: Spec = Spec {
    label: "",
    mkfs: "mkfs.ext4",
    args: &[],
    size: "32M",
    block_size: 4096,
    preallocate: true,
    large_inodes: true,
    ea_inode: false,
    far: false,
};

/// An xattr value larger than a 4 KiB block, which takes an EA inode.
fn huge_value() -> Vec<u8> {
    random_bytes(31, 4096)
}

/// The source tree: files of several sizes, a sparse and a fragmented
/// file, nesting, a hard link, fast and slow symlinks, a socket, setuid
/// and sticky modes; with `far`, a file whose only data is 66 MiB in.
fn populate(source: &Path, far: bool) {
    std::fs::create_dir_all(source.join("dir/sub")).unwrap();
    std::fs::create_dir_all(source.join("empty-dir")).unwrap();
    for size in [0usize, 1, 4095, 4096, 4097, 70_000, 1_500_000] {
        std::fs::write(
            source.join(format!("size-{size}")),
            random_bytes(size as u64, size),
        )
        .unwrap();
    }
    for index in 0..20 {
        let text = format!("note {index}\n").repeat(index * 40 + 1);
        std::fs::write(source.join(format!("dir/sub/n{index}.txt")), text).unwrap();
    }
    std::fs::hard_link(source.join("size-4097"), source.join("dir/hard")).unwrap();
    std::os::unix::fs::symlink("size-1", source.join("fast")).unwrap();
    std::os::unix::fs::symlink(format!("{}target", "long/".repeat(40)), source.join("slow"))
        .unwrap();
    // Past i_block, but short enough for inline data to hold.
    std::os::unix::fs::symlink("m".repeat(80), source.join("mid")).unwrap();
    drop(std::os::unix::net::UnixListener::bind(source.join("socket")).unwrap());
    for (name, size) in [("timed", 10), ("clipped", 8192), ("prealloc", 100)] {
        std::fs::write(source.join(name), random_bytes(7, size)).unwrap();
    }
    std::fs::write(source.join("suid"), b"#!/bin/sh\n").unwrap();
    set_mode(&source.join("suid"), 0o4755);
    std::fs::create_dir(source.join("sticky")).unwrap();
    set_mode(&source.join("sticky"), 0o1777);
    // Holes at the start, in the middle and before the last 3 bytes.
    let sparse = File::create(source.join("sparse")).unwrap();
    sparse.set_len(10 * MIB).unwrap();
    sparse
        .write_all_at(&random_bytes(11, 3), 5_000_000)
        .unwrap();
    sparse
        .write_all_at(&random_bytes(12, 3), 10 * MIB - 3)
        .unwrap();
    // 4 KiB every 8 KiB: 400 extents, a depth-2 tree with 1 KiB blocks,
    // and a hole after the last piece.
    let fragmented = File::create(source.join("dir/fragmented")).unwrap();
    for piece in 0..400u64 {
        fragmented
            .write_all_at(&random_bytes(piece + 100, 4096), piece * 8192)
            .unwrap();
    }
    fragmented.set_len(400 * 8192 + 100).unwrap();
    if far {
        let file = File::create(source.join("far")).unwrap();
        file.write_all_at(&random_bytes(13, 4096), FAR_OFFSET_BYTES)
            .unwrap();
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A VFS ACL xattr value: version 2, then (tag, permissions, id) entries.
fn vfs_acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut out = 2u32.to_le_bytes().to_vec();
    for &(tag, permissions, id) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&permissions.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

/// Bytes of the value that needs the xattr block (too big for the inode
/// body, small enough for one block).
fn block_value_bytes(block_size: u64) -> usize {
    block_size as usize / 2
}

/// What `debugfs -w` adds to a fresh image: what `mkfs -d` cannot make.
fn decorate(dir: &Path, image: &Path, spec: &Spec) {
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path.display().to_string()
    };
    let big = file(
        "big-value",
        &random_bytes(21, block_value_bytes(spec.block_size)),
    );
    let label = file("selinux-value", SELINUX_LABEL);
    let access = file("access-acl", &vfs_acl(ACCESS_ACL));
    let default = file("default-acl", &vfs_acl(DEFAULT_ACL));
    // mknod takes a name in the current directory (a "/" would become
    // part of the name) and gives no permissions; debugfs refuses minors
    // over 65535.
    let mut commands: Vec<String> = [
        "mknod fifo p",
        "mknod chr c 4 64",
        "mknod blk-old b 8 1",
        "mknod blk-new b 259 65000",
        "sif /fifo mode 010640",
        "sif /chr mode 020620",
        "ea_set /size-1 user.small hi",
        "ea_set /size-1 trusted.t tv",
        "sif /dir/sub/n1.txt uid 70000",
        "sif /dir/sub/n1.txt gid 80000",
        "sif /clipped size 5000",
    ]
    .map(String::from)
    .to_vec();
    commands.push(format!("ea_set -f {label} /size-1 security.selinux"));
    commands.push(format!("ea_set -f {big} /size-4096 user.big"));
    commands.push(format!(
        "ea_set -f {access} /size-1 system.posix_acl_access"
    ));
    commands.push(format!("ea_set -f {default} /dir system.posix_acl_default"));
    if spec.ea_inode {
        let huge = file("huge-value", &huge_value());
        commands.push(format!("ea_set -f {huge} /size-0 user.huge"));
    }
    if spec.preallocate {
        // Blocks 4..9 preallocated, inside the size.
        commands.push("fallocate /prealloc 4 9".into());
        commands.push(format!("sif /prealloc size {}", 12 * spec.block_size));
    }
    if spec.large_inodes {
        for (field, (seconds, extra, _)) in [
            ("atime", TIMED_ATIME),
            ("mtime", TIMED_MTIME),
            ("ctime", TIMED_CTIME),
            ("crtime", TIMED_CRTIME),
        ] {
            commands.push(format!("sif /timed {field} {seconds}"));
            commands.push(format!("sif /timed {field}_extra {extra}"));
        }
    }
    debugfs_write(image, &commands);
}

/// An image made from `spec`, its map, and where it is.
struct Made {
    dir: TempDir,
    image: PathBuf,
    source: PathBuf,
    fs: Ext4<File>,
    map: FsMap,
}

fn make(spec: &Spec) -> Made {
    let dir = TempDir::new(&format!("files-{}", spec.label));
    let source = dir.join("source");
    populate(&source, spec.far);
    let image = dir.join("fs.img");
    mkfs_with_files(spec.mkfs, spec.args, &source, &image, spec.size);
    decorate(dir.path(), &image, spec);
    let fs = Ext4::open(File::open(&image).unwrap()).unwrap();
    let map = FsMap::build(&fs).unwrap();
    assert!(
        map.problems.is_empty(),
        "{}: {:?}",
        spec.label,
        map.problems
    );
    Made {
        dir,
        image,
        source,
        fs,
        map,
    }
}

// ---------------------------------------------------------------------------
// What debugfs says.

/// `debugfs -f` with `commands`, read-only; what each printed.
fn debugfs_each(image: &Path, commands: &[String]) -> Vec<String> {
    let script = image.with_extension("requests");
    std::fs::write(&script, commands.join("\n") + "\n").unwrap();
    let text = run(std::process::Command::new(tool("debugfs", "e2fsprogs"))
        .arg("-f")
        .arg(&script)
        .arg(image));
    // Each command's output follows the command, echoed as "debugfs: CMD".
    let mut outputs: Vec<String> = Vec::new();
    for line in text.lines() {
        if let Some(echoed) = line.strip_prefix("debugfs: ") {
            assert_eq!(
                echoed,
                commands[outputs.len()],
                "debugfs ran another command"
            );
            outputs.push(String::new());
        } else if let Some(output) = outputs.last_mut() {
            output.push_str(line);
            output.push('\n');
        }
    }
    assert_eq!(
        outputs.len(),
        commands.len(),
        "debugfs skipped commands:\n{text}"
    );
    outputs
}

/// What `debugfs stat` prints about one inode.
#[derive(Debug, Default)]
struct Stat {
    kind: String,
    permissions: u16,
    uid: u32,
    gid: u32,
    size_bytes: u64,
    links: u16,
    /// "atime" ... "crtime" -> (raw seconds, the extra word if printed).
    times: BTreeMap<String, (u32, Option<u32>)>,
    device: Option<(u32, u32)>,
    /// (first, last logical block, uninitialised) of each data run.
    runs: Vec<(u64, u64, bool)>,
    inline_bytes: Option<u64>,
    fast_link: bool,
    /// (name, size) in the order listed.
    xattrs: Vec<(String, usize)>,
}

/// The value after `key` among the whitespace-separated words of `line`.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let mut words = line.split_whitespace();
    words.by_ref().find(|word| *word == key)?;
    words.next()
}

fn parse_stat(text: &str) -> Stat {
    let mut stat = Stat::default();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if line.starts_with("Inode:") {
            let (_, after_type) = line.split_once("Type: ").unwrap();
            let (kind, after_mode) = after_type.split_once("Mode:").unwrap();
            stat.kind = kind.trim().to_string();
            let mode = after_mode.split_whitespace().next().unwrap();
            stat.permissions = u16::from_str_radix(mode, 8).unwrap();
        } else if line.starts_with("User:") {
            stat.uid = field(line, "User:").unwrap().parse().unwrap();
            stat.gid = field(line, "Group:").unwrap().parse().unwrap();
            stat.size_bytes = field(line, "Size:").unwrap().parse().unwrap();
        } else if line.starts_with("Links:") {
            stat.links = field(line, "Links:").unwrap().parse().unwrap();
        } else if let Some((name, rest)) = trimmed.split_once("time: 0x") {
            // " mtime: 0x60406abf:1d6f3455 -- ..." or, without extra
            // fields, "mtime: 0x60406abf -- ...".
            let hex = rest.split_whitespace().next().unwrap();
            let (seconds, extra) = match hex.split_once(':') {
                Some((seconds, extra)) => (seconds, Some(u32::from_str_radix(extra, 16).unwrap())),
                None => (hex, None),
            };
            let seconds = u32::from_str_radix(seconds, 16).unwrap();
            stat.times.insert(format!("{name}time"), (seconds, extra));
        } else if let Some((_, numbers)) = line.split_once("Device major/minor number: ") {
            let decimal = numbers.split_whitespace().next().unwrap();
            let (major, minor) = decimal.split_once(':').unwrap();
            stat.device = Some((major.parse().unwrap(), minor.parse().unwrap()));
        } else if line == "EXTENTS:" || line == "BLOCKS:" {
            stat.runs = parse_runs(lines.next().unwrap_or_default());
        } else if let Some(size) = line.strip_prefix("Size of inline data: ") {
            stat.inline_bytes = Some(size.trim().parse().unwrap());
        } else if line.starts_with("Fast link dest:") {
            stat.fast_link = true;
        } else if line == "Extended attributes:" {
            while let Some(entry) = lines.next_if(|l| l.starts_with("  ")) {
                let (name, rest) = entry.trim().split_once(" (").unwrap();
                let size = rest.split_once(')').unwrap().0.parse().unwrap();
                stat.xattrs.push((name.to_string(), size));
            }
        }
    }
    stat
}

/// "(0-3):1172-1175, (ETB0):2493, (4-9[u]):2782-2787, (IND):346, (12):40"
/// -> the data runs (first, last logical block, uninitialised); mapping
/// blocks (ETB, IND, DIND, TIND) are left out.
fn parse_runs(line: &str) -> Vec<(u64, u64, bool)> {
    let mut runs = Vec::new();
    for item in line.split(", ").filter(|item| item.starts_with('(')) {
        let inside = &item[1..item.find(')').unwrap()];
        if !inside.starts_with(|c: char| c.is_ascii_digit()) {
            continue;
        }
        let uninitialized = inside.ends_with("[u]");
        let range = inside.trim_end_matches("[u]");
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        runs.push((first.parse().unwrap(), last.parse().unwrap(), uninitialized));
    }
    runs
}

/// The data ranges a stat's runs give: initialised blocks within the size,
/// touching runs joined.
fn ranges_of(stat: &Stat, block_size: u64) -> Vec<(u64, u64)> {
    if stat.inline_bytes.is_some() || stat.fast_link {
        return if stat.size_bytes > 0 {
            vec![(0, stat.size_bytes)]
        } else {
            Vec::new()
        };
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(first, last, uninitialized) in &stat.runs {
        let start = first * block_size;
        let end = ((last + 1) * block_size).min(stat.size_bytes);
        if uninitialized || start >= end {
            continue;
        }
        match out.last_mut() {
            Some((from, length)) if *from + *length == start => *length = end - *from,
            _ => out.push((start, end - start)),
        }
    }
    out
}

/// The file's times as the kernel decodes them from what stat printed.
fn decoded_time(raw: (u32, Option<u32>)) -> (i64, u32) {
    let (seconds, extra) = raw;
    let extra = extra.unwrap_or(0);
    (
        i64::from(seconds as i32) + (i64::from(extra & 3) << 32),
        extra >> 2,
    )
}

// ---------------------------------------------------------------------------
// The comparisons.

/// Every name the walk yields, against `debugfs ncheck`, and in tar order
/// (which is the order of the paths' components).
fn check_walk(label: &str, image: &Path, walked: &[(Vec<u8>, u32)]) {
    assert_eq!(
        walked.first(),
        Some(&(b"/".to_vec(), 2)),
        "{label}: the walk starts at /"
    );
    let mut sorted = walked.to_vec();
    sorted.sort_by(|(a, _), (b, _)| a.split(|&c| c == b'/').cmp(b.split(|&c| c == b'/')));
    assert_eq!(sorted, walked, "{label}: the walk is not in tar order");
    let numbers: BTreeSet<u32> = walked.iter().map(|&(_, n)| n).filter(|&n| n != 2).collect();
    let numbers: Vec<u32> = numbers.into_iter().collect();
    let mut theirs: BTreeSet<(String, u32)> = BTreeSet::new();
    for (number, paths) in ncheck(image, &numbers) {
        theirs.extend(paths.into_iter().map(|path| (path, number)));
    }
    let ours: BTreeSet<(String, u32)> = walked[1..]
        .iter()
        .map(|(path, number)| (String::from_utf8(path.clone()).unwrap(), *number))
        .collect();
    assert_eq!(ours, theirs, "{label}: the walk and debugfs ncheck differ");
}

fn kind_name(kind: FileKind) -> &'static str {
    match kind {
        FileKind::Regular => "regular",
        FileKind::Directory => "directory",
        FileKind::Symlink => "symlink",
        FileKind::CharDevice { .. } => "character special",
        FileKind::BlockDevice { .. } => "block special",
        FileKind::Fifo => "FIFO",
        FileKind::Socket => "socket",
    }
}

fn check_meta(what: &str, meta: &FileMeta, stat: &Stat, source: &Path, path: &str) {
    assert_eq!(kind_name(meta.kind), stat.kind, "{what}: type");
    assert_eq!(meta.permissions, stat.permissions, "{what}: permissions");
    assert_eq!((meta.uid, meta.gid), (stat.uid, stat.gid), "{what}: owner");
    assert_eq!(meta.size_bytes, stat.size_bytes, "{what}: size");
    assert_eq!(meta.links, stat.links, "{what}: links");
    for (name, ours) in [
        ("atime", meta.atime),
        ("mtime", meta.mtime),
        ("ctime", meta.ctime),
    ] {
        assert_eq!(ours, decoded_time(stat.times[name]), "{what}: {name}");
    }
    assert_eq!(
        meta.crtime,
        stat.times.get("crtime").copied().map(decoded_time),
        "{what}: crtime"
    );
    let device = match meta.kind {
        FileKind::CharDevice { major, minor } | FileKind::BlockDevice { major, minor } => {
            Some((major, minor))
        }
        _ => None,
    };
    assert_eq!(device, stat.device, "{what}: device numbers");
    if meta.kind == FileKind::Symlink {
        let target = std::fs::read_link(source.join(&path[1..])).unwrap();
        assert_eq!(
            meta.symlink_target.as_deref(),
            Some(target.as_os_str().as_encoded_bytes()),
            "{what}: symlink target"
        );
    }
    let theirs: Vec<&str> = stat
        .xattrs
        .iter()
        .map(|(name, _)| name.as_str())
        .filter(|&name| name != "system.data")
        .collect();
    let ours: Vec<&str> = meta.xattrs.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(ours, theirs, "{what}: xattr names");
}

/// Every xattr value against `debugfs ea_get`. ea_get converts ACLs to the
/// VFS format as we do, but gives the entries that name no user or group
/// the id 0 where the kernel gives ACL_UNDEFINED_ID (-1): those ids are
/// set to -1 before comparing.
fn check_xattr_values(label: &str, dir: &Path, image: &Path, metas: &[FileMeta]) {
    let mut commands = Vec::new();
    let mut expected = Vec::new();
    for meta in metas {
        for (index, (name, value)) in meta.xattrs.iter().enumerate() {
            let out = dir.join(format!("ea-{}-{index}", meta.number));
            commands.push(format!(
                "ea_get -f {} <{}> {name}",
                out.display(),
                meta.number
            ));
            expected.push((out, meta.number, name, value));
        }
    }
    assert!(
        expected.len() >= 5,
        "{label}: only {} xattrs",
        expected.len()
    );
    debugfs_each(image, &commands);
    for (out, number, name, value) in expected {
        let mut theirs =
            std::fs::read(&out).unwrap_or_else(|e| panic!("{label}: ea_get {name}: {e}"));
        if name.starts_with("system.posix_acl_") {
            for entry in theirs[4..].chunks_exact_mut(8) {
                if matches!(
                    u16::from_le_bytes([entry[0], entry[1]]),
                    0x01 | 0x04 | 0x10 | 0x20
                ) {
                    entry[4..].fill(0xFF);
                }
            }
        }
        assert!(
            &theirs == value,
            "{label}: inode {number}: {name} differs from ea_get"
        );
    }
}

/// Reads the whole file in pieces and compares it with what debugfs dumped.
/// debugfs 1.47 dumps an inline file shorter than i_block as all 60 bytes
/// of i_block: only the file's own bytes of such a dump are compared.
fn check_contents(what: &str, fs: &Ext4<File>, inode: &Inode, dumped: &Path) {
    let layout = fs.file_layout(inode).unwrap();
    let theirs = File::open(dumped).unwrap_or_else(|e| panic!("{what}: {}: {e}", dumped.display()));
    let dumped_bytes = theirs.metadata().unwrap().len();
    let padded = inode.has_inline_data() && layout.size_bytes < 60 && dumped_bytes == 60;
    if !padded {
        assert_eq!(dumped_bytes, layout.size_bytes, "{what}: dumped size");
    }
    let mut at = 0u64;
    while at < layout.size_bytes {
        let length = (layout.size_bytes - at).min(MIB) as usize;
        let mut ours = vec![0u8; length];
        fs.read_file_at(inode, &layout, at, &mut ours).unwrap();
        let mut expected = vec![0u8; length];
        FileExt::read_exact_at(&theirs, &mut expected, at).unwrap();
        if let Some(index) = ours.iter().zip(&expected).position(|(a, b)| a != b) {
            panic!(
                "{what}: byte {} differs from debugfs rdump",
                at + index as u64
            );
        }
        at += length as u64;
    }
}

/// Everything above for every file the walk reaches; returns each file's
/// metadata by path, for the checks particular to one image.
fn check_files(spec: &Spec, made: &Made) -> BTreeMap<String, FileMeta> {
    let label = spec.label;
    let walked: Vec<(Vec<u8>, u32)> = made.map.walk().collect();
    check_walk(label, &made.image, &walked);
    let mut first_paths: BTreeMap<u32, String> = BTreeMap::new();
    for (path, number) in &walked {
        first_paths
            .entry(*number)
            .or_insert_with(|| String::from_utf8(path.clone()).unwrap());
    }
    let commands: Vec<String> = first_paths.keys().map(|n| format!("stat <{n}>")).collect();
    let stats: Vec<Stat> = debugfs_each(&made.image, &commands)
        .iter()
        .map(|s| parse_stat(s))
        .collect();
    let dumped = made.dir.join("dumped");
    std::fs::create_dir(&dumped).unwrap();
    debugfs(&made.image, &format!("rdump / {}", dumped.display()));
    let mut metas = BTreeMap::new();
    for ((number, path), stat) in first_paths.iter().zip(&stats) {
        let what = format!("{label}: {path} (inode {number})");
        let inode = made.fs.inode(*number).unwrap();
        let meta = made
            .fs
            .file_meta(&inode)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        check_meta(&what, &meta, stat, &made.source, path);
        let layout = made
            .fs
            .file_layout(&inode)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            layout.data_ranges(),
            ranges_of(stat, spec.block_size),
            "{what}: data ranges"
        );
        if meta.kind == FileKind::Regular {
            check_contents(&what, &made.fs, &inode, &dumped.join(&path[1..]));
        }
        metas.insert(path.clone(), meta);
    }
    let all: Vec<FileMeta> = metas.values().cloned().collect();
    check_xattr_values(label, made.dir.path(), &made.image, &all);
    check_decorations(spec, &metas);
    metas
}

/// What `decorate` set, against the values it set (not only debugfs's
/// reading of them).
fn check_decorations(spec: &Spec, metas: &BTreeMap<String, FileMeta>) {
    let label = spec.label;
    let xattr = |path: &str, name: &str| {
        metas[path]
            .xattrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        xattr("/size-1", "user.small").as_deref(),
        Some(&b"hi"[..]),
        "{label}"
    );
    assert_eq!(
        xattr("/size-1", "security.selinux").as_deref(),
        Some(SELINUX_LABEL),
        "{label}"
    );
    assert_eq!(
        xattr("/size-1", "system.posix_acl_access"),
        Some(vfs_acl(ACCESS_ACL)),
        "{label}"
    );
    assert_eq!(
        xattr("/dir", "system.posix_acl_default"),
        Some(vfs_acl(DEFAULT_ACL)),
        "{label}"
    );
    let big = random_bytes(21, block_value_bytes(spec.block_size));
    assert_eq!(xattr("/size-4096", "user.big"), Some(big), "{label}");
    assert_eq!(
        (metas["/dir/sub/n1.txt"].uid, metas["/dir/sub/n1.txt"].gid),
        (70000, 80000)
    );
    assert_eq!(metas["/suid"].permissions, 0o4755, "{label}");
    assert_eq!(metas["/sticky"].permissions, 0o1777, "{label}");
    assert_eq!(
        metas["/chr"].kind,
        FileKind::CharDevice {
            major: 4,
            minor: 64
        }
    );
    assert_eq!(
        metas["/blk-old"].kind,
        FileKind::BlockDevice { major: 8, minor: 1 }
    );
    assert_eq!(
        metas["/blk-new"].kind,
        FileKind::BlockDevice {
            major: 259,
            minor: 65000
        }
    );
    assert_eq!(metas["/fifo"].kind, FileKind::Fifo);
    assert_eq!(metas["/fifo"].permissions, 0o640, "{label}");
    assert_eq!(metas["/socket"].kind, FileKind::Socket);
    assert_eq!(metas["/clipped"].size_bytes, 5000);
    let timed = &metas["/timed"];
    if spec.large_inodes {
        assert_eq!(timed.atime, TIMED_ATIME.2, "{label}: atime");
        assert_eq!(timed.mtime, TIMED_MTIME.2, "{label}: mtime");
        assert_eq!(timed.ctime, TIMED_CTIME.2, "{label}: ctime");
        assert_eq!(timed.crtime, Some(TIMED_CRTIME.2), "{label}: crtime");
    } else {
        assert_eq!(timed.crtime, None, "{label}: crtime in a 128-byte inode");
        assert_eq!(timed.mtime.1, 0, "{label}: nanoseconds in a 128-byte inode");
    }
}

/// The file's layout, by path.
fn layout_of(made: &Made, path: &str) -> fsmap::ext4::FileLayout {
    let inode = made.fs.inode(made.fs.lookup(path).unwrap()).unwrap();
    made.fs.file_layout(&inode).unwrap()
}

/// The depth `debugfs ex` gives a file's extent tree.
fn extent_depth(image: &Path, path: &str) -> u32 {
    let text = debugfs(image, &format!("ex {path}"));
    // " 0/ 2   1/  1     0 -  3200  2493           3201": level/depth.
    let line = text.lines().nth(1).unwrap_or_default();
    line.split('/')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

// ---------------------------------------------------------------------------
// The images, one test each.

#[test]
fn files_match_debugfs_on_ext4_with_4k_blocks_and_metadata_csum() {
    let spec = Spec {
        label: "ext4-4k-csum",
        args: &["-b", "4096", "-I", "256", "-O", "metadata_csum,64bit"],
        size: "64M",
        ..SPEC
    };
    let made = make(&spec);
    check_files(&spec, &made);
    // The preallocated blocks 4..9 (16 KiB to 40 KiB) are a hole.
    assert_eq!(layout_of(&made, "/prealloc").data_ranges(), vec![(0, 4096)]);
}

#[test]
fn files_match_debugfs_on_ext4_with_1k_blocks_and_a_depth_2_extent_tree() {
    let spec = Spec {
        label: "ext4-1k",
        args: &["-b", "1024", "-O", "^metadata_csum"],
        block_size: 1024,
        ..SPEC
    };
    let made = make(&spec);
    check_files(&spec, &made);
    assert!(
        extent_depth(&made.image, "/dir/fragmented") >= 2,
        "no depth-2 tree"
    );
    let layout = layout_of(&made, "/dir/fragmented");
    assert_eq!(layout.data_ranges().len(), 400);
    assert_eq!(layout.data_bytes(), 400 * 4096);
    assert_eq!(layout_of(&made, "/prealloc").data_ranges(), vec![(0, 1024)]);
    assert_eq!(layout_of(&made, "/clipped").data_ranges(), vec![(0, 5000)]);
}

#[test]
fn files_match_debugfs_on_ext4_with_128_byte_inodes() {
    let spec = Spec {
        label: "ext4-128",
        args: &["-b", "4096", "-I", "128"],
        large_inodes: false,
        ..SPEC
    };
    let made = make(&spec);
    let metas = check_files(&spec, &made);
    assert!(metas.values().all(|meta| meta.crtime.is_none()));
}

#[test]
fn files_match_debugfs_on_ext4_with_inline_data() {
    let spec = Spec {
        label: "ext4-inline",
        args: &["-b", "4096", "-I", "256", "-O", "inline_data"],
        preallocate: false,
        ..SPEC
    };
    let made = make(&spec);
    check_files(&spec, &made);
    // 100 bytes: 60 in i_block, 40 in system.data; a symlink target
    // longer than i_block; a file shorter than it.
    for path in ["/prealloc", "/mid", "/dir/sub/n0.txt"] {
        let inode = made.fs.inode(made.fs.lookup(path).unwrap()).unwrap();
        assert!(inode.has_inline_data(), "{path} is not inline");
    }
}

#[test]
fn files_match_debugfs_on_ext4_with_xattr_values_in_ea_inodes() {
    let spec = Spec {
        label: "ext4-ea-inode",
        args: &["-b", "4096", "-I", "256", "-O", "ea_inode,metadata_csum"],
        ea_inode: true,
        ..SPEC
    };
    let made = make(&spec);
    let metas = check_files(&spec, &made);
    let huge = metas["/size-0"]
        .xattrs
        .iter()
        .find(|(n, _)| n == "user.huge");
    assert_eq!(huge.map(|(_, value)| value.clone()), Some(huge_value()));
    // The value is an inode of its own (i_flags EA_INODE), which no
    // directory names.
    let holders: Vec<u32> = (0..made.fs.sb.group_count)
        .flat_map(|group| made.fs.group_inodes(group).unwrap())
        .map(Result::unwrap)
        .filter(|inode| inode.flags & 0x20_0000 != 0)
        .map(|inode| inode.number)
        .collect();
    assert_eq!(holders.len(), 1, "EA inodes: {holders:?}");
    assert!(made.map.walk().all(|(_, number)| number != holders[0]));
}

#[test]
fn files_match_debugfs_on_ext2_block_maps_to_the_triple_indirect_block() {
    let spec = Spec {
        label: "ext2-1k",
        mkfs: "mkfs.ext2",
        args: &["-b", "1024", "-I", "256"],
        block_size: 1024,
        preallocate: false,
        far: true,
        ..SPEC
    };
    let made = make(&spec);
    check_files(&spec, &made);
    let stat = debugfs(&made.image, "stat /far");
    assert!(
        stat.contains("(TIND)"),
        "/far has no triple-indirect block:\n{stat}"
    );
    assert_eq!(
        layout_of(&made, "/far").data_ranges(),
        vec![(FAR_OFFSET_BYTES, 4096)]
    );
}

// ---------------------------------------------------------------------------
// Through a journal.

/// The blocks where `after` differs from `before`, and their contents in
/// `after`, one after another.
fn changed_blocks(before: &Path, after: &Path, block_size: usize) -> (Vec<u64>, Vec<u8>) {
    let before = std::fs::read(before).unwrap();
    let after = std::fs::read(after).unwrap();
    let mut blocks = Vec::new();
    let mut contents = Vec::new();
    for (index, (old, new)) in before
        .chunks(block_size)
        .zip(after.chunks(block_size))
        .enumerate()
    {
        if old != new {
            blocks.push(index as u64);
            contents.extend_from_slice(new);
        }
    }
    (blocks, contents)
}

/// Two views of one filesystem agree: the same walk, and for every file
/// the same metadata, layout and contents.
fn assert_same_files<R: ReadAt, S: ReadAt>(
    label: &str,
    (map, fs): (&FsMap, &Ext4<R>),
    (expected_map, expected_fs): (&FsMap, &Ext4<S>),
) -> usize {
    let walked: Vec<(Vec<u8>, u32)> = map.walk().collect();
    let expected: Vec<(Vec<u8>, u32)> = expected_map.walk().collect();
    assert_eq!(walked, expected, "{label}: walks differ");
    let mut compared = 0;
    let mut seen = BTreeSet::new();
    for (path, number) in walked {
        if !seen.insert(number) {
            continue;
        }
        let what = format!("{label}: {}", String::from_utf8_lossy(&path));
        let (ours, theirs) = (
            fs.inode(number).unwrap(),
            expected_fs.inode(number).unwrap(),
        );
        assert_eq!(
            fs.file_meta(&ours).unwrap(),
            expected_fs.file_meta(&theirs).unwrap(),
            "{what}"
        );
        let layout = fs.file_layout(&ours).unwrap();
        assert_eq!(
            layout,
            expected_fs.file_layout(&theirs).unwrap(),
            "{what}: layout"
        );
        let mut bytes = vec![0u8; layout.size_bytes.min(16 * MIB) as usize];
        let mut expected_bytes = bytes.clone();
        fs.read_file_at(&ours, &layout, 0, &mut bytes).unwrap();
        let expected_layout = expected_fs.file_layout(&theirs).unwrap();
        expected_fs
            .read_file_at(&theirs, &expected_layout, 0, &mut expected_bytes)
            .unwrap();
        assert!(bytes == expected_bytes, "{what}: contents differ");
        compared += 1;
    }
    compared
}

/// Changes files on a copy of the image, then logs the copy's changed
/// blocks in the original's journal (and nowhere else), as a crash leaves
/// a committed transaction that was not checkpointed. Returns the copy and
/// the blocks logged.
fn change_through_the_journal(made: &Made) -> (PathBuf, Vec<u64>) {
    let after = made.dir.join("after.img");
    std::fs::copy(&made.image, &after).unwrap();
    let fresh = made.dir.join("fresh");
    std::fs::write(&fresh, random_bytes(41, 30_000)).unwrap();
    debugfs_write(
        &after,
        &[
            format!("write {} fresh", fresh.display()),
            "mkdir newdir".into(),
            "ea_set /size-4097 user.late later".into(),
            "sif /size-4097 mtime @1234567890".into(),
            "rm /size-70000".into(),
        ],
    );
    let block_size = made.fs.sb.block_size as usize;
    let (blocks, contents) = changed_blocks(&made.image, &after, block_size);
    let logged = made.dir.join("logged");
    std::fs::write(&logged, contents).unwrap();
    let list: Vec<String> = blocks.iter().map(u64::to_string).collect();
    debugfs_write(
        &made.image,
        &[
            "jo".into(),
            format!("jw -b {} {}", list.join(","), logged.display()),
            "jc".into(),
        ],
    );
    (after, blocks)
}

#[test]
fn files_read_through_a_journal_that_debugfs_wrote_are_the_journalled_ones() {
    let spec = Spec {
        label: "journal",
        args: &["-b", "4096", "-I", "256", "-O", "metadata_csum,64bit"],
        ..SPEC
    };
    let made = make(&spec);
    let (after, blocks) = change_through_the_journal(&made);
    let device = File::open(&made.image).unwrap();
    let disk = DiskMap::build(&device, device.metadata().unwrap().len());
    assert_eq!(disk.filesystems.len(), 1, "{:?}", disk.notes);
    let mapped = &disk.filesystems[0];
    let replaced: Vec<u64> = mapped.replaced.keys().copied().collect();
    assert_eq!(
        replaced, blocks,
        "the journal replaced other blocks than were logged"
    );
    let through = mapped.open_fs(&device).unwrap();
    let after_fs = Ext4::open(File::open(&after).unwrap()).unwrap();
    let after_map = FsMap::build(&after_fs).unwrap();
    let compared = assert_same_files("journal", (&mapped.map, &through), (&after_map, &after_fs));
    assert!(compared > 30, "only {compared} files compared");
    let in_place = Ext4::open(&device).unwrap();
    assert!(
        in_place.lookup("/fresh").is_err(),
        "/fresh is in place: the journal was not needed"
    );

    // A map loaded from its saved form kept no replay: the journal is
    // replayed again, to the same files.
    let loaded = DiskMap::decode(&disk.encode()).unwrap();
    assert!(!loaded.filesystems[0].replay_known);
    let again = loaded.filesystems[0].open_fs(&device).unwrap();
    assert_same_files(
        "loaded",
        (&loaded.filesystems[0].map, &again),
        (&after_map, &after_fs),
    );

    // Another filesystem on the device is refused.
    let other = made.dir.join("other.img");
    run(std::process::Command::new(tool("mkfs.ext4", "e2fsprogs"))
        .args(["-q", "-F", "-b", "4096"])
        .arg(&other)
        .arg(spec.size));
    let other = File::open(&other).unwrap();
    let refused = mapped.open_fs(&other);
    assert!(
        matches!(refused, Err(Ext4Error::Mismatch(_))),
        "{:?}",
        refused.err()
    );
}

// ---------------------------------------------------------------------------
// Damage.

/// Memory and time one damaged case may take (see tests/corrupt_images.rs).
const CASE_PEAK_BYTES_MAX: isize = 64 << 20;
const CASE_DURATION_MAX: Duration = Duration::from_secs(10);
/// The files whose xattr block, extent-tree blocks and inode are damaged.
const DAMAGED_FILES: &[&str] = &["/size-1", "/size-4096", "/dir", "/dir/fragmented", "/mid"];

/// Where the damage goes: (byte offset, length) of each damaged file's
/// inode, xattr block and mapping blocks, with the files' inode numbers.
fn damage_targets(image: &[u8]) -> (Vec<(usize, usize, &'static str)>, Vec<u32>) {
    let fs = Ext4::open(Bytes(image.to_vec())).unwrap();
    let block_size = fs.sb.block_size as usize;
    let mut regions = Vec::new();
    let mut numbers = Vec::new();
    for path in DAMAGED_FILES {
        let number = fs.lookup(path).unwrap();
        numbers.push(number);
        let per_group = fs.sb.inodes_per_group;
        let table = fs
            .group(u64::from((number - 1) / per_group))
            .unwrap()
            .inode_table;
        let slot = u64::from((number - 1) % per_group);
        let offset = table * fs.sb.block_size + slot * fs.sb.inode_size;
        regions.push((offset as usize, fs.sb.inode_size as usize, "inode"));
        let blocks = fs.blocks(&fs.inode(number).unwrap()).unwrap();
        if let Some(block) = blocks.xattr_block {
            regions.push((block as usize * block_size, block_size, "xattr block"));
        }
        for &(start, _) in &blocks.map {
            regions.push((start as usize * block_size, block_size, "extent block"));
        }
    }
    let classes: BTreeSet<&str> = regions.iter().map(|r| r.2).collect();
    assert_eq!(
        classes.len(),
        3,
        "no xattr or extent block to damage: {regions:?}"
    );
    (regions, numbers)
}

/// How many of the damaged files' metadata and layouts failed to read.
fn file_errors(image: &Bytes, numbers: &[u32]) -> usize {
    let Ok(fs) = Ext4::open(image) else {
        return numbers.len();
    };
    let mut errors = 0;
    for &number in numbers {
        match fs.inode(number) {
            Ok(inode) => {
                errors += usize::from(fs.file_meta(&inode).is_err());
                errors += usize::from(exercise::exercise_file(&fs, &inode).is_none());
            }
            Err(_) => errors += 1,
        }
    }
    errors
}

#[test]
fn every_flipped_byte_of_a_checksummed_xattr_or_extent_block_is_an_error() {
    let spec = Spec {
        label: "flip-csum",
        args: &["-b", "1024", "-O", "metadata_csum,64bit"],
        block_size: 1024,
        ..SPEC
    };
    let made = make(&spec);
    let pristine = std::fs::read(&made.image).unwrap();
    let (regions, numbers) = damage_targets(&pristine);
    let mut work = Bytes(pristine.clone());
    let mut cases = 0;
    for &(offset, length, class) in &regions {
        for at in offset..offset + length {
            work.0[at] ^= 0x5A;
            assert!(
                file_errors(&work, &numbers) > 0,
                "{class} byte {at} flipped went unnoticed"
            );
            work.0[at] ^= 0x5A;
            cases += 1;
        }
    }
    assert!(work.0 == pristine);
    assert!(cases > 5000, "only {cases} bytes flipped");
}

#[test]
fn damaged_xattr_and_extent_blocks_without_checksums_give_errors_and_never_panic() {
    harness::install_panic_capture();
    let spec = Spec {
        label: "damage-plain",
        args: &["-b", "1024", "-O", "^metadata_csum"],
        block_size: 1024,
        ..SPEC
    };
    let made = make(&spec);
    let pristine = std::fs::read(&made.image).unwrap();
    let (regions, numbers) = damage_targets(&pristine);
    let boundary = [
        0u32,
        1,
        2,
        0x7F,
        0x80,
        0xFF,
        0x7FFF,
        0x8000,
        0xFFFF,
        0x8000_0000,
        u32::MAX,
    ];
    let mut work = Bytes(pristine.clone());
    let mut failures = Vec::new();
    let mut erring_cases = 0;
    let cases = 1500;
    for index in 0..cases {
        let seed = harness::case_seed(spec.label, index);
        let mut random = Xorshift::new(seed);
        let (offset, length, class) = regions[random.index(regions.len())];
        let width = [1usize, 2, 4][random.index(3)];
        let at = offset + random.index(length / width) * width;
        let value = if random.chance(50) {
            random.next() as u32
        } else {
            boundary[random.index(boundary.len())]
        };
        work.0[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
        // Every read of the whole image (the map, its walk, every file)
        // costs 30 ms a case: every tenth case.
        let outcome = harness::run_case(|| {
            let errors = file_errors(&work, &numbers);
            if index % 10 == 0 {
                exercise::exercise(&work, None, &[]);
            }
            errors
        });
        work.0[at..at + width].copy_from_slice(&pristine[at..at + width]);
        if let Some(failure) = outcome.failure(CASE_PEAK_BYTES_MAX, CASE_DURATION_MAX) {
            failures.push(format!(
                "case {index} (seed {seed:#x}): {class} at {at} = {value:#x}: {failure}"
            ));
        }
        erring_cases += usize::from(outcome.result.is_ok_and(|errors| errors > 0));
    }
    assert!(work.0 == pristine);
    harness::assert_no_failures(&failures, || {
        format!("{} of {cases} damaged images failed", failures.len())
    });
    eprintln!(
        "{}: {erring_cases} of {cases} cases made a file unreadable",
        spec.label
    );
    assert!(
        erring_cases * 10 >= cases,
        "only {erring_cases} of {cases} cases reached an error"
    );
}
