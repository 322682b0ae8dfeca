//! Mutual TLS for QUIC: server and client configs from a TLS directory, and
//! the peer's role and identity from its certificate.
//!
//! Both sides present certificates signed by the fleet CA; nothing else is
//! trusted. Missing files are reported by path with the command that creates
//! them. Only TLS 1.3 (QUIC requires it) and the ring provider are used.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::pki::{ca_cert_path, cert_paths, Identity, Role};

/// ALPN protocol id; a peer speaking anything else is refused in the handshake.
pub const ALPN: &[u8] = b"flotilla/1";

/// A TLS setup or identity problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file is missing or unreadable.
    #[error("{path}: {reason} (create it with `{hint}`)")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
        /// The command that creates it.
        hint: String,
    },
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The peer's certificate does not state a usable role and identity.
    #[error("peer certificate: {0}")]
    Identity(String),
}

fn hint(role: Role, name: &str) -> String {
    match role {
        Role::Coordinator => "flotilla certs init --dir DIR".into(),
        Role::Agent => format!("flotilla certs issue --dir DIR --agent {name}"),
        Role::Operator => format!("flotilla certs issue --dir DIR --operator {name}"),
    }
}

fn load_certs(path: &Path, hint: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |reason: String| TlsError::File {
        path: path.display().to_string(),
        reason,
        hint: hint.to_string(),
    };
    if !path.exists() {
        return Err(file_err("missing".into()));
    }
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err("no certificate in file".into()));
    }
    Ok(certs)
}

fn load_key(path: &Path, hint: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        path: path.display().to_string(),
        reason: if path.exists() {
            e.to_string()
        } else {
            "missing".into()
        },
        hint: hint.to_string(),
    })
}

fn roots(dir: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for c in load_certs(&ca_cert_path(dir), "flotilla certs init --dir DIR")? {
        store
            .add(c)
            .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
    }
    Ok(Arc::new(store))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // Keep-alives let a host's heartbeat stream survive quiet periods and
    // let either side notice a dead peer within the idle timeout.
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(30)) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

/// The coordinator's QUIC server config: its certificate, client certificates required.
pub fn server_config(dir: &Path) -> Result<quinn::ServerConfig, TlsError> {
    let paths = cert_paths(dir, Role::Coordinator, "");
    let h = hint(Role::Coordinator, "");
    let chain = load_certs(&paths.cert, &h)?;
    let key = load_key(&paths.key, &h)?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(dir)?, provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(cfg)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport());
    Ok(server)
}

/// The coordinator's HTTPS config for its web pages: the same certificate,
/// no client certificate (browsers present none; tickets and sessions
/// authenticate instead), HTTP/1.1.
pub fn web_server_config(dir: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let paths = cert_paths(dir, Role::Coordinator, "");
    let h = hint(Role::Coordinator, "");
    let chain = load_certs(&paths.cert, &h)?;
    let key = load_key(&paths.key, &h)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A client config presenting `role`/`name`'s certificate from `dir`.
pub fn client_config(dir: &Path, role: Role, name: &str) -> Result<quinn::ClientConfig, TlsError> {
    let paths = cert_paths(dir, role, name);
    let h = hint(role, name);
    let chain = load_certs(&paths.cert, &h)?;
    let key = load_key(&paths.key, &h)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(dir)?)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport());
    Ok(client)
}

/// The role and identity stated by the certificate the peer presented.
pub fn peer_identity(conn: &quinn::Connection) -> Result<Identity, TlsError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| TlsError::Identity("no client certificate".into()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| TlsError::Identity("empty certificate chain".into()))?;
    identity_of(leaf)
}

/// The role (OU) and identity (CN) in a DER certificate.
pub fn identity_of(der: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| TlsError::Identity(format!("unparsable certificate: {e}")))?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or_else(|| TlsError::Identity("no CN".into()))?;
    let ou = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or_else(|| TlsError::Identity("no OU (role)".into()))?;
    let role =
        Role::from_unit(ou).ok_or_else(|| TlsError::Identity(format!("unknown role '{ou}'")))?;
    Ok(Identity {
        role,
        name: cn.to_string(),
    })
}
