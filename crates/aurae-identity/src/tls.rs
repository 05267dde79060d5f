//! rustls configurations for Aurae: TLS 1.3 only, ring only, client certificates mandatory,
//! and every peer bound to exactly one SPIFFE ID of our trust domain at the handshake.
//!
//! Chains are constrained by SPIFFE path ([`check_chain_ids`]): webpki checks signatures,
//! validity and usages, but reduces the root to a trust anchor and so ignores its pathLen:
//! any intermediate CA the root ever signed would otherwise vouch for any identity. Here an
//! intermediate counts only with its own SPIFFE ID, and only for identities below it.

use std::{fs, path::Path, sync::Arc};

use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, ring},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject};
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
    #[error(
        "intermediate certificate {index} of the chain cannot vouch for anyone: {reason} \
         (an intermediate needs exactly one SPIFFE ID of the trust domain)"
    )]
    IntermediateWithoutSpiffeId { index: usize, reason: String },
    #[error("the peer presented SPIFFE ID {id}, not {expected}")]
    UnexpectedId { id: String, expected: String },
    #[error(
        "SPIFFE ID {id} is not below {intermediate}, the ID of an intermediate CA in its chain"
    )]
    NotBelowIntermediate { id: String, intermediate: String },
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

/// The DER SubjectPublicKeyInfo of the first certificate in `cert_pem` (what a key's
/// fingerprint is taken of).
pub fn public_key_der(cert_pem: &str) -> Result<Vec<u8>, TlsError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| TlsError::X509(e.to_string()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| TlsError::X509(e.to_string()))?;
    Ok(cert.public_key().raw.to_vec())
}

/// Whether SPIFFE path `inner` lies strictly below `outer`, by whole segments:
/// `/instance/a/x` is below `/instance/a`; `/instance/a` and `/instance/ab` are not.
pub fn path_is_below(inner: &str, outer: &str) -> bool {
    // Both are validated paths (no trailing '/', no empty segment), so a remainder that
    // starts with '/' is one or more whole segments.
    inner
        .strip_prefix(outer)
        .is_some_and(|rest| rest.len() > 1 && rest.starts_with('/'))
}

/// The SPIFFE rule for a chain webpki has already verified; returns the leaf's ID.
///
/// The leaf carries exactly one SPIFFE ID, in `trust_domain` (`None`: the leaf's own).
/// Every intermediate the peer presented, except exact copies of a trust anchor in
/// `anchors`, must carry exactly one SPIFFE ID of that trust domain, and the leaf's path
/// must lie strictly below it ([`path_is_below`]). So an intermediate without an ID vouches
/// for no one, and one with an ID (a spawned instance's CA) only for IDs under its own.
/// Every presented certificate is checked, used by webpki's path or not: the path can only
/// be built from presented certificates and anchors, so none escapes the rule.
pub fn check_chain_ids(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    anchors: &[CertificateDer<'static>],
    trust_domain: Option<&str>,
) -> Result<SpiffeId, TlsError> {
    let id = peer_spiffe_id(end_entity)?;
    let td = trust_domain.unwrap_or(id.trust_domain());
    if id.trust_domain() != td {
        return Err(TlsError::ForeignTrustDomain {
            id: id.to_string(),
            expected: td.to_owned(),
        });
    }
    for (index, c) in intermediates.iter().enumerate() {
        if anchors.iter().any(|a| a.as_ref() == c.as_ref()) {
            continue;
        }
        let bad = |reason: String| TlsError::IntermediateWithoutSpiffeId { index, reason };
        let ca_id = peer_spiffe_id(c).map_err(|e| bad(e.to_string()))?;
        if ca_id.trust_domain() != td {
            return Err(bad(format!(
                "its SPIFFE ID {ca_id} is not in trust domain {td}"
            )));
        }
        if !path_is_below(id.path(), ca_id.path()) {
            return Err(TlsError::NotBelowIntermediate {
                id: id.to_string(),
                intermediate: ca_id.to_string(),
            });
        }
    }
    Ok(id)
}

fn rejected(e: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(e),
    )))
}

