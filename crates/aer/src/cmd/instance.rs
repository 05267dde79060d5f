//! `aer instance …`: Spawn and the Instances service (spawned auraed instances).

use aurae_client::Client;
use aurae_proto::runtime::v0::{self as pb, instances_client::InstancesClient};
use clap::Subcommand;
use serde_json::json;
use tonic::{Status, transport::Channel};

use super::{
    lifecycle::{self, Lifecycle, kind},
    phase,
};
use crate::{
    output::{Format, Row, print},
    units::parse_size,
};

#[derive(Debug, Subcommand)]
pub enum InstanceCmd {
    Spawn {
        name: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, value_parser = parse_size, default_value = "512M")]
        memory: u64,
    },
    #[command(flatten)]
    Lifecycle(Lifecycle),
}

fn instance_row(s: &pb::InstanceStatus) -> Row {
    vec![
        ("name", json!(s.name)),
        ("phase", phase(s.phase)),
        ("spiffe_id", json!(s.spiffe_id)),
        ("endpoint", json!(s.endpoint)),
        ("message", json!(s.message)),
    ]
}

kind!(
    InstancesClient<Channel>,
    pb::InstanceStatus,
    instances,
    instance_row
);

pub async fn run(c: &Client, cmd: InstanceCmd, fmt: Format) -> Result<(), Status> {
    match cmd {
        InstanceCmd::Spawn {
            name,
            vcpus,
            memory,
        } => {
            let instance = pb::Instance {
                name,
                vcpus,
                memory_bytes: memory,
                ..Default::default()
            };
            let s = c.runtime().spawn(instance).await?.into_inner();
            print(fmt, &[instance_row(&s)], true);
        }
        InstanceCmd::Lifecycle(cmd) => lifecycle::run(c.instances(), cmd, fmt).await?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Command, parse};

    #[test]
    fn instance_spawn_and_lifecycle_parse() {
        let Command::Instance(InstanceCmd::Spawn {
            name,
            vcpus,
            memory,
        }) = parse("instance spawn i1 --memory 1G").unwrap()
        else {
            panic!("not instance spawn")
        };
        assert_eq!((name.as_str(), vcpus, memory), ("i1", 1, 1 << 30));
        let Command::Instance(InstanceCmd::Spawn { memory, .. }) =
            parse("instance spawn i2").unwrap()
        else {
            panic!("not instance spawn")
        };
        assert_eq!(memory, 512 << 20);
        assert!(matches!(
            parse("instance wait i1").unwrap(),
            Command::Instance(InstanceCmd::Lifecycle(Lifecycle::Wait { name })) if name == "i1"
        ));
        assert!(parse("instance console i1").is_err());
    }
}
