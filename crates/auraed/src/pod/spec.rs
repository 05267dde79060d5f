//! Validated RunPod requests.

use aurae_proto::runtime::v0 as pb;

use crate::{
    cell::spec::Limits,
    container::ContainerSpec,
    instance::spec::InstanceSpec,
    spec::{FieldError, Label},
};

/// What a cell-isolated instance needs of its own memory beside a pod's container: its
/// auraed and the image unpacked in its tmpfs.
pub const CELL_OVERHEAD: u64 = 128 << 20;
/// What a microVM instance needs of its own: the guest kernel, the initramfs (auraed, its
/// modules) unpacked in guest memory, auraed and the image. (A 160 MiB guest did not boot.)
pub const VM_OVERHEAD: u64 = 256 << 20;

/// The instance's own share for `isolation` (AUTO may become a microVM).
pub fn overhead(isolation: pb::Isolation) -> u64 {
    match isolation {
        pb::Isolation::Cell => CELL_OVERHEAD,
        _ => VM_OVERHEAD,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PodSpec {
    pub name: Label,
    pub container: ContainerSpec,
    pub listen_port: Option<u16>,
    pub limits: Limits,
    pub instance: InstanceSpec,
    /// The container and limits as the request gave them, for the instance's RunCell
    /// (validated above; the image is replaced by its digest reference).
    pub forward: (pb::Container, Option<pb::CellLimits>),
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
        let forward = (p.container.clone().unwrap_or_default(), p.limits.clone());
        let container = ContainerSpec::parse("container", p.container)?;
        if !container.volumes.is_empty() {
            return Err(FieldError::new(
                "container.volumes",
                "a pod's container takes no host volumes (its instance has no host paths)",
            ));
        }
        let limits = Limits::parse("limits", p.limits, cpus)?;
        let mut i = p.instance.unwrap_or_default();
        let own = overhead(pb::Isolation::try_from(i.isolation).unwrap_or_default());
        if i.memory_bytes == 0
            && let Some(max) = limits.memory_max
        {
            // The whole pod's bound on this machine: the container's and the instance's own.
            i.memory_bytes = max.saturating_add(own).next_multiple_of(2 << 20);
        }
        let instance = InstanceSpec::parse("instance.", i, Some(name.clone()))?;
        if let Some(max) = limits.memory_max
            && max.saturating_add(own) > instance.memory_bytes
        {
            return Err(FieldError::new(
                "limits.memory_max_bytes",
                format!(
                    "{max} does not fit in instance.memory_bytes {} with the instance's own {} MiB \
                     (its auraed, kernel and image): raise instance.memory_bytes or leave it unset",
                    instance.memory_bytes,
                    own >> 20
                ),
            ));
        }
        Ok(Self {
            container,
            listen_port,
            limits,
            instance,
            name,
            forward,
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
        // The container's memory limit sizes the instance unless the request does; a
        // limit that leaves the instance nothing of its own is refused.
        let sized = PodSpec::parse(
            pb::Pod {
                limits: Some(pb::CellLimits {
                    memory_max_bytes: Some(64 << 20),
                    ..Default::default()
                }),
                listen_port: 8080,
                ..p.clone()
            },
            2,
        )
        .unwrap();
        assert_eq!(sized.instance.memory_bytes, (64 << 20) + VM_OVERHEAD);
        let tight = pb::Pod {
            limits: Some(pb::CellLimits {
                memory_max_bytes: Some(500 << 20),
                ..Default::default()
            }),
            instance: Some(pb::Instance {
                memory_bytes: 512 << 20,
                ..Default::default()
            }),
            listen_port: 8080,
            ..p.clone()
        };
        let e = PodSpec::parse(tight, 2).unwrap_err();
        assert_eq!(e.field, "limits.memory_max_bytes", "{e:?}");
        let with_volume = pb::Pod {
            container: Some(pb::Container {
                image: "busybox".into(),
                volumes: vec![pb::Volume {
                    host_path: "/srv".into(),
                    container_path: "/srv".into(),
                    read_only: true,
                }],
                ..Default::default()
            }),
            listen_port: 8080,
            ..p.clone()
        };
        assert_eq!(
            PodSpec::parse(with_volume, 2).unwrap_err().field,
            "container.volumes"
        );
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
