//! `restore` (a chain of tapes onto an image or an NBD export) and the
//! check of a chain of tapes that `verify tape:A [tape:B ...]` runs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::bail;
use clap::Args;
use copier::tape::{
    ChainReport, RestoreTarget, SessionReport, TapeError, restore, verify_chain_until_damage,
};
use serde_json::{Value, json};

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The tapes of the chain, in order: tape:PATH (a file or a tape
    /// drive); or one s3://BUCKET/PREFIX[#SESSION] (default: the newest
    /// session, when the repository holds one disk's).
    /// With --file, a replica file may be named too.
    #[arg(value_name = "tape:PATH | s3://...", required = true, num_args = 1..)]
    tapes: Vec<String>,
    /// Where to: an image file (created sparse if missing; an existing one
    /// must be empty or of the disk's size), a block device, or an NBD
    /// export (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH).
    #[arg(long, value_name = "IMAGE|URI")]
    to: String,
    /// Stop after the session that brings the disk to this checkpoint.
    #[arg(long, value_name = "CHECKPOINT")]
    until: Option<String>,
    /// Restore this file or directory tree (at its own path under --to
    /// DIR; with --to -, one file's contents to stdout) instead of the
    /// whole disk; give it as often as needed. N:/PATH on a disk with
    /// several filesystems (partition N).
    #[arg(long = "file", value_name = "PATH")]
    files: Vec<String>,
    /// With --file: the checkpoint the files are taken from (default: the
    /// newest the backup holds).
    #[arg(long, value_name = "CHECKPOINT")]
    at: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    s3: crate::s3::S3Flags,
}

/// The file or drive a `tape:PATH` word names (the prefix may be left out).
pub fn tape_path(word: &str) -> PathBuf {
    PathBuf::from(word.strip_prefix("tape:").unwrap_or(word))
}

