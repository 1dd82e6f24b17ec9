//! `copy` and `verify`: copies of a tracked disk to a replica (of a running
//! disk through the server's snapshot, of a stopped one directly, or of
//! any NBD export), and a check of a replica against its source.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::bail;
use clap::Args;
use copier::copy::Progress;
use copier::copy::copy_live;
use copier::copy::{NbdCopyOptions, WORKERS_DEFAULT, copy_from_nbd};
use copier::target::TargetSpec;
use copier::verify::VerifyTarget;
use copier::{CopyOptions, Summary, copy_offline};
use tracker::tracker::{default_state_dir, state_is_locked};

const DEFAULT_IMAGE: &str = "blockwatch.img";

#[derive(Debug, Clone, Args)]
pub struct CopyArgs {
    /// The tracked image (default ./blockwatch.img).
    #[arg(conflicts_with = "from")]
    image: Option<PathBuf>,
    /// Copy from any NBD server instead (nbd://HOST[:PORT]/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH) to any target but tar: everything,
    /// or with --bitmap what its dirty bitmap marks.
    #[arg(long, value_name = "URI")]
    from: Option<String>,
    /// With --from: copy only the regions the server's
    /// `qemu:dirty-bitmap:NAME` marks (qemu-nbd -B NAME), onto a target
    /// that holds an earlier copy of the same export.
    #[arg(long, value_name = "NAME", requires = "from")]
    bitmap: Option<String>,
    /// Where to: `file:PATH` or a plain PATH (a raw sparse replica), an
    /// NBD export (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`)
    /// of the disk's size, `tape:PATH`, object storage
    /// (`s3://BUCKET/PREFIX`), or `tar:PATH` (the changed files that meet
    /// --include/--exclude/--min-size/--max-size, as a pax tar).
    #[arg(long, value_name = "TARGET")]
    to: String,
    /// Copy everything and overwrite what the target holds, even a file
    /// that is not a replica of this disk.
    #[arg(long)]
    full: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Tracking state directory (default: IMAGE.blockwatch beside the
    /// image). With --from and an NBD target: where that target's record
    /// is kept (the same directory every time).
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// tape: block size of a new tape (a power of two, 4K to 4M; default
    /// 256K); a tape keeps the block size of its label.
    #[arg(long, value_name = "SIZE")]
    block_size: Option<String>,
    /// tape: zstd-compress extent data.
    #[arg(long)]
    compress: bool,
    /// tar: only files matching GLOB ("*.db", "/var/lib/**").
    #[arg(long, value_name = "GLOB")]
    include: Vec<String>,
    /// tar: leave out files matching GLOB.
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,
    /// tar: only files at least this large (e.g. 1M).
    #[arg(long, value_name = "SIZE")]
    min_size: Option<String>,
    /// tar: only files at most this large.
    #[arg(long, value_name = "SIZE")]
    max_size: Option<String>,
    #[command(flatten)]
    s3: crate::s3::S3Flags,
    /// Pieces (4 MiB each) read and written at once.
    #[arg(long, value_name = "N", default_value_t = WORKERS_DEFAULT as u16,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: u16,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// [IMAGE] TARGET (IMAGE defaults to ./blockwatch.img): the target
    /// (a replica, an NBD export, IMAGE tape:A [tape:B ...], or IMAGE
    /// s3://BUCKET/PREFIX[#SESSION]) compared with the disk. Or, alone, a
    /// chain of tapes to check every checksum of, or s3://... whose chunks
    /// to read back.
    #[arg(value_name = "[IMAGE] TARGET | tape:A [tape:B ...] | s3://...", num_args = 1..)]
    words: Vec<String>,
    /// With IMAGE and a tape chain or repository: compare the backup at
    /// this checkpoint rather than its newest.
    #[arg(long, value_name = "CHECKPOINT")]
    at: Option<String>,
    #[arg(long)]
    json: bool,
    /// s3: read back about this percentage of the chunks (picked at random
    /// each run) instead of all.
    #[arg(long, value_name = "PERCENT", default_value_t = 100.0)]
    sample: f64,
    #[command(flatten)]
    s3: crate::s3::S3Flags,
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
}

/// The tape options of `copy`.
#[derive(Debug, Clone, Copy)]
struct TapeFlags {
    block_size_bytes: u32,
    compress: bool,
}

const TAPE_FLAGS_DEFAULT: TapeFlags = TapeFlags {
    block_size_bytes: copier::tape::format::BLOCK_SIZE_DEFAULT,
    compress: false,
};

/// The target `--to` names; kinds not in this release are refused clearly.
fn target_of(target: &str, tape: TapeFlags, s3: &crate::s3::S3Flags) -> anyhow::Result<TargetSpec> {
    if target.starts_with("s3://") {
        let location = copier::s3::S3Location::parse(target)?;
        if location.session.is_some() {
            bail!("{target}: a copy makes a new session; name the repository (s3://BUCKET/PREFIX)");
        }
        return Ok(TargetSpec::S3 {
            location,
            options: s3.options(),
        });
    }
    if let Some(path) = target.strip_prefix("file:") {
        return Ok(TargetSpec::File(PathBuf::from(path)));
    }
    if nbd_client::is_nbd_uri(target) {
        return Ok(TargetSpec::Nbd(target.to_string()));
    }
    if let Some(path) = target.strip_prefix("tape:") {
        return Ok(TargetSpec::Tape {
            path: PathBuf::from(path),
            block_size_bytes: tape.block_size_bytes,
            compress: tape.compress,
        });
    }
    if target.starts_with("tar:") {
        bail!(
            "{target}: a tar target takes the changed files of a copy (blockwatch copy IMAGE --to tar:PATH); list what it holds with tar -tvf"
        );
    }
    if target.starts_with("s3:") {
        bail!(
            "{target}: object storage is s3://BUCKET/PREFIX; the other targets are file:PATH (a raw replica), nbd://... or nbds://..., tape:PATH and tar:PATH"
        );
    }
    Ok(TargetSpec::File(PathBuf::from(target)))
}

fn tape_block_size(text: Option<&str>) -> anyhow::Result<u32> {
    let Some(text) = text else {
        return Ok(copier::tape::format::BLOCK_SIZE_DEFAULT);
    };
    let bytes = crate::size::parse_size(text).map_err(|e| anyhow::anyhow!("--block-size: {e}"))?;
    match u32::try_from(bytes) {
        Ok(bytes) if copier::tape::format::block_size_is_valid(bytes) => Ok(bytes),
        _ => bail!("--block-size {text}: give a power of two from 4K to 4M"),
    }
}

/// Whether a server serves the image (it holds the state's lock).
fn is_served(image: &Path, state: Option<&Path>) -> anyhow::Result<bool> {
    let image = std::path::absolute(image)?;
    let state_dir = state.map_or_else(|| default_state_dir(&image), Path::to_path_buf);
    Ok(state_is_locked(&state_dir))
}

/// A progress bar on stderr when it is a terminal; nothing on a pipe.
#[derive(Debug)]
struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    fn for_stderr() -> Arc<Bar> {
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            return Arc::new(Bar(None));
        }
        let bar =
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {bytes}/{total_bytes} [{bar:40}] {binary_bytes_per_sec}, {eta} left",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        Arc::new(Bar(Some(bar)))
    }

    fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn planned(&self, total_bytes: u64) {
        if let Some(bar) = &self.0 {
            bar.set_length(total_bytes);
        }
    }

    fn copied(&self, bytes: u64) {
        if let Some(bar) = &self.0 {
            bar.inc(bytes);
        }
    }
}

