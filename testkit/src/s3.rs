//! S3 servers on loopback for the object-storage target's tests, both
//! reached with the same fixed credentials and path-style requests:
//!
//! - `S3Server::s3s_fs`: s3s-fs in this process, on its own tokio runtime
//!   in a background thread, checking every request's signature. Its
//!   objects are plain files a test can read and corrupt (layout below).
//! - `S3Server::moto`: `moto_server` as a child process, a second and
//!   independent implementation (it keeps everything in memory and does
//!   not check signatures).
//!
//! s3s-fs layout under `root`, as s3s-fs 0.14 writes it:
//! - `root/BUCKET/` is the bucket, made by `create_bucket` (a plain
//!   `mkdir`, which is all s3s-fs's own CreateBucket does).
//! - `root/BUCKET/KEY` holds the object's bytes and nothing else; a `/`
//!   in the key is a subdirectory. A multipart upload becomes one such
//!   file when it completes. Deleting an object leaves its now empty
//!   parent directories behind.
//! - Everything else s3s-fs keeps is a dotfile directly in `root`, never
//!   inside a bucket: `.bucket-B.object-K.internal.json` (the ETag and
//!   checksums recorded at upload, B and K unpadded URL-safe base64),
//!   `.bucket-B.object-K.metadata.json` (content type, user metadata),
//!   `.upload-ID.json` and `.upload_id-ID.part-N` (a multipart upload in
//!   progress) and `.tmp.N.internal.part` (a write not yet renamed into
//!   place). Deleting an object leaves its two JSON files behind.
//!
//! s3s-fs answers a GET with the file's bytes as they are now and the
//! ETag recorded at upload: a test that corrupts `root/BUCKET/KEY` is seen
//! by nothing but a client that checks the bytes itself.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnectionBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use tokio::sync::oneshot;

use crate::files::create_file;
use crate::process::status_text;
use crate::tools::find_in_path;

/// The one access key both servers are reached with. s3s-fs rejects any
/// other; moto accepts anything.
pub const S3_ACCESS_KEY_ID: &str = "blockwatch-test";
pub const S3_SECRET_ACCESS_KEY: &str = "blockwatch-test-secret";
pub const S3_REGION: &str = "us-east-1";

/// How long moto_server may take to answer HTTP (it imports all of moto
/// first) and how long a server may take to stop. These bound the waiting
/// only; no test asserts on timing.
const MOTO_START_LIMIT: Duration = Duration::from_secs(60);
const SERVER_STOP_LIMIT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// moto_server is handed a port that was free a moment before; another
/// test can take it in between, and then moto is started again.
const MOTO_PORT_ATTEMPTS: u32 = 3;
/// Bounds for the plain HTTP requests made to moto.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
const HTTP_RESPONSE_MAX_BYTES: u64 = 16 * 1024 * 1024;
const LIST_PAGES_MAX: usize = 1000;
/// Connections s3s-fs serves at once; past this, accepting waits.
const S3S_FS_CONNECTIONS_MAX: usize = 256;

/// An S3 server listening on 127.0.0.1, stopped on drop.
#[derive(Debug)]
pub struct S3Server {
    address: SocketAddr,
    backend: Backend,
    /// `XDG_CACHE_HOME` of the clients given `env()`: each server's own,
    /// so that tests neither share caches nor write the user's.
    client_cache: PathBuf,
}

#[derive(Debug)]
enum Backend {
    S3sFs(InProcess),
    Moto(#[expect(dead_code, reason = "held for its Drop, which stops moto_server")] MotoProcess),
}

/// s3s-fs serving on a runtime of its own in a background thread.
#[derive(Debug)]
struct InProcess {
    root: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct MotoProcess {
    child: Child,
}

impl S3Server {
    /// s3s-fs storing objects under `root` (created if missing), on a
    /// free port of 127.0.0.1. It accepts connections once this returns.
    pub fn s3s_fs(root: &Path) -> S3Server {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|e| panic!("cannot bind a port on 127.0.0.1: {e}"));
        S3Server::s3s_fs_on(root, listener)
    }

