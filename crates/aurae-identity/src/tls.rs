//! rustls configurations for Aurae: TLS 1.3 only, ring only, client certificates mandatory,
//! and every peer bound to exactly one SPIFFE ID of our trust domain at the handshake.

use std::{fs, path::Path, sync::Arc};

use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::{CryptoProvider, ring},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject};
use x509_parser::extensions::GeneralName;

use crate::spiffe::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
    #[error("certificate is not valid X.509: {0}")]
    X509(String),
    #[error("certificate has no SPIFFE ID (a URI SAN spiffe://<trust-domain>/<path>)")]
    NoSpiffeId,
    #[error("certificate has {0} URI SANs; an Aurae identity has exactly one")]
    ManyUris(usize),
    #[error("certificate's SPIFFE ID is invalid: {0}")]
    BadSpiffeId(#[from] crate::spiffe::SpiffeIdError),
    #[error("SPIFFE ID {id} is not in trust domain {expected}")]
    ForeignTrustDomain { id: String, expected: String },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn file_err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = fs::read(path).map_err(|e| file_err(path, e))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// Reads the private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = fs::read(path).map_err(|e| file_err(path, e))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| file_err(path, e))
}

fn roots(ca: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in ca {
        store.add(c.clone())?;
    }
    Ok(store)
}

/// The one SPIFFE ID in a certificate's URI SANs.
pub fn peer_spiffe_id(der: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::X509(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::X509(e.to_string()))?;
    let uris: Vec<&str> = san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [] => Err(TlsError::NoSpiffeId),
        [one] if one.starts_with("spiffe://") => Ok(one.parse()?),
        [_] => Err(TlsError::NoSpiffeId),
        many => Err(TlsError::ManyUris(many.len())),
    }
}

/// Verifies client chains with webpki (CA, validity, clientAuth usage), then requires
/// exactly one SPIFFE ID in our trust domain. A failure ends the handshake.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let fail = |e: TlsError| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        };
        let id = peer_spiffe_id(end_entity).map_err(fail)?;
        if id.trust_domain() != self.trust_domain {
            return Err(fail(TlsError::ForeignTrustDomain {
                id: id.to_string(),
                expected: self.trust_domain.clone(),
            }));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server configuration for auraed; returns it with auraed's own SPIFFE ID, whose trust
/// domain is the one clients must belong to.
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<(ServerConfig, SpiffeId), TlsError> {
    let ca_certs = load_certs(ca)?;
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let first = chain.first().ok_or(TlsError::NoSpiffeId)?;
    let own_id = peer_spiffe_id(first).map_err(|e| file_err(cert, e))?;
    let inner =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&ca_certs)?), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let verifier = SpiffeClientVerifier {
        inner,
        trust_domain: own_id.trust_domain().to_owned(),
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No session tickets or resumption: each connection proves its identity afresh.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok((config, own_id))
}

/// Client configuration from files: trust `ca`, present `cert`/`key`.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<ClientConfig, TlsError> {
    client_config_from(load_certs(ca)?, Some((load_certs(cert)?, load_key(key)?)))
}

/// Client configuration from parts; `identity = None` presents no certificate (tests).
pub fn client_config_from(
    ca: Vec<CertificateDer<'static>>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&ca)?);
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
