//! kill -9 loops end to end, the proof that a crash loses no change on
//! the way from a client's write to a backup:
//!
//! - `kill_9_of_the_server_under_fio_then_an_incremental_copy_misses_nothing`:
//!   per cycle fio writes (random offsets, mixed sizes, flushes, trims)
//!   through the nbd engine, the server is killed at a random moment, then
//!   an incremental copy (live through a restarted server, or offline)
//!   goes to a replica that accumulates across cycles, and the replica is
//!   compared byte for byte with the image, which no write touched since
//!   the copy's checkpoint.
//! - `kill_9_of_the_copier_*`: per cycle a sizeable change set, then
//!   `blockwatch copy` of the served disk killed at random moments (once
//!   to three times, with more writes between some kills), then a rerun
//!   that must finish; the target (a replica file, a tape chain restored,
//!   an NBD export) is then byte-identical with the image, its record
//!   names the rerun's checkpoint, and only that checkpoint stays pinned
//!   for it.
//!
//! Cycles: `BLOCKWATCH_CRASH_SERVER_CYCLES`, `BLOCKWATCH_CRASH_COPIER_CYCLES`
//! (small defaults; `scripts/crash-loop N` sets both). The randomness is
//! seeded: each test prints its seed, and `BLOCKWATCH_CRASH_SEED=N`
//! replays it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use testkit::*;

const MIB: u64 = 1 << 20;
/// How long a copy may run before the test calls it a hang; a bound on
/// the waiting only.
const COPY_LIMIT: Duration = Duration::from_secs(300);

fn env_count(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The seed of one test's randomness, printed so a failure replays.
fn seed(test: &str) -> u64 {
    let seed = std::env::var("BLOCKWATCH_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: seed {seed} (replay with BLOCKWATCH_CRASH_SEED={seed})");
    seed
}

/// The processes a process started, and theirs (/proc's `children`).
fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    for task in tasks.flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            found.push(child);
            found.extend(descendants(child));
        }
    }
    found
}

/// A fio run on an nbd URI. fio forks a process per job; once its server
/// is gone a job with `--rate_iops` spins instead of exiting, so `kill`
/// kills each job process by its pid as well as fio.
struct Fio {
    child: Child,
    log: PathBuf,
}

impl Fio {
    fn start(uri: &str, dir: &Path, seed: u64, args: &[&str]) -> Fio {
        let mut fio = command(
            "fio",
            [
                "--ioengine=nbd".to_string(),
                format!("--uri={uri}"),
                format!("--randseed={}", seed & 0xffff_ffff),
            ],
        );
        let log = dir.join(format!("fio-{seed}.log"));
        fio.args(args)
            .current_dir(dir)
            .stdout(create_file(&log))
            .stderr(Stdio::from(create_file(&log.with_extension("stderr"))));
        Fio {
            child: fio.spawn().expect("start fio"),
            log,
        }
    }

