//! The control protocol's messages: one JSON object per line, a request
//! with an `"op"`, a reply with `"ok"` and either the operation's fields
//! or `"error"`. docs/control.md is the reference.
//!
//! Keys carry their units (`offset_bytes`, `created_unix_seconds`). The
//! keys of the first release (`offset`, `created_unix`, ...) are still
//! written beside the new ones for this release (`LEGACY_KEYS`), so
//! scripts written against it keep working; readers ignore them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a client asks. Served by whoever owns the operation: the tracker
/// serves all of today's; the copier's (copy, snapshot) join this enum
/// and are dispatched to it by the binary, so the tracker never depends
/// on the copier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Checkpoint {
        name: String,
    },
    DeleteCheckpoint {
        name: String,
    },
    Checkpoints,
    Changes(ChangesRequest),
    Status,
    /// Keeps checkpoint `name` from being deleted while `holder` needs it.
    Pin {
        name: String,
        holder: String,
        #[serde(default)]
        reason: String,
    },
    Unpin {
        name: String,
        holder: String,
    },
    /// A copy-before-write snapshot: a new checkpoint (named `name`, or
    /// `copy-TIME`) closes the generation, and the disk as it was then is
    /// served read-only as the export in the reply until `release-snapshot`
    /// or until this connection ends.
    Snapshot {
        #[serde(default)]
        name: Option<String>,
        /// Bound of the copy-before-write store (default: the server's).
        #[serde(default)]
        max_store_bytes: Option<u64>,
    },
    ReleaseSnapshot {
        name: String,
    },
    /// From now on snapshot `name` keeps only the regions these byte
    /// ranges touch (and those copied out already): the others are not
    /// copied out at their first write any more, and reading them fails.
    /// Only narrows: what a call released, a later one cannot keep. A copy
    /// tells it what it will still read.
    NarrowSnapshot {
        name: String,
        /// (offset, length) byte ranges, at most `NARROW_EXTENTS_MAX`.
        extents: Vec<(u64, u64)>,
    },
}

/// Ranges one `narrow-snapshot` request names at most (its line stays
/// well under the request line limit). A copy with more coarsens them:
/// keeping more than needed only costs copy-outs.
pub const NARROW_EXTENTS_MAX: usize = 1024;

/// Every `op` this protocol knows, for messages.
pub const OPS: &[&str] = &[
    "checkpoint",
    "delete-checkpoint",
    "checkpoints",
    "changes",
    "status",
    "pin",
    "unpin",
    "snapshot",
    "release-snapshot",
    "narrow-snapshot",
];

impl Request {
    /// Whether answering changes the state (then an offline answer needs
    /// a writable open).
    pub fn is_query(&self) -> bool {
        matches!(
            self,
            Request::Checkpoints | Request::Changes(_) | Request::Status
        )
    }

    /// Parses one request line, with a message that names the known ops
    /// when `op` is missing or unknown.
    pub fn parse(line: &str) -> Result<Request, String> {
        let value: Value =
            serde_json::from_str(line).map_err(|error| format!("request is not JSON: {error}"))?;
        let op = value
            .get("op")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if !OPS.contains(&op.as_str()) {
            return Err(format!("unknown op {op:?}: use {}", OPS.join(", ")));
        }
        serde_json::from_value(value).map_err(|error| format!("bad {op} request: {error}"))
    }
}

/// `changes`: extents, or with `files` the files that own them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesRequest {
    pub since: String,
    #[serde(default)]
    pub until: Option<String>,
    /// List files (ext2/3/4) instead of extents.
    #[serde(default)]
    pub files: bool,
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default, alias = "min_size")]
    pub min_size_bytes: Option<u64>,
    #[serde(default, alias = "max_size")]
    pub max_size_bytes: Option<u64>,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Checkpoint(CheckpointReply),
    /// Done, nothing to say (delete-checkpoint, unpin).
    Done,
    Checkpoints(CheckpointsReply),
    Changes(ChangesReply),
    FileChanges(FileChangesReply),
    Status(Box<StatusReply>),
    Pin(PinReply),
    Snapshot(SnapshotReply),
}

