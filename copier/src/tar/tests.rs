//! The writer's output read back by a small reader of its own (headers,
//! checksums, pax records with their lengths), and the tables of what
//! goes where: ustar fields, pax records, sparse regions, refusals.
//! tests/tar.rs extracts archives with GNU tar and bsdtar.

use std::io::{self, Write};

use super::header::{self, BLOCK_BYTES, split_path};
use super::pax::{Records, record_bytes, time_text};
use super::sparse::{self, Region};
use super::*;

/// One member as read back: its ustar header, the records of the pax
/// header before it, and its data.
#[derive(Debug)]
struct Read {
    header: [u8; BLOCK_BYTES],
    records: Vec<(Vec<u8>, Vec<u8>)>,
    data: Vec<u8>,
}

impl Read {
    fn record(&self, key: &str) -> Option<&[u8]> {
        let found = self.records.iter().find(|(k, _)| k == key.as_bytes());
        found.map(|(_, value)| value.as_slice())
    }

    fn keys(&self) -> Vec<String> {
        let keys = self.records.iter().map(|(k, _)| String::from_utf8_lossy(k));
        keys.map(|k| k.into_owned()).collect()
    }

    fn text(&self, field: std::ops::Range<usize>) -> &[u8] {
        let bytes = &self.header[field];
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        &bytes[..end]
    }

    fn octal(&self, field: std::ops::Range<usize>) -> u64 {
        let text = std::str::from_utf8(self.text(field)).unwrap();
        u64::from_str_radix(text, 8).unwrap()
    }
}

/// Reads every member back, checking each header's checksum, magic and
/// version, each record's length prefix, and the two zero blocks at the
/// end.
fn read_back(archive: &[u8]) -> Vec<Read> {
    assert_eq!(archive.len() % BLOCK_BYTES, 0, "archive length");
    let mut members = Vec::new();
    let mut records = Vec::new();
    let mut at = 0;
    loop {
        let block: [u8; BLOCK_BYTES] = archive[at..at + BLOCK_BYTES].try_into().unwrap();
        if block.iter().all(|&b| b == 0) {
            assert!(records.is_empty(), "a pax header before the end");
            assert!(archive[at..].iter().all(|&b| b == 0));
            assert_eq!(archive.len() - at, 2 * BLOCK_BYTES, "end of archive");
            return members;
        }
        check_header(&block);
        let member = Read {
            header: block,
            records: Vec::new(),
            data: Vec::new(),
        };
        let typeflag = member.header[header::TYPEFLAG];
        let size = match typeflag {
            header::TYPE_FILE | header::TYPE_PAX => {
                pax_size(&records).unwrap_or_else(|| member.octal(header::SIZE)) as usize
            }
            _ => 0,
        };
        let data = archive[at + BLOCK_BYTES..at + BLOCK_BYTES + size].to_vec();
        at += BLOCK_BYTES + sparse::padded(size as u64) as usize;
        if member.header[header::TYPEFLAG] == header::TYPE_PAX {
            assert!(records.is_empty(), "two pax headers in a row");
            records = parse_records(&data);
            continue;
        }
        members.push(Read {
            records: std::mem::take(&mut records),
            data,
            ..member
        });
    }
}

fn pax_size(records: &[(Vec<u8>, Vec<u8>)]) -> Option<u64> {
    let (_, value) = records.iter().find(|(k, _)| k == b"size")?;
    Some(std::str::from_utf8(value).unwrap().parse().unwrap())
}

fn check_header(block: &[u8; BLOCK_BYTES]) {
    assert_eq!(&block[header::MAGIC], b"ustar\0");
    assert_eq!(&block[header::VERSION], b"00");
    let stored = &block[header::CHECKSUM];
    assert_eq!(&stored[6..], b"\0 ", "checksum field ending");
    let stored = u32::from_str_radix(std::str::from_utf8(&stored[..6]).unwrap(), 8).unwrap();
    let mut blanked = *block;
    blanked[header::CHECKSUM].fill(b' ');
    assert_eq!(stored, header::checksum(&blanked), "header checksum");
}

