//! One cell as auraed holds it: its spec, the namespaces it owns, its init, its phase and
//! its executables; and how limits of nested cells may narrow their parent's.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::SystemTime,
};

use crate::workload::Phase;
use aurae_sys::{Namespaces as Ns, Pidfd};

use super::spec::{CellSpec, Limits};
use crate::{
    executable::Executable,
    spec::{FieldError, Label},
};

/// The namespaces a cell has of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
    /// Taken when it started (or was found again): a record never names a successor.
    pub(super) proc: Option<crate::workload::process::ProcRef>,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) phase: Phase,
    pub(super) message: String,
    pub(super) executables: BTreeMap<Label, Arc<Executable>>,
    /// Of a top-level cell: whether its tree (one PID namespace) runs containers
    /// (`Some(true)`) or plain executables (`Some(false)`); fixed by the first start, or
    /// by the allocation of a cell made for one kind (RunCell: `Cells::allocate_for`).
    /// A container must never share a PID namespace with a plain executable of the same
    /// uid: its `/proc/<pid>/root` would lead out of the container to the host's files.
    pub(super) runs_containers: Option<bool>,
    /// Of a top-level cell: a privileged caller mixed both kinds in its tree; nobody
    /// else may start anything there any more.
    pub(super) mixed: bool,
    /// Names reserved by starts in progress (checked with `executables`, so two starts
    /// of one name cannot both pass).
    pub(super) starting: std::collections::BTreeSet<Label>,
    /// Made by a run call (RunCell) for its one workload, and no executable of it was
    /// freed since: a restart that finds it holding nothing (the call's start cut by a
    /// crash before its record) frees it, as the call would have.
    pub(super) made_for_run: bool,
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
    pub(super) fn phase(&self) -> Phase {
        self.inner.lock().map_or(Phase::Failed, |i| i.phase)
    }

    pub(super) fn set_phase(&self, phase: Phase, message: &str) {
        if let Ok(mut i) = self.inner.lock() {
            i.phase = phase;
            message.clone_into(&mut i.message);
        }
    }

    pub fn executables(&self) -> Vec<Arc<Executable>> {
        self.inner
            .lock()
            .map(|i| i.executables.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Its phase and the message that goes with it.
    pub fn phase_and_message(&self) -> (Phase, String) {
        self.inner
            .lock()
            .map_or((Phase::Failed, String::new()), |i| {
                (i.phase, i.message.clone())
            })
    }

    /// The init's pid (host namespace), if the cell has one.
    pub fn init_pid(&self) -> Option<i32> {
        self.init.as_ref().map(|i| i.pid)
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