impl Reply {
    /// The reply line's object: `"ok": true`, the fields, the legacy keys.
    pub fn to_wire(&self) -> Value {
        let fields = match self {
            Reply::Checkpoint(reply) => serde_json::to_value(reply),
            Reply::Done => Ok(Value::Object(serde_json::Map::new())),
            Reply::Checkpoints(reply) => serde_json::to_value(reply),
            Reply::Changes(reply) => serde_json::to_value(reply),
            Reply::FileChanges(reply) => serde_json::to_value(reply),
            Reply::Status(reply) => serde_json::to_value(reply),
            Reply::Pin(reply) => serde_json::to_value(reply),
            Reply::Snapshot(reply) => serde_json::to_value(reply),
        };
        let mut value = fields.expect("replies serialize: plain data, string keys");
        add_legacy_keys(&mut value);
        value["ok"] = Value::Bool(true);
        value
    }
}

/// The reply line's object for a refusal.
pub fn error_to_wire(message: &str) -> Value {
    serde_json::json!({"ok": false, "error": message})
}

/// (new key, the first release's key): both are written for this release.
pub const LEGACY_KEYS: &[(&str, &str)] = &[
    ("offset_bytes", "offset"),
    ("length_bytes", "length"),
    ("granularity_bytes", "granularity"),
    ("size_bytes", "size"),
    ("block_size_bytes", "block_size"),
    ("created_unix_seconds", "created_unix"),
    ("checkpoint_count", "checkpoints"),
];

