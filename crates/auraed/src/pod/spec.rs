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
    /// The request left the instance's memory to us (sized from the container's limit
    /// and, once known, the image).
    pub memory_derived: bool,
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
        if !i.kernel_path.is_empty() || !i.initramfs_path.is_empty() {
            return Err(FieldError::new(
                "instance.kernel_path",
                "a pod's instance boots the kernel its parent was configured with \
                 (--instance-kernel); a request cannot choose another",
            ));
        }
        let memory_derived = i.memory_bytes == 0;
        let own = overhead(pb::Isolation::try_from(i.isolation).unwrap_or_default());
        if i.memory_bytes == 0
            && let Some(max) = limits.memory_max
        {
            // The whole pod's bound on this machine: the container's and the instance's own.
            i.memory_bytes = max
                .checked_add(own)
                .and_then(|m| m.checked_next_multiple_of(2 << 20))
                .ok_or_else(|| {
                    FieldError::new(
                        "limits.memory_max_bytes",
                        format!(
                            "{max} with the instance's own {} MiB is past any memory size",
                            own >> 20
                        ),
                    )
                })?;
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
            memory_derived,
        })
    }

    /// Takes the image into the instance's memory: its blobs and unpacked layers live in
    /// the instance (tmpfs, or the guest's memory), `image_bytes` in all. A derived size
    /// grows by it; a size the request gave must hold it beside the container's limit and
    /// the instance's own share.
    pub fn fit_image(&mut self, image_bytes: u64) -> Result<(), FieldError> {
        let own = overhead(self.instance.isolation);
        let mib = |b: u64| b.div_ceil(1 << 20);
        let need = match self.limits.memory_max {
            Some(max) => max.saturating_add(own).saturating_add(image_bytes),
            // No limit: the container gets at least 64 MiB beside the rest.
            None => own.saturating_add(image_bytes).saturating_add(64 << 20),
        };
        if self.memory_derived {
            let floor = if self.limits.memory_max.is_some() {
                0
            } else {
                crate::instance::spec::DEFAULT_MEMORY
            };
            self.instance.memory_bytes = need.max(floor).next_multiple_of(2 << 20);
            return Ok(());
        }
        if need > self.instance.memory_bytes {
            return Err(FieldError::new(
                "instance.memory_bytes",
                format!(
                    "{} MiB cannot hold the image ({} MiB of blobs and layers in the \
                     instance's memory), the instance's own {} MiB and the container's {} MiB: \
                     raise it or leave it unset",
                    mib(self.instance.memory_bytes),
                    mib(image_bytes),
                    mib(own),
                    mib(self.limits.memory_max.unwrap_or(64 << 20)),
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A memory limit near `u64::MAX` sized the instance with an overflowing sum (a panic
    /// with overflow checks on, a wrap to a small size without): refused, naming it.
    #[test]
    fn a_memory_limit_past_any_size_is_refused() {
        for max in [u64::MAX, u64::MAX - (1 << 20), u64::MAX / 2 * 2] {
            let p = pb::Pod {
                name: "p1".into(),
                container: Some(pb::Container {
                    image: "busybox".into(),
                    ..Default::default()
                }),
                listen_port: 8080,
                limits: Some(pb::CellLimits {
                    memory_max_bytes: Some(max),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let e = PodSpec::parse(p, 2).unwrap_err();
            assert!(
                e.field.starts_with("limits.memory_max") || e.field.starts_with("instance.memory"),
                "{e:?}"
            );
        }
    }

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
        // The image joins the instance's memory: a derived size grows by it; a given one
        // must hold it.
        let mut grows = sized.clone();
        grows.fit_image(100 << 20).unwrap();
        assert_eq!(
            grows.instance.memory_bytes,
            (64 << 20) + VM_OVERHEAD + (100 << 20)
        );
        let mut given = PodSpec::parse(
            pb::Pod {
                instance: Some(pb::Instance {
                    memory_bytes: 512 << 20,
                    isolation: pb::Isolation::Cell as i32,
                    ..Default::default()
                }),
                listen_port: 8080,
                ..p.clone()
            },
            2,
        )
        .unwrap();
        given.fit_image(100 << 20).unwrap();
        assert_eq!(given.instance.memory_bytes, 512 << 20);
        let e = given.fit_image(400 << 20).unwrap_err();
        assert_eq!(e.field, "instance.memory_bytes", "{e:?}");
        // Unset memory and no limit: at least the default.
        let mut plain = ok.clone();
        plain.fit_image(1 << 20).unwrap();
        assert_eq!(plain.instance.memory_bytes, 512 << 20);
        // A request cannot choose the instance's kernel.
        let kernel = pb::Pod {
            instance: Some(pb::Instance {
                kernel_path: "/boot/vmlinuz".into(),
                ..Default::default()
            }),
            listen_port: 8080,
            ..p.clone()
        };
        assert_eq!(
            PodSpec::parse(kernel, 2).unwrap_err().field,
            "instance.kernel_path"
        );
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
