//! NBD URIs (NetworkBlockDevice doc/uri.md): `nbd://host[:port]/export`
//! and `nbd+unix:///export?socket=PATH`, and their TLS forms `nbds://`
//! and `nbds+unix://` with libnbd's query parameters `tls-certificates=DIR`
//! and `tls-hostname=NAME`. TLS with pre-shared keys (`tls-psk-file`) and
//! turning the server's certificate check off are refused by name.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use nbd_server::proto::STRING_MAX;

/// The IANA port for NBD, used when a URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A host name or an IP address (IPv6 without the brackets) and a port.
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
            Address::Unix(path) => write!(f, "unix socket {}", path.display()),
        }
    }
}

/// A parsed NBD URI: where to connect, which export to ask for, and
/// whether TLS is required.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    pub address: Address,
    pub export_name: String,
    /// `Some` for nbds:// and nbds+unix://: TLS or no connection at all.
    pub tls: Option<UriTls>,
}

/// The TLS parameters of an nbds URI.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UriTls {
    /// `tls-certificates`: the directory with ca-cert.pem (and
    /// client-cert.pem, client-key.pem); libnbd's default places otherwise.
    pub certificates: Option<PathBuf>,
    /// `tls-hostname`: the name the server's certificate must carry
    /// (default: the URI's host, or "localhost" for a unix socket).
    pub hostname: Option<String>,
}

/// The query parameters this client understands.
#[derive(Debug, Default)]
struct Query {
    socket: Option<PathBuf>,
    tls: UriTls,
    /// The first TLS parameter seen, for the error on a plaintext URI.
    tls_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error(
        "{uri:?} is not an NBD URI (want nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)"
    )]
    NoScheme { uri: String },
    #[error("unknown URI scheme {scheme:?} (want nbd, nbd+unix, nbds or nbds+unix)")]
    UnknownScheme { scheme: String },
    #[error("nbd:// needs a host, as in nbd://localhost/EXPORT")]
    MissingHost,
    #[error("bad port {port:?} (want a number from 1 to 65535)")]
    BadPort { port: String },
    #[error("nbd+unix:// takes no host (got {authority:?}); the socket goes in ?socket=PATH")]
    UnixWithHost { authority: String },
    #[error("nbd+unix:// needs a socket, as in nbd+unix:///EXPORT?socket=/run/nbd.sock")]
    MissingSocket,
    #[error("the socket parameter is only for nbd+unix://")]
    SocketWithTcp,
    #[error("abstract unix sockets (socket=%00...) are not supported")]
    AbstractSocket,
    #[error("query parameter {key:?} is for TLS: use nbds:// or nbds+unix://")]
    TlsParameterWithoutTls { key: String },
    #[error(
        "tls-psk-file: TLS with pre-shared keys is not supported; use X.509 certificates (tls-certificates=DIR)"
    )]
    TlsPskUnsupported,
    #[error(
        "tls-verify-peer={value:?}: this client always checks the server's certificate (only true is accepted)"
    )]
    TlsVerifyPeerOff { value: String },
    #[error(
        "unknown query parameter {key:?} (only socket, tls-certificates, tls-hostname and tls-verify-peer are understood)"
    )]
    UnknownParameter { key: String },
    #[error("query parameter {key:?} is given twice")]
    RepeatedParameter { key: String },
    #[error("bad percent-encoding in {part}")]
    BadPercentEncoding { part: &'static str },
    #[error("the export name is not UTF-8")]
    ExportNameNotUtf8,
    #[error("the export name is {length_bytes} bytes; NBD allows at most {STRING_MAX}")]
    ExportNameTooLong { length_bytes: usize },
    #[error("the export name contains a NUL byte, which NBD forbids")]
    ExportNameWithNul,
}

