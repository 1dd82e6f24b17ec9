//! jbd2 replay against the kernel and e2fsck. An ext4 image is mounted
//! through a loop device and written to: a first set of files is `sync`ed,
//! then more files are written, one file is deleted (its extent tree block
//! gets revoked) and everything is `fsync`ed, which commits to the journal
//! without writing the metadata in place. The image is copied while still
//! mounted, so the copy's journal holds committed transactions that were
//! not checkpointed. Replaying that journal in memory must give, block for
//! block, what `e2fsck -E journal_only` writes when it replays the same
//! journal, and every file must be found and read through the replayed
//! view.
//!
//! Needs root (mount -o loop) and e2fsprogs.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::{LoopMount, TempDir, is_root, output, random_bytes, run, tool};

use fsmap::ext4::{Ext4, FileExtent};
use fsmap::jbd2::{self, Jbd2Error, Replay};
use fsmap::read::{Overlay, ReadAt};

const IMAGE_SIZE: &str = "64M";
const SUPERBLOCK_OFFSET_BYTES: u64 = 1024;

fn require_root() {
    assert!(
        is_root(),
        "this test needs root (mount -o loop of an ext4 image); run it as root, \
         e.g. sudo -E cargo test -p fsmap --test jbd2_replay"
    );
}

fn write_file(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("create directories");
    let mut file = File::create(path).expect("create a file");
    file.write_all(data).expect("write a file");
}

/// Commits whatever jbd2 holds for `path` (and, the transactions being
/// shared, everything before it) without writing metadata in place.
fn fsync(path: &Path) {
    File::open(path)
        .and_then(|file| file.sync_all())
        .expect("fsync");
}

/// What the test wrote: path inside the filesystem -> contents.
type Files = Vec<(String, Vec<u8>)>;

/// Files that `sync` puts both in the journal and in place.
fn write_synced_files(mount: &Path) -> Files {
    let mut files = Vec::new();
    for (index, size) in [1usize, 4096, 50_000, 2_000_000].into_iter().enumerate() {
        files.push((
            format!("/synced/file{index}.bin"),
            random_bytes(index as u64 + 1, size),
        ));
    }
    for index in 0..30 {
        let text = format!("note {index}\n").repeat(index * 20 + 1);
        files.push((format!("/synced/notes/n{index}.txt"), text.into_bytes()));
    }
    for (path, data) in &files {
        write_file(&mount.join(&path[1..]), data);
    }
    // Data every other 64 KiB: hundreds of extents, so the file gets an
    // extent tree block, which deleting it later frees and revokes.
    let sparse = File::create(mount.join("synced/sparse.img")).expect("create a sparse file");
    for chunk in 0..300u64 {
        std::os::unix::fs::FileExt::write_all_at(
            &sparse,
            &random_bytes(chunk + 99, 4096),
            chunk * 131_072,
        )
        .expect("write a sparse file");
    }
    drop(sparse);
    run(&mut Command::new("sync"));
    files
}

/// Files that reach only the journal: fsync commits them, and nothing
/// checkpoints them before the copy.
fn write_fsynced_files(mount: &Path) -> Files {
    std::fs::remove_file(mount.join("synced/sparse.img")).expect("delete the sparse file");
    let mut files = Vec::new();
    for index in 0..12usize {
        let path = format!("/fresh/deep/dir{}/f{index}.bin", index % 3);
        files.push((path, random_bytes(1000 + index as u64, 3000 + index * 7919)));
    }
    files.push(("/fresh/last.txt".to_string(), b"written last\n".to_vec()));
    for (path, data) in &files {
        let on_mount = mount.join(&path[1..]);
        write_file(&on_mount, data);
        fsync(&on_mount);
        fsync(on_mount.parent().expect("a parent"));
    }
    fsync(&mount.join("synced"));
    files
}

/// One new file fsynced alone: ext4 logs it as a fast commit (no
/// rename, xattr or other change that would force a full commit).
fn write_one_fast_committed_file(mount: &Path) -> Files {
    let path = "/synced/fast.bin";
    let data = random_bytes(77, 5000);
    let on_mount = mount.join(&path[1..]);
    write_file(&on_mount, &data);
    fsync(&on_mount);
    vec![(path.to_string(), data)]
}

/// Block size and journal inode number from the ext4 superblock.
fn superblock_fields(image: &File) -> (u64, u32) {
    let mut superblock = [0u8; 1024];
    image
        .read_exact_at(&mut superblock, SUPERBLOCK_OFFSET_BYTES)
        .expect("read the superblock");
    let le32 = |at: usize| u32::from_le_bytes(superblock[at..at + 4].try_into().unwrap());
    (1024u64 << le32(0x18), le32(0xE0))
}

