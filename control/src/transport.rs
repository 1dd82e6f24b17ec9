//! The control socket: a thread that answers one connection at a time,
//! one request line at a time, and the client side of it.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::proto::{Reply, Request, error_to_wire};

/// Longest request line accepted.
pub const REQUEST_LINE_MAX: u64 = 64 * 1024;
/// Longest reply line a client accepts (a changes list can be long).
pub const REPLY_LINE_MAX: u64 = 1 << 30;
/// How long the server waits for a connected client's next request, while
/// the connection holds nothing (a session that holds a snapshot waits for
/// as long as its client lives).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections answered at once; one more is told so and closed.
pub const CONNECTIONS_MAX: usize = 16;
/// How long a client waits for a reply (a checkpoint on a large disk
/// brings its file map up to date first).
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// What one control connection holds; what it registered is undone when
/// the connection ends, however it ends (a copier killed mid-copy
/// releases its snapshot this way).
#[derive(Default)]
pub struct Session {
    cleanups: Vec<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("cleanups", &self.cleanups.len())
            .finish()
    }
}

impl Session {
    /// Runs `cleanup` when the connection ends.
    pub fn on_close(&mut self, cleanup: impl FnOnce() + Send + 'static) {
        self.cleanups.push(Box::new(cleanup));
    }

    /// Whether the connection holds something that its end releases.
    pub fn holds_anything(&self) -> bool {
        !self.cleanups.is_empty()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for cleanup in self.cleanups.drain(..).rev() {
            cleanup();
        }
    }
}

/// Whoever serves the operations behind a socket.
pub trait Handler: Send + Sync {
    /// Answers one request; an `Err` is the refusal's message.
    fn handle(&self, request: Request) -> Result<Reply, String>;

    /// Answers a request of a connection; what it registers in `session`
    /// runs when the connection ends. By default, `handle`.
    fn handle_in(&self, request: Request, _session: &mut Session) -> Result<Reply, String> {
        self.handle(request)
    }
}

/// The wire object answering one request line.
pub fn answer(handler: &dyn Handler, line: &str, session: &mut Session) -> Value {
    match Request::parse(line).and_then(|request| handler.handle_in(request, session)) {
        Ok(reply) => reply.to_wire(),
        Err(message) => error_to_wire(&message),
    }
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// The socket server: an accepting thread, and a thread per connection
/// (at most `CONNECTIONS_MAX`), each answering one line at a time.
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
            .spawn(move || accept_loop(&thread_listener, handler, &thread_stop))?;
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

fn accept_loop(listener: &UnixListener, handler: Arc<dyn Handler>, stop: &AtomicBool) {
    let connections = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "control accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if connections.fetch_add(1, Ordering::SeqCst) >= CONNECTIONS_MAX {
            connections.fetch_sub(1, Ordering::SeqCst);
            let message = format!("{CONNECTIONS_MAX} control connections are open; try again");
            let _ = writeln!(stream, "{}", error_to_wire(&message));
            continue;
        }
        let (handler, count) = (Arc::clone(&handler), Arc::clone(&connections));
        let spawned = std::thread::Builder::new()
            .name("control-connection".into())
            .spawn(move || {
                if let Err(error) = serve_connection(stream, handler.as_ref()) {
                    tracing::info!(%error, "control connection ended");
                }
                count.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start a control connection thread");
            connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn serve_connection(stream: UnixStream, handler: &dyn Handler) -> io::Result<()> {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let timeouts = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    // Dropped when the connection ends, on every path: runs the cleanups.
    let mut session = Session::default();
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
        // One write per reply: Display of a Value writes token by token,
        // which on an unbuffered socket is a syscall each (30 ms for a
        // reply of 655 extents).
        let reply = format!("{}\n", answer(handler, &line, &mut session));
        writer.write_all(reply.as_bytes())?;
        // A session holding a snapshot lives as long as its client does.
        let timeout = (!session.holds_anything()).then_some(REQUEST_TIMEOUT);
        timeouts.set_read_timeout(timeout)?;
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
        writer.write_all(format!("{line}\n").as_bytes())?;
        let mut reply = String::new();
        BufReader::new(stream)
            .take(REPLY_LINE_MAX)
            .read_line(&mut reply)?;
        Ok(reply)
    };
    let reply = exchange().map_err(CallError::Unreachable)?;
    serde_json::from_str(&reply).map_err(|error| CallError::Malformed(error.to_string()))
}

/// A connection kept open for several requests (a snapshot lives as long
/// as the connection that took it).
#[derive(Debug)]
pub struct Connection {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Connection {
    pub fn open(state_dir: &Path) -> Result<Connection, CallError> {
        let stream = UnixStream::connect(socket_path(state_dir)).map_err(CallError::Unreachable)?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(CallError::Unreachable)?;
        let writer = stream.try_clone().map_err(CallError::Unreachable)?;
        Ok(Connection {
            writer,
            reader: BufReader::new(stream),
        })
    }

    /// One request and its reply, as the type the request gets.
    pub fn call<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T, CallError> {
        let line = serde_json::to_string(request).expect("requests serialize");
        let io = |error| CallError::Malformed(format!("the control connection failed: {error}"));
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .map_err(io)?;
        let mut reply = String::new();
        (&mut self.reader)
            .take(REPLY_LINE_MAX)
            .read_line(&mut reply)
            .map_err(io)?;
        let reply: Value = serde_json::from_str(&reply)
            .map_err(|error| CallError::Malformed(error.to_string()))?;
        typed(reply)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Reply;

    /// Answers every request with Done; a `checkpoints` request also
    /// registers a cleanup that counts.
    struct Counting(Arc<AtomicUsize>);

    impl Handler for Counting {
        fn handle(&self, _request: Request) -> Result<Reply, String> {
            Ok(Reply::Done)
        }

        fn handle_in(&self, request: Request, session: &mut Session) -> Result<Reply, String> {
            if request == Request::Checkpoints {
                let released = Arc::clone(&self.0);
                session.on_close(move || {
                    released.fetch_add(1, Ordering::SeqCst);
                });
            }
            self.handle(request)
        }
    }

    fn exchange(stream: &UnixStream, line: &str) -> Value {
        writeln!(&*stream, "{line}").unwrap();
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap()
    }

    #[test]
    fn a_sessions_cleanups_run_when_its_client_goes_away_and_others_are_served_meanwhile() {
        let dir = std::env::temp_dir().join(format!("control-session-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let released = Arc::new(AtomicUsize::new(0));
        let mut server =
            ControlServer::start(&dir, Arc::new(Counting(Arc::clone(&released)))).unwrap();
        let holder = UnixStream::connect(socket_path(&dir)).unwrap();
        assert_eq!(exchange(&holder, r#"{"op":"checkpoints"}"#)["ok"], true);
        // The holder's connection stays open; another is answered at once.
        let other = UnixStream::connect(socket_path(&dir)).unwrap();
        assert_eq!(exchange(&other, r#"{"op":"status"}"#)["ok"], true);
        drop(other);
        assert_eq!(released.load(Ordering::SeqCst), 0);
        drop(holder);
        let started = std::time::Instant::now();
        while released.load(Ordering::SeqCst) == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "cleanup never ran"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(released.load(Ordering::SeqCst), 1);
        server.stop();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
