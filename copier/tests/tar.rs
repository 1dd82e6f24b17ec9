//! Archives from `copier::tar` extracted by the real tools: GNU tar and
//! bsdtar (libarchive-tools) must give back every kind of entry with its
//! contents, permissions, owner, nanosecond mtime, xattrs, symlink
//! targets, hard links and sparseness; long, non-ASCII and non-UTF-8
//! names included. Run as root (owners, device nodes).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use copier::tar::{Entry, EntryKind, TarWriter};
use testkit::{TempDir, output, require_tool, run_program};

const GIB: u64 = 1 << 30;

/// The byte at `offset` of every file: never zero, so a hole read as data
/// or data lost to a hole shows.
fn byte_at(offset: u64) -> u8 {
    (offset % 251) as u8 + 1
}

fn entry(path: &[u8], kind: EntryKind) -> Entry {
    Entry {
        path: path.to_vec(),
        kind,
        mode: 0o640,
        uid: 1234,
        gid: 5678,
        mtime: (1_700_000_000, 123_456_789),
        atime: Some((1_600_000_000, 5)),
        ctime: None,
        xattrs: Vec::new(),
    }
}

fn long_name() -> Vec<u8> {
    format!("d/{}/{}", "x".repeat(150), "y".repeat(150)).into_bytes()
}

/// Every kind of entry, in an archive at `archive`.
fn write_archive(archive: &Path) {
    let out = std::io::BufWriter::new(std::fs::File::create(archive).unwrap());
    let mut tar = TarWriter::new(out);
    let mut fill = |offset: u64, buf: &mut [u8]| {
        for (i, byte) in buf.iter_mut().enumerate() {
            *byte = byte_at(offset + i as u64);
        }
        Ok(())
    };
    let entries = [
        entry(b"d", EntryKind::Directory),
        Entry {
            mode: 0o4755,
            xattrs: vec![("user.comment".into(), b"hi\0there\n\xff".to_vec())],
            ..entry(
                b"d/plain",
                EntryKind::File {
                    size_bytes: 5000,
                    data: vec![(0, 5000)],
                },
            )
        },
        entry(
            b"d/sparse",
            EntryKind::File {
                size_bytes: GIB,
                data: vec![(4096, 100), (1 << 20, 5000), (GIB - 4096, 4096)],
            },
        ),
        entry(
            "d/caf\u{e9}".as_bytes(),
            EntryKind::File {
                size_bytes: 3,
                data: vec![(0, 3)],
            },
        ),
        entry(
            b"d/bin\xff\xfename",
            EntryKind::File {
                size_bytes: 3,
                data: vec![(0, 3)],
            },
        ),
        entry(
            b"d/link",
            EntryKind::Symlink {
                target: b"plain".to_vec(),
            },
        ),
        entry(
            b"d/hard",
            EntryKind::HardLink {
                target: b"d/plain".to_vec(),
            },
        ),
        entry(b"d/fifo", EntryKind::Fifo),
        entry(b"d/null", EntryKind::CharDevice { major: 1, minor: 3 }),
        entry(
            format!("d/{}", "x".repeat(150)).as_bytes(),
            EntryKind::Directory,
        ),
        entry(
            &long_name(),
            EntryKind::File {
                size_bytes: 3,
                data: vec![(0, 3)],
            },
        ),
    ];
    for each in &entries {
        tar.add(each, &mut fill).unwrap();
    }
    tar.finish().unwrap();
}

