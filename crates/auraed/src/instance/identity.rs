//! Who this auraed is towards the instances it spawns, and how it mints theirs.
//!
//! A daemon an operator started holds its identity in the PKI directory: `auraed.pem`
//! (server and client: it is how a parent presents itself to its children) and, to spawn,
//! `signer.pem`/`signer.key`, an intermediate CA whose SPIFFE ID `/instance/<node>` bounds
//! what it can mint (verifiers accept a signer's certificates only strictly below its own
//! ID). A spawned instance holds the same three things in memory, handed down by its parent
//! and renewed from it: its SVID `/instance/<node>/<name>` and a signer with that same ID.

use std::{
    net::IpAddr,
    path::Path,
    sync::{Arc, RwLock},
    time::Duration,
};

use aurae_identity::{Ca, IssueSpec, SpiffeId, tls::ServerCert};

use crate::{spec::FieldError, workload::WorkloadError};
use rustls::pki_types::pem::PemObject;

/// The PEM material of one identity.
#[derive(Clone)]
pub struct Creds {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Creds").finish_non_exhaustive()
    }
}

/// What a freshly minted instance gets: its SVID (+ key) and its own signer (+ key).
pub struct Minted {
    pub cert_pem: String,
    pub key_pem: String,
    pub signer_chain_pem: String,
    pub signer_key_pem: String,
    pub expires_at: std::time::SystemTime,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minted")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// This daemon's identity as a parent (and, in a spawned instance, as a child).
#[derive(Debug)]
pub struct SelfIdentity {
    /// Our server identity: what our children grant full control.
    pub id: SpiffeId,
    creds: RwLock<Creds>,
    /// Our signer, if we may spawn (`None`: the reason).
    signer: RwLock<Result<Arc<Ca>, String>>,
    /// The signer's SPIFFE ID (what our children's IDs lie directly below).
    pub signer_id: Option<SpiffeId>,
    /// The TLS server's certificate, replaced when a spawned instance renews.
    server_cert: Option<Arc<ServerCert>>,
}

impl SelfIdentity {
    /// Loads ours from a PKI directory: `ca.pem`, `auraed.pem`/`.key`, and the signer if
    /// there is one.
    pub fn load(pki_dir: &Path, id: SpiffeId, server_cert: Option<Arc<ServerCert>>) -> Self {
        let paths = aurae_identity::PkiPaths::new(pki_dir);
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let creds = Creds {
            ca_pem: read(&paths.ca_cert),
            cert_pem: read(&paths.server_cert),
            key_pem: read(&paths.server_key),
        };
        let signer = if paths.signer_cert.exists() {
            Ca::load_signer(&paths.signer_cert, &paths.signer_key)
                .map(Arc::new)
                .map_err(|e| format!("the signing certificate does not load: {e}"))
        } else {
            Err(format!(
                "no signing certificate ({} is missing): issue one with `aer pki signer --dir {} --node NAME`",
                paths.signer_cert.display(),
                pki_dir.display()
            ))
        };
        let signer_id = signer.as_ref().ok().and_then(|s| signer_id_of(s));
        let signer = match (signer, &signer_id) {
            (Ok(s), Some(sid)) if sid.trust_domain() == id.trust_domain() => Ok(s),
            (Ok(_), _) => Err(format!(
                "the signing certificate {} names no SPIFFE ID of trust domain {}",
                paths.signer_cert.display(),
                id.trust_domain()
            )),
            (Err(e), _) => Err(e),
        };
        Self {
            signer_id: signer.as_ref().ok().and(signer_id),
            id,
            creds: RwLock::new(creds),
            signer: RwLock::new(signer),
            server_cert,
        }
    }

    pub fn creds(&self) -> Creds {
        self.creds
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn signer(&self) -> Result<Arc<Ca>, String> {
        self.signer
            .read()
            .map_err(|_| "signer lock poisoned".to_owned())?
            .clone()
    }

    /// A client TLS configuration presenting our identity and requiring the server to be
    /// exactly `expected`.
    pub fn client_tls(&self, expected: &SpiffeId) -> Result<rustls::ClientConfig, String> {
        let c = self.creds();
        let ca = aurae_identity::tls::certs_from_pem(&c.ca_pem).map_err(|e| e.to_string())?;
        let chain = aurae_identity::tls::certs_from_pem(&c.cert_pem).map_err(|e| e.to_string())?;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())
            .map_err(|e| format!("our key: {e}"))?;
        aurae_identity::tls::client_config_expecting(ca, Some((chain, key)), Some(expected.clone()))
            .map_err(|e| e.to_string())
    }

