//! Object storage on the command line: the flags every `s3://` command
//! shares, `restore`/`verify` of a repository, `prune`, and `sessions`
//! (what any kind of target holds).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use copier::s3::{Repository, Retention, S3Location, S3Options, SessionRow};
use copier::tape::RestoreTarget;
use serde_json::json;

/// How to reach a repository. Credentials come from the environment
/// (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), never
/// from flags a process listing would show.
#[derive(Debug, Clone, Default, Args)]
pub struct S3Flags {
    /// s3: the repository's key file (32 bytes, or 64 hex digits; make one
    /// with `head -c 32 /dev/urandom > KEYFILE`). A new repository made
    /// with it is encrypted; an encrypted one needs it for everything.
    #[arg(long, value_name = "KEYFILE")]
    encrypt: Option<PathBuf>,
    /// s3: the service's URL (default AWS_ENDPOINT_URL, else AWS itself);
    /// requests are path-style, as self-hosted services want.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// s3: the region (default AWS_REGION, else us-east-1).
    #[arg(long, value_name = "REGION")]
    s3_region: Option<String>,
    /// s3: where copies keep the pack indexes they read, so that the next
    /// copy reads only new ones from the service (default
    /// $XDG_CACHE_HOME/blockwatch/s3-index, else ~/.cache/...); `off`
    /// reads every index at every copy. Cached indexes are checked again
    /// (digest or AEAD tag) at each use.
    #[arg(long, value_name = "DIR|off")]
    s3_cache: Option<PathBuf>,
}

impl S3Flags {
    pub fn options(&self) -> S3Options {
        S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            key_file: self.encrypt.clone(),
            index_cache: match &self.s3_cache {
                Some(dir) if dir.as_os_str() == "off" => None,
                Some(dir) => Some(dir.clone()),
                None => copier::s3::index_cache::default_root(),
            },
        }
    }
}

fn open(location: &S3Location, flags: &S3Flags) -> anyhow::Result<Repository> {
    Ok(Repository::open(location, &flags.options(), false)?)
}

pub fn restore(word: &str, flags: &S3Flags, to: &str, json: bool) -> anyhow::Result<ExitCode> {
    let location = S3Location::parse(word)?;
    let target = RestoreTarget::parse(to)?;
    let repo = open(&location, flags)?;
    let summary = copier::s3::restore(&repo, &location, &target)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "restored session {} (checkpoint {}) of {} to {}: {} bytes of data in {} chunks, {} as zeroes; {:.2} s, {:.0} MiB/s",
            summary.session,
            summary.checkpoint,
            location.url(),
            target.describe(),
            summary.data_bytes,
            summary.chunks,
            summary.zero_bytes,
            summary.seconds,
            summary.mib_per_second
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn verify(
    word: &str,
    flags: &S3Flags,
    sample_percent: f64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let location = S3Location::parse(word)?;
    let repo = open(&location, flags)?;
    let report = copier::s3::verify(&repo, &location, sample_percent)?;
    let code = if report.damaged.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(code);
    }
    for damage in &report.damaged {
        println!(
            "damaged {}: {} (needed by sessions {})",
            damage.object,
            damage.reason,
            damage.sessions.join(", ")
        );
    }
    println!(
        "{}: {} sessions, {} of {} chunks read back ({} bytes), {} damaged; {:.2} s",
        location.url(),
        report.sessions,
        report.chunks_checked,
        report.chunks_total,
        report.bytes_read,
        report.damaged.len(),
        report.seconds
    );
    Ok(code)
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// The repository: s3://BUCKET/PREFIX.
    #[arg(value_name = "s3://BUCKET/PREFIX")]
    repository: String,
    /// Keep each disk's newest N sessions.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_last: usize,
    /// Keep the newest session of each of the last N days with sessions.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_daily: usize,
    /// Keep the newest session of each of the last N weeks (Monday to
    /// Sunday, UTC) with sessions.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_weekly: usize,
    /// Keep the newest session of each of the last N months with sessions.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_monthly: usize,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    s3: S3Flags,
}

