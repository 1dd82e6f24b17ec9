//! STARTTLS at the byte level: a raw client speaks to an in-process server
//! in each TLS mode and checks the option replies doc/proto.md names
//! (NBD_REP_ERR_TLS_REQD before TLS under `require`, POLICY with TLS off,
//! INVALID for a second STARTTLS or one with data), that EXPORT_NAME
//! without TLS ends only its own connection, that plaintext sent after
//! STARTTLS before the TLS hello is not taken as encrypted input, and that
//! nothing negotiated before STARTTLS survives it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backend::FileBackend;
use nbd_server::proto::*;
use nbd_server::tls::{load_roots, server_config};
use nbd_server::{Export, Exports, Server, TlsMode, TlsPolicy};
use testkit::{Certificates, TempDir, create_sparse_file};

const IMAGE_BYTES: u64 = 1 << 20;

struct TestServer {
    socket: PathBuf,
    certificates: Certificates,
    server: Arc<Server>,
    runtime: Option<tokio::runtime::Runtime>,
    _dir: TempDir,
}

impl TestServer {
    fn start(mode: TlsMode) -> TestServer {
        let dir = TempDir::new("nbd-wire-tls");
        let certificates = Certificates::generate(dir.path());
        let image = dir.join("disk.img");
        create_sparse_file(&image, IMAGE_BYTES);
        let socket = dir.join("nbd.sock");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let exports = Exports::new(vec![Export {
            name: "disk".to_string(),
            description: "test disk".to_string(),
            backend: Arc::new(FileBackend::open(&image, false).unwrap()),
        }]);
        let policy = match mode {
            TlsMode::Off => TlsPolicy::off(),
            _ => TlsPolicy::new(mode, server_config(&certificates.dir, false).unwrap()),
        };
        let server = Server::with_tls(exports, policy).unwrap();
        let listener = {
            let _guard = runtime.enter();
            tokio::net::UnixListener::bind(&socket).unwrap()
        };
        runtime.spawn(Arc::clone(&server).serve_unix(listener));
        TestServer {
            socket,
            certificates,
            server,
            runtime: Some(runtime),
            _dir: dir,
        }
    }

    /// A connection past the greeting and the client flags.
    fn connect(&self) -> Client<UnixStream> {
        let stream = UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut client = Client { stream };
        let greeting = client.read_exact(18);
        assert_eq!(be64(&greeting[0..8]), NBDMAGIC);
        client.write(&(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES).to_be_bytes());
        client
    }

    fn connect_tls(&self) -> Client<TlsStream> {
        self.upgrade(self.connect())
    }

    /// STARTTLS acknowledged, then the TLS handshake as a client that
    /// trusts the test authority.
    fn upgrade(&self, mut client: Client<UnixStream>) -> Client<TlsStream> {
        assert_eq!(client.option(OPT_STARTTLS, &[]).0, REP_ACK);
        let roots = load_roots(&self.certificates.dir.join("ca-cert.pem")).unwrap();
        let config =
            rustls::ClientConfig::builder_with_provider(nbd_server::tls::crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        Client {
            stream: rustls::StreamOwned::new(connection, client.stream),
        }
    }

    /// The server still greets new connections.
    fn assert_alive(&self) {
        let mut client = self.connect();
        assert_eq!(client.option(OPT_ABORT, &[]).0, REP_ACK);
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.server.shutdown();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, UnixStream>;

struct Client<S> {
    stream: S,
}

impl<S: Read + Write> Client<S> {
    fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        self.stream.read_exact(&mut buf).unwrap();
        buf
    }

    fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
        self.stream.flush().unwrap();
    }

    fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut frame = Vec::new();
        put_option_request(&mut frame, option, data);
        self.write(&frame);
    }

    /// Sends an option and reads its replies up to the final ACK or error;
    /// returns that final reply's type and data.
    fn option(&mut self, option: u32, data: &[u8]) -> (u32, Vec<u8>) {
        self.send_option(option, data);
        loop {
            let header = self.read_exact(20);
            assert_eq!(be64(&header[0..8]), OPTION_REPLY_MAGIC);
            assert_eq!(be32(&header[8..12]), option);
            let reply_type = be32(&header[12..16]);
            let data = self.read_exact(be32(&header[16..20]) as usize);
            if reply_type == REP_ACK || is_option_error(reply_type) {
                return (reply_type, data);
            }
        }
    }

    /// Whether the server has closed the connection (EOF or reset); a
    /// server still waiting (the read times out) has not.
    fn is_closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(error) => !matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}

fn info_data(name: &str) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    data
}

fn meta_data(name: &str, query: &str) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&1u32.to_be_bytes());
    data.extend_from_slice(&(query.len() as u32).to_be_bytes());
    data.extend_from_slice(query.as_bytes());
    data
}