/// Splits `LEN key=value\n` records, checking that each LEN is the
/// record's whole length.
fn parse_records(mut data: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut records = Vec::new();
    while !data.is_empty() {
        let space = data.iter().position(|&b| b == b' ').unwrap();
        let length: usize = std::str::from_utf8(&data[..space])
            .unwrap()
            .parse()
            .unwrap();
        let record = &data[..length];
        assert_eq!(record.last(), Some(&b'\n'), "record ends in a newline");
        let body = &record[space + 1..length - 1];
        let equals = body.iter().position(|&b| b == b'=').unwrap();
        records.push((body[..equals].to_vec(), body[equals + 1..].to_vec()));
        data = &data[length..];
    }
    records
}

/// A sparse member's file contents from its map and regions.
fn unsparse(member: &Read) -> Vec<u8> {
    let real: usize = parse_number(member.record("GNU.sparse.realsize").unwrap());
    let mut lines = member.data.split(|&b| b == b'\n');
    let mut next = || parse_number(lines.next().unwrap());
    let count = next();
    let map: Vec<(usize, usize)> = (0..count).map(|_| (next(), next())).collect();
    let map_text: usize = member
        .data
        .split(|&b| b == b'\n')
        .take(1 + 2 * count)
        .map(|l| l.len() + 1)
        .sum();
    let mut at = sparse::padded(map_text as u64) as usize;
    let mut file = vec![0u8; real];
    for (offset, length) in map {
        file[offset..offset + length].copy_from_slice(&member.data[at..at + length]);
        at += length;
    }
    assert_eq!(at, member.data.len(), "regions fill the member");
    file
}

fn parse_number(text: &[u8]) -> usize {
    std::str::from_utf8(text).unwrap().parse().unwrap()
}

fn entry(path: &[u8], kind: EntryKind) -> Entry {
    Entry {
        path: path.to_vec(),
        kind,
        mode: 0o644,
        uid: 1000,
        gid: 100,
        mtime: (1_700_000_000, 0),
        atime: None,
        ctime: None,
        xattrs: Vec::new(),
    }
}

fn file(path: &[u8], size_bytes: u64, data: Vec<(u64, u64)>) -> Entry {
    entry(path, EntryKind::File { size_bytes, data })
}

/// The byte at `offset` of every file the tests write: never zero, so
/// a hole read as data or data lost to a hole shows.
fn byte_at(offset: u64) -> u8 {
    (offset % 251) as u8 + 1
}

fn fill(offset: u64, buf: &mut [u8]) -> io::Result<()> {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = byte_at(offset + i as u64);
    }
    Ok(())
}

/// `entries` written to an archive in memory, read back.
fn archive_of(entries: &[Entry]) -> Vec<Read> {
    let mut tar = TarWriter::new(Vec::new());
    for entry in entries {
        tar.add(entry, &mut fill).unwrap();
    }
    let written = tar.bytes_written();
    let archive = tar.finish().unwrap();
    assert_eq!(archive.len() as u64, written + 2 * BLOCK_BYTES as u64);
    read_back(&archive)
}

fn one(entry: Entry) -> Read {
    archive_of(&[entry]).pop().unwrap()
}

#[test]
fn record_length_counts_its_own_digits() {
    // (key and value bytes, record bytes): at 95 and 994 the prefix
    // grows a digit because of itself.
    let table = [
        (0, 4),
        (5, 9),
        (94, 99),
        (95, 101),
        (96, 102),
        (993, 999),
        (994, 1001),
    ];
    for (payload, expected) in table {
        assert_eq!(record_bytes(payload), expected, "payload {payload}");
    }
    for value_bytes in 0..2100 {
        let mut records = Records::new(PAX_HEADER_BYTES_MAX);
        records.push(b"comment", &vec![b'v'; value_bytes]).unwrap();
        let parsed = parse_records(records.as_bytes());
        assert_eq!(parsed[0].1.len(), value_bytes);
    }
}

#[test]
fn records_past_their_bound_are_refused_before_they_grow() {
    let mut records = Records::new(100);
    records.push(b"k", &[b'v'; 90]).unwrap();
    let full = records.push(b"k", b"v").unwrap_err();
    assert_eq!(full.bytes, 96 + 6);
    assert_eq!(records.as_bytes().len(), 96);
}

