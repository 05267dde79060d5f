//! Validated cell requests: names, cgroup v2 limits in their real units, namespaces.

use aurae_proto::runtime::v0 as pb;

use crate::{
    container::ContainerSpec,
    spec::{CellName, FieldError},
};

/// `cpu.max`: `quota_us` per `period_us`; `quota_us = None` is "max".
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuMax {
    pub quota_us: Option<u64>,
    pub period_us: u64,
}

/// `io.max` for one device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoMax {
    pub major: u32,
    pub minor: u32,
    pub rbps: Option<u64>,
    pub wbps: Option<u64>,
    pub riops: Option<u64>,
    pub wiops: Option<u64>,
}

/// cgroup v2 limits, each already in the unit and range of its file.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    pub cpu_weight: Option<u64>,
    pub cpu_max: Option<CpuMax>,
    pub cpuset_cpus: Option<String>,
    pub cpuset_mems: Option<String>,
    pub memory_min: Option<u64>,
    pub memory_low: Option<u64>,
    pub memory_high: Option<u64>,
    pub memory_max: Option<u64>,
    pub memory_swap_max: Option<u64>,
    pub pids_max: Option<u64>,
    pub io_weight: Option<u64>,
    pub io_max: Vec<IoMax>,
    pub memory_oom_group: bool,
}

/// Smallest memory.max / memory.high we accept: less cannot hold a process.
pub const MIN_MEMORY_LIMIT: u64 = 1 << 20;

fn range(field: &str, v: Option<u64>, lo: u64, hi: u64) -> Result<Option<u64>, FieldError> {
    match v {
        Some(x) if x < lo || x > hi => Err(FieldError::new(
            field,
            format!("{x} is outside {lo}..={hi}"),
        )),
        other => Ok(other),
    }
}

/// Checks the kernel's list format, e.g. `0-3,8,10-11`.
fn cpu_list(field: &str, s: &str) -> Result<Option<String>, FieldError> {
    if s.is_empty() {
        return Ok(None);
    }
    let bad = || FieldError::new(field, format!("{s:?} is not a list like \"0-3,8\""));
    for item in s.split(',') {
        let (a, b) = item.split_once('-').unwrap_or((item, item));
        let a: u32 = a.parse().map_err(|_| bad())?;
        let b: u32 = b.parse().map_err(|_| bad())?;
        if a > b || b > 4095 {
            return Err(bad());
        }
    }
    Ok(Some(s.to_owned()))
}

impl Limits {
    /// Only the limit the request field `field` names (`limits.memory_max_bytes`, …;
    /// `io_max` whole); nothing for another name.
    pub fn only(&self, field: &str) -> Limits {
        let mut o = Limits::default();
        match field.rsplit('.').next().unwrap_or_default() {
            "cpu_weight" => o.cpu_weight = self.cpu_weight,
            "cpu_max" => o.cpu_max = self.cpu_max,
            "cpuset_cpus" => o.cpuset_cpus.clone_from(&self.cpuset_cpus),
            "cpuset_mems" => o.cpuset_mems.clone_from(&self.cpuset_mems),
            "memory_min_bytes" => o.memory_min = self.memory_min,
            "memory_low_bytes" => o.memory_low = self.memory_low,
            "memory_high_bytes" => o.memory_high = self.memory_high,
            "memory_max_bytes" => o.memory_max = self.memory_max,
            "memory_swap_max_bytes" => o.memory_swap_max = self.memory_swap_max,
            "pids_max" => o.pids_max = self.pids_max,
            "io_weight" => o.io_weight = self.io_weight,
            "io_max" => o.io_max.clone_from(&self.io_max),
            _ => {}
        }
        o
    }

    /// Takes the limits `update` sets (and `oom_group` when given); keeps the others.
    pub fn merge(&mut self, update: &Limits, oom_group: Option<bool>) {
        fn set<T: Clone>(into: &mut Option<T>, from: &Option<T>) {
            if from.is_some() {
                into.clone_from(from);
            }
        }
        set(&mut self.cpu_weight, &update.cpu_weight);
        set(&mut self.cpu_max, &update.cpu_max);
        set(&mut self.cpuset_cpus, &update.cpuset_cpus);
        set(&mut self.cpuset_mems, &update.cpuset_mems);
        set(&mut self.memory_min, &update.memory_min);
        set(&mut self.memory_low, &update.memory_low);
        set(&mut self.memory_high, &update.memory_high);
        set(&mut self.memory_max, &update.memory_max);
        set(&mut self.memory_swap_max, &update.memory_swap_max);
        set(&mut self.pids_max, &update.pids_max);
        set(&mut self.io_weight, &update.io_weight);
        for m in &update.io_max {
            self.io_max
                .retain(|o| (o.major, o.minor) != (m.major, m.minor));
            self.io_max.push(m.clone());
        }
        if let Some(on) = oom_group {
            self.memory_oom_group = on;
        }
    }

