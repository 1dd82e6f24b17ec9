//! `blockwatch serve`: check every argument against the file system
//! (`Plan::check`, which changes nothing), then create and open the images,
//! bind listeners (undoing what it created if any of that fails), go to the
//! background (unless `-f` or `--run`), serve until a signal or the captive
//! command ends, then finish in-flight requests, flush and exit.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use backend::{BlockBackend, FileBackend};
use clap::Args;
use control::ControlServer;
use nbd_server::{Export, Exports, Server};
use tracker::tracker::default_state_dir;
use tracker::{TrackedBackend, Tracker, TrackerOptions};

mod activation;
mod backup;
mod check;
mod snapshots;

use check::{Plan, check_no_listener};
use copier::snapshot::{SnapshotManager, default_store_bytes_max};
use snapshots::ServeHandler;

const DEFAULT_IMAGE: &str = "blockwatch.img";
const DEFAULT_SOCKET: &str = "blockwatch.sock";
const DEFAULT_SIZE_BYTES: u64 = 1 << 30;
const DEFAULT_PORT: u16 = 10809;
/// Blocking-pool threads for the disks' work, beside one per connection.
const POOL_THREADS: usize = 512;
/// How long shutdown waits for connections to finish their requests.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Disk images (regular files or block devices). Default: ./blockwatch.img,
    /// created as a sparse 1 GiB file when missing.
    images: Vec<PathBuf>,
    /// Size for an image that does not exist yet (e.g. 10G). Required to
    /// create any image other than the default one.
    #[arg(long)]
    size: Option<String>,
    /// Listen on this unix socket (mode 0600). Default: ./blockwatch.sock
    /// when no TCP port is given.
    #[arg(short = 'U', long = "unix", value_name = "SOCKET")]
    unix: Option<PathBuf>,
    /// Listen on this TCP port.
    #[arg(short = 'p', long, value_name = "PORT")]
    port: Option<u16>,
    /// Listen on this address (with -p; default 127.0.0.1, port 10809).
    #[arg(short = 'i', long = "ipaddr", value_name = "ADDR")]
    ipaddr: Option<IpAddr>,
    /// Export name; give one per image. Default: "" for a single image, the
    /// file stem of each image otherwise. "" always reaches the first export.
    #[arg(short = 'e', long = "exportname", value_name = "NAME")]
    export_names: Vec<String>,
    /// TLS: off, on (each client chooses) or require (every client must
    /// use TLS; options before STARTTLS are refused). Default: off, or
    /// require when --tls-certificates is given.
    #[arg(long, value_name = "MODE")]
    tls: Option<nbd_server::TlsMode>,
    /// Directory with the server's X.509 certificate and key, as nbdkit
    /// names them: server-cert.pem, server-key.pem, and ca-cert.pem (for
    /// --tls-verify-peer).
    #[arg(long, value_name = "DIR")]
    tls_certificates: Option<PathBuf>,
    /// Let in only clients whose certificate ca-cert.pem signed.
    #[arg(long)]
    tls_verify_peer: bool,
    /// Serve read-only.
    #[arg(short = 'r', long = "readonly")]
    read_only: bool,
    /// Connections at once (in the handshake or transmitting); one more
    /// is closed as soon as it is accepted.
    #[arg(long, value_name = "N", default_value_t = nbd_server::Limits::default().connections_max)]
    max_connections: usize,
    /// Seconds a client may take to finish its handshake.
    #[arg(long, value_name = "SECONDS", default_value_t = nbd_server::Limits::default().handshake_timeout.as_secs_f64())]
    handshake_timeout: f64,
    /// Requests of one connection waiting for the disk or for their
    /// replies to be sent; the connection reads no more until one ends.
    #[arg(long, value_name = "N", default_value_t = nbd_server::Limits::default().requests_in_flight_max)]
    max_in_flight: usize,
    /// READ and WRITE bytes those requests may hold; one request may go
    /// past it. Default: 64M.
    #[arg(long, value_name = "SIZE")]
    max_in_flight_bytes: Option<String>,
    /// Microseconds a connection's thread spins for the next request
    /// before it sleeps, while requests come that soon after it ran dry
    /// (queue-depth-1 clients: a wake-up across CPUs costs more than a
    /// 4 KiB read on a VM). 0 never spins.
    #[arg(long, value_name = "USEC", default_value_t = nbd_server::Limits::default().busy_poll.as_micros() as u64)]
    busy_poll: u64,
    /// A backup (tape:PATH..., s3://..., file:REPLICA): the checkpoint to
    /// serve (default its newest; TARGET@CHECKPOINT says the same).
    #[arg(long, value_name = "CHECKPOINT")]
    at: Option<String>,
    /// A backup: take writes into FILE (sparse, created when missing) and
    /// leave the backup untouched.
    #[arg(long, value_name = "FILE")]
    overlay: Option<PathBuf>,
    #[command(flatten)]
    s3: crate::s3::S3Flags,
    /// Stay in the foreground (logs go to stderr).
    #[arg(short = 'f', long)]
    foreground: bool,
    /// Write the server's process id to this file once it is ready.
    #[arg(long, value_name = "FILE")]
    pidfile: Option<PathBuf>,
    /// Run CMD (with $uri, $unixsocket, $port and $exportname set), serve
    /// until it exits, and exit with its status.
    #[arg(long, value_name = "CMD")]
    run: Option<String>,
    /// Serve without changed-block tracking.
    #[arg(long)]
    no_track: bool,
    /// Track blocks only: no file map (ext2/3/4 files owning the changed
    /// blocks), no maps saved at checkpoints.
    #[arg(long)]
    no_files: bool,
    /// Tracking state directory (default: IMAGE.blockwatch beside the image).
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Tracking granularity: a power of two from 4K to 16M (default 64K, or
    /// what existing state uses).
    #[arg(long, value_name = "SIZE")]
    granularity: Option<String>,
    /// Block size of the exact change record below the granularity: a
    /// power of two from 4K up to the granularity (default 4K, or what
    /// existing state uses; equal to the granularity keeps none).
    #[arg(long, value_name = "SIZE")]
    precision: Option<String>,
    /// Bound of a copy-before-write snapshot's store (old contents of the
    /// regions written while a copy runs; the snapshot is dropped and the
    /// copy fails when it fills, the disk's writes never do). Default: a
    /// tenth of the image, at least 64M.
    #[arg(long, value_name = "SIZE")]
    snapshot_max: Option<String>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    // First, while this is the only thread: the environment is cleared.
    let activated = activation::take()?;
    // Every argument is checked before anything is created, so a refused
    // start leaves no image, state directory or socket behind.
    let backup = if backup::names_a_backup(&args.images) {
        Some(backup::plan(&args)?)
    } else {
        None
    };
    let plan = Plan::check(&args, backup.is_some(), activated.is_some())?;
    // systemd runs a socket-activated service in the foreground.
    let foreground = args.foreground || activated.is_some();
    let mut created = Created::default();
    let (mut exports, trackers, listeners) =
        match start(&args, &plan, backup.as_ref(), activated, &mut created) {
            Ok(started) => started,
            Err(error) => {
                // What failed after the checks (a lock held elsewhere, a port
                // in use, a full disk) is undone the same way.
                created.undo();
                return Err(error);
            }
        };
    // Said only now: a start that fails prints nothing but its error.
    for (image, size_bytes) in &created.images {
        eprintln!(
            "blockwatch: created {} (sparse, {})",
            image.display(),
            human_bytes(*size_bytes)
        );
    }
    for tracked in &trackers {
        let tracker = &tracked.tracker;
        for warning in tracker.warnings() {
            eprintln!("blockwatch: {}: {warning}", tracker.image_path().display());
        }
    }
    warn_if_exposed(&listeners, &plan);
    let captive = args.run.is_some();
    let first_name = exports[0].name.clone();
    let uri = listeners.uri(&first_name);
    if !captive {
        print_banner(&exports, &listeners, &uri);
    }
    if !foreground && !captive {
        // A view's threads (a repository's runtime) would not survive
        // the fork: it was opened to check it, and is opened again after.
        let reopen = backup.as_ref().filter(|plan| plan.has_threads());
        if reopen.is_some() {
            exports.clear();
        }
        daemonize()?;
        if let Some(plan) = reopen {
            exports.push(backup::open_export(plan, &args)?);
        }
    }
    if let Some(pidfile) = &args.pidfile
        && let Err(error) = std::fs::write(pidfile, format!("{}\n", std::process::id()))
    {
        // Checked in `Plan::check`, so rare: then the start is undone too.
        listeners.remove_socket();
        drop((exports, trackers));
        created.undo();
        return Err(error).with_context(|| format!("cannot write pidfile {}", pidfile.display()));
    }
    let environment = CaptiveEnv {
        uri,
        unix_socket: listeners.unix_path.clone(),
        port: listeners.tcp.as_ref().map(|(_, address)| address.port()),
        export_name: first_name,
    };
    let endpoints = listeners.endpoints();
    let result = serve(
        Exports::new(exports),
        &plan,
        &trackers,
        endpoints,
        &listeners,
        args.run.as_deref(),
        environment,
    );
    listeners.remove_socket();
    if let Some(pidfile) = &args.pidfile {
        let _ = std::fs::remove_file(pidfile);
    }
    result
}

