//! The development PKI: one CA, a server identity for auraed, client identities, and
//! intermediate CAs with their own SPIFFE ID (for spawned instances, which may sign only
//! identities below their own).
//!
//! Layout of a PKI directory `D` (mode 0700), the one auraed is pointed at:
//! `ca.pem` (0644), `auraed.pem`/`auraed.key`, `admin.pem`/`admin.key` (keys 0600), and
//! `signer.pem`/`signer.key`: the daemon's signing certificate, an intermediate CA with the
//! SPIFFE ID `/instance/<node>` with which auraed mints its spawned instances' identities
//! (`/instance/<node>/<name>`), and nothing outside that subtree (verifiers enforce it at
//! every link, see [`crate::tls::check_chain_ids`]).
//!
//! The CA's private key is *not* there: auraed never needs it, and a daemon compromise
//! must not hand out the power to mint identities. It lives in its own directory, by
//! default the sibling `D-ca/ca.key` (directory 0700, key 0600; see
//! [`default_ca_key_dir`]), where `aer pki issue` finds it. auraed refuses to start while
//! `D/ca.key` exists ([`PkiPaths::refuse_ca_key`]).

use std::{
    fs,
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Component, Path, PathBuf},
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
/// The first segment of every spawned instance's SPIFFE path.
pub const INSTANCE_PATH: &str = "/instance";
/// The node name `aer pki init` gives the daemon's signing certificate unless told
/// otherwise: its signer is `/instance/node`.
pub const DEFAULT_NODE: &str = "node";
/// File name of the CA's private key (in the CA key directory, never the PKI directory).
pub const CA_KEY_FILE: &str = "ca.key";

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
    #[error(
        "{key} holds the CA's private key in the PKI directory auraed reads; auraed never \
         needs it and will not run next to it. Move it out, to where `aer pki issue` looks \
         for it: mkdir -p -m 700 {move_to} && mv {key} {move_to}/"
    )]
    CaKeyInPkiDir { key: PathBuf, move_to: PathBuf },
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

impl IssueSpec {
    /// A spawned instance's SVID: server and client, reachable at `ips` (and
    /// `localhost`), valid from a minute ago for `ttl`.
    pub fn instance(id: SpiffeId, ips: Vec<IpAddr>, ttl: std::time::Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            spiffe_id: Some(id),
            dns_names: vec!["localhost".to_owned()],
            ips,
            server: true,
            client: true,
            not_before: now - Duration::minutes(1),
            not_after: now + ttl,
        }
    }
}

