//! The server under clients that misbehave, measured from outside: its
//! resident memory and thread count (from /proc) before, during and after
//! floods of idle connections and clients that stop reading replies, with
//! other clients served throughout; and systemd socket activation.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Server;
use nbd_server::proto::*;
use testkit::{MIB, TempDir, output, status_text, wait_until};

const BLOCKWATCH: &str = env!("CARGO_BIN_EXE_blockwatch");

/// The names of a process's threads, counted, for failure messages.
fn thread_names(pid: u32) -> String {
    let mut names = std::collections::BTreeMap::<String, usize>::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        *names.entry(name.trim().to_string()).or_default() += 1;
    }
    format!("{names:?}")
}

/// Threads serving a connection in transmission.
fn connection_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|name| name.trim() == "nbd-conn")
        })
        .count()
}

/// Resident memory (KiB) and thread count of a process.
fn usage(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        let line = status
            .lines()
            .find(|line| line.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("VmRSS:"), field("Threads:"))
}

fn connect(socket: &Path) -> UnixStream {
    let stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

/// Whether the server greets this connection (it closes those past
/// --max-connections at once).
fn greeted(stream: &mut UnixStream) -> bool {
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).is_ok()
}

/// A connection through the handshake (fixed newstyle, GO of export "",
/// simple replies), ready for requests.
fn transmitting(socket: &Path) -> UnixStream {
    let mut stream = connect(socket);
    assert!(greeted(&mut stream), "no greeting");
    let mut hello = (CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&OPT_GO.to_be_bytes());
    hello.extend_from_slice(&6u32.to_be_bytes());
    hello.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // name "", no info requests
    stream.write_all(&hello).unwrap();
    loop {
        let mut header = [0u8; 20];
        stream.read_exact(&mut header).unwrap();
        let reply = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let length = u32::from_be_bytes(header[16..20].try_into().unwrap());
        std::io::copy(&mut (&stream).take(u64::from(length)), &mut std::io::sink()).unwrap();
        assert!(reply & (1 << 31) == 0, "GO refused: {reply:#x}");
        if reply == REP_ACK {
            return stream;
        }
    }
}

fn request(command: u16, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    let mut frame = Vec::new();
    RequestHeader {
        flags: 0,
        command,
        cookie,
        offset,
        length,
    }
    .encode(false, &mut frame);
    frame
}

/// One READ on a fresh connection, checked, as a well-behaved client does.
fn read_works(socket: &Path) {
    let mut stream = transmitting(socket);
    stream.write_all(&request(CMD_READ, 7, 0, 4096)).unwrap();
    let mut reply = vec![0u8; 16 + 4096];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[4..8], &[0, 0, 0, 0], "READ failed");
    assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), 7);
    stream.write_all(&request(CMD_DISC, 0, 0, 0)).unwrap();
}

/// How long a test waits for the server to get somewhere.
const WAIT_LIMIT: Duration = Duration::from_secs(60);

