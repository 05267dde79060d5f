//! `aer pod …`: RunPod and the Pods service (a container in a spawned instance).

use aurae_client::Client;
use aurae_proto::runtime::v0::{self as pb, pods_client::PodsClient};
use clap::Subcommand;
use serde_json::json;
use tonic::{Status, transport::Channel};

use super::{
    lifecycle::{self, Lifecycle, kind},
    logs_from_start, phase, stream_logs,
};
use crate::output::{Format, Row, print};

#[derive(Debug, Subcommand)]
pub enum PodCmd {
    Run {
        name: String,
        #[arg(long)]
        image: String,
        #[arg(long, default_value_t = 0)]
        port: u32,
    },
    #[command(flatten)]
    Lifecycle(Lifecycle),
    Logs {
        name: String,
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

fn pod_row(s: &pb::PodStatus) -> Row {
    vec![
        ("name", json!(s.name)),
        ("phase", phase(s.phase)),
        ("endpoint", json!(s.endpoint)),
        ("message", json!(s.message)),
    ]
}

kind!(PodsClient<Channel>, pb::PodStatus, pods, pod_row);

pub async fn run(c: &Client, cmd: PodCmd, fmt: Format) -> Result<(), Status> {
    match cmd {
        PodCmd::Run { name, image, port } => {
            let pod = pb::Pod {
                name,
                container: Some(pb::Container {
                    image,
                    ..Default::default()
                }),
                listen_port: port,
                ..Default::default()
            };
            let s = c.runtime().run_pod(pod).await?.into_inner();
            print(fmt, &[pod_row(&s)], true);
        }
        PodCmd::Lifecycle(cmd) => lifecycle::run(c.pods(), cmd, fmt).await?,
        PodCmd::Logs { name, follow } => {
            let logs = c.pods().logs(logs_from_start(name, follow)).await?;
            stream_logs(logs.into_inner()).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Command, parse};

    #[test]
    fn pod_run_logs_and_lifecycle_parse() {
        assert!(matches!(
            parse("pod run p1 --image x --port 80").unwrap(),
            Command::Pod(PodCmd::Run { name, image, port: 80 }) if name == "p1" && image == "x"
        ));
        assert!(matches!(
            parse("pod run p1 --image x").unwrap(),
            Command::Pod(PodCmd::Run { port: 0, .. })
        ));
        assert!(matches!(
            parse("pod logs p1 --follow").unwrap(),
            Command::Pod(PodCmd::Logs { follow: true, .. })
        ));
        assert!(matches!(
            parse("pod free p1").unwrap(),
            Command::Pod(PodCmd::Lifecycle(Lifecycle::Free { name })) if name == "p1"
        ));
    }
}