#[test]
fn times_are_decimal_values_also_before_1970() {
    let table: [((i64, u32), &str); 7] = [
        ((0, 0), "0"),
        ((1_700_000_000, 0), "1700000000"),
        ((1, 5), "1.000000005"),
        ((-1, 0), "-1"),
        ((-2, 500_000_000), "-1.500000000"),
        ((-1, 250_000_000), "-0.750000000"),
        ((i64::MIN, 1), "-9223372036854775807.999999999"),
    ];
    for ((seconds, nanoseconds), expected) in table {
        assert_eq!(time_text(seconds, nanoseconds), expected);
    }
}

#[test]
fn paths_split_into_prefix_and_name_only_where_ustar_allows() {
    let a100 = "a".repeat(100);
    let a101 = "a".repeat(101);
    let p155 = "p".repeat(155);
    let p156 = "p".repeat(156);
    let cases: [(String, Option<(String, String)>); 9] = [
        ("short".into(), Some((String::new(), "short".into()))),
        (a100.clone(), Some((String::new(), a100.clone()))),
        (a101.clone(), None),
        (format!("{p155}/{a100}"), Some((p155.clone(), a100.clone()))),
        (format!("{p156}/{a100}"), None),
        (format!("{p155}/{a101}"), None),
        // The rightmost slash leaves a prefix too long; one further left fits.
        (
            format!("{}/{}/r", "p".repeat(100), "q".repeat(60)),
            Some(("p".repeat(100), format!("{}/r", "q".repeat(60)))),
        ),
        (
            format!("{p155}/{}/", "d".repeat(99)),
            Some((p155.clone(), format!("{}/", "d".repeat(99)))),
        ),
        ("caf\u{e9}".into(), None),
    ];
    for (path, expected) in cases {
        let split = split_path(path.as_bytes()).map(|(prefix, name)| {
            (
                String::from_utf8(prefix.to_vec()).unwrap(),
                String::from_utf8(name.to_vec()).unwrap(),
            )
        });
        assert_eq!(split, expected, "{path}");
    }
}

#[test]
fn a_plain_file_has_octal_fields_and_no_pax_header() {
    let member = one(Entry {
        mode: 0o4755,
        ..file(b"etc/hosts", 5000, vec![(0, 5000)])
    });
    assert!(member.records.is_empty(), "{:?}", member.keys());
    assert_eq!(member.text(header::NAME), b"etc/hosts");
    assert_eq!(&member.header[header::MODE], b"0004755\0");
    assert_eq!(&member.header[header::UID], b"0001750\0");
    assert_eq!(&member.header[header::SIZE], b"00000011610\0");
    assert_eq!(member.octal(header::MTIME), 1_700_000_000);
    assert_eq!(member.header[header::TYPEFLAG], b'0');
    let expected: Vec<u8> = (0..5000).map(byte_at).collect();
    assert_eq!(member.data, expected);
}

#[test]
fn each_kind_has_its_typeflag_and_fields() {
    let kinds = [
        (EntryKind::Directory, b'5', "dir/"),
        (EntryKind::Fifo, b'6', "dir"),
        (
            EntryKind::Symlink {
                target: b"../t".to_vec(),
            },
            b'2',
            "dir",
        ),
        (
            EntryKind::HardLink {
                target: b"a/b".to_vec(),
            },
            b'1',
            "dir",
        ),
        (EntryKind::CharDevice { major: 1, minor: 3 }, b'3', "dir"),
        (
            EntryKind::BlockDevice {
                major: 259,
                minor: 1_048_575,
            },
            b'4',
            "dir",
        ),
    ];
    for (kind, typeflag, name) in kinds {
        let member = one(entry(b"dir", kind.clone()));
        assert_eq!(member.header[header::TYPEFLAG], typeflag, "{kind:?}");
        assert_eq!(member.text(header::NAME), name.as_bytes(), "{kind:?}");
        assert_eq!(member.octal(header::SIZE), 0, "{kind:?}");
        assert!(member.records.is_empty(), "{kind:?}: {:?}", member.keys());
        match kind {
            EntryKind::Symlink { target } | EntryKind::HardLink { target } => {
                assert_eq!(member.text(header::LINKNAME), target.as_slice())
            }
            EntryKind::CharDevice { major, minor } | EntryKind::BlockDevice { major, minor } => {
                assert_eq!(member.octal(header::DEVMAJOR), u64::from(major));
                assert_eq!(member.octal(header::DEVMINOR), u64::from(minor));
            }
            _ => assert!(member.text(header::DEVMAJOR).is_empty()),
        }
    }
}