    /// The SPIFFE ID of our child `name`: directly below our signer.
    pub fn child_id(&self, name: &str) -> Result<SpiffeId, String> {
        let signer = self.signer_id.as_ref().ok_or_else(|| {
            self.signer()
                .err()
                .unwrap_or_else(|| "no signing certificate".into())
        })?;
        SpiffeId::new(signer.trust_domain(), &format!("{}/{name}", signer.path()))
            .map_err(|e| e.to_string())
    }

    /// Mints a child's SVID (server and client, for `ips`) and its own signer, both
    /// valid for `ttl` and named `id`.
    pub fn mint(&self, id: &SpiffeId, ips: Vec<IpAddr>, ttl: Duration) -> Result<Minted, String> {
        let signer = self.signer()?;
        let (cert_pem, key_pem) = signer
            .issue(&IssueSpec::instance(id.clone(), ips, ttl))
            .map_err(|e| format!("minting the SVID: {e}"))?;
        let (signer_chain_pem, signer_key_pem) = signer
            .issue_intermediate_for(Some(id), ttl)
            .map_err(|e| format!("minting the signer: {e}"))?
            .into_pem();
        Ok(Minted {
            cert_pem,
            key_pem,
            signer_chain_pem,
            signer_key_pem,
            expires_at: std::time::SystemTime::now() + ttl,
        })
    }

    /// Signs a child's renewal: its new SVID and signer for exactly `id`, whatever the
    /// requests ask for. A request that does not verify is an error naming its field.
    pub fn renew(
        &self,
        id: &SpiffeId,
        ips: Vec<IpAddr>,
        ttl: Duration,
        csr_pem: &str,
        signer_csr_pem: &str,
    ) -> Result<(String, String), WorkloadError> {
        let signer = self.signer().map_err(WorkloadError::Precondition)?;
        let invalid = |field: &str, e: aurae_identity::PkiError| {
            WorkloadError::Invalid(FieldError::new(field, e.to_string()))
        };
        let cert = signer
            .sign_request(csr_pem, &IssueSpec::instance(id.clone(), ips, ttl))
            .map_err(|e| invalid("csr_pem", e))?;
        let sig = signer
            .sign_intermediate_request(signer_csr_pem, id, ttl)
            .map_err(|e| invalid("signer_csr_pem", e))?;
        Ok((cert, sig))
    }

    /// Takes a renewed identity (a spawned instance, after its parent signed it): new
    /// handshakes present the new SVID, new children are signed by the new signer.
    pub fn replace(
        &self,
        cert_pem: String,
        key_pem: String,
        signer_chain_pem: &str,
        signer_key_pem: &str,
    ) -> Result<(), String> {
        let signer = Ca::from_pem(
            signer_chain_pem,
            signer_key_pem,
            Path::new("renewed signer"),
        )
        .map_err(|e| e.to_string())?;
        if signer_id_of(&signer) != self.signer_id {
            return Err("the renewed signer names another SPIFFE ID".into());
        }
        if let Some(sc) = &self.server_cert {
            sc.replace(&cert_pem, &key_pem).map_err(|e| e.to_string())?;
        }
        if let Ok(mut c) = self.creds.write() {
            c.cert_pem = cert_pem;
            c.key_pem = key_pem;
        }
        if let Ok(mut s) = self.signer.write() {
            *s = Ok(Arc::new(signer));
        }
        Ok(())
    }
}

/// The SPIFFE ID a signer's own certificate carries.
fn signer_id_of(ca: &Ca) -> Option<SpiffeId> {
    let der = aurae_identity::tls::certs_from_pem(ca.cert_pem()).ok()?;
    aurae_identity::peer_spiffe_id(der.first()?).ok()
}
