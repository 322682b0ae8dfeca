//! The certificate directory: a CA and one certificate per role and identity.
//!
//! Layout of a `--tls-dir` (what `flotilla certs` writes, what every binary reads):
//!
//! ```text
//! ca.pem  ca-key.pem                       the fleet's CA (keep ca-key.pem offline in production)
//! coordinator.pem  coordinator-key.pem     SAN "flotilla-coordinator" (+ --san names)
//! agent-HOST.pem  agent-HOST-key.pem       CN=HOST, OU=flotilla-agent
//! operator-NAME.pem  operator-NAME-key.pem CN=NAME, OU=flotilla-operator
//! ```
//!
//! A certificate's role is its OU and its identity its CN; the coordinator
//! checks both on every connection. Clients verify the coordinator by the
//! fixed name [`COORDINATOR_NAME`], so it may listen on any address.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// The DNS name every client expects on the coordinator's certificate.
pub const COORDINATOR_NAME: &str = "flotilla-coordinator";

/// Who a certificate speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The coordinator.
    Coordinator,
    /// A host agent.
    Agent,
    /// A human or tool operating the fleet.
    Operator,
}

impl Role {
    /// The OU value that carries the role.
    pub fn unit(self) -> &'static str {
        match self {
            Role::Coordinator => "flotilla-coordinator",
            Role::Agent => "flotilla-agent",
            Role::Operator => "flotilla-operator",
        }
    }

    /// The role named by an OU value.
    pub fn from_unit(unit: &str) -> Option<Role> {
        [Role::Coordinator, Role::Agent, Role::Operator]
            .into_iter()
            .find(|r| r.unit() == unit)
    }
}

/// A role and an identity, as a certificate states them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The role (OU).
    pub role: Role,
    /// The host or operator name (CN).
    pub name: String,
}

/// Paths of one certificate and its key in a TLS directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

/// Where `identity`'s certificate lives in `dir`.
pub fn cert_paths(dir: &Path, role: Role, name: &str) -> CertPaths {
    let stem = match role {
        Role::Coordinator => "coordinator".to_string(),
        Role::Agent => format!("agent-{name}"),
        Role::Operator => format!("operator-{name}"),
    };
    CertPaths {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}-key.pem")),
    }
}

/// The CA certificate in `dir`.
pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join("ca-key.pem")
}

/// A certificate operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// rcgen refused.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// `certs init` on a directory that already has a CA.
    #[error(
        "{0} already exists; refusing to overwrite a CA (use `certs issue` to add certificates)"
    )]
    Exists(String),
    /// A name that cannot be a file name or identity.
    #[error("invalid name '{0}': use letters, digits, '.', '_' and '-'")]
    BadName(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(contents.as_bytes()).map_err(io(path))
}

fn valid_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName(name.to_string()))
    }
}

/// Creates a CA, the coordinator's certificate and an operator certificate for `operator`.
pub fn init(dir: &Path, operator: &str, sans: &[String]) -> Result<Vec<PathBuf>, PkiError> {
    valid_name(operator)?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let ca_cert = ca_cert_path(dir);
    if ca_cert.exists() {
        return Err(PkiError::Exists(ca_cert.display().to_string()));
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Flotilla");
    dn.push(DnType::CommonName, "Flotilla fleet CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    write_private(&ca_key_path(dir), &key.serialize_pem())?;
    std::fs::write(&ca_cert, cert.pem()).map_err(io(&ca_cert))?;
    let mut written = vec![ca_cert];
    written.extend(issue(dir, Role::Coordinator, COORDINATOR_NAME, sans)?);
    written.extend(issue(dir, Role::Operator, operator, &[])?);
    Ok(written)
}

/// Issues a certificate for `role` and `name`, signed by the CA in `dir`.
pub fn issue(
    dir: &Path,
    role: Role,
    name: &str,
    sans: &[String],
) -> Result<Vec<PathBuf>, PkiError> {
    valid_name(name)?;
    let ca_pem = std::fs::read_to_string(ca_cert_path(dir)).map_err(io(&ca_cert_path(dir)))?;
    let ca_key_pem = std::fs::read_to_string(ca_key_path(dir)).map_err(io(&ca_key_path(dir)))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;

    let mut names = Vec::new();
    if role == Role::Coordinator {
        names.push(COORDINATOR_NAME.to_string());
        names.extend(sans.iter().cloned());
    }
    let mut params = CertificateParams::new(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Flotilla");
    dn.push(DnType::OrganizationalUnitName, role.unit());
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        Role::Coordinator => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Role::Agent | Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let paths = cert_paths(dir, role, name);
    write_private(&paths.key, &key.serialize_pem())?;
    std::fs::write(&paths.cert, cert.pem()).map_err(io(&paths.cert))?;
    Ok(vec![paths.cert, paths.key])
}

/// Issues an etcd member's certificate, `etcd-NAME.pem` and its key, signed
/// by the fleet CA in `dir`: server and client use (etcd serves clients and
/// peers with it and dials peers with it; the coordinator beside it dials
/// etcd with it), with `sans` (addresses or DNS names) as its names.
pub fn issue_etcd(dir: &Path, name: &str, sans: &[String]) -> Result<Vec<PathBuf>, PkiError> {
    valid_name(name)?;
    let ca_pem = std::fs::read_to_string(ca_cert_path(dir)).map_err(io(&ca_cert_path(dir)))?;
    let ca_key_pem = std::fs::read_to_string(ca_key_path(dir)).map_err(io(&ca_key_path(dir)))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&ca_key_pem)?)?;
    let mut params = CertificateParams::new(sans.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Flotilla");
    dn.push(DnType::OrganizationalUnitName, "etcd");
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let cert_path = dir.join(format!("etcd-{name}.pem"));
    let key_path = dir.join(format!("etcd-{name}-key.pem"));
    write_private(&key_path, &key.serialize_pem())?;
    std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
    Ok(vec![cert_path, key_path])
}
