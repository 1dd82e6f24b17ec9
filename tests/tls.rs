//! TLS with the real clients: `serve --tls=require|on` with certificates
//! made by openssl (testkit `Certificates`), reached by nbdinfo over
//! nbds:// and nbds+unix://, python3-libnbd with TLS required, qemu-img and
//! qemu-io with tls-creds-x509, nbdcopy both ways; a plaintext client
//! refused under require and let in under on; client certificates checked
//! with --tls-verify-peer; the copier's own client copying to blockwatch
//! and to nbdkit over TLS, never falling back to plaintext; TLS flags
//! that cannot work refused before anything is created; and the warning
//! for plaintext TCP beyond loopback.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use testkit::*;

const MIB: u64 = 1 << 20;

/// A port on 127.0.0.1 that nothing listened on a moment ago.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().unwrap().port()
}

/// A server on a unix socket and on 127.0.0.1:PORT with `tls_args`.
struct TlsServer {
    server: Server,
    port: u16,
    certificates: Certificates,
    _dir: TempDir,
}

impl TlsServer {
    fn start(label: &str, tls_args: &[&str]) -> TlsServer {
        let dir = TempDir::new(label);
        let certificates = Certificates::generate(dir.path());
        let port = free_port();
        let port_text = port.to_string();
        let pki = certificates.dir.to_str().unwrap().to_string();
        let mut args = vec![
            "--size",
            "64M",
            "-p",
            &port_text,
            "--tls-certificates",
            &pki,
        ];
        args.extend_from_slice(tls_args);
        let server = Server::start(dir.path(), &[&dir.join("disk.img")], &args);
        TlsServer {
            server,
            port,
            certificates,
            _dir: dir,
        }
    }

    fn tcp_uri(&self, pki: &Path) -> String {
        format!(
            "nbds://127.0.0.1:{}/?tls-certificates={}",
            self.port,
            pki.display()
        )
    }

    fn unix_uri(&self, pki: &Path) -> String {
        format!(
            "nbds+unix:///?socket={}&tls-certificates={}",
            self.server.socket().display(),
            pki.display()
        )
    }
}

/// `nbdinfo --json URI`, which must succeed.
fn nbdinfo_json(uri: &str) -> serde_json::Value {
    require_tool("nbdinfo", "libnbd-bin");
    parse_json(&run_program("nbdinfo", ["--json", uri]), "nbdinfo --json")
}

/// nbdinfo on `uri`, which must fail; returns libnbd's debug output,
/// where the server's error messages are.
fn nbdinfo_refused(uri: &str) -> String {
    let result = output(Command::new("nbdinfo").arg(uri).env("LIBNBD_DEBUG", "1"));
    let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
    assert!(!result.status.success(), "nbdinfo {uri} got in:\n{stderr}");
    stderr
}

#[test]
fn nbdinfo_reads_over_tls_on_tcp_and_on_the_unix_socket() {
    let tls = TlsServer::start("tls-nbdinfo", &["--tls=require"]);
    for uri in [
        tls.tcp_uri(&tls.certificates.dir),
        tls.unix_uri(&tls.certificates.dir),
    ] {
        let info = nbdinfo_json(&uri);
        assert_eq!(info["TLS"], true, "{uri}: {info:#}");
        assert_eq!(info["exports"][0]["export-size"], 64 * MIB, "{info:#}");
    }
}

#[test]
fn require_refuses_a_plaintext_client_and_says_tls_is_required() {
    let tls = TlsServer::start("tls-require", &["--tls=require"]);
    let debug = nbdinfo_refused(&format!("nbd://127.0.0.1:{}/", tls.port));
    assert!(debug.contains("requires TLS"), "{debug}");
    let debug = nbdinfo_refused(&tls.server.uri());
    assert!(debug.contains("requires TLS"), "{debug}");
    // The server goes on serving TLS clients.
    nbdinfo_json(&tls.tcp_uri(&tls.certificates.dir));
}

#[test]
fn on_lets_plaintext_and_tls_clients_in() {
    let tls = TlsServer::start("tls-on", &["--tls=on"]);
    let plain = nbdinfo_json(&format!("nbd://127.0.0.1:{}/", tls.port));
    assert_eq!(plain["TLS"], false, "{plain:#}");
    let encrypted = nbdinfo_json(&tls.tcp_uri(&tls.certificates.dir));
    assert_eq!(encrypted["TLS"], true, "{encrypted:#}");
}