/// What a start created, so that a start failing before it serves can
/// remove it again.
#[derive(Debug, Default)]
struct Created {
    /// Each image created, with its size.
    images: Vec<(PathBuf, u64)>,
    state_dirs: Vec<PathBuf>,
}

impl Created {
    fn undo(&self) {
        for state_dir in &self.state_dirs {
            let _ = std::fs::remove_dir_all(state_dir);
        }
        for (image, _) in &self.images {
            let _ = std::fs::remove_file(image);
        }
    }
}

type Started = (Vec<Export>, Vec<Tracked>, Listeners);

/// A tracked disk: its tracker, its snapshots and its export's name.
struct Tracked {
    tracker: Arc<Tracker>,
    snapshots: Arc<SnapshotManager>,
    export_name: String,
    snapshot_max_bytes: u64,
}

/// Creates what `plan` asks for, opens and tracks each image, and binds
/// the listeners; records in `created` what did not exist before.
fn start(
    args: &ServeArgs,
    plan: &Plan,
    backup: Option<&backup::BackupPlan>,
    activated: Option<activation::Activated>,
    created: &mut Created,
) -> anyhow::Result<Started> {
    let mut exports = Vec::with_capacity(plan.images.len());
    let mut trackers = Vec::new();
    if let Some(backup) = backup {
        exports.push(backup::open_export(backup, args)?);
    }
    for image in &plan.images {
        if let Some(size_bytes) = image.create_bytes {
            create_image(&image.path, size_bytes)?;
            created.images.push((image.path.clone(), size_bytes));
        }
        let path = std::path::absolute(&image.path)
            .with_context(|| format!("cannot resolve {}", image.path.display()))?;
        let file: Arc<dyn BlockBackend> = Arc::new(FileBackend::open(&path, args.read_only)?);
        let backend: Arc<dyn BlockBackend> = if args.no_track {
            file
        } else {
            let tracker = open_tracker(args, plan, &path, file.size_bytes(), created)?;
            // Before the tracker starts: it removes what a snapshot of an
            // earlier server left.
            let snapshots = SnapshotManager::register(&tracker, Arc::clone(&file))
                .with_context(|| format!("cannot prepare snapshots of {}", path.display()))?;
            trackers.push(Tracked {
                tracker: Arc::clone(&tracker),
                snapshots,
                export_name: snapshot_disk_name(&image.export_name, &path),
                snapshot_max_bytes: plan
                    .snapshot_max_bytes
                    .unwrap_or_else(|| default_store_bytes_max(file.size_bytes())),
            });
            Arc::new(TrackedBackend::new(file, tracker))
        };
        exports.push(Export {
            description: format!("blockwatch: {}", path.display()),
            name: image.export_name.clone(),
            backend,
        });
    }
    let listeners = match activated {
        Some(activated) => Listeners::activated(activated, plan)?,
        None => Listeners::bind(args, plan, args.run.is_some())?,
    };
    Ok((exports, trackers, listeners))
}

