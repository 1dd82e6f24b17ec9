//! The state directory's file system full (a small tmpfs under `--state`,
//! filled by a file beside the state) while a python3-libnbd client
//! writes to the served disk (the image itself lives elsewhere and has
//! room). Checked exactly: which requests succeed and which fail with
//! what errno, that `blockwatch changes` and `qemu:dirty-bitmap:` report
//! every region whose bytes differ from the checkpoint's copy (and only
//! those), what `status` says, what a checkpoint, a copy and a live
//! copy's copy-before-write store do, that once space is freed the
//! server rewrites its journal and tracks normally again with no restart,
//! and that after a restart (SIGTERM or kill -9) nothing is
//! under-reported. docs/journal.md, "When the state
//! directory fails", has the table these tests stand behind.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;

use common::*;
use control::Request;
use control::proto::SnapshotReply;
use control::transport::Connection;
use testkit::*;

const REGION: u64 = 64 * 1024;
const IMAGE_SIZE: &str = "16M";
/// python3-libnbd is installed for the system interpreter only.
const PYTHON: &str = "/usr/bin/python3";

/// Runs each request named in argv (`w:OFFSET`, 4 KiB of data;
/// `fua:OFFSET`; `trim:OFFSET` and `zero:OFFSET`, 4 KiB; `flush`) on
/// one connection, in order, and prints
/// `[[request, "ok" or the NBD error's errno name], ...]`.
const REQUESTS: &str = r#"
import json, nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
results = []
for request in sys.argv[2:]:
    kind, _, offset = request.partition(":")
    try:
        if kind == "w":
            h.pwrite(b"\x5a" * 4096, int(offset))
        elif kind == "fua":
            h.pwrite(b"\xa5" * 4096, int(offset), nbd.CMD_FLAG_FUA)
        elif kind == "trim":
            h.trim(4096, int(offset))
        elif kind == "zero":
            h.zero(4096, int(offset))
        elif kind == "flush":
            h.flush()
        else:
            raise SystemExit("unknown request " + request)
        results.append([request, "ok"])
    except nbd.Error as error:
        results.append([request, error.errno or str(error)])
h.shutdown()
print(json.dumps(results))
"#;

fn write_request(region: u64) -> String {
    format!("w:{}", region * REGION + REGION / 4)
}

/// The outcome of each request, in order.
fn requests(uri: &str, requests: &[String]) -> Vec<String> {
    let mut args = vec!["-c", REQUESTS, uri];
    args.extend(requests.iter().map(String::as_str));
    let text = run_program(PYTHON, &args);
    parse_json(&text, "the libnbd requests")
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| pair[1].as_str().unwrap().to_string())
        .collect()
}

fn ok(uri: &str, list: &[String]) {
    let outcomes = requests(uri, list);
    assert!(
        outcomes.iter().all(|o| o == "ok"),
        "{list:?} -> {outcomes:?}"
    );
}

/// A served 16 MiB image whose state is on a 4 MiB tmpfs, with
/// checkpoint "base" taken after region 0 was written and a copy of the
/// image as of "base".
struct Fixture {
    server: Option<Server>,
    image: PathBuf,
    state: PathBuf,
    base_copy: PathBuf,
    state_fs: Tmpfs,
    dir: TempDir,
}

impl Fixture {
    fn start(label: &str) -> Fixture {
        Fixture::start_with(label, &[])
    }

    /// `start`, with more `serve` arguments.
    fn start_with(label: &str, serve_args: &[&str]) -> Fixture {
        require_tool("nbdinfo", "libnbd-bin");
        let dir = TempDir::new(label);
        let state_fs = Tmpfs::mount(dir.path(), "statefs", "4M");
        let image = dir.join("disk.img");
        let state = state_fs.join("state");
        let mut fixture = Fixture {
            server: None,
            image,
            state,
            base_copy: dir.join("base.img"),
            state_fs,
            dir,
        };
        let mut args = vec!["--size", IMAGE_SIZE];
        args.extend_from_slice(serve_args);
        fixture.serve(&args);
        let uri = fixture.uri();
        ok(&uri, &[write_request(0), "flush".into()]);
        fixture.blockwatch_ok(&["checkpoint", "base"]);
        std::fs::copy(&fixture.image, &fixture.base_copy).unwrap();
        fixture
    }