fn check_extracted(root: &Path, tool: &str) {
    let d = root.join("d");
    let plain = std::fs::metadata(d.join("plain")).unwrap();
    assert_eq!(plain.mode() & 0o7777, 0o4755, "{tool}: mode");
    assert_eq!((plain.uid(), plain.gid()), (1234, 5678), "{tool}: owner");
    assert_eq!(
        (plain.mtime(), plain.mtime_nsec()),
        (1_700_000_000, 123_456_789),
        "{tool}: mtime"
    );
    let expected: Vec<u8> = (0..5000).map(byte_at).collect();
    assert_eq!(
        std::fs::read(d.join("plain")).unwrap(),
        expected,
        "{tool}: contents"
    );
    let value = std::process::Command::new("getfattr")
        .args(["--only-values", "-n", "user.comment"])
        .arg(d.join("plain"))
        .output()
        .unwrap();
    assert_eq!(value.stdout, b"hi\0there\n\xff", "{tool}: xattr");
    // Sparse: the data where it was, zeroes elsewhere, few blocks taken.
    let sparse = std::fs::File::open(d.join("sparse")).unwrap();
    let metadata = sparse.metadata().unwrap();
    assert_eq!(metadata.len(), GIB, "{tool}: sparse size");
    assert!(
        metadata.blocks() < 1024,
        "{tool}: {} sectors taken",
        metadata.blocks()
    );
    for (offset, length) in [(4096u64, 100u64), (1 << 20, 5000), (GIB - 4096, 4096)] {
        let mut buf = vec![0u8; length as usize + 8];
        std::os::unix::fs::FileExt::read_exact_at(&sparse, &mut buf, offset - 8).unwrap();
        assert_eq!(&buf[..8], &[0; 8], "{tool}: zeroes before {offset}");
        let want: Vec<u8> = (offset..offset + length).map(byte_at).collect();
        assert_eq!(
            &buf[8..8 + length as usize],
            &want[..],
            "{tool}: data at {offset}"
        );
    }
    assert!(d.join("caf\u{e9}").exists(), "{tool}: a UTF-8 name");
    assert!(
        d.join(OsStr::from_bytes(b"bin\xff\xfename")).exists(),
        "{tool}: a non-UTF-8 name"
    );
    assert_eq!(
        std::fs::read_link(d.join("link")).unwrap(),
        Path::new("plain"),
        "{tool}: symlink"
    );
    assert_eq!(
        std::fs::metadata(d.join("hard")).unwrap().ino(),
        plain.ino(),
        "{tool}: hard link"
    );
    assert!(
        std::fs::metadata(d.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo(),
        "{tool}: fifo"
    );
    let null = std::fs::metadata(d.join("null")).unwrap();
    assert!(null.file_type().is_char_device(), "{tool}: char device");
    assert_eq!(null.rdev(), libc::makedev(1, 3), "{tool}: device numbers");
    let long = root.join(OsStr::from_bytes(&long_name()));
    assert_eq!(
        std::fs::read(long).unwrap(),
        vec![1, 2, 3],
        "{tool}: a 300-byte path"
    );
}

#[test]
fn gnu_tar_and_bsdtar_extract_every_kind_of_entry_as_written() {
    if !testkit::is_root() {
        eprintln!("skipped: owners and device nodes need root");
        return;
    }
    require_tool("tar", "tar");
    require_tool("bsdtar", "libarchive-tools");
    require_tool("getfattr", "attr");
    let dir = TempDir::new("tar-extract");
    let archive = dir.join("all.tar");
    write_archive(&archive);
    let gnu = dir.join("gnu");
    std::fs::create_dir(&gnu).unwrap();
    run_program(
        "tar",
        [
            "-x",
            "-p",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-f",
            archive.to_str().unwrap(),
            "-C",
            gnu.to_str().unwrap(),
        ],
    );
    check_extracted(&gnu, "GNU tar");
    let bsd = dir.join("bsd");
    std::fs::create_dir(&bsd).unwrap();
    run_program(
        "bsdtar",
        [
            "-x",
            "-p",
            "--xattrs",
            "--numeric-owner",
            "-f",
            archive.to_str().unwrap(),
            "-C",
            bsd.to_str().unwrap(),
        ],
    );
    check_extracted(&bsd, "bsdtar");
    // Both list it without complaint.
    for tool in ["tar", "bsdtar"] {
        let listed = output(&mut testkit::command(
            tool,
            ["-tvf", archive.to_str().unwrap()],
        ));
        assert!(listed.status.success(), "{tool} -tvf: {listed:?}");
    }
}