fn add_legacy_keys(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (new, old) in LEGACY_KEYS {
                if let Some(field) = map.get(*new)
                    && !map.contains_key(*old)
                {
                    let field = field.clone();
                    map.insert((*old).to_string(), field);
                }
            }
            map.values_mut().for_each(add_legacy_keys);
        }
        Value::Array(items) => items.iter_mut().for_each(add_legacy_keys),
        _ => {}
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinInfo {
    pub holder: String,
    pub reason: String,
    pub created_unix_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub name: String,
    pub generation: u64,
    pub created_unix_seconds: u64,
    /// Bytes changed in the generation it closed: exact where its fine
    /// record is complete, whole regions elsewhere.
    pub changed_bytes: u64,
    #[serde(default)]
    pub pins: Vec<PinInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointReply {
    pub checkpoint: CheckpointInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointsReply {
    /// Oldest first.
    pub checkpoints: Vec<CheckpointInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinReply {
    pub checkpoint: String,
    pub pin: PinInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReply {
    /// The checkpoint the snapshot shows the disk at.
    pub checkpoint: String,
    pub generation: u64,
    /// The read-only export serving it (`EXPORT@CHECKPOINT`) and a URI
    /// that reaches it on this server.
    pub export: String,
    pub uri: String,
    pub max_store_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtentStatus {
    /// The newest write to it was flushed.
    Saved,
    /// Written, not (yet) flushed.
    Written,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedExtentInfo {
    pub offset_bytes: u64,
    pub length_bytes: u64,
    pub status: ExtentStatus,
    /// Only the written blocks (at `precision_bytes`); false: whole
    /// regions, whose fine record was lost in a crash or never kept.
    pub exact: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesReply {
    pub since: String,
    pub until: Option<String>,
    pub granularity_bytes: u64,
    /// The block size of exact extents.
    pub precision_bytes: u64,
    pub changed_bytes: u64,
    pub extents: Vec<ChangedExtentInfo>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteRange {
    pub offset_bytes: u64,
    pub length_bytes: u64,
}

impl From<(u64, u64)> for ByteRange {
    fn from((offset_bytes, length_bytes): (u64, u64)) -> ByteRange {
        ByteRange {
            offset_bytes,
            length_bytes,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// `+` created, `-` deleted, `R` renamed, `M` modified, `~` in a changed region.
    pub status: String,
    pub path: Option<String>,
    pub paths: Vec<String>,
    pub old_paths: Vec<String>,
    pub inode: u32,
    pub partition: u32,
    pub directory: bool,
    pub size_bytes: u64,
    pub changed_bytes: u64,
    /// Byte ranges within the file.
    pub changed_ranges: Vec<ByteRange>,
    pub content_changed: bool,
    pub selected: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesystemInfo {
    pub partition: u32,
    pub offset_bytes: u64,
    pub block_size_bytes: u64,
    /// Changed metadata bytes by kind (`inode_table`, `journal`, ...).
    pub metadata_bytes: BTreeMap<String, u64>,
    pub unowned_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChangesReply {
    pub since: String,
    pub until: Option<String>,
    pub files: Vec<FileInfo>,
    pub filesystems: Vec<FilesystemInfo>,
    pub copy_set: Vec<ByteRange>,
    pub copy_bytes: u64,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMapInfo {
    pub build_ms: u64,
    pub last_update_us: u64,
    pub last_update_inodes: u64,
    pub attributed_flushes: u64,
    pub unattributed_flushes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub image: PathBuf,
    /// The tracked disk's identity (hex), fixed when its state was made.
    #[serde(default)]
    pub image_id: String,
    pub state_dir: PathBuf,
    pub generation: u64,
    pub granularity_bytes: u64,
    /// Block size of the fine record (equal to the granularity: none kept).
    pub precision_bytes: u64,
    pub size_bytes: u64,
    /// Changed in the current generation.
    pub dirty_bytes: u64,
    pub unsaved_bytes: u64,
    pub journal_bytes: u64,
    pub checkpoint_count: usize,
    pub flush_count: u64,
    pub flush_work_us_p50: f64,
    pub flush_work_us_p99: f64,
    pub flush_work_us_max: f64,
    /// `clean`, or `unclean or first start`.
    pub last_shutdown: String,
    /// Answered with no server running, from a read-only open.
    #[serde(default)]
    pub offline: bool,
    pub warnings: Vec<String>,
    pub journal_failure: Option<String>,
    pub file_map: Option<FileMapInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    pub status: StatusInfo,
    /// The open copy-before-write snapshot of a running server, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotInfo>,
}

/// An open snapshot, as status reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub checkpoint: String,
    pub generation: u64,
    pub export: String,
    /// Why it was dropped, once it was: its reads fail from then on.
    pub broken: Option<String>,
    /// Old contents copied out so far, and the bound.
    pub store_bytes: u64,
    pub max_store_bytes: u64,
    pub regions_copied: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_of_the_first_release_still_parse() {
        let request = Request::parse(
            r#"{"op":"changes","since":"a","until":null,"files":true,"min_size":10,"max_size":null}"#,
        )
        .unwrap();
        assert_eq!(
            request,
            Request::Changes(ChangesRequest {
                since: "a".into(),
                files: true,
                min_size_bytes: Some(10),
                ..ChangesRequest::default()
            })
        );
        assert_eq!(
            Request::parse(r#"{"op":"delete-checkpoint","name":"x"}"#).unwrap(),
            Request::DeleteCheckpoint { name: "x".into() }
        );
    }

    #[test]
    fn bad_requests_get_messages_that_say_what_is_wrong() {
        assert!(Request::parse("nope").unwrap_err().contains("not JSON"));
        let unknown = Request::parse(r#"{"op":"frobnicate"}"#).unwrap_err();
        assert!(unknown.contains("unknown op \"frobnicate\"") && unknown.contains("checkpoints"));
        let missing = Request::parse(r#"{"op":"checkpoint"}"#).unwrap_err();
        assert!(missing.contains("name"), "{missing}");
    }

    #[test]
    fn replies_carry_new_and_legacy_keys() {
        let reply = Reply::Changes(ChangesReply {
            since: "a".into(),
            until: None,
            granularity_bytes: 65536,
            precision_bytes: 4096,
            changed_bytes: 65536,
            extents: vec![ChangedExtentInfo {
                offset_bytes: 131072,
                length_bytes: 65536,
                status: ExtentStatus::Saved,
                exact: false,
            }],
        });
        let wire = reply.to_wire();
        assert_eq!(wire["ok"], true);
        assert_eq!(wire["granularity_bytes"], 65536);
        assert_eq!(wire["granularity"], 65536);
        assert_eq!(wire["extents"][0]["offset_bytes"], 131072);
        assert_eq!(wire["extents"][0]["offset"], 131072);
        assert_eq!(wire["extents"][0]["length"], 65536);
        assert_eq!(wire["extents"][0]["status"], "saved");
        let back: ChangesReply = serde_json::from_value(wire).unwrap();
        let Reply::Changes(sent) = reply else {
            unreachable!()
        };
        assert_eq!(back, sent);
    }

    #[test]
    fn a_done_reply_is_just_ok() {
        assert_eq!(Reply::Done.to_wire(), serde_json::json!({"ok": true}));
        assert_eq!(
            error_to_wire("no"),
            serde_json::json!({"ok": false, "error": "no"})
        );
    }
}
