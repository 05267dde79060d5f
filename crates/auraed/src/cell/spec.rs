//! Validated cell requests: names, cgroup v2 limits in their real units, namespaces.

use aurae_proto::runtime::v0 as pb;

use crate::{
    container::ContainerSpec,
    spec::{CellName, FieldError},
};

pub use crate::workload::limits::{CpuMax, IoMax, Limits, MIN_MEMORY_LIMIT};

/// Which host namespaces a cell shares (all `false` = fully isolated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Namespaces {
    pub share_host_pid: bool,
    pub share_host_net: bool,
    pub share_host_ipc: bool,
    pub share_host_uts: bool,
    pub share_host_mount: bool,
    pub share_host_cgroup: bool,
    pub user_namespace: bool,
}

impl Namespaces {
    /// Whether any host namespace is shared (needs `allow_host_namespaces`).
    pub fn shares_host(&self) -> bool {
        self.share_host_pid
            || self.share_host_net
            || self.share_host_ipc
            || self.share_host_uts
            || self.share_host_mount
            || self.share_host_cgroup
    }
}

impl From<Option<pb::CellNamespaces>> for Namespaces {
    fn from(n: Option<pb::CellNamespaces>) -> Self {
        let n = n.unwrap_or_default();
        Self {
            share_host_pid: n.share_host_pid,
            share_host_net: n.share_host_net,
            share_host_ipc: n.share_host_ipc,
            share_host_uts: n.share_host_uts,
            share_host_mount: n.share_host_mount,
            share_host_cgroup: n.share_host_cgroup,
            user_namespace: n.user_namespace,
        }
    }
}

/// A validated `Cell` request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CellSpec {
    pub name: CellName,
    pub limits: Limits,
    pub namespaces: Namespaces,
    /// Set for RunCell; Allocate ignores it.
    pub container: Option<ContainerSpec>,
    /// Devices beyond the default set (recorded; absent in older records = none).
    #[serde(default, with = "devices_record")]
    pub devices: aurae_sys::bpf::CellDevices,
    /// The hostname its init sets; `None`: the name's last label (absent in older
    /// records = none).
    #[serde(default)]
    pub hostname: Option<String>,
}

impl CellSpec {
    /// The hostname the cell's init sets.
    pub fn hostname(&self) -> &str {
        self.hostname
            .as_deref()
            .unwrap_or_else(|| self.name.as_str().rsplit('/').next().unwrap_or("cell"))
    }
}

/// A hostname as `sethostname(2)` takes it and resolvers expect: DNS labels joined by
/// '.', at most 64 bytes (the kernel's limit).
pub fn parse_hostname(field: &str, s: &str) -> Result<String, FieldError> {
    if s.len() > 64 {
        return Err(FieldError::new(
            field,
            format!("is {} bytes; at most 64", s.len()),
        ));
    }
    for label in s.split('.') {
        if let Some(r) = crate::spec::label_reason(label) {
            return Err(FieldError::new(
                field,
                format!("{s:?}: label {label:?} {r} (a hostname is DNS labels joined by '.')"),
            ));
        }
    }
    Ok(s.to_owned())
}

/// [`aurae_sys::bpf::CellDevices`] in a record: `{"kvm": true}`.
mod devices_record {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize, Default)]
    struct Devices {
        #[serde(default)]
        kvm: bool,
    }

    pub fn serialize<S: Serializer>(
        d: &aurae_sys::bpf::CellDevices,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        Devices { kvm: d.kvm }.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<aurae_sys::bpf::CellDevices, D::Error> {
        let r = Devices::deserialize(d)?;
        Ok(aurae_sys::bpf::CellDevices { kvm: r.kvm })
    }
}