pub fn copy(args: CopyArgs) -> anyhow::Result<ExitCode> {
    let bar = Bar::for_stderr();
    let progress: Arc<dyn Progress> = bar.clone();
    let copied = copy_with(args.clone(), progress);
    bar.finish();
    let summary = copied?;
    print_summary(&summary, args.json)
}

/// The copy criteria of a tar target, checked.
fn criteria_of(args: &CopyArgs) -> anyhow::Result<fsmap::select::Criteria> {
    let size = |text: &Option<String>| {
        text.as_deref()
            .map(crate::size::parse_size)
            .transpose()
            .map_err(anyhow::Error::msg)
    };
    let criteria = fsmap::select::Criteria {
        include: args.include.clone(),
        exclude: args.exclude.clone(),
        min_size_bytes: size(&args.min_size)?,
        max_size_bytes: size(&args.max_size)?,
    };
    fsmap::select::validate(&criteria).map_err(anyhow::Error::msg)?;
    Ok(criteria)
}

fn copy_with(args: CopyArgs, progress: Arc<dyn Progress>) -> anyhow::Result<Summary> {
    let criteria = criteria_of(&args)?;
    let is_tar = args.to.starts_with("tar:");
    if !criteria.is_empty() && !is_tar {
        bail!("--include, --exclude, --min-size and --max-size choose files for a tar:PATH target");
    }
    if is_tar && args.from.is_some() {
        bail!("a tar target takes files from a tracked disk's file map: copy IMAGE --to tar:PATH");
    }
    let tape = || -> anyhow::Result<TapeFlags> {
        Ok(TapeFlags {
            block_size_bytes: tape_block_size(args.block_size.as_deref())?,
            compress: args.compress,
        })
    };
    Ok(match args.from {
        Some(uri) => copy_from_nbd(&NbdCopyOptions {
            uri,
            bitmap: args.bitmap,
            target: target_of(&args.to, tape()?, &args.s3)?,
            state_dir: args.state,
            full: args.full,
            workers: usize::from(args.workers),
            progress,
        })?,
        None => {
            let image = args.image.unwrap_or_else(|| PathBuf::from(DEFAULT_IMAGE));
            let target = match args.to.strip_prefix("tar:") {
                Some(path) if !path.is_empty() => TargetSpec::Tar {
                    path: PathBuf::from(path),
                    criteria,
                    full: args.full,
                },
                Some(_) => bail!("tar: needs a path: tar:PATH"),
                None => target_of(&args.to, tape()?, &args.s3)?,
            };
            let options = CopyOptions {
                image,
                state_dir: args.state,
                target,
                full: args.full,
                workers: usize::from(args.workers),
                progress,
            };
            if is_served(&options.image, options.state_dir.as_deref())? {
                copy_live(&options)?
            } else {
                copy_offline(&options)?
            }
        }
    })
}

