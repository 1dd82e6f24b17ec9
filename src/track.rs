//! `checkpoint`, `checkpoints`, `changes`, `status`, `pin`, `unpin`: ask
//! the running server through its control socket, or, when no server
//! runs, open the state directory and answer directly (same code, same
//! output). Queries open it read-only: they never change the state
//! directory, so a crash during one costs the next start nothing.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use control::proto::{
    ChangesReply, ChangesRequest, CheckpointInfo, CheckpointReply, CheckpointsReply,
    FileChangesReply, FileInfo, PinReply, StatusInfo, StatusReply,
};
use control::transport::{self, CallError};
use control::{Handler, Request};
use serde_json::Value;
use tracker::catalog::CatalogError;
use tracker::tracker::{default_state_dir, state_is_locked};
use tracker::{OpenError, Tracker, TrackerOptions};

const DEFAULT_IMAGE: &str = "blockwatch.img";

#[derive(Debug, Args)]
pub struct StateArgs {
    /// Tracking state directory (default: IMAGE.blockwatch beside the image).
    #[arg(long, value_name = "DIR", global = true)]
    state: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CheckpointArgs {
    /// [IMAGE] NAME: close the current generation under NAME (IMAGE
    /// defaults to ./blockwatch.img).
    #[arg(value_name = "[IMAGE] NAME", num_args = 0..=2)]
    words: Vec<String>,
    /// Delete checkpoint NAME instead, merging its changes into the next.
    #[arg(long, value_name = "NAME")]
    delete: Option<String>,
    #[command(flatten)]
    state: StateArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    image: Option<PathBuf>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    state: StateArgs,
}

#[derive(Debug, Args)]
pub struct PinArgs {
    /// [IMAGE] CHECKPOINT HOLDER (IMAGE defaults to ./blockwatch.img).
    #[arg(value_name = "[IMAGE] CHECKPOINT HOLDER", num_args = 2..=3)]
    words: Vec<String>,
    /// Why HOLDER needs the checkpoint (shown by `checkpoints` and in the
    /// refusal of a delete).
    #[arg(long, value_name = "TEXT", default_value = "")]
    reason: String,
    #[command(flatten)]
    state: StateArgs,
}

#[derive(Debug, Args)]
pub struct ChangesArgs {
    image: Option<PathBuf>,
    /// Changes since this checkpoint.
    #[arg(long, value_name = "NAME")]
    since: String,
    /// Up to this later checkpoint (default: up to now).
    #[arg(long, value_name = "NAME")]
    until: Option<String>,
    #[arg(long)]
    json: bool,
    /// Print nothing; exit 1 when nothing changed.
    #[arg(long, short)]
    quiet: bool,
    /// List the files (ext2/3/4) that changed: + created, - deleted,
    /// R renamed, M modified, ~ unchanged inode in a changed region.
    #[arg(long)]
    files: bool,
    /// With --files: only files matching GLOB ("*.db", "/var/lib/**").
    #[arg(long, value_name = "GLOB", requires = "files")]
    include: Vec<String>,
    /// With --files: leave out files matching GLOB.
    #[arg(long, value_name = "GLOB", requires = "files")]
    exclude: Vec<String>,
    /// With --files: only files at least this large (e.g. 1M).
    #[arg(long, value_name = "SIZE", requires = "files")]
    min_size: Option<String>,
    /// With --files: only files at most this large.
    #[arg(long, value_name = "SIZE", requires = "files")]
    max_size: Option<String>,
    #[command(flatten)]
    state: StateArgs,
}

fn image_or_default(image: Option<&PathBuf>) -> PathBuf {
    image
        .cloned()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_IMAGE))
}