#[test]
fn what_ustar_cannot_hold_goes_into_pax_records() {
    let long = format!("{}/{}", "d".repeat(200), "n".repeat(120));
    let huge = 8u64 << 30;
    type Case<'a> = (Entry, Vec<(&'a str, &'a [u8])>);
    let cases: Vec<Case> = vec![
        (
            file(long.as_bytes(), 0, vec![]),
            vec![("path", long.as_bytes())],
        ),
        (
            file("d/caf\u{e9}".as_bytes(), 0, vec![]),
            vec![("path", "d/caf\u{e9}".as_bytes())],
        ),
        (file(b"tab\there", 0, vec![]), vec![("path", b"tab\there")]),
        (
            file(b"bin\xff", 0, vec![]),
            vec![("hdrcharset", b"BINARY"), ("path", b"bin\xff")],
        ),
        (
            entry(
                b"l",
                EntryKind::Symlink {
                    target: long.as_bytes().to_vec(),
                },
            ),
            vec![("linkpath", long.as_bytes())],
        ),
        (
            entry(
                b"l",
                EntryKind::Symlink {
                    target: b"t\xfe".to_vec(),
                },
            ),
            vec![("hdrcharset", b"BINARY"), ("linkpath", b"t\xfe")],
        ),
        (
            Entry {
                uid: 0o10000000,
                gid: u32::MAX,
                ..file(b"f", 0, vec![])
            },
            vec![("uid", b"2097152"), ("gid", b"4294967295")],
        ),
        (
            Entry {
                mtime: (1, 5),
                ..file(b"f", 0, vec![])
            },
            vec![("mtime", b"1.000000005")],
        ),
        (
            Entry {
                mtime: (-2, 500_000_000),
                ..file(b"f", 0, vec![])
            },
            vec![("mtime", b"-1.500000000")],
        ),
        (
            Entry {
                mtime: (1 << 33, 0),
                ..file(b"f", 0, vec![])
            },
            vec![("mtime", b"8589934592")],
        ),
        (
            Entry {
                atime: Some((3, 0)),
                ctime: Some((4, 1)),
                ..file(b"f", 0, vec![])
            },
            vec![("atime", b"3"), ("ctime", b"4.000000001")],
        ),
        (
            file(b"big", huge, vec![(0, huge)]),
            vec![("size", b"8589934592")],
        ),
        (
            Entry {
                xattrs: vec![("user.bin".into(), b"\0=\n\xff".to_vec())],
                ..file(b"f", 0, vec![])
            },
            vec![("SCHILY.xattr.user.bin", b"\0=\n\xff")],
        ),
    ];
    for (entry, expected) in cases {
        let records = written_records(&entry);
        let expected: Vec<(Vec<u8>, Vec<u8>)> = expected
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
            .collect();
        assert_eq!(
            records,
            expected,
            "{}",
            String::from_utf8_lossy(&entry.path)
        );
    }
}

/// The pax records of `entry`'s member, without writing its data (an
/// 8 GiB file's header is all these tests need).
fn written_records(entry: &Entry) -> Vec<(Vec<u8>, Vec<u8>)> {
    let member = member::build(entry).unwrap();
    if member.headers.len() == BLOCK_BYTES {
        return Vec::new();
    }
    let pax: [u8; BLOCK_BYTES] = member.headers[..BLOCK_BYTES].try_into().unwrap();
    check_header(&pax);
    assert_eq!(pax[header::TYPEFLAG], header::TYPE_PAX);
    let size =
        u64::from_str_radix(std::str::from_utf8(&pax[header::SIZE][..11]).unwrap(), 8).unwrap();
    let records = parse_records(&member.headers[BLOCK_BYTES..BLOCK_BYTES + size as usize]);
    let ustar: [u8; BLOCK_BYTES] = member.headers[member.headers.len() - BLOCK_BYTES..]
        .try_into()
        .unwrap();
    check_header(&ustar);
    records
}

