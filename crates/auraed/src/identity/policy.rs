//! The authorization policy: SPIFFE ID → the RPCs it may call and the names it may touch.
//!
//! ```toml
//! [[grant]]
//! id = "spiffe://aurae.local/operator/alice"
//! methods = ["aurae.runtime.v0.Runtime/RunExecutable", "aurae.runtime.v0.Executables/*"]
//! names = ["team-a", "scratch-*"]
//! allow_host_namespaces = false   # may a cell share a host namespace?
//! allow_uid_zero = false          # may a workload run as uid 0?
//! ```
//!
//! Deny by default: an identity without a grant, a method not listed, a name outside the
//! prefixes: each is `PERMISSION_DENIED`.
//!
//! Method patterns: `"*"` (every method), `"<package>.<Service>/*"` (every method of a
//! service) or a full method name `"<package>.<Service>/<Method>"`. Each must name a
//! method auraed serves, so a typo fails at startup instead of silently denying.
//!
//! Name patterns: `"*"` (every name); `"team-a"` matches `team-a` and everything below it
//! (`team-a/api`) but not `team-ab`; `"scratch-*"` is a plain string prefix.

use std::{collections::BTreeSet, fs, path::Path};

use aurae_identity::SpiffeId;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("policy {path} does not parse: {message}")]
    Parse { path: String, message: String },
    #[error("policy grant #{index}: id {id:?}: {reason}")]
    Id {
        index: usize,
        id: String,
        reason: String,
    },
    #[error("policy grant #{index} ({id}): method pattern {pattern:?} {reason}")]
    Method {
        index: usize,
        id: String,
        pattern: String,
        reason: String,
    },
    #[error("policy grant #{index} ({id}): name pattern {pattern:?} {reason}")]
    Name {
        index: usize,
        id: String,
        pattern: String,
        reason: String,
    },
    #[error("policy: {0} has more than one grant; merge them into one")]
    Duplicate(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    grant: Vec<GrantFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantFile {
    id: String,
    methods: Vec<String>,
    names: Vec<String>,
    #[serde(default)]
    allow_host_namespaces: bool,
    #[serde(default)]
    allow_uid_zero: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum MethodPattern {
    All,
    Service(String),
    Exact(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum NamePattern {
    All,
    /// Matches the path itself and every path below it.
    Subtree(String),
    /// Plain string prefix (pattern ended in '*').
    Prefix(String),
}

/// What one identity may do.
#[derive(Debug, Clone)]
pub struct Grant {
    pub id: SpiffeId,
    methods: Vec<MethodPattern>,
    names: Vec<NamePattern>,
    pub allow_host_namespaces: bool,
    pub allow_uid_zero: bool,
}

impl Grant {
    /// The grant the default policy gives the local administrator.
    pub fn everything(id: SpiffeId) -> Self {
        Self {
            id,
            methods: vec![MethodPattern::All],
            names: vec![NamePattern::All],
            allow_host_namespaces: true,
            allow_uid_zero: true,
        }
    }

    /// Whether `method` (`package.Service/Method`, no leading '/') is granted.
    pub fn allows_method(&self, method: &str) -> bool {
        self.methods.iter().any(|p| match p {
            MethodPattern::All => true,
            MethodPattern::Service(s) => method
                .strip_prefix(s.as_str())
                .is_some_and(|rest| rest.starts_with('/')),
            MethodPattern::Exact(m) => m == method,
        })
    }

    /// Whether the resource `name` (a cell path or a VM/instance/pod name) is granted.
    pub fn allows_name(&self, name: &str) -> bool {
        self.names.iter().any(|p| match p {
            NamePattern::All => true,
            NamePattern::Subtree(root) => name
                .strip_prefix(root.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
            NamePattern::Prefix(prefix) => name.starts_with(prefix.as_str()),
        })
    }

    /// The granted patterns, as written in the policy (for `Daemon/Info`).
    pub fn describe(&self) -> (Vec<String>, Vec<String>) {
        let methods = self
            .methods
            .iter()
            .map(|m| match m {
                MethodPattern::All => "*".to_owned(),
                MethodPattern::Service(s) => format!("{s}/*"),
                MethodPattern::Exact(m) => m.clone(),
            })
            .collect();
        let names = self
            .names
            .iter()
            .map(|n| match n {
                NamePattern::All => "*".to_owned(),
                NamePattern::Subtree(s) => s.clone(),
                NamePattern::Prefix(p) => format!("{p}*"),
            })
            .collect();
        (methods, names)
    }
}

/// The whole policy: one grant per identity.
#[derive(Debug, Clone)]
pub struct Policy {
    grants: Vec<Grant>,
}

fn name_pattern_ok(p: &str) -> bool {
    p.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'/'))
        && !p.starts_with('/')
        && !p.ends_with('/')
        && !p.contains("//")
}

impl Policy {
    /// The default policy: `admin` may do everything, nobody else anything.
    pub fn default_for(admin: SpiffeId) -> Self {
        Self {
            grants: vec![Grant::everything(admin)],
        }
    }

    /// Reads and validates a policy file. `trust_domain` is auraed's own: a grant for
    /// another trust domain could never match, so it is an error. `methods` is every
    /// method auraed serves (`package.Service/Method`).
    pub fn load(
        path: &Path,
        trust_domain: &str,
        methods: &BTreeSet<String>,
    ) -> Result<Self, PolicyError> {
        let text = fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string(), trust_domain, methods)
    }

    pub fn parse(
        text: &str,
        origin: &str,
        trust_domain: &str,
        methods: &BTreeSet<String>,
    ) -> Result<Self, PolicyError> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| PolicyError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        let services: BTreeSet<&str> = methods
            .iter()
            .filter_map(|m| m.split_once('/'))
            .map(|(s, _)| s)
            .collect();
        let mut grants: Vec<Grant> = Vec::new();
        for (i, g) in file.grant.into_iter().enumerate() {
            let index = i + 1;
            let id: SpiffeId =
                g.id.parse()
                    .map_err(|e: aurae_identity::SpiffeIdError| PolicyError::Id {
                        index,
                        id: g.id.clone(),
                        reason: e.to_string(),
                    })?;
            if id.trust_domain() != trust_domain {
                return Err(PolicyError::Id {
                    index,
                    id: g.id,
                    reason: format!(
                        "is not in auraed's trust domain {trust_domain:?}, so it could never match"
                    ),
                });
            }
            if grants.iter().any(|x| x.id == id) {
                return Err(PolicyError::Duplicate(id.to_string()));
            }
            let method_err = |pattern: &str, reason: &str| PolicyError::Method {
                index,
                id: id.to_string(),
                pattern: pattern.to_owned(),
                reason: reason.to_owned(),
            };
            let mut mp = Vec::new();
            for m in &g.methods {
                let pat = if m == "*" {
                    MethodPattern::All
                } else if let Some(svc) = m.strip_suffix("/*") {
                    if !services.contains(svc) {
                        return Err(method_err(m, "names no service auraed serves"));
                    }
                    MethodPattern::Service(svc.to_owned())
                } else if methods.contains(m.trim_start_matches('/')) {
                    MethodPattern::Exact(m.trim_start_matches('/').to_owned())
                } else {
                    return Err(method_err(
                        m,
                        "names no method auraed serves (write package.Service/Method, package.Service/* or *)",
                    ));
                };
                mp.push(pat);
            }
            let mut np = Vec::new();
            for n in &g.names {
                let pat = if n == "*" {
                    NamePattern::All
                } else if let Some(prefix) = n.strip_suffix('*') {
                    if prefix.is_empty() || !name_pattern_ok(prefix.trim_end_matches('/')) {
                        return Err(PolicyError::Name {
                            index,
                            id: id.to_string(),
                            pattern: n.clone(),
                            reason: "must be lowercase letters, digits, '-' and '/' before the '*'"
                                .into(),
                        });
                    }
                    NamePattern::Prefix(prefix.to_owned())
                } else {
                    if n.is_empty() || !name_pattern_ok(n) {
                        return Err(PolicyError::Name {
                            index,
                            id: id.to_string(),
                            pattern: n.clone(),
                            reason: "must be a cell path like \"team-a\" or \"team-a/api\", a prefix ending in '*', or \"*\"".into(),
                        });
                    }
                    NamePattern::Subtree(n.clone())
                };
                np.push(pat);
            }
            grants.push(Grant {
                id,
                methods: mp,
                names: np,
                allow_host_namespaces: g.allow_host_namespaces,
                allow_uid_zero: g.allow_uid_zero,
            });
        }
        Ok(Self { grants })
    }

    /// The grant of `id`, if it may call `method`.
    pub fn authorize(&self, id: &SpiffeId, method: &str) -> Option<&Grant> {
        self.grants
            .iter()
            .find(|g| &g.id == id)
            .filter(|g| g.allows_method(method))
    }

    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn methods() -> BTreeSet<String> {
        [
            "aurae.runtime.v0.Runtime/RunExecutable",
            "aurae.runtime.v0.Runtime/RunCell",
            "aurae.runtime.v0.Cells/Free",
            "grpc.health.v1.Health/Check",
        ]
        .into_iter()
        .map(String::from)
        .collect()
    }

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, "test.toml", "aurae.local", &methods())
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn grants_match_methods_and_names() {
        let p = parse(
            r#"
            [[grant]]
            id = "spiffe://aurae.local/operator/alice"
            methods = ["aurae.runtime.v0.Runtime/RunExecutable", "aurae.runtime.v0.Cells/*"]
            names = ["team-a", "scratch-*"]
            "#,
        )
        .unwrap();
        let alice = id("spiffe://aurae.local/operator/alice");
        let g = p
            .authorize(&alice, "aurae.runtime.v0.Runtime/RunExecutable")
            .unwrap();
        assert!(
            p.authorize(&alice, "aurae.runtime.v0.Runtime/RunCell")
                .is_none()
        );
        assert!(p.authorize(&alice, "aurae.runtime.v0.Cells/Free").is_some());
        assert!(
            p.authorize(&alice, "aurae.runtime.v0.CellsX/Free")
                .is_none()
        );
        assert!(
            p.authorize(
                &id("spiffe://aurae.local/operator/bob"),
                "grpc.health.v1.Health/Check"
            )
            .is_none()
        );
        assert!(g.allows_name("team-a"));
        assert!(g.allows_name("team-a/api"));
        assert!(!g.allows_name("team-ab"));
        assert!(!g.allows_name("team"));
        assert!(g.allows_name("scratch-1"));
        assert!(!g.allows_name("scratch"));
        assert!(!g.allow_uid_zero && !g.allow_host_namespaces);
    }

    #[test]
    fn bad_policies_are_refused_with_the_reason() {
        let cases = [
            ("grant = 3", "does not parse"),
            (
                "[[grant]]\nid = \"spiffe://aurae.local/x\"\nmethods=[]\nnames=[]\nextra=1",
                "unknown field",
            ),
            (
                "[[grant]]\nid = \"http://x/y\"\nmethods=[]\nnames=[]",
                "spiffe://",
            ),
            (
                "[[grant]]\nid = \"spiffe://other.td/x\"\nmethods=[]\nnames=[]",
                "trust domain",
            ),
            (
                "[[grant]]\nid = \"spiffe://aurae.local/x\"\nmethods=[\"Foo/Bar\"]\nnames=[]",
                "names no method",
            ),
            (
                "[[grant]]\nid = \"spiffe://aurae.local/x\"\nmethods=[\"x.Y/*\"]\nnames=[]",
                "names no service",
            ),
            (
                "[[grant]]\nid = \"spiffe://aurae.local/x\"\nmethods=[]\nnames=[\"../etc\"]",
                "cell path",
            ),
            (
                "[[grant]]\nid = \"spiffe://aurae.local/x\"\nmethods=[]\nnames=[\"Team\"]",
                "cell path",
            ),
            (
                "[[grant]]\nid = \"spiffe://aurae.local/x\"\nmethods=[]\nnames=[]\n[[grant]]\nid = \"spiffe://aurae.local/x\"\nmethods=[]\nnames=[]",
                "more than one grant",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn default_policy_grants_admin_only() {
        let admin = id("spiffe://aurae.local/operator/admin");
        let p = Policy::default_for(admin.clone());
        assert!(p.authorize(&admin, "anything/At-all").is_some());
        assert!(
            p.authorize(
                &id("spiffe://aurae.local/operator/eve"),
                "grpc.health.v1.Health/Check"
            )
            .is_none()
        );
    }
}