fn open_tracker(
    args: &ServeArgs,
    plan: &Plan,
    path: &Path,
    size_bytes: u64,
    created: &mut Created,
) -> anyhow::Result<Arc<Tracker>> {
    let state_dir = args
        .state
        .clone()
        .unwrap_or_else(|| default_state_dir(path));
    let state_is_new = !state_dir.exists();
    let options = TrackerOptions {
        image: path.to_path_buf(),
        state_dir: args.state.clone(),
        granularity_bytes: plan.granularity_bytes,
        precision_bytes: plan.precision_bytes,
        journal_wrapper: None,
        files: !args.no_files,
    };
    let opened = Tracker::open(&options, size_bytes);
    if state_is_new && state_dir.exists() {
        created.state_dirs.push(state_dir);
    }
    Ok(Arc::new(opened.with_context(|| {
        format!("cannot track {}", path.display())
    })?))
}

/// The name before `@` in a snapshot export's name: the disk's export
/// name, or the image's file stem for the default export "".
fn snapshot_disk_name(export_name: &str, image: &Path) -> String {
    if !export_name.is_empty() {
        return export_name.to_string();
    }
    image.file_stem().map_or_else(
        || "disk".to_string(),
        |stem| stem.to_string_lossy().into_owned(),
    )
}

/// Creates `image` sparse with `size_bytes`; a file that cannot be sized
/// is removed again.
fn create_image(image: &Path, size_bytes: u64) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(image)
        .with_context(|| format!("cannot create {}", image.display()))?;
    if let Err(error) = file.set_len(size_bytes) {
        drop(file);
        let _ = std::fs::remove_file(image);
        return Err(error)
            .with_context(|| format!("cannot size {} to {size_bytes} bytes", image.display()));
    }
    Ok(())
}

