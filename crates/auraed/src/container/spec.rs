//! The validated `Container` of a request (RunCell, sidecars, RunPod).

use std::collections::BTreeMap;

use aurae_proto::runtime::v0 as pb;

use crate::spec::{FieldError, abs_path, id};

/// A container to run in a cell (RunCell, RunPod).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContainerSpec {
    pub image: String,
    pub entrypoint: Vec<String>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<std::path::PathBuf>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub read_only_root: bool,
    pub volumes: Vec<(std::path::PathBuf, std::path::PathBuf, bool)>,
    /// Asked for no_new_privs whatever the grant allows.
    pub no_new_privileges: bool,
    /// The container's `/etc/resolv.conf`; none: the image's.
    #[serde(default)]
    pub dns: Option<Dns>,
}

/// DNS settings, checked as what the resolver will read: one token per value, nothing that
/// could start a new line or directive.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Dns {
    pub servers: Vec<std::net::IpAddr>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

/// Most name servers glibc's and musl's resolvers read (`MAXNS`).
const MAX_DNS_SERVERS: usize = 3;
const MAX_DNS_SEARCHES: usize = 32;
const MAX_DNS_OPTIONS: usize = 16;

impl Dns {
    pub fn parse(field: &str, d: &pb::ContainerDns) -> Result<Self, FieldError> {
        if d.servers.len() > MAX_DNS_SERVERS {
            return Err(FieldError::new(
                format!("{field}.servers"),
                format!("more than {MAX_DNS_SERVERS} (the resolver reads no more)"),
            ));
        }
        let servers = d
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse::<std::net::IpAddr>().map_err(|_| {
                    FieldError::new(
                        format!("{field}.servers[{i}]"),
                        format!("{s:?} is not an IP address"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        if d.searches.len() > MAX_DNS_SEARCHES {
            return Err(FieldError::new(
                format!("{field}.searches"),
                format!("more than {MAX_DNS_SEARCHES}"),
            ));
        }
        for (i, s) in d.searches.iter().enumerate() {
            let name = s.strip_suffix('.').unwrap_or(s);
            let ok = !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
            if !ok {
                return Err(FieldError::new(
                    format!("{field}.searches[{i}]"),
                    format!("{s:?} is not a DNS name"),
                ));
            }
        }
        if d.options.len() > MAX_DNS_OPTIONS {
            return Err(FieldError::new(
                format!("{field}.options"),
                format!("more than {MAX_DNS_OPTIONS}"),
            ));
        }
        for (i, o) in d.options.iter().enumerate() {
            if o.is_empty()
                || o.len() > 64
                || !o
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:+".contains(&b))
            {
                return Err(FieldError::new(
                    format!("{field}.options[{i}]"),
                    format!("{o:?} is not a resolver option (one word, [A-Za-z0-9._:+-])"),
                ));
            }
        }
        Ok(Self {
            servers,
            searches: d.searches.clone(),
            options: d.options.clone(),
        })
    }
}

impl ContainerSpec {
    pub fn parse(field: &str, c: Option<pb::Container>) -> Result<Self, FieldError> {
        let c = c.ok_or_else(|| FieldError::new(field, "is missing: give at least an image"))?;
        if c.image.is_empty()
            || c.image.len() > 1024
            || c.image.chars().any(|ch| ch.is_whitespace() || ch == '\0')
        {
            return Err(FieldError::new(
                format!("{field}.image"),
                format!("{:?} is not an image reference", c.image),
            ));
        }
        for (k, v) in &c.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(FieldError::new(
                    format!("{field}.env[{k:?}]"),
                    "invalid variable name or value",
                ));
            }
        }
        if c.entrypoint.iter().chain(&c.args).any(|a| a.contains('\0')) {
            return Err(FieldError::new(
                format!("{field}.args"),
                "an argument contains NUL",
            ));
        }
        let working_dir = if c.working_dir.is_empty() {
            None
        } else {
            Some(abs_path(&format!("{field}.working_dir"), &c.working_dir)?)
        };
        let mut volumes = Vec::new();
        for (i, v) in c.volumes.iter().enumerate() {
            volumes.push((
                abs_path(&format!("{field}.volumes[{i}].host_path"), &v.host_path)?,
                abs_path(
                    &format!("{field}.volumes[{i}].container_path"),
                    &v.container_path,
                )?,
                v.read_only,
            ));
        }
        Ok(Self {
            image: c.image,
            entrypoint: c.entrypoint,
            args: c.args,
            env: c.env.into_iter().collect(),
            working_dir,
            uid: c.uid.map(|v| id(&format!("{field}.uid"), v)).transpose()?,
            gid: c.gid.map(|v| id(&format!("{field}.gid"), v)).transpose()?,
            read_only_root: c.read_only_root,
            volumes,
            no_new_privileges: c.no_new_privileges,
            dns: c
                .dns
                .as_ref()
                .map(|d| Dns::parse(&format!("{field}.dns"), d))
                .transpose()?,
        })
    }
}
