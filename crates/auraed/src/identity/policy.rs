//! The authorization policy: SPIFFE ID → the RPCs it may call and the names it may touch.
//!
//! ```toml
//! [[grant]]
//! id = "spiffe://aurae.local/operator/alice"
//! methods = ["aurae.runtime.v0.Runtime/RunExecutable", "aurae.runtime.v0.Executables/*"]
//! names = ["team-a", "scratch-*"]
//! allow_host_namespaces = false   # may a cell share a host namespace?
//! allow_uid_zero = false          # may a workload run as uid 0 (or gid 0)?
//! allow_new_privileges = false    # may plain executables run without no_new_privs?
//! allow_writable_drives = false   # may a VM write to a drive (under `volumes`)?
//! allow_kvm = false               # may a cell's processes open /dev/kvm (`devices.kvm`)?
//! uids = ["1000-1999"]            # the uids its workloads may run as (besides 0)
//! gids = ["1000-1999"]            # the gids likewise
//! volumes = ["team-a"]            # host paths, relative to a --volume-root or --vm-image-root
//! registries = ["127.0.0.1:5000/team-a"]  # where its images may be pulled from
//! [grant.quota]                   # everything under its names, together
//! cells = 20
//! executables = 200
//! vms = 2
//! instances = 2                   # spawned instances
//! memory_bytes = 8589934592       # sum of the cells' memory.max, the VMs' and instances' memory
//! ```
//!
//! Deny by default: an identity without a grant, a method not listed, a name outside the
//! prefixes, a uid, gid, volume or registry not listed: each is `PERMISSION_DENIED`. A
//! quota that would be exceeded is `RESOURCE_EXHAUSTED` naming the quota. Quotas count
//! what lives under the grant's names (like a Kubernetes namespace's ResourceQuota),
//! whoever created it.
//!
//! Ids are real ids: 1 to 2³¹−1 (uid 0 only with `allow_uid_zero`); `4294967295` is "-1",
//! which set*id reads as "unchanged", and is never valid.
//!
//! Method patterns: `"*"` (every method), `"<package>.<Service>/*"` (every method of a
//! service) or a full method name `"<package>.<Service>/<Method>"`. Each must name a
//! method auraed serves, so a typo fails at startup instead of silently denying.
//!
//! Name patterns: `"*"` (every name); `"team-a"` matches `team-a` and everything below it
//! (`team-a/api`) but not `team-ab`; `"scratch-*"` is a plain string prefix.

use std::{collections::BTreeSet, fs, path::Path};

use aurae_identity::SpiffeId;
use serde::{Deserialize, Serialize};

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
    #[error("policy grant #{index} ({id}): {field} {pattern:?} {reason}")]
    Field {
        index: usize,
        id: String,
        field: &'static str,
        pattern: String,
        reason: String,
    },
    #[error("policy: {0} has more than one grant; merge them into one")]
    Duplicate(String),
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    grant: Vec<GrantFile>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct GrantFile {
    id: String,
    methods: Vec<String>,
    names: Vec<String>,
    #[serde(default)]
    allow_host_namespaces: bool,
    #[serde(default)]
    allow_uid_zero: bool,
    #[serde(default)]
    allow_new_privileges: bool,
    #[serde(default)]
    allow_writable_drives: bool,
    #[serde(default)]
    allow_kvm: bool,
    #[serde(default)]
    uids: Vec<String>,
    #[serde(default)]
    gids: Vec<String>,
    #[serde(default)]
    volumes: Vec<String>,
    #[serde(default)]
    registries: Vec<String>,
    #[serde(default)]
    quota: Quota,
}

/// Most of each kind of resource under a grant's names; `None` is unbounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub cells: Option<u32>,
    pub executables: Option<u32>,
    pub vms: Option<u32>,
    /// Spawned instances.
    #[serde(default)]
    pub instances: Option<u32>,
    pub memory_bytes: Option<u64>,
}

use crate::spec::MAX_ID;

/// Inclusive id ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdRanges(Vec<(u32, u32)>);

impl IdRanges {
    pub fn all() -> Self {
        Self(vec![(1, MAX_ID)])
    }

    pub fn contains(&self, id: u32) -> bool {
        self.0.iter().any(|&(lo, hi)| lo <= id && id <= hi)
    }

