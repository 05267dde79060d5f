//! What a parent hands the instance it spawns, once, before the child serves anything:
//! its identity (SVID, signer, both keys), the trust root, the policy the parent wrote for
//! it, its network and where its parent answers renewals.
//!
//! For a cell-isolated instance this rides in a sealed memfd passed as the child's fd 3
//! (never a file on a disk); the child reads it first thing, closes it, and keeps the keys
//! in a tmpfs of its own mount namespace. Why this channel and not a first-boot RPC: the
//! child has no identity yet to make an authenticated call with, and a memfd only the
//! child inherits is as private as the parent's own memory, with nothing to intercept.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// The argument that starts auraed as a cell-isolated instance.
pub const INSTANCE_ARG: &str = "__aurae-instance";

/// The port every spawned instance serves on (its own address, mTLS).
pub const INSTANCE_PORT: u16 = 8443;

#[derive(Clone, Serialize, Deserialize)]
pub struct Handover {
    pub name: String,
    /// The SPIFFE ID minted for it.
    pub spiffe_id: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub signer_chain_pem: String,
    pub signer_key_pem: String,
    /// The policy the parent wrote (TOML).
    pub policy_toml: String,
    /// Its interface (veth peer), address and gateway on the parent's bridge.
    pub interface: String,
    pub addr: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub addr6: Ipv6Addr,
    pub gateway6: Ipv6Addr,
    /// The gateway of the bridge it makes for its own instances (another /24).
    pub bridge_gateway: Ipv4Addr,
    /// Where its parent answers `Instances/Renew`, and the parent's SPIFFE ID.
    pub parent_endpoint: String,
    pub parent_id: String,
    pub depth: u32,
    pub max_depth: u32,
    pub svid_ttl_s: u64,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("name", &self.name)
            .field("spiffe_id", &self.spiffe_id)
            .field("addr", &self.addr)
            .field("depth", &self.depth)
            .finish_non_exhaustive()
    }
}

/// What a spawned instance knows about its place (for `Daemon/Info` and renewals).
#[derive(Debug, Clone)]
pub struct Lineage {
    pub parent_id: String,
    pub parent_endpoint: String,
    pub policy_toml: String,
    pub depth: u32,
    pub max_depth: u32,
    pub svid_ttl: std::time::Duration,
    pub addr: Ipv4Addr,
    pub addr6: Ipv6Addr,
}

/// The depth a daemon an operator started allows below it unless told otherwise.
pub const DEFAULT_MAX_DEPTH: u32 = 2;

/// Where a microVM instance's PID 1 finds its place (no secrets: those are the PKI files
/// beside it).
pub const PLACE_FILE: &str = "/etc/aurae/instance.json";

/// What a microVM instance's PID 1 prints when its command line says `aurae.probe`.
pub const PROBE_MARKER: &str = "AURAE_KVM_PROBE_OK";

/// A spawned instance's place, without its secrets: what its PID 1 reads from
/// [`PLACE_FILE`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Place {
    pub parent_id: String,
    pub parent_endpoint: String,
    pub depth: u32,
    pub max_depth: u32,
    pub svid_ttl_s: u64,
    pub addr: Ipv4Addr,
    pub addr6: Ipv6Addr,
    pub bridge_gateway: Ipv4Addr,
}

impl Place {
    pub fn of(h: &Handover) -> Self {
        Self {
            parent_id: h.parent_id.clone(),
            parent_endpoint: h.parent_endpoint.clone(),
            depth: h.depth,
            max_depth: h.max_depth,
            svid_ttl_s: h.svid_ttl_s,
            addr: h.addr,
            addr6: h.addr6,
            bridge_gateway: h.bridge_gateway,
        }
    }

    /// Its lineage, with the policy it serves.
    pub fn lineage(&self, policy_toml: String) -> Lineage {
        Lineage {
            parent_id: self.parent_id.clone(),
            parent_endpoint: self.parent_endpoint.clone(),
            policy_toml,
            depth: self.depth,
            max_depth: self.max_depth,
            svid_ttl: std::time::Duration::from_secs(self.svid_ttl_s),
            addr: self.addr,
            addr6: self.addr6,
        }
    }
}