pub fn prune(args: PruneArgs) -> anyhow::Result<ExitCode> {
    let location = S3Location::parse(&args.repository)?;
    if location.session.is_some() {
        bail!("prune takes a repository (s3://BUCKET/PREFIX), not a session");
    }
    let repo = open(&location, &args.s3)?;
    let retention = Retention {
        keep_last: args.keep_last,
        keep_daily: args.keep_daily,
        keep_weekly: args.keep_weekly,
        keep_monthly: args.keep_monthly,
    };
    let summary = copier::s3::prune(&repo, &retention)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(ExitCode::SUCCESS);
    }
    for session in &summary.sessions_removed {
        println!("removed session {session}");
    }
    let waiting = if summary.waiting_for_locks > 0 {
        format!(
            "; {} other processes hold locks, so marked packs stay until a later prune",
            summary.waiting_for_locks
        )
    } else {
        String::new()
    };
    println!(
        "{}: {} sessions kept, {} removed; {} packs marked, {} deleted ({} bytes){waiting}",
        location.url(),
        summary.sessions_kept,
        summary.sessions_removed.len(),
        summary.packs_marked,
        summary.packs_deleted,
        summary.bytes_deleted
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct SessionsArgs {
    /// s3://BUCKET/PREFIX, tape:PATH, file:PATH (a replica) or an NBD
    /// target (nbd://..., whose record is in the source's state directory).
    #[arg(value_name = "TARGET")]
    target: String,
    /// For an NBD target: the tracked image whose copies it holds
    /// (default ./blockwatch.img).
    #[arg(long, value_name = "IMAGE")]
    image: Option<PathBuf>,
    /// For an NBD target: the tracking state directory.
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    s3: S3Flags,
}

/// One line of `sessions`, whatever the target.
fn row_text(row: &serde_json::Value) -> String {
    let text = |key: &str| row[key].as_str().unwrap_or("-").to_string();
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}",
        text("session"),
        text("kind"),
        text("checkpoint"),
        row["created_unix"],
        row["data_bytes"],
        text("source_id")
    )
}

pub fn sessions(args: SessionsArgs) -> anyhow::Result<ExitCode> {
    let rows: Vec<serde_json::Value> = if args.target.starts_with("s3://") {
        let location = S3Location::parse(&args.target)?;
        let repo = open(&location, &args.s3)?;
        copier::s3::list_sessions(&repo)?
            .iter()
            .map(|row: &SessionRow| serde_json::to_value(row).expect("a row serializes"))
            .collect()
    } else if let Some(path) = args.target.strip_prefix("tape:") {
        tape_sessions(Path::new(path))?
    } else if nbd_client::is_nbd_uri(&args.target) {
        let image = args
            .image
            .clone()
            .unwrap_or_else(|| PathBuf::from("blockwatch.img"));
        let image = std::path::absolute(&image)?;
        let state = args
            .state
            .clone()
            .unwrap_or_else(|| tracker::tracker::default_state_dir(&image));
        let key = state
            .join(copier::target::TARGETS_DIR)
            .join(copier::target::nbd_holder(&args.target));
        record_sessions(&key, &args.target)?
    } else {
        let path = args.target.strip_prefix("file:").unwrap_or(&args.target);
        record_sessions(Path::new(path), &args.target)?
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("session\tkind\tcheckpoint\tcreated_unix\tdata_bytes\tsource_id");
        for row in &rows {
            println!("{}", row_text(row));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A replica (or an NBD target's record) holds one copy: its record's.
fn record_sessions(key: &Path, target: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let record = copier::replica::read_record(key)
        .with_context(|| format!("reading the record of {target}"))?;
    Ok(record
        .map(|record| {
            vec![json!({
                "session": null,
                "kind": "replica",
                "checkpoint": record.checkpoint,
                "generation": record.generation,
                "created_unix": record.copied_unix_seconds,
                "size_bytes": record.source_size_bytes,
                "data_bytes": null,
                "source_id": record.image_id,
            })]
        })
        .unwrap_or_default())
}

/// The sessions of one tape, each checked as `verify tape:` checks it.
fn tape_sessions(path: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let (chain, damage) = copier::tape::verify_chain_until_damage(&[path.to_path_buf()], None);
    if let Some(error) = damage {
        tracing::warn!(%error, "the tape reads well only up to the sessions listed");
    }
    Ok(chain
        .sessions
        .iter()
        .map(|session| {
            let header = &session.header;
            json!({
                "session": header.session_id.hex(),
                "kind": if header.base.is_some() { "incremental" } else { "full" },
                "base_checkpoint": header.base.as_ref().map(|b| b.checkpoint.clone()),
                "checkpoint": header.target.checkpoint,
                "generation": header.target.generation,
                "created_unix": header.created_unix_seconds,
                "size_bytes": header.source_size_bytes,
                "data_bytes": session.totals.data_bytes,
                "source_id": header.source_id,
            })
        })
        .collect())
}
