//! Pseudo-terminals for an interactive exec: auraed opens the container's own
//! `/dev/pts/ptmx` (so the terminal lives in the container's devpts and `tty` names it
//! there), unlocks it and takes the peer (the slave side) straight from the master
//! (`TIOCGPTPEER`: no path is looked up); the slave becomes the process's stdio and
//! controlling terminal, auraed keeps the master.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Unlocks the terminal whose master is `master` and opens its slave side (read-write,
/// close-on-exec, not our controlling terminal).
pub fn open_peer(master: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from the pointer (on our stack); TIOCGPTPEER takes
    // open flags by value and returns a new fd or -1.
    let fd = unsafe {
        if libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCSPTLCK,
            std::ptr::addr_of!(unlock),
        ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the ioctl just returned this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the terminal's window size (`TIOCSWINSZ`: its foreground process group gets
/// SIGWINCH).
pub fn set_window_size(fd: BorrowedFd<'_>, columns: u16, rows: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: columns,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which is on our stack.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, std::ptr::addr_of!(ws)) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The window size of a terminal (`TIOCGWINSZ`): (columns, rows).
pub fn window_size(fd: BorrowedFd<'_>) -> std::io::Result<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize through the pointer, to our stack.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, std::ptr::addr_of_mut!(ws)) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((ws.ws_col, ws.ws_row))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::{fd::AsFd, unix::fs::OpenOptionsExt};

    use super::*;

    #[test]
    fn a_pair_carries_bytes_and_a_size() {
        let m: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open("/dev/ptmx")
            .unwrap()
            .into();
        let s = open_peer(m.as_fd()).unwrap();
        set_window_size(m.as_fd(), 100, 30).unwrap();
        assert_eq!(window_size(s.as_fd()).unwrap(), (100, 30));
        std::io::Write::write_all(&mut std::fs::File::from(s), b"x").unwrap();
        let mut buf = [0u8; 8];
        let n = std::io::Read::read(&mut std::fs::File::from(m), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"x");
    }
}
