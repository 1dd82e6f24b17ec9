//! The snapshot's files: the store's name and directory, the free-space
//! check, and what an earlier process left (stores, pins).

use std::io;
use std::path::Path;

use tracker::{CheckpointError, Tracker};

use super::PIN_HOLDER;

/// The store's file name for snapshot `name`: checkpoint names may hold
/// any printable character (`/`, `..`), so everything but letters, digits,
/// `-`, `_` and inner dots becomes `_`, cut to 100 bytes. Two names may
/// share a file name: only one snapshot is open at a time.
pub(crate) fn store_file_name(name: &str) -> String {
    let mut file: String = name
        .chars()
        .enumerate()
        .map(|(index, c)| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' => c,
            '.' if index > 0 => c,
            _ => '_',
        })
        .take(100)
        .collect();
    file.push_str(".cbw");
    file
}

pub(crate) fn create_private_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        result => result,
    }
}

/// Bytes an unprivileged writer may still use on the file system of `path`.
pub(crate) fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `stat` is writable memory of
    // the type statvfs fills.
    if unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    #[allow(
        clippy::useless_conversion,
        reason = "fsblkcnt_t and c_ulong are u32 on some targets"
    )]
    Ok(u64::from(stat.f_bavail).saturating_mul(u64::from(stat.f_frsize)))
}

/// Stores an earlier process left: their index died with it.
pub(crate) fn remove_leftover_stores(store_dir: &Path) -> io::Result<()> {
    let entries = match std::fs::read_dir(store_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|extension| extension == "cbw") {
            std::fs::remove_file(&path)?;
            tracing::warn!(store = %path.display(), "removed the store of a snapshot an earlier server left open; a copy reading it fails");
        }
    }
    Ok(())
}

/// Pins of snapshots an earlier process left open.
pub(crate) fn remove_leftover_pins(tracker: &Tracker) -> Result<(), CheckpointError> {
    let checkpoints = tracker.checkpoints();
    for pin in tracker.pins()? {
        if pin.holder != PIN_HOLDER {
            continue;
        }
        if let Some(checkpoint) = checkpoints.iter().find(|c| c.generation == pin.generation) {
            tracker.unpin(&checkpoint.name, PIN_HOLDER)?;
            tracing::warn!(checkpoint = %checkpoint.name, "removed the pin of a snapshot an earlier server left open");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_file_names_stay_inside_the_store_directory() {
        let cases = [
            ("nightly", "nightly.cbw"),
            ("2024-05-01.full", "2024-05-01.full.cbw"),
            ("../../etc/passwd", "_._.._etc_passwd.cbw"),
            (".hidden", "_hidden.cbw"),
            ("a/b", "a_b.cbw"),
            ("naïve", "na_ve.cbw"),
        ];
        for (name, file) in cases {
            assert_eq!(store_file_name(name), file, "{name:?}");
        }
        let long = "x".repeat(200);
        assert_eq!(store_file_name(&long).len(), 104);
    }
}
