//! Process-wide settings of the daemon itself.

use std::io;

/// Makes this process a child subreaper: orphans below it are reparented to it (daemon
/// mode; PID 1 is a reaper already).
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Number of threads of this process (from /proc/self/status), for leak tests.
pub fn thread_count() -> Option<usize> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

/// Sends `signal` to every process this process may signal in its PID namespace except
/// itself (`kill(-1, sig)`). Only the cell init uses it, as PID 1 of its cell's namespace,
/// where "every process" is exactly the cell.
pub fn signal_all_in_namespace(signal: i32) -> io::Result<()> {
    // Outside PID 1 of a namespace, -1 would reach every process of that namespace, e.g.
    // the whole host: refuse.
    if std::process::id() != 1 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "only PID 1 of a PID namespace may signal all of it",
        ));
    }
    // SAFETY: kill takes integers; -1 addresses every process we may signal in our PID
    // namespace, which for a namespace's PID 1 is exactly that namespace.
    let r = unsafe { libc::kill(-1, signal) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Loads a kernel module from a file (`finit_module`) with `params` (`name=value`
/// separated by spaces, as `modprobe` passes them; empty for none).
pub fn load_module(path: &std::path::Path, params: &str) -> io::Result<()> {
    let f = std::fs::File::open(path)?;
    let params = std::ffi::CString::new(params).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, "module parameters contain NUL")
    })?;
    // SAFETY: finit_module takes an open fd we own, a NUL-terminated parameter string and
    // flags 0.
    let r = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            params.as_ptr(),
            0,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        // Already loaded (or built in) is fine.
        return if e.raw_os_error() == Some(libc::EEXIST) {
            Ok(())
        } else {
            Err(e)
        };
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops every capability of the calling thread for good: bounding set emptied, ambient
/// cleared, effective/permitted/inheritable zero, and `no_new_privs` (for a jailed helper
/// process, single-threaded at that point).
pub fn drop_all_capabilities() -> io::Result<()> {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments; EINVAL past the last capability.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
    }
    // SAFETY: prctl with integer arguments.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    let mut hdr = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset with a v3 header and two data words, as the kernel expects.
    if unsafe { libc::syscall(libc::SYS_capset, std::ptr::addr_of_mut!(hdr), data.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
