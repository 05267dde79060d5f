//! Connection budgets: one per listener, a cap per source, rate-limited refusal logs, and
//! the open-file limit.
//!
//! - Each listener (the Unix socket, TCP) has its own budget of `--max-connections`
//!   slots, so a flood on one never starves the other. A connection holds its slot from
//!   `accept` (pending handshakes count) until it closes; one over budget is closed at once.
//! - A TCP peer address may hold at most [`MAX_HANDSHAKES_PER_PEER`] connections that have
//!   not finished the TLS handshake (unauthenticated peers cannot fill the TCP budget
//!   alone).
//! - A verified SPIFFE identity may hold at most [`MAX_CONNECTIONS_PER_IDENTITY`]
//!   established connections, over both listeners together (one identity cannot take
//!   every slot). HTTP/2 multiplexes calls, so a well-behaved client needs one or a few.

use std::{
    collections::HashMap,
    hash::Hash,
    io,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tracing::{info, warn};

/// Default most TLS handshakes in progress from one TCP peer address (`--max-handshakes-per-peer`).
pub const MAX_HANDSHAKES_PER_PEER: usize = 64;
/// Default most established connections of one SPIFFE identity, both listeners together
/// (`--max-connections-per-identity`): an eighth of the default budget of 1024, room for a
/// tool that opens one connection per worker (the load test runs 64).
pub const MAX_CONNECTIONS_PER_IDENTITY: usize = 128;
/// At most one refusal line per this interval and kind; the others are counted.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// How long an accept loop pauses when the process or system is out of file descriptors
/// (EMFILE/ENFILE) or kernel memory: long enough not to spin, short enough to recover fast.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// File descriptors kept out of the connection budgets for everything else (workloads'
/// pipes, pidfds and log files, cgroup directories, the store): this many, or half the
/// limit when that is less.
pub const FD_RESERVE: u64 = 512;
/// The smallest budget a listener gets, whatever the open-file limit.
pub const MIN_BUDGET: usize = 16;

/// Each listener's connection budget: `max_connections`, lowered so that all listeners'
/// budgets together fit under the open-file limit with [`FD_RESERVE`] to spare (a TCP flood
/// then fills its own budget, never the descriptor table the socket needs too).
pub fn budget_per_listener(
    max_connections: usize,
    listeners: usize,
    fd_limit: Option<u64>,
) -> usize {
    let Some(limit) = fd_limit else {
        return max_connections;
    };
    let usable = limit - FD_RESERVE.min(limit / 2);
    let share = usize::try_from(usable / listeners.max(1) as u64).unwrap_or(usize::MAX);
    max_connections.min(share.max(MIN_BUDGET))
}

/// Counts per key, with a cap; a slot is a [`Held`] that gives itself back on drop.
#[derive(Debug)]
pub struct PerKey<K: Hash + Eq> {
    cap: usize,
    counts: Mutex<HashMap<K, usize>>,
}

impl<K: Hash + Eq + Clone> PerKey<K> {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            counts: Mutex::new(HashMap::new()),
        })
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// A slot for `key`, or `None` when `key` already holds `cap`.
    pub fn try_take(self: &Arc<Self>, key: K) -> Option<Held<K>> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let n = counts.entry(key.clone()).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(Held {
            owner: self.clone(),
            key: Some(key),
        })
    }

    /// Slots `key` holds now.
    pub fn count(&self, key: &K) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Keys holding at least one slot.
    pub fn keys(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// One slot of a [`PerKey`], given back on drop.
#[derive(Debug)]
pub struct Held<K: Hash + Eq> {
    owner: Arc<PerKey<K>>,
    key: Option<K>,
}

impl<K: Hash + Eq> Drop for Held<K> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut counts = self
            .owner
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&key);
            }
        }
    }
}

