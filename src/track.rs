//! `checkpoint`, `checkpoints`, `changes`, `status`: ask the running server
//! through its control socket, or, when no server runs, open the state
//! directory under its lock and answer directly (same code, same output).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};
use tracker::control;
use tracker::tracker::{default_state_dir, state_is_locked};
use tracker::{Tracker, TrackerOptions};

/// `println!` that treats a closed stdout (`| head`) as the reader being
/// done: exit 0 rather than panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(error) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if error.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            return Err(error.into());
        }
    }};
}

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

pub fn checkpoint(args: CheckpointArgs) -> anyhow::Result<ExitCode> {
    let (image, request) = match (&args.delete, args.words.as_slice()) {
        (Some(name), []) => (
            PathBuf::from(DEFAULT_IMAGE),
            json!({"op": "delete-checkpoint", "name": name}),
        ),
        (Some(name), [image]) => (
            PathBuf::from(image),
            json!({"op": "delete-checkpoint", "name": name}),
        ),
        (None, [name]) => (
            PathBuf::from(DEFAULT_IMAGE),
            json!({"op": "checkpoint", "name": name}),
        ),
        (None, [image, name]) => (
            PathBuf::from(image),
            json!({"op": "checkpoint", "name": name}),
        ),
        _ => bail!(
            "usage: blockwatch checkpoint [IMAGE] NAME, or blockwatch checkpoint [IMAGE] --delete NAME"
        ),
    };
    let reply = ask(&image, args.state.state.as_deref(), &request)?;
    match reply.get("checkpoint") {
        Some(checkpoint) => out!(
            "checkpoint {} created (generation {}, {} bytes changed in it)",
            checkpoint["name"].as_str().unwrap_or_default(),
            checkpoint["generation"],
            checkpoint["changed_bytes"]
        ),
        None => out!(
            "checkpoint {} deleted; its changes now count in the next one",
            request["name"].as_str().unwrap_or_default()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn checkpoints(args: ListArgs) -> anyhow::Result<ExitCode> {
    let image = args
        .image
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_IMAGE));
    let reply = ask(
        &image,
        args.state.state.as_deref(),
        &json!({"op": "checkpoints"}),
    )?;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&reply["checkpoints"])?);
        return Ok(ExitCode::SUCCESS);
    }
    out!(
        "{:<24} {:>10} {:>12} {:>16}",
        "NAME",
        "GENERATION",
        "CREATED",
        "CHANGED_BYTES"
    );
    for checkpoint in reply["checkpoints"].as_array().into_iter().flatten() {
        out!(
            "{:<24} {:>10} {:>12} {:>16}",
            checkpoint["name"].as_str().unwrap_or_default(),
            checkpoint["generation"],
            checkpoint["created_unix"],
            checkpoint["changed_bytes"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn changes(args: ChangesArgs) -> anyhow::Result<ExitCode> {
    if args.files {
        return file_changes(args);
    }
    let image = args
        .image
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_IMAGE));
    let request = json!({"op": "changes", "since": args.since, "until": args.until});
    let reply = ask(&image, args.state.state.as_deref(), &request)?;
    let extents = reply["extents"].as_array().cloned().unwrap_or_default();
    if let Some(code) = quiet_or_json(&args, &reply, extents.is_empty())? {
        return Ok(code);
    }
    for extent in &extents {
        out!(
            "{:>16} {:>16} {}",
            extent["offset"],
            extent["length"],
            extent["status"].as_str().unwrap_or_default()
        );
    }
    eprintln!(
        "{} bytes changed in {} extents since {} (granularity {})",
        reply["changed_bytes"],
        extents.len(),
        reply["since"].as_str().unwrap_or_default(),
        reply["granularity"]
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

fn file_changes(args: ChangesArgs) -> anyhow::Result<ExitCode> {
    let image = args
        .image
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_IMAGE));
    let size = |text: &Option<String>| {
        text.as_deref()
            .map(crate::size::parse_size)
            .transpose()
            .map_err(anyhow::Error::msg)
    };
    let request = json!({
        "op": "changes", "files": true, "since": args.since, "until": args.until,
        "include": args.include, "exclude": args.exclude,
        "min_size": size(&args.min_size)?, "max_size": size(&args.max_size)?,
    });
    let reply = ask(&image, args.state.state.as_deref(), &request)?;
    let files = reply["files"].as_array().cloned().unwrap_or_default();
    if let Some(code) = quiet_or_json(&args, &reply, files.is_empty())? {
        return Ok(code);
    }
    for note in reply["notes"].as_array().into_iter().flatten() {
        eprintln!("blockwatch: {}", note.as_str().unwrap_or_default());
    }
    for file in &files {
        out!("{}", file_line(file));
    }
    for fs in reply["filesystems"].as_array().into_iter().flatten() {
        let metadata: Vec<String> = fs["metadata_bytes"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(kind, bytes)| format!("{kind} {bytes}"))
            .collect();
        let label = match fs["partition"].as_u64() {
            Some(0) | None => "filesystem".to_string(),
            Some(number) => format!("partition {number}"),
        };
        eprintln!(
            "{label}: metadata changed: {}; changed bytes owned by nothing: {}",
            if metadata.is_empty() {
                "none".to_string()
            } else {
                metadata.join(", ")
            },
            fs["unowned_bytes"]
        );
    }
    eprintln!(
        "{} files listed; copy set {} bytes in {} ranges",
        files.len(),
        reply["copy_bytes"],
        reply["copy_set"].as_array().map_or(0, Vec::len)
    );
    Ok(ExitCode::SUCCESS)
}

/// One `zfs diff`-like line: status, kind, path (old -> new for renames).
fn file_line(file: &Value) -> String {
    let text = |key: &str| file[key].as_str().unwrap_or_default().to_string();
    let mut path = text("path");
    if file["directory"] == json!(true) && !path.ends_with('/') {
        path.push('/');
    }
    let status = text("status");
    let detail = match status.as_str() {
        "R" => format!("{} -> {path}", file["old_paths"][0].as_str().unwrap_or("?")),
        _ => path,
    };
    let inode = &file["inode"];
    match file["changed_bytes"].as_u64() {
        Some(bytes) if bytes > 0 => {
            format!("{status}\t{detail}\t(inode {inode}, {bytes} bytes in changed regions)")
        }
        _ => format!("{status}\t{detail}\t(inode {inode})"),
    }
}

pub fn status(args: ListArgs) -> anyhow::Result<ExitCode> {
    let image = args
        .image
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_IMAGE));
    let reply = ask(
        &image,
        args.state.state.as_deref(),
        &json!({"op": "status"}),
    )?;
    let status = &reply["status"];
    if args.json {
        out!("{}", serde_json::to_string_pretty(status)?);
        return Ok(ExitCode::SUCCESS);
    }
    for (key, value) in status.as_object().into_iter().flatten() {
        match value {
            Value::String(text) => out!("{key}: {text}"),
            Value::Array(items) if items.is_empty() => out!("{key}: none"),
            other => out!("{key}: {other}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Sends `request` to the server tracking `image`, or answers it offline.
fn ask(image: &Path, state: Option<&Path>, request: &Value) -> anyhow::Result<Value> {
    let image = std::path::absolute(image)?;
    let state_dir = state.map_or_else(|| default_state_dir(&image), Path::to_path_buf);
    let reply = match control::request(&state_dir, request) {
        Ok(reply) => reply,
        Err(_) if state_is_locked(&state_dir) => bail!(
            "a blockwatch process holds {} but its control socket does not answer; try again when it is done",
            state_dir.display()
        ),
        Err(_) => offline(&image, &state_dir, request)?,
    };
    if reply["ok"] != json!(true) {
        bail!(
            "{}",
            reply["error"]
                .as_str()
                .unwrap_or("the server refused the request")
        );
    }
    Ok(reply)
}

fn offline(image: &Path, state_dir: &Path, request: &Value) -> anyhow::Result<Value> {
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
        journal_wrapper: None,
        files: true,
    };
    let tracker = Tracker::open(&options, size_bytes)?;
    for warning in tracker.warnings() {
        eprintln!("blockwatch: {}: {warning}", image.display());
    }
    tracker.start();
    let reply = control::handle(&tracker, request);
    tracker.close()?;
    Ok(reply)
}

fn image_size(image: &Path) -> anyhow::Result<u64> {
    use std::io::Seek;
    let mut file =
        std::fs::File::open(image).with_context(|| format!("cannot open {}", image.display()))?;
    Ok(file.seek(std::io::SeekFrom::End(0))?)
}
