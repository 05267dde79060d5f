//! Durable records of spawned instances, and finding them again after a restart.
//!
//! An instance is recorded once it is ready (and deleted when freed): its name, identity,
//! process (pid + start time + boot), cgroup, address, veth and route. Nothing of ours sits
//! between the child and what it needs: it serves on its own address, writes its own log
//! file, and keeps its identity in its own memory, so a crash of its parent costs it
//! nothing. At start, [`Instances::readopt`] takes back each one whose process is still
//! the one recorded (its address leased again, its end watched through a pidfd); one that
//! is gone is forgotten (its route deleted, its record removed; its cgroup is swept).

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use aurae_proto::runtime::v0 as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Instance, InstanceSpec, InstanceState, Instances, Isolation};
use crate::{
    spec::{CellName, Label},
    store::kinds,
    workload::{Phase, process::ProcRef},
};

/// What is recorded of an instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub name: Label,
    pub spiffe_id: String,
    pub vm: bool,
    pub isolation_reason: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub ready_timeout_ms: u64,
    pub svid_ttl_s: u64,
    pub started_at: SystemTime,
    pub depth: u32,
    pub addr: Ipv4Addr,
    pub addr6: Ipv6Addr,
    pub process: Option<ProcRef>,
    pub veth: String,
    pub cgroup: CellName,
    pub route: (String, Ipv4Addr),
    pub log: PathBuf,
    pub boot_ns: Option<u64>,
    pub ready_ns: Option<u64>,
    pub svid_expires_at: Option<SystemTime>,
    #[serde(default)]
    pub boot_reason: String,
}

/// What a restart found of the instances.
#[derive(Debug, Default)]
pub struct ReadoptedInstances {
    /// Their cgroups (`instances/<name>`, and `instances`): the sweep leaves them alone.
    pub cgroups: BTreeSet<String>,
    pub warnings: Vec<String>,
}

impl Instances {
    /// Records (or re-records) an instance as it stands.
    pub(super) fn record(&self, i: &Instance) {
        let s = i.state.borrow().clone();
        let ns = |d: Option<Duration>| d.and_then(|d| u64::try_from(d.as_nanos()).ok());
        let r = InstanceRecord {
            name: i.spec.name.clone(),
            spiffe_id: i.spiffe_id.to_string(),
            vm: i.isolation == Isolation::VirtualMachine,
            isolation_reason: i.isolation_reason.clone(),
            vcpus: i.spec.vcpus,
            memory_bytes: i.spec.memory_bytes,
            ready_timeout_ms: u64::try_from(i.spec.ready_timeout.as_millis()).unwrap_or(0),
            svid_ttl_s: i.spec.svid_ttl.as_secs(),
            started_at: i.started_at,
            depth: i.depth,
            addr: i.addr,
            addr6: i.addr6,
            process: ProcRef::of(i.pid).ok(),
            veth: i.veth.clone(),
            cgroup: i.cgroup.clone(),
            route: i.route.clone(),
            log: i.log.clone(),
            boot_ns: ns(s.boot_time),
            ready_ns: ns(s.ready_time),
            svid_expires_at: s.svid_expires_at,
            boot_reason: i.boot_reason.clone(),
        };
        self.recorder.put(
            pb::Kind::Instance,
            kinds::INSTANCE,
            i.spec.name.as_str(),
            &r,
        );
    }