    /// s3s-fs storing objects under `root` (created if missing), serving
    /// on `listener` (the `s3s-fs-serve` binary binds the address it was
    /// given).
    pub fn s3s_fs_on(root: &Path, listener: TcpListener) -> S3Server {
        std::fs::create_dir_all(root)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
        let filesystem = s3s_fs::FileSystem::new(root)
            .unwrap_or_else(|e| panic!("s3s-fs cannot use {}: {e:?}", root.display()));
        let mut service = S3ServiceBuilder::new(filesystem);
        service.set_auth(SimpleAuth::from_single(
            S3_ACCESS_KEY_ID,
            S3_SECRET_ACCESS_KEY,
        ));
        let service = service.build();
        let address = listener.local_addr().expect("a bound listener's address");
        listener
            .set_nonblocking(true)
            .expect("cannot make the listener non-blocking");
        let (shutdown, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("s3s-fs {address}"))
            .spawn(move || serve_s3s_fs(listener, service, stopped))
            .expect("cannot start the s3s-fs thread");
        S3Server {
            address,
            client_cache: root.with_extension("client-cache"),
            backend: Backend::S3sFs(InProcess {
                root: root.to_path_buf(),
                shutdown: Some(shutdown),
                thread: Some(thread),
            }),
        }
    }

    /// `moto_server` on a free port of 127.0.0.1, its output in
    /// `dir/moto_server.log`; returns once it answers HTTP.
    pub fn moto(dir: &Path) -> S3Server {
        let program = find_in_path("moto_server").unwrap_or_else(|| {
            panic!(
                "moto_server is not installed; these tests need it: \
                 python3 -m pip install 'moto[server]' (scripts/test installs it)"
            )
        });
        let log = dir.join("moto_server.log");
        for _ in 0..MOTO_PORT_ATTEMPTS {
            let address = free_address();
            let log_file = create_file(&log);
            let child = Command::new(&program)
                .args(["-H", "127.0.0.1", "-p", &address.port().to_string()])
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("log file"))
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
            let moto = MotoProcess { child };
            match moto.wait_until_answering(address, &log) {
                Ok(moto) => {
                    return S3Server {
                        address,
                        backend: Backend::Moto(moto),
                        client_cache: dir.join("client-cache"),
                    };
                }
                Err(output) if output.contains("Address already in use") => continue,
                Err(output) => panic!("moto_server on {address} failed to start\n{output}"),
            }
        }
        panic!("moto_server found no free port in {MOTO_PORT_ATTEMPTS} attempts")
    }

    /// "http://127.0.0.1:PORT", the endpoint clients are given.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The environment a client built by object_store's
    /// `AmazonS3Builder::from_env()` needs to reach this server, and an
    /// `XDG_CACHE_HOME` of this server's own for blockwatch's index cache.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint().as_str()),
            ("AWS_REGION", S3_REGION),
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY_ID),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_ACCESS_KEY),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false"),
            (
                "XDG_CACHE_HOME",
                self.client_cache.to_string_lossy().as_ref(),
            ),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
    }

    /// The `XDG_CACHE_HOME` that `env()` gives clients.
    pub fn client_cache(&self) -> &Path {
        &self.client_cache
    }

    /// Creates an empty bucket: a directory for s3s-fs (what its own
    /// CreateBucket makes), an unsigned `PUT /name` for moto.
    pub fn create_bucket(&self, name: &str) {
        // s3s-fs would make any directory, and then refuse every request
        // naming it: fail here, with the rule it broke.
        assert!(
            is_bucket_name(name),
            "{name:?} is not an S3 bucket name: 3 to 63 lowercase letters, digits, '-' \
             and '.', starting and ending with a letter or digit"
        );
        match &self.backend {
            Backend::S3sFs(server) => {
                let path = server.root.join(name);
                std::fs::create_dir(&path).unwrap_or_else(|e| {
                    panic!("cannot create bucket {name} at {}: {e}", path.display())
                });
            }
            Backend::Moto(_) => {
                let response = http_request(self.address, "PUT", &format!("/{name}"))
                    .unwrap_or_else(|e| panic!("cannot create bucket {name} in moto: {e}"));
                response.expect_success(&format!("creating bucket {name} in moto"));
            }
        }
    }

    /// The keys of every object in `bucket`, sorted: the files under
    /// `root/bucket` for s3s-fs, ListObjectsV2 for moto.
    pub fn object_keys(&self, bucket: &str) -> Vec<String> {
        let mut keys = match &self.backend {
            Backend::S3sFs(server) => files_under(&server.root.join(bucket)),
            Backend::Moto(_) => self.list_objects_v2(bucket),
        };
        keys.sort();
        keys
    }

    /// Where s3s-fs keeps the bytes of `bucket`/`key`, for a test that
    /// reads or corrupts them; panics for moto, which keeps them in memory.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        match &self.backend {
            Backend::S3sFs(server) => server.root.join(bucket).join(key),
            Backend::Moto(_) => panic!("moto keeps objects in memory, not in files"),
        }
    }

    fn list_objects_v2(&self, bucket: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut continuation: Option<String> = None;
        for _ in 0..LIST_PAGES_MAX {
            let mut target = format!("/{bucket}?list-type=2");
            if let Some(token) = &continuation {
                target.push_str("&continuation-token=");
                target.push_str(&percent_encode(token));
            }
            let response = http_request(self.address, "GET", &target)
                .unwrap_or_else(|e| panic!("cannot list bucket {bucket} in moto: {e}"));
            let body = response.expect_success(&format!("listing bucket {bucket} in moto"));
            keys.extend(xml_elements(&body, "Key"));
            continuation = xml_elements(&body, "NextContinuationToken").pop();
            let truncated = xml_elements(&body, "IsTruncated").first() == Some(&"true".into());
            if !truncated || continuation.is_none() {
                return keys;
            }
        }
        panic!("listing bucket {bucket} in moto took more than {LIST_PAGES_MAX} pages")
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            // A server thread that panicked already printed why; a test
            // that still passed did not depend on it.
            let _ = thread.join();
        }
    }
}

