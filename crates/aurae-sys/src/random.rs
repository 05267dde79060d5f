//! The kernel's random number generator, made unique again in a restored machine: a
//! snapshot clones the CRNG's state into every VM restored from it, so until it reseeds
//! each would produce the same "random" bytes.

use std::{io, io::Write, os::fd::AsRawFd};

/// `RNDRESEEDCRNG` from <linux/random.h>: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `seed` (fresh random bytes from outside this machine) into the input pool and
/// makes the CRNG reseed from it now, so everything read from the kernel afterwards
/// depends on `seed`. Needs CAP_SYS_ADMIN (PID 1 of a microVM has it).
pub fn reseed(seed: &[u8]) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    f.write_all(seed)?;
    // SAFETY: RNDRESEEDCRNG takes no argument; the fd is an open /dev/urandom.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