#[test]
fn the_ustar_fields_behind_pax_records_hold_portable_stand_ins() {
    let member = one(file(b"d/bin\xff\xfename", 0, vec![]));
    assert_eq!(member.text(header::NAME), b"bin__name");
    let member = one(Entry {
        mtime: (-5, 0),
        uid: u32::MAX,
        ..file(b"f", 0, vec![])
    });
    assert_eq!(member.octal(header::MTIME), 0);
    assert_eq!(member.octal(header::UID), 0);
    let member = one(Entry {
        mtime: (i64::MAX, 0),
        ..file(b"f", 0, vec![])
    });
    assert_eq!(member.octal(header::MTIME), header::OCTAL_11_MAX);
}

#[test]
fn sparse_regions_run_on_to_block_boundaries() {
    let gib = 1u64 << 30;
    type Case = (u64, Vec<(u64, u64)>, Vec<(u64, u64, usize)>);
    let cases: Vec<Case> = vec![
        (
            gib,
            vec![(4096, 100), (1 << 20, 5000), (gib - 4096, 4096)],
            vec![(4096, 512, 1), (1 << 20, 5120, 1), (gib - 4096, 4096, 1)],
        ),
        // Ranges that would share a block are one region, the gap zeroes.
        (
            10_000,
            vec![(0, 100), (200, 100), (512, 1)],
            vec![(0, 1024, 3)],
        ),
        (
            10_000,
            vec![(0, 100), (513, 100)],
            vec![(0, 512, 1), (513, 512, 1)],
        ),
        // Only the end of the file cuts a region short of a block.
        (1000, vec![(600, 400)], vec![(600, 400, 1)]),
        (1000, vec![(600, 10)], vec![(600, 400, 1)]),
        (1000, vec![], vec![]),
    ];
    for (size, data, expected) in cases {
        let regions: Vec<(u64, u64, usize)> = sparse::regions(size, &data)
            .map(
                |Region {
                     offset_bytes,
                     length_bytes,
                     ranges,
                 }| (offset_bytes, length_bytes, ranges.len()),
            )
            .collect();
        assert_eq!(regions, expected, "{data:?}");
        let member = one(file(b"s", size, data.clone()));
        check_sparse(&member, size, &data);
    }
}

/// A sparse member's records, map and contents: the data where the
/// ranges say, zeroes elsewhere.
fn check_sparse(member: &Read, size: u64, data: &[(u64, u64)]) {
    assert_eq!(member.header[header::TYPEFLAG], b'0');
    assert_eq!(member.text(header::NAME), b"GNUSparseFile.0/s");
    let keys = [
        "GNU.sparse.major",
        "GNU.sparse.minor",
        "GNU.sparse.name",
        "GNU.sparse.realsize",
    ];
    assert_eq!(member.keys(), keys);
    assert_eq!(member.record("GNU.sparse.major"), Some(&b"1"[..]));
    assert_eq!(member.record("GNU.sparse.minor"), Some(&b"0"[..]));
    assert_eq!(member.record("GNU.sparse.name"), Some(&b"s"[..]));
    assert_eq!(
        member.record("GNU.sparse.realsize"),
        Some(size.to_string().as_bytes())
    );
    let contents = unsparse(member);
    let mut expected = vec![0u8; size as usize];
    for &(offset, length) in data {
        for at in offset..offset + length {
            expected[at as usize] = byte_at(at);
        }
    }
    assert!(
        contents == expected,
        "contents of a sparse file with {data:?}"
    );
}

#[test]
fn a_sparse_file_ending_in_a_hole_ends_its_map_with_the_size() {
    let member = one(file(b"s", 1 << 20, vec![(0, 512)]));
    assert!(member.data.starts_with(b"2\n0\n512\n1048576\n0\n\0"));
    let member = one(file(b"s", 1 << 20, vec![((1 << 20) - 512, 512)]));
    assert!(member.data.starts_with(b"1\n1048064\n512\n\0"));
}

