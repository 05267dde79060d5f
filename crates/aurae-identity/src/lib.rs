//! Identity for Aurae: SPIFFE IDs, the development PKI (its CA key kept outside the
//! directory auraed reads; intermediate CAs with their own SPIFFE ID), and the rustls
//! configurations that make mTLS mandatory, bind every connection to exactly one SPIFFE ID
//! and let an intermediate vouch only for IDs below its own.
//!
//! Used by `auraed` (server side), `aurae-client` and `aer` (client side, `aer pki init`)
//! and by tests. It depends on none of our other crates.
#![forbid(unsafe_code)]

pub mod pki;
pub mod spiffe;
pub mod tls;

pub use pki::{Ca, IssueSpec, Pki, PkiError, PkiPaths};
pub use spiffe::{SpiffeId, SpiffeIdError};
pub use tls::{TlsError, client_config, peer_spiffe_id, server_config};