/// Verifies client chains with webpki (CA, validity, clientAuth usage), then requires
/// exactly one SPIFFE ID in our trust domain and the chain rule of [`check_chain_ids`]. A
/// failure ends the handshake.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    anchors: Vec<CertificateDer<'static>>,
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
        check_chain_ids(
            end_entity,
            intermediates,
            &self.anchors,
            Some(&self.trust_domain),
        )
        .map_err(rejected)?;
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

fn client_verifier(
    ca: Vec<CertificateDer<'static>>,
    trust_domain: &str,
) -> Result<SpiffeClientVerifier, TlsError> {
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&ca)?), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    Ok(SpiffeClientVerifier {
        inner,
        anchors: ca,
        trust_domain: trust_domain.to_owned(),
    })
}

/// Server configuration for auraed; returns it with auraed's own SPIFFE ID, whose trust
/// domain is the one clients must belong to.
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<(ServerConfig, SpiffeId, Arc<ServerCert>), TlsError> {
    let ca_certs = load_certs(ca)?;
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let first = chain.first().ok_or(TlsError::NoSpiffeId)?;
    peer_spiffe_id(first).map_err(|e| file_err(cert, e))?;
    server_config_with(ca_certs, certified(chain, key)?)
}

/// [`server_config`] from what is already loaded: the CA's certificates and auraed's own
/// certificate chain with its signing key (checked to match by whoever made it), so that a
/// start that has checked its files does not read and parse them (the key above all) again.
pub fn server_config_with(
    ca_certs: Vec<CertificateDer<'static>>,
    own: CertifiedKey,
) -> Result<(ServerConfig, SpiffeId, Arc<ServerCert>), TlsError> {
    // Cheap (no parsing): a key that is not the certificate's, or whose match cannot be
    // told, would fail every handshake later.
    own.keys_match().map_err(TlsError::Rustls)?;
    let first = own.cert.first().ok_or(TlsError::NoSpiffeId)?;
    let own_id = peer_spiffe_id(first)?;
    let resolver = Arc::new(ServerCert(std::sync::RwLock::new(Arc::new(own))));
    let verifier = client_verifier(ca_certs, own_id.trust_domain())?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No session tickets or resumption: each connection proves its identity afresh.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok((config, own_id, resolver))
}

/// auraed's own certificate, replaceable while it serves (a spawned instance renews its
/// short-lived SVID): new handshakes present the new one.
#[derive(Debug)]
pub struct ServerCert(std::sync::RwLock<Arc<CertifiedKey>>);

impl ServerCert {
    /// Replaces the certificate with `chain_pem` (leaf first) and `key_pem`; the new
    /// leaf must carry the same SPIFFE ID as the old one.
    pub fn replace(&self, chain_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let chain = certs_from_pem(chain_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::X509(format!("private key: {e}")))?;
        let new = certified(chain, key)?;
        let mut cur = self
            .0
            .write()
            .map_err(|_| TlsError::Verifier("certificate lock poisoned".into()))?;
        let old_id = cur.cert.first().map(peer_spiffe_id).transpose()?;
        let new_id = new.cert.first().map(peer_spiffe_id).transpose()?;
        if old_id != new_id {
            return Err(TlsError::X509(format!(
                "the new certificate names {new_id:?}, not {old_id:?}"
            )));
        }
        *cur = Arc::new(new);
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for ServerCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|c| c.clone())
    }
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, TlsError> {
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(TlsError::Rustls)?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(TlsError::Rustls)?;
    Ok(ck)
}

/// Every certificate in a PEM string.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::X509(e.to_string()))
}

/// Client configuration from files: trust `ca`, present `cert`/`key`.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<ClientConfig, TlsError> {
    client_config_from(load_certs(ca)?, Some((load_certs(cert)?, load_key(key)?)))
}

/// The trust domain a certificate names in a URI SAN `spiffe://<trust-domain>[/<path>]`;
/// for a root CA, whose SPIFFE ID has no path, which [`peer_spiffe_id`] does not take.
pub fn ca_trust_domain(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => {
            let td = u.strip_prefix("spiffe://")?.split('/').next()?;
            SpiffeId::validate_trust_domain(td).ok()?;
            Some(td.to_owned())
        }
        _ => None,
    })
}

