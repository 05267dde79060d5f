//! A sealed, in-memory copy of our own executable, for re-executing helpers (the cell
//! init) from a file no workload can write (the CVE-2019-5736 pattern).

use std::{
    ffi::CString,
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// The sealed copy of our binary, made on first use and shared (the cell inits and the
/// VMM processes are all executed from it).
#[derive(Debug, Default)]
pub struct SealedSelf(std::sync::Mutex<Option<std::sync::Arc<OwnedFd>>>);

impl SealedSelf {
    pub fn get(&self) -> io::Result<std::sync::Arc<OwnedFd>> {
        let mut g = self
            .0
            .lock()
            .map_err(|_| io::Error::other("sealed binary lock poisoned"))?;
        if let Some(fd) = g.as_ref() {
            return Ok(fd.clone());
        }
        let fd = match MADE_AHEAD.get() {
            Some(fd) => fd.clone(),
            None => std::sync::Arc::new(sealed_copy_of_self()?),
        };
        *g = Some(fd.clone());
        Ok(fd)
    }
}

static MADE_AHEAD: std::sync::OnceLock<std::sync::Arc<OwnedFd>> = std::sync::OnceLock::new();

/// Makes the sealed copy now, for every [`SealedSelf`] to use: an instance template makes
/// it before its snapshot, so each copy restored from it starts with it (copying tens of
/// MiB is a second and more in a nested guest).
pub fn make_ahead() -> io::Result<()> {
    let fd = sealed_copy_of_self()?;
    let _ = MADE_AHEAD.set(std::sync::Arc::new(fd));
    Ok(())
}

/// Copies `/proc/self/exe` into a memfd and seals it against every change.
pub fn sealed_copy_of_self() -> io::Result<OwnedFd> {
    sealed_from(&mut File::open("/proc/self/exe")?, "auraed-sealed")
}

/// A memfd holding `data`, sealed against every change: what a parent hands a spawned
/// instance (its identity and policy), in memory only, never on a disk.
pub fn sealed_bytes(data: &[u8], name: &str) -> io::Result<OwnedFd> {
    sealed_from(&mut io::Cursor::new(data), name)
}

fn sealed_from(src: &mut impl io::Read, name: &str) -> io::Result<OwnedFd> {
    let name = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: `name` is a valid NUL-terminated string; flags are constants.
    let raw =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new fd we own exclusively.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut dst = File::from(fd);
    io::copy(src, &mut dst)?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl(F_ADD_SEALS) on a memfd we own, with an integer argument.
    if unsafe { libc::fcntl(dst.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from(dst))
}

/// The seals on `fd` (for tests and self-checks).
pub fn seals(fd: &OwnedFd) -> io::Result<i32> {
    // SAFETY: fcntl(F_GET_SEALS) takes no pointer.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, Write};

    use super::*;

    #[test]
    fn sealed_copy_refuses_writes() {
        let fd = sealed_copy_of_self().unwrap();
        let s = seals(&fd).unwrap();
        assert_ne!(s & libc::F_SEAL_WRITE, 0);
        let mut f = File::from(fd);
        f.seek(io::SeekFrom::Start(0)).unwrap();
        assert!(
            f.write_all(b"x").is_err(),
            "a sealed copy must refuse writes"
        );
    }
}