/// A certificate authority whose key is held in memory (loaded from, or created in, a
/// PKI directory).
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    /// For an intermediate: its certificate and those of the intermediates above it (not
    /// the root), PEM, appended to every certificate it issues so peers get the chain.
    chain_pem: String,
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
            chain_pem: String::new(),
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
        Ok(Self {
            issuer,
            cert_pem,
            chain_pem: String::new(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key, PEM-encoded: only for writing `ca.key` once, in [`Pki::init`].
    fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The certificates a peer needs between a certificate this CA issues and the root:
    /// empty for the root, else this intermediate's own and those above it (PEM).
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// Issues an intermediate CA with a fresh key, valid from now for `days`, that carries
    /// `id` as its one URI SAN. Peers accept what it signs only for SPIFFE IDs strictly
    /// below `id`'s path (see [`crate::tls::check_chain_ids`]); this signer does not check
    /// that itself. `id = None` only to build deliberately broken chains in tests.
    /// Certificates the new CA issues come with the whole chain up to (not including) the
    /// root.
    pub fn issue_intermediate(&self, id: Option<&SpiffeId>, days: i64) -> Result<Ca, PkiError> {
        let now = OffsetDateTime::now_utc();
        self.issue_intermediate_until(id, now + Duration::days(days))
    }

    /// [`Ca::issue_intermediate`] valid for `ttl` from now.
    pub fn issue_intermediate_for(
        &self,
        id: Option<&SpiffeId>,
        ttl: std::time::Duration,
    ) -> Result<Ca, PkiError> {
        self.issue_intermediate_until(id, OffsetDateTime::now_utc() + ttl)
    }

    fn issue_intermediate_until(
        &self,
        id: Option<&SpiffeId>,
        not_after: OffsetDateTime,
    ) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let params = intermediate_params(id, not_after)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Ca {
            chain_pem: format!("{}{}", cert.pem(), self.chain_pem),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Signs an intermediate CA for the public key of a certificate signing request
    /// (whose signature is checked): the certificate carries `id` and our validity rules,
    /// never what the request asks for. Returns the new CA's chain (its certificate, then
    /// ours up to the root, PEM).
    pub fn sign_intermediate_request(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: std::time::Duration,
    ) -> Result<String, PkiError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let params = intermediate_params(Some(id), OffsetDateTime::now_utc() + ttl)?;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(format!("{}{}", cert.pem(), self.chain_pem))
    }

    /// Signs a leaf for the public key of a certificate signing request (whose signature
    /// is checked), with `spec`'s names and validity only. Returns the leaf and our chain.
    pub fn sign_request(&self, csr_pem: &str, spec: &IssueSpec) -> Result<String, PkiError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let params = leaf_params(spec)?;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(format!("{}{}", cert.pem(), self.chain_pem))
    }

    /// A signing CA from its chain (its own certificate first, then the intermediates
    /// above it, not the root) and key, both PEM: a daemon's `signer.pem`/`signer.key`, or
    /// what a parent handed a spawned instance.
    pub fn from_pem(chain_pem: &str, key_pem: &str, what: &Path) -> Result<Ca, PkiError> {
        let invalid = |reason: String| PkiError::Invalid {
            path: what.to_owned(),
            reason,
        };
        let key = KeyPair::from_pem(key_pem).map_err(|e| invalid(e.to_string()))?;
        let first = pem_blocks(chain_pem)
            .into_iter()
            .next()
            .ok_or_else(|| invalid("no certificate".into()))?;
        let issuer = Issuer::from_ca_cert_pem(&first, key).map_err(|e| invalid(e.to_string()))?;
        Ok(Ca {
            issuer,
            cert_pem: first,
            chain_pem: chain_pem.to_owned(),
        })
    }

    /// Loads a signing CA (an intermediate) from its chain and key files.
    pub fn load_signer(cert: &Path, key: &Path) -> Result<Ca, PkiError> {
        let chain = fs::read_to_string(cert).map_err(io_err(cert))?;
        let key_pem = fs::read_to_string(key).map_err(io_err(key))?;
        Self::from_pem(&chain, &key_pem, cert)
    }

    /// This CA's chain and private key, PEM: only to hand a freshly minted signer to the
    /// spawned instance it belongs to.
    pub fn into_pem(self) -> (String, String) {
        let key = self.key_pem();
        (self.chain_pem, key)
    }

    /// Issues a leaf certificate with a fresh key; returns `(cert_pem, key_pem)`, where
    /// `cert_pem` is the leaf followed by [`Ca::chain_pem`] (nothing more for the root).
    pub fn issue(&self, spec: &IssueSpec) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let params = leaf_params(spec)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((
            format!("{}{}", cert.pem(), self.chain_pem),
            key.serialize_pem(),
        ))
    }
}

/// The PEM blocks of a bundle, each with its BEGIN/END lines.
fn pem_blocks(pem: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in pem.lines() {
        if line.starts_with("-----BEGIN ") {
            cur = Some(String::new());
        }
        if let Some(c) = cur.as_mut() {
            c.push_str(line);
            c.push('\n');
        }
        if line.starts_with("-----END ") {
            out.extend(cur.take());
        }
    }
    out
}

fn intermediate_params(
    id: Option<&SpiffeId>,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Aurae");
    match id {
        Some(id) => {
            dn.push(DnType::CommonName, format!("Aurae CA {id}"));
            params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        }
        None => dn.push(DnType::CommonName, "Aurae CA no-spiffe-id"),
    }
    params.distinguished_name = dn;
    // No pathLen: how deep a chain may go is bounded by the path rule (each signer's
    // identities lie strictly below its own) and webpki's own depth limit.
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = OffsetDateTime::now_utc() - Duration::minutes(5);
    params.not_after = not_after;
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn leaf_params(spec: &IssueSpec) -> Result<CertificateParams, PkiError> {
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
    Ok(params)
}

/// A fresh key pair and a certificate signing request for it (PEM each): what a spawned
/// instance sends its parent to renew its identity, so the new key never leaves it.
pub fn key_and_request() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    Ok((key.serialize_pem(), csr))
}