    fn kill(mut self) {
        for pid in descendants(self.child.id()) {
            signal(pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for a run with a fixed amount of I/O, which must succeed.
    fn finish(mut self) {
        let status = wait_bounded(&mut self.child, COPY_LIMIT).expect("fio did not finish");
        assert!(
            status.success(),
            "fio failed with {}:\n{}{}",
            status_text(status),
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(self.log.with_extension("stderr")).unwrap_or_default()
        );
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(self.log.with_extension("stderr"));
    }
}

/// Writes of mixed sizes at random offsets with flushes, and trims, at
/// a bounded rate so a change set stays a part of the disk.
fn random_load(uri: &str, dir: &Path, seed: u64) -> Fio {
    Fio::start(
        uri,
        dir,
        seed,
        &[
            "--name=writes",
            "--rw=randwrite",
            "--bssplit=4k/50:16k/20:64k/15:256k/10:1m/5",
            "--iodepth=8",
            "--fsync=16",
            "--rate_iops=400",
            "--time_based",
            "--runtime=120",
            "--name=trims",
            "--rw=randtrim",
            "--bs=64k",
            "--iodepth=2",
            "--rate_iops=20",
            "--time_based",
            "--runtime=120",
        ],
    )
}

/// `blockwatch copy IMAGE --to TARGET --json`, run to its end.
fn copy(image: &Path, target: &str) -> serde_json::Value {
    let mut copy = command(
        BLOCKWATCH,
        ["copy", image.to_str().unwrap(), "--to", target, "--json"],
    );
    let out = output_within(&mut copy, COPY_LIMIT);
    assert!(
        out.status.success(),
        "copy to {target} failed with {}: {}",
        status_text(out.status),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_json(&String::from_utf8_lossy(&out.stdout), "copy --json")
}

/// The 64 KiB regions where two files differ (the files are equal in size).
fn differing_regions(left: &Path, right: &Path) -> Vec<u64> {
    let left_bytes = std::fs::read(left).unwrap();
    let right_bytes = std::fs::read(right).unwrap();
    assert_eq!(
        left_bytes.len(),
        right_bytes.len(),
        "{} and {} differ in size",
        left.display(),
        right.display()
    );
    left_bytes
        .chunks(64 << 10)
        .zip(right_bytes.chunks(64 << 10))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(index, _)| index as u64)
        .collect()
}

/// The JSON line of a replica-format record.
fn record_checkpoint(record: &Path) -> String {
    let text = std::fs::read_to_string(record)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", record.display()));
    let line = text.lines().next().expect("a record line");
    parse_json(line, "a replica record")["checkpoint"]
        .as_str()
        .expect("the record names a checkpoint")
        .to_string()
}

/// (checkpoint, pin holder) of every pin on the disk.
fn pins(image: &Path) -> Vec<(String, String)> {
    let listing = parse_json(
        &run_program(
            BLOCKWATCH,
            ["checkpoints", image.to_str().unwrap(), "--json"],
        ),
        "checkpoints",
    );
    let mut pins = Vec::new();
    for checkpoint in listing.as_array().unwrap() {
        for pin in checkpoint["pins"].as_array().unwrap() {
            pins.push((
                checkpoint["name"].as_str().unwrap().to_string(),
                pin["holder"].as_str().unwrap().to_string(),
            ));
        }
    }
    pins
}

#[test]
fn kill_9_of_the_server_under_fio_then_an_incremental_copy_misses_nothing() {
    require_tool("fio", "fio");
    let mut random = Xorshift::new(seed("server loop"));
    let cycles = env_count("BLOCKWATCH_CRASH_SERVER_CYCLES", 2);
    let dir = TempDir::new("crash-server");
    let image = dir.join("disk.img");
    let replica = dir.join("replica.img");
    let target = format!("file:{}", replica.display());
    let mut server = Server::start_with_size(dir.path(), &image, "128M");
    let first = copy(&image, &target);
    assert_eq!(first["kind"], "full", "{first:#}");
    let started = Instant::now();
    let (mut changed_total, mut planned_total, mut live_copies) = (0u64, 0u64, 0u32);
    for cycle in 0..cycles {
        let load = random_load(&server.uri(), dir.path(), random.next());
        std::thread::sleep(Duration::from_millis(500 + random.below(2500)));
        server.kill();
        load.kill();
        let changed = differing_regions(&replica, &image).len() as u64;
        // A copy with no server running reads the image offline; one with
        // a server reads its snapshot export. No write runs after the
        // kill, so the image is the disk at the copy's checkpoint.
        let live = random.chance(50);
        let summary = if live {
            server = Server::start(dir.path(), &[&image], &[]);
            live_copies += 1;
            copy(&image, &target)
        } else {
            let summary = copy(&image, &target);
            server = Server::start(dir.path(), &[&image], &[]);
            summary
        };
        assert_eq!(
            summary["kind"], "incremental",
            "cycle {cycle}: after kill -9 the copy must stay incremental: {summary:#}"
        );
        let missed = differing_regions(&replica, &image);
        assert!(
            missed.is_empty(),
            "cycle {cycle}: regions changed before the kill and missing from the replica: {missed:?}\n{summary:#}"
        );
        assert_eq!(
            record_checkpoint(&dir.join("replica.img.blockwatch-replica")),
            summary["checkpoint"].as_str().unwrap(),
            "cycle {cycle}"
        );
        changed_total += changed;
        planned_total += summary["planned_bytes"].as_u64().unwrap();
        eprintln!(
            "server loop cycle {cycle}: {changed} regions changed, {} bytes copied ({}), 0 missed",
            summary["planned_bytes"],
            if live { "live" } else { "offline" }
        );
    }
    eprintln!(
        "server loop: {cycles} cycles ({live_copies} live copies), {changed_total} changed regions, \
         {planned_total} bytes copied, 0 missed changes, 0 mismatches, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    server.stop();
}

/// A target of the copier loop and how to read back what it holds.
enum Kind {
    File,
    Tape,
    Nbd,
}

struct CopierLoop {
    dir: TempDir,
    image: PathBuf,
    server: Option<Server>,
    /// The NBD target's own server (`Kind::Nbd`).
    target_server: Option<Server>,
    kind: Kind,
    /// Tapes are started anew every `TAPE_CYCLES` so that a restore does
    /// not grow with the run.
    tape_number: u32,
}

const TAPE_CYCLES: u32 = 8;
const COPIER_DISK: &str = "128M";

impl CopierLoop {
    fn target(&self) -> String {
        match self.kind {
            Kind::File => format!("file:{}", self.dir.join("replica.img").display()),
            Kind::Tape => format!(
                "tape:{}",
                self.dir
                    .join(format!("disk-{}.tape", self.tape_number))
                    .display()
            ),
            Kind::Nbd => self.target_server.as_ref().unwrap().uri(),
        }
    }

    fn uri(&self) -> String {
        self.server.as_ref().unwrap().uri()
    }

    /// What the target holds, as a file to compare with the image.
    fn held_image(&self) -> PathBuf {
        match self.kind {
            Kind::File => self.dir.join("replica.img"),
            Kind::Nbd => self.dir.join("target.img"),
            Kind::Tape => {
                let restored = self.dir.join("restored.img");
                let _ = std::fs::remove_file(&restored);
                let tape = self.target();
                run_program(
                    BLOCKWATCH,
                    ["restore", tape.as_str(), "--to", restored.to_str().unwrap()],
                );
                restored
            }
        }
    }

    /// The checkpoint the target's record claims.
    fn recorded_checkpoint(&self) -> String {
        match self.kind {
            Kind::File => record_checkpoint(&self.dir.join("replica.img.blockwatch-replica")),
            Kind::Nbd => {
                let targets = PathBuf::from(format!("{}.blockwatch/targets", self.image.display()));
                let record = std::fs::read_dir(&targets)
                    .unwrap()
                    .flatten()
                    .map(|e| e.path())
                    .find(|p| p.to_string_lossy().ends_with(".blockwatch-replica"))
                    .expect("an NBD target's record");
                record_checkpoint(&record)
            }
            Kind::Tape => {
                let listing = parse_json(
                    &run_program(BLOCKWATCH, ["sessions", self.target().as_str(), "--json"]),
                    "sessions --json",
                );
                let last = listing.as_array().and_then(|s| s.last());
                last.and_then(|session| session["checkpoint"].as_str())
                    .unwrap_or_else(|| panic!("no last session in {listing:#}"))
                    .to_string()
            }
        }
    }

    /// A fresh tape, and the old one's pin let go.
    fn next_tape(&mut self) {
        let old_tape = self.target();
        let holder_pins: Vec<(String, String)> = pins(&self.image)
            .into_iter()
            .filter(|(_, holder)| holder.starts_with("tape-"))
            .collect();
        for (checkpoint, holder) in holder_pins {
            run_program(
                BLOCKWATCH,
                ["unpin", self.image.to_str().unwrap(), &checkpoint, &holder],
            );
        }
        std::fs::remove_file(old_tape.trim_start_matches("tape:")).unwrap();
        self.tape_number += 1;
    }
}

/// Starts a copy and kills it with SIGKILL after `delay`; whether it had
/// finished first.
fn kill_a_copy(image: &Path, target: &str, delay: Duration) -> bool {
    let mut copy = command(
        BLOCKWATCH,
        ["copy", image.to_str().unwrap(), "--to", target, "--json"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("start a copy");
    std::thread::sleep(delay);
    let _ = copy.kill();
    copy.wait().unwrap().success()
}

fn copier_loop(kind: Kind, label: &str) {
    require_tool("fio", "fio");
    let mut random = Xorshift::new(seed(label));
    let cycles = env_count("BLOCKWATCH_CRASH_COPIER_CYCLES", 2);
    let dir = TempDir::new(label);
    let image = dir.join("disk.img");
    let server = Server::start_with_size(dir.path(), &image, COPIER_DISK);
    let target_server = matches!(kind, Kind::Nbd).then(|| {
        let target = dir.join("target.img");
        Server::start(
            dir.path(),
            &[&target],
            &["--size", COPIER_DISK, "--no-track"],
        )
    });
    let mut state = CopierLoop {
        dir,
        image,
        server: Some(server),
        target_server,
        kind,
        tape_number: 0,
    };
    let change_set = |state: &CopierLoop, seed: u64, bytes: u64| {
        Fio::start(
            &state.uri(),
            state.dir.path(),
            seed,
            &[
                "--name=changes",
                "--rw=randwrite",
                "--bssplit=4k/40:64k/30:1m/30",
                "--iodepth=8",
                &format!("--io_size={bytes}"),
            ],
        )
        .finish();
    };
    change_set(&state, random.next(), 64 * MIB);
    // Kills land anywhere up to a little past the last whole copy's time
    // (a guess before the first one; the first cycle's copies are full).
    let mut copy_time = Duration::from_secs(2);
    let started = Instant::now();
    let (mut kills, mut finished_before_kill) = (0u32, 0u32);
    for cycle in 0..cycles {
        if matches!(state.kind, Kind::Tape) && cycle > 0 && cycle % TAPE_CYCLES == 0 {
            state.next_tape();
        }
        if cycle > 0 {
            change_set(&state, random.next(), 16 * MIB + random.below(48 * MIB));
        }
        for _ in 0..1 + random.below(3) {
            let window_us = copy_time.as_micros() as u64 * 5 / 4;
            let delay = Duration::from_micros(random.below(window_us.max(1000)));
            kills += 1;
            if kill_a_copy(&state.image, &state.target(), delay) {
                finished_before_kill += 1;
            }
            if random.chance(50) {
                change_set(&state, random.next(), 1 + random.below(4 * MIB));
            }
        }
        let clock = Instant::now();
        let summary = copy(&state.image, &state.target());
        copy_time = clock.elapsed();
        let checkpoint = summary["checkpoint"].as_str().unwrap().to_string();
        let held = state.held_image();
        let differing = differing_regions(&held, &state.image);
        assert!(
            differing.is_empty(),
            "cycle {cycle}: after the killed copies and a rerun the target differs from the disk in regions {differing:?}\n{summary:#}"
        );
        assert_eq!(
            state.recorded_checkpoint(),
            checkpoint,
            "cycle {cycle}: the target's record"
        );
        let copier_pins: Vec<(String, String)> = pins(&state.image)
            .into_iter()
            .filter(|(name, _)| name.starts_with("copy-"))
            .collect();
        assert!(
            copier_pins.len() == 1 && copier_pins[0].0 == checkpoint,
            "cycle {cycle}: only the target's checkpoint {checkpoint} stays pinned: {copier_pins:?}"
        );
        eprintln!(
            "{label} cycle {cycle}: {} ({} bytes, resumed from {}), target equal, record {checkpoint}",
            summary["kind"], summary["planned_bytes"], summary["resumed_from"]
        );
    }
    eprintln!(
        "{label}: {cycles} cycles, {kills} kills ({finished_before_kill} copies finished first), \
         0 mismatches, 0 wrong records, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    state.server.take().unwrap().stop();
    if let Some(target) = state.target_server.take() {
        target.stop();
    }
}

#[test]
fn kill_9_of_the_copier_to_a_replica_then_a_rerun_is_byte_identical() {
    copier_loop(Kind::File, "crash-copier-file");
}

#[test]
fn kill_9_of_the_copier_to_a_tape_then_a_rerun_restores_byte_identical() {
    copier_loop(Kind::Tape, "crash-copier-tape");
}

#[test]
fn kill_9_of_the_copier_to_an_nbd_export_then_a_rerun_is_byte_identical() {
    copier_loop(Kind::Nbd, "crash-copier-nbd");
}