    fn serve(&mut self, extra: &[&str]) {
        let mut args = vec!["--state", self.state.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.server = Some(Server::start(self.dir.path(), &[&self.image], &args));
    }

    fn server(&self) -> &Server {
        self.server.as_ref().expect("server running")
    }

    fn uri(&self) -> String {
        self.server().uri()
    }

    /// `blockwatch ARGS[0] IMAGE --state STATE ARGS[1..]`.
    fn blockwatch(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec![args[0], self.image.to_str().unwrap()];
        all.extend(["--state", self.state.to_str().unwrap()]);
        all.extend_from_slice(&args[1..]);
        output(&mut command(BLOCKWATCH, all))
    }

    fn blockwatch_ok(&self, args: &[&str]) -> String {
        let out = self.blockwatch(args);
        assert!(
            out.status.success(),
            "blockwatch {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.server.as_ref().map(Server::logs).unwrap_or_default()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `blockwatch ARGS` must fail with exit 2; returns its stderr.
    fn blockwatch_refused(&self, args: &[&str]) -> String {
        let out = self.blockwatch(args);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "blockwatch {args:?}: {stderr}");
        stderr
    }

    fn status(&self) -> serde_json::Value {
        parse_json(&self.blockwatch_ok(&["status", "--json"]), "status --json")
    }

    fn changes(&self, since: &str) -> serde_json::Value {
        parse_json(
            &self.blockwatch_ok(&["changes", "--since", since, "--json"]),
            "changes --json",
        )
    }

    fn changed_regions(&self, since: &str) -> BTreeSet<u64> {
        ranges(&self.changes(since)["extents"])
            .into_iter()
            .flat_map(|(offset, length)| offset / REGION..(offset + length).div_ceil(REGION))
            .collect()
    }

    fn dirty_bitmap_regions(&self, name: &str) -> BTreeSet<u64> {
        nbdinfo_map(&self.uri(), &format!("qemu:dirty-bitmap:{name}"))
            .into_iter()
            .filter(|(_, _, flags)| flags & 1 != 0)
            .flat_map(|(offset, length, _)| offset / REGION..(offset + length).div_ceil(REGION))
            .collect()
    }

    /// Regions whose bytes differ from the image as of "base".
    fn differing_regions(&self) -> BTreeSet<u64> {
        let now = std::fs::read(&self.image).unwrap();
        let base = std::fs::read(&self.base_copy).unwrap();
        now.chunks(REGION as usize)
            .zip(base.chunks(REGION as usize))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(region, _)| region as u64)
            .collect()
    }

    /// Fills the state's file system with a file beside the state
    /// until a write fails with ENOSPC.
    fn fill(&self) -> PathBuf {
        let path = self.state_fs.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 4096];
        loop {
            match file.write_all(&chunk) {
                Ok(()) => {}
                Err(error) if error.raw_os_error() == Some(libc::ENOSPC) => return path,
                Err(error) => panic!("filling the state's file system: {error}"),
            }
        }
    }

