//! `Plan::check`: every argument of `serve` checked against the file
//! system before anything is created (images, state, sockets, pidfile).

use std::ffi::OsStr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nbd_server::{Limits, TlsMode, TlsPolicy};
use tracker::regions::REGION_COUNT_MAX;

use super::{DEFAULT_IMAGE, DEFAULT_SIZE_BYTES, DEFAULT_SOCKET, ServeArgs};
use crate::size::{parse_granularity, parse_precision, parse_size, size_text};

/// What `serve` will do, worked out from the arguments and checked against
/// the file system without changing it.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) images: Vec<ImagePlan>,
    pub(super) granularity_bytes: Option<u64>,
    pub(super) precision_bytes: Option<u64>,
    /// `--snapshot-max`: the copy-before-write store's bound.
    pub(super) snapshot_max_bytes: Option<u64>,
    /// `--tls` with its certificates, loaded already.
    pub(super) tls: TlsPolicy,
    /// Where they were loaded from.
    pub(super) tls_certificates: Option<PathBuf>,
    /// `--max-connections`, `--handshake-timeout`, `--max-in-flight[-bytes]`.
    pub(super) limits: Limits,
}

#[derive(Debug)]
pub(super) struct ImagePlan {
    pub(super) path: PathBuf,
    pub(super) export_name: String,
    /// Create the image sparse with this size (it does not exist yet).
    pub(super) create_bytes: Option<u64>,
}

impl Plan {
    /// `backup`: the words name a backup (checked by `backup::plan`), not
    /// images. `activated`: systemd passed the listening sockets.
    pub(super) fn check(args: &ServeArgs, backup: bool, activated: bool) -> anyhow::Result<Plan> {
        if activated && (args.unix.is_some() || args.port.is_some() || args.ipaddr.is_some()) {
            bail!(
                "systemd passed the sockets to listen on (socket activation): drop -U, -p and -i, or the .socket unit"
            );
        }
        let size_bytes = args.size.as_deref().map(parse_size).transpose();
        let size_bytes = size_bytes.map_err(anyhow::Error::msg)?;
        let granularity_bytes = args.granularity.as_deref().map(parse_granularity);
        let granularity_bytes = granularity_bytes.transpose().map_err(anyhow::Error::msg)?;
        let precision_bytes = args.precision.as_deref().map(parse_precision);
        let precision_bytes = precision_bytes.transpose().map_err(anyhow::Error::msg)?;
        let snapshot_max_bytes = args.snapshot_max.as_deref().map(parse_size);
        let snapshot_max_bytes = snapshot_max_bytes
            .transpose()
            .map_err(|error| anyhow::anyhow!("--snapshot-max: {error}"))?;
        if snapshot_max_bytes == Some(0) {
            bail!("--snapshot-max 0 leaves no room for a snapshot: give a size such as 2G");
        }
        if let (Some(precision), Some(granularity)) = (precision_bytes, granularity_bytes)
            && precision > granularity
        {
            bail!(
                "--precision {} is coarser than --granularity {}: use at most the granularity",
                size_text(precision),
                size_text(granularity)
            );
        }
        let is_default = args.images.is_empty();
        let paths = if backup {
            Vec::new()
        } else if is_default {
            vec![PathBuf::from(DEFAULT_IMAGE)]
        } else {
            args.images.clone()
        };
        let names = if backup {
            Vec::new()
        } else {
            export_names(&paths, &args.export_names)?
        };
        if args.state.is_some() && paths.len() > 1 {
            bail!("--state names one state directory: serve one image with it, or drop --state");
        }
        if let Some(state) = &args.state
            && state.exists()
            && !state.is_dir()
        {
            bail!(
                "--state {} exists and is not a directory; give a directory",
                state.display()
            );
        }
        check_each_image_once(&paths)?;
        let mut images = Vec::with_capacity(paths.len());
        for (path, export_name) in paths.into_iter().zip(names) {
            let create_bytes = check_image(&path, size_bytes, is_default)?;
            if !args.no_track
                && let Some(granularity_bytes) = granularity_bytes
            {
                check_region_count(&path, create_bytes, granularity_bytes)?;
            }
            images.push(ImagePlan {
                path,
                export_name,
                create_bytes,
            });
        }
        if let Some(path) = unix_socket_path(args).filter(|_| !activated) {
            check_unix_socket(&path)?;
        }
        if let Some(pidfile) = &args.pidfile {
            check_pidfile(pidfile)?;
        }
        Ok(Plan {
            images,
            granularity_bytes,
            precision_bytes,
            snapshot_max_bytes,
            tls: tls_policy(args)?,
            tls_certificates: args.tls_certificates.clone(),
            limits: limits(args)?,
        })
    }
}

/// The longest `--busy-poll` taken, in microseconds.
const BUSY_POLL_MAX_US: u64 = 1000;

