//! The development PKI: one CA, a server identity for auraed, client identities.
//!
//! Layout of a PKI directory (mode 0700):
//! `ca.pem` (0644), `ca.key` (0600, never copied anywhere by any command),
//! `auraed.pem`/`auraed.key`, `admin.pem`/`admin.key` (keys 0600).

use std::{
    fs,
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::spiffe::{SpiffeId, SpiffeIdError};

/// The trust domain `aer pki init` uses unless told otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "aurae.local";
/// Path of auraed's own identity in its trust domain.
pub const SERVER_PATH: &str = "/auraed";
/// Path of the local administrator identity.
pub const ADMIN_PATH: &str = "/operator/admin";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0} already exists: refusing to overwrite an existing PKI (remove the directory first)"
    )]
    Exists(PathBuf),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(transparent)]
    Spiffe(#[from] SpiffeIdError),
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What to put in a certificate issued by the CA.
#[derive(Debug, Clone)]
pub struct IssueSpec {
    /// The URI SAN. `None` only to build deliberately broken certificates in tests.
    pub spiffe_id: Option<SpiffeId>,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// Usable as a TLS server certificate.
    pub server: bool,
    /// Usable as a TLS client certificate.
    pub client: bool,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl IssueSpec {
    /// A client identity valid from now for `days`.
    pub fn client(id: SpiffeId, days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            spiffe_id: Some(id),
            dns_names: Vec::new(),
            ips: Vec::new(),
            server: false,
            client: true,
            not_before: now - Duration::minutes(5),
            not_after: now + Duration::days(days),
        }
    }

    /// A server identity reachable by the given DNS names and addresses.
    pub fn server(id: SpiffeId, dns_names: Vec<String>, ips: Vec<IpAddr>, days: i64) -> Self {
        Self {
            dns_names,
            ips,
            server: true,
            client: false,
            ..Self::client(id, days)
        }
    }
}

/// A certificate authority whose key is held in memory (loaded from, or created in, a
/// PKI directory).
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// Creates a new self-signed CA for `trust_domain`, valid for ten years.
    pub fn generate(trust_domain: &str) -> Result<Self, PkiError> {
        SpiffeId::validate_trust_domain(trust_domain)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Aurae");
        dn.push(DnType::CommonName, format!("Aurae CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        // The CA's own SPIFFE ID names the trust domain (X.509-SVID spec, section 5).
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}").as_str().try_into()?,
        )];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and key files (the key stays where it is).
    pub fn load(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        let cert_pem = fs::read_to_string(cert).map_err(io_err(cert))?;
        let key_pem = fs::read_to_string(key).map_err(io_err(key))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Invalid {
            path: key.to_owned(),
            reason: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| PkiError::Invalid {
            path: cert.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self { issuer, cert_pem })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key, PEM-encoded: only for writing `ca.key` once, in [`Pki::init`].
    fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a leaf certificate with a fresh key; returns `(cert_pem, key_pem)`.
    pub fn issue(&self, spec: &IssueSpec) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Aurae");
        if let Some(id) = &spec.spiffe_id {
            dn.push(DnType::CommonName, id.path().trim_start_matches('/'));
            params
                .subject_alt_names
                .push(SanType::URI(id.as_str().try_into()?));
        } else {
            dn.push(DnType::CommonName, "no-spiffe-id");
        }
        params.distinguished_name = dn;
        for name in &spec.dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.as_str().try_into()?));
        }
        for ip in &spec.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        if spec.server {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.client {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// The files of a PKI directory.
#[derive(Debug, Clone)]
pub struct PkiPaths {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
}

impl PkiPaths {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        Self {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("auraed.pem"),
            server_key: dir.join("auraed.key"),
            admin_cert: dir.join("admin.pem"),
            admin_key: dir.join("admin.key"),
            dir,
        }
    }

    /// Paths of a client identity `<name>.pem` / `<name>.key` in this directory.
    pub fn identity(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        )
    }
}

/// Creates and extends PKI directories.
#[derive(Debug)]
pub struct Pki;

/// The names and addresses auraed's certificate carries by default.
pub fn default_server_sans() -> (Vec<String>, Vec<IpAddr>) {
    let mut dns = vec!["localhost".to_owned()];
    if let Ok(h) = fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim().to_ascii_lowercase();
        if !h.is_empty()
            && h != "localhost"
            && rcgen::string::Ia5String::try_from(h.as_str()).is_ok()
        {
            dns.push(h);
        }
    }
    (
        dns,
        vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ],
    )
}

