//! What only nbd-client's tests against real servers share: nbdkit on a
//! unix socket and the `blockwatch` binary of this workspace. What any
//! test could use (temporary directories, server processes, running
//! clients, seeded bytes) is in the `testkit` crate.
//!
//! Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::{ServerProcess, TempDir, require_tool};

/// Starts `nbdkit PLUGIN ARGS...` on a socket in `dir`.
pub fn nbdkit(dir: &TempDir, args: &[&str]) -> ServerProcess {
    require_tool("nbdkit", "nbdkit");
    let socket = dir.join("nbdkit.sock");
    let socket_text = socket.to_str().expect("UTF-8 temp path").to_string();
    let mut all = vec!["--foreground", "--exit-with-parent", "-U", &socket_text];
    all.extend_from_slice(args);
    ServerProcess::start("nbdkit", &all, &socket, &dir.join("nbdkit.log"))
}

/// The `blockwatch` binary of this workspace, built by `cargo build -p
/// blockwatch` (run here if it is missing, with the cargo that runs the
/// tests). `BLOCKWATCH` in the environment overrides the path.
pub fn blockwatch() -> PathBuf {
    if let Some(path) = std::env::var_os("BLOCKWATCH") {
        return PathBuf::from(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("nbd-client sits in the workspace");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let binary = target.join("debug").join("blockwatch");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let status = Command::new(&cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "blockwatch",
            "--bin",
            "blockwatch",
        ])
        .current_dir(workspace)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cargo} build -p blockwatch: {e}"));
    assert!(
        status.success(),
        "cargo build -p blockwatch failed ({status})"
    );
    assert!(
        binary.is_file(),
        "{} is missing after cargo build -p blockwatch (set BLOCKWATCH=PATH)",
        binary.display()
    );
    binary
}
