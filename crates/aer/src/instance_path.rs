//! `--instance a/b/c`: running a command in a spawned instance (or an instance of an
//! instance …) by connecting through the daemons above it, one hop per path segment.

use std::{fmt, str::FromStr};

use anyhow::Context;
use aurae_client::{Client, ClientConfig};
use aurae_identity::SpiffeId;
use aurae_proto::runtime::v0 as pb;
use tonic::Status;

use crate::cmd::{name, phase};

/// Longest segment (a DNS label, RFC 1123).
const MAX_LABEL: usize = 63;

/// Instance names from the configured daemon down: `a/b/c` is instance `c` of instance
/// `b` of instance `a` of the daemon `aer` connects to. Each is a DNS label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstancePath(Vec<String>);

impl InstancePath {
    pub fn segments(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Display for InstancePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("/"))
    }
}

/// Why `s` is not a DNS label (as auraed checks instance names), or `None`.
fn label_reason(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        Some("is empty")
    } else if s.len() > MAX_LABEL {
        Some("is longer than 63 characters")
    } else if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("may contain only lowercase letters, digits and '-'")
    } else if s.starts_with('-') || s.ends_with('-') {
        Some("must not start or end with '-'")
    } else {
        None
    }
}

impl FromStr for InstancePath {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("an instance path is NAME or NAME/NAME/…, not empty".into());
        }
        if s.starts_with('/') || s.ends_with('/') {
            return Err(format!(
                "{s:?}: no leading or trailing '/' (write NAME or a/b/c)"
            ));
        }
        let segments: Vec<String> = s.split('/').map(str::to_owned).collect();
        for seg in &segments {
            if let Some(why) = label_reason(seg) {
                return Err(format!(
                    "{s:?}: segment {seg:?} {why} (each segment is an instance name)"
                ));
            }
        }
        Ok(Self(segments))
    }
}

/// Connects through every instance of `path` in turn, starting from `client` (connected
/// to the configured daemon): asks the current daemon for the next segment
/// (Instances/Get), which must be running with an endpoint and a SPIFFE ID, then connects
/// to that endpoint with `cfg`'s CA and identity, requiring the instance to present
/// exactly that SPIFFE ID. Returns the client of the last instance.
///
/// A failed Get, or an instance that is not running, is a [`Status`] (downcast it to keep
/// its exit code) whose message names the segment; a failed connection is any other error.
pub async fn resolve(
    cfg: &ClientConfig,
    mut client: Client,
    path: &InstancePath,
) -> anyhow::Result<Client> {
    let mut via = "the configured auraed".to_owned();
    for (i, seg) in path.segments().iter().enumerate() {
        let at = path.0[..=i].join("/");
        let s = client
            .instances()
            .get(name(seg))
            .await
            .map_err(|e| {
                Status::new(
                    e.code(),
                    format!(
                        "--instance {path}: instance {seg:?} on {via}: {}",
                        e.message()
                    ),
                )
            })?
            .into_inner();
        let target = reachable(&s).map_err(|why| {
            Status::failed_precondition(format!("--instance {path}: instance {at:?} {why}"))
        })?;
        let id: SpiffeId = target.1.parse().with_context(|| {
            format!(
                "--instance {path}: instance {at:?} reports SPIFFE ID {:?}",
                target.1
            )
        })?;
        client = Client::connect_instance(cfg, target.0, &id)
            .await
            .with_context(|| {
                format!(
                    "--instance {path}: connecting to instance {at:?} ({id}) at {}",
                    target.0
                )
            })?;
        via = format!("instance {at:?}");
    }
    Ok(client)
}

/// The endpoint and SPIFFE ID of a running instance, or why it cannot be reached: its
/// phase and message when it is not running.
fn reachable(s: &pb::InstanceStatus) -> Result<(&str, &str), String> {
    let running = s.phase == pb::Phase::Running as i32;
    let phase = phase(s.phase);
    let phase = phase.as_str().unwrap_or("unknown");
    let message = if s.message.is_empty() {
        String::new()
    } else {
        format!(": {}", s.message)
    };
    if !running {
        return Err(format!("is {phase}, not running{message}"));
    }
    if s.endpoint.is_empty() || s.spiffe_id.is_empty() {
        return Err(format!(
            "is running but reports no endpoint or SPIFFE ID yet{message}"
        ));
    }
    Ok((&s.endpoint, &s.spiffe_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(s: &str) -> Vec<String> {
        s.parse::<InstancePath>().unwrap().segments().to_vec()
    }

    #[test]
    fn good_paths_split_at_slashes() {
        assert_eq!(segs("web"), ["web"]);
        assert_eq!(segs("a/b-2/c"), ["a", "b-2", "c"]);
        assert_eq!(segs(&"x".repeat(63)), ["x".repeat(63)]);
        assert_eq!(
            "a/b/c".parse::<InstancePath>().unwrap().to_string(),
            "a/b/c"
        );
    }

    #[test]
    fn bad_paths_are_refused_with_the_reason() {
        let err = |s: &str| s.parse::<InstancePath>().unwrap_err();
        assert!(err("").contains("not empty"));
        assert!(err("/a").contains("leading or trailing"));
        assert!(err("a/").contains("leading or trailing"));
        assert!(err("/").contains("leading or trailing"));
        assert!(err("a//b").contains(r#"segment "" is empty"#));
        assert!(err("a/B").contains("lowercase"));
        assert!(err("a_b").contains("lowercase"));
        assert!(err("a/b.c").contains("lowercase"));
        assert!(err("-a").contains("start or end"));
        assert!(err("a/b-").contains("start or end"));
        assert!(err(&"x".repeat(64)).contains("longer than 63"));
    }

    #[test]
    fn only_running_instances_with_an_endpoint_and_id_are_reachable() {
        let st = |phase: pb::Phase, endpoint: &str, id: &str, message: &str| pb::InstanceStatus {
            name: "b".into(),
            phase: phase as i32,
            endpoint: endpoint.into(),
            spiffe_id: id.into(),
            message: message.into(),
            ..Default::default()
        };
        let id = "spiffe://aurae.local/instance/node/b";
        let ok = st(pb::Phase::Running, "10.200.0.2:8443", id, "");
        assert_eq!(reachable(&ok), Ok(("10.200.0.2:8443", id)));
        let failed = st(pb::Phase::Failed, "", id, "no usable KVM");
        let why = reachable(&failed).unwrap_err();
        assert_eq!(why, "is failed, not running: no usable KVM");
        let starting = st(pb::Phase::Starting, "", "", "");
        assert_eq!(
            reachable(&starting).unwrap_err(),
            "is starting, not running"
        );
        let no_endpoint = st(pb::Phase::Running, "", id, "");
        assert!(reachable(&no_endpoint).unwrap_err().contains("no endpoint"));
        let no_id = st(pb::Phase::Running, "10.200.0.2:8443", "", "");
        assert!(reachable(&no_id).unwrap_err().contains("no endpoint"));
    }
}