/// Verifies auraed's chain with webpki (CA, validity, serverAuth usage, server name). A
/// chain with intermediates must also pass [`check_chain_ids`] in the CA's trust domain
/// (the leaf's own if the CA names none); a certificate issued by the root itself is
/// accepted as before.
#[derive(Debug)]
struct SpiffeServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    anchors: Vec<CertificateDer<'static>>,
    trust_domain: Option<String>,
    /// The exact SPIFFE ID the server must present (a spawned instance), if any.
    expected: Option<SpiffeId>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let delegated = intermediates
            .iter()
            .any(|c| !self.anchors.iter().any(|a| a.as_ref() == c.as_ref()));
        if delegated || self.expected.is_some() {
            let id = check_chain_ids(
                end_entity,
                intermediates,
                &self.anchors,
                self.trust_domain.as_deref(),
            )
            .map_err(rejected)?;
            if let Some(want) = &self.expected
                && id != *want
            {
                return Err(rejected(TlsError::UnexpectedId {
                    id: id.to_string(),
                    expected: want.to_string(),
                }));
            }
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

fn server_verifier(
    ca: Vec<CertificateDer<'static>>,
    expected: Option<SpiffeId>,
) -> Result<SpiffeServerVerifier, TlsError> {
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(&ca)?), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    Ok(SpiffeServerVerifier {
        inner,
        trust_domain: ca.iter().find_map(ca_trust_domain),
        anchors: ca,
        expected,
    })
}

/// Client configuration from parts; `identity = None` presents no certificate (tests).
pub fn client_config_from(
    ca: Vec<CertificateDer<'static>>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, TlsError> {
    client_config_expecting(ca, identity, None)
}

