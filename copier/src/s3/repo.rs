//! A repository in an S3 bucket (`s3://BUCKET/PREFIX`), spoken to with
//! the `object_store` crate (retries with backoff, the usual AWS
//! environment for endpoint, region and credentials, path-style requests
//! for self-hosted services). Its objects, under PREFIX:
//!
//! - `config`: how the others are made (JSON; encryption's wrapped keys);
//! - `packs/XX/PACK`: sealed chunks, one after another (a few MiB each,
//!   so that 64 KiB changes do not become millions of objects);
//! - `index/PACK`: where each chunk of a pack is; written after its pack;
//! - `sessions/DISK/SESSION`: a copy's manifest, written last: the commit;
//! - `locks/ID`: a copy, restore or verify under way (refreshed while it
//!   runs), which prune waits for;
//! - `marks/MARK.packs`, `marks/MARK.locks`: prune's first phase.
//!
//! The calls here are blocking: each runs on the repository's own tokio
//! runtime, and the copier's threads call them as they call files.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::format::{
    CONFIG_FORMAT, ChunkRef, Encryption, INDEX_BYTES_MAX, MANIFEST_BYTES_MAX, Manifest, PackId,
    RepoConfig, decode_index,
};
use super::index_cache::{IndexCache, SEALED_INDEX_BYTES_MAX};
use super::seal::{Keys, SealError, Sealer, random_bytes, read_key_file};
use super::{S3Error, S3Options};

/// The config object, at most (JSON of a few hundred bytes).
const CONFIG_BYTES_MAX: usize = 64 << 10;
/// A lock or mark object, at most.
const SMALL_OBJECT_BYTES_MAX: usize = 256 << 20;
/// Requests in flight when many objects are read at once.
pub const IN_FLIGHT: usize = 16;
pub const AEAD_NAME: &str = "aes-256-gcm";

/// `s3://BUCKET/PREFIX[#SESSION]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Without slashes at either end; may be empty.
    pub prefix: String,
    pub session: Option<String>,
}

impl S3Location {
    pub fn parse(text: &str) -> Result<S3Location, S3Error> {
        let refuse = |reason: &str| S3Error::Location {
            location: text.to_string(),
            reason: reason.to_string(),
        };
        let rest = text
            .strip_prefix("s3://")
            .ok_or_else(|| refuse("it does not start with s3://"))?;
        let (rest, session) = match rest.split_once('#') {
            Some((rest, session)) if !session.is_empty() => (rest, Some(session.to_string())),
            Some((rest, _)) => (rest, None),
            None => (rest, None),
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(refuse("it names no bucket"));
        }
        let prefix = prefix.trim_matches('/').to_string();
        if prefix.split('/').any(|part| part == "." || part == "..") {
            return Err(refuse("its prefix has . or .. parts"));
        }
        Ok(S3Location {
            bucket: bucket.to_string(),
            prefix,
            session,
        })
    }

    /// `s3://BUCKET/PREFIX`, without a session.
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// An object as a listing shows it.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Its key below the repository's prefix.
    pub key: String,
    pub size_bytes: u64,
    /// The server's clock, in seconds since 1970.
    pub modified_unix: i64,
}

/// An open repository.
pub struct Repository {
    pub url: String,
    /// Taken only by `drop`.
    runtime: Option<tokio::runtime::Runtime>,
    store: Arc<AmazonS3>,
    prefix: String,
    pub sealer: Arc<Sealer>,
    pub config: RepoConfig,
    index_cache: Option<IndexCache>,
}

impl Drop for Repository {
    /// A repository behind a served view is dropped inside the server's
    /// own runtime when its last connection goes, where waiting for a
    /// runtime to shut down panics: there it is left to stop by itself.
    fn drop(&mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            runtime.shutdown_background();
        }
    }
}

