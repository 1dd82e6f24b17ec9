//! A temporary directory that removes itself, and the file helpers the
//! tests build images and compare them with.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::random::random_bytes;

pub const MIB: u64 = 1024 * 1024;

/// A fresh directory under the system temporary directory, removed on drop.
/// Its name holds the label, the process id and a counter, so tests that
/// run in parallel (or one test asking twice) never share one.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "blockwatch-test-{label}-{}-{unique}",
            std::process::id()
        ));
        // A directory left by a killed run of the same process id.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Creates (or truncates) the file at `path`.
pub fn create_file(path: &Path) -> File {
    File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()))
}

/// Creates a sparse file of `size_bytes` (all holes), as `truncate -s` does.
pub fn create_sparse_file(path: &Path, size_bytes: u64) {
    let file = create_file(path);
    file.set_len(size_bytes)
        .unwrap_or_else(|e| panic!("cannot size {}: {e}", path.display()));
}

/// Writes `length` bytes seeded by `seed` (`random_bytes`) to a new file
/// at `path` and returns them.
pub fn write_random_file(path: &Path, seed: u64, length: usize) -> Vec<u8> {
    let data = random_bytes(seed, length);
    std::fs::write(path, &data).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    data
}

/// Writes `data` at `offset` into an existing file.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    file.write_all_at(data, offset)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Asserts two files have the same length and bytes, like `cmp`, naming
/// the first differing offset.
pub fn assert_files_equal(left: &Path, right: &Path) {
    let mut left_file =
        File::open(left).unwrap_or_else(|e| panic!("cannot open {}: {e}", left.display()));
    let mut right_file =
        File::open(right).unwrap_or_else(|e| panic!("cannot open {}: {e}", right.display()));
    let left_len = left_file.metadata().expect("metadata").len();
    let right_len = right_file.metadata().expect("metadata").len();
    assert_eq!(
        left_len,
        right_len,
        "{} and {} differ in size",
        left.display(),
        right.display()
    );
    let mut left_buf = vec![0u8; MIB as usize];
    let mut right_buf = vec![0u8; MIB as usize];
    let mut offset = 0u64;
    while offset < left_len {
        let piece = (left_len - offset).min(MIB) as usize;
        left_file.read_exact(&mut left_buf[..piece]).expect("read");
        right_file
            .read_exact(&mut right_buf[..piece])
            .expect("read");
        if let Some(at) = first_difference(&left_buf[..piece], &right_buf[..piece]) {
            panic!(
                "{} and {} differ at byte {} ({:#04x} != {:#04x})",
                left.display(),
                right.display(),
                offset + at as u64,
                left_buf[at],
                right_buf[at]
            );
        }
        offset += piece as u64;
    }
}

/// Asserts that the file at `path` holds `expected` from `offset`.
pub fn assert_file_range(path: &Path, offset: u64, expected: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut actual = vec![0u8; expected.len()];
    file.read_exact_at(&mut actual, offset)
        .unwrap_or_else(|e| panic!("cannot read {} at {offset}: {e}", path.display()));
    if let Some(at) = first_difference(&actual, expected) {
        panic!(
            "{} differs from what was written at byte {} ({:#04x} != {:#04x} expected)",
            path.display(),
            offset + at as u64,
            actual[at],
            expected[at]
        );
    }
}

/// The first index at which two slices of one length differ.
fn first_difference(left: &[u8], right: &[u8]) -> Option<usize> {
    assert_eq!(left.len(), right.len(), "compare slices of one length");
    left.iter().zip(right).position(|(a, b)| a != b)
}
