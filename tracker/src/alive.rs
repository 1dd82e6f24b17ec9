//! The heartbeat that lets recovery notice an image changed after a crash.
//!
//! A clean stop records the image's mtime; a crash leaves no record, so an
//! image written by something else between a crash and the next start
//! would go unnoticed. While a tracker runs, a thread writes the time to
//! `STATE/alive` every `INTERVAL`. After a crash the server stopped within
//! `INTERVAL` of the last heartbeat, so any write the server made has an
//! mtime before heartbeat + INTERVAL; an image mtime later than heartbeat +
//! `SLACK` means someone else wrote it. A heartbeat lost with the page
//! cache (power loss) is older, which can only make recovery distrust the
//! state (every region changed), never trust it wrongly.
//!
//! Format: u64 unix time in nanoseconds, u32 CRC-32C of those 8 bytes,
//! little-endian.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const INTERVAL: Duration = Duration::from_secs(1);
/// Heartbeat interval, plus room for a heartbeat thread that was slow to
/// run on a loaded machine.
pub const SLACK: Duration = Duration::from_secs(5);
const FILE_NAME: &str = "alive";
/// Time u64 (ns) and its crc32c u32.
const BEAT_LEN: usize = 8 + 4;
const _: () = assert!(BEAT_LEN == 12);

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Writes the current time (no sync: see the module comment).
pub fn beat(file: &File) -> std::io::Result<()> {
    let time_ns = now_ns();
    let mut bytes = [0u8; BEAT_LEN];
    bytes[..8].copy_from_slice(&time_ns.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..8]);
    bytes[8..].copy_from_slice(&crc.to_le_bytes());
    file.write_all_at(&bytes, 0)
}

/// The last heartbeat, in unix nanoseconds; None when missing or damaged.
pub fn last(state_dir: &Path) -> Option<u64> {
    let bytes = std::fs::read(path(state_dir)).ok()?;
    let stored = bytes.get(..BEAT_LEN)?;
    let crc = u32::from_le_bytes(stored[8..BEAT_LEN].try_into().ok()?);
    (crc32c::crc32c(&stored[..8]) == crc)
        .then(|| u64::from_le_bytes(stored[..8].try_into().unwrap_or_default()))
}

/// The heartbeat thread; stops when dropped or on `stop`.
#[derive(Debug)]
pub struct Heartbeat {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    pub fn start(state_dir: &Path) -> std::io::Result<Heartbeat> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path(state_dir))?;
        beat(&file)?;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("blockwatch-alive".into())
            .spawn(move || {
                let (lock, wake) = &*flag;
                let mut stopped = lock.lock().expect("heartbeat lock");
                while !*stopped {
                    stopped = wake
                        .wait_timeout(stopped, INTERVAL)
                        .expect("heartbeat lock")
                        .0;
                    if let Err(error) = beat(&file) {
                        tracing::warn!(%error, "cannot write the heartbeat");
                    }
                }
            })?;
        Ok(Heartbeat {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        *self.stop.0.lock().expect("heartbeat lock") = true;
        self.stop.1.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop();
    }
}