#[test]
fn require_refuses_every_option_before_starttls_and_the_server_lives_on() {
    let server = TestServer::start(TlsMode::Require);
    let mut client = server.connect();
    let options: [(u32, Vec<u8>); 8] = [
        (OPT_LIST, Vec::new()),
        (OPT_INFO, info_data("disk")),
        (OPT_GO, info_data("disk")),
        (OPT_STRUCTURED_REPLY, Vec::new()),
        (OPT_EXTENDED_HEADERS, Vec::new()),
        (OPT_LIST_META_CONTEXT, meta_data("disk", "base:")),
        (OPT_SET_META_CONTEXT, meta_data("disk", "base:allocation")),
        (99, b"unknown".to_vec()),
    ];
    for (option, data) in &options {
        let (reply_type, message) = client.option(*option, data);
        assert_eq!(reply_type, REP_ERR_TLS_REQD, "option {option}");
        let message = String::from_utf8_lossy(&message);
        assert!(message.contains("requires TLS"), "{message}");
    }
    // A second connection is served meanwhile, and the first goes on.
    server.assert_alive();
    assert_eq!(client.option(OPT_ABORT, &[]).0, REP_ACK);
    server.assert_alive();
}

#[test]
fn export_name_without_tls_under_require_ends_only_that_connection() {
    let server = TestServer::start(TlsMode::Require);
    let mut client = server.connect();
    client.send_option(OPT_EXPORT_NAME, b"disk");
    assert!(client.is_closed(), "EXPORT_NAME without TLS was answered");
    server.assert_alive();
}

#[test]
fn starttls_with_tls_off_is_policy_and_with_data_is_invalid() {
    let server = TestServer::start(TlsMode::Off);
    let mut client = server.connect();
    let (reply_type, message) = client.option(OPT_STARTTLS, &[]);
    assert_eq!(reply_type, REP_ERR_POLICY);
    assert!(String::from_utf8_lossy(&message).contains("--tls"));
    assert_eq!(client.option(OPT_STARTTLS, b"x").0, REP_ERR_INVALID);
    // Still in plaintext, still haggling.
    assert_eq!(client.option(OPT_LIST, &[]).0, REP_ACK);

    let server = TestServer::start(TlsMode::Require);
    let mut client = server.connect();
    assert_eq!(client.option(OPT_STARTTLS, b"data").0, REP_ERR_INVALID);
    assert_eq!(client.option(OPT_LIST, &[]).0, REP_ERR_TLS_REQD);
}

#[test]
fn a_second_starttls_is_invalid_and_options_then_work_over_tls() {
    let server = TestServer::start(TlsMode::Require);
    let mut client = server.connect_tls();
    assert_eq!(client.option(OPT_STARTTLS, &[]).0, REP_ERR_INVALID);
    assert_eq!(client.option(OPT_LIST, &[]).0, REP_ACK);
    assert_eq!(client.option(OPT_STRUCTURED_REPLY, &[]).0, REP_ACK);
    assert_eq!(client.option(OPT_GO, &info_data("disk")).0, REP_ACK);
    // Transmission over TLS: a READ of the (sparse) first 4 KiB.
    let mut request = Vec::new();
    RequestHeader {
        flags: CMD_FLAG_DF,
        command: CMD_READ,
        cookie: 7,
        offset: 0,
        length: 4096,
    }
    .encode(false, &mut request);
    client.write(&request);
    let header = client.read_exact(20);
    assert_eq!(be32(&header[0..4]), STRUCTURED_REPLY_MAGIC);
    assert_eq!(be64(&header[8..16]), 7);
    assert_eq!(be32(&header[16..20]), 8 + 4096);
    assert_eq!(client.read_exact(8 + 4096)[8..], [0u8; 4096]);
}

#[test]
fn nothing_negotiated_before_starttls_survives_it() {
    let server = TestServer::start(TlsMode::On);
    let mut client = server.connect();
    assert_eq!(client.option(OPT_STRUCTURED_REPLY, &[]).0, REP_ACK);
    let mut client = server.upgrade(client);
    // Meta contexts need structured replies, which STARTTLS forgot.
    let (reply_type, message) =
        client.option(OPT_SET_META_CONTEXT, &meta_data("disk", "base:allocation"));
    assert_eq!(
        reply_type,
        REP_ERR_INVALID,
        "{}",
        String::from_utf8_lossy(&message)
    );
}

#[test]
fn plaintext_sent_after_starttls_before_the_tls_hello_ends_the_connection() {
    let server = TestServer::start(TlsMode::Require);
    let mut client = server.connect();
    // STARTTLS and, without waiting for its ACK, an option an attacker
    // would like the server to take as coming over TLS.
    let mut frames = Vec::new();
    put_option_request(&mut frames, OPT_STARTTLS, &[]);
    put_option_request(&mut frames, OPT_STRUCTURED_REPLY, &[]);
    client.write(&frames);
    let header = client.read_exact(20);
    assert_eq!(be32(&header[12..16]), REP_ACK);
    assert!(client.is_closed(), "the injected option was kept");
    server.assert_alive();
}