/// The bound listeners, created before any thread or fork.
struct Listeners {
    unix: Option<std::os::unix::net::UnixListener>,
    unix_path: Option<PathBuf>,
    /// A private directory made for the captive socket, removed at exit.
    private_dir: Option<PathBuf>,
    tcp: Option<(std::net::TcpListener, SocketAddr)>,
    /// With `--tls=require`: the certificate directory, named in URIs.
    tls_certificates: Option<PathBuf>,
    /// The unix socket's file is ours to remove at exit (not systemd's).
    owns_socket_file: bool,
}

impl Listeners {
    /// The sockets systemd passed (`activation.rs`).
    fn activated(activated: activation::Activated, plan: &Plan) -> anyhow::Result<Listeners> {
        let (unix, unix_path) = match activated.unix {
            Some((listener, path)) => (Some(listener), path),
            None => (None, None),
        };
        if unix.is_some() && unix_path.is_none() && activated.tcp.is_none() {
            bail!("socket activation passed an unnamed (abstract) unix socket; give it a path");
        }
        Ok(Listeners {
            unix,
            unix_path,
            private_dir: None,
            tcp: activated.tcp,
            tls_certificates: certificates_in_uris(plan)?,
            owns_socket_file: false,
        })
    }

    /// Binds TCP first: it leaves nothing in the file system, so a port
    /// in use fails before a socket file or private directory exists.
    fn bind(args: &ServeArgs, plan: &Plan, captive: bool) -> anyhow::Result<Listeners> {
        let want_tcp = args.port.is_some() || args.ipaddr.is_some();
        let tcp = if want_tcp {
            let address = SocketAddr::new(
                args.ipaddr.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                args.port.unwrap_or(DEFAULT_PORT),
            );
            let listener = std::net::TcpListener::bind(address)
                .with_context(|| format!("cannot listen on {address}"))?;
            listener.set_nonblocking(true)?;
            let bound = listener.local_addr()?;
            Some((listener, bound))
        } else {
            None
        };
        let mut private_dir = None;
        let unix_path = match (&args.unix, want_tcp, captive) {
            (Some(path), _, _) => Some(std::path::absolute(path)?),
            (None, false, true) => {
                let dir = std::env::temp_dir().join(format!("blockwatch-{}", std::process::id()));
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let path = dir.join("nbd.sock");
                private_dir = Some(dir);
                Some(path)
            }
            (None, false, false) => Some(std::path::absolute(DEFAULT_SOCKET)?),
            (None, true, _) => None,
        };
        let unix = match unix_path.as_deref().map(bind_unix).transpose() {
            Ok(unix) => unix,
            Err(error) => {
                if let Some(dir) = &private_dir {
                    let _ = std::fs::remove_dir(dir);
                }
                return Err(error);
            }
        };
        Ok(Listeners {
            unix,
            unix_path,
            private_dir,
            tcp,
            tls_certificates: certificates_in_uris(plan)?,
            owns_socket_file: true,
        })
    }

