//! auraed's own identity, checked once at start: `auraed.pem` chains to `ca.pem` (and is
//! usable as a TLS server certificate), names exactly one SPIFFE ID in the CA's trust
//! domain, and `auraed.key` is its key. Each failure is one line naming the file and the
//! reason, so a misplaced file stops auraed at start instead of failing every handshake
//! later.
//!
//! Validity in time is not a reason to refuse: a machine whose clock is not set yet (a
//! guest at boot) would never start. An expired or not-yet-valid certificate is a warning
//! (logged, and in `Daemon/Info`), and the chain is checked at a time it is valid.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use aurae_identity::{PkiPaths, SpiffeId, tls};
use rustls::{
    CertificateError, Error as RustlsError, InconsistentKeys, RootCertStore,
    client::{WebPkiServerVerifier, danger::ServerCertVerifier},
    crypto::ring,
    pki_types::{CertificateDer, ServerName, UnixTime},
    sign::CertifiedKey,
};

#[derive(Debug, thiserror::Error)]
pub enum OwnIdentityError {
    /// A file that does not read or parse (the message names it).
    #[error(transparent)]
    Load(#[from] tls::TlsError),
    #[error("{file}: {reason}")]
    Refused { file: PathBuf, reason: String },
}

fn refused(file: &Path, reason: impl Into<String>) -> OwnIdentityError {
    OwnIdentityError::Refused {
        file: file.to_owned(),
        reason: reason.into(),
    }
}

/// What the check found: auraed's SPIFFE ID and what to warn about, with what it loaded
/// (the CA's certificates, auraed's chain and signing key) for the TLS configuration.
#[derive(Debug)]
pub struct Checked {
    pub id: SpiffeId,
    pub warnings: Vec<String>,
    pub ca: Vec<CertificateDer<'static>>,
    pub own: CertifiedKey,
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (UTC, proleptic Gregorian).
fn utc(t: UnixTime) -> String {
    let secs = t.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Why webpki refused the chain, for an operator.
fn chain_reason(e: &RustlsError, ca: &Path) -> String {
    let ca = ca.display();
    match e {
        RustlsError::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
            "is not issued by the CA in {ca} (no certificate there issued it): it belongs to \
             another PKI"
        ),
        RustlsError::InvalidCertificate(CertificateError::BadSignature) => format!(
            "is not issued by the CA in {ca} (its signature does not verify with that CA's \
             key): it belongs to another PKI"
        ),
        RustlsError::InvalidCertificate(
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. },
        ) => "is not valid for TLS server authentication (its extended key usage lacks serverAuth)"
            .to_owned(),
        other => format!("does not chain to the CA in {ca}: {other}"),
    }
}

/// Checks auraed's identity in `pki` (ca.pem, auraed.pem, auraed.key; their presence is
/// checked before).
pub fn check(pki: &PkiPaths) -> Result<Checked, OwnIdentityError> {
    let ca = tls::load_certs(&pki.ca_cert)?;
    let chain = tls::load_certs(&pki.server_cert)?;
    let key = tls::load_key(&pki.server_key)?;
    let cert_file = &pki.server_cert;
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| refused(cert_file, "holds no certificate"))?;

    let id = tls::peer_spiffe_id(leaf).map_err(|e| {
        refused(
            cert_file,
            format!("auraed's certificate cannot be its identity: {e}"),
        )
    })?;
    let trust_domain = ca.iter().find_map(tls::ca_trust_domain);
    if let Some(td) = &trust_domain
        && id.trust_domain() != td
    {
        return Err(refused(
            cert_file,
            format!(
                "its SPIFFE ID {id} is not in the trust domain {td} of the CA in {}",
                pki.ca_cert.display()
            ),
        ));
    }

    let provider = Arc::new(ring::default_provider());
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| refused(&pki.server_key, format!("is not a usable private key: {e}")))?;
    let own = CertifiedKey::new(chain.clone(), signing);
    match own.keys_match() {
        Ok(()) | Err(RustlsError::InconsistentKeys(InconsistentKeys::Unknown)) => {}
        Err(RustlsError::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            return Err(refused(
                &pki.server_key,
                format!(
                    "is not the key of the certificate in {} (it belongs to another certificate)",
                    cert_file.display()
                ),
            ));
        }
        Err(e) => return Err(refused(&pki.server_key, e.to_string())),
    }

    let mut warnings = Vec::new();
    verify_chain(pki, &ca, leaf, intermediates, &provider, &mut warnings)?;
    tls::check_chain_ids(leaf, intermediates, &ca, trust_domain.as_deref())
        .map_err(|e| refused(cert_file, e.to_string()))?;
    Ok(Checked {
        id,
        warnings,
        ca,
        own,
    })
}

/// webpki's server-side verdict on the chain (CA, signatures, serverAuth), at now or, if
/// the leaf is out of its validity, at a time within it (with a warning).
fn verify_chain(
    pki: &PkiPaths,
    ca: &[CertificateDer<'static>],
    leaf: &CertificateDer<'static>,
    intermediates: &[CertificateDer<'static>],
    provider: &Arc<rustls::crypto::CryptoProvider>,
    warnings: &mut Vec<String>,
) -> Result<(), OwnIdentityError> {
    let cert_file = &pki.server_cert;
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots
            .add(c.clone())
            .map_err(|e| refused(&pki.ca_cert, format!("is not a usable CA certificate: {e}")))?;
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| refused(&pki.ca_cert, format!("is not a usable CA: {e}")))?;
    // Any name: a mismatch is reported only after the chain, CA and usage all passed.
    let name = ServerName::try_from("auraed-identity-check.invalid")
        .map_err(|e| refused(cert_file, e.to_string()))?;
    let mut at = UnixTime::now();
    for _ in 0..2 {
        match verifier.verify_server_cert(leaf, intermediates, &name, &[], at) {
            Ok(_)
            | Err(RustlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => return Ok(()),
            Err(RustlsError::InvalidCertificate(CertificateError::ExpiredContext {
                not_after,
                ..
            })) => {
                warnings.push(format!(
                    "auraed's certificate {} expired at {}: clients refuse it; issue a new one",
                    cert_file.display(),
                    utc(not_after)
                ));
                at = not_after;
            }
            Err(RustlsError::InvalidCertificate(CertificateError::NotValidYetContext {
                not_before,
                ..
            })) => {
                warnings.push(format!(
                    "auraed's certificate {} is not valid before {} (is this machine's clock \
                     right?): clients refuse it until then",
                    cert_file.display(),
                    utc(not_before)
                ));
                at = not_before;
            }
            Err(e) => return Err(refused(cert_file, chain_reason(&e, &pki.ca_cert))),
        }
    }
    Err(refused(
        cert_file,
        "its chain is valid at no single time (an intermediate's validity does not cover the certificate's)",
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_times() {
        let t = |s| {
            utc(UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                s,
            )))
        };
        assert_eq!(t(0), "1970-01-01T00:00:00Z");
        assert_eq!(t(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(t(1_735_689_599), "2024-12-31T23:59:59Z");
    }
}
