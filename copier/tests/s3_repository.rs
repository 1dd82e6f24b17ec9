//! A `Repository` owns a runtime of its own. A served view of a backup
//! in object storage drops its repository inside the server's runtime,
//! when the last connection goes at a stop: dropping a runtime there
//! must not panic (it did, and `blockwatch serve s3://...` exited 101
//! after SIGTERM now and then).
//!
//! One test in this binary: it sets the process's environment for
//! object_store's credentials.

use copier::s3::{Repository, S3Location, S3Options};
use testkit::{S3Server, TempDir};

#[test]
fn a_repository_dropped_inside_a_runtime_goes_quietly() {
    let dir = TempDir::new("s3-repository-drop");
    let s3 = S3Server::s3s_fs(&dir.join("s3"));
    s3.create_bucket("backups");
    for (name, value) in s3.env() {
        // SAFETY: the only test of this binary, before any thread of its
        // own reads the environment.
        unsafe { std::env::set_var(name, value) };
    }
    let location = S3Location::parse("s3://backups/drop").unwrap();
    let options = S3Options {
        endpoint: Some(s3.endpoint()),
        region: None,
        key_file: None,
        index_cache: None,
    };
    let repo = Repository::open(&location, &options, true).unwrap();
    // It works, then goes from inside another runtime.
    assert!(repo.block_on(async { Ok::<_, ()>(1) }).is_ok());
    let outer = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    outer.block_on(async move { drop(repo) });
    // And one dropped outside any runtime still shuts down in full.
    drop(Repository::open(&location, &options, false).unwrap());
}