    fn uri(&self, export_name: &str) -> String {
        self.endpoints().uri(export_name)
    }

    fn endpoints(&self) -> Endpoints {
        Endpoints {
            unix_path: self.unix_path.clone(),
            tcp: self.tcp.as_ref().map(|(_, address)| *address),
            tls_certificates: self.tls_certificates.clone(),
        }
    }

    fn remove_socket(&self) {
        if let Some(path) = self.unix_path.as_ref().filter(|_| self.owns_socket_file) {
            let _ = std::fs::remove_file(path);
        }
        if let Some(dir) = &self.private_dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// With `--tls=require`: the certificate directory URIs name.
fn certificates_in_uris(plan: &Plan) -> anyhow::Result<Option<PathBuf>> {
    match (plan.tls.mode(), &plan.tls_certificates) {
        (nbd_server::TlsMode::Require, Some(dir)) => Ok(Some(std::path::absolute(dir)?)),
        _ => Ok(None),
    }
}

/// Where the server listens, to make URIs of exports added later.
#[derive(Debug, Clone)]
pub(crate) struct Endpoints {
    unix_path: Option<PathBuf>,
    tcp: Option<SocketAddr>,
    /// Set when every client must use TLS: URIs are then nbds:// ones
    /// naming this certificate directory (libnbd's tls-certificates).
    tls_certificates: Option<PathBuf>,
}

impl Endpoints {
    /// A URI that reaches `export_name` (the unix socket when there is one).
    pub(crate) fn uri(&self, export_name: &str) -> String {
        let export = uri_escape(export_name);
        let (tls, certificates) = match &self.tls_certificates {
            Some(dir) => ("s", uri_escape(&dir.to_string_lossy())),
            None => ("", String::new()),
        };
        let mut uri = match (&self.unix_path, &self.tcp) {
            (Some(path), _) => format!(
                "nbd{tls}+unix:///{export}?socket={}",
                uri_escape(&path.to_string_lossy())
            ),
            (None, Some(SocketAddr::V6(address))) => {
                format!("nbd{tls}://[{}]:{}/{export}", address.ip(), address.port())
            }
            (None, Some(address)) => format!("nbd{tls}://{address}/{export}"),
            (None, None) => unreachable!("at least one listener is bound"),
        };
        if !certificates.is_empty() {
            uri.push(if self.unix_path.is_some() { '&' } else { '?' });
            uri.push_str("tls-certificates=");
            uri.push_str(&certificates);
        }
        uri
    }
}

/// Plaintext NBD has no authentication: anyone who reaches a TCP port
/// beyond loopback can read and write every disk, so say so.
fn warn_if_exposed(listeners: &Listeners, plan: &Plan) {
    let Some((_, address)) = &listeners.tcp else {
        return;
    };
    if address.ip().is_loopback() || plan.tls.mode() == nbd_server::TlsMode::Require {
        return;
    }
    let how = match plan.tls.mode() {
        nbd_server::TlsMode::On => {
            "with TLS only offered (--tls=on), so plaintext clients get in too"
        }
        _ => "without TLS",
    };
    let message = format!(
        "serving TCP on {address} {how}: anyone who can reach it can read and write the disks; \
         use --tls=require --tls-certificates DIR (and --tls-verify-peer), or -i 127.0.0.1"
    );
    eprintln!("blockwatch: warning: {message}");
}

/// Binds a unix socket readable only by its owner, replacing a stale one.
fn bind_unix(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    // Checked again: the file may have changed since `Plan::check`.
    check_no_listener(path)?;
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    // SAFETY: umask only changes this process's file creation mask; no
    // other thread exists yet to create files in between.
    let old_mask = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old_mask) };
    let listener = bound.with_context(|| format!("cannot listen on {}", path.display()))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Percent-encodes everything but RFC 3986 unreserved characters and '/'.
fn uri_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            escaped.push(byte as char);
        } else {
            escaped.push_str(&format!("%{byte:02X}"));
        }
    }
    escaped
}

