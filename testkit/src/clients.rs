//! The NBD clients the tests drive more than once, wrapped so that a
//! failure shows what the client said.

use std::process::Command;

use crate::process::{parse_json, run, run_program};
use crate::tools::require_tool;

/// `qemu-io -f raw -c CMD... URI` (qemu-utils), not yet run.
pub fn qemu_io_command(uri: &str, commands: &[&str]) -> Command {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for each in commands {
        command.args(["-c", each]);
    }
    command.arg(uri);
    command
}

/// Runs qemu-io commands that must all succeed and returns what qemu-io
/// printed.
pub fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let stdout = run(&mut qemu_io_command(uri, commands));
    // qemu-io reports some failures on stdout only, and still exits 0.
    assert!(
        !stdout.contains("failed") && !stdout.contains("error"),
        "qemu-io reported a failure:\n{stdout}"
    );
    stdout
}

/// `nbdinfo --json --map=CONTEXT URI` (libnbd-bin) as (offset, length,
/// type) triples, in the order nbdinfo printed them.
pub fn nbdinfo_map(uri: &str, context: &str) -> Vec<(u64, u64, u64)> {
    require_tool("nbdinfo", "libnbd-bin");
    let map = format!("--map={context}");
    let text = run_program("nbdinfo", ["--json", map.as_str(), uri]);
    parse_json(&text, "nbdinfo --json --map")
        .as_array()
        .unwrap_or_else(|| panic!("nbdinfo --json --map printed no array:\n{text}"))
        .iter()
        .map(|extent| {
            let field = |name: &str| {
                extent[name]
                    .as_u64()
                    .unwrap_or_else(|| panic!("nbdinfo --json --map: no {name} in {extent}"))
            };
            (field("offset"), field("length"), field("type"))
        })
        .collect()
}
