//! systemd socket activation (sd_listen_fds(3), as nbdkit does it): when
//! `LISTEN_PID` is this process, the `LISTEN_FDS` listening sockets from
//! fd 3 on are served instead of binding any. At most one unix and one TCP
//! socket; they belong to systemd, so nothing is removed at exit.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use anyhow::bail;

/// The first fd systemd passes (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;
/// More than this many passed sockets is a configuration mistake.
const LISTEN_FDS_MAX: RawFd = 16;

/// The sockets systemd passed.
#[derive(Debug, Default)]
pub(super) struct Activated {
    pub(super) unix: Option<(UnixListener, Option<PathBuf>)>,
    pub(super) tcp: Option<(std::net::TcpListener, SocketAddr)>,
}

/// Takes the sockets systemd passed, if it passed any to this process,
/// and clears the variables so that nothing started later sees them.
/// Call before any thread exists.
pub(super) fn take() -> anyhow::Result<Option<Activated>> {
    let Some(pid) = std::env::var_os("LISTEN_PID") else {
        return Ok(None);
    };
    let pid = pid.to_string_lossy().into_owned();
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        // Meant for another process (a parent that did not clear them).
        return Ok(None);
    }
    let count = std::env::var("LISTEN_FDS").unwrap_or_default();
    // SAFETY: no other thread exists yet to read the environment.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let count: RawFd = match count.trim().parse() {
        Ok(count) if (1..=LISTEN_FDS_MAX).contains(&count) => count,
        _ => bail!(
            "socket activation: LISTEN_FDS is {count:?}; expected 1 to {LISTEN_FDS_MAX} sockets"
        ),
    };
    let mut activated = Activated::default();
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count {
        match listening_family(fd)? {
            libc::AF_UNIX => {
                if activated.unix.is_some() {
                    bail!("socket activation passed two unix sockets; give blockwatch one");
                }
                // SAFETY: systemd passed `fd` to this process to own; it
                // is a listening unix stream socket (checked above).
                let listener = unsafe { UnixListener::from_raw_fd(fd) };
                listener.set_nonblocking(true)?;
                let path = listener
                    .local_addr()?
                    .as_pathname()
                    .map(|path| path.to_path_buf());
                activated.unix = Some((listener, path));
            }
            libc::AF_INET | libc::AF_INET6 => {
                if activated.tcp.is_some() {
                    bail!("socket activation passed two TCP sockets; give blockwatch one");
                }
                // SAFETY: as above, a listening TCP socket.
                let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
                listener.set_nonblocking(true)?;
                let address = listener.local_addr()?;
                activated.tcp = Some((listener, address));
            }
            family => {
                bail!("socket activation: fd {fd} is a socket of family {family}, not unix or TCP")
            }
        }
        set_cloexec(fd)?;
    }
    Ok(Some(activated))
}

/// The address family of `fd`, which must be a listening stream socket.
fn listening_family(fd: RawFd) -> anyhow::Result<libc::c_int> {
    let listening = socket_option(fd, libc::SO_ACCEPTCONN)
        .map_err(|error| anyhow::anyhow!("socket activation: fd {fd} is not a socket: {error}"))?;
    if listening == 0 {
        bail!(
            "socket activation: fd {fd} is not listening (the .socket unit needs Accept=no, its default)"
        );
    }
    if socket_option(fd, libc::SO_TYPE).ok() != Some(libc::SOCK_STREAM) {
        bail!("socket activation: fd {fd} is not a stream socket (use ListenStream=)");
    }
    socket_option(fd, libc::SO_DOMAIN).map_err(|error| {
        anyhow::anyhow!("socket activation: cannot tell fd {fd}'s family: {error}")
    })
}

/// An int-valued SOL_SOCKET option of `fd`.
fn socket_option(fd: RawFd, option: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `length` bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut length,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

fn set_cloexec(fd: RawFd) -> anyhow::Result<()> {
    // SAFETY: fcntl on an fd this process owns, no pointers.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        bail!(
            "socket activation: fd {fd}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
