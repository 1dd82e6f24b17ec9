//! `blockwatch serve TARGET[@CHECKPOINT] -r`: a backup (a tape chain, an
//! object storage session, a replica) served as a read-only disk, so that
//! it can be mounted, booted (instant restore) or copied; with
//! `--overlay FILE`, writes go to FILE and the backup stays untouched.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use backend::BlockBackend;
use copier::s3::Repository;
use copier::view::{BackupView, Overlay, ViewSpec};
use nbd_server::Export;

use super::ServeArgs;

#[derive(Debug)]
pub(super) struct BackupPlan {
    pub(super) words: Vec<String>,
    pub(super) spec: ViewSpec,
    pub(super) at: Option<String>,
    pub(super) export_name: String,
    pub(super) overlay: Option<PathBuf>,
}

impl BackupPlan {
    /// Whether the view holds threads of its own (a repository's
    /// runtime), which a fork would lose: it is opened again after it.
    pub(super) fn has_threads(&self) -> bool {
        matches!(self.spec, ViewSpec::S3(_))
    }
}

/// Whether `words` name a backup rather than images.
pub(super) fn names_a_backup(words: &[PathBuf]) -> bool {
    words.first().is_some_and(|word| {
        let word = word.to_string_lossy();
        ["tape:", "s3://", "file:"]
            .iter()
            .any(|prefix| word.starts_with(prefix))
    })
}

/// Checks what serving a backup needs; changes nothing.
pub(super) fn plan(args: &ServeArgs) -> anyhow::Result<BackupPlan> {
    if !args.read_only && args.overlay.is_none() {
        bail!(
            "a backup is served read-only: add -r, or --overlay FILE to keep writes in FILE and leave the backup as it is"
        );
    }
    if args.read_only && args.overlay.is_some() {
        bail!("-r and --overlay: an overlay is there to take writes; give one of them");
    }
    if args.state.is_some() || args.granularity.is_some() || args.precision.is_some() {
        bail!("a backup is served without tracking: drop --state, --granularity and --precision");
    }
    if args.size.is_some() {
        bail!("a backup has the size of its disk: drop --size");
    }
    let mut words: Vec<String> = args
        .images
        .iter()
        .map(|word| word.to_string_lossy().into_owned())
        .collect();
    let suffix = split_checkpoint(words.last_mut().expect("names_a_backup saw one"));
    let at = match (suffix, &args.at) {
        (Some(_), Some(_)) => bail!("give the checkpoint once: TARGET@CHECKPOINT or --at"),
        (suffix, at) => suffix.or_else(|| at.clone()),
    };
    let spec = ViewSpec::parse(&words)?;
    let export_name = match args.export_names.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        _ => bail!("a backup is one export: give at most one -e"),
    };
    if let Some(overlay) = &args.overlay
        && overlay.exists()
        && !overlay.is_file()
    {
        bail!(
            "--overlay {} exists and is not a regular file",
            overlay.display()
        );
    }
    Ok(BackupPlan {
        words,
        spec,
        at,
        export_name,
        overlay: args.overlay.clone(),
    })
}

/// Takes `@CHECKPOINT` off the end of `word`, unless the whole word names
/// a file (a tape whose name has an `@`).
fn split_checkpoint(word: &mut String) -> Option<String> {
    let (head, checkpoint) = word.rsplit_once('@')?;
    let path = head.strip_prefix("tape:").or(head.strip_prefix("file:"));
    let whole = word.strip_prefix("tape:").or(word.strip_prefix("file:"));
    if checkpoint.is_empty()
        || checkpoint.contains('/')
        || whole.is_some_and(|whole| std::path::Path::new(whole).exists())
        || (path.is_none() && !head.starts_with("s3://"))
    {
        return None;
    }
    let checkpoint = checkpoint.to_string();
    word.truncate(word.len() - checkpoint.len() - 1);
    Some(checkpoint)
}

/// Opens the backup (checking all of it a view checks) as an export.
pub(super) fn open_export(plan: &BackupPlan, args: &ServeArgs) -> anyhow::Result<Export> {
    let options = args.s3.options();
    let open_repository =
        |location: &copier::s3::S3Location| Repository::open(location, &options, false);
    let view = BackupView::open(&plan.spec, plan.at.as_deref(), &open_repository)
        .with_context(|| format!("cannot serve {}", plan.words.join(" ")))?;
    let description = format!(
        "blockwatch: {} at checkpoint {}{}",
        view.description,
        view.checkpoint,
        if plan.overlay.is_some() {
            " with an overlay"
        } else {
            ", read-only"
        }
    );
    let backend: Arc<dyn BlockBackend> = match &plan.overlay {
        Some(path) => Arc::new(
            Overlay::open(path, view)
                .with_context(|| format!("cannot use overlay {}", path.display()))?,
        ),
        None => Arc::new(view),
    };
    Ok(Export {
        description,
        name: plan.export_name.clone(),
        backend,
    })
}
