//! What only nbd-client's tests against real servers share: nbdkit on a
//! unix socket, the `blockwatch` binary of this workspace, and readers of
//! a whole export's block status, through the client and through
//! `nbdinfo --map`, in one shape so that the two compare. What any test
//! could use (temporary directories, server processes, running clients,
//! seeded bytes) is in the `testkit` crate.
//!
//! Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use nbd_client::{Client, Extent};
use testkit::{ServerProcess, TempDir, nbdinfo_map, require_tool};

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

/// Appends `extent`, merged into the last one when their flags are the
/// same: servers may split a run anywhere, so only merged maps compare.
fn push_merged(extents: &mut Vec<Extent>, extent: Extent) {
    match extents.last_mut() {
        Some(last) if last.flags == extent.flags && last.end_bytes() == extent.offset_bytes => {
            last.length_bytes += extent.length_bytes
        }
        _ => extents.push(extent),
    }
}

/// The (offset, length) of each dirty run in a merged map.
fn dirty_runs(extents: Vec<Extent>) -> Vec<(u64, u64)> {
    extents
        .into_iter()
        .filter(Extent::is_dirty)
        .map(|extent| (extent.offset_bytes, extent.length_bytes))
        .collect()
}

/// The whole export's status in `context`, read one request after
/// another as a copier would, and merged.
pub fn map(client: &Client, context: &str) -> Vec<Extent> {
    let end = client.size_bytes();
    let mut extents: Vec<Extent> = Vec::new();
    let mut position = 0;
    while position < end {
        let reply = client
            .block_status(context, position, end - position)
            .unwrap();
        assert!(
            !reply.is_empty(),
            "an empty BLOCK_STATUS reply at {position}"
        );
        for extent in reply {
            assert_eq!(extent.offset_bytes, position, "extents are contiguous");
            position = extent.end_bytes();
            push_merged(&mut extents, extent);
        }
    }
    assert_eq!(position, end, "extents stop at the end asked for");
    extents
}

/// The dirty runs of `context` (a `qemu:dirty-bitmap:NAME`), as `map`
/// reads them.
pub fn dirty(client: &Client, context: &str) -> Vec<(u64, u64)> {
    dirty_runs(map(client, context))
}

/// nbdinfo's map of `context`, merged as `map` merges.
pub fn nbdinfo_extents(uri: &str, context: &str) -> Vec<Extent> {
    let mut extents: Vec<Extent> = Vec::new();
    for (offset_bytes, length_bytes, flags) in nbdinfo_map(uri, context) {
        let extent = Extent {
            offset_bytes,
            length_bytes,
            flags,
        };
        push_merged(&mut extents, extent);
    }
    extents
}

/// The dirty runs of `context` as nbdinfo sees them.
pub fn nbdinfo_dirty(uri: &str, context: &str) -> Vec<(u64, u64)> {
    dirty_runs(nbdinfo_extents(uri, context))
}
