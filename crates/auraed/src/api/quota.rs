//! Per-grant quotas: what may live under a grant's names (cells, executables, VMs, memory).
//!
//! Checked in the adapters, before any work, against what the domain services report
//! ([`crate::cell::Cells::usage`], [`crate::vm::Vms::usage`]). A caller whose grant has a
//! quota holds one lock from the check until its resource exists, so concurrent requests
//! cannot all pass the same check; callers without a quota never take it.

use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard};
use tonic::Status;

use super::authz::Caller;
use crate::{cell::Cells, instance::Instances, vm::Vms};

/// What a request would add.
#[derive(Debug, Clone, Copy, Default)]
pub struct Demand {
    pub cells: usize,
    pub executables: usize,
    pub vms: usize,
    pub instances: usize,
    /// Memory the request adds; `None`: a new outermost cell without memory.max.
    pub memory_bytes: Option<u64>,
}

impl Demand {
    /// One new cell (nested in one under the grant's names: no memory of its own).
    pub fn cell(caller: &Caller, spec: &crate::cell::CellSpec) -> Self {
        let nested_within = spec
            .name
            .parent()
            .is_some_and(|p| caller.grant.allows_name(p.as_str()));
        Self {
            cells: 1,
            memory_bytes: if nested_within {
                Some(0)
            } else {
                spec.limits.memory_max
            },
            ..Self::default()
        }
    }

    /// One new executable.
    pub fn executable() -> Self {
        Self {
            executables: 1,
            ..Self::default()
        }
    }
}

/// Held while the admitted request creates its resource.
#[derive(Debug)]
pub struct Admission(#[allow(dead_code)] Option<OwnedMutexGuard<()>>);

/// The quota checker: what exists, and the one lock quota'd callers take.
#[derive(Debug)]
pub struct Quotas {
    cells: Arc<Cells>,
    vms: Arc<Vms>,
    instances: Arc<Instances>,
    lock: Arc<Mutex<()>>,
}

fn exhausted(caller: &Caller, quota: &str, limit: u64, used: u64, adds: u64) -> Status {
    tracing::info!(target: "aurae::audit", peer_id = %caller.id, method = %caller.method, quota, limit, used, decision = "deny");
    Status::resource_exhausted(format!(
        "quota.{quota} of {}: {used} in use + {adds} asked > {limit} allowed (free some first)",
        caller.id
    ))
}

impl Quotas {
    pub fn new(cells: Arc<Cells>, vms: Arc<Vms>, instances: Arc<Instances>) -> Self {
        Self {
            cells,
            vms,
            instances,
            lock: Arc::default(),
        }
    }

    /// Admits `demand` under the caller's quota, or says which quota it would exceed. A new
    /// cell nested in one already under the grant's names adds no memory (its parent's
    /// memory.max bounds it): pass `memory_bytes: Some(0)` for it.
    pub async fn admit(&self, caller: &Caller, demand: Demand) -> Result<Admission, Status> {
        let q = caller.grant.quota;
        if q == Default::default() {
            return Ok(Admission(None));
        }
        let guard = self.lock.clone().lock_owned().await;
        let within = |n: &str| caller.grant.allows_name(n);
        let cells = self.cells.usage(within);
        let (vms, vm_memory) = self.vms.usage(within);
        let (instances, instance_memory) = self.instances.usage(within);
        let check = |quota: &str, limit: Option<u32>, used: usize, adds: usize| match limit {
            Some(l) if adds > 0 && used + adds > l as usize => Err(exhausted(
                caller,
                quota,
                u64::from(l),
                used as u64,
                adds as u64,
            )),
            _ => Ok(()),
        };
        check("cells", q.cells, cells.cells, demand.cells)?;
        check(
            "executables",
            q.executables,
            cells.executables,
            demand.executables,
        )?;
        check("vms", q.vms, vms, demand.vms)?;
        check("instances", q.instances, instances, demand.instances)?;
        if let Some(limit) = q.memory_bytes
            && (demand.cells > 0 || demand.vms > 0 || demand.instances > 0)
        {
            let Some(adds) = demand.memory_bytes else {
                return Err(Status::invalid_argument(format!(
                    "limits.memory_max: is required: quota.memory_bytes of {} bounds the memory of its cells",
                    caller.id
                )));
            };
            let used = cells
                .memory_bytes
                .saturating_add(vm_memory)
                .saturating_add(instance_memory);
            if cells.unbounded_memory > 0 || used.saturating_add(adds) > limit {
                return Err(exhausted(caller, "memory_bytes", limit, used, adds));
            }
        }
        Ok(Admission(Some(guard)))
    }
}
