//! One cell as auraed holds it: its spec, the namespaces it owns, its init, its phase and
//! its executables; and how limits of nested cells may narrow their parent's.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::SystemTime,
};

use aurae_proto::runtime::v0 as pb;
use aurae_sys::{Namespaces as Ns, Pidfd};

use super::spec::{CellSpec, Limits};
use crate::{
    executable::Executable,
    spec::{FieldError, Label},
};

/// The namespaces a cell has of its own.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct NsSet {
    /// New namespaces other than PID.
    pub(super) others: i32,
    pub(super) pid: bool,
}

impl NsSet {
    /// A nested cell shares its parent's PID namespace (so the parent sees and reaps
    /// below it) and gets its own others.
    pub(super) fn of(spec: &CellSpec, nested: bool) -> Self {
        let n = &spec.namespaces;
        let mut others = 0;
        for (shared, flag) in [
            (n.share_host_mount, Ns::MOUNT),
            (n.share_host_uts, Ns::UTS),
            (n.share_host_ipc, Ns::IPC),
            (n.share_host_net, Ns::NET),
            (n.share_host_cgroup, Ns::CGROUP),
        ] {
            if !shared {
                others |= flag;
            }
        }
        Self {
            others,
            pid: !n.share_host_pid && !nested,
        }
    }

    pub(super) fn any(self) -> bool {
        self.pid || self.others != 0
    }

    /// The init's setup list: "pid,mnt,uts,net".
    pub(super) fn describe(self) -> String {
        let mut v = Vec::new();
        for (flag, name) in [
            (Ns::MOUNT, "mnt"),
            (Ns::UTS, "uts"),
            (Ns::IPC, "ipc"),
            (Ns::NET, "net"),
            (Ns::CGROUP, "cgroup"),
        ] {
            if self.others & flag != 0 {
                v.push(name);
            }
        }
        if self.pid {
            v.push("pid");
        }
        v.join(",")
    }
}

#[derive(Debug)]
pub(super) struct Init {
    pub(super) pid: i32,
    pub(super) pidfd: Arc<Pidfd>,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) phase: pb::Phase,
    pub(super) message: String,
    pub(super) executables: BTreeMap<Label, Arc<Executable>>,
    /// Of a top-level cell: whether its tree (one PID namespace) runs containers
    /// (`Some(true)`) or plain executables (`Some(false)`); fixed by the first start.
    /// A container must never share a PID namespace with a plain executable of the same
    /// uid: its `/proc/<pid>/root` would lead out of the container to the host's files.
    pub(super) runs_containers: Option<bool>,
}

/// One cell.
#[derive(Debug)]
pub struct Cell {
    pub spec: CellSpec,
    pub created_at: SystemTime,
    pub(super) ns: NsSet,
    pub(super) init: Option<Init>,
    /// The process whose PID namespace the cell's processes are born in: its own init
    /// (top-level cell), its parent's holder (nested cell), none (host PID namespace).
    pub(super) pid_holder: Option<Arc<Pidfd>>,
    pub(super) inner: Mutex<Inner>,
    pub(super) oom_kills: AtomicU64,
}

impl Cell {
    pub(super) fn phase(&self) -> pb::Phase {
        self.inner.lock().map_or(pb::Phase::Failed, |i| i.phase)
    }

    pub(super) fn set_phase(&self, phase: pb::Phase, message: &str) {
        if let Ok(mut i) = self.inner.lock() {
            i.phase = phase;
            message.clone_into(&mut i.message);
        }
    }

