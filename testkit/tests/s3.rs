//! The S3 servers of `testkit::S3Server`, driven through object_store's
//! S3 client (what the object-storage target uses) configured from
//! `S3Server::env` alone, as `AmazonS3Builder::from_env()` would be: this
//! proves the fixed credentials and path-style requests work, against
//! s3s-fs (which checks signatures) and moto (which does not).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use testkit::{MIB, S3Server, TempDir, random_bytes};

/// S3's smallest part but the last; both servers enforce it.
const PART_MIN_BYTES: usize = 5 * MIB as usize;

/// A client for `bucket` built from `server.env()` exactly as
/// `AmazonS3Builder::from_env()` reads the environment (each `AWS_*`
/// variable, lowercased, as a config key), without changing the test
/// process's environment under the other tests running beside it.
fn store(server: &S3Server, bucket: &str) -> AmazonS3 {
    let mut builder = AmazonS3Builder::new().with_bucket_name(bucket);
    // from_env() reads only the AWS_* variables (env() also gives
    // blockwatch an XDG_CACHE_HOME of the server's own).
    for (name, value) in server.env() {
        if !name.starts_with("AWS_") {
            continue;
        }
        let key: AmazonS3ConfigKey = name
            .to_ascii_lowercase()
            .parse()
            .unwrap_or_else(|e| panic!("object_store does not know {name}: {e}"));
        builder = builder.with_config(key, value);
    }
    builder
        .build()
        .unwrap_or_else(|e| panic!("cannot build an S3 client for {}: {e}", server.endpoint()))
}

async fn listed_keys(store: &AmazonS3) -> Vec<String> {
    let objects: Vec<_> = store
        .list(None)
        .try_collect()
        .await
        .unwrap_or_else(|e| panic!("cannot list {store}: {e}"));
    let mut keys: Vec<String> = objects
        .into_iter()
        .map(|o| o.location.to_string())
        .collect();
    keys.sort();
    keys
}

async fn get_bytes(store: &AmazonS3, key: &str) -> Vec<u8> {
    let result = store
        .get(&ObjectPath::from(key))
        .await
        .unwrap_or_else(|e| panic!("cannot get {key}: {e}"));
    result
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("cannot read {key}: {e}"))
        .to_vec()
}

/// Fails unless `result` is an error whose text names the S3 error code
/// `code`, so that a request refused for another reason (a bucket name
/// S3 rejects, say) does not pass for the refusal the test is about.
fn assert_refused<T: std::fmt::Debug>(result: object_store::Result<T>, code: &str, what: &str) {
    match result {
        Ok(value) => panic!("{what} succeeded: {value:?}"),
        Err(e) => assert!(
            format!("{e:?}").contains(code),
            "{what} failed, but not with {code}: {e:?}"
        ),
    }
}

