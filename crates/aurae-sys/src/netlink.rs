//! A minimal rtnetlink client: the few link and route operations that have no ioctl.
//!
//! auraed gives each cell-isolated spawned instance its own network namespace and wires it
//! to the cell's bridge with a veth pair: the host end stays in auraed's namespace (and is
//! attached to the bridge with [`crate::net::add_to_bridge`]), the peer is created directly
//! inside the instance's namespace, and the instance's default route points through the
//! parent (the bridge's address). Creating a veth pair across namespaces, deleting a link
//! and adding a route all need `NETLINK_ROUTE`; everything else stays on the ioctls of
//! [`crate::net`].
//!
//! Each call opens one close-on-exec `NETLINK_ROUTE` socket in the calling thread's network
//! namespace, sends one request with `NLM_F_ACK` and reads the kernel's `NLMSG_ERROR`
//! reply. Messages are built and replies parsed in safe code over byte buffers; the unsafe
//! surface is `socket`, `setsockopt`, `sendto`, `recvfrom` and `if_nametoindex`.
//!
//! Errors keep the kind of the kernel's errno (`AlreadyExists` for EEXIST, ...) and their
//! message names the operation, the request, the errno and, when the kernel gives one, its
//! extended-ack text, e.g. `create veth a/b (peer in pid 7): RTM_NEWLINK: File exists
//! (os error 17)`.

use std::{
    ffi::CString,
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

// <linux/netlink.h>
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
/// In an `NLMSG_ERROR` reply: only the request's header is echoed back.
const NLM_F_CAPPED: u16 = 0x100;
/// In an `NLMSG_ERROR` reply: extended-ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLA_HDRLEN: usize = 4;
const NLMSGERR_ATTR_MSG: u16 = 1;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

// <linux/rtnetlink.h>
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
/// What `ip route add` uses for a route an administrator (here: auraed) configured.
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;
const IFINFOMSG_LEN: usize = 16;
const RTMSG_LEN: usize = 12;

// <linux/if_link.h>, <linux/veth.h>
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_PID: u16 = 19;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;

/// Every request is alone on its own socket; the sequence number only guards against
/// reading a stray message as our answer.
const SEQ: u32 = 1;

/// Creates a veth pair: `host` stays in the calling thread's network namespace, its peer
/// `peer` is created directly inside the network namespace of process `peer_pid`
/// (IFLA_NET_NS_PID). Neither end is brought up. Errors name the step and errno.
pub fn create_veth(host: &str, peer: &str, peer_pid: i32) -> io::Result<()> {
    check_name(host)?;
    check_name(peer)?;
    let step = || format!("create veth {host}/{peer} (peer in pid {peer_pid})");
    let pid = u32::try_from(peer_pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{}: bad pid", step()))
        })?;
    let msg = veth_request(host, peer, pid).map_err(|e| context(&step(), "build", e))?;
    transact(&msg).map_err(|f| f.context(&step()))
}

/// Deletes a link by name in the calling thread's network namespace (RTM_DELLINK). ENODEV
/// (already gone, e.g. its peer's namespace died) is Ok(false); deleted is Ok(true).
pub fn delete_link(name: &str) -> io::Result<bool> {
    check_name(name)?;
    let step = || format!("delete link {name}");
    let msg = delete_request(name).map_err(|e| context(&step(), "build", e))?;
    match transact(&msg) {
        Ok(()) => Ok(true),
        Err(f) if f.error.raw_os_error() == Some(libc::ENODEV) => Ok(false),
        Err(f) => Err(f.context(&step())),
    }
}

/// Adds a default route via `gateway` (IPv4) in the calling thread's network namespace,
/// out of interface `dev` (RTM_NEWROUTE, main table, NLM_F_CREATE|NLM_F_EXCL).
pub fn add_default_route_v4(dev: &str, gateway: Ipv4Addr) -> io::Result<()> {
    add_default_route(dev, libc::AF_INET, &gateway.octets(), &gateway.to_string())
}

/// The same for IPv6.
pub fn add_default_route_v6(dev: &str, gateway: Ipv6Addr) -> io::Result<()> {
    add_default_route(dev, libc::AF_INET6, &gateway.octets(), &gateway.to_string())
}

