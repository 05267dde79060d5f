//! Client identities for handshake tests: each returns a rustls client configuration that
//! trusts the daemon's CA and presents the described certificate.

use std::path::Path;

use aurae_identity::{Ca, IssueSpec, SpiffeId, tls};
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use time::{Duration, OffsetDateTime};

fn parts(
    cert_pem: &str,
    key_pem: &str,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let certs =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    Ok((certs, PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?))
}

fn with_identity(ca_pem: &Path, cert_pem: &str, key_pem: &str) -> anyhow::Result<ClientConfig> {
    Ok(tls::client_config_from(
        tls::load_certs(ca_pem)?,
        Some(parts(cert_pem, key_pem)?),
    )?)
}

/// The kinds of bad client the handshake must refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadClient {
    NoCertificate,
    OtherCa,
    Expired,
    NotYetValid,
    NoSpiffeId,
    ForeignTrustDomain,
    ServerCertAsClient,
    /// `/operator/admin`, signed by an intermediate CA (signed by the real CA) that has
    /// no SPIFFE ID: the attack webpki alone lets through (it ignores the root's pathLen).
    IntermediateWithoutSpiffeId,
    /// `/operator/admin`, signed by the intermediate `/instance/a`: outside its path.
    OutsideIntermediatePath,
    /// `/instance/ab`, signed by the intermediate `/instance/a`: a string prefix, not a
    /// path below it.
    IntermediateStringPrefix,
}

impl BadClient {
    pub const ALL: [BadClient; 10] = [
        Self::NoCertificate,
        Self::OtherCa,
        Self::Expired,
        Self::NotYetValid,
        Self::NoSpiffeId,
        Self::ForeignTrustDomain,
        Self::ServerCertAsClient,
        Self::IntermediateWithoutSpiffeId,
        Self::OutsideIntermediatePath,
        Self::IntermediateStringPrefix,
    ];

    /// A client configuration for this kind, against the PKI in `pki_dir`.
    pub fn config(self, pki_dir: &Path, trust_domain: &str) -> anyhow::Result<ClientConfig> {
        let paths = aurae_identity::PkiPaths::new(pki_dir);
        let ca = Ca::load(&paths.ca_cert, &paths.ca_key)?;
        let good = SpiffeId::new(trust_domain, "/operator/mallory")?;
        let now = OffsetDateTime::now_utc();
        let spec = IssueSpec::client(good.clone(), 1);
        let (cert, key) = match self {
            Self::NoCertificate => {
                return Ok(tls::client_config_from(
                    tls::load_certs(&paths.ca_cert)?,
                    None,
                )?);
            }
            Self::OtherCa => Ca::generate(trust_domain)?.issue(&spec)?,
            Self::Expired => ca.issue(&IssueSpec {
                not_before: now - Duration::days(10),
                not_after: now - Duration::days(1),
                ..spec
            })?,
            Self::NotYetValid => ca.issue(&IssueSpec {
                not_before: now + Duration::days(1),
                not_after: now + Duration::days(10),
                ..spec
            })?,
            Self::NoSpiffeId => ca.issue(&IssueSpec {
                spiffe_id: None,
                ..spec
            })?,
            Self::ForeignTrustDomain => ca.issue(&IssueSpec::client(
                SpiffeId::new("evil.test", "/operator/mallory")?,
                1,
            ))?,
            // A server-only certificate (serverAuth, no clientAuth). auraed's own is both
            // now: it is how a parent presents itself to the instances it spawned.
            Self::ServerCertAsClient => ca.issue(&IssueSpec::server(
                good.clone(),
                vec!["localhost".into()],
                Vec::new(),
                1,
            ))?,
            Self::IntermediateWithoutSpiffeId => {
                return delegated(pki_dir, trust_domain, None, "/operator/admin");
            }
            Self::OutsideIntermediatePath => {
                return delegated(
                    pki_dir,
                    trust_domain,
                    Some("/instance/a"),
                    "/operator/admin",
                );
            }
            Self::IntermediateStringPrefix => {
                return delegated(pki_dir, trust_domain, Some("/instance/a"), "/instance/ab");
            }
        };
        with_identity(&paths.ca_cert, &cert, &key)
    }
}

/// A client presenting `leaf_path`, signed by an intermediate CA with SPIFFE path
/// `intermediate` (`None`: no SPIFFE ID) that the PKI's CA signed; the client sends the
/// leaf and the intermediate. Good when `leaf_path` lies below `intermediate`.
pub fn delegated(
    pki_dir: &Path,
    trust_domain: &str,
    intermediate: Option<&str>,
    leaf_path: &str,
) -> anyhow::Result<ClientConfig> {
    let paths = aurae_identity::PkiPaths::new(pki_dir);
    let ca = Ca::load(&paths.ca_cert, &paths.ca_key)?;
    let ca_id = intermediate
        .map(|p| SpiffeId::new(trust_domain, p))
        .transpose()?;
    let sub = ca.issue_intermediate(ca_id.as_ref(), 1)?;
    let (cert, key) = sub.issue(&IssueSpec::client(
        SpiffeId::new(trust_domain, leaf_path)?,
        1,
    ))?;
    with_identity(&paths.ca_cert, &cert, &key)
}
