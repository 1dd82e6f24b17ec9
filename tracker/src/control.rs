//! The control protocol: one JSON object per line, over the unix socket
//! `STATE_DIR/control.sock` (mode 0600, inside the 0700 state directory).
//! Documented in docs/control.md. The same `handle` answers requests from
//! the socket and from the CLI when it opens the state itself (no server).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::files::FileReport;
use fsmap::select::Criteria;
use serde_json::{Value, json};

use crate::tracker::{Tracker, error_chain};

/// Longest request line accepted.
pub const REQUEST_LINE_MAX: u64 = 64 * 1024;
/// Longest reply line a client accepts (a changes list can be long).
pub const REPLY_LINE_MAX: u64 = 1 << 30;

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// Answers one request.
pub fn handle(tracker: &Tracker, request: &Value) -> Value {
    match dispatch(tracker, request) {
        Ok(mut reply) => {
            reply["ok"] = json!(true);
            reply
        }
        Err(message) => json!({"ok": false, "error": message}),
    }
}

fn dispatch(tracker: &Tracker, request: &Value) -> Result<Value, String> {
    let text = |key: &str| request.get(key).and_then(Value::as_str);
    let name = || text("name").ok_or_else(|| "this request needs \"name\"".to_string());
    fn failed(error: impl std::error::Error) -> String {
        error_chain(&error)
    }
    match text("op").unwrap_or_default() {
        "checkpoint" => {
            let checkpoint = tracker.checkpoint(name()?).map_err(failed)?;
            Ok(json!({"checkpoint": checkpoint_json(tracker, &checkpoint)}))
        }
        "delete-checkpoint" => {
            tracker.delete_checkpoint(name()?).map_err(failed)?;
            Ok(json!({}))
        }
        "checkpoints" => Ok(json!({
            "checkpoints": tracker.checkpoints().iter().map(|c| checkpoint_json(tracker, c)).collect::<Vec<_>>()
        })),
        "changes" if request.get("files") == Some(&json!(true)) => {
            let since = text("since").ok_or("changes needs \"since\"")?;
            let criteria = criteria_of(request)?;
            let report = tracker
                .file_changes(since, text("until"), &criteria)
                .map_err(failed)?;
            Ok(file_report_json(since, text("until"), &report))
        }
        "changes" => {
            let since = text("since").ok_or("changes needs \"since\"")?;
            let extents = tracker.changes(since, text("until")).map_err(failed)?;
            let changed_bytes: u64 = extents.iter().map(|e| e.length_bytes).sum();
            Ok(json!({
                "since": since,
                "until": text("until"),
                "granularity": tracker.granularity().bytes(),
                "changed_bytes": changed_bytes,
                "extents": extents.iter().map(|e| json!({
                    "offset": e.offset_bytes,
                    "length": e.length_bytes,
                    "status": if e.saved { "saved" } else { "written" },
                })).collect::<Vec<_>>(),
            }))
        }
        "status" => {
            let status = tracker.status();
            Ok(json!({"status": {
                "image": status.image,
                "state_dir": status.state_dir,
                "generation": status.generation,
                "granularity": status.granularity_bytes,
                "size": status.size_bytes,
                "dirty_bytes": status.dirty_bytes,
                "unsaved_bytes": status.unsaved_bytes,
                "journal_bytes": status.journal_bytes,
                "checkpoints": status.checkpoint_count,
                "flush_count": status.flush.flush_count,
                "flush_work_us_p50": status.flush.work_ns_p50 as f64 / 1000.0,
                "flush_work_us_p99": status.flush.work_ns_p99 as f64 / 1000.0,
                "flush_work_us_max": status.flush.work_ns_max as f64 / 1000.0,
                "last_shutdown": if status.clean_start { "clean" } else { "unclean or first start" },
                "warnings": status.warnings,
                "journal_failure": status.journal_failure,
                "file_map": tracker.files().map(|files| {
                    let stats = files.stats();
                    json!({
                        "build_ms": stats.build_ms,
                        "last_update_us": stats.last_update_us,
                        "last_update_inodes": stats.last_update_inodes,
                        "attributed_flushes": stats.attributed_flushes,
                        "unattributed_flushes": stats.unattributed_flushes,
                    })
                }),
            }}))
        }
        other => Err(format!(
            "unknown op {other:?}: use checkpoint, delete-checkpoint, checkpoints, changes or status"
        )),
    }
}

