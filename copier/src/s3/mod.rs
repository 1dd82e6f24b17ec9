//! Copies to S3-compatible object storage (`s3://BUCKET/PREFIX`): Ceph
//! RGW, MinIO, Garage, AWS S3. A prefix is a repository of any number of
//! disks' sessions, their data cut into chunks stored once under the hash
//! of their contents (deduplicated across sessions and disks), packed a
//! few MiB to an object, compressed, and optionally encrypted on this
//! machine (docs/s3.md has the layout byte by byte).
//!
//! Files and what each owns:
//! - `seal.rs`: zstd and AES-256-GCM (or a blake3 digest) on every object,
//!   chunk ids, key files;
//! - `format.rs`: the config, pack indexes and manifests as bytes, with
//!   their limits and checks;
//! - `repo.rs`: the bucket (object_store), its layout, listings;
//! - `index_cache.rs`: pack indexes kept on this machine, so that a copy
//!   reads only the new ones;
//! - `lock.rs`: the locks of copies, restores, verifies and prunes;
//! - `target.rs`: the copy target (chunks, packs, the manifest commit);
//! - `restore.rs`: restore, verify and the list of sessions;
//! - `prune.rs`: retention, mark and sweep.

pub(crate) mod format;
pub mod index_cache;
pub(crate) mod lock;
mod prune;
pub(crate) mod repo;
pub(crate) mod restore;
pub(crate) mod seal;
mod target;

use std::path::PathBuf;

pub use prune::{PruneSummary, Retention, civil_from_days, prune};
pub use repo::{IndexReads, Repository, S3Location};
pub use restore::{
    Damage, S3RestoreSummary, S3VerifyReport, SessionRow, list_sessions, restore, verify,
};
pub use target::{PACK_BYTES_TARGET, S3Target, s3_holder};

/// How to reach and open a repository; credentials come from the usual
/// AWS environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`, instance metadata), never from the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// The service's URL (default: `AWS_ENDPOINT_URL`, else AWS).
    pub endpoint: Option<String>,
    /// Default: `AWS_REGION` / `AWS_DEFAULT_REGION`, else us-east-1.
    pub region: Option<String>,
    /// The key file of an encrypted repository (`--encrypt`); a new
    /// repository made with one is encrypted.
    pub key_file: Option<PathBuf>,
    /// Where pack indexes read from the service are kept for later copies
    /// (`index_cache::default_root()` by default); None reads every index
    /// from the service at every copy.
    pub index_cache: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("{location} is not an object storage location: {reason} (s3://BUCKET/PREFIX)")]
    Location { location: String, reason: String },
    #[error("{what}")]
    Store {
        what: String,
        source: object_store::Error,
    },
    #[error("starting the object storage client")]
    Runtime { source: std::io::Error },
    #[error("key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error("{url} holds no blockwatch repository (no config object): copy to it first")]
    NoRepository { url: String },
    #[error("{url} is encrypted: give its key file with --encrypt KEYFILE")]
    NeedsKey { url: String },
    #[error("{url} is not encrypted: copy without --encrypt, or to another prefix")]
    NotEncrypted { url: String },
    #[error("the key in {key_file} does not open {url} (a wrong key file)")]
    WrongKey { url: String, key_file: PathBuf },
    #[error("{object} is damaged: {reason}")]
    Damaged { object: String, reason: String },
    #[error("{url}: {reason}")]
    Refused { url: String, reason: String },
    #[error(transparent)]
    Restore(crate::tape::RestoreError),
    #[error("{source}; {target} was partly restored: restore again")]
    PartlyRestored {
        target: String,
        source: Box<S3Error>,
    },
}