    fn parse(list: &[String]) -> Result<Self, (String, String)> {
        let mut v = Vec::new();
        for r in list {
            let bad = |why: &str| (r.clone(), why.to_owned());
            let (lo, hi) = match r.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (r.trim(), r.trim()),
            };
            let lo: u32 = lo
                .parse()
                .map_err(|_| bad("must be an id or a range \"lo-hi\""))?;
            let hi: u32 = hi
                .parse()
                .map_err(|_| bad("must be an id or a range \"lo-hi\""))?;
            if lo > hi {
                return Err(bad("is an empty range"));
            }
            if lo == 0 {
                return Err(bad("includes 0: grant id 0 with allow_uid_zero instead"));
            }
            if hi > MAX_ID {
                return Err(bad(&format!(
                    "goes beyond {MAX_ID}: larger ids are not real ids without a user namespace"
                )));
            }
            v.push((lo, hi));
        }
        Ok(Self(v))
    }

    fn describe(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|&(lo, hi)| {
                if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                }
            })
            .collect()
    }
}

/// A registry (`host[:port]`) and optionally a repository path prefix below it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RegistryPattern {
    All,
    Repos { registry: String, path: String },
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
    pub allow_new_privileges: bool,
    pub allow_writable_drives: bool,
    pub allow_kvm: bool,
    pub uids: IdRanges,
    pub gids: IdRanges,
    /// Relative host paths (subtrees) below a volume or VM image root; `None`: all.
    volumes: Option<Vec<std::path::PathBuf>>,
    registries: Vec<RegistryPattern>,
    pub quota: Quota,
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
            allow_new_privileges: true,
            allow_writable_drives: true,
            allow_kvm: true,
            uids: IdRanges::all(),
            gids: IdRanges::all(),
            volumes: None,
            registries: vec![RegistryPattern::All],
            quota: Quota::default(),
        }
    }

    /// Whether a workload may run as `uid` (0 needs `allow_uid_zero`).
    pub fn allows_uid(&self, uid: u32) -> bool {
        if uid == 0 {
            self.allow_uid_zero
        } else {
            self.uids.contains(uid)
        }
    }

    /// Whether a workload may run as `gid` (0 needs `allow_uid_zero`).
    pub fn allows_gid(&self, gid: u32) -> bool {
        if gid == 0 {
            self.allow_uid_zero
        } else {
            self.gids.contains(gid)
        }
    }

    /// Whether the host path `rel` (relative to a volume or VM image root, already
    /// normalised: no `..`, no leading `/`) is one of the grant's volumes.
    pub fn allows_volume(&self, rel: &std::path::Path) -> bool {
        match &self.volumes {
            None => true,
            Some(v) => v.iter().any(|p| rel.starts_with(p)),
        }
    }

    /// Whether images may be pulled from `registry` (`host[:port]`) repository `repo`.
    pub fn allows_registry(&self, registry: &str, repo: &str) -> bool {
        self.registries.iter().any(|p| match p {
            RegistryPattern::All => true,
            RegistryPattern::Repos { registry: r, path } => {
                r == registry
                    && (path.is_empty()
                        || repo
                            .strip_prefix(path.as_str())
                            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')))
            }
        })
    }

    /// Everything the grant allows beyond methods and names (for `Daemon/Info`).
    pub fn describe_extra(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (on, what) in [
            (self.allow_host_namespaces, "allow_host_namespaces"),
            (self.allow_uid_zero, "allow_uid_zero"),
            (self.allow_new_privileges, "allow_new_privileges"),
            (self.allow_writable_drives, "allow_writable_drives"),
            (self.allow_kvm, "allow_kvm"),
        ] {
            if on {
                v.push(what.to_owned());
            }
        }
        v.push(format!("uids={}", self.uids.describe().join(",")));
        v.push(format!("gids={}", self.gids.describe().join(",")));
        v.push(match &self.volumes {
            None => "volumes=*".to_owned(),
            Some(p) => format!(
                "volumes={}",
                p.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        });
        v.push(format!(
            "registries={}",
            self.registries
                .iter()
                .map(|r| match r {
                    RegistryPattern::All => "*".to_owned(),
                    RegistryPattern::Repos { registry, path } if path.is_empty() =>
                        registry.clone(),
                    RegistryPattern::Repos { registry, path } => format!("{registry}/{path}"),
                })
                .collect::<Vec<_>>()
                .join(",")
        ));
        let q = self.quota;
        for (n, what) in [
            (q.cells.map(u64::from), "quota.cells"),
            (q.executables.map(u64::from), "quota.executables"),
            (q.vms.map(u64::from), "quota.vms"),
            (q.instances.map(u64::from), "quota.instances"),
            (q.memory_bytes, "quota.memory_bytes"),
        ] {
            if let Some(n) = n {
                v.push(format!("{what}={n}"));
            }
        }
        v
    }

    /// This grant as a policy file writes it, for identity `id` (a spawned instance's
    /// policy copies its spawner's grant).
    fn file(&self, id: &SpiffeId) -> GrantFile {
        let (methods, names) = self.describe();
        GrantFile {
            id: id.to_string(),
            methods,
            names,
            allow_host_namespaces: self.allow_host_namespaces,
            allow_uid_zero: self.allow_uid_zero,
            allow_new_privileges: self.allow_new_privileges,
            allow_writable_drives: self.allow_writable_drives,
            allow_kvm: self.allow_kvm,
            uids: self.uids.describe(),
            gids: self.gids.describe(),
            volumes: match &self.volumes {
                None => vec!["*".to_owned()],
                Some(v) => v.iter().map(|p| p.display().to_string()).collect(),
            },
            registries: self
                .registries
                .iter()
                .map(|r| match r {
                    RegistryPattern::All => "*".to_owned(),
                    RegistryPattern::Repos { registry, path } if path.is_empty() => {
                        registry.clone()
                    }
                    RegistryPattern::Repos { registry, path } => format!("{registry}/{path}"),
                })
                .collect(),
            quota: self.quota,
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
    /// This daemon's signing identity (`/instance/<node>` or, in a spawned instance, its
    /// own): an identity exactly one segment below it is one of our spawned instances and
    /// may call [`RENEW_METHOD`] (and only that) without a grant; the handler then checks
    /// that such an instance is running.
    instance_signer: Option<SpiffeId>,
}

/// The one method our own spawned instances may call without a grant: renewing their SVID.
pub const RENEW_METHOD: &str = "aurae.runtime.v0.Instances/Renew";

fn name_pattern_ok(p: &str) -> bool {
    p.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'/'))
        && !p.starts_with('/')
        && !p.ends_with('/')
        && !p.contains("//")
}

/// `"*"` (every path) or relative paths without `..`.
fn parse_volumes(list: &[String]) -> Result<Option<Vec<std::path::PathBuf>>, (String, String)> {
    use std::path::{Component, Path};
    if list.iter().any(|v| v == "*") {
        return Ok(None);
    }
    let mut out = Vec::new();
    for v in list {
        let p = Path::new(v);
        if v.is_empty()
            || !p
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err((
                v.clone(),
                "must be a path relative to a volume root, without '..' (or \"*\")".into(),
            ));
        }
        out.push(p.components().collect());
    }
    Ok(Some(out))
}