fn criteria_of(request: &Value) -> Result<Criteria, String> {
    let strings = |key: &str| -> Vec<String> {
        request
            .get(key)
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| i.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let criteria = Criteria {
        include: strings("include"),
        exclude: strings("exclude"),
        min_size_bytes: request.get("min_size").and_then(Value::as_u64),
        max_size_bytes: request.get("max_size").and_then(Value::as_u64),
    };
    fsmap::select::validate(&criteria)?;
    Ok(criteria)
}

fn file_report_json(since: &str, until: Option<&str>, report: &FileReport) -> Value {
    let files: Vec<Value> = report
        .listed()
        .map(|(fs, change)| {
            json!({
                "status": change.kind.symbol().to_string(),
                "path": change.paths.first(),
                "paths": change.paths,
                "old_paths": change.old_paths,
                "inode": change.inode,
                "partition": fs.partition,
                "directory": change.is_directory,
                "size": change.size_bytes,
                "changed_bytes": change.changed_bytes,
                "changed_ranges": change.changed_file_ranges.iter()
                    .map(|&(offset, length)| json!({"offset": offset, "length": length}))
                    .collect::<Vec<_>>(),
                "content_changed": change.content_changed,
                "selected": report.criteria.selects(change),
            })
        })
        .collect();
    let filesystems: Vec<Value> = report
        .filesystems
        .iter()
        .map(|fs| {
            json!({
                "partition": fs.partition,
                "offset": fs.start_bytes,
                "block_size": fs.block_size,
                "metadata_bytes": fs.changes.metadata_blocks.iter()
                    .map(|(kind, blocks)| (kind.to_string(), json!(blocks * fs.block_size)))
                    .collect::<serde_json::Map<String, Value>>(),
                "unowned_bytes": fs.changes.unowned_blocks * fs.block_size,
            })
        })
        .collect();
    let copy_bytes: u64 = report.copy_ranges.iter().map(|&(_, length)| length).sum();
    json!({
        "since": since,
        "until": until,
        "files": files,
        "filesystems": filesystems,
        "copy_set": report.copy_ranges.iter().map(|&(offset, length)| json!({"offset": offset, "length": length})).collect::<Vec<_>>(),
        "copy_bytes": copy_bytes,
        "notes": report.notes,
    })
}

fn checkpoint_json(tracker: &Tracker, checkpoint: &crate::catalog::Checkpoint) -> Value {
    json!({
        "name": checkpoint.name,
        "generation": checkpoint.generation,
        "created_unix": checkpoint.created_unix_seconds,
        "changed_bytes": (checkpoint.changed.len() * tracker.granularity().bytes()).min(tracker.size_bytes()),
    })
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
    pub fn start(tracker: Arc<Tracker>) -> io::Result<ControlServer> {
        let path = socket_path(tracker.state_dir());
        let _ = std::fs::remove_file(&path);
        let listener = Arc::new(UnixListener::bind(&path)?);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread_listener = Arc::clone(&listener);
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(&thread_listener, &tracker, &thread_stop))?;
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

fn accept_loop(listener: &UnixListener, tracker: &Tracker, stop: &AtomicBool) {
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((stream, _)) => {
                if let Err(error) = serve_connection(stream, tracker) {
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

fn serve_connection(stream: UnixStream, tracker: &Tracker) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let read = (&mut reader).take(REQUEST_LINE_MAX).read_line(&mut line)?;
        if read == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && read as u64 == REQUEST_LINE_MAX {
            let reply = json!({"ok": false, "error": "request line too long"});
            writeln!(writer, "{reply}")?;
            return Ok(());
        }
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(request) => handle(tracker, &request),
            Err(error) => json!({"ok": false, "error": format!("request is not JSON: {error}")}),
        };
        writeln!(writer, "{reply}")?;
    }
}

/// Sends one request to a running server and returns its reply.
pub fn request(state_dir: &Path, request: &Value) -> io::Result<Value> {
    let stream = UnixStream::connect(socket_path(state_dir))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut writer = stream.try_clone()?;
    writeln!(writer, "{request}")?;
    let mut line = String::new();
    BufReader::new(stream)
        .take(REPLY_LINE_MAX)
        .read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