fn print_banner(exports: &[Export], listeners: &Listeners, uri: &str) {
    for export in exports {
        println!(
            "blockwatch: serving {} as export {:?} ({})",
            export.description.trim_start_matches("blockwatch: "),
            export.name,
            human_bytes(export.backend.size_bytes())
        );
    }
    println!("  URI:    {uri}");
    if let Some((_, address)) = &listeners.tcp {
        println!("  TCP:    {address}");
    }
    println!(
        "  mount:  mkdir -p /tmp/nbd /mnt/disk; nbdfuse /tmp/nbd '{uri}' & sleep 1; mount -o loop /tmp/nbd/nbd /mnt/disk"
    );
    if let Some(dir) = &listeners.tls_certificates {
        // qemu takes no nbds:// URI; its TLS credentials are an object.
        println!(
            "  qemu:   --object tls-creds-x509,id=tls0,endpoint=client,dir={} and tls-creds=tls0 on the nbd drive",
            dir.display()
        );
        return;
    }
    if let Some(path) = &listeners.unix_path {
        println!(
            "          (with the kernel nbd module: nbd-client -unix {} /dev/nbd0)",
            path.display()
        );
    }
    println!("  qemu:   -drive file={uri},format=raw");
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Forks: the parent exits 0 (the listeners are already bound, so clients
/// can connect at once) and the child carries on detached from the terminal.
fn daemonize() -> anyhow::Result<()> {
    use std::io::Write;
    std::io::stdout().flush()?;
    // SAFETY: no other thread exists yet (the runtime is built after this),
    // so the child starts with a consistent copy of this single thread.
    match unsafe { libc::fork() } {
        -1 => bail!("cannot fork: {}", std::io::Error::last_os_error()),
        0 => {}
        child => {
            // A closed stdout (`| head`) loses only this line.
            let _ = writeln!(
                std::io::stdout(),
                "blockwatch: serving in the background, pid {child} (stop it with: kill {child}; -f keeps it in the foreground)"
            );
            std::process::exit(0);
        }
    }
    // SAFETY: setsid and dup2 on descriptors this process owns.
    unsafe {
        libc::setsid();
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        use std::os::fd::AsRawFd;
        for fd in 0..=2 {
            libc::dup2(null.as_raw_fd(), fd);
        }
    }
    Ok(())
}

/// Variables the captive command sees.
struct CaptiveEnv {
    uri: String,
    unix_socket: Option<PathBuf>,
    port: Option<u16>,
    export_name: String,
}

fn serve(
    exports: Exports,
    plan: &Plan,
    trackers: &[Tracked],
    endpoints: Endpoints,
    listeners: &Listeners,
    run: Option<&str>,
    environment: CaptiveEnv,
) -> anyhow::Result<ExitCode> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // The workers run the accept loops and handshakes; a connection
        // then serves on a thread of its own and sends what may block to
        // tokio's blocking pool. A few spare workers keep accepting while
        // handshakes wait on slow clients.
        .worker_threads(threads.max(4))
        // A client that reads no replies holds at most one pool thread
        // (nbd-server's transmission.rs), so this many are never all held.
        .max_blocking_threads(POOL_THREADS + plan.limits.connections_max)
        .enable_all()
        .build()?;
    // Control sockets start after the fork: their threads must live in the server.
    let mut controls = Vec::with_capacity(trackers.len());
    for tracked in trackers {
        let tracker = &tracked.tracker;
        tracker.start();
        if let Some(files) = tracker.files() {
            files.build_in_background();
        }
        let handler = ServeHandler {
            tracker: Arc::clone(tracker),
            snapshots: Arc::clone(&tracked.snapshots),
            exports: exports.clone(),
            disk_name: tracked.export_name.clone(),
            endpoints: endpoints.clone(),
            store_bytes_max: tracked.snapshot_max_bytes,
        };
        controls.push(
            ControlServer::start(tracker.state_dir(), Arc::new(handler)).with_context(|| {
                format!(
                    "cannot open the control socket in {}",
                    tracker.state_dir().display()
                )
            })?,
        );
    }
    let result = runtime.block_on(async move {
        // Caught before the first connection is accepted: a client that
        // got the greeting may stop the server at once and see it exit 0.
        let mut stop = StopSignals::catch()?;
        let server = Server::with_limits(exports, plan.tls.clone(), plan.limits.clone())
            .context("cannot create the server")?;
        if let Some(listener) = &listeners.unix {
            let listener = tokio::net::UnixListener::from_std(listener.try_clone()?)?;
            tokio::spawn(Arc::clone(&server).serve_unix(listener));
        }
        if let Some((listener, _)) = &listeners.tcp {
            let listener = tokio::net::TcpListener::from_std(listener.try_clone()?)?;
            tokio::spawn(Arc::clone(&server).serve_tcp(listener));
        }
        let code = match run {
            Some(command) => run_captive(command, &environment, &mut stop).await?,
            None => {
                stop.received().await;
                ExitCode::SUCCESS
            }
        };
        server.shutdown();
        match tokio::time::timeout(SHUTDOWN_GRACE, server.wait_idle()).await {
            Ok(result) => result.context("flushing the images at shutdown failed")?,
            Err(_) => bail!(
                "connections did not finish within {SHUTDOWN_GRACE:?}; images were not flushed"
            ),
        }
        Ok(code)
    });
    for mut control in controls {
        control.stop();
    }
    for tracked in trackers {
        let tracker = &tracked.tracker;
        if let Err(error) = tracker.close() {
            eprintln!(
                "blockwatch: {}: could not record a clean shutdown: {}",
                tracker.image_path().display(),
                tracker::tracker::error_chain(&error)
            );
        }
    }
    result
}

/// SIGINT and SIGTERM, which stop the server cleanly once caught.
struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Replaces the default action (exit by the signal) from now on.
    fn catch() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn received(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        tracing::info!("signal received: finishing in-flight requests");
    }
}

/// Runs the captive command and returns its exit status as ours.
async fn run_captive(
    command: &str,
    environment: &CaptiveEnv,
    stop: &mut StopSignals,
) -> anyhow::Result<ExitCode> {
    let mut child = tokio::process::Command::new("/bin/sh");
    child.arg("-c").arg(command);
    child
        .env("uri", &environment.uri)
        .env("nbd", &environment.uri);
    child.env("exportname", &environment.export_name);
    if let Some(path) = &environment.unix_socket {
        child.env("unixsocket", path);
    }
    if let Some(port) = environment.port {
        child.env("port", port.to_string());
    }
    let mut child = child.spawn().context("cannot start the --run command")?;
    let status = tokio::select! {
        status = child.wait() => status?,
        () = stop.received() => return Ok(ExitCode::from(130)),
    };
    use std::os::unix::process::ExitStatusExt;
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    };
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_escape_keeps_paths_readable() {
        assert_eq!(uri_escape("/tmp/a b.sock"), "/tmp/a%20b.sock");
        assert_eq!(uri_escape("disk?1"), "disk%3F1");
    }
}