/// Idle connections: 400 against a limit of 64. The first 64 are greeted
/// and held until the handshake timeout, the rest closed at once; threads
/// do not grow with them, memory barely; a client is served once the idle
/// ones are dropped. Then clients that disconnect mid-payload and
/// mid-reply, and ones that stop reading replies: the spec's answer or a
/// closed connection for them, bounded memory and threads, and the other
/// clients served all along.
#[test]
fn hostile_clients_get_their_answer_and_the_server_stays_bounded() {
    let dir = TempDir::new("limits-hostile");
    let image = dir.join("disk.img");
    let mut server = Server::start(
        dir.path(),
        &[&image],
        &[
            "--size",
            "256M",
            "--no-track",
            "--max-connections",
            "64",
            "--handshake-timeout",
            "3",
        ],
    );
    let socket = server.socket().to_path_buf();
    // Data everywhere, so that READs send data, not holes.
    let mut fill = transmitting(&socket);
    for i in 0..16u64 {
        fill.write_all(&request(CMD_WRITE, i, i * 16 * MIB, 16 * MIB))
            .unwrap();
        fill.write_all(&vec![0x5a; 16 * MIB as usize]).unwrap();
        let mut reply = [0u8; 16];
        fill.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[4..8], &[0, 0, 0, 0]);
    }
    drop(fill);
    read_works(&socket);
    let (rss_before, threads_before) = usage(server.pid());

    // A flood of idle connections.
    let mut idle: Vec<UnixStream> = (0..400).map(|_| connect(&socket)).collect();
    let greeted_count = idle.iter_mut().map(greeted).filter(|&ok| ok).count();
    assert_eq!(greeted_count, 64, "exactly --max-connections are greeted");
    let (rss_flood, threads_flood) = usage(server.pid());
    assert!(
        threads_flood <= threads_before + 4,
        "idle connections took threads: {threads_before} -> {threads_flood}"
    );
    assert!(
        rss_flood <= rss_before + 16 * 1024,
        "idle connections took memory: {rss_before} KiB -> {rss_flood} KiB"
    );
    // The handshake timeout frees their places.
    wait_until(
        "a connection after the handshake timeout",
        WAIT_LIMIT,
        || {
            let mut stream = connect(&socket);
            greeted(&mut stream)
        },
    );
    for stream in &mut idle {
        let mut byte = [0u8; 1];
        let closed = matches!(stream.read(&mut byte), Ok(0) | Err(_));
        assert!(closed, "an idle connection outlived the handshake timeout");
    }
    drop(idle);
    read_works(&socket);

    // Gone mid-payload, gone before its reply, gone without DISC.
    for _ in 0..20 {
        let mut stream = transmitting(&socket);
        stream.write_all(&request(CMD_WRITE, 1, 0, MIB)).unwrap();
        stream.write_all(&vec![1; 100_000]).unwrap();
        drop(stream);
        let mut stream = transmitting(&socket);
        stream
            .write_all(&request(CMD_READ, 2, 0, 32 * MIB))
            .unwrap();
        drop(stream);
    }
    read_works(&socket);

    // Their threads end (a leak would fail here).
    let pid = server.pid();
    wait_until(
        "the threads of ended connections to end",
        WAIT_LIMIT,
        || connection_threads(pid) == 0,
    );
    // Eight clients that queue 256 MiB of READs each and read nothing.
    let stalled: Vec<(UnixStream, std::thread::JoinHandle<()>)> = (0..8)
        .map(|n| {
            let stream = transmitting(&socket);
            let mut requests = Vec::new();
            for cookie in 0..256u64 {
                let offset = ((cookie + n) % 255) * MIB;
                requests.extend_from_slice(&request(CMD_READ, cookie, offset, MIB));
            }
            let mut writer = stream.try_clone().unwrap();
            let sender = std::thread::spawn(move || {
                let _ = writer.write_all(&requests);
            });
            (stream, sender)
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..10 {
        read_works(&socket);
    }
    let (rss_stalled, threads_stalled) = usage(server.pid());
    // Per stalled connection: its own thread and at most one pool thread;
    // its buffers: the 64 MiB in-flight bound plus one request, and a
    // batch of replies.
    assert!(
        threads_stalled <= threads_before + 2 * 8 + 8,
        "stalled readers took threads: {threads_before} -> {threads_stalled} ({})",
        thread_names(server.pid())
    );
    let bound_kib = 8 * (64 + 1 + 4) * 1024 + 32 * 1024;
    assert!(
        rss_stalled <= rss_before + bound_kib,
        "stalled readers took memory: {rss_before} KiB -> {rss_stalled} KiB (bound +{bound_kib} KiB)"
    );
    for (stream, sender) in stalled {
        stream.shutdown(std::net::Shutdown::Both).unwrap();
        drop(stream);
        sender.join().unwrap();
    }
    read_works(&socket);
    assert!(server.is_running(), "{}", server.logs());
    eprintln!(
        "rss KiB: before {rss_before}, 400 idle {rss_flood}, 8 stalled readers {rss_stalled}; \
         threads: before {threads_before}, idle {threads_flood}, stalled {threads_stalled}"
    );
    server.stop();
}

/// Runs `blockwatch serve` with `listener` as fd 3 and the variables
/// systemd sets (LISTEN_PID is the shell's pid, which `exec` keeps).
fn activated(listener: &impl AsRawFd, args: &[&str], stderr: &Path) -> std::process::Child {
    let fd = listener.as_raw_fd();
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" serve \"$@\"")
        .arg(BLOCKWATCH)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).unwrap());
    // SAFETY: dup2 and fcntl are async-signal-safe and touch only fds.
    unsafe {
        command.pre_exec(move || {
            // dup2 onto itself is a no-op that leaves FD_CLOEXEC set: when
            // the listener already is fd 3 (as it can be, depending on
            // what the other tests have open), clear the flag instead.
            let rc = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().unwrap()
}

/// Waits until `served` says the activated server answers. The test holds
/// the listener too, so a connection succeeds even when the server is
/// gone: a server that exited fails the test at once, with its stderr.
fn wait_activated(
    child: &mut std::process::Child,
    stderr: &Path,
    mut served: impl FnMut() -> bool,
) {
    wait_until("the activated server", WAIT_LIMIT, || {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the activated server exited: {status}\n{}",
                std::fs::read_to_string(stderr).unwrap_or_default()
            );
        }
        served()
    });
}

