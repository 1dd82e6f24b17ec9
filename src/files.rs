//! Files out of backups on the command line: `files` (what a backup
//! holds at a checkpoint) and `restore --file` (files and trees as they
//! were, with their metadata, or one file to stdout).

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use copier::files::{FileEntry, Listing, disk_map, list, restore_files, restore_to_writer};
use copier::s3::Repository;
use copier::view::{BackupView, ViewSpec};

use crate::s3::S3Flags;

#[derive(Debug, Args)]
pub struct FilesArgs {
    /// The backup: tape:PATH... (a chain, in order), s3://BUCKET/PREFIX[#SESSION],
    /// or a replica file; then, optionally, a glob the paths must match
    /// ('*.conf', '/etc/**').
    #[arg(value_name = "TARGET... [PATH-GLOB]", required = true, num_args = 1..)]
    words: Vec<String>,
    /// The checkpoint to list (default: the newest the backup holds).
    #[arg(long, value_name = "CHECKPOINT")]
    at: Option<String>,
    /// Print the listing as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    s3: S3Flags,
}

/// The backup's words and the glob after them: more `tape:` words extend
/// a chain; any other word after the first is the glob (one at most).
pub fn split_target(words: &[String]) -> anyhow::Result<(Vec<String>, Option<String>)> {
    let mut target = vec![words[0].clone()];
    let mut glob = None;
    for word in &words[1..] {
        if word.starts_with("tape:") && glob.is_none() {
            target.push(word.clone());
        } else if glob.is_none() {
            glob = Some(word.clone());
        } else {
            bail!(
                "one path glob at most: {word:?} follows {:?}",
                glob.unwrap_or_default()
            );
        }
    }
    Ok((target, glob))
}

/// Opens the backup `words` name at `at`.
pub fn open_view(
    words: &[String],
    at: Option<&str>,
    flags: &S3Flags,
) -> anyhow::Result<BackupView> {
    let spec = ViewSpec::parse(words)?;
    let options = flags.options();
    let open_repository =
        |location: &copier::s3::S3Location| Repository::open(location, &options, false);
    BackupView::open(&spec, at, &open_repository)
        .with_context(|| format!("cannot read {}", words.join(" ")))
}

pub fn files(args: FilesArgs) -> anyhow::Result<ExitCode> {
    let (target, glob) = split_target(&args.words)?;
    if let Some(glob) = &glob {
        fsmap::select::validate(&fsmap::select::Criteria {
            include: vec![glob.clone()],
            ..Default::default()
        })
        .map_err(anyhow::Error::msg)?;
    }
    let view = open_view(&target, args.at.as_deref(), &args.s3)?;
    let listing = list(&disk_map(&view), glob.as_deref());
    if args.json {
        let report = serde_json::json!({
            "backup": view.description,
            "checkpoint": view.checkpoint,
            "session": view.session,
            "filesystems": listing.filesystems,
            "files": listing.files,
            "notes": listing.notes,
        });
        out!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    for note in &listing.notes {
        eprintln!("blockwatch: {note}");
    }
    for file in &listing.files {
        out!("{}", file_line(&listing, file));
    }
    eprintln!(
        "{} names in {} at checkpoint {}",
        listing.files.len(),
        view.description,
        view.checkpoint
    );
    Ok(ExitCode::SUCCESS)
}

/// `-rw-r--r-- 1 0 0 10000 2026-12-02 21:30:01 /docs/a.txt (inode 12)`.
fn file_line(listing: &Listing, file: &FileEntry) -> String {
    let kind = match file.kind.as_str() {
        "/" => 'd',
        "@" => 'l',
        "F" => '-',
        _ => '?',
    };
    let mut mode = String::from(kind);
    for shift in [6, 3, 0] {
        let bits = (file.permissions >> shift) & 7;
        mode.push(if bits & 4 != 0 { 'r' } else { '-' });
        mode.push(if bits & 2 != 0 { 'w' } else { '-' });
        mode.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    let path = if listing.filesystems > 1 {
        format!("{}:{}", file.partition, file.path)
    } else {
        file.path.clone()
    };
    format!(
        "{mode} {:>3} {:>5} {:>5} {:>12} {} {path} (inode {})",
        file.links,
        file.uid,
        file.gid,
        file.size_bytes,
        utc_text(file.mtime),
        file.inode
    )
}

/// `YYYY-MM-DD HH:MM:SS` in UTC.
fn utc_text(seconds: i64) -> String {
    let days = seconds.div_euclid(86400);
    let within = seconds.rem_euclid(86400);
    let (year, month, day) = copier::s3::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        within / 3600,
        within / 60 % 60,
        within % 60
    )
}

/// `restore TARGET --file PATH... --to DIR|-`.
pub fn restore(
    words: &[String],
    at: Option<&str>,
    files: &[String],
    to: &str,
    json: bool,
    flags: &S3Flags,
) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let view = open_view(words, at, flags)?;
    let disk = disk_map(&view);
    if to == "-" {
        let [file] = files else {
            bail!("--to - writes one file to stdout: give one --file");
        };
        let mut stdout = std::io::stdout().lock();
        match restore_to_writer(&view, &disk, file, &mut stdout) {
            Ok(_) => return Ok(ExitCode::SUCCESS),
            Err(copier::files::FileRestoreError::Write { source, .. })
                if source.kind() == std::io::ErrorKind::BrokenPipe =>
            {
                return Ok(ExitCode::SUCCESS);
            }
            Err(error) => return Err(error.into()),
        }
    }
    let to_dir = std::path::PathBuf::from(to);
    if to_dir.exists() && !to_dir.is_dir() {
        bail!("--to {to}: files are restored into a directory (or - for one file to stdout)");
    }
    std::fs::create_dir_all(&to_dir).with_context(|| format!("cannot create {to}"))?;
    let summary = restore_files(&view, &disk, files, &to_dir)?;
    let seconds = started.elapsed().as_secs_f64();
    if json {
        let report = serde_json::json!({
            "backup": view.description,
            "checkpoint": view.checkpoint,
            "to": to,
            "summary": summary,
            "seconds": seconds,
        });
        out!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    for warning in &summary.warnings {
        eprintln!("blockwatch: {warning}");
    }
    out!(
        "restored {} files ({} bytes of data), {} directories, {} symlinks, {} hard links, {} special files from {} at checkpoint {} into {to}; {seconds:.2} s",
        summary.files,
        summary.data_bytes,
        summary.directories,
        summary.symlinks,
        summary.hard_links,
        summary.special_files,
        view.description,
        view.checkpoint
    );
    Ok(ExitCode::SUCCESS)
}