fn limits(args: &ServeArgs) -> anyhow::Result<Limits> {
    if args.max_connections == 0 {
        bail!("--max-connections 0 lets no client in: give at least 1");
    }
    if args.max_in_flight == 0 {
        bail!("--max-in-flight 0 would serve no request: give at least 1");
    }
    let timeout = args.handshake_timeout;
    if !(timeout > 0.0 && timeout <= 86400.0) {
        bail!("--handshake-timeout {timeout}: give seconds above 0, at most a day (86400)");
    }
    if args.busy_poll > BUSY_POLL_MAX_US {
        bail!(
            "--busy-poll {}: at most {BUSY_POLL_MAX_US} microseconds (a spin that long is a core lost, not a wake-up saved)",
            args.busy_poll
        );
    }
    let defaults = Limits::default();
    let bytes_in_flight_max = match args.max_in_flight_bytes.as_deref() {
        None => defaults.bytes_in_flight_max,
        Some(text) => {
            let bytes = parse_size(text)
                .map_err(|error| anyhow::anyhow!("--max-in-flight-bytes: {error}"))?;
            if bytes == 0 {
                bail!(
                    "--max-in-flight-bytes 0 would serve no READ or WRITE: give a size such as 64M"
                );
            }
            usize::try_from(bytes).unwrap_or(usize::MAX)
        }
    };
    Ok(Limits {
        connections_max: args.max_connections,
        handshake_timeout: std::time::Duration::from_secs_f64(timeout),
        requests_in_flight_max: args.max_in_flight,
        bytes_in_flight_max,
        busy_poll: std::time::Duration::from_micros(args.busy_poll),
    })
}

/// The TLS mode and its certificates. Certificates without `--tls` mean
/// `require`: a server given certificates is meant to be reached with
/// them, and `on` would still let plaintext clients in (nbdkit picks `on`).
fn tls_policy(args: &ServeArgs) -> anyhow::Result<TlsPolicy> {
    let mode = match (args.tls, &args.tls_certificates) {
        (Some(mode), _) => mode,
        (None, Some(_)) => TlsMode::Require,
        (None, None) => TlsMode::Off,
    };
    if mode == TlsMode::Off {
        if args.tls_certificates.is_some() {
            bail!("--tls-certificates with --tls=off: drop one of them");
        }
        if args.tls_verify_peer {
            bail!("--tls-verify-peer needs TLS: add --tls=require and --tls-certificates DIR");
        }
        return Ok(TlsPolicy::off());
    }
    let Some(dir) = &args.tls_certificates else {
        bail!(
            "--tls={mode} needs --tls-certificates DIR (with {}, {} and {})",
            nbd_server::tls::SERVER_CERT_FILE,
            nbd_server::tls::SERVER_KEY_FILE,
            nbd_server::tls::CA_CERT_FILE
        );
    };
    let config =
        nbd_server::tls::server_config(dir, args.tls_verify_peer).context("cannot set up TLS")?;
    Ok(TlsPolicy::new(mode, config))
}

/// Refuses an image named twice (under any spelling of its path): the
/// second open would find it locked by the first.
pub(super) fn check_each_image_once(paths: &[PathBuf]) -> anyhow::Result<()> {
    let mut seen: Vec<(PathBuf, Option<(u64, u64)>)> = Vec::with_capacity(paths.len());
    for path in paths {
        let absolute = std::path::absolute(path)
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        let identity = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        if seen.iter().any(|(other, other_identity)| {
            *other == absolute || identity.is_some() && *other_identity == identity
        }) {
            bail!("{} is named twice; serve each image once", path.display());
        }
        seen.push((absolute, identity));
    }
    Ok(())
}

/// Checks `image` can be served as asked; returns the size to create it
/// with when it does not exist yet.
pub(super) fn check_image(
    image: &Path,
    size_bytes: Option<u64>,
    is_default: bool,
) -> anyhow::Result<Option<u64>> {
    match std::fs::metadata(image) {
        Ok(metadata) => {
            let file_type = metadata.file_type();
            let is_device = file_type.is_block_device();
            if !file_type.is_file() && !is_device {
                bail!(
                    "{} is neither a regular file nor a block device",
                    image.display()
                );
            }
            if let Some(wanted) = size_bytes
                && !is_device
                && metadata.len() != wanted
            {
                bail!(
                    "{} exists with {} bytes, not the {} that --size asks for; drop --size to serve it as it is",
                    image.display(),
                    metadata.len(),
                    wanted
                );
            }
            Ok(None)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let Some(size) = size_bytes.or(is_default.then_some(DEFAULT_SIZE_BYTES)) else {
                bail!(
                    "{} does not exist; give --size (e.g. --size 10G) to create it",
                    image.display()
                );
            };
            let parent = parent_dir(image);
            if !parent.is_dir() {
                bail!(
                    "cannot create {}: {} is not a directory",
                    image.display(),
                    parent.display()
                );
            }
            Ok(Some(size))
        }
        Err(e) => Err(e).with_context(|| format!("cannot use {}", image.display())),
    }
}

