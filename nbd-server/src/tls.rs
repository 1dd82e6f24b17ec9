//! TLS settings: the server's mode (nbdkit's `--tls=off|on|require`), its
//! X.509 certificates in a directory with nbdkit's file names, and the PEM
//! loading the client crate shares.
//!
//! The handshake (`handshake.rs`) decides what STARTTLS and every other
//! option get under each mode; `server.rs` runs the TLS handshake itself
//! (tokio-rustls) and hands the socket with its session to the
//! transmission thread (`Socket::with_tls` in `socket.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// The certificate authority whose certificates the peers are checked against.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The server's certificate chain, leaf first.
pub const SERVER_CERT_FILE: &str = "server-cert.pem";
/// The server's private key (keep it mode 0600).
pub const SERVER_KEY_FILE: &str = "server-key.pem";

/// When the server offers or insists on TLS (doc/proto.md "Server-side
/// requirements"): `Off` is NOTLS, `On` is SELECTIVETLS with no TLS-only
/// export (the client chooses), `Require` is FORCEDTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    #[default]
    Off,
    On,
    Require,
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(text: &str) -> Result<TlsMode, String> {
        match text {
            "off" => Ok(TlsMode::Off),
            "on" => Ok(TlsMode::On),
            "require" => Ok(TlsMode::Require),
            _ => Err(format!(
                "{text:?} is not a TLS mode (want off, on or require)"
            )),
        }
    }
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("cannot read {}: {source}", path.display())]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("cannot use the certificate authority in {}: {source}", path.display())]
    Authority {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("cannot check client certificates against {}: {source}", path.display())]
    Verifier {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("the certificates in {} do not make a TLS configuration: {source}", dir.display())]
    Config { dir: PathBuf, source: rustls::Error },
}

/// The one crypto provider every configuration is built with, named
/// rather than taken from a process-wide default that another crate in
/// the binary might install differently.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Every certificate in the PEM file `path`, in file order.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertificateError> {
    let pem_error = |source| CertificateError::Pem {
        path: path.to_path_buf(),
        source,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certificates.is_empty() {
        return Err(CertificateError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certificates)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in the PEM file `path`.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertificateError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| CertificateError::Pem {
        path: path.to_path_buf(),
        source,
    })
}

/// The certificate authorities in the PEM file `path`, as trust roots.
pub fn load_roots(path: &Path) -> Result<RootCertStore, CertificateError> {
    let mut roots = RootCertStore::empty();
    for certificate in load_certificates(path)? {
        roots
            .add(certificate)
            .map_err(|source| CertificateError::Authority {
                path: path.to_path_buf(),
                source,
            })?;
    }
    Ok(roots)
}

/// The server's TLS configuration from `dir` (server-cert.pem,
/// server-key.pem, and with `verify_peer` ca-cert.pem, against which every
/// client must then present a certificate).
pub fn server_config(dir: &Path, verify_peer: bool) -> Result<Arc<ServerConfig>, CertificateError> {
    let chain = load_certificates(&dir.join(SERVER_CERT_FILE))?;
    let key = load_private_key(&dir.join(SERVER_KEY_FILE))?;
    let config_error = |source| CertificateError::Config {
        dir: dir.to_path_buf(),
        source,
    };
    let builder = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(config_error)?;
    let builder = if verify_peer {
        let ca_path = dir.join(CA_CERT_FILE);
        let roots = Arc::new(load_roots(&ca_path)?);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, crypto_provider())
            .build()
            .map_err(|source| CertificateError::Verifier {
                path: ca_path,
                source,
            })?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder.with_single_cert(chain, key).map_err(config_error)?;
    Ok(Arc::new(config))
}

/// What the server does about TLS: its mode and, unless off, its
/// configuration.
#[derive(Debug, Clone, Default)]
pub struct TlsPolicy {
    mode: TlsMode,
    config: Option<Arc<ServerConfig>>,
}

impl TlsPolicy {
    /// No TLS: STARTTLS is refused with NBD_REP_ERR_POLICY.
    pub fn off() -> TlsPolicy {
        TlsPolicy::default()
    }

    /// TLS `on` or `require` with `config` (from `server_config`).
    pub fn new(mode: TlsMode, config: Arc<ServerConfig>) -> TlsPolicy {
        let config = (mode != TlsMode::Off).then_some(config);
        TlsPolicy { mode, config }
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    pub(crate) fn config(&self) -> Option<&Arc<ServerConfig>> {
        self.config.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print_as_nbdkit_spells_them() {
        for mode in [TlsMode::Off, TlsMode::On, TlsMode::Require] {
            assert_eq!(mode.to_string().parse::<TlsMode>(), Ok(mode));
        }
        assert!(
            "yes"
                .parse::<TlsMode>()
                .unwrap_err()
                .contains("off, on or require")
        );
    }

    #[test]
    fn missing_certificate_files_are_named() {
        let error = server_config(Path::new("/nonexistent-tls-dir"), false).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("/nonexistent-tls-dir/server-cert.pem"),
            "{message}"
        );
    }
}