    /// Validates `l`; `cpus` is how many CPUs the machine has (bounds cpu.max).
    pub fn parse(field: &str, l: Option<pb::CellLimits>, cpus: u64) -> Result<Self, FieldError> {
        let Some(l) = l else {
            return Ok(Self {
                memory_oom_group: true,
                ..Self::default()
            });
        };
        let f = |n: &str| format!("{field}.{n}");
        let cpu_max = match l.cpu_max {
            None => None,
            Some(c) => {
                let period_us = if c.period_us == 0 {
                    100_000
                } else {
                    c.period_us
                };
                if !(1_000..=1_000_000).contains(&period_us) {
                    return Err(FieldError::new(
                        f("cpu_max.period_us"),
                        format!("{period_us} is outside 1000..=1000000"),
                    ));
                }
                let quota_us = match c.quota_us {
                    0 => None,
                    q if q < 1_000 => {
                        return Err(FieldError::new(
                            f("cpu_max.quota_us"),
                            format!("{q} is below the kernel's minimum 1000"),
                        ));
                    }
                    q if q > period_us.saturating_mul(cpus) => {
                        return Err(FieldError::new(
                            f("cpu_max.quota_us"),
                            format!(
                                "{q} per {period_us} µs is more than the machine's {cpus} CPUs can give"
                            ),
                        ));
                    }
                    q => Some(q),
                };
                Some(CpuMax {
                    quota_us,
                    period_us,
                })
            }
        };
        let mem_floor = |name: &str, v: Option<u64>| match v {
            Some(x) if x < MIN_MEMORY_LIMIT => Err(FieldError::new(
                f(name),
                format!("{x} bytes is below the minimum {MIN_MEMORY_LIMIT} (1 MiB)"),
            )),
            other => Ok(other),
        };
        let memory_high = mem_floor("memory_high_bytes", l.memory_high_bytes)?;
        let memory_max = mem_floor("memory_max_bytes", l.memory_max_bytes)?;
        // memory.min <= memory.low <= memory.high <= memory.max, for those given.
        let order = [
            ("memory_min_bytes", l.memory_min_bytes),
            ("memory_low_bytes", l.memory_low_bytes),
            ("memory_high_bytes", memory_high),
            ("memory_max_bytes", memory_max),
        ];
        for (i, (na, a)) in order.iter().enumerate() {
            for (nb, b) in &order[i + 1..] {
                if let (Some(a), Some(b)) = (a, b)
                    && a > b
                {
                    return Err(FieldError::new(
                        f(na),
                        format!("{a} is larger than {nb} {b}"),
                    ));
                }
            }
        }
        let mut io_max = Vec::new();
        for (i, m) in l.io_max.into_iter().enumerate() {
            let field = f(&format!("io_max[{i}].device"));
            let (maj, min) = m
                .device
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
                .ok_or_else(|| {
                    FieldError::new(&field, format!("{:?} is not \"major:minor\"", m.device))
                })?;
            let nz = |v: u64| (v != 0).then_some(v);
            io_max.push(IoMax {
                major: maj,
                minor: min,
                rbps: nz(m.rbps),
                wbps: nz(m.wbps),
                riops: nz(m.riops),
                wiops: nz(m.wiops),
            });
        }
        Ok(Self {
            cpu_weight: range(&f("cpu_weight"), l.cpu_weight, 1, 10_000)?,
            cpu_max,
            cpuset_cpus: cpu_list(&f("cpuset_cpus"), &l.cpuset_cpus)?,
            cpuset_mems: cpu_list(&f("cpuset_mems"), &l.cpuset_mems)?,
            memory_min: l.memory_min_bytes,
            memory_low: l.memory_low_bytes,
            memory_high,
            memory_max,
            memory_swap_max: l.memory_swap_max_bytes,
            pids_max: range(&f("pids_max"), l.pids_max, 1, 4_194_304)?,
            io_weight: range(&f("io_weight"), l.io_weight, 1, 10_000)?,
            io_max,
            memory_oom_group: l.memory_oom_group.unwrap_or(true),
        })
    }
}

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
