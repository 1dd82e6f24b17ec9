//! Helpers the fsmap integration tests share: temporary directories,
//! e2fsprogs tools, deterministic bytes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn temp_dir(label: &str) -> TempDir {
    let path = std::env::temp_dir().join(format!("ext4-test-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).unwrap();
    TempDir(path)
}

pub fn tool(name: &str) -> String {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let path = format!("{dir}/{name}");
        if Path::new(&path).exists() {
            return path;
        }
    }
    panic!("{name} is not installed: apt-get install -y e2fsprogs");
}

pub fn debugfs(image: &Path, request: &str) -> String {
    let output = Command::new(tool("debugfs"))
        .args(["-R", request])
        .arg(image)
        .output()
        .unwrap();
    assert!(output.status.success(), "debugfs -R {request:?} failed");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Deterministic bytes.
pub fn bytes(seed: u64, length: usize) -> Vec<u8> {
    let mut state = seed | 1;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