impl Pki {
    /// Creates a CA, auraed's server identity and the admin client identity in `dir`.
    /// `extra_sans` are further DNS names or IP addresses for the server certificate.
    /// Refuses to touch a directory that already holds any of the files.
    pub fn init(
        dir: &Path,
        trust_domain: &str,
        extra_sans: &[String],
    ) -> Result<PkiPaths, PkiError> {
        let paths = PkiPaths::new(dir);
        for p in [
            &paths.ca_cert,
            &paths.ca_key,
            &paths.server_cert,
            &paths.server_key,
            &paths.admin_cert,
            &paths.admin_key,
        ] {
            if p.exists() {
                return Err(PkiError::Exists(p.clone()));
            }
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;

        let ca = Ca::generate(trust_domain)?;
        let (mut dns, mut ips) = default_server_sans();
        for s in extra_sans {
            match s.parse::<IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => dns.push(s.clone()),
            }
        }
        let server = ca.issue(&IssueSpec::server(
            SpiffeId::new(trust_domain, SERVER_PATH)?,
            dns,
            ips,
            365,
        ))?;
        let admin = ca.issue(&IssueSpec::client(
            SpiffeId::new(trust_domain, ADMIN_PATH)?,
            365,
        ))?;
        write_new(&paths.ca_key, ca.key_pem().as_bytes(), 0o600)?;
        write_new(&paths.ca_cert, ca.cert_pem().as_bytes(), 0o644)?;
        write_new(&paths.server_key, server.1.as_bytes(), 0o600)?;
        write_new(&paths.server_cert, server.0.as_bytes(), 0o644)?;
        write_new(&paths.admin_key, admin.1.as_bytes(), 0o600)?;
        write_new(&paths.admin_cert, admin.0.as_bytes(), 0o644)?;
        Ok(paths)
    }

    /// Issues a client identity `<name>.pem`/`<name>.key` in `dir` with the CA kept there.
    pub fn issue_client(
        dir: &Path,
        name: &str,
        id: &SpiffeId,
        days: i64,
    ) -> Result<(PathBuf, PathBuf), PkiError> {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        {
            return Err(PkiError::Invalid {
                path: dir.join(name),
                reason: "an identity's file name may contain only letters, digits, '-' and '_'"
                    .into(),
            });
        }
        let paths = PkiPaths::new(dir);
        let (cert, key) = paths.identity(name);
        for p in [&cert, &key] {
            if p.exists() {
                return Err(PkiError::Exists(p.clone()));
            }
        }
        let ca = Ca::load(&paths.ca_cert, &paths.ca_key)?;
        let (cert_pem, key_pem) = ca.issue(&IssueSpec::client(id.clone(), days))?;
        write_new(&key, key_pem.as_bytes(), 0o600)?;
        write_new(&cert, cert_pem.as_bytes(), 0o644)?;
        Ok((cert, key))
    }
}

/// Writes a new file with `mode` from the start (no window with wider permissions).
pub fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    // The umask may have narrowed the mode; set it exactly.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_writes_files_with_modes_and_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let p = Pki::init(
            &dir,
            "aurae.local",
            &["10.0.0.1".into(), "aurae.example".into()],
        )
        .unwrap();
        assert_eq!(mode(&p.dir), 0o700);
        assert_eq!(mode(&p.ca_key), 0o600);
        assert_eq!(mode(&p.server_key), 0o600);
        assert_eq!(mode(&p.admin_key), 0o600);
        assert_eq!(mode(&p.ca_cert), 0o644);
        let err = Pki::init(&dir, "aurae.local", &[]).unwrap_err();
        assert!(matches!(err, PkiError::Exists(_)), "{err}");
        // The server certificate carries the SPIFFE ID and the names it is reached by.
        let pem = fs::read(&p.server_cert).unwrap();
        let der = rustls_pki_types::CertificateDer::from(
            x509_parser::pem::parse_x509_pem(&pem).unwrap().1.contents,
        );
        let id = crate::tls::peer_spiffe_id(&der).unwrap();
        assert_eq!(id.as_str(), "spiffe://aurae.local/auraed");
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| format!("{n}"))
            .collect();
        let all = names.join(" ");
        for want in [
            "localhost",
            "IPAddress(7f:00:00:01)",
            "IPAddress(0a:00:00:01)",
            "aurae.example",
        ] {
            assert!(all.contains(want), "{want} missing from {all}");
        }
    }

    #[test]
    fn issue_client_uses_the_ca_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let p = Pki::init(tmp.path(), "td.test", &[]).unwrap();
        let id = SpiffeId::new("td.test", "/operator/alice").unwrap();
        let (cert, key) = Pki::issue_client(&p.dir, "alice", &id, 1).unwrap();
        assert_eq!(mode(&key), 0o600);
        assert!(
            fs::read_to_string(cert)
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
        assert!(Pki::issue_client(&p.dir, "../x", &id, 1).is_err());
        assert!(matches!(
            Pki::issue_client(&p.dir, "alice", &id, 1),
            Err(PkiError::Exists(_))
        ));
    }

    #[test]
    fn bad_trust_domain_is_refused() {
        assert!(Ca::generate("Bad Domain").is_err());
    }
}