#[test]
fn ranges_covering_the_file_make_a_plain_member() {
    let member = one(file(b"f", 30, vec![(0, 10), (10, 20)]));
    assert!(member.records.is_empty());
    assert_eq!(member.data, (0..30).map(byte_at).collect::<Vec<u8>>());
    assert!(one(file(b"empty", 0, vec![])).records.is_empty());
}

#[test]
fn the_callback_is_asked_for_data_ranges_only_in_order_and_bounded_chunks() {
    let size = 64u64 << 20;
    let data = vec![
        (100, 3 << 20),
        (10 << 20, 1),
        (10 << 20 | 7, 5),
        (size - 10, 10),
    ];
    let mut calls = Vec::new();
    let mut tar = TarWriter::new(io::sink());
    tar.add(&file(b"s", size, data.clone()), &mut |offset, buf| {
        calls.push((offset, buf.len() as u64));
        fill(offset, buf)
    })
    .unwrap();
    assert!(
        calls
            .iter()
            .all(|&(_, length)| length as usize <= READ_CHUNK_BYTES_MAX)
    );
    let mut covered: Vec<(u64, u64)> = Vec::new();
    for (offset, length) in calls {
        match covered.last_mut() {
            Some(last) if last.0 + last.1 == offset => last.1 += length,
            _ => covered.push((offset, length)),
        }
    }
    assert_eq!(covered, data);
}

#[test]
fn entries_this_format_cannot_hold_are_refused_before_anything_is_written() {
    let too_many: Vec<(u64, u64)> = (0..DATA_RANGES_MAX as u64 + 1)
        .map(|i| (2 * i, 1))
        .collect();
    let xattr = |name: &str, value_bytes: usize| Entry {
        xattrs: vec![(name.to_string(), vec![1; value_bytes])],
        ..file(b"f", 0, vec![])
    };
    let cases: Vec<(Entry, &str)> = vec![
        (file(b"", 0, vec![]), "invalid path: it is empty"),
        (file(b"/etc/passwd", 0, vec![]), "it is absolute"),
        (file(b"a/../b", 0, vec![]), "a .. component"),
        (file(b"a//b", 0, vec![]), "an empty component"),
        (file(b"a\0b", 0, vec![]), "a NUL byte"),
        (
            file(b"file/", 0, vec![]),
            "only a directory's path may end in /",
        ),
        (
            file(&vec![b'a'; PATH_BYTES_MAX + 1], 0, vec![]),
            "path of 65537 bytes",
        ),
        (
            Entry {
                mode: 0o100644,
                ..file(b"f", 0, vec![])
            },
            "mode 0o100644",
        ),
        (
            Entry {
                mtime: (0, 1_000_000_000),
                ..file(b"f", 0, vec![])
            },
            "mtime has 1000000000 nanoseconds",
        ),
        (
            Entry {
                ctime: Some((0, u32::MAX)),
                ..file(b"f", 0, vec![])
            },
            "ctime has",
        ),
        (
            file(b"f", 100, vec![(0, 10), (5, 10)]),
            "range 1 (5, 10): it starts before",
        ),
        (
            file(b"f", 100, vec![(50, 10), (0, 10)]),
            "range 1 (0, 10): it starts before",
        ),
        (file(b"f", 100, vec![(10, 0)]), "it is empty"),
        (
            file(b"f", 100, vec![(95, 10)]),
            "ends past the end of the file",
        ),
        (
            file(b"f", 100, vec![(1, u64::MAX)]),
            "ends past the end of the file",
        ),
        (
            file(b"f", u64::MAX, vec![]),
            "file size 18446744073709551615",
        ),
        (file(b"f", 1 << 40, too_many), "1048577 data ranges"),
        (xattr("user.a=b", 1), "holds =, %"),
        (xattr("user.100%", 1), "holds =, %"),
        (xattr("", 1), "the name is empty"),
        (xattr(&"n".repeat(256), 1), "xattr name of 256 bytes"),
        (
            xattr("user.big", XATTR_VALUE_BYTES_MAX + 1),
            "xattr value of 65537 bytes",
        ),
        (
            Entry {
                xattrs: (0..16)
                    .map(|i| (format!("user.{i}"), vec![1; XATTR_VALUE_BYTES_MAX]))
                    .collect(),
                ..file(b"f", 0, vec![])
            },
            "pax header would take",
        ),
        (
            entry(
                b"d",
                EntryKind::CharDevice {
                    major: 1 << 21,
                    minor: 0,
                },
            ),
            "device 2097152:0",
        ),
        (
            entry(b"l", EntryKind::Symlink { target: Vec::new() }),
            "invalid link target: it is empty",
        ),
        (
            entry(
                b"l",
                EntryKind::HardLink {
                    target: b"/etc".to_vec(),
                },
            ),
            "invalid link target: it is absolute",
        ),
    ];
    for (bad, message) in cases {
        let mut tar = TarWriter::new(Vec::new());
        let error = tar.add(&bad, &mut fill).unwrap_err();
        assert!(
            error.to_string().contains(message),
            "{error} lacks {message:?}"
        );
        assert_eq!(tar.bytes_written(), 0, "{error}");
        // The archive is still whole and takes more entries.
        tar.add(&file(b"after", 3, vec![(0, 3)]), &mut fill)
            .unwrap();
        let members = read_back(&tar.finish().unwrap());
        assert_eq!(members.len(), 1);
    }
}

