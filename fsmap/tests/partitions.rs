//! The partition table reader against util-linux's own answers: sparse
//! images partitioned by `sfdisk` (GPT, and DOS with an extended partition
//! holding logical ones) compared with `sfdisk --json`; a GPT whose primary
//! header was damaged, which both must read from the backup; a GPT with
//! 4096-byte sectors made by `fdisk -b 4096` and compared with its listing;
//! and an ext4 made by `mkfs.ext4 -E offset=` inside a logical partition,
//! opened through the `Slice` the table gives.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::mkfs_with_files;
use fsmap::ext4::Ext4;
use fsmap::partition::{
    Partition, PartitionKind, Table, guid_string, read_table, read_table_report,
};
use fsmap::read::Slice;
use testkit::{TempDir, parse_json, run, run_with_input, tool};

const IMAGE_BYTES: u64 = 64 * 1024 * 1024;

/// A sparse image of `IMAGE_BYTES`, as `truncate -s 64M` makes one.
fn sparse_image(dir: &TempDir, name: &str) -> PathBuf {
    let path = dir.join(name);
    File::create(&path).unwrap().set_len(IMAGE_BYTES).unwrap();
    path
}

fn sfdisk(image: &Path, script: &str) {
    run_with_input(
        Command::new(tool("sfdisk", "fdisk"))
            .arg("--quiet")
            .arg(image),
        script,
    );
}

/// `sfdisk --json`'s partitions as we report them. sfdisk lists sizes in
/// sectors of `sectorsize`, DOS types as hex without a leading zero and
/// GPT types as GUID text; it leaves out an empty name.
fn sfdisk_partitions(image: &Path) -> (String, Vec<Partition>) {
    let text = run(Command::new(tool("sfdisk", "fdisk"))
        .arg("--json")
        .arg(image));
    let json = parse_json(&text, "sfdisk --json");
    let table = &json["partitiontable"];
    let label = table["label"].as_str().unwrap().to_string();
    let sector_bytes = table["sectorsize"].as_u64().unwrap();
    let node_prefix = image.to_str().unwrap();
    let partitions = table["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            let node = entry["node"].as_str().unwrap();
            let type_text = entry["type"].as_str().unwrap();
            let kind = match label.as_str() {
                "dos" => PartitionKind::Mbr {
                    type_byte: u8::from_str_radix(type_text, 16).unwrap(),
                },
                "gpt" => PartitionKind::Gpt {
                    type_guid: parse_guid(type_text),
                    unique_guid: parse_guid(entry["uuid"].as_str().unwrap()),
                },
                other => panic!("sfdisk label {other}"),
            };
            Partition {
                number: node.strip_prefix(node_prefix).unwrap().parse().unwrap(),
                start_bytes: entry["start"].as_u64().unwrap() * sector_bytes,
                length_bytes: entry["size"].as_u64().unwrap() * sector_bytes,
                kind,
                name: entry["name"].as_str().unwrap_or_default().to_string(),
            }
        })
        .collect();
    (label, partitions)
}

/// GUID text to GPT's on-disk byte order, checked by printing it back.
fn parse_guid(text: &str) -> [u8; 16] {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let mut bytes = [0u8; 16];
    for (index, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[index * 2..index * 2 + 2], 16).unwrap();
    }
    bytes[0..4].reverse();
    bytes[4..6].reverse();
    bytes[6..8].reverse();
    assert_eq!(guid_string(&bytes), text.to_uppercase());
    bytes
}

fn ours(image: &Path) -> Table {
    read_table(&File::open(image).unwrap(), IMAGE_BYTES).unwrap()
}

const GPT_SCRIPT: &str = "label: gpt
size=8MiB, type=linux, name=\"root fs\"
size=4MiB, type=uefi, name=\"esp\"
start=40960, size=16MiB, type=swap
type=linux, name=\"données\"
";

#[test]
fn a_gpt_reads_as_sfdisk_lists_it() {
    let dir = TempDir::new("partition-gpt");
    let image = sparse_image(&dir, "gpt.img");
    sfdisk(&image, GPT_SCRIPT);
    let (label, theirs) = sfdisk_partitions(&image);
    assert_eq!(label, "gpt");
    assert_eq!(theirs.len(), 4);
    assert_eq!(ours(&image), Table::Gpt(theirs.clone()));
    let linux: Vec<bool> = theirs.iter().map(Partition::is_linux_data).collect();
    assert_eq!(linux, [true, false, false, true]);
}

#[test]
fn a_gpt_with_a_damaged_primary_header_reads_from_its_backup_as_sfdisk_does() {
    let dir = TempDir::new("partition-gpt-backup");
    let image = sparse_image(&dir, "gpt.img");
    sfdisk(&image, GPT_SCRIPT);
    let (_, before) = sfdisk_partitions(&image);
    // One bit of the primary header's CRC field (LBA 1, offset 16).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    let mut byte = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, 512 + 16).unwrap();
    byte[0] ^= 1;
    std::os::unix::fs::FileExt::write_all_at(&file, &byte, 512 + 16).unwrap();
    let (_, after) = sfdisk_partitions(&image);
    assert_eq!(after, before, "sfdisk reads the backup too");
    let report = read_table_report(&file, IMAGE_BYTES).unwrap();
    assert_eq!(report.table, Table::Gpt(before));
    assert!(report.used_backup);
    let problem = report.primary_problem.unwrap();
    assert!(problem.contains("header CRC32"), "{problem}");
}