/// A warning printed at most once per [`REFUSAL_LOG_INTERVAL`]; the lines held back are
/// counted and reported with the next one.
#[derive(Debug, Default)]
pub struct RateLimited {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RateLimited {
    /// Whether to log now, and how many lines were held back since the last one.
    pub fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|l| now.duration_since(l) < REFUSAL_LOG_INTERVAL) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// Why connections are refused, each with its own rate limit.
#[derive(Debug, Default)]
pub struct Refusals {
    pub listener_full: RateLimited,
    pub peer_handshakes: RateLimited,
    pub identity_full: RateLimited,
    pub accept_failed: RateLimited,
}

impl Refusals {
    /// Logs a refused connection (audit target, rate-limited).
    pub fn refuse(&self, which: &RateLimited, via: &dyn std::fmt::Display, why: &str) {
        if let Some(suppressed) = which.admit() {
            warn!(
                target: "aurae::audit",
                via = %via,
                decision = "refuse",
                similar_refusals_not_logged = suppressed,
                "connection closed at once: {why}"
            );
        }
    }
}

use crate::api::status::is_out_of_fds as out_of_fds;

/// What an accept loop does with a failed `accept`.
#[derive(Debug, PartialEq, Eq)]
pub enum AcceptError {
    /// The one connection is gone (aborted, reset, interrupted): accept the next at once.
    Transient,
    /// Out of descriptors or memory, or unknown: pause, then keep serving.
    BackOff(Duration),
}

pub fn classify_accept_error(e: &io::Error) -> AcceptError {
    use io::ErrorKind as K;
    match e.kind() {
        K::ConnectionAborted | K::ConnectionReset | K::Interrupted | K::WouldBlock => {
            AcceptError::Transient
        }
        _ if out_of_fds(e)
            || matches!(
                e.raw_os_error(),
                Some(nix::libc::ENOBUFS | nix::libc::ENOMEM)
            ) =>
        {
            AcceptError::BackOff(ACCEPT_BACKOFF)
        }
        // EPROTO, EPERM (a firewall) and the rest: never spin on an unknown error.
        _ => AcceptError::BackOff(ACCEPT_BACKOFF / 2),
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (connections, pipes, pidfds and log
/// files all take descriptors; the usual soft limit of 1024 is far below what the
/// connection budgets allow) and returns the soft limit now in force.
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let before = getrlimit(Resource::Nofile);
    // An infinite hard limit cannot be the soft one: the kernel caps it at fs.nr_open.
    let target = before.maximum.or_else(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()?
            .trim()
            .parse()
            .ok()
    })?;
    match before.current {
        Some(soft) if soft >= target => {
            info!(
                soft = soft,
                hard = ?before.maximum,
                "open-file limit (RLIMIT_NOFILE) already at the hard limit"
            );
            return Some(soft);
        }
        None => return None,
        Some(_) => {}
    }
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: before.maximum,
        },
    ) {
        Ok(()) => {
            // Workloads start with the soft limit auraed was given, not the raised one
            // (programs that loop over every fd or use select() expect the usual one).
            if let Some(soft) = before.current {
                aurae_sys::spawn::set_child_nofile_limit(soft);
            }
            info!(
                from = ?before.current,
                to = target,
                "raised the open-file limit (RLIMIT_NOFILE soft) to the hard limit"
            );
            Some(target)
        }
        Err(e) => {
            warn!(
                soft = ?before.current,
                hard = ?before.maximum,
                "cannot raise the open-file limit (RLIMIT_NOFILE): {e}"
            );
            before.current
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_key_caps_and_gives_back() {
        let p = PerKey::<&str>::new(2);
        let a1 = p.try_take("a");
        let a2 = p.try_take("a");
        assert!(a1.is_some() && a2.is_some());
        assert!(p.try_take("a").is_none(), "a third slot for the same key");
        let b = p.try_take("b");
        assert!(b.is_some(), "another key is not affected");
        assert_eq!(p.count(&"a"), 2);
        drop(a1);
        assert_eq!(p.count(&"a"), 1);
        assert!(p.try_take("a").is_some(), "a freed slot is usable again");
        drop((a2, b));
        assert_eq!(p.keys(), 0, "keys without slots are forgotten");
    }

    #[test]
    fn rate_limited_lets_one_line_through_per_interval() {
        let r = RateLimited::default();
        assert_eq!(r.admit(), Some(0));
        for _ in 0..10 {
            assert_eq!(r.admit(), None);
        }
        *r.last.lock().unwrap_or_else(PoisonError::into_inner) =
            Instant::now().checked_sub(REFUSAL_LOG_INTERVAL);
        assert_eq!(r.admit(), Some(10), "the held-back lines are counted");
    }

    #[test]
    fn accept_errors_never_spin_and_never_stop() {
        let emfile = io::Error::from_raw_os_error(nix::libc::EMFILE);
        let enfile = io::Error::from_raw_os_error(nix::libc::ENFILE);
        assert!(out_of_fds(&emfile) && out_of_fds(&enfile));
        assert_eq!(
            classify_accept_error(&emfile),
            AcceptError::BackOff(ACCEPT_BACKOFF)
        );
        assert_eq!(
            classify_accept_error(&io::Error::from_raw_os_error(nix::libc::ECONNABORTED)),
            AcceptError::Transient
        );
        assert!(matches!(
            classify_accept_error(&io::Error::from_raw_os_error(nix::libc::EPERM)),
            AcceptError::BackOff(d) if d > Duration::ZERO
        ));
    }

    #[test]
    fn budgets_fit_under_the_fd_limit() {
        // A soft limit of 1024 with TCP: 512 kept for the rest, 256 per listener.
        assert_eq!(budget_per_listener(1024, 2, Some(1024)), 256);
        assert_eq!(budget_per_listener(1024, 1, Some(1024)), 512);
        assert_eq!(budget_per_listener(1024, 2, Some(1 << 20)), 1024);
        assert_eq!(budget_per_listener(1024, 2, None), 1024);
        assert_eq!(budget_per_listener(1024, 2, Some(20)), MIN_BUDGET);
    }

    #[test]
    fn fd_limit_is_raised_to_the_hard_limit() {
        use rustix::process::{Resource, getrlimit};
        let soft = raise_fd_limit();
        let now = getrlimit(Resource::Nofile);
        assert_eq!(soft, now.current);
        if let (Some(s), Some(h)) = (now.current, now.maximum) {
            assert_eq!(s, h);
        }
    }
}
