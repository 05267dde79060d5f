//! Durable records of VMs, and finding them again after a restart of auraed.
//!
//! A VM is recorded once its VMM reports it started (and deleted when freed): its spec,
//! the VMM process (pid + start time + boot), its cgroup, its network lease and where the
//! output holder keeps copies of the VMM's control socket and console. While the holder
//! keeps the control socket, the VMM never sees it close: a crash of auraed does not stop
//! the guest. At start, [`Vms::readopt`] takes both back from the holder, re-attaches the
//! control socket (reports, stop) and the console (what the guest printed meanwhile
//! included), and takes back the lease; a VM whose VMM is gone is cleaned up (its TAP
//! device deleted, its record removed; its cgroup is swept).

use std::{collections::BTreeSet, path::PathBuf, sync::Arc, time::SystemTime};

use aurae_proto::runtime::v0 as pb;

use crate::workload::Phase;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::info;

use super::{Vm, VmSpec, VmState, Vms, network::Lease};
use crate::{
    spec::CellName,
    store::kinds,
    workload::{
        holder::{HeldOutput, ProcRef},
        log::Log,
    },
};

/// What is recorded of a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub spec: VmSpec,
    pub vmm: Option<ProcRef>,
    pub cgroup: CellName,
    pub started_at: SystemTime,
    pub lease: Option<Lease>,
    pub log: PathBuf,
    /// Control socket and console, as the holder keeps them.
    pub channels: Option<HeldOutput>,
    pub boot_ns: Option<u64>,
}

impl Vm {
    /// This VM's record as it stands.
    pub fn record(&self) -> VmRecord {
        VmRecord {
            spec: self.spec.clone(),
            vmm: ProcRef::of(self.pid).ok(),
            cgroup: self.cgroup.clone(),
            started_at: self.started_at,
            lease: self.lease.clone(),
            log: self.log.path().unwrap_or_default(),
            channels: self.held.clone(),
            boot_ns: self
                .state
                .borrow()
                .boot_time
                .and_then(|d| u64::try_from(d.as_nanos()).ok()),
        }
    }
}

/// What a restart found of the VMs.
#[derive(Debug, Default)]
pub struct ReadoptedVms {
    /// Their cgroups (`vms/<name>`): the sweep leaves them alone.
    pub cgroups: BTreeSet<String>,
    pub warnings: Vec<String>,
    /// Holders of a previous auraed whose channels were taken back.
    pub old_holders: Vec<ProcRef>,
}

impl Vms {
    /// Serves again the VMs the records of a previous auraed describe (see the module
    /// documentation). Call once, at start, before the sweep and before serving.
    pub async fn readopt(self: &Arc<Self>) -> ReadoptedVms {
        let mut out = ReadoptedVms::default();
        let Some(store) = self.recorder.store().cloned() else {
            return out;
        };
        let loaded = store.load::<VmRecord>(kinds::VIRTUAL_MACHINE);
        out.warnings.extend(loaded.quarantined);
        for (_, r) in loaded.records {
            let name = r.spec.name.clone();
            let vmm = match r.vmm.map(|p| p.open_or_why()) {
                Some(Ok(pidfd)) => pidfd,
                Some(Err(why)) => {
                    out.warnings.push(format!(
                        "virtual machine {:?}: its VMM {why}",
                        name.as_str()
                    ));
                    None
                }
                None => None,
            };
            let found = match (vmm, &r.channels) {
                (None, _) => Err("its VMM is gone".to_owned()),
                (Some(_), None) => Err("its control socket was not held".to_owned()),
                (Some(pidfd), Some(h)) => reclaim_channels(h).map(|c| (pidfd, c)),
            };
            let (pidfd, (ctl, console)) = match found {
                Ok(f) => f,
                Err(why) => {
                    self.forget_lost(&r, &why, &mut out);
                    continue;
                }
            };
            let held = self.hold(name.as_str(), [&ctl, &console]);
            if let (Some(_), Some(old)) = (&held, &r.channels) {
                out.old_holders.push(old.holder);
            }
            let held = held.or(r.channels.clone());
            if let (Some(l), Ok(mut n)) = (&r.lease, self.network.lock()) {
                n.adopt(l);
            }
            let pidfd = Arc::new(pidfd);
            let vm = Arc::new(Vm {
                spec: r.spec.clone(),
                pid: r.vmm.map_or(0, |p| p.pid),
                pidfd: pidfd.clone(),
                started_at: r.started_at,
                log: Arc::new(Log::resume(r.log.clone())),
                state: watch::channel(VmState {
                    phase: Phase::Running,
                    boot_time: r.boot_ns.map(std::time::Duration::from_nanos),
                    ended: None,
                    process: None,
                    message: String::new(),
                    exits: None,
                    restore_time: None,
                    snapshotted: None,
                })
                .0,
                ctl: Arc::new(ctl),
                lease: r.lease.clone(),
                cgroup: r.cgroup.clone(),
                held,
            });
            self.pump_console(&vm, console);
            if let Err(e) = self.read_reports(&vm, &vm.ctl) {
                out.warnings.push(format!(
                    "virtual machine {name:?}: its reports cannot be read: {e}"
                ));
            }
            self.watch_readopted_vmm(&vm, pidfd);
            if let Ok(mut m) = self.vms.lock() {
                m.insert(name.clone(), vm.clone());
            }
            self.recorder.put(
                pb::Kind::VirtualMachine,
                kinds::VIRTUAL_MACHINE,
                name.as_str(),
                &vm.record(),
            );
            info!(vm = %name, "virtual machine re-adopted after a restart");
            out.cgroups.insert(r.cgroup.to_string());
        }
        if !out.cgroups.is_empty() {
            out.cgroups
                .insert(crate::workload::layout::VM_GROUP.to_owned());
        }
        out
    }

