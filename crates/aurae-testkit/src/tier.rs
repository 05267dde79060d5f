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
