//! TLS for nbds:// URIs: the client's rustls configuration from a
//! certificate directory with libnbd's file names (ca-cert.pem to check
//! the server; client-cert.pem and client-key.pem, when both are there, to
//! prove who we are), and the name the server's certificate must carry.
//!
//! After STARTTLS and the TLS handshake (`handshake.rs`), the session goes
//! to a relay thread (`relay.rs`): the connection then reads and writes
//! plaintext on a socketpair, so the reader thread and the senders need
//! no lock around a TLS session.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbd_server::tls::{CA_CERT_FILE, CertificateError, crypto_provider, load_certificates};
use nbd_server::tls::{load_private_key, load_roots};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;

use crate::uri::{Address, UriTls};

/// The client's certificate chain, leaf first.
pub const CLIENT_CERT_FILE: &str = "client-cert.pem";
/// The client's private key.
pub const CLIENT_KEY_FILE: &str = "client-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error(
        "no TLS certificate directory: add ?tls-certificates=DIR (with {CA_CERT_FILE}) to the URI, or create one of {}",
        searched.iter().map(|dir| dir.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NoDirectory { searched: Vec<PathBuf> },
    #[error(transparent)]
    Certificate(#[from] CertificateError),
    #[error(
        "{} is there but {} is not: a client certificate needs its key and the key its certificate",
        present.display(), missing.display()
    )]
    HalfClientIdentity { present: PathBuf, missing: PathBuf },
    #[error("{name:?} is not a name a TLS certificate can carry")]
    ServerName { name: String },
    #[error("the certificates in {} do not make a TLS configuration: {source}", dir.display())]
    Config { dir: PathBuf, source: rustls::Error },
}

/// What the TLS handshake of one connection needs.
#[derive(Debug, Clone)]
pub(crate) struct ClientTls {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl ClientTls {
    /// The configuration for `tls`, an nbds URI's parameters, to reach
    /// `address`.
    pub(crate) fn new(tls: &UriTls, address: &Address) -> Result<ClientTls, TlsSetupError> {
        let name = match (&tls.hostname, address) {
            (Some(name), _) => name.clone(),
            (None, Address::Tcp { host, .. }) => host.clone(),
            // What libnbd checks a server on a unix socket against.
            (None, Address::Unix(_)) => "localhost".to_string(),
        };
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| TlsSetupError::ServerName { name })?;
        let dir = match &tls.certificates {
            Some(dir) => dir.clone(),
            None => default_directory()?,
        };
        Ok(ClientTls {
            config: client_config(&dir)?,
            server_name,
        })
    }

    pub(crate) fn connection(&self) -> Result<rustls::ClientConnection, rustls::Error> {
        rustls::ClientConnection::new(Arc::clone(&self.config), self.server_name.clone())
    }
}

/// libnbd's places for certificates when a URI names none, in its order.
fn default_directories() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(home) = std::env::var_os("HOME") {
        let home = PathBuf::from(home);
        dirs.push(home.join(".pki/libnbd"));
        dirs.push(home.join(".config/pki/libnbd"));
    }
    dirs.push(PathBuf::from("/etc/pki/libnbd"));
    dirs
}

fn default_directory() -> Result<PathBuf, TlsSetupError> {
    let searched = default_directories();
    searched
        .iter()
        .find(|dir| dir.join(CA_CERT_FILE).exists())
        .cloned()
        .ok_or(TlsSetupError::NoDirectory { searched })
}

fn client_config(dir: &Path) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let roots = load_roots(&dir.join(CA_CERT_FILE))?;
    let config_error = |source| TlsSetupError::Config {
        dir: dir.to_path_buf(),
        source,
    };
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_root_certificates(roots);
    let (cert_path, key_path) = (dir.join(CLIENT_CERT_FILE), dir.join(CLIENT_KEY_FILE));
    let config = match (cert_path.exists(), key_path.exists()) {
        (false, false) => builder.with_no_client_auth(),
        (true, true) => {
            let chain = load_certificates(&cert_path)?;
            let key = load_private_key(&key_path)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(config_error)?
        }
        (true, false) => {
            return Err(TlsSetupError::HalfClientIdentity {
                present: cert_path,
                missing: key_path,
            });
        }
        (false, true) => {
            return Err(TlsSetupError::HalfClientIdentity {
                present: key_path,
                missing: cert_path,
            });
        }
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_without_the_authority_is_named() {
        let tls = UriTls {
            certificates: Some(PathBuf::from("/nonexistent-certificates")),
            hostname: None,
        };
        let address = Address::Unix(PathBuf::from("/s"));
        let message = ClientTls::new(&tls, &address).unwrap_err().to_string();
        assert!(
            message.contains("/nonexistent-certificates/ca-cert.pem"),
            "{message}"
        );
    }

    #[test]
    fn a_host_name_that_no_certificate_can_carry_is_refused() {
        let tls = UriTls {
            certificates: None,
            hostname: Some("bad name".into()),
        };
        let address = Address::Unix(PathBuf::from("/s"));
        assert!(matches!(
            ClientTls::new(&tls, &address),
            Err(TlsSetupError::ServerName { .. })
        ));
    }
}
