//! One message per packet on a SOCK_SEQPACKET socket, with file descriptors attached
//! (`SCM_RIGHTS`: the receiver gets its own close-on-exec copies). Used by the VMM's
//! control channel and the output holder's.

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// Most fds one message carries (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// Sends `bytes` with `fds` attached; retried on EINTR, never raises SIGPIPE.
pub fn send(sock: &impl AsRawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("more than {MAX_FDS} fds in one message"),
        ));
    }
    let iov = [io::IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
            Ok(_) => return Ok(()),
        }
    }
}

/// Sends `msg` as JSON with `fds` attached (see [`send`]).
pub fn send_json(
    sock: &impl AsRawFd,
    msg: &impl serde::Serialize,
    fds: &[RawFd],
) -> io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
    send(sock, &bytes, fds)
}

/// What one message brought: its length in the buffer, the fds (raw, ours to close), and
/// whether the message or its fds were cut short.
#[derive(Debug, Default)]
pub struct Received {
    pub len: usize,
    pub fds: Vec<RawFd>,
    pub truncated: bool,
}

/// Receives one message into `buf` (length 0 and no fds: end of stream); retried on EINTR.
pub fn recv(sock: &impl AsRawFd, buf: &mut [u8]) -> io::Result<Received> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    loop {
        let mut iov = [io::IoSliceMut::new(buf)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
            Ok(m) => {
                let mut fds = Vec::new();
                for c in m.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(v) = c {
                        fds.extend(v);
                    }
                }
                return Ok(Received {
                    len: m.bytes,
                    fds,
                    truncated: m
                        .flags
                        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC),
                });
            }
        }
    }
}

/// Owned copies of fds a message brought (see [`Received::fds`]); the raw numbers are
/// closed once copied.
pub fn owned(fds: &[RawFd]) -> Vec<io::Result<std::os::fd::OwnedFd>> {
    fds.iter()
        .map(|&fd| {
            let copy = aurae_sys::fd::dup_raw(fd);
            let _ = nix::unistd::close(fd);
            copy
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

    use super::*;

    #[test]
    fn a_message_and_its_fds_arrive_together() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        send(&a, b"hello", &[file.as_fd().as_raw_fd()]).unwrap();
        let mut buf = [0u8; 64];
        let r = recv(&b, &mut buf).unwrap();
        assert_eq!(&buf[..r.len], b"hello");
        assert_eq!(r.fds.len(), 1);
        assert!(!r.truncated);
        nix::unistd::close(r.fds[0]).unwrap();
        assert!(send(&a, b"x", &vec![0; MAX_FDS + 1]).is_err());
        drop(a);
        let r = recv(&b, &mut buf).unwrap();
        assert_eq!((r.len, r.fds.len()), (0, 0), "end of stream");
    }
}