#[test]
fn nbdcopy_over_tls_writes_and_reads_back_every_byte() {
    require_tool("nbdcopy", "libnbd-bin");
    let tls = TlsServer::start("tls-nbdcopy", &["--tls=require"]);
    let dir = TempDir::new("tls-nbdcopy-files");
    let source = dir.join("source.img");
    write_random_file(&source, 14, 64 * MIB as usize);
    let uri = tls.tcp_uri(&tls.certificates.dir);
    run_program("nbdcopy", [source.to_str().unwrap(), uri.as_str()]);
    let back = dir.join("back.img");
    let unix = tls.unix_uri(&tls.certificates.dir);
    run_program("nbdcopy", [unix.as_str(), back.to_str().unwrap()]);
    assert_files_equal(&source, &back);
}

#[test]
fn python_libnbd_requires_tls_and_reads_what_it_wrote() {
    let tls = TlsServer::start("tls-python", &["--tls=require"]);
    let script = r#"
import sys, nbd
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(sys.argv[2])
h.connect_tcp("127.0.0.1", sys.argv[1])
assert h.get_tls_negotiated(), "TLS was not negotiated"
data = bytes(range(256)) * 4096
h.pwrite(data, 1 << 20)
h.flush()
assert h.pread(len(data), 1 << 20) == data, "read back differs"
h.shutdown()
print("ok")
"#;
    let port = tls.port.to_string();
    let pki = tls.certificates.dir.to_str().unwrap();
    let result = output(Command::new("/usr/bin/python3").args(["-c", script, &port, pki]));
    assert!(
        result.status.success(),
        "python3-libnbd (apt-get install -y python3-libnbd): {}\n{}",
        String::from_utf8_lossy(&result.stderr),
        tls.server.logs()
    );
}

/// qemu's client arguments for the server over TLS with `pki`.
fn qemu_tls_args(tls: &TlsServer, pki: &Path) -> Vec<String> {
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            pki.display()
        ),
        "--image-opts".into(),
        format!("driver=nbd,host=127.0.0.1,port={},tls-creds=tls0", tls.port),
    ]
}

#[test]
fn qemu_img_and_qemu_io_work_over_tls() {
    require_tool("qemu-io", "qemu-utils");
    let tls = TlsServer::start("tls-qemu", &["--tls=require"]);
    let args = qemu_tls_args(&tls, &tls.certificates.dir);
    let info = run(Command::new("qemu-img").arg("info").args(&args));
    assert!(info.contains("virtual size: 64 MiB"), "{info}");
    let io = run(Command::new("qemu-io")
        .args(["-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M"])
        .args(&args));
    assert!(!io.contains("failed") && !io.contains("error"), "{io}");
    // What qemu wrote over TLS is what a plaintext reader of the image
    // file would see.
    let back = TempDir::new("tls-qemu-back");
    let out = back.join("out.img");
    let uri = tls.unix_uri(&tls.certificates.dir);
    run_program("nbdcopy", [uri.as_str(), out.to_str().unwrap()]);
    assert_file_range(&out, 0, &vec![0xab; MIB as usize]);
}

#[test]
fn verify_peer_lets_in_only_clients_with_a_certificate_of_the_authority() {
    let tls = TlsServer::start("tls-verify", &["--tls=require", "--tls-verify-peer"]);
    let info = nbdinfo_json(&tls.tcp_uri(&tls.certificates.dir));
    assert_eq!(info["TLS"], true);
    nbdinfo_refused(&tls.tcp_uri(&tls.certificates.anonymous_dir));
    nbdinfo_refused(&tls.tcp_uri(&tls.certificates.stranger_dir));
    // qemu without a client certificate is refused too.
    let args = qemu_tls_args(&tls, &tls.certificates.anonymous_dir);
    let result = output(Command::new("qemu-img").arg("info").args(&args));
    assert!(
        !result.status.success(),
        "qemu-img got in without a certificate"
    );
    // The copier's client, with and without one.
    let dir = TempDir::new("tls-verify-copy");
    let image = dir.join("disk.img");
    let source = Server::start_with_size(dir.path(), &image, "64M");
    qemu_io(&source.uri(), &["write -P 7 0 2M"]);
    let refused = copy_to(&image, &tls.tcp_uri(&tls.certificates.anonymous_dir));
    assert!(
        !refused.status.success(),
        "the copier got in without a certificate"
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("client-cert.pem"), "{stderr}");
    let copied = copy_to(&image, &tls.tcp_uri(&tls.certificates.dir));
    assert!(
        copied.status.success(),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );
}

fn copy_to(image: &Path, target: &str) -> std::process::Output {
    output(&mut command(
        BLOCKWATCH,
        ["copy", image.to_str().unwrap(), "--to", target, "--json"],
    ))
}

/// A full copy of a served disk to `target`, read back over `read_back`
/// and compared with the image.
fn copy_and_compare(dir: &Path, target: &str, read_back: &str) {
    let image = dir.join("disk.img");
    let source = Server::start_with_size(dir, &image, "64M");
    qemu_io(&source.uri(), &["write -P 1 0 4M", "write -P 2 40M 1M"]);
    let copied = copy_to(&image, target);
    assert!(
        copied.status.success(),
        "blockwatch copy --to {target}: {}",
        String::from_utf8_lossy(&copied.stderr)
    );
    let out = dir.join("out.img");
    run_program("nbdcopy", [read_back, out.to_str().unwrap()]);
    assert_files_equal(&image, &out);
}

