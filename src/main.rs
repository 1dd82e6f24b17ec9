//! `blockwatch`: the command line. `serve` runs the NBD server (modelled on
//! nbdkit's options); later subcommands drive the tracker and the copier.
//!
//! Files: `main.rs` (argument parsing, exit codes), `serve.rs` (images,
//! listeners, daemonizing, captive `--run`, signals, tracking layers),
//! `track.rs` (checkpoint, checkpoints, changes, status, pin, unpin),
//! `copy.rs` (copy, verify), `files.rs` (files, restore --file: files out
//! of any backup), `restore.rs` (restore from tapes, the check
//! of a chain of tapes), `s3.rs` (object storage: restore, verify, prune,
//! and `sessions` of any target), `size.rs` (size arguments such as `10G`).

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

mod catalog_check;
mod copy;
mod files;
mod restore;
mod s3;
mod serve;
mod size;
mod track;

use std::process::ExitCode;

use clap::{ArgAction, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "blockwatch",
    version,
    about = "An NBD server that tracks which blocks change"
)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve disk images over NBD.
    Serve(serve::ServeArgs),
    /// Close the current generation under a name: blockwatch checkpoint [IMAGE] NAME.
    Checkpoint(track::CheckpointArgs),
    /// List checkpoints.
    Checkpoints(track::ListArgs),
    /// Changed extents since a checkpoint.
    Changes(track::ChangesArgs),
    /// Tracking status: generation, dirty bytes, journal, flush histogram.
    Status(track::ListArgs),
    /// Keep a checkpoint from being deleted: blockwatch pin [IMAGE] CHECKPOINT HOLDER.
    Pin(track::PinArgs),
    /// Release a pin: blockwatch unpin [IMAGE] CHECKPOINT HOLDER.
    Unpin(track::PinArgs),
    /// Copy what changed since the target's last copy (or everything) to a
    /// replica: blockwatch copy [IMAGE] --to TARGET.
    Copy(copy::CopyArgs),
    /// Compare a replica with its source, or check a chain of tapes or a
    /// repository's chunks: exit 0 equal, 1 different or damaged, 2 error.
    Verify(copy::VerifyArgs),
    /// Restore a chain of tapes, or a session of an object storage
    /// repository, onto an image or an NBD export: blockwatch restore
    /// tape:A [tape:B ...] [--until CHECKPOINT] | s3://BUCKET/PREFIX[#SESSION] --to IMAGE|nbd://...
    Restore(restore::RestoreArgs),
    /// What a target holds: blockwatch sessions s3://...|tape:PATH|REPLICA [--json].
    Sessions(s3::SessionsArgs),
    /// The files a backup holds at a checkpoint, read from its disk with
    /// no mount: blockwatch files tape:A [tape:B ...]|s3://...|REPLICA
    /// [--at CHECKPOINT] [PATH-GLOB] [--json].
    Files(files::FilesArgs),
    /// Remove sessions of a repository that a retention policy does not
    /// keep, then the data no session needs: blockwatch prune s3://... --keep-last N ...
    Prune(s3::PruneArgs),
    /// Internal: checks a catalog file for a process about to open it.
    #[command(hide = true)]
    CheckCatalog(catalog_check::CheckCatalogArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    if let Command::CheckCatalog(args) = cli.command {
        return catalog_check::run(args);
    }
    tracker::catalog::set_probe(catalog_check::probe);
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Checkpoint(args) => track::checkpoint(args),
        Command::Checkpoints(args) => track::checkpoints(args),
        Command::Changes(args) => track::changes(args),
        Command::Status(args) => track::status(args),
        Command::Pin(args) => track::pin(args),
        Command::Unpin(args) => track::unpin(args),
        Command::Copy(args) => copy::copy(args),
        Command::Verify(args) => copy::verify(args),
        Command::Restore(args) => restore::run(args),
        Command::Sessions(args) => s3::sessions(args),
        Command::Files(args) => files::files(args),
        Command::Prune(args) => s3::prune(args),
        Command::CheckCatalog(_) => unreachable!("run above"),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("blockwatch: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