    /// Serves again the instances a previous auraed's records describe (see the module
    /// docs). Call once, at start, before the sweep and before serving.
    pub fn readopt(self: &Arc<Self>) -> ReadoptedInstances {
        let mut out = ReadoptedInstances::default();
        let Some(store) = self.recorder.store().cloned() else {
            return out;
        };
        let loaded = store.load::<InstanceRecord>(kinds::INSTANCE);
        out.warnings.extend(loaded.quarantined);
        for (_, r) in loaded.records {
            let pidfd = match r.process.map(|p| p.open_or_why()) {
                Some(Ok(pidfd)) => pidfd,
                Some(Err(why)) => {
                    out.warnings
                        .push(format!("instance {}: its process {why}", r.name));
                    None
                }
                None => None,
            };
            // A microVM instance's VMM is not taken back (its console and control socket
            // are not kept across a crash yet): it is stopped and forgotten.
            if r.vm
                && let Some(p) = &pidfd
            {
                let _ = p.send_signal(nix::libc::SIGKILL);
            }
            let (Some(pidfd), Ok(spiffe_id), false) = (pidfd, r.spiffe_id.parse(), r.vm) else {
                self.forget_lost(&r, &mut out);
                continue;
            };
            if let Ok(mut n) = self.vms.network().lock() {
                n.adopt_addr(r.addr);
            }
            if let Some(n) = r
                .veth
                .strip_prefix("aurae-i")
                .and_then(|n| n.parse::<u64>().ok())
            {
                self.next_veth
                    .fetch_max(n, std::sync::atomic::Ordering::SeqCst);
            }
            let pidfd = Arc::new(pidfd);
            let spec = InstanceSpec {
                name: r.name.clone(),
                isolation: if r.vm {
                    pb::Isolation::VirtualMachine
                } else {
                    pb::Isolation::Cell
                },
                vcpus: r.vcpus,
                memory_bytes: r.memory_bytes,
                kernel: None,
                initramfs: None,
                ready_timeout: Duration::from_millis(r.ready_timeout_ms),
                svid_ttl: Duration::from_secs(r.svid_ttl_s),
                template: pb::TemplateUse::TemplateAuto,
            };
            let inst = Arc::new(Instance {
                spec,
                spiffe_id,
                isolation: if r.vm {
                    Isolation::VirtualMachine
                } else {
                    Isolation::Cell
                },
                isolation_reason: r.isolation_reason.clone(),
                started_at: r.started_at,
                depth: r.depth,
                addr: r.addr,
                addr6: r.addr6,
                log: r.log.clone(),
                state: watch::channel(InstanceState {
                    phase: Phase::Running,
                    message: String::new(),
                    boot_time: r.boot_ns.map(Duration::from_nanos),
                    ready_time: r.ready_ns.map(Duration::from_nanos),
                    svid_expires_at: r.svid_expires_at,
                    exited: None,
                })
                .0,
                pid: r.process.map_or(0, |p| p.pid),
                pidfd: pidfd.clone(),
                veth: r.veth.clone(),
                cgroup: r.cgroup.clone(),
                route: r.route.clone(),
                vm: None,
                lease: None,
                // Only cell-isolated instances are taken back: never restored.
                template: None,
                boot_reason: r.boot_reason.clone(),
            });
            self.watch_readopted(&inst, pidfd);
            if let Ok(mut m) = self.instances.lock() {
                m.insert(r.name.clone(), inst);
            }
            info!(instance = %r.name, "instance re-adopted after a restart");
            out.cgroups.insert(r.cgroup.to_string());
        }
        if !out.cgroups.is_empty() {
            out.cgroups
                .insert(crate::workload::layout::INSTANCE_GROUP.to_owned());
        }
        out
    }

    /// An instance that cannot be served again (its process is gone): its route and
    /// veth deleted, its record removed; its cgroup is left to the sweep.
    fn forget_lost(&self, r: &InstanceRecord, out: &mut ReadoptedInstances) {
        let (bridge, net) = &r.route;
        if let Err(e) = aurae_sys::netlink::delete_route_v4(bridge, *net, 24, r.addr) {
            warn!(instance = %r.name, "deleting a lost instance's route: {e}");
        }
        if let Err(e) = aurae_sys::netlink::delete_link(&r.veth) {
            warn!(instance = %r.name, "deleting a lost instance's veth: {e}");
        }
        let _ = std::fs::remove_file(&r.log);
        out.warnings.push(format!(
            "instance {:?} could not be served again (its auraed is gone): removed",
            r.name.as_str()
        ));
        self.recorder
            .delete(pb::Kind::Instance, kinds::INSTANCE, r.name.as_str());
    }

    /// A child that is not ours any more: its end is seen through its pidfd.
    fn watch_readopted(&self, inst: &Arc<Instance>, pidfd: Arc<aurae_sys::Pidfd>) {
        let inst = inst.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            crate::workload::supervise::exited(pidfd).await;
            let stopping = inst.phase() == Phase::Stopping;
            let message = "its auraed ended (after a restart of this auraed: no exit status)";
            inst.set(|s| {
                s.phase = if stopping {
                    Phase::Exited
                } else {
                    Phase::Failed
                };
                s.message = message.into();
                s.exited = Some((None, SystemTime::now()));
            });
            events.emit(
                pb::Kind::Instance,
                inst.spec.name.as_str(),
                if stopping {
                    pb::EventType::Exited
                } else {
                    pb::EventType::Failed
                },
                message,
            );
        });
    }

    /// Whether `file` (`<name>.log` under the instances' logs) belongs to an instance
    /// this auraed serves.
    pub fn holds_log(&self, file: &str) -> bool {
        let name = file.strip_suffix(".log").unwrap_or(file);
        self.instances
            .lock()
            .is_ok_and(|m| m.keys().any(|k| k.as_str() == name))
    }
}