fn read_block<R: ReadAt>(device: &R, block: u64, block_size: u64) -> Vec<u8> {
    let mut data = vec![0u8; block_size as usize];
    device
        .read_exact_at(&mut data, block * block_size)
        .expect("read a block");
    data
}

/// The contents of `path` as `fs` sees it, read with the file API the
/// restore uses.
fn read_file<R: ReadAt>(fs: &Ext4<R>, path: &str) -> Vec<u8> {
    let number = fs
        .lookup(path)
        .unwrap_or_else(|e| panic!("lookup {path}: {e}"));
    let inode = fs.inode(number).expect("read an inode");
    let layout = fs.file_layout(&inode).expect("a file's layout");
    let mut data = vec![0u8; layout.size_bytes as usize];
    fs.read_file_at(&inode, &layout, 0, &mut data)
        .expect("read a file");
    data
}

/// A mounted filesystem, written to and copied while still mounted.
struct LiveCopy {
    _dir: TempDir,
    copy: PathBuf,
    synced: Files,
    fresh: Files,
}

fn copy_while_mounted(
    label: &str,
    mkfs_args: &[&str],
    write_fresh: fn(&Path) -> Files,
) -> LiveCopy {
    require_root();
    let dir = TempDir::new(&format!("jbd2-{label}"));
    let image = dir.join("fs.img");
    run(Command::new(tool("mkfs.ext4", "e2fsprogs"))
        .args(["-q", "-F"])
        // No background zeroing of inode tables or the journal while the
        // image is copied.
        .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .args(mkfs_args)
        .arg(&image)
        .arg(IMAGE_SIZE));
    let mount_dir = dir.join("mnt");
    let mount = LoopMount::mount(&image, &mount_dir);
    let synced = write_synced_files(&mount_dir);
    let fresh = write_fresh(&mount_dir);
    let copy = dir.join("live-copy.img");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&image)
        .arg(&copy));
    mount.unmount();
    LiveCopy {
        _dir: dir,
        copy,
        synced,
        fresh,
    }
}

/// The journal inode's extents and the filesystem block size, read in
/// place (the journal inode does not change while mounted).
fn journal_of(image: &File) -> (u64, Vec<FileExtent>) {
    let (block_size, journal_inode) = superblock_fields(image);
    let fs = Ext4::open(image).expect("open the copy");
    let inode = fs.inode(journal_inode).expect("read the journal inode");
    (
        block_size,
        fs.extents(&inode).expect("the journal's extents"),
    )
}

/// e2fsck's replay of the same journal, on a second copy.
fn recover_with_e2fsck(copy: &Path) -> File {
    let recovered = copy.with_extension("e2fsck.img");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(copy)
        .arg(&recovered));
    let output = output(
        Command::new(tool("e2fsck", "e2fsprogs"))
            .args(["-E", "journal_only", "-y"])
            .arg(&recovered),
    );
    // 0: nothing to fix; 1: fixed (the journal replayed).
    assert!(
        matches!(output.status.code(), Some(0 | 1)),
        "e2fsck -E journal_only failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    File::open(&recovered).expect("open the recovered copy")
}

fn check_against_e2fsck(label: &str, mkfs_args: &[&str]) {
    let live = copy_while_mounted(label, mkfs_args, write_fsynced_files);
    let image = File::open(&live.copy).expect("open the copy");
    let (block_size, journal) = journal_of(&image);
    let replay = jbd2::replay(&image, block_size, &journal)
        .unwrap_or_else(|e| panic!("{label}: replay: {e}"));
    assert!(
        replay.transactions >= 1,
        "{label}: no committed transaction in {replay:?}"
    );
    assert!(!replay.replaced.is_empty(), "{label}: nothing replaced");
    assert_eq!(
        replay.bad_blocks, 0,
        "{label}: checksum failures in a kernel-written journal"
    );
    let recovered = recover_with_e2fsck(&live.copy);
    let overlay = Overlay {
        inner: &image,
        block_size,
        replaced: replay.replaced.clone(),
    };
    let stale_blocks = compare_images(label, &overlay, &image, &recovered, &journal);
    let fs = Ext4::open(&overlay).expect("open the replayed view");
    for (path, data) in live.synced.iter().chain(&live.fresh) {
        let seen = read_file(&fs, path);
        assert!(
            &seen == data,
            "{label}: {path} reads differently through the replay"
        );
    }
    assert!(
        fs.lookup("/synced/sparse.img").is_err(),
        "{label}: the deleted file is still there"
    );
    let in_place = Ext4::open(&image).expect("open the copy in place");
    let missing_in_place = live
        .fresh
        .iter()
        .filter(|(path, _)| in_place.lookup(path).is_err())
        .count();
    report(
        label,
        &replay,
        journal_features(&image, &journal),
        stale_blocks,
        missing_in_place,
        live.fresh.len(),
    );
}