const DOS_SCRIPT: &str = "label: dos
size=8MiB, type=83, bootable
size=4MiB, type=c
type=5
size=6MiB, type=83
size=10MiB, type=82
size=5MiB, type=83
";

#[test]
fn a_dos_table_with_logical_partitions_reads_as_sfdisk_lists_it() {
    let dir = TempDir::new("partition-dos");
    let image = sparse_image(&dir, "dos.img");
    sfdisk(&image, DOS_SCRIPT);
    let (label, theirs) = sfdisk_partitions(&image);
    assert_eq!(label, "dos");
    let numbers: Vec<u32> = theirs.iter().map(|partition| partition.number).collect();
    assert_eq!(numbers, [1, 2, 3, 5, 6, 7], "the script's layout");
    assert_eq!(ours(&image), Table::Mbr(theirs.clone()));
    let linux: Vec<u32> = theirs
        .iter()
        .filter(|partition| partition.is_linux_data())
        .map(|partition| partition.number)
        .collect();
    assert_eq!(linux, [1, 5, 7]);
    assert!(theirs[2].is_extended());
}

/// `fdisk -b 4096 -l`'s listing: Device, Start, Sectors, Type-UUID, UUID
/// and then the name, which may hold spaces or be empty.
fn fdisk_4096_partitions(image: &Path) -> Vec<Partition> {
    let listing = run(Command::new(tool("fdisk", "fdisk"))
        .args([
            "-b",
            "4096",
            "-l",
            "-o",
            "Device,Start,Sectors,Type-UUID,UUID,Name",
        ])
        .arg(image));
    let node_prefix = image.to_str().unwrap();
    listing
        .lines()
        .filter(|line| line.starts_with(node_prefix))
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let sectors = |index: usize| fields[index].parse::<u64>().unwrap();
            Partition {
                number: fields[0]
                    .strip_prefix(node_prefix)
                    .unwrap()
                    .parse()
                    .unwrap(),
                start_bytes: sectors(1) * 4096,
                length_bytes: sectors(2) * 4096,
                kind: PartitionKind::Gpt {
                    type_guid: parse_guid(fields[3]),
                    unique_guid: parse_guid(fields[4]),
                },
                name: fields[5..].join(" "),
            }
        })
        .collect()
}

#[test]
fn a_gpt_with_4096_byte_sectors_reads_as_fdisk_lists_it() {
    let dir = TempDir::new("partition-gpt-4096");
    let image = sparse_image(&dir, "gpt4k.img");
    // New GPT; two partitions; the second an EFI system partition; the
    // first named in expert mode; write.
    let script = "g\nn\n\n\n+8M\nn\n\n\n+4M\n\
                  t\n2\nC12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
                  x\nn\n1\nroot fs\nr\nw\n";
    run_with_input(
        Command::new(tool("fdisk", "fdisk"))
            .args(["-b", "4096"])
            .arg(&image),
        script,
    );
    let theirs = fdisk_4096_partitions(&image);
    assert_eq!(theirs.len(), 2);
    assert_eq!(theirs[0].name, "root fs");
    let report = read_table_report(&File::open(&image).unwrap(), IMAGE_BYTES).unwrap();
    assert_eq!(report.table, Table::Gpt(theirs));
    assert_eq!(report.sector_size_bytes, 4096);
    assert!(!report.used_backup);
}

#[test]
fn an_ext4_made_inside_a_logical_partition_opens_through_its_slice() {
    let dir = TempDir::new("partition-ext4");
    let image = sparse_image(&dir, "dos.img");
    sfdisk(&image, DOS_SCRIPT);
    let Table::Mbr(partitions) = ours(&image) else {
        panic!("not a DOS table")
    };
    let fifth = partitions.iter().find(|p| p.number == 5).unwrap().clone();
    let source = dir.join("source");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("hello.txt"), "hello\n").unwrap();
    // mkfs.ext4 takes the offset in bytes and the size in 1 KiB units
    // with the "k" suffix; without a size it would run to the image's end.
    mkfs_with_files(
        "mkfs.ext4",
        &["-E", &format!("offset={}", fifth.start_bytes)],
        &source,
        &image,
        &format!("{}k", fifth.length_bytes / 1024),
    );
    // The EBRs around the partition are intact.
    assert_eq!(ours(&image), Table::Mbr(partitions.clone()));
    let file = File::open(&image).unwrap();
    let slice = |partition: &Partition| Slice {
        inner: &file,
        start_bytes: partition.start_bytes,
        length_bytes: partition.length_bytes,
    };
    let fs = Ext4::open(slice(&fifth)).unwrap();
    assert_eq!(fs.lookup("/").unwrap(), 2, "the root directory's inode");
    fs.lookup("/hello.txt").unwrap();
    // The partitions on either side hold no filesystem: the offset is
    // exactly the one mkfs.ext4 was given.
    for neighbour in partitions.iter().filter(|p| p.number == 1 || p.number == 6) {
        assert!(
            Ext4::open(slice(neighbour)).is_err(),
            "partition {}",
            neighbour.number
        );
    }
}