/// Put, get, list (object_store's and `object_keys`), a two-part
/// multipart upload, and delete, on a bucket made by `create_bucket`.
async fn exercise(server: &S3Server) {
    server.create_bucket("exercise");
    let store = store(server, "exercise");
    let small = random_bytes(1, 4096);
    store
        .put(
            &ObjectPath::from("dir/small"),
            PutPayload::from(small.clone()),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot put dir/small to {}: {e}", server.endpoint()));
    assert_eq!(get_bytes(&store, "dir/small").await, small);

    let first_part = random_bytes(2, PART_MIN_BYTES);
    let last_part = random_bytes(3, MIB as usize);
    let mut upload = store
        .put_multipart(&ObjectPath::from("large"))
        .await
        .unwrap_or_else(|e| panic!("cannot start a multipart upload: {e}"));
    // Both parts in flight at once, as a copier sending parts would have them.
    let first = upload.put_part(PutPayload::from(first_part.clone()));
    let last = upload.put_part(PutPayload::from(last_part.clone()));
    futures::try_join!(first, last).unwrap_or_else(|e| panic!("cannot upload a part: {e}"));
    let completed = upload
        .complete()
        .await
        .unwrap_or_else(|e| panic!("cannot complete the multipart upload: {e}"));
    let e_tag = completed.e_tag.expect("a completed upload has an ETag");
    assert!(
        e_tag.ends_with("-2\""),
        "multipart ETag {e_tag} does not count 2 parts"
    );
    assert_eq!(
        get_bytes(&store, "large").await,
        [first_part, last_part].concat()
    );

    let expected = ["dir/small", "large"];
    assert_eq!(listed_keys(&store).await, expected);
    assert_eq!(server.object_keys("exercise"), expected);

    store
        .delete(&ObjectPath::from("dir/small"))
        .await
        .unwrap_or_else(|e| panic!("cannot delete dir/small: {e}"));
    assert_eq!(listed_keys(&store).await, ["large"]);
    assert_eq!(server.object_keys("exercise"), ["large"]);
}

/// A bucket that was not created cannot be listed; once `create_bucket`
/// made it, it lists empty.
async fn create_bucket_makes_an_empty_bucket(server: &S3Server) {
    let store = store(server, "fresh");
    let before: Result<Vec<_>, _> = store.list(None).try_collect().await;
    assert_refused(
        before,
        "NoSuchBucket",
        "listing a bucket that was never created",
    );
    server.create_bucket("fresh");
    assert_eq!(listed_keys(&store).await, Vec::<String>::new());
    assert_eq!(server.object_keys("fresh"), Vec::<String>::new());
}

#[tokio::test]
async fn s3s_fs_serves_object_store() {
    let dir = TempDir::new("s3s-fs-serves");
    let server = S3Server::s3s_fs(&dir.join("root"));
    exercise(&server).await;
}

#[tokio::test]
async fn moto_serves_object_store() {
    let dir = TempDir::new("moto-serves");
    let server = S3Server::moto(dir.path());
    exercise(&server).await;
}

#[tokio::test]
async fn s3s_fs_create_bucket_makes_an_empty_bucket() {
    let dir = TempDir::new("s3s-fs-bucket");
    let server = S3Server::s3s_fs(&dir.join("root"));
    create_bucket_makes_an_empty_bucket(&server).await;
}

#[tokio::test]
async fn moto_create_bucket_makes_an_empty_bucket() {
    let dir = TempDir::new("moto-bucket");
    let server = S3Server::moto(dir.path());
    create_bucket_makes_an_empty_bucket(&server).await;
}

/// Keys that XML escapes in a listing come back from `object_keys` as
/// object_store lists them (which percent-encodes some characters itself
/// before they ever reach S3: `<` is stored as `%3C`).
#[tokio::test]
async fn moto_object_keys_decodes_escaped_keys() {
    let dir = TempDir::new("moto-keys");
    let server = S3Server::moto(dir.path());
    server.create_bucket("keys");
    let store = store(&server, "keys");
    for key in ["a&b", "c<d>", "e'f\"g"] {
        store
            .put(&ObjectPath::from(key), PutPayload::from_static(b"x"))
            .await
            .unwrap_or_else(|e| panic!("cannot put {key}: {e}"));
    }
    let keys = server.object_keys("keys");
    assert_eq!(keys, listed_keys(&store).await);
    assert!(keys.contains(&"a&b".to_string()), "no a&b in {keys:?}");
}

/// A client with another secret key is refused: s3s-fs checks signatures.
#[tokio::test]
async fn s3s_fs_refuses_a_wrong_secret_key() {
    let dir = TempDir::new("s3s-fs-auth");
    let server = S3Server::s3s_fs(&dir.join("root"));
    server.create_bucket("guarded");
    let intruder = AmazonS3Builder::new()
        .with_bucket_name("guarded")
        .with_endpoint(server.endpoint())
        .with_allow_http(true)
        .with_region(testkit::S3_REGION)
        .with_access_key_id(testkit::S3_ACCESS_KEY_ID)
        .with_secret_access_key("not-the-secret")
        .build()
        .expect("an S3 client");
    let put = intruder
        .put(&ObjectPath::from("x"), PutPayload::from_static(b"x"))
        .await;
    assert_refused(
        put,
        "SignatureDoesNotMatch",
        "a put signed with the wrong secret",
    );
    assert_eq!(server.object_keys("guarded"), Vec::<String>::new());
}

/// The layout the module documents, which tests that corrupt objects rely
/// on: the bytes at `object_path`, nothing but objects inside a bucket,
/// and a GET that serves the file as it is now.
#[tokio::test]
async fn s3s_fs_keeps_objects_as_plain_files() {
    let dir = TempDir::new("s3s-fs-layout");
    let root = dir.join("root");
    let server = S3Server::s3s_fs(&root);
    server.create_bucket("plain");
    let store = store(&server, "plain");
    let bytes = random_bytes(4, 8192);
    store
        .put(&ObjectPath::from("a/b/c"), PutPayload::from(bytes.clone()))
        .await
        .expect("put a/b/c");
    let path = server.object_path("plain", "a/b/c");
    assert_eq!(path, root.join("plain/a/b/c"));
    assert_eq!(std::fs::read(&path).expect("read the object's file"), bytes);
    assert_eq!(server.object_keys("plain"), ["a/b/c"]);
    for entry in std::fs::read_dir(&root).expect("list the root") {
        let name = entry.expect("a root entry").file_name();
        let name = name.to_string_lossy();
        assert!(
            name == "plain" || name.starts_with('.'),
            "{name} in the s3s-fs root is neither a bucket nor a dotfile"
        );
    }

    let before = store.head(&ObjectPath::from("a/b/c")).await.expect("head");
    let mut corrupted = bytes.clone();
    corrupted[100] ^= 0xff;
    std::fs::write(&path, &corrupted).expect("corrupt the object's file");
    assert_eq!(get_bytes(&store, "a/b/c").await, corrupted);
    let after = store.head(&ObjectPath::from("a/b/c")).await.expect("head");
    assert_eq!(
        after.e_tag, before.e_tag,
        "s3s-fs serves the ETag of the upload"
    );
}

/// s3s-fs, unlike S3 and moto, creates a missing bucket on the first put
/// into it; tests of "no such bucket" need moto.
#[tokio::test]
async fn s3s_fs_put_creates_a_missing_bucket() {
    let dir = TempDir::new("s3s-fs-implicit");
    let server = S3Server::s3s_fs(&dir.join("root"));
    let store = store(&server, "implicit");
    store
        .put(&ObjectPath::from("k"), PutPayload::from_static(b"v"))
        .await
        .expect("put into a bucket that was never created");
    assert_eq!(server.object_keys("implicit"), ["k"]);
}

#[tokio::test]
async fn moto_put_into_a_missing_bucket_fails() {
    let dir = TempDir::new("moto-missing");
    let server = S3Server::moto(dir.path());
    let put = store(&server, "missing")
        .put(&ObjectPath::from("k"), PutPayload::from_static(b"v"))
        .await;
    assert_refused(put, "NoSuchBucket", "a put into a missing bucket");
}

/// `s3s-fs-serve` prints its endpoint once it listens and then serves the
/// same credentials as `S3Server::s3s_fs`.
#[tokio::test]
async fn s3s_fs_serve_prints_an_endpoint_that_serves() {
    let dir = TempDir::new("s3s-fs-serve");
    let root = dir.join("root");
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_s3s-fs-serve"))
            .args(["--root".as_ref(), root.as_os_str()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start s3s-fs-serve"),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the endpoint");
    let endpoint = line.trim_end().to_string();
    assert!(
        endpoint.starts_with("http://127.0.0.1:"),
        "s3s-fs-serve printed {line:?}"
    );
    std::fs::create_dir(root.join("served")).expect("create a bucket");
    let served = AmazonS3Builder::new()
        .with_bucket_name("served")
        .with_endpoint(&endpoint)
        .with_allow_http(true)
        .with_region(testkit::S3_REGION)
        .with_access_key_id(testkit::S3_ACCESS_KEY_ID)
        .with_secret_access_key(testkit::S3_SECRET_ACCESS_KEY)
        .build()
        .expect("an S3 client");
    served
        .put(&ObjectPath::from("k"), PutPayload::from_static(b"v"))
        .await
        .unwrap_or_else(|e| panic!("cannot put through {endpoint}: {e}"));
    assert_eq!(
        std::fs::read(root.join("served/k")).expect("the object"),
        b"v"
    );
}

/// A child process killed and reaped on drop, also when the test fails.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