/// Whether `text` names an NBD export (any of the four schemes, as
/// `Uri::parse` takes them), so callers can tell it from a file name or
/// another kind of target before parsing it.
pub fn is_nbd_uri(text: &str) -> bool {
    text.split_once("://").is_some_and(|(scheme, _)| {
        ["nbd", "nbd+unix", "nbds", "nbds+unix"]
            .iter()
            .any(|known| scheme.eq_ignore_ascii_case(known))
    })
}

impl Uri {
    pub fn parse(text: &str) -> Result<Uri, UriError> {
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(UriError::NoScheme {
                uri: text.to_string(),
            });
        };
        let scheme = scheme.to_ascii_lowercase();
        let (unix, tls) = match scheme.as_str() {
            "nbd" => (false, false),
            "nbd+unix" => (true, false),
            "nbds" => (false, true),
            "nbds+unix" => (true, true),
            _ => return Err(UriError::UnknownScheme { scheme }),
        };
        // A fragment means nothing to NBD; drop it as RFC 3986 readers do.
        let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = match before_query.find('/') {
            Some(slash) => before_query.split_at(slash),
            None => (before_query, ""),
        };
        let export_name = export_name(path)?;
        let query = parse_query(query)?;
        if let (false, Some(key)) = (tls, &query.tls_key) {
            return Err(UriError::TlsParameterWithoutTls { key: key.clone() });
        }
        let address = if unix {
            if !authority.is_empty() {
                return Err(UriError::UnixWithHost {
                    authority: authority.to_string(),
                });
            }
            Address::Unix(query.socket.ok_or(UriError::MissingSocket)?)
        } else {
            if query.socket.is_some() {
                return Err(UriError::SocketWithTcp);
            }
            tcp_address(authority)?
        };
        Ok(Uri {
            address,
            export_name,
            tls: tls.then_some(query.tls),
        })
    }
}

/// The path without its leading `/`, percent-decoded (doc/uri.md: the
/// export of `nbd://h//disk` is `/disk`).
fn export_name(path: &str) -> Result<String, UriError> {
    let raw = path.strip_prefix('/').unwrap_or(path);
    let bytes = percent_decode(raw, "the export name")?;
    let name = String::from_utf8(bytes).map_err(|_| UriError::ExportNameNotUtf8)?;
    if name.len() > STRING_MAX {
        return Err(UriError::ExportNameTooLong {
            length_bytes: name.len(),
        });
    }
    if name.contains('\0') {
        return Err(UriError::ExportNameWithNul);
    }
    Ok(name)
}

fn parse_query(text: &str) -> Result<Query, UriError> {
    let mut query = Query::default();
    for pair in text.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = String::from_utf8_lossy(&percent_decode(key, "a query key")?).into_owned();
        let repeated = match key.as_str() {
            "socket" => query.socket.is_some(),
            "tls-certificates" => query.tls.certificates.is_some(),
            "tls-hostname" => query.tls.hostname.is_some(),
            _ => false,
        };
        if repeated {
            return Err(UriError::RepeatedParameter { key });
        }
        if key.starts_with("tls-") && query.tls_key.is_none() {
            query.tls_key = Some(key.clone());
        }
        match key.as_str() {
            "socket" => {
                let bytes = percent_decode(value, "the socket path")?;
                if bytes.first() == Some(&0) {
                    return Err(UriError::AbstractSocket);
                }
                query.socket = Some(PathBuf::from(OsString::from_vec(bytes)));
            }
            "tls-certificates" => {
                let bytes = percent_decode(value, "the certificate directory")?;
                query.tls.certificates = Some(PathBuf::from(OsString::from_vec(bytes)));
            }
            "tls-hostname" => {
                let bytes = percent_decode(value, "the TLS host name")?;
                let name = String::from_utf8(bytes).map_err(|_| UriError::BadPercentEncoding {
                    part: "the TLS host name",
                })?;
                query.tls.hostname = Some(name);
            }
            "tls-verify-peer" => match value {
                "true" | "1" | "yes" | "on" => {}
                _ => {
                    return Err(UriError::TlsVerifyPeerOff {
                        value: value.to_string(),
                    });
                }
            },
            "tls-psk-file" | "tls-username" => return Err(UriError::TlsPskUnsupported),
            _ => return Err(UriError::UnknownParameter { key }),
        }
    }
    Ok(query)
}