/// Client configuration that also requires the server to present exactly `expected`
/// (a spawned instance's SPIFFE ID), checked by the chain rule of [`check_chain_ids`].
pub fn client_config_expecting(
    ca: Vec<CertificateDer<'static>>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    expected: Option<SpiffeId>,
) -> Result<ClientConfig, TlsError> {
    let verifier = server_verifier(ca, expected)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;
    use crate::pki::{Ca, IssueSpec};

    const TD: &str = "td.test";

    fn id(path: &str) -> SpiffeId {
        SpiffeId::new(TD, path).unwrap()
    }

    fn ders(pem: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    }

    fn anchors(ca: &Ca) -> Vec<CertificateDer<'static>> {
        ders(ca.cert_pem())
    }

    /// What auraed's client verifier says to the chain in `pem` (leaf first).
    fn client_verdict(ca: &Ca, pem: &str) -> Result<(), rustls::Error> {
        let v = client_verifier(anchors(ca), TD).unwrap();
        let chain = ders(pem);
        v.verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map(|_| ())
    }

    fn client(ca: &Ca, path: &str) -> String {
        ca.issue(&IssueSpec::client(id(path), 1)).unwrap().0
    }

    #[test]
    fn paths_are_below_by_whole_segments() {
        assert!(path_is_below("/instance/a/x", "/instance/a"));
        assert!(path_is_below("/instance/a/x/y", "/instance/a"));
        assert!(!path_is_below("/instance/a", "/instance/a"));
        assert!(!path_is_below("/instance/ab", "/instance/a"));
        assert!(!path_is_below("/instance/ab/x", "/instance/a"));
        assert!(!path_is_below("/operator/admin", "/instance/a"));
        assert!(!path_is_below("/instance", "/instance/a"));
    }

    #[test]
    fn root_issued_clients_pass_as_before() {
        let ca = Ca::generate(TD).unwrap();
        client_verdict(&ca, &client(&ca, "/operator/admin")).unwrap();
        // A client that also sends the root along is judged as without it.
        let with_root = format!("{}{}", client(&ca, "/operator/admin"), ca.cert_pem());
        client_verdict(&ca, &with_root).unwrap();
    }

    #[test]
    fn an_intermediate_without_spiffe_id_vouches_for_no_one() {
        // The attack: webpki ignores the root's pathLen 0, so without our rule any
        // intermediate the CA ever signed could mint operator/admin.
        let ca = Ca::generate(TD).unwrap();
        let rogue = ca.issue_intermediate(None, 1).unwrap();
        let leaf = client(&rogue, "/operator/admin");
        assert_eq!(ders(&leaf).len(), 2, "the leaf comes with its intermediate");
        // webpki alone accepts the chain …
        let webpki = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(&anchors(&ca)).unwrap()),
            provider(),
        )
        .build()
        .unwrap();
        let chain = ders(&leaf);
        assert!(
            webpki
                .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
                .is_ok(),
            "webpki alone accepts the rogue chain (the hole this rule closes)"
        );
        // … ours does not.
        let err = client_verdict(&ca, &leaf).unwrap_err();
        assert!(
            format!("{err:?}").contains("IntermediateWithoutSpiffeId"),
            "{err:?}"
        );
    }

    #[test]
    fn an_intermediate_vouches_only_below_its_own_id() {
        let ca = Ca::generate(TD).unwrap();
        let a = ca.issue_intermediate(Some(&id("/instance/a")), 1).unwrap();
        client_verdict(&ca, &client(&a, "/instance/a/x")).unwrap();
        client_verdict(&ca, &client(&a, "/instance/a/x/y")).unwrap();
        for path in [
            "/operator/admin",
            "/instance/ab",
            "/instance/a",
            "/instance",
        ] {
            let err = client_verdict(&ca, &client(&a, path)).unwrap_err();
            assert!(
                format!("{err:?}").contains("NotBelowIntermediate"),
                "{path}: {err:?}"
            );
        }
        // Nested: a's intermediate a/b signs below a/b only; so does every level.
        let ab = a.issue_intermediate(Some(&id("/instance/a/b")), 1).unwrap();
        let chain = client(&ab, "/instance/a/b/c");
        assert_eq!(ders(&chain).len(), 3);
        client_verdict(&ca, &chain).unwrap();
        assert!(client_verdict(&ca, &client(&ab, "/instance/a/x")).is_err());
        // An intermediate named outside a, under a: the leaf must lie below both.
        let c = a.issue_intermediate(Some(&id("/instance/c")), 1).unwrap();
        assert!(client_verdict(&ca, &client(&c, "/instance/c/x")).is_err());
    }

    #[test]
    fn an_intermediate_of_another_trust_domain_is_refused() {
        let ca = Ca::generate(TD).unwrap();
        let foreign = ca
            .issue_intermediate(Some(&SpiffeId::new("evil.test", "/instance/a").unwrap()), 1)
            .unwrap();
        let leaf = client(&foreign, "/instance/a/x");
        let err = client_verdict(&ca, &leaf).unwrap_err();
        assert!(format!("{err:?}").contains("evil.test"), "{err:?}");
        // A leaf of another trust domain under a good intermediate: refused as ever.
        let a = ca.issue_intermediate(Some(&id("/instance/a")), 1).unwrap();
        let (pem, _) = a
            .issue(&IssueSpec::client(
                SpiffeId::new("evil.test", "/instance/a/x").unwrap(),
                1,
            ))
            .unwrap();
        let err = client_verdict(&ca, &pem).unwrap_err();
        assert!(format!("{err:?}").contains("ForeignTrustDomain"), "{err:?}");
    }

    #[test]
    fn a_root_names_its_trust_domain() {
        let ca = Ca::generate(TD).unwrap();
        assert_eq!(ca_trust_domain(&anchors(&ca)[0]).as_deref(), Some(TD));
        let leaf = ders(&client(&ca, "/operator/admin"));
        assert_eq!(ca_trust_domain(&leaf[0]).as_deref(), Some(TD));
    }

    #[test]
    fn clients_check_auraed_chains_by_the_same_rule() {
        let ca = Ca::generate(TD).unwrap();
        let v = server_verifier(anchors(&ca), None).unwrap();
        assert_eq!(v.trust_domain.as_deref(), Some(TD));
        let name = ServerName::try_from("localhost").unwrap();
        let verdict = |issuer: &Ca, path: &str| {
            let (pem, _) = issuer
                .issue(&IssueSpec::server(
                    id(path),
                    vec!["localhost".into()],
                    Vec::new(),
                    1,
                ))
                .unwrap();
            let chain = ders(&pem);
            v.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
                .map(|_| ())
        };
        verdict(&ca, "/auraed").unwrap();
        let rogue = ca.issue_intermediate(None, 1).unwrap();
        assert!(verdict(&rogue, "/auraed").is_err());
        let a = ca.issue_intermediate(Some(&id("/instance/a")), 1).unwrap();
        verdict(&a, "/instance/a/auraed").unwrap();
        assert!(verdict(&a, "/auraed").is_err());
    }

    #[test]
    fn a_client_expecting_an_id_refuses_any_other() {
        let ca = Ca::generate(TD).unwrap();
        let node = ca
            .issue_intermediate(Some(&id("/instance/node")), 1)
            .unwrap();
        let name = ServerName::try_from("10.200.0.2").unwrap();
        let verdict = |issuer: &Ca, path: &str, want: &str| {
            let v = server_verifier(anchors(&ca), Some(id(want))).unwrap();
            let (pem, _) = issuer
                .issue(&IssueSpec::instance(
                    id(path),
                    vec!["10.200.0.2".parse().unwrap()],
                    std::time::Duration::from_secs(60),
                ))
                .unwrap();
            let chain = ders(&pem);
            v.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
                .map(|_| ())
        };
        verdict(&node, "/instance/node/a", "/instance/node/a").unwrap();
        // A sibling's certificate (a compromised child presenting another's SVID).
        let e = verdict(&node, "/instance/node/b", "/instance/node/a").unwrap_err();
        assert!(format!("{e:?}").contains("UnexpectedId"), "{e:?}");
        // Even the root-issued daemon identity is not the instance.
        let e = verdict(&ca, "/auraed", "/instance/node/a").unwrap_err();
        assert!(format!("{e:?}").contains("UnexpectedId"), "{e:?}");
    }

    #[test]
    fn a_signed_request_gets_our_names_not_its_own() {
        let ca = Ca::generate(TD).unwrap();
        let node = ca
            .issue_intermediate(Some(&id("/instance/node")), 1)
            .unwrap();
        let (key, csr) = crate::pki::key_and_request().unwrap();
        let leaf = node
            .sign_request(
                &csr,
                &IssueSpec::instance(
                    id("/instance/node/a"),
                    Vec::new(),
                    std::time::Duration::from_secs(60),
                ),
            )
            .unwrap();
        let chain = ders(&leaf);
        assert_eq!(peer_spiffe_id(&chain[0]).unwrap(), id("/instance/node/a"));
        client_verdict(&ca, &leaf).unwrap();
        // The key in the request is the one certified: a server config takes the pair.
        let cert = ServerCert(std::sync::RwLock::new(Arc::new(
            certified(
                chain,
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        )));
        // A replacement must keep the SPIFFE ID.
        let (k2, c2) = crate::pki::key_and_request().unwrap();
        let other = node
            .sign_request(
                &c2,
                &IssueSpec::instance(
                    id("/instance/node/b"),
                    Vec::new(),
                    std::time::Duration::from_secs(60),
                ),
            )
            .unwrap();
        assert!(cert.replace(&other, &k2).is_err());
        let same = node
            .sign_request(
                &c2,
                &IssueSpec::instance(
                    id("/instance/node/a"),
                    Vec::new(),
                    std::time::Duration::from_secs(60),
                ),
            )
            .unwrap();
        cert.replace(&same, &k2).unwrap();
        // A tampered request is refused.
        let mut lines: Vec<String> = csr.lines().map(str::to_owned).collect();
        let mid = lines.len() / 2;
        let flipped: String = lines[mid]
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i == 10 {
                    if c == 'A' { 'B' } else { 'A' }
                } else {
                    c
                }
            })
            .collect();
        lines[mid] = flipped;
        let bad = lines.join("\n");
        assert!(
            node.sign_request(&bad, &IssueSpec::client(id("/instance/node/a"), 1))
                .is_err()
        );
        // A child's signer signs below itself only, wherever the request says.
        let (_k, creq) = crate::pki::key_and_request().unwrap();
        let child_chain = node
            .sign_intermediate_request(
                &creq,
                &id("/instance/node/a"),
                std::time::Duration::from_secs(3600),
            )
            .unwrap();
        assert_eq!(
            ders(&child_chain).len(),
            2,
            "the child's signer, then the node's"
        );
    }
}