impl Drop for MotoProcess {
    fn drop(&mut self) {
        // moto keeps nothing on disk, so there is nothing to let it finish.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl MotoProcess {
    /// Returns the process once it answers HTTP on `address`, or what it
    /// printed when it exits first (or does not answer in time).
    fn wait_until_answering(mut self, address: SocketAddr, log: &Path) -> Result<Self, String> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("cannot poll moto_server") {
                return Err(format!(
                    "it exited with {}\n{}",
                    status_text(status),
                    moto_output(log)
                ));
            }
            if http_request(address, "GET", "/").is_ok() {
                return Ok(self);
            }
            if started.elapsed() > MOTO_START_LIMIT {
                return Err(format!(
                    "it did not answer within {MOTO_START_LIMIT:?}\n{}",
                    moto_output(log)
                ));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

fn moto_output(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// The body of the s3s-fs thread: accepts until told to stop, then gives
/// the connections still open `SERVER_STOP_LIMIT` to end.
fn serve_s3s_fs(listener: TcpListener, service: S3Service, stop: oneshot::Receiver<()>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("s3s-fs")
        .enable_all()
        .build()
        .expect("cannot start a tokio runtime for s3s-fs");
    runtime.block_on(accept_until_stopped(listener, service, stop));
    runtime.shutdown_timeout(SERVER_STOP_LIMIT);
}

async fn accept_until_stopped(
    listener: TcpListener,
    service: S3Service,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener)
        .expect("cannot hand the listener to the s3s-fs runtime");
    let connections = std::sync::Arc::new(tokio::sync::Semaphore::new(S3S_FS_CONNECTIONS_MAX));
    let http = ConnectionBuilder::new(TokioExecutor::new());
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("never closed"),
            _ = &mut stop => return,
        };
        let socket = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(e) => {
                    // EMFILE and the like pass; retrying at once would spin.
                    eprintln!("s3s-fs: cannot accept a connection: {e}");
                    tokio::time::sleep(POLL_INTERVAL).await;
                    continue;
                }
            },
            _ = &mut stop => return,
        };
        let connection = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        tokio::spawn(async move {
            // A client that goes away mid-request is not the server's error.
            let _ = connection.await;
            drop(permit);
        });
    }
}

/// S3's bucket naming rules, short of the rarer ones (no "..", not an IP
/// address) that no test comes near.
fn is_bucket_name(name: &str) -> bool {
    let alphanumeric = |byte: u8| byte.is_ascii_lowercase() || byte.is_ascii_digit();
    let bytes = name.as_bytes();
    (3..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|&byte| alphanumeric(byte) || byte == b'-' || byte == b'.')
        && alphanumeric(bytes[0])
        && alphanumeric(bytes[bytes.len() - 1])
}

