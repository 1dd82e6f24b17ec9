//! The NBD clients the tests drive more than once, wrapped so that a
//! failure shows what the client said.

use std::process::Command;

use crate::process::run;

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
