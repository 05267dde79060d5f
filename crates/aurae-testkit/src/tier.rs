//! Test tiers. A test whose machine lacks a precondition prints `SKIP <test>: <reason>`
//! and returns; with `AURAE_REQUIRE_TIER` naming its tier (CI), the skip is a failure.

/// Tiers: T1 host (root, namespaces, cgroup placement), T2 guest (full cgroup v2, KVM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Host,
    Guest,
}

impl Tier {
    fn name(self) -> &'static str {
        match self {
            Self::Host => "T1",
            Self::Guest => "T2",
        }
    }
}

/// Returns `true` when the test may run. Otherwise prints the SKIP line, or panics when
/// the tier is required.
#[allow(clippy::panic)]
pub fn check(test: &str, tier: Tier, missing: Option<String>) -> bool {
    let Some(reason) = missing else { return true };
    let required = std::env::var("AURAE_REQUIRE_TIER")
        .map(|v| v.split(',').any(|t| t.trim() == tier.name()))
        .unwrap_or(false);
    if required {
        panic!(
            "{test}: tier {} is required (AURAE_REQUIRE_TIER) but {reason}",
            tier.name()
        );
    }
    println!("SKIP {test}: {reason}");
    eprintln!("SKIP {test}: {reason}");
    false
}

/// `Some(reason)` unless running as root.
pub fn needs_root() -> Option<String> {
    (!nix::unistd::geteuid().is_root()).then(|| "needs root".to_owned())
}

/// cgroup2's filesystem magic number.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where this machine lets tests create cgroup v2 groups (root + a cgroup2 mount), or why
/// not.
pub fn cgroup_parent() -> Result<std::path::PathBuf, String> {
    if let Some(r) = needs_root() {
        return Err(r);
    }
    for p in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC) {
            return Ok(p.into());
        }
    }
    Err("no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified".into())
}

/// `Some(reason)` unless cells can run here (root and a cgroup v2 hierarchy).
pub fn needs_cells() -> Option<String> {
    cgroup_parent().err()
}

/// `Some(reason)` unless cgroup v2 `controller` is available to our test groups.
pub fn needs_controller(controller: &str) -> Option<String> {
    let parent = match cgroup_parent() {
        Ok(p) => p,
        Err(e) => return Some(e),
    };
    let avail = std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
    (!avail.split_whitespace().any(|c| c == controller)).then(|| {
        format!("the cgroup v2 {controller} controller is not enabled at {} (limit tests run in the guest tier)", parent.display())
    })
}