/// Adds a route to `dst/prefix` via `gateway` out of `dev` (IPv4; a spawned instance's
/// own bridge subnet, reached through the instance), in the calling thread's namespace.
pub fn add_route_v4(dev: &str, dst: Ipv4Addr, prefix: u8, gateway: Ipv4Addr) -> io::Result<()> {
    route_v4(
        RTM_NEWROUTE,
        NLM_F_CREATE | NLM_F_EXCL,
        dev,
        dst,
        prefix,
        gateway,
    )
}

/// Deletes the route [`add_route_v4`] added; `Ok(false)` if there was none (ESRCH).
pub fn delete_route_v4(
    dev: &str,
    dst: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
) -> io::Result<bool> {
    match route_v4(RTM_DELROUTE, 0, dev, dst, prefix, gateway) {
        Ok(()) => Ok(true),
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.to_string().contains("No such process") =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn route_v4(
    kind: u16,
    flags: u16,
    dev: &str,
    dst: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
) -> io::Result<()> {
    check_name(dev)?;
    let step = format!("route {dst}/{prefix} via {gateway} dev {dev}");
    if prefix > 32 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{step}: prefix > 32"),
        ));
    }
    let index = if_index(dev).map_err(|e| context(&step, "look up interface", e))?;
    let family =
        u8::try_from(libc::AF_INET).map_err(|e| context(&step, "build", io::Error::other(e)))?;
    let mut m = Message::new(kind, flags);
    let mut rt = rtmsg_default(family);
    rt[1] = prefix; // rtm_dst_len
    m.push(&rt);
    m.attr(RTA_DST, &dst.octets());
    m.attr(RTA_GATEWAY, &gateway.octets());
    m.attr_u32(RTA_OIF, index);
    let msg = m.finish().map_err(|e| context(&step, "build", e))?;
    transact(&msg).map_err(|f| f.context(&step))
}

/// Whether a link of that name exists in the calling thread's network namespace.
pub fn link_exists(name: &str) -> bool {
    check_name(name).is_ok() && if_index(name).is_ok()
}

fn add_default_route(
    dev: &str,
    family: libc::c_int,
    gateway: &[u8],
    shown: &str,
) -> io::Result<()> {
    check_name(dev)?;
    let step = format!("add default route via {shown} dev {dev}");
    let index = if_index(dev).map_err(|e| context(&step, "look up interface", e))?;
    let family = u8::try_from(family).map_err(|e| context(&step, "build", io::Error::other(e)))?;
    let msg = route_request(family, gateway, index).map_err(|e| context(&step, "build", e))?;
    transact(&msg).map_err(|f| f.context(&step))
}

/// Refuses what the kernel's `dev_valid_name` refuses, and `%` (which the kernel would
/// expand into a number, creating a link under another name than asked for).
fn check_name(name: &str) -> io::Result<()> {
    let bad = |why: &str| {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}: {why}"),
        ))
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() >= libc::IFNAMSIZ {
        return bad("too long");
    }
    if name == "." || name == ".." {
        return bad("reserved");
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, '\0' | '/' | ':' | '%') || c.is_whitespace())
    {
        return bad(&format!("contains {c:?}"));
    }
    Ok(())
}

fn context(step: &str, call: &str, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{step}: {call}: {error}"))
}

fn if_index(name: &str) -> io::Result<u32> {
    let cname = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

// ---- message building (safe) ----

/// One netlink request being built: header, fixed struct, attributes, each padded to 4.
#[derive(Debug)]
struct Message {
    buf: Vec<u8>,
    /// A length did not fit its field; `finish` refuses the message.
    overflow: bool,
}

const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

impl Message {
    fn new(kind: u16, flags: u16) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set by finish
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
        buf.extend_from_slice(&SEQ.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel fills it in
        Self {
            buf,
            overflow: false,
        }
    }

    fn pad(&mut self) {
        self.buf.resize(align4(self.buf.len()), 0);
    }

    /// A fixed struct (ifinfomsg, rtmsg) already in wire order.
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.pad();
    }

    /// Writes the u16 length of the attribute that starts at `start` and ends here.
    fn close_attr(&mut self, start: usize, len: usize) {
        let len = u16::try_from(len).unwrap_or_else(|_| {
            self.overflow = true;
            0
        });
        if let Some(field) = self.buf.get_mut(start..start + 2) {
            field.copy_from_slice(&len.to_ne_bytes());
        }
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.close_attr(start, NLA_HDRLEN + payload.len());
        self.pad();
    }

    fn attr_u32(&mut self, kind: u16, value: u32) {
        self.attr(kind, &value.to_ne_bytes());
    }

    /// A string attribute, NUL-terminated as the kernel's `nla_strscpy` expects.
    fn attr_str(&mut self, kind: u16, value: &str) {
        let mut payload = Vec::with_capacity(value.len() + 1);
        payload.extend_from_slice(value.as_bytes());
        payload.push(0);
        self.attr(kind, &payload);
    }

    /// An attribute whose payload is what `fill` writes (nested attributes, possibly
    /// after a fixed struct); its length covers that payload, padding included.
    fn nested(&mut self, kind: u16, fill: impl FnOnce(&mut Self)) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        fill(self);
        self.pad();
        let len = self.buf.len() - start;
        self.close_attr(start, len);
    }

    fn finish(mut self) -> io::Result<Vec<u8>> {
        let len = u32::try_from(self.buf.len())
            .ok()
            .filter(|_| !self.overflow);
        let Some(len) = len else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "netlink attribute too long",
            ));
        };
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        Ok(self.buf)
    }
}

