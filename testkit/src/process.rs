//! Running the real clients and tools: to completion, with a bound on how
//! long they may take, failing with the command line, the exit status and
//! everything the command printed.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest any one command may run before it counts as hung. It bounds the
/// waiting only; no test asserts on how long anything took.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Builds a command from a program and arguments.
pub fn command<I, S>(program: impl AsRef<OsStr>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(program);
    command.args(args);
    command
}

/// Runs `command` to completion and returns its output, whatever its
/// status. A client that hangs (for example waiting for a reply the server
/// never sends) is killed after `COMMAND_LIMIT` and the test fails.
pub fn output(command: &mut Command) -> Output {
    output_within(command, COMMAND_LIMIT)
}

/// Like `output`, with an explicit bound on how long the command may run.
pub fn output_within(command: &mut Command, limit: Duration) -> Output {
    complete(command, None, limit)
}

/// Runs `command`, panics with its stderr unless it exits 0, returns stdout.
pub fn run(command: &mut Command) -> String {
    run_within(command, COMMAND_LIMIT)
}

/// Like `run`, with an explicit bound on how long the command may run.
pub fn run_within(command: &mut Command, limit: Duration) -> String {
    let output = output_within(command, limit);
    successful_stdout(command, output, "")
}

/// Runs `program args...` and returns stdout (see `run`).
pub fn run_program<I, S>(program: impl AsRef<OsStr>, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(&mut command(program, args))
}

/// Like `run`, with `input` on the command's standard input (an `sfdisk`
/// script, for example); a failure shows the input too.
pub fn run_with_input(command: &mut Command, input: &str) -> String {
    let output = complete(command, Some(input.as_bytes()), COMMAND_LIMIT);
    successful_stdout(command, output, &format!("--- stdin ---\n{input}\n"))
}

/// Spawns `command`, feeds it `input` (or nothing), collects its output
/// and waits at most `limit` for it to exit.
fn complete(command: &mut Command, input: Option<&[u8]>, limit: Duration) -> Output {
    let mut child = command
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(command)));
    // The pipes are drained before the input is written, so a child that
    // prints much before reading its input never blocks.
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(input)
            .unwrap_or_else(|e| panic!("cannot write the input of {}: {e}", describe(command)));
    }
    let status = wait_bounded(&mut child, limit);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stdout = stdout.join().expect("stdout reader");
    let stderr = stderr.join().expect("stderr reader");
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "{} did not finish within {limit:?} and was killed (a hang: a reply \
             that never came?)\n--- stderr ---\n{}--- stdout ---\n{}",
            describe(command),
            String::from_utf8_lossy(&stderr),
            String::from_utf8_lossy(&stdout)
        ),
    }
}

/// The stdout of a command that must have exited 0; `context` goes into
/// the failure message.
fn successful_stdout(command: &Command, output: Output, context: &str) -> String {
    if !output.status.success() {
        panic!(
            "{} failed with {}\n{context}--- stderr ---\n{}--- stdout ---\n{}",
            describe(command),
            status_text(output.status),
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    String::from_utf8(output.stdout)
        .unwrap_or_else(|e| panic!("{} printed non-UTF-8 output: {e}", describe(command)))
}

/// Reads a pipe to its end on a thread, so a chatty child never blocks.
fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

/// Waits at most `limit` for `child` to exit; `None` if it is still
/// running (the caller decides whether to kill it).
pub fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().ok().flatten() {
            return Some(status);
        }
        if started.elapsed() > limit {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Polls `done` every 10 ms until it holds; panics naming `what` once
/// `limit` has passed.
pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The command line, quoted where a shell would need it, for messages.
pub fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        let arg = arg.to_string_lossy();
        if arg.contains([' ', '\'', '"', '?', '$']) {
            text.push_str(&format!("'{arg}'"));
        } else {
            text.push_str(&arg);
        }
    }
    text
}

/// "exit code N" or "signal N".
pub fn status_text(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => format!("{status}"),
    }
}

/// Sends `signal` to one process the test started.
pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) takes no memory; `pid` is a child the test spawned
    // and has not yet reaped, so the id cannot have been reused.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Parses the JSON a client printed, showing the text when it is not JSON.
pub fn parse_json(text: &str, what: &str) -> serde_json::Value {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("{what} did not print valid JSON ({e}):\n{text}"))
}