fn print_summary(summary: &Summary, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(summary)?);
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
    if let Some(archive) = &summary.archive {
        println!(
            "archive of {} bytes: {} paths, {} bytes of file data; {} deleted since the base{}",
            archive.archive_bytes,
            archive.files,
            archive.data_bytes,
            archive.deleted.len(),
            if archive.deleted.is_empty() {
                String::new()
            } else {
                format!(
                    " (listed in {})",
                    copier::target::tar_record_path(Path::new(&summary.target["tar:".len()..]))
                        .display()
                )
            }
        );
        for note in &archive.notes {
            eprintln!("blockwatch: {note}");
        }
    }
    if let Some(stored) = &summary.stored {
        println!(
            "session {}: {} bytes new to the repository, {} bytes uploaded",
            stored.session, stored.new_bytes, stored.uploaded_bytes
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A replica or NBD target named alone after IMAGE.
fn verify_target(target: &str, s3: &crate::s3::S3Flags) -> anyhow::Result<VerifyTarget> {
    Ok(match target_of(target, TAPE_FLAGS_DEFAULT, s3)? {
        TargetSpec::File(path) => VerifyTarget::File(path),
        TargetSpec::Nbd(uri) => VerifyTarget::Nbd(uri),
        TargetSpec::Tape { .. } | TargetSpec::S3 { .. } => bail!(
            "{target}: a tape chain or repository is compared with the disk named before it (blockwatch verify IMAGE {target}), or checked alone"
        ),
        TargetSpec::Tar { .. } => unreachable!("target_of refuses tar:"),
    })
}

pub fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let alone = args.words.iter().all(|word| word.starts_with("tape:"))
        || matches!(args.words.as_slice(), [word] if word.starts_with("s3://"));
    if alone && args.at.is_some() {
        bail!(
            "--at compares a backup with a disk: name the disk first (blockwatch verify IMAGE BACKUP --at CHECKPOINT)"
        );
    }
    if args.words.iter().all(|word| word.starts_with("tape:")) {
        let tapes: Vec<PathBuf> = args
            .words
            .iter()
            .map(|word| PathBuf::from(&word["tape:".len()..]))
            .collect();
        return crate::restore::verify_tapes(&tapes, args.json);
    }
    if let [word] = args.words.as_slice()
        && word.starts_with("s3://")
    {
        return crate::s3::verify(word, &args.s3, args.sample, args.json);
    }
    let is_backup = |word: &String| word.starts_with("tape:") || word.starts_with("s3://");
    let (image, target) = match args.words.as_slice() {
        [image, backup @ ..]
            if !is_backup(image) && !backup.is_empty() && backup.iter().all(is_backup) =>
        {
            let view = crate::files::open_view(backup, args.at.as_deref(), &args.s3)?;
            (PathBuf::from(image), VerifyTarget::Backup(Box::new(view)))
        }
        [target] | [_, target] if args.at.is_some() => {
            bail!(
                "{target}: --at picks a checkpoint of a tape chain or repository; a replica or NBD target holds one"
            )
        }
        [target] => (
            PathBuf::from(DEFAULT_IMAGE),
            verify_target(target, &args.s3)?,
        ),
        [image, target] => (PathBuf::from(image), verify_target(target, &args.s3)?),
        _ => bail!(
            "usage: blockwatch verify [IMAGE] TARGET, blockwatch verify IMAGE tape:A [tape:B ...], or blockwatch verify tape:A [tape:B ...]"
        ),
    };
    let report = if is_served(&image, args.state.as_deref())? {
        copier::verify::verify_live(&image, args.state.as_deref(), &target)?
    } else {
        copier::verify::verify_offline(&image, args.state.as_deref(), &target)?
    };
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