/// `struct ifinfomsg` for AF_UNSPEC with everything else zero (no index, no flag change).
const fn ifinfomsg_unspec() -> [u8; IFINFOMSG_LEN] {
    [0; IFINFOMSG_LEN]
}

/// `struct rtmsg` for a unicast default route in the main table.
fn rtmsg_default(family: u8) -> [u8; RTMSG_LEN] {
    let mut m = [0u8; RTMSG_LEN];
    m[0] = family; // rtm_family
    // rtm_dst_len, rtm_src_len, rtm_tos: 0 (default route)
    m[4] = RT_TABLE_MAIN; // rtm_table
    m[5] = RTPROT_BOOT; // rtm_protocol
    m[6] = RT_SCOPE_UNIVERSE; // rtm_scope
    m[7] = RTN_UNICAST; // rtm_type
    // rtm_flags (u32): 0
    m
}

fn veth_request(host: &str, peer: &str, peer_pid: u32) -> io::Result<Vec<u8>> {
    let mut m = Message::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL);
    m.push(&ifinfomsg_unspec());
    m.attr_str(IFLA_IFNAME, host);
    m.nested(IFLA_LINKINFO, |m| {
        m.attr(IFLA_INFO_KIND, b"veth");
        m.nested(IFLA_INFO_DATA, |m| {
            m.nested(VETH_INFO_PEER, |m| {
                m.push(&ifinfomsg_unspec());
                m.attr_str(IFLA_IFNAME, peer);
                m.attr_u32(IFLA_NET_NS_PID, peer_pid);
            });
        });
    });
    m.finish()
}

/// Deletes by name (IFLA_IFNAME with index 0), so no other link can take the index
/// between a look-up and the delete.
fn delete_request(name: &str) -> io::Result<Vec<u8>> {
    let mut m = Message::new(RTM_DELLINK, 0);
    m.push(&ifinfomsg_unspec());
    m.attr_str(IFLA_IFNAME, name);
    m.finish()
}

fn route_request(family: u8, gateway: &[u8], oif: u32) -> io::Result<Vec<u8>> {
    let mut m = Message::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL);
    m.push(&rtmsg_default(family));
    m.attr(RTA_GATEWAY, gateway);
    m.attr_u32(RTA_OIF, oif);
    m.finish()
}

// ---- reply parsing (safe) ----

/// The kernel's answer to our request.
#[derive(Debug, PartialEq, Eq)]
enum Ack {
    Done,
    /// A positive errno and the extended-ack message, if any.
    Refused(i32, Option<String>),
}

fn ne_u16(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn ne_u32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

/// Finds the `NLMSG_ERROR` answering sequence number `seq` in one datagram; `Ok(None)` if
/// the datagram holds none (read the next one).
fn find_ack(buf: &[u8], seq: u32) -> io::Result<Option<Ack>> {
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed netlink reply");
    let mut at = 0;
    while at + NLMSG_HDRLEN <= buf.len() {
        let len = ne_u32(buf, at).ok_or_else(malformed)? as usize;
        let kind = ne_u16(buf, at + 4).ok_or_else(malformed)?;
        let flags = ne_u16(buf, at + 6).ok_or_else(malformed)?;
        let msg_seq = ne_u32(buf, at + 8).ok_or_else(malformed)?;
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            return Err(malformed());
        }
        let msg = &buf[at..at + len];
        if kind == NLMSG_ERROR && msg_seq == seq {
            let error = ne_u32(msg, NLMSG_HDRLEN).ok_or_else(malformed)? as i32;
            if error == 0 {
                return Ok(Some(Ack::Done));
            }
            let errno = error
                .checked_neg()
                .filter(|e| *e > 0)
                .ok_or_else(malformed)?;
            return Ok(Some(Ack::Refused(errno, ext_ack_message(msg, flags))));
        }
        at += align4(len);
    }
    Ok(None)
}