/// Where a copy's pack indexes came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexReads {
    /// Read from the local cache (and checked again).
    pub cached: u64,
    /// Read from the service.
    pub fetched: u64,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Repository {
    /// Opens the repository at `location`; `create`: make it (its config)
    /// when the prefix holds none yet.
    pub fn open(
        location: &S3Location,
        options: &S3Options,
        create: bool,
    ) -> Result<Repository, S3Error> {
        let url = location.url();
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&location.bucket)
            .with_virtual_hosted_style_request(false);
        let endpoint = options
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        if let Some(endpoint) = &endpoint {
            // A plain-HTTP endpoint given by the user is one they chose
            // (a service on loopback or a private network).
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(region) = &options.region {
            builder = builder.with_region(region);
        }
        // A signed payload costs a SHA-256 of every byte on both sides.
        // Every object carries its own digest or AEAD tag, checked on each
        // read; over TLS, or for an encrypted repository (whose tags no
        // one can forge), the payload needs no signature of its own.
        // Over plain HTTP without encryption, it keeps one.
        let plain_http = endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        builder = builder.with_unsigned_payload(!plain_http || options.key_file.is_some());
        let store = builder.build().map_err(|source| S3Error::Store {
            what: format!("setting up {url}"),
            source,
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .thread_name("blockwatch-s3")
            .enable_all()
            .build()
            .map_err(|source| S3Error::Runtime { source })?;
        let mut repo = Repository {
            url,
            runtime: Some(runtime),
            store: Arc::new(store),
            prefix: location.prefix.clone(),
            sealer: Arc::new(Sealer::new(None)),
            config: RepoConfig {
                format: CONFIG_FORMAT,
                repository_id: String::new(),
                created_unix: 0,
                encryption: None,
            },
            index_cache: None,
        };
        let user_key = match &options.key_file {
            Some(path) => Some(read_key_file(path).map_err(|reason| S3Error::KeyFile {
                path: path.clone(),
                reason,
            })?),
            None => None,
        };
        let config = match repo.get_optional("config", CONFIG_BYTES_MAX)? {
            Some(bytes) => serde_json::from_slice::<RepoConfig>(&bytes).map_err(|error| {
                repo.damaged("config", format!("it is not a repository config: {error}"))
            })?,
            None if create => repo.create_config(user_key.as_ref())?,
            None => {
                return Err(S3Error::NoRepository {
                    url: repo.url.clone(),
                });
            }
        };
        if config.format != CONFIG_FORMAT {
            return Err(repo.damaged(
                "config",
                format!(
                    "it is of format {}, this blockwatch reads {CONFIG_FORMAT}",
                    config.format
                ),
            ));
        }
        let keys = repo.open_keys(&config, user_key, options.key_file.as_ref())?;
        repo.sealer = Arc::new(Sealer::new(keys));
        repo.index_cache = options
            .index_cache
            .as_deref()
            .and_then(|root| IndexCache::open(root, &config.repository_id));
        repo.config = config;
        Ok(repo)
    }

    fn create_config(&self, user_key: Option<&[u8; 32]>) -> Result<RepoConfig, S3Error> {
        let encryption = user_key.map(|user_key| Encryption {
            aead: AEAD_NAME.to_string(),
            wrapped_keys: crate::copy::hex_id(&Sealer::wrap(user_key, &random_bytes::<64>())),
        });
        let config = RepoConfig {
            format: CONFIG_FORMAT,
            repository_id: crate::copy::hex_id(&random_bytes::<16>()),
            created_unix: crate::copy::unix_seconds(),
            encryption,
        };
        let bytes = serde_json::to_vec_pretty(&config).expect("a config serializes");
        self.put("config", bytes)?;
        tracing::info!(url = %self.url, encrypted = user_key.is_some(), "created a repository");
        Ok(config)
    }

    fn open_keys(
        &self,
        config: &RepoConfig,
        user_key: Option<[u8; 32]>,
        key_file: Option<&PathBuf>,
    ) -> Result<Option<Keys>, S3Error> {
        match (&config.encryption, user_key) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(S3Error::NotEncrypted {
                url: self.url.clone(),
            }),
            (Some(_), None) => Err(S3Error::NeedsKey {
                url: self.url.clone(),
            }),
            (Some(encryption), Some(user_key)) => {
                if encryption.aead != AEAD_NAME {
                    return Err(self.damaged(
                        "config",
                        format!("it names cipher {:?}, not {AEAD_NAME}", encryption.aead),
                    ));
                }
                let wrapped = super::format::parse_hex_bytes(&encryption.wrapped_keys)
                    .ok_or_else(|| self.damaged("config", "its wrapped keys are not hex"))?;
                let material =
                    Sealer::unwrap(&user_key, &wrapped).ok_or_else(|| S3Error::WrongKey {
                        url: self.url.clone(),
                        key_file: key_file.cloned().unwrap_or_default(),
                    })?;
                Ok(Some(Keys::from_material(&material)))
            }
        }
    }

    pub fn damaged(&self, key: &str, reason: impl Into<String>) -> S3Error {
        S3Error::Damaged {
            object: format!("{}/{key}", self.url),
            reason: reason.into(),
        }
    }

    fn path(&self, key: &str) -> StorePath {
        object_path(&self.prefix, key)
    }

    fn store_error(&self, what: String) -> impl FnOnce(object_store::Error) -> S3Error {
        move |source| S3Error::Store { what, source }
    }

    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime().block_on(future)
    }

    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime().spawn(future)
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }

    /// The runtime's handle, for work done where no `Repository` is.
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.runtime().handle().clone()
    }

    /// A handle for tasks that put and get on their own.
    pub fn client(&self) -> Client {
        Client {
            store: self.store.clone(),
            prefix: self.prefix.clone(),
            url: self.url.clone(),
        }
    }

    pub fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), S3Error> {
        self.block_on(self.client().put(key, bytes))
    }

    pub fn get(&self, key: &str, limit_bytes: usize) -> Result<Vec<u8>, S3Error> {
        self.get_optional(key, limit_bytes)?
            .ok_or_else(|| self.damaged(key, "it is missing"))
    }

    pub fn get_optional(&self, key: &str, limit_bytes: usize) -> Result<Option<Vec<u8>>, S3Error> {
        self.block_on(self.client().get_optional(key, limit_bytes))
    }

    pub fn delete(&self, key: &str) -> Result<(), S3Error> {
        self.block_on(self.client().delete(key))
    }

    /// Every object under `dir` (a key prefix ending in `/`).
    pub fn list(&self, dir: &str) -> Result<Vec<Listed>, S3Error> {
        let base = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let path = self.path(dir.trim_end_matches('/'));
        let listed: Vec<_> = self
            .block_on(self.store.list(Some(&path)).try_collect::<Vec<_>>())
            .map_err(self.store_error(format!("listing {}/{dir}", self.url)))?;
        let mut out: Vec<Listed> = listed
            .into_iter()
            .filter_map(|meta| {
                let key = meta.location.as_ref().strip_prefix(&base)?.to_string();
                Some(Listed {
                    key,
                    size_bytes: meta.size,
                    modified_unix: meta.last_modified.timestamp(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Opens an object this repository sealed as `kind`.
    pub fn open_sealed(
        &self,
        key: &str,
        kind: &[u8],
        limit_bytes: usize,
    ) -> Result<Vec<u8>, S3Error> {
        let sealed = self.get(key, limit_bytes.saturating_add(1024))?;
        self.sealer
            .open(kind, &sealed, limit_bytes)
            .map_err(|error| sealed_error(self, key, error))
    }

    /// The manifest at `sessions/DISK/SESSION`.
    pub fn manifest(&self, key: &str) -> Result<Manifest, S3Error> {
        let plain = self.open_sealed(key, b"manifest", MANIFEST_BYTES_MAX)?;
        Manifest::decode(&plain).map_err(|error| self.damaged(key, error.0))
    }

    /// Every session of the repository, oldest first per disk.
    pub fn sessions(&self) -> Result<Vec<SessionKey>, S3Error> {
        Ok(self
            .list("sessions/")?
            .into_iter()
            .filter_map(|listed| SessionKey::parse(&listed.key))
            .collect())
    }

    /// Every chunk the repository's pack indexes name, but those in packs
    /// a prune marked for deletion (`excluded`): a copy must not make a
    /// new session need them. Indexes in the local cache (`S3Options::
    /// index_cache`) that still open are not read from the service; what
    /// is read is cached.
    pub fn chunk_index(
        &self,
        excluded: &std::collections::HashSet<PackId>,
    ) -> Result<(HashMap<super::seal::ChunkId, ChunkRef>, IndexReads), S3Error> {
        let listed: std::collections::HashSet<PackId> = self
            .list("index/")?
            .iter()
            .filter_map(|listed| PackId::parse(listed.key.strip_prefix("index/")?))
            .collect();
        if let Some(cache) = &self.index_cache {
            cache.retain(&listed);
        }
        let packs: Vec<PackId> = listed
            .into_iter()
            .filter(|pack| !excluded.contains(pack))
            .collect();
        let mut reads = IndexReads::default();
        let mut indexes = Vec::new();
        let mut fetch = Vec::new();
        for pack in packs {
            let cached = self.index_cache.as_ref().and_then(|cache| {
                let sealed = cache.get(&pack)?;
                let opened = self.open_index(pack, &sealed);
                if opened.is_err() {
                    tracing::warn!(pack = %pack.hex(), "a cached pack index does not open: reading it again");
                    cache.remove(&pack);
                }
                opened.ok()
            });
            match cached {
                Some(entries) => {
                    reads.cached += 1;
                    indexes.push(Ok(entries));
                }
                None => fetch.push(pack),
            }
        }
        reads.fetched = fetch.len() as u64;
        let client = self.client();
        // Each pack with its sealed index, None when it went meanwhile.
        type Fetched = Result<(PackId, Option<Vec<u8>>), S3Error>;
        let fetched: Vec<Fetched> = self.block_on(
            futures::stream::iter(fetch.into_iter().map(|pack| {
                let client = client.clone();
                async move {
                    let key = format!("index/{}", pack.hex());
                    let sealed = client.get_optional(&key, SEALED_INDEX_BYTES_MAX).await?;
                    Ok((pack, sealed))
                }
            }))
            .buffer_unordered(IN_FLIGHT)
            .collect(),
        );
        for result in fetched {
            indexes.push(match result {
                // Swept by a prune since the listing.
                Ok((_, None)) => Ok(Vec::new()),
                Ok((pack, Some(sealed))) => {
                    let opened = self.open_index(pack, &sealed);
                    if let (Ok(_), Some(cache)) = (&opened, &self.index_cache) {
                        cache.put(&pack, &sealed);
                    }
                    opened
                }
                Err(error) => Err(error),
            });
        }
        let mut chunks = HashMap::new();
        for index in indexes {
            match index {
                Ok(entries) => {
                    for entry in entries {
                        chunks.insert(entry.id, entry);
                    }
                }
                // A damaged index only costs deduplication: its chunks
                // are uploaded again.
                Err(S3Error::Damaged { object, reason }) => {
                    tracing::warn!(%object, %reason, "ignoring a damaged pack index");
                }
                Err(error) => return Err(error),
            }
        }
        tracing::info!(
            cached = reads.cached,
            fetched = reads.fetched,
            "pack indexes read"
        );
        Ok((chunks, reads))
    }

    /// Keeps a sealed index this machine made in the local cache.
    pub(crate) fn cache_index(&self, pack: &PackId, sealed: &[u8]) {
        if let Some(cache) = &self.index_cache {
            cache.put(pack, sealed);
        }
    }

    /// The entries of `pack`'s sealed index.
    fn open_index(&self, pack: PackId, sealed: &[u8]) -> Result<Vec<ChunkRef>, S3Error> {
        let key = format!("index/{}", pack.hex());
        let plain = self
            .sealer
            .open(b"index", sealed, INDEX_BYTES_MAX)
            .map_err(|error| sealed_error(self, &key, error))?;
        decode_index(pack, &plain).map_err(|error| self.damaged(&key, error.0))
    }

    pub fn small_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T, S3Error> {
        let bytes = self.open_sealed(key, b"record", SMALL_OBJECT_BYTES_MAX)?;
        serde_json::from_slice(&bytes).map_err(|error| self.damaged(key, error.to_string()))
    }

    pub fn put_small_json<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<(), S3Error> {
        let bytes = serde_json::to_vec(value).expect("a record serializes");
        self.put(key, self.sealer.seal(b"record", &bytes))
    }
}

fn sealed_error(repo: &Repository, key: &str, error: SealError) -> S3Error {
    repo.client().sealed_error(key, error)
}

/// The store's path of `key` under the repository's prefix.
fn object_path(prefix: &str, key: &str) -> StorePath {
    if prefix.is_empty() {
        StorePath::from(key)
    } else {
        StorePath::from(format!("{prefix}/{key}"))
    }
}

/// `sessions/DISK/SESSION`, parsed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SessionKey {
    pub disk: String,
    pub session: String,
}

impl SessionKey {
    fn parse(key: &str) -> Option<SessionKey> {
        let rest = key.strip_prefix("sessions/")?;
        let (disk, session) = rest.split_once('/')?;
        (!disk.is_empty() && !session.is_empty() && !session.contains('/')).then(|| SessionKey {
            disk: disk.to_string(),
            session: session.to_string(),
        })
    }

    pub fn key(&self) -> String {
        format!("sessions/{}/{}", self.disk, self.session)
    }
}

/// The name a disk's sessions are kept under: its image id when that is
/// hex (a tracked disk), a digest of its id otherwise (`nbd:URI`).
pub fn disk_key(source_id: &str) -> String {
    if !source_id.is_empty()
        && source_id.len() <= 64
        && source_id.bytes().all(|b| b.is_ascii_hexdigit())
    {
        source_id.to_ascii_lowercase()
    } else {
        format!(
            "x{}",
            &crate::copy::hex_id(blake3::hash(source_id.as_bytes()).as_bytes())[..32]
        )
    }
}

/// A session id: the time to the microsecond (so a disk's sessions sort
/// in the order they were made), then 4 random bytes.
pub fn new_session_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = now.as_secs();
    let (year, month, day) = super::prune::civil_from_days((seconds / 86400) as i64);
    let in_day = seconds % 86400;
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}.{:06}Z-{}",
        in_day / 3600,
        in_day / 60 % 60,
        in_day % 60,
        now.subsec_micros(),
        crate::copy::hex_id(&random_bytes::<4>())
    )
}

/// What tasks of the repository's runtime put and get with.
#[derive(Clone)]
pub struct Client {
    store: Arc<AmazonS3>,
    prefix: String,
    pub url: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("url", &self.url).finish()
    }
}

