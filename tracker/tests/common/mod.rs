//! Helpers the tracker's integration tests share.

use tracker::{OpenError, Tracker, TrackerOptions};

/// Opens the state once the tracker before it is gone. A journal rewrite
/// that a refused first touch started holds its tracker until the rewrite
/// ends (where a server's process would exit instead), and with it the
/// state directory's lock.
pub fn open_when_unlocked(options: &TrackerOptions, image_bytes: u64) -> Tracker {
    let mut opened = None;
    testkit::wait_until(
        "the state directory's lock",
        std::time::Duration::from_secs(20),
        || match Tracker::open(options, image_bytes) {
            Ok(tracker) => {
                opened = Some(tracker);
                true
            }
            Err(OpenError::Locked { .. }) => false,
            Err(error) => panic!("opening the state: {error}"),
        },
    );
    opened.expect("opened")
}