/// The `NLMSGERR_ATTR_MSG` of an `NLMSG_ERROR` message, if it carries one.
fn ext_ack_message(msg: &[u8], flags: u16) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    // struct nlmsgerr: the error, then the request's header (and, uncapped, its payload).
    let echoed = NLMSG_HDRLEN + 4;
    let request_len = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        ne_u32(msg, echoed)? as usize
    };
    let mut at = echoed + align4(request_len);
    while at + NLA_HDRLEN <= msg.len() {
        let len = usize::from(ne_u16(msg, at)?);
        let kind = ne_u16(msg, at + 2)?;
        if len < NLA_HDRLEN {
            return None;
        }
        let payload = msg.get(at + NLA_HDRLEN..at + len)?;
        if kind == NLMSGERR_ATTR_MSG {
            let text = payload.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        at += align4(len);
    }
    None
}

// ---- the socket (unsafe, small) ----

/// Why a request failed: the call that failed, the error and the kernel's explanation.
#[derive(Debug)]
struct Failure {
    call: &'static str,
    error: io::Error,
    detail: Option<String>,
}

impl Failure {
    fn os(call: &'static str) -> Self {
        Self {
            call,
            error: io::Error::last_os_error(),
            detail: None,
        }
    }

    fn context(self, step: &str) -> io::Error {
        let Self {
            call,
            error,
            detail,
        } = self;
        let msg = match detail {
            Some(d) => format!("{step}: {call}: {error}: {d}"),
            None => format!("{step}: {call}: {error}"),
        };
        io::Error::new(error.kind(), msg)
    }
}

fn kernel_address() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is a plain C struct; all-zero is valid (nl_pid 0 = the kernel).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::sa_family_t::try_from(libc::AF_NETLINK).unwrap_or(16);
    addr
}

const SOCKADDR_NL_LEN: libc::socklen_t =
    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;

/// Sends one request on a fresh `NETLINK_ROUTE` socket and waits for its acknowledgement.
fn transact(request: &[u8]) -> Result<(), Failure> {
    // SAFETY: socket() takes integer arguments; the result is checked below.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(Failure::os("netlink socket"));
    }
    // SAFETY: `raw` is a new fd we own exclusively.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    for option in [NETLINK_CAP_ACK, NETLINK_EXT_ACK] {
        let on: libc::c_int = 1;
        // SAFETY: `on` is a live c_int and the length passed is its size. Failure (a kernel
        // without the option) only costs the shorter acknowledgement or its explanation.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                SOL_NETLINK,
                option,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }

    let kernel = kernel_address();
    let name = request_name(request);
    loop {
        // SAFETY: `request` and `kernel` are live for the call and the lengths passed are
        // theirs.
        let sent = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
                (&raw const kernel).cast(),
                SOCKADDR_NL_LEN,
            )
        };
        if sent >= 0 {
            if usize::try_from(sent).ok() != Some(request.len()) {
                return Err(Failure {
                    call: name,
                    error: io::Error::new(io::ErrorKind::WriteZero, "short netlink send"),
                    detail: None,
                });
            }
            break;
        }
        let failure = Failure::os(name);
        if failure.error.kind() != io::ErrorKind::Interrupted {
            return Err(failure);
        }
    }

    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let mut from = kernel_address();
        let mut from_len = SOCKADDR_NL_LEN;
        // SAFETY: `buf` is writable for its length; `from` and `from_len` are live and
        // describe a sockaddr_nl the kernel may fill.
        let got = unsafe {
            libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut from).cast(),
                &raw mut from_len,
            )
        };
        let Ok(got) = usize::try_from(got) else {
            let failure = Failure::os(name);
            if failure.error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(failure);
        };
        if from.nl_pid != 0 {
            continue; // not from the kernel
        }
        let found = find_ack(&buf[..got.min(buf.len())], SEQ).map_err(|error| Failure {
            call: name,
            error,
            detail: None,
        })?;
        match found {
            None => continue,
            Some(Ack::Done) => return Ok(()),
            Some(Ack::Refused(errno, detail)) => {
                return Err(Failure {
                    call: name,
                    error: io::Error::from_raw_os_error(errno),
                    detail,
                });
            }
        }
    }
}