/// Compares every block of the replayed view with e2fsck's recovered copy
/// and returns how many replaced blocks differ from the copy in place.
/// The only blocks allowed to differ are the two superblocks e2fsck
/// rewrites after replaying: the filesystem's (it clears needs_recovery)
/// and the journal's (it empties the log).
fn compare_images(
    label: &str,
    overlay: &Overlay<&File>,
    image: &File,
    recovered: &File,
    journal: &[FileExtent],
) -> usize {
    let block_size = overlay.block_size;
    let blocks = image.metadata().expect("stat the copy").len() / block_size;
    let superblock_block = SUPERBLOCK_OFFSET_BYTES / block_size;
    let journal_superblock_block = journal
        .iter()
        .find(|extent| extent.logical_block == 0)
        .expect("journal block 0 is mapped")
        .physical_block;
    let mut differing = Vec::new();
    for block in 0..blocks {
        if read_block(overlay, block, block_size) != read_block(recovered, block, block_size) {
            differing.push(block);
        }
    }
    differing.retain(|&block| block != superblock_block && block != journal_superblock_block);
    assert!(
        differing.is_empty(),
        "{label}: blocks where the replay and e2fsck disagree: {differing:?} \
         (replaced: {:?})",
        differing
            .iter()
            .map(|block| overlay.replaced.contains_key(block))
            .collect::<Vec<_>>()
    );
    overlay
        .replaced
        .keys()
        .filter(|&&block| {
            read_block(image, block, block_size) != read_block(overlay, block, block_size)
        })
        .count()
}

/// Incompat features of the journal, to show which tag layout was tested.
fn journal_features(image: &File, journal: &[FileExtent]) -> u32 {
    let (block_size, _) = superblock_fields(image);
    let block = read_block(image, journal[0].physical_block, block_size);
    u32::from_be_bytes(block[0x28..0x2C].try_into().unwrap())
}

fn report(
    label: &str,
    replay: &Replay,
    journal_incompat: u32,
    stale_blocks: usize,
    missing_in_place: usize,
    fresh_files: usize,
) {
    println!(
        "{label}: journal incompat {journal_incompat:#x}; {} transactions ({}..{}), \
         {} log blocks, {} blocks replaced ({stale_blocks} newer than in place), \
         {} revoked copies, {} journal blocks read; \
         {missing_in_place} of {fresh_files} fsynced files missing without the replay",
        replay.transactions,
        replay.first_sequence,
        replay.next_sequence,
        replay.log_blocks,
        replay.replaced.len(),
        replay.revoked_blocks,
        replay.journal_blocks_read,
    );
}

#[test]
fn replay_matches_e2fsck_with_4k_blocks_and_metadata_csum() {
    check_against_e2fsck("4k-csum", &["-b", "4096"]);
}

#[test]
fn replay_matches_e2fsck_with_1k_blocks_and_metadata_csum() {
    check_against_e2fsck("1k-csum", &["-b", "1024"]);
}

#[test]
fn replay_matches_e2fsck_with_4k_blocks_without_metadata_csum() {
    check_against_e2fsck("4k-plain", &["-b", "4096", "-O", "^metadata_csum"]);
}

#[test]
fn replay_matches_e2fsck_with_1k_blocks_without_metadata_csum_or_64bit() {
    check_against_e2fsck(
        "1k-plain-32bit",
        &["-b", "1024", "-O", "^metadata_csum,^64bit"],
    );
}

#[test]
fn fast_commits_in_the_journal_are_reported_unsupported() {
    let live = copy_while_mounted(
        "fast-commit",
        &["-b", "4096", "-O", "fast_commit"],
        write_one_fast_committed_file,
    );
    let image = File::open(&live.copy).expect("open the copy");
    let (block_size, journal) = journal_of(&image);
    let result = jbd2::replay(&image, block_size, &journal);
    assert!(
        matches!(result, Err(Jbd2Error::Unsupported(_))),
        "fsync on a fast_commit filesystem left no fast commit the replay noticed: {result:?}"
    );
}
