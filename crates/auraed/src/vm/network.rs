//! The VMs' network: one bridge auraed creates on first use (`aurae0`, 10.200.0.1/24 by
//! default), a persistent TAP device per interface attached to it, and guest addresses
//! handed out from the bridge's /24 and reused only after the VM holding one is freed.

use std::{collections::BTreeSet, net::Ipv4Addr};

/// The bridge and its subnet.
#[derive(Debug)]
pub struct Network {
    pub bridge: String,
    /// The bridge's own address (the guests' gateway), .1 of a /24.
    pub gateway: Ipv4Addr,
    up: bool,
    used: BTreeSet<u8>,
    next_tap: u64,
}

/// One guest interface: its TAP device and address.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lease {
    pub tap: String,
    pub addr: Ipv4Addr,
    pub mac: [u8; 6],
}

impl Network {
    pub fn new(bridge: &str, gateway: Ipv4Addr) -> Self {
        Self {
            bridge: bridge.to_owned(),
            gateway,
            up: false,
            used: BTreeSet::new(),
            next_tap: 0,
        }
    }

    /// The lowest free host number (2..=254) of the /24.
    fn allocate(&mut self) -> Option<Ipv4Addr> {
        let n = (2..=254u8).find(|n| !self.used.contains(n))?;
        self.used.insert(n);
        let o = self.gateway.octets();
        Some(Ipv4Addr::new(o[0], o[1], o[2], n))
    }

    /// The bridge, created (with its IPv4 and IPv6 gateway addresses) on first use.
    pub fn ensure_bridge(&mut self) -> Result<(), String> {
        if !self.up {
            aurae_sys::net::create_bridge(&self.bridge)
                .and_then(|_| aurae_sys::net::set_ipv4(&self.bridge, self.gateway, 24))
                .and_then(|()| aurae_sys::net::set_link_up(&self.bridge))
                .map_err(|e| format!("bridge {}: {e}", self.bridge))?;
            if let Err(e) = aurae_sys::net::add_ipv6(&self.bridge, self.gateway6(), 64)
                && e.kind() != std::io::ErrorKind::AlreadyExists
            {
                tracing::warn!(bridge = %self.bridge, "no IPv6 on the bridge: {e}");
            }
            // A guest or child comes up moments after its link: the first ARP/ND for it
            // may go unanswered, and the kernel asks again only after retrans_time (1 s).
            // On our own bridge, ask again after 100 ms.
            for v in ["ipv4", "ipv6"] {
                let f = format!("/proc/sys/net/{v}/neigh/{}/retrans_time_ms", self.bridge);
                if let Err(e) = std::fs::write(&f, "100") {
                    tracing::warn!(bridge = %self.bridge, "{f}: {e}");
                }
            }
            self.up = true;
        }
        Ok(())
    }

    /// The bridge's IPv6 gateway: a unique local address derived from the IPv4 subnet
    /// (`10.200.0.1` → `fd61:7572:ac8:0::1`), so nested bridges never share a /64.
    pub fn gateway6(&self) -> std::net::Ipv6Addr {
        self.ipv6_of(self.gateway)
    }

    /// The IPv6 address that goes with an IPv4 address of the bridge's /24.
    pub fn ipv6_of(&self, v4: Ipv4Addr) -> std::net::Ipv6Addr {
        let o = v4.octets();
        std::net::Ipv6Addr::new(
            0xfd61,
            0x7572,
            u16::from_be_bytes([o[0], o[1]]),
            u16::from(o[2]),
            0,
            0,
            0,
            u16::from(o[3]),
        )
    }

    /// An address of the bridge's /24 for something that brings its own link (a spawned
    /// instance's veth); give it back with [`Network::release_addr`].
    pub fn lease_addr(&mut self) -> Result<Ipv4Addr, String> {
        self.ensure_bridge()?;
        self.allocate()
            .ok_or_else(|| format!("no free address left on {}", self.bridge))
    }

    /// Takes back an address a previous auraed leased (its instance was re-adopted).
    pub fn adopt_addr(&mut self, addr: Ipv4Addr) {
        self.used.insert(addr.octets()[3]);
        self.up = true;
    }

    /// A TAP device on the bridge with an address for the guest; `mac` or one derived
    /// from the address (locally administered).
    pub fn lease(&mut self, mac: Option<[u8; 6]>) -> Result<Lease, String> {
        self.ensure_bridge()?;
        let addr = self
            .allocate()
            .ok_or_else(|| format!("no free address left on {}", self.bridge))?;
        self.next_tap += 1;
        let tap = format!("aurae-t{}", self.next_tap);
        let made = aurae_sys::net::create_tap(&tap, 0)
            .and_then(|()| aurae_sys::net::add_to_bridge(&self.bridge, &tap))
            .and_then(|()| aurae_sys::net::set_link_up(&tap));
        if let Err(e) = made {
            let _ = aurae_sys::net::delete_tap(&tap);
            self.release_addr(addr);
            return Err(format!("TAP {tap}: {e}"));
        }
        let o = addr.octets();
        Ok(Lease {
            tap,
            addr,
            mac: mac.unwrap_or([0x52, 0x54, 0x00, o[1], o[2], o[3]]),
        })
    }

    /// Returns an address to the pool.
    pub fn release_addr(&mut self, addr: Ipv4Addr) {
        self.used.remove(&addr.octets()[3]);
    }

    /// Takes back a lease a previous auraed handed out (its VM was re-adopted): the
    /// address is used, the TAP name is not handed out again, the bridge is there.
    pub fn adopt(&mut self, lease: &Lease) {
        self.used.insert(lease.addr.octets()[3]);
        if let Some(n) = lease
            .tap
            .strip_prefix("aurae-t")
            .and_then(|n| n.parse::<u64>().ok())
        {
            self.next_tap = self.next_tap.max(n);
        }
        self.up = true;
    }

    /// Deletes the TAP device and returns the address to the pool.
    pub fn release(&mut self, lease: &Lease) {
        if let Err(e) = aurae_sys::net::delete_tap(&lease.tap) {
            tracing::warn!(tap = %lease.tap, "deleting TAP: {e}");
        }
        self.release_addr(lease.addr);
    }

    /// The kernel command line that configures the guest's eth0.
    pub fn cmdline(&self, lease: &Lease) -> String {
        format!(
            "ip={}::{}:255.255.255.0::eth0:off",
            lease.addr, self.gateway
        )
    }

    /// Removes the bridge if auraed made it and nothing uses it.
    pub fn shutdown(&mut self) {
        if self.up && self.used.is_empty() {
            let _ = aurae_sys::net::delete_bridge(&self.bridge);
            self.up = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_lowest_free_and_reused_after_release() {
        let mut n = Network::new("aurae0", Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(n.allocate(), Some(Ipv4Addr::new(10, 200, 0, 2)));
        assert_eq!(n.allocate(), Some(Ipv4Addr::new(10, 200, 0, 3)));
        n.release_addr(Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(n.allocate(), Some(Ipv4Addr::new(10, 200, 0, 2)));
        for _ in 4..=254 {
            assert!(n.allocate().is_some());
        }
        assert_eq!(n.allocate(), None, "the /24 is exhausted");
    }
}