impl CellSpec {
    /// `with_container`: RunCell (container required) or Allocate (ignored).
    pub fn parse(c: pb::Cell, with_container: bool, cpus: u64) -> Result<Self, FieldError> {
        let hostname = match c.hostname.as_str() {
            "" => None,
            h if c.namespaces.is_some_and(|n| n.share_host_uts) => {
                return Err(FieldError::new(
                    "hostname",
                    format!(
                        "{h:?}: the cell shares the host's UTS namespace (namespaces.share_host_uts), whose hostname is the host's"
                    ),
                ));
            }
            h => Some(parse_hostname("hostname", h)?),
        };
        Ok(Self {
            hostname,
            name: CellName::parse("name", &c.name)?,
            limits: Limits::parse("limits", c.limits, cpus)?,
            namespaces: c.namespaces.into(),
            container: if with_container {
                Some(ContainerSpec::parse("container", c.container)?)
            } else {
                None
            },
            devices: {
                let kvm = c.devices.is_some_and(|d| d.kvm);
                if kvm && with_container {
                    return Err(FieldError::new(
                        "devices.kvm",
                        "not for RunCell: a container's /dev holds no /dev/kvm (allocate the cell and run an executable in it)",
                    ));
                }
                aurae_sys::bpf::CellDevices { kvm }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim(f: impl FnOnce(&mut pb::CellLimits)) -> Result<Limits, FieldError> {
        let mut l = pb::CellLimits::default();
        f(&mut l);
        Limits::parse("limits", Some(l), 2)
    }

    #[test]
    fn limits_in_range_pass_unchanged() {
        let l = lim(|l| {
            l.cpu_weight = Some(100);
            l.memory_max_bytes = Some(64 << 20);
            l.memory_high_bytes = Some(32 << 20);
            l.pids_max = Some(32);
            l.cpu_max = Some(pb::CpuMax {
                quota_us: 50_000,
                period_us: 0,
            });
            l.cpuset_cpus = "0-1".into();
        })
        .unwrap();
        assert_eq!(l.cpu_weight, Some(100), "cpu.weight is written as is");
        assert_eq!(
            l.cpu_max,
            Some(CpuMax {
                quota_us: Some(50_000),
                period_us: 100_000
            })
        );
        assert!(l.memory_oom_group);
    }

    #[test]
    fn limits_out_of_range_name_the_field() {
        type Edit = Box<dyn FnOnce(&mut pb::CellLimits)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|l| l.cpu_weight = Some(0)), "limits.cpu_weight"),
            (
                Box::new(|l| l.cpu_weight = Some(10_001)),
                "limits.cpu_weight",
            ),
            (Box::new(|l| l.io_weight = Some(0)), "limits.io_weight"),
            (Box::new(|l| l.pids_max = Some(0)), "limits.pids_max"),
            (
                Box::new(|l| l.memory_max_bytes = Some(10)),
                "limits.memory_max_bytes",
            ),
            (
                Box::new(|l| {
                    l.memory_min_bytes = Some(64 << 20);
                    l.memory_max_bytes = Some(32 << 20);
                }),
                "limits.memory_min_bytes",
            ),
            (
                Box::new(|l| {
                    l.cpu_max = Some(pb::CpuMax {
                        quota_us: 10,
                        period_us: 0,
                    })
                }),
                "limits.cpu_max.quota_us",
            ),
            (
                Box::new(|l| {
                    l.cpu_max = Some(pb::CpuMax {
                        quota_us: 300_000,
                        period_us: 100_000,
                    })
                }),
                "limits.cpu_max.quota_us",
            ),
            (
                Box::new(|l| {
                    l.cpu_max = Some(pb::CpuMax {
                        quota_us: 0,
                        period_us: 10,
                    })
                }),
                "limits.cpu_max.period_us",
            ),
            (
                Box::new(|l| l.cpuset_cpus = "3-1".into()),
                "limits.cpuset_cpus",
            ),
            (
                Box::new(|l| l.cpuset_mems = "x".into()),
                "limits.cpuset_mems",
            ),
            (
                Box::new(|l| {
                    l.io_max = vec![pb::IoMax {
                        device: "sda".into(),
                        ..Default::default()
                    }]
                }),
                "limits.io_max[0].device",
            ),
        ];
        for (f, field) in cases {
            assert_eq!(lim(f).unwrap_err().field, field);
        }
    }

    #[test]
    fn run_cell_needs_a_container() {
        let c = pb::Cell {
            name: "web".into(),
            ..Default::default()
        };
        assert_eq!(
            CellSpec::parse(c.clone(), true, 2).unwrap_err().field,
            "container"
        );
        assert!(CellSpec::parse(c, false, 2).is_ok());
    }
}
