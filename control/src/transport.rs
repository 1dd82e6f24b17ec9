//! The control socket: a thread that answers one connection at a time,
//! one request line at a time, and the client side of it.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::proto::{Reply, Request, error_to_wire};

/// Longest request line accepted.
pub const REQUEST_LINE_MAX: u64 = 64 * 1024;
/// Longest reply line a client accepts (a changes list can be long).
pub const REPLY_LINE_MAX: u64 = 1 << 30;
/// How long the server waits for a connected client's next request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client waits for a reply (a checkpoint on a large disk
/// brings its file map up to date first).
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Whoever serves the operations behind a socket.
pub trait Handler: Send + Sync {
    /// Answers one request; an `Err` is the refusal's message.
    fn handle(&self, request: Request) -> Result<Reply, String>;
}

/// The wire object answering one request line.
pub fn answer(handler: &dyn Handler, line: &str) -> Value {
    match Request::parse(line).and_then(|request| handler.handle(request)) {
        Ok(reply) => reply.to_wire(),
        Err(message) => error_to_wire(&message),
    }
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// The socket server: a thread answering one connection at a time.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    listener: Arc<UnixListener>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listens on `STATE_DIR/control.sock` (mode 0600).
    pub fn start(state_dir: &Path, handler: Arc<dyn Handler>) -> io::Result<ControlServer> {
        let path = socket_path(state_dir);
        let _ = std::fs::remove_file(&path);
        let listener = Arc::new(UnixListener::bind(&path)?);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread_listener = Arc::clone(&listener);
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(&thread_listener, handler.as_ref(), &thread_stop))?;
        Ok(ControlServer {
            path,
            listener,
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            // The thread blocks in accept: shutting the listening socket
            // down makes accept fail at once (EINVAL), so the thread sees
            // the flag. (Connecting to our own path instead hung forever
            // when the socket file had been removed or replaced.)
            // SAFETY: shutdown on a socket this server owns; no pointers.
            unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: &UnixListener, handler: &dyn Handler, stop: &AtomicBool) {
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((stream, _)) => {
                if let Err(error) = serve_connection(stream, handler) {
                    tracing::info!(%error, "control connection ended");
                }
            }
            Err(error) => {
                tracing::warn!(%error, "control accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve_connection(stream: UnixStream, handler: &dyn Handler) -> io::Result<()> {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let read = (&mut reader).take(REQUEST_LINE_MAX).read_line(&mut line)?;
        if read == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && read as u64 == REQUEST_LINE_MAX {
            writeln!(writer, "{}", error_to_wire("request line too long"))?;
            return Ok(());
        }
        writeln!(writer, "{}", answer(handler, &line))?;
    }
}

/// Why a call got no answer it could use.
#[derive(Debug)]
pub enum CallError {
    /// No server answers on the socket.
    Unreachable(io::Error),
    /// The server refused the request; its message.
    Refused(String),
    /// The reply was not what the request gets.
    Malformed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(error) => {
                write!(f, "the control socket does not answer: {error}")
            }
            CallError::Refused(message) => f.write_str(message),
            CallError::Malformed(message) => {
                write!(f, "the server's reply is malformed: {message}")
            }
        }
    }
}

impl std::error::Error for CallError {}

/// Sends one request to a running server and returns its reply's object.
pub fn request(state_dir: &Path, request: &Request) -> Result<Value, CallError> {
    let line = serde_json::to_string(request).expect("requests serialize");
    let exchange = || -> io::Result<String> {
        let stream = UnixStream::connect(socket_path(state_dir))?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        let mut writer = stream.try_clone()?;
        writeln!(writer, "{line}")?;
        let mut reply = String::new();
        BufReader::new(stream)
            .take(REPLY_LINE_MAX)
            .read_line(&mut reply)?;
        Ok(reply)
    };
    let reply = exchange().map_err(CallError::Unreachable)?;
    serde_json::from_str(&reply).map_err(|error| CallError::Malformed(error.to_string()))
}

/// A reply object as the type its request gets, or the refusal.
pub fn typed<T: DeserializeOwned>(reply: Value) -> Result<T, CallError> {
    if reply.get("ok") != Some(&Value::Bool(true)) {
        let message = reply
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("the server refused the request");
        return Err(CallError::Refused(message.to_string()));
    }
    serde_json::from_value(reply).map_err(|error| CallError::Malformed(error.to_string()))
}
