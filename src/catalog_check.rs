//! The catalog's check in a process of its own (`tracker::catalog::Probe`):
//! before this process opens a catalog file, `blockwatch check-catalog`
//! opens it the same way and reads all of it. redb can abort its process
//! on some damaged pages (a panic while it unwinds from another), which no
//! `catch_unwind` survives; the check's process takes that, and this one
//! treats the catalog as damaged: kept aside, every region changed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use clap::Args;
use tracker::catalog::{CatalogError, ProbeMode};

/// How long a check may take before it counts as hung (a catalog is small;
/// reading one takes milliseconds).
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// The check's exit status when a read-only open finds a catalog that
/// needs redb's repair: not damage (the caller's own open says so).
const EXIT_NEEDS_REPAIR: u8 = 3;

#[derive(Debug, Args)]
pub struct CheckCatalogArgs {
    path: PathBuf,
    /// Open it as an offline query does, changing nothing.
    #[arg(long)]
    read_only: bool,
}

/// `blockwatch check-catalog PATH [--read-only]`: exit 0 readable, 3 needs
/// a repair (read-only), 1 damaged (the reason on stderr).
pub fn run(args: CheckCatalogArgs) -> ExitCode {
    let mode = if args.read_only {
        ProbeMode::ReadOnly
    } else {
        ProbeMode::Writable
    };
    match tracker::catalog::check_file(&args.path, mode) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CatalogError::NeedsRepair) => ExitCode::from(EXIT_NEEDS_REPAIR),
        Err(error) => {
            eprintln!("{error}");
            ExitCode::from(1)
        }
    }
}

/// The probe: runs the check and says what it found.
pub fn probe(path: &Path, mode: ProbeMode) -> Result<(), String> {
    // /proc/self/exe runs this very program even when its file was
    // replaced by an upgrade since it started.
    let mut command = Command::new("/proc/self/exe");
    command.arg("check-catalog").arg(path);
    if mode == ProbeMode::ReadOnly {
        command.arg("--read-only");
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            // Not the catalog's fault: open it in this process, guarded.
            tracing::warn!(%error, "cannot start the catalog's check; opening it unchecked");
            return Ok(());
        }
    };
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut said = String::new();
        let _ = stderr.read_to_string(&mut said);
        said
    });
    let started = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < CHECK_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "its check did not finish in {} s",
                    CHECK_TIMEOUT.as_secs()
                ));
            }
            Err(error) => {
                tracing::warn!(%error, "cannot wait for the catalog's check; opening it unchecked");
                return Ok(());
            }
        }
    };
    let said = reader.join().unwrap_or_default();
    match status.code() {
        Some(0) => Ok(()),
        Some(code) if code == i32::from(EXIT_NEEDS_REPAIR) => Ok(()),
        Some(_) => Err(said.trim().to_string()),
        None => {
            use std::os::unix::process::ExitStatusExt;
            Err(format!(
                "catalog database error: redb took down the process that read it (signal {}): the catalog is damaged",
                status.signal().unwrap_or(0)
            ))
        }
    }
}