    /// A VM that cannot be served again: its VMM is gone (or cannot be controlled and is
    /// killed), its TAP device deleted, its record removed; its cgroup is left to the
    /// sweep.
    fn forget_lost(&self, r: &VmRecord, why: &str, out: &mut ReadoptedVms) {
        if let Some(Ok(Some(pidfd))) = r.vmm.map(|p| p.open()) {
            let _ = pidfd.send_signal(nix::libc::SIGKILL);
        }
        if let Some(l) = &r.lease
            && let Err(e) = aurae_sys::net::delete_tap(&l.tap)
            && e.raw_os_error() != Some(nix::libc::ENODEV)
        {
            tracing::warn!(tap = %l.tap, "deleting a lost VM's TAP: {e}");
        }
        out.warnings.push(format!(
            "virtual machine {:?} could not be served again ({why}): its VMM stopped, removed",
            r.spec.name.as_str()
        ));
        self.recorder.delete(
            pb::Kind::VirtualMachine,
            kinds::VIRTUAL_MACHINE,
            r.spec.name.as_str(),
        );
    }

    /// A VMM that is not our child any more: its end is seen through its pidfd.
    fn watch_readopted_vmm(&self, vm: &Arc<Vm>, pidfd: Arc<aurae_sys::Pidfd>) {
        let vm = vm.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            crate::workload::supervise::exited(pidfd).await;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            vm.state.send_modify(|s| {
                if s.ended.is_none() && s.phase != Phase::Failed {
                    s.phase = Phase::Failed;
                    s.message = "the VMM process ended without a report".into();
                }
                s.process = Some((None, SystemTime::now()));
            });
            events.emit(
                pb::Kind::VirtualMachine,
                vm.spec.name.as_str(),
                pb::EventType::Stopped,
                vm.state.borrow().message.clone(),
            );
        });
    }

    /// Whether `file` (`<name>.log` or `<name>.log.1` under the VMs' logs) belongs to a
    /// VM this auraed serves.
    pub fn holds_log(&self, file: &str) -> bool {
        let name = file
            .strip_suffix(".log")
            .or_else(|| file.strip_suffix(".log.1"))
            .unwrap_or(file);
        self.vms
            .lock()
            .is_ok_and(|m| m.keys().any(|k| k.as_str() == name))
    }

    /// Whether a VM's channels are still kept by the holder `h`.
    pub fn holds_with(&self, h: &ProcRef) -> bool {
        self.vms
            .lock()
            .map(|m| {
                m.values()
                    .any(|v| v.held.as_ref().is_some_and(|held| &held.holder == h))
            })
            .unwrap_or(false)
    }
}

/// A VMM's control socket and console taken back from the holder that kept them (an
/// error that may pass tried again: `workload::process::tried_again`); `Err` says why
/// not, for the warning.
fn reclaim_channels(
    h: &crate::workload::holder::HeldOutput,
) -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd), String> {
    match crate::workload::process::tried_again(|| h.reclaim_pair(true)) {
        Ok(Some(pair)) => Ok(pair),
        Ok(None) => {
            Err("its control socket and console were no longer held (the holder lost them)".into())
        }
        Err(e) => Err(format!("taking its control socket back failed: {e}")),
    }
}