fn nbdinfo_size(uri: &str) -> String {
    let result = output(Command::new("nbdinfo").args(["--size", uri]));
    assert!(
        result.status.success(),
        "nbdinfo {uri}: {}\n{}",
        status_text(result.status),
        String::from_utf8_lossy(&result.stderr)
    );
    String::from_utf8_lossy(&result.stdout).trim().to_string()
}

fn terminate(mut child: std::process::Child, stderr: &Path) {
    // SAFETY: kill takes no pointers.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "exit {status}\n{}",
        std::fs::read_to_string(stderr).unwrap_or_default()
    );
}

#[test]
fn socket_activation_serves_the_sockets_systemd_passes_and_leaves_them() {
    let dir = TempDir::new("limits-activation");
    let image = dir.join("disk.img");
    let image_arg = image.to_str().unwrap();
    let stderr = dir.join("stderr");

    // A unix socket, as ListenStream=/run/blockwatch/NAME.sock passes it.
    let socket = dir.join("activated.sock");
    let unix = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let child = activated(&unix, &["--size", "64M", image_arg], &stderr);
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let mut child = child;
    wait_activated(&mut child, &stderr, || {
        UnixStream::connect(&socket).is_ok_and(|mut stream| {
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            greeted(&mut stream)
        })
    });
    assert_eq!(nbdinfo_size(&uri), (64 * MIB).to_string());
    let tracked = output(Command::new(BLOCKWATCH).args(["status", image_arg]));
    assert!(tracked.status.success(), "tracking runs: {tracked:?}");
    terminate(child, &stderr);
    assert!(socket.exists(), "systemd's socket file was removed");

    // A TCP socket; the image exists now.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let mut child = activated(&tcp, &[image_arg], &stderr);
    let uri = format!("nbd://127.0.0.1:{port}/");
    wait_activated(&mut child, &stderr, || {
        output(Command::new("timeout").args(["10", "nbdinfo", "--size", &uri]))
            .status
            .success()
    });
    assert_eq!(nbdinfo_size(&uri), (64 * MIB).to_string());
    terminate(child, &stderr);

    // Listening sockets of our own beside systemd's are refused.
    let child = activated(&tcp, &["-U", "/nonexistent/x.sock", image_arg], &stderr);
    let result = child.wait_with_output().unwrap();
    assert_eq!(result.status.code(), Some(2), "{:?}", result.status);
    let message = std::fs::read_to_string(&stderr).unwrap();
    assert!(message.contains("socket activation"), "{message}");
}
