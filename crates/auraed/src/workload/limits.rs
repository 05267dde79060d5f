//! cgroup v2 limits in their real units, as a cell or an executable's own group takes
//! them: validated from the API's message, merged by an update, and the interface files
//! they become (which file, which value, which controller each needs).

use aurae_proto::runtime::v0 as pb;

use crate::{spec::FieldError, workload::cgroup::CgroupError};

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

/// One limit as a cgroup file write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitWrite {
    /// The request field, for error messages.
    pub field: &'static str,
    pub controller: &'static str,
    pub file: &'static str,
    pub value: String,
}

/// The cgroup files a set of limits becomes, in the order to write them (min/low before
/// high/max so the kernel never sees an inverted pair).
pub fn limit_writes(l: &Limits) -> Vec<LimitWrite> {
    let mut w = Vec::new();
    let mut push = |field, controller, file, value: String| {
        w.push(LimitWrite {
            field,
            controller,
            file,
            value,
        });
    };
    if let Some(v) = l.cpu_weight {
        push("limits.cpu_weight", "cpu", "cpu.weight", v.to_string());
    }
    if let Some(c) = l.cpu_max {
        let q = c
            .quota_us
            .map_or_else(|| "max".to_owned(), |q| q.to_string());
        push(
            "limits.cpu_max",
            "cpu",
            "cpu.max",
            format!("{q} {}", c.period_us),
        );
    }
    if let Some(v) = &l.cpuset_cpus {
        push("limits.cpuset_cpus", "cpuset", "cpuset.cpus", v.clone());
    }
    if let Some(v) = &l.cpuset_mems {
        push("limits.cpuset_mems", "cpuset", "cpuset.mems", v.clone());
    }
    for (field, file, v) in [
        ("limits.memory_min_bytes", "memory.min", l.memory_min),
        ("limits.memory_low_bytes", "memory.low", l.memory_low),
        ("limits.memory_high_bytes", "memory.high", l.memory_high),
        ("limits.memory_max_bytes", "memory.max", l.memory_max),
        (
            "limits.memory_swap_max_bytes",
            "memory.swap.max",
            l.memory_swap_max,
        ),
    ] {
        if let Some(v) = v {
            push(field, "memory", file, v.to_string());
        }
    }
    if let Some(v) = l.pids_max {
        push("limits.pids_max", "pids", "pids.max", v.to_string());
    }
    if let Some(v) = l.io_weight {
        push(
            "limits.io_weight",
            "io",
            "io.weight",
            format!("default {v}"),
        );
    }
    for m in &l.io_max {
        let part = |k: &str, v: Option<u64>| {
            format!(
                "{k}={}",
                v.map_or_else(|| "max".to_owned(), |v| v.to_string())
            )
        };
        push(
            "limits.io_max",
            "io",
            "io.max",
            format!(
                "{}:{} {} {} {} {}",
                m.major,
                m.minor,
                part("rbps", m.rbps),
                part("wbps", m.wbps),
                part("riops", m.riops),
                part("wiops", m.wiops)
            ),
        );
    }
    w
}

/// The writes of an executable's own group: its limits, then `memory.oom.group` (on or
/// off as asked) where the memory controller is.
pub fn own_writes(l: &Limits, has_memory: bool) -> Vec<LimitWrite> {
    let mut w = limit_writes(l);
    if has_memory || l.memory_oom_group {
        w.push(LimitWrite {
            field: "limits.memory_oom_group",
            controller: "memory",
            file: "memory.oom.group",
            value: if l.memory_oom_group { "1" } else { "0" }.to_owned(),
        });
    }
    w
}

/// Checks that every limit's controller is available; names the first missing one.
pub fn check_controllers(writes: &[LimitWrite], available: &[String]) -> Result<(), CgroupError> {
    for w in writes {
        if !available.iter().any(|c| c == w.controller) {
            return Err(CgroupError::MissingController {
                field: w.field,
                controller: w.controller,
                available: if available.is_empty() {
                    "none".to_owned()
                } else {
                    available.join(" ")
                },
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use aurae_proto::runtime::v0 as pb;

    use super::*;

    #[test]
    fn limits_become_cgroup_files_in_their_units() {
        let l = Limits::parse(
            "limits",
            Some(pb::CellLimits {
                cpu_weight: Some(100),
                cpu_max: Some(pb::CpuMax {
                    quota_us: 50_000,
                    period_us: 100_000,
                }),
                memory_max_bytes: Some(64 << 20),
                memory_min_bytes: Some(1 << 20),
                pids_max: Some(32),
                io_weight: Some(200),
                io_max: vec![pb::IoMax {
                    device: "8:0".into(),
                    rbps: 1_000_000,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            2,
        )
        .unwrap();
        let w: Vec<(&str, String)> = limit_writes(&l)
            .into_iter()
            .map(|w| (w.file, w.value))
            .collect();
        assert_eq!(
            w,
            vec![
                ("cpu.weight", "100".to_owned()),
                ("cpu.max", "50000 100000".to_owned()),
                ("memory.min", "1048576".to_owned()),
                ("memory.max", "67108864".to_owned()),
                ("pids.max", "32".to_owned()),
                ("io.weight", "default 200".to_owned()),
                (
                    "io.max",
                    "8:0 rbps=1000000 wbps=max riops=max wiops=max".to_owned()
                ),
            ]
        );
    }

    #[test]
    fn a_missing_controller_is_named() {
        let l = Limits::parse(
            "limits",
            Some(pb::CellLimits {
                memory_max_bytes: Some(64 << 20),
                ..Default::default()
            }),
            2,
        )
        .unwrap();
        let err = check_controllers(&limit_writes(&l), &["hugetlb".to_owned()]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("limits.memory_max_bytes") && msg.contains("memory controller"),
            "{msg}"
        );
        assert!(check_controllers(&limit_writes(&l), &["memory".to_owned()]).is_ok());
    }
}
