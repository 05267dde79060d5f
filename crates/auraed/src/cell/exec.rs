//! A command run inside a running container executable (`Executables/Exec`, the CRI's
//! ExecSync): born in the cell's cgroup and the container's PID namespace, joining the
//! container process's mount, UTS, IPC, network and cgroup namespaces (so its root is the
//! container's), with the container's capability bounding set, `no_new_privs`, seccomp
//! filters and the user and environment of the container's process. It is not an
//! executable of the cell: nothing lists it, and it dies with the cell.

use std::{
    ffi::CString,
    io::Read,
    os::fd::{AsRawFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use aurae_sys::{ExitStatus, Namespaces as Ns, SpawnRequest, spawn::Program};

use super::registry::Cells;
use crate::{executable::ExecutableRef, workload::WorkloadError};

/// Most bytes kept of each output stream (the rest is read and dropped).
pub const MAX_EXEC_OUTPUT: u64 = 16 << 20;
/// Most bytes of the container process's environment taken.
const MAX_ENVIRON: u64 = 128 << 10;
/// The PATH searched when the container's environment has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A command started in a container, its stdio ours: what the CRI streaming server's
/// exec copies to and from its client.
#[derive(Debug)]
pub struct ExecProcess {
    /// Its pidfd and exit status (from the reaper).
    pub child: crate::reaper::Child,
    /// The write end of its stdin pipe (None: `/dev/null`, or the terminal).
    pub stdin: Option<OwnedFd>,
    /// The read ends of its output pipes (None with a terminal).
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    /// With a terminal: its master side (the process's stdio and controlling terminal is
    /// the slave side; its input is written here, its output read here).
    pub terminal: Option<OwnedFd>,
}

/// How an exec's stdio is wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecStdio {
    /// Output through pipes; stdin a pipe from us when `stdin`, else `/dev/null`.
    Pipes { stdin: bool },
    /// A pseudo-terminal: all three on its slave side, its controlling terminal too.
    Terminal,
}

/// How an exec ended.
#[derive(Debug)]
pub struct ExecOutput {
    pub exit: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub truncated: bool,
}

/// Whether the caller may run a process as (uid, gid) — the ids an exec takes from the
/// container's process, checked as read: `Err` says why not (PERMISSION_DENIED).
pub type MayRunAs = Box<dyn FnOnce(u32, u32) -> Result<(), String> + Send>;

/// The real uid and gid of the running process `pid`.
pub fn process_ids(pid: i32) -> Result<(u32, u32), WorkloadError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    ids_of(&status)
        .ok_or_else(|| WorkloadError::Precondition(format!("/proc/{pid}/status names no uid/gid")))
}

/// The real uid and gid in a `/proc/<pid>/status` text.
fn ids_of(status: &str) -> Option<(u32, u32)> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u32>().ok())
    };
    Some((field("Uid:")?, field("Gid:")?))
}

/// The program paths tried for `argv0` in a container whose environment is `env`.
fn candidates(argv0: &str, env: &[CString]) -> Vec<String> {
    if argv0.contains('/') {
        return vec![argv0.to_owned()];
    }
    let path = env
        .iter()
        .find_map(|e| e.to_str().ok()?.strip_prefix("PATH=").map(str::to_owned))
        .unwrap_or_else(|| DEFAULT_PATH.to_owned());
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .map(|d| format!("{}/{argv0}", d.trim_end_matches('/')))
        .collect()
}

/// The container's `/dev/pts/ptmx`, opened through the root of its process `pid`
/// (`openat2` in that root, no symlink or magic link followed) and checked to be the
/// pseudo-terminal multiplexer (character device 5:2): a new terminal of the container's
/// devpts.
fn container_ptmx(pid: i32) -> Result<OwnedFd, WorkloadError> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let fail = |e: std::io::Error| {
        WorkloadError::Precondition(format!(
            "a terminal in the container (its /dev/pts/ptmx): {e}"
        ))
    };
    let root = rustix::fs::open(
        format!("/proc/{pid}/root"),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| fail(e.into()))?;
    let master = rustix::fs::openat2(
        &root,
        "dev/pts/ptmx",
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| fail(e.into()))?;
    crate::executable::checked_ptmx(master).map_err(fail)
}

/// Reads `f` to its end, keeping at most [`MAX_EXEC_OUTPUT`] bytes; (kept, truncated).
fn drain(f: OwnedFd) -> (Vec<u8>, bool) {
    let mut f = std::fs::File::from(f);
    let mut kept = Vec::new();
    let _ = (&mut f).take(MAX_EXEC_OUTPUT).read_to_end(&mut kept);
    let rest = std::io::copy(&mut f, &mut std::io::sink()).unwrap_or(0);
    (kept, rest > 0)
}

