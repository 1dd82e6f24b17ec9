//! X.509 certificates for TLS tests, made with openssl the way nbdkit's
//! tests make theirs with certtool: a certificate authority, a server
//! certificate for localhost and 127.0.0.1, and a client certificate,
//! under the file names nbdkit, libnbd and qemu all look for.

use std::path::{Path, PathBuf};

use crate::process::run_program;
use crate::tools::require_tool;

/// Certificate directories for one test.
#[derive(Debug)]
pub struct Certificates {
    /// ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
    /// client-key.pem: what a server and a client with a certificate use.
    pub dir: PathBuf,
    /// ca-cert.pem only: a client that checks the server but has no
    /// certificate of its own.
    pub anonymous_dir: PathBuf,
    /// A client certificate and key from another authority, with this
    /// test's ca-cert.pem: a client a server that checks peers must refuse.
    pub stranger_dir: PathBuf,
}

impl Certificates {
    /// Makes the three directories under `parent`.
    pub fn generate(parent: &Path) -> Certificates {
        require_tool("openssl", "openssl");
        let dir = parent.join("pki");
        let anonymous_dir = parent.join("pki-anonymous");
        let stranger_dir = parent.join("pki-stranger");
        let work = parent.join("pki-work");
        for d in [&dir, &anonymous_dir, &stranger_dir, &work] {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        }
        authority(&work, "ca", "blockwatch test CA");
        authority(&work, "other-ca", "another CA");
        let server_extensions = "subjectAltName=DNS:localhost,IP:127.0.0.1\n\
             extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\n";
        issue(&work, "ca", "server", "localhost", server_extensions);
        let client_extensions = "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\n";
        issue(&work, "ca", "client", "client.example", client_extensions);
        issue(
            &work,
            "other-ca",
            "stranger",
            "stranger.example",
            client_extensions,
        );
        let copy = |from: &str, to: &Path| {
            std::fs::copy(work.join(from), to)
                .unwrap_or_else(|e| panic!("copying {from} to {}: {e}", to.display()));
        };
        for name in [
            "ca-cert.pem",
            "server-cert.pem",
            "server-key.pem",
            "client-cert.pem",
            "client-key.pem",
        ] {
            copy(name, &dir.join(name));
        }
        copy("ca-cert.pem", &anonymous_dir.join("ca-cert.pem"));
        copy("ca-cert.pem", &stranger_dir.join("ca-cert.pem"));
        copy("stranger-cert.pem", &stranger_dir.join("client-cert.pem"));
        copy("stranger-key.pem", &stranger_dir.join("client-key.pem"));
        Certificates {
            dir,
            anonymous_dir,
            stranger_dir,
        }
    }
}

/// A self-signed authority: NAME-cert.pem and NAME-key.pem in `work`.
fn authority(work: &Path, name: &str, common_name: &str) {
    let key = work.join(format!("{name}-key.pem"));
    let cert = work.join(format!("{name}-cert.pem"));
    let subject = format!("/CN={common_name}");
    run_program(
        "openssl",
        [
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "30",
            "-subj",
            subject.as_str(),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ],
    );
}

/// A certificate NAME-cert.pem (key NAME-key.pem) signed by `ca`.
fn issue(work: &Path, ca: &str, name: &str, common_name: &str, extensions: &str) {
    let path = |suffix: &str| work.join(format!("{name}{suffix}"));
    let ca_path = |suffix: &str| work.join(format!("{ca}{suffix}"));
    std::fs::write(path(".ext"), extensions).expect("extensions file");
    let subject = format!("/CN={common_name}");
    run_program(
        "openssl",
        [
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            subject.as_str(),
            "-keyout",
            path("-key.pem").to_str().unwrap(),
            "-out",
            path(".csr").to_str().unwrap(),
        ],
    );
    run_program(
        "openssl",
        [
            "x509",
            "-req",
            "-days",
            "30",
            "-in",
            path(".csr").to_str().unwrap(),
            "-CA",
            ca_path("-cert.pem").to_str().unwrap(),
            "-CAkey",
            ca_path("-key.pem").to_str().unwrap(),
            "-CAcreateserial",
            "-extfile",
            path(".ext").to_str().unwrap(),
            "-out",
            path("-cert.pem").to_str().unwrap(),
        ],
    );
}