impl Client {
    fn path(&self, key: &str) -> StorePath {
        object_path(&self.prefix, key)
    }

    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), S3Error> {
        self.store
            .put(&self.path(key), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|source| S3Error::Store {
                what: format!("uploading {}/{key}", self.url),
                source,
            })
    }

    /// Deletes `key`; one already gone is no error.
    pub async fn delete(&self, key: &str) -> Result<(), S3Error> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(S3Error::Store {
                what: format!("deleting {}/{key}", self.url),
                source,
            }),
        }
    }

    pub async fn get_optional(
        &self,
        key: &str,
        limit_bytes: usize,
    ) -> Result<Option<Vec<u8>>, S3Error> {
        let what = || format!("reading {}/{key}", self.url);
        let result = match self.store.get(&self.path(key)).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(source) => {
                return Err(S3Error::Store {
                    what: what(),
                    source,
                });
            }
        };
        if result.meta.size > limit_bytes as u64 {
            return Err(S3Error::Damaged {
                object: format!("{}/{key}", self.url),
                reason: format!(
                    "it is {} bytes, more than the {limit_bytes} such an object may be",
                    result.meta.size
                ),
            });
        }
        let bytes = result.bytes().await.map_err(|source| S3Error::Store {
            what: what(),
            source,
        })?;
        Ok(Some(bytes.to_vec()))
    }

    /// Bytes `range` of an object (a chunk in its pack).
    pub async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<u8>, S3Error> {
        let expected = range.end - range.start;
        let bytes = self
            .store
            .get_range(&self.path(key), range)
            .await
            .map_err(|source| S3Error::Store {
                what: format!("reading {}/{key}", self.url),
                source,
            })?;
        if bytes.len() as u64 != expected {
            return Err(S3Error::Damaged {
                object: format!("{}/{key}", self.url),
                reason: format!("it returned {} bytes of {expected} asked", bytes.len()),
            });
        }
        Ok(bytes.to_vec())
    }

    pub fn sealed_error(&self, key: &str, error: SealError) -> S3Error {
        match error {
            SealError::NeedsKey => S3Error::NeedsKey {
                url: self.url.clone(),
            },
            other => S3Error::Damaged {
                object: format!("{}/{key}", self.url),
                reason: other.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_with_and_without_prefix_and_session() {
        let location = S3Location::parse("s3://bucket/a/b/#20261202T000000Z-1").unwrap();
        assert_eq!(location.bucket, "bucket");
        assert_eq!(location.prefix, "a/b");
        assert_eq!(location.session.as_deref(), Some("20261202T000000Z-1"));
        assert_eq!(location.url(), "s3://bucket/a/b");
        let bare = S3Location::parse("s3://bucket").unwrap();
        assert_eq!((bare.prefix.as_str(), bare.session), ("", None));
        for bad in ["s3://", "s3:///x", "http://bucket", "s3://b/../x"] {
            assert!(S3Location::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn disk_keys_are_image_ids_or_digests() {
        assert_eq!(disk_key("ABcd01"), "abcd01");
        let key = disk_key("nbd:nbd+unix:///?socket=/tmp/x");
        assert!(key.starts_with('x') && key.len() == 33, "{key}");
        assert_eq!(
            SessionKey::parse("sessions/abcd/2026-1"),
            Some(SessionKey {
                disk: "abcd".into(),
                session: "2026-1".into()
            })
        );
        assert_eq!(SessionKey::parse("sessions/abcd"), None);
    }
}
