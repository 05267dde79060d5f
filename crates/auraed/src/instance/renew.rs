//! The child side of SVID rotation: a spawned instance renews its SVID and signer through
//! its parent's `Instances/Renew` at two thirds of their lifetime, authenticated by the
//! current SVID, with requests for key pairs it makes itself (its new private keys never
//! leave it). A failed renewal is retried every 30 s and logged; new handshakes present
//! the new certificate as soon as it arrives.

use std::{sync::Arc, time::Duration};

use aurae_identity::SpiffeId;
use aurae_proto::runtime::v0 as pb;
use tracing::{info, warn};

use super::{handover::Lineage, identity::SelfIdentity};

/// Renews one time: new keys, the parent's signature, the new identity in place. Returns
/// when the new SVID expires.
pub async fn renew_once(
    identity: &SelfIdentity,
    lineage: &Lineage,
) -> Result<std::time::SystemTime, String> {
    let parent: SpiffeId = lineage
        .parent_id
        .parse()
        .map_err(|e| format!("parent id: {e}"))?;
    let (key, csr) = aurae_identity::pki::key_and_request().map_err(|e| e.to_string())?;
    let (signer_key, signer_csr) =
        aurae_identity::pki::key_and_request().map_err(|e| e.to_string())?;
    let tls = identity.client_tls(&parent)?;
    // The parent's certificate names it "localhost" (and its SPIFFE ID, which is what is
    // required); it is reached at its bridge address.
    let c = aurae_client::Client::connect_with(
        &aurae_client::Endpoint::Tcp(lineage.parent_endpoint.clone()),
        "localhost",
        tls,
    )
    .await
    .map_err(|e| format!("reaching the parent at {}: {e}", lineage.parent_endpoint))?;
    let r = c
        .instances()
        .renew(pb::RenewRequest {
            csr_pem: csr,
            signer_csr_pem: signer_csr,
        })
        .await
        .map_err(|e| format!("the parent refused: {}", e.message()))?
        .into_inner();
    identity.replace(r.cert_chain_pem, key, &r.signer_chain_pem, &signer_key)?;
    let expires = r
        .expires_at
        .and_then(|t| std::time::SystemTime::try_from(t).ok())
        .unwrap_or_else(|| std::time::SystemTime::now() + lineage.svid_ttl);
    Ok(expires)
}

/// Renews forever at two thirds of each lifetime.
pub async fn renew_loop(identity: Arc<SelfIdentity>, lineage: Lineage) {
    let mut next = lineage.svid_ttl * 2 / 3;
    loop {
        tokio::time::sleep(next).await;
        match renew_once(&identity, &lineage).await {
            Ok(expires) => {
                let left = expires
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                info!(valid_s = left.as_secs(), "renewed this instance's SVID");
                next = left * 2 / 3;
            }
            Err(e) => {
                warn!("renewing this instance's SVID: {e}; retrying in 30 s");
                next = Duration::from_secs(30);
            }
        }
    }
}