#[test]
fn a_failed_read_breaks_the_archive_for_good() {
    let mut tar = TarWriter::new(Vec::new());
    tar.add(&file(b"first", 10, vec![(0, 10)]), &mut fill)
        .unwrap();
    let mut failing = |offset: u64, buf: &mut [u8]| {
        if offset >= 1 << 20 {
            return Err(io::Error::other("bad sector"));
        }
        fill(offset, buf)
    };
    let error = tar
        .add(&file(b"second", 4 << 20, vec![(0, 4 << 20)]), &mut failing)
        .unwrap_err();
    assert!(
        matches!(
            error,
            TarError::Read {
                offset_bytes: 1048576,
                ..
            }
        ),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("tar entry second: reading its data at offset 1048576")
    );
    let error = tar.add(&file(b"third", 0, vec![]), &mut fill).unwrap_err();
    assert!(matches!(error, TarError::Broken { .. }), "{error}");
    assert!(
        error.to_string().contains("since tar entry second"),
        "{error}"
    );
    let error = tar.finish().unwrap_err();
    assert!(matches!(error, TarError::Broken { .. }), "{error}");
}

/// Output that takes `left` bytes, then fails.
#[derive(Debug)]
struct FailingAfter {
    left: usize,
}

impl Write for FailingAfter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let now = buf.len().min(self.left);
        self.left -= now;
        Ok(now)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failed_write_breaks_the_archive_for_good() {
    let mut tar = TarWriter::new(FailingAfter { left: 3000 });
    let error = tar
        .add(&file(b"f", 1 << 20, vec![(0, 1 << 20)]), &mut fill)
        .unwrap_err();
    assert!(matches!(error, TarError::Write { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("tar entry f: writing the archive failed"),
        "{error}"
    );
    assert!(matches!(tar.finish().unwrap_err(), TarError::Broken { .. }));
}

#[test]
fn bytes_from_memory_make_a_small_file() {
    let mut tar = TarWriter::new(Vec::new());
    tar.add_bytes(b".blockwatch/deleted", b"a\nb\n", (5, 6))
        .unwrap();
    tar.add_bytes(b"empty", b"", (5, 0)).unwrap();
    let members = read_back(&tar.finish().unwrap());
    assert_eq!(members[0].data, b"a\nb\n");
    assert_eq!(members[0].record("mtime"), Some(&b"5.000000006"[..]));
    assert_eq!(&members[0].header[header::MODE], b"0000644\0");
    assert!(members[1].data.is_empty());
}

#[test]
fn messages_show_non_utf8_bytes_as_escapes() {
    assert_eq!(error::display_path(b"caf\xc3\xa9/\xff"), "caf\u{e9}/\\xff");
}