/// Where the CA key of PKI directory `dir` lives unless told otherwise: the sibling
/// directory `<dir>-ca` (`/tmp/aurae/pki` → `/tmp/aurae/pki-ca`), outside `dir`.
pub fn default_ca_key_dir(dir: &Path) -> PathBuf {
    let named = if dir.file_name().is_some() {
        dir.to_path_buf()
    } else {
        // Ends in "." or "..": name it by where it leads (lexically if it does not exist).
        fs::canonicalize(dir).unwrap_or_else(|_| {
            let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
            let mut out = PathBuf::new();
            for c in abs.components() {
                match c {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    c => out.push(c),
                }
            }
            out
        })
    };
    match named.file_name() {
        Some(n) => {
            let mut n = n.to_os_string();
            n.push("-ca");
            named.with_file_name(n)
        }
        None => named.join("aurae-ca"),
    }
}

/// The files of a PKI directory, and where its CA key is kept.
#[derive(Debug, Clone)]
pub struct PkiPaths {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    /// The directory holding the CA key, never `dir` or inside it.
    pub ca_key_dir: PathBuf,
    /// `ca_key_dir/ca.key`.
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    /// The daemon's signing certificate (chain) and key: see the module docs.
    pub signer_cert: PathBuf,
    pub signer_key: PathBuf,
}