    pub(super) fn executables(&self) -> Vec<Arc<Executable>> {
        self.inner
            .lock()
            .map(|i| i.executables.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn status(&self) -> pb::CellStatus {
        let (phase, message) = self
            .inner
            .lock()
            .map_or((pb::Phase::Failed, String::new()), |i| {
                (i.phase, i.message.clone())
            });
        pb::CellStatus {
            name: self.spec.name.to_string(),
            phase: phase as i32,
            limits: Some(limits_to_proto(&self.spec.limits)),
            namespaces: Some(pb::CellNamespaces {
                share_host_pid: self.spec.namespaces.share_host_pid,
                share_host_net: self.spec.namespaces.share_host_net,
                share_host_ipc: self.spec.namespaces.share_host_ipc,
                share_host_uts: self.spec.namespaces.share_host_uts,
                share_host_mount: self.spec.namespaces.share_host_mount,
                share_host_cgroup: self.spec.namespaces.share_host_cgroup,
                user_namespace: self.spec.namespaces.user_namespace,
            }),
            executables: self.executables().iter().map(|e| e.status()).collect(),
            // The cell's first container's image (RunCell starts it with the cell).
            image_digest: self
                .executables()
                .iter()
                .find_map(|e| e.image_digest.clone())
                .unwrap_or_default(),
            created_at: Some(self.created_at.into()),
            message,
        }
    }

    /// The init's pid (host namespace), if the cell has one.
    pub fn init_pid(&self) -> Option<i32> {
        self.init.as_ref().map(|i| i.pid)
    }
}

pub(super) fn limits_to_proto(l: &Limits) -> pb::CellLimits {
    pb::CellLimits {
        cpu_weight: l.cpu_weight,
        cpu_max: l.cpu_max.map(|c| pb::CpuMax {
            quota_us: c.quota_us.unwrap_or(0),
            period_us: c.period_us,
        }),
        cpuset_cpus: l.cpuset_cpus.clone().unwrap_or_default(),
        cpuset_mems: l.cpuset_mems.clone().unwrap_or_default(),
        memory_min_bytes: l.memory_min,
        memory_low_bytes: l.memory_low,
        memory_high_bytes: l.memory_high,
        memory_max_bytes: l.memory_max,
        memory_swap_max_bytes: l.memory_swap_max,
        pids_max: l.pids_max,
        io_weight: l.io_weight,
        io_max: l
            .io_max
            .iter()
            .map(|m| pb::IoMax {
                device: format!("{}:{}", m.major, m.minor),
                rbps: m.rbps.unwrap_or(0),
                wbps: m.wbps.unwrap_or(0),
                riops: m.riops.unwrap_or(0),
                wiops: m.wiops.unwrap_or(0),
            })
            .collect(),
        memory_oom_group: Some(l.memory_oom_group),
    }
}

/// A child may only narrow its parent's limits.
pub(super) fn check_narrowing(
    child: &Limits,
    parent: &Limits,
    parent_name: &str,
) -> Result<(), FieldError> {
    let pairs = [
        (
            "limits.memory_max_bytes",
            child.memory_max,
            parent.memory_max,
        ),
        (
            "limits.memory_high_bytes",
            child.memory_high,
            parent.memory_high,
        ),
        (
            "limits.memory_swap_max_bytes",
            child.memory_swap_max,
            parent.memory_swap_max,
        ),
        ("limits.pids_max", child.pids_max, parent.pids_max),
    ];
    for (field, c, p) in pairs {
        if let (Some(c), Some(p)) = (c, p)
            && c > p
        {
            return Err(FieldError::new(
                field,
                format!("{c} is more than parent cell {parent_name:?} allows ({p})"),
            ));
        }
    }
    if let (Some(c), Some(p)) = (child.cpu_max, parent.cpu_max)
        && let (Some(cq), Some(pq)) = (c.quota_us, p.quota_us)
    {
        // Compare CPU shares of time: cq/cp > pq/pp.
        if u128::from(cq) * u128::from(p.period_us) > u128::from(pq) * u128::from(c.period_us) {
            return Err(FieldError::new(
                "limits.cpu_max",
                format!(
                    "{cq}/{} is more CPU than parent cell {parent_name:?} allows ({pq}/{})",
                    c.period_us, p.period_us
                ),
            ));
        }
    }
    Ok(())
}