#[test]
fn the_copier_copies_to_blockwatch_over_tls() {
    let tls = TlsServer::start("tls-copy-blockwatch", &["--tls=require"]);
    let dir = TempDir::new("tls-copy-source");
    let target = tls.tcp_uri(&tls.certificates.dir);
    copy_and_compare(dir.path(), &target, &tls.unix_uri(&tls.certificates.dir));
}

#[test]
fn the_copier_copies_to_nbdkit_over_tls() {
    require_tool("nbdkit", "nbdkit");
    let dir = TempDir::new("tls-copy-nbdkit");
    let certificates = Certificates::generate(dir.path());
    let socket = dir.join("nbdkit.sock");
    let pki = format!("--tls-certificates={}", certificates.dir.display());
    let _nbdkit = ServerProcess::start(
        "nbdkit",
        &[
            "-f",
            "--tls=require",
            &pki,
            "-U",
            socket.to_str().unwrap(),
            "memory",
            "64M",
        ],
        &socket,
        &dir.join("nbdkit.log"),
    );
    let uri = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        socket.display(),
        certificates.dir.display()
    );
    copy_and_compare(dir.path(), &uri, &uri);
}

#[test]
fn an_nbds_uri_never_falls_back_to_plaintext() {
    let dir = TempDir::new("tls-no-fallback");
    let certificates = Certificates::generate(dir.path());
    let plain = Server::start_with_size(dir.path(), &dir.join("plain.img"), "64M");
    let image = dir.join("disk.img");
    let _source = Server::start_with_size(dir.path(), &image, "64M");
    let target = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        plain.socket().display(),
        certificates.dir.display()
    );
    let result = copy_to(&image, &target);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "copied in plaintext: {stderr}");
    assert!(stderr.contains("never falls back to plaintext"), "{stderr}");
}

/// `blockwatch serve ARGS --run true` in `dir`: its exit status and stderr.
fn serve_briefly(dir: &Path, args: &[&str]) -> (bool, String) {
    let result = output(
        command(BLOCKWATCH, ["serve", "--no-track", "--run", "true"])
            .args(args)
            .current_dir(dir),
    );
    (
        result.status.success(),
        String::from_utf8_lossy(&result.stderr).into_owned(),
    )
}

#[test]
fn tls_flags_that_cannot_work_are_refused_before_anything_is_created() {
    let dir = TempDir::new("tls-flags");
    let image = dir.join("new.img");
    let image_arg = image.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--tls=require"], "needs --tls-certificates DIR"),
        (&["--tls-verify-peer"], "--tls-verify-peer needs TLS"),
        (
            &["--tls=off", "--tls-certificates", "/etc"],
            "--tls-certificates with --tls=off",
        ),
        (
            &["--tls-certificates", "/nonexistent-pki"],
            "/nonexistent-pki/server-cert.pem",
        ),
    ];
    for (flags, message) in cases {
        let mut args = vec![image_arg, "--size", "64M"];
        args.extend_from_slice(flags);
        let (succeeded, stderr) = serve_briefly(dir.path(), &args);
        assert!(!succeeded, "{flags:?} was accepted");
        assert!(stderr.contains(message), "{flags:?}: {stderr}");
        assert!(!image.exists(), "{flags:?} created the image");
    }
}

#[test]
fn tcp_beyond_loopback_without_required_tls_is_warned_about() {
    let dir = TempDir::new("tls-warning");
    let certificates = Certificates::generate(dir.path());
    let pki = certificates.dir.to_str().unwrap().to_string();
    let port = free_port().to_string();
    let image = dir.join("disk.img");
    let base = [image.to_str().unwrap(), "--size", "64M", "-p", &port];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let (succeeded, stderr) = serve_briefly(dir.path(), &args);
        assert!(succeeded, "{extra:?}: {stderr}");
        stderr
    };
    let warned = with(&["-i", "0.0.0.0"]);
    assert!(
        warned.contains("warning: serving TCP on 0.0.0.0"),
        "{warned}"
    );
    assert!(warned.contains("without TLS"), "{warned}");
    let on = with(&["-i", "0.0.0.0", "--tls=on", "--tls-certificates", &pki]);
    assert!(on.contains("plaintext clients get in too"), "{on}");
    let required = with(&["-i", "0.0.0.0", "--tls-certificates", &pki]);
    assert!(!required.contains("warning"), "{required}");
    let loopback = with(&[]);
    assert!(!loopback.contains("warning"), "{loopback}");
}