pub fn checkpoint(args: CheckpointArgs) -> anyhow::Result<ExitCode> {
    let (image, request) = match (&args.delete, args.words.as_slice()) {
        (Some(name), []) => (
            DEFAULT_IMAGE,
            Request::DeleteCheckpoint { name: name.clone() },
        ),
        (Some(name), [image]) => (
            image.as_str(),
            Request::DeleteCheckpoint { name: name.clone() },
        ),
        (None, [name]) => (DEFAULT_IMAGE, Request::Checkpoint { name: name.clone() }),
        (None, [image, name]) => (image.as_str(), Request::Checkpoint { name: name.clone() }),
        _ => bail!(
            "usage: blockwatch checkpoint [IMAGE] NAME, or blockwatch checkpoint [IMAGE] --delete NAME"
        ),
    };
    let reply = ask(Path::new(image), args.state.state.as_deref(), &request)?;
    match request {
        Request::Checkpoint { .. } => {
            let CheckpointReply { checkpoint } = transport::typed(reply)?;
            out!(
                "checkpoint {} created (generation {}, {} bytes changed in it)",
                checkpoint.name,
                checkpoint.generation,
                checkpoint.changed_bytes
            );
        }
        _ => out!(
            "checkpoint {} deleted; its changes now count in the next one",
            args.delete.unwrap_or_default()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// The IMAGE, CHECKPOINT and HOLDER of `pin`/`unpin`.
fn pin_words(args: &PinArgs) -> anyhow::Result<(PathBuf, String, String)> {
    match args.words.as_slice() {
        [name, holder] => Ok((PathBuf::from(DEFAULT_IMAGE), name.clone(), holder.clone())),
        [image, name, holder] => Ok((PathBuf::from(image), name.clone(), holder.clone())),
        _ => bail!("usage: blockwatch pin|unpin [IMAGE] CHECKPOINT HOLDER"),
    }
}

pub fn pin(args: PinArgs) -> anyhow::Result<ExitCode> {
    let (image, name, holder) = pin_words(&args)?;
    let request = Request::Pin {
        name,
        holder,
        reason: args.reason.clone(),
    };
    let PinReply { checkpoint, pin } =
        transport::typed(ask(&image, args.state.state.as_deref(), &request)?)?;
    out!("checkpoint {checkpoint} pinned by {}", pin.holder);
    Ok(ExitCode::SUCCESS)
}

pub fn unpin(args: PinArgs) -> anyhow::Result<ExitCode> {
    let (image, name, holder) = pin_words(&args)?;
    let request = Request::Unpin {
        name: name.clone(),
        holder: holder.clone(),
    };
    ask(&image, args.state.state.as_deref(), &request)?;
    out!("checkpoint {name} no longer pinned by {holder}");
    Ok(ExitCode::SUCCESS)
}

pub fn checkpoints(args: ListArgs) -> anyhow::Result<ExitCode> {
    let image = image_or_default(args.image.as_ref());
    let reply = ask(&image, args.state.state.as_deref(), &Request::Checkpoints)?;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&reply["checkpoints"])?);
        return Ok(ExitCode::SUCCESS);
    }
    let CheckpointsReply { checkpoints } = transport::typed(reply)?;
    for line in checkpoint_table(&checkpoints) {
        out!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Columns sized to their widest cell, text left and numbers right.
fn checkpoint_table(checkpoints: &[CheckpointInfo]) -> Vec<String> {
    let header = ["NAME", "GENERATION", "CREATED", "CHANGED_BYTES", "PINS"].map(String::from);
    let mut rows = vec![header];
    for checkpoint in checkpoints {
        let pins = if checkpoint.pins.is_empty() {
            "-".to_string()
        } else {
            checkpoint
                .pins
                .iter()
                .map(|pin| match pin.reason.as_str() {
                    "" => pin.holder.clone(),
                    reason => format!("{} ({reason})", pin.holder),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        rows.push([
            checkpoint.name.clone(),
            checkpoint.generation.to_string(),
            local_time_iso8601(checkpoint.created_unix_seconds),
            checkpoint.changed_bytes.to_string(),
            pins,
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|column| {
            rows.iter()
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|row| {
            let line = format!(
                "{:<w0$}  {:>w1$}  {:<w2$}  {:>w3$}  {}",
                row[0],
                row[1],
                row[2],
                row[3],
                row[4],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
                w3 = widths[3],
            );
            line.trim_end().to_string()
        })
        .collect()
}

/// `2026-12-02T08:15:00+01:00`: the local time and its offset from UTC.
fn local_time_iso8601(unix_seconds: u64) -> String {
    let time = libc::time_t::try_from(unix_seconds).unwrap_or(libc::time_t::MAX);
    // SAFETY: localtime_r writes only into `tm`, which we own (glibc reads
    // the time zone from TZ or /etc/localtime on first use).
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&time, &mut tm).is_null() {
            return unix_seconds.to_string();
        }
        tm
    };
    let offset_minutes = tm.tm_gmtoff / 60;
    let sign = if offset_minutes < 0 { '-' } else { '+' };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{sign}{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        offset_minutes.abs() / 60,
        offset_minutes.abs() % 60
    )
}

pub fn changes(args: ChangesArgs) -> anyhow::Result<ExitCode> {
    let size = |text: &Option<String>| {
        text.as_deref()
            .map(crate::size::parse_size)
            .transpose()
            .map_err(anyhow::Error::msg)
    };
    let request = Request::Changes(ChangesRequest {
        since: args.since.clone(),
        until: args.until.clone(),
        files: args.files,
        include: args.include.clone(),
        exclude: args.exclude.clone(),
        min_size_bytes: size(&args.min_size)?,
        max_size_bytes: size(&args.max_size)?,
    });
    let image = image_or_default(args.image.as_ref());
    let reply = ask(&image, args.state.state.as_deref(), &request)?;
    if args.files {
        return file_changes(&args, reply);
    }
    let changes: ChangesReply = transport::typed(reply.clone())?;
    if let Some(code) = quiet_or_json(&args, &reply, changes.extents.is_empty())? {
        return Ok(code);
    }
    for extent in &changes.extents {
        let status = serde_json::to_value(extent.status)?;
        out!(
            "{:>16} {:>16} {} {}",
            extent.offset_bytes,
            extent.length_bytes,
            status.as_str().unwrap_or_default(),
            if extent.exact { "exact" } else { "whole" }
        );
    }
    eprintln!(
        "{} bytes changed in {} extents since {} (granularity {}, precision {})",
        changes.changed_bytes,
        changes.extents.len(),
        changes.since,
        changes.granularity_bytes,
        changes.precision_bytes
    );
    Ok(ExitCode::SUCCESS)
}

/// `--quiet` (exit 1 when nothing changed) and `--json` (the reply as
/// is); None when the caller prints text.
fn quiet_or_json(
    args: &ChangesArgs,
    reply: &Value,
    nothing_changed: bool,
) -> anyhow::Result<Option<ExitCode>> {
    if args.quiet {
        return Ok(Some(if nothing_changed {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        }));
    }
    if args.json {
        out!("{}", serde_json::to_string_pretty(reply)?);
        return Ok(Some(ExitCode::SUCCESS));
    }
    Ok(None)
}

fn file_changes(args: &ChangesArgs, reply: Value) -> anyhow::Result<ExitCode> {
    let report: FileChangesReply = transport::typed(reply.clone())?;
    if let Some(code) = quiet_or_json(args, &reply, report.files.is_empty())? {
        return Ok(code);
    }
    for note in &report.notes {
        eprintln!("blockwatch: {note}");
    }
    for file in &report.files {
        out!("{}", file_line(file));
    }
    for fs in &report.filesystems {
        let metadata: Vec<String> = fs
            .metadata_bytes
            .iter()
            .map(|(kind, bytes)| format!("{kind} {bytes}"))
            .collect();
        let label = match fs.partition {
            0 => "filesystem".to_string(),
            number => format!("partition {number}"),
        };
        eprintln!(
            "{label}: metadata changed: {}; changed bytes owned by nothing: {}",
            if metadata.is_empty() {
                "none".to_string()
            } else {
                metadata.join(", ")
            },
            fs.unowned_bytes
        );
    }
    eprintln!(
        "{} files listed; copy set {} bytes in {} ranges",
        report.files.len(),
        report.copy_bytes,
        report.copy_set.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// One `zfs diff`-like line: status, kind, path (old -> new for renames).
fn file_line(file: &FileInfo) -> String {
    let mut path = file.path.clone().unwrap_or_default();
    if file.directory && !path.ends_with('/') {
        path.push('/');
    }
    let detail = match file.status.as_str() {
        "R" => format!(
            "{} -> {path}",
            file.old_paths.first().map_or("?", String::as_str)
        ),
        _ => path,
    };
    let (status, inode) = (&file.status, file.inode);
    match file.changed_bytes {
        0 => format!("{status}\t{detail}\t(inode {inode})"),
        bytes => format!("{status}\t{detail}\t(inode {inode}, {bytes} bytes in changed regions)"),
    }
}

pub fn status(args: ListArgs) -> anyhow::Result<ExitCode> {
    let image = image_or_default(args.image.as_ref());
    let reply = ask(&image, args.state.state.as_deref(), &Request::Status)?;
    if args.json {
        let mut printed = reply["status"].clone();
        if let (Some(snapshot), Some(object)) = (reply.get("snapshot"), printed.as_object_mut()) {
            object.insert("snapshot".into(), snapshot.clone());
        }
        out!("{}", serde_json::to_string_pretty(&printed)?);
        return Ok(ExitCode::SUCCESS);
    }
    let StatusReply { status, snapshot } = transport::typed(reply)?;
    for (key, value) in status_lines(&status) {
        out!("{key:<18} {value}");
    }
    if let Some(open) = snapshot {
        let state = match &open.broken {
            Some(reason) => format!("broken: {reason}"),
            None => format!(
                "{} of {} bytes in its store ({} regions copied out)",
                open.store_bytes, open.max_store_bytes, open.regions_copied
            ),
        };
        out!(
            "{:<18} {} at checkpoint {}, export {}; {state}",
            "snapshot:",
            "open",
            open.checkpoint,
            open.export
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `status` as readable key/value pairs (`--json` has every field).
fn status_lines(status: &StatusInfo) -> Vec<(String, String)> {
    let mut lines = vec![
        ("image:", status.image.display().to_string()),
        ("state directory:", status.state_dir.display().to_string()),
        (
            "server:",
            if status.offline {
                "not running (answered from the state directory)"
            } else {
                "running"
            }
            .to_string(),
        ),
        ("generation:", status.generation.to_string()),
        (
            "granularity:",
            format!("{} bytes", status.granularity_bytes),
        ),
        ("precision:", format!("{} bytes", status.precision_bytes)),
        ("size:", format!("{} bytes", status.size_bytes)),
        ("dirty:", format!("{} bytes", status.dirty_bytes)),
        ("unsaved:", format!("{} bytes", status.unsaved_bytes)),
        ("journal:", format!("{} bytes", status.journal_bytes)),
        ("checkpoints:", status.checkpoint_count.to_string()),
        (
            "flush work:",
            format!(
                "{} flushes, p50 {:.1} us, p99 {:.1} us, max {:.1} us",
                status.flush_count,
                status.flush_work_us_p50,
                status.flush_work_us_p99,
                status.flush_work_us_max
            ),
        ),
        ("last shutdown:", status.last_shutdown.clone()),
        (
            "journal failure:",
            status
                .journal_failure
                .as_ref()
                .map_or("none".into(), |failure| journal_failure_line(failure)),
        ),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_string(), value))
    .collect::<Vec<_>>();
    lines.push((
        "file map:".into(),
        match &status.file_map {
            None => "none (--no-files)".into(),
            Some(map) => format!(
                "built in {} ms; last update {} us ({} inodes); flushes attributed {}, unattributed {}",
                map.build_ms,
                map.last_update_us,
                map.last_update_inodes,
                map.attributed_flushes,
                map.unattributed_flushes
            ),
        },
    ));
    if status.warnings.is_empty() {
        lines.push(("warnings:".into(), "none".into()));
    }
    for warning in &status.warnings {
        lines.push(("warning:".into(), warning.clone()));
    }
    lines
}

/// What a failed journal means for the disk, beside the error itself.
fn journal_failure_line(failure: &str) -> String {
    format!(
        "{failure}. Until the journal can be written again, writes to regions not written since \
         the last checkpoint fail with EIO and checkpoints (so copies) are refused; other writes \
         and flushes go on and every change stays reported. Free space or fix the device: the \
         server then rewrites the journal by itself at the next write or flush (tried at most \
         once a second), or restart the server"
    )
}

/// Sends `request` to the server tracking `image`, or answers it offline.
/// Returns the reply's wire object (`--json` prints it as it is).
fn ask(image: &Path, state: Option<&Path>, request: &Request) -> anyhow::Result<Value> {
    let image = std::path::absolute(image)?;
    let state_dir = state.map_or_else(|| default_state_dir(&image), Path::to_path_buf);
    let reply = match transport::request(&state_dir, request) {
        Ok(reply) => reply,
        Err(CallError::Unreachable(_)) if state_is_locked(&state_dir) => bail!(
            "a blockwatch process holds {} but its control socket does not answer; try again when it is done",
            state_dir.display()
        ),
        Err(CallError::Unreachable(_)) => offline(&image, &state_dir, request)?,
        Err(error) => return Err(error.into()),
    };
    // A refusal becomes the error here; the reply stays as sent.
    transport::typed::<DiscardFields>(reply.clone())?;
    Ok(reply)
}

/// Accepts any successful reply: `ask` only checks `ok` with it.
#[derive(Debug, serde::Deserialize)]
struct DiscardFields {}

fn offline(image: &Path, state_dir: &Path, request: &Request) -> anyhow::Result<Value> {
    if !state_dir.exists() {
        bail!(
            "{} has no tracking state ({} does not exist); serve it with blockwatch serve first",
            image.display(),
            state_dir.display()
        );
    }
    let size_bytes = image_size(image)?;
    let options = TrackerOptions {
        image: image.to_path_buf(),
        state_dir: Some(state_dir.to_path_buf()),
        granularity_bytes: None,
        precision_bytes: None,
        journal_wrapper: None,
        files: true,
    };
    if request.is_query() {
        match Tracker::open_read_only(&options, size_bytes) {
            Ok(tracker) => return Ok(answer(&tracker, image, request)),
            // A crash left the catalog needing a repair that only a
            // writable open makes; after a crash there is no clean marker
            // to lose, so the writable open below costs nothing.
            Err(OpenError::Catalog {
                source: CatalogError::NeedsRepair,
                ..
            }) => eprintln!(
                "blockwatch: {}: the catalog needs a repair after an unclean stop; opening it for writing",
                image.display()
            ),
            Err(error) => return Err(error.into()),
        }
    }
    let tracker = Tracker::open(&options, size_bytes)?;
    tracker.start();
    let reply = answer(&tracker, image, request);
    match tracker.close() {
        Ok(()) => {}
        // A query's answer stands without the clean-shutdown marker (a
        // full state directory after a crash): the next open recovers
        // from the journal, as it would have anyway.
        Err(error) if request.is_query() => eprintln!(
            "blockwatch: {}: {}",
            image.display(),
            tracker::tracker::error_chain(&error)
        ),
        Err(error) => return Err(error.into()),
    }
    Ok(reply)
}

fn answer(tracker: &Tracker, image: &Path, request: &Request) -> Value {
    for warning in tracker.warnings() {
        eprintln!("blockwatch: {}: {warning}", image.display());
    }
    match tracker.handle(request.clone()) {
        Ok(reply) => reply.to_wire(),
        Err(message) => control::proto::error_to_wire(&message),
    }
}

fn image_size(image: &Path) -> anyhow::Result<u64> {
    use std::io::Seek;
    let mut file =
        std::fs::File::open(image).with_context(|| format!("cannot open {}", image.display()))?;
    Ok(file.seek(std::io::SeekFrom::End(0))?)
}
