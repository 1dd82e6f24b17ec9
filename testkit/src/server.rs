//! A server process the tests start and talk to over a unix socket (nbdkit,
//! qemu-nbd, a built binary), stopped on drop so that a failing test leaves
//! no server behind.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{signal, status_text, wait_bounded};

/// How long a server may take to accept connections or to exit after
/// SIGTERM. These bound the waiting only; no test asserts on timing.
const SERVER_START_LIMIT: Duration = Duration::from_secs(20);
const SERVER_STOP_LIMIT: Duration = Duration::from_secs(20);
const SERVER_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// `program args...` listening on a unix socket, with its stdout and
/// stderr in a log file. Dropping it sends SIGTERM and reaps it (SIGKILL
/// after `SERVER_STOP_LIMIT`); its exit status is not checked, since the
/// servers driven this way are not what the tests are about.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    socket: PathBuf,
    name: String,
    log: PathBuf,
}

impl ServerProcess {
    /// Runs `program args...` (which must listen on `socket`) and returns
    /// once the socket accepts connections.
    pub fn start(
        program: impl AsRef<Path>,
        args: &[&str],
        socket: &Path,
        log: &Path,
    ) -> ServerProcess {
        let program = program.as_ref();
        let log_file =
            File::create(log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let mut server = ServerProcess {
            child,
            socket: socket.to_path_buf(),
            name: format!("{} {}", program.display(), args.join(" ")),
            log: log.to_path_buf(),
        };
        server.wait_until_accepting();
        server
    }

    fn wait_until_accepting(&mut self) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("cannot poll a server") {
                panic!(
                    "{} exited with {} before accepting connections\n{}",
                    self.name,
                    status_text(status),
                    self.logs()
                );
            }
            // Probing connects are harmless: servers driven this way serve
            // several clients and just see one go away.
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if started.elapsed() > SERVER_START_LIMIT {
                panic!(
                    "{} did not accept on {} within {SERVER_START_LIMIT:?}\n{}",
                    self.name,
                    self.socket.display(),
                    self.logs()
                );
            }
            std::thread::sleep(SERVER_POLL_INTERVAL);
        }
    }

    /// URI of the default export ("").
    pub fn uri(&self) -> String {
        self.uri_for("")
    }

    /// URI of a named export.
    pub fn uri_for(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// What the server printed so far, for failure messages.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        signal(self.child.id(), libc::SIGTERM);
        if wait_bounded(&mut self.child, SERVER_STOP_LIMIT).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