/// `[userinfo@]host[:port]`; userinfo only matters to TLS and is ignored.
fn tcp_address(authority: &str) -> Result<Address, UriError> {
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, after)| after);
    let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
        // RFC 2732 IPv6 literal: [::1]:10809
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err(UriError::MissingHost);
        };
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or(UriError::BadPort {
                port: after.to_string(),
            })?),
        };
        (host, port)
    } else {
        match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Err(UriError::MissingHost);
    }
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(text) => match text.parse::<u16>() {
            Ok(port) if port != 0 => port,
            _ => {
                return Err(UriError::BadPort {
                    port: text.to_string(),
                });
            }
        },
    };
    let host = String::from_utf8(percent_decode(host, "the host")?)
        .map_err(|_| UriError::BadPercentEncoding { part: "the host" })?;
    Ok(Address::Tcp { host, port })
}

fn percent_decode(text: &str, part: &'static str) -> Result<Vec<u8>, UriError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = bytes
                .get(index + 1..index + 3)
                .and_then(|pair| std::str::from_utf8(pair).ok())
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or(UriError::BadPercentEncoding { part })?;
            out.push(hex);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Address {
        Address::Tcp {
            host: host.to_string(),
            port,
        }
    }

    #[test]
    fn uris_from_the_spec_parse() {
        let cases = [
            (
                "nbd://example.com/disk",
                tcp("example.com", DEFAULT_PORT),
                "disk",
            ),
            ("nbd://example.com/", tcp("example.com", DEFAULT_PORT), ""),
            ("nbd://example.com", tcp("example.com", DEFAULT_PORT), ""),
            (
                "nbd://example.com//disk",
                tcp("example.com", DEFAULT_PORT),
                "/disk",
            ),
            (
                "nbd://example.com/hello%20world",
                tcp("example.com", DEFAULT_PORT),
                "hello world",
            ),
            ("nbd://example.com:10900/x", tcp("example.com", 10900), "x"),
            ("NBD://user@host:1/x", tcp("host", 1), "x"),
            ("nbd://[::1]:2000/e", tcp("::1", 2000), "e"),
            ("nbd://[fe80::1]/e", tcp("fe80::1", DEFAULT_PORT), "e"),
            (
                "nbd://127.0.0.1/e#fragment",
                tcp("127.0.0.1", DEFAULT_PORT),
                "e",
            ),
            (
                "nbd+unix:///disk?socket=nbd.sock",
                Address::Unix(PathBuf::from("nbd.sock")),
                "disk",
            ),
            (
                "nbd+unix:///?socket=/tmp/a%20b.sock",
                Address::Unix(PathBuf::from("/tmp/a b.sock")),
                "",
            ),
            (
                "nbd+unix://?socket=/s",
                Address::Unix(PathBuf::from("/s")),
                "",
            ),
        ];
        for (text, address, export_name) in cases {
            let uri = Uri::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(uri.address, address, "{text}");
            assert_eq!(uri.export_name, export_name, "{text}");
        }
    }

    #[test]
    fn bad_uris_are_refused_with_the_reason() {
        let cases = [
            (
                "/tmp/sock",
                UriError::NoScheme {
                    uri: "/tmp/sock".into(),
                },
            ),
            (
                "nbds://host/x?tls-psk-file=/k.psk",
                UriError::TlsPskUnsupported,
            ),
            (
                "nbds://host/x?tls-verify-peer=false",
                UriError::TlsVerifyPeerOff {
                    value: "false".into(),
                },
            ),
            (
                "nbds://host/x?tls-certificates=/a&tls-certificates=/b",
                UriError::RepeatedParameter {
                    key: "tls-certificates".into(),
                },
            ),
            (
                "nbd://host/x?tls-certificates=/etc/pki",
                UriError::TlsParameterWithoutTls {
                    key: "tls-certificates".into(),
                },
            ),
            (
                "http://host/x",
                UriError::UnknownScheme {
                    scheme: "http".into(),
                },
            ),
            ("nbd:///x", UriError::MissingHost),
            ("nbd://host:0/x", UriError::BadPort { port: "0".into() }),
            (
                "nbd://host:99999/x",
                UriError::BadPort {
                    port: "99999".into(),
                },
            ),
            ("nbd://[::1]x/e", UriError::BadPort { port: "x".into() }),
            ("nbd+unix:///x", UriError::MissingSocket),
            (
                "nbd+unix://host/x?socket=/s",
                UriError::UnixWithHost {
                    authority: "host".into(),
                },
            ),
            ("nbd://host/x?socket=/s", UriError::SocketWithTcp),
            ("nbd+unix:///?socket=%00abstract", UriError::AbstractSocket),
            (
                "nbds+unix:///?socket=/s&tls-type=x509",
                UriError::UnknownParameter {
                    key: "tls-type".into(),
                },
            ),
            (
                "nbd+unix:///?socket=/s&sockt=/t",
                UriError::UnknownParameter {
                    key: "sockt".into(),
                },
            ),
            (
                "nbd+unix:///?socket=/s&socket=/t",
                UriError::RepeatedParameter {
                    key: "socket".into(),
                },
            ),
            (
                "nbd://host/bad%2",
                UriError::BadPercentEncoding {
                    part: "the export name",
                },
            ),
            (
                "nbd://host/bad%zz",
                UriError::BadPercentEncoding {
                    part: "the export name",
                },
            ),
            ("nbd://host/%ff", UriError::ExportNameNotUtf8),
            ("nbd://host/a%00b", UriError::ExportNameWithNul),
        ];
        for (text, error) in cases {
            assert_eq!(Uri::parse(text), Err(error), "{text}");
        }
    }

    #[test]
    fn tls_uris_carry_their_certificates_and_host_name() {
        let cases = [
            ("nbd://h/e", None),
            ("nbds://h/e", Some(UriTls::default())),
            (
                "nbds://h:1/e?tls-certificates=/etc/pki/a%20b&tls-hostname=disk.example",
                Some(UriTls {
                    certificates: Some(PathBuf::from("/etc/pki/a b")),
                    hostname: Some("disk.example".into()),
                }),
            ),
            (
                "NBDS+UNIX:///e?socket=/s&tls-certificates=d&tls-verify-peer=true",
                Some(UriTls {
                    certificates: Some(PathBuf::from("d")),
                    hostname: None,
                }),
            ),
        ];
        for (text, tls) in cases {
            let uri = Uri::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(uri.tls, tls, "{text}");
            assert_eq!(uri.export_name, "e", "{text}");
        }
    }

    #[test]
    fn nbd_uris_are_told_from_other_targets() {
        for text in [
            "nbd://h/e",
            "NBDS://h/e",
            "nbd+unix:///?socket=s",
            "nbds+unix:///?socket=s",
        ] {
            assert!(is_nbd_uri(text), "{text}");
        }
        for text in ["s3://b/p", "tape:/t", "file:/f", "nbd.img", "nbdx://h"] {
            assert!(!is_nbd_uri(text), "{text}");
        }
    }

    #[test]
    fn export_names_longer_than_the_protocol_allows_are_refused() {
        let text = format!("nbd://host/{}", "x".repeat(STRING_MAX + 1));
        assert_eq!(
            Uri::parse(&text),
            Err(UriError::ExportNameTooLong {
                length_bytes: STRING_MAX + 1
            })
        );
    }

    #[test]
    fn addresses_display_for_error_messages() {
        assert_eq!(tcp("::1", 5).to_string(), "[::1]:5");
        assert_eq!(tcp("h", 5).to_string(), "h:5");
        assert_eq!(
            Address::Unix(PathBuf::from("/s")).to_string(),
            "unix socket /s"
        );
    }
}
