//! A process found again after a restart: its pid plus its start time, so a reused pid is
//! never mistaken for it.

use std::io;

use aurae_sys::Pidfd;

/// A pid and the process's start time (clock ticks after boot, `/proc/<pid>/stat` field
/// 22): together they name one process for the life of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcRef {
    pub pid: i32,
    pub start_time: u64,
}

/// Field 22 of a `/proc/<pid>/stat` line. The command (field 2) may hold spaces and
/// parentheses, so fields are counted after the last ')'.
pub fn start_time_of(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ')': field 3 (state) is the first; field 22 is the 20th.
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl ProcRef {
    /// The process `pid` as it is now.
    pub fn of(pid: i32) -> io::Result<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let start_time = start_time_of(&stat)
            .ok_or_else(|| io::Error::other(format!("/proc/{pid}/stat: no start time")))?;
        Ok(Self { pid, start_time })
    }

    /// A pidfd of this very process, or `None` if it has exited (or its pid now names
    /// another process). The pidfd is taken first and the start time checked after, so
    /// the pidfd cannot refer to a successor.
    pub fn open(&self) -> io::Result<Option<Pidfd>> {
        let pidfd = match Pidfd::open(self.pid) {
            Ok(p) => p,
            Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => return Ok(None),
            Err(e) => return Err(e),
        };
        match Self::of(self.pid) {
            Ok(now) if now == *self && !zombie(self.pid) => Ok(Some(pidfd)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// An exited process not reaped yet counts as gone.
fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rfind(')')
            .is_some_and(|i| s[i + 1..].trim_start().starts_with(['Z', 'X']))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_read_after_the_command() {
        let stat = "1234 (evil) (x 1 2) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_time_of(stat), Some(987654));
        assert_eq!(start_time_of("garbage"), None);
    }

    #[test]
    fn our_own_process_is_found_and_a_wrong_start_time_is_not() {
        let me = ProcRef::of(std::process::id() as i32).unwrap();
        assert!(me.open().unwrap().is_some());
        let reused = ProcRef {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(reused.open().unwrap().is_none());
        let gone = ProcRef {
            pid: i32::MAX - 1,
            start_time: 1,
        };
        assert!(gone.open().unwrap().is_none());
    }
}
