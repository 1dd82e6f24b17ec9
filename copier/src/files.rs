//! The files a backup holds, read from its view with our ext4 map (each
//! filesystem through its journal), never from a mount: `blockwatch files`.

mod restore;

use fsmap::disk::{DiskMap, MappedFs};
use fsmap::map::FileRecord;
use fsmap::select::path_matches;
use serde::Serialize;

use crate::view::BackupView;

pub use restore::{FileRestoreError, FileRestoreSummary, restore_files, restore_to_writer};

/// Names listed at most (a corrupt directory could claim billions).
const ENTRIES_MAX: usize = 50_000_000;

const ROOT_INODE: u32 = 2;

/// One name of one file, as `find` would list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileEntry {
    /// The partition holding the filesystem (0: the whole disk).
    pub partition: u32,
    pub path: String,
    /// `F` file, `/` directory, `@` symlink, `|` anything else.
    pub kind: String,
    pub inode: u32,
    pub size_bytes: u64,
    pub mtime: i64,
    pub mtime_nanoseconds: u32,
    pub permissions: u16,
    pub uid: u32,
    pub gid: u32,
    pub links: u16,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Listing {
    pub files: Vec<FileEntry>,
    /// What the map could not read (listed rather than dropped).
    pub notes: Vec<String>,
    /// Filesystems found; with more than one, paths are `N:/path`.
    pub filesystems: usize,
}

/// The disk's file map, read from the view.
pub fn disk_map(view: &BackupView) -> DiskMap {
    use backend::BlockBackend;
    DiskMap::build(view, view.size_bytes())
}

/// Every name of every file of `disk` whose path matches `pattern` (all
/// of them when None), in path order per filesystem.
pub fn list(disk: &DiskMap, pattern: Option<&str>) -> Listing {
    let mut listing = Listing {
        notes: disk.all_notes(),
        filesystems: disk.filesystems.len(),
        ..Listing::default()
    };
    for mapped in &disk.filesystems {
        // The root is not listed (find lists what is under it), nor a
        // name whose inode the map could not read (its note says why).
        for (path, number) in mapped.map.walk().skip(1) {
            let Some(record) = mapped.map.inodes.get(&number) else {
                continue;
            };
            let path = String::from_utf8_lossy(&path);
            if pattern.is_some_and(|pattern| !path_matches(pattern, &path)) {
                continue;
            }
            listing.files.push(entry(mapped.partition, &path, record));
            if listing.files.len() >= ENTRIES_MAX {
                break;
            }
        }
        if listing.files.len() >= ENTRIES_MAX {
            listing
                .notes
                .push(format!("listing stopped at {ENTRIES_MAX} names"));
            break;
        }
    }
    listing
}

fn entry(partition: u32, path: &str, record: &FileRecord) -> FileEntry {
    FileEntry {
        partition,
        path: path.to_string(),
        kind: record.kind_char().to_string(),
        inode: record.number,
        size_bytes: record.size_bytes,
        mtime: record.mtime.0,
        mtime_nanoseconds: record.mtime.1,
        permissions: record.mode & 0o7777,
        uid: record.uid,
        gid: record.gid,
        links: record.links,
    }
}

/// Finds the file `path` names (`N:/path` on a disk of several
/// filesystems): its filesystem and inode.
pub fn lookup<'a>(disk: &'a DiskMap, path: &str) -> Result<(&'a MappedFs, u32), String> {
    let (partition, inner) = match path.split_once(':') {
        Some((number, inner))
            if number.chars().all(|c| c.is_ascii_digit()) && !number.is_empty() =>
        {
            (
                Some(number.parse::<u32>().map_err(|e| e.to_string())?),
                inner,
            )
        }
        _ => (None, path),
    };
    let mapped = match partition {
        Some(number) => disk
            .filesystems
            .iter()
            .find(|fs| fs.partition == number)
            .ok_or_else(|| {
                format!("{path}: the disk has no ext2/3/4 filesystem on partition {number}")
            })?,
        None => match disk.filesystems.as_slice() {
            [one] => one,
            [] => return Err(format!("{path}: the backup holds no ext2/3/4 filesystem")),
            several => {
                let numbers: Vec<String> =
                    several.iter().map(|fs| fs.partition.to_string()).collect();
                return Err(format!(
                    "{path}: the disk has filesystems on partitions {}: name one as N:{path}",
                    numbers.join(", ")
                ));
            }
        },
    };
    Ok((
        mapped,
        lookup_in(mapped, inner).map_err(|reason| format!("{path}: {reason}"))?,
    ))
}

/// The inode `path` names in one filesystem.
pub fn lookup_in(mapped: &MappedFs, path: &str) -> Result<u32, String> {
    let mut node = ROOT_INODE;
    for name in path
        .split('/')
        .filter(|part| !part.is_empty() && *part != ".")
    {
        let children = mapped
            .map
            .children
            .get(&node)
            .ok_or_else(|| "not found (a component is not a directory)".to_string())?;
        node = children
            .iter()
            .find(|(entry, _)| **entry == *name.as_bytes())
            .map(|&(_, child)| child)
            .ok_or_else(|| "not found".to_string())?;
    }
    Ok(node)
}