impl PkiPaths {
    /// The PKI directory `dir` with its CA key in [`default_ca_key_dir`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        let ca_key_dir = default_ca_key_dir(&dir);
        Self::with_ca_key_dir(dir, ca_key_dir)
    }

    /// The PKI directory `dir` with its CA key in `ca_key_dir/ca.key`.
    pub fn with_ca_key_dir(dir: impl Into<PathBuf>, ca_key_dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        let ca_key_dir = ca_key_dir.into();
        Self {
            ca_cert: dir.join("ca.pem"),
            ca_key: ca_key_dir.join(CA_KEY_FILE),
            ca_key_dir,
            server_cert: dir.join("auraed.pem"),
            server_key: dir.join("auraed.key"),
            admin_cert: dir.join("admin.pem"),
            admin_key: dir.join("admin.key"),
            signer_cert: dir.join("signer.pem"),
            signer_key: dir.join("signer.key"),
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

    /// Where older layouts kept the CA key: `dir/ca.key`, next to what auraed reads.
    pub fn key_in_pki_dir(&self) -> PathBuf {
        self.dir.join(CA_KEY_FILE)
    }

    /// Fails when the PKI directory holds a CA key (`dir/ca.key`, also as a symlink,
    /// dangling or not), naming it and where to move it. auraed calls this before
    /// anything else it reads there.
    pub fn refuse_ca_key(&self) -> Result<(), PkiError> {
        let key = self.key_in_pki_dir();
        if fs::symlink_metadata(&key).is_ok() {
            return Err(PkiError::CaKeyInPkiDir {
                key,
                move_to: self.ca_key_dir.clone(),
            });
        }
        Ok(())
    }

    /// Whether the CA key directory is the PKI directory or lies inside it (compared
    /// lexically on absolute paths, and on canonical ones where both exist).
    fn ca_key_dir_inside_pki_dir(&self) -> bool {
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let lexical = abs(&self.ca_key_dir).starts_with(abs(&self.dir));
        let canonical = match (
            fs::canonicalize(&self.ca_key_dir),
            fs::canonicalize(&self.dir),
        ) {
            (Ok(k), Ok(d)) => k.starts_with(d),
            _ => false,
        };
        lexical || canonical
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
    /// Creates a CA, auraed's server identity and the admin client identity in `dir`, the
    /// CA key in [`default_ca_key_dir`]`(dir)`; see [`Pki::init_paths`].
    pub fn init(
        dir: &Path,
        trust_domain: &str,
        extra_sans: &[String],
    ) -> Result<PkiPaths, PkiError> {
        Self::init_paths(&PkiPaths::new(dir), trust_domain, extra_sans)
    }

    /// Creates a CA, auraed's server identity and the admin client identity in
    /// `paths.dir`, and the CA key in `paths.ca_key` (never inside `paths.dir`).
    /// `extra_sans` are further DNS names or IP addresses for the server certificate.
    /// Refuses to touch directories that already hold any of the files.
    pub fn init_paths(
        paths: &PkiPaths,
        trust_domain: &str,
        extra_sans: &[String],
    ) -> Result<PkiPaths, PkiError> {
        let paths = paths.clone();
        let dir = paths.dir.as_path();
        if paths.ca_key_dir_inside_pki_dir() {
            return Err(PkiError::Invalid {
                path: paths.ca_key_dir.clone(),
                reason: format!(
                    "the CA key directory must lie outside the PKI directory {} that auraed reads",
                    dir.display()
                ),
            });
        }
        for p in [
            &paths.ca_cert,
            &paths.ca_key,
            &paths.key_in_pki_dir(),
            &paths.server_cert,
            &paths.server_key,
            &paths.admin_cert,
            &paths.admin_key,
            &paths.signer_cert,
            &paths.signer_key,
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
        let key_dir = paths.ca_key_dir.as_path();
        if !key_dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(key_dir)
                .map_err(io_err(key_dir))?;
            fs::set_permissions(key_dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err(key_dir))?;
        }

        let ca = Ca::generate(trust_domain)?;
        let (mut dns, mut ips) = default_server_sans();
        for s in extra_sans {
            match s.parse::<IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => dns.push(s.clone()),
            }
        }
        // auraed's identity is also a client one: it is how a parent daemon presents
        // itself to the instances it spawned.
        let server = ca.issue(&IssueSpec {
            client: true,
            ..IssueSpec::server(SpiffeId::new(trust_domain, SERVER_PATH)?, dns, ips, 365)
        })?;
        let signer = ca
            .issue_intermediate(Some(&signer_id(trust_domain, DEFAULT_NODE)?), 365)?
            .into_pem();
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
        write_new(&paths.signer_key, signer.1.as_bytes(), 0o600)?;
        write_new(&paths.signer_cert, signer.0.as_bytes(), 0o644)?;
        Ok(paths)
    }

    /// Issues a client identity `<name>.pem`/`<name>.key` in `dir` with the CA whose key
    /// is in [`default_ca_key_dir`]`(dir)`; see [`Pki::issue_client_paths`].
    pub fn issue_client(
        dir: &Path,
        name: &str,
        id: &SpiffeId,
        days: i64,
    ) -> Result<(PathBuf, PathBuf), PkiError> {
        Self::issue_client_paths(&PkiPaths::new(dir), name, id, days)
    }

    /// Issues a client identity `<name>.pem`/`<name>.key` in `paths.dir`, signed with the
    /// CA key at `paths.ca_key`. A CA key still in `paths.dir` is not used: the error says
    /// where to move it.
    pub fn issue_client_paths(
        paths: &PkiPaths,
        name: &str,
        id: &SpiffeId,
        days: i64,
    ) -> Result<(PathBuf, PathBuf), PkiError> {
        let dir = paths.dir.as_path();
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
        let (cert, key) = paths.identity(name);
        for p in [&cert, &key] {
            if p.exists() {
                return Err(PkiError::Exists(p.clone()));
            }
        }
        if !paths.ca_key.exists() {
            paths.refuse_ca_key()?;
            return Err(PkiError::Invalid {
                path: paths.ca_key.clone(),
                reason: format!(
                    "no CA key here: `aer pki init --dir {}` puts it there; if it is elsewhere, \
                     say where (aer: --ca-key-dir)",
                    dir.display()
                ),
            });
        }
        let ca = Ca::load(&paths.ca_cert, &paths.ca_key)?;
        let (cert_pem, key_pem) = ca.issue(&IssueSpec::client(id.clone(), days))?;
        write_new(&key, key_pem.as_bytes(), 0o600)?;
        write_new(&cert, cert_pem.as_bytes(), 0o644)?;
        Ok((cert, key))
    }
}

/// The SPIFFE ID of node `node`'s signing certificate: `/instance/<node>`.
pub fn signer_id(trust_domain: &str, node: &str) -> Result<SpiffeId, PkiError> {
    Ok(SpiffeId::new(
        trust_domain,
        &format!("{INSTANCE_PATH}/{node}"),
    )?)
}

impl Pki {
    /// Issues (or replaces) the daemon's signing certificate in `paths.dir` for node
    /// `node` (`/instance/<node>`), signed with the CA key at `paths.ca_key`: one per
    /// daemon that spawns instances, so two daemons never mint the same identities.
    pub fn issue_signer_paths(
        paths: &PkiPaths,
        trust_domain: &str,
        node: &str,
        days: i64,
    ) -> Result<SpiffeId, PkiError> {
        let id = signer_id(trust_domain, node)?;
        if id.path().matches('/').count() != 2 {
            return Err(PkiError::Invalid {
                path: paths.signer_cert.clone(),
                reason: format!("a node name is one path segment, not {node:?}"),
            });
        }
        if !paths.ca_key.exists() {
            paths.refuse_ca_key()?;
            return Err(PkiError::Invalid {
                path: paths.ca_key.clone(),
                reason: "no CA key here (aer: --ca-key-dir)".into(),
            });
        }
        let ca = Ca::load(&paths.ca_cert, &paths.ca_key)?;
        let (chain, key) = ca.issue_intermediate(Some(&id), days)?.into_pem();
        for p in [&paths.signer_cert, &paths.signer_key] {
            if p.exists() {
                fs::remove_file(p).map_err(io_err(p))?;
            }
        }
        write_new(&paths.signer_key, key.as_bytes(), 0o600)?;
        write_new(&paths.signer_cert, chain.as_bytes(), 0o644)?;
        Ok(id)
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
        // The CA key is outside the directory auraed reads, in its own 0700 directory.
        assert_eq!(p.ca_key, tmp.path().join("pki-ca/ca.key"));
        assert_eq!(mode(&p.ca_key_dir), 0o700);
        assert!(!p.dir.join("ca.key").exists());
        let mut names: Vec<_> = fs::read_dir(&p.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "admin.key",
                "admin.pem",
                "auraed.key",
                "auraed.pem",
                "ca.pem",
                "signer.key",
                "signer.pem"
            ]
        );
        p.refuse_ca_key().unwrap();
        assert_eq!(mode(&p.server_key), 0o600);
        assert_eq!(mode(&p.signer_key), 0o600);
        // The daemon's signer is an intermediate limited to /instance/node.
        let signer = Ca::load_signer(&p.signer_cert, &p.signer_key).unwrap();
        let (leaf, _) = signer
            .issue(&IssueSpec::client(
                SpiffeId::new("aurae.local", "/instance/node/x").unwrap(),
                1,
            ))
            .unwrap();
        assert_eq!(leaf.matches("BEGIN CERTIFICATE").count(), 2);
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
    fn the_ca_key_lives_beside_the_pki_dir_never_in_it() {
        assert_eq!(
            default_ca_key_dir(Path::new("/tmp/aurae/pki")),
            Path::new("/tmp/aurae/pki-ca")
        );
        assert_eq!(
            default_ca_key_dir(Path::new("/tmp/aurae/pki/")),
            Path::new("/tmp/aurae/pki-ca")
        );
        assert_eq!(default_ca_key_dir(Path::new("pki")), Path::new("pki-ca"));
        let tmp = tempfile::tempdir().unwrap();
        let dot = default_ca_key_dir(&tmp.path().join("pki/.."));
        assert_eq!(dot.parent(), tmp.path().parent());
        assert!(!dot.starts_with(tmp.path()), "{}", dot.display());

        // An explicit key directory, but not inside the PKI directory.
        let dir = tmp.path().join("pki");
        for inside in [dir.clone(), dir.join("keys"), tmp.path().join("pki/./x/..")] {
            let err = Pki::init_paths(&PkiPaths::with_ca_key_dir(&dir, &inside), "td.test", &[])
                .unwrap_err();
            assert!(err.to_string().contains("outside"), "{err}");
        }
        let keys = tmp.path().join("elsewhere/keys");
        let p = Pki::init_paths(&PkiPaths::with_ca_key_dir(&dir, &keys), "td.test", &[]).unwrap();
        assert_eq!(p.ca_key, keys.join("ca.key"));
        let id = SpiffeId::new("td.test", "/operator/bob").unwrap();
        // The default key directory is empty: issuing there fails; with the right one, not.
        assert!(Pki::issue_client(&dir, "bob", &id, 1).is_err());
        Pki::issue_client_paths(&p, "bob", &id, 1).unwrap();
    }

    #[test]
    fn a_ca_key_in_the_pki_dir_is_refused_with_where_to_move_it() {
        let tmp = tempfile::tempdir().unwrap();
        let p = Pki::init(&tmp.path().join("pki"), "td.test", &[]).unwrap();
        // An older layout: the key next to what auraed reads.
        fs::rename(&p.ca_key, p.dir.join("ca.key")).unwrap();
        let err = p.refuse_ca_key().unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&p.dir.join("ca.key").display().to_string()),
            "{msg}"
        );
        assert!(
            msg.contains(&format!(
                "mkdir -p -m 700 {} && mv {} {}/",
                p.ca_key_dir.display(),
                p.dir.join("ca.key").display(),
                p.ca_key_dir.display()
            )),
            "{msg}"
        );
        // aer pki issue does not use it where it is, and says the same.
        let id = SpiffeId::new("td.test", "/operator/bob").unwrap();
        let err = Pki::issue_client(&p.dir, "bob", &id, 1).unwrap_err();
        assert!(matches!(err, PkiError::CaKeyInPkiDir { .. }), "{err}");
        // Moved as told, all is well again.
        fs::rename(p.dir.join("ca.key"), &p.ca_key).unwrap();
        p.refuse_ca_key().unwrap();
        Pki::issue_client(&p.dir, "bob", &id, 1).unwrap();
        // A symlink counts too, dangling or not.
        std::os::unix::fs::symlink("/nonexistent", p.dir.join("ca.key")).unwrap();
        assert!(p.refuse_ca_key().is_err());
        // And init refuses a directory with a key in it.
        fs::remove_file(p.dir.join("ca.key")).unwrap();
        let dir2 = tmp.path().join("pki2");
        fs::create_dir(&dir2).unwrap();
        fs::write(dir2.join("ca.key"), "x").unwrap();
        assert!(matches!(
            Pki::init(&dir2, "td.test", &[]),
            Err(PkiError::Exists(_))
        ));
    }

    #[test]
    fn intermediates_carry_their_id_and_hand_their_chain_on() {
        let ca = Ca::generate("td.test").unwrap();
        assert!(ca.chain_pem().is_empty());
        let a_id = SpiffeId::new("td.test", "/instance/a").unwrap();
        let a = ca.issue_intermediate(Some(&a_id), 1).unwrap();
        let der = |pem: &str| {
            rustls_pki_types::CertificateDer::from(
                x509_parser::pem::parse_x509_pem(pem.as_bytes())
                    .unwrap()
                    .1
                    .contents,
            )
        };
        assert_eq!(
            crate::tls::peer_spiffe_id(&der(a.cert_pem())).unwrap(),
            a_id
        );
        let a_der = der(a.cert_pem());
        let (_, cert) = x509_parser::parse_x509_certificate(&a_der).unwrap();
        assert!(cert.is_ca());
        let leaf_id = SpiffeId::new("td.test", "/instance/a/x").unwrap();
        let (pem, _) = a.issue(&IssueSpec::client(leaf_id.clone(), 1)).unwrap();
        assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(pem.ends_with(a.cert_pem()));
        assert_eq!(crate::tls::peer_spiffe_id(&der(&pem)).unwrap(), leaf_id);
        let b = a
            .issue_intermediate(Some(&SpiffeId::new("td.test", "/instance/a/b").unwrap()), 1)
            .unwrap();
        assert_eq!(b.chain_pem(), format!("{}{}", b.cert_pem(), a.cert_pem()));
    }

    #[test]
    fn bad_trust_domain_is_refused() {
        assert!(Ca::generate("Bad Domain").is_err());
    }
}