/// A port of 127.0.0.1 that nothing listens on right now.
fn free_address() -> SocketAddr {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .unwrap_or_else(|e| panic!("cannot find a free port on 127.0.0.1: {e}"))
}

/// The keys of the files under `bucket_dir`, `/` between directories.
fn files_under(bucket_dir: &Path) -> Vec<String> {
    let mut keys = Vec::new();
    let mut pending = vec![bucket_dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let relative = path.strip_prefix(bucket_dir).expect("under the bucket");
            let parts: Vec<_> = relative
                .components()
                .map(|part| part.as_os_str().to_string_lossy().into_owned())
                .collect();
            keys.push(parts.join("/"));
        }
    }
    keys
}

#[derive(Debug)]
struct HttpResponse {
    status: u16,
    head: String,
    body: String,
}

impl HttpResponse {
    fn expect_success(self, what: &str) -> String {
        if !(200..300).contains(&self.status) {
            panic!("{what} failed\n{}\n\n{}", self.head, self.body);
        }
        self.body
    }
}

/// An unsigned HTTP/1.0 request with an empty body, so that the server
/// ends the response by closing the connection (no chunked encoding).
fn http_request(address: SocketAddr, method: &str, target: &str) -> std::io::Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&address, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        stream,
        "{method} {target} HTTP/1.0\r\nHost: {address}\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream
        .take(HTTP_RESPONSE_MAX_BYTES)
        .read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let invalid = || std::io::Error::other(format!("not an HTTP response: {response:?}"));
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(invalid)?;
    let status = head
        .strip_prefix("HTTP/")
        .and_then(|rest| rest.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(invalid)?;
    Ok(HttpResponse {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

/// The text of every `<name>` element in `xml`, entities decoded. Enough
/// for S3's flat list responses, where the names asked for never nest.
fn xml_elements(xml: &str, name: &str) -> Vec<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let mut found = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after_open = &rest[start + open.len()..];
        let Some(end) = after_open.find(&close) else {
            break;
        };
        found.push(xml_unescape(&after_open[..end]));
        rest = &after_open[end + close.len()..];
    }
    found
}

fn xml_unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// `text` as a URL query value: everything but RFC 3986's unreserved
/// characters percent-encoded.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_elements_decode_entities_and_skip_other_elements() {
        let xml = "<ListBucketResult><IsTruncated>false</IsTruncated>\
                   <Contents><Key>a/b</Key><Size>1</Size></Contents>\
                   <Contents><Key>x &amp; y&lt;1&gt;</Key></Contents>\
                   <CommonPrefixes><Prefix>p/</Prefix></CommonPrefixes></ListBucketResult>";
        let cases: &[(&str, &[&str])] = &[
            ("Key", &["a/b", "x & y<1>"]),
            ("IsTruncated", &["false"]),
            ("Prefix", &["p/"]),
            ("NextContinuationToken", &[]),
        ];
        for (name, expected) in cases {
            assert_eq!(xml_elements(xml, name), *expected, "element {name}");
        }
    }

    #[test]
    fn is_bucket_name_follows_s3_rules() {
        let cases = [
            ("abc", true),
            ("blockwatch-backups.2", true),
            ("ab", false),
            (&"a".repeat(63), true),
            (&"a".repeat(64), false),
            ("Upper", false),
            ("-leading", false),
            ("trailing-", false),
            ("under_score", false),
            ("", false),
        ];
        for (name, valid) in cases {
            assert_eq!(is_bucket_name(name), valid, "bucket name {name:?}");
        }
    }

    #[test]
    fn xml_unescape_decodes_ampersand_last() {
        // "&amp;lt;" is the text "&lt;", not "<".
        assert_eq!(xml_unescape("&amp;lt;"), "&lt;");
    }

    #[test]
    fn percent_encode_keeps_only_unreserved_characters() {
        let cases = [
            ("abc-._~09", "abc-._~09"),
            ("a/b+c=", "a%2Fb%2Bc%3D"),
            ("ü", "%C3%BC"),
        ];
        for (text, expected) in cases {
            assert_eq!(percent_encode(text), expected, "encoding {text:?}");
        }
    }
}
