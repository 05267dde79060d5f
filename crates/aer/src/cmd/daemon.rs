//! auraed itself: `aer health` (gRPC health), `aer info` and `aer version` (Daemon/Info),
//! `aer shutdown` (Daemon/Shutdown).

use std::time::Duration;

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use clap::Args;
use serde_json::json;
use tonic::Status;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use super::ts;
use crate::{
    output::{Format, Row, print},
    units::{parse_duration, proto_duration},
};

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// A service name, e.g. aurae.runtime.v0.Runtime ("" = the whole server).
    #[arg(long, default_value = "", value_name = "SERVICE")]
    service: String,
    /// Wait until auraed serves, trying again every 100 ms for at most this long, e.g.
    /// 10s (for scripts that have just started it).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub wait: Option<Duration>,
}

/// Connects to auraed; with `wait`, keeps trying (connection and health both) until it
/// answers SERVING or `wait` has passed, then reports the last failure.
pub async fn connect_waiting(
    cfg: &aurae_client::ClientConfig,
    wait: Option<Duration>,
) -> anyhow::Result<Client> {
    let Some(wait) = wait else {
        return Ok(Client::connect(cfg).await?);
    };
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let last = match Client::connect(cfg).await {
            Ok(c) => {
                let req = HealthCheckRequest {
                    service: String::new(),
                };
                match c.health().check(req).await {
                    Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => return Ok(c),
                    Ok(r) => anyhow::anyhow!("auraed answers health {:?}", r.get_ref().status),
                    Err(s) => anyhow::anyhow!("health: {}", s.message()),
                }
            }
            // Missing certificates or a bad config do not mend by waiting; a socket not
            // there yet does.
            Err(
                e @ aurae_client::ClientError::Config(
                    aurae_client::ConfigError::Missing { .. }
                    | aurae_client::ConfigError::File { .. }
                    | aurae_client::ConfigError::BothEndpoints,
                ),
            ) => return Err(e.into()),
            Err(e) => e.into(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(last.context(format!("auraed did not serve within {wait:?}")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Debug, Args)]
pub struct ShutdownArgs {
    /// Time workloads get to stop before they are killed, e.g. 10s or 500ms.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    grace: Option<Duration>,
}

/// How much of Daemon/Info to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// `aer version`: the two versions.
    Versions,
    /// `aer info`: also who auraed is, who the caller is and what it is granted.
    Everything,
}

pub async fn health(c: &Client, a: HealthArgs, fmt: Format) -> Result<(), Status> {
    let req = HealthCheckRequest {
        service: a.service.clone(),
    };
    let r = c.health().check(req).await?.into_inner();
    let status = ServingStatus::try_from(r.status).map_or("UNKNOWN", |s| s.as_str_name());
    let row = vec![("service", json!(a.service)), ("status", json!(status))];
    print(fmt, &[row], true);
    Ok(())
}

pub async fn info(c: &Client, detail: Detail, fmt: Format) -> Result<(), Status> {
    let i = c.daemon().info(pb::InfoRequest {}).await?.into_inner();
    print(fmt, &[info_row(&i, detail, fmt)], true);
    Ok(())
}

fn info_row(i: &pb::DaemonInfo, detail: Detail, fmt: Format) -> Row {
    let mut row: Row = vec![
        ("aer_version", json!(env!("CARGO_PKG_VERSION"))),
        ("auraed_version", json!(i.version)),
    ];
    if detail == Detail::Everything {
        row.extend([
            ("mode", json!(i.mode)),
            ("server_id", json!(i.server_id)),
            ("you", json!(i.peer_id)),
            ("started_at", ts(i.started_at.as_ref())),
            ("cgroup_controllers", json!(i.cgroup_controllers)),
            ("granted_methods", json!(i.granted_methods)),
            ("granted_names", json!(i.granted_prefixes)),
            ("granted_extras", json!(i.granted_extras)),
            ("warnings", json!(i.warnings)),
            ("parent_id", json!(i.parent_id)),
            ("depth", json!(i.depth)),
        ]);
        // A spawned instance's generated policy (TOML) is long: tables show it only when
        // there is one.
        if fmt == Format::Json || !i.policy.is_empty() {
            row.push(("policy", json!(i.policy)));
        }
    }
    row
}

pub async fn shutdown(c: &Client, a: ShutdownArgs) -> Result<(), Status> {
    let req = pb::ShutdownRequest {
        grace_period: a.grace.map(proto_duration),
        reboot: false,
    };
    c.daemon().shutdown(req).await?;
    println!("auraed is shutting down");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Command, parse};

    #[test]
    fn daemon_commands_parse() {
        let Command::Health(h) = parse("health").unwrap() else {
            panic!("not aer health")
        };
        assert_eq!(h.service, "");
        let Command::Health(h) = parse("health --service aurae.runtime.v0.Runtime").unwrap() else {
            panic!("not aer health")
        };
        assert_eq!(h.service, "aurae.runtime.v0.Runtime");
        let Command::Shutdown(s) = parse("shutdown --grace 10s").unwrap() else {
            panic!("not aer shutdown")
        };
        assert_eq!(s.grace, Some(Duration::from_secs(10)));
        assert!(parse("shutdown --grace 1d").is_err());
        assert!(matches!(parse("info").unwrap(), Command::Info));
        assert!(matches!(
            parse("--instance a/b info").unwrap(),
            Command::Info
        ));
        assert!(matches!(
            parse("-o json version").unwrap(),
            Command::Version
        ));
    }

    #[test]
    fn info_shows_the_instance_fields() {
        let keys = |r: &Row| r.iter().map(|(k, _)| *k).collect::<Vec<_>>();
        let top = pb::DaemonInfo::default();
        let child = pb::DaemonInfo {
            policy: "[[grant]]\n".into(),
            parent_id: "spiffe://aurae.local/auraed".into(),
            depth: 1,
            ..Default::default()
        };
        let table = info_row(&top, Detail::Everything, Format::Table);
        assert!(keys(&table).contains(&"parent_id") && keys(&table).contains(&"depth"));
        assert!(!keys(&table).contains(&"policy"), "no policy, no row");
        assert!(keys(&info_row(&top, Detail::Everything, Format::Json)).contains(&"policy"));
        let row = info_row(&child, Detail::Everything, Format::Table);
        let get = |k| row.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(get("policy"), Some(json!("[[grant]]\n")));
        assert_eq!(get("depth"), Some(json!(1)));
        assert_eq!(get("parent_id"), Some(json!("spiffe://aurae.local/auraed")));
        let versions = info_row(&child, Detail::Versions, Format::Json);
        assert_eq!(keys(&versions), ["aer_version", "auraed_version"]);
    }
}