impl Cells {
    /// Starts `argv` in the running container executable `r` (see the module docs), its
    /// stdio wired as `stdio` says, if `may_run_as` accepts the container process's ids.
    pub async fn spawn_exec(
        self: &Arc<Self>,
        r: &ExecutableRef,
        argv: Vec<String>,
        stdio: ExecStdio,
        may_run_as: MayRunAs,
    ) -> Result<ExecProcess, WorkloadError> {
        let exe = self.executable(r)?;
        let gone = || {
            WorkloadError::Precondition(format!(
                "executable {}/{} is not running: nothing to exec in",
                r.cell, r.name
            ))
        };
        if exe.exited() {
            return Err(gone());
        }
        if exe.rootfs_path().is_none() && exe.container_record.is_none() {
            return Err(WorkloadError::Precondition(format!(
                "executable {}/{} is not a container: exec runs only inside a container",
                r.cell, r.name
            )));
        }
        let target = exe.pidfd.clone().ok_or_else(gone)?;
        let cell = self.find(&r.cell)?;
        let tree = self.tree()?;
        let argv0 = argv.first().cloned().unwrap_or_default();
        let pid = exe.pid;
        let spawner = self.spawner.clone();
        // Charged where the container is: its own group when it has one (as `runc exec`).
        let own_group = exe.own_group();
        tokio::task::spawn_blocking(move || {
            // The container process's user and environment, read while it runs (checked
            // again after: a pid reused meanwhile is refused).
            let (uid, gid) = process_ids(pid)?;
            // The command runs as the container's process does: the caller must be one
            // that may run as those ids (a tenant without uid 0 gets no root shell in a
            // root container another identity started under its names).
            may_run_as(uid, gid).map_err(WorkloadError::Denied)?;
            let mut environ = Vec::new();
            std::fs::File::open(format!("/proc/{pid}/environ"))?
                .take(MAX_ENVIRON)
                .read_to_end(&mut environ)?;
            // A terminal from the container's own devpts (opened through its root, never
            // following a link; checked to be the ptmx device), before the check below.
            let master = match stdio {
                ExecStdio::Terminal => Some(container_ptmx(pid)?),
                ExecStdio::Pipes { .. } => None,
            };
            if crate::workload::supervise::has_exited(&target) {
                return Err(WorkloadError::Precondition(format!(
                    "process {pid} ended while exec read its user"
                )));
            }
            let envp: Vec<CString> = environ
                .split(|b| *b == 0)
                .filter(|kv| kv.contains(&b'='))
                .filter_map(|kv| CString::new(kv).ok())
                .collect();
            let argv_c: Vec<CString> = argv
                .iter()
                .map(|a| CString::new(a.as_str()))
                .collect::<Result<_, _>>()
                .map_err(|_| crate::spec::FieldError::new("argv", "contains a NUL byte"))?;
            let program: Vec<CString> = candidates(&argv0, &envp)
                .into_iter()
                .filter_map(|p| CString::new(p).ok())
                .collect();
            let setup = aurae_sys::container::ContainerSetup {
                layers_dir: c"",
                overlay_options: c"",
                rootfs: c"",
                volumes: &[],
                mkdirs: &[],
                mount_cgroup: false,
                masked: &[],
                read_only_paths: &[],
                read_only_root: false,
                upper_in_memory: None,
                workdir: c"/",
                capabilities: crate::container::DEFAULT_CAPABILITIES,
                seccomp: crate::container::seccomp::default_filters()
                    .map_err(WorkloadError::Precondition)?,
                program: &program,
                enter: true,
            };
            let leaf = match &own_group {
                Some(g) => tree.group_fd(g)?,
                None => tree.leaf_fd(&cell.spec.name)?,
            };
            // What the child gets as fds 0, 1, 2, and what we keep.
            let pipe =
                || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from);
            let (child_fds, ours) = match stdio {
                ExecStdio::Pipes { stdin } => {
                    let (in_r, in_w): (OwnedFd, Option<OwnedFd>) = if stdin {
                        let (r, w) = pipe()?;
                        (r, Some(w))
                    } else {
                        (std::fs::File::open("/dev/null")?.into(), None)
                    };
                    let (out_r, out_w) = pipe()?;
                    let (err_r, err_w) = pipe()?;
                    ([in_r, out_w, err_w], (in_w, Some(out_r), Some(err_r), None))
                }
                ExecStdio::Terminal => {
                    let master = master.ok_or_else(|| {
                        WorkloadError::Precondition("exec: no terminal was opened".into())
                    })?;
                    let slave = aurae_sys::pty::open_peer(std::os::fd::AsFd::as_fd(&master))?;
                    let (a, b) = (slave.try_clone()?, slave.try_clone()?);
                    ([slave, a, b], (None, None, None, Some(master)))
                }
            };
            let req = SpawnRequest {
                program: Program::Path(c"/"),
                argv: &argv_c,
                envp: &envp,
                cwd: None,
                uid: Some(uid),
                gid: Some(gid),
                no_new_privs: true,
                stdio: [
                    child_fds[0].as_raw_fd(),
                    child_fds[1].as_raw_fd(),
                    child_fds[2].as_raw_fd(),
                ],
                controlling_terminal: stdio == ExecStdio::Terminal,
                pass_fd: None,
                cgroup: Some(leaf.as_raw_fd()),
                new_namespaces: Ns(0),
                pid_namespace_of: Some(target.as_raw_fd()),
                join: Some((
                    target.as_raw_fd(),
                    Ns(Ns::MOUNT | Ns::UTS | Ns::IPC | Ns::NET | Ns::CGROUP),
                )),
                unshare: Ns(0),
                container: Some(&setup),
                console: None,
            };
            let child = spawner.spawn(&req).map_err(|source| WorkloadError::Spawn {
                what: format!("exec of {argv0:?} in {}/{}", cell.spec.name, exe.name),
                source,
            })?;
            drop(child_fds);
            let (stdin, stdout, stderr, terminal) = ours;
            Ok::<_, WorkloadError>(ExecProcess {
                child,
                stdin,
                stdout,
                stderr,
                terminal,
            })
        })
        .await
        .map_err(|e| WorkloadError::Precondition(format!("exec task: {e}")))?
    }

    /// Runs `argv` in the running container executable `r` (see the module docs), if
    /// `may_run_as` accepts its ids; killed after `timeout` (then `Deadline`).
    pub async fn exec_in(
        self: &Arc<Self>,
        r: &ExecutableRef,
        argv: Vec<String>,
        timeout: Duration,
        may_run_as: MayRunAs,
    ) -> Result<ExecOutput, WorkloadError> {
        let ExecProcess {
            child,
            stdout: Some(out_r),
            stderr: Some(err_r),
            ..
        } = self
            .spawn_exec(r, argv, ExecStdio::Pipes { stdin: false }, may_run_as)
            .await?
        else {
            return Err(WorkloadError::Precondition(
                "exec: its output pipes are missing".into(),
            ));
        };
        let out = tokio::task::spawn_blocking(move || drain(out_r));
        let err = tokio::task::spawn_blocking(move || drain(err_r));
        let pidfd = child.pidfd.clone();
        let mut exit = child.exit;
        let status = match tokio::time::timeout(timeout, &mut exit).await {
            Ok(s) => {
                s.map_err(|_| WorkloadError::Precondition("exec: its exit was lost".into()))?
            }
            Err(_) => {
                let _ = pidfd.send_signal(nix::libc::SIGKILL);
                let _ = exit.await;
                return Err(WorkloadError::Deadline(format!(
                    "exec in {}/{}: still running after {} ms: killed",
                    r.cell,
                    r.name,
                    timeout.as_millis()
                )));
            }
        };
        // Its output ends with it, unless a child of it keeps the pipes open: bounded.
        let bounded = |t: tokio::task::JoinHandle<(Vec<u8>, bool)>| async move {
            tokio::time::timeout(Duration::from_secs(2), t)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default()
        };
        let (stdout, t1) = bounded(out).await;
        let (stderr, t2) = bounded(err).await;
        Ok(ExecOutput {
            exit: status,
            stdout,
            stderr,
            truncated: t1 || t2,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_is_the_real_ids_of_the_status() {
        let status = "Name:\tsh\nUid:\t1000\t1001\t1002\t1003\nGid:\t50\t51\t52\t53\n";
        assert_eq!(ids_of(status), Some((1000, 50)));
        assert_eq!(ids_of("Name:\tsh\n"), None);
    }

    #[test]
    fn programs_are_looked_up_in_the_containers_path() {
        let env = [CString::new("PATH=/bin:relative:/usr/bin/").unwrap()];
        assert_eq!(candidates("ls", &env), ["/bin/ls", "/usr/bin/ls"]);
        assert_eq!(candidates("/x/y", &env), ["/x/y"]);
        assert_eq!(candidates("ls", &[]).len(), 6);
    }
}