fn request_name(request: &[u8]) -> &'static str {
    match ne_u16(request, 4) {
        Some(RTM_NEWLINK) => "RTM_NEWLINK",
        Some(RTM_DELLINK) => "RTM_DELLINK",
        Some(RTM_NEWROUTE) => "RTM_NEWROUTE",
        _ => "netlink request",
    }
}

#[cfg(test)]
mod tests {
    use std::{
        os::unix::process::CommandExt,
        process::{Child, Command, Stdio},
    };

    use super::*;

    /// One attribute as parsed back: type, declared length, payload.
    #[derive(Debug)]
    struct Attr<'a> {
        kind: u16,
        len: usize,
        payload: &'a [u8],
    }

    /// Walks a run of attributes, checking each starts 4-aligned and the run is exactly
    /// covered.
    fn attrs(mut buf: &[u8]) -> Vec<Attr<'_>> {
        let mut out = Vec::new();
        while !buf.is_empty() {
            let len = usize::from(ne_u16(buf, 0).unwrap());
            let kind = ne_u16(buf, 2).unwrap();
            assert!(len >= NLA_HDRLEN, "attribute length {len}");
            out.push(Attr {
                kind,
                len,
                payload: &buf[NLA_HDRLEN..len],
            });
            let next = align4(len).min(buf.len());
            assert!(buf[len..next].iter().all(|b| *b == 0), "padding is zero");
            buf = &buf[next..];
        }
        out
    }

    fn header(msg: &[u8]) -> (u32, u16, u16, u32) {
        (
            ne_u32(msg, 0).unwrap(),
            ne_u16(msg, 4).unwrap(),
            ne_u16(msg, 6).unwrap(),
            ne_u32(msg, 8).unwrap(),
        )
    }

    #[test]
    fn netlink_attributes_are_aligned_and_padded() {
        let mut m = Message::new(RTM_NEWLINK, 0);
        m.attr(7, b"abcde"); // 9 bytes, padded to 12
        m.attr_u32(8, 0xdead_beef);
        m.attr_str(9, "eth0"); // "eth0\0": 9 bytes, padded to 12
        let msg = m.finish().unwrap();
        assert_eq!(msg.len(), NLMSG_HDRLEN + 12 + 8 + 12);
        assert_eq!(msg.len() % 4, 0);
        let (len, kind, flags, seq) = header(&msg);
        assert_eq!(len as usize, msg.len());
        assert_eq!(kind, RTM_NEWLINK);
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(seq, SEQ);
        let a = attrs(&msg[NLMSG_HDRLEN..]);
        assert_eq!(a.len(), 3);
        assert_eq!((a[0].kind, a[0].len, a[0].payload), (7, 9, &b"abcde"[..]));
        assert_eq!((a[1].kind, a[1].len), (8, 8));
        assert_eq!(a[1].payload, 0xdead_beef_u32.to_ne_bytes());
        assert_eq!((a[2].kind, a[2].len, a[2].payload), (9, 9, &b"eth0\0"[..]));
    }

    #[test]
    fn netlink_nested_lengths_cover_padded_children() {
        let mut m = Message::new(RTM_NEWLINK, 0);
        m.nested(1, |m| {
            m.attr(2, b"x"); // 5 -> 8
            m.nested(3, |m| m.attr(4, b"abc")); // inner 7 -> 8, outer 4 + 8 = 12
        });
        m.attr(5, b"");
        let msg = m.finish().unwrap();
        let top = attrs(&msg[NLMSG_HDRLEN..]);
        assert_eq!(top.len(), 2);
        assert_eq!((top[0].kind, top[0].len), (1, 4 + 8 + 12));
        assert_eq!((top[1].kind, top[1].len), (5, 4));
        let inner = attrs(top[0].payload);
        assert_eq!((inner[0].kind, inner[0].len), (2, 5));
        assert_eq!((inner[1].kind, inner[1].len), (3, 12));
        let innermost = attrs(inner[1].payload);
        assert_eq!((innermost[0].kind, innermost[0].len), (4, 7));
    }

    #[test]
    fn netlink_overlong_attribute_is_refused() {
        let mut m = Message::new(RTM_NEWLINK, 0);
        m.attr(1, &vec![0u8; 70_000]);
        assert_eq!(m.finish().unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn netlink_veth_request_layout() {
        let msg = veth_request("vh0", "peer01", 4242).unwrap();
        let (len, kind, flags, _) = header(&msg);
        assert_eq!(len as usize, msg.len());
        assert_eq!(kind, RTM_NEWLINK);
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        let body = &msg[NLMSG_HDRLEN..];
        assert_eq!(&body[..IFINFOMSG_LEN], &[0; IFINFOMSG_LEN]);
        let top = attrs(&body[IFINFOMSG_LEN..]);
        assert_eq!(top.len(), 2);
        assert_eq!((top[0].kind, top[0].payload), (IFLA_IFNAME, &b"vh0\0"[..]));
        assert_eq!(top[1].kind, IFLA_LINKINFO);
        let info = attrs(top[1].payload);
        assert_eq!(info.len(), 2);
        assert_eq!(
            (info[0].kind, info[0].payload),
            (IFLA_INFO_KIND, &b"veth"[..])
        );
        assert_eq!(info[1].kind, IFLA_INFO_DATA);
        let data = attrs(info[1].payload);
        assert_eq!(data.len(), 1);
        assert_eq!(data[0].kind, VETH_INFO_PEER);
        let peer = data[0].payload;
        assert_eq!(&peer[..IFINFOMSG_LEN], &[0; IFINFOMSG_LEN]);
        let peer_attrs = attrs(&peer[IFINFOMSG_LEN..]);
        assert_eq!(peer_attrs.len(), 2);
        assert_eq!(
            (peer_attrs[0].kind, peer_attrs[0].payload),
            (IFLA_IFNAME, &b"peer01\0"[..])
        );
        assert_eq!(peer_attrs[1].kind, IFLA_NET_NS_PID);
        assert_eq!(peer_attrs[1].payload, 4242u32.to_ne_bytes());
        // Lengths add up: every nest ends exactly where its parent's payload does.
        assert_eq!(
            top[1].len,
            NLA_HDRLEN + info[0].len.next_multiple_of(4) + info[1].len
        );
        assert_eq!(info[1].len, NLA_HDRLEN + data[0].len);
        // "peer01\0" is 7 bytes: attribute length 11, padded to 12 before the pid.
        assert_eq!(peer_attrs[0].len, 11);
        assert_eq!(data[0].len, NLA_HDRLEN + IFINFOMSG_LEN + 12 + 8);
    }

    #[test]
    fn netlink_route_and_delete_request_layout() {
        let msg = route_request(libc::AF_INET as u8, &[10, 0, 0, 1], 7).unwrap();
        let (len, kind, flags, _) = header(&msg);
        assert_eq!(len as usize, msg.len());
        assert_eq!(kind, RTM_NEWROUTE);
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        let body = &msg[NLMSG_HDRLEN..];
        assert_eq!(
            &body[..RTMSG_LEN],
            &[
                libc::AF_INET as u8,
                0,
                0,
                0,
                RT_TABLE_MAIN,
                RTPROT_BOOT,
                RT_SCOPE_UNIVERSE,
                RTN_UNICAST,
                0,
                0,
                0,
                0
            ]
        );
        let a = attrs(&body[RTMSG_LEN..]);
        assert_eq!((a[0].kind, a[0].payload), (RTA_GATEWAY, &[10, 0, 0, 1][..]));
        assert_eq!(
            (a[1].kind, a[1].payload),
            (RTA_OIF, &7u32.to_ne_bytes()[..])
        );

        let v6 = route_request(libc::AF_INET6 as u8, &Ipv6Addr::LOCALHOST.octets(), 3).unwrap();
        assert_eq!(v6.len(), NLMSG_HDRLEN + RTMSG_LEN + 20 + 8);

        let del = delete_request("gone0").unwrap();
        let (len, kind, flags, _) = header(&del);
        assert_eq!(
            (len as usize, kind, flags),
            (del.len(), RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK)
        );
        let a = attrs(&del[NLMSG_HDRLEN + IFINFOMSG_LEN..]);
        assert_eq!((a[0].kind, a[0].payload), (IFLA_IFNAME, &b"gone0\0"[..]));
    }

    /// An NLMSG_ERROR as the kernel writes it with NETLINK_CAP_ACK and NETLINK_EXT_ACK.
    fn error_reply(seq: u32, error: i32, text: Option<&str>) -> Vec<u8> {
        let mut flags = NLM_F_CAPPED;
        let mut tlvs = Vec::new();
        if let Some(text) = text {
            flags |= NLM_F_ACK_TLVS;
            let mut m = Message::new(0, 0);
            m.attr_str(NLMSGERR_ATTR_MSG, text);
            tlvs = m.finish().unwrap()[NLMSG_HDRLEN..].to_vec();
        }
        let mut out = Vec::new();
        let len = NLMSG_HDRLEN + 4 + NLMSG_HDRLEN + tlvs.len();
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&error.to_ne_bytes());
        // The echoed request header.
        out.extend_from_slice(&veth_request("a", "b", 1).unwrap()[..NLMSG_HDRLEN]);
        out.extend_from_slice(&tlvs);
        out
    }

    #[test]
    fn netlink_acks_are_parsed() {
        assert_eq!(
            find_ack(&error_reply(SEQ, 0, None), SEQ).unwrap(),
            Some(Ack::Done)
        );
        assert_eq!(
            find_ack(&error_reply(SEQ, -libc::EEXIST, None), SEQ).unwrap(),
            Some(Ack::Refused(libc::EEXIST, None))
        );
        assert_eq!(
            find_ack(
                &error_reply(SEQ, -libc::EINVAL, Some("Nexthop has invalid gateway")),
                SEQ
            )
            .unwrap(),
            Some(Ack::Refused(
                libc::EINVAL,
                Some("Nexthop has invalid gateway".to_owned())
            ))
        );
        // Another sequence number is not our answer; the one after it is.
        let mut two = error_reply(SEQ + 1, -libc::EPERM, None);
        two.extend_from_slice(&error_reply(SEQ, -libc::ENODEV, None));
        assert_eq!(find_ack(&two[..two.len() / 2], SEQ).unwrap(), None);
        assert_eq!(
            find_ack(&two, SEQ).unwrap(),
            Some(Ack::Refused(libc::ENODEV, None))
        );
        // Lengths that overrun the datagram are refused, not trusted.
        let mut bad = error_reply(SEQ, 0, None);
        bad[..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(
            find_ack(&bad, SEQ).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        bad[..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(find_ack(&bad, SEQ).is_err());
        assert_eq!(find_ack(&[], SEQ).unwrap(), None);
    }

    #[test]
    fn netlink_bad_names_are_refused_before_any_syscall() {
        let long = "x".repeat(libc::IFNAMSIZ);
        for bad in [
            "", "a/b", "a b", "tab\t", "nul\0x", "a:1", "eth%d", ".", "..", &long,
        ] {
            let invalid = |r: io::Result<()>| r.unwrap_err().kind() == io::ErrorKind::InvalidInput;
            assert!(invalid(create_veth(bad, "ok0", 1)), "{bad:?}");
            assert!(invalid(create_veth("ok0", bad, 1)), "{bad:?}");
            assert!(invalid(delete_link(bad).map(|_| ())), "{bad:?}");
            assert!(
                invalid(add_default_route_v4(bad, Ipv4Addr::LOCALHOST)),
                "{bad:?}"
            );
            assert!(
                invalid(add_default_route_v6(bad, Ipv6Addr::LOCALHOST)),
                "{bad:?}"
            );
            assert!(!link_exists(bad), "{bad:?}");
        }
        let max = "x".repeat(libc::IFNAMSIZ - 1);
        assert!(check_name(&max).is_ok());
        for pid in [0, -1, i32::MIN] {
            assert_eq!(
                create_veth("ok0", "ok1", pid).unwrap_err().kind(),
                io::ErrorKind::InvalidInput
            );
        }
    }

    /// Kills and reaps the namespace holder however the test ends.
    struct Holder(Child);

    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn read(path: &str) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"))
    }

    /// Whether `/proc/.../net/dev` text lists interface `name`.
    fn lists(dev: &str, name: &str) -> bool {
        dev.lines()
            .any(|l| l.split(':').next().map(str::trim) == Some(name))
    }

    /// The whole body runs in a thread that first moved into a fresh network namespace:
    /// nothing here touches the host's.
    #[test]
    fn netlink_veth_route_delete_in_private_namespaces() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP netlink_veth_route_delete_in_private_namespaces: needs root");
            return;
        }
        let body = std::thread::spawn(|| {
            // SAFETY: unshare takes a flag; CLONE_NEWNET moves only this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let e = io::Error::last_os_error();
                eprintln!("SKIP netlink_veth_route_delete_in_private_namespaces: unshare: {e}");
                return;
            }
            in_private_namespace();
        });
        if let Err(panic) = body.join() {
            std::panic::resume_unwind(panic);
        }
    }

    fn in_private_namespace() {
        let mut command = Command::new("/bin/sleep");
        command
            .arg("30")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the hook runs in the forked child before exec and only makes one raw
        // syscall and reads errno: async-signal-safe, no allocation, no locks.
        unsafe {
            command.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // spawn() returns once the child has exec'd, so it is in its own namespace now.
        let holder = Holder(command.spawn().unwrap());
        let pid = i32::try_from(holder.0.id()).unwrap();
        let child_dev = format!("/proc/{pid}/net/dev");
        let (host, peer) = ("aut-h0", "aut-p0");
        assert!(!lists(&read(&child_dev), peer));

        create_veth(host, peer, pid).unwrap();
        assert!(link_exists(host));
        assert!(!link_exists(peer), "the peer is not in our namespace");
        assert!(
            lists(&read(&child_dev), peer),
            "peer inside the child's namespace"
        );
        assert!(!lists(&read(&child_dev), host));
        assert!(lists(&read("/proc/thread-self/net/dev"), host));

        let again = create_veth(host, peer, pid).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists, "{again}");
        let msg = again.to_string();
        assert!(
            msg.contains("create veth aut-h0/aut-p0") && msg.contains("RTM_NEWLINK"),
            "{msg}"
        );
        let no_such_pid = create_veth("aut-h1", "aut-p1", i32::MAX).unwrap_err();
        assert!(
            no_such_pid.to_string().contains("os error 3"),
            "{no_such_pid}"
        );
        assert!(!link_exists("aut-h1"));

        // The default route, IPv4 then IPv6.
        crate::net::set_ipv4(host, Ipv4Addr::new(10, 77, 0, 2), 24).unwrap();
        crate::net::set_link_up(host).unwrap();
        add_default_route_v4(host, Ipv4Addr::new(10, 77, 0, 1)).unwrap();
        let routes = read("/proc/thread-self/net/route");
        let gateway = format!("{:08X}", u32::from_ne_bytes([10, 77, 0, 1]));
        assert!(
            routes.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 2 && f[0] == host && f[1] == "00000000" && f[2] == gateway
            }),
            "{routes}"
        );
        let missing = add_default_route_v4("aut-none", Ipv4Addr::new(10, 77, 0, 1)).unwrap_err();
        let dup = add_default_route_v4(host, Ipv4Addr::new(10, 77, 0, 1)).unwrap_err();
        assert_eq!(dup.kind(), io::ErrorKind::AlreadyExists, "{dup}");
        let off_link = add_default_route_v4(host, Ipv4Addr::new(192, 0, 2, 1)).unwrap_err();
        assert_eq!(
            off_link.kind(),
            io::ErrorKind::NetworkUnreachable,
            "{off_link}"
        );
        assert!(off_link.to_string().contains("RTM_NEWROUTE"), "{off_link}");
        assert!(
            missing.to_string().contains("look up interface"),
            "{missing}"
        );

        if std::path::Path::new("/proc/thread-self/net/ipv6_route").exists() {
            let gw6: Ipv6Addr = "fe80::1".parse().unwrap();
            add_default_route_v6(host, gw6).unwrap();
            let routes6 = read("/proc/thread-self/net/ipv6_route");
            let hex: String = gw6.octets().iter().map(|b| format!("{b:02x}")).collect();
            assert!(
                routes6.lines().any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() == 10
                        && f[0] == "0".repeat(32)
                        && f[1] == "00"
                        && f[4] == hex
                        && f[9] == host
                }),
                "{routes6}"
            );
        } else {
            eprintln!("SKIP IPv6 default route: no IPv6 in this kernel");
        }

        // Deleting the host end takes the peer with it.
        assert!(delete_link(host).unwrap());
        assert!(!link_exists(host));
        assert!(!lists(&read("/proc/thread-self/net/dev"), host));
        assert!(
            !lists(&read(&child_dev), peer),
            "peer gone with its host end"
        );
        assert!(!delete_link(host).unwrap(), "already gone is Ok(false)");

        drop(holder);
    }
}
