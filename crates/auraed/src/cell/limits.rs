//! A cell's limits as cgroup v2 interface files: which file, which value, which
//! controller each needs.

use super::spec::Limits;
use crate::workload::cgroup::CgroupError;

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
