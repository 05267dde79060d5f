//! Validated RunPod requests.

use aurae_proto::runtime::v0 as pb;

use crate::{
    cell::spec::Limits,
    container::ContainerSpec,
    instance::spec::InstanceSpec,
    spec::{FieldError, Label},
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub name: Label,
    pub container: ContainerSpec,
    pub listen_port: Option<u16>,
    pub limits: Limits,
    pub instance: InstanceSpec,
}

impl PodSpec {
    pub fn parse(p: pb::Pod, cpus: u64) -> Result<Self, FieldError> {
        let name = Label::parse("name", &p.name)?;
        let listen_port = match p.listen_port {
            0 => None,
            n => Some(u16::try_from(n).map_err(|_| {
                FieldError::new("listen_port", format!("{n} is outside 1..=65535"))
            })?),
        };
        Ok(Self {
            container: ContainerSpec::parse("container", p.container)?,
            listen_port,
            limits: Limits::parse("limits", p.limits, cpus)?,
            instance: InstanceSpec::parse(
                "instance.",
                p.instance.unwrap_or_default(),
                Some(name.clone()),
            )?,
            name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_validate_port_and_container() {
        let p = pb::Pod {
            name: "p1".into(),
            container: Some(pb::Container {
                image: "busybox".into(),
                ..Default::default()
            }),
            listen_port: 70_000,
            ..Default::default()
        };
        assert_eq!(
            PodSpec::parse(p.clone(), 2).unwrap_err().field,
            "listen_port"
        );
        let ok = PodSpec::parse(
            pb::Pod {
                listen_port: 8080,
                ..p.clone()
            },
            2,
        )
        .unwrap();
        assert_eq!(ok.instance.name.as_str(), "p1");
        assert_eq!(
            PodSpec::parse(
                pb::Pod {
                    container: None,
                    listen_port: 8080,
                    ..p
                },
                2
            )
            .unwrap_err()
            .field,
            "container"
        );
    }
}