/// `"*"`, `host[:port]` or `host[:port]/repository/prefix`.
fn parse_registries(list: &[String]) -> Result<Vec<RegistryPattern>, (String, String)> {
    let mut out = Vec::new();
    for r in list {
        if r == "*" {
            out.push(RegistryPattern::All);
            continue;
        }
        let (registry, path) = r.split_once('/').unwrap_or((r.as_str(), ""));
        let ok_host = !registry.is_empty()
            && registry.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
            });
        let ok_path = path.is_empty()
            || (path.split('/').all(|s| {
                !s.is_empty()
                    && s.bytes().all(|b| {
                        b.is_ascii_lowercase()
                            || b.is_ascii_digit()
                            || matches!(b, b'.' | b'_' | b'-')
                    })
            }));
        if !ok_host || !ok_path {
            return Err((
                r.clone(),
                "must be \"*\", a registry host[:port], or host[:port]/repository/prefix".into(),
            ));
        }
        out.push(RegistryPattern::Repos {
            registry: registry.to_ascii_lowercase(),
            path: path.to_owned(),
        });
    }
    Ok(out)
}

impl Policy {
    /// The default policy: `admin` may do everything, nobody else anything.
    pub fn default_for(admin: SpiffeId) -> Self {
        Self {
            grants: vec![Grant::everything(admin)],
            instance_signer: None,
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
            let field_err =
                |field: &'static str, (pattern, reason): (String, String)| PolicyError::Field {
                    index,
                    id: id.to_string(),
                    field,
                    pattern,
                    reason,
                };
            let uids = IdRanges::parse(&g.uids).map_err(|e| field_err("uids", e))?;
            let gids = IdRanges::parse(&g.gids).map_err(|e| field_err("gids", e))?;
            let volumes = parse_volumes(&g.volumes).map_err(|e| field_err("volumes", e))?;
            let registries =
                parse_registries(&g.registries).map_err(|e| field_err("registries", e))?;
            grants.push(Grant {
                id,
                methods: mp,
                names: np,
                allow_host_namespaces: g.allow_host_namespaces,
                allow_uid_zero: g.allow_uid_zero,
                allow_new_privileges: g.allow_new_privileges,
                allow_writable_drives: g.allow_writable_drives,
                allow_kvm: g.allow_kvm,
                uids,
                gids,
                volumes,
                registries,
                quota: g.quota,
            });
        }
        Ok(Self {
            grants,
            instance_signer: None,
        })
    }

    /// Lets the instances signed by `signer` (one segment below it) renew their SVID.
    pub fn with_instance_signer(mut self, signer: Option<SpiffeId>) -> Self {
        self.instance_signer = signer;
        self
    }

    /// The grant of `id`, if it may call `method`.
    pub fn authorize(&self, id: &SpiffeId, method: &str) -> Option<Grant> {
        if let Some(g) = self
            .grants
            .iter()
            .find(|g| &g.id == id)
            .filter(|g| g.allows_method(method))
        {
            return Some(g.clone());
        }
        let signer = self.instance_signer.as_ref()?;
        let below = id.path().strip_prefix(signer.path())?.strip_prefix('/')?;
        (method == RENEW_METHOD
            && id.trust_domain() == signer.trust_domain()
            && !below.is_empty()
            && !below.contains('/'))
        .then(|| Grant {
            methods: vec![MethodPattern::Exact(RENEW_METHOD.to_owned())],
            names: Vec::new(),
            uids: IdRanges::default(),
            gids: IdRanges::default(),
            volumes: Some(Vec::new()),
            registries: Vec::new(),
            allow_host_namespaces: false,
            allow_uid_zero: false,
            allow_new_privileges: false,
            allow_writable_drives: false,
            allow_kvm: false,
            quota: Quota::default(),
            id: id.clone(),
        })
    }

    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// Why this policy lets nobody call anything, if it does (no grant, or no grant with
    /// a method): a daemon that would refuse every call, worth a warning at start.
    /// `origin` names the policy (its file).
    pub fn grants_nothing(&self, origin: &str) -> Option<String> {
        if self.grants.is_empty() {
            return Some(format!(
                "the policy {origin} has no grant: every call is refused (PERMISSION_DENIED); \
                 add a [[grant]] with an id and methods"
            ));
        }
        self.grants.iter().all(|g| g.methods.is_empty()).then(|| {
            format!(
                "the policy {origin} grants no method to any identity (its grants list none): \
                 every call is refused (PERMISSION_DENIED); list methods in a grant (\"*\" for \
                 all)"
            )
        })
    }

    /// A policy file (TOML) with these grants, each for the identity given beside it:
    /// what a parent writes for the instance it spawns. It parses back to the same grants.
    pub fn render(grants: &[(&SpiffeId, &Grant)]) -> String {
        let file = PolicyFile {
            grant: grants.iter().map(|(id, g)| g.file(id)).collect(),
        };
        toml::to_string(&file).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

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
    fn a_policy_that_grants_nothing_says_so() {
        let empty = parse("").unwrap().grants_nothing("p.toml").unwrap();
        assert!(
            empty.contains("p.toml") && empty.contains("no grant"),
            "{empty}"
        );
        let no_methods = parse(
            r#"
            [[grant]]
            id = "spiffe://aurae.local/operator/alice"
            methods = []
            names = ["*"]
            "#,
        )
        .unwrap()
        .grants_nothing("p.toml")
        .unwrap();
        assert!(no_methods.contains("grants no method"), "{no_methods}");
        let some = parse(
            r#"
            [[grant]]
            id = "spiffe://aurae.local/operator/alice"
            methods = []
            names = ["*"]
            [[grant]]
            id = "spiffe://aurae.local/operator/bob"
            methods = ["aurae.runtime.v0.Cells/Free"]
            names = []
            "#,
        )
        .unwrap();
        assert_eq!(some.grants_nothing("p.toml"), None);
        assert_eq!(
            Policy::default_for(id("spiffe://aurae.local/operator/admin")).grants_nothing("x"),
            None
        );
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
    fn ids_volumes_registries_and_quotas() {
        let p = parse(
            r#"
            [[grant]]
            id = "spiffe://aurae.local/operator/alice"
            methods = ["*"]
            names = ["team-a"]
            uids = ["1000-1999", "5"]
            gids = ["100"]
            volumes = ["team-a", "shared/ro"]
            registries = ["127.0.0.1:5000/team-a", "ghcr.io"]
            [grant.quota]
            cells = 3
            memory_bytes = 1073741824

            [[grant]]
            id = "spiffe://aurae.local/operator/bob"
            methods = ["*"]
            names = ["team-b"]
            "#,
        )
        .unwrap();
        let a = &p.grants()[0];
        assert!(a.allows_uid(1000) && a.allows_uid(1999) && a.allows_uid(5));
        assert!(!a.allows_uid(0) && !a.allows_uid(999) && !a.allows_uid(2000));
        assert!(!a.allows_uid(u32::MAX) && !a.allows_uid(1 << 31));
        assert!(a.allows_gid(100) && !a.allows_gid(0) && !a.allows_gid(42));
        assert!(a.allows_volume(Path::new("team-a")));
        assert!(a.allows_volume(Path::new("team-a/db")));
        assert!(!a.allows_volume(Path::new("team-ab")));
        assert!(!a.allows_volume(Path::new("team-b/db")));
        assert!(a.allows_volume(Path::new("shared/ro/x")));
        assert!(!a.allows_volume(Path::new("shared")));
        assert!(a.allows_registry("127.0.0.1:5000", "team-a"));
        assert!(a.allows_registry("127.0.0.1:5000", "team-a/app"));
        assert!(!a.allows_registry("127.0.0.1:5000", "team-ab/app"));
        assert!(!a.allows_registry("127.0.0.1:5001", "team-a/app"));
        assert!(a.allows_registry("ghcr.io", "anything/at/all"));
        assert!(!a.allows_registry("docker.io", "library/busybox"));
        assert_eq!(a.quota.cells, Some(3));
        assert_eq!(a.quota.memory_bytes, Some(1 << 30));
        assert_eq!(a.quota.executables, None);
        // Deny by default: no uids, gids, volumes, registries, privileges.
        let b = &p.grants()[1];
        assert!(!b.allows_uid(0) && !b.allows_uid(1000) && !b.allows_gid(1000));
        assert!(!b.allows_volume(Path::new("team-b")));
        assert!(!b.allows_registry("127.0.0.1:5000", "team-b"));
        assert!(!b.allow_new_privileges && !b.allow_writable_drives);
        assert_eq!(b.quota, Quota::default());
        // The admin grant of the default policy may do all of it.
        let admin = Grant::everything(id("spiffe://aurae.local/operator/admin"));
        assert!(admin.allows_uid(0) && admin.allows_uid(super::MAX_ID));
        assert!(
            !admin.allows_uid(u32::MAX),
            "-1 is never an id, not even for admin"
        );
        assert!(admin.allows_volume(Path::new("x")) && admin.allows_registry("a", "b"));
    }

    #[test]
    fn bad_ids_volumes_and_registries_are_refused() {
        let g = |extra: &str| {
            format!("[[grant]]\nid = \"spiffe://aurae.local/x\"\nmethods=[]\nnames=[]\n{extra}")
        };
        for (extra, want) in [
            ("uids = [\"0-10\"]", "allow_uid_zero"),
            ("uids = [\"0\"]", "allow_uid_zero"),
            ("gids = [\"1-4294967295\"]", "beyond"),
            ("uids = [\"2147483648\"]", "beyond"),
            ("uids = [\"10-5\"]", "empty range"),
            ("uids = [\"-1\"]", "an id or a range"),
            ("uids = [\"abc\"]", "an id or a range"),
            ("volumes = [\"../etc\"]", "without '..'"),
            ("volumes = [\"/etc\"]", "without '..'"),
            ("volumes = [\"\"]", "without '..'"),
            ("registries = [\"\"]", "host[:port]"),
            ("registries = [\"evil host\"]", "host[:port]"),
            ("registries = [\"r.io/Up\"]", "host[:port]"),
            ("registries = [\"r.io//x\"]", "host[:port]"),
            ("[grant.quota]\ncells = -1", "does not parse"),
            ("[grant.quota]\nthreads = 1", "does not parse"),
        ] {
            let err = parse(&g(extra)).unwrap_err().to_string();
            assert!(err.contains(want), "{extra:?}: {err}");
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