pub fn run(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    if !args.files.is_empty() {
        if args.until.is_some() && args.at.is_some() {
            bail!("give the checkpoint once: --at (or --until)");
        }
        let at = args.at.as_deref().or(args.until.as_deref());
        return crate::files::restore(&args.tapes, at, &args.files, &args.to, args.json, &args.s3);
    }
    if args.at.is_some() {
        bail!("--at is for --file; a whole disk is restored --until a checkpoint");
    }
    if args.tapes.iter().any(|word| word.starts_with("s3://")) {
        let [word] = args.tapes.as_slice() else {
            bail!(
                "restore takes one s3://BUCKET/PREFIX[#SESSION]: its manifest holds the whole disk"
            );
        };
        if args.until.is_some() {
            bail!(
                "--until is for tapes; name the session: s3://BUCKET/PREFIX#SESSION (blockwatch sessions lists them)"
            );
        }
        return crate::s3::restore(word, &args.s3, &args.to, args.json);
    }
    let tapes: Vec<PathBuf> = args.tapes.iter().map(|w| tape_path(w)).collect();
    if args.to.starts_with("tape:") {
        bail!("restore writes an image or an NBD export, not a tape: --to IMAGE|nbd://...");
    }
    let target = RestoreTarget::parse(&args.to)?;
    let started = Instant::now();
    let summary = restore(&tapes, &target, args.until.as_deref())?;
    let seconds = started.elapsed().as_secs_f64();
    let applied = &summary.chain.sessions[summary.first_applied..];
    let last = &applied.last().expect("a restore applies a session").header;
    let mib_per_second = (summary.data_bytes as f64 / (1 << 20) as f64) / seconds.max(1e-6);
    if args.json {
        let report = json!({
            "target": target.describe(),
            "checkpoint": last.target.checkpoint,
            "generation": last.target.generation,
            "image_id": last.source_id,
            "size_bytes": last.source_size_bytes,
            "sessions": applied.iter().map(|s| session_json(&summary.chain, s)).collect::<Vec<_>>(),
            "sessions_skipped": summary.first_applied,
            "data_bytes": summary.data_bytes,
            "zero_bytes": summary.zero_bytes,
            "seconds": seconds,
            "mib_per_second": mib_per_second,
        });
        out!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    out!(
        "restored {} session(s) onto {}: it now holds checkpoint {} (generation {}); {} bytes of data, {} bytes of zeroes; {seconds:.2} s, {mib_per_second:.0} MiB/s",
        applied.len(),
        target.describe(),
        last.target.checkpoint,
        last.target.generation,
        summary.data_bytes,
        summary.zero_bytes,
    );
    Ok(ExitCode::SUCCESS)
}

fn session_json(chain: &ChainReport, session: &SessionReport) -> Value {
    let header = &session.header;
    json!({
        "tape": chain.tapes[session.tape_index].0,
        "session_id": header.session_id.hex(),
        "parent_session_id": header.parent.map(|p| p.hex()),
        "kind": if header.is_full() { "full" } else { "incremental" },
        "checkpoint": header.target.checkpoint,
        "generation": header.target.generation,
        "base_checkpoint": header.base.as_ref().map(|b| b.checkpoint.clone()),
        "created_unix_seconds": header.created_unix_seconds,
        "compression": header.compression,
        "extents": session.totals.extent_count,
        "data_bytes": session.totals.data_bytes,
        "zero_bytes": session.totals.zero_bytes,
        "stored_bytes": session.totals.stored_bytes,
        "files": session.totals.file_count,
    })
}

/// `blockwatch verify tape:A [tape:B ...]`: every checksum of the chain
/// and its order. Exit 0 all good, 1 damage or a broken chain (what and
/// where), 2 an error (a tape that cannot be read at all).
pub fn verify_tapes(paths: &[PathBuf], json: bool) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let (report, damage) = verify_chain_until_damage(paths, None);
    let seconds = started.elapsed().as_secs_f64();
    match damage {
        None => {}
        Some(error @ TapeError::Io { .. }) => return Err(error.into()),
        Some(error) => return print_damage(&report, &error, json),
    }
    if json {
        let value = json!({
            "ok": true,
            "tapes": report.tapes.iter().map(|(path, label)| json!({
                "tape": path,
                "tape_id": label.tape_id.hex(),
                "chain_id": label.chain_id.hex(),
                "tape_sequence": label.tape_sequence,
                "block_size_bytes": label.block_size_bytes,
            })).collect::<Vec<_>>(),
            "sessions": report.sessions.iter().map(|s| session_json(&report, s)).collect::<Vec<_>>(),
            "extents": report.extent_count(),
            "data_bytes": report.data_bytes(),
            "zero_bytes": report.zero_bytes(),
            "stored_bytes": report.stored_bytes(),
            "seconds": seconds,
        });
        out!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    print_sessions(&report)?;
    out!(
        "all checksums good: {} session(s) on {} tape(s), {} extents, {} data bytes; {seconds:.2} s",
        report.sessions.len(),
        report.tapes.len(),
        report.extent_count(),
        report.data_bytes(),
    );
    Ok(ExitCode::SUCCESS)
}

fn print_sessions(report: &ChainReport) -> anyhow::Result<()> {
    for session in &report.sessions {
        let header = &session.header;
        out!(
            "{} session {} on {}: checkpoint {} (generation {}){}, {} extents, {} data bytes, {} zero bytes",
            if header.is_full() {
                "full"
            } else {
                "incremental"
            },
            header.session_id,
            display(&report.tapes[session.tape_index].0),
            header.target.checkpoint,
            header.target.generation,
            header
                .base
                .as_ref()
                .map(|b| format!(" since {}", b.checkpoint))
                .unwrap_or_default(),
            session.totals.extent_count,
            session.totals.data_bytes,
            session.totals.zero_bytes,
        );
    }
    Ok(())
}

fn print_damage(report: &ChainReport, error: &TapeError, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        let (tape, block, part) = match error {
            TapeError::Damaged {
                tape, block, part, ..
            } => (Some(tape), Some(*block), Some(part.to_string())),
            TapeError::Truncated { tape, block, part } => {
                (Some(tape), Some(*block), Some(part.to_string()))
            }
            TapeError::Foreign { tape, .. } | TapeError::Refused { tape, .. } => {
                (Some(tape), None, None)
            }
            TapeError::Io { tape, .. } => (Some(tape), None, None),
        };
        let value = json!({
            "ok": false,
            "sessions_good": report.sessions.iter().map(|s| session_json(report, s)).collect::<Vec<_>>(),
            "damage": { "tape": tape, "block": block, "part": part, "message": error.to_string() },
        });
        out!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print_sessions(report)?;
        out!("damage: {error}");
    }
    Ok(ExitCode::from(1))
}

fn display(path: &Path) -> String {
    path.display().to_string()
}
