//! `control_protocol`: the control socket's JSON lines (docs/control.md).
//! Server side: request lines parsed as `control::transport` parses
//! them, every request that parses serialized and parsed back the same,
//! and the queries among them (checkpoints, changes, status) answered by
//! a real tracker (`tracker/src/control.rs`) through `answer`, the
//! function the socket's threads call. Requests that change state
//! (checkpoint, pin, ...) are parsed, not run: each would leave the
//! tracker different for the next input. Client side: a reply line read
//! as each typed reply, and what reads serialized and read back the same.

use std::path::PathBuf;
use std::sync::OnceLock;

use control::proto::{
    ChangesReply, CheckpointReply, CheckpointsReply, FileChangesReply, PinReply, SnapshotReply,
    StatusReply,
};
use control::transport::{answer, typed};
use control::{Request, Session};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracker::{Tracker, TrackerOptions};

/// Request lines one input may hold.
const LINES_MAX: usize = 16;
const IMAGE_BYTES: u64 = 64 << 20;
const REGION_BYTES: u64 = 64 << 10;

/// Byte 0, bit 0: the rest is a reply line (client side) rather than
/// request lines (server side). Panics on a wrong answer.
pub fn exercise(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if mode & 1 == 1 {
        read_reply(text);
    } else {
        for line in text.lines().take(LINES_MAX) {
            serve_line(line);
        }
    }
}

fn serve_line(line: &str) {
    let mut session = Session::default();
    match Request::parse(line) {
        Err(message) => {
            let wire = answer(tracker(), line, &mut session);
            assert_eq!(wire, serde_json::json!({"ok": false, "error": message}));
        }
        Ok(request) => {
            let again = serde_json::to_string(&request).expect("requests serialize");
            assert_eq!(Request::parse(&again).as_ref(), Ok(&request), "{again}");
            if request.is_query() {
                let wire = answer(tracker(), line, &mut session);
                let ok = wire.get("ok").and_then(Value::as_bool);
                assert!(ok.is_some(), "a reply without ok: {wire}");
                if ok == Some(false) {
                    assert!(wire.get("error").is_some_and(Value::is_string));
                }
            }
        }
    }
    assert!(!session.holds_anything(), "a query that holds something");
}

/// The tracker's reply line to `line` (for seeds of the client side).
pub fn answer_line(line: &str) -> String {
    answer(tracker(), line, &mut Session::default()).to_string()
}

fn read_reply(text: &str) {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return;
    };
    round_trip::<CheckpointReply>(&value);
    round_trip::<CheckpointsReply>(&value);
    round_trip::<PinReply>(&value);
    round_trip::<SnapshotReply>(&value);
    round_trip::<ChangesReply>(&value);
    round_trip::<FileChangesReply>(&value);
    // Its floats need not read back bit for bit from serde_json's text.
    let _ = typed::<StatusReply>(value);
}

/// A reply that reads as `T` reads the same once written again.
fn round_trip<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(value: &Value) {
    if let Ok(reply) = typed::<T>(value.clone()) {
        let mut wire = serde_json::to_value(&reply).expect("replies serialize");
        wire["ok"] = Value::Bool(true);
        let again = typed::<T>(wire).expect("a reply written again reads");
        assert_eq!(again, reply);
    }
}

/// One tracker for the whole run, on a sparse image in /dev/shm, with two
/// checkpoints ("base", "second") and writes after each.
fn tracker() -> &'static Tracker {
    static TRACKER: OnceLock<Tracker> = OnceLock::new();
    TRACKER.get_or_init(|| {
        let dir = state_dir();
        let image = dir.join("disk.img");
        let file = std::fs::File::create(&image).expect("the image");
        file.set_len(IMAGE_BYTES).expect("the image's size");
        let options = TrackerOptions {
            image,
            state_dir: Some(dir.join("state")),
            granularity_bytes: Some(REGION_BYTES),
            precision_bytes: None,
            journal_wrapper: None,
            files: false,
        };
        let tracker = Tracker::open(&options, IMAGE_BYTES).expect("a tracker");
        tracker.start();
        for (name, offsets) in [("base", [0u64, 5, 9]), ("second", [1, 5, 700])] {
            tracker.checkpoint(name).expect("a checkpoint");
            for region in offsets {
                let offset = region * REGION_BYTES;
                tracker.ensure_marked(offset, 4096).expect("a mark");
                tracker.note_written(offset, 4096);
            }
            tracker.flush(|| Ok(())).expect("a flush");
        }
        tracker
    })
}

/// This process's directory, after removing those of runs that ended.
fn state_dir() -> PathBuf {
    let ours = crate::scratch_path("control");
    let prefix = "blockwatch-fuzz-control-";
    if let Some(parent) = ours.parent()
        && let Ok(entries) = std::fs::read_dir(parent)
    {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(prefix) else {
                continue;
            };
            if !std::path::Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&ours);
    std::fs::create_dir_all(&ours).expect("a state directory");
    ours
}