    fn stop(&mut self, stop: Stop) {
        let server = self.server.take().expect("server running");
        match stop {
            Stop::Term => server.stop(),
            Stop::Kill => server.kill(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    /// SIGTERM; the server must exit 0.
    Term,
    Kill,
}

/// Every region that differs from "base" is reported by `changes` (and,
/// while serving, the dirty bitmap), and nothing else is.
fn assert_reported_exactly(fixture: &Fixture, context: &str) {
    let differing = fixture.differing_regions();
    assert_eq!(
        fixture.changed_regions("base"),
        differing,
        "{context}: changes since base"
    );
    if fixture.server.is_some() {
        assert_eq!(
            fixture.dirty_bitmap_regions("base"),
            differing,
            "{context}: qemu:dirty-bitmap:base"
        );
    }
}

#[test]
fn a_full_state_directory_refuses_first_touches_until_space_is_freed_and_loses_no_change() {
    if skipped_unless_root("mount -t tmpfs for the state directory") {
        return;
    }
    for stop in [Stop::Term, Stop::Kill] {
        let mut fixture = Fixture::start_with(
            &format!("state-full-journal-{stop:?}"),
            &["--snapshot-max", "1M"],
        );
        let uri = fixture.uri();
        ok(&uri, &[write_request(1)]); // marked before the disk fills
        let filler = fixture.fill();

        // First touches succeed while the journal's last page has room,
        // then fail with EIO and are not issued; all later ones fail too.
        let first_touches: Vec<String> = (2..200).map(write_request).collect();
        let outcomes = requests(&uri, &first_touches);
        let accepted = outcomes.iter().take_while(|o| *o == "ok").count();
        assert!(
            accepted < outcomes.len(),
            "{stop:?}: no first touch failed on a full state directory"
        );
        assert!(
            outcomes[accepted..].iter().all(|o| o == "EIO"),
            "{stop:?}: after the first refusal every first touch fails with EIO: {outcomes:?}"
        );
        let written: BTreeSet<u64> = (1..2 + accepted as u64).collect();
        assert_eq!(fixture.differing_regions(), written, "{stop:?}");

        // Writes, trims and zeroings of marked regions, FLUSH and FUA
        // writes go on; a trim or zeroing of a new region is a first
        // touch like a write.
        let marked = [
            write_request(1),
            "flush".into(),
            format!("fua:{}", REGION),
            format!("trim:{}", REGION + 8192),
            format!("zero:{}", REGION + 16384),
            format!("trim:{}", 240 * REGION),
            format!("zero:{}", 241 * REGION),
            write_request(2),
            "flush".into(),
        ];
        let outcomes = requests(&uri, &marked);
        let expect_region_2 = if accepted > 0 { "ok" } else { "EIO" };
        assert_eq!(
            outcomes,
            [
                "ok",
                "ok",
                "ok",
                "ok",
                "ok",
                "EIO",
                "EIO",
                expect_region_2,
                "ok"
            ],
            "{stop:?}"
        );
        assert_reported_exactly(&fixture, "full, serving");

        let status = fixture.status();
        let failure = status["journal_failure"].as_str().unwrap_or_default();
        assert!(
            failure.contains("writing the journal failed")
                && failure.contains("No space left on device"),
            "{stop:?}: {status:#}"
        );
        let text = fixture.blockwatch_ok(&["status"]);
        assert!(
            text.contains("fail with EIO") && text.contains("restart the server"),
            "{text}"
        );

        // A checkpoint (and so a copy) is refused, saying why.
        let refused = fixture.blockwatch_refused(&["checkpoint", "full"]);
        assert!(
            refused.contains("journal failed earlier") && refused.contains("restarts"),
            "{refused}"
        );

        // A copy is refused too (its snapshot store finds no room before
        // its checkpoint meets the failed journal), leaving no pin and no
        // snapshot store behind.
        let replica = fixture.dir.join("replica.img");
        let refused = fixture.blockwatch_refused(&["copy", "--to", replica.to_str().unwrap()]);
        assert!(
            refused.contains("journal failed earlier") || refused.contains("free space"),
            "{refused}"
        );
        let stores = std::fs::read_dir(fixture.state.join("snapshots"))
            .map(|entries| entries.count())
            .unwrap_or(0);
        assert_eq!(stores, 0, "the refused copy's snapshot store is removed");
        let listing = fixture.blockwatch_ok(&["checkpoints", "--json"]);
        let listing = parse_json(&listing, "checkpoints --json");
        assert_eq!(listing.as_array().unwrap().len(), 1, "{listing:#}");
        assert!(
            listing[0]["pins"].as_array().unwrap().is_empty(),
            "{listing:#}"
        );

        // Space freed: a first touch (at most a second after the last
        // try) has the journal rewritten from memory, and tracking goes
        // on with no restart: first touches, exact changes, a copy.
        std::fs::remove_file(filler).unwrap();
        testkit::wait_until(
            "first touches to be taken again once space is freed",
            std::time::Duration::from_secs(20),
            || requests(&uri, &[write_request(220)]) == ["ok"],
        );
        assert!(
            fixture.status()["journal_failure"].is_null(),
            "{stop:?}: the failure ends with the rewrite"
        );
        assert_reported_exactly(&fixture, "rewritten, serving");
        let copied = fixture.blockwatch_ok(&["copy", "--to", replica.to_str().unwrap(), "--json"]);
        let copied = parse_json(&copied, "copy --json");
        assert_eq!(copied["kind"], "full", "{copied:#}");
        ok(&uri, &[write_request(221), "flush".into()]);
        let since_copy = copied["checkpoint"].as_str().unwrap();
        assert_eq!(
            fixture.changed_regions(since_copy),
            BTreeSet::from([221]),
            "{stop:?}"
        );
        match stop {
            Stop::Term => {
                let logs = fixture.server.take().unwrap().stop_and_logs();
                assert!(
                    logs.contains("tracking journal rewritten from memory"),
                    "{logs}"
                );
                assert!(!logs.contains("no clean shutdown recorded"), "{logs}");
            }
            Stop::Kill => fixture.stop(stop),
        }

        // Offline: the exact regions; the refused checkpoint is not there.
        let status = fixture.status();
        let shutdown = match stop {
            Stop::Term => "clean",
            Stop::Kill => "unclean or first start",
        };
        assert_eq!(status["last_shutdown"], shutdown, "{status:#}");
        assert_reported_exactly(&fixture, "after the stop, offline");
        assert_eq!(
            fixture.changed_regions(since_copy),
            BTreeSet::from([221]),
            "{stop:?}: after the stop"
        );
        let listing = fixture.blockwatch_ok(&["checkpoints", "--json"]);
        let listing = parse_json(&listing, "checkpoints --json");
        assert!(
            listing
                .as_array()
                .unwrap()
                .iter()
                .all(|checkpoint| checkpoint["name"] != "full"),
            "{listing:#}"
        );

        // Serving again: normal first touches and checkpoints.
        fixture.serve(&[]);
        let uri = fixture.uri();
        ok(&uri, &[write_request(230), "flush".into()]);
        assert_reported_exactly(&fixture, "after the restart");
        fixture.blockwatch_ok(&["checkpoint", "again"]);
        ok(&uri, &[write_request(231)]);
        assert_eq!(fixture.changed_regions("again"), BTreeSet::from([231]));
        assert!(fixture.status()["journal_failure"].is_null());
        fixture.stop(Stop::Term);
    }
}

#[test]
fn a_checkpoint_on_a_full_state_directory_is_refused_and_changes_nothing() {
    if skipped_unless_root("mount -t tmpfs for the state directory") {
        return;
    }
    for stop in [Stop::Term, Stop::Kill] {
        let mut fixture = Fixture::start(&format!("state-full-checkpoint-{stop:?}"));
        let uri = fixture.uri();
        ok(&uri, &[write_request(1)]);
        let filler = fixture.fill();
        let refused = fixture.blockwatch_refused(&["checkpoint", "full"]);
        assert!(
            refused.contains("checkpoint \"full\"") && refused.contains("No space left on device"),
            "{refused}"
        );
        // The journal is fine: tracking goes on as before (a first touch
        // still fits in the journal's last page).
        assert!(fixture.status()["journal_failure"].is_null());
        ok(&uri, &[write_request(1), write_request(2), "flush".into()]);
        assert_reported_exactly(&fixture, "after the refused checkpoint");
        assert!(!fixture.blockwatch_ok(&["checkpoints"]).contains("full"));

        // Stopped (cleanly or not) while the file system is full: the
        // offline queries still answer (after kill -9 the catalog needs a
        // repair, whose clean-shutdown marker cannot be written), and
        // nothing is lost, before space is freed and after.
        fixture.stop(stop);
        assert_reported_exactly(&fixture, "stopped, still full");
        assert!(fixture.status()["journal_failure"].is_null());
        std::fs::remove_file(filler).unwrap();
        assert_reported_exactly(&fixture, "stopped while full");
        assert!(!fixture.blockwatch_ok(&["checkpoints"]).contains("full"));

        fixture.serve(&[]);
        let uri = fixture.uri();
        fixture.blockwatch_ok(&["checkpoint", "full"]);
        ok(&uri, &[write_request(3)]);
        assert_eq!(fixture.changed_regions("full"), BTreeSet::from([3]));
        assert_reported_exactly(&fixture, "after the checkpoint");
        fixture.stop(Stop::Term);
    }
}

/// One page left: the checkpoint's new journal takes it and the catalog's
/// commit fails. redb then takes no write until the database is opened
/// again, so checkpoints stay refused while the file system is full; the
/// disk and its tracking go on. Once space is freed the next checkpoint
/// opens the catalog again, with no restart, and nothing is lost across a
/// later clean or unclean stop.
#[test]
fn a_catalog_commit_failing_on_a_full_state_directory_refuses_checkpoints_until_space_is_freed() {
    if skipped_unless_root("mount -t tmpfs for the state directory") {
        return;
    }
    for stop in [Stop::Term, Stop::Kill] {
        let mut fixture = Fixture::start(&format!("state-full-catalog-{stop:?}"));
        let uri = fixture.uri();
        ok(&uri, &[write_request(1), "flush".into()]);
        let filler = fixture.fill();
        let filled = std::fs::metadata(&filler).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&filler)
            .unwrap()
            .set_len(filled - 4096)
            .unwrap();
        let refused = fixture.blockwatch_refused(&["checkpoint", "one"]);
        assert!(
            refused.contains("catalog") && refused.contains("No space left on device"),
            "{stop:?}: {refused}"
        );
        let status = fixture.status();
        assert!(status["journal_failure"].is_null(), "{status:#}");
        let warnings = status["warnings"].to_string();
        assert!(
            warnings.contains("writing the catalog failed"),
            "{status:#}"
        );
        ok(&uri, &[write_request(1), write_request(2), "flush".into()]);
        assert_reported_exactly(&fixture, "after the catalog failed");
        // Still full: the reopen fails and changes nothing.
        let refused = fixture.blockwatch_refused(&["checkpoint", "still-full"]);
        assert!(refused.contains("catalog"), "{refused}");
        assert_reported_exactly(&fixture, "after a reopen that failed");

        std::fs::remove_file(filler).unwrap();
        fixture.blockwatch_ok(&["checkpoint", "two"]);
        let status = fixture.status();
        assert!(
            !status["warnings"].to_string().contains("catalog"),
            "{status:#}"
        );
        ok(&uri, &[write_request(3), "flush".into()]);
        assert_eq!(fixture.changed_regions("two"), BTreeSet::from([3]));
        // pin takes IMAGE CHECKPOINT HOLDER together, after --state.
        let state = fixture.state.to_str().unwrap();
        let image = fixture.image.to_str().unwrap();
        let pinned = output(&mut command(
            BLOCKWATCH,
            ["pin", "--state", state, image, "two", "test"],
        ));
        assert!(pinned.status.success(), "{pinned:?}");
        let listing = fixture.blockwatch_ok(&["checkpoints"]);
        assert!(
            !listing.contains("one") && !listing.contains("still-full") && listing.contains("two"),
            "{listing}"
        );
        match stop {
            Stop::Term => {
                let logs = fixture.server.take().unwrap().stop_and_logs();
                assert!(logs.contains("takes writes again"), "{logs}");
                assert!(
                    !logs.contains("could not record a clean shutdown"),
                    "{logs}"
                );
            }
            Stop::Kill => fixture.stop(stop),
        }
        assert_reported_exactly(&fixture, "after the stop, offline");
        let listing = fixture.blockwatch_ok(&["checkpoints"]);
        assert!(
            listing.contains("two") && listing.contains("test"),
            "{listing}"
        );

        fixture.serve(&[]);
        let uri = fixture.uri();
        assert_eq!(fixture.changed_regions("two"), BTreeSet::from([3]));
        fixture.blockwatch_ok(&["checkpoint", "three"]);
        ok(&uri, &[write_request(4)]);
        assert_eq!(fixture.changed_regions("three"), BTreeSet::from([4]));
        assert_reported_exactly(&fixture, "after the restart");
        fixture.stop(Stop::Term);
    }
}

#[test]
fn space_freed_while_serving_lets_a_refused_checkpoint_through() {
    if skipped_unless_root("mount -t tmpfs for the state directory") {
        return;
    }
    let mut fixture = Fixture::start("state-full-checkpoint-live");
    let uri = fixture.uri();
    let filler = fixture.fill();
    fixture.blockwatch_refused(&["checkpoint", "full"]);
    std::fs::remove_file(filler).unwrap();
    fixture.blockwatch_ok(&["checkpoint", "full"]);
    ok(&uri, &[write_request(4)]);
    assert_eq!(fixture.changed_regions("full"), BTreeSet::from([4]));
    fixture.stop(Stop::Term);
}

#[test]
fn a_copy_on_a_full_state_directory_is_refused_and_the_disk_stays_writable() {
    if skipped_unless_root("mount -t tmpfs for the state directory") {
        return;
    }
    // A store bound the 4 MiB file system can hold once it has room.
    let mut fixture = Fixture::start_with("state-full-copy", &["--snapshot-max", "1M"]);
    let uri = fixture.uri();
    ok(&uri, &[write_request(1)]);
    let filler = fixture.fill();
    let replica = fixture.dir.join("replica.img");
    let refused = fixture.blockwatch_refused(&["copy", "--to", replica.to_str().unwrap()]);
    assert!(
        refused.contains("free space") || refused.contains("No space left on device"),
        "{refused}"
    );
    ok(&uri, &[write_request(1), "flush".into()]);
    assert_reported_exactly(&fixture, "after the refused copy");
    let listing = fixture.blockwatch_ok(&["checkpoints", "--json"]);
    let listing = parse_json(&listing, "checkpoints --json");
    assert_eq!(listing.as_array().unwrap().len(), 1, "{listing:#}");
    assert!(
        listing[0]["pins"].as_array().unwrap().is_empty(),
        "{listing:#}"
    );
    // Space freed: the same copy goes through, no restart needed.
    std::fs::remove_file(filler).unwrap();
    fixture.blockwatch_ok(&["copy", "--to", replica.to_str().unwrap()]);
    assert_files_equal(&fixture.image, &replica);
    fixture.stop(Stop::Term);
}

/// A snapshot taken with room in the state directory, whose store then
/// cannot grow: the snapshot breaks with the reason, reads of it fail,
/// and the disk's writes succeed and are tracked.
#[test]
fn a_snapshot_store_on_a_full_state_directory_breaks_the_snapshot_not_the_writes() {
    if skipped_unless_root("mount -t tmpfs for the state directory") {
        return;
    }
    require_tool("nbdcopy", "libnbd-bin");
    let mut fixture = Fixture::start("state-full-snapshot");
    let uri = fixture.uri();
    let mut control = Connection::open(&fixture.state).unwrap();
    let snapshot: SnapshotReply = control
        .call(&Request::Snapshot {
            name: Some("live".into()),
            max_store_bytes: Some(REGION * 8),
        })
        .unwrap();
    let filler = fixture.fill();
    ok(&uri, &[write_request(5), write_request(6), "flush".into()]);
    let status: serde_json::Value = control.call(&Request::Status).unwrap();
    let broken = status["snapshot"]["broken"].as_str().unwrap_or_default();
    assert!(broken.contains("No space left on device"), "{status:#}");
    assert!(status["status"]["journal_failure"].is_null(), "{status:#}");
    let read = output(&mut command(
        "nbdcopy",
        [
            snapshot.uri.as_str(),
            fixture.dir.join("snap.img").to_str().unwrap(),
        ],
    ));
    assert!(!read.status.success(), "a broken snapshot is not readable");
    assert_eq!(
        fixture.changed_regions("live"),
        BTreeSet::from([5, 6]),
        "changes since the snapshot's checkpoint"
    );
    drop(control);
    std::fs::remove_file(filler).unwrap();
    fixture.stop(Stop::Term);
    assert_reported_exactly(&fixture, "after the broken snapshot");
}

/// The image's own file system full (a sparse image on a small tmpfs, its
/// state elsewhere): a write into a hole fails with ENOSPC at the client,
/// an overwrite succeeds, and tracking reports the failed write's region
/// too (its mark was durable before the write was tried): over, never
/// under.
#[test]
fn a_full_image_file_system_fails_writes_with_enospc_and_tracking_only_over_reports() {
    if skipped_unless_root("mount -t tmpfs for the image") {
        return;
    }
    let dir = TempDir::new("image-full");
    let image_fs = Tmpfs::mount(dir.path(), "imagefs", "1M");
    let image = image_fs.join("disk.img");
    let state = dir.join("state");
    let state_arg = state.to_str().unwrap();
    let server = Server::start(
        dir.path(),
        &[&image],
        &["--size", IMAGE_SIZE, "--state", state_arg],
    );
    let uri = server.uri();
    ok(&uri, &[write_request(1), "flush".into()]);
    let image_arg = image.to_str().unwrap();
    run_program(
        BLOCKWATCH,
        ["checkpoint", image_arg, "--state", state_arg, "base"],
    );
    let filler = image_fs.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    while file.write_all(&[0u8; 4096]).is_ok() {}
    let outcomes = requests(&uri, &[write_request(1), write_request(2), "flush".into()]);
    assert_eq!(outcomes, ["ok", "ENOSPC", "ok"], "{}", server.logs());
    let changes = parse_json(
        &run_program(
            BLOCKWATCH,
            [
                "changes", image_arg, "--state", state_arg, "--since", "base", "--json",
            ],
        ),
        "changes --json",
    );
    let regions: BTreeSet<u64> = ranges(&changes["extents"])
        .into_iter()
        .map(|(offset, _)| offset / REGION)
        .collect();
    assert_eq!(regions, BTreeSet::from([1, 2]), "{changes:#}");
    let status = parse_json(
        &run_program(
            BLOCKWATCH,
            ["status", image_arg, "--state", state_arg, "--json"],
        ),
        "status --json",
    );
    assert!(status["journal_failure"].is_null(), "{status:#}");
    drop(file);
    std::fs::remove_file(filler).unwrap();
    ok(&uri, &[write_request(2), "flush".into()]);
    server.stop();
}
