//! The daemon's only unsafe code: thin, documented wrappers over the Linux calls the
//! standard library and nix do not offer (clone3 into a cgroup and namespaces, pidfds,
//! `waitid(P_PIDFD)`, sealed self-exec, interface ioctls (flags, MAC), the CRNG's reseed, a container's root and
//! privileges set up between clone and exec, the cgroup device filter loaded with `bpf(2)`).
//!
//! Rules here: every `unsafe` block states its invariant in a `SAFETY:` comment; code that
//! runs between `clone3` and `execve` is async-signal-safe (no allocation, no locks, only
//! raw syscalls on data prepared before the clone); every fd we create is close-on-exec.
#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod bpf;
pub mod container;
pub mod fd;
pub mod fork;
pub mod memfd;
pub mod memory;
pub mod net;
pub mod netlink;
pub mod pidfd;
pub mod process;
pub mod pty;
pub mod random;
pub mod spawn;

pub use pidfd::{ExitStatus, Pidfd};
pub use spawn::{Blame, Namespaces, SpawnError, SpawnRequest, Step, spawn};
