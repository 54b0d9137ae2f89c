//! HTTPS: the certificate and key the coordinator serves with (`--tls-cert`, `--tls-key`),
//! read and checked once at start.
//!
//! Architecture Invariant: this module knows files and rustls, nothing of HTTP; [`crate::run`]
//! decides how to serve with what it returns. A certificate or key that cannot be used is
//! an error here, at start, never a failure at the first connection.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("could not read {what} {path}: {error}")]
    Read {
        what: &'static str,
        path: String,
        error: std::io::Error,
    },
    #[error("{what} {path} is not usable PEM: {reason}")]
    Pem {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error(
        "the TLS certificate file {path} holds no certificate (expected PEM `CERTIFICATE` blocks)"
    )]
    NoCertificate { path: String },
    #[error(
        "the TLS certificate {cert} and key {key} do not make a server configuration: {reason}"
    )]
    Rejected {
        cert: String,
        key: String,
        reason: String,
    },
}

/// What the coordinator serves HTTPS with: the rustls configuration, and the certificate's
/// path (local agents trust it, so that a self-signed certificate works out of the box).
#[derive(Debug, Clone)]
pub struct Tls {
    pub server: Arc<rustls::ServerConfig>,
    pub cert_path: PathBuf,
}

impl Tls {
    /// Reads a PEM certificate chain (server certificate first) and its PEM private key
    /// (PKCS#8, PKCS#1 or SEC1), and checks that they belong together.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Tls, TlsError> {
        let cert_name = cert_path.display().to_string();
        let key_name = key_path.display().to_string();
        let cert_pem = read("TLS certificate", cert_path)?;
        let key_pem = read("TLS key", key_path)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem {
                what: "TLS certificate",
                path: cert_name.clone(),
                reason: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate { path: cert_name });
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            what: "TLS key",
            path: key_name.clone(),
            reason: e.to_string(),
        })?;
        let rejected = |e: rustls::Error| TlsError::Rejected {
            cert: cert_name.clone(),
            key: key_name.clone(),
            reason: e.to_string(),
        };
        // The provider is named here rather than installed process-wide: nothing else in
        // the process has to agree on one.
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(rejected)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(rejected)?;
        // HTTP/1.1 only, as over plain HTTP: the live feed's WebSocket upgrade (WSS) is an
        // HTTP/1.1 exchange.
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            server: Arc::new(server),
            cert_path: cert_path.to_path_buf(),
        })
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        what,
        path: path.display().to_string(),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::{Tls, TlsError};

    #[test]
    fn unreadable_or_empty_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        match Tls::load(&missing, &empty) {
            Err(e @ TlsError::Read { .. }) => {
                assert!(e.to_string().contains("missing.pem"), "{e}")
            }
            other => panic!("expected a read error, got {other:?}"),
        }
        match Tls::load(&empty, &empty) {
            Err(TlsError::NoCertificate { path }) => assert!(path.ends_with("empty.pem")),
            other => panic!("expected no certificate, got {other:?}"),
        }
    }
}