/// The tracker refuses more than `REGION_COUNT_MAX` regions; says so before
/// the image is created, for images whose size is known without opening.
pub(super) fn check_region_count(
    image: &Path,
    create_bytes: Option<u64>,
    granularity_bytes: u64,
) -> anyhow::Result<()> {
    let size_bytes = match create_bytes {
        Some(size_bytes) => size_bytes,
        None => match std::fs::metadata(image) {
            Ok(metadata) if metadata.is_file() => metadata.len(),
            // A block device's size takes an ioctl: the tracker checks it.
            _ => return Ok(()),
        },
    };
    let region_count = size_bytes.div_ceil(granularity_bytes);
    if region_count > REGION_COUNT_MAX {
        bail!(
            "{} would have {region_count} regions at --granularity {}, over the limit {REGION_COUNT_MAX}; use a larger --granularity",
            image.display(),
            size_text(granularity_bytes)
        );
    }
    Ok(())
}

/// The directory a relative or absolute path lies in.
pub(super) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Longest unix socket path the kernel takes (`sun_path` less its NUL).
pub(super) const UNIX_SOCKET_PATH_MAX_BYTES: usize = 107;

/// The unix socket `serve` will listen on, if any, unless it is the
/// private one of captive mode (made fresh, so nothing to check).
pub(super) fn unix_socket_path(args: &ServeArgs) -> Option<PathBuf> {
    let want_tcp = args.port.is_some() || args.ipaddr.is_some();
    match (&args.unix, want_tcp, args.run.is_some()) {
        (Some(path), _, _) => Some(path.clone()),
        (None, false, false) => Some(PathBuf::from(DEFAULT_SOCKET)),
        (None, _, _) => None,
    }
}

/// Checks that a socket can be bound at `path` without replacing anything
/// but a stale socket.
pub(super) fn check_unix_socket(path: &Path) -> anyhow::Result<()> {
    let absolute =
        std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    let length = absolute.as_os_str().len();
    if length > UNIX_SOCKET_PATH_MAX_BYTES {
        bail!(
            "socket path {} is {length} bytes, over the {UNIX_SOCKET_PATH_MAX_BYTES} a unix socket allows; choose a shorter path with -U",
            absolute.display()
        );
    }
    let parent = parent_dir(path);
    if !parent.is_dir() {
        bail!(
            "cannot listen on {}: {} is not a directory",
            path.display(),
            parent.display()
        );
    }
    check_no_listener(path)
}

/// A file at `path` must be a socket nobody listens on (a stale one).
pub(super) fn check_no_listener(path: &Path) -> anyhow::Result<()> {
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !metadata.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; choose another path with -U",
            path.display()
        );
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!("another server is already listening on {}", path.display());
    }
    Ok(())
}

/// The pidfile is written after the fork, where an error reaches no
/// terminal: check now that it can be.
pub(super) fn check_pidfile(pidfile: &Path) -> anyhow::Result<()> {
    let parent = parent_dir(pidfile);
    if !parent.is_dir() {
        bail!(
            "cannot write pidfile {}: {} is not a directory",
            pidfile.display(),
            parent.display()
        );
    }
    if pidfile.is_dir() {
        bail!(
            "cannot write pidfile {}: it is a directory",
            pidfile.display()
        );
    }
    Ok(())
}

/// One export name per image.
pub(super) fn export_names(images: &[PathBuf], given: &[String]) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = if !given.is_empty() {
        if given.len() != images.len() {
            bail!(
                "{} export names for {} images: give one -e per image, in the same order",
                given.len(),
                images.len()
            );
        }
        given.to_vec()
    } else if images.len() == 1 {
        vec![String::new()]
    } else {
        images
            .iter()
            .map(|image| {
                image
                    .file_stem()
                    .and_then(OsStr::to_str)
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    };
    for (index, name) in names.iter().enumerate() {
        if name.len() > nbd_server::proto::STRING_MAX {
            bail!("export name {name:?} is longer than the protocol's 4096 bytes");
        }
        if names[..index].contains(name) {
            bail!("export name {name:?} is used twice: name each image with -e");
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names_default_to_file_stems() {
        let images = [PathBuf::from("/x/a.img"), PathBuf::from("/y/b.qcow")];
        assert_eq!(export_names(&images, &[]).unwrap(), ["a", "b"]);
        assert_eq!(export_names(&images[..1], &[]).unwrap(), [""]);
        assert!(export_names(&images, &["only".into()]).is_err());
        let same = [PathBuf::from("/x/a.img"), PathBuf::from("/y/a.img")];
        assert!(export_names(&same, &[]).is_err());
    }
}
