//! `copy` and `verify`: copies of a tracked disk to a replica (of a running
//! disk through the server's snapshot, of a stopped one directly, or of
//! any NBD export), and a check of a replica against its source.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::bail;
use clap::Args;
use copier::copy::{NbdCopyOptions, WORKERS_DEFAULT, copy_from_nbd};
use copier::{CopyOptions, copy_offline};
use tracker::tracker::{default_state_dir, state_is_locked};

const DEFAULT_IMAGE: &str = "blockwatch.img";

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// The tracked image (default ./blockwatch.img).
    #[arg(conflicts_with = "from")]
    image: Option<PathBuf>,
    /// Copy from any NBD server instead (nbd://HOST[:PORT]/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH): everything, or with --bitmap what
    /// its dirty bitmap marks.
    #[arg(long, value_name = "URI")]
    from: Option<String>,
    /// With --from: copy only the regions the server's
    /// `qemu:dirty-bitmap:NAME` marks (qemu-nbd -B NAME), onto a replica
    /// that holds an earlier copy of the same export.
    #[arg(long, value_name = "NAME", requires = "from")]
    bitmap: Option<String>,
    /// Where to: `file:PATH` or a plain PATH (a raw sparse replica).
    #[arg(long, value_name = "TARGET")]
    to: String,
    /// Copy everything and overwrite what the target holds, even a file
    /// that is not a replica of this disk.
    #[arg(long)]
    full: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Tracking state directory (default: IMAGE.blockwatch beside the image).
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// [IMAGE] TARGET (IMAGE defaults to ./blockwatch.img).
    #[arg(value_name = "[IMAGE] TARGET", num_args = 1..=2)]
    words: Vec<String>,
    #[arg(long)]
    json: bool,
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
}

/// The replica path a target names; other kinds are refused clearly.
fn replica_of(target: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = target.strip_prefix("file:") {
        return Ok(PathBuf::from(path));
    }
    for scheme in [
        "nbd:",
        "nbd+unix:",
        "nbds:",
        "nbds+unix:",
        "tape:",
        "s3:",
        "tar:",
    ] {
        if target.starts_with(scheme) {
            bail!(
                "{scheme} targets are not in this release yet: copy to file:PATH (a raw replica)"
            );
        }
    }
    Ok(PathBuf::from(target))
}

/// Whether a server serves the image (it holds the state's lock).
fn is_served(image: &Path, state: Option<&Path>) -> anyhow::Result<bool> {
    let image = std::path::absolute(image)?;
    let state_dir = state.map_or_else(|| default_state_dir(&image), Path::to_path_buf);
    Ok(state_is_locked(&state_dir))
}

/// Refuses while a server serves the image: verify reads the image
/// directly and needs it to hold still.
fn refuse_if_served(image: &Path, state: Option<&Path>) -> anyhow::Result<()> {
    if is_served(image, state)? {
        bail!(
            "a blockwatch server is serving {}; verify compares with the image as it is, so stop the server (SIGTERM) first",
            image.display()
        );
    }
    Ok(())
}

pub fn copy(args: CopyArgs) -> anyhow::Result<ExitCode> {
    let replica = replica_of(&args.to)?;
    let summary = match args.from {
        Some(uri) => copy_from_nbd(&NbdCopyOptions {
            uri,
            bitmap: args.bitmap,
            replica,
            full: args.full,
            workers: WORKERS_DEFAULT,
        })?,
        None => {
            let image = args.image.unwrap_or_else(|| PathBuf::from(DEFAULT_IMAGE));
            let options = CopyOptions {
                image,
                state_dir: args.state,
                replica,
                full: args.full,
                workers: WORKERS_DEFAULT,
            };
            if is_served(&options.image, options.state_dir.as_deref())? {
                bail!(
                    "a blockwatch server is serving {}; copies of a running disk need its snapshot export, which the server does not serve yet: stop the server (SIGTERM) and copy again",
                    options.image.display()
                );
            }
            copy_offline(&options)?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(ExitCode::SUCCESS);
    }
    let why = summary
        .full_reason
        .as_deref()
        .map(|reason| format!(" ({reason})"))
        .unwrap_or_default();
    let since = summary
        .base_checkpoint
        .as_deref()
        .filter(|_| summary.kind == "incremental")
        .map(|base| format!(" since {base}"))
        .unwrap_or_default();
    println!(
        "{} copy{since} to {}{why}: now holds checkpoint {}; {} bytes in {} extents planned, {} copied, {} as holes; {:.2} s, {:.0} MiB/s",
        summary.kind,
        summary.target,
        summary.checkpoint,
        summary.planned_bytes,
        summary.extents,
        summary.data_bytes,
        summary.hole_bytes,
        summary.seconds,
        summary.mib_per_second
    );
    Ok(ExitCode::SUCCESS)
}

pub fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let (image, target) = match args.words.as_slice() {
        [target] => (PathBuf::from(DEFAULT_IMAGE), target.as_str()),
        [image, target] => (PathBuf::from(image), target.as_str()),
        _ => bail!("usage: blockwatch verify [IMAGE] TARGET"),
    };
    let replica = replica_of(target)?;
    refuse_if_served(&image, args.state.as_deref())?;
    let report = copier::verify::verify_offline(&image, args.state.as_deref(), &replica)?;
    let code = if report.regions_differing == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(code);
    }
    for (offset, length) in &report.differing {
        println!("differs {offset} {length}");
    }
    println!(
        "{}: {} regions compared with checkpoint {}, {} differ, {} skipped (written since); {:.2} s",
        report.target,
        report.regions_compared,
        report.checkpoint,
        report.regions_differing,
        report.regions_skipped,
        report.seconds
    );
    Ok(code)
}
